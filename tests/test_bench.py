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


def test_cuda_timer_runs_a_staged_calls_untimed_part_before_the_sync():
    """The backward alone on CUDA: its forward runs before the sync and the flush, outside the events."""
    gpu = _FakeGpu()
    timer = R.CallTimer(torch.device("cuda"), event=gpu.event, synchronize=gpu.sync, flush=gpu.flush)
    forward, backward = gpu.kernel("fwd", 5.0), gpu.kernel("bwd", 2.0)
    assert timer(C.Staged(before=forward, timed=lambda state: backward())) == pytest.approx(2.0)
    assert gpu.log == ["fwd", "sync", "flush", "sync", "record", "bwd", "record", "event_sync"]


def test_cuda_round_robin_times_each_provider_with_its_own_events():
    gpu = _FakeGpu()
    timer = R.CallTimer(torch.device("cuda"), event=gpu.event, synchronize=gpu.sync, flush=gpu.flush)
    fns = {"eager": gpu.kernel("eager", 3.0), "regkernels": gpu.kernel("regkernels", 1.0)}
    times = R.time_interleaved(fns, timer, min_reps=4, max_reps=4, budget_s=0.0)
    assert times == {"eager": [3.0] * 4, "regkernels": [1.0] * 4}
    calls = [e for e in gpu.log if e in fns]
    assert calls == ["eager", "regkernels"] * 4  # round-robin order kept
    assert R.warm_up(gpu.kernel("w", 0.1), timer, quick=True) >= 3  # CUDA: at least 3 warm-up calls


# ---------------------------------------------------------------- issue 16: model-scale conv cases
ISSUE16_NAMES = {("conv_frame_penalty", f"{layer}{mode}") for layer in
                 ("64x64x3x3@32x32", "128x128x3x3@16x16", "256x256x3x3@8x8", "512x512x3x3@4x4")
                 for mode in ("", "-circular")} | {("conv_frame_penalty", "resnet18-cifar"),
                                                   ("conv_orthogonality_penalty", "resnet18-cifar")}
CEIL = {"copy_bandwidth_GBps": 1, "inplace_add_bandwidth_GBps": 1, "matmul_fp32_GFLOPs": 1}


def test_issue16_cases_are_listed_and_selected_by_tag():
    cpu = torch.device("cpu")
    tagged = {(c.op, c.name) for c in R.select_cases(None, False, cpu, tags=["issue=16"])}
    assert tagged == ISSUE16_NAMES
    # names a previous results JSON holds keep meaning the same case
    names = {(c.op, c.name) for c in C.all_cases()}
    assert {("conv_frame_penalty", "16x16x3x3@8x8"), ("conv_frame_penalty", "64x64x3x3@32x32"),
            ("conv_frame_penalty", "256x256x3x3@8x8")} <= names
    circ = {c.name for c in R.select_cases(["conv_frame_penalty"], False, cpu, names=["*-circular"])}
    assert circ == {n for op, n in ISSUE16_NAMES if n.endswith("-circular")}
    with pytest.raises(SystemExit, match="--case nope matches no case"):
        R.select_cases(["conv_frame_penalty"], False, cpu, names=["nope"])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        R.select_cases(None, False, cpu, tags=["issue"])
    with pytest.raises(SystemExit, match="--rounds must be >= 1"):
        R.main(["--rounds", "0", "--list"])
    with pytest.raises(SystemExit, match="--threads must be >= 1"):
        R.main(["--threads", "0", "--list"])


