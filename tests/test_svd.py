"""Tests of the batched-SVD family (docs/svd.md): batched_svd, clamp_singular_values, svb_."""
from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from regkernels.ops import svd as S
from regkernels.reference import svd as R

# (dtype, tol) for the docs/svd.md#batched_svd bounds: reconstruction relative to ‖X‖_F, orthogonality,
# and |S − S_float64| relative to S_max
SVD_TOLS = [(torch.float32, 1e-5), (torch.float64, 1e-12)]


def _orthogonal(*batch_and_n: int, dtype=torch.float64) -> torch.Tensor:
    """Random orthogonal matrices (..., n, n) from the QR of a Gaussian."""
    Q, Rf = torch.linalg.qr(torch.randn(*batch_and_n, batch_and_n[-1], dtype=torch.float64))
    return (Q * Rf.diagonal(dim1=-2, dim2=-1).sign()[..., None, :]).to(dtype)


def _matrices(kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Test matrices of one kind, generated in float64 and rounded to dtype."""
    g = torch.randn
    if kind == "random":
        X = g(5, 7, 4, dtype=torch.float64)
    elif kind == "odd-64":
        X = torch.cat([g(2, 64, 64, dtype=torch.float64)[..., :61, :], g(2, 61, 64, dtype=torch.float64)])
    elif kind == "rank-deficient":
        X = g(4, 9, 2, dtype=torch.float64) @ g(4, 2, 6, dtype=torch.float64)
    elif kind == "repeated":
        X = 3 * _orthogonal(4, 8)
    elif kind == "clustered":
        spread = 1 + 1e-7 * torch.arange(6, dtype=torch.float64)
        X = _orthogonal(3, 6) @ torch.diag_embed(spread.expand(3, 6)) @ _orthogonal(3, 6)
    elif kind == "1xn":
        X = g(3, 1, 9, dtype=torch.float64)
    elif kind == "nx1":
        X = g(3, 9, 1, dtype=torch.float64)
    elif kind == "zero":
        X = torch.zeros(2, 5, 3, dtype=torch.float64)
    elif kind == "tiny":
        X = 1e-20 * g(3, 6, 5, dtype=torch.float64)
    elif kind == "huge":
        X = 1e20 * g(3, 5, 6, dtype=torch.float64)
    elif kind == "leading-dims":
        X = g(2, 3, 4, 6, dtype=torch.float64)
    else:
        raise AssertionError(kind)
    return X.to(dtype)


def _check_svd(X: torch.Tensor, U: torch.Tensor, Sv: torch.Tensor, Vh: torch.Tensor, tol: float) -> None:
    """docs/svd.md#batched_svd contract; the measurements are made in float64 so 1e±20 cannot over/underflow."""
    *batch, m, n = X.shape
    k = min(m, n)
    assert U.shape == (*batch, m, k) and Sv.shape == (*batch, k) and Vh.shape == (*batch, k, n)
    assert U.dtype == Sv.dtype == Vh.dtype == X.dtype
    X64, U64, S64, Vh64 = (t.to(torch.float64) for t in (X, U, Sv, Vh))
    assert (S64 >= 0).all() and (S64[..., :-1] >= S64[..., 1:]).all()
    recon = torch.linalg.matrix_norm(X64 - U64 @ torch.diag_embed(S64) @ Vh64)
    assert (recon <= tol * torch.linalg.matrix_norm(X64)).all()
    eye = torch.eye(k, dtype=torch.float64)
    assert (U64.mT @ U64 - eye).abs().max() <= tol
    assert (Vh64 @ Vh64.mT - eye).abs().max() <= tol
    truth = torch.linalg.svdvals(X64)
    s_max = truth[..., :1] if k else truth
    assert ((S64 - truth).abs() <= tol * s_max).all()


# ------------------------------------------------------------------------------ batched_svd

@pytest.mark.parametrize("dtype,tol", SVD_TOLS)
@pytest.mark.parametrize("kind", ["random", "odd-64", "rank-deficient", "repeated", "clustered", "1xn", "nx1",
                                  "zero", "tiny", "huge", "leading-dims"])
def test_batched_svd_contract(kind, dtype, tol):
    X = _matrices(kind, dtype)
    before = X.clone()
    _check_svd(X, *S.batched_svd(X), tol)
    assert torch.equal(X, before)


@pytest.mark.parametrize("dtype,tol", SVD_TOLS)
def test_batched_svd_non_contiguous_and_expanded(dtype, tol):
    base = torch.randn(3, 8, 10, dtype=dtype)
    for X in (base.mT, base[:, ::2, 1:], base[:1].expand(4, 8, 10)):
        assert not X.is_contiguous()
        _check_svd(X, *S.batched_svd(X), tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batched_svd_low_precision_returns_input_dtype(dtype):
    X = torch.randn(4, 6, 5).to(dtype)
    U, Sv, Vh = S.batched_svd(X)
    assert U.dtype == Sv.dtype == Vh.dtype == dtype
    # the decomposition itself is float32's; only the final rounding to dtype differs
    U32, S32, Vh32 = torch.linalg.svd(X.float(), full_matrices=False)
    assert torch.equal(Sv, S32.to(dtype))
    tol = 2 * torch.finfo(dtype).eps
    recon = U.float() @ torch.diag_embed(Sv.float()) @ Vh.float()
    assert (X.float() - recon).abs().max() <= 8 * tol * X.float().abs().max()


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 3), (2, 3, 0), (0, 5, 5)])
def test_batched_svd_empty(shape):
    U, Sv, Vh = S.batched_svd(torch.empty(shape))
    *b, m, n = shape
    k = min(m, n)
    assert U.shape == (*b, m, k) and Sv.shape == (*b, k) and Vh.shape == (*b, k, n)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_batched_svd_non_finite_poisons_only_its_matrix(bad):
    X = torch.randn(3, 5, 4, dtype=torch.float64)
    Y = X.clone()
    Y[1, 2, 3] = bad
    U, Sv, Vh = S.batched_svd(Y)
    assert Sv[1].isnan().all() and U[1].isnan().all() and Vh[1].isnan().all()
    keep = torch.tensor([0, 2])
    _check_svd(X[keep], U[keep], Sv[keep], Vh[keep], 1e-12)


