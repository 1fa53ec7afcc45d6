"""Tests for the grouped Triton Gram-penalty kernels (``regkernels.triton.gram``, docs/gram.md).

Without a GPU the kernels run interpreted on CPU tensors (``TRITON_INTERPRET=1``, set by
conftest), so the shapes are small; on a GPU machine the same tests run compiled on CUDA
tensors (every factory call below makes its tensors on ``DEVICE``). The truth is autograd through the references in float64 applied to the
exact (rounded) input: values and the gradient of ``Σ_b grad_b·value_b``.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from regkernels import _ext  # noqa: E402
from regkernels.ops import gram as G  # noqa: E402
from regkernels.reference import gram as R  # noqa: E402
from regkernels.triton import gram as TG  # noqa: E402

DEVICE = "cpu" if _ext.triton_interpreted() else ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _tensors_on_device():
    with torch.device(DEVICE or "cpu"):
        yield

# (id, kind, side, params); side 0 = rows (W Wᵀ), 1 = cols (Wᵀ W)
CONFIGS = [
    ("frame_rows", "frame", 0, [0.5, 1.5]),
    ("frame_cols", "frame", 1, [0.3, 1.2]),
    ("diversity_inclusive", "diversity", 0, [0.1, 1.0]),
    ("diversity_exclusive", "diversity", 0, [0.25, 0.0]),
    ("orthogonality_rows", "orthogonality", 0, []),
    ("orthogonality_cols", "orthogonality", 1, []),
    ("mhe_s0", "mhe", 0, [0, 0.0, 1e-4, 0.0]),
    ("mhe_s1", "mhe", 0, [1, 0.0, 1e-4, 0.0]),
    ("mhe_s2", "mhe", 0, [2, 0.0, 1e-4, 0.0]),
    ("mhe_s2_half", "mhe", 0, [2, 1.0, 1e-4, 0.0]),
    ("mhe_s0_half", "mhe", 0, [0, 1.0, 1e-3, 0.0]),
    ("mhe_a0", "mhe", 0, [0, 0.0, 1e-4, 1.0]),
    ("mhe_a1_half", "mhe", 0, [1, 1.0, 1e-3, 1.0]),
    ("mhe_a2_half", "mhe", 0, [2, 1.0, 1e-4, 1.0]),
]
CONFIG_IDS = [c[0] for c in CONFIGS]

# (B, m, n): m < n and m > n, primes, sizes around and not multiples of the 32-blocks, m = 1, n = 1
SHAPES = [(1, 5, 7), (2, 37, 11), (1, 13, 41), (1, 40, 70), (3, 1, 17), (2, 19, 1)]

# (dtype, atol, rtol) vs float64 of the same rounded input; atol is relative to the largest
# |truth| entry. Every dtype is computed in float32 (IEEE dots), so the error is the float32
# arithmetic alone; the half types get a little slack for their coarser (tie-prone) data.
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-5, 2e-5),
    (torch.bfloat16, 5e-5, 5e-5),
]
F32_TOL = DTYPES[0][1:]


# ----------------------------------------------------------------- helpers

def _allowed(kind: str, params, shape) -> bool:
    _, m, n = shape
    if kind == "mhe":
        # m = 1 has no pairs without half; n = 1 puts every pair at cos ≈ ±1, where δ = 2 − 2cos
        # cancels to a few float32 ulps (ill-conditioned, not a kernel property)
        return (m >= 2 or bool(params[1])) and n >= 2
    return True


def _reference(W: torch.Tensor, kind: str, side: int, params) -> torch.Tensor:
    sd = ("rows", "cols")[side]
    if kind == "frame":
        return R.frame_penalty(W, params[0], params[1], sd)
    if kind == "diversity":
        return R.diversity_penalty(W, params[0], bool(params[1]))
    if kind == "orthogonality":
        return R.orthogonality_penalty(W, sd)
    return R.mhe_penalty(W, int(params[0]), bool(params[1]), params[2], bool(params[3]))


def _truth(W: torch.Tensor, kind: str, side: int, params, grad: torch.Tensor):
    """float64 values and d(Σ grad·value)/dW of the reference at the exact input W."""
    X = W.detach().double().requires_grad_()
    v = _reference(X, kind, side, params)
    (v * grad.double()).sum().backward()
    return v.detach(), X.grad


def _kernel(mats, kind, sides, params, grad):
    values, stats = TG.gram_penalty_forward(mats, kind, sides, params)
    grads = TG.gram_penalty_backward(mats, kind, sides, params, stats, grad)
    return values, stats, grads


def _close(actual: torch.Tensor, truth: torch.Tensor, atol: float, rtol: float, scale: float = 0.0) -> None:
    """atol is relative to the largest |truth| entry, or to ``scale`` where the truth is a
    cancellation of larger terms."""
    assert actual.dtype == torch.float32
    scale = max(scale, truth.abs().max().item() if truth.numel() else 1.0)
    torch.testing.assert_close(actual.double(), truth, atol=atol * max(scale, 1e-30), rtol=rtol)


def _randn(*shape, dtype=torch.float32) -> torch.Tensor:
    # rows of norm ≈ 1 (or columns, up to √(m/n)): every hinge / threshold branch is active
    return (torch.randn(*shape, dtype=torch.float64) / max(shape[-1], 1) ** 0.5).to(dtype)


def _check_one(W, kind, side, params, atol, rtol):
    grad = torch.randn(W.shape[0]).float()
    values, stats, (dW,) = _kernel([W], kind, [side], params, grad)
    truth_v, truth_g = _truth(W, kind, side, params, grad)
    assert values.shape == (W.shape[0],) and dW.shape == W.shape
    _close(values, truth_v, atol, rtol)
    grad_scale = 0.0
    if kind == "diversity" and W.shape[-1] == 1:
        # n = 1: every C_ij = ±1, R is constant and its gradient 0 is the cancellation of
        # P's off-diagonal terms (up to 2(m − 1)·|g| / min|w|) against the norm term
        grad_scale = 2 * W.shape[-2] * grad.abs().max().item() / W.abs().min().item()
    if kind == "mhe" and W.shape[-2] == 1:
        # half, m = 1: the pairs are (w, −w) with cos = −‖w‖²/(‖w‖² + eps); the O(eps) gradient
        # cancels P's two terms of size |g|·∂e/∂cos/‖w‖ (∂e/∂cos ≤ 1/2 at δ ≈ 4)
        grad_scale = grad.abs().max().item() / W.double().norm(dim=-1).min().item()
    _close(dW, truth_g, atol, rtol, grad_scale)
    return values, stats, dW


# ----------------------------------------------------------------- values and gradients

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cid,kind,side,params", CONFIGS, ids=CONFIG_IDS)
def test_matches_reference(cid, kind, side, params, shape):
    if not _allowed(kind, params, shape):
        pytest.skip(f"{kind} is undefined or ill-conditioned at {shape}")
    _check_one(_randn(*shape), kind, side, params, *F32_TOL)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("cid,kind,side,params", CONFIGS, ids=CONFIG_IDS)
def test_dtypes(cid, kind, side, params, dtype, atol, rtol):
    _check_one(_randn(2, 23, 45, dtype=dtype), kind, side, params, atol, rtol)


def _expected_stats(W: torch.Tensor, kind: str, params) -> torch.Tensor:
    """float64 stats of one (B, p, n) rows input: per matrix ‖x_i‖², then the kind's row sums."""
    X = W.double()
    V = X @ X.mT
    d = V.diagonal(dim1=-2, dim2=-1)
    p = V.shape[-1]
    off = ~torch.eye(p, dtype=torch.bool)
    if kind == "frame":      # r_i = Σ_{j≠i} |V_ij|
        sums = [(V.abs() * off).sum(-1)]
    elif kind == "diversity":  # t_i = Σ_{j≠i} [|C_ij| ≥ tau] C_ij² (full rows)
        q = d.sqrt().clamp_min(1e-12)
        C = V / (q[..., :, None] * q[..., None, :])
        keep = (C.abs() >= params[0]) & off
        sums = [(C * C * keep).sum(-1)]
    elif kind == "orthogonality":  # (V_ii − 1)² + 2 Σ_{j>i} V_ij²
        E = V - torch.eye(p, dtype=V.dtype)
        weight = torch.ones(p, p, dtype=V.dtype).triu(1) * 2 + torch.eye(p, dtype=V.dtype)
        sums = [(weight * E * E).sum(-1)]
    else:  # s = 2: E_i = Σ_{j≠i} 1/δ_ij, u_i = Σ_{j≠i} h_ij cos_ij, h = (2/δ²)/#pairs
        nu = (d + params[2]).sqrt()
        cos = V / (nu[..., :, None] * nu[..., None, :])
        delta = torch.where(off, 2 - 2 * cos, torch.ones_like(cos))
        pairs = p * (p - 1) / 2
        sums = [((1 / delta) * off).sum(-1), ((2 / delta**2) / pairs * cos * off).sum(-1)]
    return torch.stack([d, *sums], 1).reshape(-1)