def test_case_providers_beyond_the_standard_get_rows_speedups_and_model_step_multiples():
    """A case's own providers (torch, model-step) are timed with the others; regkernels gets a
    speedup over each of them but the model step, every provider its multiple of the model step."""
    import time as _time

    def sleeper(ms):
        return lambda: _time.sleep(ms / 1e3)

    prep = C.Prepared(providers={"eager": sleeper(8), "regkernels": sleeper(2), "torch": sleeper(6),
                                 "model-step": sleeper(4)})
    case = C.Case(op="tiny_op", name="extras", setup=lambda device: prep)
    rows = R.run_case(case, torch.device("cpu"), CEIL, quick=True, log=lambda m: None, rounds=3)
    by = {r["provider"]: r for r in rows}
    assert [r["provider"] for r in rows] == ["eager", "compile", "regkernels", "torch", "model-step"]
    assert by["compile"]["error"] == "no such provider for this case"
    assert all(by[p]["reps"] == 3 and by[p]["min_ms"] <= by[p]["median_ms"] <= by[p]["max_ms"]
               for p in ("eager", "regkernels", "torch", "model-step"))
    k, step = by["regkernels"], by["model-step"]
    assert k["speedup_vs_torch"] == pytest.approx(by["torch"]["median_ms"] / k["median_ms"], rel=1e-2)
    assert "speedup_vs_model-step" not in k and "x_model_step" not in step
    for p in ("eager", "regkernels", "torch"):
        assert by[p]["x_model_step"] == pytest.approx(by[p]["median_ms"] / step["median_ms"], rel=1e-2)
    assert 1.2 < by["torch"]["x_model_step"] < 1.8 and k["x_model_step"] < 0.75  # 6 ms and 2 ms against 4 ms