def test_batched_svd_is_differentiable():
    X = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda X: S.batched_svd(X)[1], (X,))


def test_batched_svd_compiles_fullgraph():
    X = torch.randn(4, 7, 5)
    U, Sv, Vh = torch.compile(S.batched_svd, fullgraph=True)(X)
    _check_svd(X, U, Sv, Vh, 1e-5)


# ------------------------------------------------------------------------------ clamp_singular_values

def _clamp_via_eigh(X: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Independent float64 formula for full-rank X (m ≥ n): ``X V diag(clamp(σ)/σ) Vᵀ`` where
    ``XᵀX = V diag(σ²) Vᵀ`` (eigh, no SVD); wide X goes through its transpose."""
    if X.shape[-2] < X.shape[-1]:
        return _clamp_via_eigh(X.mT, lo, hi).mT
    lam, V = torch.linalg.eigh(X.mT @ X)
    sigma = lam.clamp_min(0).sqrt()
    return X @ (V * (sigma.clamp(lo, hi) / sigma)[..., None, :]) @ V.mT


SHAPES = [(4, 4), (6, 4), (3, 5), (2, 3, 5, 5)]


def _well_conditioned(shape: tuple[int, ...]) -> torch.Tensor:
    """``Q₁ diag(s) Q₂`` with s uniform in [0.3, 2.5]: the eigh formula squares the condition
    number, so the comparison is kept where both sides are accurate to ~1e-14."""
    *b, m, n = shape
    k = min(m, n)
    s = 0.3 + 2.2 * torch.rand(*b, k, dtype=torch.float64)
    return (_orthogonal(*b, m)[..., :k] * s[..., None, :]) @ _orthogonal(*b, n)[..., :k, :]


@pytest.mark.parametrize("shape", SHAPES)
def test_clamp_forward_matches_eigh_formula(shape):
    X = _well_conditioned(shape)
    lo, hi = 0.8, 1.6
    before = X.clone()
    Y = S.clamp_singular_values(X, lo, hi)
    torch.testing.assert_close(Y, _clamp_via_eigh(X, lo, hi), atol=1e-12, rtol=1e-10)
    assert torch.equal(X, before)
    Y32 = S.clamp_singular_values(X.float(), lo, hi)
    assert Y32.dtype == torch.float32
    torch.testing.assert_close(Y32.double(), Y, atol=1e-5, rtol=1e-5)


def test_clamp_forward_is_u_clamp_s_vh_and_low_precision():
    X = torch.randn(3, 6, 4)
    U, Sv, Vh = torch.linalg.svd(X, full_matrices=False)
    torch.testing.assert_close(S.clamp_singular_values(X, 0.5, 1.0), U @ torch.diag_embed(Sv.clamp(0.5, 1.0)) @ Vh)
    torch.testing.assert_close(S.clamp_singular_values(X.mT, 0.5, 1.0), (U @ torch.diag_embed(Sv.clamp(0.5, 1.0)) @ Vh).mT)
    for dtype in (torch.float16, torch.bfloat16):
        Yh = S.clamp_singular_values(X.to(dtype), 0.5, 1.0)
        assert Yh.dtype == dtype
        torch.testing.assert_close(Yh.float(), R.clamp_singular_values(X.to(dtype).float(), 0.5, 1.0).to(dtype).float())


def _generic_bounds(X: torch.Tensor) -> tuple[float, float]:
    """lo, hi half-way between singular values, so every σ is distinct and away from a kink."""
    s = torch.linalg.svdvals(X).flatten().sort().values
    a = max(1, s.numel() // 3)
    b = s.numel() - a
    return float(s[a - 1:a + 1].mean()), float(s[b - 1:b + 1].mean())


@pytest.mark.parametrize("shape", SHAPES)
def test_clamp_gradcheck_generic(shape):
    X = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    lo, hi = _generic_bounds(X.detach())
    s = torch.linalg.svdvals(X.detach())
    assert ((s - lo).abs().min() > 1e-3) and ((s - hi).abs().min() > 1e-3)
    assert gradcheck(lambda X: S.clamp_singular_values(X, lo, hi), (X,))


@pytest.mark.parametrize("shape", SHAPES)
def test_clamp_gradient_matches_autograd_through_torch_svd(shape):
    """At distinct singular values torch.linalg.svd's backward is valid: same gradient."""
    X = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    lo, hi = _generic_bounds(X.detach())
    gY = torch.randn(shape, dtype=torch.float64)
    U, Sv, Vh = torch.linalg.svd(X, full_matrices=False)
    (g_torch,) = torch.autograd.grad(((U * Sv.clamp(lo, hi)[..., None, :]) @ Vh * gY).sum(), X)
    (g_ours,) = torch.autograd.grad((S.clamp_singular_values(X, lo, hi) * gY).sum(), X)
    torch.testing.assert_close(g_ours, g_torch, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4)])
