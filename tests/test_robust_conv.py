"""Robustness of the conv family (issue 13, docs/index.md): non-finite weights, double backward,
sizes that cannot fit, the raw registered ops' argument checks, layers without channels, the
sparse plan cache and the border-class enumeration at large inputs.

Oracles: the explicit reference (``frame_penalty(conv_to_matrix(...))``, LAPACK's complex SVD, the
OCNN ``conv2d``), a per-position enumeration of the border classes written out here, and exact
affine/bilinear extrapolation of small explicit evaluations for the large inputs.
"""
from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from regkernels import _ext
from regkernels import _geometry as CG
from regkernels.composite import conv as CC
from regkernels.ops import conv as C
from regkernels.reference import conv as R

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state",
                                        "ignore:invalid value encountered")

D64 = torch.float64
TRITON_ON_CPU = _ext.triton_interpreted()
# conv_to_matrix: the dense kernels, and the sparse builder besides the reference's (the composite)
MATRIX_KERNELS = ["cpu"] + (["triton"] if TRITON_ON_CPU else [])
SPARSE_BACKENDS = ["reference", "torch"]
# the implicit frame stats: the composite, and the fused Triton form (float32)
FRAME_KERNELS = ["torch"] + (["triton"] if TRITON_ON_CPU else [])
ops = torch.ops.regkernels


