"""Every runner case × pass × provider as a pytest-benchmark test (see conftest.py for usage)."""
from __future__ import annotations

import functools
import os

import pytest
import torch

from regkernels.bench.cases import Staged, all_cases
from regkernels.bench.runner import MODEL_STEP, PROVIDERS, case_passes

DEVICE = torch.device(os.environ.get("REGKERNELS_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
CASES = [c for c in all_cases() if DEVICE.type in c.devices and (c.quick or os.environ.get("REGKERNELS_BENCH_ALL"))]


@functools.lru_cache(maxsize=4)
def _prepared(op: str, name: str):
    case = next(c for c in CASES if c.op == op and c.name == name)
    return case, case.setup(DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# the standard providers, then those some cases add (a named backend, a model's own training step);
# the passes as the runner's --pass names them: both = the whole call, fwd / bwd where a case splits
@pytest.mark.parametrize("provider", PROVIDERS + ("torch", MODEL_STEP))
@pytest.mark.parametrize("pass_name", ("both", "fwd", "bwd"))
@pytest.mark.parametrize("op,name", [(c.op, c.name) for c in CASES], ids=[f"{c.op}-{c.name}" for c in CASES])
def test_case(benchmark, op, name, pass_name, provider):
    case, prep = _prepared(op, name)
    label = case_passes(case, [pass_name])
    if not label or (pass_name == "fwd" and case.passes[0] == "fwd"):  # the whole call is its forward: under "both"
        pytest.skip(f"case {op}/{name} has no separate {pass_name!r} pass (its passes: {', '.join(case.passes)})")
    part = prep if label[0] == case.passes[0] else prep.passes[label[0]]
    fn = part.providers.get(provider)
    if fn is None:
        pytest.skip(f"case {op}/{name} has no {provider!r} provider")
    try:
        fn()  # compile / warm up outside the measurement
    except ValueError as exc:  # e.g. the explicit path refusing a layer too large to materialize
        pytest.skip(f"{provider} cannot run this case: {exc}")

    benchmark.group = f"{op}-{name}-{label[0]}"
    if isinstance(fn, Staged):  # the backward alone: its forward runs in pytest-benchmark's untimed setup
        def timed(state):
            fn.timed(state)
            _sync()

        benchmark.pedantic(timed, setup=lambda: ((fn.before(),), {}), rounds=20 if DEVICE.type == "cuda" else 5)
        return

    def call():
        fn()
        _sync()

    benchmark(call)