def test_clamp_gradient_at_the_kinks_follows_torch_clamp(shape):
    """lo = σ_min and hi = σ_max exactly: kinks count as outside, as torch.clamp's backward.

    Pinned to the reference: "exactly" means LAPACK's σ to the last bit, and the kernel's σ
    differ from LAPACK's in the last bits (the backward code is the same for both)."""
    X = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    U, Sv, Vh = torch.linalg.svd(X, full_matrices=False)
    lo, hi = float(Sv[-1].detach()), float(Sv[0].detach())
    gY = torch.randn(shape, dtype=torch.float64)
    (g_torch,) = torch.autograd.grad(((U * Sv.clamp(lo, hi)[..., None, :]) @ Vh * gY).sum(), X)
    (g_ours,) = torch.autograd.grad((S.clamp_singular_values(X, lo, hi, backend="reference") * gY).sum(), X)
    torch.testing.assert_close(g_ours, g_torch, atol=1e-10, rtol=1e-8)


def test_clamp_gradient_is_identity_for_rank_deficient_inside_a_band_from_zero():
    """lo = 0: f(σ) = σ on [0, hi), so Y = X near a rank-deficient X and ∂⟨gY, Y⟩/∂X = gY."""
    for X in (_matrices("rank-deficient", torch.float64), torch.zeros(2, 4, 6, dtype=torch.float64)):
        X.requires_grad_(True)
        gY = torch.randn(X.shape, dtype=torch.float64)
        (g,) = torch.autograd.grad((S.clamp_singular_values(X, 0.0, 1e3) * gY).sum(), X)
        torch.testing.assert_close(g, gY, atol=1e-10, rtol=1e-10)


