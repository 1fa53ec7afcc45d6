"""OCNN input-side orthogonality, conv_orthogonality_penalty(side="cols") and its _multi variant
(docs/conv.md#input-side): the tap-Gram path ("torch") and the reference against the dense operator
T of conv_to_matrix, against our own float64 transcription of the official conv_orth_dist formula,
and against closed forms (stride 1 = the output side of the transposed kernel, stride = kernel =
the plain matrix ‖MᵀM − I‖², the circular operator's ‖TᵀT − I‖²), plus gradients, torch.func,
torch.compile, dtypes, NaN placement, memory guards, bad inputs and Regularizer(kind="ocnn", side="cols")."""
from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regkernels
from regkernels.composite import conv as C
from regkernels.nn import Regularizer
from regkernels.ops.conv import conv_to_matrix
from regkernels.reference import conv as R

D64 = torch.float64
OPS = "conv_orthogonality_penalty", "conv_orthogonality_penalty_multi"

# (shape (o, c, *k), stride): 1-D / 2-D / 3-D, odd channel counts, c > o and c < o, even and odd
# kernels, strides 1–3 including stride > kernel (pixels no tap reads)
GEOMETRIES = [
    ((3, 2, 3, 3), 1), ((3, 2, 3, 3), 2), ((3, 5, 3, 3), 3), ((5, 3, 2, 2), 2), ((2, 3, 2, 3), (3, 1)),
    ((1, 3, 1, 1), 2), ((4, 3, 5), 1), ((3, 5, 4), 2), ((2, 1, 2), 3),
    ((2, 3, 2, 3, 2), 1), ((3, 2, 3, 2, 2), (1, 2, 3)),
]


def _dense_oracle(w: torch.Tensor, stride) -> torch.Tensor:
    """Σ over one pixel per phase of ‖its rows of TᵀT − identity rows‖², T = conv_to_matrix on an
    unpadded input wide enough that the chosen pixels' rows are complete (float64)."""
    w = w.detach().double()
    c, kernel = w.shape[1], tuple(w.shape[2:])
    S = tuple(stride) if not isinstance(stride, int) else (stride,) * len(kernel)
    first = [-(-(k - 1) // s) * s for k, s in zip(kernel, S)]  # a multiple of S, >= k − 1
    size = [f + 2 * s + 2 * k for f, s, k in zip(first, S, kernel)]
    T = conv_to_matrix(w, size, stride=S)
    V = (T.T @ T).reshape(c, *size, c, *size)
    total = 0.0
    for r in itertools.product(*[range(s) for s in S]):
        u = tuple(f + ri for f, ri in zip(first, r))
        rows = V[(slice(None),) + u].clone()
        for ch in range(c):
            rows[(ch, ch) + u] -= 1.0
        total += float((rows ** 2).sum())
    return torch.tensor(total, dtype=D64)


def _conv_orth_dist(kernel: torch.Tensor, stride: int, pixel: tuple[int, int] | None = None) -> torch.Tensor:
    """The official conv_orth_dist formula (our transcription, float64): T on an unpadded n × n input,
    n = S(k − 1) + k, through the conv of the identity basis; the rows of TᵀT at one pixel (default:
    flat index ⌊n²/2⌋, as theirs) for every input channel, minus the identity rows, Frobenius norm."""
    o, c, k, k2 = kernel.shape
    assert k == k2 and stride < k
    n = stride * (k - 1) + k
    basis = torch.eye(c * n * n, dtype=D64).reshape(c * n * n, c, n, n)
    out = F.conv2d(basis, kernel.double(), stride=stride).reshape(c * n * n, -1)  # row j: T e_j
    flat = (n * n) // 2 if pixel is None else pixel[0] * n + pixel[1]
    rows = out[flat::n * n]  # e_(ch, pixel) for every channel ch
    target = torch.zeros(c, c * n * n, dtype=D64)
    target[torch.arange(c), flat + n * n * torch.arange(c)] = 1.0
    return torch.linalg.matrix_norm(rows @ out.T - target)


def _both(ws, stride):
    """(single-op values, multi values) of the torch backend, side='cols'."""
    single = torch.stack([regkernels.conv_orthogonality_penalty(w, stride, side="cols", backend="torch") for w in ws])
    return single, regkernels.conv_orthogonality_penalty_multi(ws, stride, side="cols", backend="torch")


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("shape,stride", GEOMETRIES)
def test_values_and_grads_against_dense_operator_and_reference(shape, stride):
    g = torch.Generator().manual_seed(sum(shape) + 7)
    ws = [torch.randn(shape, generator=g, dtype=D64, requires_grad=True) for _ in range(2)]
    want = torch.stack([_dense_oracle(w, stride) for w in ws])
    ref = regkernels.conv_orthogonality_penalty_multi(ws, stride, side="cols", backend="reference")
    single, multi = _both(ws, stride)
    for got in (ref, single, multi):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-10)
    gv = torch.randn(2, generator=g, dtype=D64)
    got_g = torch.autograd.grad(multi, ws, gv)
    ref_g = torch.autograd.grad(ref, ws, gv)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_default_side_is_unchanged_and_sides_differ():
    w = torch.randn(4, 3, 3, 3, dtype=D64)
    rows = regkernels.conv_orthogonality_penalty(w, 2)
    torch.testing.assert_close(rows, regkernels.conv_orthogonality_penalty(w, 2, side="rows"), rtol=0, atol=0)
    torch.testing.assert_close(rows, R.conv_orthogonality_penalty(w, 2), rtol=1e-12, atol=0)
    cols = regkernels.conv_orthogonality_penalty(w, 2, side="cols")
    assert abs(float(cols - rows)) > 1e-3 * float(rows)


@pytest.mark.parametrize("shape", [(3, 5, 3, 3), (6, 2, 2, 4), (3, 4, 5), (2, 3, 3, 2, 3)])
def test_stride_one_is_the_output_side_of_the_transposed_kernel(shape):
    w = torch.randn(shape, dtype=D64)
    got = regkernels.conv_orthogonality_penalty(w, 1, side="cols")
    want = regkernels.conv_orthogonality_penalty(w.transpose(0, 1), 1, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(12, 3, 2, 2), (9, 2, 4), (7, 2, 3, 2)])
