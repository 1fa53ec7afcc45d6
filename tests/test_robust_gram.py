"""Robustness of the Gram-penalty family (docs/gram.md) on every backend CI runs: the reference,
"cpu" (the C++ kernel), "torch" (SRIP's hand-written backward) and "triton" (interpreted on CPU).

NaN / Inf / overflowing matrices give non-finite values and gradients for that matrix only; √ at 0
has the subgradient 0; double backward is correct or refused naming backend="reference"; dense
Gram stacks over the byte limit are refused before allocating; the raw ops check their arguments;
hyperparameters are finite Python numbers; the C++ kernel's batched path for stacks of small
matrices equals the one-matrix-at-a-time path.
"""
from __future__ import annotations

import math

import pytest
import torch

import regkernels
from regkernels import _ext
from regkernels.ops import gram as G
from regkernels.reference import gram as R

HAS_TRITON = _ext.triton_interpreted()
KERNELS = (["cpu"] if _ext.HAS_C else []) + (["triton"] if HAS_TRITON else [])
BACKENDS = ["reference"] + KERNELS
needs_c = pytest.mark.skipif(not _ext.HAS_C, reason="regkernels._C is not built")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed or not interpreted")

# one call per kind and option: (W, backend) → (...)
KINDS = {
    "frame": lambda W, b: G.frame_penalty(W, 0.5, 2.0, backend=b),
    "frame_rows": lambda W, b: G.frame_penalty(W, 0.0, 1.5, "rows", backend=b),
    "diversity": lambda W, b: G.diversity_penalty(W, 0.2, backend=b),
    "diversity_exclusive": lambda W, b: G.diversity_penalty(W, 0.2, False, backend=b),
    "orthogonality": lambda W, b: G.orthogonality_penalty(W, backend=b),
    "orthogonality_rows_norm": lambda W, b: G.orthogonality_penalty(W, "rows", False, backend=b),
    "mhe_s0": lambda W, b: G.mhe_penalty(W, 0, backend=b),
    "mhe_s1_half": lambda W, b: G.mhe_penalty(W, 1, True, backend=b),
    "mhe_s2": lambda W, b: G.mhe_penalty(W, 2, eps=1e-3, backend=b),
}
MULTI_KW = {"frame": dict(A=0.5, B=2.0), "diversity": dict(tau=0.25), "orthogonality": dict(squared=False),
            "mhe": dict(s=1, half=True)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton takes float16 / bfloat16 / float32 (a named 'triton' refuses float64)")


def _value_and_grad(fn, W, backend):
    X = W.clone().requires_grad_(True)
    out = fn(X, backend)
    out.float().sum().backward()
    return out.detach(), X.grad


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a.isnan(), b.isnan())) and bool(
        torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))


# ----------------------------------------------------------------------------- NaN / Inf

@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_gram_penalty_nan_inf_matrix_is_non_finite_only_there(kind, backend, dtype, poison):
    _skip_unsupported(backend, dtype)
    fn = KINDS[kind]
    clean = torch.randn(3, 6, 4, dtype=torch.float64).div(2).to(dtype)
    bad = clean.clone()
    bad[1, 2, 3] = poison
    out, grad = _value_and_grad(fn, bad, backend)
    # the same call with matrix 1 finite: the launch / loop has the same shape, so the other
    # matrices must be bit-identical
    out_clean, grad_clean = _value_and_grad(fn, clean, backend)
    ref, _ = _value_and_grad(fn, bad, "reference")
    assert not torch.isfinite(out[1]), f"{kind} {backend}: a matrix holding {poison} gave {out[1]}"
    torch.testing.assert_close(out[1], ref[1], equal_nan=True)  # NaN, or +inf where the formula is +∞
    assert not torch.isfinite(grad[1]).all(), f"{kind} {backend}: the poisoned matrix's gradient is finite"
    for i in (0, 2):
        assert _same_bits(out[i], out_clean[i]) and _same_bits(grad[i], grad_clean[i]), (kind, backend, i)