def _repeated(name: str) -> torch.Tensor:
    """float64 matrices whose singular values are all equal."""
    if name == "orthogonal":
        return _orthogonal(2, 5)
    if name == "identity":
        return torch.eye(5, dtype=torch.float64).expand(2, 5, 5).clone()
    if name == "tall-orthonormal":
        return _orthogonal(2, 6)[..., :4]
    return _orthogonal(2, 6)[..., :3, :]  # wide, orthonormal rows


REPEATED = [("orthogonal", 1.3), ("identity", 1.0), ("tall-orthonormal", 2.5), ("wide-orthonormal", 0.4)]
# (lo, hi): σ = c strictly inside, above hi, below lo
BANDS = {"inside": lambda c: (0.5 * c, 2.0 * c), "above": lambda c: (0.2 * c, 0.6 * c),
         "below": lambda c: (1.5 * c, 3.0 * c)}


@pytest.mark.parametrize("where", list(BANDS))
@pytest.mark.parametrize("name,c", REPEATED)
def test_clamp_gradient_at_repeated_singular_values_matches_finite_differences(name, c, where):
    X = c * _repeated(name)
    lo, hi = BANDS[where](c)
    gY = torch.randn_like(X)
    Xr = X.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((S.clamp_singular_values(Xr, lo, hi) * gY).sum(), Xr)
    assert torch.isfinite(grad).all()
    # central differences of the SVD-free forward along random directions
    h = 1e-6
    for _ in range(3):
        E = torch.randn_like(X)
        fd = ((_clamp_via_eigh(X + h * E, lo, hi) - _clamp_via_eigh(X - h * E, lo, hi)) * gY).sum() / (2 * h)
        assert abs(float(fd) - float((grad * E).sum())) <= 1e-6 * (1 + abs(float(fd)))


def test_torch_svd_backward_is_not_finite_at_repeated_singular_values():
    """The motivation for the divided-difference backward (docs/svd.md#clamp_singular_values)."""
    X = (1.3 * _orthogonal(5)).requires_grad_(True)
    U, Sv, Vh = torch.linalg.svd(X, full_matrices=False)
    Y = (U * Sv.clamp(0.2, 0.6)[..., None, :]) @ Vh
    (g,) = torch.autograd.grad((Y * torch.randn(5, 5, dtype=torch.float64)).sum(), X)
    if torch.isfinite(g).all():
        pytest.skip("this torch's svd backward is finite at repeated singular values")
    assert not torch.isfinite(g).all()


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (0.5, 1.0)])
def test_clamp_gradient_finite_for_rank_deficient_and_zero(lo, hi):
    X = torch.cat([_matrices("rank-deficient", torch.float64)[:, :5, :5], torch.zeros(1, 5, 5, dtype=torch.float64)])
    X.requires_grad_(True)
    gY = torch.randn(X.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad((S.clamp_singular_values(X, lo, hi) * gY).sum(), X)
    assert torch.isfinite(g).all()


def test_clamp_empty_and_low_precision_backward():
    E = torch.empty(0, 4, 3, requires_grad=True)
    Y = S.clamp_singular_values(E, 0.5, 1.0)
    assert Y.shape == (0, 4, 3)
    Y.sum().backward()
    assert E.grad.shape == (0, 4, 3)
    Xh = torch.randn(2, 4, 4).half().requires_grad_(True)
    S.clamp_singular_values(Xh, 0.5, 1.0).float().sum().backward()
    assert Xh.grad.dtype == torch.float16 and torch.isfinite(Xh.grad).all()


def test_clamp_compiles_fullgraph_forward_and_backward():
    X = torch.randn(3, 6, 4, dtype=torch.float64)
    Xc, Xe = X.clone().requires_grad_(True), X.clone().requires_grad_(True)
    fn = torch.compile(lambda X: S.clamp_singular_values(X, 0.7, 1.4), fullgraph=True)
    fn(Xc).sum().backward()
    S.clamp_singular_values(Xe, 0.7, 1.4).sum().backward()
    torch.testing.assert_close(Xc.grad, Xe.grad)


# ------------------------------------------------------------------------------ svb_

def _per_group_matrices(weight: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """as_matrix (docs/gram.md#as_matrix) spelled independently: group g's filters flattened, rows = filters."""
    return [block.reshape(block.shape[0], -1) for block in weight.chunk(groups, dim=0)]


def _svals_per_matrix(module: nn.Module) -> list[torch.Tensor]:
    return [torch.linalg.svdvals(mat.double()) for mod in module.modules() if isinstance(mod, R.SVB_LAYERS)
            for mat in _per_group_matrices(mod.weight.detach(), getattr(mod, "groups", 1))]


def _model() -> nn.Sequential:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 6, 1), nn.Conv1d(4, 6, 3),
                          nn.Conv3d(2, 4, 2), nn.Linear(24, 10), nn.Linear(10, 24), nn.Linear(24, 10))
    for p in model.parameters():
        p.data.mul_(3.0)  # singular values well outside the band
    return model


