"""Tests of the conv-as-operator family (docs/conv.md): regkernels.ops.conv and its reference.

Oracles are independent of the code under test: the matrix T comes from impulse
responses of F.conv1d/2d/3d (column j = conv of the basis vector e_j), the frame penalty
and the OCNN penalty from explicit Python loops, and the Sedghi singular values from an
SVD of the explicit circular matrix. Weights are single layers (not batched): a
leading batch dim is a wrong-ndim error. Low-precision inputs are computed in float32
and returned in their dtype; their tolerances are the (dtype, atol, rtol) tuples below.
"""
from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from regkernels import _ext
from regkernels.ops import conv as C
from regkernels.reference import conv as R

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")

D64 = torch.float64
TRITON_ON_CPU = _ext.triton_interpreted()
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ---------------------------------------------------------------- independent oracles

def _expand(v, d):
    return (v,) * d if isinstance(v, int) else tuple(v)


def conv_apply(x, weight, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """What nn.ConvNd computes on a batch x: circular = F.pad(mode='circular') then padding 0."""
    d = weight.dim() - 2
    if padding_mode == "circular":
        pads = [q for p in reversed(_expand(padding, d)) for q in (p, p)]
        x, padding = F.pad(x, pads, mode="circular"), 0
    return CONV[d](x, weight, None, stride, padding, dilation, groups)


def impulse_matrix(weight, input_size, **kw):
    """T from impulse responses: column j = conv(e_j), e_j the j-th basis input."""
    c_in = weight.shape[1] * kw.get("groups", 1)
    n = c_in * math.prod(input_size)
    basis = torch.eye(n, dtype=weight.dtype).reshape(n, c_in, *input_size)
    return conv_apply(basis, weight, **kw).reshape(n, -1).T


def loop_frame(T, A, B, side):
    """Frame penalty and Gershgorin bounds of T by explicit loops (formula: docs/gram.md#frame_penalty)."""
    m, n = T.shape
    rows = side == "rows" or (side == "auto" and m < n)
    V = T @ T.T if rows else T.T @ T
    k = V.shape[0]
    total, lo, hi = 0.0, math.inf, -math.inf
    for i in range(k):
        d = float(V[i, i])
        r = sum(abs(float(V[i, j])) for j in range(k) if j != i)
        total += max(0.0, A - (d - r)) ** 2 + max(0.0, (d + r) - B) ** 2
        lo, hi = min(lo, d - r), max(hi, d + r)
    return total / k, lo, hi


def loop_ocnn(K, stride, padding):
    """OCNN penalty (docs/conv.md#conv_orthogonality_penalty) with the 2-D correlation written out as loops."""
    o, c, kh, kw = K.shape
    P = (kh - 1) // stride * stride if padding is None else padding
    s = (2 * P) // stride + 1
    total = 0.0
    for a in range(o):
        for b in range(o):
            for y in range(s):
                for x in range(s):
                    acc = 0.0
                    for i in range(kh):
                        for j in range(kw):
                            u, v = y * stride - P + i, x * stride - P + j
                            if 0 <= u < kh and 0 <= v < kw:
                                acc += float((K[a, :, u, v] * K[b, :, i, j]).sum())
                    target = 1.0 if (a == b and y == s // 2 and x == s // 2) else 0.0
                    total += (acc - target) ** 2
    return total


# ---------------------------------------------------------------- conv_to_matrix sweep

def _random_config(rng: random.Random, d: int):
    def draw(lo, hi):  # an int (same for every dim) or a d-tuple
        if rng.random() < 0.4:
            return rng.randint(lo, hi)
        return tuple(rng.randint(lo, hi) for _ in range(d))

    groups = rng.choice([1, 1, 2, 3])
    c_in_g, c_out_g = rng.randint(1, 3), rng.randint(1, 3)
    kernel = tuple(rng.randint(1, 4 if d < 3 else 2) for _ in range(d))
    stride, dilation, padding = draw(1, 3), draw(1, 2), draw(0, 3)
    mode = rng.choice(["zeros", "circular"])
    size = [rng.randint(1, 7 if d < 3 else 4) for _ in range(d)]
    p, dl = _expand(padding, d), _expand(dilation, d)
    for i in range(d):
        if mode == "circular":  # torch's circular padding wraps at most once: n >= p
            size[i] = max(size[i], p[i])
        size[i] = max(size[i], dl[i] * (kernel[i] - 1) + 1 - 2 * p[i], 1)  # output size >= 1
    return dict(shape=(c_out_g * groups, c_in_g, *kernel), input_size=tuple(size),
                kw=dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode))


_RNG = random.Random(20240611)
SWEEP = [_random_config(_RNG, 2) for _ in range(30)] + [_random_config(_RNG, 1) for _ in range(12)] \
    + [_random_config(_RNG, 3) for _ in range(4)] + [
        # kernel wider than the input: circular taps wrap onto one position and add up
        dict(shape=(2, 2, 5, 3), input_size=(3, 2), kw=dict(padding=2, padding_mode="circular")),
        dict(shape=(3, 1, 4), input_size=(2,), kw=dict(padding=2, dilation=1, padding_mode="circular")),
        dict(shape=(4, 2, 3, 3), input_size=(6, 5), kw=dict(stride=2, padding=(1, 0), groups=2)),
    ]


SWEEP_IDS = [f"{c['shape']}@{c['input_size']}-{c['kw']}" for c in SWEEP]
# the conv_to_matrix implementations on CPU tensors: the reference, the C++ kernel and the Triton
# kernel (where interpreted, as in CI) for the dense layout; the sparse layouts are built by the
# reference and the composite ("torch", regkernels/composite/conv.py)
MATRIX_BACKENDS = ["reference", "cpu"] + (["triton"] if TRITON_ON_CPU else [])
SPARSE_BACKENDS = ["reference", "torch"]


def sparse_backend(backend: str) -> str:
    """The sparse builder a dense backend's test runs alongside: the reference's own, else "torch"."""
    return backend if backend == "reference" else "torch"


@pytest.mark.parametrize("backend", MATRIX_BACKENDS)
@pytest.mark.parametrize("cfg", SWEEP, ids=SWEEP_IDS)
def test_conv_to_matrix_matches_impulse_responses(cfg, backend):
    w = torch.randn(cfg["shape"], dtype=D64)
    size, kw = cfg["input_size"], cfg["kw"]
    oracle = impulse_matrix(w, size, **kw)
    T = C.conv_to_matrix(w, size, backend=backend, **kw)
    torch.testing.assert_close(T, oracle, atol=1e-13, rtol=0)
    # and the defining identity on a random input
    x = torch.randn(w.shape[1] * kw.get("groups", 1), *size, dtype=D64)
    torch.testing.assert_close(T @ x.reshape(-1), conv_apply(x[None], w, **kw).reshape(-1), atol=1e-12, rtol=0)
    # sparse layouts: positive weights so no structural entry can cancel to zero
    wp = w.abs() + 0.1
    dense = C.conv_to_matrix(wp, size, backend=backend, **kw)
    structural = int((impulse_matrix(wp, size, **kw) != 0).sum())
    for layout in ("coo", "csr"):
        S = C.conv_to_matrix(wp, size, layout=layout, backend=sparse_backend(backend), **kw)
        assert S.layout == {"coo": torch.sparse_coo, "csr": torch.sparse_csr}[layout]
        assert S.shape == dense.shape and S.dtype == D64
        assert S.values().numel() == structural and bool((S.values() != 0).all())
        torch.testing.assert_close(S.to_dense(), dense, atol=1e-14, rtol=0)
        if layout == "coo":
            assert S.is_coalesced()


@pytest.mark.parametrize("kw,shape,size", [
    (dict(stride=2, padding=1, groups=2), (4, 1, 3, 2), (5, 4)),
    (dict(padding=2, padding_mode="circular"), (2, 2, 5, 3), (3, 2)),
    (dict(dilation=2, padding=(1,)), (2, 3, 2), (6,)),
])
@pytest.mark.parametrize("layout,backend", [("dense", b) for b in MATRIX_BACKENDS]
                         + [(layout, b) for layout in ("coo", "csr") for b in SPARSE_BACKENDS])
def test_conv_to_matrix_gradcheck(layout, kw, shape, size, backend):
    w = torch.randn(shape, dtype=D64, requires_grad=True)
    # the interpreted Triton backward would run once per entry of T: random projections instead
    torch.autograd.gradcheck(lambda w: C.conv_to_matrix(w, size, layout=layout, backend=backend, **kw).to_dense()
                             if layout != "dense" else C.conv_to_matrix(w, size, backend=backend, **kw), (w,),
                             fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", MATRIX_BACKENDS[1:])
@pytest.mark.parametrize("cfg", SWEEP[::3], ids=SWEEP_IDS[::3])
def test_conv_to_matrix_kernel_gradient_vs_reference(cfg, backend):
    # the kernels' backward passes (gathers, no atomics) against autograd through the reference
    w = torch.randn(cfg["shape"], dtype=D64, requires_grad=True)
    size, kw = cfg["input_size"], cfg["kw"]
    for layout in ("dense", "csr"):
        G = torch.randn(R.conv_to_matrix(w.detach(), size, **kw).shape, dtype=D64)
        want, = torch.autograd.grad((R.conv_to_matrix(w, size, layout=layout, **kw).to_dense() * G).sum(), w)
        named = backend if layout == "dense" else sparse_backend(backend)
        got, = torch.autograd.grad((C.conv_to_matrix(w, size, layout=layout, backend=named, **kw).to_dense()
                                    * G).sum(), w)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", MATRIX_BACKENDS[1:])
def test_conv_to_matrix_kernel_opcheck(backend):
    ops = torch.ops.regkernels
    fwd, bwd = {"cpu": (ops.conv_to_matrix_dense, ops.conv_to_matrix_dense_backward),
                "triton": (ops.conv_to_matrix_triton, ops.conv_to_matrix_triton_backward)}[backend]
    w = torch.randn(4, 1, 1, 3, 2, dtype=D64, requires_grad=True)  # the kernels' normalised 3-D form
    for circular in (False, True):
        args = (w, [1, 5, 4], [1, 2, 1], [0, 1, 1], [1, 1, 2], 2, circular)
        torch.library.opcheck(fwd, args)
        T = fwd(*args)
        torch.library.opcheck(bwd, (torch.randn_like(T), w.detach(), *args[1:]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", MATRIX_BACKENDS[1:])
def test_conv_to_matrix_kernel_dtypes(dtype, backend):
    # entries are copies of the weights (sums where circular taps wrap onto one position, rounded once)
    for size, kw in (((5, 4), dict(stride=(2, 1), padding=1, groups=2)),
                     ((2, 3), dict(padding=2, padding_mode="circular", groups=2))):
        w = torch.randn(4, 2, 3, 3).to(dtype)
        T = C.conv_to_matrix(w, size, backend=backend, **kw)
        assert T.dtype == dtype
        truth = R.conv_to_matrix(w.double(), size, **kw)
        tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-7}[dtype]
        torch.testing.assert_close(T.double(), truth, atol=tol * 4, rtol=tol)
        if "circular" not in kw.values():  # pure copies: exact
            assert torch.equal(T, R.conv_to_matrix(w, size, **kw))


def test_conv_to_matrix_size_guard():
    w = torch.randn(64, 64, 3, 3)
    with pytest.raises(ValueError, match=r"conv_to_matrix: the dense matrix of shape \(65536, 65536\) needs "
                                         r"17179869184 bytes.*layout='coo' or layout='csr'"):
        C.conv_to_matrix(w, (32, 32), padding=1)
    small = torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match=r"shape \(50, 50\) needs 20000 bytes.*max_dense_bytes=1000"):
        C.conv_to_matrix(small.double(), (5, 5), padding=1, max_dense_bytes=1000)
    # the limit is for the dense layout only
    S = C.conv_to_matrix(small, (5, 5), padding=1, layout="csr", max_dense_bytes=1000)
    assert S.shape == (50, 50)
    for backend in MATRIX_BACKENDS[1:]:  # the kernels check before allocating as well
        with pytest.raises(ValueError, match=r"conv_to_matrix: the dense matrix of shape \(65536, 65536\)"):
            C.conv_to_matrix(w, (32, 32), padding=1, backend=backend)
    # the explicit frame penalty guards T plus its Gram; the implicit one (the default) needs neither
    big = torch.randn(32, 32, 3, 3, dtype=D64) / 17
    with pytest.raises(ValueError, match=r"conv_frame_penalty: the explicit reference \(dense T of shape "
                                         r"\(16928, 16928\) plus its Gram matrix\) needs .* bytes"):
        C.conv_frame_penalty(big, (23, 23), 0.5, 2.0, padding=1, backend="reference")
    with pytest.raises(ValueError, match=r"conv_gershgorin_bounds: the explicit reference"):
        C.conv_gershgorin_bounds(big, (23, 23), padding=1, backend="reference")
    value = C.conv_frame_penalty(big, (23, 23), 0.5, 2.0, padding=1)
    lo, hi = C.conv_gershgorin_bounds(big, (23, 23), padding=1)
    assert bool(torch.isfinite(value)) and float(lo) < float(hi)


# ---------------------------------------------------------------- frame penalty / Gershgorin

FRAME_CASES = [
    ((3, 2, 3, 3), (4, 4), dict(padding=1), "auto"),
    ((4, 2, 3, 3), (5, 4), dict(stride=2, padding=1), "rows"),
    ((4, 1, 3, 3), (4, 3), dict(padding=1, groups=2), "cols"),
    ((2, 3, 3, 2), (4, 5), dict(padding=(1, 0), padding_mode="circular"), "auto"),
    ((3, 2, 3), (7,), dict(dilation=2, padding=2), "rows"),
]


# the explicit reference and the implicit composite (class statistics, backend "torch",
# regkernels/composite/conv.py); its fused Triton form runs only when named ("triton"; interpreted on
# CPU tensors in CI; float16 / bfloat16 / float32 only)
FRAME_BACKENDS = ["reference", "torch"]
FRAME_KERNELS = ["torch"] + (["triton"] if TRITON_ON_CPU else [])


@pytest.mark.parametrize("backend", FRAME_BACKENDS)
@pytest.mark.parametrize("shape,size,kw,side", FRAME_CASES)
@pytest.mark.parametrize("A,B", [(0.5, 2.0), (0.0, 50.0)])
def test_conv_frame_penalty_and_bounds_vs_loops(shape, size, kw, side, A, B, backend):
    w = 0.5 * torch.randn(shape, dtype=D64)
    want, lo, hi = loop_frame(impulse_matrix(w, size, **kw), A, B, side)
    got = C.conv_frame_penalty(w, size, A, B, side=side, backend=backend, **kw)
    assert got.shape == () and got.dtype == D64
    torch.testing.assert_close(got, torch.tensor(want, dtype=D64), atol=1e-12, rtol=1e-12)
    glo, ghi = C.conv_gershgorin_bounds(w, size, side=side, backend=backend, **kw)
    torch.testing.assert_close(glo, torch.tensor(lo, dtype=D64), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ghi, torch.tensor(hi, dtype=D64), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", FRAME_BACKENDS)
@pytest.mark.parametrize("shape,size,kw,side", FRAME_CASES[:4])
def test_conv_frame_penalty_gradcheck(shape, size, kw, side, backend):
    w = (0.5 * torch.randn(shape, dtype=D64)).requires_grad_(True)
    torch.autograd.gradcheck(lambda w: C.conv_frame_penalty(w, size, 0.3, 1.2, side=side, backend=backend, **kw),
                             (w,))
    torch.autograd.gradcheck(lambda w: torch.stack(C.conv_gershgorin_bounds(w, size, side=side, backend=backend,
                                                                            **kw)), (w,))


@pytest.mark.parametrize("cfg", SWEEP, ids=SWEEP_IDS)
def test_conv_frame_penalty_implicit_equals_explicit(cfg):
    # the whole conv_to_matrix sweep (strides 1-3, zeros / circular, dilation, groups, 1-3 dims,
    # kernels wider than the input), every side; values, gradients and bounds in float64
    w = (0.4 * torch.randn(cfg["shape"], dtype=D64)).requires_grad_(True)
    size, kw = cfg["input_size"], cfg["kw"]
    for side in ("auto", "rows", "cols"):
        for A, B in ((0.5, 2.0), (0.0, 0.3)):
            want = C.conv_frame_penalty(w, size, A, B, side=side, backend="reference", **kw)
            got = C.conv_frame_penalty(w, size, A, B, side=side, backend="torch", **kw)
            torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-11)
            g_want, = torch.autograd.grad(want, w)
            g_got, = torch.autograd.grad(got, w)
            torch.testing.assert_close(g_got, g_want, atol=1e-12, rtol=1e-10)
        for a, b in zip(C.conv_gershgorin_bounds(w, size, side=side, backend="torch", **kw),
                        C.conv_gershgorin_bounds(w, size, side=side, backend="reference", **kw)):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-11)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton runs on CPU tensors only interpreted (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("cfg", SWEEP[::4], ids=SWEEP_IDS[::4])
def test_conv_frame_penalty_triton_equals_explicit(cfg):
    # the fused Triton statistics (float32) against the explicit float64 path: values, gradients, bounds
    w = (0.4 * torch.randn(cfg["shape"])).requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    size, kw = cfg["input_size"], cfg["kw"]
    for side in ("rows", "cols"):
        want = C.conv_frame_penalty(w64, size, 0.5, 2.0, side=side, backend="reference", **kw)
        got = C.conv_frame_penalty(w, size, 0.5, 2.0, side=side, backend="triton", **kw)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
        g_want, = torch.autograd.grad(want, w64)
        g_got, = torch.autograd.grad(got, w)
        torch.testing.assert_close(g_got.double(), g_want, atol=1e-5 * float(g_want.abs().max()), rtol=1e-5)
        for a, b in zip(C.conv_gershgorin_bounds(w, size, side=side, backend="triton", **kw),
                        C.conv_gershgorin_bounds(w64, size, side=side, backend="reference", **kw)):
            torch.testing.assert_close(a.double(), b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("keep_signs", [True, False])
def test_conv_frame_penalty_implicit_blocks_and_recomputed_backward(monkeypatch, keep_signs):
    # one channel row per block, and (keep_signs=False) a forward too large to keep sign(V):
    # the backward contracts V again block by block; both must equal the explicit path
    from regkernels.composite import conv as CC

    monkeypatch.setattr(CC, "_BLOCK_ELEMENTS", 1)
    if not keep_signs:
        monkeypatch.setattr(CC, "_SIGN_ELEMENTS", 0)
    w = (0.4 * torch.randn(6, 5, 3, 2, dtype=D64)).requires_grad_(True)
    for kw in (dict(padding=1, groups=1), dict(stride=2, padding=(1, 0), groups=1),
               dict(padding=1, padding_mode="circular")):
        for side in ("rows", "cols"):
            want = C.conv_frame_penalty(w, (5, 4), 0.5, 2.0, side=side, backend="reference", **kw)
            got = C.conv_frame_penalty(w, (5, 4), 0.5, 2.0, side=side, backend="torch", **kw)
            torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-11)
            torch.testing.assert_close(torch.autograd.grad(got, w)[0], torch.autograd.grad(want, w)[0],
                                       atol=1e-12, rtol=1e-10)


def test_conv_frame_penalty_implicit_float32_at_scale():
    # a 16-channel layer on 12×12 inputs (k = 2304): the float32 implicit path against the
    # float64 explicit one, stride 1 and 2, zeros and circular
    w = torch.randn(16, 16, 3, 3) / 12
    for kw in (dict(padding=1), dict(stride=2, padding=1), dict(padding=1, padding_mode="circular")):
        want = C.conv_frame_penalty(w.double(), (12, 12), 0.5, 2.0, backend="reference", **kw)
        got = C.conv_frame_penalty(w, (12, 12), 0.5, 2.0, **kw)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_conv_frame_stats_opcheck():
    from regkernels.composite import conv as CC

    w = torch.randn(4, 3, 1, 3, 2, dtype=D64, requires_grad=True)
    for rows, keep_signs in ((False, True), (True, True), (False, False)):
        args = (w, [1, 5, 4], [1, 2, 1], [0, 1, 1], [1, 1, 2], 1, False, rows, keep_signs)
        torch.library.opcheck(CC._conv_frame_stats, args)
        d, r, signs = CC._conv_frame_stats(*args)
        assert (signs.dim() > 1) == keep_signs
        torch.library.opcheck(CC._conv_frame_stats_backward,
                              (w.detach(), torch.randn_like(d), torch.randn_like(r), signs, *args[1:-1]))
    if TRITON_ON_CPU:  # the fused Triton form (float32)
        from regkernels.triton import conv_frame as TF

        w32 = w.detach().float().requires_grad_(True)
        for rows, keep_gram in ((True, True), (False, False)):
            args = (w32, [1, 5, 4], [1, 2, 1], [0, 1, 1], [1, 1, 2], 1, False, rows, keep_gram)
            torch.library.opcheck(TF._conv_frame_stats_triton, args)
            d, r, gram = TF._conv_frame_stats_triton(*args)
            assert (gram.dim() == 3) == keep_gram
            torch.library.opcheck(TF._conv_frame_stats_triton_backward,
                                  (w32.detach(), torch.randn_like(d), torch.randn_like(r), gram, *args[1:-1]))


# ---------------------------------------------------------------- OCNN

@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [None, 1])
@pytest.mark.parametrize("shape", [(3, 2, 3, 3), (4, 3, 2, 2), (2, 1, 5, 5)])
def test_conv_orthogonality_penalty_vs_loops(shape, stride, padding):
    w = torch.randn(shape, dtype=D64)
    got = C.conv_orthogonality_penalty(w, stride=stride, padding=padding)
    torch.testing.assert_close(got, torch.tensor(loop_ocnn(w, stride, padding), dtype=D64), atol=1e-10, rtol=1e-12)


def test_conv_orthogonality_penalty_default_padding_and_1d():
    # P = ⌊(k−1)/S⌋·S: k=2, S=2 → P=0, a 1×1 output: the penalty is ‖K Kᵀ − I‖² of the flat filters
    w = torch.randn(4, 3, 2, 2, dtype=D64)
    gram = w.reshape(4, -1) @ w.reshape(4, -1).T
    torch.testing.assert_close(C.conv_orthogonality_penalty(w, stride=2),
                               ((gram - torch.eye(4, dtype=D64)) ** 2).sum())
    # 1-D weight through conv1d equals the 2-D penalty of the (k, 1) kernel
    w1 = torch.randn(3, 2, 5, dtype=D64)
    torch.testing.assert_close(C.conv_orthogonality_penalty(w1, stride=(1,)),
                               C.conv_orthogonality_penalty(w1[..., None], stride=(1, 1), padding=(4, 0)))


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_orthogonality_penalty_gradcheck(stride):
    w = torch.randn(3, 2, 3, 3, dtype=D64, requires_grad=True)
    torch.autograd.gradcheck(lambda w: C.conv_orthogonality_penalty(w, stride=stride), (w,))


# ---------------------------------------------------------------- Sedghi singular values

@pytest.mark.parametrize("shape,size", [((3, 2, 3, 3), (5, 4)), ((2, 4, 1, 3), (3, 6)), ((3, 3, 5, 5), (5, 5)),
                                        ((4, 2, 3), (7,))])
def test_conv_singular_values_vs_explicit_matrix(shape, size):
    w = torch.randn(shape, dtype=D64)
    sv = C.conv_singular_values(w, size)
    assert sv.shape == (math.prod(size), min(shape[0], shape[1])) and sv.dtype == D64
    assert bool((sv[:, :-1] >= sv[:, 1:]).all())  # descending per frequency
    pad = tuple(k // 2 for k in shape[2:])
    T = impulse_matrix(w, size, padding=pad, padding_mode="circular")
    torch.testing.assert_close(sv.flatten().sort().values, torch.linalg.svdvals(T).sort().values,
                               atol=1e-12, rtol=1e-12)
    # the library's own matrix agrees as well
    T2 = C.conv_to_matrix(w, size, padding=pad, padding_mode="circular")
    torch.testing.assert_close(sv.flatten().sort().values, torch.linalg.svdvals(T2).sort().values,
                               atol=1e-12, rtol=1e-12)


def test_conv_singular_values_gradcheck():
    w = torch.randn(3, 2, 3, 3, dtype=D64, requires_grad=True)
    torch.autograd.gradcheck(lambda w: C.conv_singular_values(w, (4, 3)), (w,))


def test_clip_conv_singular_values():
    w = torch.randn(3, 4, 3, 3, dtype=D64)
    before = w.clone()
    sv = C.conv_singular_values(w, (6, 5))
    # bounds containing every singular value: nothing changes
    nw, nsv = C.clip_conv_singular_values(w, (6, 5), float(sv.min()) * 0.9, float(sv.max()) * 1.1)
    torch.testing.assert_close(nw, w, atol=1e-12, rtol=0)
    torch.testing.assert_close(nsv, sv, atol=1e-12, rtol=0)
    assert torch.equal(w, before)  # input untouched
    # a kernel as large as the input: no truncation, the projection is exact (odd, even
    # and 1-D sizes: the one-sided FFT has a Nyquist plane only for even sizes)
    for size in ((6, 5), (4, 6), (8,)):
        full = torch.randn(3, 4, *size, dtype=D64)
        nw, nsv = C.clip_conv_singular_values(full, size, 0.5, 1.5)
        assert nw.shape == full.shape and nsv.shape == (math.prod(size), 3)
        assert float(nsv.min()) >= 0.5 - 1e-12 and float(nsv.max()) <= 1.5 + 1e-12
        torch.testing.assert_close(nsv, C.conv_singular_values(nw, size))
    # with truncation the returned singular values are those of the truncated kernel
    nw, nsv = C.clip_conv_singular_values(w, (6, 5), 0.5, 1.5)
    assert nw.shape == w.shape
    torch.testing.assert_close(nsv, C.conv_singular_values(nw, (6, 5)))
    assert float((nsv - 1).abs().max()) < float((sv - 1).abs().max())  # closer to the band than before


# ---------------------------------------------------------------- dtypes, layouts of inputs, empties

OPS = {
    "conv_to_matrix": lambda w: C.conv_to_matrix(w, (5, 4), stride=(2, 1), padding=1, groups=2),
    "conv_frame_penalty": lambda w: C.conv_frame_penalty(w, (5, 4), 0.5, 2.0, padding=1, groups=2),
    "conv_gershgorin_bounds": lambda w: C.conv_gershgorin_bounds(w, (5, 4), padding=1, groups=2),
    "conv_orthogonality_penalty": lambda w: C.conv_orthogonality_penalty(w, stride=2),
    "conv_singular_values": lambda w: C.conv_singular_values(w, (5, 4)),
    "clip_conv_singular_values": lambda w: C.clip_conv_singular_values(w, (5, 4), 0.3, 1.0),
}




def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-3, 2e-3),
                                             (torch.bfloat16, 1e-2, 1e-2)])
