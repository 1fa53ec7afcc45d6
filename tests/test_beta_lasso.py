"""β-LASSO: reference vs independent formulas, fused kernels vs reference (bit for bit in
float32 on CPU), optimizer conformance (groups, state_dict, closure), custom-op checks."""
from __future__ import annotations

import copy

import pytest
import torch

from regkernels import _ext
from regkernels.ops import beta_lasso as ops
from regkernels.optim import BetaLasso
from regkernels.reference.beta_lasso import beta_lasso_update_

needs_ext = pytest.mark.skipif(not _ext.HAS_C, reason="compiled extension not built")
if _ext.HAS_C:
    from regkernels import _C_ops

CONFIGS = {
    "plain": dict(lr=0.05, lam=0.02, beta=1.0),
    "momentum": dict(lr=0.05, lam=0.02, beta=1.0, momentum=0.9),
    "dampening-wd": dict(lr=0.05, lam=0.02, beta=0.5, momentum=0.8, dampening=0.3, weight_decay=1e-2),
    "nesterov-wd": dict(lr=0.05, lam=0.02, beta=2.0, momentum=0.9, nesterov=True, weight_decay=5e-3),
}
SHAPES = [(7, 13), (0,), (1,), (33, 5, 3, 3), (4097,), (0, 3), (70001,)]


def make_params(shapes, dtype=torch.float32, device="cpu", scale=0.1):
    return [(torch.randn(s, dtype=torch.float64) * scale).to(device=device, dtype=dtype) for s in shapes]


def run_pair(cfg, shapes=SHAPES, dtype=torch.float32, steps=100, device="cpu", skip_index=None):
    """Run the fused and the reference optimizer on identical params and gradients."""
    a = make_params(shapes, dtype, device)
    b = [p.clone() for p in a]
    fused = BetaLasso(a, **cfg)
    ref = BetaLasso(b, **cfg, backend="reference")
    for step in range(steps):
        for i, (p, q) in enumerate(zip(a, b)):
            g = None if i == skip_index else torch.randn_like(p, dtype=torch.float64).to(dtype)
            p.grad, q.grad = g, (None if g is None else g.clone())
        fused.step()
        ref.step()
        yield step, a, b, fused, ref


# ------------------------------------------------------------------ reference vs formulas
def test_reference_matches_paper_formula_float64():
    """Defaults = the paper: θ ← θ − lr·(g + λ·sign θ), then zero where |θ| < βλ (explicit loop)."""
    theta = torch.randn(50, dtype=torch.float64) * 0.1
    theta[:5] = 0.0
    g = torch.randn(50, dtype=torch.float64)
    lr, lam, beta = 0.1, 0.05, 0.7
    expected = []
    for t, gi in zip(theta.tolist(), g.tolist()):
        s = (t > 0) - (t < 0)
        new = t - lr * (gi + lam * s)
        expected.append(0.0 if abs(new) < beta * lam else new)
    p = theta.clone()
    assert beta_lasso_update_(p, g, None, lr=lr, lam=lam, beta=beta) is None
    torch.testing.assert_close(p, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("cfg", [dict(momentum=0.9), dict(momentum=0.9, dampening=0.25, weight_decay=1e-2),
                                 dict(momentum=0.9, nesterov=True, weight_decay=1e-3), dict(weight_decay=0.1)])
@pytest.mark.parametrize("backend", ["reference", None])
def test_lam_zero_is_sgd(cfg, backend):
    """With lam = beta = 0, β-LASSO is torch.optim.SGD (an independent implementation)."""
    a = make_params([(5, 7), (11,)], torch.float64)
    b = [p.clone() for p in a]
    ours = BetaLasso(a, lr=0.1, lam=0.0, beta=0.0, backend=backend, **cfg)
    sgd = torch.optim.SGD(b, lr=0.1, foreach=False, **cfg)
    for _ in range(10):
        for p, q in zip(a, b):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        sgd.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ fused vs reference
@needs_ext
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_cpu_bit_exact_float32_100_steps(name):
    for step, a, b, fused, ref in run_pair(CONFIGS[name], skip_index=2):
        for i, (p, q) in enumerate(zip(a, b)):
            assert torch.equal(p, q), f"{name}: tensor {i} differs at step {step}"
    assert fused.nonzeros() == ref.nonzeros()
    assert fused.nonzeros()[0][2] is None  # no gradient → skipped


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["plain", "nesterov-wd"])
def test_fused_cpu_other_dtypes(dtype, name):
    """Low precision: float32 math, one rounding on store, as the reference; fp64: double math."""
    for step, a, b, _, _ in run_pair(CONFIGS[name], shapes=[(9, 11), (0,), (40000,)], dtype=dtype, steps=20):
        for p, q in zip(a, b):
            assert p.dtype == dtype
            assert torch.equal(p, q), f"{dtype} differs at step {step}"