@pytest.mark.parametrize("kind,params", [("frame", [0.5, 1.5]), ("diversity", [0.2, 1.0]),
                                         ("orthogonality", []), ("mhe", [2, 0.0, 1e-4, 0.0])])
def test_stats_layout(kind, params):
    # per matrix: squared row norms, then the kind's row sums (frame: Gershgorin radii;
    # diversity t_i and MHE u_i are the full row sums the backward's diagonal needs); the
    # size is what the op's fake tensor promises
    W = _randn(2, 37, 20)  # two row blocks of 32: several splits by default
    values, stats = TG.gram_penalty_forward([W], kind, [0], params)
    torch.testing.assert_close(stats.double(), _expected_stats(W, kind, params), atol=1e-5, rtol=1e-5)
    assert stats.numel() == TG.stats_numel([W], kind, [0], params) == (3 if kind == "mhe" else 2) * 2 * 37
    assert TG._plan([W], kind, [0], params).splits > 1


# ----------------------------------------------------------------- layouts and batches

def _noncontiguous_inputs():
    base = _randn(2, 30, 80)
    return {
        "transposed": _randn(1, 41, 23).mT,                      # (1, 23, 41), unit row stride
        "sliced": base[:, ::2, 3:70],                            # (2, 15, 67), strided rows
        "expanded": _randn(1, 17, 9).expand(3, 17, 9),           # batch stride 0
    }


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("cid,kind,side,params", CONFIGS[::2], ids=CONFIG_IDS[::2])
def test_noncontiguous(cid, kind, side, params, layout):
    W = _noncontiguous_inputs()[layout]
    assert not W.is_contiguous()
    _check_one(W, kind, side, params, *F32_TOL)  # one tensor: used in place with its strides
    # in a list: copied into the flat buffer; same numbers either way
    other = _randn(1, 6, 10)
    grad = torch.randn(W.shape[0] + 1)
    v_list, _, g_list = _kernel([W, other], kind, [side, side], params, grad)
    v_one, _, g_one = _kernel([W.contiguous()], kind, [side], params, grad[:W.shape[0]])
    torch.testing.assert_close(v_list[:W.shape[0]], v_one, atol=0, rtol=0)
    torch.testing.assert_close(g_list[0], g_one[0], atol=0, rtol=0)


