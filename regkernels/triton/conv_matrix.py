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
atomics, no scatter). The index maps are 1-D: the rows' ``(o, y)`` and the columns' ``(c, u)``
are decomposed once per tile (unsigned divisions on vectors of ``BLOCK_R`` / ``BLOCK_C``), never
per entry. A tile is first tested against the rows' windows (per row, a bounding interval of
the flat input positions its taps read, against the tile's columns in its group): a tile no
tap reaches is stored as zeros without computing taps. Otherwise, per dim, ``dil·t = A − B``
with ``A = u + p (+ (m + 1)·n)`` per column and ``B = y·s (+ n)`` per row, both ≥ 0: the tap
exists iff ``A % dil == B % dil`` and ``0 ≤ A // dil − B // dil < k``, and the weight offset is a
column term minus a row term; so an entry costs a few integer differences, one sign test
for all dims and its group, and one masked load. Zero padding has the single candidate
``m = 0``; circular padding loops at run time over the wraps ``m ∈ {−1, 0, 1}`` per dim that the
tile's windows meet (usually one or two), not over all 27 combinations. Each tap of a row
has exactly one ``(u, m)``, so the candidates enumerate every tap once. The stores are
coalesced along the columns (128-bit when ``C_in·P_in`` is a multiple of 16); the weight
gathers hit a tiny, cache-resident tensor. Geometry arguments are ``do_not_specialize``: one
compiled kernel per dtype, padding mode, rank (``FIRST_DIM``), dilation flag and index width.

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