@pytest.mark.parametrize("name", list(OPS))
def test_low_precision_vs_float64(name, dtype, atol, rtol):
    # same (rounded) weights in float64 as the truth: the tolerance measures the op's own
    # arithmetic (float32 inside) plus the final rounding to dtype
    w = (0.5 * torch.randn(4, 2, 3, 3)).to(dtype)
    outs, truths = _as_tuple(OPS[name](w)), _as_tuple(OPS[name](w.double()))
    for out, truth in zip(outs, truths):
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), truth, atol=atol * max(1.0, float(truth.abs().max())), rtol=rtol)


@pytest.mark.parametrize("name", list(OPS))
def test_non_contiguous_weight_and_inputs_untouched(name):
    # every other filter of a larger tensor, and a kernel stored transposed
    for view in (torch.randn(8, 2, 3, 3, dtype=D64)[::2], torch.randn(4, 2, 3, 3, dtype=D64).transpose(2, 3)):
        assert not view.is_contiguous()
        saved = view.clone()
        for out, ref in zip(_as_tuple(OPS[name](view)), _as_tuple(OPS[name](view.contiguous()))):
            torch.testing.assert_close(out, ref, atol=1e-14, rtol=1e-14)
        assert torch.equal(view, saved)


def test_empty_weight():
    # no output channels: T has no rows; penalties over nothing are 0; the OCNN penalty
    # of no filters is 0; there are no singular values per frequency
    e = torch.randn(0, 3, 3, 3, dtype=D64, requires_grad=True)
    assert C.conv_to_matrix(e, (5, 4), padding=1).shape == (0, 60)
    assert C.conv_to_matrix(e, (5, 4), padding=1, layout="csr").shape == (0, 60)
    p = C.conv_frame_penalty(e, (5, 4), 0.5, 2.0, padding=1)
    assert float(p.detach()) == 0.0
    p.backward()
    assert e.grad.shape == e.shape
    lo, hi = C.conv_gershgorin_bounds(e, (5, 4), padding=1)
    assert float(lo) == math.inf and float(hi) == -math.inf
    # the cols side of an empty T is the zero Gram: d = r = 0, penalty A² (docs/gram.md#frame_penalty as is)
    torch.testing.assert_close(C.conv_frame_penalty(e, (5, 4), 0.5, 2.0, padding=1, side="cols"),
                               torch.tensor(0.25, dtype=D64))
    assert float(C.conv_orthogonality_penalty(e).detach()) == 0.0
    assert C.conv_singular_values(e, (5, 4)).shape == (20, 0)
    nw, nsv = C.clip_conv_singular_values(e.detach(), (5, 4), 0.5, 2.0)
    assert nw.shape == e.shape and nsv.shape == (20, 0)