def _same_nan_pattern(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(torch.isposinf(a), torch.isposinf(b)) and torch.equal(torch.isneginf(a), torch.isneginf(b))


# ---------------------------------------------------------------- item 1: non-finite layers, implicit frame path

FRAME_GEOMETRIES = [((4, 3, 3, 3), (6, 5), dict(padding=1)),
                    ((4, 2, 3, 3), (5, 6), dict(stride=2, padding=1, groups=2)),
                    ((3, 2, 3), (7,), dict(padding=1, padding_mode="circular"))]


@pytest.mark.parametrize("backend", FRAME_KERNELS)
@pytest.mark.parametrize("shape,size,kw", FRAME_GEOMETRIES)
@pytest.mark.parametrize("side", ["rows", "cols"])
def test_conv_frame_penalty_overflowing_weight_is_inf_like_explicit(backend, shape, size, kw, side):
    # one float32 weight at 1e20: d = 1e40 overflows to +inf in T's Gram; the implicit path gave
    # NaN (its tap Gram overflowed and met a class table's structural 0: inf·0)
    w = torch.randn(shape)
    w.view(-1)[5] = 1e20
    want = C.conv_frame_penalty(w, size, 0.5, 2.0, side=side, backend="reference", **kw)
    got = C.conv_frame_penalty(w, size, 0.5, 2.0, side=side, backend=backend, **kw)
    assert float(want) == math.inf and float(got) == math.inf
    lo_want, hi_want = C.conv_gershgorin_bounds(w, size, side=side, backend="reference", **kw)
    lo, hi = C.conv_gershgorin_bounds(w, size, side=side, backend=backend, **kw)
    assert float(hi) == float(hi_want) == math.inf
    _same_nan_pattern(lo, lo_want)
    if math.isfinite(float(lo_want)):
        torch.testing.assert_close(lo, lo_want, rtol=1e-5, atol=0)
    # the gradient of an infinite penalty is NaN for the overflowing weight's group, as the explicit
    # path's; the explicit path's dense TᵀT also spreads NaN (inf·0) into the other groups, whose
    # partial derivatives are finite and stay so here
    got, want = [torch.autograd.grad(C.conv_frame_penalty(x, size, 0.5, 2.0, side=side, backend=b, **kw), x)[0]
                 for b, x in ((backend, w.clone().requires_grad_()), ("reference", w.clone().requires_grad_()))]
    group = slice(0, shape[0] // kw.get("groups", 1))  # weight index 5 lies in the first group
    assert bool(torch.isnan(got[group]).all()) and bool(torch.isnan(want[group]).all())
    assert bool((torch.isnan(got) <= torch.isnan(want)).all())


@pytest.mark.parametrize("backend", FRAME_KERNELS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_conv_frame_penalty_nonfinite_weight_is_nan_like_explicit(backend, bad, dtype):
    shape, size, kw = FRAME_GEOMETRIES[0]
    w = torch.randn(shape, dtype=dtype)
    w[1, 2, 1, 1] = bad
    if backend == "triton" and dtype == D64:  # the fused stats are float32 inside: named, it refuses float64
        with pytest.raises(ValueError, match=r"conv_frame_penalty: the 'triton' backend takes "
                                             r"torch.float16, torch.bfloat16, torch.float32, not torch.float64"):
            C.conv_frame_penalty(w, size, 0.5, 2.0, backend=backend, **kw)
        return
    for side in ("rows", "cols"):
        vals = [C.conv_frame_penalty(w, size, 0.5, 2.0, side=side, backend=b, **kw) for b in (backend, "reference")]
        assert all(bool(torch.isnan(v)) for v in vals)
        for a, b in zip(C.conv_gershgorin_bounds(w, size, side=side, backend=backend, **kw),
                        C.conv_gershgorin_bounds(w, size, side=side, backend="reference", **kw)):
            assert bool(torch.isnan(a)) and bool(torch.isnan(b))
        grads = [torch.autograd.grad(C.conv_frame_penalty(x, size, 0.5, 2.0, side=side, backend=b, **kw), x)[0]
                 for b, x in ((backend, w.clone().requires_grad_()), ("reference", w.clone().requires_grad_()))]
        _same_nan_pattern(*grads)
        assert bool(torch.isnan(grads[0]).any())


@pytest.mark.parametrize("backend", FRAME_KERNELS)
def test_conv_frame_bounds_of_huge_and_tiny_finite_weights_match_explicit(backend):
    # finite weights far from 1 (the stats are computed from the weight scaled by a power of
    # two, then scaled back): the same numbers as the explicit path where nothing overflows
    shape, size, kw = FRAME_GEOMETRIES[1]
    for scale in (2.0 ** 50, 2.0 ** -50):
        w = torch.randn(shape) * scale
        for side in ("rows", "cols"):
            for a, b in zip(C.conv_gershgorin_bounds(w, size, side=side, backend=backend, **kw),
                            C.conv_gershgorin_bounds(w.double(), size, side=side, backend="reference", **kw)):
                torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- item 2: double backward

@pytest.mark.parametrize("backend", ["reference"] + MATRIX_KERNELS)
@pytest.mark.parametrize("kw,shape,size", [(dict(stride=2, padding=1, groups=2), (4, 1, 3, 2), (5, 4)),
                                           (dict(padding=2, padding_mode="circular"), (2, 2, 5, 3), (3, 2))])
def test_conv_to_matrix_dense_double_backward_gradgradcheck(backend, kw, shape, size):
    w = torch.randn(shape, dtype=D64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda w: C.conv_to_matrix(w, size, backend=backend, **kw), (w,),
                                 fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", MATRIX_KERNELS)
def test_conv_to_matrix_dense_hessian_vector_product_equals_reference(backend):
    # the case: the HVP of a loss of T was 0 on the kernels (torch only warned)
    w = torch.randn(2, 3, 3, 3, dtype=D64, requires_grad=True)
    v = torch.randn_like(w)
    G = torch.randn(2 * 16, 3 * 16, dtype=D64)

    def hvp(b):
        T = C.conv_to_matrix(w, (4, 4), padding=1, backend=b)
        loss = ((T * G) ** 2).sum()
        g, = torch.autograd.grad(loss, w, create_graph=True)
        return torch.autograd.grad((g * v).sum(), w)[0]

    want = hvp("reference")
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(hvp(backend), want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_conv_to_matrix_sparse_double_backward_is_refused(backend, layout):
    # torch's sparse constructors have no double backward: the second derivative was silently 0
    w = torch.randn(3, 2, 3, 3, dtype=D64, requires_grad=True)
    T = C.conv_to_matrix(w, (5, 4), padding=1, layout=layout, backend=backend)
    with pytest.raises(RuntimeError, match=rf"conv_to_matrix: double backward \(create_graph=True\) is not "
                                           rf"supported for layout='{layout}'.*layout='dense' supports it"):
        torch.autograd.grad(T.to_dense().pow(2).sum(), w, create_graph=True)
    # first-order gradients are unaffected
    g, = torch.autograd.grad(C.conv_to_matrix(w, (5, 4), padding=1, layout=layout, backend=backend)
                             .to_dense().pow(2).sum(), w)
    torch.testing.assert_close(g, torch.autograd.grad(C.conv_to_matrix(w, (5, 4), padding=1).pow(2).sum(), w)[0])


def test_conv_frame_penalty_reference_double_backward_gradgradcheck():
    w = (0.5 * torch.randn(3, 2, 3, 3, dtype=D64)).requires_grad_(True)
    for side in ("rows", "cols"):
        torch.autograd.gradgradcheck(
            lambda w: C.conv_frame_penalty(w, (4, 4), 0.3, 1.2, padding=1, side=side, backend="reference"), (w,))


@pytest.mark.parametrize("backend", FRAME_KERNELS)
@pytest.mark.parametrize("name", ["conv_frame_penalty", "conv_gershgorin_bounds"])
def test_conv_frame_kernels_refuse_double_backward(backend, name):
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    args = ((4, 4), 0.3, 1.2) if name == "conv_frame_penalty" else ((4, 4),)
    out = getattr(C, name)(w, *args, padding=1, backend=backend)
    loss = out if name == "conv_frame_penalty" else out[1] - out[0]
    g, = torch.autograd.grad(loss, w, create_graph=True)  # the first derivative itself is exact
    torch.testing.assert_close(g, torch.autograd.grad(getattr(C, name)(w, *args, padding=1, backend="reference")
                                                      if name == "conv_frame_penalty" else
                                                      (lambda lo, hi: hi - lo)(*getattr(C, name)(
                                                          w, *args, padding=1, backend="reference")), w)[0],
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match=rf"conv_frame_penalty / conv_gershgorin_bounds: double backward .* not "
                                           rf"supported by backend='{backend}'; backend='reference' supports it"):
        torch.autograd.grad(g.pow(2).sum(), w)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_orthogonality_penalty_double_backward_gradgradcheck(stride):
    w = torch.randn(3, 2, 3, 3, dtype=D64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda w: C.conv_orthogonality_penalty(w, stride=stride), (w,))


def test_conv_singular_values_reference_double_backward_gradgradcheck():
    w = torch.randn(3, 2, 3, 3, dtype=D64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda w: C.conv_singular_values(w, (4, 3), backend="reference"), (w,))
    torch.autograd.gradgradcheck(lambda w: C.clip_conv_singular_values(w, (4, 3), 0.5, 1.0, backend="reference")[0],
                                 (w,))


@pytest.mark.parametrize("name", ["conv_singular_values", "clip_conv_singular_values"])
def test_conv_singular_values_kernel_refuses_double_backward(name):
    w = torch.randn(3, 2, 3, 3, dtype=D64, requires_grad=True)
    args = ((4, 3),) if name == "conv_singular_values" else ((4, 3), 0.5, 1.0)
    out = getattr(C, name)(w, *args, backend="cpu")
    out = out if name == "conv_singular_values" else out[0]
    with pytest.raises(RuntimeError, match=rf"{name}: double backward \(create_graph=True\) is not supported by "
                                           rf"backend='cpu'; backend='reference' supports it"):
        torch.autograd.grad(out.sum(), w, create_graph=True)


def test_clip_conv_singular_values_kernel_gradient_is_finite_and_matches_reference():
    # the real embedding doubles every singular value; the SVD's backward divided by 0 there (NaN)
    w = torch.randn(3, 2, 3, 3, dtype=D64, requires_grad=True)
    torch.autograd.gradcheck(lambda w: C.clip_conv_singular_values(w, (4, 3), 0.5, 1.0, backend="cpu")[0], (w,))
    G = torch.randn(3, 2, 3, 3, dtype=D64)
    got, = torch.autograd.grad((C.clip_conv_singular_values(w, (4, 3), 0.5, 1.0, backend="cpu")[0] * G).sum(), w)
    want, = torch.autograd.grad((C.clip_conv_singular_values(w, (4, 3), 0.5, 1.0, backend="reference")[0] * G).sum(),
                                w)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------- item 7: Sedghi ops on non-finite weights

@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_conv_singular_values_nonfinite_weight_is_nan_on_every_backend(backend, bad):
    w = torch.randn(3, 2, 3, 3, dtype=D64)
    w[0, 1, 1, 1] = bad
    x = w.clone().requires_grad_()
    sv = C.conv_singular_values(x, (5, 4), backend=backend)
    assert sv.shape == (20, 2) and bool(torch.isnan(sv).all())
    g, = torch.autograd.grad(sv.sum(), x)
    assert bool(torch.isnan(g).all())
    nw, nsv = C.clip_conv_singular_values(w, (5, 4), 0.5, 1.0, backend=backend)
    assert nw.shape == w.shape and bool(torch.isnan(nw).all()) and bool(torch.isnan(nsv).all())
    # finite weights are unaffected by the non-finite handling
    ok = torch.randn(3, 2, 3, 3, dtype=D64)
    torch.testing.assert_close(C.conv_singular_values(ok, (5, 4), backend=backend),
                               torch.linalg.svdvals(R._frequency_matrices(ok, (5, 4))))


# ---------------------------------------------------------------- item 8: sizes that cannot fit

@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_conv_to_matrix_sparse_refuses_what_cannot_fit_before_allocating(backend, layout):
    w = torch.randn(1, 1, 3, 3)
    with pytest.raises(ValueError, match=rf"conv_to_matrix: the '{layout}' layout of T with up to 32400000000 "
                                         rf"structural entries .* needs about \d+ bytes .* over MAX_WORK_BYTES"):
        C.conv_to_matrix(w, (60000, 60000), padding=1, layout=layout, backend=backend)


@pytest.mark.parametrize("backend,needs", [
    ("reference", r"the self-convolution O of shape \(4, 4, 200001, 200001\) and the padded kernel need"),
    ("torch", r"the DFT products of 1 layer\(s\) of shape \(4, 3, 3, 3\) and the self-convolution O of shape "
              r"\(4, 4, 200001, 200001\) need"),
])
def test_conv_orthogonality_penalty_refuses_huge_padding_before_allocating(backend, needs):
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match=rf"conv_orthogonality_penalty: {needs} \d+ bytes .* over MAX_WORK_BYTES"):
        C.conv_orthogonality_penalty(w, padding=10**5, backend=backend)
    # a large but fitting padding is computed: beyond the kernel's reach O is 0
    P = 7
    O = torch.nn.functional.conv2d(w.double(), w.double(), padding=P)
    target = torch.zeros_like(O)
    target[:, :, P, P] = torch.eye(4, dtype=D64)
    torch.testing.assert_close(C.conv_orthogonality_penalty(w.double(), padding=P, backend=backend),
                               ((O - target) ** 2).sum())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_conv_singular_values_refuses_huge_input_before_allocating(backend):
    w = torch.randn(8, 8, 3, 3)
    for call in (lambda: C.conv_singular_values(w, (60000, 60000), backend=backend),
                 lambda: C.clip_conv_singular_values(w, (60000, 60000), 0.5, 1.0, backend=backend)):
        with pytest.raises(ValueError, match=r"conv_singular_values|clip_conv_singular_values"):
            call()
    with pytest.raises(ValueError, match=r"conv_singular_values: the 3600000000 per-frequency 8×8 blocks and their "
                                         r"SVDs need about \d+ bytes .* over MAX_WORK_BYTES"):
        C.conv_singular_values(w, (60000, 60000), backend=backend)


@pytest.mark.parametrize("backend", FRAME_KERNELS)
def test_conv_frame_penalty_refuses_work_that_cannot_fit(backend):
    # 10^5 input channels of 3×3 taps: the tap Gram alone would be (9·10^5)² floats
    w = torch.zeros(1, 100_000, 3, 3)
    with pytest.raises(ValueError, match=r"conv_frame_penalty: the tap Gram needs 810000000000 elements .* over "
                                         r"MAX_WORK_BYTES"):
        C.conv_frame_penalty(w, (8, 8), 0.5, 2.0, padding=1, side="cols", backend=backend)
    with pytest.raises(ValueError, match=r"conv_gershgorin_bounds: the tap Gram needs"):
        C.conv_gershgorin_bounds(w, (8, 8), padding=1, side="cols", backend=backend)


# ---------------------------------------------------------------- item 11: the raw registered ops check their arguments

W5 = torch.randn(4, 2, 1, 3, 3, dtype=D64)
GEO = ([1, 5, 5], [1, 1, 1], [0, 1, 1], [1, 1, 1], 2, False)


def _dense_ops():
    names = ["conv_to_matrix_dense"] + (["conv_to_matrix_triton"] if TRITON_ON_CPU else [])
    return [(n, n + "_backward") for n in names]


BAD_GEOMETRY = [
    ((W5[0], *GEO), r"weight must be 5-D \(C_out, C_in/groups, k0, k1, k2\)"),
    ((W5.int(), *GEO), r"weight must be float16, bfloat16, float32 or float64"),
    ((W5, [1, 5], *GEO[1:]), r"input_size, stride, padding and dilation must have 3 entries each"),
    ((W5, GEO[0], [1, 0, 1], *GEO[2:]), r"need input_size >= 1, stride >= 1, padding >= 0 and dilation >= 1"),
    ((W5, GEO[0], GEO[1], [0, -1, 0], *GEO[3:]), r"need input_size >= 1, stride >= 1, padding >= 0"),
    ((W5, GEO[0], GEO[1], GEO[2], [1, 1, 0], *GEO[4:]), r"need .* dilation >= 1; got .*dilation=\[1, 1, 0\]"),
    ((W5, [1, 2**40, 5], *GEO[1:]), r"input_size, stride, padding and dilation must be ints below 2\^31"),
    ((W5, *GEO[:4], 3, False), r"C_out \(weight.size\(0\) = 4\) must be divisible by groups = 3"),
    ((W5, *GEO[:4], 0, False), r"groups must be >= 1"),
    ((W5, [1, 2, 2], GEO[1], [0, 0, 0], GEO[3], 1, False), r"the dilated kernel .* does not fit input_size"),
    ((W5, [1, 5, 5], GEO[1], [0, 6, 0], GEO[3], 1, True), r"circular padding must not exceed input_size"),
]


@pytest.mark.parametrize("fwd,bwd", _dense_ops())
@pytest.mark.parametrize("args,match", BAD_GEOMETRY, ids=[m[:30] for _, m in BAD_GEOMETRY])
def test_raw_conv_to_matrix_ops_check_geometry(fwd, bwd, args, match):
    with pytest.raises(RuntimeError, match=rf"regkernels::{fwd}.*: {match}"):
        getattr(ops, fwd)(*args)
    grad = torch.zeros(100, 100, dtype=D64)
    with pytest.raises(RuntimeError, match=rf"regkernels::{bwd}.*: {match}"):
        getattr(ops, bwd)(grad, *args)


@pytest.mark.parametrize("fwd,bwd", _dense_ops())
def test_raw_conv_to_matrix_ops_check_grad_and_overflow(fwd, bwd):
    T = getattr(ops, fwd)(W5, *GEO)
    assert T.shape == (100, 100)
    for grad, match in ((T.float(), r"grad must have the weight's dtype"),
                        (T[:, :10], r"grad must have the shape of T, \(100, 100\)"),
                        (T.reshape(-1), r"grad must have the shape of T")):
        with pytest.raises(RuntimeError, match=rf"regkernels::{bwd}.*: {match}"):
            getattr(ops, bwd)(grad, W5, *GEO)
    with pytest.raises(RuntimeError, match=rf"regkernels::{fwd}.*: T of \(C_out·P_out\) × \(C_in·P_in\) entries "
                                           rf"overflows int64"):
        getattr(ops, fwd)(W5, [1, 2**30, 2**30], [1, 1, 1], [0, 0, 0], [1, 1, 1], 1, False)


STATS_GEO = ([1, 5, 5], [1, 1, 1], [0, 1, 1], [1, 1, 1], 2, False, True)


def _stats_calls():
    calls = [("conv_frame_stats", lambda w, *g: ops.conv_frame_stats(w, *g, False))]
    if TRITON_ON_CPU:
        calls.append(("conv_frame_stats_triton", lambda w, *g: ops.conv_frame_stats_triton(w.float(), *g, False)))
    return calls


@pytest.mark.parametrize("name,call", _stats_calls(), ids=[n for n, _ in _stats_calls()])
@pytest.mark.parametrize("args,match", [a for a in BAD_GEOMETRY if "float16" not in a[1]],
                         ids=[m[:30] for _, m in BAD_GEOMETRY if "float16" not in m])
def test_raw_conv_frame_stats_ops_check_geometry(name, call, args, match):
    weight, *geo = args
    with pytest.raises(RuntimeError, match=rf"regkernels::{name}: {match}"):
        call(weight, *geo, True)


def test_raw_conv_frame_stats_backward_checks_grads():
    d, r, signs = ops.conv_frame_stats(W5, *STATS_GEO, True)
    geo = STATS_GEO
    gW = ops.conv_frame_stats_backward(W5, torch.ones_like(d), torch.ones_like(r), signs, *geo)
    assert gW.shape == W5.shape
    for gd, gr, sg, match in ((d[:, :1], r, signs, r"grad_d must be a floating strided tensor of shape"),
                              (d, r.int(), signs, r"grad_r must be a floating strided tensor of shape"),
                              (d, r, signs.float(), r"signs must be the forward's int8 output"),
                              (d, r, signs[:1], r"signs must be the forward's int8 output")):
        with pytest.raises(RuntimeError, match=rf"regkernels::conv_frame_stats_backward: {match}"):
            ops.conv_frame_stats_backward(W5, gd, gr, sg, *geo)
    with pytest.raises(RuntimeError, match=r"regkernels::conv_frame_stats_backward: weight must be 5-D"):
        ops.conv_frame_stats_backward(W5[0], d, r, signs, *geo)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton runs on CPU tensors only interpreted (TRITON_INTERPRET=1)")
def test_raw_conv_frame_stats_triton_backward_checks_grads():
    w = W5.float()
    d, r, gram = ops.conv_frame_stats_triton(w, *STATS_GEO, True)
    assert gram.shape == (2, 18, 18)  # (G, Cx·K, Cx·K)
    with pytest.raises(RuntimeError, match=r"regkernels::conv_frame_stats_triton_backward: grad_d must be a floating "
                                           r"strided tensor of shape \(2, \d+, 2\)"):
        ops.conv_frame_stats_triton_backward(w, d[..., :1], r, gram, *STATS_GEO)
    for bad in (gram.double(), gram[:1], gram.reshape(2, 2, 9, 18)):
        with pytest.raises(RuntimeError, match=r"regkernels::conv_frame_stats_triton_backward: gram must be the "
                                               r"forward's float32 output \(the scaled tap Gram\), of shape "
                                               r"\(2, 18, 18\) or \(0,\)"):
            ops.conv_frame_stats_triton_backward(w, d, r, bad, *STATS_GEO)
    with pytest.raises(RuntimeError, match=r"regkernels::conv_frame_stats_triton_backward: need input_size >= 1"):
        ops.conv_frame_stats_triton_backward(w, d, r, gram, [1, 0, 5], *STATS_GEO[1:])


# ---------------------------------------------------------------- item 12: layers without channels

EMPTY_SHAPES = [(0, 3, 3, 3), (4, 0, 3, 3), (0, 0, 3, 3)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("backend", ["reference"] + MATRIX_KERNELS)
def test_conv_to_matrix_without_channels_is_empty(shape, backend):
    w = torch.randn(shape, requires_grad=True)
    want = (shape[0] * 20, shape[1] * 20)
    for layout in ("dense", "coo", "csr"):
        named = backend if layout == "dense" or backend == "reference" else "torch"  # the sparse builder
        T = C.conv_to_matrix(w, (5, 4), padding=1, layout=layout, backend=named)
        assert T.shape == want
        g, = torch.autograd.grad(T.to_dense().sum(), w, allow_unused=True)
        assert g is None or g.shape == w.shape


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("backend", FRAME_KERNELS)
def test_conv_frame_penalty_without_channels_equals_explicit(shape, backend):
    # an empty side of T: its Gram is empty (penalty 0) or the zero matrix (d = r = 0: penalty A²),
    # exact in float32 too (the fused Triton stats take float32, not float64)
    dtype = torch.float32 if backend == "triton" else D64
    for side in ("auto", "rows", "cols"):
        w = torch.randn(shape, dtype=dtype, requires_grad=True)
        got = C.conv_frame_penalty(w, (5, 4), 0.5, 2.0, padding=1, side=side, backend=backend)
        want = C.conv_frame_penalty(w, (5, 4), 0.5, 2.0, padding=1, side=side, backend="reference")
        torch.testing.assert_close(got.double(), want.double())
        assert torch.autograd.grad(got, w)[0].shape == w.shape
        for a, b in zip(C.conv_gershgorin_bounds(w, (5, 4), padding=1, side=side, backend=backend),
                        C.conv_gershgorin_bounds(w, (5, 4), padding=1, side=side, backend="reference")):
            assert float(a.detach()) == float(b.detach())


def test_conv_orthogonality_penalty_without_input_channels_is_the_targets_norm():
    # K ⋆ K of a kernel with no input channels is 0, so R = ‖0 − I_o at the centre‖² = o
    for stride in (1, 2):
        w = torch.randn(4, 0, 3, 3, dtype=D64, requires_grad=True)
        value = C.conv_orthogonality_penalty(w, stride=stride)
        assert float(value.detach()) == 4.0
        assert torch.autograd.grad(value, w)[0].shape == w.shape
    assert float(C.conv_orthogonality_penalty(torch.randn(0, 0, 3, 3))) == 0.0
    assert float(C.conv_orthogonality_penalty(torch.randn(5, 0, 2))) == 5.0


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_conv_singular_values_without_channels_are_empty(shape, backend):
    w = torch.randn(shape)
    assert C.conv_singular_values(w, (5, 4), backend=backend).shape == (20, 0)
    nw, nsv = C.clip_conv_singular_values(w, (5, 4), 0.5, 1.0, backend=backend)
    assert nw.shape == w.shape and nsv.shape == (20, 0)


# ---------------------------------------------------------------- item 13: the sparse plan cache is bounded by bytes

def test_conv_to_matrix_sparse_plan_cache_stays_under_its_byte_bound():
    CC._plan_cache.clear()
    w = torch.randn(64, 64, 3, 3)
    for i in range(60):  # 60 geometries at 64 channels (the case kept +7 GB)
        T = C.conv_to_matrix(w, (8 + i, 8), padding=1, layout="csr")
        assert T.shape == (64 * (8 + i) * 8, 64 * (8 + i) * 8)
        del T
        assert CC._plan_cache_bytes() <= CC.PLAN_CACHE_BYTES
    assert len(CC._plan_cache) >= 1
    # a plan served from the cache builds the same matrix as the reference
    small = torch.randn(4, 3, 3, 3, dtype=D64)
    for _ in range(2):
        torch.testing.assert_close(C.conv_to_matrix(small, (5, 4), padding=1, layout="coo").to_dense(),
                                   R.conv_to_matrix(small, (5, 4), padding=1))


def test_conv_to_matrix_sparse_plan_larger_than_the_cache_is_not_kept(monkeypatch):
    CC._plan_cache.clear()
    monkeypatch.setattr(CC, "PLAN_CACHE_BYTES", 1000)
    w = torch.randn(2, 2, 3, 3, dtype=D64)
    S = C.conv_to_matrix(w, (9, 9), padding=1, layout="csr")
    torch.testing.assert_close(S.to_dense(), R.conv_to_matrix(w, (9, 9), padding=1))
    assert CC._plan_cache_bytes() == 0


# ---------------------------------------------------------------- item 15: border classes in O(classes)

def _classes_by_position(n, k, s, p, dil, circular, rows):
    """Oracle: every position's pattern enumerated (O(n·k²)), equal patterns counted. Circular
    offsets are labelled by their residue in [−⌊m/2⌋, m − ⌊m/2⌋), m = n (cols) or out (rows)."""
    out = (n + 2 * p - dil * (k - 1) - 1) // s + 1
    m = out if rows else n

    def label(q):
        return (q + m // 2) % m - m // 2 if circular else q

    hits = []
    for y in range(out):
        row = []
        for t in range(k):
            w = y * s - p + t * dil
            if circular:
                row.append((t, w % n))
            elif 0 <= w < n:
                row.append((t, w))
        hits.append(row)
    if rows:
        readers = [[] for _ in range(n)]
        for y, row in enumerate(hits):
            for t, u in row:
                readers[u].append((y, t))
        patterns = [Counter() for _ in range(out)]
        for pairs in readers:
            for y, t in pairs:
                for y2, t2 in pairs:
                    patterns[y][(t, t2, label(y2 - y))] += 1
    else:
        patterns = [Counter() for _ in range(n)]
        for row in hits:
            for t, u in row:
                for t2, u2 in row:
                    patterns[u][(t, t2, label(u2 - u))] += 1
    return sorted(Counter(tuple(sorted(pat.items())) for pat in patterns).items())


def _classes_of(dc):
    nq = len(dc.rel)
    found = []
    for c, count in enumerate(dc.counts):
        table = dc.table[c * dc.k * dc.k * nq:(c + 1) * dc.k * dc.k * nq]
        items = sorted((((i // nq) // dc.k, (i // nq) % dc.k, dc.rel[i % nq]), int(v))
                       for i, v in enumerate(table) if v)
        found.append((tuple(items), count))
    return sorted(found)


def test_conv_frame_border_classes_equal_the_per_position_enumeration():
    rng = random.Random(20261202)
    checked = 0
    while checked < 600:
        k, s, dil, p = rng.randint(1, 5), rng.randint(1, 4), rng.randint(1, 3), rng.randint(0, 6)
        circular, rows, n = rng.random() < 0.5, rng.random() < 0.5, rng.randint(1, 45)
        if (circular and p > n) or n + 2 * p - dil * (k - 1) - 1 < 0:
            continue
        dc = CG.dim_classes(n, k, s, p, dil, circular, rows)
        assert _classes_of(dc) == _classes_by_position(n, k, s, p, dil, circular, rows), (n, k, s, p, dil, circular,
                                                                                           rows)
        checked += 1


def test_conv_frame_penalty_large_1d_input_equals_affine_extrapolation():
    # with stride 1 only the interior class count grows with n, so k(n)·R(n) = a + b·n exactly:
    # two explicit evaluations at small n fix a, b; n = 3·10^6 (whose first call enumerated
    # every position in Python, ~60 s) must land on the line
    w = 0.5 * torch.randn(3, 2, 3, dtype=D64)
    A, B = 0.5, 2.0

    def total(n, backend):  # side="cols": k = C_in·n
        return float(C.conv_frame_penalty(w, (n,), A, B, padding=1, side="cols", backend=backend)) * 2 * n

    t20, t21 = total(20, "reference"), total(21, "reference")
    n = 3_000_000
    torch.testing.assert_close(total(n, "torch"), t20 + (t21 - t20) * (n - 20), rtol=1e-9, atol=0)
    lo, hi = C.conv_gershgorin_bounds(w, (n,), padding=1, side="cols")
    lo20, hi20 = C.conv_gershgorin_bounds(w, (20,), padding=1, side="cols", backend="reference")
    torch.testing.assert_close((lo, hi), (lo20, hi20))


def test_conv_frame_penalty_large_2d_input_equals_bilinear_extrapolation():
    # per dim only the interior count grows: k(n0, n1)·R is bilinear in (n0, n1) for stride 1
    w = 0.5 * torch.randn(2, 2, 3, 3, dtype=D64)

    def total(n0, n1, backend):
        return float(C.conv_frame_penalty(w, (n0, n1), 0.5, 2.0, padding=1, side="cols", backend=backend)) \
            * 2 * n0 * n1

    a, b = 9, 10
    f = {(x, y): total(x, y, "reference") for x in (a, b) for y in (a, b)}
    n = 4096
    u = v = n - a  # steps of one from (a, a)
    want = (f[a, a] + (f[b, a] - f[a, a]) * u + (f[a, b] - f[a, a]) * v
            + (f[b, b] - f[b, a] - f[a, b] + f[a, a]) * u * v)
    torch.testing.assert_close(total(n, n, "torch"), want, rtol=1e-9, atol=0)


@pytest.mark.parametrize("call, arg", [
    (lambda: C.conv_frame_penalty(torch.randn(4, 4, 3), [2**40], 0.5, 2.0, padding=1), "input_size"),
    (lambda: C.conv_gershgorin_bounds(torch.randn(4, 4, 3), [8], stride=2**31), "stride"),
    (lambda: C.conv_to_matrix(torch.randn(4, 4, 3), [8], padding=2**31), "padding"),
    (lambda: C.conv_orthogonality_penalty(torch.randn(4, 4, 3), stride=2**33), "stride"),
], ids=["frame-input_size", "bounds-stride", "matrix-padding", "ocnn-stride"])
def test_conv_ops_refuse_sizes_past_32_bit_indices_naming_the_argument(call, arg):
    # the kernels index with 32-bit ints: the public op refuses up front (a ValueError naming the
    # argument), not the internal op it would reach
    with pytest.raises(ValueError, match=rf"{arg} must be .*below 2\^31"):
        call()
