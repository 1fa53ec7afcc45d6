"""The one-sided Jacobi SVD kernel (regkernels::batched_svd, csrc/core/jacobi_svd.h) against
docs/svd.md#batched_svd's accuracy bounds, measured against float64 LAPACK.

The CPU kernel runs here; the CUDA kernel runs the same checks where a GPU exists (tests marked
``cuda``). tests/test_svd.py covers the public ops' contract, which now runs on the kernel by
default as well.
"""
from __future__ import annotations

import pytest
import torch

from regkernels import _ext
from regkernels.ops import svd as S
from regkernels.reference import conv as RC

pytestmark = pytest.mark.skipif(not _ext.HAS_C, reason="regkernels._C not built")
if _ext.HAS_C:
    from regkernels import _C_ops


def _conv_table_has_sedghi_rows() -> bool:
    from regkernels.ops import conv as C

    return hasattr(C, "TABLE")


# the public conv ops reach the Sedghi entries of regkernels._C_ops through the conv family's TABLE
# rows (ops/conv.py); the entries themselves are tested directly below
needs_conv_rows = pytest.mark.skipif(not _conv_table_has_sedghi_rows(),
                                     reason="regkernels.ops.conv has no TABLE with the Sedghi 'cpu' rows yet")

TOLS = {torch.float32: 1e-5, torch.float64: 1e-12}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _op(X: torch.Tensor):
    return torch.ops.regkernels.batched_svd(X)


def _errors(X: torch.Tensor, U: torch.Tensor, Sv: torch.Tensor, Vh: torch.Tensor) -> dict[str, float]:
    """docs/svd.md#batched_svd's four measures, per batch maximum, computed in float64 on the CPU."""
    X64, U64, S64, Vh64 = (t.detach().to(torch.float64).cpu() for t in (X, U, Sv, Vh))
    k = S64.shape[-1]
    eye = torch.eye(k, dtype=torch.float64)
    truth = torch.linalg.svdvals(X64)
    norm = torch.linalg.matrix_norm(X64)
    recon = torch.linalg.matrix_norm(X64 - U64 @ torch.diag_embed(S64) @ Vh64)
    return {
        "recon": float(torch.where(norm > 0, recon / norm.clamp_min(1e-300), recon).max()),
        "orth_u": float((U64.mT @ U64 - eye).abs().max()),
        "orth_v": float((Vh64 @ Vh64.mT - eye).abs().max()),
        "sigma": float(((S64 - truth).abs().amax(-1) / truth[..., 0].clamp_min(1e-300)).max()),
        "sorted": bool((S64 >= 0).all() and (S64[..., :-1] >= S64[..., 1:]).all()),
    }


def _check(X: torch.Tensor, out, tol: float) -> None:
    U, Sv, Vh = out
    b, m, n = X.shape
    k = min(m, n)
    assert U.shape == (b, m, k) and Sv.shape == (b, k) and Vh.shape == (b, k, n)
    assert U.dtype == Sv.dtype == Vh.dtype == X.dtype and U.is_contiguous() and Vh.is_contiguous()
    err = _errors(X, U, Sv, Vh)
    assert err["sorted"]
    for key in ("recon", "orth_u", "orth_v", "sigma"):
        assert err[key] <= tol, (key, err)


def _orthogonal(b: int, n: int, dtype=torch.float64) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(b, n, n, dtype=torch.float64))
    return (Q * R.diagonal(dim1=-2, dim2=-1).sign()[..., None, :]).to(dtype)


