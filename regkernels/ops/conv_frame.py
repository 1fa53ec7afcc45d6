"""The exact frame penalty of a convolution operator without its matrix (SPEC §2.2).

``conv_frame_penalty`` and ``conv_gershgorin_bounds`` need, for every row ``i`` of the Gram
matrix ``V = Gram(T, side)`` of the conv operator ``T`` (SPEC §2.1), its diagonal ``d_i`` and
its Gershgorin radius ``r_i = Σ_{j≠i} |V_ij|``. ``V`` has ``(C·∏n)²`` entries (17 GB for a
64-channel layer on 32×32 inputs); here it is never formed. Memory and time depend on the
channel counts, the kernel size and the number of border classes, not on ``∏n``.

Math (all dims normalised to three spatial dims; a 2-D conv is a 3-D one with a unit first dim).

* Per spatial dim ``i`` let ``E_i[y, t, u] ∈ {0, 1}`` say that tap ``t`` of output position ``y``
  reads input position ``u`` (``w = y·s − p + t·dil``; zeros padding: ``u = w`` if ``0 ≤ w < n``, else
  nothing; circular: ``u = w mod n``). The operator is ``T = Σ_t W[:, :, t] ⊗ E_t`` with
  ``E_t = E_0[:, t_0, :] ⊗ E_1[:, t_1, :] ⊗ E_2[:, t_2, :]`` (a Kronecker product over dims, in
  the row-major order of SPEC §2.1), so for ``side = "cols"`` (``Tᵀ T``, rows of V = input
  columns ``(c, u)``)::

      V[(c,u), (c',u')] = Σ_{t,t'} X[c, c', t, t'] · Π_i Q_i[u_i, t_i, t'_i, u'_i]
      X[c, c', t, t'] = Σ_o W[o, c, t] W[o, c', t']            (the tap Gram: kernel autocorrelation)
      Q_i[u, t, t', u'] = Σ_y E_i[y, t, u] E_i[y, t', u']

  and for ``side = "rows"`` (``T Tᵀ``, rows of V = outputs ``(o, y)``) the same with
  ``X[o, o', t, t'] = Σ_c W[o, c, t] W[o', c, t']`` and ``Q_i[y, t, t', y'] = Σ_u E_i[y, t, u] E_i[y', t', u]``.
  Channels only meet inside their group, so ``X`` is one block per group.
* Border classes. Row ``(a, p)`` of ``V`` is determined by ``X[a]`` and, per dim, by the
  *relative* pattern ``q ↦ Q_i[p_i, ·, ·, p_i + q]``. Positions with equal patterns form a
  class: in the interior all positions agree (stride s: one class per residue mod s), and each
  border position near a zero-padded edge (or each wrap-around pattern of a circular one) has
  its own. A class table ``Cls_i`` holds each class's pattern over the reachable offsets ``q``,
  with multiplicities (circular taps can reach one position twice). The tables are built in pure
  Python from one representative per class (``_class_positions``: the positions near the edges
  and ``s`` interior ones, whose patterns repeat with period ``s``): ``O(classes·k²)`` work per dim,
  independent of ``n`` (cached), which also lets the fake implementation size the outputs.
* For every class combination ``κ = (κ_0, κ_1, κ_2)``::

      V_κ[a, a', q] = Σ_{t,t'} X[a, a', t, t'] · Π_i Cls_i[κ_i, t_i, t'_i, q_i]

  is the full nonzero part of row ``(a, p)`` of ``V`` for any ``p`` in class ``κ``: ``d`` is the
  entry ``a' = a, q = 0``; ``r`` the absolute sum of the others (the diagonal is zeroed, not
  subtracted: no cancellation, and ``|x|`` has subgradient 0 at 0 as SPEC §1 wants). Every
  distinct column ``(a', p + q)`` appears once, so the sums are exact, not bounds. The
  contraction runs one dim at a time (three small GEMMs) in blocks of rows ``a`` so the working
  set stays under ``_BLOCK_ELEMENTS``.
* Penalty: ``(1/k) Σ_κ count(κ) Σ_a h(d, r)`` with ``k = C·∏P`` the size of ``V`` (SPEC §1.1's
  hinge ``h``). Its gradient: ``∂/∂V_κ = count(κ)/k · (h_d at the diagonal, h_r · sign(V_κ)
  elsewhere)``, contracted back through the class tables to ``∂X`` and then
  ``∂Z = Z (∂X + ∂Xᵀ)`` for ``X = Zᵀ Z``. The backward op recomputes ``V_κ`` block by block
  (the forward keeps only ``d`` and ``r``).
* Range: ``X`` is formed from ``Z`` divided by a power of two near ``max|Z|`` and ``d``, ``r`` are
  scaled back (``_pow2_scale``), so ``X`` never overflows on its own: a layer whose ``d`` or ``r``
  exceeds the dtype's range gets ``+inf`` (penalty ``+inf``), a layer holding NaN/inf gets NaN —
  both as the explicit ``frame_penalty(conv_to_matrix(...))``.
* Double backward (``create_graph=True`` then differentiating again) raises RuntimeError (the
  stats' backward ops refuse it); ``backend="reference"`` supports it. Problems whose tap Gram or
  contraction rows exceed ``MAX_WORK_BYTES`` raise ValueError before allocating (``_check_work``).

The op ``regkernels::conv_frame_stats`` returns ``(d, r)`` per (group, class, channel) in the
math dtype (float32, or float64 for float64 weights); ``regkernels::conv_frame_stats_backward``
maps ``(∂d, ∂r)`` to ``∂W``. Both are torch.library custom ops (fake implementations, autograd),
device-generic torch code whose work is GEMMs: the implementation registered for CPU (backend
``"cpu"``) and CUDA (backend ``"cuda"``) tensors. The explicit reference
(``regkernels.reference.conv``) is the oracle.
"""
from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from regkernels import _ext
from regkernels.ops import conv as _conv
from regkernels.reference import conv as R
from regkernels.reference._dtypes import compute_dtype
from regkernels.reference._numerics import pow2_scale

