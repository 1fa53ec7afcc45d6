"""The Triton conv frame statistics (regkernels/triton/conv_frame.py) as issue 16 shapes them: the
forward keeps the scaled tap Gram X̂ for the backward (no second GEMM), X is built from its block
upper triangle (half the flops), every fp32 GEMM runs at IEEE precision whatever the user's TF32
settings, and L layers stacked as one grouped conv give each layer's statistics. Interpreted
Triton on CPU tensors: small shapes."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torch._library import custom_ops

from regkernels import _ext
from regkernels.ops import conv as C

pytestmark = pytest.mark.skipif(not _ext.triton_interpreted(), reason="Triton interpreter not available")

ops = torch.ops.regkernels
D64 = torch.float64


def _tf():
    from regkernels.triton import conv_frame as TF
    return TF


# ----------------------------------------------------------------------------- precision state

def _precision_state():
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = "mixed"
    return (legacy, *(torch._C._get_fp32_precision_getter(*key) for key in
                      (("cuda", "matmul"), ("mkldnn", "matmul"), ("generic", "all"))))


@pytest.fixture
def clean_precision():
    """Start from torch's default precision state and return to it, whatever the test does."""
    def reset():
        torch.backends.fp32_precision = "none"
        torch.set_float32_matmul_precision("highest")
        for key in (("cuda", "matmul"), ("mkldnn", "matmul")):
            torch._C._set_fp32_precision_setter(*key, "none")
    reset()
    yield
    reset()


def _tf32_on_legacy_allow():
    torch.backends.cuda.matmul.allow_tf32 = True


def _tf32_on_high():
    torch.set_float32_matmul_precision("high")


def _tf32_on_medium():
    torch.set_float32_matmul_precision("medium")


def _tf32_on_new_api():
    torch.backends.cuda.matmul.fp32_precision = "tf32"


def _tf32_on_generic():
    torch.backends.fp32_precision = "tf32"


SETTINGS = [_tf32_on_legacy_allow, _tf32_on_high, _tf32_on_medium, _tf32_on_new_api, _tf32_on_generic]


def _assert_ieee_now():
    assert torch._C._get_fp32_precision_getter("cuda", "matmul") == "ieee"
    assert torch._C._get_fp32_precision_getter("mkldnn", "matmul") == "ieee"
    # what cuBLAS asks for an fp32 GEMM (raises if the two APIs disagree)
    assert torch._C._get_cublas_allow_tf32() is False


@pytest.mark.parametrize("setting", SETTINGS, ids=[f.__name__[1:] for f in SETTINGS])
def test_ieee_fp32_matmul_forces_ieee_and_restores(clean_precision, setting):
    TF = _tf()
    setting()
    before = _precision_state()
    assert any(v in ("tf32", "bf16") for v in before[1:3])
    with TF.ieee_fp32_matmul():
        _assert_ieee_now()
    assert _precision_state() == before
    # also when the block raises
    with pytest.raises(ZeroDivisionError):
        with TF.ieee_fp32_matmul():
            _assert_ieee_now()
            1 / 0
    assert _precision_state() == before


def test_ieee_fp32_matmul_touches_nothing_in_the_default_state(clean_precision, monkeypatch):
    TF = _tf()

    def refuse(*args):
        raise AssertionError("a precision setter was called in the default (IEEE) state")
    monkeypatch.setattr(torch, "set_float32_matmul_precision", refuse)
    monkeypatch.setattr(torch._C, "_set_fp32_precision_setter", refuse)
    with TF.ieee_fp32_matmul():
        pass


@pytest.fixture
def quiet_launches(monkeypatch):
    """Interpreted launches run outside dispatch modes (the interpreter copies every argument to
    numpy and back: aten ops a GPU launch does not make, and slow under a mode)."""
    from triton.runtime import interpreter
    from torch.utils._python_dispatch import _disable_current_modes
    launch = interpreter.GridExecutor.__call__

    def quiet(self, *args, **kwargs):
        with _disable_current_modes():
            return launch(self, *args, **kwargs)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", quiet)


class _GemmPrecision(TorchDispatchMode):
    """Records, for every GEMM dispatched (custom-op bodies included), whether cuBLAS would have
    been allowed TF32 at that moment."""

    GEMMS = ("mm", "bmm", "addmm", "baddbmm", "matmul")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "regkernels":
            opdef = custom_ops.OPDEFS.get(f"{func.namespace}::{func._opname}")
            with self:
                return opdef._init_fn(*args, **kwargs)
        if func.namespace == "aten" and func._opname in self.GEMMS:
            self.seen.append((func._opname, torch._C._get_fp32_precision_getter("cuda", "matmul"),
                              torch._C._get_cublas_allow_tf32()))
        return func(*args, **kwargs)


@pytest.mark.parametrize("setting", [_tf32_on_legacy_allow, _tf32_on_new_api],
                         ids=["legacy_allow", "new_api"])