@pytest.mark.parametrize("cid,kind,side,params", CONFIGS, ids=CONFIG_IDS)
def test_empty_batch(cid, kind, side, params):
    empty = _randn(0, 5, 7)
    values, stats, (dW,) = _kernel([empty], kind, [side], params, torch.empty(0))
    assert values.shape == (0,) and stats.numel() == 0 and dW.shape == (0, 5, 7)
    # an empty batch inside a list takes no slot in values
    W = _randn(2, 6, 9)
    grad = torch.randn(2)
    values, _, (d0, d1, d2) = _kernel([empty, W, empty], kind, [side] * 3, params, grad)
    truth_v, truth_g = _truth(W, kind, side, params, grad)
    assert d0.shape == d2.shape == (0, 5, 7)
    _close(values, truth_v, *F32_TOL)
    _close(d1, truth_g, *F32_TOL)


def test_no_mats():
    values, stats = TG.gram_penalty_forward([], "frame", [], [0.5, 1.5])
    assert values.shape == (0,) and stats.shape == (0,)
    assert TG.gram_penalty_backward([], "frame", [], [0.5, 1.5], stats, values) == []


# ----------------------------------------------------------------- thresholds hit exactly

# Rows with power-of-two or 3-4-5 norms: the ties C_ij ∈ {0, ±0.5, 1} come out exactly as
# V_ij/(q_i q_j) in float32 (the kernel) and as normalised dot products in float64 (the truth);
# 0.6 and 0.7 round, but lie away from tau.
_DIVERSITY_ROWS = [[2, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 4], [3, 0, 4, 0], [1, 0, 0, 0], [1, 1, 1, -1]]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_diversity_threshold_ties(tau, dtype, atol, rtol):
    W = torch.tensor([_DIVERSITY_ROWS], dtype=dtype)
    values = {}
    for inclusive in (1.0, 0.0):
        values[inclusive], _, dW = _check_one(W, "diversity", 0, [tau, inclusive], atol, rtol)
    # the ties decide: inclusive counts the pairs with |C| = tau, exclusive does not
    if tau == 0.5:  # seven pairs tie at |C| = 0.5; (0,3), (3,4): 0.6, (1,3), (3,5): 0.7, (0,4): 1
        assert values[1.0].item() > values[0.0].item() > 0
    else:  # the only tie is rows 0 and 4 (C = 1): R = C² = 1; nothing lies above 1
        assert values[1.0].item() == 1.0 and values[0.0].item() == 0.0


