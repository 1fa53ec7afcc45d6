"""Grouped Triton kernels for the Gram-matrix penalties (docs/gram.md): frame, diversity,
orthogonality and MHE values and gradients for a whole list of matrices in a fixed number
of launches per pass.

Every kernel works on the "rows" Gram ``V = X Xᵀ`` of a ``p × n`` matrix ``X``. The "cols"
Gram ``Wᵀ W`` of ``W (m, n)`` is the rows Gram of ``X = Wᵀ`` (``p = n`` rows of length
``m``): the launchers pass ``W``'s strides swapped, for the input and for ``dW`` alike,
so nothing is transposed in memory. MHE with ``half`` (the ``2m`` rows ``[W; −W]``) works on
W's own ``m × m`` Gram: the pairs of ``±w_i, ±w_j`` are the entries ``±cos_ij`` of W's tile, so
the epilogue sums both signs (``_mhe_terms``); nothing is concatenated.

Design (flash-attention style, no Gram array reaches memory in the forward). A program owns
one row block ``I`` of one matrix (a "tile") and one split ``s`` of its column blocks ``J``: the
grid is ``(tiles, splits)`` and split ``s`` covers ``J ∈ [s·jps, (s+1)·jps)``. The host picks
``splits ≈ max(1, ceil(TARGET_PROGRAMS / tiles))``, capped by the largest matrix's number of
column blocks (``jps`` = blocks per split, one value for the call), so that a single layer
still fills a GPU (W (256, 2304) alone is 8 row blocks). Each Gram tile ``V[I, J]`` is built
in registers (fp32 accumulator, loop over the inner dimension) and consumed at once.

* forward: program ``(tile, s)`` reduces its tiles by the kind's epilogue into per-row partial
  sums, stored per split (a buffer of ``splits`` copies of the stats layout). A finalize
  kernel (one program per matrix) adds the splits in a fixed order (s = 0, 1, …; no
  atomics), writes the complete row sums to the stats and computes the value (frame's
  hinges need the complete ``r_i``, so they are applied there).
* backward: ``dX = P X`` with ``P = S + Sᵀ``, ``S = ∂R/∂V``, each tile of P recomputed from its
  Gram tile. The diagonal terms of ``P`` that come from row norms (diversity, MHE) need full
  row sums over ``j``; the forward stores them (``t_i``, ``u_i``) so that no split needs
  another's tiles. Two paths, chosen per call:
  - P path (every Gram side ``p ≤ P_MAX_SIDE``, p² floats ≤ 4 MiB per matrix): program
    ``(tile, s)`` stores ``grad·P[I, J]`` (row-norm diagonal included) into a ``Σ B·p²`` float32
    buffer, each entry written once; a grouped product kernel (one program per dX row block ×
    column block) forms ``P[I, :] X[:, T]`` with one fp32 accumulator and writes the gradient
    once, in the inputs' dtype. No zero fill, no read-modify-write.
  - split path (some larger p: no ``p × p`` array): program ``(tile, s)`` accumulates
    ``P[I, J] X[J, :]`` in fp32 by read-modify-write of rows ``I`` of its own dX slice, a
    zero-filled ``(splits, |dX|)`` partial buffer whose size SPLIT_MAX_BYTES caps (fewer
    backward splits), summed afterwards in a fixed order (or dX itself for one float32
    split); split 0 alone adds ``P_ii x_i``, before its tiles.
  Both are deterministic (no atomics). In the interpreter, one column block per split gives
  the same floats as one split; compiled code may fuse a read-modify-write into the dot's
  accumulation, so on a GPU the split count changes the last bits.
* grouped: all matrices of a call form one problem table (like a grouped GEMM): a group
  per input tensor (its ``B`` matrices share shape and strides), read through a device table
  of the inputs' data pointers (any strides, expanded views, no copy); tile tables mapping
  ``program_id(0) → (group, matrix, row block)`` (and ``(…, column block)`` for the product),
  ordered by descending work so that the largest tiles start first; a matrix table
  ``q → (group, matrix)`` for the finalize. Block sizes are shared; masks handle edges.
* layout classes: each launch has a constexpr LAYOUT (``LAYOUT_*``: unit stride along the
  inner index, unit stride along the Gram index, or generic strides) and ALIGN (16-byte
  alignment promised by the host), so unit-stride loads are coalesced and vectorizable; a
  call that mixes classes launches once per class, at most two.
* host work: the plan (tables, splits, the backward's path) lives on the device, cached by
  kind, sides and every input's shape, strides, dtype and device (``_plan``); a cached call
  launches without building, copying or reading anything on the host, and rewrites only the
  pointer table, from pinned memory without blocking, when an input's storage moved. The
  backward finds the forward's plan under the same key.

Launches per call, whatever the number of matrices, per layout class: forward 2 (row norms
over tiles, Gram partials over tiles × splits), then 1 finalize over matrices; backward 2 (P
path: coefficients over tiles × splits, P·X over row × column blocks) or 1 (split path,
tiles × splits) plus, for the split path with several splits or a half-precision output, 1
split reduction. Extra memory: forward ``splits × |stats|``; backward ``Σ B·p²`` (P path) or
``min(splits, SPLIT_MAX_BYTES / 4|dX|) × |dX|`` floats (split path).

Stats layout (float32, returned by the forward and passed back to the backward): matrix
``b`` of group ``g`` owns ``R·p`` floats at ``stats_offset[g] + R·p·b`` (``R = 3`` for MHE, else
2): first the squared row norms ``‖x_i‖²`` (``p``), then the kind's row sums (``p`` each):
frame ``r_i = Σ_{j≠i}|V_ij|``; diversity ``t_i = Σ_{j≠i} mask_ij·C_ij²`` (R = ½Σt_i);
orthogonality ``(V_ii − 1)² + 2Σ_{j>i} V_ij²`` (upper triangle, R = Σ); MHE
``E_i = Σ_{j≠i} e_ij`` (R = ½ΣE_i / #pairs), then ``u_i = Σ_{j≠i} h_ij cos_ij`` with
``h = ∂e/∂cos / #pairs`` (with half, sums over the 2m rows of W's row i, p = m).
All but orthogonality are full rows. Groups follow list order.

Precision: everything is computed in float32 from inputs of any of float16 / bfloat16 /
float32. On a GPU the products run on tensor cores: the Gram tiles as bf16/fp16 MMAs on the
inputs (exact products, float32 accumulation), float32 inputs at ``FP32_DOT`` ("tf32x3", about
float32 accuracy, or "ieee" on request); the backward's ``P·X`` has a float32 ``P``, so it is
a float32 product: on the P path split tf32 products (``_dot_split_tf32``: 2 for bf16/fp16
inputs, 3 for float32), on the split path "tf32x3", or "bf16x3" for bf16/fp16 inputs (2–8e-6
relative error, far under their own rounding, where ``P`` rounded to bf16 would double a bf16
gradient's error; ``_accumulate_rows``). The launch constexprs come from ``tile_config``.
Divisions and square roots that decide a threshold or feed δ = 2 − 2cos are
correctly rounded (``tl.div_rn`` / ``tl.sqrt_rn``; Triton's ``/`` and ``tl.sqrt`` are the
approximate ``div.full.f32`` / ``sqrt.approx.ftz.f32`` on a GPU). The CPU interpreter runs
the same helpers with float32 numpy products (``tile_config``).
Not importable without Triton: import
this module only after ``regkernels._ext.has_triton()``.

Order: kernels → host launchers → the torch.library custom ops ``regkernels::gram_penalty_triton``
(values and stats) and ``regkernels::gram_penalty_triton_bwd`` (one flat gradient buffer, split
into views by its callers) with fakes and autograd → the torch.func path → the entry functions
of the gram TABLE's "triton" rows (docs/gram.md).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from regkernels import _ext
from regkernels import _gram_kernels as GK
from regkernels._numerics import functorch_wrapped
from regkernels.composite import gram as _composite
from regkernels.reference import gram as R
from regkernels.triton._launch import Budget, on_device

# ----------------------------------------------------------------------------- constants

KINDS = ("frame", "diversity", "orthogonality", "mhe")
_FRAME = tl.constexpr(0)
_DIVERSITY = tl.constexpr(1)
_ORTHOGONALITY = tl.constexpr(2)
_MHE = tl.constexpr(3)
_KIND_ID = {"frame": 0, "diversity": 1, "orthogonality": 2, "mhe": 3}
_N_PARAMS = {"frame": 2, "diversity": 2, "orthogonality": 0, "mhe": 4}

# Tile shapes, shared by all problems of a launch (tl.dot needs every dim ≥ 16). On a GPU the
# Gram tile is 64 × 64 (one warpgroup MMA per 64 rows) over 8 warps, the inner chunk 16.
# Registers per thread of the real kernels (python -m regkernels.bench.gpu_static, sm_90,
# no spills): forward 64–162 (bf16/fp16) and 110–184 (float32, tf32x3), coefficients
# 126–206 / 189–199, split backward 164–176 / 240–248; so 1–2 programs of 8 warps per SM
# (12.5–25 % occupancy, GPU_BUDGETS). Tried on the same kernels: 4 warps on 64 × 64 224–255
# registers with spills in the backward; 32 × 32 × 32 tiles over 4 warps 255 with spills for
# float32; BLOCK_K = 32 spills in the float32 backward (the probes). Float32 runs 1 stage: the
# second stage's buffers cost the split backward 168 B of spills and the others 10–30
# registers. Under the CPU interpreter (TRITON_INTERPRET=1) every block is 32, which keeps
# the test shapes quick; the index math is the same code. Larger BLOCK_J means fewer column
# blocks, hence fewer possible splits (TARGET_PROGRAMS).
GPU_BLOCK_I = 64      # Gram rows owned by one program
GPU_BLOCK_J = 64      # Gram columns per inner step
GPU_BLOCK_K = 16      # inner-dimension chunk (columns of X)
GPU_NUM_WARPS = 8
GPU_NUM_STAGES = 2    # bfloat16 / float16 inputs
GPU_NUM_STAGES_FP32 = 1
BLOCK_I = 32          # the same three under the interpreter
BLOCK_J = 32
BLOCK_K = 32
# The backward's P·X product (_gram_product_kernel), GPU and interpreter alike: dX rows and
# columns per program, P columns per inner step.
PRODUCT_BLOCK_I = 32
PRODUCT_BLOCK_J = 32
BLOCK_N = 32
BLOCK_FIN = 32        # rows per step of the finalize kernel (one program per matrix)
BLOCK_RED = 1024      # dX elements per program of the backward's split reduction

# Programs to aim for per Gram launch: the column-block loop of each (matrix, row block) is
# split into ``splits ≈ max(1, ceil(TARGET_PROGRAMS / tiles))`` parts (capped by the number
# of column blocks), so that one layer alone (W (256, 2304): 8 row blocks) still fills a GPU.
# ~2 programs per SM of an H100 (132 SMs); tuning would weigh it against the partial buffers'
# traffic (backward: splits × the size of dX).
TARGET_PROGRAMS = 256

# Backward path: with every Gram side p ≤ P_MAX_SIDE (p² floats ≤ 4 MiB per matrix) the
# coefficients P = S + Sᵀ are stored (Σ B·p² floats) and dX = P·X is one grouped product; a
# larger p keeps the split scheme (no k×k array), its splits × |dX| float32 partials capped at
# SPLIT_MAX_BYTES. Tests lower them to force either path.
P_MAX_SIDE = 1024
SPLIT_MAX_BYTES = 64 * 2**20

# The P·X product multiplies the float32 P by X upcast to float32 on tf32 tensor cores with
# split operands (_dot_split_tf32: about float32 accuracy; the interpreter computes in float32).
PRODUCT_WARPS = 8

# Tensor-core precision of the float32 products (module docstring, "Precision"): "tf32x3"
# (three TF32 MMAs, the split-operand trick: about float32 accuracy) or "ieee" (exact float32
# FMA, no tensor cores; several times slower). Read per launch by ``tile_config``.
FP32_DOT = "tf32x3"


def tile_config(dtype: torch.dtype, interpreted: bool) -> dict:
    """The constexpr meta-parameters and launch options of the Gram kernels for inputs of
    ``dtype``: block sizes, ``NATIVE_DOT`` (tl.dot on the loaded dtype: bf16/fp16 tensor
    cores; False under the interpreter, whose dot reads bfloat16 as integers, so operands are
    upcast to float32 there) and ``DOT_PRECISION`` (``FP32_DOT`` on a GPU; "ieee" interpreted,
    where numpy's float32 product is what runs anyway), and on a GPU ``num_warps`` /
    ``num_stages`` (1 for float32). ``interpreted``: Triton runs on CPU tensors (``_ext.triton_interpreted()``);
    a static compile for sm_90 passes False.
    """
    if FP32_DOT not in ("tf32x3", "ieee"):
        raise ValueError(f"regkernels.triton.gram.FP32_DOT must be 'tf32x3' or 'ieee'; got {FP32_DOT!r}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gram_penalty: mats must be float16, bfloat16 or float32; got {dtype}")
    if interpreted:
        return dict(BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, BLOCK_K=BLOCK_K, NATIVE_DOT=False, DOT_PRECISION="ieee")
    return dict(BLOCK_I=GPU_BLOCK_I, BLOCK_J=GPU_BLOCK_J, BLOCK_K=GPU_BLOCK_K, NATIVE_DOT=True,
                DOT_PRECISION=FP32_DOT, num_warps=GPU_NUM_WARPS,
                num_stages=GPU_NUM_STAGES_FP32 if dtype == torch.float32 else GPU_NUM_STAGES)


# F.normalize's clamp of the row norm (docs/gram.md#diversity_penalty)
_NORMALIZE_EPS = tl.constexpr(1e-12)

# Columns of the int64 group table (one row per input tensor). Matrix b of group g is read at
# ``PTRS[g] + b·s_b + i·s_r + t·s_c`` (Gram row i, inner index t): PTRS is a device table of the
# inputs' data pointers, so no input is copied or concatenated. The gradient of matrix b is
# written at ``d_off + b·ds_b + i·ds_r + t·ds_c`` of the flat output (the inputs' shapes,
# contiguous, in list order).
_G_XS_B = tl.constexpr(0)     # X stride between matrices of the group
_G_XS_R = tl.constexpr(1)     # X stride along the Gram index i (rows of X)
_G_XS_C = tl.constexpr(2)     # X stride along the inner index t
_G_D_OFF = tl.constexpr(3)    # element offset of matrix 0 in the gradient buffer
_G_DS_B = tl.constexpr(4)     # its strides, as above
_G_DS_R = tl.constexpr(5)
_G_DS_C = tl.constexpr(6)
_G_P = tl.constexpr(7)        # Gram size p (rows of X)
_G_N = tl.constexpr(8)        # inner size n (columns of X)
_G_ST_OFF = tl.constexpr(9)   # stats offset of matrix 0; each matrix takes STATS_ROWS·p floats
_G_VAL_OFF = tl.constexpr(10)  # index of matrix 0 in the values / grad vectors
_G_P_OFF = tl.constexpr(11)   # offset of matrix 0's p×p coefficients in the backward's P buffer
_G_NCOL = tl.constexpr(12)

# Memory layout classes, a constexpr per launch (a call that mixes them launches once per
# class): 1 = unit stride along the inner index t for X and dX alike (the rows side of a
# contiguous W), 2 = unit stride along the Gram index i for both (the cols side), 0 = any
# strides. The loads know the unit stride at compile time (coalesced, vectorizable).
LAYOUT_GENERIC, LAYOUT_INNER_UNIT, LAYOUT_GRAM_UNIT = 0, 1, 2


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _tile_coords(TILES, GROUPS, pid):
    """program_id → (group g, its table row pointer, matrix b within the group, row block ib)."""
    g = tl.load(TILES + 3 * pid)
    b = tl.load(TILES + 3 * pid + 1).to(tl.int64)
    ib = tl.load(TILES + 3 * pid + 2)
    return g, GROUPS + g * _G_NCOL, b, ib


@triton.jit
def _unit_strides(s_r, s_c, LAYOUT: tl.constexpr):
    """The strides with the layout's unit stride as the compile-time constant 1."""
    if LAYOUT == 1:
        s_c = 1
    elif LAYOUT == 2:
        s_r = 1
    return s_r, s_c


@triton.jit
def _matrix_of(PTRS, X, g, grp, b, LAYOUT: tl.constexpr, ALIGN: tl.constexpr):
    """Matrix ``b`` of group ``g``: (its base pointer, row and column strides, the Gram side p,
    the inner dim n).

    The base is group g's data pointer from the PTRS table, cast to X's element type (X is any
    input of the call: only its dtype is used). ``ALIGN > 1`` (elements per 16 bytes) is the
    host's promise that the base is 16-byte aligned and the batch stride, the non-unit stride
    and the unit-stride extent are multiples of ALIGN: the compiler may then vectorize loads.
    """
    base = tl.load(PTRS + g).to(tl.pointer_type(X.dtype.element_ty), bitcast=True)
    xs_b = tl.load(grp + _G_XS_B)
    xs_r, xs_c = _unit_strides(tl.load(grp + _G_XS_R), tl.load(grp + _G_XS_C), LAYOUT)
    p = tl.load(grp + _G_P)
    n = tl.load(grp + _G_N)
    if ALIGN > 1:
        base = tl.multiple_of(base, 16)
        xs_b = tl.multiple_of(xs_b, ALIGN)
        if LAYOUT == 1:
            xs_r = tl.multiple_of(xs_r, ALIGN)
            n = tl.multiple_of(n, ALIGN)
        elif LAYOUT == 2:
            xs_c = tl.multiple_of(xs_c, ALIGN)
            p = tl.multiple_of(p, ALIGN)
    return base + b * xs_b, xs_r, xs_c, p, n


@triton.jit
def _tile_ptrs(base, rows, ks, s_r, s_c, LAYOUT: tl.constexpr):
    """Pointers of the tile ``[rows, ks]`` (Gram index × inner index) at ``base + i·s_r + t·s_c``.

    LAYOUT 1: unit stride along t (``s_c`` is ignored; the "rows" side of a W whose last
    stride is 1), 2: unit stride along i (``s_r`` ignored; the "cols" side), 0: both strides
    at run time. A stride known to be 1 at compile time is what lets Triton give each warp
    consecutive addresses along that axis (coalesced, vectorised where aligned): strides
    read from the group table are opaque to it.
    """
    if LAYOUT == 1:
        ptrs = base + rows[:, None] * s_r + ks[None, :]
    elif LAYOUT == 2:
        ptrs = base + rows[:, None] + ks[None, :] * s_c
    else:
        ptrs = base + rows[:, None] * s_r + ks[None, :] * s_c
    return ptrs


@triton.jit
def _gram_tile(x_ptr, xs_r, xs_c, rows_i, mask_i, jb, p, n,
               BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
               LAYOUT: tl.constexpr = 0, NATIVE_DOT: tl.constexpr = False,
               DOT_PRECISION: tl.constexpr = "ieee"):
    """``V[I, J] = X[I, :] · X[J, :]ᵀ`` for column block ``jb``, in float32 registers, looping
    over the inner dim; returns ``(V, rows_j, mask_j, valid)`` (``valid``: both indices < p).

    Tensor cores (NATIVE_DOT): bf16/fp16 tiles go to tl.dot as loaded (exact products, fp32
    accumulation); float32 tiles use DOT_PRECISION ("tf32x3" ≈ float32, or "ieee"). Without
    NATIVE_DOT (the interpreter) the tiles are upcast to float32 first. LAYOUT: ``_tile_ptrs``.
    Out-of-range rows and columns load as 0, so edge tiles are exact. The forward and the
    backward call this one helper with the same blocks and constexprs, so a recomputed tile
    is the same number as in the forward (diversity's threshold mask relies on it).
    """
    rows_j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = rows_j < p
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mk = ks < n
        a = tl.load(_tile_ptrs(x_ptr, rows_i, ks, xs_r, xs_c, LAYOUT),
                    mask=mask_i[:, None] & mk[None, :], other=0.0)
        b = tl.load(_tile_ptrs(x_ptr, rows_j, ks, xs_r, xs_c, LAYOUT),
                    mask=mask_j[:, None] & mk[None, :], other=0.0)
        if NATIVE_DOT:
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    return acc, rows_j, mask_j, mask_i[:, None] & mask_j[None, :]



@triton.jit
def _div(a, b):
    """``a / b`` correctly rounded (``div.rn.f32``; Triton's ``/`` is the approximate
    ``div.full.f32``, up to 2 ulp off, on a GPU), broadcasting scalars and Python floats."""
    a, b = tl.broadcast(tl.cast(a, tl.float32), tl.cast(b, tl.float32))
    return tl.div_rn(a, b)


@triton.jit
def _relu(x):
    """``max(x, 0)`` that keeps NaN, as torch.relu (``tl.maximum`` may return 0 for NaN): a NaN
    hinge argument must give a NaN value and gradient (docs/index.md#numerical-behaviour)."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def _sign0(x):
    """``sign(x)`` with ``sign(0) = 0`` (the subgradient of |x|, docs/gram.md#conventions) and ``sign(NaN) = NaN``."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, tl.where(x == 0, 0.0, x)))


@triton.jit
def _normalize_denominator(sq):
    """``q = max(‖x‖, 1e-12)`` from ``sq = ‖x‖²`` (F.normalize), NaN kept. A squared norm that
    overflowed float32 (finite huge rows) leaves the row's cosines undefined (inf/inf, or a
    silent finite/inf = 0): q is NaN there, as in the reference. ``sqrt_rn``: the GPU's
    ``tl.sqrt`` is ``sqrt.approx.ftz`` (flushes subnormal ‖x‖² to 0, ulp-level error), and the
    cosines built on q decide the diversity threshold."""
    q = tl.sqrt_rn(sq)
    q = tl.where(q < _NORMALIZE_EPS, _NORMALIZE_EPS, q)
    return tl.where(q == float("inf"), float("nan"), q)


@triton.jit
def _normalize_clamped(sq):
    """True where F.normalize clamps the row norm (``‖x‖ < 1e-12``): no gradient flows through
    the norm there (torch's clamp_min). The same correctly rounded sqrt as ``_normalize_denominator``."""
    return tl.sqrt_rn(sq) < _NORMALIZE_EPS


@triton.jit
def _diversity_cosine(V, sq_i, sq_j):
    """``C_ij = V_ij / (q_i q_j)``, ``q = max(‖x‖, 1e-12)``: the Gram of the normalised rows;
    returns ``(C, q_i, q_j)``. Correctly rounded (``_div``): the mask ``|C| ≥ tau`` is decided on it."""
    q_i = _normalize_denominator(sq_i)
    q_j = _normalize_denominator(sq_j)
    return _div(V, q_i[:, None] * q_j[None, :]), q_i, q_j


@triton.jit
def _diversity_diag(sq_i, t_i):
    """The row-norm diagonal of diversity's ``P``: ``−2·t_i / q_i²``, 0 where the norm is
    clamped (``_normalize_clamped``), NaN kept."""
    q = _normalize_denominator(sq_i)
    return tl.where(_normalize_clamped(sq_i), 0.0, _div(-2.0 * t_i, q * q))


@triton.jit
def _over_threshold(C, tau, INCLUSIVE: tl.constexpr):
    """DiReAL's mask ``|C_ij| ≥ tau`` (``> tau`` when not inclusive); carries no gradient. The
    callers use it as a 0/1 factor, as the reference's ``C² · mask``: a NaN cosine, for which the
    comparison is false, still gives NaN · 0 = NaN (a ``where`` would drop it). ``C`` must be
    correctly rounded (``_diversity_cosine``) for the decision to match the reference's."""
    if INCLUSIVE:
        keep = tl.abs(C) >= tau
    else:
        keep = tl.abs(C) > tau
    return keep


@triton.jit
def _mhe_nu(sq, eps):
    """``ν = sqrt(‖x‖² + eps)`` (docs/gram.md#mhe_penalty); NaN where ‖x‖² overflowed float32 (finite huge rows):
    cos = V / (ν_i ν_j) would be a silent finite/inf = 0 against every normal row. ``sqrt_rn``:
    δ = 2 − 2cos cancels, so an ulp of ν is many ulps of δ for close rows."""
    nu = tl.sqrt_rn(sq + eps)
    return tl.where(nu == float("inf"), float("nan"), nu)


@triton.jit
def _mhe_cosine(V, nu_i, nu_j):
    """``(cos, ν_i ν_j)`` with ``cos_ij = V_ij / (ν_i ν_j)`` correctly rounded: δ = 2 − 2cos
    cancels for close rows, where the approximate division's ulps would be its leading digits."""
    nn = nu_i[:, None] * nu_j[None, :]
    return _div(V, nn), nn


@triton.jit
def _mhe_delta(cos, off):
    """``δ = 2 − 2cos`` where ``off`` (off-diagonal, valid), 1 elsewhere: no log or division of 0
    happens at masked entries."""
    return tl.where(off, 2.0 - 2.0 * cos, 1.0)


@triton.jit
def _mhe_energy(delta, S: tl.constexpr):
    """``e(δ)``: ``−log δ`` (s=0), ``δ^(−1/2)`` (s=1), ``1/δ`` (s=2) — docs/gram.md#mhe_penalty, unclamped.
    Divisions and roots correctly rounded; ``tl.log`` stays the GPU's fast log (not a threshold)."""
    if S == 0:
        e = -tl.log(delta)
    elif S == 1:
        e = _div(1.0, tl.sqrt_rn(delta))
    else:
        e = _div(1.0, delta)
    return e


@triton.jit
def _mhe_denergy_dcos(delta, S: tl.constexpr):
    """``∂e/∂cos = −2·e′(δ)`` (δ = 2 − 2cos): ``2/δ`` (s=0), ``δ^(−3/2)`` (s=1), ``2/δ²`` (s=2)."""
    if S == 0:
        h = _div(2.0, delta)
    elif S == 1:
        h = _div(1.0, delta * tl.sqrt_rn(delta))
    else:
        h = _div(2.0, delta * delta)
    return h


@triton.jit
def _mhe_diag(sq_i, u_i, eps):
    """The ν-diagonal of MHE's ``P``: ``−u_i / ν_i² = −u_i / (‖x_i‖² + eps)``."""
    return _div(-u_i, sq_i + eps)


@triton.jit
def _inv_pairs(pf):
    """``1 / #pairs = 1 / (p(p − 1)/2)`` (MHE's mean over pairs; p = 1 gives +inf, and 0·inf = NaN
    in the value, as the reference's empty mean)."""
    return _div(1.0, pf * (pf - 1.0) * 0.5)


@triton.jit
def _frame_coefficients(d, r, A, B, pf):
    """``(∂R/∂d_i, ∂R/∂r_i)`` of ``R = (1/p) Σ relu(A − d + r)² + relu(d + r − B)²`` (docs/gram.md#frame_penalty).

    relu(x)² has derivative 2·relu(x), which is 0 at x = 0 as torch's relu′(0) = 0; NaN stays NaN.
    """
    lo = _relu(A - (d - r))
    hi = _relu((d + r) - B)
    return _div(2.0 * (hi - lo), pf), _div(2.0 * (hi + lo), pf)



@triton.jit
def _row_norm_kernel(PTRS, X, GROUPS, TILES, STATS, STATS_ROWS: tl.constexpr, LAYOUT: tl.constexpr,
                     ALIGN: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
    """Squared row norms ``‖x_i‖²`` of one row block into the first ``p`` floats of its stats."""
    g, grp, b, ib = _tile_coords(TILES, GROUPS, tl.program_id(0))
    x_ptr, xs_r, xs_c, p, n = _matrix_of(PTRS, X, g, grp, b, LAYOUT, ALIGN)
    st = STATS + tl.load(grp + _G_ST_OFF) + STATS_ROWS * p * b

    rows = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = rows < p
    acc = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * xs_r + ks[None, :] * xs_c,
                    mask=mask[:, None] & (ks < n)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(st + rows, acc, mask=mask)


@triton.jit
def _split_range(ib, p, JPS, KIND: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Column blocks ``[j_lo, j_hi)`` of split ``program_id(1)``: ``[s·JPS, (s+1)·JPS) ∩ [0, #blocks)``.

    Orthogonality's forward only needs the upper triangle (j ≥ i): blocks left of the
    diagonal block are dropped (a split may end up empty; it then stores zeros).
    """
    s = tl.program_id(1)
    j_lo = s * JPS
    j_hi = tl.minimum(j_lo + JPS, tl.cdiv(p, BLOCK_J))
    if KIND == _ORTHOGONALITY:
        j_lo = tl.maximum(j_lo, (ib * BLOCK_I) // BLOCK_J)
    return s, j_lo, j_hi


@triton.jit
def _mhe_pairs(p, HALF: tl.constexpr):
    """MHE's number of pairs: ``p(p−1)/2`` of the p rows, or of the 2p rows ``[W; −W]`` with half."""
    pf = p.to(tl.float32)
    if HALF:
        pf = 2.0 * pf
    return pf * (pf - 1.0) * 0.5


@triton.jit
def _mhe_terms(V, nu_i, nu_j, valid, ii, jj, inv_pairs, eps, MHE_S: tl.constexpr, HALF: tl.constexpr):
    """MHE per entry of a Gram tile: (energy, u term, coefficient of ``P = S + Sᵀ``).

    cos = V_ij / (ν_i ν_j), δ = 2 − 2cos, h = ∂e/∂cos / #pairs (docs/gram.md#mhe_penalty).
    Without half: energy e(δ), u term h·cos, P_ij = h / (ν_i ν_j), off the diagonal only.
    With half the rows are ``[W; −W]`` but the tile stays W's own: ``±w_i`` and ``±w_j`` form the
    pairs (i, j) and (i+m, j+m) at cos and (i, j+m), (i+m, j) at −cos, and (i, i+m) at
    −‖w_i‖²/ν_i² — the tile's diagonal. So row i's sums over the 2m rows (the same for row i+m)
    are, with h₋ = h(−cos): energy e(δ(cos)) + e(δ(−cos)) (the diagonal only the second), u term
    (h − h₋)·cos, and the gradient ``dW = dX[:m] − dX[m:]`` has P_ij = 2(h − h₋)/(ν_i ν_j), its
    diagonal included. This costs an m×m Gram instead of 2m×2m and reads W in place.
    Masked entries get δ = 1 so no log or division of 0 happens there.
    ``MHE_S`` ≥ 3 is the angular energy of s = MHE_S − 3 (``_mhe_angle_terms``).
    """
    if MHE_S >= 3:
        e, u, coef = _mhe_angle_terms(V, nu_i, nu_j, valid, ii, jj, inv_pairs, eps, MHE_S, HALF)
    else:
        cos, nn = _mhe_cosine(V, nu_i, nu_j)
        off = valid & (ii != jj)
        delta = _mhe_delta(cos, off)
        e = tl.where(off, _mhe_energy(delta, MHE_S), 0.0)
        h = tl.where(off, _mhe_denergy_dcos(delta, MHE_S) * inv_pairs, 0.0)
        if HALF:
            delta_m = _mhe_delta(-cos, valid)
            e += tl.where(valid, _mhe_energy(delta_m, MHE_S), 0.0)
            h = h - tl.where(valid, _mhe_denergy_dcos(delta_m, MHE_S) * inv_pairs, 0.0)
            coef = _div(2.0 * h, nn)
        else:
            coef = _div(h, nn)
        u = h * cos
    return e, u, coef


# asin(x) = x + x·z·Q(z), z = x², on |x| ≤ √½: Q is our degree-7 least-squares fit of
# (asin(√z) − √z)/z^{3/2} at 600 Chebyshev nodes of [0, ½] (float64); evaluated in float32 it is
# within 0.84 ulp of asin (checked on 4·10⁵ points). Triton has no arcsin/arccos that also runs in
# the interpreter (libdevice's do not), so the angular MHE builds them from it and sqrt_rn.
_ASIN_Q0 = tl.constexpr(0.16666665508969986)
_ASIN_Q1 = tl.constexpr(0.07500286501987112)
_ASIN_Q2 = tl.constexpr(0.04452752583008384)
_ASIN_Q3 = tl.constexpr(0.03212865583901611)
_ASIN_Q4 = tl.constexpr(0.009630247127991853)
_ASIN_Q5 = tl.constexpr(0.06619364170838671)
_ASIN_Q6 = tl.constexpr(-0.08325054045995343)
_ASIN_Q7 = tl.constexpr(0.09673605547762548)
_INV_PI = tl.constexpr(0.3183098861837907)


@triton.jit
def _asin(x):
    """asin(x) for 0 ≤ x ≤ √½."""
    z = x * x
    q = z * _ASIN_Q7 + _ASIN_Q6
    q = q * z + _ASIN_Q5
    q = q * z + _ASIN_Q4
    q = q * z + _ASIN_Q3
    q = q * z + _ASIN_Q2
    q = q * z + _ASIN_Q1
    q = q * z + _ASIN_Q0
    return x + x * z * q


@triton.jit
def _mhe_angles(c):
    """``(arccos(c)/π, arccos(−c)/π, 1/(π·sqrt((1 − c)(1 + c))))`` for c in [−1, 1] from one asin:
    with ``t₋ = sqrt((1 − c)/2)``, ``t₊ = sqrt((1 + c)/2)`` (``t₋² + t₊² = 1``), the smaller of the two
    angles is ``2·asin(min(t₋, t₊))`` (its argument ≤ √½) and the other is π minus it, so both keep
    their relative accuracy; ``sqrt(1 − c²) = 2·t₋·t₊``. NaN passes."""
    t_minus = tl.sqrt_rn(0.5 * (1.0 - c))
    t_plus = tl.sqrt_rn(0.5 * (1.0 + c))
    small = _asin(tl.minimum(t_minus, t_plus)) * (2.0 * _INV_PI)
    pos = c >= 0.0
    a = tl.where(pos, small, 1.0 - small)
    a_neg = tl.where(pos, 1.0 - small, small)
    return a, a_neg, _div(0.5 * _INV_PI, t_minus * t_plus)


@triton.jit
def _mhe_angle_energy(a, MHE_S: tl.constexpr):
    """``(e(a), de/da)``: ``−log a`` (s=0), ``1/a`` (s=1), ``1/a²`` (s=2), s = MHE_S − 3
    (docs/gram.md#angular-energies)."""
    inv = _div(1.0, a)
    if MHE_S == 3:
        e = -tl.log(a)
        de = -inv
    elif MHE_S == 4:
        e = inv
        de = -(inv * inv)
    else:
        e = inv * inv
        de = -2.0 * (inv * inv * inv)
    return e, de


@triton.jit
def _mhe_antipodal(nu, eps, MHE_S: tl.constexpr):
    """The pair ``(w, −w)`` of half MHE, angular, per row: ``(e, ∂e/∂‖w‖²)``. ``1 + cos = eps/ν²``
    exactly, so ``a = 1 − (2/π)·asin(z) + eps`` with ``z = sqrt(eps/(2ν²))`` ≤ √½, and
    ``da/d‖w‖² = z / (π ν² sqrt(1 − z²))`` (through cos it would be arccos at −1 within rounding)."""
    nu2 = nu * nu
    z = tl.sqrt_rn(_div(eps, 2.0 * nu2))
    a = 1.0 - _asin(z) * (2.0 * _INV_PI) + eps
    e, de = _mhe_angle_energy(a, MHE_S)
    return e, de * _div(z * _INV_PI, nu2 * tl.sqrt_rn(1.0 - z * z))


@triton.jit
def _mhe_angle_terms(V, nu_i, nu_j, valid, ii, jj, inv_pairs, eps, MHE_S: tl.constexpr, HALF: tl.constexpr):
    """``_mhe_terms`` for the angular energies (docs/gram.md#angular-energies): the pairs off the
    diagonal as there, with ``e(a(±cos))``, ``a(c) = arccos(c)/π + eps`` (cos rounded into
    [−1, 1]; ``da/dcos = −1/(π sqrt(1 − cos²))``, infinite at ±1 as the reference's); with half the
    diagonal holds the antipodal pair ``(w_i, −w_i)`` from ν_i alone (``_mhe_antipodal``): energy e
    once in row i's sum, no u term, and ``P_ii = 2·∂R/∂V_ii``."""
    cos, nn = _mhe_cosine(V, nu_i, nu_j)
    off = valid & (ii != jj)
    c = tl.minimum(tl.maximum(tl.where(off, cos, 0.0), -1.0), 1.0)
    a, a_neg, k = _mhe_angles(c)
    e, de = _mhe_angle_energy(a + eps, MHE_S)
    if HALF:
        e_neg, de_neg = _mhe_angle_energy(a_neg + eps, MHE_S)
        e += e_neg
        h = tl.where(off, (de_neg - de) * k * inv_pairs, 0.0)
        e_self, g_self = _mhe_antipodal(nu_i, eps, MHE_S)
        on_diag = valid & (ii == jj)
        e = tl.where(on_diag, e_self[:, None], tl.where(off, e, 0.0))
        coef = tl.where(on_diag, 2.0 * (g_self * inv_pairs)[:, None], _div(2.0 * h, nn))
    else:
        h = tl.where(off, -de * k * inv_pairs, 0.0)
        e = tl.where(off, e, 0.0)
        coef = _div(h, nn)
    return e, h * cos, coef


@triton.jit
def _gram_fwd_kernel(PTRS, X, GROUPS, TILES, STATS, PART, PART_STRIDE, JPS, A, B, tau, eps,
                     KIND: tl.constexpr, INCLUSIVE: tl.constexpr, MHE_S: tl.constexpr, HALF: tl.constexpr,
                     STATS_ROWS: tl.constexpr, LAYOUT: tl.constexpr, ALIGN: tl.constexpr,
                     BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                     NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Partial row sums of the kind's epilogue over the column blocks of one split.

    Program ``(tile, s)`` covers row block ``I`` and column blocks ``[s·JPS, (s+1)·JPS)``.
    Needs the squared row norms in the stats (``_row_norm_kernel``). Its partial row sums
    go to split ``s`` of PART, laid out like the stats (``PART + s·PART_STRIDE`` + the
    matrix's stats offset; the norm slots stay unused); ``_finalize_kernel`` adds the
    splits. Frame, diversity and MHE sum full rows (j ≠ i), which is what the backward's
    diagonal terms need; orthogonality sums the upper triangle only (weight 2 for j > i,
    1 on the diagonal), halving its work.
    """
    pid = tl.program_id(0)
    g, grp, b, ib = _tile_coords(TILES, GROUPS, pid)
    x_ptr, xs_r, xs_c, p, n = _matrix_of(PTRS, X, g, grp, b, LAYOUT, ALIGN)
    st_rel = tl.load(grp + _G_ST_OFF) + STATS_ROWS * p * b
    st = STATS + st_rel
    s, j_lo, j_hi = _split_range(ib, p, JPS, KIND, BLOCK_I, BLOCK_J)

    rows_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = rows_i < p
    sq_i = tl.load(st + rows_i, mask=mask_i, other=1.0)
    acc = tl.zeros((BLOCK_I,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_I,), dtype=tl.float32)  # MHE only: u_i
    if KIND == _MHE:
        nu_i = _mhe_nu(sq_i, eps)
        inv_pairs = _div(1.0, _mhe_pairs(p, HALF))
    for jb in range(j_lo, j_hi):
        V, rows_j, mask_j, valid = _gram_tile(x_ptr, xs_r, xs_c, rows_i, mask_i, jb, p, n,
                                              BLOCK_I, BLOCK_J, BLOCK_K, LAYOUT=LAYOUT, NATIVE_DOT=NATIVE_DOT,
                                              DOT_PRECISION=DOT_PRECISION)
        ii = rows_i[:, None]
        jj = rows_j[None, :]
        if KIND == _FRAME:
            # formula: docs/gram.md#frame_penalty — r_i = Σ_{j≠i} |V_ij| (the diagonal is masked, not subtracted)
            contrib = tl.where(valid & (ii != jj), tl.abs(V), 0.0)
        elif KIND == _DIVERSITY:
            # formula: docs/gram.md#diversity_penalty — R = Σ_{i<j} [|C_ij| ≥ tau] C_ij² = ½ Σ_i t_i,
            # t_i = Σ_{j≠i} [|C_ij| ≥ tau] C_ij² (full rows: the backward's diagonal needs t_i)
            sq_j = tl.load(st + rows_j, mask=mask_j, other=1.0)
            C, q_i, q_j = _diversity_cosine(V, sq_i, sq_j)
            keep = tl.where((ii != jj) & _over_threshold(C, tau, INCLUSIVE), 1.0, 0.0)
            contrib = tl.where(valid, C * C * keep, 0.0)
        elif KIND == _ORTHOGONALITY:
            # formula: docs/gram.md#orthogonality_penalty — ‖V − I‖_F² = Σ_i (V_ii − 1)² + 2 Σ_{i<j} V_ij²
            E = V - tl.where(ii == jj, 1.0, 0.0)
            # (the lower triangle is selected away, not weighted by 0: 0 · inf would be NaN where
            # the formula is +inf)
            weight = tl.where(jj > ii, 2.0, 1.0)
            contrib = tl.where(valid & (jj >= ii), weight * E * E, 0.0)
        else:
            # formula: docs/gram.md#mhe_penalty — full rows: E_i = Σ_{j≠i} e_ij (R = ½ Σ_i E_i / #pairs) and,
            # for the backward's diagonal, u_i = Σ_{j≠i} h_ij cos_ij, the same expression as in the backward
            sq_j = tl.load(st + rows_j, mask=mask_j, other=1.0)
            contrib, u, _coef = _mhe_terms(V, nu_i, _mhe_nu(sq_j, eps), valid, ii, jj, inv_pairs, eps, MHE_S,
                                          HALF)
            acc2 += tl.sum(u, axis=1)
        acc += tl.sum(contrib, axis=1)
    part = PART + s.to(tl.int64) * PART_STRIDE + st_rel
    tl.store(part + p + rows_i, acc, mask=mask_i)
    if KIND == _MHE:
        tl.store(part + 2 * p + rows_i, acc2, mask=mask_i)


@triton.jit
def _finalize_kernel(GROUPS, MATS, STATS, PART, PART_STRIDE, SPLITS, VALUES, A, B,
                     KIND: tl.constexpr, HALF: tl.constexpr, STATS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """One program per matrix: complete row sums ``Σ_s PART[s]`` into the stats, and the value.

    The splits are added in the fixed order s = 0, 1, … starting from 0 (deterministic, no
    atomics). Frame's hinges need the complete ``r_i``, so they live here.
    """
    q = tl.program_id(0)
    g = tl.load(MATS + 2 * q)
    b = tl.load(MATS + 2 * q + 1)
    grp = GROUPS + g * _G_NCOL
    p = tl.load(grp + _G_P)
    st_rel = tl.load(grp + _G_ST_OFF) + STATS_ROWS * p * b
    st = STATS + st_rel
    pf = p.to(tl.float32)

    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for r0 in range(0, p, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        mask = rows < p
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
        part = PART + st_rel
        for s in range(0, SPLITS):
            acc += tl.load(part + p + rows, mask=mask, other=0.0)
            if KIND == _MHE:
                acc2 += tl.load(part + 2 * p + rows, mask=mask, other=0.0)
            part += PART_STRIDE
        tl.store(st + p + rows, acc, mask=mask)
        if KIND == _MHE:
            tl.store(st + 2 * p + rows, acc2, mask=mask)
        if KIND == _FRAME:
            sq = tl.load(st + rows, mask=mask, other=0.0)
            lo = _relu(A - (sq - acc))
            hi = _relu((sq + acc) - B)
            total += tl.where(mask, lo * lo + hi * hi, 0.0)
        else:
            total += acc
    value = tl.sum(total, axis=0)
    if KIND == _FRAME:
        value = _div(value, pf)
    elif KIND == _DIVERSITY:
        value = 0.5 * value          # full rows count each pair twice
    elif KIND == _MHE:
        # mean over the pairs of ½ Σ E_i (with half, the 2m rows' sum is twice W's rows' sum);
        # p = 1 without half gives 0/0 = nan, as the reference's empty mean
        if HALF:
            value = _div(value, _mhe_pairs(p, HALF))
        else:
            value = _div(0.5 * value, _mhe_pairs(p, HALF))
    tl.store(VALUES + q, value)


@triton.jit
def _accumulate_rows(d_ptr, ds_r, ds_c, rows_i, mask_i, P, x_ptr, xs_r, xs_c, rows_j, mask_j, n,
                     BLOCK_K: tl.constexpr, LAYOUT: tl.constexpr = 0, NATIVE_DOT: tl.constexpr = False,
                     DOT_PRECISION: tl.constexpr = "ieee"):
    """``dX[rows_i, :] += P · X[rows_j, :]`` over the inner dimension in BLOCK_K chunks, fp32.

    ``P`` is float32 (coefficients), so the product is a float32 one on the tensor cores
    whatever X's dtype: X is upcast (exact) and the product runs at DOT_PRECISION for float32
    inputs ("tf32x3", or "ieee"), and at "bf16x3" (P split into two bf16 halves, 3 bf16 MMAs,
    half the tensor-core time of tf32x3) for bf16/fp16 inputs, unless "ieee" is asked for.
    Measured against float64 autograd (max error / max |dW|, diversity, MHE and
    orthogonality, 64×147 and 256×576): P in plain bf16 1.3–3.4e-3 (as large as the bf16
    output rounding, 10× fp16's 2.5–8e-4, and it breaks the cancellation of the row-norm
    terms); bf16x3 2–8e-6; tf32x3 1.3–6e-7, the float32 product's own 2–7e-7. LAYOUT
    (``_tile_ptrs``) describes X and dX alike (dX is laid out as X's side).

    Read-modify-write without atomics: the calling program owns the rows ``rows_i`` of its
    dX slice (its split's partial buffer, or dX itself with one split).
    """
    for k0 in range(0, n, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mk = ks < n
        xj = tl.load(_tile_ptrs(x_ptr, rows_j, ks, xs_r, xs_c, LAYOUT),
                     mask=mask_j[:, None] & mk[None, :], other=0.0).to(tl.float32)
        dptr = _tile_ptrs(d_ptr, rows_i, ks, ds_r, ds_c, LAYOUT)
        dmask = mask_i[:, None] & mk[None, :]
        if not NATIVE_DOT:
            upd = tl.dot(P, xj, input_precision="ieee")
        elif (x_ptr.dtype.element_ty == tl.float32) or (DOT_PRECISION == "ieee"):
            upd = tl.dot(P, xj, input_precision=DOT_PRECISION)
        else:
            upd = tl.dot(P, xj, input_precision="bf16x3")
        tl.store(dptr, tl.load(dptr, mask=dmask, other=0.0) + upd, mask=dmask)



@triton.jit
def _row_terms(st, p, rows_i, mask_i, sq_i, A, B, eps, KIND: tl.constexpr):
    """Per-row factors of the backward's P for row block I: frame (∂R/∂d_i, ∂R/∂r_i), MHE
    (ν_i, ν_i), the others unused."""
    if KIND == _FRAME:
        r_i = tl.load(st + p + rows_i, mask=mask_i, other=0.0)
        c1, c2 = _frame_coefficients(sq_i, r_i, A, B, p.to(tl.float32))
    elif KIND == _MHE:
        c1 = _mhe_nu(sq_i, eps)
        c2 = c1
    else:
        c1 = sq_i
        c2 = sq_i
    return c1, c2


@triton.jit
def _norm_diagonal(st, p, rows_i, mask_i, sq_i, eps, KIND: tl.constexpr, HALF: tl.constexpr):
    """The diagonal of P that comes from the row norms (diversity, MHE; 0 for the others).

    diversity −2·t_i / q_i² (0 where ‖x_i‖ < 1e-12: torch's clamp_min passes no gradient
    there; NaN norms pass NaN), MHE −u_i / ν_i² (twice that with half: rows i and i+m). They
    need the full row sums t_i / u_i, which the forward stored in the stats.
    """
    if KIND == _DIVERSITY:
        t_i = tl.load(st + p + rows_i, mask=mask_i, other=0.0)
        diag = _diversity_diag(sq_i, t_i)
    elif KIND == _MHE:
        u_i = tl.load(st + 2 * p + rows_i, mask=mask_i, other=0.0)
        diag = _mhe_diag(sq_i, u_i, eps)
        if HALF:
            diag = 2.0 * diag
    else:
        diag = tl.zeros_like(sq_i)
    return tl.where(mask_i, diag, 0.0)


@triton.jit
def _coefficient_tile(V, rows_i, rows_j, mask_j, valid, st, p, c1_i, c2_i, inv_pairs, A, B, tau, eps,
                      KIND: tl.constexpr, INCLUSIVE: tl.constexpr, MHE_S: tl.constexpr, HALF: tl.constexpr):
    """Tile ``P[I, J]`` of ``P = S + Sᵀ``, ``S = ∂R/∂V`` (0 outside the matrix), without the row-norm
    diagonal (``_norm_diagonal``). Per kind (off-diagonal i ≠ j | diagonal):
      frame          (gr_i + gr_j)·sign(V_ij)        | 2·gd_i     (gd, gr = ∂R/∂d, ∂R/∂r)
      diversity      2·m_ij·C_ij / (q_i q_j)         | 0
      orthogonality  4·V_ij                          | 4·(V_ii − 1)
      mhe            h_ij / (ν_i ν_j)                | 0  (half: see _mhe_terms)
    """
    ii = rows_i[:, None]
    jj = rows_j[None, :]
    if KIND == _FRAME:
        sq_j = tl.load(st + rows_j, mask=mask_j, other=1.0)
        r_j = tl.load(st + p + rows_j, mask=mask_j, other=0.0)
        gd_j, gr_j = _frame_coefficients(sq_j, r_j, A, B, p.to(tl.float32))
        P = tl.where(ii == jj, 2.0 * c1_i[:, None], (c2_i[:, None] + gr_j[None, :]) * _sign0(V))
    elif KIND == _DIVERSITY:
        sq_j = tl.load(st + rows_j, mask=mask_j, other=1.0)
        C, q_i, q_j = _diversity_cosine(V, c1_i, sq_j)
        keep = tl.where((ii != jj) & _over_threshold(C, tau, INCLUSIVE), 1.0, 0.0)
        Gm = tl.where(valid, C * keep, 0.0)
        P = _div(2.0 * Gm, q_i[:, None] * q_j[None, :])
    elif KIND == _ORTHOGONALITY:
        P = 4.0 * (V - tl.where(ii == jj, 1.0, 0.0))
    else:
        sq_j = tl.load(st + rows_j, mask=mask_j, other=1.0)
        _e, _u, P = _mhe_terms(V, c1_i, _mhe_nu(sq_j, eps), valid, ii, jj, inv_pairs, eps, MHE_S, HALF)
    return tl.where(valid, P, 0.0)


@triton.jit
def _gram_coef_kernel(PTRS, X, GROUPS, TILES, STATS, GRAD, GRAD_STRIDE, PBUF, JPS, A, B, tau, eps,
                      KIND: tl.constexpr, INCLUSIVE: tl.constexpr, MHE_S: tl.constexpr, HALF: tl.constexpr,
                      STATS_ROWS: tl.constexpr, LAYOUT: tl.constexpr, ALIGN: tl.constexpr,
                      BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                      NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Backward, small Gram (the P path): ``grad · P[I, J]`` for the column blocks of split s,
    stored into the matrix's p×p block of PBUF (row-major). Every entry of P belongs to exactly
    one program, so nothing is zero-filled or added; ``_gram_product_kernel`` then forms P·X.
    The row-norm diagonal is added on the tile that holds the diagonal."""
    pid = tl.program_id(0)
    g, grp, b, ib = _tile_coords(TILES, GROUPS, pid)
    x_ptr, xs_r, xs_c, p, n = _matrix_of(PTRS, X, g, grp, b, LAYOUT, ALIGN)
    s, j_lo, j_hi = _split_range(ib, p, JPS, _FRAME, BLOCK_I, BLOCK_J)  # full rows: no triangle
    st = STATS + tl.load(grp + _G_ST_OFF) + STATS_ROWS * p * b
    gv = tl.load(GRAD + (tl.load(grp + _G_VAL_OFF) + b) * GRAD_STRIDE)
    pm = PBUF + tl.load(grp + _G_P_OFF) + p * p * b

    rows_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = rows_i < p
    sq_i = tl.load(st + rows_i, mask=mask_i, other=1.0)
    c1_i, c2_i = _row_terms(st, p, rows_i, mask_i, sq_i, A, B, eps, KIND)
    diag = _norm_diagonal(st, p, rows_i, mask_i, sq_i, eps, KIND, HALF)
    inv_pairs = _div(1.0, _mhe_pairs(p, HALF))
    for jb in range(j_lo, j_hi):
        V, rows_j, mask_j, valid = _gram_tile(x_ptr, xs_r, xs_c, rows_i, mask_i, jb, p, n,
                                              BLOCK_I, BLOCK_J, BLOCK_K, LAYOUT=LAYOUT, NATIVE_DOT=NATIVE_DOT,
                                              DOT_PRECISION=DOT_PRECISION)
        P = _coefficient_tile(V, rows_i, rows_j, mask_j, valid, st, p, c1_i, c2_i, inv_pairs, A, B, tau, eps,
                              KIND, INCLUSIVE, MHE_S, HALF)
        P = tl.where(rows_i[:, None] == rows_j[None, :], P + diag[:, None], P)
        tl.store(pm + rows_i[:, None] * p + rows_j[None, :], P * gv, mask=valid)


@triton.jit
def _tf32_split(a):
    """``a = hi + lo`` exactly (finite a), ``hi`` with tf32's 10 mantissa bits (truncated), so a
    tf32 product of ``hi`` is exact and ``lo`` (≤ 2⁻¹⁰|a|) carries the rest."""
    hi = (a.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    # NaN stays NaN (truncating its payload could make it inf); ±inf has an empty lo (not inf − inf)
    hi = tl.where(a == a, hi, a)
    return hi, tl.where(tl.abs(a) < float("inf"), a - hi, 0.0)


@triton.jit
def _dot_split_tf32(a, b, acc, B_EXACT: tl.constexpr):
    """``acc + a·b`` for float32 tiles on tf32 tensor cores at about float32 accuracy.

    ``a`` is split ``hi + lo`` (``_tf32_split``); ``b`` too unless it is exact in tf32 (upcast
    bf16 / fp16 data: B_EXACT), so 2 products instead of tf32x3's 3 — the error is that of
    ``lo``'s tf32 rounding, about 2⁻²¹ relative. (Triton's own tf32x3 costs about 170 registers
    per thread for these tiles, 12 % occupancy on sm_90; this keeps ≥ 25 %.)
    """
    a_hi, a_lo = _tf32_split(a)
    if B_EXACT:
        acc = tl.dot(a_lo, b, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b, acc, input_precision="tf32")
    else:
        b_hi, b_lo = _tf32_split(b)
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    return acc


@triton.jit
def _gram_product_kernel(PTRS, X, GROUPS, PTILES, PBUF, OUT, LAYOUT: tl.constexpr, ALIGN: tl.constexpr,
                         BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
                         IEEE: tl.constexpr):
    """Backward, small Gram: ``dX[I, T] = Σ_J P[I, J] · X[J, T]`` for one (row block, column block) tile
    of one matrix (PTILES rows ``(g, b, ib, tb)``), fp32 accumulation, written once in OUT's dtype.

    The product runs as split tf32 products (``_dot_split_tf32``), or as exact float32 FMAs with
    IEEE (``FP32_DOT = "ieee"`` on a GPU). P is symmetric (``S + Sᵀ``) and already holds grad; with MHE half it is W's own m×m
    coefficient matrix, so this is dW. The loop over J runs in a fixed order (deterministic).
    """
    pid = tl.program_id(0)
    g = tl.load(PTILES + 4 * pid)
    b = tl.load(PTILES + 4 * pid + 1).to(tl.int64)
    ib = tl.load(PTILES + 4 * pid + 2)
    tb = tl.load(PTILES + 4 * pid + 3)
    grp = GROUPS + g * _G_NCOL
    x_ptr, xs_r, xs_c, p, n = _matrix_of(PTRS, X, g, grp, b, LAYOUT, ALIGN)
    o_ptr = OUT + tl.load(grp + _G_D_OFF) + b * tl.load(grp + _G_DS_B)
    ds_r, ds_c = _unit_strides(tl.load(grp + _G_DS_R), tl.load(grp + _G_DS_C), LAYOUT)
    pm = PBUF + tl.load(grp + _G_P_OFF) + p * p * b

    # in-matrix offsets in int32 (the host takes this path only where every matrix spans < 2³¹
    # elements): half the address registers of int64 ones
    p32 = p.to(tl.int32)
    xs_r = xs_r.to(tl.int32)
    xs_c = xs_c.to(tl.int32)
    ds_r = ds_r.to(tl.int32)
    ds_c = ds_c.to(tl.int32)
    rows_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = rows_i < p
    cols = tb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = cols < n
    acc = tl.zeros((BLOCK_I, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, p32, BLOCK_J):
        rows_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = rows_j < p32
        pt = tl.load(pm + rows_i[:, None] * p32 + rows_j[None, :], mask=mask_i[:, None] & mask_j[None, :], other=0.0)
        xj = tl.load(x_ptr + rows_j[:, None] * xs_r + cols[None, :] * xs_c,
                     mask=mask_j[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        if IEEE:
            acc = tl.dot(pt, xj, acc, input_precision="ieee")
        else:
            acc = _dot_split_tf32(pt, xj, acc, X.dtype.element_ty != tl.float32)
    tl.store(o_ptr + rows_i[:, None] * ds_r + cols[None, :] * ds_c, acc.to(OUT.dtype.element_ty),
             mask=mask_i[:, None] & mask_c[None, :])


@triton.jit
def _gram_bwd_kernel(PTRS, X, DX, DX_SPLIT_STRIDE, JPS, GROUPS, TILES, STATS, GRAD, GRAD_STRIDE, A, B, tau, eps,
                     KIND: tl.constexpr, INCLUSIVE: tl.constexpr, MHE_S: tl.constexpr, HALF: tl.constexpr,
                     STATS_ROWS: tl.constexpr, LAYOUT: tl.constexpr, ALIGN: tl.constexpr,
                     BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                     NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Backward, large Gram (the split path): split ``s``'s part of ``dX[I, :] = grad · Σ_J P[I, J] X[J, :]``.

    Program ``(tile, s)`` adds ``Σ_{J in split s} P[I, J] X[J, :]`` into slice ``s`` of DX
    (``DX + s·DX_SPLIT_STRIDE``, float32; the launcher adds the slices in a fixed order
    afterwards, or passes dX itself when there is one split). P per kind: ``_coefficient_tile``
    and ``_norm_diagonal``; split 0 alone adds the row-norm diagonal ``diag_i·x_i``, before its
    tiles. dX rows I of slice s belong to this program only: read-modify-write of fp32 global
    memory without atomics (load and store use the same pointer tensor, so each element is
    read and written by the same thread on a GPU).
    """
    pid = tl.program_id(0)
    g, grp, b, ib = _tile_coords(TILES, GROUPS, pid)
    x_ptr, xs_r, xs_c, p, n = _matrix_of(PTRS, X, g, grp, b, LAYOUT, ALIGN)
    s, j_lo, j_hi = _split_range(ib, p, JPS, _FRAME, BLOCK_I, BLOCK_J)  # full rows: no triangle
    d_ptr = DX + s.to(tl.int64) * DX_SPLIT_STRIDE + tl.load(grp + _G_D_OFF) + b * tl.load(grp + _G_DS_B)
    ds_r, ds_c = _unit_strides(tl.load(grp + _G_DS_R), tl.load(grp + _G_DS_C), LAYOUT)
    st = STATS + tl.load(grp + _G_ST_OFF) + STATS_ROWS * p * b
    gv = tl.load(GRAD + (tl.load(grp + _G_VAL_OFF) + b) * GRAD_STRIDE)

    rows_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = rows_i < p
    sq_i = tl.load(st + rows_i, mask=mask_i, other=1.0)
    c1_i, c2_i = _row_terms(st, p, rows_i, mask_i, sq_i, A, B, eps, KIND)
    inv_pairs = _div(1.0, _mhe_pairs(p, HALF))

    if (KIND == _DIVERSITY) or (KIND == _MHE):
        if s == 0:
            diag = _norm_diagonal(st, p, rows_i, mask_i, sq_i, eps, KIND, HALF) * gv
            # the diagonal as a BLOCK_I × BLOCK_I matrix: one non-zero per row, so the dot's
            # sum is exactly diag_i · x_i
            local = tl.arange(0, BLOCK_I)
            D = tl.where(local[:, None] == local[None, :], diag[:, None], 0.0)
            _accumulate_rows(d_ptr, ds_r, ds_c, rows_i, mask_i, D, x_ptr, xs_r, xs_c, rows_i, mask_i, n, BLOCK_K,
                             LAYOUT=LAYOUT, NATIVE_DOT=NATIVE_DOT, DOT_PRECISION=DOT_PRECISION)

    for jb in range(j_lo, j_hi):
        V, rows_j, mask_j, valid = _gram_tile(x_ptr, xs_r, xs_c, rows_i, mask_i, jb, p, n,
                                              BLOCK_I, BLOCK_J, BLOCK_K, LAYOUT=LAYOUT, NATIVE_DOT=NATIVE_DOT,
                                              DOT_PRECISION=DOT_PRECISION)
        P = _coefficient_tile(V, rows_i, rows_j, mask_j, valid, st, p, c1_i, c2_i, inv_pairs, A, B, tau, eps,
                              KIND, INCLUSIVE, MHE_S, HALF)
        P = tl.where(valid, P * gv, 0.0)
        _accumulate_rows(d_ptr, ds_r, ds_c, rows_i, mask_i, P, x_ptr, xs_r, xs_c, rows_j, mask_j, n, BLOCK_K,
                         LAYOUT=LAYOUT, NATIVE_DOT=NATIVE_DOT, DOT_PRECISION=DOT_PRECISION)


@triton.jit
def _split_sum_kernel(PART, OUT, numel, SPLITS, BLOCK: tl.constexpr):
    """``OUT = Σ_s PART[s]`` over the splits of the dX partial buffer ``(SPLITS, numel)``,
    in the fixed order s = 0, 1, … (deterministic, no atomics)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    ptr = PART + offs
    acc = tl.load(ptr, mask=mask, other=0.0)
    for s in range(1, SPLITS):
        ptr += numel
        acc += tl.load(ptr, mask=mask, other=0.0)
    tl.store(OUT + offs, acc, mask=mask)



# ----------------------------------------------------------------------------- host launchers

# Static sm_90 limits of every launched kernel (python -m regkernels.bench.gpu_static,
# docs/design.md#gpu-static-report): no spills, occupancy ≥ 25 %; the kernels that form Gram
# tiles or P·X products must use tensor cores for half-precision inputs.
_MMA_ALL = ("float16", "bfloat16", "float32")
_ONE_CTA = ("8 warps x 129-255 registers: one program per SM (12.5 %) for some variants; the 64x64 "
            "fp32 accumulator and its epilogue over 8 warps (4 warps or 32x32 tiles need more registers "
            "per thread and spill, see the GPU_BLOCK_* comment)")
GPU_BUDGETS = {
    "_row_norm_kernel": Budget(),
    "_gram_fwd_kernel": Budget(mma_dtypes=_MMA_ALL, min_occupancy=0.125,
                               note="Gram tile on bf16/fp16 MMAs, tf32x3 for float32; " + _ONE_CTA),
    "_finalize_kernel": Budget(),
    "_gram_coef_kernel": Budget(mma_dtypes=_MMA_ALL, min_occupancy=0.125,
                                note="Gram tile on bf16/fp16 MMAs, tf32x3 for float32; " + _ONE_CTA),
    "_gram_product_kernel": Budget(mma_dtypes=_MMA_ALL, min_occupancy=0.125,
                                   note="fp32 P times X: split tf32 tensor-core products (2 for half inputs, 3 "
                                        "for float32), 116-153 registers over 8 warps"),
    "_gram_bwd_kernel": Budget(mma_dtypes=_MMA_ALL, min_occupancy=0.125,
                               note="Gram tile and the P·X product (tf32x3 / bf16x3) in one program; " + _ONE_CTA),
    "_split_sum_kernel": Budget(),
}

# Plans are cached by what they are built from (kind, sides, each input's shape, strides,
# dtype and device, and the tuning constants below): a model's penalty repeats the same call
# every step. Least recently used plans are dropped beyond PLAN_CACHE_SIZE.
PLAN_CACHE_SIZE = 64
_PLANS: OrderedDict = OrderedDict()


class _Launch:
    """One layout class of a call: its constexpr LAYOUT, its tile tables on the device (ordered by
    descending work) and, per input pointer binding, its ALIGN."""

    def __init__(self, layout: int, groups: list[int], tiles, ptiles, device):
        self.layout = layout
        self.groups = groups
        self.n_tiles = len(tiles)
        self.n_ptiles = len(ptiles)
        self.tiles = torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3).to(device)
        self.ptiles = torch.tensor(ptiles, dtype=torch.int32).reshape(-1, 4).to(device)
        self.align = 1


class _Plan:
    """Everything about a call that depends on its shapes, strides, dtype, device, sides and kind,
    on the device: the group table, the tile tables per layout class (forward, and the backward's
    P·X product), the matrix table of the finalize, the splits, the backward's path; plus the
    input pointer table, re-uploaded only when the inputs' data pointers change (``bind``).

    The gradient buffer holds every input's gradient contiguously, in list order, with the
    inputs' shapes (MHE half included: its Gram is W's own, see ``_mhe_terms``).
    """

    def __init__(self, mats, kind, sides, cfg):
        if any(s not in (0, 1) for s in sides):
            raise ValueError(f"gram_penalty: sides must be 0 (rows) or 1 (cols); got {list(sides)}")
        if kind in ("diversity", "mhe") and any(s != 0 for s in sides):
            raise ValueError(f"gram_penalty: {kind} is rows-only (sides must be 0); got {list(sides)}")
        if mats:
            dtypes = {w.dtype for w in mats}
            devices = {w.device for w in mats}
            if len(dtypes) != 1 or len(devices) != 1:
                raise ValueError("gram_penalty: mats must share one dtype and device; "
                                 f"got {sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
            if any(w.dim() != 3 for w in mats):
                raise ValueError("gram_penalty: every mat must be (B, m, n); got shapes "
                                 f"{[tuple(w.shape) for w in mats]}")
            if mats[0].dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise ValueError(f"gram_penalty: mats must be float16, bfloat16 or float32; got {mats[0].dtype}")
        self.kind = kind
        self.device = mats[0].device if mats else torch.device("cpu")
        self.dtype = mats[0].dtype if mats else torch.float32
        self.stats_rows = _stats_rows(kind)
        self.shapes = [tuple(w.shape) for w in mats]
        self.sizes = [w.numel() for w in mats]
        self.out_numel = sum(self.sizes)
        # the tiles of the Gram kernels (GPU or interpreter); the plan's tables depend on them
        self.cfg = cfg
        bi, bj = self.cfg["BLOCK_I"], self.cfg["BLOCK_J"]

        rows, ncbs, classes = [], [], {}
        self.table = []  # per group: (layout, B, p, n, strides (b, r, c)) for the pointer checks
        st_off = val_off = d_off = p_off = 0
        for g, (w, side) in enumerate(zip(mats, sides)):
            bb, r, c = w.shape
            sb, sr, sc = w.stride()
            # "cols" (side 1): the Gram of Xᵀ — swap the row and inner strides (docs/gram.md#conventions Gram)
            p, n = (r, c) if side == 0 else (c, r)
            xs_r, xs_c = (sr, sc) if side == 0 else (sc, sr)
            ds_r, ds_c = (c, 1) if side == 0 else (1, c)
            xs_b = sb if bb > 1 else 0  # one matrix: its batch stride is never stepped
            # a size-1 dimension is never stepped either: any stride is a unit one
            if side == 0 and (xs_c == 1 or n <= 1):
                layout = LAYOUT_INNER_UNIT
            elif side == 1 and (xs_r == 1 or p <= 1):
                layout = LAYOUT_GRAM_UNIT
            else:
                layout = LAYOUT_GENERIC
            row = [0] * _G_NCOL.value
            row[_G_XS_B.value], row[_G_XS_R.value], row[_G_XS_C.value] = xs_b, xs_r, xs_c
            row[_G_D_OFF.value], row[_G_DS_B.value], row[_G_DS_R.value], row[_G_DS_C.value] = d_off, r * c, ds_r, ds_c
            row[_G_P.value], row[_G_N.value] = p, n
            row[_G_ST_OFF.value], row[_G_VAL_OFF.value], row[_G_P_OFF.value] = st_off, val_off, p_off
            rows.append(row)
            self.table.append((layout, bb, p, n, xs_b, xs_r, xs_c))
            if bb and p:
                ncbs.append(triton.cdiv(p, bj))
                cls = classes.setdefault(layout, ([], [], []))
                cls[0].append(g)
                nb, npb, ntb = triton.cdiv(p, bi), triton.cdiv(p, PRODUCT_BLOCK_I), triton.cdiv(n, BLOCK_N)
                # (work, order) keys: a forward tile loops over p/BLOCK_J column blocks × n, a
                # product tile over p; the largest go first so that they do not end the launch
                cls[1].extend(((-triton.cdiv(p, bj) * n, g, b, ib), (g, b, ib))
                              for b in range(bb) for ib in range(nb))
                cls[2].extend(((-p, g, b, ib, tb), (g, b, ib, tb))
                              for b in range(bb) for ib in range(npb) for tb in range(ntb))
            st_off += self.stats_rows * p * bb
            val_off += bb
            d_off += bb * r * c
            p_off += bb * p * p
        self.stats_numel = st_off
        self.n_values = val_off
        self.p_numel = p_off
        self.groups = torch.tensor(rows, dtype=torch.int64).reshape(-1, _G_NCOL.value).to(self.device)
        # the finalize's program q → (group, matrix), in values order
        mats_table = [(g, b) for g, (bb, _, _) in enumerate(self.shapes) for b in range(bb)]
        self.mats = torch.tensor(mats_table, dtype=torch.int64).reshape(-1, 2).to(self.device)
        if len(classes) == 3:
            # at most two launches per pass: the unit-stride class with less work joins the generic one
            work = {c: -sum(k[0] for k, _ in classes[c][1]) for c in (LAYOUT_INNER_UNIT, LAYOUT_GRAM_UNIT)}
            small = classes.pop(min(work, key=work.get))
            for into, extra in zip(classes[LAYOUT_GENERIC], small):
                into.extend(extra)
        self.launches = [_Launch(layout, gs, [t for _, t in sorted(tl_)], [t for _, t in sorted(pl)], self.device)
                         for layout, (gs, tl_, pl) in sorted(classes.items())]
        self.n_tiles = sum(ln.n_tiles for ln in self.launches)

        # column-block splits: program_id(1) = s covers column blocks [s·jps, (s+1)·jps) of
        # every row block (one jps for the call; a smaller matrix's surplus splits are
        # empty and store zeros). splits is recomputed from jps so no split is empty for
        # the matrix with the most column blocks.
        max_ncb = max(ncbs, default=1)
        want = max(1, triton.cdiv(TARGET_PROGRAMS, max(self.n_tiles, 1)))
        self.jps = triton.cdiv(max_ncb, min(want, max_ncb))
        self.splits = triton.cdiv(max_ncb, self.jps)
        # backward: the P path when every Gram is small (P_MAX_SIDE), else the split path with
        # its splits × |dX| partial buffer bounded by SPLIT_MAX_BYTES
        self.max_p = max((p for _, bb, p, *_ in self.table if bb), default=0)
        # (the product kernel addresses within a matrix in int32)
        spans = max(((p - 1) * xs_r + (n - 1) * xs_c for _, bb, p, n, _, xs_r, xs_c in self.table if bb and p and n),
                    default=0)
        self.product_path = (self.max_p <= P_MAX_SIDE and spans < 2**31
                             and max((r * c for _, r, c in self.shapes), default=0) < 2**31)
        cap = max(1, SPLIT_MAX_BYTES // max(4 * self.out_numel, 1))
        self.bwd_jps = triton.cdiv(max_ncb, min(want, max_ncb, cap))
        self.bwd_splits = triton.cdiv(max_ncb, self.bwd_jps)

        self.ptrs = None
        self._ptr_values = None

    def bind(self, mats) -> None:
        """Point the plan at this call's inputs: the device pointer table is rewritten only when a
        data pointer changed (from pinned memory, without blocking the host), and with it each
        launch's ALIGN (16-byte aligned bases and strides, unit-stride extents in multiples)."""
        ptrs = tuple(w.data_ptr() for w in mats)
        if ptrs == self._ptr_values:
            return
        host = torch.tensor(ptrs or (0,), dtype=torch.int64)
        if self.device.type == "cuda":
            if self.ptrs is None:
                self.ptrs = torch.empty(len(host), dtype=torch.int64, device=self.device)
            # a fresh pinned buffer per change: the caching host allocator keeps it until the
            # copy has run, so no later change can overwrite what a queued copy reads
            self.ptrs.copy_(host.pin_memory(), non_blocking=True)
        else:
            self.ptrs = host
        self._ptr_values = ptrs
        vec = 16 // self.dtype.itemsize
        for launch in self.launches:
            ok = launch.layout != LAYOUT_GENERIC
            for g in launch.groups:
                layout, _, p, n, xs_b, xs_r, xs_c = self.table[g]
                stride, extent = (xs_r, n) if layout == LAYOUT_INNER_UNIT else (xs_c, p)
                ok = ok and ptrs[g] % 16 == 0 and xs_b % vec == 0 and stride % vec == 0 and extent % vec == 0
            launch.align = vec if ok else 1


def _plan(mats, kind: str, sides, params) -> _Plan:
    """The cached plan of a call (checking the arguments), bound to this call's inputs."""
    if kind not in _KIND_ID:
        raise ValueError(f"gram_penalty: kind must be one of {KINDS}; got {kind!r}")
    if len(sides) != len(mats):
        raise ValueError(f"gram_penalty: sides must have one entry per matrix ({len(mats)}); got {len(sides)}")
    if len(params) != _N_PARAMS[kind]:
        raise ValueError(f"gram_penalty: {kind} takes {_N_PARAMS[kind]} params; got {list(params)}")
    if kind == "mhe" and params[0] not in (0, 1, 2):
        raise ValueError(f"gram_penalty: mhe s must be 0, 1 or 2; got {params[0]!r}")
    if kind == "mhe" and params[3] not in (0, 1):
        raise ValueError(f"gram_penalty: mhe angular must be 0 or 1; got {params[3]!r}")
    # (the tile config: its blocks shape the tables, its precision is what the plan launches with;
    # it changes with TRITON_INTERPRET, FP32_DOT and the GPU_* / interpreter block constants)
    cfg = tile_config(mats[0].dtype if mats else torch.float32, _ext.triton_interpreted())
    key = (kind, tuple(sides), tuple((w.shape, w.stride(), w.dtype, w.device) for w in mats),
           TARGET_PROGRAMS, P_MAX_SIDE, SPLIT_MAX_BYTES, tuple(sorted(cfg.items())),
           PRODUCT_BLOCK_I, PRODUCT_BLOCK_J, BLOCK_N)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _Plan(mats, kind, sides, cfg)
        _PLANS[key] = plan
        while len(_PLANS) > PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    plan.bind(mats)
    return plan


def _scalars_and_meta(kind: str, params) -> tuple[tuple[float, ...], dict]:
    """The kind's runtime scalars ``(A, B, tau, eps)`` and constexprs (not part of the plan)."""
    s_pow, half, eps = (int(params[0]), bool(params[1]), float(params[2])) if kind == "mhe" else (2, False, 0.0)
    if kind == "mhe" and params[3]:
        s_pow += 3  # the angular energies (_mhe_angle_terms)
    tau, inclusive = (float(params[0]), bool(params[1])) if kind == "diversity" else (0.0, True)
    A, Bf = (float(params[0]), float(params[1])) if kind == "frame" else (0.0, 0.0)
    return (A, Bf, tau, eps), dict(KIND=_KIND_ID[kind], INCLUSIVE=inclusive, MHE_S=s_pow, HALF=half,
                                   STATS_ROWS=_stats_rows(kind))


def _stats_rows(kind: str) -> int:
    # floats per Gram row in the stats: ‖x_i‖² and one row sum (MHE: two, E_i and u_i)
    return 3 if kind == "mhe" else 2


def stats_numel(mats, kind: str, sides, params) -> int:
    """Size of the forward's ``stats`` output, from the shapes alone (fake tensors too):
    ``_stats_rows(kind)`` floats per Gram row of every matrix."""
    return sum(_stats_rows(kind) * (w.shape[1] if side == 0 else w.shape[2]) * w.shape[0]
               for w, side in zip(mats, sides))


def gram_penalty_forward(mats: list[torch.Tensor], kind: str, sides: list[int],
                         params: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Penalty values of every matrix of ``mats`` (list of ``(B_i, m_i, n_i)``), grouped.

    Returns ``values`` (float32, ``(Σ B_i,)``, matrix b of ``mats[i]`` at ``Σ_{i'<i} B_i' + b``)
    and ``stats`` (flat float32, ``2·p`` per matrix, ``3·p`` for MHE, layout in the module
    docstring) for ``gram_penalty_backward``. ``sides[i]``: 0 = rows (``W Wᵀ``), 1 = cols
    (``Wᵀ W``); ``params``: frame ``[A, B]``, diversity ``[tau, inclusive]``, orthogonality
    ``[]``, mhe ``[s, half, eps, angular]``. Launches per layout class: row norms (grid tiles), Gram
    partials (grid tiles × splits); then the finalize (grid matrices).
    """
    plan = _plan(mats, kind, sides, params)
    cfg = plan.cfg
    values = torch.empty(plan.n_values, dtype=torch.float32, device=plan.device)
    stats = torch.empty(plan.stats_numel, dtype=torch.float32, device=plan.device)
    if plan.n_tiles == 0:
        return values, stats
    scalars, meta = _scalars_and_meta(kind, params)
    # partial row sums per split, laid out like the stats (its norm slots stay unused)
    part = torch.empty(plan.splits * plan.stats_numel, dtype=torch.float32, device=plan.device)
    X = mats[0]
    with on_device(X):
        for ln in plan.launches:
            _row_norm_kernel[(ln.n_tiles,)](plan.ptrs, X, plan.groups, ln.tiles, stats, STATS_ROWS=plan.stats_rows,
                                            LAYOUT=ln.layout, ALIGN=ln.align, BLOCK_I=cfg["BLOCK_I"],
                                            BLOCK_K=cfg["BLOCK_K"])
            _gram_fwd_kernel[(ln.n_tiles, plan.splits)](plan.ptrs, X, plan.groups, ln.tiles, stats, part,
                                                        plan.stats_numel, plan.jps, *scalars, **meta,
                                                        LAYOUT=ln.layout, ALIGN=ln.align,
                                                        **cfg)
        _finalize_kernel[(plan.n_values,)](plan.groups, plan.mats, stats, part, plan.stats_numel, plan.splits, values,
                                           *scalars[:2], KIND=meta["KIND"], HALF=meta["HALF"],
                                           STATS_ROWS=plan.stats_rows, BLOCK=BLOCK_FIN)
    return values, stats


def gram_penalty_backward_flat(mats: list[torch.Tensor], kind: str, sides: list[int], params: list[float],
                               stats: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Every ``dW_i`` of ``Σ_b grad[off_i + b]·value_b`` in one flat ``dtype`` buffer: ``mats[i]``'s
    gradient, contiguous with its shape, at ``Σ_{i'<i} |mats[i']|``.

    ``stats`` is the forward's second output for the same arguments; ``grad`` has shape
    ``(Σ B_i,)``. P path (every Gram side ≤ P_MAX_SIDE), per layout class: the coefficients
    (grid tiles × splits) into a ``Σ B·p²`` float32 buffer, then the product ``P·X`` (grid row
    blocks × column blocks), which writes each gradient element once, in ``dtype``. Split
    path: per layout class the backward kernel (grid tiles × splits) into zeroed float32
    partials, then the split reduction into the output (skipped for one float32 split).
    """
    plan = _plan(mats, kind, sides, params)
    cfg = plan.cfg
    # the kernels index stats and grad by the plan's offsets: wrong sizes would read past the end
    if not (isinstance(stats, torch.Tensor) and stats.dim() == 1 and stats.numel() == plan.stats_numel
            and stats.dtype == torch.float32 and stats.device == plan.device):
        got = (f"{stats.dtype} of shape {tuple(stats.shape)} on {stats.device}" if isinstance(stats, torch.Tensor)
               else type(stats).__name__)
        raise ValueError(f"gram_penalty_backward: stats must be the forward's float32 stats, shape "
                         f"({plan.stats_numel},) on {plan.device}; got {got}")
    if not (isinstance(grad, torch.Tensor) and grad.dim() == 1 and grad.numel() == plan.n_values
            and grad.dtype.is_floating_point and grad.device == plan.device):
        got = (f"{grad.dtype} of shape {tuple(grad.shape)} on {grad.device}" if isinstance(grad, torch.Tensor)
               else type(grad).__name__)
        raise ValueError(f"gram_penalty_backward: grad must be a floating tensor of shape ({plan.n_values},) "
                         f"(one entry per matrix) on {plan.device}; got {got}")
    if plan.n_tiles == 0:  # no matrix with a Gram row: every gradient is empty or zero
        return torch.zeros(plan.out_numel, dtype=dtype, device=plan.device)
    scalars, meta = _scalars_and_meta(kind, params)
    # (read with its stride: an expanded grad, as from values.sum(), is not copied)
    if grad.dtype != torch.float32:
        grad = grad.to(dtype=torch.float32)
    if not stats.is_contiguous():
        stats = stats.contiguous()
    X = mats[0]
    with on_device(X):
        if plan.product_path:
            pbuf = torch.empty(plan.p_numel, dtype=torch.float32, device=plan.device)
            out = torch.empty(plan.out_numel, dtype=dtype, device=plan.device)
            for ln in plan.launches:
                _gram_coef_kernel[(ln.n_tiles, plan.splits)](
                    plan.ptrs, X, plan.groups, ln.tiles, stats, grad, grad.stride(0), pbuf, plan.jps, *scalars, **meta,
                    LAYOUT=ln.layout, ALIGN=ln.align, **cfg)
                if ln.n_ptiles:
                    _gram_product_kernel[(ln.n_ptiles,)](plan.ptrs, X, plan.groups, ln.ptiles, pbuf, out,
                                                         LAYOUT=ln.layout, ALIGN=ln.align, BLOCK_I=PRODUCT_BLOCK_I,
                                                         BLOCK_J=PRODUCT_BLOCK_J, BLOCK_N=BLOCK_N,
                                                         IEEE=cfg["NATIVE_DOT"] and cfg["DOT_PRECISION"] == "ieee",
                                                         num_warps=PRODUCT_WARPS)
            return out
        direct = plan.bwd_splits == 1 and dtype == torch.float32
        # one float32 dX slice per split, added in a fixed order afterwards (no atomics)
        part = torch.zeros((1 if direct else plan.bwd_splits) * plan.out_numel, dtype=torch.float32,
                           device=plan.device)
        for ln in plan.launches:
            _gram_bwd_kernel[(ln.n_tiles, plan.bwd_splits)](
                plan.ptrs, X, part, plan.out_numel, plan.bwd_jps, plan.groups, ln.tiles, stats, grad, grad.stride(0),
                *scalars, **meta, LAYOUT=ln.layout, ALIGN=ln.align, **cfg)
        if direct:
            return part
        out = torch.empty(plan.out_numel, dtype=dtype, device=plan.device)
        _split_sum_kernel[(triton.cdiv(plan.out_numel, BLOCK_RED),)](part, out, plan.out_numel, plan.bwd_splits,
                                                                     BLOCK=BLOCK_RED)
        return out


def _split_flat(flat: torch.Tensor, mats) -> list[torch.Tensor]:
    """The flat gradient buffer as one view per input, with its shape."""
    return [d.view(w.shape) for d, w in zip(flat.split([w.numel() for w in mats]), mats)]


def gram_penalty_backward(mats: list[torch.Tensor], kind: str, sides: list[int], params: list[float],
                          stats: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """Gradients ``dW_i`` (float32, shape of ``mats[i]``, views of one buffer) of
    ``Σ_b grad[off_i + b]·value_b``: ``gram_penalty_backward_flat`` in float32."""
    return _split_flat(gram_penalty_backward_flat(mats, kind, sides, params, stats, grad, torch.float32), mats)


# ----------------------------------------------------------------------------- custom ops
# Python custom ops: the launchers use a cached plan (tables on the device). CUDA tensors, or CPU
# tensors when interpreted (TRITON_INTERPRET=1, how CI runs them); float16 / bfloat16 / float32.

@torch.library.custom_op("regkernels::gram_penalty_triton", mutates_args=())
def gram_penalty_triton(mats: list[torch.Tensor], kind: str, sides: list[int],
                        params: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return gram_penalty_forward(mats, kind, sides, params)


@gram_penalty_triton.register_fake
def _gram_penalty_triton_fake(mats, kind, sides, params):
    device = mats[0].device if mats else torch.device("cpu")
    values = torch.empty(sum(w.shape[0] for w in mats), dtype=torch.float32, device=device)
    stats = torch.empty(stats_numel(mats, kind, sides, params), dtype=torch.float32, device=device)
    return values, stats


@torch.library.custom_op("regkernels::gram_penalty_triton_bwd", mutates_args=())
def gram_penalty_triton_bwd(mats: list[torch.Tensor], kind: str, sides: list[int], params: list[float],
                            stats: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    # one flat buffer in the inputs' dtype (the kernels write it once); the callers split it into
    # views, so the op has a single, non-aliasing output and no copy
    dtype = mats[0].dtype if mats else torch.float32
    return gram_penalty_backward_flat(mats, kind, sides, params, stats, grad, dtype)


@gram_penalty_triton_bwd.register_fake
def _gram_penalty_triton_bwd_fake(mats, kind, sides, params, stats, grad):
    device = mats[0].device if mats else torch.device("cpu")
    dtype = mats[0].dtype if mats else torch.float32
    return torch.empty(sum(w.numel() for w in mats), dtype=dtype, device=device)


def _gram_penalty_triton_setup(ctx, inputs, output):
    mats, kind, sides, params = inputs
    ctx.kind, ctx.sides, ctx.params = kind, list(sides), list(params)
    ctx.save_for_backward(output[1], *mats)
    ctx.set_materialize_grads(False)  # the stats get no gradient: no zero tensor for them


def _gram_penalty_triton_backward(ctx, grad_values, _grad_stats):
    stats, *mats = ctx.saved_tensors
    if grad_values is None:  # (grads are not materialized) the values were not differentiated
        return [None] * len(mats), None, None, ([] if not ctx.params else None)
    # (the bwd op finds the forward's plan in the cache: same key, same object)
    flat = torch.ops.regkernels.gram_penalty_triton_bwd(mats, ctx.kind, ctx.sides, ctx.params, stats, grad_values)
    # an empty params list (orthogonality) is a pytree node, not a leaf: mirror it
    return _split_flat(flat, mats), None, None, ([] if not ctx.params else None)


def _triton_bwd_setup(ctx, inputs, output):
    ctx.kind = inputs[1]


def _triton_bwd_backward(ctx, *grads):
    raise RuntimeError(GK.no_double_backward(ctx.kind, "triton"))


gram_penalty_triton.register_autograd(_gram_penalty_triton_backward, setup_context=_gram_penalty_triton_setup)
# the gradient's own backward: the kernel's P is recomputed from constants of the forward
# (row statistics), not differentiated, so a second derivative is refused
gram_penalty_triton_bwd.register_autograd(_triton_bwd_backward, setup_context=_triton_bwd_setup)


# ----------------------------------------------------------------------------- torch.func
# A custom op's register_autograd cannot run under torch.func transforms: functorch-wrapped
# inputs go through these Functions, which call the custom ops below the transforms
# (regkernels/_gram_kernels.py). Plain tensors keep the custom op's own autograd.

def _stats_sizes(mats: list[torch.Tensor], kind: str, sides, params, batch_size: int) -> list[int]:
    """Stats floats per vmap index of each stack of ``mats`` (each ``(batch_size·B, ·, ·)``)."""
    return [stats_numel([w], kind, [side], params) // batch_size for w, side in zip(mats, sides)]


class _GramPenaltyTritonFunction(torch.autograd.Function):
    """gram_penalty_triton for torch.func: inputs ``(kind, sides, params, *mats)`` (each
    ``(B, m, n)``), outputs ``(values, stats)``, the stats returned (non-differentiable) so that
    torch.func can save them."""

    @staticmethod
    def forward(kind, sides, params, *mats):
        return torch.ops.regkernels.gram_penalty_triton(list(mats), kind, list(sides), list(params))

    @staticmethod
    def setup_context(ctx, inputs, output):
        kind, sides, params, *mats = inputs
        ctx.kind, ctx.sides, ctx.params = kind, sides, params
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1], *mats)

    @staticmethod
    def backward(ctx, grad_values, _grad_stats):
        stats, *mats = ctx.saved_tensors
        grads = _GramPenaltyTritonGradFunction.apply(ctx.kind, ctx.sides, ctx.params, stats, grad_values, *mats)
        return (None, None, None, *grads)

    @staticmethod
    def vmap(info, in_dims, kind, sides, params, *mats):
        V = info.batch_size
        mats = [w.flatten(0, 1) for w in GK.to_front(V, in_dims[3:], mats)]  # (V·B, m, n)
        values, stats = _GramPenaltyTritonFunction.apply(kind, sides, params, *mats)
        values = GK.batch_major(values, [w.shape[0] // V for w in mats], V)
        stats = GK.batch_major(stats, _stats_sizes(mats, kind, sides, params, V), V)
        return (values, stats), (0, 0)


class _GramPenaltyTritonGradFunction(torch.autograd.Function):
    """gram_penalty_triton_bwd as a graph node for torch.func: the first gradient; differentiating
    it raises, naming backend='reference'. Inputs ``(kind, sides, params, stats, grad, *mats)``."""

    @staticmethod
    def forward(kind, sides, params, stats, grad, *mats):
        flat = torch.ops.regkernels.gram_penalty_triton_bwd(list(mats), kind, list(sides), list(params), stats, grad)
        return tuple(_split_flat(flat, mats))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.kind = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(GK.no_double_backward(ctx.kind, "triton"))

    @staticmethod
    def vmap(info, in_dims, kind, sides, params, stats, grad, *mats):
        V = info.batch_size
        mats = [w.flatten(0, 1) for w in GK.to_front(V, in_dims[5:], mats)]
        stats, grad = GK.to_front(V, in_dims[3:5], [stats, grad])
        stats = GK.item_major(stats, _stats_sizes(mats, kind, sides, params, V))
        grad = GK.item_major(grad, [w.shape[0] // V for w in mats])
        grads = _GramPenaltyTritonGradFunction.apply(kind, sides, params, stats, grad, *mats)
        return tuple(d.view(V, -1, *d.shape[1:]) for d in grads), (0,) * len(grads)


# ----------------------------------------------------------------------------- table entries

def _gram_values(mats: list[torch.Tensor], kind: str, sides: list[int], params: list[float]) -> torch.Tensor:
    """float32 values, one per matrix of ``mats`` (each ``(B, m, n)``)."""
    if functorch_wrapped(*mats):
        return _GramPenaltyTritonFunction.apply(kind, tuple(sides), tuple(params), *mats)[0]
    values, _ = torch.ops.regkernels.gram_penalty_triton(mats, kind, sides, params)
    return values


def _penalty_values(mats: list[torch.Tensor], kind: str, sides: list[int], params: list[float]) -> torch.Tensor:
    if kind == "orthogonality":  # the kernel computes ‖V − I‖²; the norm is its sqrt (autograd)
        values = _gram_values(mats, kind, sides, [])
        return values if params[0] else R.sqrt0(values)  # subgradient 0 at Gram(W) = I
    return _gram_values(mats, kind, sides, params)


def _gram_penalty_one(kind: str, W: torch.Tensor, side: int, params: list[float]) -> torch.Tensor:
    return _penalty_values([GK.as_batch(W)], kind, [side], params).view(W.shape[:-2]).to(W.dtype)


def frame_penalty(W: torch.Tensor, A: float, B: float, side: str = "auto") -> torch.Tensor:
    return _gram_penalty_one("frame", W, GK.side_code(W, "frame", side), [float(A), float(B)])


def diversity_penalty(W: torch.Tensor, tau: float, inclusive: bool = True) -> torch.Tensor:
    return _gram_penalty_one("diversity", W, 0, [float(tau), float(inclusive)])


def orthogonality_penalty(W: torch.Tensor, side: str = "auto", squared: bool = True) -> torch.Tensor:
    return _gram_penalty_one("orthogonality", W, GK.side_code(W, "orthogonality", side), [float(squared)])


def mhe_penalty(W: torch.Tensor, s: int = 2, half: bool = False, eps: float = 1e-4,
                angular: bool = False) -> torch.Tensor:
    return _gram_penalty_one("mhe", W, 0, [float(s), float(half), float(eps), float(angular)])


def penalty_multi(weights: list[torch.Tensor], kind: str, groups: list[int], **args) -> torch.Tensor:
    """Every weight of the list in one grouped launch per pass (one dtype; the public op checks).
    kind="srip" has no Gram to fuse: each weight goes through the SRIP composite."""
    if kind == "srip":
        return _composite.srip_penalty_multi(weights, groups, args["b"], args["n_iter"])
    mats = [R.as_matrix(w, g) for w, g in zip(weights, groups)]
    sides = [GK.side_code(mat, kind, args.get("side", "auto")) for mat in mats]
    values = _penalty_values([GK.as_batch(mat) for mat in mats], kind, sides, GK.kernel_params(kind, args))
    return GK.group_means(values, mats).to(weights[0].dtype)

