"""Tests for the C++ CPU kernels of the Gram penalties (csrc/cpu/gram_cpu.cpp, docs/gram.md).

The kernel (``backend="cpu"``) against the reference evaluated in float64: values and gradients
for every kind and option, both sides, odd and degenerate shapes, the blocked symmetric Gram of
large k, dtypes, thresholds hit exactly, the grouped (whole-model) call, opcheck and the raw
op's errors. The public-op behaviour shared with the reference (layouts, empty batches,
gradcheck, torch.compile, bad input) is in tests/test_gram.py, whose ops dispatch here.
"""
from __future__ import annotations

import pytest
import torch

from regkernels import _ext
from regkernels.ops import gram as G
from regkernels.reference import gram as R

pytestmark = pytest.mark.skipif(not _ext.HAS_C, reason="regkernels._C is not built")

# id → (public op with backend=, reference); rows of each W have norm ≈ 1 so both frame hinges
# (A = 0.8, B = 1.3) and the diversity mask (tau = 0.2) are partly active
KINDS = {
    "frame": (lambda W, b: G.frame_penalty(W, 0.8, 1.3, backend=b), lambda W: R.frame_penalty(W, 0.8, 1.3)),
    "frame_rows": (lambda W, b: G.frame_penalty(W, 0.8, 1.3, "rows", backend=b),
                   lambda W: R.frame_penalty(W, 0.8, 1.3, "rows")),
    "frame_cols": (lambda W, b: G.frame_penalty(W, 0.8, 1.3, "cols", backend=b),
                   lambda W: R.frame_penalty(W, 0.8, 1.3, "cols")),
    "diversity": (lambda W, b: G.diversity_penalty(W, 0.2, backend=b), lambda W: R.diversity_penalty(W, 0.2)),
    "diversity_excl": (lambda W, b: G.diversity_penalty(W, 0.2, False, backend=b),
                       lambda W: R.diversity_penalty(W, 0.2, False)),
    "orth": (lambda W, b: G.orthogonality_penalty(W, backend=b), lambda W: R.orthogonality_penalty(W)),
    "orth_rows": (lambda W, b: G.orthogonality_penalty(W, "rows", backend=b),
                  lambda W: R.orthogonality_penalty(W, "rows")),
    "orth_cols_norm": (lambda W, b: G.orthogonality_penalty(W, "cols", False, backend=b),
                       lambda W: R.orthogonality_penalty(W, "cols", False)),
    "mhe_s0": (lambda W, b: G.mhe_penalty(W, 0, backend=b), lambda W: R.mhe_penalty(W, 0)),
    "mhe_s1": (lambda W, b: G.mhe_penalty(W, 1, backend=b), lambda W: R.mhe_penalty(W, 1)),
    "mhe_s2": (lambda W, b: G.mhe_penalty(W, 2, backend=b), lambda W: R.mhe_penalty(W, 2)),
    "mhe_s0_half": (lambda W, b: G.mhe_penalty(W, 0, True, backend=b), lambda W: R.mhe_penalty(W, 0, True)),
    "mhe_s2_half": (lambda W, b: G.mhe_penalty(W, 2, True, eps=0.1, backend=b),
                    lambda W: R.mhe_penalty(W, 2, True, eps=0.1)),
    "mhe_a0": (lambda W, b: G.mhe_penalty(W, 0, angular=True, backend=b), lambda W: R.mhe_penalty(W, 0, angular=True)),
    "mhe_a2_half": (lambda W, b: G.mhe_penalty(W, 2, True, angular=True, backend=b),
                    lambda W: R.mhe_penalty(W, 2, True, angular=True)),
}
# m < n, m > n, primes, square, single row / column, batched leading dims
SHAPES = [(7, 13), (13, 7), (11, 11), (1, 5), (5, 1), (2, 3, 17, 5)]
# (dtype, tolerance relative to the largest |value| / |gradient entry|) vs float64
DTYPES = [(torch.float32, 2e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)]


def _weights(shape, dtype=torch.float64):
    return (torch.randn(shape, dtype=torch.float64) / shape[-1] ** 0.5).to(dtype)


def _value_and_grad(fn, W, upstream=None):
    x = W.detach().clone().requires_grad_(True)
    out = fn(x)
    g = torch.randn(out.shape, dtype=torch.float64) if upstream is None else upstream
    (out.double() * g).sum().backward()  # random upstream: each matrix's gradient is scaled
    return out.detach(), x.grad, g


def _assert_rel(actual, expected, tol):
    actual, expected = actual.double(), expected.double()
    # floor: an exactly-zero truth (e.g. diversity of parallel rows) is matched to rounding
    scale = expected.abs().max().clamp_min(1e-3) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=float(tol * scale))


