"""The C++ conv frame statistics (backend "cpu", csrc/cpu/conv_frame_cpu.cpp; docs/conv.md#conv_frame_penalty).

Values, gradients, dtypes and bad inputs of the public ops on every backend are generated from
tests/op_cases.py; this file checks what is particular to the kernel: exact agreement with the explicit
reference over a sweep of geometries (both sides, both padding modes, strides, dilations, groups), the plan
it reads against the combined class table built independently by einsum, the backward with and without the
kept tap Gram, per-group scaling (layers of very different magnitudes batched as groups), NaN / overflow
placement per group, the raw ops' argument checks and opcheck.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import regkernels
from regkernels import _ext
from regkernels import _geometry as CG
from regkernels.reference import conv as R

pytestmark = pytest.mark.skipif(not _ext.HAS_C, reason="the C++ extension is not built")

if _ext.HAS_C:
    from regkernels import _C_ops as COPS

D64 = torch.float64
FRAME = dict(A=0.5, B=2.0)


def _sweep():
    shapes = [((3, 2, 3, 3), (5, 6)), ((4, 4, 2, 3), (4, 4)), ((2, 3, 3), (7,)), ((2, 2, 2, 2, 2), (3, 4, 3)),
              ((6, 2, 3, 3), (3, 3)), ((4, 2, 1, 1), (3, 5))]
    for (shape, size), s, p, dl, g, mode, side in itertools.product(shapes, (1, 2), (0, 1, 2), (1, 2), (1, 2),
                                                                     ("zeros", "circular"), ("rows", "cols")):
        out = CG.conv_output_size(size, shape[2:], s, p, dl)
        if shape[0] % g or min(out) < 1 or (mode == "circular" and p > min(size)):
            continue
        yield shape, size, dict(stride=s, padding=p, dilation=dl, groups=g, padding_mode=mode, side=side)


def _case_id(case):
    shape, size, kw = case
    return f"{'x'.join(map(str, shape))}@{'x'.join(map(str, size))}-" + "-".join(f"{k}{v}" for k, v in kw.items())


SWEEP = list(_sweep())


@pytest.mark.parametrize("case", SWEEP[::3], ids=_case_id)
def test_equals_explicit_reference(case):
    shape, size, kw = case
    torch.manual_seed(hash(_case_id(case)) % 2**31)
    w = torch.randn(shape, dtype=D64)
    ref_lo, ref_hi = R.conv_gershgorin_bounds(w, size, **kw)
    lo, hi = regkernels.conv_gershgorin_bounds(w, size, **kw, backend="cpu")
    torch.testing.assert_close(lo, ref_lo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hi, ref_hi, rtol=1e-12, atol=1e-12)
    a = w.clone().requires_grad_()
    b = w.clone().requires_grad_()
    ref = R.conv_frame_penalty(a, size, **FRAME, **kw)
    out = regkernels.conv_frame_penalty(b, size, **FRAME, **kw, backend="cpu")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (ga,) = torch.autograd.grad(ref, a)
    (gb,) = torch.autograd.grad(out, b)
    torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-12)


def test_plan_matches_the_combined_table():
    """The rows the kernel reads are the nonzeros of Π_i Cls_i (built here by einsum, as the Triton form does)."""
    for geo in (CG.frame_geometry((4, 3, 3, 3), (6, 5), (2, 1), 1, (1, 2), 1, "zeros", "cols"),
                CG.frame_geometry((4, 3, 3, 2, 3), (4, 5, 6), 1, (1, 0, 2), 1, 1, "circular", "rows")):
        plan, ptr, Q, zero = COPS._frame_plan_lists(geo)
        T0, T1, T2 = CG.class_tables(geo, D64, torch.device("cpu"))
        tab = torch.einsum("iaxr,jbys,kczq->ijkabcxyzrsq", T0, T1, T2)
        K = math.prod(geo.kernel)
        tab = tab.reshape(geo.n_cls, K, K, -1)
        assert tab.shape[-1] == Q
        rebuilt = torch.zeros_like(tab)
        rows = torch.tensor(plan).view(-1, 4)
        for c in range(geo.n_cls):
            block = rows[ptr[c]:ptr[c + 1]]
            assert torch.all(block[1:, 2] >= block[:-1, 2]), "offsets sorted within a class"
            for t, t2, q, m in block.tolist():
                assert rebuilt[c, t, t2, q] == 0, "each (t, t', q) once"
                rebuilt[c, t, t2, q] = m
        assert torch.equal(rebuilt, tab)
        z = [dim.zero for dim in geo.dims]
        r = [len(dim.rel) for dim in geo.dims]
        assert zero == (z[0] * r[1] + z[1]) * r[2] + z[2]


def _stats(w, size, kw, keep):
    (kernel, *geometry), circular, rows, _, _ = CG.frame_plan(
        "t", tuple(w.shape), tuple(size), kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1),
        kw.get("groups", 1), kw.get("padding_mode", "zeros"), kw.get("side", "auto"), False, R.MAX_WORK_BYTES)
    geo = CG.FrameGeometry(tuple(kernel), *(tuple(x) for x in geometry), circular, rows)
    plan, ptr, Q, zero = COPS._frame_cpu_plan(geo)
    w5 = w.reshape(w.shape[0], w.shape[1], *kernel)
    return torch.ops.regkernels.conv_frame_stats_cpu(w5, plan, ptr, Q, zero, kw.get("groups", 1), rows, keep), \
        (w5, plan, ptr, Q, zero, kw.get("groups", 1), rows)


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_backward_with_and_without_the_kept_tap_gram(dtype):
    torch.manual_seed(1)
    w = torch.randn(6, 4, 3, 3, dtype=dtype)
    kw = dict(padding=1, groups=2, side="cols")
    (d, r, X), args = _stats(w, (5, 7), kw, keep=True)
    (d2, r2, X2), _ = _stats(w, (5, 7), kw, keep=False)
    assert X.shape == (2, 9 * 4, 9 * 4) and X2.numel() == 0
    assert torch.equal(d, d2) and torch.equal(r, r2)
    assert torch.equal(X, X.mT), "the tap Gram is mirrored: exactly symmetric"
    gd, gr = torch.randn_like(d), torch.randn_like(r)
    w5, plan, ptr, Q, zero, groups, rows = args
    kept = torch.ops.regkernels.conv_frame_stats_cpu_backward(w5, X, gd, gr, plan, ptr, Q, zero, groups, rows)
    again = torch.ops.regkernels.conv_frame_stats_cpu_backward(w5, X2, gd, gr, plan, ptr, Q, zero, groups, rows)
    assert torch.equal(kept, again)
    # the public op without the kept X (over the byte limit) gives the same gradient
    a = w.clone().requires_grad_()
    regkernels.conv_frame_penalty(a, (5, 7), **FRAME, **kw, backend="cpu").backward()
    old = COPS.KEEP_TAP_GRAM_BYTES
    try:
        COPS.KEEP_TAP_GRAM_BYTES = 0
        b = w.clone().requires_grad_()
        regkernels.conv_frame_penalty(b, (5, 7), **FRAME, **kw, backend="cpu").backward()
    finally:
        COPS.KEEP_TAP_GRAM_BYTES = old
    assert torch.equal(a.grad, b.grad)


def test_groups_are_scaled_and_poisoned_separately():
    """Layers batched as groups: a group of weights near 1e-15 keeps its relative accuracy next to one near
    1e15 (one scale for both would leave the small group's tap Gram near 1e-60, under float32's range: a
    power-of-two scale per group), and a NaN / overflowing group leaves the others finite."""
    torch.manual_seed(2)
    base = torch.randn(3, 4, 2, 3, 3, dtype=torch.float32)  # 3 layers (4, 2, 3, 3)
    base[0] *= 1e15
    base[1] *= 1e-15
    w = base.reshape(12, 2, 3, 3)
    (d, r, _), _ = _stats(w, (6, 6), dict(padding=1, groups=3, side="cols"), keep=False)
    for layer in range(3):
        (d1, r1, _), _ = _stats(base[layer].double(), (6, 6), dict(padding=1, side="cols"), keep=False)
        torch.testing.assert_close(d[layer].double(), d1[0], rtol=1e-5, atol=0)
        torch.testing.assert_close(r[layer].double(), r1[0], rtol=1e-5, atol=0)
    poisoned = base.clone()
    poisoned[0] = base[2]
    poisoned[0, 0, 0, 0, 0] = float("nan")
    poisoned[2] *= 1e25  # d ~ 1e50: over float32's range
    (d, r, _), _ = _stats(poisoned.reshape(12, 2, 3, 3), (6, 6), dict(padding=1, groups=3, side="cols"), keep=False)
    # the NaN tap reaches only the Gram rows whose class reads it (as in the explicit T's Gram)
    assert torch.isnan(d[0]).any() and torch.isnan(r[0]).any()
    assert torch.isfinite(d[1]).all() and torch.isfinite(r[1]).all()
    assert torch.isposinf(d[2]).all() and not torch.isnan(d[2]).any()


def test_half_precision_and_noncontiguous_weights():
    torch.manual_seed(3)
    w = torch.randn(5, 3, 3, 3, dtype=D64)
    ref = R.conv_frame_penalty(w, (6, 5), **FRAME, padding=1)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)):
        wd = w.to(dtype)
        out = regkernels.conv_frame_penalty(wd, (6, 5), **FRAME, padding=1, backend="cpu")
        assert out.dtype == dtype
        exact = R.conv_frame_penalty(wd.double(), (6, 5), **FRAME, padding=1)
        torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol * float(ref.abs()))
    nc = w.transpose(2, 3)  # a non-contiguous view
    torch.testing.assert_close(regkernels.conv_frame_penalty(nc, (6, 5), **FRAME, padding=1, backend="cpu"),
                               R.conv_frame_penalty(nc.contiguous(), (6, 5), **FRAME, padding=1),
                               rtol=1e-12, atol=1e-12)


def test_double_backward_is_refused():
    w = torch.randn(3, 2, 3, 3, dtype=D64, requires_grad=True)
    out = regkernels.conv_frame_penalty(w, (5, 5), **FRAME, padding=1, backend="cpu")
    (g,) = torch.autograd.grad(out, w, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* not supported by backend='cpu'"):
        g.sum().backward()


def test_raw_op_checks():
    w = torch.randn(4, 2, 1, 3, 3)
    geo = CG.frame_geometry((4, 2, 3, 3), (5, 5), 1, 1, 1, 1, "zeros", "cols")
    plan, ptr, Q, zero = COPS._frame_cpu_plan(geo)
    op = torch.ops.regkernels.conv_frame_stats_cpu
    with pytest.raises(RuntimeError, match=r"conv_frame_stats_cpu: weight must be 5-D"):
        op(w[0], plan, ptr, Q, zero, 1, False, False)
    with pytest.raises(RuntimeError, match=r"conv_frame_stats_cpu: groups must be >= 1 and divide C_out"):
        op(w, plan, ptr, Q, zero, 3, False, False)
    with pytest.raises(RuntimeError, match=r"conv_frame_stats_cpu: plan must be a contiguous int32"):
        op(w, plan.long(), ptr, Q, zero, 1, False, False)
    with pytest.raises(RuntimeError, match=r"conv_frame_stats_cpu: need n_offsets >= 1 and 0 <= zero"):
        op(w, plan, ptr, Q, Q, 1, False, False)
    broken = plan.clone()
    broken[0, 0] = 9  # tap 9 of a 9-tap kernel
    with pytest.raises(RuntimeError, match=r"conv_frame_stats_cpu: plan entry 0 = \(9, .* out of range"):
        op(w, broken, ptr, Q, zero, 1, False, False)
    with pytest.raises(RuntimeError, match=r"conv_frame_stats_cpu: class_ptr must run from 0"):
        op(w, plan, ptr[:-1], Q, zero, 1, False, False)
    d, r, X = op(w, plan, ptr, Q, zero, 1, False, True)
    back = torch.ops.regkernels.conv_frame_stats_cpu_backward
    with pytest.raises(RuntimeError, match=r"conv_frame_stats_cpu_backward: grad_d must be a floating strided CPU"):
        back(w, X, d[:, :1], r, plan, ptr, Q, zero, 1, False)
    with pytest.raises(RuntimeError, match=r"conv_frame_stats_cpu_backward: tap_gram must be empty or the forward's"):
        back(w, X[:, 1:], d, r, plan, ptr, Q, zero, 1, False)


@pytest.mark.parametrize("keep", [False, True])
def test_opcheck(keep):
    torch.manual_seed(4)
    w = torch.randn(4, 3, 1, 3, 3, dtype=D64, requires_grad=True)
    geo = CG.frame_geometry((4, 3, 3, 3), (5, 4), 1, 1, 1, 1, "circular", "rows")
    plan, ptr, Q, zero = COPS._frame_cpu_plan(geo)
    torch.library.opcheck(torch.ops.regkernels.conv_frame_stats_cpu, (w, plan, ptr, Q, zero, 1, True, keep))
    d, r, X = torch.ops.regkernels.conv_frame_stats_cpu(w.detach(), plan, ptr, Q, zero, 1, True, keep)
    torch.library.opcheck(torch.ops.regkernels.conv_frame_stats_cpu_backward,
                          (w.detach(), X, torch.randn_like(d), torch.randn_like(r), plan, ptr, Q, zero, 1, True))


def test_empty_layers():
    for shape in ((0, 3, 3, 3), (4, 0, 3, 3)):
        w = torch.zeros(shape, requires_grad=True)
        out = regkernels.conv_frame_penalty(w, (5, 5), **FRAME, padding=1, backend="cpu")
        assert out.item() == 0
        out.backward()
        assert w.grad.shape == w.shape
