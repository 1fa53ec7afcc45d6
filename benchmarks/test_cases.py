"""Every runner case × provider as a pytest-benchmark test (see conftest.py for usage)."""
from __future__ import annotations

import functools
import os

import pytest
import torch

from regkernels.bench.cases import all_cases
from regkernels.bench.runner import MODEL_STEP, PROVIDERS

DEVICE = torch.device(os.environ.get("REGKERNELS_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
CASES = [c for c in all_cases() if DEVICE.type in c.devices and (c.quick or os.environ.get("REGKERNELS_BENCH_ALL"))]


@functools.lru_cache(maxsize=4)
def _prepared(op: str, name: str):
    case = next(c for c in CASES if c.op == op and c.name == name)
    return case.setup(DEVICE)


# the standard providers, then those some cases add (a named backend, a model's own training step)
@pytest.mark.parametrize("provider", PROVIDERS + ("torch", MODEL_STEP))
@pytest.mark.parametrize("op,name", [(c.op, c.name) for c in CASES], ids=[f"{c.op}-{c.name}" for c in CASES])
def test_case(benchmark, op, name, provider):
    prep = _prepared(op, name)
    fn = prep.providers.get(provider)
    if fn is None:
        pytest.skip(f"case {op}/{name} has no {provider!r} provider")
    try:
        fn()  # compile / warm up outside the measurement
    except ValueError as exc:  # e.g. the explicit path refusing a layer too large to materialize
        pytest.skip(f"{provider} cannot run this case: {exc}")

    def call():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{op}-{name}"
    benchmark(call)