@pytest.mark.parametrize("side", [0, 1])
def test_frame_threshold_ties(side):
    # identity-like rows: d = 1, r = 0 → both hinges exactly at 0 for A = B = 1
    I = torch.eye(3, 5)[None]
    values, _, dW = _check_one(I if side == 0 else I.mT, "frame", side, [1.0, 1.0], *F32_TOL)
    assert values.item() == 0.0 and torch.count_nonzero(dW) == 0
    # the lower hinge active (A = 2) on V_ij = 0: |x|' uses sign(0) = 0, so dW = 2·gd_i·w_i only
    values, _, dW = _check_one(I if side == 0 else I.mT, "frame", side, [2.0, 3.0], *F32_TOL)
    assert values.item() == 1.0 and torch.count_nonzero(dW) == 3
    # V = [[2, 1], [1, 1]]: d − r = (1, 0), d + r = (3, 2): row 0 sits on A = 1, row 1 on B = 2
    W = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    values, _, _ = _check_one(W if side == 0 else W.mT.contiguous(), "frame", side, [1.0, 2.0], *F32_TOL)
    assert values.item() == 1.0


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's numpy at δ = 0
def test_mhe_duplicate_rows_are_infinite():
    # ‖w‖² ≫ eps: cos rounds to 1 in float32, δ = 0, energy = +inf (documented, no clamping)
    W = torch.tensor([[[100.0, 0.0], [100.0, 0.0], [0.0, 1.0]]])
    for s in (0, 2):
        values, _ = TG.gram_penalty_forward([W], "mhe", [0], [s, 0.0, 1e-4, 0.0])
        assert values.item() == float("inf") == R.mhe_penalty(W, s).item()