# Upper bound on the elements of one block's largest intermediate (the contraction's and the
# backward's temporaries are a small multiple of it): 2^22 float32 = 16 MiB.
_BLOCK_ELEMENTS = 1 << 22
# The forward keeps sign(V_κ) (int8) for the backward when all of it has at most this many
# entries (16 MiB); above, the backward contracts V again block by block.
_SIGN_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class _DimClasses:
    """Border classes of one spatial dim: ``table`` is ``(n_cls, k, k, n_rel)`` (flattened,
    multiplicities), ``counts`` the positions per class, ``rel`` the reachable offsets and
    ``zero`` the index of offset 0 in ``rel``."""
    table: tuple[float, ...]
    counts: tuple[int, ...]
    k: int
    rel: tuple[int, ...]
    zero: int

    @property
    def n_cls(self) -> int:
        return len(self.counts)


def _taps(y: int, n: int, k: int, s: int, p: int, dil: int, circular: bool):
    """The ``(tap, input position)`` pairs output ``y`` reads (``E_i[y, t, u] = 1``)."""
    for t in range(k):
        w = y * s - p + t * dil
        if circular:
            yield t, w % n
        elif 0 <= w < n:
            yield t, w


def _readers(u: int, n: int, out: int, k: int, s: int, p: int, dil: int, circular: bool):
    """The ``(output, tap)`` pairs that read input position ``u``: ``y·s − p + t·dil = w`` for an
    unwrapped ``w ≡ u`` (circular: ``w ∈ {u − n, u, u + n}``, as ``p ≤ n``; zeros: ``w = u``)."""
    for w in ((u - n, u, u + n) if circular else (u,)):
        for t in range(k):
            a = w + p - t * dil
            if a >= 0 and a % s == 0 and a // s < out:
                yield a // s, t


def _pattern(pos: int, n: int, out: int, k: int, s: int, p: int, dil: int, circular: bool, rows: bool) -> tuple:
    """Row ``pos`` of ``Q_i`` relative to ``pos``: the sorted ``((t, t', q), multiplicity)`` items.

    cols (``pos = u``): ``Q[u, t, t', u + q] = Σ_y E[y, t, u] E[y, t', u + q]`` — the tap pairs of
    every output reading ``u``; rows (``pos = y``): ``Q[y, t, t', y + q] = Σ_u E[y, t, u] E[y + q, t', u]``
    — every reader of every input ``y`` reads."""
    pat: Counter = Counter()
    if rows:
        for t, u in _taps(pos, n, k, s, p, dil, circular):
            for y2, t2 in _readers(u, n, out, k, s, p, dil, circular):
                pat[(t, t2, y2 - pos)] += 1
    else:
        for y, t in _readers(pos, n, out, k, s, p, dil, circular):
            for t2, u2 in _taps(y, n, k, s, p, dil, circular):
                pat[(t, t2, u2 - pos)] += 1
    return tuple(sorted(pat.items()))


