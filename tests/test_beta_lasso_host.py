"""β-LASSO host work (docs/beta_lasso.md#launch-plan): what a step does on the host once its plan
exists. The launch plan (chunk table) is cached in C++ and the optimizer's argument lists in
Python; both must be reused while nothing they depend on changed, and rebuilt when something
did, without ever updating a stale tensor. Everything here runs on CPU, where the C++ op builds
and caches the same plan as the CUDA kernel."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from regkernels import _ext
from regkernels.optim import BetaLasso

pytestmark = pytest.mark.skipif(not _ext.HAS_C, reason="compiled extension not built")

# the ops a planned step may dispatch: torch.optim's step profiling hook and ONE fused launch
ALLOWED = {"profiler._record_function_enter_new.default", "profiler._record_function_exit._RecordFunction",
           "regkernels.beta_lasso_step_.default"}
FORBIDDEN = ("lift_fresh", "_local_scalar_dense", "_to_copy", "copy_", "item")


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def stats() -> dict[str, int]:
    builds, hits, launches, tasks, vec = torch.ops.regkernels._beta_lasso_plan_stats()
    return dict(builds=builds, hits=hits, launches=launches, tasks=tasks, vec=vec)


def model(n=60, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 4), (4,)] * (n // 2)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * 0.1).to(dtype) for s in shapes]


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)


def pair(cfg, params=None, groups=None):
    """A fused optimizer and a reference one on equal copies of the same parameters."""
    a = params if params is not None else model()
    b = [p.clone() for p in a]
    if groups is None:
        return a, b, BetaLasso(a, **cfg), BetaLasso(b, **cfg, backend="reference")
    ga = [dict(gr, params=[a[i] for i in gr["params"]]) for gr in groups]
    gb = [dict(gr, params=[b[i] for i in gr["params"]]) for gr in groups]
    return a, b, BetaLasso(ga, **cfg), BetaLasso(gb, **cfg, backend="reference")


def step_both(a, b, fa, fb, seed):
    set_grads(a, seed)
    for p, q in zip(a, b):
        q.grad = None if p.grad is None else p.grad.clone()
    fa.step()
    fb.step()


def assert_same(a, b):
    for i, (p, q) in enumerate(zip(a, b)):
        assert torch.equal(p, q), f"param {i}"


# ------------------------------------------------------------------ op count of a planned step
@pytest.mark.parametrize("cfg", [dict(lr=1e-2, lam=1e-3, beta=1.0),
                                 dict(lr=1e-2, lam=1e-3, beta=1.0, momentum=0.9, weight_decay=1e-4)])
def test_planned_step_dispatches_one_op(cfg):
    params = model()
    opt = BetaLasso(params, **cfg)
    set_grads(params, 0)
    opt.step()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for k in range(3):
        set_grads(params, k + 1)  # new gradient tensors, as after zero_grad(set_to_none=True)
        with OpLog() as log:
            opt.step()
        sched.step()  # lr changes every step
        assert set(log.ops) <= ALLOWED and log.ops.count("regkernels.beta_lasso_step_.default") == 1, log.ops
        assert not [op for op in log.ops if any(f in op for f in FORBIDDEN)]


# ------------------------------------------------------------------ the C++ plan cache
def test_plan_is_reused_across_steps_and_lr_changes():
    a, b, fa, fb = pair(dict(lr=1e-2, lam=1e-3, beta=1.0, momentum=0.9))
    step_both(a, b, fa, fb, 0)
    grads = [p.grad for p in a]  # kept at fixed addresses from here on (the plan keys on every pointer)
    s0 = stats()
    for k in range(1, 6):
        for p, g, q in zip(a, grads, b):
            g.copy_(torch.randn_like(g))
            q.grad = g.clone()
        for opt in (fa, fb):
            opt.param_groups[0]["lr"] = 1e-2 / (k + 1)
            opt.param_groups[0]["lam"] = 1e-3 * k
        fa.step()
        fb.step()
    s1 = stats()
    # step 1 set the momentum buffers (first-step mode), step 2 on reuse it: no build at all
    assert s1["builds"] == s0["builds"]
    assert s1["hits"] == s0["hits"] + 5
    assert s1["launches"] == 1
    assert_same(a, b)


def test_plan_rebuilt_when_a_pointer_changes():
    p = model(4)
    opt = BetaLasso(p, lr=1e-2, lam=1e-3, beta=1.0)
    set_grads(p, 0)
    opt.step()
    b0 = stats()["builds"]
    opt.step()
    assert stats()["builds"] == b0
    keep = p[2].grad
    p[2].grad = keep.clone()  # a new address while the old one is alive
    opt.step()
    assert stats()["builds"] == b0 + 1


def test_slots_split_launches_and_values_follow_every_step():
    """40 groups with distinct lr: 40 slots, ceil(40 / 16) = 3 launches, values passed per call."""
    params = model(40)
    groups = [dict(params=[i], lr=1e-2 * (1 + i)) for i in range(40)]
    a, b, fa, fb = pair(dict(lr=1e-2, lam=1e-3, beta=1.0, momentum=0.5), params, groups)
    for k in range(4):
        for opt in (fa, fb):
            for i, gr in enumerate(opt.param_groups):
                gr["lr"] = 1e-2 * (1 + i) / (k + 1)
        step_both(a, b, fa, fb, k)
        assert stats()["launches"] == 3
        assert_same(a, b)


def test_alignment_is_decided_per_tensor():
    base = torch.randn(200)
    gbase = torch.randn(200)
    aligned, shifted = base[:64], base[65:129]  # shifted starts 4 bytes past a 16-byte boundary
    torch.ops.regkernels.beta_lasso_step_([aligned, shifted], [gbase[:64], gbase[128:192]],
                                          [base.new_empty(0)] * 2, [0.1, 0.0, 0.0, 0.0, 1.0, 0.0] * 2, [0, 0, 0] * 2)
    assert stats()["vec"] == 1


def test_overlap_is_checked_when_a_plan_is_built():
    base = torch.zeros(10)
    with pytest.raises(RuntimeError, match=r"params\[0\] and params\[1\] share memory"):
        torch.ops.regkernels.beta_lasso_step_([base[:6], base[5:]], [torch.ones(6), torch.ones(5)],
                                              [base.new_empty(0)] * 2, [0.1, 0, 0, 0, 1, 0] * 2, [0, 0, 0] * 2)


# ------------------------------------------------------------------ the Python plan: invalidation
CFG = dict(lr=1e-2, lam=2e-2, beta=1.0, momentum=0.9)


def warm_pair(cfg=CFG, n=6, groups=None):
    a, b, fa, fb = pair(cfg, model(n), groups)
    step_both(a, b, fa, fb, 0)
    step_both(a, b, fa, fb, 1)
    assert fa._plan is not None
    return a, b, fa, fb


def test_replaced_momentum_buffer_is_used():
    a, b, fa, fb = warm_pair()
    for opt, ps in ((fa, a), (fb, b)):
        opt.state[ps[3]]["momentum_buffer"] = torch.full_like(ps[3], 0.5)
    step_both(a, b, fa, fb, 2)
    assert_same(a, b)
    assert fa.state[a[3]]["momentum_buffer"] is not None
    assert torch.equal(fa.state[a[3]]["momentum_buffer"], fb.state[b[3]]["momentum_buffer"])


def test_load_state_dict_after_planned_steps():
    a, b, fa, fb = warm_pair()
    saved = copy.deepcopy(fb.state_dict())
    for st in saved["state"].values():
        st["momentum_buffer"].mul_(2)
    fa.load_state_dict(saved)
    fb.load_state_dict(copy.deepcopy(saved))
    step_both(a, b, fa, fb, 2)
    assert_same(a, b)


def test_gradient_dropped_or_added():
    a, b, fa, fb = warm_pair()
    before = a[2].clone()
    set_grads(a, 2)
    a[2].grad = None
    for p, q in zip(a, b):
        q.grad = None if p.grad is None else p.grad.clone()
    fa.step()
    fb.step()
    assert torch.equal(a[2], before)
    assert fa.nonzeros()[0][2] is None
    assert_same(a, b)
    step_both(a, b, fa, fb, 3)  # and back
    assert_same(a, b)
    assert fa.nonzeros() == fb.nonzeros()


def test_param_added_in_place_and_new_group():
    a, b, fa, fb = warm_pair()
    extra = model(2, seed=5)
    a += [extra[0]]
    b += [extra[0].clone()]
    fa.param_groups[0]["params"].append(a[-1])
    fb.param_groups[0]["params"].append(b[-1])
    step_both(a, b, fa, fb, 2)
    assert_same(a, b)
    a += [extra[1]]
    b += [extra[1].clone()]
    fa.add_param_group(dict(params=[a[-1]], lr=0.5))
    fb.add_param_group(dict(params=[b[-1]], lr=0.5))
    step_both(a, b, fa, fb, 3)
    assert_same(a, b)


def test_noncontiguous_gradient_after_plan():
    a, b, fa, fb = warm_pair()
    set_grads(a, 2)
    a[0].grad = a[0].grad.t().contiguous().t()  # (8, 4) with transposed strides
    assert not a[0].grad.is_contiguous()
    for p, q in zip(a, b):
        q.grad = p.grad.clone()
    fa.step()
    fb.step()
    assert_same(a, b)

    named = BetaLasso([p.clone() for p in a], **CFG, backend="cpu")
    set_grads(named.param_groups[0]["params"], 0)
    named.step()
    named.step()
    p0 = named.param_groups[0]["params"][0]
    p0.grad = p0.grad.t().contiguous().t()
    with pytest.raises(ValueError, match="backend='cpu' cannot update"):
        named.step()


def test_sparse_gradient_after_plan():
    a, b, fa, fb = warm_pair(n=2)
    a[1].grad = torch.randn(4).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        fa.step()


@pytest.mark.parametrize("value, error", [(float("nan"), ValueError), (True, TypeError), (-1.0, ValueError)])
def test_bad_hyper_after_plan_is_refused_before_any_update(value, error):
    a, b, fa, fb = warm_pair()
    before = [p.clone() for p in a]
    fa.param_groups[0]["lam"] = value
    with pytest.raises(error, match="BetaLasso: lam"):
        fa.step()
    assert_same(a, before)


def test_momentum_switched_on_after_plan():
    a, b, fa, fb = warm_pair(dict(lr=1e-2, lam=2e-2, beta=1.0))
    for opt in (fa, fb):
        opt.param_groups[0]["momentum"] = 0.9
    step_both(a, b, fa, fb, 2)
    step_both(a, b, fa, fb, 3)
    assert_same(a, b)


def test_second_launch_refusal_updates_every_param_once():
    """Two launches (float32 and float64); after the plan exists a float64 parameter's gradient
    turns non-contiguous: the float32 launch has run when the float64 one refuses, so the full
    pass must update only what is left (that parameter through the reference, the other float64
    one fused)."""
    a = model(4) + model(2, seed=3, dtype=torch.float64)
    b = [p.clone() for p in a]
    fa, fb = BetaLasso(a, **CFG), BetaLasso(b, **CFG, backend="reference")
    for k in range(2):
        step_both(a, b, fa, fb, k)
    assert len(fa._plan.launches) == 2
    set_grads(a, 5)
    a[-2].grad = a[-2].grad.t().contiguous().t()
    for p, q in zip(a, b):
        q.grad = p.grad.clone()
    fa.step()
    fb.step()
    assert_same(a, b)
    assert fa.nonzeros() == fb.nonzeros()