# ----------------------------------------------------------------- grouped calls

def _group_for(kind: str, side_of_kind: int):
    """Mats of different shapes (and sides, where the kind has them) for one grouped call."""
    mats = [_randn(2, 37, 11), _randn(1, 5, 7), _randn(1, 41, 13).mT, _randn(0, 4, 4), _randn(3, 2, 9)]
    sides = [side_of_kind, 1 - side_of_kind, side_of_kind, side_of_kind, 1 - side_of_kind]
    if kind in ("diversity", "mhe"):
        sides = [0] * len(mats)
    return mats, sides


@pytest.mark.parametrize("cid,kind,side,params", CONFIGS, ids=CONFIG_IDS)
def test_grouped_equals_per_mat(cid, kind, side, params):
    mats, sides = _group_for(kind, side)
    counts = [w.shape[0] for w in mats]
    grad = torch.randn(sum(counts))
    values, _, grads = _kernel(mats, kind, sides, params, grad)
    assert values.shape == (sum(counts),)
    start = 0
    for W, sd, B, dW in zip(mats, sides, counts, grads):
        v1, _, (g1,) = _kernel([W], kind, [sd], params, grad[start:start + B])
        # the same tiles see the same numbers, whatever the buffer: bit-for-bit equal
        torch.testing.assert_close(values[start:start + B], v1, atol=0, rtol=0)
        torch.testing.assert_close(dW, g1, atol=0, rtol=0)
        if B:
            truth_v, truth_g = _truth(W, kind, sd, params, grad[start:start + B])
            _close(v1, truth_v, *F32_TOL)
            _close(g1, truth_g, *F32_TOL)
        start += B


