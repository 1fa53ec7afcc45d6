"""Benchmark cases split into passes: the forward alone (``fwd``) and the backward alone (``bwd``,
a ``Staged`` call) besides the whole call (``both``), all built by ``_case.split_prepared``.

Small versions of the split cases (a short ``penalty_multi`` list, a small conv layer, a narrow
CIFAR ResNet-18) run through the runner with one timing round: each pass's rows are checked
against float64 (the value for ``fwd``, value and gradients for ``bwd``), a backward run twice
gives the same gradients (none accumulate on shared weights), and the explicit reference's
refusal is an error row in every pass. Timings themselves are never asserted.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from regkernels.bench import cases_conv as CC
from regkernels.bench import cases_gram as CG
from regkernels.bench import cases_svd as CS
from regkernels.bench import runner as R
from regkernels.bench._case import SPLIT, Case, Staged, split_prepared
from regkernels.bench.cases import all_cases
from regkernels.reference import conv as RC

CPU = torch.device("cpu")
CEIL = {"copy_bandwidth_GBps": 10.0, "inplace_add_bandwidth_GBps": 10.0, "matmul_fp32_GFLOPs": 100.0}
TOL = 1e-5  # float32 against float64 on these small sizes (observed ≤ 1.1e-6)

# the ops whose cases are timed forward only (``passes == ("fwd",)``), and why: every other op's
# cases time the whole call and its forward and backward apart
FORWARD_ONLY = {
    "conv_to_matrix": "builds the operator matrix (dense or CSR): the build is what is timed",
    "conv_singular_values": "the Sedghi singular values, timed as an analysis forward (penalty_case grad=False)",
    "clip_conv_singular_values": "a projection of the weight, timed forward only (penalty_case grad=False)",
    "batched_svd": "the decomposition, timed forward only",
    "svb_": "an in-place projection of a weight list: no autograd",
    "beta_lasso": "one optimizer step: no backward",
}


def _only(case: Case, *providers: str) -> Case:
    """``case`` with only ``providers`` in every pass (torch.compile takes seconds per case on CPU;
    the compile provider through the passes is tested on ``penalty_case`` in test_bench.py)."""
    def setup(device):
        prep = case.setup(device)
        for part in (prep, *prep.passes.values()):
            for p in set(part.providers) - set(providers):
                del part.providers[p]
        return prep
    return dataclasses.replace(case, setup=setup)


def _rows(case: Case, passes=SPLIT) -> dict[tuple[str, str], dict]:
    rows = R.run_case(case, CPU, CEIL, quick=True, log=lambda m: None, rounds=1, passes=list(passes))
    return {(r["pass"], r["provider"]): r for r in rows}


def _assert_accurate(rows: dict, providers, passes=SPLIT) -> None:
    for pass_name in passes:
        for p in providers:
            row = rows[(pass_name, p)]
            assert "error" not in row and row["max_rel_err"] < TOL, row
            assert row["reps"] == 1


def _grads(out) -> list[torch.Tensor]:
    """The gradients of a whole call's ``(value, grad or [grads])``."""
    grads = out[1]
    return list(grads) if isinstance(grads, (list, tuple)) else [grads]


def _tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, (list, tuple)):
        return [t for s in state for t in _tensors(s)]
    return []


def _assert_split(prep, provider: str) -> None:
    """The provider's fwd returns a state that keeps its graph; its bwd (a Staged call) run twice
    gives the same gradients, leaves the first call's untouched, and its error sees the gradients."""
    state = prep.passes["fwd"].providers[provider]()
    assert any(t.grad_fn is not None for t in _tensors(state)), "the forward's graph must stay alive"
    assert prep.passes["fwd"].error(state) < TOL
    del state
    bwd = prep.passes["bwd"].providers[provider]
    assert isinstance(bwd, Staged)
    first = bwd()
    kept = [g.clone() for g in _grads(first)]
    second = bwd()
    assert len(_grads(second)) == len(kept) > 0
    for g1, g2, g1_now in zip(kept, _grads(second), _grads(first)):
        torch.testing.assert_close(g2, g1, rtol=1e-6, atol=0)  # accumulated, it would be 2x
        assert torch.equal(g1_now, g1)
    err = prep.passes["bwd"].error
    assert err(second) < TOL
    # the bwd error compares the gradients too: 10 % off in them shows
    assert err((second[0], [1.1 * g for g in _grads(second)])) > 0.05