Indexing: the 1-D maps, the per-entry differences and the weight offsets are ``IDX``: int32
when the launcher's bound on all of them is below 2³¹, int64 otherwise (an unusual padding or
stride); offsets into ``T`` are int64 (``T`` may exceed 2³¹ entries; each side is < 2³¹,
checked); the backward addresses one ``(o, c')`` block of ``grad`` from a 64-bit base with
``IDX`` offsets. Integer ``//`` and ``%`` only ever see non-negative operands. Weight offsets fit
int32: the launchers copy a weight whose strided extent reaches 2³¹ elements. Not importable without Triton: import this module only after
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
from regkernels.triton._launch import Budget, on_device
from regkernels.reference import conv as R

# ----------------------------------------------------------------------------- constants

# Forward tile of T: 32 rows × 128 columns, 4 warps (32 entries per thread). Columns are
# the contiguous dim of T, so 128 keeps each row's store one wide coalesced segment. GPU
# tuning would autotune 32–64 × 64–256 and num_warps 4–8; the kernel is bound by T's
# writes (every entry once) — the weight gathers stay in L1/L2.
BLOCK_R = 32
BLOCK_C = 128
NUM_WARPS = 4
# circular padding keeps an accumulator tile live across its wrap loops: a quarter of the rows keeps it
# within 128 registers (25 % occupancy)
BLOCK_R_CIRCULAR = 8

# Backward tile of (output positions × taps): BLOCK_T = next power of two of K capped at
# MAX_BLOCK_T (K = 9 / 27 for 3×3 / 3×3×3 kernels fits one block), BLOCK_Y = about
# TILE_ELEMS / BLOCK_T output positions per step.
MAX_BLOCK_T = 32
TILE_ELEMS = 1024

# Largest grid size along axes 1 and 2 (CUDA); axis 0 takes up to 2³¹ − 1.
_GRID_YZ_MAX = 65535
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _divmod(a, d):
    """``(a // d, a % d)`` for ``a ≥ 0``, ``d ≥ 1`` by unsigned division (no sign fix-ups)."""
    if a.dtype == tl.int64:
        q = (a.to(tl.uint64) // d.to(tl.uint64)).to(tl.int64)
    else:
        q = (a.to(tl.uint32) // d.to(tl.uint32)).to(a.dtype)
    return q, a - q * d


@triton.jit
def _split3(idx, D1, D2):
    """Row-major flat index over ``(D0, D1, D2)`` → ``(i0, i1, i2)`` (``idx ≥ 0``)."""
    rest, i2 = _divmod(idx, D2)
    i0, i1 = _divmod(rest, D1)
    return i0, i1, i2


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
def _quot(a, DL, DILATED: tl.constexpr):
    """``(a // dil, a % dil)`` of an index vector ``a ≥ 0``; ``(a, 0)`` when no dim is dilated."""
    if DILATED:
        q, r = _divmod(a, DL)
    else:
        q = a
        r = a * 0
    return q, r


@triton.jit
def _window(y, S, PD, E, N, CIRCULAR: tl.constexpr):
    """Per output position ``y`` of one dim: the unwrapped start ``w = y·s − p`` of its taps'
    window ``[w, w + e]`` and a bounding interval ``[lo, hi]`` of the input positions they
    read (``lo > hi``: none, all in the zero padding)."""
    w = y * S - PD
    if CIRCULAR:
        # [w, w + e] ⊂ [−n, 2n) read mod n: one interval unless it wraps, then the whole dim
        shift = tl.where(w >= N, N, tl.where(w + E < 0, -N, 0))
        lo = w - shift
        hi = w + E - shift
        wraps = (lo < 0) | (hi >= N)
        lo = tl.where(wraps, 0, lo)
        hi = tl.where(wraps, N - 1, hi)
    else:
        lo = tl.maximum(w, 0)
        hi = tl.minimum(w + E, N - 1)
    return w, lo, hi


@triton.jit
def _m_range(w_lo, w_hi, N):
    """The wraps ``m`` (``w = u + m·n``) that a window ``[w_lo, w_hi] ⊂ [−n, 2n)`` meets: ``m_lo..m_hi``."""
    m_lo = tl.where(w_lo < 0, -1, tl.where(w_lo >= N, 1, 0))
    m_hi = tl.where(w_hi >= N, 1, tl.where(w_hi < 0, -1, 0))
    return m_lo, m_hi


@triton.jit
def _off_taps(qa, qb, Km1):
    """Sign bits of one dim's tap test as a (rows × cols) tensor: ``t = qa[col] − qb[row]`` exists iff
    ``t ≥ 0`` and ``(k − 1) − t ≥ 0``, i.e. iff ``t | ((k − 1) − t)`` is ≥ 0 (OR-ed with the other
    dims' tests, one compare per entry decides all of them)."""
    return (qa[None, :] - qb[:, None]) | ((qb + Km1)[:, None] - qa[None, :])


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


# geometry arguments whose values gain nothing from Triton's ==1 / divisible-by-16
# specialization (every per-entry quantity is a difference of 1-D maps): one compiled kernel
# serves every geometry of a dtype / padding mode. n_cols stays specialized (a multiple of 16
# lets the stores of T's rows vectorize), and so do the pointers.
_FWD_GEOMETRY = ("n_rows", "sw0", "sw1", "sw2", "sw3", "sw4", "Og", "Cg", "P_out", "P_in", "O1", "O2",
                 "N0", "N1", "N2", "K0", "K1", "K2", "S0", "S1", "S2", "PD0", "PD1", "PD2", "DL0", "DL1", "DL2")


@triton.jit(do_not_specialize=_FWD_GEOMETRY)
def _conv_matrix_fwd_kernel(W, T, n_rows, n_cols,
                            sw0, sw1, sw2, sw3, sw4,
                            Og, Cg, P_out, P_in,
                            O1, O2, N0, N1, N2, K0, K1, K2,
                            S0, S1, S2, PD0, PD1, PD2, DL0, DL1, DL2,
                            CIRCULAR: tl.constexpr, DILATED: tl.constexpr, FIRST_DIM: tl.constexpr,
                            IDX: tl.constexpr, COLS_ON_AXIS0: tl.constexpr,
                            ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One ``BLOCK_R × BLOCK_C`` tile of ``T`` from the inverse index map (module docstring).

    Every entry of the tile is written (zeros included), so ``T`` needs no zero fill. A tile
    that no tap of its rows reaches is stored as zeros without computing taps. Otherwise the
    index maps are 1-D (per row, per column) and each entry costs a few integer differences
    and compares. Colliding circular taps are summed in ``ACC_DTYPE`` and rounded once.
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
    t_ptr = (T + rows.to(tl.int64) * n_cols)[:, None] + cols[None, :]
    mask = mask_r[:, None] & mask_c[None, :]

    # rows (1-D): filter o, its group, output position y per dim. Out-of-range lanes are
    # clamped to row 0 (every // and % sees non-negative operands) and masked by the key.
    rows_s = tl.where(mask_r, rows, 0).to(IDX)
    o, y = _divmod(rows_s, P_out)
    y0, y1, y2 = _split3(y, O1, O2)
    g_o, _ = _divmod(o, Og)
    # dims below FIRST_DIM are trivial (n = k = out = 1, p = 0): y = u = t = 0 there
    E2 = (K2 - 1).to(IDX) * DL2
    w2, lo2, hi2 = _window(y2, S2, PD2, E2, N2, CIRCULAR)
    if FIRST_DIM <= 1:
        E1 = (K1 - 1).to(IDX) * DL1
        w1, lo1, hi1 = _window(y1, S1, PD1, E1, N1, CIRCULAR)
    else:
        w1, lo1, hi1 = y1 * 0, y1 * 0, y1 * 0
    if FIRST_DIM == 0:
        E0 = (K0 - 1).to(IDX) * DL0
        w0, lo0, hi0 = _window(y0, S0, PD0, E0, N0, CIRCULAR)
    else:
        w0, lo0, hi0 = y0 * 0, y0 * 0, y0 * 0

    # Skip test: a row reads, within each channel of its group, input positions whose flat
    # index lies in [f_lo, f_hi] (row-major order is monotone in each coordinate). The tile
    # is live iff some row's group columns meet the tile's column range at such a position.
    f_lo = (lo0 * N1 + lo1) * N2 + lo2
    f_hi = (hi0 * N1 + hi1) * N2 + hi2
    col_lo = pid_c * BLOCK_C
    col_hi = tl.minimum(col_lo + BLOCK_C, n_cols) - 1
    group_cols = Cg.to(IDX) * P_in
    a = tl.maximum(g_o * group_cols, col_lo)
    b = tl.minimum(g_o * group_cols + group_cols - 1, col_hi)
    # a is the tile's first column or a group's first (position 0); b its last or a group's last
    _, pa0 = _divmod(col_lo, P_in)
    _, pb0 = _divmod(col_hi, P_in)
    pa = tl.where(a == col_lo, pa0, 0)
    pb = tl.where(b == col_hi, pb0, P_in - 1)
    meets = tl.where(b - a + 1 >= P_in, True,
                     tl.where(pa <= pb, (f_lo <= pb) & (f_hi >= pa), (f_hi >= pa) | (f_lo <= pb)))
    live = mask_r & (a <= b) & meets & (lo0 <= hi0) & (lo1 <= hi1) & (lo2 <= hi2)
    if tl.max(live.to(tl.int32), axis=0) == 0:
        tl.store(t_ptr, tl.zeros((BLOCK_R, BLOCK_C), dtype=T.dtype.element_ty), mask=mask)
    else:
        # Tap of dim i for entry (row, col): dil·t = A − B with A = u + p (+ (m + 1)·n, circular)
        # per column and B = y·s (+ n) per row, both ≥ 0; so dil | A − B iff A % dil == B % dil,
        # and then t = A // dil − B // dil. The weight offset o·sw0 + c'·sw1 + Σ t_i·sw_i is
        # likewise a column term minus a row term.
        if CIRCULAR:
            qb2, rb2 = _quot(w2 + PD2 + N2, DL2, DILATED)
            qb1, rb1 = _quot(w1 + PD1 + N1, DL1, DILATED)
            qb0, rb0 = _quot(w0 + PD0 + N0, DL0, DILATED)
        else:
            qb2, rb2 = _quot(w2 + PD2, DL2, DILATED)
            qb1, rb1 = _quot(w1 + PD1, DL1, DILATED)
            qb0, rb0 = _quot(w0 + PD0, DL0, DILATED)
        row_term = (qb0 * sw2 + qb1 * sw3 + qb2 * sw4) - o * sw0
        row_key = tl.where(mask_r, g_o, -1)
        row_rem = (rb0 * DL1 + rb1) * DL2 + rb2

        cols_s = tl.where(mask_c, cols, 0).to(IDX)
        c, u = _divmod(cols_s, P_in)
        u0, u1, u2 = _split3(u, N1, N2)
        g_c, c_in_group = _divmod(c, Cg)
        col_key = tl.where(mask_c, g_c, -2)           # never a row's key: masked columns read nothing
        col_base = c_in_group * sw1
        # c in o's group iff the key difference is 0, iff d | −d ≥ 0
        off_group = (col_key[None, :] - row_key[:, None]) | (row_key[:, None] - col_key[None, :])
        K2m1 = K2 - 1
        K1m1 = K1 - 1
        K0m1 = K0 - 1

        if CIRCULAR:
            # unwrapped w_i = u_i + m_i·n_i: only the wraps m_i the tile's windows meet (run time)
            m0_lo, m0_hi = _m_range(tl.min(w0, axis=0), tl.max(w0, axis=0) + E0, N0) if FIRST_DIM == 0 else (0, 0)
            m1_lo, m1_hi = _m_range(tl.min(w1, axis=0), tl.max(w1, axis=0) + E1, N1) if FIRST_DIM <= 1 else (0, 0)
            m2_lo, m2_hi = _m_range(tl.min(w2, axis=0), tl.max(w2, axis=0) + E2, N2)
            acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)
            for m0 in range(m0_lo, m0_hi + 1):
                qa0, ra0 = _quot(u0 + PD0 + (m0 + 1) * N0, DL0, DILATED)
                for m1 in range(m1_lo, m1_hi + 1):
                    qa1, ra1 = _quot(u1 + PD1 + (m1 + 1) * N1, DL1, DILATED)
                    for m2 in range(m2_lo, m2_hi + 1):
                        qa2, ra2 = _quot(u2 + PD2 + (m2 + 1) * N2, DL2, DILATED)
                        bad = off_group | _off_taps(qa2, qb2, K2m1)
                        if FIRST_DIM <= 1:
                            bad = bad | _off_taps(qa1, qb1, K1m1)
                        if FIRST_DIM == 0:
                            bad = bad | _off_taps(qa0, qb0, K0m1)
                        if DILATED:  # dil | A − B in every dim iff the packed remainders agree
                            col_rem = (ra0 * DL1 + ra1) * DL2 + ra2
                            bad = bad | (col_rem[None, :] - row_rem[:, None]) | (row_rem[:, None] - col_rem[None, :])
                        ok = bad >= 0
                        col_term = col_base + qa0 * sw2 + qa1 * sw3 + qa2 * sw4
                        acc += tl.load(W + (col_term[None, :] - row_term[:, None]), mask=ok,
                                       other=0.0).to(ACC_DTYPE)
            val = _round_to(acc, T.dtype.element_ty)
        else:
            # zeros: the only candidate is w = u (positions in the padding have no column), so
            # each entry is a plain copy of one weight or 0
            qa2, ra2 = _quot(u2 + PD2, DL2, DILATED)
            qa1, ra1 = _quot(u1 + PD1, DL1, DILATED)
            qa0, ra0 = _quot(u0 + PD0, DL0, DILATED)
            bad = off_group | _off_taps(qa2, qb2, K2m1)
            if FIRST_DIM <= 1:
                bad = bad | _off_taps(qa1, qb1, K1m1)
            if FIRST_DIM == 0:
                bad = bad | _off_taps(qa0, qb0, K0m1)
            if DILATED:  # dil | A − B in every dim iff the packed remainders agree
                col_rem = (ra0 * DL1 + ra1) * DL2 + ra2
                bad = bad | (col_rem[None, :] - row_rem[:, None]) | (row_rem[:, None] - col_rem[None, :])
            ok = bad >= 0
            col_term = col_base + qa0 * sw2 + qa1 * sw3 + qa2 * sw4
            val = tl.load(W + (col_term[None, :] - row_term[:, None]), mask=ok, other=0.0)
        tl.store(t_ptr, val, mask=mask)


# The backward's geometry arguments likewise; gs1 stays specialized (a contiguous grad has
# gs1 == 1, which removes a multiply per gathered element).
_BWD_GEOMETRY = ("gs0", "Og", "Cg", "P_out", "P_in", "K", "O1", "O2", "N0", "N1", "N2", "K1", "K2",
                 "S0", "S1", "S2", "PD0", "PD1", "PD2", "DL0", "DL1", "DL2")


@triton.jit(do_not_specialize=_BWD_GEOMETRY)
def _conv_matrix_bwd_kernel(G, GW, gs0, gs1,
                            Og, Cg, P_out, P_in, K,
                            O1, O2, N0, N1, N2, K1, K2,
                            S0, S1, S2, PD0, PD1, PD2, DL0, DL1, DL2,
                            CIRCULAR: tl.constexpr, IDX: tl.constexpr, ACC_DTYPE: tl.constexpr,
                            BLOCK_Y: tl.constexpr, BLOCK_T: tl.constexpr):
    """``gW[o, c', t] = Σ_y [tap valid] grad[row(o, y), col(o, c', y, t)]`` for one ``(o, c')``
    and one block of taps.

    Program ``(o·Cg + c', tap block)`` owns its ``BLOCK_T`` weight entries: each is a sum
    over the ``P_out`` output positions, taken in blocks of ``BLOCK_Y`` in a fixed order
    (deterministic, no atomics), accumulated in ``ACC_DTYPE``. The (o, c') block of ``grad``
    is addressed from one 64-bit base; offsets inside it are ``IDX``.
    """
    pid = tl.program_id(0)
    o, c_local = _divmod(pid, Cg)
    grp, _ = _divmod(o, Og)
    c_glob = grp * Cg + c_local
    g_block = G + o.to(tl.int64) * P_out * gs0 + c_glob.to(tl.int64) * P_in * gs1

    taps = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = taps < K
    t0, t1, t2 = _split3(tl.where(mask_t, taps, 0).to(IDX), K1, K2)
    # tap part of the unwrapped position w_i = y_i s_i − p_i + t_i dil_i (1-D)
    tw0 = t0 * DL0
    tw1 = t1 * DL1
    tw2 = t2 * DL2

    acc = tl.zeros((BLOCK_T,), dtype=ACC_DTYPE)
    for yb in range(0, P_out, BLOCK_Y):
        ys = yb + tl.arange(0, BLOCK_Y)
        mask_y = ys < P_out
        ys_s = tl.where(mask_y, ys, 0).to(IDX)
        y0, y1, y2 = _split3(ys_s, O1, O2)
        # the forward map, then wrap or clip per dim
        u0, ok0 = _wrap((y0 * S0 - PD0)[:, None] + tw0[None, :], N0, CIRCULAR)
        u1, ok1 = _wrap((y1 * S1 - PD1)[:, None] + tw1[None, :], N1, CIRCULAR)
        u2, ok2 = _wrap((y2 * S2 - PD2)[:, None] + tw2[None, :], N2, CIRCULAR)
        ok = ok0 & ok1 & ok2 & mask_y[:, None] & mask_t[None, :]
        # zero-padding taps outside the input form out-of-range columns: masked, never read
        off = (ys_s * gs0)[:, None] + ((u0 * N1 + u1) * N2 + u2) * gs1
        vals = tl.load(g_block + off, mask=ok, other=0.0)
        acc += tl.sum(vals.to(ACC_DTYPE), axis=0)
    tl.store(GW + pid.to(tl.int64) * K + taps, _round_to(acc, GW.dtype.element_ty), mask=mask_t)


# Static limits on sm_90 (python -m regkernels.bench.gpu_static, docs/design.md#gpu-static-report):
# the defaults, no spills and ≥ 25 % occupancy, for both kernels and both padding modes.
GPU_BUDGETS = {
    "_conv_matrix_fwd_kernel": Budget(),
    "_conv_matrix_bwd_kernel": Budget(),
}


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


def _first_dim(input_size, kernel, out_size, padding) -> int:
    """Number of leading trivial dims (``n = k = out = 1``, ``p = 0``: every index is 0 there), at most 2:
    a 1-D / 2-D convolution's padded dims cost the kernels nothing."""
    first = 0
    while first < 2 and input_size[first] == kernel[first] == out_size[first] == 1 and padding[first] == 0:
        first += 1
    return first


def _index_dtype(*bounds: int):
    """``tl.int32`` when every index quantity of a launch is below 2³¹ (its bound listed), else ``tl.int64``."""
    return tl.int32 if max(bounds) <= _INT32_MAX else tl.int64


def _fwd_index_bound(weight: torch.Tensor, input_size, out_size, stride, padding, dilation, circular: bool) -> int:
    """Largest magnitude of the forward kernel's 1-D index maps and weight-offset terms."""
    kernel = weight.shape[2:]
    sw = [abs(x) for x in weight.stride()]
    col_a = [n - 1 + p + (2 * n if circular else 0) for n, p in zip(input_size, padding)]
    row_b = [(o - 1) * s + (n if circular else 0) + (k - 1) * d + p
             for o, s, n, k, d, p in zip(out_size, stride, input_size, kernel, dilation, padding)]
    col_term = (weight.shape[1] - 1) * sw[1] + sum(a // d * x for a, d, x in zip(col_a, dilation, sw[2:]))
    row_term = (weight.shape[0] - 1) * sw[0] + sum(b // d * x for b, d, x in zip(row_b, dilation, sw[2:]))
    return max(*col_a, *row_b, col_term + row_term, math.prod(dilation), math.prod(input_size))


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
    block_r = BLOCK_R_CIRCULAR if circular else BLOCK_R
    n_rt, n_ct = triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, BLOCK_C)
    cols_first = n_ct > n_rt
    grid = (n_ct, n_rt) if cols_first else (n_rt, n_ct)
    if grid[1] > _GRID_YZ_MAX:
        raise ValueError(f"conv_to_matrix_dense: T of shape {(n_rows, n_cols)} needs a {grid} tile grid, "
                         f"over the {_GRID_YZ_MAX} limit of grid axis 1")
    first = _first_dim(input_size, w.shape[2:], out_size, padding)
    idx = _index_dtype(_fwd_index_bound(w, input_size, out_size, stride, padding, dilation, circular))
    with on_device(w):
        _conv_matrix_fwd_kernel[grid](
            w, T, n_rows, n_cols, *w.stride(), og, cg, p_out, p_in,
            out_size[1], out_size[2], *input_size, *w.shape[2:],
            *stride, *padding, *dilation,
            CIRCULAR=bool(circular), DILATED=any(d > 1 for d in dilation), FIRST_DIM=first, IDX=idx,
            COLS_ON_AXIS0=cols_first, ACC_DTYPE=_acc_dtype(weight.dtype),
            BLOCK_R=block_r, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
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
    # offsets inside one (o, c') block of grad, and the unwrapped positions y·s − p + t·dil
    in_block = (p_out - 1) * abs(grad.stride(0)) + (p_in - 1) * abs(grad.stride(1))
    reach = [(o - 1) * s + p + (kk - 1) * d + n for o, s, p, kk, d, n
             in zip(out_size, stride, padding, weight.shape[2:], dilation, input_size)]
    idx = _index_dtype(in_block, *reach, k)
    with on_device(grad):
        _conv_matrix_bwd_kernel[grid](
            grad, gw, grad.stride(0), grad.stride(1), og, cg, p_out, p_in, k,
            out_size[1], out_size[2], *input_size, *weight.shape[3:],
            *stride, *padding, *dilation,
            CIRCULAR=bool(circular), IDX=idx, ACC_DTYPE=_acc_dtype(weight.dtype),
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