@pytest.mark.parametrize("blocked", [False, True])
def test_every_fp32_gemm_of_the_op_runs_at_ieee(clean_precision, quiet_launches, monkeypatch, setting, blocked):
    TF = _tf()
    if blocked:
        monkeypatch.setattr(TF, "_GRAM_BLOCK_COLS", 8)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    setting()
    before = _precision_state()
    mode = _GemmPrecision()
    with mode:
        C.conv_frame_penalty(w, (5, 6), 0.5, 2.0, padding=1, backend="triton").backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    assert _precision_state() == before
    names = [name for name, *_ in mode.seen]
    assert len(names) >= 2, names  # the tap Gram (forward) and gZ (backward)
    assert all(prec == "ieee" and allow is False for _, prec, allow in mode.seen), mode.seen


# ----------------------------------------------------------------------------- the kept tap Gram

def _count_grams(monkeypatch):
    TF = _tf()
    calls = []
    gram = TF.tap_gram

    def counted(Z):
        calls.append(tuple(Z.shape))
        return gram(Z)
    monkeypatch.setattr(TF, "tap_gram", counted)
    return calls


@pytest.mark.parametrize("side", ["rows", "cols"])
def test_backward_uses_the_kept_gram_and_equals_the_recomputed_one(monkeypatch, side):
    calls = _count_grams(monkeypatch)
    w = (0.4 * torch.randn(6, 4, 3, 3)).requires_grad_(True)
    kw = dict(stride=2, padding=1, groups=2)
    p = C.conv_frame_penalty(w, (7, 6), 0.5, 2.0, side=side, backend="triton", **kw)
    g_kept, = torch.autograd.grad(p, w)
    assert len(calls) == 1, calls  # one GEMM for X in forward + backward
    # the raw ops: kept vs recomputed X̂ give the same gradient, bit for bit (same X̂, same kernel)
    w5 = w.detach().reshape(6, 4, 1, 3, 3)
    geo = ([1, 7, 6], [1, 2, 2], [0, 1, 1], [1, 1, 1], 2, False, side == "rows")
    d, r, gram = ops.conv_frame_stats_triton(w5, *geo, True)
    d0, r0, empty = ops.conv_frame_stats_triton(w5, *geo, False)
    n = (3 if side == "rows" else 4) * 9  # Cx·K
    assert gram.shape == (2, n, n)
    assert empty.shape == (0,)
    assert torch.equal(d, d0) and torch.equal(r, r0)
    gd, gr = torch.randn_like(d), torch.randn_like(r)
    before = len(calls)
    g1 = ops.conv_frame_stats_triton_backward(w5, gd, gr, gram, *geo)
    assert len(calls) == before
    g2 = ops.conv_frame_stats_triton_backward(w5, gd, gr, empty, *geo)
    assert len(calls) == before + 1
    assert torch.equal(g1, g2)
    # and against the explicit float64 reference
    w64 = w.detach().double().requires_grad_(True)
    want = C.conv_frame_penalty(w64, (7, 6), 0.5, 2.0, side=side, backend="reference", **kw)
    torch.testing.assert_close(p.double(), want, atol=1e-6, rtol=1e-5)
    g_want, = torch.autograd.grad(want, w64)
    torch.testing.assert_close(g_kept.double(), g_want, atol=1e-5 * float(g_want.abs().max()), rtol=1e-5)


