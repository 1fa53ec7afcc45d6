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