def test_svb_bounds_every_matrix_and_counts():
    model = _model()
    biases = [m.bias.detach().clone() for m in model]
    eps = 0.1
    n = S.svb_(model, eps)
    assert n == 1 + 2 + 1 + 1 + 1 + 3  # the grouped conv counts once per group
    for s in _svals_per_matrix(model):
        assert (s >= 1 / (1 + eps) - 1e-4).all() and (s <= 1 + eps + 1e-4).all()
    for m, b in zip(model, biases):
        assert torch.equal(m.bias, b)


def test_svb_keeps_matrices_inside_the_band_bit_for_bit():
    lin_in, lin_out = nn.Linear(12, 8), nn.Linear(12, 8)
    nn.init.orthogonal_(lin_in.weight)
    lin_out.weight.data.mul_(5)
    model = nn.Sequential(lin_in, lin_out)  # same shape: one batched call holds both
    kept = lin_in.weight.detach().clone()
    S.svb_(model, 0.05)
    assert torch.equal(lin_in.weight, kept)
    assert not torch.allclose(lin_out.weight, 5 * kept)
    again = lin_out.weight.detach().clone()
    S.svb_(model, 0.05)  # a projection is idempotent: nothing moves any more
    assert torch.equal(lin_out.weight, again)


def test_svb_one_batched_call_per_matrix_shape_dtype_device(monkeypatch):
    calls = []
    real = R.batched_svd

    def counting(X):
        calls.append(tuple(X.shape))
        return real(X)

    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(8, 16),
                          nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(16, 8).double())
    for p in model.parameters():
        p.data.mul_(4)
    monkeypatch.setattr(R, "batched_svd", counting)
    assert R.svb_(model, 0.1) == 7
    # groups: (8x16, f32) ×3, (16x8, f32), (8x72, f32) ×2, (8x16, f64)
    assert sorted(calls) == sorted([(3, 8, 16), (1, 16, 8), (2, 8, 72), (1, 8, 16)])
    calls.clear()
    monkeypatch.setattr(S, "svd_function", lambda device, backend=None, dtype=None, name=None: counting)
    assert S.svb_(model, 0.1) == 7
    assert len(calls) == 4


def test_svb_runs_without_autograd_on_parameters():
    model = _model()
    with torch.enable_grad():
        S.svb_(model, 0.2)
    for p in model.parameters():
        assert p.requires_grad and p.grad is None and p.grad_fn is None and p.is_leaf