class _GramShapes(TorchDispatchMode):
    """The shape of the gram output of every ``conv_frame_stats_triton`` call."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "regkernels" and func._opname == "conv_frame_stats_triton":
            self.shapes.append(tuple(out[2].shape))
        return out


def test_no_gram_kept_without_grad():
    w = torch.randn(4, 3, 3, 3)
    mode = _GramShapes()
    with mode:
        C.conv_frame_penalty(w, (5, 5), 0.5, 2.0, padding=1, backend="triton")
        with torch.no_grad():
            C.conv_frame_penalty(w.requires_grad_(True), (5, 5), 0.5, 2.0, padding=1, backend="triton")
        C.conv_frame_penalty(w, (5, 5), 0.5, 2.0, padding=1, backend="triton")
    assert mode.shapes == [(0,), (0,), (1, 27, 27)], mode.shapes


def test_kept_gram_is_not_differentiable():
    w = torch.randn(4, 3, 1, 3, 3, requires_grad=True)
    d, r, gram = ops.conv_frame_stats_triton(w, [1, 5, 5], [1, 1, 1], [0, 1, 1], [1, 1, 1], 1, False, False, True)
    assert d.requires_grad and r.requires_grad and not gram.requires_grad


# ----------------------------------------------------------------------------- the symmetric tap Gram

@pytest.mark.parametrize("G,M,N", [(1, 5, 37), (3, 7, 64), (2, 1, 17)])
def test_tap_gram_block_upper_triangle(monkeypatch, G, M, N):
    TF = _tf()
    monkeypatch.setattr(TF, "_GRAM_BLOCK_COLS", 8)
    Z = torch.randn(G, M, N, dtype=D64)
    full_flops = FlopCounterMode(display=False)
    with full_flops:
        want = Z.mT @ Z
    flops = FlopCounterMode(display=False)
    with flops:
        X = TF.tap_gram(Z)
    torch.testing.assert_close(X, want, atol=1e-13, rtol=1e-13)
    nb = min(TF._GRAM_MAX_BLOCKS, N // 8)
    assert nb >= 2
    # block upper triangle only: (1 + 1/nb)/2 of the full product, up to the ragged last block
    assert flops.get_total_flops() <= (0.5 + 0.5 / nb + 1.0 / N) * full_flops.get_total_flops() + 2 * G * M * N
    assert 0.5 * full_flops.get_total_flops() <= flops.get_total_flops() < 0.8 * full_flops.get_total_flops()
    # the mirrored part is exact: off the diagonal blocks X[i, j] and X[j, i] are one number
    step = -(-N // nb)
    blocks = torch.arange(N) // step
    off = blocks[:, None] != blocks[None, :]
    assert torch.equal(X[:, off], X.mT[:, off])


def test_tap_gram_small_is_one_gemm():
    TF = _tf()
    Z = torch.randn(2, 4, 2 * TF._GRAM_BLOCK_COLS - 1)
    flops = FlopCounterMode(display=False)
    with flops:
        X = TF.tap_gram(Z)
    assert flops.get_total_flops() == 2 * 2 * Z.shape[2] ** 2 * 4
    torch.testing.assert_close(X, Z.mT @ Z)


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, padding=1, groups=2),
                                dict(padding=1, padding_mode="circular"), dict(dilation=2, padding=2)])
def test_blocked_gram_penalty_equals_explicit(monkeypatch, kw):
    TF = _tf()
    monkeypatch.setattr(TF, "_GRAM_BLOCK_COLS", 8)  # Cx·K = 36 or 18 columns: 4 or 2 blocks
    w = (0.4 * torch.randn(4, 4 // kw.get("groups", 1), 3, 3)).requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    for side in ("rows", "cols"):
        want = C.conv_frame_penalty(w64, (6, 5), 0.5, 2.0, side=side, backend="reference", **kw)
        got = C.conv_frame_penalty(w, (6, 5), 0.5, 2.0, side=side, backend="triton", **kw)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
        g_want, = torch.autograd.grad(want, w64)
        g_got, = torch.autograd.grad(got, w)
        torch.testing.assert_close(g_got.double(), g_want, atol=1e-5 * float(g_want.abs().max()), rtol=1e-5)


# ----------------------------------------------------------------------------- layers stacked as groups

@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("g", [1, 2])
def test_layers_stacked_as_groups_equal_separate_calls(rows, g):
    L, c_out, c_in = 3, 4, 4
    layers = [0.5 * torch.randn(c_out, c_in // g, 1, 3, 3) * (l + 1) for l in range(L)]  # unequal scales
    geo = ([1, 6, 5], [1, 1, 2], [0, 1, 1], [1, 1, 1])
    stacked = torch.cat(layers)
    d, r, gram = ops.conv_frame_stats_triton(stacked, *geo, L * g, False, rows, True)
    per = [ops.conv_frame_stats_triton(w, *geo, g, False, rows, True) for w in layers]
    torch.testing.assert_close(d, torch.cat([p[0] for p in per]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(r, torch.cat([p[1] for p in per]), atol=1e-6, rtol=1e-6)
    assert gram.shape[0] == L * g
    gd, gr = torch.randn_like(d), torch.randn_like(r)
    gW = ops.conv_frame_stats_triton_backward(stacked, gd, gr, gram, *geo, L * g, False, rows)
    want = torch.cat([ops.conv_frame_stats_triton_backward(w, gd[l * g:(l + 1) * g], gr[l * g:(l + 1) * g], p[2],
                                                           *geo, g, False, rows)
                      for l, (w, p) in enumerate(zip(layers, per))])
    torch.testing.assert_close(gW, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)


def test_stacked_layers_cost_the_same_launches_and_gemms_as_one(quiet_launches, monkeypatch):
    # many groups: one forward and one backward launch and the same GEMM count, whatever L
    TF = _tf()
    launches = []
    for name in ("class_stats_forward", "class_stats_backward"):
        fn = getattr(TF, name)
        monkeypatch.setattr(TF, name, lambda *a, _fn=fn, _name=name: launches.append(_name) or _fn(*a))

    def run(L):
        launches.clear()
        w = torch.randn(4 * L, 2, 3, 3, requires_grad=True)
        mode = _GemmPrecision()
        with mode:
            C.conv_frame_penalty(w, (5, 5), 0.5, 2.0, padding=1, groups=2 * L, backend="triton").backward()
        return list(launches), [name for name, *_ in mode.seen]
    assert run(1) == run(6)