def _with_spectrum(s: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """``Q₁ diag(s) Q₂`` in float64 for s of shape (b, min(m, n))."""
    b, k = s.shape
    return (_orthogonal(b, m)[..., :k] * s[:, None, :]) @ _orthogonal(b, n)[..., :k, :]


def _kind(kind: str, m: int, n: int) -> torch.Tensor:
    k = min(m, n)
    g = torch.randn
    if kind == "gaussian":
        return g(6, m, n, dtype=torch.float64)
    if kind == "rank-deficient":
        r = max(1, k // 3)
        return g(4, m, r, dtype=torch.float64) @ g(4, r, n, dtype=torch.float64)
    if kind == "repeated":  # orthogonal / scaled-orthogonal columns: where SVB lives
        return _with_spectrum(torch.tensor([[1.0] * k, [3.0] * k, [1.0] * (k - k // 2) + [0.5] * (k // 2)]), m, n)
    if kind == "clustered":
        return _with_spectrum(1 + 1e-6 * torch.rand(3, k, dtype=torch.float64), m, n)
    if kind == "graded":  # columns scaled from 1e-20 to 1e20 inside one matrix
        return g(3, m, n, dtype=torch.float64) * torch.logspace(-20, 20, n, dtype=torch.float64)
    if kind == "graded-rows":
        return g(3, m, n, dtype=torch.float64) * torch.logspace(20, -20, m, dtype=torch.float64)[:, None]
    if kind == "zero":
        return torch.zeros(2, m, n, dtype=torch.float64)
    raise AssertionError(kind)


KINDS = ["gaussian", "rank-deficient", "repeated", "clustered", "graded", "graded-rows", "zero"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,n", [(8, 8), (17, 5), (5, 17), (32, 32), (64, 64), (64, 37), (29, 64)])
def test_kernel_accuracy_by_kind(kind, m, n, dtype, device):
    X = _kind(kind, m, n).to(dtype).to(device)
    _check(X, _op(X), TOLS[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-20, 1e-10, 1.0, 1e10, 1e20])
def test_kernel_accuracy_at_extreme_scales(scale, dtype, device):
    X = (scale * torch.randn(5, 12, 9, dtype=torch.float64)).to(dtype).to(device)
    _check(X, _op(X), TOLS[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_every_size_up_to_64(dtype):
    """Every 1 ≤ n ≤ 64 square, and tall / wide companions of every size."""
    for n in range(1, 65):
        for m in sorted({n, (n + 1) // 2, min(64, 2 * n - 1)}):
            for shape in {(m, n), (n, m)}:
                X = torch.randn(3, *shape, dtype=torch.float64).to(dtype)
                _check(X, _op(X), TOLS[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_stretch_sizes_up_to_128(dtype):
    for shape in [(65, 65), (128, 128), (128, 40), (33, 127)]:
        X = torch.randn(2, *shape, dtype=torch.float64).to(dtype)
        _check(X, _op(X), TOLS[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_kernel_non_finite_matrix_is_nan_alone(bad, device):
    X = torch.randn(11, 6, 9, device=device)  # 11: lanes of two groups and a partial one
    X[3, 2, 4] = bad
    X[9] = bad
    U, Sv, Vh = _op(X)
    for i in (3, 9):
        assert U[i].isnan().all() and Sv[i].isnan().all() and Vh[i].isnan().all()
    keep = torch.tensor([i for i in range(11) if i not in (3, 9)], device=device)
    _check(X[keep], (U[keep], Sv[keep], Vh[keep]), TOLS[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_strided_inputs_and_batch_independence(device):
    base = torch.randn(9, 14, 20, dtype=torch.float64, device=device)
    for X in (base.mT, base[:, ::2, 1::2], base[:1].expand(5, 14, 20), base.permute(1, 0, 2)):
        assert not X.is_contiguous()
        out = _op(X)
        _check(X, out, TOLS[torch.float64])
        # a matrix's result does not depend on its batch neighbours (lanes of one SIMD group)
        alone = _op(X[2:3].contiguous())
        for a, b in zip(out, alone):
            torch.testing.assert_close(a[2:3], b, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_empty_batch(device):
    U, Sv, Vh = _op(torch.empty(0, 5, 3, device=device))
    assert U.shape == (0, 5, 3) and Sv.shape == (0, 3) and Vh.shape == (0, 3, 3)


@pytest.mark.parametrize("call,match", [
    (lambda: _op(torch.randn(4, 4)), r"regkernels::batched_svd \(CPU\): X must be \(b, m, n\)"),
    (lambda: _op(torch.randn(2, 4, 4).half()), r"regkernels::batched_svd \(CPU\): X must be float32 or float64"),
    (lambda: _op(torch.randn(1, 129, 4)), r"max\(m, n\) <= 128 \(larger matrices go to torch.linalg.svd\)"),
    (lambda: _op(torch.randn(1, 0, 4)), r"1 <= m, n"),
])
def test_kernel_errors(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_kernel_opcheck():
    for X in (torch.randn(5, 7, 4), torch.randn(3, 4, 6, dtype=torch.float64)):
        torch.library.opcheck(torch.ops.regkernels.batched_svd, (X,),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


# ------------------------------------------------------------------------------ public ops on the kernel

def test_public_op_dispatch_ranges(monkeypatch):
    """Default: kernel for max(m, n) ≤ 64 (QR-reduced when only the long side is larger),
    LAPACK above; an explicit backend="cpu" takes the kernel up to 128."""
    calls = []
    real = torch.ops.regkernels.batched_svd

    class Spy:
        def __call__(self, X):
            calls.append(tuple(X.shape))
            return real(X)

    monkeypatch.setattr(torch.ops.regkernels, "batched_svd", Spy())
    S.batched_svd(torch.randn(2, 3, 40, 50))
    S.batched_svd(torch.randn(2, 96, 96))
    S.batched_svd(torch.randn(2, 96, 96), backend="cpu")
    S.batched_svd(torch.randn(2, 30, 300))
    S.batched_svd(torch.randn(2, 300, 30))
    assert calls == [(6, 40, 50), (2, 96, 96), (2, 30, 30), (2, 30, 30)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 64, 576), (3, 576, 64), (2, 5, 200), (2, 200, 1)])
def test_public_op_long_matrices_through_qr(shape, dtype):
    X = torch.randn(shape, dtype=torch.float64).to(dtype)
    _check(X, S.batched_svd(X), TOLS[dtype])


def test_public_op_gradient_matches_torch_svd():
    """Gauge-invariant losses (the sign of a singular pair cancels) of U, S and Vh."""
    for shape in [(3, 6, 6), (2, 7, 4), (2, 4, 7), (2, 20, 90)]:
        X = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        w = torch.randn(min(shape[-2:]), dtype=torch.float64)

        def loss(svd):
            U, Sv, Vh = svd(X)
            return ((U * (w * Sv.sin())[..., None, :]) @ Vh).pow(2).sum() + Sv.pow(3).sum()

        (ours,) = torch.autograd.grad(loss(S.batched_svd), X)
        (theirs,) = torch.autograd.grad(loss(lambda Y: torch.linalg.svd(Y, full_matrices=False)), X)
        torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-9)


def test_public_op_gradcheck_and_values_at_repeated_singular_values():
    X = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda X: (lambda U, Sv, Vh: (U * Sv[..., None, :] ** 2) @ Vh)(*S.batched_svd(X)),
                                    (X,))
    # a loss of S alone stays finite at X = orthogonal (all σ equal), as in torch.linalg.svd
    Q = _orthogonal(3, 6).requires_grad_(True)
    (g,) = torch.autograd.grad(S.batched_svd(Q)[1].sum(), Q)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, Q.detach(), atol=1e-12, rtol=1e-12)  # ∂Σσ/∂X = U Vᵀ = Q


def test_clamp_on_kernel_is_finite_at_repeated_values_and_matches_finite_differences():
    Q = _orthogonal(2, 6)  # every σ = 1, inside [0.5, 1.5]: Y = X locally, gradient = identity map
    X = (Q * torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 0.25], dtype=torch.float64)).requires_grad_(True)
    gY = torch.randn_like(X)
    (g,) = torch.autograd.grad((S.clamp_singular_values(X, 0.5, 1.5, backend="cpu") * gY).sum(), X)
    assert torch.isfinite(g).all()
    h = 1e-6
    D = torch.randn_like(X)
    fd = ((S.clamp_singular_values(X.detach() + h * D, 0.5, 1.5, backend="cpu")
           - S.clamp_singular_values(X.detach() - h * D, 0.5, 1.5, backend="cpu")) * gY).sum() / (2 * h)
    torch.testing.assert_close((g * D).sum(), fd, atol=1e-6, rtol=1e-6)


@needs_conv_rows
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-11)])
def test_conv_singular_values_on_kernel_equal_explicit_operator(dtype, tol):
    """docs/conv.md#conv_singular_values: the union of the per-frequency singular values (kernel, real embedding) is the
    spectrum of the explicit circular operator."""
    from regkernels.ops import conv as C

    w = torch.randn(6, 5, 3, 3, dtype=torch.float64) / 4
    T = RC.conv_to_matrix(w, (5, 6), padding=1, padding_mode="circular")
    truth = torch.linalg.svdvals(T).sort().values
    sv = C.conv_singular_values(w.to(dtype), (5, 6), backend="cpu")
    assert sv.dtype == dtype and sv.shape == (30, 5)
    # T is (6·30) × (5·30): 150 singular values, the frequencies' 30 × 5
    torch.testing.assert_close(sv.double().flatten().sort().values, truth, atol=tol * truth.max(), rtol=0)


@needs_conv_rows
def test_clip_conv_singular_values_on_kernel_matches_reference():
    from regkernels.ops import conv as C

    w = torch.randn(8, 6, 3, 3, dtype=torch.float64) / 3
    ours = C.clip_conv_singular_values(w, (8, 8), 0.7, 1.1, backend="cpu")
    ref = C.clip_conv_singular_values(w, (8, 8), 0.7, 1.1, backend="reference")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@needs_conv_rows
def test_svb_operator_on_kernel_matches_reference():
    from torch import nn

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=2), nn.Linear(8, 5)).double()
    for p in model.parameters():
        p.data.mul_(3)
    ref = [p.detach().clone() for p in model.parameters()]
    ref_model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=2), nn.Linear(8, 5)).double()
    ref_model.load_state_dict(model.state_dict())
    assert S.svb_(model, 0.1, operator=True, input_size=8, backend="cpu") == 4
    assert S.svb_(ref_model, 0.1, operator=True, input_size=8, backend="reference") == 4
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert not torch.equal(model[0].weight, ref[0])  # the operator bound moved the kernel


@needs_conv_rows
def test_conv_singular_values_on_kernel_gradcheck():
    """The embedding doubles every singular value; a loss of S alone still has a finite,
    correct gradient (unused U, Vh gradients stay None in the op's backward)."""
    from regkernels.ops import conv as C

    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: C.conv_singular_values(w, (4, 3), backend="cpu"), (w,))


# ------------------------------------------------------------------------------ the Sedghi table entries

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-11)])
def test_sedghi_entry_values_equal_explicit_operator(dtype, tol):
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64) / 4
    T = RC.conv_to_matrix(w, (5, 6), padding=1, padding_mode="circular")
    truth = torch.linalg.svdvals(T).sort().values
    for strict in (False, True):
        sv = _C_ops.conv_singular_values(w.to(dtype), (5, 6), strict=strict)
        assert sv.dtype == dtype and sv.shape == (30, 5)
        torch.testing.assert_close(sv.double().flatten().sort().values, truth, atol=tol * truth.max(), rtol=0)


def test_sedghi_entries_match_reference_gradcheck_and_refuse_double_backward():
    w = torch.randn(8, 6, 3, 3, dtype=torch.float64) / 3
    ours = _C_ops.clip_conv_singular_values(w, (8, 8), 0.7, 1.1)
    ref = RC.clip_conv_singular_values(w, (8, 8), 0.7, 1.1)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: _C_ops.conv_singular_values(w, (4, 3)), (x,))
    assert torch.autograd.gradcheck(lambda w: _C_ops.clip_conv_singular_values(w, (4, 3), 0.5, 1.0)[0], (x,))
    for name, args in (("conv_singular_values", ((4, 3),)), ("clip_conv_singular_values", ((4, 3), 0.5, 1.0))):
        out = getattr(_C_ops, name)(x, *args)
        out = out if name == "conv_singular_values" else out[0]
        with pytest.raises(RuntimeError, match=rf"{name}: double backward \(create_graph=True\) is not supported by "
                                               rf"backend='cpu'; backend='reference' supports it"):
            torch.autograd.grad(out.sum(), x, create_graph=True)


