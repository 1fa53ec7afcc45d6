"""No silent wrong results in the SVD family, BetaLasso and the nn layer (docs/svd.md, docs/beta_lasso.md, docs/nn.md, docs/index.md).

Each test is named after the behaviour it pins down and runs on every backend CI has for the
op: the reference, the C++ CPU kernel ("cpu"), the interpreted Triton kernel where the op has
one. Oracles: float64 LAPACK on the clean matrices, the singular values of the layers'
effective weights, torch.autograd.gradgradcheck.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import regkernels
from regkernels import _ext
from regkernels.nn import AdversarialKernelRegularizer, Regularizer, SVBProjector, gabor_bank
from regkernels.optim import BetaLasso

needs_ext = pytest.mark.skipif(not _ext.HAS_C, reason="compiled extension not built")
SVD_BACKENDS = ["reference", pytest.param("cpu", marks=needs_ext)]
OPT_BACKENDS = ["reference", pytest.param("cpu", marks=needs_ext)]
D64 = torch.float64


# ------------------------------------------------------------------ SVD: double backward

@pytest.mark.parametrize("backend", SVD_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 3, 5), (2, 4, 4), (1, 1, 1)])
@pytest.mark.parametrize("lo, hi", [(0.5, 1.5), (0.0, 1.0), (0.8, 0.9)])
def test_clamp_singular_values_double_backward_passes_gradgradcheck(backend, shape, lo, hi):
    X = torch.randn(shape, dtype=D64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda A: regkernels.clamp_singular_values(A, lo, hi, backend=backend), (X,))


@pytest.mark.parametrize("backend", SVD_BACKENDS)
@pytest.mark.parametrize("X", [torch.eye(3, dtype=D64), torch.zeros(2, 4, 3, dtype=D64)], ids=["repeated", "zero"])
def test_clamp_singular_values_double_backward_refused_at_repeated_or_zero_singular_values(backend, X):
    X = X.clone().requires_grad_()
    Y = regkernels.clamp_singular_values(X, 0.5, 1.5, backend=backend)
    g, = torch.autograd.grad(Y.square().sum(), X)  # the first-order gradient is fine there
    assert torch.isfinite(g).all()
    Y = regkernels.clamp_singular_values(X, 0.5, 1.5, backend=backend)
    with pytest.raises(RuntimeError, match=r"clamp_singular_values: double backward \(create_graph=True\) .* "
                                           r"repeated or zero singular values"):
        torch.autograd.grad(Y.square().sum(), X, create_graph=True)


@pytest.mark.parametrize("backend", SVD_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 3, 5), (2, 4, 4)])
def test_batched_svd_double_backward_passes_gradgradcheck(backend, shape):
    X = torch.randn(shape, dtype=D64, requires_grad=True)

    def f(A):  # functions of the SVD that do not depend on the singular vectors' signs
        U, S, Vh = regkernels.batched_svd(A, backend=backend)
        return S, U @ U.mT, Vh.mT @ Vh, (U * S[..., None, :] ** 2) @ Vh

    assert torch.autograd.gradgradcheck(f, (X,))


# ------------------------------------------------------------------ SVD: NaN per matrix

@pytest.mark.parametrize("backend", SVD_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("shape", [(3, 5, 4), (3, 4, 140), (3, 140, 4)], ids=["kernel", "qr_wide", "qr_tall"])
def test_clamp_singular_values_nan_matrix_is_nan_only_there_forward_and_gradient(backend, bad, shape):
    # 140 > the kernel's 128: the long side is QR-reduced first (ops.svd._kernel_svd)
    X = torch.randn(shape, dtype=D64)
    Xb = X.clone()
    Xb[1, 2, 3] = bad
    Xb.requires_grad_()
    Y = regkernels.clamp_singular_values(Xb, 0.5, 1.5, backend=backend)
    G = torch.randn_like(Y)
    g, = torch.autograd.grad(Y, Xb, G)
    assert Y[1].isnan().all() and g[1].isnan().all()
    keep = torch.tensor([0, 2])
    Xk = X[keep].clone().requires_grad_()
    Yk = regkernels.clamp_singular_values(Xk, 0.5, 1.5, backend=backend)
    gk, = torch.autograd.grad(Yk, Xk, G[keep])
    torch.testing.assert_close(Y[keep], Yk, rtol=0, atol=1e-12)
    torch.testing.assert_close(g[keep], gk, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_frame_and_gershgorin_bounds_nan_matrix_is_nan_only_there(bad):
    X = torch.randn(3, 5, 4, dtype=D64)
    Xb = X.clone()
    Xb[1, 0, 0] = bad
    lo, hi = regkernels.frame_bounds(Xb)  # LAPACK alone raises for the whole batch on a NaN
    s = torch.linalg.svdvals(X)
    assert lo[1].isnan() and hi[1].isnan()
    torch.testing.assert_close(lo[[0, 2]], s[[0, 2], -1] ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(hi[[0, 2]], s[[0, 2], 0] ** 2, rtol=1e-12, atol=0)
    glo, ghi = regkernels.gershgorin_bounds(Xb)
    clean_lo, clean_hi = regkernels.gershgorin_bounds(X)
    assert glo[1].isnan() and (ghi[1].isnan() if bad != bad else ghi[1] == float("inf"))
    assert torch.equal(glo[[0, 2]], clean_lo[[0, 2]]) and torch.equal(ghi[[0, 2]], clean_hi[[0, 2]])


def test_frame_bounds_gradient_of_nan_matrix_is_nan_only_there():
    X = torch.randn(3, 4, 4, dtype=D64)
    X[1, 1, 1] = float("nan")
    X.requires_grad_()
    lo, hi = regkernels.frame_bounds(X)
    g, = torch.autograd.grad((lo + hi).nansum(), X)
    assert torch.isfinite(g[[0, 2]]).all()


def _nan_model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 6)).double()
    with torch.no_grad():
        model[0].weight[1, 0, 0, 0] = float("nan")
    return model


@pytest.mark.parametrize("kind, kw", [("frame", dict(A=0.5, B=2.0)), ("conv_frame", dict(A=0.5, B=2.0)),
                                      ("ocnn", {}), ("orthogonality", {})])
def test_regularizer_stats_nan_layer_is_nan_only_there(kind, kw):
    model = _nan_model()
    reg = Regularizer(model, kind, **kw)
    model(torch.randn(1, 2, 5, 5, dtype=D64))
    stats = reg.stats()  # a logging call: never raises because one layer diverged
    assert all(v != v for v in stats["0"].values())
    s = torch.linalg.svdvals(model[2].weight.detach())
    assert stats["2"]["sigma_min"] == pytest.approx(float(s.min()), rel=1e-12)
    assert stats["2"]["sigma_max"] == pytest.approx(float(s.max()), rel=1e-12)


# ------------------------------------------------------------------ svb_ through parametrizations

class _Double(nn.Module):
    """W = 2·X, with right_inverse X = W / 2."""

    def forward(self, X):
        return 2 * X

    def right_inverse(self, W):
        return W / 2


class _DoubleNoInverse(nn.Module):
    def forward(self, X):
        return 2 * X


class _Symmetric(nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).mT

    def right_inverse(self, W):
        return W.triu()


def _effective_svals(layer: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return torch.linalg.svdvals(regkernels.as_matrix(layer.weight.detach(), getattr(layer, "groups", 1)))


def _input_for(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(2, layer.in_features)
    return torch.randn(2, layer.in_channels, 6, 6)


PARAMETRIZED = {
    "weight_norm": lambda: parametrizations.weight_norm(nn.Linear(7, 5)),
    "weight_norm_conv": lambda: parametrizations.weight_norm(nn.Conv2d(3, 4, 3)),
    "custom_with_right_inverse": lambda: parametrize.register_parametrization(nn.Linear(7, 5), "weight", _Double()),
    "symmetric": lambda: parametrize.register_parametrization(nn.Linear(5, 5), "weight", _Symmetric()),
    "hook_weight_norm": lambda: torch.nn.utils.weight_norm(nn.Linear(7, 5)),
    "hook_weight_norm_conv_dim_none": lambda: torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3), dim=None),
}


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated:FutureWarning")
@pytest.mark.parametrize("backend", SVD_BACKENDS)
@pytest.mark.parametrize("make", list(PARAMETRIZED.values()), ids=list(PARAMETRIZED))
def test_svb_bounds_the_effective_weight_of_parametrized_layers(backend, make):
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(3)  # singular values well outside the band
    layer(_input_for(layer))  # a forward recomputes hook-based weights
    assert _effective_svals(layer).max() > 1.5
    eps = 0.1
    assert regkernels.svb_(layer, eps, backend=backend) == 1
    layer(_input_for(layer))  # a forward recomputes hook-based weights
    s = _effective_svals(layer)
    assert (s >= 1 / (1 + eps) - 1e-5).all() and (s <= 1 + eps + 1e-5).all()


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated:FutureWarning")
def test_svb_projector_bounds_a_model_with_parametrized_layers():
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.Flatten(),
                          torch.nn.utils.weight_norm(nn.Linear(64, 5)))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    proj = SVBProjector(model, 0.05)
    assert proj.step() == 2
    model(torch.randn(1, 3, 6, 6))
    for layer in (model[0], model[2]):
        s = _effective_svals(layer)
        assert (s >= 1 / 1.05 - 1e-5).all() and (s <= 1.05 + 1e-5).all()


def test_svb_leaves_an_orthogonal_parametrization_inside_the_band_alone():
    layer = parametrizations.orthogonal(nn.Linear(7, 5))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert regkernels.svb_(layer, 0.05) == 1
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def _unchanged(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before))


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated:FutureWarning")
@pytest.mark.parametrize("make, exc, match", [
    (lambda: parametrize.register_parametrization(nn.Linear(6, 5), "weight", _DoubleNoInverse()), ValueError,
     r"svb_: cannot bound the weight of layer '1': its weight parametrization _DoubleNoInverse has no right_inverse"),
    (lambda: torch.nn.utils.spectral_norm(nn.Linear(6, 5)), ValueError,
     r"svb_: cannot bound the weight of layer '1': torch.nn.utils.spectral_norm divides the weight"),
    (lambda: parametrizations.orthogonal(nn.Linear(6, 5)), RuntimeError,
     r"svb_: layer '1': its weight parametrization's right_inverse does not reproduce the bounded weight"),
], ids=["no_right_inverse", "spectral_norm", "orthogonal_scaled"])
def test_svb_refuses_a_parametrized_layer_it_cannot_write_naming_it_and_changes_nothing(make, exc, match):
    model = nn.Sequential(nn.Linear(6, 6), make())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # both layers outside the band: the plain first one would be bounded
    before = _params(model)
    with pytest.raises(exc, match=match):
        regkernels.svb_(model, 0.1)
    assert _unchanged(model, before)
    # SVBProjector refuses at construction what it could not project, the rest at its step
    with pytest.raises(exc, match=match.replace("svb_", "SVBProjector") if exc is ValueError else match):
        SVBProjector(model, 0.1).step()
    assert _unchanged(model, before)


def test_svb_refuses_a_computed_weight_tensor_passed_directly():
    layer = parametrizations.weight_norm(nn.Linear(6, 5))
    plain = torch.randn(5, 6) * 3
    kept = plain.clone()
    with pytest.raises(ValueError, match=r"svb_: cannot bound the weight of layer 'weights_or_module\[1\]': it is the "
                                         r"output of an operation"):
        regkernels.svb_([plain, layer.weight], 0.1)
    assert torch.equal(plain, kept)


def test_svb_over_a_list_is_atomic_when_a_later_weight_fails():
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    before = _params(model)
    # the 3x3 kernel fits a circular 4x4 input, the 5x5 one does not: found while computing
    with pytest.raises(ValueError, match="kernel .* must fit the circular input"):
        regkernels.svb_(model, 0.1, operator=True, input_size=4)
    assert _unchanged(model, before)
    weights = [torch.randn(4, 4) * 3, torch.randn(3, 3) * 3]
    kept = [w.clone() for w in weights]
    with pytest.raises(ValueError, match="input_size has no entry for the conv weight"):
        regkernels.svb_([weights[0], torch.randn(2, 2, 3, 3)], 0.1, operator=True, input_size={})
    assert all(torch.equal(w, k) for w, k in zip(weights, kept))


# ------------------------------------------------------------------ constructors validate

@pytest.mark.parametrize("eps, exc, match", [
    (float("inf"), ValueError, r"svb_: eps must be finite"),
    (float("nan"), ValueError, r"svb_: eps must be finite"),
    (True, TypeError, r"svb_: eps must be a real number .* not bool"),
])
def test_svb_refuses_non_finite_or_bool_eps(eps, exc, match):
    layer = nn.Linear(4, 4)
    kept = layer.weight.detach().clone()
    with pytest.raises(exc, match=match):
        regkernels.svb_(layer, eps)
    assert torch.equal(layer.weight, kept)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(eps=0), ValueError, r"SVBProjector: eps must be > 0"),
    (dict(eps=float("inf")), ValueError, r"SVBProjector: eps must be finite"),
    (dict(eps=True), TypeError, r"SVBProjector: eps must be a real number .* not bool"),
    (dict(eps=0.1, backend="gpu"), ValueError, r"SVBProjector: backend must be None or one of 'reference'"),
    (dict(eps=0.1, backend="cuda"), ValueError, r"SVBProjector: no 'cuda' backend for cpu tensors"),
    (dict(eps=0.1, backend="torch"), ValueError, r"SVBProjector: no 'torch' backend for cpu "
                                                 r"tensors; backends that take cpu fp32 inputs here: .*'reference'"),
    (dict(eps=0.1, operator=1), TypeError, r"SVBProjector: operator must be a bool; got 1"),
    (dict(eps=0.1, operator=True, input_size="x"), TypeError, r"SVBProjector: input_size must be None, an int"),
    (dict(eps=0.1, every=True), TypeError, r"SVBProjector: every must be an integer"),
])
def test_svb_projector_validates_in_the_constructor(kw, exc, match):
    with pytest.raises(exc, match=match):
        SVBProjector(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Linear(3, 3)), **kw)


@pytest.mark.parametrize("kind, kw, exc, match", [
    ("conv_frame", dict(A=2.0, B=1.0), ValueError, r"Regularizer: need A <= B; got A=2.0, B=1.0"),
    ("conv_frame", dict(A=0.0, B=float("inf")), ValueError, r"Regularizer: B must be finite"),
    ("conv_frame", dict(A=0.0, B=1.0, side="diag"), ValueError, r"Regularizer: side must be 'auto', 'rows' or 'cols'"),
    ("conv_frame", dict(A=0.0, B=1.0, input_sizes={"0": (2, 2)}), ValueError,
     r"Regularizer \(layer '0'\): the output size must be >= 1"),
    ("conv_frame", dict(A=0.0, B=1.0, input_sizes={"2": (5, 5)}), ValueError,
     r"Regularizer: input_sizes names '2', which is not a selected conv layer"),
    ("ocnn", dict(padding=-1), ValueError,
     r"Regularizer \(layer '0'\): padding must be an int or a sequence of 2 ints"),
    ("ocnn", dict(padding=True), TypeError, r"Regularizer \(layer '0'\): padding must be an int"),
    ("frame", dict(A=True, B=1.0), TypeError, r"Regularizer: A must be a real number .* not bool"),
    ("mhe", dict(eps=float("inf")), ValueError, r"Regularizer: eps must be finite"),
    ("frame", dict(A=0.0, B=1.0, backend="gpu"), ValueError, r"Regularizer: backend must be one of None"),
    ("frame", dict(A=0.0, B=1.0, input_sizes={"0": 5}), TypeError,
     r"Regularizer: input_sizes is for kind='conv_frame' only"),
])
def test_regularizer_validates_every_argument_in_the_constructor(kind, kw, exc, match):
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3, 3))
    with pytest.raises(exc, match=match):
        Regularizer(model, kind, **kw)


def test_regularizer_refuses_an_infinite_weight():
    with pytest.raises(ValueError, match=r"Regularizer: weight must be finite"):
        Regularizer(nn.Linear(3, 3), "frame", float("inf"), A=0.0, B=1.0)


# ------------------------------------------------------------------ Regularizer on half models

HALF_KINDS = [("frame", dict(A=0.5, B=2.0)), ("diversity", dict(tau=0.1)), ("orthogonality", {}), ("mhe", {}),
              ("srip", dict(generator=None)), ("conv_frame", dict(A=0.5, B=2.0)), ("ocnn", {})]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind, kw", HALF_KINDS, ids=[k for k, _ in HALF_KINDS])
@pytest.mark.parametrize("backend", ["reference", pytest.param(None, marks=needs_ext)])
def test_regularizer_value_of_a_half_precision_model_is_float32(dtype, kind, kw, backend):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20)  # Gram entries in the hundreds: penalties far above fp16's 65504
    half = copy.deepcopy(model).to(dtype)
    # the oracle: the same layers, the same (rounded) weights, in float64
    exact = copy.deepcopy(half).double()
    kw = dict(kw)
    if kind == "srip":
        kw["generator"] = torch.Generator().manual_seed(0)
    reg = Regularizer(half, kind, backend=backend, **kw)
    ref = Regularizer(exact, kind, backend="reference", **{**kw, **({"generator": torch.Generator().manual_seed(0)}
                                                                    if kind == "srip" else {})})
    half(torch.randn(1, 3, 4, 4, dtype=dtype))
    exact(torch.randn(1, 3, 4, 4, dtype=D64))
    value = reg()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    torch.testing.assert_close(value.double(), ref().detach(), rtol=1e-4, atol=1e-6)
    value.backward()
    assert all(m.weight.grad is not None and m.weight.grad.dtype == dtype for m in (half[0], half[2]))


def test_regularizer_value_of_a_half_precision_model_is_float32_triton():
    pytest.importorskip("triton")
    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(40)
    half = model.half()
    value = Regularizer(half, "orthogonality", backend="triton")()
    exact = Regularizer(copy.deepcopy(half).double(), "orthogonality", backend="reference")()
    assert value.dtype == torch.float32 and value.item() > 65504
    torch.testing.assert_close(value.double(), exact.detach(), rtol=1e-4, atol=0)


# ------------------------------------------------------------------ BetaLasso

def _param(shape=(8, 8), dtype=torch.float32):
    p = nn.Parameter(torch.randn(shape, dtype=dtype))
    p.grad = torch.randn(shape, dtype=dtype)
    return p


@pytest.mark.parametrize("backend", OPT_BACKENDS)
def test_beta_lasso_refuses_complex_parameters(backend):
    with pytest.raises(TypeError, match=r"BetaLasso: parameter 1 of param group 0 is complex \(torch.complex64\)"):
        BetaLasso([_param(), _param(dtype=torch.complex64)], lr=0.1, lam=0.1, beta=1.0, backend=backend)
    opt = BetaLasso([_param()], lr=0.1, lam=0.1, beta=1.0, backend=backend)
    with pytest.raises(TypeError, match=r"BetaLasso: parameter 0 of param group 1 is complex"):
        opt.add_param_group({"params": [_param(dtype=torch.complex128)]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", OPT_BACKENDS)
def test_beta_lasso_refuses_a_parameter_listed_twice(backend):
    p = _param()
    with pytest.raises(ValueError, match=r"BetaLasso: parameter 2 of param group 0 is the same tensor as parameter 0"):
        BetaLasso([p, _param(), p], lr=0.1, lam=0.1, beta=1.0, backend=backend)


@pytest.mark.parametrize("backend", [None, "reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("roundtrip", ["deepcopy", "pickle", "torch.save"])
def test_beta_lasso_steps_after_deepcopy_or_pickle_like_the_original(backend, roundtrip):
    params = [_param(), _param((5,))]
    opt = BetaLasso(params, lr=0.1, lam=0.3, beta=1.0, momentum=0.9, backend=backend)
    opt.step()
    if roundtrip == "deepcopy":
        twin_opt = copy.deepcopy(opt)
    elif roundtrip == "pickle":
        twin_opt = pickle.loads(pickle.dumps(opt))
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        twin_opt = torch.load(buf, weights_only=False)
    assert twin_opt.backend == backend
    twins = [p for g in twin_opt.param_groups for p in g["params"]]
    for p, t in zip(params, twins):
        t.grad = p.grad.clone()
    opt.step()
    twin_opt.step()
    for p, t in zip(params, twins):
        assert torch.equal(p, t)
    assert twin_opt.nonzeros() == opt.nonzeros() == [[int(torch.count_nonzero(p)) for p in params]]


@pytest.mark.parametrize("backend", [None, "reference"])
def test_beta_lasso_nonzeros_are_counted_under_torch_compile(backend):
    params = [_param(), _param((7,))]
    opt = BetaLasso(params, lr=0.1, lam=0.5, beta=1.0, backend=backend)
    before = [p.detach().clone() for p in params]
    torch.compile(opt.step)()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert opt.nonzeros() == [[int(torch.count_nonzero(p)) for p in params]]


@pytest.mark.parametrize("kw, exc, match", [
    (dict(lr=float("inf")), ValueError, r"BetaLasso: lr must be finite; got lr=inf"),
    (dict(lam=float("nan")), ValueError, r"BetaLasso: lam must be finite"),
    (dict(beta=True), TypeError, r"BetaLasso: beta must be a real number .* not bool"),
    (dict(momentum=torch.tensor(0.9)), TypeError, r"BetaLasso: momentum must be a real number .* not Tensor"),
    (dict(dampening=float("-inf")), ValueError, r"BetaLasso: dampening must be finite"),
    (dict(weight_decay=-1e-4), ValueError, r"BetaLasso: weight_decay must be >= 0"),
    (dict(momentum=0.9, nesterov=1), TypeError, r"BetaLasso: nesterov must be a bool; got 1"),
])
def test_beta_lasso_refuses_non_finite_or_bool_hyperparameters(kw, exc, match):
    cfg = dict(lr=0.1, lam=0.1, beta=1.0)
    cfg.update(kw)
    with pytest.raises(exc, match=match):
        BetaLasso([_param()], **cfg)
    with pytest.raises(exc, match=match):  # a param group's own value is checked as well
        BetaLasso([{"params": [_param()], **kw}], lr=0.1, lam=0.1, beta=1.0)


def test_beta_lasso_checks_group_values_changed_after_construction_at_step():
    p = _param()
    opt = BetaLasso([p], lr=0.1, lam=0.1, beta=1.0)
    opt.param_groups[0]["lr"] = float("nan")
    kept = p.detach().clone()
    with pytest.raises(ValueError, match=r"BetaLasso: lr must be finite; got lr=nan"):
        opt.step()
    assert torch.equal(p, kept)


# ------------------------------------------------------------------ raw ops check their inputs

def _raw_args(n=2, momentum=True):
    params = [torch.randn(6) for _ in range(n)]
    grads = [torch.randn(6) for _ in range(n)]
    bufs = [torch.randn(6) for _ in range(n)]
    hyper, flags = [], []
    for _ in range(n):
        h, f = regkernels.ops.beta_lasso.pack_hyper(0.1, 0.01, 1.0, 0.9 if momentum else 0.0, 0.0, 0.0, False, False)
        hyper += h
        flags += f
    return params, grads, bufs, hyper, flags


def _bad_raw(change):
    args = list(_raw_args())
    change(args)
    return args


@needs_ext
@pytest.mark.parametrize("change, match", [
    (lambda a: a[1].pop(), r"beta_lasso_step_: params, grads and bufs must have the same length; got 2, 1, 2"),
    (lambda a: a[2].pop(), r"params, grads and bufs must have the same length; got 2, 2, 1"),
    (lambda a: a[3].pop(), r"beta_lasso_step_: hyper must hold 6 values per tensor \(12\); got 11"),
    (lambda a: a[4].append(0), r"beta_lasso_step_: flags must hold 3 values per tensor \(6\); got 7"),
    (lambda a: a[1].__setitem__(1, torch.randn(5)), r"beta_lasso_step_: grads\[1\] must match params\[1\] in dtype, "
                                                     r"device and shape"),
    (lambda a: a[1].__setitem__(0, torch.randn(6, dtype=D64)), r"grads\[0\] must match params\[0\]"),
    (lambda a: a[0].__setitem__(1, torch.randn(6, dtype=D64)), r"all params of one call must share dtype and device"),
    (lambda a: a[0].__setitem__(0, torch.randn(12)[::2]), r"params\[0\] and grads\[0\] must be contiguous"),
    (lambda a: a[2].__setitem__(1, torch.randn(6, 1)), r"bufs\[1\] must be a contiguous tensor matching params\[1\]"),
    (lambda a: a[0].__setitem__(0, torch.zeros(6, dtype=torch.int32)), r"params must be float16, bfloat16, float32"),
    (lambda a: a[0].__setitem__(1, a[0][0]), r"beta_lasso_step_: params\[0\] and params\[1\] share memory"),
    (lambda a: a[2].__setitem__(0, a[0][1]), r"beta_lasso_step_: (params\[1\] and bufs\[0\]|bufs\[0\] and "
                                             r"params\[1\]) share memory"),
])
def test_raw_beta_lasso_step_checks_its_inputs(change, match):
    args = _bad_raw(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.regkernels.beta_lasso_step_(*args)


@needs_ext
def test_raw_beta_lasso_step_overlap_check_takes_separate_views_of_one_buffer():
    base = torch.randn(12)
    params, grads, bufs, hyper, flags = _raw_args()
    params = [base[:6], base[6:]]  # adjacent, not overlapping: allowed
    torch.ops.regkernels.beta_lasso_step_(params, grads, bufs, hyper, flags)
    with pytest.raises(RuntimeError, match=r"params\[0\] and params\[1\] share memory"):
        torch.ops.regkernels.beta_lasso_step_([base[:6], base[5:11]], grads, bufs, hyper, flags)


@needs_ext
@pytest.mark.parametrize("X, match", [
    (torch.randn(4, 4), r"regkernels::batched_svd \(CPU\): X must be \(b, m, n\); got shape \[4, 4\]"),
    (torch.ones(1, 4, 4, dtype=torch.int64), r"batched_svd \(CPU\): X must be float32 or float64; got Long"),
    (torch.randn(1, 4, 4).half(), r"batched_svd \(CPU\): X must be float32 or float64; got Half"),
    (torch.randn(1, 129, 4), r"batched_svd \(CPU\): the kernel takes 1 <= m, n and max\(m, n\) <= 128 .*got m=129"),
    (torch.randn(1, 0, 4), r"the kernel takes 1 <= m, n .*got m=0, n=4"),
])
def test_raw_batched_svd_checks_its_input(X, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.regkernels.batched_svd(X)


# ------------------------------------------------------------------ adversarial: sizes, seeds, banks

@pytest.mark.parametrize("kw, match", [
    (dict(n=4, k=3, seed=2**70), r"gabor_bank: seed must be <= 18446744073709551615"),
    (dict(n=4, k=3, seed=-1), r"gabor_bank: seed must be >= 0"),
    (dict(n=10**10, k=3), r"gabor_bank: a bank of n·k·k = 10000000000·3·3 = 90000000000 entries needs about "
                          r"5.36e\+03 GiB"),
    (dict(n=1, k=10**5), r"gabor_bank: a bank of n·k·k = 1·100000·100000"),
])
def test_gabor_bank_refuses_an_overflowing_seed_or_size_before_allocating(kw, match):
    with pytest.raises(ValueError, match=match):
        gabor_bank(**kw)


def test_gabor_bank_takes_the_full_64_bit_seed_range():
    assert gabor_bank(3, 3, seed=2**64 - 1).shape == (3, 3, 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adversarial_regularizer_refuses_a_bank_with_nan(bad):
    bank = gabor_bank(6, 3)
    bank[4, 1, 1] = bad
    with pytest.raises(ValueError, match=r"AdversarialKernelRegularizer: real must hold finite kernels; 1 of its 6 "
                                         r"kernels hold NaN or Inf"):
        AdversarialKernelRegularizer(nn.Conv2d(1, 2, 3), bank)


def test_svb_refuses_an_eps_whose_band_overflows_float32():
    with pytest.raises(ValueError, match=r"svb_: eps must be <= 1e\+38; got eps=1e\+39"):
        regkernels.svb_(torch.randn(3, 3), 1e39)
    with pytest.raises(ValueError, match=r"SVBProjector: eps must be <= 1e\+38"):
        regkernels.nn.SVBProjector(torch.nn.Linear(3, 3), 1e308)
