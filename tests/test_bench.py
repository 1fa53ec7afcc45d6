"""The benchmark runner: case selection, timing rows, ratios, JSON schema (tiny cases only;
performance itself is measured by the runner, never asserted here)."""
from __future__ import annotations

import json

import pytest
import torch

from regkernels.bench import cases as C
from regkernels.bench import runner as R


def _tiny():
    """A small Gram-energy op and its seeded inputs."""
    def ref(x):
        return (x @ x.mT).square().sum((-2, -1))

    def make(device, dtype):
        g = torch.Generator().manual_seed(3)
        return (torch.randn(4, 8, 16, generator=g).to(device=device, dtype=dtype),)

    return ref, make


def test_run_case_rows_and_ratios():
    ref, make = _tiny()
    case = C.penalty_case("tiny_op", "4x8x16", ref, ref, make, flops=4 * 2 * 8 * 8 * 16)
    ceilings = {"copy_bandwidth_GBps": 1.0, "matmul_fp32_GFLOPs": 1.0}
    rows = R.run_case(case, torch.device("cpu"), ceilings, quick=True, log=lambda m: None)
    assert [r["provider"] for r in rows] == ["eager", "compile", "regkernels"]
    for r in rows:
        assert "error" not in r, r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["max_rel_err"] < 1e-5  # float32 vs the float64 evaluation
        assert "pct_matmul_fp32" in r
    k = rows[-1]
    assert k["speedup_vs_eager"] == pytest.approx(rows[0]["median_ms"] / k["median_ms"], rel=1e-2)


def test_failing_provider_is_recorded_not_fatal():

    def broken(x):
        raise ValueError("too big for the explicit path")

    ref, make = _tiny()
    case = C.penalty_case("tiny_op", "broken", ref, broken, make)
    rows = R.run_case(case, torch.device("cpu"), {"copy_bandwidth_GBps": 1, "matmul_fp32_GFLOPs": 1},
                      quick=True, log=lambda m: None)
    assert "median_ms" in rows[0]
    assert rows[2]["error"].startswith("ValueError: too big")


def test_every_public_op_has_cases():
    import regkernels

    ops = {c.op for c in C.all_cases()}
    expected = {"frame_penalty", "diversity_penalty", "orthogonality_penalty", "mhe_penalty", "srip_penalty",
                "penalty_multi", "batched_svd", "clamp_singular_values", "svb_", "conv_to_matrix",
                "conv_frame_penalty", "conv_orthogonality_penalty", "conv_singular_values",
                "clip_conv_singular_values", "jacobian_penalty", "beta_lasso"}
    assert expected <= ops, expected - ops
    quick = {c.op for c in C.all_cases() if c.quick}
    assert expected <= quick, expected - quick
    assert all(hasattr(regkernels, op) or op == "beta_lasso" for op in expected)


def test_unknown_op_is_rejected():
    with pytest.raises(SystemExit, match="unknown --op nope"):
        R.main(["--op", "nope", "--list"])


def test_main_writes_json_schema(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert R.main(["--op", "orthogonality_penalty", "--quick", "--device", "cpu", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert set(doc) >= {"machine", "versions", "ceilings", "results"}
    assert all(doc["ceilings"][k] > 0 for k in ("copy_bandwidth_GBps", "inplace_add_bandwidth_GBps", "matmul_fp32_GFLOPs"))
    assert doc["versions"]["torch"] == torch.__version__
    keys = {"op", "case", "provider", "median_ms", "p20_ms", "p80_ms", "max_rel_err", "peak_mem_bytes"}
    assert doc["results"] and all(keys <= set(r) for r in doc["results"])
    assert {r["provider"] for r in doc["results"]} == {"eager", "compile", "regkernels"}
    assert "orthogonality_penalty" in capsys.readouterr().out


def test_reset_runs_before_each_providers_first_call():
    """Providers that share mutable buffers start from the same state (β-LASSO cases)."""
    state = {"x": 0, "resets": 0}

    def reset():
        state["x"] = 0
        state["resets"] += 1

    def step():
        state["x"] += 1
        return torch.tensor([float(state["x"])])

    seen = []
    prep = C.Prepared(providers={p: step for p in R.PROVIDERS},
                      error=lambda out: seen.append(float(out[0])) or 0.0, reset=reset)
    case = C.Case(op="tiny_op", name="stateful", setup=lambda device: prep)
    R.run_case(case, torch.device("cpu"), {"copy_bandwidth_GBps": 1, "matmul_fp32_GFLOPs": 1}, quick=True,
               log=lambda m: None)
    assert state["resets"] == 3 and seen == [1.0, 1.0, 1.0]


def test_cpu_peak_memory_counts_tensor_allocations():
    """CPU peak memory is the peak of live tensor bytes during the call (profiler memory events)."""
    from regkernels.bench.runner import peak_memory

    x = torch.zeros(1000)
    cpu = torch.device("cpu")

    def two_temporaries():
        a = torch.ones(250_000)  # 1 MB
        b = a * 2  # another 1 MB while a is alive
        return float(b[0])

    assert peak_memory(two_temporaries, cpu) >= 2_000_000
    assert peak_memory(lambda: x.add_(1), cpu) < 1000  # in place: at most a wrapped scalar