def test_every_differentiable_case_is_split():
    cases = all_cases()
    for c in cases:
        assert c.passes == (("fwd",) if c.op in FORWARD_ONLY else SPLIT), (c.op, c.name, c.passes)
    assert set(FORWARD_ONLY) <= {c.op for c in cases}  # no stale entry
    # the cases this split added
    split = {(c.op, c.name) for c in cases if c.passes == SPLIT}
    assert {("penalty_multi", "resnet18"), ("penalty_multi", "depthwise1024"), ("penalty_multi", "resnet50"),
            ("conv_frame_penalty", "16x16x3x3@8x8"), ("conv_frame_penalty", "512x512x3x3@4x4-circular"),
            ("conv_frame_penalty", "resnet18-cifar"), ("conv_orthogonality_penalty", "resnet18-cifar"),
            ("jacobian_penalty", "mlp-784x256x10-b128")} <= split
    assert all(c.passes == SPLIT for c in cases if c.op == "conv_frame_penalty")


def test_split_prepared_builds_the_three_passes_from_one_forward_and_one_backward():
    calls = []

    def forward():
        calls.append("fwd")
        x = torch.ones(3, requires_grad=True)
        return x, (2 * x).sum()

    def backward(state):
        calls.append("bwd")
        x, out = state
        out.backward()
        return out.detach(), x.grad

    def error_fwd(state):
        return 0.5

    def error_bwd(out):
        return 0.25

    prep = split_prepared({"eager": forward}, backward, error_fwd, error_bwd, note="the case", flops=7)
    value, grad = prep.providers["eager"]()
    assert calls == ["fwd", "bwd"] and float(value) == 6.0 and torch.equal(grad, torch.full((3,), 2.0))
    assert prep.error is error_bwd and prep.note == "the case" and prep.flops == 7
    fwd, bwd = prep.passes["fwd"], prep.passes["bwd"]
    assert set(prep.passes) == {"fwd", "bwd"} and fwd.error is error_fwd and bwd.error is error_bwd
    assert fwd.note == bwd.note == "" and fwd.flops is None  # the runner falls back to the whole call's note
    calls.clear()
    x, out = fwd.providers["eager"]()
    assert calls == ["fwd"] and out.grad_fn is not None
    staged = bwd.providers["eager"]
    assert isinstance(staged, Staged) and staged.before is forward and staged.timed is backward


def test_penalty_multi_split_on_a_small_weight_list():
    """Three weights (two convs and a Linear), and a depthwise conv."""
    case = CG._multi_case("small", [(8, 4, 3, 3), (16, 8, 3, 3), (10, 16)], quick=True)
    assert case.passes == SPLIT
    _assert_accurate(_rows(_only(case, "eager", "regkernels")), ("eager", "regkernels"))
    prep = case.setup(CPU)
    for p in ("eager", "regkernels"):
        _assert_split(prep, p)

    depthwise = CG._multi_case("depthwise16", [(16, 1, 3, 3)], quick=True, groups=16)
    _assert_accurate(_rows(_only(depthwise, "eager", "regkernels")), ("eager", "regkernels"))
    _assert_split(depthwise.setup(CPU), "regkernels")


@pytest.mark.parametrize("name", ["8x4x3x3@6x6", "8x4x3x3@6x6-circular"])
def test_conv_frame_layer_split(name, monkeypatch):
    """A small layer, zero and circular padding: every provider in every pass; the float64 truth
    is computed on first use (none at setup)."""
    float64_calls = []
    explicit = RC.conv_frame_penalty

    def counted(weight, *args, **kwargs):
        float64_calls.append(weight.dtype == torch.float64)
        return explicit(weight, *args, **kwargs)

    monkeypatch.setattr(RC, "conv_frame_penalty", counted)
    case = CC._frame_case(name)
    assert case.passes == SPLIT
    prep = case.setup(CPU)
    assert float64_calls == []  # lazy: setup computes no truth
    for p in ("eager", "regkernels", "torch"):
        _assert_split(prep, p)
    assert float64_calls.count(True) == 1  # the truth, once, for all passes
    _assert_accurate(_rows(_only(case, "eager", "regkernels", "torch")), ("eager", "regkernels", "torch"))