def test_sedghi_entries_past_the_kernel_limit():
    """2·max(C_out, C_in) > 128 on CPU: strict (a named backend) refuses naming the op, the limit
    and the reference; otherwise the reference runs (the same values, differentiable twice)."""
    w = torch.randn(65, 3, 1, 1, dtype=torch.float64)
    for name, args in (("conv_singular_values", ((2, 2),)), ("clip_conv_singular_values", ((2, 2), 0.5, 1.0))):
        with pytest.raises(ValueError, match=rf"{name}: backend='cpu' .* 2·max\(C_out, C_in\) <= 128 on cpu "
                                             rf"tensors; got C_out=65, C_in=3; backend='reference' takes any size"):
            getattr(_C_ops, name)(w, *args, strict=True)
        got, want = getattr(_C_ops, name)(w, *args), getattr(RC, name)(w, *args)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


# ------------------------------------------------------------------------------ named backend past its range

def test_named_kernel_backend_refuses_matrices_past_its_limit():
    X = torch.randn(2, 130, 129)
    for call, name in ((lambda: S.batched_svd(X, backend="cpu"), "batched_svd"),
                       (lambda: S.clamp_singular_values(X, 0.5, 1.0, backend="cpu"), "clamp_singular_values")):
        with pytest.raises(ValueError, match=rf"{name}: backend='cpu' \(the Jacobi SVD kernel\) takes matrices with "
                                             r"min\(m, n\) <= 128 on cpu tensors; got X of shape \(2, 130, 129\); "
                                             r"backend='reference' or None takes any size"):
            call()
    # backend=None: the reference, exactly
    for a, b in zip(S.batched_svd(X), S.batched_svd(X, backend="reference")):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # only the long side past the limit: QR-reduced onto the kernel when named
    Y = torch.randn(2, 300, 128, dtype=torch.float64)
    _check(Y, S.batched_svd(Y, backend="cpu"), TOLS[torch.float64])