class _CountingKernel:
    """Stands in for a jitted kernel: counts ``kernel[grid](...)`` launches and records grids."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


_KERNELS = ["_row_norm_kernel", "_gram_fwd_kernel", "_finalize_kernel", "_gram_coef_kernel", "_gram_product_kernel",
            "_gram_bwd_kernel", "_split_sum_kernel"]


@pytest.mark.parametrize("path", ["product", "split"])
@pytest.mark.parametrize("target", [1, 256], ids=["one_split", "default"])
@pytest.mark.parametrize("n_copies", [1, 3])
def test_one_launch_per_pass(monkeypatch, target, n_copies, path):
    # a fixed number of launches per pass, whatever the length of the list: one per layout
    # class (at most 2) of the row norms, the Gram partials (tiles × splits), then one finalize
    # (one program per matrix); backward, per class, the coefficients (tiles × splits) and the
    # P·X product (P path), or the Gram kernel (tiles × splits) and, with splits > 1 only, one
    # split reduction of dX (split path)
    monkeypatch.setattr(TG, "TARGET_PROGRAMS", target)
    if path == "split":
        monkeypatch.setattr(TG, "P_MAX_SIDE", 0)
    counters = {name: _CountingKernel(getattr(TG, name)) for name in _KERNELS}
    for name, counter in counters.items():
        monkeypatch.setattr(TG, name, counter)
    mats, sides = _group_for("frame", 0)
    mats, sides = mats * n_copies, sides * n_copies
    grad = torch.randn(sum(w.shape[0] for w in mats))
    values, stats = TG.gram_penalty_forward(mats, "frame", sides, [0.5, 1.5])
    # (matrix, 32-row block of the k×k Gram) across the whole list, × the column-block splits
    ps = [(w.shape[-2] if sd == 0 else w.shape[-1], w.shape[-1] if sd == 0 else w.shape[-2], w.shape[0])
          for w, sd in zip(mats, sides)]
    tiles = sum(b * -(-p // TG.BLOCK_I) for p, _, b in ps)
    max_cb = max(-(-p // TG.BLOCK_J) for p, _, b in ps if b)
    splits = min(max(1, -(-target // tiles)), max_cb)
    splits = -(-max_cb // -(-max_cb // splits))
    plan = TG._plan(mats, "frame", sides, [0.5, 1.5])
    assert (plan.splits, plan.n_tiles) == (splits, tiles)
    assert (splits > 1) == (target == 256)  # both regimes are exercised
    # rows-contiguous, cols-contiguous and a transposed (generic) input: two classes
    assert sorted(ln.layout for ln in plan.launches) == [TG.LAYOUT_GENERIC, TG.LAYOUT_INNER_UNIT]
    assert counters["_row_norm_kernel"].grids == [(ln.n_tiles,) for ln in plan.launches]
    assert counters["_gram_fwd_kernel"].grids == [(ln.n_tiles, splits) for ln in plan.launches]
    assert counters["_finalize_kernel"].grids == [(values.numel(),)]
    for name in _KERNELS[3:]:
        assert counters[name].grids == []
    grads = TG.gram_penalty_backward(mats, "frame", sides, [0.5, 1.5], stats, grad)
    if path == "product":
        assert plan.product_path
        assert counters["_gram_coef_kernel"].grids == [(ln.n_tiles, splits) for ln in plan.launches]
        assert counters["_gram_product_kernel"].grids == [(ln.n_ptiles,) for ln in plan.launches]
        assert sum(ln.n_ptiles for ln in plan.launches) == sum(b * -(-p // TG.BLOCK_I) * -(-n // TG.BLOCK_N)
                                                               for p, n, b in ps)
        assert counters["_gram_bwd_kernel"].grids == counters["_split_sum_kernel"].grids == []
    else:
        assert not plan.product_path and plan.bwd_splits == splits
        assert counters["_gram_bwd_kernel"].grids == [(ln.n_tiles, splits) for ln in plan.launches]
        dx_numel = sum(w.numel() for w in mats)
        assert counters["_split_sum_kernel"].grids == ([(-(-dx_numel // TG.BLOCK_RED),)] if splits > 1 else [])
        assert counters["_gram_coef_kernel"].grids == counters["_gram_product_kernel"].grids == []
    # the counted launches did the work: same result as unwrapped per-matrix calls
    monkeypatch.undo()
    v1, _ = TG.gram_penalty_forward(mats[:1], "frame", sides[:1], [0.5, 1.5])
    torch.testing.assert_close(values[:2], v1, atol=0, rtol=0)
    assert [g.shape for g in grads] == [w.shape for w in mats]


SPLIT_PATH_CONFIGS = ("frame_cols", "diversity_inclusive", "orthogonality_rows", "mhe_s1", "mhe_s0_half")


@pytest.mark.parametrize("path", ["product", "split"])
@pytest.mark.parametrize("cid,kind,side,params", CONFIGS, ids=CONFIG_IDS)
def test_splits_agree(monkeypatch, cid, kind, side, params, path):
    # the column-block loop split in 1 (one program per row block), in parts of several
    # blocks, and in single blocks: each matches the float64 truth, and they agree with each
    # other within float32 rounding (bit-for-bit where every split holds one block: the
    # same floats are added in the same order)
    W = _randn(1, 100, 70)
    grad = torch.randn(1)
    truth_v, truth_g = _truth(W, kind, side, params, grad)
    results = {}
    if path == "split":
        if cid not in SPLIT_PATH_CONFIGS:
            pytest.skip("the split path on a subset of the kinds (interpreter time)")
        monkeypatch.setattr(TG, "P_MAX_SIDE", 0)
    for target in (1, 8, 10**6):
        monkeypatch.setattr(TG, "TARGET_PROGRAMS", target)
        plan = TG._plan([W], kind, [side], params)
        values, _, (dW,) = _kernel([W], kind, [side], params, grad)
        _close(values, truth_v, *F32_TOL)
        _close(dW, truth_g, *F32_TOL)
        results[plan.splits, plan.jps] = values, dW
    n_cb = -(-TG._plan([W], kind, [side], params).shapes[0][1 + side] // TG.BLOCK_J)
    assert (1, n_cb) in results and (n_cb, 1) in results  # one split / one block per split
    if n_cb >= 4:
        assert len(results) == 3  # and a split of several blocks
    (v_one, g_one) = results[1, n_cb]
    for (splits, jps), (v, g) in results.items():
        _close(v, v_one.double(), *F32_TOL)
        _close(g, g_one.double(), *F32_TOL)
        if jps == 1:
            torch.testing.assert_close(v, v_one, atol=0, rtol=0)
            torch.testing.assert_close(g, g_one, atol=0, rtol=0)


# ----------------------------------------------------------------- arguments and import

@pytest.mark.parametrize("call,match", [
    (lambda: TG.gram_penalty_forward([_randn(1, 3, 4)], "srip", [0], []), "kind must be one of"),
    (lambda: TG.gram_penalty_forward([_randn(1, 3, 4)], "diversity", [1], [0.1, 1.0]), "rows-only"),
    (lambda: TG.gram_penalty_forward([_randn(1, 3, 4)], "frame", [0], [0.5]), "frame takes 2 params"),
    (lambda: TG.gram_penalty_forward([_randn(1, 3, 4)], "frame", [0, 0], [0.5, 1.0]), "one entry per matrix"),
    (lambda: TG.gram_penalty_forward([_randn(1, 3, 4), _randn(1, 3, 4).double()], "orthogonality", [0, 0], []),
     "share one dtype"),
    (lambda: TG.gram_penalty_forward([_randn(1, 3, 4)], "mhe", [0], [3, 0.0, 1e-4, 0.0]), "s must be 0, 1 or 2"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_package_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import regkernels.triton\n"
            "try:\n    import regkernels.triton.gram\nexcept ImportError:\n    print('guarded')\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "guarded"


# ----------------------------------------------------------------- through the public ops


def _public(kind: str):
    return {
        "frame": lambda W, b: G.frame_penalty(W, 0.5, 1.5, "cols", backend=b),
        "diversity": lambda W, b: G.diversity_penalty(W, 0.2, backend=b),
        "orthogonality": lambda W, b: G.orthogonality_penalty(W, "rows", squared=False, backend=b),
        "mhe": lambda W, b: G.mhe_penalty(W, 1, True, backend=b),
    }[kind]


@pytest.mark.parametrize("kind", ["frame", "diversity", "orthogonality", "mhe"])
def test_public_op_triton_backend(kind):
    # (..., m, n) with two leading dims; float64 inputs are refused by a named "triton" (only
    # backend=None falls back, to the reference on CUDA tensors)
    fn = _public(kind)
    W = _randn(2, 3, 9, 14)
    x = W.clone().requires_grad_(True)
    out = fn(x, "triton")
    g = torch.randn(out.shape)
    (out * g).sum().backward()
    X = W.double().requires_grad_(True)
    ref = fn(X, "reference")
    (ref * g.double()).sum().backward()
    assert out.shape == (2, 3) and out.dtype == torch.float32
    _close(out.detach(), ref.detach(), *F32_TOL)
    _close(x.grad, X.grad, *F32_TOL)
    with pytest.raises(ValueError, match=r"the 'triton' backend takes torch.float16, torch.bfloat16, "
                                         r"torch.float32, not torch.float64"):
        fn(W.double(), "triton")


def test_penalty_multi_triton_resnet_like():
    # ResNet-18 topology with channels / 8, a grouped conv, a Linear head: one grouped call
    shapes = [(8, 3, 7, 7), (8, 8, 3, 3), (16, 8, 3, 3), (16, 8, 1, 1), (32, 4, 3, 3), (10, 32)]
    groups = [1, 1, 1, 1, 8, 1]
    weights = [_randn(*s) for s in shapes]
    leaves = [w.clone().requires_grad_(True) for w in weights]
    out = G.penalty_multi(leaves, "frame", backend="triton", groups=groups, A=0.5, B=1.5)
    out.sum().backward()
    ref_leaves = [w.double().requires_grad_(True) for w in weights]
    ref = G.penalty_multi(ref_leaves, "frame", backend="reference", groups=groups, A=0.5, B=1.5)
    ref.sum().backward()
    _close(out.detach(), ref.detach(), *F32_TOL)
    for a, b in zip(leaves, ref_leaves):
        _close(a.grad, b.grad, *F32_TOL)


@pytest.mark.parametrize("kind, params, sides", [("frame", [0.5, 1.5], [0, 1]), ("orthogonality", [], [1, 0]),
                                                 ("mhe", [2.0, 1.0, 1e-3, 0.0], [0, 0])])
def test_opcheck(kind, params, sides):
    mats = [_randn(2, 5, 8).requires_grad_(True), _randn(1, 7, 3).requires_grad_(True)]
    torch.library.opcheck(torch.ops.regkernels.gram_penalty_triton, (mats, kind, sides, params))
    detached = [m.detach() for m in mats]
    _, stats = torch.ops.regkernels.gram_penalty_triton(detached, kind, sides, params)
    torch.library.opcheck(torch.ops.regkernels.gram_penalty_triton_bwd,
                          (detached, kind, sides, params, stats, torch.randn(3)))


def test_torch_compile_fullgraph():
    fn = torch.compile(lambda W: G.frame_penalty(W, 0.5, 1.5, backend="triton"), fullgraph=True)
    W = _randn(2, 9, 14)
    x = W.clone().requires_grad_(True)
    fn(x).sum().backward()
    y = W.clone().requires_grad_(True)
    G.frame_penalty(y, 0.5, 1.5, backend="triton").sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["diversity", "mhe"])
def test_cuda_no_gram_sized_allocation(kind):
    # rows-only kinds on a tall W: the m×m Gram (8192² floats = 256 MiB) dwarfs W (512 KiB);
    # forward + backward must stay O(m·n) (flash-style: O(m) statistics, tiles in registers)
    W = _randn(8192, 16).cuda().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _public(kind)(W, None).backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 16 * 2**20


@pytest.mark.parametrize("kind", ["frame", "diversity", "orthogonality", "mhe", "multi"])
def test_torch_func_grad_and_vmap(kind):
    # the custom op's register_autograd cannot run under torch.func: functorch-wrapped inputs take
    # the Python autograd.Function path (regkernels/triton/gram.py), with a vmap rule
    if kind == "multi":
        def fn(W, b):
            return G.penalty_multi([W[0], W[1].reshape(3, 3, 14)], "frame", backend=b, groups=[1, 3], A=0.5, B=1.5)
    else:
        fn = _public(kind)
    Ws = _randn(3, 2, 9, 14)
    ref = fn(Ws[0].double(), "reference")
    X = Ws[0].double().requires_grad_(True)
    fn(X, "reference").sum().backward()
    grad = torch.func.grad(lambda w: fn(w, "triton").sum())(Ws[0])
    _close(grad, X.grad, *F32_TOL)
    out, vjp_fn = torch.func.vjp(lambda w: fn(w, "triton"), Ws[0])
    _close(out, ref, *F32_TOL)
    _close(vjp_fn(torch.ones_like(out))[0], X.grad, *F32_TOL)
    loop = torch.stack([fn(w, "triton") for w in Ws])
    torch.testing.assert_close(torch.func.vmap(lambda w: fn(w, "triton"))(Ws), loop, rtol=1e-6, atol=1e-7)
    loop_grads = torch.stack([torch.func.grad(lambda w: fn(w, "triton").sum())(w) for w in Ws])
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(lambda w: fn(w, "triton").sum()))(Ws), loop_grads,
                               rtol=1e-6, atol=1e-7)