def test_svb_tensor_inputs_low_precision_and_ties():
    w_list = [torch.randn(6, 9) * 3, torch.randn(6, 3, 3) * 3]
    assert S.svb_(iter(w_list), 0.1) == 2  # a one-shot iterator works too
    for w in w_list:
        s = torch.linalg.svdvals(w.reshape(6, -1))
        assert (s >= 1 / 1.1 - 1e-5).all() and (s <= 1.1 + 1e-5).all()
    single = torch.randn(5, 7, dtype=torch.float64) * 3
    assert S.svb_(single, 0.5) == 1
    assert torch.linalg.svdvals(single).max() <= 1.5 + 1e-12
    half = torch.randn(8, 8).half() * 3
    S.svb_([half], 0.1)
    s = torch.linalg.svdvals(half.float())
    assert half.dtype == torch.float16 and (s >= 1 / 1.1 - 1e-2).all() and (s <= 1.1 + 1e-2).all()
    shared = nn.Linear(4, 4)
    tied = nn.Sequential(shared, shared)
    assert S.svb_(tied, 0.1) == 1
    assert S.svb_([], 0.1) == 0 and S.svb_(nn.ReLU(), 0.1) == 0


def test_svb_operator_branch_plumbing(monkeypatch):
    """The operator branch hands each conv group to conv.clip_conv_singular_values (docs/conv.md#conv_singular_values)
    and bounds Linear weights as matrices; a stand-in conv module records the calls."""
    seen = []

    def fake_clip(weight, input_size, lo, hi, backend=None):
        seen.append((tuple(weight.shape), input_size, lo, hi))
        return torch.full_like(weight, 0.25), None

    monkeypatch.setattr(S._conv, "clip_conv_singular_values", fake_clip)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Linear(5, 5))
    model[1].weight.data.mul_(5)
    assert S.svb_(model, 0.1, operator=True, input_size=(8, 8)) == 3
    assert seen == [((3, 2, 3, 3), (8, 8), 1 / 1.1, 1.1)] * 2
    assert torch.equal(model[0].weight, torch.full_like(model[0].weight, 0.25))
    assert torch.linalg.svdvals(model[1].weight.detach()).max() <= 1.1 + 1e-5
    seen.clear()
    S.svb_(model, 0.1, operator=True, input_size={model[0].weight: [5, 7]})
    assert [s[1] for s in seen] == [(5, 7)] * 2
    seen.clear()
    S.svb_(model, 0.1, operator=True, input_size=6)
    assert [s[1] for s in seen] == [(6, 6)] * 2


def test_svb_operator_branch_with_conv_family():
    conv = pytest.importorskip("regkernels.reference.conv")
    if not hasattr(conv, "clip_conv_singular_values") or not hasattr(conv, "conv_singular_values"):
        pytest.skip("regkernels.reference.conv has no clip_conv_singular_values yet")
    layer = nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular")
    layer.weight.data.mul_(4)
    before = conv.conv_singular_values(layer.weight.detach(), (8, 8)).max()
    assert S.svb_(layer, 0.1, operator=True, input_size=(8, 8)) == 1
    after = conv.conv_singular_values(layer.weight.detach(), (8, 8)).max()
    assert after < before  # truncation to the kernel support makes the bound approximate


