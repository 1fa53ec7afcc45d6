"""OCNN through the kernel's DFT (backend "torch" of conv_orthogonality_penalty and
conv_orthogonality_penalty_multi, docs/conv.md#conv_orthogonality_penalty) against the reference's
conv of the kernel with itself, and Regularizer(kind="ocnn")'s grouping of layers into multi calls."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import regkernels
from regkernels.composite import conv as C
from regkernels.nn import Regularizer
from regkernels.reference import conv as R

D64 = torch.float64

# (shape, stride, padding): 1-D / 2-D / 3-D, odd and even kernels, c ≠ o, strides 1–3, both paddings
GEOMETRIES = [
    ((3, 2, 3, 3), 1, None), ((3, 2, 3, 3), 1, 1), ((3, 2, 3, 3), 2, None), ((3, 2, 3, 3), 2, 1),
    ((4, 3, 2, 2), 1, None), ((4, 3, 2, 2), 2, None), ((2, 5, 4, 3), 3, None), ((2, 5, 4, 3), 3, 1),
    ((2, 3, 5, 5), (2, 1), (1, 2)), ((5, 2, 1, 3), 1, 0),
    ((3, 4, 5), 1, None), ((3, 4, 4), 2, 1), ((4, 2, 6), 3, None),
    ((2, 3, 3, 3, 3), 1, None), ((2, 3, 2, 3, 2), 2, 1), ((3, 2, 3, 2, 3), (1, 2, 3), None),
]


def _ref(ws, stride, padding):
    return torch.stack([R.conv_orthogonality_penalty(w, stride, padding) for w in ws])


@pytest.mark.parametrize("shape,stride,padding", GEOMETRIES)
def test_values_and_grads_vs_reference(shape, stride, padding):
    g = torch.Generator().manual_seed(sum(shape))
    ws = [torch.randn(shape, generator=g, dtype=D64, requires_grad=True) for _ in range(3)]
    single = torch.stack([regkernels.conv_orthogonality_penalty(w, stride, padding, backend="torch") for w in ws])
    multi = regkernels.conv_orthogonality_penalty_multi(ws, stride, padding, backend="torch")
    ref = _ref(ws, stride, padding)
    torch.testing.assert_close(single, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(multi, ref, rtol=1e-12, atol=1e-12)
    gv = torch.randn(3, generator=g, dtype=D64)
    got = torch.autograd.grad(multi, ws, gv)
    want = torch.autograd.grad(ref, ws, gv)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_default_backend_is_torch():
    for op in ("conv_orthogonality_penalty", "conv_orthogonality_penalty_multi"):
        impl = regkernels.ops.conv.TABLE.implementation(op, None, torch.device("cpu"), torch.float32)
        assert impl is getattr(C, op)


@pytest.mark.parametrize("shape", [(0, 3, 3, 3), (4, 0, 3, 3), (0, 0, 2)])
def test_empty(shape):
    w = torch.zeros(shape, dtype=D64, requires_grad=True)
    got = regkernels.conv_orthogonality_penalty_multi([w, w], 2)
    torch.testing.assert_close(got, _ref([w, w], 2, None))
    assert float(got[0]) == shape[0]  # O = 0: ‖−I‖² = o
    got.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape and not w.grad.any()


def test_non_contiguous():
    base = torch.randn(3, 4, 3, 3, dtype=D64)
    views = [base.transpose(0, 1), base.permute(1, 0, 3, 2), base.repeat(2, 1, 1, 1)[::2].transpose(0, 1)]
    assert not any(v.is_contiguous() for v in views)
    got = regkernels.conv_orthogonality_penalty_multi(views, 1, 1)
    torch.testing.assert_close(got, _ref([v.contiguous() for v in views], 1, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float32, 1e-5),
                                        (D64, 1e-12)])
def test_dtypes(dtype, rtol):
    g = torch.Generator().manual_seed(3)
    ws = [(torch.randn(8, 6, 3, 3, generator=g, dtype=D64) / 7).to(dtype) for _ in range(2)]
    got = regkernels.conv_orthogonality_penalty_multi(ws, 1)
    single = regkernels.conv_orthogonality_penalty(ws[0], 1)
    assert got.dtype == dtype and single.dtype == dtype
    want = _ref([w.double() for w in ws], 1, None)  # the exact value of the rounded weights
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)
    torch.testing.assert_close(single.double(), want[0], rtol=rtol, atol=0)


def test_near_orthogonal_no_cancellation():
    # a delta kernel with orthonormal channels: O = I at the centre, 0 elsewhere; a tiny perturbation
    # must give its own tiny penalty, not the rounding error of ‖O‖² − 2 tr + o
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=D64))
    w = torch.zeros(16, 16, 3, 3, dtype=D64)
    w[:, :, 1, 1] = q
    w = w + 1e-4 * torch.randn_like(w)
    ref = R.conv_orthogonality_penalty(w.float(), 1).double()
    got = regkernels.conv_orthogonality_penalty(w.float(), 1).double()
    exact = R.conv_orthogonality_penalty(w, 1)
    assert abs(float(ref - exact)) / float(exact) < 1e-3
    assert abs(float(got - exact)) / float(exact) < 1e-3


@pytest.mark.parametrize("shape,stride,padding", [((3, 2, 3, 3), 1, None), ((2, 3, 2, 2), 2, 1),
                                                  ((2, 2, 4), 3, None), ((2, 2, 2, 3, 2), 1, None),
                                                  ((2, 0, 3, 3), 1, None)])
def test_gradcheck_gradgradcheck(shape, stride, padding):
    w = torch.randn((2,) + shape, dtype=D64, requires_grad=True)

    def f(w):
        return regkernels.conv_orthogonality_penalty_multi(list(w.unbind(0)), stride, padding)

    assert torch.autograd.gradcheck(f, (w,))
    assert torch.autograd.gradgradcheck(f, (w,))


def test_double_backward_equals_reference():
    w = torch.randn(3, 4, 3, 3, dtype=D64, requires_grad=True)
    v = torch.randn_like(w)
    hv = []
    for backend in ("torch", "reference"):
        (g,) = torch.autograd.grad(regkernels.conv_orthogonality_penalty(w, 2, backend=backend), w, create_graph=True)
        hv.append(torch.autograd.grad((g * v).sum(), w)[0])
    torch.testing.assert_close(hv[0], hv[1], rtol=1e-11, atol=1e-11)


def test_torch_func_grad_and_vmap():
    ws = torch.randn(4, 3, 2, 3, 3, dtype=D64)
    vals = torch.func.vmap(lambda w: regkernels.conv_orthogonality_penalty(w, 1, backend="torch"))(ws)
    torch.testing.assert_close(vals, _ref(ws, 1, None), rtol=1e-12, atol=1e-12)
    grads = torch.func.vmap(torch.func.grad(lambda w: regkernels.conv_orthogonality_penalty(w, 2, 1)))(ws)
    want = torch.func.vmap(torch.func.grad(lambda w: R.conv_orthogonality_penalty(w, 2, 1)))(ws)
    torch.testing.assert_close(grads, want, rtol=1e-11, atol=1e-11)
    g = torch.func.grad(lambda w: regkernels.conv_orthogonality_penalty_multi(list(w.unbind(0)), 1).sum())(ws)
    torch.testing.assert_close(g, torch.func.grad(lambda w: _ref(w, 1, None).sum())(ws), rtol=1e-11, atol=1e-11)


def test_compile_fullgraph():
    torch._dynamo.reset()
    ws = [torch.randn(3, 2, 3, 3, dtype=D64, requires_grad=True) for _ in range(2)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(a, b):
        return regkernels.conv_orthogonality_penalty_multi([a, b], 2, 1).sum()

    got = f(*ws)
    ga = torch.autograd.grad(got, ws)
    want = _ref(ws, 2, 1).sum()
    gb = torch.autograd.grad(want, ws)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_nan_stays_in_its_layer():
    ws = [torch.randn(3, 2, 3, 3, dtype=torch.float32, requires_grad=True) for _ in range(3)]
    with torch.no_grad():
        ws[1][0, 1, 2, 0] = float("nan")
    got = regkernels.conv_orthogonality_penalty_multi(ws, 1)
    assert torch.isnan(got[1]) and torch.isfinite(got[0]) and torch.isfinite(got[2])
    torch.testing.assert_close(got[[0, 2]], _ref([ws[0], ws[2]], 1, None))
    (got[0] + got[2]).backward()
    assert torch.isfinite(ws[0].grad).all() and torch.isfinite(ws[2].grad).all()


def test_dft_tables_cached_and_equal_to_fftn():
    a = C.ocnn_tables((3, 3), (1, 1), (2, 2), torch.float64, torch.device("cpu"))
    assert a is C.ocnn_tables((3, 3), (1, 1), (2, 2), torch.float64, torch.device("cpu"))
    F, Finv, BC, G, BCs = a
    # 3×3: the 5×5 grid, 12 conjugate pairs, 1 + 3·12 products, 25 shifts
    assert F.shape == (49, 9) and Finv.shape == (25, 37) and BC.shape == (37, 50) and G.shape == (9, 37)
    assert BCs is not None and BCs.shape == (37, 25)
    # the operand rows are the DFT A + iB on the (2k − 1) grid, one frequency of each conjugate pair
    w = torch.randn(4, 3, 3, 3, dtype=D64)
    ops = (F @ w.reshape(12, 9).T).reshape(49, 4, 3)
    fft = torch.fft.fftn(w, s=(5, 5))
    pairs = [(i, j) for i in range(5) for j in range(5) if 0 < 5 * i + j < 5 * ((-i) % 5) + (-j) % 5]
    assert len(pairs) == 12
    torch.testing.assert_close(ops[0], fft[..., 0, 0].real)
    for q, (i, j) in enumerate(pairs):
        torch.testing.assert_close(ops[1 + q] + 1j * ops[13 + q], fft[..., i, j])
        torch.testing.assert_close(ops[25 + q], ops[1 + q] + ops[13 + q])
        torch.testing.assert_close(ops[37 + q], ops[1 + q] - ops[13 + q])
    # the mirrored backward table exists only where the stride divides the padding
    assert C.ocnn_tables((3, 3), (2, 2), (1, 1), torch.float64, torch.device("cpu"))[4] is None
    assert C.ocnn_tables((3, 3), (2, 2), (2, 2), torch.float64, torch.device("cpu"))[4] is not None


@pytest.mark.parametrize("shape,stride,padding", [((3, 2, 3, 3), 1, None), ((4, 3, 3, 3), 2, None),
                                                  ((3, 2, 3, 3), 2, 1), ((2, 3, 4), 1, 3)])
def test_first_order_path_equals_graph_path(shape, stride, padding):
    # loss.backward() takes the saved-operand path (mirrored table where S | P); a backward that
    # builds a graph recomputes from W: both are the gradient
    w = torch.randn((3,) + shape, dtype=D64, requires_grad=True)
    gv = torch.randn(3, dtype=D64)
    got = []
    for create_graph in (False, True):
        (g,) = torch.autograd.grad(regkernels.conv_orthogonality_penalty_multi(list(w.unbind(0)), stride, padding),
                                   w, gv, create_graph=create_graph)
        got.append(g.detach())
    torch.testing.assert_close(got[0], got[1], rtol=1e-12, atol=1e-12)


def test_float32_resnet_layer_accuracy():
    # a CIFAR ResNet-18 layer shape, He-scaled, in float32 against the float64 reference
    g = torch.Generator().manual_seed(5)
    w64 = torch.randn(64, 64, 3, 3, generator=g, dtype=D64) * (2 / 576) ** 0.5
    w32 = w64.float().requires_grad_()
    want_w = w32.detach().double().requires_grad_()
    got = regkernels.conv_orthogonality_penalty(w32)
    want = R.conv_orthogonality_penalty(want_w)
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-6, atol=0)
    (gw,) = torch.autograd.grad(got, w32)
    (ww,) = torch.autograd.grad(want, want_w)
    assert float((gw.double() - ww).abs().max() / ww.abs().max()) < 2e-6


def test_work_limit(monkeypatch):
    monkeypatch.setattr(R, "MAX_WORK_BYTES", 10_000)
    w = torch.randn(8, 2, 3, 3)
    with pytest.raises(ValueError, match=r"conv_orthogonality_penalty_multi: the DFT products of 2 layer\(s\) of shape "
                                         r"\(8, 2, 3, 3\) .* over MAX_WORK_BYTES=10000"):
        regkernels.conv_orthogonality_penalty_multi([w, w])
    with pytest.raises(ValueError, match=r"conv_orthogonality_penalty: the DFT products .* over MAX_WORK_BYTES"):
        regkernels.conv_orthogonality_penalty(w, backend="torch")


def test_multi_bad_inputs():
    w = torch.randn(4, 2, 3, 3)
    cases = [
        ((w,), TypeError, r"conv_orthogonality_penalty_multi: weights must be a list or tuple"),
        (([],), ValueError, r"conv_orthogonality_penalty_multi: weights must hold at least one weight tensor"),
        (([w, w[:2]],), ValueError, r"all weights must have one shape, dtype and device; got weights\[0\] with "
                                    r"shape \(4, 2, 3, 3\), weights\[1\] with shape \(2, 2, 3, 3\)"),
        (([w, w.half()],), ValueError, r"weights\[1\] with dtype torch.float16"),
        (([w], 0), ValueError, r"conv_orthogonality_penalty_multi: stride must be"),
        (([torch.randn(4, 2, 0, 3)],), ValueError, r"weights\[0\] must have kernel sizes >= 1"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            regkernels.conv_orthogonality_penalty_multi(*args)
    with pytest.raises(ValueError, match=r"conv_orthogonality_penalty_multi: no 'cpu' backend .* 'torch', 'reference'"):
        regkernels.conv_orthogonality_penalty_multi([w], backend="cpu")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)                  # same shape and stride as c
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.d = nn.Conv2d(4, 4, 3, stride=2, padding=1)        # same shape, another stride
        self.e = nn.Conv2d(4, 8, 3, padding=1, groups=2)        # chunks (4, 2, 3, 3)
        self.f = nn.Conv2d(8, 4, 3, padding=1, groups=4)        # chunks (1, 2, 3, 3)
        self.g = nn.Conv2d(4, 2, 3, padding=1)                  # (2, 4, 3, 3)
        self.h = nn.Linear(6, 5)                                # the 1-D conv (5, 6, 1) of a 1-point input
        self.i = nn.Linear(6, 5)


def _loop(reg: Regularizer, padding):
    """Today's per-layer path: one reference call per group chunk, the mean over chunks."""
    out = []
    for name, m in reg.layers:
        w = m.weight.unsqueeze(-1) if isinstance(m, nn.Linear) else m.weight
        stride = 1 if isinstance(m, nn.Linear) else m.stride
        out.append(torch.stack([R.conv_orthogonality_penalty(wg, stride, padding)
                                for wg in w.chunk(getattr(m, "groups", 1), dim=0)]).mean())
    return torch.stack(out)