# ---------------------------------------------------------------- backends and torch.compile

# backends each op has for CPU tensors besides "reference" (tables in regkernels/ops/conv.py): the
# Sedghi ops' per-frequency SVD kernel runs only when named there (LAPACK's complex SVD is faster on
# CPU); the fused Triton frame stats take float16 / bfloat16 / float32, not these float64 weights
CPU_KERNELS = {"conv_to_matrix": MATRIX_BACKENDS[1:], "conv_frame_penalty": ["cpu", "torch"],
               "conv_gershgorin_bounds": ["cpu", "torch"],
               "conv_orthogonality_penalty": ["torch"], "conv_singular_values": ["cpu"], "clip_conv_singular_values": ["cpu"]}
# what backend=None takes for float64 CPU weights
CPU_DEFAULT = {"conv_to_matrix": "cpu", "conv_frame_penalty": "cpu", "conv_gershgorin_bounds": "cpu",
               "conv_orthogonality_penalty": "torch", "conv_singular_values": "reference",
               "clip_conv_singular_values": "reference"}


def _backends_listed(name: str) -> str:
    """The listing of a refusal: every backend that takes CPU float64 weights, in table order."""
    have = {"conv_to_matrix": MATRIX_BACKENDS[1:], "conv_frame_penalty": ["cpu", "torch"],
            "conv_gershgorin_bounds": ["cpu", "torch"], "conv_orthogonality_penalty": ["torch"],
            "conv_singular_values": ["cpu"], "clip_conv_singular_values": ["cpu"]}[name] + ["reference"]
    return ", ".join(f"'{b}'" for b in have)