def _class_positions(n: int, out: int, k: int, s: int, p: int, dil: int, circular: bool,
                     rows: bool) -> list[tuple[int | None, int]]:
    """Representative positions and how many positions share each one's pattern: ``(pos, count)``,
    ``pos = None`` for outputs that read nothing (zeros padding; the empty pattern).

    Index map of the interior (exact, not a heuristic). Let ``e = (k − 1)·dil`` and ``p_c = p`` for
    circular padding, 0 for zeros. An input ``u`` with ``p_c + e ≤ u ≤ n − 1 − p_c − e − s`` is read
    only through the unwrapped ``w = u`` (``u − n < −p``, ``u + n ≥ n + p``), by taps ``t`` with
    ``s | u + p − t·dil``, all with ``0 ≤ y < out`` (``(out − 1)·s ≥ n + 2p − e − s``), and each such
    output's other taps read ``u + (t' − t)·dil ∈ [0, n)``: its pattern depends on ``u mod s`` only.
    An output ``y`` whose taps all read such inputs has the pattern of every such output (the
    readers of ``w`` relative to ``y`` depend on ``(t − t')·dil mod s`` only). So only positions
    within ``O(p_c + e + s)`` of an edge (cols) or ``O((p_c + e)/s + 1)`` (rows) are enumerated, plus
    ``s`` (cols) or 1 (rows) interior representatives: work independent of ``n``."""
    e = (k - 1) * dil
    p_c = p if circular else 0
    lo_u, hi_u = p_c + e, n - 1 - p_c - e - s  # the interior inputs, inclusive
    reps: list[tuple[int | None, int]] = []
    if not rows:
        if hi_u < lo_u:
            return [(u, 1) for u in range(n)]
        reps += [(u, 1) for u in range(lo_u)]
        reps += [(u, (hi_u - u) // s + 1) for u in range(lo_u, min(lo_u + s, hi_u + 1))]
        reps += [(u, 1) for u in range(hi_u + 1, n)]
        return reps
    # rows: zeros padding leaves outputs whose taps all fall in the padding (empty pattern)
    if circular:
        y_a, y_b = 0, out
    else:
        y_a = min(out, max(0, -(-(p - e) // s)))      # first y with y·s − p + e ≥ 0
        y_b = min(out, max(y_a, -(-(n + p) // s)))    # first y with y·s − p ≥ n
    if y_a + out - y_b:
        reps.append((None, y_a + out - y_b))
    y_lo = max(y_a, -(-(lo_u + p) // s))               # y·s − p ≥ lo_u
    y_hi = min(y_b - 1, (hi_u + p - e) // s) if hi_u >= lo_u else y_lo - 1  # y·s − p + e ≤ hi_u
    if y_hi < y_lo:
        return reps + [(y, 1) for y in range(y_a, y_b)]
    reps += [(y, 1) for y in range(y_a, y_lo)]
    reps.append((y_lo, y_hi - y_lo + 1))
    reps += [(y, 1) for y in range(y_hi + 1, y_b)]
    return reps


@functools.lru_cache(maxsize=512)
def _dim_classes(n: int, k: int, s: int, p: int, dil: int, circular: bool, rows: bool) -> _DimClasses:
    """``Q_i`` of one dim relative to each position, equal patterns grouped into classes; only the
    representatives of ``_class_positions`` are enumerated (``O(classes · k²)`` work, not ``O(n)``)."""
    out = (n + 2 * p - dil * (k - 1) - 1) // s + 1
    index: dict[tuple, int] = {}
    counts: list[int] = []
    for pos, count in _class_positions(n, out, k, s, p, dil, circular, rows):
        key = () if pos is None else _pattern(pos, n, out, k, s, p, dil, circular, rows)
        if key not in index:
            index[key] = len(index)
            counts.append(0)
        counts[index[key]] += count
    rel = sorted({q for key in index for (_, _, q), _ in key} | {0})
    col = {q: j for j, q in enumerate(rel)}
    table = [0.0] * (len(index) * k * k * len(rel))
    for key, c in index.items():
        for (t, t2, q), mult in key:
            table[((c * k + t) * k + t2) * len(rel) + col[q]] = float(mult)
    return _DimClasses(tuple(table), tuple(counts), k, tuple(rel), col[0])


@dataclass(frozen=True)
class _Geometry:
    """A conv operator normalised to three spatial dims, and which Gram side is taken."""
    kernel: tuple[int, int, int]
    input_size: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    dilation: tuple[int, int, int]
    circular: bool
    rows: bool

    @property
    def dims(self) -> tuple[_DimClasses, ...]:
        return tuple(_dim_classes(n, k, s, p, dl, self.circular, self.rows)
                     for n, k, s, p, dl in zip(self.input_size, self.kernel, self.stride, self.padding,
                                               self.dilation))

    @property
    def positions(self) -> int:
        """Spatial positions per channel of V's rows: ∏n (cols) or ∏out (rows)."""
        return math.prod(sum(dim.counts) for dim in self.dims)

    @property
    def n_cls(self) -> int:
        return math.prod(dim.n_cls for dim in self.dims)


def _geometry(weight_shape, input_size, stride, padding, dilation, groups, padding_mode, side) -> _Geometry:
    d = len(weight_shape) - 2
    kernel = tuple(weight_shape[2:])
    out = R.conv_output_size(input_size, kernel, stride, padding, dilation)
    m = weight_shape[0] * math.prod(out)
    n = weight_shape[1] * groups * math.prod(input_size)
    rows = side == "rows" or (side == "auto" and m < n)  # the reference's rule (SPEC §0)
    return _Geometry(R._expand3(kernel, d, 1), R._expand3(tuple(input_size), d, 1), R._expand3(stride, d, 1),
                     R._expand3(padding, d, 0), R._expand3(dilation, d, 1), padding_mode == "circular", rows)


@functools.lru_cache(maxsize=256)
def _tables(geo: _Geometry, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The class tables ``(n_cls_i, k_i, k_i, n_rel_i)`` on the device."""
    return tuple(torch.tensor(dim.table, dtype=dtype).view(dim.n_cls, dim.k, dim.k, len(dim.rel)).to(device)
                 for dim in geo.dims)


# ----------------------------------------------------------------------------- the math

def _tap_gram_factor(W: torch.Tensor, groups: int, rows: bool) -> torch.Tensor:
    """``Z (G, ·, Cx·K)`` with ``X = Zᵀ Z`` the per-group tap Gram: for cols ``Z[g, o, (c, t)] =
    W[o, c, t]`` (Cx = C_in/g), for rows ``Z[g, c, (o, t)] = W[o, c, t]`` (Cx = C_out/g)."""
    c_out, c_in_g, K = W.shape[0], W.shape[1], math.prod(W.shape[2:])
    Wg = W.reshape(groups, c_out // groups, c_in_g, K)
    if rows:
        Wg = Wg.transpose(1, 2)
    return Wg.reshape(groups, Wg.shape[1], Wg.shape[2] * K)


def _pow2_scale(Z: torch.Tensor) -> torch.Tensor:
    """A power of two ``σ`` with ``max|Z|/σ ∈ [1, 2)`` (1 for an all-zero or non-finite ``Z``).

    The stats are computed from ``Ẑ = Z/σ`` and scaled back by ``σ²`` (``d``, ``r`` and ``V`` are
    quadratic in ``Z``). Dividing by a power of two is exact, so finite results are unchanged;
    what it prevents is the tap Gram ``X = ẐᵀẐ`` overflowing while ``d`` or ``r`` is still finite, or
    overflowing to ``+inf`` where the class contraction multiplies it by a table's structural 0
    (``inf·0 = NaN``): a float32 weight of 1e20 gives ``d = +inf`` and a penalty of ``+inf``, as
    the explicit ``frame_penalty(conv_to_matrix(...))`` does. A NaN or ±inf weight keeps ``σ = 1``:
    its ``X`` holds NaN/inf and the whole layer is NaN, like the explicit path, whose ``TᵀT`` meets
    ``inf·0`` and ``NaN·0`` in its matmul."""
    return pow2_scale(Z.abs().amax() if Z.numel() else Z.new_zeros(()))


def _weight_of_factor(gZ: torch.Tensor, shape: torch.Size, rows: bool) -> torch.Tensor:
    c_out, c_in_g = shape[0], shape[1]
    groups = gZ.shape[0]
    # explicit sizes (no -1: a layer without channels has a 0-element factor)
    gW = gZ.reshape(groups, *((c_in_g, c_out // groups) if rows else (c_out // groups, c_in_g)),
                    math.prod(shape[2:]))
    if rows:
        gW = gW.transpose(1, 2)
    return gW.reshape(c_out, c_in_g, *shape[2:])


def _block_rows(G: int, cx: int, geo: _Geometry) -> int:
    """Rows ``a`` per block: the largest intermediate of the contraction per (a, a') pair is
    bounded by max over the three steps of the remaining tap pairs × the classes × offsets."""
    k0, k1, k2 = geo.kernel
    c0, c1, c2 = (dim.n_cls * len(dim.rel) for dim in geo.dims)
    per_pair = max(k0 * k0 * k1 * k1 * k2 * k2, k0 * k0 * k1 * k1 * c2, k0 * k0 * c1 * c2, c0 * c1 * c2)
    return max(1, min(cx, _BLOCK_ELEMENTS // max(1, G * cx * per_pair)))


def _contract(Xb: torch.Tensor, tables: tuple[torch.Tensor, ...], kernel) -> torch.Tensor:
    """``V_κ`` for a block of rows: ``Xb (G, b, K, Cx, K)`` → ``(G, b, Cx, n0, q0, n1, q1, n2, q2)``."""
    k0, k1, k2 = kernel
    G, b, _, cx, _ = Xb.shape
    X = Xb.reshape(G, b, k0, k1, k2, cx, k0, k1, k2)
    T0, T1, T2 = tables
    # one dim at a time (each einsum is one batched GEMM over that dim's tap pairs)
    Y = torch.einsum("gaxyzbuvw,kzwq->gaxybuvkq", X, T2)
    Y = torch.einsum("gaxybuvkq,jyvs->gaxbujskq", Y, T1)
    return torch.einsum("gaxbujskq,ixur->gabirjskq", Y, T0)


def _uncontract(gV: torch.Tensor, tables: tuple[torch.Tensor, ...], kernel) -> torch.Tensor:
    """The adjoint of ``_contract``: ``(G, b, Cx, n0, q0, n1, q1, n2, q2)`` → ``(G, b·K, Cx·K)``."""
    T0, T1, T2 = tables
    G, b, cx = gV.shape[:3]
    Y = torch.einsum("gabirjskq,ixur->gaxbujskq", gV, T0)
    Y = torch.einsum("gaxbujskq,jyvs->gaxybuvkq", Y, T1)
    Y = torch.einsum("gaxybuvkq,kzwq->gaxyzbuvw", Y, T2)
    return Y.reshape(G, b * math.prod(kernel), cx * math.prod(kernel))


def _signs_shape(geo: _Geometry, G: int, cx: int) -> tuple[int, ...]:
    """Shape of all ``V_κ`` at once, ``(G, Cx, Cx, n0, q0, n1, q1, n2, q2)``."""
    return (G, cx, cx) + tuple(x for dim in geo.dims for x in (dim.n_cls, len(dim.rel)))


def _keeps_signs(geo: _Geometry, G: int, cx: int, keep: bool) -> bool:
    return keep and math.prod(_signs_shape(geo, G, cx)) <= _SIGN_ELEMENTS


def _diagonal(a0: int, b: int, geo: _Geometry, device) -> tuple:
    """Index of the entries (a, a' = a0 + a, offset 0 in every dim) of a block of V: its diagonal."""
    a = torch.arange(b, device=device)
    z0, z1, z2 = (dim.zero for dim in geo.dims)
    return (slice(None), a, a0 + a, slice(None), z0, slice(None), z1, slice(None), z2)


def _blocks(geo: _Geometry, Z: torch.Tensor, tables):
    """Yield ``(a0, b, V_κ block)`` over blocks of V's channel rows."""
    G, _, cxK = Z.shape
    K = math.prod(geo.kernel)
    cx = cxK // K
    X = Z.mT @ Z  # (G, Cx·K, Cx·K), the per-group tap Gram
    step = _block_rows(G, cx, geo)
    for a0 in range(0, cx, step):
        b = min(step, cx - a0)
        yield a0, b, _contract(X[:, a0 * K:(a0 + b) * K].reshape(G, b, K, cx, K), tables, geo.kernel)


def _stats_forward(weight: torch.Tensor, geo: _Geometry, groups: int,
                   keep_signs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = compute_dtype(weight.dtype)
    Z = _tap_gram_factor(weight.to(dtype), groups, geo.rows)
    scale = _pow2_scale(Z)
    Z = Z / scale  # exact; V, d, r are quadratic in Z: scaled back by scale² below
    G, cx = Z.shape[0], Z.shape[2] // math.prod(geo.kernel)
    tables = _tables(geo, dtype, weight.device)
    keep = _keeps_signs(geo, G, cx, keep_signs)
    signs = Z.new_empty(_signs_shape(geo, G, cx) if keep else (0,), dtype=torch.int8)
    ds, rs = [], []
    for a0, b, V in _blocks(geo, Z, tables):
        diag = _diagonal(a0, b, geo, Z.device)
        ds.append(V[diag])  # (G, b, n0, n1, n2)
        if keep:  # the backward's ∂|V|/∂V, so that it need not contract V again
            signs[:, a0:a0 + b] = V.sign()
        A = V.abs_()
        A[diag] = 0
        rs.append(A.sum(dim=(2, 4, 6, 8)))
    if not ds:
        empty = Z.new_zeros((G, geo.n_cls, 0))
        return empty, empty.clone(), signs
    # (G, Cx, n0, n1, n2) → (G, n_cls, Cx)
    d = torch.cat(ds, dim=1).reshape(G, cx, geo.n_cls).transpose(1, 2).contiguous()
    r = torch.cat(rs, dim=1).reshape(G, cx, geo.n_cls).transpose(1, 2).contiguous()
    # (x·σ)·σ: σ² alone may overflow where x·σ² does not; 0·σ·σ stays 0
    return d.mul_(scale).mul_(scale), r.mul_(scale).mul_(scale), signs


def _stats_backward(weight: torch.Tensor, gd: torch.Tensor, gr: torch.Tensor, signs: torch.Tensor,
                    geo: _Geometry, groups: int) -> torch.Tensor:
    dtype = compute_dtype(weight.dtype)
    Z = _tap_gram_factor(weight.to(dtype), groups, geo.rows)
    tables = _tables(geo, dtype, weight.device)
    K = math.prod(geo.kernel)
    n0, n1, n2 = (dim.n_cls for dim in geo.dims)
    G, cx = Z.shape[0], Z.shape[2] // K
    # (G, n_cls, Cx) → (G, Cx, n0, n1, n2), the layout of the diagonal of a V block
    gd = gd.to(dtype).transpose(1, 2).reshape(G, cx, n0, n1, n2)
    gr = gr.to(dtype).transpose(1, 2).reshape(G, cx, n0, n1, n2)
    if signs.dim() > 1:  # kept by the forward
        step = _block_rows(G, cx, geo)
        blocks = ((a0, min(step, cx - a0), signs[:, a0:a0 + step].to(dtype)) for a0 in range(0, cx, step))
    else:  # recompute V block by block, from the scaled factor as the forward (sign(V̂) = sign(V))
        blocks = ((a0, b, V.sign_()) for a0, b, V in _blocks(geo, Z / _pow2_scale(Z), tables))
    gZ = torch.zeros_like(Z)
    for a0, b, sign in blocks:
        # ∂r/∂V = sign(V) off the diagonal, ∂d/∂V = 1 on it
        gV = sign.mul_(gr[:, a0:a0 + b, None, :, None, :, None, :, None])
        gV[_diagonal(a0, b, geo, Z.device)] = gd[:, a0:a0 + b]
        gX = _uncontract(gV, tables, geo.kernel)  # rows a0..a0+b of ∂X, (G, b·K, Cx·K)
        cols = slice(a0 * K, (a0 + b) * K)
        # X = Zᵀ Z: ∂Z = Z (∂X + ∂Xᵀ), split over the block's rows of ∂X
        gZ += Z[:, :, cols] @ gX
        gZ[:, :, cols] += Z @ gX.mT
    return _weight_of_factor(gZ, weight.shape, geo.rows).to(weight.dtype).contiguous()


# ----------------------------------------------------------------------------- checks

def _check_stats_args(op: str, weight, input_size, stride, padding, dilation, groups, circular) -> None:
    """The stats ops are public (``torch.ops.regkernels.*``): their geometry is checked like the C++ ops'."""
    _conv.check_op_geometry(op, weight, input_size, stride, padding, dilation, groups, circular)


def _check_stats_grads(op: str, weight: torch.Tensor, geo: _Geometry, groups: int, grad_d, grad_r,
                       signs=None) -> None:
    """``grad_d``, ``grad_r``: floating ``(G, n_cls, Cx)`` on the weight's device; ``signs``: int8, empty
    or the forward's ``sign(V)`` shape."""
    G = groups
    cx = weight.shape[0] // groups if geo.rows else weight.shape[1]
    want = (G, geo.n_cls, cx)
    for name, g in (("grad_d", grad_d), ("grad_r", grad_r)):
        if not (isinstance(g, torch.Tensor) and g.dtype.is_floating_point and tuple(g.shape) == want
                and g.device == weight.device and g.layout == torch.strided):
            raise RuntimeError(f"{op}: {name} must be a floating strided tensor of shape {want} (groups, border "
                               f"classes, channels) on {weight.device}; got "
                               f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}"
                               f"{f' {g.dtype} on {g.device}' if isinstance(g, torch.Tensor) else ''}")
    if signs is not None:
        shapes = ((0,), _signs_shape(geo, G, cx))
        if not (signs.dtype == torch.int8 and tuple(signs.shape) in shapes and signs.device == weight.device):
            raise RuntimeError(f"{op}: signs must be the forward's int8 output, of shape {shapes[1]} or (0,), on "
                               f"{weight.device}; got {tuple(signs.shape)} {signs.dtype} on {signs.device}")


def _check_work(geo: _Geometry, G: int, cx: int, op: str, triton: bool = False) -> None:
    """Refuse (ValueError naming the size) a problem whose tap Gram ``X (G, Cx·K, Cx·K)``, one channel
    row of the contraction (``_block_rows`` never splits a row) or the Triton combined class table
    (``NC·K²·Q``) would exceed ``MAX_WORK_BYTES`` (float32 counted; float64 doubles it)."""
    K = math.prod(geo.kernel)
    k0, k1, k2 = geo.kernel
    c0, c1, c2 = (dim.n_cls * len(dim.rel) for dim in geo.dims)
    per_pair = max(k0 * k0 * k1 * k1 * k2 * k2, k0 * k0 * k1 * k1 * c2, k0 * k0 * c1 * c2, c0 * c1 * c2)
    sizes = {"the tap Gram": G * (cx * K) ** 2, "one channel row of the class contraction": G * cx * per_pair}
    if triton:
        sizes["the combined class table"] = geo.n_cls * K * K * math.prod(len(dim.rel) for dim in geo.dims)
    what, elements = max(sizes.items(), key=lambda item: item[1])
    nbytes = 4 * elements
    if nbytes > R.MAX_WORK_BYTES:
        raise ValueError(f"{op}: {what} needs {elements} elements ({nbytes / 2**30:.1f} GiB in float32), over "
                         f"MAX_WORK_BYTES={R.MAX_WORK_BYTES} (regkernels.reference.conv); use fewer channels per "
                         f"group or a smaller kernel")


# ----------------------------------------------------------------------------- custom ops

def _geo_of(weight: torch.Tensor, input_size, stride, padding, dilation, circular: bool, rows: bool) -> _Geometry:
    # int(): the class tables are a function of the kernel size (a dynamic size specialises)
    return _Geometry(tuple(int(k) for k in weight.shape[2:]), tuple(input_size), tuple(stride), tuple(padding),
                     tuple(dilation), circular, rows)


@torch.library.custom_op("regkernels::conv_frame_stats", mutates_args=())
def _conv_frame_stats(weight: torch.Tensor, input_size: list[int], stride: list[int], padding: list[int],
                      dilation: list[int], groups: int, circular: bool, rows: bool,
                      keep_signs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d, r, signs)``: ``d``, ``r`` per (group, class, channel) of the conv operator's Gram (see
    the module docstring) and, with ``keep_signs`` when it is small enough, ``sign(V_κ)`` as int8
    for the backward (else an empty tensor). ``weight`` is 5-D ``(C_out, C_in/g, k0, k1, k2)``
    and the lists have 3 entries."""
    _check_stats_args("regkernels::conv_frame_stats", weight, input_size, stride, padding, dilation, groups,
                      circular)
    geo = _geo_of(weight, input_size, stride, padding, dilation, circular, rows)
    return _stats_forward(weight, geo, groups, keep_signs)


def _stats_like(weight: torch.Tensor, geo: _Geometry, groups: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """An empty ``(G, n_cls, Cx)`` stats tensor (for the fake implementations) and ``Cx``."""
    cx = weight.shape[0] // groups if geo.rows else weight.shape[1]
    return weight.new_empty((groups, geo.n_cls, cx), dtype=dtype), cx


@_conv_frame_stats.register_fake
def _conv_frame_stats_fake(weight, input_size, stride, padding, dilation, groups, circular, rows, keep_signs):
    _check_stats_args("regkernels::conv_frame_stats", weight, input_size, stride, padding, dilation, groups,
                      circular)
    geo = _geo_of(weight, input_size, stride, padding, dilation, circular, rows)
    d, cx = _stats_like(weight, geo, groups, compute_dtype(weight.dtype))
    keep = _keeps_signs(geo, groups, cx, keep_signs)
    signs = weight.new_empty(_signs_shape(geo, groups, cx) if keep else (0,), dtype=torch.int8)
    return d, torch.empty_like(d), signs


@torch.library.custom_op("regkernels::conv_frame_stats_backward", mutates_args=())
def _conv_frame_stats_backward(weight: torch.Tensor, grad_d: torch.Tensor, grad_r: torch.Tensor,
                               signs: torch.Tensor, input_size: list[int], stride: list[int], padding: list[int],
                               dilation: list[int], groups: int, circular: bool, rows: bool) -> torch.Tensor:
    """``∂L/∂weight`` from ``(∂L/∂d, ∂L/∂r)``; ``signs`` as the forward returned them."""
    op = "regkernels::conv_frame_stats_backward"
    _check_stats_args(op, weight, input_size, stride, padding, dilation, groups, circular)
    geo = _geo_of(weight, input_size, stride, padding, dilation, circular, rows)
    _check_stats_grads(op, weight, geo, groups, grad_d, grad_r, signs)
    return _stats_backward(weight, grad_d, grad_r, signs, geo, groups)


@_conv_frame_stats_backward.register_fake
def _conv_frame_stats_backward_fake(weight, grad_d, grad_r, signs, input_size, stride, padding, dilation, groups,
                                    circular, rows):
    op = "regkernels::conv_frame_stats_backward"
    _check_stats_args(op, weight, input_size, stride, padding, dilation, groups, circular)
    _check_stats_grads(op, weight, _geo_of(weight, input_size, stride, padding, dilation, circular, rows), groups,
                       grad_d, grad_r, signs)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    weight, *geometry, _keep = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(weight, output[2])


def _backward(ctx, grad_d, grad_r, _grad_signs):
    weight, signs = ctx.saved_tensors  # grads of unused outputs arrive as zeros (materialized)
    gW = torch.ops.regkernels.conv_frame_stats_backward(weight, grad_d, grad_r, signs, *ctx.geometry)
    return (gW,) + (None,) * 8


_conv_frame_stats.register_autograd(_backward, setup_context=_setup)


def _device_context(ctx, inputs, output):
    ctx.backend = inputs[0].device.type  # the torch path's backend is named after the device


def _no_double_backward(backend: str | None = None):
    """The autograd of a stats backward op: it refuses to be differentiated. The second
    derivative of ``d``/``r`` (through ``sign(V)`` and the tap Gram) is not implemented, and
    torch's default for an op without autograd is a warning and a silent 0."""
    def backward(ctx, *grads):
        raise RuntimeError(
            f"conv_frame_penalty / conv_gershgorin_bounds: double backward (a backward with create_graph=True "
            f"differentiated again) is not supported by backend={backend or ctx.backend!r}; "
            f"backend='reference' supports it")
    return backward


torch.library.register_autograd("regkernels::conv_frame_stats_backward", _no_double_backward(),
                                setup_context=_device_context)


# ----------------------------------------------------------------------------- Triton

# regkernels/triton/conv_frame.py fuses the contraction and the reductions (flash-style: no V_κ
# in memory) for float32 tap Grams; fp16 / bf16 weights are computed in float32 as above,
# float64 ones take the torch path. Registered by name only (backend="triton"): it has not yet
# run on a GPU, where the torch path (cuBLAS GEMMs) is the measured-safe default.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=64)
def _combined_table(geo: _Geometry, device: torch.device) -> tuple[torch.Tensor, int]:
    """``(NC, K, K, Q)`` float32 table ``Π_i Cls_i[κ_i, t_i, t'_i, q_i]`` (κ, t, q flat row-major
    over the dims, κ in the order of the stats' class axis) and the flat index of offset 0."""
    T0, T1, T2 = _tables(geo, torch.float32, device)
    tab = torch.einsum("iaxr,jbys,kczq->ijkabcxyzrsq", T0, T1, T2)
    K = math.prod(geo.kernel)
    (z0, z1, z2), (_, r1, r2) = (dim.zero for dim in geo.dims), (len(dim.rel) for dim in geo.dims)
    return tab.reshape(geo.n_cls, K, K, -1).contiguous(), (z0 * r1 + z1) * r2 + z2


def _triton_problem(weight, input_size, stride, padding, dilation, groups, circular, rows):
    """``(geo, Z, X̂, tab, zero, σ)``: the tap Gram ``X̂`` of the scaled factor ``Z/σ`` (``_pow2_scale``)."""
    geo = _geo_of(weight, input_size, stride, padding, dilation, circular, rows)
    Z = _tap_gram_factor(weight.float(), groups, rows)
    K = math.prod(geo.kernel)
    G, cx = Z.shape[0], Z.shape[2] // K
    _check_work(geo, G, cx, "regkernels::conv_frame_stats_triton")
    tab, zero = _combined_table(geo, weight.device)
    scale = _pow2_scale(Z)
    Zs = Z / scale
    return geo, Z, (Zs.mT @ Zs).view(G, cx, K, cx, K), tab, zero, scale


if _ext.has_triton():

    @torch.library.custom_op("regkernels::conv_frame_stats_triton", mutates_args=())
    def _conv_frame_stats_triton(weight: torch.Tensor, input_size: list[int], stride: list[int],
                                 padding: list[int], dilation: list[int], groups: int, circular: bool,
                                 rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d, r)`` as ``conv_frame_stats``, by the fused Triton kernel (float32)."""
        from regkernels.triton import conv_frame as TF

        _check_stats_args("regkernels::conv_frame_stats_triton", weight, input_size, stride, padding, dilation,
                          groups, circular)
        *_, X, tab, zero, scale = _triton_problem(weight, input_size, stride, padding, dilation, groups, circular,
                                                  rows)
        d, r = TF.class_stats_forward(X, tab, zero)
        return d.mul_(scale).mul_(scale), r.mul_(scale).mul_(scale)

    @_conv_frame_stats_triton.register_fake
    def _conv_frame_stats_triton_fake(weight, input_size, stride, padding, dilation, groups, circular, rows):
        _check_stats_args("regkernels::conv_frame_stats_triton", weight, input_size, stride, padding, dilation,
                          groups, circular)
        d, _ = _stats_like(weight, _geo_of(weight, input_size, stride, padding, dilation, circular, rows), groups,
                           torch.float32)
        return d, torch.empty_like(d)

    @torch.library.custom_op("regkernels::conv_frame_stats_triton_backward", mutates_args=())
    def _conv_frame_stats_triton_backward(weight: torch.Tensor, grad_d: torch.Tensor, grad_r: torch.Tensor,
                                          input_size: list[int], stride: list[int], padding: list[int],
                                          dilation: list[int], groups: int, circular: bool,
                                          rows: bool) -> torch.Tensor:
        from regkernels.triton import conv_frame as TF

        op = "regkernels::conv_frame_stats_triton_backward"
        _check_stats_args(op, weight, input_size, stride, padding, dilation, groups, circular)
        geo, Z, X, tab, zero, _ = _triton_problem(weight, input_size, stride, padding, dilation, groups, circular,
                                                  rows)
        _check_stats_grads(op, weight, geo, groups, grad_d, grad_r)
        # gX depends on sign(V̂) = sign(V) and the incoming grads only: no σ to undo
        gX = TF.class_stats_backward(X, tab, zero, grad_d, grad_r).view(Z.shape[0], Z.shape[2], Z.shape[2])
        gZ = Z @ (gX + gX.mT)  # X = Zᵀ Z
        return _weight_of_factor(gZ, weight.shape, rows).to(weight.dtype).contiguous()

    @_conv_frame_stats_triton_backward.register_fake
    def _conv_frame_stats_triton_backward_fake(weight, grad_d, grad_r, input_size, stride, padding, dilation,
                                               groups, circular, rows):
        op = "regkernels::conv_frame_stats_triton_backward"
        _check_stats_args(op, weight, input_size, stride, padding, dilation, groups, circular)
        _check_stats_grads(op, weight, _geo_of(weight, input_size, stride, padding, dilation, circular, rows), groups,
                           grad_d, grad_r)
        return torch.empty_like(weight, memory_format=torch.contiguous_format)

    def _triton_setup(ctx, inputs, output):
        weight, *geometry = inputs
        ctx.geometry = geometry
        ctx.save_for_backward(weight)

    def _triton_backward(ctx, grad_d, grad_r):
        (weight,) = ctx.saved_tensors
        gW = torch.ops.regkernels.conv_frame_stats_triton_backward(weight, grad_d, grad_r, *ctx.geometry)
        return (gW,) + (None,) * 7

    _conv_frame_stats_triton.register_autograd(_triton_backward, setup_context=_triton_setup)
    torch.library.register_autograd("regkernels::conv_frame_stats_triton_backward",
                                    _no_double_backward("triton"), setup_context=_device_context)


# ----------------------------------------------------------------------------- the kernels

@torch.compiler.assume_constant_result
def _plan(op: str, shape: tuple[int, ...], input_size: tuple[int, ...], stride, padding, dilation, groups: int,
          padding_mode: str, side: str, triton: bool) -> tuple:
    """The op's geometry arguments, the positions per class (flattened over the class grid) and
    the positions per channel: plain Python constants (torch.compile runs this once when tracing).
    Refuses a problem over the work limit (``_check_work``) before anything is allocated."""
    geo = _geometry(shape, input_size, stride, padding, dilation, groups, padding_mode, side)
    _check_work(geo, groups, shape[0] // groups if geo.rows else shape[1], op, triton)
    c0, c1, c2 = (dim.counts for dim in geo.dims)
    counts = tuple(a * b * c for a in c0 for b in c1 for c in c2)
    args = (list(geo.kernel), list(geo.input_size), list(geo.stride), list(geo.padding), list(geo.dilation))
    return args, geo.circular, geo.rows, counts, geo.positions


def _stats(op, weight, input_size, stride, padding, dilation, groups, padding_mode, side, triton: bool = False):
    """``(d, r, counts, k)``: the stats op's ``(G, n_cls, Cx)`` outputs, the positions per class
    ``(n_cls,)`` and the size k of the Gram; ``triton`` takes the fused kernel where it has the dtype."""
    triton = triton and weight.dtype in TRITON_DTYPES
    (kernel, *geometry), circular, rows, counts, positions = _plan(
        op, tuple(weight.shape), tuple(input_size), stride, padding, dilation, groups, padding_mode, side, triton)
    w5 = weight.reshape(weight.shape[0], weight.shape[1], *kernel)
    if triton:
        d, r = torch.ops.regkernels.conv_frame_stats_triton(w5, *geometry, groups, circular, rows)
    else:
        keep_signs = torch.is_grad_enabled() and weight.requires_grad
        d, r, _ = torch.ops.regkernels.conv_frame_stats(w5, *geometry, groups, circular, rows, keep_signs)
    counts = torch.tensor(counts, dtype=d.dtype, device=d.device)
    return d, r, counts, d.shape[0] * d.shape[2] * positions


def _kernels(triton: bool):
    """The ``conv_frame_penalty`` and ``conv_gershgorin_bounds`` implementations on the stats of
    the torch path or (``triton``) the fused kernel; arguments as the references'."""

    def conv_frame_penalty(weight: torch.Tensor, input_size: Sequence[int], A: float, B: float, stride=1,
                           padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros",
                           side: str = "auto") -> torch.Tensor:
        """SPEC §2.2 without ``T``: ``(1/k) Σ_κ count(κ) Σ_a h(d, r)`` (module docstring)."""
        d, r, counts, k = _stats("conv_frame_penalty", weight, input_size, stride, padding, dilation, groups,
                                 padding_mode, side, triton)
        return R._frame_value(d, r, A, B, k, weight.dtype, counts=counts[:, None])

    def conv_gershgorin_bounds(weight: torch.Tensor, input_size: Sequence[int], stride=1, padding=0, dilation=1,
                               groups: int = 1, padding_mode: str = "zeros",
                               side: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """``(min(d − r), max(d + r))`` over the classes (every class has a position)."""
        d, r, _, _ = _stats("conv_gershgorin_bounds", weight, input_size, stride, padding, dilation, groups,
                            padding_mode, side, triton)
        return R._gershgorin_value(d, r, weight.dtype)

    return conv_frame_penalty, conv_gershgorin_bounds


conv_frame_penalty, conv_gershgorin_bounds = _kernels(triton=False)

for _device in ("cpu", "cuda"):
    _conv._TABLE.register("conv_frame_penalty", _device, _device, conv_frame_penalty)
    _conv._TABLE.register("conv_gershgorin_bounds", _device, _device, conv_gershgorin_bounds)
if _ext.has_triton():
    _penalty_triton, _bounds_triton = _kernels(triton=True)
    for _device in ("cuda", "cpu") if _ext.triton_interpreted() else ("cuda",):
        _conv._TABLE.register("conv_frame_penalty", _device, "triton", _penalty_triton, default=False)
        _conv._TABLE.register("conv_gershgorin_bounds", _device, "triton", _bounds_triton, default=False)