@needs_ext
def test_thresholds_hit_exactly():
    """|θ| == beta·lam (rounded to float32) is kept, the next float toward 0 is zeroed."""
    lam, beta = 0.3, 0.7
    thr = torch.tensor(beta * lam, dtype=torch.float32)
    below = torch.nextafter(thr, torch.tensor(0.0))
    theta = torch.stack([thr, -thr, below, -below, 2 * thr, torch.tensor(0.0)])
    for backend in ("reference", "cpu"):
        p = theta.clone()
        p.grad = torch.zeros_like(p)
        opt = BetaLasso([p], lr=0.0, lam=lam, beta=beta, backend=backend)
        opt.step()
        assert torch.equal(p, torch.stack([thr, -thr, torch.tensor(0.0), torch.tensor(0.0), 2 * thr,
                                           torch.tensor(0.0)])), backend
        assert opt.nonzeros() == [[3]]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_sign_of_zero_is_zero_and_beta_zero_never_zeroes(backend):
    p = torch.tensor([0.0, 0.0, 1e-9, -1e-9])
    p.grad = torch.tensor([0.0, 1.0, 0.0, 0.0])
    BetaLasso([p], lr=0.5, lam=0.1, beta=0.0, backend=backend).step()
    # θ = 0 with g = 0 stays 0 (sign(0) = 0); tiny values survive beta = 0
    expected = torch.tensor([0.0, -0.5, 1e-9 - 0.05, -1e-9 + 0.05])
    assert p[0].item() == 0.0
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-8)
    assert (p[2:] != 0).all()


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_nan_gradient_stays_visible(backend):
    p = torch.tensor([1.0, 2.0])
    p.grad = torch.tensor([float("nan"), 0.0])
    BetaLasso([p], lr=0.1, lam=0.1, beta=1.0, backend=backend).step()
    assert torch.isnan(p[0]) and p[1].item() != 0


@needs_ext
def test_one_launch_per_device_dtype(monkeypatch):
    """Two param groups with different hyper-parameters, two dtypes → exactly two launches."""
    calls = []
    real = torch.ops.regkernels.beta_lasso_step_

    class Spy:  # the table's fused entry (regkernels._C_ops.beta_lasso_step_) calls the op by name
        def __call__(self, *a):
            calls.append(len(a[0]))
            return real(*a)

    monkeypatch.setattr(torch.ops.regkernels, "beta_lasso_step_", Spy())
    p32 = make_params([(3, 4), (5,), (0,)])
    p64 = make_params([(6,)], torch.float64)
    opt = BetaLasso([{"params": p32[:2], "lr": 0.1}, {"params": p32[2:] + p64, "momentum": 0.5}],
                    lr=0.2, lam=0.01, beta=1.0)
    for p in p32 + p64:
        p.grad = torch.ones_like(p)
    opt.step()
    assert sorted(calls) == [1, 3]


@needs_ext
@pytest.mark.parametrize("layout", ["strided", "mismatched"])
def test_nondense_or_mismatched_layout_falls_back_exactly(layout):
    """Dense layouts shared by parameter and gradient go through the fused kernel
    (tests/test_beta_lasso_optim_api.py); a parameter with gaps, or a gradient with other
    strides, is updated by the reference with backend=None."""
    if layout == "strided":
        a = torch.randn(6, 10)[:, ::2]  # a leaf view with gaps
        a.grad = torch.randn(6, 10)[:, ::2]
    else:
        a = torch.randn(6, 5).t()  # dense, transposed
        a.grad = torch.randn(5, 6)  # contiguous: other strides
    b = a.clone()
    b.grad = a.grad.clone()
    BetaLasso([a], lr=0.1, lam=0.05, beta=1.0).step()
    BetaLasso([b], lr=0.1, lam=0.05, beta=1.0, backend="reference").step()
    assert torch.equal(a, b)