@pytest.mark.parametrize("name", list(OPS))
def test_backend_selection(name):
    fn = getattr(C, name)
    w = torch.randn(4, 2, 3, 3, dtype=D64)
    args = {"conv_to_matrix": ((5, 4),), "conv_frame_penalty": ((5, 4), 0.5, 2.0),
            "conv_gershgorin_bounds": ((5, 4),), "conv_orthogonality_penalty": (),
            "conv_singular_values": ((5, 4),), "clip_conv_singular_values": ((5, 4), 0.3, 1.0)}[name]
    want = _as_tuple(getattr(R, name)(w, *args))
    for a, b in zip(_as_tuple(fn(w, *args, backend="reference")), want):
        assert torch.equal(a, b)
    for backend in CPU_KERNELS[name]:
        for a, b in zip(_as_tuple(fn(w, *args, backend=backend)), want):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert C.TABLE.implementation(name, None, w.device, w.dtype) is \
        C.TABLE.implementation(name, CPU_DEFAULT[name], w.device, w.dtype)
    missing = "cuda" if name not in ("conv_singular_values", "clip_conv_singular_values") else "triton"
    with pytest.raises(ValueError, match=rf"{name}: no '{missing}' backend for cpu tensors; backends "
                                         rf"that take cpu fp64 inputs here: {_backends_listed(name)}$"):
        fn(w, *args, backend=missing)
    with pytest.raises(ValueError, match=rf"{name}: backend must be None or one of 'reference', 'torch', 'cpu', "
                                         rf"'cuda', 'triton'; got 'fast'"):
        fn(w, *args, backend="fast")
    with pytest.raises(TypeError, match=rf"{name}: backend must be None or one of .* got int"):
        fn(w, *args, backend=1)
    with pytest.raises(TypeError, match=r"positional"):  # backend is keyword-only
        fn(w, *args, *((None,) * (10 - len(args))), "reference")


@pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton runs on CPU tensors only interpreted (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("name", ["conv_frame_penalty", "conv_gershgorin_bounds"])
def test_named_triton_refuses_float64_listing_what_takes_it(name):
    # the fused stats are float32 inside: a float64 weight used to run the torch path silently
    w = torch.randn(4, 2, 3, 3, dtype=D64)
    args = ((5, 4), 0.5, 2.0) if name == "conv_frame_penalty" else ((5, 4),)
    with pytest.raises(ValueError, match=rf"{name}: the 'triton' backend takes torch.float16, "
                                         rf"torch.bfloat16, torch.float32, not torch.float64; backends that take "
                                         rf"cpu fp64 inputs here: 'cpu', 'torch', 'reference'$"):
        getattr(C, name)(w, *args, padding=1, backend="triton")
    for a, b in zip(_as_tuple(getattr(C, name)(w.float(), *args, padding=1, backend="triton")),
                    _as_tuple(getattr(C, name)(w, *args, padding=1, backend="reference"))):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layout", ["dense", "coo", "csr"])
def test_conv_to_matrix_named_backend_must_build_the_layout(layout):
    # the dense kernels ("cpu", "triton") do not build the sparse layouts, the sparse composite
    # ("torch") not the dense one: named, they refuse and list the backends that do
    w = torch.randn(4, 2, 3, 3, dtype=D64)
    builds = MATRIX_BACKENDS if layout == "dense" else SPARSE_BACKENDS
    for backend in ("reference", "torch", "cpu") + (("triton",) if TRITON_ON_CPU else ()):
        if backend in builds:
            T = C.conv_to_matrix(w, (5, 4), padding=1, layout=layout, backend=backend)
            torch.testing.assert_close(T.to_dense(), R.conv_to_matrix(w, (5, 4), padding=1))
            continue
        have = ", ".join(f"'{b}'" for b in (["cpu"] + MATRIX_BACKENDS[2:] + ["reference"] if layout == "dense"
                                            else ["torch", "reference"]))
        named = "conv_to_matrix" if layout == "dense" else rf"conv_to_matrix\(layout='{layout}'\)"
        with pytest.raises(ValueError, match=rf"{named}: no '{backend}' backend for "
                                             rf"cpu tensors; backends that take cpu fp64 inputs here: {have}$"):
            C.conv_to_matrix(w, (5, 4), padding=1, layout=layout, backend=backend)
    # backend=None: the C++ kernel for the dense layout, the composite for the sparse ones
    S = C.conv_to_matrix(w, (5, 4), padding=1, layout=layout)
    assert S.layout == {"dense": torch.strided, "coo": torch.sparse_coo, "csr": torch.sparse_csr}[layout]


def test_conv_singular_values_named_kernel_refuses_weights_it_cannot_take():
    # the SVD kernel takes the 2·C_out × 2·C_in real embedding up to its size limit (128 on CPU);
    # backend=None runs larger weights on the reference's complex SVD, a named kernel refuses them
    w = torch.randn(80, 72, 1, 1, dtype=D64)
    sv = C.conv_singular_values(w, (2, 2))
    torch.testing.assert_close(sv, R.conv_singular_values(w, (2, 2)))
    with pytest.raises(ValueError, match=r"conv_singular_values"):
        C.conv_singular_values(w, (2, 2), backend="cpu")
    with pytest.raises(ValueError, match=r"clip_conv_singular_values"):
        C.clip_conv_singular_values(w, (2, 2), 0.5, 1.0, backend="cpu")


# ---------------------------------------------------------------- torch.func

# each differentiable op as a scalar loss of the weight (a fixed projection of conv_to_matrix's T)
_PROJ = torch.Generator().manual_seed(7)
_G = torch.randn(4 * 20, 2 * 20, generator=_PROJ, dtype=D64)
FUNC_LOSSES = {
    "conv_to_matrix": lambda w, b=None: (C.conv_to_matrix(w, (5, 4), stride=(1, 1), padding=1, backend=b) * _G).sum(),
    "conv_frame_penalty": lambda w, b=None: C.conv_frame_penalty(w, (5, 4), 0.5, 2.0, padding=1, groups=2, backend=b),
    "conv_gershgorin_bounds": lambda w, b=None: (lambda lo, hi: hi - 2 * lo)(
        *C.conv_gershgorin_bounds(w, (5, 4), padding=1, side="cols", backend=b)),
    "conv_orthogonality_penalty": lambda w, b=None: C.conv_orthogonality_penalty(w, stride=2, backend=b),
    "conv_singular_values": lambda w, b=None: C.conv_singular_values(w, (5, 4), backend=b).pow(2).sum(),
    "clip_conv_singular_values": lambda w, b=None: C.clip_conv_singular_values(w, (5, 4), 0.5, 1.0,
                                                                                backend=b)[0].pow(2).sum(),
}


@pytest.mark.parametrize("name", list(FUNC_LOSSES))
def test_torch_func_grad_and_vjp_equal_the_reference_gradient(name):
    # backend=None on CPU tensors: the C++ conv_to_matrix and the composite frame stats go through
    # their autograd.Functions under torch.func (their custom ops' register_autograd does not run there)
    loss = FUNC_LOSSES[name]
    w = 0.5 * torch.randn(4, 2, 3, 3, dtype=D64)
    x = w.clone().requires_grad_(True)
    want, = torch.autograd.grad(loss(x, "reference"), x)
    torch.testing.assert_close(torch.func.grad(loss)(w), want, atol=1e-11, rtol=1e-10)
    value, pullback = torch.func.vjp(loss, w)
    torch.testing.assert_close(value, loss(w, "reference"), atol=1e-11, rtol=1e-10)
    torch.testing.assert_close(pullback(torch.ones((), dtype=D64))[0], want, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("name", list(FUNC_LOSSES))
def test_torch_func_vmap_over_a_stack_of_weights_equals_a_loop(name):
    loss = FUNC_LOSSES[name]
    Ws = 0.5 * torch.randn(3, 4, 2, 3, 3, dtype=D64)
    torch.testing.assert_close(torch.func.vmap(loss)(Ws), torch.stack([loss(w) for w in Ws]), atol=1e-12, rtol=1e-12)
    if name == "clip_conv_singular_values":
        # the reference's complex SVD backward checks its phase gauge with torch.allclose, which
        # torch.vmap does not batch ("vmap over torch.allclose isn't supported yet")
        return
    grads = torch.func.vmap(torch.func.grad(loss))(Ws)
    torch.testing.assert_close(grads, torch.stack([torch.func.grad(loss)(w) for w in Ws]), atol=1e-12, rtol=1e-12)


def test_torch_func_full_matrix_and_frame_stats_ops():
    # the vmap rules of the dense T (and of its backward, under vmap of vjp) and of the stats op
    # returning several outputs, against per-layer calls
    Ws = torch.randn(2, 4, 2, 3, 3, dtype=D64)
    T = torch.func.vmap(lambda w: C.conv_to_matrix(w, (5, 4), padding=1))(Ws)
    torch.testing.assert_close(T, torch.stack([R.conv_to_matrix(w, (5, 4), padding=1) for w in Ws]))
    cot = torch.randn_like(T)
    _, pullback = torch.func.vjp(lambda W: torch.func.vmap(lambda w: C.conv_to_matrix(w, (5, 4), padding=1))(W), Ws)
    want = torch.stack([torch.autograd.grad((R.conv_to_matrix(w.requires_grad_(), (5, 4), padding=1) * c).sum(), w)[0]
                        for w, c in zip(Ws.clone(), cot)])
    torch.testing.assert_close(pullback(cot)[0], want)
    lo, hi = torch.func.vmap(lambda w: C.conv_gershgorin_bounds(w, (5, 4), padding=1))(Ws)
    for i, w in enumerate(Ws):
        torch.testing.assert_close((lo[i], hi[i]), C.conv_gershgorin_bounds(w, (5, 4), padding=1, backend="reference"))


@pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton runs on CPU tensors only interpreted (TRITON_INTERPRET=1)")
def test_torch_func_on_the_triton_backends():
    # conv_to_matrix's Triton kernel is the default on CUDA; the fused frame stats run when named
    w = 0.5 * torch.randn(2, 2, 2, 2)
    G = torch.randn(2 * 16, 2 * 9)  # T: (C_out·4·4, C_in·3·3)
    losses = {"conv_to_matrix": lambda w, b: (C.conv_to_matrix(w, (3, 3), padding=1, backend=b) * G).sum(),
              "conv_frame_penalty": lambda w, b: C.conv_frame_penalty(w, (3, 3), 0.5, 2.0, padding=1, backend=b)}
    for name, loss in losses.items():
        x = w.double().requires_grad_(True)
        want, = torch.autograd.grad(loss(x, "reference"), x)
        got = torch.func.grad(loss)(w, "triton")
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        Ws = torch.stack([w, 2 * w])
        torch.testing.assert_close(torch.func.vmap(loss, in_dims=(0, None))(Ws, "triton"),
                                   torch.stack([loss(v, "triton") for v in Ws]))


@pytest.mark.parametrize("name", list(OPS))
def test_torch_compile_fullgraph(name):
    torch._dynamo.reset()
    w = torch.randn(4, 2, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(OPS[name], fullgraph=True)
        outs = _as_tuple(compiled(w))
    for out, ref in zip(outs, _as_tuple(OPS[name](w))):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bad input (docs/index.md#bad-input)

W = torch.randn(4, 2, 3, 3)
BAD = [
    (lambda: C.conv_to_matrix(W[0, 0], (5, 5)), ValueError, r"conv_to_matrix: weight must have 3 or 4 or 5 dims"),
    (lambda: C.conv_to_matrix(W[None, None], (5, 5)), ValueError, r"weight must have 3 or 4 or 5 dims"),
    (lambda: C.conv_to_matrix(W.long(), (5, 5)), TypeError, r"conv_to_matrix: weight must have a floating dtype"),
    (lambda: C.conv_to_matrix(W.numpy(), (5, 5)), TypeError, r"weight must be a torch.Tensor"),
    (lambda: C.conv_to_matrix(torch.randn(4, 2, 0, 3), (5, 5)), ValueError, r"weight must have kernel sizes >= 1"),
    (lambda: C.conv_to_matrix(W, (5,)), ValueError, r"conv_to_matrix: input_size must be a sequence of 2 positive"),
    (lambda: C.conv_to_matrix(W, (5, 0)), ValueError, r"input_size must be a sequence of 2 positive ints"),
    (lambda: C.conv_to_matrix(W, 5), TypeError, r"input_size must be a sequence of 2 positive ints"),
    (lambda: C.conv_to_matrix(W, (5.0, 5)), TypeError, r"input_size must be a sequence"),
    (lambda: C.conv_to_matrix(W, (5, 5), stride=0), ValueError, r"conv_to_matrix: stride must be an int or a "
                                                                 r"sequence of 2 ints, each >= 1; got 0"),
    (lambda: C.conv_to_matrix(W, (5, 5), stride=(1, 1, 1)), ValueError, r"stride must be an int or a sequence of 2"),
    (lambda: C.conv_to_matrix(W, (5, 5), stride=1.5), TypeError, r"stride must be an int or a sequence"),
    (lambda: C.conv_to_matrix(W, (5, 5), dilation=(1, 0)), ValueError, r"dilation must be .* each >= 1"),
    (lambda: C.conv_to_matrix(W, (5, 5), padding=-1), ValueError, r"padding must be .* each >= 0; got -1"),
    (lambda: C.conv_to_matrix(W, (5, 5), groups=3), ValueError, r"groups must divide the output channels C_out"),
    (lambda: C.conv_to_matrix(W, (5, 5), groups=0), ValueError, r"groups must be >= 1"),
    (lambda: C.conv_to_matrix(W, (5, 5), padding_mode="reflect"), ValueError, r"padding_mode must be 'zeros' or"),
    (lambda: C.conv_to_matrix(W, (5, 5), layout="bsr"), ValueError, r"layout must be 'dense', 'coo' or 'csr'"),
    (lambda: C.conv_to_matrix(W, (5, 5), max_dense_bytes=-1), ValueError, r"max_dense_bytes must be >= 0"),
    (lambda: C.conv_to_matrix(W, (2, 2)), ValueError, r"output size must be >= 1 per dim.*got output size \(0, 0\)"),
    (lambda: C.conv_to_matrix(W, (2, 2), padding=3, padding_mode="circular"), ValueError,
     r"padding must be <= input_size per dim for padding_mode='circular'"),
    (lambda: C.conv_frame_penalty(W, (5, 5), -0.1, 1.0), ValueError, r"conv_frame_penalty: A must be >= 0"),
    (lambda: C.conv_frame_penalty(W, (5, 5), 2.0, 1.0), ValueError, r"conv_frame_penalty: need A <= B"),
    (lambda: C.conv_frame_penalty(W, (5, 5), "a", 1.0), TypeError, r"A must be a real number"),
    (lambda: C.conv_frame_penalty(W, (5, 5), 0.5, 1.0, side="both"), ValueError, r"side must be 'auto', 'rows'"),
    (lambda: C.conv_gershgorin_bounds(W, (5, 5), groups=3), ValueError, r"conv_gershgorin_bounds: groups must"),
    (lambda: C.conv_orthogonality_penalty(W.int()), TypeError, r"conv_orthogonality_penalty: weight must have a"),
    (lambda: C.conv_orthogonality_penalty(W, stride=0), ValueError, r"conv_orthogonality_penalty: stride must be"),
    (lambda: C.conv_orthogonality_penalty(W, padding=(-1, 0)), ValueError, r"padding must be .* each >= 0"),
    (lambda: C.conv_singular_values(W, (2, 5)), ValueError,
     r"conv_singular_values: weight's kernel \(3, 3\) must fit the circular input"),
    (lambda: C.conv_singular_values(W, (5, 5, 5)), ValueError, r"input_size must be a sequence of 2 positive"),
    (lambda: C.clip_conv_singular_values(W, (5, 5), 2.0, 1.0), ValueError,
     r"clip_conv_singular_values: need lo <= hi"),
    (lambda: C.clip_conv_singular_values(W, (5, 5), -1.0, 1.0), ValueError, r"lo must be >= 0"),
    (lambda: C.clip_conv_singular_values(W, (2, 2), 0.5, 1.0), ValueError, r"must fit the circular input"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_reference_checks_kernel_fit_itself():
    with pytest.raises(ValueError, match=r"conv_singular_values: the kernel \(3, 3\) must fit the circular input"):
        R.conv_singular_values(W, (2, 5))
