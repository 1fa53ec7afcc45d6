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


def test_cpu_timer_is_perf_counter_and_json_says_so(tmp_path):
    timer = R.CallTimer.for_device(torch.device("cpu"))
    assert timer.describe()["method"] == "perf_counter"
    import time as _time

    assert timer(lambda: _time.sleep(0.02)) >= 19.0
    path = tmp_path / "out.json"
    assert R.main(["--op", "orthogonality_penalty", "--quick", "--device", "cpu", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["timing"]["method"] == "perf_counter"
    assert all(r["warmup_calls"] >= 1 for r in doc["results"] if "median_ms" in r)


class _FakeGpu:
    """A GPU timeline for the CUDA path of CallTimer: kernels advance a device clock; events read
    it when recorded; every host-side action is logged so the test sees the order."""

    def __init__(self):
        self.clock = 0.0
        self.log: list[str] = []

    def event(self):
        gpu = self

        class Event:
            t = None

            def record(self):
                gpu.log.append("record")
                self.t = gpu.clock

            def synchronize(self):
                gpu.log.append("event_sync")

            def elapsed_time(self, other):
                assert self.t is not None and other.t is not None, "elapsed_time of an unrecorded event"
                return other.t - self.t

        return Event()

    def sync(self):
        self.log.append("sync")

    def flush(self):
        self.log.append("flush")
        self.clock += 100.0  # the flush's own time must not be counted

    def kernel(self, name, ms):
        def fn():
            self.log.append(name)
            self.clock += ms
        return fn


def test_cuda_timer_uses_events_around_the_call_after_sync_and_flush():
    gpu = _FakeGpu()
    timer = R.CallTimer(torch.device("cuda"), event=gpu.event, synchronize=gpu.sync, flush=gpu.flush,
                        flush_bytes=1 << 20)
    assert timer(gpu.kernel("k", 0.25)) == pytest.approx(0.25)
    assert gpu.log == ["sync", "flush", "sync", "record", "k", "record", "event_sync"]
    d = timer.describe()
    assert d["method"] == "cuda_events" and d["l2_flush_bytes"] == 1 << 20


def test_cuda_round_robin_times_each_provider_with_its_own_events():
    gpu = _FakeGpu()
    timer = R.CallTimer(torch.device("cuda"), event=gpu.event, synchronize=gpu.sync, flush=gpu.flush)
    fns = {"eager": gpu.kernel("eager", 3.0), "regkernels": gpu.kernel("regkernels", 1.0)}
    times = R.time_interleaved(fns, timer, min_reps=4, max_reps=4, budget_s=0.0)
    assert times == {"eager": [3.0] * 4, "regkernels": [1.0] * 4}
    calls = [e for e in gpu.log if e in fns]
    assert calls == ["eager", "regkernels"] * 4  # round-robin order kept
    assert R.warm_up(gpu.kernel("w", 0.1), timer, quick=True) >= 3  # CUDA: at least 3 warm-up calls