@needs_ext
def test_named_fused_backend_refuses_what_it_cannot_update():
    """None falls back to the reference for a parameter the kernel cannot take (above); a named
    fused backend raises instead, naming what takes it. Names without rows are refused up front."""
    p = torch.randn(6, 5).t().requires_grad_()
    p.grad = torch.randn(5, 6)
    with pytest.raises(ValueError, match=r"BetaLasso: backend='cpu' cannot update a torch.float32 parameter on cpu "
                                         r"with strides \(1, 5\) from a torch.float32 gradient with strides \(6, 1\)"
                                         r".*backend='reference' or None takes any"):
        BetaLasso([p], lr=0.1, lam=0.05, beta=1.0, backend="cpu").step()
    for name in ("torch", "triton"):
        with pytest.raises(ValueError, match=rf"BetaLasso: no '{name}' backend for cpu tensors; backends that take "
                                             rf"cpu fp32 inputs here: 'cpu', 'reference'$"):
            BetaLasso([p], lr=0.1, lam=0.05, beta=1.0, backend=name)
    with pytest.raises(ValueError, match=r"BetaLasso: backend must be None or one of 'reference', 'torch', 'cpu', "
                                         r"'cuda', 'triton'; got 'fast'"):
        BetaLasso([p], lr=0.1, lam=0.05, beta=1.0, backend="fast")


# ------------------------------------------------------------------ optimizer conformance
@pytest.mark.parametrize("backend", ["reference", pytest.param(None, marks=needs_ext)])
def test_state_dict_resume_identical(backend):
    cfg = dict(CONFIGS["dampening-wd"], backend=backend)
    torch.manual_seed(1)
    grads = [[torch.randn(s) for s in [(4, 3), (10,)]] for _ in range(10)]
    start = make_params([(4, 3), (10,)])

    def run(params, opt, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    full = [p.clone() for p in start]
    run(full, BetaLasso(full, **cfg), grads)

    half = [p.clone() for p in start]
    opt = BetaLasso(half, **cfg)
    run(half, opt, grads[:5])
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.clone() for p in half]
    opt2 = BetaLasso(resumed, **cfg)
    opt2.load_state_dict(saved)
    run(resumed, opt2, grads[5:])
    for p, q in zip(full, resumed):
        assert torch.equal(p, q)
    assert set(saved["state"][0]) == {"momentum_buffer"}


@pytest.mark.parametrize("backend", ["reference", pytest.param(None, marks=needs_ext)])
def test_closure_zero_grad_and_nonzeros(backend):
    w = torch.nn.Parameter(torch.randn(8, 8) * 0.1)
    opt = BetaLasso([w], lr=0.1, lam=0.05, beta=1.0, backend=backend)
    x = torch.randn(4, 8)

    def closure():
        opt.zero_grad()
        loss = (x @ w).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert opt.nonzeros() == [[int(torch.count_nonzero(w))]]
    opt.zero_grad()
    assert w.grad is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "BetaLasso: lr must be >= 0"),
    (dict(lam=-0.1), "BetaLasso: lam must be >= 0"),
    (dict(beta=float("nan")), "BetaLasso: beta must be finite"),
    (dict(momentum=-0.5), "BetaLasso: momentum must be >= 0"),
    (dict(nesterov=True), "nesterov=True requires momentum > 0"),
    (dict(backend="gpu"), "backend must be None or one of"),
])
def test_bad_hyperparameters(kwargs, match):
    cfg = dict(lr=0.1, lam=0.1, beta=1.0)
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=match):
        BetaLasso([torch.zeros(2, requires_grad=True)], **cfg)


def test_backend_cuda_on_cpu_param_and_sparse_grad():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"BetaLasso: no 'cuda' backend for cpu tensors; backends that "
                                         r"take cpu fp32 inputs here: 'cpu', 'reference'"):
        BetaLasso([p], lr=0.1, lam=0.1, beta=1.0, backend="cuda").step()
    p.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        BetaLasso([p], lr=0.1, lam=0.1, beta=1.0, backend="reference").step()


