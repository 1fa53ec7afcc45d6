"""Tests of the Jacobian penalty (docs/jacobian.md#jacobian_penalty, Hoffman et al. 2019)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck
from torch.autograd.functional import jacobian

from regkernels.ops import jacobian as J
from regkernels.reference import jacobian as RJ


def _mlp(d_in: int = 5, hidden: int = 7, C: int = 4) -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, C)).double()


def _per_sample_jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, D) Jacobians of each sample, from torch.autograd.functional.jacobian of the
    whole batch (its cross-sample blocks are zero for an MLP and are checked to be)."""
    full = jacobian(model, x.detach())  # (B, C, B, D)
    B = x.shape[0]
    idx = torch.arange(B)
    own = full[idx, :, idx, :]
    assert full.pow(2).sum().item() == pytest.approx(own.pow(2).sum().item(), rel=1e-14)
    return own


def test_exact_equals_frobenius_norm_of_the_jacobian():
    model = _mlp()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    Jb = _per_sample_jacobians(model, x)
    truth = Jb.pow(2).sum() / x.shape[0]
    torch.testing.assert_close(J.jacobian_penalty(model(x), x, exact=True), truth, atol=1e-13, rtol=1e-12)


def test_per_sample_projection_formula():
    """One unit vector per sample and projection (the authors' convention):
    R = C/B · Σ_b v_bᵀ J_b J_bᵀ v_b for n_proj = 1, with the generator's draw replayed."""
    model = _mlp()
    x = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    Jb = _per_sample_jacobians(model, x)
    got = J.jacobian_penalty(model(x), x, generator=torch.Generator().manual_seed(7))
    v = torch.randn(5, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    v = v / v.norm(dim=1, keepdim=True)
    want = 4 / 5 * torch.einsum("bc,bcd->bd", v, Jb).pow(2).sum()
    torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-12)


def test_estimator_is_unbiased():
    """4000 projections of a fixed tiny model land within 6 standard deviations of the exact
    value; the standard deviation is the estimator's own, from the sphere moments
    E[(vᵀMv)²] = (tr(M)² + 2 tr(M²)) / (C(C+2)), E[vᵀMv] = tr(M)/C, M = J_b J_bᵀ."""
    model = _mlp(d_in=3, hidden=5, C=3)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    Jb = _per_sample_jacobians(model, x)
    B, C, _ = Jb.shape
    M = Jb @ Jb.mT
    tr, tr2 = M.diagonal(dim1=-2, dim2=-1).sum(-1), (M @ M).diagonal(dim1=-2, dim2=-1).sum(-1)
    var_q = (tr**2 + 2 * tr2) / (C * (C + 2)) - (tr / C) ** 2
    n_proj = 4000
    std = math.sqrt(float((C / B) ** 2 * var_q.sum()) / n_proj)
    exact = float(tr.sum() / B)
    est = float(J.jacobian_penalty(model(x), x, n_proj=n_proj, generator=torch.Generator().manual_seed(11)).detach())
    assert std > 0
    assert abs(est - exact) <= 6 * std


def test_generator_makes_it_reproducible():
    model = _mlp()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = model(x)
    a = J.jacobian_penalty(y, x, n_proj=3, generator=torch.Generator().manual_seed(5))
    b = J.jacobian_penalty(y, x, n_proj=3, generator=torch.Generator().manual_seed(5))
    c = J.jacobian_penalty(y, x, n_proj=3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("exact", [False, True])
def test_gradient_reaches_model_parameters(exact):
    model = _mlp().float()
    x = torch.randn(8, 5, requires_grad=True)
    y = model(x)
    loss = y.pow(2).mean() + 0.01 * J.jacobian_penalty(y, x, n_proj=2, exact=exact)
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_gradcheck_exact_wrt_a_parameter():
    torch.manual_seed(4)
    W1, b1 = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    W2 = torch.randn(3, 6, dtype=torch.float64)
    x0 = torch.randn(5, 4, dtype=torch.float64)

    def penalty(W1):
        x = x0.clone().requires_grad_(True)
        y = torch.tanh(x @ W1.T + b1) @ W2.T
        return J.jacobian_penalty(y, x, exact=True)

    assert gradcheck(penalty, (W1.requires_grad_(True),))


def test_single_output_and_empty_batch():
    model = _mlp(C=1)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = model(x)
    torch.testing.assert_close(J.jacobian_penalty(y, x, n_proj=2), J.jacobian_penalty(y, x, exact=True))
    x0 = torch.randn(0, 5, dtype=torch.float64, requires_grad=True)
    out = J.jacobian_penalty(_mlp()(x0), x0)
    assert out.shape == () and out.item() == 0.0
    out.backward()


def test_reference_and_public_agree_and_inputs_unchanged():
    model = _mlp()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = model(x)
    x_before, y_before = x.detach().clone(), y.detach().clone()
    a = RJ.jacobian_penalty(y, x, n_proj=2, generator=torch.Generator().manual_seed(1))
    b = J.jacobian_penalty(y, x, n_proj=2, generator=torch.Generator().manual_seed(1), backend="reference")
    assert torch.equal(a, b)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)


