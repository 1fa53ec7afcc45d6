"""Triton kernels for the implicit conv frame statistics (docs/conv.md#conv_frame_penalty): the per-class diagonal
``d`` and Gershgorin radius ``r`` of a convolution operator's Gram, and their backward to the
tap Gram, fused so that the class blocks ``V_κ`` never reach memory.

This is the fused form of the contraction in ``regkernels.composite.conv`` (``_contract`` /
``_stats_forward`` / ``_stats_backward``), with the three per-dim class tables combined into
one table over the flattened taps and offsets:

* ``X (G, Cx, K, Cx, K)``: the per-group tap Gram (``K = ∏k_i``; the kernels read all of it, the
  GEMM that builds it uses its symmetry, below);
* ``tab (NC, K, K, Q)``: per class ``κ`` the combined class table ``tab[κ, t, t', q] =
  Π_i Cls_i[κ_i, t_i, t'_i, q_i]`` (small non-negative integers, stored as float32), ``κ``, ``t``
  and ``q`` flattened row-major over the three dims; ``zero`` is the flat index of offset 0;
* ``V_κ[a, a', q] = Σ_{t,t'} X[g, a, t, a', t'] · tab[κ, t, t', q]`` for each group ``g``;
* ``d[g, κ, a] = V_κ[a, a, zero]``, ``r[g, κ, a] = Σ_{(a', q) ≠ (a, zero)} |V_κ[a, a', q]|`` (the
  diagonal entry is masked out, not subtracted: no cancellation).

Index maps. For fixed ``(g, a)`` the slab ``X[g, a]`` is a ``(K, Cx, K)`` block; read as a matrix
with rows ``a'`` and columns ``kk = t·K + t'`` (the pair axis of ``tab[κ]`` viewed ``(K·K, Q)``) the
element ``(a', kk)`` sits at ``((g·Cx + a)·K + t)·Cx·K + a'·K + t'``. So a tile of ``V_κ`` for a
block of rows ``a'`` and a chunk of offsets ``q`` is one GEMM over ``kk``:
``V[a', q] = X[g, a][a', kk] @ tab[κ][kk, q]``, loaded with computed pointers (no copy of ``X``).
The ``kk`` axis is taken in chunks of ``BLOCK_KK`` and ``q`` in chunks of ``BLOCK_Q`` (``K·K`` is
729 for a 3×3×3 kernel, ``Q`` 125 for its 5×5×5 offsets), so any kernel size fits in registers.

* forward: program ``pid = (g·NC + κ)·Cx + a`` (one per output entry, all on grid axis 0) loops
  over the blocks of ``a'`` and chunks of ``q`` in a fixed order, builds each ``V`` tile in fp32
  registers and reduces it at once: ``|V|`` off the diagonal entry into ``r``, the entry
  ``(a' = a, q = zero)`` into ``d``. Deterministic, no atomics, nothing but ``d`` and ``r`` stored.
* backward: ``gV_κ = grad_r · sign(V_κ)`` off the diagonal entry (sign(0) = 0), ``grad_d`` on it, and
  ``gX[g, a, t, a', t'] = Σ_κ Σ_q gV_κ[a, a', q] · tab[κ, t, t', q]``. Program
  ``pid = (g·Cx + a)·⌈Cx/BLOCK_A⌉ + a'-block`` owns the rows ``a'`` of its block of the slab
  ``gX[g, a]`` (no atomics): for each ``κ`` (in order) and each ``q`` chunk it recomputes the ``V``
  tile exactly as the forward does, forms ``gV`` and adds ``gV @ tab[κ][kk, q]ᵀ`` into every
  ``kk`` chunk of its rows by read-modify-write of fp32 global memory (zero-filled by the
  launcher; load and store use the same pointer tensor, so on a GPU each element is read and
  written by the same thread). The RMW replaces a ``BLOCK_A × K·K`` register accumulator,
  which does not fit for 3-D kernels.

Numerics: float32 throughout, ``tl.dot`` with ``input_precision="ieee"`` (no TF32 on GPU). The
table entries are small integers, so each product is exact up to ``X``'s rounding; sums are
fp32 in a fixed order (results differ from the torch path only by summation order). Padding
lanes (``a' ≥ Cx``, ``kk ≥ K·K``, ``q ≥ Q``) load as 0 and are masked again after the GEMMs, so an
inf / NaN in ``X`` or in the incoming gradients cannot leak into valid entries through a padded
column; valid entries follow IEEE like the torch path (``grad_r = NaN`` times ``sign 0`` is NaN).

Indexing: offsets inside one ``(g, a)`` slab (``K·Cx·K`` elements) and one class table
(``K·K·Q``) are int32, checked by the launchers; slab and table bases are int64. Not importable
without Triton: import this module only after ``regkernels._ext.has_triton()``.

Host GEMMs (torch, batched over the groups, so a call's launch and GEMM count does not grow
with the groups: layers of one geometry stacked as one grouped conv cost one call):

* the tap Gram ``X̂ = ẐᵀẐ`` (``Ẑ = Z/σ``, ``tap_gram``): symmetric, so above ``2·_GRAM_BLOCK_COLS``
  columns only its block upper triangle is multiplied (``nb`` column blocks, ``(1 + 1/nb)/2`` of
  the flops, one bmm per block written in place) and the strict lower block triangle is a
  transposed copy;
* the backward's ``gZ = Z (gX + gXᵀ)``: one GEMM.

The forward keeps ``X̂`` (``4·G·(Cx·K)²`` bytes) when a gradient is needed: the custom op's third
output (``keep_gram``; empty otherwise), which the backward op takes instead of redoing the GEMM
(and recomputes ``X̂`` from the same ``Z/σ`` when it is empty). Every float32 GEMM runs inside
``ieee_fp32_matmul``: torch has no per-op precision argument, and a user's
``torch.backends.cuda.matmul.allow_tf32 = True`` (or ``set_float32_matmul_precision("high")``, or
``torch.backends.cuda.matmul.fp32_precision = "tf32"``) would otherwise make cuBLAS approximate
``X`` in TF32 silently; the process-wide flags are switched to IEEE around the GEMMs and restored
(not thread-safe for other threads' matmuls, which may run at IEEE meanwhile; see its docstring).

Layout: kernels → launchers → host GEMMs → the custom ops ``regkernels::conv_frame_stats_triton``
(+ ``_backward``) with fakes and autograd → ``conv_frame_penalty`` / ``conv_gershgorin_bounds``, the
``"triton"`` rows of the conv table (float16 / bfloat16 / float32 weights, computed in float32;
docs/conv.md).
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch
import triton
import triton.language as tl

from regkernels import _geometry as CG
from regkernels._numerics import through_function
from regkernels.triton._launch import Budget, on_device
from regkernels.reference import conv as R

# ----------------------------------------------------------------------------- constants

# Block sizes: each is the next power of two of its extent, at least 16 (tl.dot needs every
# dim ≥ 16) and at most the cap. A V tile is BLOCK_A × BLOCK_Q fp32 built from a BLOCK_A ×
# BLOCK_KK slice of X and a BLOCK_KK × BLOCK_Q slice of the table. The float32 IEEE products
# run on FMA units, whose operand fragments grow with every cap: compiled for sm_90, caps of
# 32 × 64 × 64 took 255 registers and spilled (12 % occupancy); 16 × 16 × 16 takes 80 (38 %,
# GPU_BUDGETS below). GPU tuning would autotune the caps and num_warps / num_stages, hoist the
# X tile out of the class loop when K·K ≤ BLOCK_KK (it is the same for every κ and q chunk; L1
# serves it now), and keep the backward's gX rows in registers when K·K fits one chunk.
MAX_BLOCK_A = 16       # rows a' of a V tile
MAX_BLOCK_KK = 16      # tap pairs (t, t') per GEMM step
MAX_BLOCK_Q = 16       # offsets q per V tile
NUM_WARPS = 4

_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _v_tile(x_slab, tab_k, rows, a, mask_a, qs, mask_q, ZERO, Cx, K, KK, Q,
            BLOCK_A: tl.constexpr, BLOCK_KK: tl.constexpr, BLOCK_Q: tl.constexpr):
    """``V[a', q] = Σ_kk X[g, a][a', kk] · tab[κ][kk, q]`` for the rows ``rows`` and offsets ``qs``,
    with the tile's masks: ``diag`` (the entry ``a' = a, q = ZERO``) and ``valid`` (not padding).

    ``x_slab`` points at ``X[g, a, 0, 0, 0]``, ``tab_k`` at ``tab[κ, 0, 0, 0]``. fp32 accumulator,
    ``kk`` in chunks of ``BLOCK_KK`` in a fixed order; out-of-range lanes load as 0. The forward
    and the backward share this helper, so a recomputed tile is the forward's number.
    """
    acc = tl.zeros((BLOCK_A, BLOCK_Q), dtype=tl.float32)
    for kk0 in range(0, KK, BLOCK_KK):
        kk = kk0 + tl.arange(0, BLOCK_KK)
        mask_kk = kk < KK
        t = kk // K                 # kk ≥ 0: no negative operand
        col = t * (Cx * K) + (kk - t * K)
        x = tl.load(x_slab + rows[:, None] * K + col[None, :],
                    mask=mask_a[:, None] & mask_kk[None, :], other=0.0)
        tb = tl.load(tab_k + kk[:, None] * Q + qs[None, :],
                     mask=mask_kk[:, None] & mask_q[None, :], other=0.0)
        acc = tl.dot(x, tb, acc, input_precision="ieee")
    diag = (rows[:, None] == a) & (qs[None, :] == ZERO)
    valid = mask_a[:, None] & mask_q[None, :]
    return acc, diag, valid


# The problem sizes gain nothing from Triton's ==1 / divisible-by-16 specialization (they
# index gathers through computed pointers, never a contiguous vector access): one compiled
# kernel per block configuration serves every conv geometry.
_GEOMETRY = ("NC", "Cx", "K", "KK", "Q", "ZERO", "N_AB")


@triton.jit(do_not_specialize=_GEOMETRY[:6])
def _class_stats_fwd_kernel(X, TAB, D, R, NC, Cx, K, KK, Q, ZERO,
                            BLOCK_A: tl.constexpr, BLOCK_KK: tl.constexpr, BLOCK_Q: tl.constexpr):
    """``d`` and ``r`` of one ``(g, κ, a)``: program ``pid = (g·NC + κ)·Cx + a``, the flat index of
    the entry in the ``(G, NC, Cx)`` outputs."""
    pid = tl.program_id(0)
    a = pid % Cx
    gk = pid // Cx
    kappa = gk % NC
    g = gk // NC
    x_slab = X + (g * Cx + a).to(tl.int64) * K * (Cx * K)
    tab_k = TAB + kappa.to(tl.int64) * (KK * Q)

    # per-row partials, reduced once at the end (fixed order: deterministic)
    r_acc = tl.zeros((BLOCK_A,), dtype=tl.float32)
    d_acc = tl.zeros((BLOCK_A,), dtype=tl.float32)
    for a0 in range(0, Cx, BLOCK_A):
        rows = a0 + tl.arange(0, BLOCK_A)
        mask_a = rows < Cx
        for q0 in range(0, Q, BLOCK_Q):
            qs = q0 + tl.arange(0, BLOCK_Q)
            mask_q = qs < Q
            V, diag, valid = _v_tile(x_slab, tab_k, rows, a, mask_a, qs, mask_q, ZERO, Cx, K, KK, Q, BLOCK_A,
                                     BLOCK_KK, BLOCK_Q)
            # the diagonal entry is masked out of r, not subtracted (docs/gram.md#frame_penalty); padding
            # lanes are masked too (0 · inf in a padded column would be NaN)
            r_acc += tl.sum(tl.where(valid & ~diag, tl.abs(V), 0.0), axis=1)
            d_acc += tl.sum(tl.where(diag, V, 0.0), axis=1)   # one non-zero in all: exact
    tl.store(D + pid, tl.sum(d_acc, axis=0))
    tl.store(R + pid, tl.sum(r_acc, axis=0))


@triton.jit(do_not_specialize=_GEOMETRY)
def _class_stats_bwd_kernel(X, TAB, GD, GR, GX, NC, Cx, K, KK, Q, ZERO, N_AB,
                            BLOCK_A: tl.constexpr, BLOCK_KK: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Rows ``a'`` of one block of ``gX[g, a]`` (as ``(a', kk)``): ``Σ_κ Σ_q gV_κ[a, a', q] tab[κ][kk, q]``.

    Program ``pid = (g·Cx + a)·N_AB + a'-block``. Classes and ``q`` chunks are visited in a fixed
    order and each contribution is added by read-modify-write of the program's own rows of the
    zero-filled ``GX`` (deterministic, no atomics).
    """
    pid = tl.program_id(0)
    ab = pid % N_AB
    ga = pid // N_AB                # g·Cx + a
    a = ga % Cx
    g = ga // Cx
    slab = ga.to(tl.int64) * K * (Cx * K)
    x_slab = X + slab
    gx_slab = GX + slab
    rows = ab * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = rows < Cx

    # pointers walk the classes (64-bit pointer arithmetic: no int32 product of κ and KK·Q)
    tab_k = TAB
    st = g * NC * Cx + a            # (g, κ = 0, a) in the (G, NC, Cx) grads; < G·NC·Cx (checked)
    for kappa in range(0, NC):
        gd = tl.load(GD + st)
        gr = tl.load(GR + st)
        for q0 in range(0, Q, BLOCK_Q):
            qs = q0 + tl.arange(0, BLOCK_Q)
            mask_q = qs < Q
            V, diag, valid = _v_tile(x_slab, tab_k, rows, a, mask_a, qs, mask_q, ZERO, Cx, K, KK, Q, BLOCK_A,
                                     BLOCK_KK, BLOCK_Q)
            sign = tl.where(V > 0, 1.0, tl.where(V < 0, -1.0, 0.0))   # sign(0) = 0, docs/gram.md#conventions
            # ∂d/∂V = 1 at the diagonal entry, ∂r/∂V = sign(V) elsewhere; padding lanes are
            # exactly 0 so a NaN/inf grad_r cannot reach valid rows through the GEMM below
            gV = tl.where(diag, gd, tl.where(valid, gr * sign, 0.0))
            for kk0 in range(0, KK, BLOCK_KK):
                kk = kk0 + tl.arange(0, BLOCK_KK)
                mask_kk = kk < KK
                t = kk // K
                col = t * (Cx * K) + (kk - t * K)
                # tab[κ][kk, q]ᵀ as a (BLOCK_Q, BLOCK_KK) tile: a transposed load, no copy
                tbT = tl.load(tab_k + kk[None, :] * Q + qs[:, None],
                              mask=mask_q[:, None] & mask_kk[None, :], other=0.0)
                upd = tl.dot(gV, tbT, input_precision="ieee")
                ptr = gx_slab + rows[:, None] * K + col[None, :]
                m = mask_a[:, None] & mask_kk[None, :]
                tl.store(ptr, tl.load(ptr, mask=m, other=0.0) + upd, mask=m)
        tab_k += KK * Q
        st += Cx