@pytest.mark.parametrize("where", ["matrix", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_gram_penalty_overflowing_gram_is_non_finite_only_there(kind, backend, dtype, where):
    # entries of 1e20 are finite, their products are not (float32 is the compute dtype): the value
    # must be NaN or inf, never the 0 that a hinge or mask turns a NaN into, nor the finite/inf = 0
    # cosine of one huge row against normal ones
    clean = torch.randn(3, 6, 4, dtype=torch.float64).div(2)
    bad = clean.clone()
    if where == "matrix":
        bad[1] *= 1e20
    else:
        bad[1, 2] *= 1e20
    out, grad = _value_and_grad(KINDS[kind], bad.to(dtype), backend)
    out_clean, grad_clean = _value_and_grad(KINDS[kind], clean.to(dtype), backend)
    assert not torch.isfinite(out[1]), f"{kind} {backend}: an overflowing Gram gave {out[1]}"
    assert not torch.isfinite(grad[1]).all(), f"{kind} {backend}: an overflowing Gram's gradient is finite"
    for i in (0, 2):
        assert _same_bits(out[i], out_clean[i]) and _same_bits(grad[i], grad_clean[i]), (kind, backend, i)


def _layers(dtype=torch.float32):
    # a Linear, a dense conv and a grouped conv (groups 2): one penalty_multi call
    return [torch.randn(8, 5, dtype=dtype) / 3, torch.randn(6, 2, 3, 3, dtype=dtype) / 4,
            torch.randn(4, 3, 1, 3, dtype=dtype) / 3], [1, 1, 2]


@pytest.mark.parametrize("poison", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(MULTI_KW))
def test_penalty_multi_nan_layer_is_non_finite_only_there(kind, backend, poison):
    weights, groups = _layers()
    poisoned = [w.clone() for w in weights]
    poisoned[1][2, 1, 0, 2] = poison

    def run(ws):
        leaves = [w.clone().requires_grad_(True) for w in ws]
        out = G.penalty_multi(leaves, kind, backend=backend, groups=groups, **MULTI_KW[kind])
        out.sum().backward()
        return out.detach(), [x.grad for x in leaves]

    out, grads = run(poisoned)
    out_clean, grads_clean = run(weights)
    assert not torch.isfinite(out[1]), f"{kind} {backend}: the poisoned layer gave {out[1]}"
    assert not torch.isfinite(grads[1]).all()
    for i in (0, 2):
        assert _same_bits(out[i], out_clean[i]) and _same_bits(grads[i], grads_clean[i]), (kind, backend, i)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frame_penalty_nan_matrix_is_nan_only_there(backend):
    W = torch.randn(2, 5, 3)
    W[0, 4, 1] = math.nan
    X = W.clone().requires_grad_(True)
    out = G.frame_penalty(X, 0.5, 2.0, backend=backend)
    out.sum().backward()
    assert out[0].isnan() and torch.isfinite(out[1])
    assert X.grad[0].isnan().all() and torch.isfinite(X.grad[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_diversity_penalty_nan_row_is_not_dropped_from_the_mask(backend):
    # |C_ij| >= tau is false for a NaN cosine; the value must still be NaN
    W = torch.randn(5, 7)
    W[3, 0] = math.nan
    assert G.diversity_penalty(W, 0.5, backend=backend).isnan()
    assert G.diversity_penalty(W, 0.5, False, backend=backend).isnan()
    # a single row has no pair, but holds NaN: NaN (the reference's C² · mask is NaN · 0)
    assert G.diversity_penalty(torch.tensor([[math.nan, 1.0]]), 0.5, backend=backend).isnan()


@pytest.mark.parametrize("backend", BACKENDS)
def test_orthogonality_penalty_inf_entry_is_inf(backend):
    # ‖Gram(W) − I‖² is +inf, not inf − inf = NaN; likewise its norm
    W = torch.randn(6, 4)
    W[2, 1] = math.inf
    assert G.orthogonality_penalty(W, backend=backend) == math.inf
    assert G.orthogonality_penalty(W, "rows", False, backend=backend) == math.inf


# ----------------------------------------------------------------------------- √ at 0

def _identity_grams():
    perm = torch.eye(5)[torch.tensor([3, 0, 4, 1, 2])]
    dirac = torch.nn.init.dirac_(torch.empty(4, 4, 3, 3))  # rows are distinct unit vectors
    tall = torch.linalg.qr(torch.randn(7, 4)).Q  # orthonormal columns: Wᵀ W = I
    return {"identity": torch.eye(4), "permutation": perm, "dirac_conv": G.as_matrix(dirac), "orthonormal_cols": tall}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_identity_grams()))
def test_orthogonality_norm_at_identity_gram_has_zero_gradient(name, backend):
    W = _identity_grams()[name]
    if name == "orthonormal_cols":
        W = W.contiguous()
    # exactly orthonormal inputs only (QR is orthonormal to rounding: its value is tiny, not 0)
    X = W.clone().requires_grad_(True)
    out = G.orthogonality_penalty(X, squared=False, backend=backend)
    out.backward()
    assert torch.isfinite(X.grad).all(), f"{name} {backend}: gradient {X.grad}"
    if name != "orthonormal_cols":
        assert out == 0 and torch.count_nonzero(X.grad) == 0


def test_sqrt0_is_sqrt_with_zero_subgradient_and_keeps_nan():
    x = torch.tensor([0.0, 4.0, math.nan, math.inf], dtype=torch.float64, requires_grad=True)
    y = R.sqrt0(x)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), x.detach().sqrt(), equal_nan=True)
    assert x.grad[0] == 0 and x.grad[1] == 0.25 and x.grad[2].isnan()
    assert torch.autograd.gradgradcheck(R.sqrt0, (torch.tensor([0.5, 2.0], dtype=torch.float64,
                                                                requires_grad=True),))


