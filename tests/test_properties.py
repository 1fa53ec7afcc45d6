"""Property-based tests of the public contract (docs/index.md: bad input, numerical behaviour), drawn by hypothesis for every public op.

Each test draws shapes, dtypes, layouts (contiguous, transposed, strided), NaN / Inf placements
and argument values, and asserts what must hold for all of them:

* every kernel backend CI can run equals the reference within the dtype's tolerance;
* a matrix (or layer) holding NaN / Inf gives a non-finite value and gradient for that matrix
  only; the other matrices' values and gradients equal those of the batch without it;
* inputs are never modified;
* bad hyperparameters (bools, non-finite numbers, strings, tensors, values out of range) are
  refused with a TypeError / ValueError naming the op and the argument.

Draws are derandomized (the same examples on every run, so CI is reproducible) and bounded so
the module takes a minute or two on two cores; Triton runs interpreted, so it gets the smallest
shapes.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import regkernels  # noqa: E402
from regkernels import _ext  # noqa: E402

_SETTINGS = dict(derandomize=True, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])


def bounded(n: int):
    return settings(max_examples=n, **_SETTINGS)


# kernel backends of each family on CPU tensors (the reference is always there)
GRAM_BACKENDS = (["cpu"] if _ext.HAS_C else []) + (["triton"] if _ext.triton_interpreted() else [])
CONV_MATRIX_BACKENDS = (["cpu"] if _ext.HAS_C else []) + (["triton"] if _ext.triton_interpreted() else [])
SVD_BACKENDS = [b for b in regkernels.ops.svd.TABLE.backends("batched_svd", "cpu") if b != "reference"]

# (rtol, atol) of a kernel against the reference in the same dtype: float16 / bfloat16 results are
# the float32 result rounded once, so two roundings apart at most
TOL = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-4, 1e-5), torch.float16: (4e-3, 1e-3),
       torch.bfloat16: (3e-2, 1e-2)}
DTYPES = list(TOL)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Kernel vs reference: rtol of the dtype, atol relative to the largest |expected|."""
    rtol, atol = TOL[dtype]
    a, e = actual.double(), expected.double()
    finite = torch.isfinite(e)
    scale = 1.0 + (e[finite].abs().max().item() if finite.any() else 0.0)
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.isnan(), b.isnan())) and bool(
        torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))


# ----------------------------------------------------------------------------- strategies