def test_conv_frame_layer_over_the_explicit_guard_records_the_refusal_in_every_pass(monkeypatch):
    """With the explicit path's size guard at 1 byte the eager provider refuses in every pass and
    the others are checked against the composite implicit path in float64."""
    monkeypatch.setattr(RC, "MAX_DENSE_BYTES", 1)
    rows = _rows(_only(CC._frame_case("8x4x3x3@6x6"), "eager", "regkernels", "torch"))
    for pass_name in ("both", "fwd", "bwd"):
        assert rows[(pass_name, "eager")]["error"].startswith("ValueError: conv_frame_penalty:"), pass_name
        assert "over its guard" in rows[(pass_name, "regkernels")]["note"]
    _assert_accurate(rows, ("regkernels", "torch"))


@pytest.mark.parametrize("kind,op", [("conv_frame", "conv_frame_penalty"), ("ocnn", "conv_orthogonality_penalty")])
def test_resnet_case_split_on_a_narrow_model(kind, op):
    """The whole-model cases (width 4, 8×8 images, batch 2), forward and backward apart (the whole
    call: test_bench.py): every regularizer provider matches float64 (the value for fwd, value
    and gradients for bwd) and has its multiple of the model step of the same pass; the model
    step has a time and nothing to compare."""
    case = CC._resnet_case(op, kind, name="narrow", width=4, image=8, batch=2)
    assert case.passes == SPLIT
    rows = _rows(case, ("fwd", "bwd"))
    regs = ["eager", "regkernels", "torch"]
    if kind == "ocnn" and "error" in rows[("fwd", "torch")]:  # OCNN without a 'torch' row
        assert all("no 'torch' backend" in rows[(q, "torch")]["error"] for q in ("fwd", "bwd"))
        regs.remove("torch")
    _assert_accurate(rows, regs, ("fwd", "bwd"))
    for pass_name in ("fwd", "bwd"):
        step = rows[(pass_name, "model-step")]
        assert step["median_ms"] > 0 and step["max_rel_err"] is None and "x_model_step" not in step
        assert rows[(pass_name, "compile")]["error"] == R.NO_PROVIDER
        for p in regs:
            assert rows[(pass_name, p)]["x_model_step"] > 0, (pass_name, p)
        assert "Regularizer(kind=" in rows[(pass_name, "regkernels")]["note"]

    prep = case.setup(CPU)
    for p in regs:
        _assert_split(prep, p)
    # the model step: its forward is the training forward + loss (graph alive), its backward
    # loss.backward() with nothing to compare; the regularizer's gradients stay right after it
    loss, none = prep.passes["fwd"].providers["model-step"]()
    assert none is None and loss.ndim == 0 and loss.grad_fn is not None
    assert prep.passes["fwd"].error((loss, None)) is None
    del loss
    assert prep.passes["bwd"].providers["model-step"]() is None and prep.passes["bwd"].error(None) is None
    assert prep.providers["model-step"]() is None and prep.error(None) is None
    assert prep.passes["bwd"].error(prep.passes["bwd"].providers["regkernels"]()) < TOL


def test_resnet_conv_frame_refusal_is_an_error_row_in_every_pass(monkeypatch):
    """The explicit reference's refusal (here forced on the narrow model by a 1-byte guard) makes
    the eager provider raise in every pass, at once; the runner records it and times the rest
    (here the model step, the regularizer providers being timed above)."""
    monkeypatch.setattr(RC, "MAX_DENSE_BYTES", 1)
    case = CC._resnet_case("conv_frame_penalty", "conv_frame", name="narrow", width=4, image=8, batch=2)
    prep = case.setup(CPU)
    for part in (prep, prep.passes["fwd"], prep.passes["bwd"]):
        with pytest.raises(ValueError, match=r"refuses layer 'conv1'"):
            part.providers["eager"]()
    rows = _rows(_only(case, "eager", "model-step"))
    for pass_name in SPLIT:
        assert rows[(pass_name, "eager")]["error"].startswith(
            "ValueError: conv_frame_penalty: the explicit reference (backend='reference') refuses layer"), pass_name
        assert "median_ms" in rows[(pass_name, "model-step")] and "x_model_step" not in rows[(pass_name, "eager")]


def test_jacobian_penalty_split():
    """fwd: the model's forward and the penalty (recorded for double backward); bwd: its gradient
    w.r.t. the parameters, which the model shares across calls (cleared in each forward)."""
    case = next(c for c in CS.CASES if c.op == "jacobian_penalty")
    assert case.passes == SPLIT
    _assert_accurate(_rows(_only(case, "eager", "regkernels")), ("eager", "regkernels"))
    prep = case.setup(CPU)
    for p in ("eager", "regkernels"):
        _assert_split(prep, p)