def test_svb_operator_needs_input_size_and_changes_nothing():
    model = nn.Sequential(nn.Linear(5, 5), nn.Conv2d(2, 2, 3))
    model[0].weight.data.mul_(5)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="svb_: operator=True needs input_size="):
        S.svb_(model, 0.1, operator=True)
    with pytest.raises(ValueError, match="input_size has no entry"):
        S.svb_(model, 0.1, operator=True, input_size={})
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("call,exc,match", [
    (lambda: S.batched_svd(torch.randn(4)), ValueError, r"batched_svd: X must have at least 2 dims \(\.\.\., m, n\)"),
    (lambda: S.batched_svd(torch.ones(3, 3, dtype=torch.int64)), TypeError,
     "batched_svd: X must have a floating dtype"),
    (lambda: S.batched_svd([[1.0, 2.0]]), TypeError, "batched_svd: X must be a torch.Tensor"),
    (lambda: S.batched_svd(torch.randn(3, 3), backend="cuda"), ValueError,
     "batched_svd: no 'cuda' backend for cpu tensors; backends that take cpu fp32 inputs here: "
     "'cpu', 'reference'"),
    (lambda: S.batched_svd(torch.randn(3, 3), backend="fast"), ValueError, "batched_svd: backend must be None or one of"),
    (lambda: S.batched_svd(torch.randn(3, 3), backend="torch"), ValueError, "batched_svd: no 'torch'"),
    (lambda: S.batched_svd(torch.randn(3, 3), "reference"), TypeError, "positional argument"),
    (lambda: S.clamp_singular_values(torch.randn(3, 3), 0.5, 1.0, "cpu"), TypeError, "positional argument"),
    (lambda: S.svb_(nn.Linear(3, 3), 0.1, False, None, "cpu"), TypeError, "positional argument"),
    (lambda: S.clamp_singular_values(torch.randn(3), 0.5, 1), ValueError,
     "clamp_singular_values: X must have at least 2 dims"),
    (lambda: S.clamp_singular_values(torch.ones(3, 3, dtype=torch.int32), 0.5, 1), TypeError, "floating dtype"),
    (lambda: S.clamp_singular_values(torch.randn(3, 3), -0.1, 1), ValueError, "clamp_singular_values: lo must be >= 0"),
    (lambda: S.clamp_singular_values(torch.randn(3, 3), 2.0, 1.0), ValueError, "clamp_singular_values: need lo <= hi"),
    (lambda: S.clamp_singular_values(torch.randn(3, 3), torch.tensor(0.5), 1.0), TypeError, "lo must be a real number"),
    (lambda: S.clamp_singular_values(torch.randn(3, 3), 0.5, 1.0, backend="triton"), ValueError,
     "clamp_singular_values: no 'triton' backend for cpu tensors; backends that take "
     "cpu fp32 inputs here: 'cpu', 'reference'"),
    (lambda: S.svb_(nn.Linear(3, 3), 0.0), ValueError, r"svb_: eps must be > 0"),
    (lambda: S.svb_(nn.Linear(3, 3), -1), ValueError, r"svb_: eps must be > 0"),
    (lambda: S.svb_(nn.Linear(3, 3), "0.1"), TypeError, "svb_: eps must be a real number"),
    (lambda: S.svb_(3, 0.1), TypeError, "svb_: weights_or_module must be an nn.Module, a weight tensor or an iterable"),
    (lambda: S.svb_("weights", 0.1), TypeError, "svb_: weights_or_module must be an nn.Module"),
    (lambda: S.svb_([torch.randn(3, 3), 5], 0.1), TypeError, r"svb_: weights_or_module\[1\] must be a torch.Tensor"),
    (lambda: S.svb_([torch.randn(3)], 0.1), ValueError,
     r"weights_or_module\[0\] must have at least 2 dims \(out, in\)"),
    (lambda: S.svb_([torch.ones(3, 3, dtype=torch.int64)], 0.1), TypeError, "floating dtype"),
    (lambda: S.svb_(nn.Linear(3, 3), 0.1, operator="yes"), TypeError, "svb_: operator must be a bool"),
    (lambda: S.svb_(nn.Conv2d(2, 2, 3), 0.1, operator=True, input_size="8x8"), TypeError,
     "svb_: input_size must be None, an int, a tuple of ints"),
    (lambda: S.svb_(nn.Conv2d(2, 2, 3), 0.1, operator=True, input_size=(8.0, 8)), TypeError,
     "svb_: input_size must be"),
    (lambda: S.svb_(nn.Linear(3, 3), 0.1, backend="cuda"), ValueError,
     "svb_: no 'cuda' backend for cpu tensors; backends that take cpu fp32 inputs here: 'cpu', "
     "'reference'"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_failed_validation_leaves_weights_unchanged():
    lin = nn.Linear(4, 4)
    lin.weight.data.mul_(5)
    before = lin.weight.detach().clone()
    with pytest.raises(ValueError):
        S.svb_(lin, 0.1, backend="cuda")
    assert torch.equal(lin.weight, before)