@pytest.mark.parametrize("padding", [None, 1])
def test_regularizer_groups_layers(monkeypatch, padding):
    net = _Net().double()
    kw = {} if padding is None else dict(padding=padding)
    reg = Regularizer(net, "ocnn", weight=0.5, include=(nn.Conv2d, nn.Linear), **kw)
    calls = []
    real = regkernels.ops.conv.conv_orthogonality_penalty_multi

    def counting(weights, *args, **kwargs):
        calls.append((tuple(weights[0].shape), len(weights)))
        return real(weights, *args, **kwargs)

    monkeypatch.setattr(regkernels.ops.conv, "conv_orthogonality_penalty_multi", counting)
    values = reg.values()
    # distinct (chunk shape, stride): (4,3,3,3)/1, (4,4,3,3)/1 [b, c], (4,4,3,3)/2 [d], (4,2,3,3)/1 [e's 2 chunks],
    # (1,2,3,3)/1 [f's 4 chunks], (2,4,3,3)/1, (5,6,1)/1 [h, i]
    assert sorted(calls) == sorted([((4, 3, 3, 3), 1), ((4, 4, 3, 3), 2), ((4, 4, 3, 3), 1), ((4, 2, 3, 3), 2),
                                    ((1, 2, 3, 3), 4), ((2, 4, 3, 3), 1), ((5, 6, 1), 2)])
    want = _loop(reg, padding)
    torch.testing.assert_close(values, want, rtol=1e-12, atol=1e-12)
    params = [m.weight for _, m in reg.layers]
    got_g = torch.autograd.grad(reg(), params)
    want_g = torch.autograd.grad(0.5 * want.mean(), params)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_regularizer_half_and_float_layers_float32():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3))
    net[0].half()
    reg = Regularizer(net, "ocnn")
    vals = reg.values()
    assert vals.dtype == torch.float32
    want = torch.stack([R.conv_orthogonality_penalty(net[0].weight.float(), 1),
                        R.conv_orthogonality_penalty(net[1].weight, 1)])
    torch.testing.assert_close(vals, want)