# ----------------------------------------------------------------------------- double backward

@pytest.mark.parametrize("kind", list(KINDS))
def test_reference_double_backward_is_correct(kind):
    W = (torch.randn(2, 5, 3, dtype=torch.float64) / 2).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda w: KINDS[kind](w, "reference"), (W,))


@pytest.mark.parametrize("n_iter", [1, 3])
def test_srip_torch_double_backward_is_correct(n_iter):
    W = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)

    def fn(w, backend="torch"):
        return G.srip_penalty(w, n_iter, torch.Generator().manual_seed(1), backend=backend)

    assert torch.autograd.gradgradcheck(fn, (W,))
    # the Hessian-vector product of the kernel equals the reference's
    v = torch.randn_like(W)
    hvps = []
    for backend in ("torch", "reference"):
        (g,) = torch.autograd.grad(fn(W, backend).sum(), W, create_graph=True)
        (hvp,) = torch.autograd.grad((g * v).sum(), W)
        hvps.append(hvp)
    torch.testing.assert_close(hvps[0], hvps[1])


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_gram_kernel_double_backward_is_refused_naming_reference(kind, backend):
    W = torch.randn(5, 3) / 2
    X = W.clone().requires_grad_(True)
    # a create_graph=True backward alone (gradient penalties) gives the right first gradient
    (g,) = torch.autograd.grad(KINDS[kind](X, backend), X, create_graph=True)
    (g_ref,) = torch.autograd.grad(KINDS[kind](X, "reference"), X)
    torch.testing.assert_close(g.detach(), g_ref, rtol=1e-4, atol=1e-5)
    op = kind.split("_")[0]
    with pytest.raises(RuntimeError, match=rf"{op}_penalty .*double backward.*'{backend}'.*backend='reference'"):
        g.square().sum().backward()


@pytest.mark.parametrize("backend", KERNELS)
def test_penalty_multi_kernel_double_backward_is_refused(backend):
    weights, groups = _layers()
    leaves = [w.requires_grad_(True) for w in weights]
    out = G.penalty_multi(leaves, "frame", backend=backend, groups=groups, A=0.5, B=2.0)
    grads = torch.autograd.grad(out.sum(), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match=r"penalty_multi with kind='frame'.*double backward.*backend='reference'"):
        sum(g.square().sum() for g in grads).backward()


@needs_c
def test_raw_gram_penalty_bwd_is_differentiable_once_only():
    W = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    _, coefs = torch.ops.regkernels.gram_penalty_fwd([W.detach()], "frame", [1], [0.5, 2.0], True)
    (dW,) = torch.ops.regkernels.gram_penalty_bwd([W], coefs, [1], torch.ones(2, dtype=torch.float64))
    assert dW.requires_grad
    with pytest.raises(RuntimeError, match="double backward .*backend='reference'"):
        dW.sum().backward()


# ----------------------------------------------------------------------------- memory

