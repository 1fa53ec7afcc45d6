"""conv_frame_penalty_multi (docs/conv.md#conv_frame_penalty_multi): L layers of one geometry as one
conv with L·groups groups, equal to the single-layer op and to the explicit reference; and
Regularizer(kind="conv_frame") running one such call per set of convs of equal shape and geometry
(docs/nn.md#regularizer). The generated tests (tests/op_cases.py) cover the table rows."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import regkernels as rk
from regkernels import _geometry as CG
from regkernels.nn import Regularizer
from regkernels.nn import regularizer as regularizer_module
from regkernels.reference import conv as R

D64 = torch.float64
A, B = 0.5, 2.0

GEOMETRIES = [
    # (id, one layer's weight shape, input size, kwargs)
    ("2d-p1", (3, 2, 3, 3), (5, 4), dict(padding=1)),
    ("2d-s2-p1", (4, 3, 3, 3), (6, 5), dict(stride=2, padding=1)),
    ("2d-circular", (3, 2, 3, 3), (4, 5), dict(padding=1, padding_mode="circular")),
    ("2d-circular-s2", (2, 3, 3, 3), (6, 5), dict(stride=2, padding=1, padding_mode="circular")),
    ("2d-d2-g2", (4, 1, 3, 3), (7, 6), dict(dilation=2, padding=2, groups=2)),
    ("1d-s2-g2", (4, 2, 3), (9,), dict(stride=2, padding=1, groups=2)),
    ("1d-circular-d2", (3, 3, 3), (7,), dict(dilation=2, padding=2, padding_mode="circular")),
    ("3d-p1", (2, 2, 2, 2, 2), (3, 3, 2), dict(padding=1)),
]
SIDES = ("auto", "rows", "cols")


def _layers(shape, L, seed=0, dtype=D64, requires_grad=False):
    """L weights of different scales (0.2 … 1.2 / √fan-in): both hinge terms are active."""
    g = torch.Generator().manual_seed(seed)
    fan = max(1, shape[1] * int(torch.tensor(shape[2:]).prod()))
    return [(torch.randn(shape, generator=g, dtype=D64) * (0.2 + l / max(1, L - 1)) * 2 / fan ** 0.5)
            .to(dtype).requires_grad_(requires_grad) for l in range(L)]


def _single(ws, size, kw, side, backend="torch"):
    return torch.stack([rk.conv_frame_penalty(w, size, A, B, side=side, backend=backend, **kw) for w in ws])


# --------------------------------------------------------------------------- the stacking


@pytest.mark.parametrize("rows", [False, True], ids=["cols", "rows"])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_stack_is_one_grouped_factor(rows, groups):
    """Group l·g + j of the stacked factor is group j of layer l, on both sides: the stack of L
    layers with g groups is one conv with L·g groups to the tap-Gram factor."""
    ws = _layers((6, 2, 3, 3), 4, seed=groups)
    W, scale = CG.stack_layers(ws, D64)
    Z = CG.tap_gram_factor(W, 4 * groups, rows)
    want = torch.cat([CG.tap_gram_factor(w / s, groups, rows) for w, s in zip(ws, scale)])
    assert torch.equal(Z, want)
    # each layer divided by its own power of two, max|W_l|/scale_l in [1, 2)
    big = torch.stack([w.abs().max() for w in ws])
    assert torch.equal(torch.frexp(scale)[0], torch.full_like(scale, 0.5))
    assert bool(((big / scale >= 1) & (big / scale < 2)).all())


# --------------------------------------------------------------------------- values and gradients

@pytest.mark.parametrize("L", [1, 2, 5])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("gid, shape, size, kw", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_values_equal_single_and_reference(gid, shape, size, kw, side, L):
    ws = _layers(shape, L, seed=L)
    got = rk.conv_frame_penalty_multi(ws, size, A, B, side=side, backend="torch", **kw)
    assert got.shape == (L,) and got.dtype == D64
    torch.testing.assert_close(got, _single(ws, size, kw, side), rtol=1e-13, atol=0)
    ref = torch.stack([R.conv_frame_penalty(w, size, A, B, side=side, **kw) for w in ws])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rk.conv_frame_penalty_multi(ws, size, A, B, side=side, backend="reference", **kw),
                               ref, rtol=0, atol=0)
    assert bool((ref > 0).all())  # a test of equal zeros would prove nothing


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("gid, shape, size, kw", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_gradients_equal_single(gid, shape, size, kw, side):
    L = 3
    cot = torch.tensor([0.7, -1.3, 2.1], dtype=D64)
    ws = _layers(shape, L, seed=7, requires_grad=True)
    got = torch.autograd.grad((rk.conv_frame_penalty_multi(ws, size, A, B, side=side, **kw) * cot).sum(), ws)
    want = torch.autograd.grad((_single(ws, size, kw, side) * cot).sum(), ws)
    ref = torch.autograd.grad((_single(ws, size, kw, side, backend="reference") * cot).sum(), ws)
    for g, w, r in zip(got, want, ref):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
        assert g.abs().max() > 0


def test_gradcheck():
    ws = _layers((2, 2, 3), 2, seed=3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *w: rk.conv_frame_penalty_multi(list(w), (4,), A, B, padding=1), ws)


def test_half_precision_as_single():
    ws = _layers((3, 2, 3, 3), 3, seed=5, dtype=torch.float16, requires_grad=True)
    got = rk.conv_frame_penalty_multi(ws, (5, 4), A, B, padding=1)
    want = _single(ws, (5, 4), dict(padding=1), "auto")
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=2 ** -10, atol=0)
    gm = torch.autograd.grad(got.float().sum(), ws)
    gs = torch.autograd.grad(want.float().sum(), ws)
    for a, b in zip(gm, gs):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a, b, rtol=2 ** -9, atol=2 ** -20)


def test_empty_layers():
    """Layers without output channels: one entry per layer, as the single op (Gram of the inputs, all 0)."""
    ws = [torch.zeros(0, 3, 3, 3, dtype=D64) for _ in range(2)]
    got = rk.conv_frame_penalty_multi(ws, (5, 4), A, B, padding=1, side="cols")
    torch.testing.assert_close(got, _single(ws, (5, 4), dict(padding=1), "cols"), rtol=0, atol=0)
    got = rk.conv_frame_penalty_multi(ws, (5, 4), A, B, padding=1)
    torch.testing.assert_close(got, _single(ws, (5, 4), dict(padding=1), "auto"), rtol=0, atol=0)


# --------------------------------------------------------------------------- one layer's NaN / range stays its own

@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_nan_layer_is_its_own(padding_mode):
    kw = dict(padding=1, padding_mode=padding_mode)
    ws = _layers((4, 3, 3, 3), 3, seed=11)
    ws[1] = ws[1].clone()
    ws[1][2, 1, 0, 2] = float("nan")
    ws = [w.requires_grad_(True) for w in ws]
    got = rk.conv_frame_penalty_multi(ws, (5, 6), A, B, **kw)
    want = _single(ws, (5, 6), kw, "auto")
    assert torch.isnan(got[1]) and bool(torch.isfinite(got[[0, 2]]).all())
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-13, atol=0)
    gm = torch.autograd.grad(got[[0, 2]].sum(), ws, allow_unused=True)
    gs = torch.autograd.grad(want[[0, 2]].sum(), ws, allow_unused=True)
    for i in (0, 2):
        torch.testing.assert_close(gm[i], gs[i], rtol=1e-12, atol=1e-14)
    # the NaN layer's gradient is NaN, as the single op's
    g1 = torch.autograd.grad(rk.conv_frame_penalty_multi(ws, (5, 6), A, B, **kw)[1], ws[1])[0]
    assert torch.isnan(g1).any()


def test_each_layer_range_scaled_on_its_own():
    """float32 layers 1e18 (penalty +inf), NaN, 1e15 and 1e-8 in one call: each entry is its
    single-layer value (one range factor for the whole stack, that of the 1e18 layer, would underflow
    the 1e-8 layer's tap Gram to 0 and lose its gradient)."""
    base = _layers((3, 2, 3, 3), 4, seed=13, dtype=torch.float32)
    ws = [base[0] * 1e18, base[1].clone(), base[2] * 1e15, base[3] * 1e-8]
    ws[1][0, 0, 1, 1] = float("nan")
    ws = [w.requires_grad_(True) for w in ws]
    got = rk.conv_frame_penalty_multi(ws, (5, 4), A, B, padding=1)
    want = _single(ws, (5, 4), dict(padding=1), "auto")
    assert got[0] == float("inf") and want[0] == float("inf") and torch.isnan(got[1])
    torch.testing.assert_close(got[2:], want[2:], rtol=1e-6, atol=0)
    small_m = torch.autograd.grad(got[3], ws[3])[0]
    small_s = torch.autograd.grad(want[3], ws[3])[0]
    assert small_s.abs().max() > 0
    torch.testing.assert_close(small_m, small_s, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- bad input, compile

def test_bad_inputs():
    w = torch.randn(4, 2, 3, 3)
    op = "conv_frame_penalty_multi"
    with pytest.raises(ValueError, match=rf"{op}: weights must hold at least one weight tensor"):
        rk.conv_frame_penalty_multi([], (5, 5), A, B)
    with pytest.raises(TypeError, match=rf"{op}: weights must be a list or tuple"):
        rk.conv_frame_penalty_multi(w, (5, 5), A, B)
    with pytest.raises(ValueError, match=rf"{op}: weights must all have one shape .*weights\[2\] has \(4, 2, 5, 5\).*"
                                         r"conv_frame_penalty per layer"):
        rk.conv_frame_penalty_multi([w, w, torch.randn(4, 2, 5, 5)], (5, 5), A, B)
    with pytest.raises(TypeError, match=rf"{op}: weights must all have one dtype; weights\[0\] is torch.float32, "
                                        r"weights\[1\] is torch.float16: cast them to one dtype"):
        rk.conv_frame_penalty_multi([w, w.half()], (5, 5), A, B)
    with pytest.raises(ValueError, match=rf"{op}: weights must all be on one device; weights\[0\] is on cpu, "
                                         r"weights\[1\] on meta"):
        rk.conv_frame_penalty_multi([w, w.to("meta")], (5, 5), A, B)
    with pytest.raises(ValueError, match=rf"{op}: weights\[1\] must have 3 or 4 or 5 dims"):
        rk.conv_frame_penalty_multi([w, w[0, 0]], (5, 5), A, B)
    with pytest.raises(ValueError, match=rf"{op}: the output size must be >= 1"):
        rk.conv_frame_penalty_multi([w, w], (2, 2), A, B)
    with pytest.raises(ValueError, match=rf"{op}: backend must be None or one of"):
        rk.conv_frame_penalty_multi([w], (5, 5), A, B, backend="tpu")


def test_compile_fullgraph():
    ws = _layers((3, 2, 3, 3), 3, seed=17, dtype=torch.float32)
    fn = lambda *w: rk.conv_frame_penalty_multi(list(w), (5, 4), A, B, padding=1, padding_mode="circular")  # noqa: E731
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wc = [w.clone().requires_grad_(True) for w in ws]
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*wc)
    we = [w.clone().requires_grad_(True) for w in ws]
    want = fn(*we)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(got.sum(), wc), torch.autograd.grad(want.sum(), we)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- Regularizer

class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.down = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class CifarResNet18(nn.Module):
    """The CIFAR ResNet-18 (3×3 stem, no max-pool; BasicBlocks [2, 2, 2, 2] at 32/16/8/4 px, 1×1
    strided downsamples), channels ``width·(1, 2, 4, 8)``; no batch norm (not a layer the kinds select)."""

    def __init__(self, width=64, classes=10):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        blocks, cin = [], w[0]
        for i, c in enumerate(w):
            blocks += [_Block(cin, c, 1 if i == 0 else 2), _Block(c, c, 1)]
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(w[3], classes)

    def forward(self, x):
        return self.fc(self.blocks(torch.relu(self.conv1(x))).mean(dim=(2, 3)))


class _CountStats(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("regkernels::"):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_resnet18_geometry_sets(monkeypatch):
    """The full-width CIFAR ResNet-18: 20 convs in 11 sets of equal shape and geometry (stem; 4 × 64@32;
    per later stage the strided 3×3, three 3×3 at the new size and the 1×1 downsample), so 11
    conv_frame_penalty_multi calls, plus the Linear head's one penalty_multi call."""
    model = CifarResNet18()
    reg = Regularizer(model, "conv_frame", A=A, B=B)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    calls = []

    def record(weights, input_size, *args, **kw):
        calls.append((tuple(weights[0].shape), tuple(input_size), len(weights)))
        return torch.zeros(len(weights))
    monkeypatch.setattr(regularizer_module._conv, "conv_frame_penalty_multi", record)
    values = reg.values()
    assert values.shape == (21,)
    assert len(calls) == 11 and sum(n for *_, n in calls) == 20
    assert sorted(n for *_, n in calls) == [1] * 7 + [3] * 3 + [4]
    assert ((64, 64, 3, 3), (32, 32), 4) in calls and ((512, 512, 3, 3), (4, 4), 3) in calls


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_regularizer_groups_equal_per_layer_loop(padding_mode):
    """A width-2 CIFAR ResNet-18 (same 11 conv geometry sets as the full one) in float64: values and
    gradients of Regularizer(kind="conv_frame") equal the per-layer conv_frame_penalty loop, in layer
    order, with one stats call per set (and one backward call per set)."""
    torch.manual_seed(0)
    model = CifarResNet18(width=2).double()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.padding_mode = padding_mode
    reg = Regularizer(model, "conv_frame", A=A, B=B, include=nn.Conv2d, backend="torch")
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32, dtype=D64))
    convs = [(n, m) for n, m in reg.layers]
    with _CountStats() as counter:
        got = reg.values()
        grads = torch.autograd.grad(got.sum(), [m.weight for _, m in convs])
    assert counter.counts.get("regkernels::conv_frame_stats") == 11
    assert counter.counts.get("regkernels::conv_frame_stats_backward") == 11
    want = []
    for name, m in convs:
        geo = reg._geometry[name]
        want.append(rk.conv_frame_penalty(m.weight, reg._sizes.get("test", name, m), A, B, geo["stride"],
                                          geo["padding"], geo["dilation"], geo["groups"], geo["padding_mode"],
                                          backend="torch"))
    want = torch.stack(want)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for g, w in zip(grads, torch.autograd.grad(want.sum(), [m.weight for _, m in convs])):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-14)
        assert g.abs().max() > 0