def _skip_shape(kind, shape):
    return kind.startswith("mhe") and "half" not in kind and shape[-2] < 2  # no pair of rows


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("kind", list(KINDS))
def test_kernel_matches_reference_float64(kind, shape):
    if _skip_shape(kind, shape):
        pytest.skip("mhe needs two rows unless half=True")
    public, reference = KINDS[kind]
    W = _weights(shape)
    value, grad, g = _value_and_grad(lambda x: public(x, "cpu"), W)
    ref_value, ref_grad, _ = _value_and_grad(reference, W, g)
    assert value.shape == W.shape[:-2] and value.dtype == torch.float64
    # the reference's own float64 rounding (mhe half: its gradient of cos_ii cancels ~‖w‖²/eps)
    _assert_rel(value, ref_value, 1e-12)
    _assert_rel(grad, ref_grad, 1e-9)


@pytest.mark.parametrize("dtype, tol", DTYPES, ids=[str(d[0]) for d in DTYPES])
@pytest.mark.parametrize("kind", ["frame", "diversity", "orth_cols_norm", "mhe_s1", "mhe_s0_half"])
def test_dtypes_vs_float64(kind, dtype, tol):
    public, reference = KINDS[kind]
    W = _weights((2, 9, 23), dtype)
    value, grad, g = _value_and_grad(lambda x: public(x, "cpu"), W)
    ref_value, ref_grad, _ = _value_and_grad(reference, W.double(), g)  # float64 of the rounded input
    assert value.dtype == dtype and grad.dtype == dtype
    _assert_rel(value, ref_value, tol)
    _assert_rel(grad, ref_grad, tol)


@pytest.mark.parametrize("kind, shape", [("frame_rows", (1030, 24)), ("orth_rows", (400, 9)),
                                         ("diversity", (400, 9)), ("mhe_s1", (400, 9))])
def test_blocked_symmetric_gram(kind, shape):
    # k ≥ 384 / ≥ 1024: the Gram is built from 2×2 / 4×4 blocks on and above the diagonal and
    # mirrored, with a last block shorter than the others
    public, reference = KINDS[kind]
    W = _weights(shape)
    value, grad, g = _value_and_grad(lambda x: public(x, "cpu"), W)
    ref_value, ref_grad, _ = _value_and_grad(reference, W, g)
    _assert_rel(value, ref_value, 1e-11)
    _assert_rel(grad, ref_grad, 1e-9)
    value32, grad32, _ = _value_and_grad(lambda x: public(x, "cpu"), W.float(), g)
    _assert_rel(value32, ref_value, 1e-4)
    _assert_rel(grad32, ref_grad, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inclusive", [True, False])
def test_diversity_mask_at_tau_exactly(dtype, inclusive):
    # unit rows with cosine exactly 0.5 in every precision
    W = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 2.0]], dtype=dtype)
    value, grad, g = _value_and_grad(lambda x: G.diversity_penalty(x, 0.5, inclusive, backend="cpu"), W)
    ref_value, ref_grad, _ = _value_and_grad(lambda x: R.diversity_penalty(x, 0.5, inclusive), W, g)
    # pairs (0, 1) and (1, 2) have |C| = 0.5 = tau: in the mask only when inclusive
    assert value.item() == (0.5 if inclusive else 0.0)
    torch.testing.assert_close(value, ref_value, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert (grad.abs().sum() > 0) == inclusive


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frame_hinges_exactly_at_the_bounds(dtype):
    # V = [[2, 1], [1, 2]]: d − r = 1 = A and d + r = 3 = B for both rows; identity: d = 1 = A = B
    cases = [(torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=dtype), 1.0, 3.0, "rows"),
             (torch.eye(4, dtype=dtype), 1.0, 1.0, "auto")]
    for W, A, B, side in cases:
        value, grad, _ = _value_and_grad(lambda x: G.frame_penalty(x, A, B, side, backend="cpu"), W)
        ref_value, ref_grad, _ = _value_and_grad(lambda x: R.frame_penalty(x, A, B, side), W)
        assert value.item() == 0.0 and ref_value.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(ref_grad, grad)
        # just past the bound, the hinge and its gradient switch on
        value, grad, _ = _value_and_grad(lambda x: G.frame_penalty(x, A + 0.25, B + 0.25, side, backend="cpu"), W)
        assert value.item() > 0 and grad.abs().sum() > 0


def test_orthogonality_larger_side_adds_the_constant():
    # ‖Wᵀ W − I_n‖² = ‖W Wᵀ − I_m‖² + (n − m): the kernel uses the m×m Gram for side="cols"
    W = _weights((3, 40))
    small = G.orthogonality_penalty(W, "rows", backend="cpu")
    big = G.orthogonality_penalty(W, "cols", backend="cpu")
    torch.testing.assert_close(big, small + 37, rtol=1e-14, atol=0)
    torch.testing.assert_close(big, R.orthogonality_penalty(W, "cols"), rtol=1e-13, atol=0)