HUGE = {
    "frame_rows": lambda W, b: G.frame_penalty(W, 0.5, 2.0, "rows", backend=b),
    "diversity": lambda W, b: G.diversity_penalty(W, 0.2, backend=b),
    "mhe": lambda W, b: G.mhe_penalty(W, backend=b),
    "multi_diversity": lambda W, b: G.penalty_multi([W], "diversity", backend=b, tau=0.2),
}


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if _ext.HAS_C else []))
@pytest.mark.parametrize("call", list(HUGE))
def test_huge_gram_is_refused_naming_its_size_before_allocating(call, backend):
    W = torch.randn(100000, 16)  # a 100000×100000 float32 Gram: 40 GB
    with pytest.raises(ValueError, match=r"100000×100000 Gram matrix: 40000000000 bytes \(37\.25 GiB\), over the "
                                         r"limit MAX_GRAM_BYTES .*backend='triton'"):
        HUGE[call](W, backend)


def test_reference_orthogonality_rows_refuses_huge_gram():
    with pytest.raises(ValueError, match=r"orthogonality_penalty: W of shape \(100000, 16\) needs a dense "
                                         r"100000×100000 Gram.*side='auto'"):
        G.orthogonality_penalty(torch.randn(100000, 16), "rows", backend="reference")


@pytest.mark.parametrize("call", list(HUGE))
def test_gram_limit_applies_to_the_dense_paths_only(call, monkeypatch):
    W = torch.randn(40, 6) / 3  # a 40×40 Gram: 6400 bytes in float32
    expected = HUGE[call](W, "reference")
    monkeypatch.setattr(R, "MAX_GRAM_BYTES", 4096)
    for backend in ["reference"] + (["cpu"] if _ext.HAS_C else []):
        with pytest.raises(ValueError, match=r"needs a dense 40×40 Gram matrix: 6400 bytes"):
            HUGE[call](W, backend)
    if HAS_TRITON:  # flash-style: never holds the k×k Gram, so no limit
        torch.testing.assert_close(HUGE[call](W, "triton"), expected, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- raw ops

def _raw_fwd(mats, kind="frame", sides=(1,), params=(0.5, 2.0), need_grad=True):
    return torch.ops.regkernels.gram_penalty_fwd(mats, kind, list(sides), list(params), need_grad)


RAW_FWD_BAD = [
    (dict(params=(0.5, math.inf)), r"gram_penalty_fwd: params must be finite; got params\[1\] = inf"),
    (dict(kind="mhe", sides=(0,), params=(3.0, 0.0, 1e-4, 0.0)), r"mhe params\[0\] \(s\) must be 0, 1 or 2; got 3"),
    (dict(kind="mhe", sides=(0,), params=(2.0, 0.0, 0.0, 0.0)), r"mhe params\[2\] \(eps\) must be > 0; got 0"),
    (dict(kind="mhe", sides=(0,), params=(2.0, 0.0, 1e-4, 2.0)), r"mhe params\[3\] \(angular\) must be 0 or 1; got 2"),
    (dict(kind="mhe", sides=(0,), params=(2.0, 0.0, 1e-4)), r"kind 'mhe' takes 4 params; got 3"),
]


@needs_c
@pytest.mark.parametrize("kw, match", RAW_FWD_BAD, ids=["nonfinite", "mhe_s", "mhe_eps", "mhe_angular", "mhe_count"])
def test_raw_gram_penalty_fwd_checks_params(kw, match):
    with pytest.raises(RuntimeError, match=match):
        _raw_fwd([torch.randn(2, 4, 3)], **kw)


def _raw_bwd_case(case):
    mats = [torch.randn(2, 4, 3), torch.randn(3, 5)]  # batches of 2 and 1: grad has 3 entries
    _, coefs = _raw_fwd(mats, sides=(1, 0))
    grad = torch.ones(3)
    if case == "short_grad":
        grad = torch.ones(2)
    elif case == "int_grad":
        grad = torch.ones(3, dtype=torch.int64)
    elif case == "2d_grad":
        grad = torch.ones(3, 1)
    elif case == "coef_batch":
        coefs = [coefs[0][:1], coefs[1]]
    elif case == "coef_size":
        coefs = [coefs[0], torch.zeros(1, 4, 4)]
    elif case == "coef_dtype":
        coefs = [coefs[0].double(), coefs[1]]
    elif case == "coef_count":
        coefs = coefs[:1]
    elif case == "no_grad_forward":
        _, coefs = _raw_fwd(mats, sides=(1, 0), need_grad=False)
    return mats, coefs, [1, 0], grad


RAW_BWD_BAD = {
    "short_grad": r"grad must have shape \(3,\), one entry per matrix of mats; got \[2\]",
    "int_grad": r"grad must be a floating CPU tensor",
    "2d_grad": r"grad must have shape \(3,\)",
    "coef_batch": r"coefs\[0\] must have shape \(2, k, k\) with k = 4 \(rows\) or 3 \(cols\)",
    "coef_size": r"coefs\[1\] must have shape \(1, k, k\) with k = 3 \(rows\) or 5 \(cols\)",
    "coef_dtype": r"coefs\[0\] must be a CPU tensor of the math dtype Float",
    "coef_count": r"need one coefficient tensor per matrix; got 1 for 2 matrices",
    "no_grad_forward": r"was the forward run with need_grad=True",
}


@needs_c
@pytest.mark.parametrize("case", list(RAW_BWD_BAD))
def test_raw_gram_penalty_bwd_checks_its_arguments(case):
    with pytest.raises(RuntimeError, match=RAW_BWD_BAD[case]):
        torch.ops.regkernels.gram_penalty_bwd(*_raw_bwd_case(case))


@needs_triton
@pytest.mark.parametrize("case, match", [
    ("short_stats", r"stats must be the forward's float32 stats, shape \(16,\)"),
    ("short_grad", r"grad must be a floating tensor of shape \(2,\) \(one entry per matrix\)"),
    ("int_grad", r"grad must be a floating tensor of shape \(2,\)"),
])
def test_raw_triton_gram_penalty_bwd_checks_its_arguments(case, match):
    mats = [torch.randn(2, 4, 3)]
    _, stats = torch.ops.regkernels.gram_penalty_triton(mats, "frame", [0], [0.5, 2.0])
    grad = torch.ones(2)
    if case == "short_stats":
        stats = stats[:-1]
    elif case == "short_grad":
        grad = torch.ones(1)
    else:
        grad = torch.ones(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        torch.ops.regkernels.gram_penalty_triton_bwd(mats, "frame", [0], [0.5, 2.0], stats, grad)


@needs_triton
def test_raw_triton_gram_penalty_refuses_float64():
    with pytest.raises(ValueError, match="mats must be float16, bfloat16 or float32; got torch.float64"):
        torch.ops.regkernels.gram_penalty_triton([torch.randn(1, 4, 3, dtype=torch.float64)], "frame", [0],
                                                 [0.5, 2.0])


# ----------------------------------------------------------------------------- hyperparameters

def test_frame_penalty_refuses_bool_bounds():
    W = torch.randn(5, 3)
    with pytest.raises(TypeError, match=r"frame_penalty: A must be a real number .*not bool; got True"):
        G.frame_penalty(W, True, 2.0)
    with pytest.raises(TypeError, match=r"frame_penalty: B must be a real number .*not bool; got True"):
        G.frame_penalty(W, 0.0, True)
    with pytest.raises(TypeError, match=r"penalty_multi: A must be a real number .*not bool"):
        G.penalty_multi([W], "frame", A=False, B=2.0)


@pytest.mark.parametrize("call, match", [
    (lambda W: G.frame_penalty(W, math.inf, math.inf), r"frame_penalty: A must be finite; got A=inf"),
    (lambda W: G.frame_penalty(W, 0.5, math.inf), r"frame_penalty: B must be finite; got B=inf"),
    (lambda W: G.mhe_penalty(W, eps=math.inf), r"mhe_penalty: eps must be finite; got eps=inf"),
    (lambda W: G.mhe_penalty(W, eps=math.nan), r"mhe_penalty: eps must be finite; got eps=nan"),
    (lambda W: G.diversity_penalty(W, math.nan), r"diversity_penalty: tau must be finite; got tau=nan"),
    (lambda W: G.penalty_multi([W], "mhe", eps=math.inf), r"penalty_multi: eps must be finite; got eps=inf"),
], ids=["frame_A_inf", "frame_B_inf", "mhe_eps_inf", "mhe_eps_nan", "diversity_tau_nan", "multi_eps_inf"])
def test_non_finite_hyperparameters_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(5, 3))


# ----------------------------------------------------------------------------- batched C++ path

@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", list(KINDS))
def test_cpu_matrix_gives_the_same_bits_alone_or_in_any_stack(kind, dtype):
    # stacks of small matrices run one bmm and a parallel loop over the epilogues; which matrices
    # share the stack must not change a matrix's value or gradient
    W = (torch.randn(2, 5, 6, 4, dtype=torch.float64) / 2).to(dtype)
    out, grad = _value_and_grad(KINDS[kind], W, "cpu")
    for idx in [(0, 0), (1, 3), (0, 4)]:
        one, g_one = _value_and_grad(KINDS[kind], W[idx], "cpu")
        assert _same_bits(out[idx], one) and _same_bits(grad[idx], g_one), idx
    part, g_part = _value_and_grad(KINDS[kind], W[1, 1:4], "cpu")
    assert _same_bits(out[1, 1:4], part) and _same_bits(grad[1, 1:4], g_part)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e9, 1e17])