# Static limits on sm_90 (python -m regkernels.bench.gpu_static, docs/design.md#gpu-static-report).
# The GEMMs take float32 in IEEE precision (the table is exact, X is the float32 tap Gram), so no
# tensor-core instructions are required of them.
GPU_BUDGETS = {
    "_class_stats_fwd_kernel": Budget(),
    "_class_stats_bwd_kernel": Budget(),
}


# ----------------------------------------------------------------------------- host launchers

def _block(n: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(max(n, 1))))


def _problem(X: torch.Tensor, tab: torch.Tensor, zero: int, name: str):
    """Validated ``(G, Cx, K, NC, Q)`` of a call, and ``X``, ``tab`` made contiguous."""
    if X.dim() != 5 or X.shape[1] != X.shape[3] or X.shape[2] != X.shape[4]:
        raise ValueError(f"{name}: X must be (G, Cx, K, Cx, K); got {tuple(X.shape)}")
    G, cx, K = X.shape[0], X.shape[1], X.shape[2]
    if tab.dim() != 4 or tab.shape[1] != K or tab.shape[2] != K:
        raise ValueError(f"{name}: tab must be (NC, {K}, {K}, Q); got {tuple(tab.shape)}")
    nc, Q = tab.shape[0], tab.shape[3]
    if not 0 <= zero < Q:
        raise ValueError(f"{name}: zero must be in [0, {Q}); got {zero}")
    if X.dtype != torch.float32 or tab.dtype != torch.float32:
        raise ValueError(f"{name}: X and tab must be float32; got {X.dtype}, {tab.dtype}")
    if X.device != tab.device:
        raise ValueError(f"{name}: X and tab must share a device; got {X.device}, {tab.device}")
    # int32 offsets inside a slab / a class table; program ids on grid axis 0
    if K * K * cx > _INT32_MAX or K * K * Q > _INT32_MAX or G * max(nc, 1) * cx > _INT32_MAX:
        raise ValueError(f"{name}: problem (G={G}, Cx={cx}, K={K}, NC={nc}, Q={Q}) exceeds int32 indexing")
    meta = dict(BLOCK_A=_block(cx, MAX_BLOCK_A), BLOCK_KK=_block(K * K, MAX_BLOCK_KK),
                BLOCK_Q=_block(Q, MAX_BLOCK_Q), num_warps=NUM_WARPS)
    return (G, cx, K, nc, Q), X.contiguous(), tab.contiguous(), meta