def test_regularizer_mixed_layers_keep_order():
    """Linear, grouped and plain convs interleaved, two geometries sharing a weight shape (different
    input sizes), padding given as int and as tuple: values in layer order, equal to each op per layer."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=(1, 1)), nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 5), nn.Linear(5, 5)).double()
    reg = Regularizer(model, "conv_frame", A=A, B=B)
    with torch.no_grad():
        model(torch.randn(1, 2, 5, 5, dtype=D64))
    with _CountStats() as counter:
        got = reg.values()
    # (4,4,3,3)@5 with padding 1 / (1, 1): one set of 2 + the 4th conv; grouped, strided, @3: their own
    # the stats op of the default backend (the C++ kernel on CPU, the composite elsewhere)
    assert sum(counter.counts.get(f"regkernels::conv_frame_stats{k}", 0) for k in ("", "_cpu")) == 5
    want = []
    for name, m in reg.layers:
        if isinstance(m, nn.Linear):
            want.append(rk.frame_penalty(m.weight, A, B))
            continue
        geo = reg._geometry[name]
        want.append(rk.conv_frame_penalty(m.weight, reg._sizes.get("test", name, m), A, B, geo["stride"],
                                          geo["padding"], geo["dilation"], geo["groups"], geo["padding_mode"]))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=0)