def test_orthogonality_norm_of_a_finite_gram_is_never_a_silent_zero_gradient(backend, scale):
    # ‖V − I‖ of a float32 Gram with entries up to ~1e35 is finite although its sum of squares
    # overflows: the reference and the C++ kernel scale before squaring and return the norm and
    # its gradient (V − I)/‖V − I‖ exactly; the Triton kernel sums the squares and then takes the
    # root, so it reports +inf with a NaN gradient — non-finite, never inf with a zero gradient
    W0 = torch.randn(5, 7) * scale
    W64 = W0.double().requires_grad_()
    (g64,) = torch.autograd.grad(R.orthogonality_penalty(W64, squared=False), W64)
    W = W0.clone().requires_grad_()
    value = G.orthogonality_penalty(W, squared=False, backend=backend)
    (g,) = torch.autograd.grad(value, W)
    if backend == "triton" and scale > 1e8:
        assert math.isinf(value.item()) and g.isnan().all()
    else:
        expected = R.orthogonality_penalty(W64.detach(), squared=False)
        assert value.item() == pytest.approx(expected.item(), rel=1e-5)
        assert ((g.double() - g64).abs().max() / g64.abs().max()).item() < 1e-5


def test_sqrt0_slope_is_nan_at_infinity_not_zero():
    x = torch.tensor([0.0, 4.0, math.inf], requires_grad=True)
    R.sqrt0(x).sum().backward()
    assert x.grad[0] == 0 and x.grad[1] == 0.25 and x.grad[2].isnan()