def test_stride_equal_kernel_is_the_plain_matrix(shape):
    # non-overlapping patches: T is block-diagonal with blocks M = K as (o, c·∏k), so every phase
    # is one tap and R = ‖MᵀM − I‖²; an orthonormal-column M gives 0
    w = torch.randn(shape, dtype=D64)
    M = w.reshape(shape[0], -1)
    want = ((M.T @ M - torch.eye(M.shape[1], dtype=D64)) ** 2).sum()
    for backend in ("torch", "reference"):
        got = regkernels.conv_orthogonality_penalty(w, tuple(shape[2:]), side="cols", backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if shape[0] >= M.shape[1]:  # o ≥ c·∏k: an input-orthogonal kernel exists
        q, _ = torch.linalg.qr(torch.randn(shape[0], M.shape[1], dtype=D64))
        orth = q.reshape(shape)
        assert float(regkernels.conv_orthogonality_penalty(orth, tuple(shape[2:]), side="cols")) < 1e-24


@pytest.mark.parametrize("shape,stride,padding", [((3, 2, 3, 3), 1, 1), ((2, 3, 5), 1, 2), ((3, 2, 4, 4), 2, 1)])
def test_circular_operator_is_the_periodic_sum(shape, stride, padding):
    # circular T with ∏n/∏S outputs (2p = k − S) on n ≥ 2k − 1, S | n: every row is complete and
    # ‖TᵀT − I‖² = (∏n / ∏S) · R (docs/conv.md#input-side)
    w = torch.randn(shape, dtype=D64)
    d = w.dim() - 2
    n = (2 * shape[2],) * d
    T = conv_to_matrix(w, n, stride=stride, padding=padding, padding_mode="circular")
    assert T.shape[0] * stride ** d == shape[0] * math.prod(n)
    full = ((T.T @ T - torch.eye(T.shape[1], dtype=D64)) ** 2).sum()
    got = regkernels.conv_orthogonality_penalty(w, stride, side="cols")
    torch.testing.assert_close(got * math.prod(n) / stride ** d, full, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the official formula

@pytest.mark.parametrize("o,c,k", [(4, 3, 3), (2, 5, 3), (3, 2, 5), (3, 3, 2)])
def test_stride_one_is_conv_orth_dist_squared(o, c, k):
    w = torch.randn(o, c, k, k, dtype=D64)
    want = _conv_orth_dist(w, 1) ** 2
    for backend in ("torch", "reference"):
        torch.testing.assert_close(regkernels.conv_orthogonality_penalty(w, 1, side="cols", backend=backend), want,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("o,c,k,S", [(4, 3, 3, 2), (3, 2, 5, 2), (2, 3, 5, 3), (3, 2, 5, 4), (2, 2, 4, 3)])
def test_strided_conv_orth_dist_is_the_phase_term_of_its_centre(o, c, k, S):
    # n = S(k − 1) + k odd: their pixel is the centre (S + 1)(k − 1)/2, complete; the pixels of one
    # S × S block from it are one per phase, their squared distances sum to ours, and the centre's
    # equals that of another complete pixel of its phase (a phase term, not a pixel's)
    w = torch.randn(o, c, k, k, dtype=D64)
    n = S * (k - 1) + k
    assert n % 2 == 1
    centre = (S + 1) * (k - 1) // 2
    assert (n * n) // 2 == centre * n + centre
    theirs = _conv_orth_dist(w, S)
    torch.testing.assert_close(theirs, _conv_orth_dist(w, S, (centre, centre)), rtol=0, atol=0)
    block = [(centre + a, centre + b) for a in range(S) for b in range(S)]
    assert all(k - 1 <= p <= S * (k - 1) for px in block for p in px)  # every row complete
    phases = torch.stack([_conv_orth_dist(w, S, px) ** 2 for px in block])
    ours = regkernels.conv_orthogonality_penalty(w, S, side="cols")
    torch.testing.assert_close(phases.sum(), ours, rtol=1e-12, atol=1e-12)
    same_phase = (centre - S, centre) if centre - S >= k - 1 else (centre, centre + S)
    if all(k - 1 <= p <= S * (k - 1) for p in same_phase):
        torch.testing.assert_close(_conv_orth_dist(w, S, same_phase), theirs, rtol=1e-12, atol=1e-12)


def test_even_grid_conv_orth_dist_is_an_edge_pixel():
    # k and S even: n even, their flat index ⌊n²/2⌋ is the pixel (n/2, 0) on the left edge, whose rows
    # miss taps; its number is none of our phase terms
    w = torch.randn(3, 2, 4, 4, dtype=D64)
    S, k = 2, 4
    n = S * (k - 1) + k
    assert n % 2 == 0 and (n * n) // 2 == (n // 2) * n + 0
    theirs = _conv_orth_dist(w, S) ** 2
    torch.testing.assert_close(theirs, _conv_orth_dist(w, S, (n // 2, 0)) ** 2, rtol=0, atol=0)
    terms = [_conv_orth_dist(w, S, (k - 1 + a, k - 1 + b)) ** 2 for a in range(S) for b in range(S)]
    torch.testing.assert_close(torch.stack(terms).sum(), regkernels.conv_orthogonality_penalty(w, S, side="cols"),
                               rtol=1e-12, atol=1e-12)
    assert all(abs(float(theirs - t)) > 1e-6 * float(t) for t in terms)


# ----------------------------------------------------------------------------- gradients, transforms

@pytest.mark.parametrize("shape,stride", [((2, 3, 3, 2), 2), ((2, 3, 2, 2), 3), ((3, 2, 4), 2),
                                          ((2, 2, 2, 2, 1), (1, 2, 1)), ((2, 0, 3, 3), 1)])
def test_gradcheck_gradgradcheck(shape, stride):
    w = torch.randn((2,) + shape, dtype=D64, requires_grad=True)
    for backend in ("torch", "reference"):
        def f(w):
            return regkernels.conv_orthogonality_penalty_multi(list(w.unbind(0)), stride, side="cols",
                                                               backend=backend)

        assert torch.autograd.gradcheck(f, (w,))
        assert torch.autograd.gradgradcheck(f, (w,))


def test_double_backward_equals_reference():
    w = torch.randn(3, 4, 3, 3, dtype=D64, requires_grad=True)
    v = torch.randn_like(w)
    hv = []
    for backend in ("torch", "reference"):
        (g,) = torch.autograd.grad(regkernels.conv_orthogonality_penalty(w, 2, side="cols", backend=backend), w,
                                   create_graph=True)
        hv.append(torch.autograd.grad((g * v).sum(), w)[0])
    torch.testing.assert_close(hv[0], hv[1], rtol=1e-11, atol=1e-11)


def test_torch_func_grad_and_vmap():
    ws = torch.randn(4, 3, 2, 3, 3, dtype=D64)

    def ref(w):
        return R.conv_orthogonality_penalty(w, 2, None, "cols")

    vals = torch.func.vmap(lambda w: regkernels.conv_orthogonality_penalty(w, 2, side="cols"))(ws)
    torch.testing.assert_close(vals, torch.stack([ref(w) for w in ws]), rtol=1e-12, atol=1e-12)
    grads = torch.func.vmap(torch.func.grad(lambda w: regkernels.conv_orthogonality_penalty(w, 2, side="cols")))(ws)
    want = torch.stack([torch.func.grad(ref)(w) for w in ws])
    torch.testing.assert_close(grads, want, rtol=1e-11, atol=1e-11)


def test_compile_fullgraph():
    torch._dynamo.reset()
    ws = [torch.randn(3, 2, 3, 3, dtype=D64, requires_grad=True) for _ in range(2)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(a, b):
        return regkernels.conv_orthogonality_penalty_multi([a, b], 2, side="cols").sum()

    got = f(*ws)
    want = R.conv_orthogonality_penalty_multi(ws, 2, None, "cols").sum()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, ws), torch.autograd.grad(want, ws)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


# ----------------------------------------------------------------------------- layouts, dtypes, edges

def test_non_contiguous():
    base = torch.randn(3, 5, 3, 3, dtype=D64)
    views = [base.transpose(0, 1), base.permute(1, 0, 3, 2), base.repeat(2, 1, 1, 1)[::2].transpose(0, 1)]
    assert not any(v.is_contiguous() for v in views)
    want = torch.stack([_dense_oracle(v, 2) for v in views])
    single, multi = _both(views, 2)
    torch.testing.assert_close(single, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(multi, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_low_precision_computed_in_float32(dtype, rtol):
    g = torch.Generator().manual_seed(11)
    ws = [(torch.randn(8, 6, 3, 3, generator=g, dtype=D64) / 7).to(dtype) for _ in range(2)]
    want = R.conv_orthogonality_penalty_multi([w.double() for w in ws], 2, None, "cols")  # the rounded weights
    for backend in ("torch", "reference"):
        got = regkernels.conv_orthogonality_penalty_multi(ws, 2, side="cols", backend=backend)
        single = regkernels.conv_orthogonality_penalty(ws[1], 2, side="cols", backend=backend)
        assert got.dtype == dtype and single.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)
        torch.testing.assert_close(single.double(), want[1], rtol=rtol, atol=0)


def test_near_orthogonal_no_cancellation():
    # a delta kernel with orthonormal channels is input-orthogonal at stride 1; a tiny perturbation
    # must give its own tiny value in float32, not the rounding error of ‖V‖² − 2 tr + c
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=D64))
    w = torch.zeros(16, 16, 3, 3, dtype=D64)
    w[:, :, 1, 1] = q
    w = w + 1e-4 * torch.randn_like(w)
    exact = R.conv_orthogonality_penalty(w, 1, None, "cols")
    got = regkernels.conv_orthogonality_penalty(w.float(), 1, side="cols").double()
    assert abs(float(got - exact)) / float(exact) < 1e-3


@pytest.mark.parametrize("shape,stride,want", [((0, 3, 3, 3), 2, 12.0), ((0, 2, 4), 3, 6.0), ((4, 0, 3, 3), 2, 0.0),
                                               ((0, 0, 2), 1, 0.0)])
def test_empty(shape, stride, want):
    # no filters: TᵀT = 0, so every row of every phase is −I: c·∏S; no input channels: nothing
    w = torch.zeros(shape, dtype=D64, requires_grad=True)
    for backend in ("torch", "reference"):
        got = regkernels.conv_orthogonality_penalty_multi([w, w], stride, side="cols", backend=backend)
        assert got.tolist() == [want, want]
        single = regkernels.conv_orthogonality_penalty(w, stride, side="cols", backend=backend)
        assert float(single.detach()) == want
        (gw,) = torch.autograd.grad(got.sum() + single, w)
        assert gw.shape == w.shape and not gw.any()


def test_nan_and_inf_stay_in_their_layer():
    ws = [torch.randn(3, 5, 3, 3, dtype=torch.float32, requires_grad=True) for _ in range(4)]
    with torch.no_grad():
        ws[1][0, 1, 2, 0] = float("nan")
        ws[3][2, 4, 0, 0] = float("inf")
    for backend in ("torch", "reference"):
        got = regkernels.conv_orthogonality_penalty_multi(ws, 2, side="cols", backend=backend)
        # docs/index.md#numerical-behaviour: NaN (or +inf where the formula is +∞) in the bad layer's entry only
        assert torch.isnan(got[1]) and not torch.isfinite(got[3])
        assert torch.isfinite(got[0]) and torch.isfinite(got[2])
        torch.testing.assert_close(got[[0, 2]], R.conv_orthogonality_penalty_multi([ws[0], ws[2]], 2, None, "cols"))
        g0, g2 = torch.autograd.grad(got[0] + got[2], [ws[0], ws[2]], retain_graph=True)
        assert torch.isfinite(g0).all() and torch.isfinite(g2).all()
        (g3,) = torch.autograd.grad(got[3], [ws[3]])
        assert not torch.isfinite(g3).all()


def test_tables_cached_and_each_tap_pair_in_one_slot():
    a = C.cols_tables((3, 2), (2, 3), torch.float64, torch.device("cpu"))
    assert a is C.cols_tables((3, 2), (2, 3), torch.float64, torch.device("cpu"))
    (A0, A1), mask = a
    # dim 0: k = 3, S = 2: 2 phases × 5 shifts; dim 1: k = 2, S = 3: min(S, k) = 2 phases × 3 shifts
    assert A0.shape == (10, 9) and A1.shape == (6, 4) and mask.shape == (60,)
    for A in (A0, A1):
        assert (A.sum(0) == 1).all()  # every tap pair lands in exactly one slot
    assert A0[0 * 5 + 2 - 0 + 2, 0 * 3 + 2] == 1  # t = 0, t' = 2: phase 0, shift +2
    assert A0[1 * 5 + 0 - 1 + 2, 1 * 3 + 0] == 1  # t = 1, t' = 0: phase 1, shift −1
    assert int(mask.sum()) == 2 * 2  # q = 0 once per live phase


def test_work_limits(monkeypatch):
    monkeypatch.setattr(R, "MAX_WORK_BYTES", 50_000)  # a (8, 3, 3, 3) layer at stride 2 takes 20736 bytes
    w = torch.randn(8, 3, 3, 3)
    with pytest.raises(ValueError, match=r"conv_orthogonality_penalty_multi: side='cols': the tap Grams of "
                                         r"3 layer\(s\) of shape \(8, 3, 3, 3\) \(27² each\) .* over MAX_WORK_BYTES=50000 .* "
                                         r"20736 bytes per layer; use at most 2 layers per call"):
        regkernels.conv_orthogonality_penalty_multi([w, w, w], 2, side="cols")
    with pytest.raises(ValueError, match=r"conv_orthogonality_penalty: side='cols': .* one layer alone is over it: "
                                         r"backend='reference'"):
        regkernels.conv_orthogonality_penalty(torch.randn(8, 6, 3, 3), 2, side="cols", backend="torch")
    monkeypatch.setattr(R, "MAX_WORK_BYTES", 2_000)
    with pytest.raises(ValueError, match=r"conv_orthogonality_penalty: side='cols': the 12 basis images of shape "
                                         r"\(3, 6, 6\) .* over MAX_WORK_BYTES=2000"):
        regkernels.conv_orthogonality_penalty(w, 2, side="cols", backend="reference")


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("side", ["auto", "input", "ROWS", None, 1, ("cols",)])
def test_bad_side_names_op_argument_and_choices(op, side):
    w = torch.randn(4, 2, 3, 3)
    args = (w,) if op == OPS[0] else ([w],)
    with pytest.raises(ValueError, match=rf"^{op}: side must be 'rows' \(output side: .*\) or 'cols' \(input side: "
                                         rf".*\); got {re.escape(repr(side))}$"):
        getattr(regkernels, op)(*args, 1, side=side)


@pytest.mark.parametrize("op", OPS)
def test_cols_refuses_padding(op):
    w = torch.randn(4, 2, 3, 3)
    args = (w,) if op == OPS[0] else ([w],)
    with pytest.raises(ValueError, match=rf"^{op}: padding selects the output side's shifts \(side='rows'\); "
                                         r"side='cols' .* pass padding=None; got padding=\(1, 0\)$"):
        getattr(regkernels, op)(*args, 2, (1, 0), "cols")


def test_side_check_order_keeps_existing_errors():
    # the older checks still fire first, with their own messages
    with pytest.raises(ValueError, match=r"conv_orthogonality_penalty: stride must be"):
        regkernels.conv_orthogonality_penalty(torch.randn(4, 2, 3, 3), 0, side="bogus")
    with pytest.raises(ValueError, match=r"conv_orthogonality_penalty_multi: no 'cpu' backend"):
        regkernels.conv_orthogonality_penalty_multi([torch.randn(4, 2, 3, 3)], side="cols", backend="cpu")


# ----------------------------------------------------------------------------- Regularizer(kind="ocnn", side="cols")

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.c = nn.Conv2d(4, 8, 3, padding=1, groups=2)  # chunks (4, 2, 3, 3)
        self.d = nn.Conv2d(4, 4, 3, padding=1)            # the shape of b, another stride
        self.e = nn.Linear(6, 5)                           # ‖WᵀW − I‖²


def test_regularizer_forwards_side():
    net = _Net().double()
    reg = Regularizer(net, "ocnn", weight=0.5, side="cols")
    vals = reg.values()
    want = []
    for _, m in reg.layers:
        if isinstance(m, nn.Linear):
            W = m.weight
            want.append(((W.T @ W - torch.eye(W.shape[1], dtype=D64)) ** 2).sum())
            continue
        want.append(torch.stack([R.conv_orthogonality_penalty(wg, m.stride, None, "cols")
                                 for wg in m.weight.chunk(m.groups, dim=0)]).mean())
    want = torch.stack(want)
    torch.testing.assert_close(vals, want, rtol=1e-12, atol=1e-12)
    params = [m.weight for _, m in reg.layers]
    for a, b in zip(torch.autograd.grad(reg(), params), torch.autograd.grad(0.5 * want.mean(), params)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    rows = Regularizer(net, "ocnn").values()
    torch.testing.assert_close(rows, Regularizer(net, "ocnn", side="rows").values(), rtol=0, atol=0)
    assert not torch.allclose(rows, vals)


def test_regularizer_bad_side_and_padding():
    net = _Net()
    with pytest.raises(ValueError, match=r"^Regularizer: side must be 'rows' .* or 'cols' .*; got 'auto'$"):
        Regularizer(net, "ocnn", side="auto")
    with pytest.raises(ValueError, match=r"^Regularizer: padding selects the output side's shifts .* got padding=1$"):
        Regularizer(net, "ocnn", side="cols", padding=1)
    with pytest.raises(TypeError, match=r"Regularizer: kind='ocnn' takes padding and side only; got \['A', 'side'\]"):
        Regularizer(net, "ocnn", side="cols", A=1.0)


def test_regularizer_stats_bounds_follow_side():
    """stats() bounds the Gram on the penalty's side: WᵀW's (in·k² columns) for side="cols",
    W Wᵀ's for the default; checked against an explicit float64 Gershgorin on each matrix."""
    net = _Net().double()

    def gershgorin(G):
        d = G.diagonal()
        r = G.abs().sum(1) - d.abs()
        return float((d - r).min()), float((d + r).max())

    for side in ("rows", "cols"):
        stats = Regularizer(net, "ocnn", side=side).stats()
        for name, m in net.named_modules():
            if name not in stats:
                continue
            got = stats[name]
            Ms = m.weight.detach().reshape(m.weight.shape[0], -1)
            Ms = Ms.chunk(getattr(m, "groups", 1), dim=0)
            bounds = [gershgorin(M.T @ M if side == "cols" else M @ M.T) for M in Ms]
            assert got["gershgorin_lo"] == pytest.approx(min(b[0] for b in bounds), rel=1e-12, abs=1e-12), (side, name)
            assert got["gershgorin_hi"] == pytest.approx(max(b[1] for b in bounds), rel=1e-12, abs=1e-12), (side, name)