def class_stats_forward(X: torch.Tensor, tab: torch.Tensor, zero: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d, r)``, each ``(G, NC, Cx)`` float32: ``d[g, κ, a] = V_κ[a, a, zero]`` and
    ``r[g, κ, a] = Σ_{(a', q) ≠ (a, zero)} |V_κ[a, a', q]|`` (module docstring).

    ``X (G, Cx, K, Cx, K)`` and ``tab (NC, K, K, Q)`` are float32 on one device. One launch of
    ``G·NC·Cx`` programs (grid axis 0); empty problems return zeros without launching.
    """
    (G, cx, K, nc, Q), X, tab, meta = _problem(X, tab, zero, "class_stats_forward")
    d = torch.zeros((G, nc, cx), dtype=torch.float32, device=X.device)
    r = torch.zeros_like(d)
    if d.numel() == 0 or K == 0:  # no entries, or no taps (V = 0: d = r = 0)
        return d, r
    with on_device(X):
        _class_stats_fwd_kernel[(G * nc * cx,)](X, tab, d, r, nc, cx, K, K * K, Q, zero, **meta)
    return d, r


def class_stats_backward(X: torch.Tensor, tab: torch.Tensor, zero: int, grad_d: torch.Tensor,
                         grad_r: torch.Tensor) -> torch.Tensor:
    """``gX (G, Cx, K, Cx, K)`` float32: ``gX[g, a, t, a', t'] = Σ_κ Σ_q gV_κ[a, a', q] tab[κ, t, t', q]``
    with ``gV_κ = grad_r[g, κ, a] · sign(V_κ)`` off the entry ``(a, zero)`` and ``grad_d[g, κ, a]`` on it.

    ``grad_d``, ``grad_r``: ``(G, NC, Cx)``, any float dtype and strides (cast to contiguous
    float32). One launch of ``G·Cx·⌈Cx/BLOCK_A⌉`` programs (grid axis 0) after torch's zero
    fill of ``gX``; each element of ``gX`` is owned by one program. Deterministic.
    """
    (G, cx, K, nc, Q), X, tab, meta = _problem(X, tab, zero, "class_stats_backward")
    for name, grad in (("grad_d", grad_d), ("grad_r", grad_r)):
        if tuple(grad.shape) != (G, nc, cx):
            raise ValueError(f"class_stats_backward: {name} must be {(G, nc, cx)}; got {tuple(grad.shape)}")
    gX = torch.zeros((G, cx, K, cx, K), dtype=torch.float32, device=X.device)
    if gX.numel() == 0 or nc == 0:  # no entries, or no classes (nothing depends on X)
        return gX
    gd = grad_d.to(device=X.device, dtype=torch.float32).contiguous()
    gr = grad_r.to(device=X.device, dtype=torch.float32).contiguous()
    n_ab = triton.cdiv(cx, meta["BLOCK_A"])
    if G * cx * n_ab > _INT32_MAX:
        raise ValueError(f"class_stats_backward: {G * cx * n_ab} programs exceed grid axis 0")
    with on_device(X):
        _class_stats_bwd_kernel[(G * cx * n_ab,)](X, tab, gd, gr, gX, nc, cx, K, K * K, Q, zero, n_ab, **meta)
    return gX


# ----------------------------------------------------------------------------- host GEMMs

# The fp32 precision settings torch reads for a matmul: the legacy float32_matmul_precision
# (``torch.set_float32_matmul_precision``, ``torch.backends.cuda.matmul.allow_tf32``) and the
# per-backend ``fp32_precision`` of the new API (``torch.backends.cuda.matmul.fp32_precision``,
# inherited from ``torch.backends.fp32_precision``). torch has no per-op precision argument.
_PRECISION_KEYS = (("cuda", "matmul"), ("mkldnn", "matmul"))
_REDUCED = ("tf32", "bf16")
_PRECISION_LOCK = threading.Lock()


@contextlib.contextmanager
def ieee_fp32_matmul():
    """Run the enclosed torch matmuls of float32 tensors at IEEE fp32, whatever the user's TF32 /
    bf16 settings, and restore those settings on exit (also on an exception).

    torch (2.14) has no per-op precision: cuBLAS (and oneDNN on CPU) read process-wide flags when
    a matmul is dispatched, so this flips them for the duration of the block. The flags are read on
    the host at dispatch; nothing waits for the device (no sync), and the ops that use this are
    custom-op bodies, which torch.compile never traces (the flip is not baked into a graph).

    * Nothing is touched when both APIs already say IEEE (torch's default): the common case costs
      three getter calls.
    * Otherwise the legacy precision is set to "highest" when it can be read (that also sets the
      new API's cuda / mkldnn matmul to "ieee"), and the new API's cuda / mkldnn matmul to "ieee";
      on exit the legacy value and the two new-API values are set back as read. When the legacy
      value cannot be read (torch refuses to: legacy and new APIs were mixed, e.g. only
      ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` was set) only the new-API values are
      forced and restored; if torch's consistency check then refuses the matmul, its RuntimeError
      propagates (never a silently reduced-precision GEMM).
    * Restored new-API values are the effective ones read (a value inherited from
      ``torch.backends.fp32_precision`` comes back set explicitly, to the same effect).

    Not thread-safe with respect to other threads' matmuls: they may run at IEEE fp32 while the
    block is open (more precise, never less), and a precision another thread sets meanwhile is
    overwritten on exit. Two threads inside this block at once are serialized by a module lock
    (the autograd engine runs CUDA backward passes on its own thread).
    """
    with _PRECISION_LOCK:
        try:
            legacy = torch.get_float32_matmul_precision()
        except RuntimeError:  # mixed legacy / new settings: torch will not report the legacy one
            legacy = None
        new = {key: torch._C._get_fp32_precision_getter(*key) for key in _PRECISION_KEYS}
        if legacy == "highest" and not any(v in _REDUCED for v in new.values()):
            yield
            return
        try:
            if legacy is not None:
                torch.set_float32_matmul_precision("highest")
            for key in _PRECISION_KEYS:
                torch._C._set_fp32_precision_setter(*key, "ieee")
            yield
        finally:
            if legacy is not None:
                torch.set_float32_matmul_precision(legacy)
            for key, value in new.items():
                torch._C._set_fp32_precision_setter(*key, value)


# Above this many columns (Cx·K) the tap Gram is built from its block upper triangle in column
# blocks of at least this width (at most _GRAM_MAX_BLOCKS of them): (1 + 1/nb)/2 of the full
# GEMM's flops plus one transposed copy of the strict lower triangle. Below, one full GEMM.
_GRAM_BLOCK_COLS = 512
_GRAM_MAX_BLOCKS = 8


def tap_gram(Z: torch.Tensor) -> torch.Tensor:
    """``X = Zᵀ Z`` per group, ``(G, N, N)`` float32 for ``Z (G, M, N)``, by IEEE fp32 GEMMs batched
    over the groups (``ieee_fp32_matmul``).

    ``X`` is symmetric: for ``N ≥ 2·_GRAM_BLOCK_COLS`` only the block upper triangle is multiplied
    (block row ``i``: ``X[:, i, i:] = Z[:, :, i]ᵀ Z[:, :, i:]``, one bmm per block written in
    place) and the strict lower block triangle is its transposed copy, so ``X[i, j]`` and
    ``X[j, i]`` are the same number off the diagonal blocks (inside a diagonal block both come
    from the GEMM and may differ in the last bit, as in the full product)."""
    G, _, N = Z.shape
    nb = min(_GRAM_MAX_BLOCKS, N // _GRAM_BLOCK_COLS)
    with ieee_fp32_matmul():
        if nb < 2:
            return Z.mT @ Z
        X = Z.new_empty((G, N, N))
        step = -(-N // nb)
        for c0 in range(0, N, step):
            c1 = min(c0 + step, N)
            torch.matmul(Z[:, :, c0:c1].mT, Z[:, :, c0:], out=X[:, c0:c1, c0:])
            X[:, c1:, c0:c1] = X[:, c0:c1, c1:].mT
    return X


# ----------------------------------------------------------------------------- custom ops

@functools.lru_cache(maxsize=64)
def _combined_table(geo: CG.FrameGeometry, device: torch.device) -> tuple[torch.Tensor, int]:
    """``(NC, K, K, Q)`` float32 table ``Π_i Cls_i[κ_i, t_i, t'_i, q_i]`` (κ, t, q flat row-major
    over the dims, κ in the order of the stats' class axis) and the flat index of offset 0."""
    T0, T1, T2 = CG.class_tables(geo, torch.float32, device)
    with ieee_fp32_matmul():  # small integers: exact either way, but no GEMM of this module runs in TF32
        tab = torch.einsum("iaxr,jbys,kczq->ijkabcxyzrsq", T0, T1, T2)
    K = math.prod(geo.kernel)
    (z0, z1, z2), (_, r1, r2) = (dim.zero for dim in geo.dims), (len(dim.rel) for dim in geo.dims)
    return tab.reshape(geo.n_cls, K, K, -1).contiguous(), (z0 * r1 + z1) * r2 + z2


def _stats_problem(weight, input_size, stride, padding, dilation, groups, circular, rows, op):
    """``(geo, Z, tab, zero, σ)``: the geometry, the factor ``Z (G, ·, Cx·K)`` of the tap Gram, the
    combined class table and ``σ`` (``regkernels._geometry.factor_scale``); sizes checked."""
    geo = CG.stats_geometry(weight, input_size, stride, padding, dilation, circular, rows)
    Z = CG.tap_gram_factor(weight.float(), groups, rows)
    G, cx = Z.shape[0], Z.shape[2] // math.prod(geo.kernel)
    CG.check_frame_work(geo, G, cx, op, R.MAX_WORK_BYTES, triton=True)
    tab, zero = _combined_table(geo, weight.device)
    return geo, Z, tab, zero, CG.factor_scale(Z)


def _gram_shape(weight_shape, geo: CG.FrameGeometry, groups: int) -> tuple[int, int, int]:
    """``(G, Cx·K, Cx·K)``: the kept scaled tap Gram ``X̂`` of a layer."""
    G, _, cx = CG.stats_shape(weight_shape, geo, groups)
    n = cx * math.prod(geo.kernel)
    return G, n, n


def _check_gram(op: str, weight: torch.Tensor, geo: CG.FrameGeometry, groups: int, gram) -> None:
    """``gram``: the forward's third output, float32 ``(G, Cx·K, Cx·K)`` or empty ``(0,)``."""
    shapes = ((0,), _gram_shape(weight.shape, geo, groups))
    if not (isinstance(gram, torch.Tensor) and gram.dtype == torch.float32 and tuple(gram.shape) in shapes
            and gram.device == weight.device and gram.layout == torch.strided):
        got = (f"{tuple(gram.shape)} {gram.dtype} on {gram.device}" if isinstance(gram, torch.Tensor)
               else type(gram).__name__)
        raise RuntimeError(f"{op}: gram must be the forward's float32 output (the scaled tap Gram), of shape "
                           f"{shapes[1]} or (0,), on {weight.device}; got {got}")


@torch.library.custom_op("regkernels::conv_frame_stats_triton", mutates_args=())
def _conv_frame_stats_triton(weight: torch.Tensor, input_size: list[int], stride: list[int],
                             padding: list[int], dilation: list[int], groups: int, circular: bool,
                             rows: bool, keep_gram: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d, r, gram)``: ``d``, ``r`` as ``regkernels::conv_frame_stats``, by the fused kernel (float32),
    and with ``keep_gram`` the scaled tap Gram ``X̂ (G, Cx·K, Cx·K)`` for the backward (else an empty
    ``(0,)`` tensor), so that the backward does not redo the GEMM."""
    op = "regkernels::conv_frame_stats_triton"
    CG.check_op_geometry(op, weight, input_size, stride, padding, dilation, groups, circular)
    geo, Z, tab, zero, scale = _stats_problem(weight, input_size, stride, padding, dilation, groups, circular,
                                              rows, op)
    G, n = Z.shape[0], Z.shape[2]
    K = math.prod(geo.kernel)
    X = tap_gram(Z / scale)
    d, r = class_stats_forward(X.view(G, n // K, K, n // K, K), tab, zero)
    gram = X if keep_gram else X.new_empty((0,))
    return d.mul_(scale).mul_(scale), r.mul_(scale).mul_(scale), gram


@_conv_frame_stats_triton.register_fake
def _conv_frame_stats_triton_fake(weight, input_size, stride, padding, dilation, groups, circular, rows, keep_gram):
    CG.check_op_geometry("regkernels::conv_frame_stats_triton", weight, input_size, stride, padding, dilation,
                         groups, circular)
    geo = CG.stats_geometry(weight, input_size, stride, padding, dilation, circular, rows)
    d = weight.new_empty(CG.stats_shape(weight.shape, geo, groups), dtype=torch.float32)
    gram = weight.new_empty(_gram_shape(weight.shape, geo, groups) if keep_gram else (0,), dtype=torch.float32)
    return d, torch.empty_like(d), gram


@torch.library.custom_op("regkernels::conv_frame_stats_triton_backward", mutates_args=())
def _conv_frame_stats_triton_backward(weight: torch.Tensor, grad_d: torch.Tensor, grad_r: torch.Tensor,
                                      gram: torch.Tensor, input_size: list[int], stride: list[int],
                                      padding: list[int], dilation: list[int], groups: int, circular: bool,
                                      rows: bool) -> torch.Tensor:
    """``∂L/∂weight`` from ``(∂L/∂d, ∂L/∂r)``; ``gram`` as the forward returned it (the tap Gram is
    recomputed when it is empty). One class-contraction launch into ``gX``, then one GEMM."""
    op = "regkernels::conv_frame_stats_triton_backward"
    CG.check_op_geometry(op, weight, input_size, stride, padding, dilation, groups, circular)
    geo, Z, tab, zero, scale = _stats_problem(weight, input_size, stride, padding, dilation, groups, circular,
                                              rows, op)
    CG.check_stats_grads(op, weight, geo, groups, grad_d, grad_r)
    _check_gram(op, weight, geo, groups, gram)
    G, n = Z.shape[0], Z.shape[2]
    K = math.prod(geo.kernel)
    # the kernel needs the forward's V̂ (its signs): the kept X̂, or X̂ again from the same Z/σ
    X = gram if gram.dim() == 3 else tap_gram(Z / scale)
    # gX depends on sign(V̂) = sign(V) and the incoming grads only: no σ to undo
    gX = class_stats_backward(X.view(G, n // K, K, n // K, K), tab, zero, grad_d, grad_r).view(G, n, n)
    with ieee_fp32_matmul():
        gZ = Z @ (gX + gX.mT)  # X = Zᵀ Z
    return CG.weight_of_factor(gZ, weight.shape, rows).to(weight.dtype).contiguous()


@_conv_frame_stats_triton_backward.register_fake
def _conv_frame_stats_triton_backward_fake(weight, grad_d, grad_r, gram, input_size, stride, padding, dilation,
                                           groups, circular, rows):
    op = "regkernels::conv_frame_stats_triton_backward"
    CG.check_op_geometry(op, weight, input_size, stride, padding, dilation, groups, circular)
    geo = CG.stats_geometry(weight, input_size, stride, padding, dilation, circular, rows)
    CG.check_stats_grads(op, weight, geo, groups, grad_d, grad_r)
    _check_gram(op, weight, geo, groups, gram)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


_DOUBLE_BACKWARD = ("conv_frame_penalty / conv_gershgorin_bounds: double backward (a backward with create_graph=True "
                    "differentiated again) is not supported by backend='triton'; backend='reference' supports it")


def _stats_setup(ctx, inputs, output) -> None:
    weight, *geometry, _keep = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(weight, output[2])
    # X̂ is the backward's cache, not a differentiable result: a gradient into it would be dropped
    ctx.mark_non_differentiable(output[2])


def _stats_op_backward(ctx, grad_d, grad_r, _grad_gram):
    weight, gram = ctx.saved_tensors
    gW = torch.ops.regkernels.conv_frame_stats_triton_backward(weight, grad_d, grad_r, gram, *ctx.geometry)
    return (gW,) + (None,) * 8


def _refuse_double_backward(ctx, *grads):
    # the second derivative of d / r (through sign(V) and the tap Gram) is not implemented, and
    # torch's default for an op without autograd is a warning and a silent 0
    raise RuntimeError(_DOUBLE_BACKWARD)


def _no_context(ctx, inputs, output) -> None:
    pass


# the raw ops stay differentiable (torch.ops.regkernels.*, opcheck); the entries below go through
# _FrameStats, which torch.func can transform
_conv_frame_stats_triton.register_autograd(_stats_op_backward, setup_context=_stats_setup)
_conv_frame_stats_triton_backward.register_autograd(_refuse_double_backward, setup_context=_no_context)


class _FrameStats(torch.autograd.Function):
    """``regkernels::conv_frame_stats_triton`` for the entries: a custom op's ``register_autograd``
    does not run under ``torch.func.grad``, an autograd.Function with ``setup_context`` does; its
    vmap rule runs the op once per layer. Taken under torch.func and torch.compile, the raw op
    otherwise (``regkernels._numerics.through_function``)."""

    @staticmethod
    def forward(weight, input_size, stride, padding, dilation, groups, circular, rows, keep_gram):
        return torch.ops.regkernels.conv_frame_stats_triton(weight, input_size, stride, padding, dilation, groups,
                                                            circular, rows, keep_gram)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _stats_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_d, grad_r, _grad_gram):
        weight, gram = ctx.saved_tensors
        return (_FrameStatsBackward.apply(weight, grad_d, grad_r, gram, *ctx.geometry),) + (None,) * 8

    @staticmethod
    def vmap(info, in_dims, *args):
        return CG.vmap_by_loop(_FrameStats.apply, info, in_dims, *args)


class _FrameStatsBackward(torch.autograd.Function):
    """``regkernels::conv_frame_stats_triton_backward``, differentiable once: differentiating it raises."""

    @staticmethod
    def forward(weight, grad_d, grad_r, gram, input_size, stride, padding, dilation, groups, circular, rows):
        return torch.ops.regkernels.conv_frame_stats_triton_backward(weight, grad_d, grad_r, gram, input_size,
                                                                     stride, padding, dilation, groups, circular,
                                                                     rows)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(_DOUBLE_BACKWARD)

    @staticmethod
    def vmap(info, in_dims, *args):
        return CG.vmap_by_loop(_FrameStatsBackward.apply, info, in_dims, *args)


# ----------------------------------------------------------------------------- the table entries

def _stats(op: str, weight: torch.Tensor, input_size, stride, padding, dilation, groups: int, padding_mode: str,
           side: str):
    """``(d, r, counts, k)`` as ``regkernels.composite.conv._stats``, by the fused kernel."""
    (kernel, *geometry), circular, rows, counts, positions = CG.frame_plan(
        op, tuple(weight.shape), tuple(input_size), stride, padding, dilation, groups, padding_mode, side, True,
        R.MAX_WORK_BYTES)
    w5 = weight.reshape(weight.shape[0], weight.shape[1], *kernel)
    keep_gram = torch.is_grad_enabled() and weight.requires_grad  # X̂ for the backward
    if through_function():
        d, r, _ = _FrameStats.apply(w5, *geometry, groups, circular, rows, keep_gram)
    else:
        d, r, _ = torch.ops.regkernels.conv_frame_stats_triton(w5, *geometry, groups, circular, rows, keep_gram)
    counts = CG.class_counts(counts, d.dtype, d.device)  # cached on the device
    return d, r, counts, d.shape[0] * d.shape[2] * positions


def conv_frame_penalty(weight: torch.Tensor, input_size, A: float, B: float, stride=1, padding=0, dilation=1,
                       groups: int = 1, padding_mode: str = "zeros", side: str = "auto") -> torch.Tensor:
    """docs/conv.md's frame penalty on the fused kernel's stats, arguments as the reference's."""
    d, r, counts, k = _stats("conv_frame_penalty", weight, input_size, stride, padding, dilation, groups,
                             padding_mode, side)
    return CG.frame_value(d, r, A, B, k, weight.dtype, counts=counts[:, None])


def conv_gershgorin_bounds(weight: torch.Tensor, input_size, stride=1, padding=0, dilation=1, groups: int = 1,
                           padding_mode: str = "zeros", side: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(min(d − r), max(d + r))`` over the classes, on the fused kernel's stats."""
    d, r, _, _ = _stats("conv_gershgorin_bounds", weight, input_size, stride, padding, dilation, groups,
                        padding_mode, side)
    return CG.gershgorin_value(d, r, weight.dtype)


def conv_frame_penalty_multi(weights, input_size, A: float, B: float, stride=1, padding=0, dilation=1,
                             groups: int = 1, padding_mode: str = "zeros", side: str = "auto") -> torch.Tensor:
    """``(L,)`` frame penalties of ``L`` layers of one shape and geometry from one fused stats call on the
    layers stacked as one conv with ``L·groups`` groups (as ``regkernels.composite.conv``'s entry)."""
    L = len(weights)
    W, scale = CG.stack_layers(weights, torch.float32)  # the kernels compute in float32
    d, r, counts, k = _stats("conv_frame_penalty_multi", W, input_size, stride, padding, dilation, L * groups,
                             padding_mode, side)
    return CG.frame_values(d, r, A, B, L, k // L, weights[0].dtype, counts, scale)