def test_cifar_resnet18_is_the_issue16_model():
    from regkernels.bench import cases_conv as CC
    from regkernels.nn import Regularizer

    model = CC.cifar_resnet18()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert len(convs) == 20 and isinstance(model.fc, torch.nn.Linear) and tuple(model.fc.weight.shape) == (10, 512)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the usual CIFAR ResNet-18
    sizes = CC.conv_input_sizes(model, 32, torch.device("cpu"))
    assert set(sizes) == set(convs)
    assert sizes["conv1"] == (32, 32) and sizes["layer1.0.conv1"] == (32, 32)
    assert sizes["layer2.0.conv1"] == (32, 32) and sizes["layer2.0.conv2"] == (16, 16)  # stride 2 at the first block
    assert sizes["layer4.1.conv2"] == (4, 4)
    down = [n for n, m in convs.items() if m.kernel_size == (1, 1)]
    assert down == ["layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]
    assert all(convs[n].stride == (2, 2) for n in down)
    assert all(m.padding == (1, 1) for n, m in convs.items() if n not in down)
    assert len(Regularizer(model, "ocnn").layers) == 21  # every conv and the Linear
    # seeded: the same weights on every build, and the global RNG left as it was
    state = torch.random.get_rng_state()
    again = CC.cifar_resnet18()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_resnet_conv_frame_eager_records_the_explicit_refusal_before_running():
    """The explicit reference refuses the model's 64-channel layers at 32 px (48 GiB): the eager
    provider raises that ValueError at once (checked for all layers before any runs), and the
    reference's own guard agrees for that layer."""
    import time as _time

    from regkernels.bench import cases_conv as CC
    from regkernels.reference import conv as RC

    prep = CC._resnet_setup("conv_frame")(torch.device("cpu"))
    t0 = _time.perf_counter()
    with pytest.raises(ValueError, match=r"refuses layer 'layer1.0.conv1'.*48.0 GiB"):
        prep.providers["eager"]()
    assert _time.perf_counter() - t0 < 1.0
    w = CC.cifar_resnet18().layer1[0].conv1.weight.detach()
    with pytest.raises(ValueError, match="over the dense size limit"):
        RC.conv_frame_penalty(w, (32, 32), 0.5, 2.0, padding=1)
    assert set(prep.providers) == {"eager", "regkernels", "torch", "model-step"}


def test_resnet_case_runs_once_on_a_narrow_model():
    """The whole-model conv_frame case end to end through the runner at width 4 on 8×8 images,
    batch 2 (the same code as resnet18-cifar): every provider's value and gradients match float64,
    model-step has a time and each regularizer provider its multiple of it."""
    from regkernels.bench import cases_conv as CC

    case = CC._resnet_case("conv_frame_penalty", "conv_frame", name="narrow", width=4, image=8, batch=2)
    rows = R.run_case(case, torch.device("cpu"), CEIL, quick=True, log=lambda m: None, rounds=1)
    by = {r["provider"]: r for r in rows}
    assert "median_ms" in by["model-step"] and by["model-step"]["max_rel_err"] is None
    assert by["compile"]["error"] == "no such provider for this case"
    for p in ("eager", "regkernels", "torch"):  # at width 4 the explicit reference fits
        assert by[p]["max_rel_err"] < 1e-5, by[p]
        assert by[p]["x_model_step"] > 0 and by[p]["peak_mem_bytes"] > 0
    assert "speedup_vs_torch" in by["regkernels"] and "Regularizer(kind=" in by["regkernels"]["note"]


def test_resnet_ocnn_case_providers_on_a_narrow_model():
    """The OCNN whole-model case's providers, called once each on the narrow model: values and
    gradients match the float64 reference; a provider without a backend records its ValueError."""
    from regkernels.bench import cases_conv as CC

    prep = CC._resnet_setup("ocnn", width=4, image=8, batch=2)(torch.device("cpu"))
    assert prep.providers["model-step"]() is None and prep.error(None) is None
    for p in ("eager", "regkernels", "torch"):
        try:
            out = prep.providers[p]()
        except ValueError as exc:  # OCNN has no 'torch' row today
            assert p == "torch" and "conv_orthogonality_penalty: no 'torch' backend" in str(exc)
            continue
        assert len(out[1]) == 21 and prep.error(out) < 1e-5, p


def test_circular_frame_case_matches_the_explicit_reference():
    """A ``-circular`` per-layer case runs circular padding on every provider (a small layer, where
    the explicit reference runs and is the truth)."""
    from regkernels.bench import cases_conv as CC
    from regkernels.reference import conv as RC

    prep = CC._frame_case("8x8x3x3@6x6-circular").setup(torch.device("cpu"))
    outs = {p: prep.providers[p]() for p in ("eager", "regkernels", "torch")}
    for p, out in outs.items():
        assert prep.error(out) < 1e-5, p
    w = CC._weight((8, 8, 3, 3), torch.device("cpu"), torch.float64)
    circular = RC.conv_frame_penalty(w, (6, 6), 0.5, 2.0, padding=1, padding_mode="circular")
    zeros = RC.conv_frame_penalty(w, (6, 6), 0.5, 2.0, padding=1)
    assert float(outs["regkernels"][0]) == pytest.approx(float(circular), rel=1e-5)
    assert abs(float(circular) - float(zeros)) > 1e-3 * abs(float(zeros))  # the padding mode made a difference


def test_cpu_peak_rss_sees_new_pages():
    def fresh_64mb():
        x = torch.ones(16 << 20)  # 64 MiB written: new pages
        return float(x[-1])

    grown = R.peak_rss_growth(fresh_64mb)
    if grown is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert grown >= 48 << 20


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_distributed_report_counts_collectives_and_bytes(tmp_path, capsys):
    """``python -m regkernels.bench.distributed`` on a narrow ResNet-18 in 2 processes: one
    collective per Regularizer call against one per weight for the naive gather, equal bytes
    ((world − 1)/world of the weights), svb_ within 2x the weights, c10d's count agreeing."""
    from regkernels.bench import distributed as BD

    path = tmp_path / "dist.json"
    assert BD.main(["--world", "2", "--width", "4", "--repeat", "1", "--json", str(path)]) == 0
    res = json.loads(path.read_text())["results"][0]
    calls, half = res["calls"], res["weight_bytes"] // 2
    assert res["world"] == 2 and res["layers"] == 21
    for kind in BD.KINDS:
        row = calls[f"Regularizer[{kind}]"]
        assert row["collectives"] == row["c10d"] == 1, kind  # width 4: no layer on the Gram route
        assert abs(row["bytes"] - half) <= 64, kind
    naive = calls["naive: [w.full_tensor() for w in weights]"]
    assert naive["collectives"] == naive["c10d"] == 21
    assert calls["svb_(model, 0.5)"]["collectives"] == 2
    assert calls["svb_(model, 0.5)"]["bytes"] <= 2 * res["weight_bytes"]
    assert "naive" in capsys.readouterr().out


# ---------------------------------------------------------------- issue 18: output, progress, Ctrl-C, JSON, markdown
def _sleepers(ms: dict[str, float]) -> C.Prepared:
    import time as _time

    return C.Prepared(providers={p: (lambda t=t: _time.sleep(t / 1e3)) for p, t in ms.items()})


def _fast_cases(monkeypatch, cases):
    """``main`` over ``cases`` only, with fixed ceilings (no 128 MiB bandwidth runs)."""
    monkeypatch.setattr(R, "all_cases", lambda: cases)
    monkeypatch.setattr(R, "measure_ceilings", lambda device, quick, timer=None: dict(CEIL))


def test_spread_reports_iqr_and_flags_noisy_rows():
    quiet = R.spread([10.0, 10.1, 10.2, 10.0, 10.1, 10.3])
    assert quiet["min_ms"] == 10.0 and quiet["max_ms"] == 10.3 and quiet["median_ms"] == pytest.approx(10.1)
    assert quiet["iqr_ms"] == pytest.approx(0.15, abs=1e-3) and quiet["noisy"] is False
    busy = R.spread([10.0, 30.0, 12.0, 45.0, 11.0, 40.0])
    assert busy["iqr_rel"] > R.NOISY_IQR_REL and busy["noisy"] is True
    assert R.spread([10.0, 40.0, 10.0])["noisy"] is False  # too few times to call it


def test_noisy_row_is_flagged_and_logged(monkeypatch):
    class Timer:  # a CallTimer whose calls take 1, 5, 1, 9, 1.2, 7 ms
        cuda = False
        times = iter([1.0, 5.0, 1.0, 9.0, 1.2, 7.0] * 10)

        def __call__(self, fn):
            fn()
            return next(self.times)

    timer = Timer()
    case = C.Case(op="tiny_op", name="busy", setup=lambda device: C.Prepared(providers={"eager": lambda: None}))
    lines: list[str] = []
    rows = R.run_case(case, torch.device("cpu"), CEIL, quick=True, log=lines.append, timer=timer, rounds=6)
    assert rows[0]["noisy"] is True and rows[0]["reps"] == 6
    assert any(line.startswith("  noisy: tiny_op busy") and "rerun" in line for line in lines)


def test_peak_memory_prints_nothing(capfd):
    """The profiler's C++ lines (profiler_start / profiler_stop, gpuGetDeviceCount) stay off stderr."""
    assert R.peak_memory(lambda: torch.ones(250_000) * 2, torch.device("cpu")) >= 1_000_000
    assert capfd.readouterr().err == ""


def test_quiet_third_party_keeps_regkernels_warnings_and_restores_logging():
    import logging
    import warnings

    torch_log = logging.getLogger("torch")
    level = torch_log.level
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with R.quiet_third_party():
            assert logging.getLogger("torch").getEffectiveLevel() >= logging.ERROR
            warnings.warn_explicit("inductor says", FutureWarning, "x.py", 1, module="torch._inductor.x")
            warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="regkernels.ops.gram")
    assert [str(w.message) for w in seen] == ["ours"]
    assert torch_log.level == level