# ------------------------------------------------------------------------------ torch.func on the default backend

def _gauge_invariant(svd):
    """A loss of U, S, Vh that does not depend on the signs of the singular pairs."""
    def loss(X):
        U, Sv, Vh = svd(X)
        return ((U * Sv.sin()[..., None, :]) @ Vh).pow(2).sum() + Sv.pow(3).sum()
    return loss


@pytest.mark.parametrize("shape", [(3, 6, 5), (2, 4, 7), (2, 20, 90)])
def test_batched_svd_torch_func_grad_vjp_vmap(shape):
    X = torch.randn(shape, dtype=torch.float64)
    ours = _gauge_invariant(S.batched_svd)
    ref = _gauge_invariant(lambda Y: S.batched_svd(Y, backend="reference"))
    torch.testing.assert_close(torch.func.grad(ours)(X), torch.func.grad(ref)(X), atol=1e-9, rtol=1e-9)
    Sv, pullback = torch.func.vjp(lambda Y: S.batched_svd(Y)[1], X)
    Sr, pullback_ref = torch.func.vjp(lambda Y: S.batched_svd(Y, backend="reference")[1], X)
    g = torch.randn_like(Sv)
    torch.testing.assert_close(Sv, Sr, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(pullback(g)[0], pullback_ref(g)[0], atol=1e-10, rtol=1e-10)
    batched = torch.func.vmap(lambda Y: S.batched_svd(Y)[1])(X)
    torch.testing.assert_close(batched, torch.stack([S.batched_svd(x)[1] for x in X]), atol=1e-12, rtol=1e-12)
    # vmap of grad: per-sample gradients
    per_sample = torch.func.vmap(torch.func.grad(ours))(X)
    torch.testing.assert_close(per_sample, torch.stack([torch.func.grad(ref)(x) for x in X]), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", [None, "cpu", "reference"])
def test_clamp_torch_func_grad_vjp_vmap(backend):
    X = torch.randn(3, 6, 5, dtype=torch.float64)
    gY = torch.randn_like(X)

    def loss(Y):
        return (S.clamp_singular_values(Y, 0.7, 1.4, backend=backend) * gY).sum()

    Xg = X.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss(Xg), Xg)
    torch.testing.assert_close(torch.func.grad(loss)(X), want, atol=1e-10, rtol=1e-10)
    _, pullback = torch.func.vjp(lambda Y: S.clamp_singular_values(Y, 0.7, 1.4, backend=backend), X)
    torch.testing.assert_close(pullback(gY)[0], want, atol=1e-10, rtol=1e-10)
    batched = torch.func.vmap(lambda Y: S.clamp_singular_values(Y, 0.7, 1.4, backend=backend))(X)
    torch.testing.assert_close(batched, torch.stack([S.clamp_singular_values(x, 0.7, 1.4, backend=backend)
                                                     for x in X]), atol=1e-12, rtol=1e-12)
    per_sample = torch.func.vmap(torch.func.grad(lambda Y, G: (S.clamp_singular_values(Y, 0.7, 1.4, backend=backend)
                                                               * G).sum()))(X, gY)
    torch.testing.assert_close(per_sample, want, atol=1e-10, rtol=1e-10)


def test_clamp_torch_func_grad_is_finite_at_repeated_singular_values():
    """torch.func runs the backward with grad mode on; the first-order gradient at X = orthogonal
    (all σ equal) is still the finite divided-difference one, as with .backward()."""
    Q = _orthogonal(2, 6)
    gY = torch.randn_like(Q)
    for backend in (None, "reference"):
        g = torch.func.grad(lambda Y: (S.clamp_singular_values(Y, 0.5, 1.5, backend=backend) * gY).sum())(Q)
        torch.testing.assert_close(g, gY, atol=1e-10, rtol=1e-10)  # Y = X locally: the identity map


def test_sedghi_entries_torch_func_grad_and_vmap():
    """The conv family's default rows on CUDA: first-order torch.func.grad equals the reference's
    (the double-backward refusal is not applied to transformed tensors), vmap equals a loop."""
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    G = torch.randn(12, 2, dtype=torch.float64)
    for entry, ref in ((lambda w: (_C_ops.conv_singular_values(w, (4, 3)) * G).sum(),
                        lambda w: (RC.conv_singular_values(w, (4, 3)) * G).sum()),
                       (lambda w: _C_ops.clip_conv_singular_values(w, (4, 3), 0.5, 1.0)[0].pow(2).sum(),
                        lambda w: RC.clip_conv_singular_values(w, (4, 3), 0.5, 1.0)[0].pow(2).sum())):
        torch.testing.assert_close(torch.func.grad(entry)(w), torch.func.grad(ref)(w), atol=1e-12, rtol=1e-12)
    ws = torch.stack([w, 2 * w, -w])
    torch.testing.assert_close(torch.func.vmap(lambda w: _C_ops.conv_singular_values(w, (4, 3)))(ws),
                               torch.stack([RC.conv_singular_values(x, (4, 3)) for x in ws]), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(torch.func.vmap(lambda w: _C_ops.clip_conv_singular_values(w, (4, 3), 0.5, 1.0)[0])(ws),
                               torch.stack([RC.clip_conv_singular_values(x, (4, 3), 0.5, 1.0)[0] for x in ws]),
                               atol=1e-12, rtol=1e-12)
