"""Tests for the Gram-matrix penalties (docs/gram.md): references against independent
float64 loop formulas, the public ops against the references, gradients, dtypes,
layouts, torch.compile and every error path."""
from __future__ import annotations

import math

import pytest
import torch

from regkernels import _ext
from regkernels.ops import gram as G
from regkernels.reference import gram as R

SHAPES = [(5, 7), (7, 5), (3, 11), (13, 2), (4, 4), (1, 3), (3, 1)]
SIDES = ["rows", "cols", "auto"]
# (dtype, atol, rtol) vs float64 of the same (rounded) input: the error is the float32
# computation plus the final rounding to the output dtype.
DTYPES = [
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 2e-2, 1.6e-2),
    (torch.float32, 1e-5, 1e-5),
]


# ----------------------------------------------------------------- independent formulas
# Plain Python over nested lists (float64): no torch vectorisation shared with the code.

def _side(m: int, n: int, side: str) -> str:
    return ("cols" if m >= n else "rows") if side == "auto" else side


def _loop_gram(W: torch.Tensor, side: str) -> list[list[float]]:
    w = W.double().tolist()
    m, n = len(w), len(w[0])
    if _side(m, n, side) == "rows":
        return [[sum(w[i][t] * w[j][t] for t in range(n)) for j in range(m)] for i in range(m)]
    return [[sum(w[t][i] * w[t][j] for t in range(m)) for j in range(n)] for i in range(n)]


def _loop_d_r(W: torch.Tensor, side: str) -> tuple[list[float], list[float]]:
    V = _loop_gram(W, side)
    k = len(V)
    d = [V[i][i] for i in range(k)]
    r = [sum(abs(V[i][j]) for j in range(k) if j != i) for i in range(k)]
    return d, r


def _loop_frame(W, A, B, side):
    d, r = _loop_d_r(W, side)
    total = 0.0
    for di, ri in zip(d, r):
        total += max(0.0, A - (di - ri)) ** 2 + max(0.0, (di + ri) - B) ** 2
    return total / len(d)


def _loop_gershgorin(W, side):
    d, r = _loop_d_r(W, side)
    return min(di - ri for di, ri in zip(d, r)), max(di + ri for di, ri in zip(d, r))


def _loop_orthogonality(W, side, squared):
    V = _loop_gram(W, side)
    k = len(V)
    total = sum((V[i][j] - (1.0 if i == j else 0.0)) ** 2 for i in range(k) for j in range(k))
    return total if squared else math.sqrt(total)


def _loop_diversity(W, tau, inclusive):
    w = W.double().tolist()
    m = len(w)
    unit = [[x / max(math.sqrt(sum(y * y for y in row)), 1e-12) for x in row] for row in w]
    total = 0.0
    for i in range(m):
        for j in range(m):
            c = sum(a * b for a, b in zip(unit[i], unit[j]))
            hit = abs(c) >= tau if inclusive else abs(c) > tau
            if i != j and hit:
                total += c * c
    return 0.5 * total


def _loop_mhe(W, s, half, eps):
    w = W.double().tolist()
    if half:
        w = w + [[-x for x in row] for row in w]
    p = len(w)
    nu = [math.sqrt(sum(x * x for x in row) + eps) for row in w]
    energies = []
    for i in range(p):
        for j in range(i + 1, p):
            cos = sum(a * b for a, b in zip(w[i], w[j])) / (nu[i] * nu[j])
            delta = 2 - 2 * cos
            energies.append(-math.log(delta) if s == 0 else delta ** (-0.5 if s == 1 else -1.0))
    return sum(energies) / len(energies)


def _loop_srip(W, b, n_iter):
    # explicit Gram (the op is matrix-free) and a hand-written power iteration
    V = _loop_gram(W, "auto")
    k = len(V)
    M = [[V[i][j] - (1.0 if i == j else 0.0) for j in range(k)] for i in range(k)]

    def mul(x):
        return [sum(M[i][j] * x[j] for j in range(k)) for i in range(k)]

    v = b.double().tolist()
    for _ in range(n_iter):
        u = mul(v)
        norm = math.sqrt(sum(x * x for x in u))
        v = [x / norm for x in u]
    return sum(x * x for x in mul(v))


def _randn(*shape, dtype=torch.float64):
    # rows of norm ≈ 1 so the penalties are O(1) and every hinge is exercised
    return torch.randn(*shape, dtype=dtype) / math.sqrt(shape[-1])


def _close(actual, expected, rtol=1e-12, atol=1e-12):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


# ----------------------------------------------------------------- reference vs loops

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", SIDES)
def test_frame_and_gershgorin_vs_loops(shape, side):
    W = 1.5 * _randn(*shape)
    for A, B in ((0.0, 1.0), (0.3, 1.2), (0.5, 2.0)):
        _close(R.frame_penalty(W, A, B, side), _loop_frame(W, A, B, side))
    lo, hi = R.gershgorin_bounds(W, side)
    _close((lo, hi), _loop_gershgorin(W, side))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("squared", [True, False])