def test_srip_refuses_an_iteration_count_that_would_run_for_hours():
    with pytest.raises(ValueError, match=r"srip_penalty: n_iter must be <= 10000; got n_iter=1000000000000"):
        G.srip_penalty(torch.randn(4, 6), n_iter=10**12)
    with pytest.raises(ValueError, match=r"penalty_multi: n_iter must be <= 10000"):
        G.penalty_multi([torch.randn(4, 6)], "srip", n_iter=10**5)


@pytest.mark.parametrize("call", [
    lambda W: G.frame_penalty(W, 0.0, 1.0),
    lambda W: G.orthogonality_penalty(W),
    lambda W: G.penalty_multi([W], "frame", A=0.0, B=1.0),
], ids=["frame", "orthogonality", "penalty_multi"])
def test_gram_penalties_refuse_sparse_weights_naming_the_layout(call):
    with pytest.raises(TypeError, match=r"must be a dense \(strided\) tensor .*got layout torch.sparse_coo"):
        call(torch.eye(3).to_sparse())


@pytest.mark.parametrize("backend", ["reference", "torch", None])
def test_srip_penalty_at_an_exactly_orthonormal_weight_is_zero_not_nan(backend):
    # M = Gram(W) − I = 0 makes the first iterate M b exactly 0: the step must not divide 0 by 0
    for W0 in (torch.eye(5, 7, dtype=torch.float64), torch.eye(6, dtype=torch.float64)):
        W = W0.clone().requires_grad_(True)
        value = regkernels.srip_penalty(W, n_iter=2, backend=backend)
        value.backward()
        assert value.item() == 0.0 and torch.equal(W.grad, torch.zeros_like(W))
    if backend != "torch":  # penalty_multi has no "torch" row (its kernels run SRIP's composite)
        assert torch.equal(regkernels.penalty_multi([torch.eye(4), torch.eye(3, 6)], "srip", backend=backend),
                           torch.zeros(2))
    W = torch.eye(5, 7, dtype=torch.float64)
    W[0, 0] = float("nan")
    assert regkernels.srip_penalty(W, backend=backend).isnan()
