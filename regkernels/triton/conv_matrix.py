"""Triton kernels for the dense matrix ``T`` of a convolution (docs/conv.md#conv_to_matrix): the forward builds
``T = conv_to_matrix(weight, …, layout="dense")`` and the backward maps ``∂L/∂T`` back to the
weight.

Geometry (normalised by the caller to 3 spatial dims, 1-D/2-D convolutions pad the leading
kernel and input dims with 1): ``weight (C_out, Cg, k0, k1, k2)`` with ``Cg = C_in/groups``,
``Og = C_out/groups``, ``out_i = ⌊(n_i + 2p_i − dil_i(k_i − 1) − 1)/s_i⌋ + 1``,
``P_out = ∏out``, ``P_in = ∏n``. ``T`` is contiguous ``(C_out·P_out, C_in·P_in)`` with

    row  r   = o·P_out + (y0·out1 + y1)·out2 + y2
    col  col = c·P_in + (u0·n1 + u1)·n2 + u2

A tap ``t`` of row ``(o, y)`` reads, per dim, ``w_i = y_i s_i − p_i + t_i dil_i``: zero
padding keeps it iff ``0 ≤ w_i < n_i`` (``u_i = w_i``); circular padding always keeps it,
``u_i = w_i mod n_i`` (``p_i ≤ n_i`` gives ``w_i ∈ [−n_i, 2n_i)``, i.e. ``w_i = u_i + m·n_i``
with ``m ∈ {−1, 0, 1}``). ``T[r, col] = Σ_t weight[o, c − g(o)·Cg, t]`` over the taps that
land on ``col``, for ``c`` in o's group ``g(o) = o // Og``; 0 elsewhere.

Forward (gather, inverse index map): program ``(row tile, column tile)`` writes one
``BLOCK_R × BLOCK_C`` tile of ``T``, so every entry is written exactly once (no zero fill, no
atomics, no scatter). For entry ``(r, col)`` the candidate tap of dim ``i`` is
``t_i = (u_i + m·n_i + p_i − y_i s_i) / dil_i``, kept iff it is an exact integer in
``[0, k_i)``; zero padding has the single candidate ``m = 0``, circular padding the three
``m ∈ {−1, 0, 1}`` per dim (``CIRCULAR`` is a constexpr, so the zeros path compiles to one
masked load per entry, the circular one to 27). Each tap of a row has exactly one
``(u, m)``, so the candidates enumerate every tap once. The writes are coalesced along the
columns; the weight gathers hit a tiny, cache-resident tensor.

Backward (deterministic, no atomics): ``gW[o, c', t] = Σ_y [tap t of (o, y) valid]
grad[o·P_out + y, (g(o)·Cg + c')·P_in + u(y, t)]``. Program ``(o·Cg + c', tap block)`` loops
over the output positions ``y`` in blocks of ``BLOCK_Y``, gathers the grad entries with the
forward index map and reduces over ``y``: each weight entry is owned by one program. Two
taps that land on one column (circular, tiny inputs) both read that grad entry, as
``∂T[r, col]/∂w[t] = 1`` for each of them.

Numerics: ``T``'s entries are copies of weights, except where circular taps collide; such
sums (and the backward's reductions) accumulate in float32 (float64 for float64 weights)
and are rounded once (to nearest even) to the weight's dtype. The reference
``index_put(accumulate=True)`` adds colliding entries in the weight's dtype, so colliding
float16/bfloat16 entries may differ from it by a rounding (a few small weights sum exactly
in float32, so they equal the float64 sum rounded once) and float32 ones by summation
order; every other entry is a bit-exact copy. float32 → bfloat16 rounding is done on the
bits (``_round_to``) because the CPU interpreter's cast truncates.

Indexing: row / column / spatial indices are int32 (each of ``C_out·P_out``, ``C_in·P_in``
is < 2³¹, checked), offsets into ``T`` and ``grad`` are int64 (``T`` may exceed 2³¹ entries).
Integer ``//`` and ``%`` only ever see non-negative operands (C and Python disagree on
negatives). Weight offsets are int32: the launchers copy a weight whose strided extent
reaches 2³¹ elements. Not importable without Triton: import this module only after
``regkernels._ext.has_triton()``.

Layout: kernels → launchers → the custom ops ``regkernels::conv_to_matrix_triton`` (+ ``_backward``)
with fakes and autograd → ``conv_to_matrix``, the ``"triton"`` row of the conv table (docs/conv.md).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from regkernels import _geometry as CG
from regkernels._numerics import through_function
from regkernels.reference import conv as R

# ----------------------------------------------------------------------------- constants

# Forward tile of T: 32 rows × 128 columns, 4 warps (32 entries per thread). Columns are
# the contiguous dim of T, so 128 keeps each row's store one wide coalesced segment. GPU
# tuning would autotune 32–64 × 64–256 and num_warps 4–8; the kernel is bound by T's
# writes (every entry once) — the weight gathers stay in L1/L2.
BLOCK_R = 32
BLOCK_C = 128
NUM_WARPS = 4

# Backward tile of (output positions × taps): BLOCK_T = next power of two of K capped at
# MAX_BLOCK_T (K = 9 / 27 for 3×3 / 3×3×3 kernels fits one block), BLOCK_Y = about
# TILE_ELEMS / BLOCK_T output positions per step.
MAX_BLOCK_T = 32
TILE_ELEMS = 4096

# Largest grid size along axes 1 and 2 (CUDA); axis 0 takes up to 2³¹ − 1.
_GRID_YZ_MAX = 65535
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _split3(idx, D1, D2):
    """Row-major flat index over ``(D0, D1, D2)`` → ``(i0, i1, i2)`` (``idx ≥ 0``)."""
    i2 = idx % D2
    rest = idx // D2
    return rest // D1, rest % D1, i2


@triton.jit
def _tap_of(a, DIL, K):
    """Tap index ``t = a / DIL`` and whether it is a tap: ``a ≥ 0``, ``DIL | a``, ``t < K``.

    ``a`` is clamped to ≥ 0 before dividing, so ``//`` and ``%`` never see a negative
    operand; a clamped (invalid) entry is masked off by ``ok`` anyway.
    """
    a_pos = tl.maximum(a, 0)
    t = a_pos // DIL
    ok = (a >= 0) & (a_pos - t * DIL == 0) & (t < K)
    return t, ok


@triton.jit
def _wrap(w, N, CIRCULAR: tl.constexpr):
    """Input position of an unwrapped position ``w ∈ [−N, 2N)`` and whether it is read:
    circular ``(w mod N, True)``, zeros ``(w, 0 ≤ w < N)``."""
    if CIRCULAR:
        u = tl.where(w < 0, w + N, tl.where(w >= N, w - N, w))
        ok = w == w
    else:
        u = w
        ok = (w >= 0) & (w < N)
    return u, ok


@triton.jit
def _round_to(x, OUT: tl.constexpr):
    """``x`` (ACC dtype) rounded to nearest-even in the output dtype ``OUT``.

    float32 → bfloat16 is rounded by hand on the bits (then reinterpreted, no cast): the
    CPU interpreter (TRITON_INTERPRET=1) converts float32 → bfloat16 by truncation and
    mishandles subnormals, which the GPU's cvt.rn does not; the bit trick gives the same
    RTNE result on both. NaN is passed through the ordinary cast (adding the rounding bias
    to a NaN's bits could carry it into an infinity).
    """
    if (OUT == tl.bfloat16) and (x.dtype == tl.float32):
        b = x.to(tl.uint32, bitcast=True)
        b = b + (((b >> 16) & 1) + 0x7FFF)
        y = tl.where(x != x, x.to(tl.bfloat16), (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True))
    else:
        y = x.to(OUT)
    return y


@triton.jit
def _conv_matrix_fwd_kernel(W, T, n_rows, n_cols,
                            sw0, sw1, sw2, sw3, sw4,
                            Og, Cg, P_out, P_in,
                            O1, O2, N0, N1, N2, K0, K1, K2,
                            S0, S1, S2, PD0, PD1, PD2, DL0, DL1, DL2,
                            CIRCULAR: tl.constexpr, COLS_ON_AXIS0: tl.constexpr,
                            ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One ``BLOCK_R × BLOCK_C`` tile of ``T`` from the inverse index map (module docstring).

    Every entry of the tile is written (zeros included), so ``T`` needs no zero fill.
    Colliding circular taps are summed in ``ACC_DTYPE`` and rounded once.
    """
    if COLS_ON_AXIS0:  # the larger tile count goes on axis 0 (axis 1 is capped at 65535)
        pid_c = tl.program_id(0)
        pid_r = tl.program_id(1)
    else:
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = rows < n_rows
    mask_c = cols < n_cols
    # out-of-range lanes are clamped to index 0, keeping every division below on
    # non-negative operands; they are masked at the store
    rows_s = tl.where(mask_r, rows, 0)
    cols_s = tl.where(mask_c, cols, 0)

    o = rows_s // P_out
    y0, y1, y2 = _split3(rows_s % P_out, O1, O2)
    c = cols_s // P_in
    u0, u1, u2 = _split3(cols_s % P_in, N1, N2)

    # c belongs to o's group iff c // Cg == o // Og; otherwise the entry is a structural 0
    in_group = (o // Og)[:, None] == (c // Cg)[None, :]
    live = in_group & mask_r[:, None] & mask_c[None, :]
    w_base = W + (o * sw0)[:, None] + ((c % Cg) * sw1)[None, :]

    # a_i = u_i + p_i − y_i s_i: the tap's dil_i·t_i for the unwrapped position m = 0
    a0 = u0[None, :] + PD0 - (y0 * S0)[:, None]
    a1 = u1[None, :] + PD1 - (y1 * S1)[:, None]
    a2 = u2[None, :] + PD2 - (y2 * S2)[:, None]

    if CIRCULAR:
        # unwrapped w_i = u_i + m_i·n_i, m_i ∈ {−1, 0, 1} per dim: 27 candidates, each a
        # distinct tap or none (static loops unroll; the per-dim terms are shared by CSE).
        # Taps that collide on one column are summed in ACC_DTYPE and rounded once.
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)
        for m0 in tl.static_range(3):
            t0, ok0 = _tap_of(a0 + (m0 - 1) * N0, DL0, K0)
            for m1 in tl.static_range(3):
                t1, ok1 = _tap_of(a1 + (m1 - 1) * N1, DL1, K1)
                for m2 in tl.static_range(3):
                    t2, ok2 = _tap_of(a2 + (m2 - 1) * N2, DL2, K2)
                    ok = live & ok0 & ok1 & ok2
                    acc += tl.load(w_base + t0 * sw2 + t1 * sw3 + t2 * sw4, mask=ok, other=0.0).to(ACC_DTYPE)
        val = _round_to(acc, T.dtype.element_ty)
    else:
        # zeros: the only candidate is w = u (positions in the padding have no column), so
        # each entry is a plain copy of one weight or 0
        t0, ok0 = _tap_of(a0, DL0, K0)
        t1, ok1 = _tap_of(a1, DL1, K1)
        t2, ok2 = _tap_of(a2, DL2, K2)
        ok = live & ok0 & ok1 & ok2
        val = tl.load(w_base + t0 * sw2 + t1 * sw3 + t2 * sw4, mask=ok, other=0.0)

    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(T + offs, val, mask=mask_r[:, None] & mask_c[None, :])


@triton.jit
def _conv_matrix_bwd_kernel(G, GW, gs0, gs1,
                            Og, Cg, P_out, P_in, K,
                            O1, O2, N0, N1, N2, K1, K2,
                            S0, S1, S2, PD0, PD1, PD2, DL0, DL1, DL2,
                            CIRCULAR: tl.constexpr, ACC_DTYPE: tl.constexpr,
                            BLOCK_Y: tl.constexpr, BLOCK_T: tl.constexpr):
    """``gW[o, c', t] = Σ_y [tap valid] grad[row(o, y), col(o, c', y, t)]`` for one ``(o, c')``
    and one block of taps.

    Program ``(o·Cg + c', tap block)`` owns its ``BLOCK_T`` weight entries: each is a sum
    over the ``P_out`` output positions, taken in blocks of ``BLOCK_Y`` in a fixed order
    (deterministic, no atomics), accumulated in ``ACC_DTYPE``.
    """
    pid = tl.program_id(0)
    o = pid // Cg
    c_glob = (o // Og) * Cg + pid % Cg
    row0 = o.to(tl.int64) * P_out
    col0 = c_glob.to(tl.int64) * P_in

    taps = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = taps < K
    t0, t1, t2 = _split3(tl.where(mask_t, taps, 0), K1, K2)

    acc = tl.zeros((BLOCK_T,), dtype=ACC_DTYPE)
    for yb in range(0, P_out, BLOCK_Y):
        ys = yb + tl.arange(0, BLOCK_Y)
        mask_y = ys < P_out
        y0, y1, y2 = _split3(tl.where(mask_y, ys, 0), O1, O2)
        # the forward map: w_i = y_i s_i − p_i + t_i dil_i, then wrap or clip per dim
        u0, ok0 = _wrap((y0 * S0 - PD0)[:, None] + (t0 * DL0)[None, :], N0, CIRCULAR)
        u1, ok1 = _wrap((y1 * S1 - PD1)[:, None] + (t1 * DL1)[None, :], N1, CIRCULAR)
        u2, ok2 = _wrap((y2 * S2 - PD2)[:, None] + (t2 * DL2)[None, :], N2, CIRCULAR)
        ok = ok0 & ok1 & ok2 & mask_y[:, None] & mask_t[None, :]
        # zero-padding taps outside the input form out-of-range columns: masked, never read
        col = col0 + ((u0 * N1 + u1) * N2 + u2)
        row = row0 + ys
        g = tl.load(G + row[:, None] * gs0 + col * gs1, mask=ok, other=0.0)
        acc += tl.sum(g.to(ACC_DTYPE), axis=0)
    tl.store(GW + pid.to(tl.int64) * K + taps, _round_to(acc, GW.dtype.element_ty), mask=mask_t)


# ----------------------------------------------------------------------------- host launchers

def _launch_geometry(weight: torch.Tensor, input_size, stride, padding, dilation, groups: int):
    """``(out_size, P_out, P_in, K, Og, Cg, C_in)`` of the normalised 3-D problem."""
    if weight.dim() != 5:
        raise ValueError(f"conv_to_matrix_dense: weight must be 5-D (C_out, Cg, k0, k1, k2); got {tuple(weight.shape)}")
    c_out, cg = weight.shape[0], weight.shape[1]
    kernel = tuple(weight.shape[2:])
    out_size = CG.conv_output_size(input_size, kernel, stride, padding, dilation)
    return (out_size, math.prod(out_size), math.prod(input_size), math.prod(kernel),
            c_out // groups, cg, cg * groups)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _addressable(weight: torch.Tensor) -> torch.Tensor:
    """The weight itself, or a contiguous copy when its strided extent needs int64 offsets."""
    extent = sum((n - 1) * abs(s) for n, s in zip(weight.shape, weight.stride()))
    return weight if extent <= _INT32_MAX else weight.contiguous()


def conv_to_matrix_dense(weight: torch.Tensor, input_size: tuple[int, int, int], stride: tuple[int, int, int],
                         padding: tuple[int, int, int], dilation: tuple[int, int, int], groups: int,
                         circular: bool) -> torch.Tensor:
    """Dense ``T`` (contiguous ``(C_out·P_out, C_in·P_in)``, the weight's dtype) of a normalised
    3-D convolution; equals ``reference.conv.conv_to_matrix(…, layout="dense")``.

    One launch over (row tiles × column tiles), the larger count on grid axis 0; every
    entry is written once. Arguments are validated by the caller (``out_i ≥ 1``; circular
    needs ``p_i ≤ n_i``).
    """
    out_size, p_out, p_in, k, og, cg, c_in = _launch_geometry(weight, input_size, stride, padding, dilation, groups)
    c_out = weight.shape[0]
    n_rows, n_cols = c_out * p_out, c_in * p_in
    T = torch.empty((n_rows, n_cols), dtype=weight.dtype, device=weight.device)
    if weight.numel() == 0:  # no filters / channels / taps: T is empty or all zeros
        return T.zero_()
    if n_rows > _INT32_MAX or n_cols > _INT32_MAX:
        raise ValueError(f"conv_to_matrix_dense: T of shape {(n_rows, n_cols)} has a side over 2^31 - 1")
    w = _addressable(weight)
    n_rt, n_ct = triton.cdiv(n_rows, BLOCK_R), triton.cdiv(n_cols, BLOCK_C)
    cols_first = n_ct > n_rt
    grid = (n_ct, n_rt) if cols_first else (n_rt, n_ct)
    if grid[1] > _GRID_YZ_MAX:
        raise ValueError(f"conv_to_matrix_dense: T of shape {(n_rows, n_cols)} needs a {grid} tile grid, "
                         f"over the {_GRID_YZ_MAX} limit of grid axis 1")
    _conv_matrix_fwd_kernel[grid](
        w, T, n_rows, n_cols, *w.stride(), og, cg, p_out, p_in,
        out_size[1], out_size[2], *input_size, *w.shape[2:],
        *stride, *padding, *dilation,
        CIRCULAR=bool(circular), COLS_ON_AXIS0=cols_first, ACC_DTYPE=_acc_dtype(weight.dtype),
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    return T


def conv_to_matrix_dense_backward(grad: torch.Tensor, weight: torch.Tensor, input_size: tuple[int, int, int],
                                  stride: tuple[int, int, int], padding: tuple[int, int, int],
                                  dilation: tuple[int, int, int], groups: int, circular: bool) -> torch.Tensor:
    """``∂L/∂weight`` (contiguous, the weight's shape and dtype) from ``grad = ∂L/∂T``
    (``(C_out·P_out, C_in·P_in)``, any strides) of ``conv_to_matrix_dense``.

    One launch over ``(C_out·Cg, ⌈K/BLOCK_T⌉)`` programs; deterministic (no atomics).
    """
    out_size, p_out, p_in, k, og, cg, c_in = _launch_geometry(weight, input_size, stride, padding, dilation, groups)
    c_out = weight.shape[0]
    gw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    if weight.numel() == 0:
        return gw
    if tuple(grad.shape) != (c_out * p_out, c_in * p_in):
        raise ValueError(f"conv_to_matrix_dense_backward: grad must be {(c_out * p_out, c_in * p_in)}; "
                         f"got {tuple(grad.shape)}")
    block_t = min(triton.next_power_of_2(k), MAX_BLOCK_T)
    block_y = max(16, min(TILE_ELEMS // block_t, triton.next_power_of_2(p_out)))
    grid = (c_out * cg, triton.cdiv(k, block_t))
    _conv_matrix_bwd_kernel[grid](
        grad, gw, grad.stride(0), grad.stride(1), og, cg, p_out, p_in, k,
        out_size[1], out_size[2], *input_size, *weight.shape[3:],
        *stride, *padding, *dilation,
        CIRCULAR=bool(circular), ACC_DTYPE=_acc_dtype(weight.dtype),
        BLOCK_Y=block_y, BLOCK_T=block_t, num_warps=NUM_WARPS)
    return gw


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("regkernels::conv_to_matrix_triton", mutates_args=())
def _dense_triton(weight: torch.Tensor, input_size: list[int], stride: list[int], padding: list[int],
                  dilation: list[int], groups: int, circular: bool) -> torch.Tensor:
    CG.check_dense_args("regkernels::conv_to_matrix_triton", weight, input_size, stride, padding, dilation, groups,
                        circular)
    return conv_to_matrix_dense(weight, tuple(input_size), tuple(stride), tuple(padding), tuple(dilation), groups,
                                circular)


@_dense_triton.register_fake
def _dense_triton_fake(weight, input_size, stride, padding, dilation, groups, circular):
    rows, cols = CG.check_dense_args("regkernels::conv_to_matrix_triton", weight, input_size, stride, padding,
                                     dilation, groups, circular)
    return weight.new_empty((rows, cols))


@torch.library.custom_op("regkernels::conv_to_matrix_triton_backward", mutates_args=())
def _dense_triton_backward(grad: torch.Tensor, weight: torch.Tensor, input_size: list[int], stride: list[int],
                           padding: list[int], dilation: list[int], groups: int, circular: bool) -> torch.Tensor:
    op = "regkernels::conv_to_matrix_triton_backward"
    CG.check_dense_grad(op, grad, weight, CG.check_dense_args(op, weight, input_size, stride, padding, dilation,
                                                              groups, circular))
    return conv_to_matrix_dense_backward(grad, weight, tuple(input_size), tuple(stride), tuple(padding),
                                         tuple(dilation), groups, circular)


@_dense_triton_backward.register_fake
def _dense_triton_backward_fake(grad, weight, input_size, stride, padding, dilation, groups, circular):
    op = "regkernels::conv_to_matrix_triton_backward"
    CG.check_dense_grad(op, grad, weight, CG.check_dense_args(op, weight, input_size, stride, padding, dilation,
                                                              groups, circular))
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _save_weight(ctx, inputs, output) -> None:
    weight, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(weight)


def _dense_grad(ctx, grad):
    (weight,) = ctx.saved_tensors
    return (torch.ops.regkernels.conv_to_matrix_triton_backward(grad, weight, *ctx.geometry),) + (None,) * 6


def _save_backward_weight(ctx, inputs, output) -> None:
    _grad, weight, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(weight)


def _dense_backward_grad(ctx, grad_gw):
    # the backward is linear in grad and independent of the weight's values (T is linear in the
    # weight): its derivative w.r.t. grad is the forward, so double backward is exact
    (weight,) = ctx.saved_tensors
    return (torch.ops.regkernels.conv_to_matrix_triton(grad_gw.to(weight.dtype), *ctx.geometry), None) + (None,) * 6


# the raw ops stay differentiable (torch.ops.regkernels.*, opcheck); conv_to_matrix goes through
# _Dense below, which torch.func can transform
_dense_triton.register_autograd(_dense_grad, setup_context=_save_weight)
_dense_triton_backward.register_autograd(_dense_backward_grad, setup_context=_save_backward_weight)


class _Dense(torch.autograd.Function):
    """``regkernels::conv_to_matrix_triton`` for ``conv_to_matrix``: a custom op's
    ``register_autograd`` does not run under ``torch.func.grad``, an autograd.Function with
    ``setup_context`` does; its vmap rule runs the op once per layer. ``conv_to_matrix`` takes it
    under torch.func and torch.compile, the raw op otherwise (``regkernels._numerics.through_function``)."""

    @staticmethod
    def forward(weight, input_size, stride, padding, dilation, groups, circular):
        return torch.ops.regkernels.conv_to_matrix_triton(weight, input_size, stride, padding, dilation, groups,
                                                          circular)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _save_weight(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return (_DenseBackward.apply(grad, weight, *ctx.geometry),) + (None,) * 6

    @staticmethod
    def vmap(info, in_dims, *args):
        return CG.vmap_by_loop(_Dense.apply, info, in_dims, *args)


class _DenseBackward(torch.autograd.Function):
    """``regkernels::conv_to_matrix_triton_backward``; differentiated, it is the forward again."""

    @staticmethod
    def forward(grad, weight, input_size, stride, padding, dilation, groups, circular):
        return torch.ops.regkernels.conv_to_matrix_triton_backward(grad, weight, input_size, stride, padding,
                                                                   dilation, groups, circular)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _save_backward_weight(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_gw):
        (weight,) = ctx.saved_tensors
        return (_Dense.apply(grad_gw.to(weight.dtype), *ctx.geometry), None) + (None,) * 6

    @staticmethod
    def vmap(info, in_dims, *args):
        return CG.vmap_by_loop(_DenseBackward.apply, info, in_dims, *args)


# ----------------------------------------------------------------------------- the table entry

def conv_to_matrix(weight: torch.Tensor, input_size, stride=1, padding=0, dilation=1, groups: int = 1,
                   padding_mode: str = "zeros", layout: str = "dense",
                   max_dense_bytes: int | None = None) -> torch.Tensor:
    """Dense ``T`` by the Triton kernels, arguments as the reference's; the sparse layouts are
    backend ``"torch"``."""
    if layout != "dense":
        raise ValueError(f"conv_to_matrix: backend 'triton' builds layout='dense' only; got layout={layout!r} "
                         f"(the sparse layouts: backends 'torch', 'reference')")
    shape = CG.matrix_shape(weight, input_size, stride, padding, dilation, groups)
    R.check_dense_matrix(weight, shape, max_dense_bytes)
    w5, *geometry = CG.normalise(weight, input_size, stride, padding, dilation)
    if through_function():
        return _Dense.apply(w5, *geometry, groups, padding_mode == "circular")
    return torch.ops.regkernels.conv_to_matrix_triton(w5, *geometry, groups, padding_mode == "circular")