def test_orthogonality_vs_loops(shape, side, squared):
    W = _randn(*shape)
    _close(R.orthogonality_penalty(W, side, squared), _loop_orthogonality(W, side, squared))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("inclusive", [True, False])
def test_diversity_vs_loops(shape, inclusive):
    W = _randn(*shape)
    for tau in (0.0, 0.2, 0.6, 1.0):
        _close(R.diversity_penalty(W, tau, inclusive), _loop_diversity(W, tau, inclusive))


# a single row has a pair only in the half-space form [w; −w]
MHE_SHAPES = [(shape, half) for shape in SHAPES for half in (False, True) if shape[0] >= 2 or half]


@pytest.mark.parametrize("shape, half", MHE_SHAPES)
@pytest.mark.parametrize("s", [0, 1, 2])
def test_mhe_vs_loops(shape, half, s):
    W = _randn(*shape)
    for eps in (1e-4, 0.5):
        _close(R.mhe_penalty(W, s, half, eps), _loop_mhe(W, s, half, eps))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_iter", [1, 3])
def test_srip_vs_power_iteration(shape, n_iter):
    W = _randn(*shape)
    b = torch.rand(min(shape), dtype=torch.float64)
    _close(R.srip_penalty(W, b, n_iter), _loop_srip(W, b, n_iter), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_frame_bounds_vs_eigvalsh(shape):
    W = _randn(*shape)
    V = torch.tensor(_loop_gram(W, "auto"), dtype=torch.float64)
    ev = torch.linalg.eigvalsh(V)
    lo, hi = R.frame_bounds(W)
    _close((lo, hi), (ev[0], ev[-1]), rtol=1e-10, atol=1e-12)


def test_gram_sides():
    W = _randn(3, 5)
    _close(R.gram(W, "rows"), _loop_gram(W, "rows"))
    _close(R.gram(W, "cols"), _loop_gram(W, "cols"))
    assert R.gram(W, "auto").shape == (3, 3)
    assert R.gram(W.mT, "auto").shape == (3, 3)


# ----------------------------------------------------------------- exact boundaries

def test_frame_hinge_exactly_at_boundary():
    # rows (1, 1), (1, 0): W Wᵀ = [[2, 1], [1, 1]], d − r = (1, 0), d + r = (3, 2)
    W = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    value = G.frame_penalty(W, 0.0, 3.0, side="rows")
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(W.grad, torch.zeros_like(W))
    # just outside on each side: (3 − 2.5)² / 2 and (0.5 − 0)² / 2
    assert G.frame_penalty(W.detach(), 0.0, 2.5, side="rows").item() == 0.125
    assert G.frame_penalty(W.detach(), 0.5, 3.0, side="rows").item() == 0.125
    # an orthonormal matrix sits on both boundaries of A = B = 1
    Q = torch.eye(3, dtype=torch.float64, requires_grad=True)
    G.frame_penalty(Q, 1.0, 1.0).backward()
    assert torch.equal(Q.grad, torch.zeros_like(Q))


def test_diversity_mask_at_tau_exactly():
    # normalised rows (½,½,½,½), (½,½,½,−½), (½,−½,−½,−½): C_12 = ½, C_13 = −½, C_23 = 0, all exact
    W = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, -1.0], [1.0, -1.0, -1.0, -1.0]])
    for dtype in (torch.float32, torch.float64):
        X = W.to(dtype)
        assert G.diversity_penalty(X, 0.5, inclusive=True).item() == 0.5  # ½·(2·¼ + 2·¼)
        assert G.diversity_penalty(X, 0.5, inclusive=False).item() == 0.0
        assert G.diversity_penalty(X, 0.0, inclusive=False).item() == 0.5
        assert G.diversity_penalty(X, 0.0, inclusive=True).item() == 0.5  # C_23 = 0 adds 0²


def test_diversity_mask_carries_no_gradient():
    W = _randn(4, 6).requires_grad_(True)
    G.diversity_penalty(W, 1.0).backward()  # only the diagonal could reach tau = 1
    assert torch.equal(W.grad, torch.zeros_like(W))


def test_mhe_duplicate_filters_are_infinite():
    # ‖w‖² = 1e4 ≫ eps: δ = 2·eps/(‖w‖² + eps) rounds to 0 in float32 and is not clamped
    W = torch.tensor([[100.0, 0.0], [100.0, 0.0], [0.0, 1.0]])
    assert torch.isinf(G.mhe_penalty(W, s=2))
    assert torch.isinf(G.mhe_penalty(W, s=0))


def test_orthogonality_zero_for_orthonormal():
    Q, _ = torch.linalg.qr(torch.randn(7, 4, dtype=torch.float64))
    assert G.orthogonality_penalty(Q).item() < 1e-28
    assert G.orthogonality_penalty(Q.mT).item() < 1e-28  # auto picks the 4×4 Gram
    assert G.orthogonality_penalty(Q.mT, side="cols").item() > 2.9  # Q Qᵀ on 7 dims: ‖P − I‖² = 3


# ----------------------------------------------------------------- public op == reference