def test_no_grad_keeps_no_coefficients():
    mats = [_weights((1, 6, 9)).requires_grad_(True)]
    _, coefs = torch.ops.regkernels.gram_penalty_fwd(mats, "frame", [0], [0.5, 1.5], True)
    assert coefs[0].shape == (1, 6, 6)
    with torch.no_grad():
        _, coefs = torch.ops.regkernels.gram_penalty_fwd(mats, "frame", [0], [0.5, 1.5], False)
    assert coefs[0].numel() == 0
    values, _ = torch.ops.regkernels.gram_penalty_fwd(mats, "frame", [0], [0.5, 1.5], False)
    with pytest.raises(RuntimeError, match="called with need_grad=False"):
        values.sum().backward()


def _resnet_like():
    # ResNet-18 topology, channels / 8, a grouped conv and a Linear head
    shapes = [(8, 3, 7, 7), (8, 8, 3, 3), (16, 8, 3, 3), (16, 16, 3, 3), (16, 8, 1, 1), (32, 16, 3, 3),
              (32, 4, 3, 3), (64, 32, 3, 3), (10, 64)]
    groups = [1, 1, 1, 1, 1, 1, 8, 1, 1]
    return [_weights(s) for s in shapes], groups


@pytest.mark.parametrize("kind, kw", [("frame", {"A": 0.5, "B": 1.5}), ("diversity", {"tau": 0.1}),
                                      ("orthogonality", {"side": "cols", "squared": False}),
                                      ("mhe", {"s": 1, "half": True})])
def test_grouped_call_equals_per_layer_and_is_one_call(kind, kw):
    weights, groups = _resnet_like()
    leaves = [w.clone().requires_grad_(True) for w in weights]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = G.penalty_multi(leaves, kind, backend="cpu", groups=groups, **kw)
        out.sum().backward()
    names = [e.name for e in prof.events()]
    assert names.count("regkernels::gram_penalty_fwd") == 1
    assert names.count("regkernels::gram_penalty_bwd") == 1
    ref_leaves = [w.clone().requires_grad_(True) for w in weights]
    ref = R.penalty_multi(ref_leaves, kind, groups, **kw)
    ref.sum().backward()
    _assert_rel(out.detach(), ref.detach(), 1e-12)
    for a, b in zip(leaves, ref_leaves):
        _assert_rel(a.grad, b.grad, 1e-10)


@pytest.mark.parametrize("kind, params, sides", [("frame", [0.5, 1.5], [0, 1]), ("diversity", [0.3, 1.0], [0, 0]),
                                                 ("orthogonality", [0.0], [1, 0]), ("mhe", [1.0, 1.0, 1e-3, 0.0], [0, 0])])
def test_opcheck(kind, params, sides):
    mats = [_weights((2, 5, 8)).requires_grad_(True), _weights((1, 7, 3)).requires_grad_(True)]
    torch.library.opcheck(torch.ops.regkernels.gram_penalty_fwd, (mats, kind, sides, params, True))
    _, coefs = torch.ops.regkernels.gram_penalty_fwd([m.detach() for m in mats], kind, sides, params, True)
    grad = torch.randn(3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.regkernels.gram_penalty_bwd, ([m.detach() for m in mats], coefs, sides, grad))


RAW_BAD = [
    (([torch.randn(1, 3, 4)], "nuclear", [0], [1.0], False), r"kind must be 'frame', 'diversity', "),
    (([torch.randn(1, 3, 4)], "frame", [0], [1.0], False), r"kind 'frame' takes 2 params; got 1"),
    (([torch.randn(1, 3, 4)], "frame", [0, 1], [0.0, 1.0], False), r"need one side per matrix; got 1 matrices and 2"),
    (([torch.randn(3)], "frame", [0], [0.0, 1.0], False), r"mats\[0\] must have shape \(\.\.\., m, n\) with m, n >= 1"),
    (([torch.randn(1, 3, 4), torch.randn(1, 3, 4, dtype=torch.float64)], "frame", [0, 0], [0.0, 1.0], False),
     r"all mats must share one dtype"),
    (([torch.randn(1, 3, 4)], "frame", [2], [0.0, 1.0], False), r"sides must be 0 \(rows\) or 1 \(cols\); got 2"),
]


@pytest.mark.parametrize("args, match", RAW_BAD, ids=[f"raw_bad{i}" for i in range(len(RAW_BAD))])
def test_raw_op_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.regkernels.gram_penalty_fwd(*args)