class _Tty:
    """A terminal stand-in for Progress: records what is written."""

    def __init__(self, tty=True):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_line_only_on_a_terminal_with_elapsed_and_eta():
    now = [0.0]
    case = C.Case(op="frame_penalty", name="64x576", setup=None)
    out = _Tty()
    p = R.Progress(4, stream=out, clock=lambda: now[0])
    p.start_case(1, case)
    p.status("both eager")
    assert out.text.endswith("[1/4] frame_penalty 64x576 both eager  this case 0m00s, elapsed 0m00s, ETA ?")
    now[0] = 30.0
    p.end_case()
    p.start_case(2, case)
    assert "\r[2/4]" in out.text and out.text.rstrip().endswith("elapsed 0m30s, ETA 1m30s")  # 30 s a case, 3 left
    p.print("a line of the runner", file=out)
    before, _, after = out.text.rpartition("a line of the runner\n")
    assert before.endswith(" \r") and after.startswith("\r[2/4]")  # cleared, printed, drawn again
    silent = _Tty(tty=False)
    q = R.Progress(4, stream=silent)
    with q:
        q.start_case(1, case)
        q.status("fwd regkernels")
    assert silent.text == ""


def test_progress_ticks_while_a_case_runs():
    import time as _time

    out = _Tty()
    with R.Progress(1, stream=out, tick_s=0.01) as p:
        p.start_case(1, C.Case(op="op", name="slow", setup=None))
        _time.sleep(0.2)
    assert out.text.count("\r[1/1] op slow") >= 5
    assert out.text.endswith("\r")  # the line is cleared at the end