def _public_and_reference():
    return [
        ("frame", lambda W: G.frame_penalty(W, 0.5, 1.5), lambda W: R.frame_penalty(W, 0.5, 1.5)),
        ("frame_rows", lambda W: G.frame_penalty(W, 0.2, 1.0, "rows"), lambda W: R.frame_penalty(W, 0.2, 1.0, "rows")),
        ("gershgorin", lambda W: G.gershgorin_bounds(W, "cols"), lambda W: R.gershgorin_bounds(W, "cols")),
        ("frame_bounds", G.frame_bounds, R.frame_bounds),
        ("diversity", lambda W: G.diversity_penalty(W, 0.1), lambda W: R.diversity_penalty(W, 0.1)),
        ("orthogonality", lambda W: G.orthogonality_penalty(W, squared=False),
         lambda W: R.orthogonality_penalty(W, squared=False)),
        ("mhe", lambda W: G.mhe_penalty(W, 1, True), lambda W: R.mhe_penalty(W, 1, True)),
        ("srip", lambda W: G.srip_penalty(W, 2, torch.Generator().manual_seed(7)),
         lambda W: R.srip_penalty(W, _seeded_b(W, 7), 2)),
    ]


PAIRS = _public_and_reference()
PAIR_IDS = [p[0] for p in PAIRS]


def _seeded_b(W, seed):
    k = min(W.shape[-2:])
    return torch.rand(*W.shape[:-2], k, generator=torch.Generator().manual_seed(seed))


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("name, public, reference", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("backend", [None, "reference"])
def test_public_equals_reference(name, public, reference, backend):
    W = _randn(2, 6, 9)
    # without backend= the op dispatches (to the C++ kernel where one exists: equal to rounding);
    # backend="reference" must run the reference itself
    out = public(W) if backend is None else _with_backend(name, W, backend)
    for a, b in zip(_tuple(out), _tuple(reference(W))):
        if backend is None:
            _close(a, b, rtol=1e-12, atol=1e-14)
        else:
            assert torch.equal(a, b)


def _with_backend(name, W, backend):
    calls = {
        "frame": lambda: G.frame_penalty(W, 0.5, 1.5, backend=backend),
        "frame_rows": lambda: G.frame_penalty(W, 0.2, 1.0, "rows", backend=backend),
        "gershgorin": lambda: G.gershgorin_bounds(W, "cols", backend=backend),
        "frame_bounds": lambda: G.frame_bounds(W, backend=backend),
        "diversity": lambda: G.diversity_penalty(W, 0.1, backend=backend),
        "orthogonality": lambda: G.orthogonality_penalty(W, squared=False, backend=backend),
        "mhe": lambda: G.mhe_penalty(W, 1, True, backend=backend),
        "srip": lambda: G.srip_penalty(W, 2, torch.Generator().manual_seed(7), backend=backend),
        "multi": lambda: G.penalty_multi([W[0], W[1]], "frame", backend=backend, A=0.5, B=1.5),
    }
    return calls[name]()


# ops with a fused kernel (csrc/cpu/gram_cpu.cpp, regkernels/triton/gram.py); the others run
# their reference on every device, SRIP its composite (backend "torch")
KERNEL_IDS = {"frame", "frame_rows", "diversity", "orthogonality", "mhe", "multi"}


def _cpu_backends(name):
    """The backends that take CPU float64 inputs, in table order (Triton takes fp16/bf16/fp32)."""
    if name == "srip":  # torch matvecs with a one-product backward (composite/gram.py)
        return ["torch", "reference"]
    if name not in KERNEL_IDS:
        return ["reference"]
    return ["cpu", "reference"]


@pytest.mark.parametrize("name", PAIR_IDS + ["multi"])
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda", "torch"])
def test_missing_kernel_backend_raises(name, backend):
    have = _cpu_backends(name)
    if backend in have:
        return  # covered by tests/test_gram_cpu.py and tests/test_robust_gram.py
    listing = ", ".join(repr(b) for b in have)
    # no row for the backend, or a row that cannot take the input: Triton has no float64 (a
    # named backend never falls back to the reference)
    why = (rf"the 'triton' backend (takes torch.float16, torch.bfloat16, torch.float32, not torch.float64|"
           rf"cannot run here: .*)" if backend == "triton" and name in KERNEL_IDS and _ext.has_triton()
           else rf"no '{backend}' backend for cpu tensors")
    with pytest.raises(ValueError, match=rf": {why}; backends that take cpu fp64 inputs here: {listing}$"):
        _with_backend(name, _randn(2, 6, 9), backend)


@pytest.mark.skipif(not _ext.triton_interpreted(), reason="Triton is not installed or not interpreted")
@pytest.mark.parametrize("name", sorted(KERNEL_IDS))
def test_named_triton_refuses_float64(name):
    # before the backend tables, a named "triton" ran the reference on float64 without a word
    with pytest.raises(ValueError, match=r"the 'triton' backend takes torch.float16, torch.bfloat16, "
                                         r"torch.float32, not torch.float64; backends that take cpu fp64 inputs "
                                         r"here: 'cpu', 'reference'$"):
        _with_backend(name, _randn(2, 6, 9), "triton")


def test_penalty_multi_mixed_dtypes_run_the_reference_only():
    weights = [_randn(4, 3, dtype=torch.float32), _randn(5, 2, dtype=torch.float64)]
    # backend=None picks the reference, which computes each layer in its own dtype
    assert torch.equal(G.penalty_multi(weights, "frame", A=0.5, B=1.5),
                       G.penalty_multi(weights, "frame", backend="reference", A=0.5, B=1.5))
    kernels = ["cpu"] if _ext.HAS_C else []
    for backend in kernels + (["triton"] if _ext.triton_interpreted() else []):
        with pytest.raises(ValueError, match=rf"penalty_multi: weights of mixed dtypes \(torch.float32, "
                                             rf"torch.float64\) run only on backend='reference'.*'{backend}' kernel "
                                             rf"takes one dtype"):
            G.penalty_multi(weights, "frame", backend=backend, A=0.5, B=1.5)
    # SRIP runs per weight in every backend, mixed dtypes too
    if _ext.HAS_C:
        out = G.penalty_multi(weights, "srip", backend="cpu", generator=torch.Generator().manual_seed(2))
        ref = G.penalty_multi(weights, "srip", backend="reference", generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(out, ref)


def test_backend_is_keyword_only():
    with pytest.raises(TypeError):
        G.frame_penalty(_randn(3, 4), 0.0, 1.0, "auto", "reference")
    with pytest.raises(TypeError, match=r"frame_penalty: backend must be None or one of"):
        G.frame_penalty(_randn(3, 4), 0.0, 1.0, backend=1)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match=r"frame_penalty: backend must be None or one of 'reference'"):
        G.frame_penalty(_randn(3, 4), 0.0, 1.0, backend="gpu")


def test_srip_public_is_seeded_and_reproducible():
    W = _randn(2, 3, 5, 8)
    first = G.srip_penalty(W, 3, generator=torch.Generator().manual_seed(11))
    again = G.srip_penalty(W, 3, generator=torch.Generator().manual_seed(11))
    other = G.srip_penalty(W, 3, generator=torch.Generator().manual_seed(12))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # one start vector per matrix, drawn in float32 so every dtype sees the same start
    torch.testing.assert_close(first, R.srip_penalty(W, _seeded_b(W, 11), 3), rtol=0, atol=0)
    W32 = W.float()
    torch.testing.assert_close(G.srip_penalty(W32, 3, generator=torch.Generator().manual_seed(11)),
                               first.float(), rtol=1e-4, atol=1e-6)


def test_srip_converges_to_spectral_norm():
    # M = WᵀW − I with singular values (2, 1, 0.5): eigenvalues 3, 0, −0.75 → R → 9
    Q, _ = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))
    W = Q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    _close(G.srip_penalty(W, 60), 9.0, rtol=1e-9, atol=0)