# ------------------------------------------------------------------ the custom op itself
def _op_args(device="cpu", momentum=True):
    params = make_params([(5, 3), (0,), (17,)], device=device)
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) if momentum else params[0].new_empty(0) for p in params]
    hyper, flags = [], []
    for _ in params:
        h, f = ops.pack_hyper(0.1, 0.01, 1.0, 0.9 if momentum else 0.0, 0.0, 1e-3, False, False)
        hyper += h
        flags += f
    return params, grads, bufs, hyper, flags


@needs_ext
@pytest.mark.parametrize("momentum", [True, False])
def test_opcheck(momentum):
    torch.library.opcheck(torch.ops.regkernels.beta_lasso_step_.default, _op_args(momentum=momentum))


@needs_ext
def test_op_under_torch_compile_fullgraph():
    params, grads, bufs, hyper, flags = _op_args()
    expect = [p.clone() for p in params]
    ebufs = [b.clone() for b in bufs]
    counts_ref = _C_ops.beta_lasso_step_(expect, grads, ebufs, hyper, flags)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ps, gs, bs):
        return torch.ops.regkernels.beta_lasso_step_(ps, gs, bs, hyper, flags)

    counts = step(params, grads, bufs)
    assert torch.equal(counts, counts_ref)
    for p, q in zip(params, expect):
        assert torch.equal(p, q)


@needs_ext
def test_op_bad_arguments():
    params, grads, bufs, hyper, flags = _op_args()
    with pytest.raises(RuntimeError, match="hyper must hold 6 values per tensor"):
        _C_ops.beta_lasso_step_(params, grads, bufs, hyper[:-1], flags)
    with pytest.raises(RuntimeError, match="same length"):
        _C_ops.beta_lasso_step_(params, grads[:1], bufs, hyper, flags)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must match params\[0\]"):
        _C_ops.beta_lasso_step_(params, [grads[0].double()] + grads[1:], bufs, hyper, flags)
    with pytest.raises(RuntimeError, match="must share dtype and device"):
        _C_ops.beta_lasso_step_([params[0], params[2].double()], grads[::2], bufs[::2], hyper[:12], flags[:6])
    with pytest.raises(RuntimeError, match="must be float16, bfloat16, float32 or float64"):
        _C_ops.beta_lasso_step_([torch.zeros(2, dtype=torch.int32)], [torch.zeros(2, dtype=torch.int32)],
                             [torch.zeros(0)], hyper[:6], flags[:3])


# ------------------------------------------------------------------ CUDA (run where a GPU exists)
@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_fused_cuda_vs_reference(name, dtype):
    """The CUDA kernel uses un-contracted (_rn) arithmetic, so it matches the reference exactly;
    docs/beta_lasso.md#update-rule allows 1 ulp on GPU, which is what this asserts at most."""
    for step, a, b, fused, ref in run_pair(CONFIGS[name], dtype=dtype, steps=20, device="cuda", skip_index=1):
        for p, q in zip(a, b):
            diff = (p.double() - q.double()).abs()
            ulp = torch.finfo(dtype).eps * q.double().abs().clamp_min(torch.finfo(dtype).tiny)
            assert bool((diff <= ulp).all()), f"{name} {dtype} step {step}"
    assert fused.nonzeros() == ref.nonzeros()


@pytest.mark.cuda
def test_cuda_single_launch_many_tensors(monkeypatch):
    calls = []
    real = torch.ops.regkernels.beta_lasso_step_

    class Spy:  # the table's fused entry (regkernels._C_ops.beta_lasso_step_) calls the op by name
        def __call__(self, *a):
            calls.append(len(a[0]))
            return real(*a)

    monkeypatch.setattr(torch.ops.regkernels, "beta_lasso_step_", Spy())
    ps = make_params([(i * 37 + 1,) for i in range(60)] + [(0,)], device="cuda")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = BetaLasso(ps, lr=0.1, lam=0.01, beta=1.0)
    opt.step()
    assert calls == [61]
    assert opt.nonzeros()[0] == [int(torch.count_nonzero(p)) for p in ps]