@st.composite
def matrices(draw, max_batch: int = 3, max_side: int = 9, dtypes=DTYPES, min_batch: int = 0):
    """A (..., m, n) tensor: 0–2 batch dims, any dtype, contiguous / transposed / strided."""
    nbatch = draw(st.integers(0, 2))
    batch = tuple(draw(st.integers(min_batch, max_batch)) for _ in range(nbatch))
    m, n = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    scale = draw(st.sampled_from([1.0, 0.1, 3.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        W = (torch.randn(*batch, n, m, generator=g, dtype=torch.float64) * scale).to(dtype).mT
    elif layout == "strided":
        W = (torch.randn(*batch, m, 2 * n, generator=g, dtype=torch.float64) * scale).to(dtype)[..., ::2]
    else:
        W = (torch.randn(*batch, m, n, generator=g, dtype=torch.float64) * scale).to(dtype)
    return W


@st.composite
def poisoned_batches(draw, max_side: int = 7, dtypes=(torch.float32, torch.float64)):
    """(W (b, m, n) with some matrices holding one NaN / ±Inf, the poisoned indices)."""
    b = draw(st.integers(2, 4))
    m, n = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    W = torch.randn(b, m, n, generator=g, dtype=torch.float64).to(dtype)
    bad = sorted(draw(st.sets(st.integers(0, b - 1), min_size=1, max_size=b - 1)))
    for i in bad:
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        W[i, draw(st.integers(0, m - 1)), draw(st.integers(0, n - 1))] = value
    return W, bad


# ----------------------------------------------------------------------------- Gram penalties

def _gram_kinds():
    """(name, call(W, backend)) of every single-matrix penalty with drawn-once arguments."""
    return {
        "frame": lambda W, b: regkernels.frame_penalty(W, 0.5, 2.0, backend=b),
        "frame_rows": lambda W, b: regkernels.frame_penalty(W, 0.0, 1.5, side="rows", backend=b),
        "diversity": lambda W, b: regkernels.diversity_penalty(W, 0.2, backend=b),
        "orthogonality": lambda W, b: regkernels.orthogonality_penalty(W, backend=b),
        "orthogonality_norm": lambda W, b: regkernels.orthogonality_penalty(W, squared=False, backend=b),
        "mhe": lambda W, b: regkernels.mhe_penalty(W, s=1, half=True, backend=b),
        "mhe_log": lambda W, b: regkernels.mhe_penalty(W, s=0, backend=b),
        "srip": lambda W, b: regkernels.srip_penalty(W, n_iter=2, generator=torch.Generator().manual_seed(3),
                                                     backend=b),
    }


GRAM_KINDS = _gram_kinds()
_NEEDS_TWO_ROWS = ("mhe_log",)


def _gram_backends(kind: str) -> list[str]:
    if kind == "srip":
        return ["torch"]  # SRIP's fast path: torch matvecs with a hand-written backward (composite)
    return GRAM_BACKENDS


@pytest.mark.parametrize("kind", list(GRAM_KINDS))
@bounded(40)
@given(W=matrices())
def test_gram_kernels_equal_reference_and_leave_input_unmodified(kind, W):
    if kind in _NEEDS_TWO_ROWS:
        assume(W.shape[-2] >= 2)
    fn = GRAM_KINDS[kind]
    before = W.clone()
    ref = fn(W, "reference")
    assert ref.shape == W.shape[:-2] and ref.dtype == W.dtype
    for backend in _gram_backends(kind):
        if backend == "triton" and (W.dtype == torch.float64 or W.shape[:-2].numel() > 4):
            continue  # interpreted Triton: float32-family and tiny batches only
        out = fn(W, backend)
        assert out.shape == ref.shape and out.dtype == ref.dtype, backend
        assert_close_scaled(out, ref, W.dtype, f"{kind} {backend}")
    assert same_bits(W, before)


@pytest.mark.parametrize("kind", list(GRAM_KINDS))
@bounded(25)
@given(data=poisoned_batches())
def test_gram_nan_inf_matrix_is_non_finite_only_there(kind, data):
    W, bad = data
    if kind in _NEEDS_TWO_ROWS:
        assume(W.shape[-2] >= 2)
    good = [i for i in range(W.shape[0]) if i not in bad]
    fn = GRAM_KINDS[kind]
    for backend in ["reference"] + _gram_backends(kind):
        if backend == "triton" and W.dtype == torch.float64:
            continue
        X = W.clone().requires_grad_()
        out = fn(X, backend)
        out.sum().backward()
        for i in bad:
            assert not torch.isfinite(out[i]), f"{kind} {backend}: matrix {i} holds NaN/Inf but gave {out[i]}"
            assert not torch.isfinite(X.grad[i]).all(), f"{kind} {backend}: matrix {i}'s gradient is finite"
        # the other matrices as if the poisoned ones were not there (SRIP draws one start vector per
        # matrix of the batch, so its clean batch keeps every matrix, the poisoned ones zeroed)
        clean = W.clone()
        clean[bad] = 0.0
        Y = (clean if kind == "srip" else clean[good]).clone().requires_grad_()
        ref = fn(Y, backend)
        ref.sum().backward()
        keep = good if kind == "srip" else list(range(len(good)))
        torch.testing.assert_close(out[good].detach(), ref[keep].detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(X.grad[good], Y.grad[keep], rtol=1e-6, atol=1e-6)


@st.composite
def layer_lists(draw):
    """A list of 1–4 Linear / conv weights of different shapes (one dtype), and their groups."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    weights, groups = [], []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            shape, grp = (draw(st.integers(2, 9)), draw(st.integers(1, 9))), 1
        else:
            grp = draw(st.sampled_from([1, 2]))
            out = grp * draw(st.integers(1, 4))
            shape = (out, draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
            if out // grp < 2:
                shape = (2 * grp, *shape[1:])
        weights.append(torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype))
        groups.append(grp)
    return weights, groups


MULTI_KW = {"frame": dict(A=0.5, B=2.0), "diversity": dict(tau=0.25), "orthogonality": dict(),
            "mhe": dict(s=2, eps=1e-3)}
SINGLE_OF = {"frame": lambda W, b: regkernels.frame_penalty(W, 0.5, 2.0, backend=b),
             "diversity": lambda W, b: regkernels.diversity_penalty(W, 0.25, backend=b),
             "orthogonality": lambda W, b: regkernels.orthogonality_penalty(W, backend=b),
             "mhe": lambda W, b: regkernels.mhe_penalty(W, s=2, eps=1e-3, backend=b)}


@pytest.mark.parametrize("kind", list(MULTI_KW))
@bounded(30)
@given(data=layer_lists(), poison=st.integers(-1, 3))
def test_penalty_multi_is_the_per_layer_mean_and_isolates_nan(kind, data, poison):
    weights, groups = data
    weights = [w.clone() for w in weights]
    poison = poison if poison < len(weights) else -1
    if poison >= 0:
        weights[poison].view(-1)[0] = math.nan
    for backend in ["reference"] + (["cpu"] if _ext.HAS_C else []):
        out = regkernels.penalty_multi(weights, kind, groups=groups, backend=backend, **MULTI_KW[kind])
        assert out.shape == (len(weights),)
        for i, (w, grp) in enumerate(zip(weights, groups)):
            single = SINGLE_OF[kind](regkernels.as_matrix(w, grp), "reference")
            expected = single.mean() if single.dim() else single
            if i == poison:
                assert not torch.isfinite(out[i]), f"{kind} {backend}: poisoned layer {i} gave {out[i]}"
            else:
                assert_close_scaled(out[i], expected, w.dtype, f"penalty_multi {kind} {backend} layer {i}")


# ----------------------------------------------------------------------------- bad arguments

BAD_NUMBERS = [True, False, math.inf, -math.inf, math.nan, "1", None, torch.tensor(1.0)]


def _refused(call, op: str, arg: str) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    msg = str(info.value)
    assert op in msg and arg in msg, f"{op}: message does not name the op and {arg!r}: {msg}"


W0 = torch.randn(4, 6)


def _beta_lasso(**kw):
    args = dict(lr=0.1, lam=1e-3, beta=1.0)
    args.update(kw)
    return regkernels.optim.BetaLasso([torch.nn.Parameter(W0.clone())], **args)



K0 = torch.randn(3, 2, 3, 3)
BAD_CALLS = {
    # op, argument -> call with the bad value v, extra out-of-range values
    ("frame_penalty", "A"): (lambda v: regkernels.frame_penalty(W0, v, 2.0), [-1.0, 3.0]),
    ("frame_penalty", "B"): (lambda v: regkernels.frame_penalty(W0, 0.5, v), [0.1]),
    ("diversity_penalty", "tau"): (lambda v: regkernels.diversity_penalty(W0, v), [-0.1, 1.5]),
    ("mhe_penalty", "eps"): (lambda v: regkernels.mhe_penalty(W0, eps=v), [0.0, -1.0]),
    ("mhe_penalty", "s"): (lambda v: regkernels.mhe_penalty(W0, s=v), [3, 1.0]),
    ("srip_penalty", "n_iter"): (lambda v: regkernels.srip_penalty(W0, n_iter=v), [0, 1.5]),
    ("orthogonality_penalty", "squared"): (lambda v: regkernels.orthogonality_penalty(W0, squared=v), [1, 0]),
    ("penalty_multi", "A"): (lambda v: regkernels.penalty_multi([W0], "frame", A=v, B=2.0), [-1.0]),
    ("conv_frame_penalty", "A"): (lambda v: regkernels.conv_frame_penalty(K0, (5, 5), v, 2.0), [-1.0]),
    ("conv_frame_penalty", "stride"): (lambda v: regkernels.conv_frame_penalty(K0, (5, 5), 0.5, 2.0, stride=v),
                                       [0, -1, 1.5]),
    ("conv_frame_penalty", "padding"): (lambda v: regkernels.conv_frame_penalty(K0, (5, 5), 0.5, 2.0, padding=v),
                                        [-1, 1.5]),
    ("conv_frame_penalty", "groups"): (lambda v: regkernels.conv_frame_penalty(K0, (5, 5), 0.5, 2.0, groups=v),
                                       [0, 2]),
    ("conv_to_matrix", "dilation"): (lambda v: regkernels.conv_to_matrix(K0, (5, 5), dilation=v), [0, -2]),
    ("conv_orthogonality_penalty", "stride"): (lambda v: regkernels.conv_orthogonality_penalty(K0, stride=v),
                                               [0]),
    ("conv_orthogonality_penalty", "padding"): (lambda v: regkernels.conv_orthogonality_penalty(K0, padding=v),
                                                [-1]),
    ("clip_conv_singular_values", "hi"): (lambda v: regkernels.clip_conv_singular_values(K0, (4, 4), 0.5, v),
                                          [0.1]),
    ("conv_spectral_norm", "n_iter"): (lambda v: regkernels.conv_spectral_norm(K0, (4, 4), n_iter=v), [0, -1]),
    ("conv_spectral_norm", "tol"): (lambda v: regkernels.conv_spectral_norm(K0, (4, 4), method="bound", tol=v),
                                    [-1e-3]),
    ("clamp_singular_values", "lo"): (lambda v: regkernels.clamp_singular_values(W0, v, 2.0), [-1.0, 3.0]),
    ("clamp_singular_values", "hi"): (lambda v: regkernels.clamp_singular_values(W0, 0.5, v), [0.1]),
    ("svb_", "eps"): (lambda v: regkernels.svb_(W0.clone(), v), [-1.0]),
    ("jacobian_penalty", "n_proj"): (lambda v: regkernels.jacobian_penalty(
        torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True), n_proj=v), [0, 1.5]),
    # a 0-dim floating Tensor is a valid lr (compiled steps with a scheduler): other tensors are not
    ("BetaLasso", "lr"): (lambda v: _beta_lasso(lr=v), [-1.0, torch.tensor([0.1]), torch.tensor(1),
                                                        torch.tensor(-0.1), torch.tensor(float("nan"))]),
    ("BetaLasso", "lam"): (lambda v: _beta_lasso(lam=v), [-1.0]),
    ("BetaLasso", "beta"): (lambda v: _beta_lasso(beta=v), [-1.0]),
    ("BetaLasso", "momentum"): (lambda v: _beta_lasso(momentum=v), [-0.5]),
    ("BetaLasso", "weight_decay"): (lambda v: _beta_lasso(weight_decay=v), [-0.5]),
}
# arguments that legitimately take a bool (none of the numeric ones above do) or an int only
_NONE_OK = {("conv_orthogonality_penalty", "padding"), ("conv_spectral_norm", "n_iter"),
            ("conv_spectral_norm", "tol")}
_TENSOR_OK = {("BetaLasso", "lr")}
_INT_ARGS = {"s", "n_iter", "stride", "padding", "groups", "dilation", "n_proj"}


@pytest.mark.parametrize("op,arg", list(BAD_CALLS), ids=[f"{o}-{a}" for o, a in BAD_CALLS])
@bounded(12)
@given(data=st.data())
def test_bad_hyperparameters_are_refused_naming_the_argument(op, arg, data):
    call, out_of_range = BAD_CALLS[(op, arg)]
    if arg == "squared":
        candidates = ["yes", None, torch.tensor(True)] + out_of_range
    else:
        candidates = BAD_NUMBERS + out_of_range + ([2.5] if arg in _INT_ARGS else [])
        if (op, arg) in _NONE_OK:
            candidates = [c for c in candidates if c is not None]
        if (op, arg) in _TENSOR_OK:
            candidates = [c for c in candidates if not isinstance(c, torch.Tensor) or any(c is o for o in out_of_range)]
    v = data.draw(st.sampled_from(candidates))
    _refused(lambda: call(v), op, arg)


# ----------------------------------------------------------------------------- conv operators

@st.composite
def conv_geometries(draw, max_channels: int = 3, circular: bool = True):
    d = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, max_channels))
    c_out = groups * draw(st.integers(1, max_channels))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(d))
    size = tuple(draw(st.integers(1, 6)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(d))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(d))
    mode = draw(st.sampled_from(["zeros", "circular"] if circular else ["zeros"]))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(d))
    if mode == "circular":
        assume(all(p <= n for p, n in zip(padding, size)))
    span = [dl * (k - 1) + 1 for dl, k in zip(dilation, kernel)]
    assume(all(n + 2 * p >= s for n, p, s in zip(size, padding, span)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    weight = torch.randn(c_out, c_in // groups, *kernel, generator=g, dtype=torch.float64).to(dtype)
    return weight, dict(input_size=size, stride=stride, padding=padding, dilation=dilation, groups=groups,
                        padding_mode=mode)


def _conv(x: torch.Tensor, weight: torch.Tensor, geo: dict) -> torch.Tensor:
    d = weight.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    if geo["padding_mode"] == "circular":
        pad = [p for p in reversed(geo["padding"]) for _ in (0, 1)]
        return conv(F.pad(x, pad, mode="circular"), weight, None, geo["stride"], 0, geo["dilation"], geo["groups"])
    return conv(x, weight, None, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])


@bounded(40)
@given(data=conv_geometries(), layout=st.sampled_from(["dense", "csr", "coo"]))
def test_conv_to_matrix_applies_the_convolution_on_every_backend(data, layout):
    weight, geo = data
    size = geo.pop("input_size")
    x = torch.randn(1, weight.shape[1] * geo["groups"], *size, dtype=weight.dtype)
    expected = _conv(x, weight, geo).reshape(-1)
    before = weight.clone()
    # the dense kernels build the dense layout, the composite ("torch") the sparse ones
    for backend in ["reference"] + (CONV_MATRIX_BACKENDS if layout == "dense" else ["torch"]):
        T = regkernels.conv_to_matrix(weight, size, layout=layout, backend=backend, **geo)
        got = (T.to_dense() if layout != "dense" else T) @ x.reshape(-1)
        assert_close_scaled(got, expected, weight.dtype, f"conv_to_matrix {layout} {backend}")
    assert same_bits(weight, before)


@bounded(30)
@given(data=conv_geometries(max_channels=2), side=st.sampled_from(["auto", "rows", "cols"]),
       poison=st.sampled_from([None, math.nan, math.inf]))
def test_conv_frame_penalty_implicit_equals_explicit_and_propagates_nan(data, side, poison):
    weight, geo = data
    size = geo.pop("input_size")
    weight = weight.double()
    if poison is not None:
        weight.view(-1)[0] = poison
    ref = regkernels.conv_frame_penalty(weight, size, 0.5, 2.0, side=side, backend="reference", **geo)
    lo_ref, hi_ref = regkernels.conv_gershgorin_bounds(weight, size, side=side, backend="reference", **geo)
    out = regkernels.conv_frame_penalty(weight, size, 0.5, 2.0, side=side, **geo)
    lo, hi = regkernels.conv_gershgorin_bounds(weight, size, side=side, **geo)
    if poison is None:
        assert_close_scaled(out, ref, torch.float64, "conv_frame_penalty")
        assert_close_scaled(torch.stack([lo, hi]), torch.stack([lo_ref, hi_ref]), torch.float64,
                            "conv_gershgorin_bounds")
    else:
        # the poisoned tap touches at least one row of T, so its Gram row (and the penalty) is non-finite
        assert not torch.isfinite(ref) and not torch.isfinite(out), (ref, out)


@bounded(25)
@given(data=conv_geometries(circular=False), pad=st.one_of(st.none(), st.integers(0, 2)))
def test_conv_orthogonality_penalty_matches_its_definition(data, pad):
    weight, geo = data
    assume(geo["groups"] == 1 and weight.dim() == 4)
    stride = geo["stride"][0]
    out = regkernels.conv_orthogonality_penalty(weight, stride=stride, padding=pad)
    # docs/conv.md#conv_orthogonality_penalty per spatial dim: P = ⌊(k−1)/S⌋·S unless given, target I at the centre ⌊s/2⌋
    p = tuple((k - 1) // stride * stride if pad is None else pad for k in weight.shape[2:])
    O = F.conv2d(weight.double(), weight.double(), stride=stride, padding=p)
    target = torch.zeros_like(O)
    target[:, :, O.shape[-2] // 2, O.shape[-1] // 2] = torch.eye(O.shape[0], dtype=O.dtype)
    assert_close_scaled(out, ((O - target) ** 2).sum(), weight.dtype, "conv_orthogonality_penalty")


# ----------------------------------------------------------------------------- SVD

@bounded(25)
@given(W=matrices(max_side=12, dtypes=[torch.float32, torch.float64]))
def test_batched_svd_reconstructs_on_every_backend(W):
    before = W.clone()
    k = min(W.shape[-2:])
    S64 = torch.linalg.svdvals(W.double())
    for backend in ["reference"] + SVD_BACKENDS:
        U, S, Vh = regkernels.batched_svd(W, backend=backend)
        assert U.shape == (*W.shape[:-1], k) and S.shape == (*W.shape[:-2], k) and Vh.shape == (*W.shape[:-2], k,
                                                                                                 W.shape[-1])
        if W.numel() == 0:
            continue
        tol = 1e-5 if W.dtype == torch.float32 else 1e-11
        scale = S64.amax(-1, keepdim=True).clamp_min(1e-30) if S64.numel() else S64
        assert ((S.double() - S64).abs() <= tol * scale + 1e-30).all(), backend
        recon = (U.double() * S.double().unsqueeze(-2)) @ Vh.double()
        assert ((recon - W.double()).abs() <= 10 * tol * scale.unsqueeze(-1) + 1e-30).all(), backend
    assert same_bits(W, before)


@bounded(15)
@given(data=poisoned_batches(max_side=8))
def test_batched_svd_and_clamp_nan_matrix_is_nan_only_there(data):
    W, bad = data
    good = [i for i in range(W.shape[0]) if i not in bad]
    for backend in ["reference"] + SVD_BACKENDS:
        U, S, Vh = regkernels.batched_svd(W, backend=backend)
        C = regkernels.clamp_singular_values(W, 0.5, 2.0, backend=backend)
        for i in bad:
            assert S[i].isnan().all() and C[i].isnan().all(), backend
        assert torch.isfinite(S[good]).all() and torch.isfinite(C[good]).all(), backend
        torch.testing.assert_close(S[good], regkernels.batched_svd(W[good], backend=backend)[1])


@bounded(15)
@given(W=matrices(max_side=8, dtypes=[torch.float32, torch.float64], min_batch=1),
       eps=st.sampled_from([0.05, 0.5, 2.0]))
def test_svb_bounds_every_singular_value(W, eps):
    assume(W.numel() > 0)
    svb_w = W.reshape(-1, W.shape[-1]).clone()  # svb_ takes layer weights: a 2-D one is its own matrix
    regkernels.svb_([svb_w], eps)
    S = torch.linalg.svdvals(svb_w.double())
    tol = 1e-5 if W.dtype == torch.float32 else 1e-12
    assert (S >= 1 / (1 + eps) - tol).all() and (S <= 1 + eps + tol).all()


# ----------------------------------------------------------------------------- β-LASSO

@bounded(15)
@given(shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=4),
       lr=st.sampled_from([0.01, 0.1]), lam=st.sampled_from([0.0, 1e-3, 0.05]),
       beta=st.sampled_from([0.0, 1.0, 50.0]), momentum=st.sampled_from([0.0, 0.9]),
       weight_decay=st.sampled_from([0.0, 1e-2]), nesterov=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_beta_lasso_fused_equals_reference_bit_for_bit(shapes, lr, lam, beta, momentum, weight_decay, nesterov,
                                                      seed):
    assume(not nesterov or momentum > 0)
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(*s, generator=g) for s in shapes]
    grads = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(3)]
    results = []
    for backend in ("reference", None):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = regkernels.optim.BetaLasso(params, lr=lr, lam=lam, beta=beta, momentum=momentum,
                                         weight_decay=weight_decay, nesterov=nesterov, backend=backend)
        for step in grads:
            for p, d in zip(params, step):
                p.grad = d.clone()
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)