# ----------------------------------------------------------------- gradients

def _gradcheck_cases():
    return [
        ("frame", lambda W: G.frame_penalty(W, 0.5, 1.2)),
        ("frame_cols", lambda W: G.frame_penalty(W, 0.1, 0.9, "cols")),
        ("gershgorin", lambda W: G.gershgorin_bounds(W)),
        ("frame_bounds", lambda W: G.frame_bounds(W)),
        ("diversity", lambda W: G.diversity_penalty(W, 0.25)),
        ("orthogonality", lambda W: G.orthogonality_penalty(W)),
        ("orthogonality_norm", lambda W: G.orthogonality_penalty(W, "rows", squared=False)),
        ("mhe_s0_half", lambda W: G.mhe_penalty(W, 0, True)),
        ("mhe_s1", lambda W: G.mhe_penalty(W, 1)),
        ("mhe_s2", lambda W: G.mhe_penalty(W, 2, eps=0.1)),
        ("srip", lambda W: G.srip_penalty(W, 2, torch.Generator().manual_seed(5))),
    ]


@pytest.mark.parametrize("name, fn", _gradcheck_cases(), ids=[c[0] for c in _gradcheck_cases()])
@pytest.mark.parametrize("shape", [(4, 6), (2, 5, 3)])
def test_gradcheck(name, fn, shape):
    W = _randn(*shape).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (W,))


def test_gradcheck_penalty_multi():
    ws = (_randn(4, 2, 3, 3).requires_grad_(True), _randn(5, 3).requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, b: G.penalty_multi([a, b], "frame", A=0.4, B=1.1), ws)
    assert torch.autograd.gradcheck(
        lambda a, b: G.penalty_multi([a, b], "srip", groups=[2, 1], generator=torch.Generator().manual_seed(1)), ws)


# ----------------------------------------------------------------- dtypes, layouts, batches