def test_ctrl_c_writes_the_rows_so_far_marked_partial_and_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(device):
        raise KeyboardInterrupt

    cases = [C.Case(op="tiny_op", name="done", setup=lambda d: _sleepers({"eager": 1, "regkernels": 1})),
             C.Case(op="tiny_op", name="cut", setup=interrupted),
             C.Case(op="tiny_op", name="never", setup=lambda d: _sleepers({"eager": 1}))]
    _fast_cases(monkeypatch, cases)
    path = tmp_path / "partial.json"
    assert R.main(["--device", "cpu", "--rounds", "2", "--json", str(path)]) == 130
    doc = json.loads(path.read_text())
    assert doc["partial"] is True and doc["interrupted_at"] == "tiny_op cut"
    assert doc["cases_done"] == 1 and doc["cases_selected"] == 3
    assert {r["case"] for r in doc["results"]} == {"done"}
    err = capsys.readouterr().err
    assert "interrupted (Ctrl-C) during tiny_op cut" in err and '"partial": true' in err


def test_json_records_commit_machine_params_dtype_and_spread(tmp_path, monkeypatch, capsys):
    cases = [C.Case(op="tiny_op", name="4x8x8", setup=lambda d: _sleepers({"eager": 2, "regkernels": 1}),
                    params={"batch": 4, "m": 8, "n": 8}, passes=("fwd",))]
    _fast_cases(monkeypatch, cases)
    path = tmp_path / "out.json"
    assert R.main(["--device", "cpu", "--rounds", "5", "--json", str(path), "--markdown"]) == 0
    assert "| `tiny_op` | 4x8x8 |" in capsys.readouterr().out  # --markdown alone: the table of this run
    doc = json.loads(path.read_text())
    assert doc["partial"] is False
    commit = doc["git"]["commit"]
    assert commit is None or (len(commit) == 40 and isinstance(doc["git"]["dirty"], bool))
    m = doc["machine"]
    assert m["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "torch_threads" in m and m["torch_config"] == torch.__config__.show()
    assert set(m["cpu_flags"]) == {"avx2", "avx512f", "fma"}
    assert m["cpu_flags"]["avx2"] in (torch.cpu._is_avx2_supported(), None)
    assert [r["provider"] for r in doc["results"]] == ["eager", "compile", "regkernels"]
    for r in doc["results"]:
        assert r["dtype"] == "float32" and r["params"] == {"batch": 4, "m": 8, "n": 8} and r["pass"] == "fwd"
        if r["provider"] == "compile":  # the case has none
            continue
        assert {"iqr_ms", "iqr_rel", "min_ms", "median_ms", "max_ms"} <= set(r) and isinstance(r["noisy"], bool)


def test_case_definitions_carry_params_and_passes():
    for c in C.all_cases():
        assert c.params, (c.op, c.name)
        assert c.passes[0] in ("fwd", "both") and set(c.passes) <= {"fwd", "bwd", "both"}
    svd = next(c for c in C.all_cases() if c.op == "batched_svd" and c.name == "4096x8x8")
    assert svd.params == {"batch": 4096, "m": 8, "n": 8} and svd.passes == ("fwd",)


def test_dtype_and_pass_select_cases(capsys):
    cpu = torch.device("cpu")
    assert len(R.select_cases(None, True, cpu, dtypes=["float32"])) == len(R.select_cases(None, True, cpu))
    with pytest.raises(SystemExit, match="no selected case runs in --dtype float64; their dtypes: float32"):
        R.select_cases(None, True, cpu, dtypes=["float64"])
    bwd = R.select_cases(None, True, cpu, passes=["bwd"])
    assert bwd and all("bwd" in c.passes for c in bwd)
    assert {c.op for c in bwd} >= {"frame_penalty", "clamp_singular_values"} and "batched_svd" not in {c.op for c in bwd}
    svd = R.select_cases(["batched_svd"], True, cpu)[0]
    assert R.case_passes(svd, ["both", "fwd"]) == ["fwd"]  # forward only: its whole call is the forward
    assert R.case_passes(svd, ["bwd"]) == [] and R.case_passes(bwd[0], ["both", "fwd"]) == ["both", "fwd"]
    with pytest.raises(SystemExit):
        R.main(["--dtype", "int8", "--list"])
    assert "argument --dtype: invalid choice: 'int8'" in capsys.readouterr().err


def test_threads_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        assert R.main(["--threads", "1", "--op", "batched_svd", "--list"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_forward_and_backward_timed_separately_on_cpu():
    ref, make = _tiny()
    case = C.penalty_case("tiny_op", "4x8x16", ref, ref, make, params={"batch": 4, "m": 8, "n": 16})
    assert case.passes == ("both", "fwd", "bwd")
    rows = R.run_case(case, torch.device("cpu"), CEIL, quick=True, log=lambda m: None, rounds=3,
                      passes=["fwd", "bwd", "both"])
    assert [(r["pass"], r["provider"]) for r in rows] == [(p, q) for p in ("fwd", "bwd", "both")
                                                          for q in ("eager", "compile", "regkernels")]
    for r in rows:
        assert "error" not in r, r
        assert r["max_rel_err"] < 1e-5 and r["params"] == {"batch": 4, "m": 8, "n": 16}
    assert all("speedup_vs_eager" in r for r in rows if r["provider"] == "regkernels")


def test_staged_call_times_only_its_timed_part():
    import time as _time

    timer = R.CallTimer.for_device(torch.device("cpu"))
    staged = C.Staged(before=lambda: _time.sleep(0.05) or 7, timed=lambda state: state + 1)
    assert staged() == 8
    assert timer(staged) < 20.0
    assert R.peak_memory(C.Staged(before=lambda: torch.ones(250_000), timed=lambda x: x.add_(1)),
                         torch.device("cpu")) < 100_000  # the forward's 1 MB is not the backward's


def _doc():
    rows = [{"op": "frame_penalty", "case": "64x576", "pass": "both", "provider": "eager", "median_ms": 2.0,
             "noisy": True},
            {"op": "frame_penalty", "case": "64x576", "pass": "both", "provider": "compile", "median_ms": 1.5},
            {"op": "frame_penalty", "case": "64x576", "pass": "both", "provider": "regkernels", "median_ms": 1.0,
             "speedup_vs_eager": 2.0, "speedup_vs_compile": 1.5},
            {"op": "conv_frame_penalty", "case": "64x64x3x3@32x32", "pass": "both", "provider": "eager",
             "error": "ValueError: over the guard"},
            {"op": "conv_frame_penalty", "case": "64x64x3x3@32x32", "pass": "both", "provider": "compile",
             "error": R.NO_PROVIDER},
            {"op": "conv_frame_penalty", "case": "64x64x3x3@32x32", "pass": "both", "provider": "regkernels",
             "median_ms": 24.8, "speedup_vs_torch": 4.6},
            {"op": "conv_frame_penalty", "case": "64x64x3x3@32x32", "pass": "both", "provider": "torch",
             "median_ms": 114.0}]
    return {"machine": {"cpu": "Test CPU", "device": "cpu", "torch_threads": 2}, "versions": {"torch": "2.x"},
            "git": {"commit": "a" * 40, "dirty": True}, "timestamp": "2026-01-01T00:00:00+00:00", "partial": False,
            "results": rows}


def test_markdown_renders_a_results_json_without_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(R, "run_case", lambda *a, **k: pytest.fail("--markdown JSON must not run cases"))
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_doc()))
    assert R.main(["--markdown", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "| op | case | eager ms | compile ms | regkernels ms | torch ms | vs eager | vs compile |"
    assert lines[2] == "| `frame_penalty` | 64x576 | 2.00 † | 1.50 | 1.00 |  | 2.00× | 1.50× |"
    assert lines[3] == "| `conv_frame_penalty` | 64x64x3x3@32x32 | ValueError |  | 24.8 | 114 | — | — |"
    assert "† noisy" in out and "aaaaaaaaaaaa (uncommitted changes)" in out
    with pytest.raises(SystemExit, match="--markdown cannot read"):
        R.main(["--markdown", str(tmp_path / "missing.json")])


def test_plot_needs_matplotlib_and_says_so(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="--plot needs matplotlib.*pip install matplotlib"):
        R.main(["--plot", str(tmp_path / "x.png"), "--op", "batched_svd", "--list"])


def test_plot_draws_the_speedups(monkeypatch, tmp_path):
    import sys
    from unittest import mock

    labels, series = R.speedup_series(_doc())
    assert labels == ["frame_penalty 64x576"] and series == {"eager": [2.0], "compile": [1.5]}
    plt, mpl = mock.MagicMock(), mock.MagicMock()
    mpl.pyplot = plt
    fig, ax = mock.MagicMock(), mock.MagicMock()
    plt.subplots.return_value = (fig, ax)
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", plt)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_doc()))
    assert R.main(["--markdown", str(path), "--plot", str(tmp_path / "s.png")]) == 0
    mpl.use.assert_called_with("Agg")
    fig.savefig.assert_called_once_with(str(tmp_path / "s.png"), dpi=120)
    assert ax.barh.call_count == 2 and ax.set_xscale.call_args.args == ("log",)


def test_markdown_of_several_files_selects_rows_and_links_each_run(tmp_path, capsys):
    old = {"machine": {"cpu": "Old CPU", "device": "cpu", "torch_threads": 2}, "versions": {"torch": "2.x"},
           "timestamp": "2025-01-01T00:00:00+00:00",
           # a file of the runner before issue 18: no pass, dtype, git or spread
           "results": [{"op": "beta_lasso", "case": "model-10M", "provider": "eager", "median_ms": 35.0},
                       {"op": "beta_lasso", "case": "model-10M", "provider": "regkernels", "median_ms": 5.0,
                        "speedup_vs_eager": 7.0, "GBps": 25.7, "pct_inplace_add_bandwidth": 90.2}]}
    a, b = tmp_path / "new.json", tmp_path / "old.json"
    a.write_text(json.dumps(_doc()))
    b.write_text(json.dumps(old))
    assert R.main(["--markdown", str(a), str(b), "--op", "frame_penalty", "--op", "beta_lasso"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| op | case | eager ms | compile ms | regkernels ms | vs eager | vs compile | regkernels rate "
                        "| run |")
    assert lines[2] == f"| `frame_penalty` | 64x576 | 2.00 † | 1.50 | 1.00 | 2.00× | 1.50× |  | [new]({a}) |"
    assert lines[3] == f"| `beta_lasso` | model-10M | 35.0 |  | 5.00 | 7.00× | — | 25.7 GB/s, 90 % of add_ | [old]({b}) |"
    assert len([ln for ln in lines if ln.startswith("| `")]) == 2  # conv_frame_penalty left out
    assert any(ln.startswith(f"[old]({b}): Old CPU") and "commit not recorded" in ln for ln in lines)
    assert R.main(["--markdown", str(a), "--case", "64x*", "--pass", "both"]) == 0
    assert "conv_frame_penalty" in capsys.readouterr().out
    # "both" is a case's whole call: a forward-only case's "fwd" rows, not a split case's
    doc = _doc()
    doc["results"] += [{"op": "batched_svd", "case": "8x8", "pass": "fwd", "provider": "regkernels", "median_ms": 3.0},
                       {"op": "frame_penalty", "case": "64x576", "pass": "fwd", "provider": "regkernels",
                        "median_ms": 0.5}]
    a.write_text(json.dumps(doc))
    assert R.main(["--markdown", str(a), "--pass", "both", "--op", "batched_svd", "--op", "frame_penalty"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| `")]
    assert [r.split(" | ")[:2] for r in rows] == [["| `frame_penalty`", "64x576"], ["| `batched_svd`", "8x8"]]
    assert "| 1.00 |" in rows[0]  # the whole call's row, not the forward's 0.5 ms
    with pytest.raises(SystemExit, match="no row of .* matches"):
        R.main(["--markdown", str(b), "--op", "svb_"])
    with pytest.raises(SystemExit, match="--tag does not apply to --markdown FILE"):
        R.main(["--markdown", str(b), "--tag", "issue=16"])


def test_readme_benchmark_tables_are_the_markdown_of_the_committed_runs():
    """README.md's benchmark tables are `--markdown` output of the JSON in benchmarks/results, not
    typed by hand: regenerating every marked table changes nothing."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    regenerated, count = R.update_readme(text, str(root))
    assert count >= 6
    assert regenerated == text, ("README.md's benchmark tables differ from their results files: run "
                                 "`python -m regkernels.bench --update-readme README.md`")


def test_update_readme_fills_each_marked_table_and_refuses_other_commands(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(_doc()))
    text = ("intro\n<!-- bench-table: --markdown r.json --op frame_penalty -->\n<!-- bench-table:end -->\nmiddle\n"
            "<!-- bench-table: --markdown r.json --case 64x64* -->\nstale\n<!-- bench-table:end -->\nend\n")
    out, n = R.update_readme(text, str(tmp_path))
    assert n == 2 and out.startswith("intro\n") and "\nmiddle\n" in out and out.endswith("<!-- bench-table:end -->\nend\n")
    first, second = out.split("middle")
    assert "`frame_penalty`" in first and "conv_frame_penalty" not in first
    assert "`conv_frame_penalty`" in second and "stale" not in second
    assert R.update_readme(out, str(tmp_path)) == (out, 2)  # idempotent
    with pytest.raises(SystemExit, match="must start with --markdown FILE.json"):
        R.update_readme("<!-- bench-table: --quick -->\n<!-- bench-table:end -->", str(tmp_path))


def test_other_cpu_cores_from_proc_stat_samples():
    # (wall s, machine busy CPU-s, this process's CPU-s)
    assert R.other_cpu_cores((0.0, 100.0, 10.0), (2.0, 104.0, 12.0)) == 1.0  # 4 busy, 2 ours, over 2 s
    assert R.other_cpu_cores((0.0, 100.0, 10.0), (2.0, 102.0, 12.1)) == 0.0  # tick rounding: never < 0
    assert R.other_cpu_cores((0.0, 100.0, 10.0), (0.1, 101.0, 10.0)) is None  # window under LOAD_MIN_WINDOW_S
    assert R.other_cpu_cores(None, (2.0, 104.0, 12.0)) is None
    assert R.load_is_noisy(0.5, cpu_count=2, threads=2) and not R.load_is_noisy(0.2, cpu_count=2, threads=2)
    assert not R.load_is_noisy(1.0, cpu_count=16, threads=2)  # 14 idle cores: another core's work competes not
    assert not R.load_is_noisy(None)
    sample = R.cpu_sample()
    if sample is not None:  # Linux
        assert sample[1] > 0 and sample[2] > 0


@pytest.mark.skipif(R.cpu_sample() is None, reason="needs /proc/stat (Linux)")
def test_steady_load_marks_rows_noisy_though_their_spread_is_small(monkeypatch):
    """A busy loop in another process while a case is timed: the rows say noisy for 'load' with
    the cores it took. The timer is a fake with steady times (so the spread alone would pass),
    and calls work for 0.3 s in all, the window /proc/stat needs."""
    import subprocess
    import sys
    import time

    class Timer:
        cuda = False

        def __call__(self, fn):
            end = time.perf_counter() + 0.02
            while time.perf_counter() < end:
                pass
            return 1.0

    monkeypatch.setattr(torch, "get_num_threads", lambda: __import__("os").cpu_count())  # no idle cores
    case = C.Case(op="tiny_op", name="loaded", setup=lambda device: C.Prepared(providers={"eager": lambda: None}))
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        lines: list[str] = []
        rows = R.run_case(case, torch.device("cpu"), CEIL, quick=True, log=lines.append, timer=Timer(), rounds=20)
    finally:
        spin.kill()
        spin.wait()
    row = rows[0]
    assert row["iqr_rel"] == 0 and row["other_cpu_cores"] > 0.5
    assert row["noisy"] is True and row["noisy_reasons"] == ["load"]
    assert any("other processes used" in line and "rerun" in line for line in lines)