def _xy():
    x = torch.randn(4, 5, requires_grad=True)
    return x, nn.Linear(5, 3)(x)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, y: J.jacobian_penalty(y[0], x), ValueError, r"jacobian_penalty: y must have 2 dims \(B, C\)"),
    (lambda x, y: J.jacobian_penalty(y[None], x), ValueError, r"jacobian_penalty: y must have 2 dims \(B, C\)"),
    (lambda x, y: J.jacobian_penalty(y.detach().long(), x), TypeError,
     "jacobian_penalty: y must have a floating dtype"),
    (lambda x, y: J.jacobian_penalty(y, x.detach().numpy()), TypeError, "jacobian_penalty: x must be a torch.Tensor"),
    (lambda x, y: J.jacobian_penalty(y, x.detach()), ValueError, "jacobian_penalty: x must require grad"),
    (lambda x, y: J.jacobian_penalty(y.detach(), x), ValueError, "jacobian_penalty: y must be computed from x"),
    (lambda x, y: J.jacobian_penalty(y, torch.randn(4, 5, requires_grad=True)), ValueError,
     "jacobian_penalty: y does not depend on x"),
    (lambda x, y: J.jacobian_penalty(y, torch.randn(3, 5, requires_grad=True)), ValueError,
     "jacobian_penalty: x and y must share the batch dim B"),
    (lambda x, y: J.jacobian_penalty(y, x, n_proj=0), ValueError, "jacobian_penalty: n_proj must be >= 1"),
    (lambda x, y: J.jacobian_penalty(y, x, n_proj=1.5), TypeError, "jacobian_penalty: n_proj must be an integer"),
    (lambda x, y: J.jacobian_penalty(y, x, exact=1), TypeError, "jacobian_penalty: exact must be a bool"),
    (lambda x, y: J.jacobian_penalty(y, x, generator=5), TypeError,
     "jacobian_penalty: generator must be a torch.Generator"),
    (lambda x, y: J.jacobian_penalty(y, x, backend="cpu"), ValueError,
     "jacobian_penalty: no 'cpu' backend for cpu tensors; backends that take cpu fp32 "
     "inputs here: 'reference'"),
    (lambda x, y: J.jacobian_penalty(y, x, backend="torch"), ValueError,
     "jacobian_penalty: no 'torch' backend"),
    (lambda x, y: J.jacobian_penalty(y, x, 1, False, None, "reference"), TypeError, "positional argument"),
])
def test_bad_input(call, exc, match):
    x, y = _xy()
    with pytest.raises(exc, match=match):
        call(x, y)


def test_jacobian_penalty_double_backward_gradgradcheck():
    # the penalty is itself a first derivative of the model; its gradient w.r.t. a weight (what a
    # training step uses) must be differentiable once more, exactly
    lin = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def f(weight):
        y = torch.tanh(nn.functional.linear(x, weight, lin.bias))
        return J.jacobian_penalty(y, x, exact=True)

    assert torch.autograd.gradgradcheck(f, (lin.weight.detach().clone().requires_grad_(),))


# ------------------------------------------------------------------------------ torch.func

def _penalty_of(W: torch.Tensor, x: torch.Tensor, exact: bool = True) -> torch.Tensor:
    y = torch.tanh(x @ W.T)
    return J.jacobian_penalty(y, x, exact=exact, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("exact", [True, False])
def test_torch_func_grad_and_vjp_with_x_among_the_inputs(exact):
    W = torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    Wg, xg = W.clone().requires_grad_(), x.clone().requires_grad_()
    want = torch.autograd.grad(_penalty_of(Wg, xg, exact), (Wg, xg))
    got = torch.func.grad(lambda W, x: _penalty_of(W, x, exact), argnums=(0, 1))(W, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    value, pullback = torch.func.vjp(lambda W, x: _penalty_of(W, x, exact), W, x)
    torch.testing.assert_close(value, _penalty_of(Wg, xg, exact).detach(), atol=1e-13, rtol=1e-13)
    for a, b in zip(pullback(torch.ones((), dtype=torch.float64)), want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # per-model gradients: vmap of the grad over a stack of weights
    Ws = torch.stack([W, 2 * W, -W])
    per = torch.func.vmap(lambda W: torch.func.grad(_penalty_of, argnums=(0, 1))(W, x)[0])(Ws)
    loop = []
    for Wi in Ws:
        Wi = Wi.clone().requires_grad_()
        loop.append(torch.autograd.grad(_penalty_of(Wi, x.clone().requires_grad_()), Wi)[0])
    torch.testing.assert_close(per, torch.stack(loop), atol=1e-12, rtol=1e-12)


def test_torch_func_with_x_outside_the_transform_is_refused_clearly():
    W = torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    match = r"jacobian_penalty: y is a torch.func-transformed tensor and x is not: .* x to be an input"
    with pytest.raises(ValueError, match=match):
        torch.func.grad(lambda W: _penalty_of(W, x))(W)
    with pytest.raises(ValueError, match=r"torch.func.vmap of the penalty itself is not supported"):
        torch.func.vmap(lambda W: _penalty_of(W, x))(torch.stack([W, W]))