@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=[str(d[0]) for d in DTYPES])
@pytest.mark.parametrize("name, public, reference", PAIRS, ids=PAIR_IDS)
def test_dtypes_vs_float64(dtype, atol, rtol, name, public, reference):
    W = _randn(3, 6, 10).to(dtype)
    out = _tuple(public(W))
    truth = _tuple(public(W.double()))  # float64 of the same rounded input
    for o, t in zip(out, truth):
        assert o.dtype == dtype and o.shape == (3,)
        torch.testing.assert_close(o.double(), t, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name, public, reference", PAIRS, ids=PAIR_IDS)
def test_batched_matches_per_matrix(name, public, reference):
    W = _randn(2, 3, 5, 7)
    out = _tuple(public(W))
    assert all(o.shape == (2, 3) for o in out)
    if name == "srip":  # the batched op draws one start per matrix from the generator
        b = _seeded_b(W, 7)
        expected = [[R.srip_penalty(W[i, j], b[i, j], 2) for j in range(3)] for i in range(2)]
        _close(out[0], expected)
        return
    for i in range(2):
        for j in range(3):
            for o, e in zip(out, _tuple(public(W[i, j]))):
                _close(o[i, j], e)


@pytest.mark.parametrize("name, public, reference", PAIRS, ids=PAIR_IDS)
def test_non_contiguous_and_expanded(name, public, reference):
    base = _randn(2, 9, 12)
    views = {
        "transposed": base.mT,  # (2, 12, 9)
        "sliced": base[:, 1::2, ::3],  # (2, 4, 4)
        "expanded": base[:1, :5, :7].expand(3, 5, 7),
    }
    for view in views.values():
        assert not view.is_contiguous()
        for o, e in zip(_tuple(public(view)), _tuple(public(view.contiguous()))):
            _close(o, e, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name, public, reference", PAIRS, ids=PAIR_IDS)
def test_empty_batch(name, public, reference):
    for o in _tuple(public(_randn(0, 4, 6))):
        assert o.shape == (0,)
    for o in _tuple(public(_randn(2, 0, 5, 3))):
        assert o.shape == (2, 0)


@pytest.mark.parametrize("name, public, reference", PAIRS, ids=PAIR_IDS)
def test_inputs_not_modified(name, public, reference):
    W = _randn(5, 7).requires_grad_(True)
    before = W.detach().clone()
    out = _tuple(public(W))
    sum(o.sum() for o in out).backward()
    assert torch.equal(W.detach(), before)


# ----------------------------------------------------------------- as_matrix and penalty_multi

def test_as_matrix():
    lin = torch.randn(10, 6)
    assert G.as_matrix(lin) is lin
    conv = torch.randn(6, 4, 3, 3)
    assert G.as_matrix(conv).shape == (6, 36)
    assert torch.equal(G.as_matrix(conv)[2], conv[2].reshape(-1))
    grouped = G.as_matrix(conv, groups=3)  # (out=6, in/g=4) with g=3: 3 groups of 2 filters
    assert grouped.shape == (3, 2, 36)
    for g in range(3):
        assert torch.equal(grouped[g], conv[2 * g:2 * g + 2].reshape(2, -1))
    assert G.as_matrix(torch.randn(4, 2, 5), groups=2).shape == (2, 2, 10)  # conv1d


def _resnet18_like(dtype=torch.float64):
    # ResNet-18 topology with channel counts divided by 8 and a 10-class head
    shapes = [(8, 3, 7, 7)]
    c_in = 8
    for c in (8, 16, 32, 64):
        for block in range(2):
            shapes += [(c, c_in, 3, 3), (c, c, 3, 3)]
            if block == 0 and c != c_in:
                shapes.append((c, c_in, 1, 1))
            c_in = c
    shapes.append((10, 64))
    return [_randn(*s, dtype=dtype) for s in shapes]


MULTI_KINDS = [
    ("frame", {"A": 0.5, "B": 2.0}, lambda w: G.frame_penalty(G.as_matrix(w), 0.5, 2.0)),
    ("diversity", {"tau": 0.1, "inclusive": False}, lambda w: G.diversity_penalty(G.as_matrix(w), 0.1, False)),
    ("orthogonality", {"side": "cols"}, lambda w: G.orthogonality_penalty(G.as_matrix(w), "cols")),
    ("mhe", {"s": 0, "half": True}, lambda w: G.mhe_penalty(G.as_matrix(w), 0, True)),
]


@pytest.mark.parametrize("kind, kw, single", MULTI_KINDS, ids=[k[0] for k in MULTI_KINDS])
def test_penalty_multi_resnet18_like(kind, kw, single):
    weights = _resnet18_like()
    out = G.penalty_multi(weights, kind, **kw)
    assert out.shape == (len(weights),)
    _close(out, torch.stack([single(w) for w in weights]))
    _close(out, R.penalty_multi(weights, kind, **kw))


def test_penalty_multi_srip_draws_in_list_order():
    weights = _resnet18_like()
    out = G.penalty_multi(weights, "srip", n_iter=2, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    _close(out, torch.stack([G.srip_penalty(G.as_matrix(w), 2, gen) for w in weights]))


def test_penalty_multi_grouped_is_mean_over_groups():
    conv = _randn(8, 3, 3, 3)
    lin = _randn(6, 5)
    out = G.penalty_multi([conv, lin], "frame", groups=[4, 1], A=0.5, B=1.5)
    per_group = [_loop_frame(conv[2 * g:2 * g + 2].reshape(2, -1), 0.5, 1.5, "auto") for g in range(4)]
    _close(out, [sum(per_group) / 4, _loop_frame(lin, 0.5, 1.5, "auto")])


def test_penalty_multi_dtypes_and_empty():
    out = G.penalty_multi([_randn(4, 3, dtype=torch.float32), _randn(5, 2, dtype=torch.float16)],
                          "orthogonality")
    assert out.dtype == torch.float32 and out.shape == (2,)
    empty = G.penalty_multi([], "frame", A=0.0, B=1.0)
    assert empty.shape == (0,)


# ----------------------------------------------------------------- torch.compile

def _compile_cases():
    gen_free_srip = lambda W: G.srip_penalty(W, 2)  # noqa: E731 - a generator object is not traceable
    return [
        ("as_matrix", lambda W: G.as_matrix(W.reshape(6, 2, 2, 2), groups=2).sum()),
        ("frame_penalty", lambda W: G.frame_penalty(W, 0.5, 1.5)),
        ("gershgorin_bounds", lambda W: G.gershgorin_bounds(W)),
        ("frame_bounds", lambda W: G.frame_bounds(W)),
        ("diversity_penalty", lambda W: G.diversity_penalty(W, 0.2)),
        ("orthogonality_penalty", lambda W: G.orthogonality_penalty(W)),
        ("mhe_penalty", lambda W: G.mhe_penalty(W, 1)),
        ("srip_penalty", gen_free_srip),
        ("penalty_multi", lambda W: G.penalty_multi([W, W.reshape(6, 2, 2, 2)], "frame", A=0.5, B=1.5)),
    ]


def _value_and_grad(fn, W):
    x = W.clone().requires_grad_(True)
    out = _tuple(fn(x))
    sum(o.sum() for o in out).backward()
    return out, x.grad


@pytest.mark.parametrize("name, fn", _compile_cases(), ids=[c[0] for c in _compile_cases()])
def test_torch_compile_fullgraph(name, fn):
    # frame_penalty at 64×576 guards the reference's workaround for an inductor miscompile
    # of diagonal()'s backward (see reference/gram.py _diag_and_radius)
    W = _randn(64, 576, dtype=torch.float32) if name == "frame_penalty" else _randn(6, 8, dtype=torch.float32)
    # fallback_random: the compiled torch.rand (srip's start vector) uses the eager RNG stream
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(1)
        compiled, compiled_grad = _value_and_grad(torch.compile(fn, fullgraph=True), W)
    torch.manual_seed(1)
    eager, eager_grad = _value_and_grad(fn, W)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- torch.func

# (name, public op with backend=None, reference) on one matrix stack; the defaults run the C++
# kernel (CPU tensors) or SRIP's composite, whose autograd cannot run under torch.func: they take
# the Python autograd.Function path for functorch-wrapped inputs
FUNC_CASES = [
    ("frame", lambda W: G.frame_penalty(W, 0.5, 1.5), lambda W: R.frame_penalty(W, 0.5, 1.5)),
    ("frame_rows", lambda W: G.frame_penalty(W, 0.2, 1.0, "rows"), lambda W: R.frame_penalty(W, 0.2, 1.0, "rows")),
    ("diversity", lambda W: G.diversity_penalty(W, 0.1), lambda W: R.diversity_penalty(W, 0.1)),
    ("orthogonality", lambda W: G.orthogonality_penalty(W), lambda W: R.orthogonality_penalty(W)),
    ("orthogonality_norm", lambda W: G.orthogonality_penalty(W, "cols", False),
     lambda W: R.orthogonality_penalty(W, "cols", False)),
    ("mhe", lambda W: G.mhe_penalty(W, 1, True), lambda W: R.mhe_penalty(W, 1, True)),
    ("srip", lambda W: G.srip_penalty(W, 2, torch.Generator().manual_seed(7)),
     lambda W: R.srip_penalty(W, _seeded_b(W, 7), 2)),
    ("multi", lambda W: G.penalty_multi([W[0], W[1].reshape(3, 2, 9)], "frame", groups=[1, 3], A=0.5, B=1.5),
     lambda W: R.penalty_multi([W[0], W[1].reshape(3, 2, 9)], "frame", groups=[1, 3], A=0.5, B=1.5)),
    ("multi_srip", lambda W: G.penalty_multi([W[0], W[1]], "srip", n_iter=2, generator=torch.Generator().manual_seed(5)),
     lambda W: R.penalty_multi([W[0], W[1]], "srip", b=_drawn_in_order(5, 2, min(W.shape[-2:])), n_iter=2)),
]
FUNC_IDS = [c[0] for c in FUNC_CASES]


def _drawn_in_order(seed, count, k):
    """``count`` start vectors drawn one after the other from one generator (penalty_multi's srip)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(k, generator=gen) for _ in range(count)]


def _reference_grad(reference, W, cotangent):
    X = W.clone().requires_grad_(True)
    (reference(X) * cotangent).sum().backward()
    return X.grad


@pytest.mark.parametrize("name, public, reference", FUNC_CASES, ids=FUNC_IDS)
def test_torch_func_grad_and_vjp_equal_the_reference_gradient(name, public, reference):
    W = _randn(2, 6, 9)
    cot = torch.rand(reference(W).shape, dtype=W.dtype) + 0.5
    expected = _reference_grad(reference, W, cot)
    _close(torch.func.grad(lambda w: (public(w) * cot).sum())(W), expected, rtol=1e-10, atol=1e-12)
    out, vjp_fn = torch.func.vjp(public, W)
    _close(out, reference(W), rtol=1e-12, atol=1e-14)
    (dW,) = vjp_fn(cot)
    _close(dW, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, public, reference", FUNC_CASES, ids=FUNC_IDS)
def test_torch_func_vmap_equals_a_loop(name, public, reference):
    Ws = _randn(3, 2, 6, 9)
    if name.endswith("srip"):
        # SRIP draws its start vector inside the op: vmap needs randomness="same" (every call
        # draws the same b from its freshly seeded generator, as the loop does)
        vmapped = torch.func.vmap(public, randomness="same")
        grads = torch.func.vmap(torch.func.grad(lambda w: public(w).sum()), randomness="same")(Ws)
    else:
        vmapped = torch.func.vmap(public)
        grads = torch.func.vmap(torch.func.grad(lambda w: public(w).sum()))(Ws)
    _close(vmapped(Ws), torch.stack([public(w) for w in Ws]), rtol=1e-12, atol=1e-14)
    _close(grads, torch.stack([torch.func.grad(lambda w: public(w).sum())(w) for w in Ws]), rtol=1e-12, atol=1e-14)
    if not name.endswith("srip"):  # a vmapped dim other than 0, and jacrev (a vmapped cotangent)
        _close(torch.func.vmap(public, in_dims=1)(Ws.movedim(0, 1)), vmapped(Ws), rtol=1e-12, atol=1e-14)
        W = Ws[0]
        jac = torch.func.jacrev(public)(W)
        for idx in range(len(reference(W))):
            onehot = torch.zeros(reference(W).shape, dtype=W.dtype)
            onehot[idx] = 1.0
            _close(jac[idx], _reference_grad(reference, W, onehot), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not _ext.HAS_C, reason="regkernels._C is not built")
def test_torch_func_second_derivative_of_the_kernel_is_refused_naming_reference():
    W = _randn(5, 3)
    with pytest.raises(RuntimeError, match=r"frame_penalty .*double backward.*'cpu'.*backend='reference'"):
        torch.func.grad(lambda w: torch.func.grad(lambda x: G.frame_penalty(x, 0.5, 1.5))(w).square().sum())(W)
    # SRIP's composite and the reference differentiate twice
    srip = lambda w: G.srip_penalty(w, 2, torch.Generator().manual_seed(1))  # noqa: E731
    hess = torch.func.jacrev(torch.func.jacrev(srip))(W)
    ref = torch.autograd.functional.hessian(lambda w: R.srip_penalty(w, _seeded_b(w, 1), 2), W)
    _close(hess, ref, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------- bad input

W0 = torch.randn(4, 5)
BAD = [
    (lambda: G.frame_penalty(torch.randn(5), 0.0, 1.0),
     ValueError, r"frame_penalty: W must have at least 2 dims \(\.\.\., m, n\)"),
    (lambda: G.frame_penalty(torch.ones(3, 3, dtype=torch.int64), 0.0, 1.0),
     TypeError, r"frame_penalty: W must have a floating dtype"),
    (lambda: G.frame_penalty([[1.0]], 0.0, 1.0), TypeError, r"frame_penalty: W must be a torch.Tensor"),
    (lambda: G.frame_penalty(torch.randn(3, 0), 0.0, 1.0),
     ValueError, r"frame_penalty: W must have m >= 1 rows and n >= 1 columns"),
    (lambda: G.frame_penalty(W0, -0.5, 1.0), ValueError, r"frame_penalty: A must be >= 0; got A=-0.5"),
    (lambda: G.frame_penalty(W0, 2.0, 1.0), ValueError, r"frame_penalty: need A <= B; got A=2.0, B=1.0"),
    (lambda: G.frame_penalty(W0, torch.tensor(0.0), 1.0), TypeError, r"frame_penalty: A must be a real number"),
    (lambda: G.frame_penalty(W0, 0.0, 1.0, side="diag"),
     ValueError, r"frame_penalty: side must be 'auto', 'rows' or 'cols'; got 'diag'"),
    (lambda: G.gershgorin_bounds(W0, side="both"),
     ValueError, r"gershgorin_bounds: side must be 'auto', 'rows' or 'cols'"),
    (lambda: G.gershgorin_bounds(torch.randn(3)), ValueError, r"gershgorin_bounds: W must have at least 2 dims"),
    (lambda: G.frame_bounds(torch.ones(2, 2, dtype=torch.bool)),
     TypeError, r"frame_bounds: W must have a floating dtype"),
    (lambda: G.diversity_penalty(W0, -0.1), ValueError, r"diversity_penalty: tau must be >= 0.0; got tau=-0.1"),
    (lambda: G.diversity_penalty(W0, 1.5), ValueError, r"diversity_penalty: tau must be <= 1.0; got tau=1.5"),
    (lambda: G.diversity_penalty(W0, 0.5, inclusive="yes"),
     TypeError, r"diversity_penalty: inclusive must be True or False"),
    (lambda: G.orthogonality_penalty(W0, side="row"),
     ValueError, r"orthogonality_penalty: side must be 'auto', 'rows' or 'cols'"),
    (lambda: G.orthogonality_penalty(W0, squared=1),
     TypeError, r"orthogonality_penalty: squared must be True or False"),
    (lambda: G.mhe_penalty(W0, s=3), ValueError, r"mhe_penalty: s must be 0 \(log energy\), 1 or 2"),
    (lambda: G.mhe_penalty(W0, s=1.5), TypeError, r"mhe_penalty: s must be an integer"),
    (lambda: G.mhe_penalty(W0, eps=0.0), ValueError, r"mhe_penalty: eps must be > 0; got eps=0.0"),
    (lambda: G.mhe_penalty(W0, eps=-1e-4), ValueError, r"mhe_penalty: eps must be > 0"),
    (lambda: G.mhe_penalty(W0, half=None), TypeError, r"mhe_penalty: half must be True or False"),
    (lambda: G.mhe_penalty(torch.randn(1, 5)), ValueError, r"mhe_penalty: W needs at least 2 rows .* or half=True"),
    (lambda: G.srip_penalty(W0, n_iter=0), ValueError, r"srip_penalty: n_iter must be >= 1; got n_iter=0"),
    (lambda: G.srip_penalty(W0, n_iter=2.0), TypeError, r"srip_penalty: n_iter must be an integer"),
    (lambda: G.srip_penalty(W0, generator=3), TypeError, r"srip_penalty: generator must be a torch.Generator or None"),
    (lambda: G.srip_penalty(torch.ones(2, 2, 3, dtype=torch.int32)),
     TypeError, r"srip_penalty: W must have a floating dtype"),
    (lambda: G.as_matrix(torch.randn(8, 2, 3, 3), groups=3),
     ValueError, r"as_matrix: groups must divide the output channels of weight"),
    (lambda: G.as_matrix(torch.randn(8, 4), groups=2),
     ValueError, r"as_matrix: groups must be 1 for a 2-D \(Linear\) weight"),
    (lambda: G.as_matrix(torch.randn(8, 4, 3), groups=0), ValueError, r"as_matrix: groups must be >= 1"),
    (lambda: G.as_matrix(torch.randn(8)), ValueError, r"as_matrix: weight must have at least 2 dims \(out, in\)"),
    (lambda: G.penalty_multi(W0, "frame", A=0.0, B=1.0),
     TypeError, r"penalty_multi: weights must be a list or tuple of weight tensors"),
    (lambda: G.penalty_multi([W0, "w"], "frame", A=0.0, B=1.0),
     TypeError, r"penalty_multi: weights\[1\] must be a torch.Tensor"),
    (lambda: G.penalty_multi([torch.randn(4)], "frame", A=0.0, B=1.0),
     ValueError, r"penalty_multi: weights\[0\] must have at least 2 dims"),
    (lambda: G.penalty_multi([W0], "nuclear"),
     ValueError, r"penalty_multi: kind must be one of 'frame', 'diversity', 'orthogonality', 'mhe', 'srip'; got 'nuclear'"),
    (lambda: G.penalty_multi([W0], "frame", A=0.0),
     TypeError, r"penalty_multi: kind='frame' takes keyword arguments A, B, side .* missing \['B'\]"),
    (lambda: G.penalty_multi([W0], "mhe", tau=0.1),
     TypeError, r"penalty_multi: kind='mhe' takes keyword arguments s, half, eps, angular .* unknown \['tau'\]"),
    (lambda: G.penalty_multi([W0], "frame", A=2.0, B=1.0), ValueError, r"penalty_multi: need A <= B"),
    (lambda: G.penalty_multi([W0, W0], "frame", groups=[1], A=0.0, B=1.0),
     ValueError, r"penalty_multi: groups must be one int or one per weight \(2\)"),
    (lambda: G.penalty_multi([torch.randn(6, 2, 3, 3)], "frame", groups=4, A=0.0, B=1.0),
     ValueError, r"penalty_multi: groups must divide the output channels of weights\[0\]"),
    (lambda: G.penalty_multi([torch.randn(1, 4)], "mhe"),
     ValueError, r"penalty_multi: as_matrix\(weights\[0\]\) needs at least 2 rows"),
    (lambda: G.penalty_multi([W0, torch.randn(3, 3, device="meta")], "frame", A=0.0, B=1.0),
     ValueError, r"penalty_multi: all tensors must be on one device; got weights\[0\] on cpu, weights\[1\] on meta"),
]


@pytest.mark.parametrize("call, exc, match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
