"""Geometry of a convolution viewed as a linear operator, shared by the conv family (one copy).

Imported by the reference (``regkernels.reference.conv``), the composite (``regkernels.composite.conv``),
the Triton modules (``regkernels.triton.conv_matrix`` / ``conv_frame``) and the C++ ops' Python side
(``regkernels._C_ops``); it imports torch only. See docs/conv.md.

* Index maps: ``conv_output_size``, ``spatial_index_map`` (output position × tap → input position),
  ``matrix_shape`` of ``T``, and the 3-D normal form of the kernels (``expand3``, ``normalise``).
* The raw registered ops' argument checks (``check_op_geometry``, ``check_dense_args``,
  ``check_dense_grad``, ``check_stats_grads``): the Python twin of the C++ ``make_geometry``,
  for the fakes, the Triton ops and the composite stats ops.
* Border classes of the implicit frame statistics (``class_positions``, ``dim_classes``,
  ``FrameGeometry``, ``frame_plan``, ``class_counts``; the math is in ``regkernels.composite.conv``'s docstring) and
  the layout of the tap-Gram factor (``tap_gram_factor``, ``weight_of_factor``, ``factor_scale``).
* The hinge of the frame penalty and the Gershgorin bounds from ``(d, r)`` (``frame_value``,
  ``gershgorin_value``), shared by the explicit reference and the implicit paths; several layers
  of one geometry as one grouped conv and their ``(L,)`` values (``stack_layers``, ``frame_values``).
* ``vmap_by_loop``: the vmap rule of the family's ``torch.autograd.Function`` wrappers.
"""
from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from regkernels._numerics import pow2_scale

# ----------------------------------------------------------------------------- index maps


def expand(value, d: int) -> tuple[int, ...]:
    """An int or a length-d sequence of ints as a d-tuple (the one normaliser for
    stride / padding / dilation / kernel arguments)."""
    if isinstance(value, int):
        return (value,) * d
    return tuple(int(v) for v in value)


def expand3(value, d: int, fill: int) -> tuple[int, int, int]:
    """``expand(value, d)`` led by ``fill``s to three entries: a d-dim conv as a 3-D one (the
    kernels' normalised form; a unit dim has kernel / input 1, stride 1, padding 0, dilation 1)."""
    return (fill,) * (3 - d) + expand(value, d)


def conv_output_size(input_size: Sequence[int], kernel: Sequence[int], stride, padding, dilation) -> tuple[int, ...]:
    """Spatial output size of a convolution, per dim
    ``⌊(n + 2p − dil·(k − 1) − 1) / s⌋ + 1`` (the formula of ``nn.Conv2d``).
    May be < 1 for impossible configurations; callers validate."""
    d = len(input_size)
    s, p, dl = expand(stride, d), expand(padding, d), expand(dilation, d)
    return tuple((n + 2 * pi - di * (k - 1) - 1) // si + 1
                 for n, k, si, pi, di in zip(input_size, kernel, s, p, dl))


def conv_transpose_output_size(input_size: Sequence[int], kernel: Sequence[int], stride, padding, output_padding,
                               dilation) -> tuple[int, ...]:
    """Spatial output size of a transposed convolution, per dim
    ``(n − 1)·s − 2p + dil·(k − 1) + output_padding + 1`` (the formula of ``nn.ConvTranspose2d``).
    It is the input size of the convolution whose adjoint the transposed conv is (docs/conv.md#transposed-convolutions).
    May be < 1 for impossible configurations; callers validate."""
    d = len(input_size)
    s, p, op, dl = expand(stride, d), expand(padding, d), expand(output_padding, d), expand(dilation, d)
    return tuple((n - 1) * si - 2 * pi + di * (k - 1) + oi + 1
                 for n, k, si, pi, oi, di in zip(input_size, kernel, s, p, op, dl))


def matrix_shape(weight: torch.Tensor, input_size, stride, padding, dilation, groups: int) -> tuple[int, int]:
    """``(C_out·∏out_size, C_in·∏input_size)``, the shape of T."""
    out_size = conv_output_size(input_size, weight.shape[2:], stride, padding, dilation)
    return weight.shape[0] * math.prod(out_size), weight.shape[1] * groups * math.prod(input_size)


def spatial_index_map(input_size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
                      padding: tuple[int, ...], dilation: tuple[int, ...], circular: bool,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index map of the spatial part of a convolution.

    Returns ``(col, valid)``, both ``(P_out, K)`` with ``P_out = ∏ out_size`` and
    ``K = ∏ kernel``: for output position ``p`` (row-major over ``out_size``) and kernel
    tap ``t`` (row-major over ``kernel``), ``col[p, t]`` is the flat (row-major) input
    position the tap reads and ``valid[p, t]`` says whether it lies inside the input.

    Per dim ``i``: ``u = y·s_i − p_i + t·dil_i`` (output position y, tap t). Zero padding:
    valid iff ``0 ≤ u < n_i``. Circular padding: ``u mod n_i``, always valid; two taps of
    one output can then land on the same input position (their entries add up in T).
    """
    d = len(input_size)
    out_size = conv_output_size(input_size, kernel, stride, padding, dilation)
    col = torch.zeros((), dtype=torch.long, device=device)
    valid = torch.ones((), dtype=torch.bool, device=device)
    in_stride = 1
    for i in reversed(range(d)):  # reversed: row-major flat index, last dim fastest
        y = torch.arange(out_size[i], device=device)[:, None]
        t = torch.arange(kernel[i], device=device)[None, :]
        u = y * stride[i] - padding[i] + t * dilation[i]  # (out_i, k_i)
        ok = (u >= 0) & (u < input_size[i])
        if circular:
            u, ok = u.remainder(input_size[i]), torch.ones_like(ok)
        else:
            u = torch.where(ok, u, 0)  # dummy in-range position for taps in the zero padding
        # place (out_i, k_i) at axes (i, d + i) of a 2d-dim tensor ordered (y_1..y_d, t_1..t_d)
        shape = [1] * (2 * d)
        shape[i], shape[d + i] = out_size[i], kernel[i]
        col = col + u.reshape(shape) * in_stride
        valid = valid & ok.reshape(shape)
        in_stride *= input_size[i]
    full, flat = (*out_size, *kernel), (math.prod(out_size), math.prod(kernel))
    return col.expand(full).reshape(flat), valid.expand(full).reshape(flat)


def normalise(weight: torch.Tensor, input_size, stride, padding, dilation):
    """The kernels' 3-D form: ``(5-D weight view, input_size, stride, padding, dilation as 3-lists)``."""
    d = weight.dim() - 2
    w5 = weight.reshape(weight.shape[0], weight.shape[1], *expand3(tuple(weight.shape[2:]), d, 1))
    return (w5, list(expand3(tuple(input_size), d, 1)), list(expand3(stride, d, 1)),
            list(expand3(padding, d, 0)), list(expand3(dilation, d, 1)))


# ----------------------------------------------------------------------------- raw-op checks

def check_op_geometry(op: str, weight, input_size, stride, padding, dilation, groups, circular=False) -> None:
    """The argument checks of the registered conv ops (``torch.ops.regkernels.*``, public too),
    the Python twin of the C++ kernels' ``make_geometry``: a floating 5-D strided weight
    ``(C_out, C_in/groups, k0, k1, k2)``, int lists of 3 entries with ``input_size >= 1``,
    ``stride >= 1``, ``padding >= 0``, ``dilation >= 1``, each below 2^31, ``groups >= 1`` dividing
    ``C_out``, an output size >= 1 per dim and, for circular padding, ``padding <= input_size``.
    Raises RuntimeError (as ``TORCH_CHECK`` does) naming ``op``."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise RuntimeError(f"{op}: {what}")

    need(isinstance(weight, torch.Tensor), f"weight must be a tensor; got {type(weight).__name__}")
    need(weight.layout == torch.strided, f"weight must be a strided (dense) tensor; got {weight.layout}")
    need(weight.dtype.is_floating_point, f"weight must be float16, bfloat16, float32 or float64; got {weight.dtype}")
    need(weight.dim() == 5, f"weight must be 5-D (C_out, C_in/groups, k0, k1, k2); got shape {tuple(weight.shape)}")
    lists = (input_size, stride, padding, dilation)
    need(all(isinstance(v, (list, tuple)) and len(v) == 3 for v in lists),
         f"input_size, stride, padding and dilation must have 3 entries each; got {input_size}, {stride}, "
         f"{padding}, {dilation}")
    need(all(isinstance(x, int) and abs(x) < 2**31 for v in lists for x in v),
         f"input_size, stride, padding and dilation must be ints below 2^31; got {input_size}, {stride}, "
         f"{padding}, {dilation}")
    need(all(n >= 1 for n in input_size) and all(x >= 1 for x in stride) and all(x >= 0 for x in padding)
         and all(x >= 1 for x in dilation),
         f"need input_size >= 1, stride >= 1, padding >= 0 and dilation >= 1; got input_size={list(input_size)}, "
         f"stride={list(stride)}, padding={list(padding)}, dilation={list(dilation)}")
    need(isinstance(groups, int) and groups >= 1, f"groups must be >= 1; got {groups}")
    need(weight.shape[0] % groups == 0,
         f"C_out (weight.size(0) = {weight.shape[0]}) must be divisible by groups = {groups}")
    need(not circular or all(p <= n for p, n in zip(padding, input_size)),
         f"circular padding must not exceed input_size; got padding={list(padding)}, input_size={list(input_size)}")
    out = conv_output_size(tuple(input_size), weight.shape[2:], tuple(stride), tuple(padding), tuple(dilation))
    need(all(o >= 1 for o in out), f"the dilated kernel {tuple(weight.shape[2:])} does not fit "
                                   f"input_size={list(input_size)} with padding={list(padding)}, "
                                   f"dilation={list(dilation)}")


def check_dense_args(op: str, weight, input_size, stride, padding, dilation, groups, circular) -> tuple[int, int]:
    """The geometry checks of a dense ``conv_to_matrix`` op (the C++ kernels' ``make_geometry``, for
    the Triton ops and every fake); returns T's shape."""
    check_op_geometry(op, weight, input_size, stride, padding, dilation, groups, circular)
    rows, cols = matrix_shape(weight, input_size, stride, padding, dilation, groups)
    if rows * cols >= 2**63:
        raise RuntimeError(f"{op}: T of (C_out·P_out) × (C_in·P_in) entries overflows int64; got weight "
                           f"{tuple(weight.shape)}, input_size={list(input_size)}")
    return rows, cols


def check_dense_grad(op: str, grad, weight, shape: tuple[int, int]) -> None:
    """``grad`` of a dense backward op: strided, T's shape, the weight's dtype and device."""
    if not isinstance(grad, torch.Tensor) or grad.layout != torch.strided:
        raise RuntimeError(f"{op}: grad must be a strided (dense) tensor; got "
                           f"{grad.layout if isinstance(grad, torch.Tensor) else type(grad).__name__}")
    if grad.dim() != 2 or tuple(grad.shape) != tuple(shape):
        raise RuntimeError(f"{op}: grad must have the shape of T, {tuple(shape)}; got {tuple(grad.shape)}")
    if grad.dtype != weight.dtype:
        raise RuntimeError(f"{op}: grad must have the weight's dtype {weight.dtype}; got {grad.dtype}")
    if grad.device != weight.device:
        raise RuntimeError(f"{op}: grad must be on the weight's device {weight.device}; got {grad.device}")


# ----------------------------------------------------------------------------- border classes

@dataclass(frozen=True)
class DimClasses:
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


def _wrap(q: int, m: int) -> int:
    """The representative of ``q mod m`` in ``[−⌊m/2⌋, m − ⌊m/2⌋)``."""
    return (q + m // 2) % m - m // 2


def _pattern(pos: int, n: int, out: int, k: int, s: int, p: int, dil: int, circular: bool, rows: bool) -> tuple:
    """Row ``pos`` of ``Q_i`` relative to ``pos``: the sorted ``((t, t', q), multiplicity)`` items.

    cols (``pos = u``): ``Q[u, t, t', u + q] = Σ_y E[y, t, u] E[y, t', u + q]`` — the tap pairs of
    every output reading ``u``; rows (``pos = y``): ``Q[y, t, t', y + q] = Σ_u E[y, t, u] E[y + q, t', u]``
    — every reader of every input ``y`` reads.

    Circular padding labels an offset by its residue (``_wrap``) modulo the size of the side's index
    range, ``n`` (cols) or ``out`` (rows), instead of by the plain difference of two indices. This
    is safe because the columns of one row are distinct indices of ``[0, n)`` (``[0, out)``): two of
    them never share a residue, so a label still names exactly one column of that row and nothing
    is summed that is not one entry of ``V``. It merges what the plain difference splits: near a
    wrapped edge the column reached at ``+n − 1`` is the one the interior reaches at ``−1``, so
    (stride 1, same padding) every position gets the interior's pattern: one class."""
    pat: Counter = Counter()
    if rows:
        for t, u in _taps(pos, n, k, s, p, dil, circular):
            for y2, t2 in _readers(u, n, out, k, s, p, dil, circular):
                pat[(t, t2, _wrap(y2 - pos, out) if circular else y2 - pos)] += 1
    else:
        for y, t in _readers(pos, n, out, k, s, p, dil, circular):
            for t2, u2 in _taps(y, n, k, s, p, dil, circular):
                pat[(t, t2, _wrap(u2 - pos, n) if circular else u2 - pos)] += 1
    return tuple(sorted(pat.items()))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def class_positions(n: int, out: int, k: int, s: int, p: int, dil: int, circular: bool,
                    rows: bool) -> list[tuple[int | None, int]]:
    """Representative positions and how many positions share each one's pattern: ``(pos, count)``;
    ``pos = None`` stands for inputs that no output reads (the empty pattern). Equal patterns may
    appear under several representatives (``dim_classes`` merges them).

    The positions are cut into intervals on which every pattern is constant (per residue mod
    ``s`` for cols), from the finitely many linear conditions that decide a pattern; the cut
    points are a function of ``(k, s, p, dil)`` and the two ends, so the work is
    ``O(k²)`` intervals (cols: times at most ``3k`` residues), however large ``n``, ``p``,
    ``dil`` or ``s``. With ``e_t = t·dil − p``:

    * cols, input ``u``: output ``y`` reads ``u`` by tap ``t`` iff ``y·s = u + j·n − e_t`` for a
      wrap ``j`` (0 for zeros; −1, 0, 1 for circular as ``p ≤ n``) with ``0 ≤ y < out``, i.e.
      ``u ≡ e_t − j·n (mod s)`` and ``e_t − j·n ≤ u ≤ e_t − j·n + (out − 1)·s``. That output's tap
      ``t'`` reaches ``u + (t' − t)·dil`` (circular: its residue mod ``n``, a constant label),
      present for zeros iff ``0 ≤ u + (t' − t)·dil < n``. So the pattern is constant between the
      cuts ``e_t − j·n``, ``e_t − j·n + (out − 1)·s + 1``, ``−δ``, ``n − δ`` (``δ = (t' − t)·dil``)
      on each residue class mod ``s``; residues that are none of ``e_t − j·n`` are read by
      nobody (empty pattern).
    * rows, output ``y``: tap ``t`` reads ``w = y·s + e_t`` (zeros: iff ``⌈(p − t·dil)/s⌉ ≤ y <
      ⌈(n + p − t·dil)/s⌉``), and the readers of that input are the outputs
      ``y' = y + ((t − t')·dil + i·n)/s`` (``i = 0`` for zeros; circular: ``|i| ≤ 2`` since both
      unwrapped positions lie in ``[−p, n + p)``) where that is an integer in ``[0, out)``:
      constant between the cuts above and ``−σ``, ``out − σ`` for each integral shift ``σ``."""
    lo_end, hi_end = 0, (out if rows else n)
    cuts = {lo_end, hi_end}
    residues = {0}
    if rows:
        if not circular:
            for t in range(k):
                cuts |= {_ceil_div(p - t * dil, s), _ceil_div(n + p - t * dil, s)}
        for d in range(-(k - 1), k):
            for i in ((-2, -1, 0, 1, 2) if circular else (0,)):
                if (d * dil + i * n) % s == 0:
                    shift = (d * dil + i * n) // s
                    cuts |= {-shift, out - shift}
        step = 1
    else:
        residues = set()
        for t in range(k):
            for j in ((-1, 0, 1) if circular else (0,)):
                first = t * dil - p - j * n  # the input output 0 reads by tap t, unwrapped by j
                cuts |= {first, first + (out - 1) * s + 1}
                residues.add(first % s)
        if not circular:
            for d in range(-(k - 1), k):
                cuts |= {-d * dil, n - d * dil}
        step = s
    bounds = sorted(c for c in cuts if lo_end <= c <= hi_end)
    reps: list[tuple[int | None, int]] = []
    for lo, hi in zip(bounds, bounds[1:]):
        covered = 0
        for r in sorted(residues):
            first = lo + (r - lo) % step
            if first < hi:
                count = (hi - 1 - first) // step + 1
                reps.append((first, count))
                covered += count
        if covered < hi - lo:
            reps.append((None, hi - lo - covered))
    return reps


@functools.lru_cache(maxsize=512)
def dim_classes(n: int, k: int, s: int, p: int, dil: int, circular: bool, rows: bool) -> DimClasses:
    """``Q_i`` of one dim relative to each position, equal patterns grouped into classes; only the
    representatives of ``class_positions`` are enumerated (``O(classes · k²)`` work, not ``O(n)``)."""
    out = (n + 2 * p - dil * (k - 1) - 1) // s + 1
    index: dict[tuple, int] = {}
    counts: list[int] = []
    for pos, count in class_positions(n, out, k, s, p, dil, circular, rows):
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
    return DimClasses(tuple(table), tuple(counts), k, tuple(rel), col[0])



@dataclass(frozen=True)
class FrameGeometry:
    """A conv operator normalised to three spatial dims, and which Gram side is taken."""
    kernel: tuple[int, int, int]
    input_size: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    dilation: tuple[int, int, int]
    circular: bool
    rows: bool

    @property
    def dims(self) -> tuple[DimClasses, ...]:
        return tuple(dim_classes(n, k, s, p, dl, self.circular, self.rows)
                     for n, k, s, p, dl in zip(self.input_size, self.kernel, self.stride, self.padding,
                                               self.dilation))

    @property
    def positions(self) -> int:
        """Spatial positions per channel of V's rows: ∏n (cols) or ∏out (rows)."""
        return math.prod(sum(dim.counts) for dim in self.dims)

    @property
    def n_cls(self) -> int:
        return math.prod(dim.n_cls for dim in self.dims)

    @property
    def per_pair(self) -> int:
        """Largest intermediate of the class contraction per channel pair ``(a, a')``: the remaining
        tap pairs × classes × offsets after each of its three one-dim steps."""
        k0, k1, k2 = self.kernel
        c0, c1, c2 = (dim.n_cls * len(dim.rel) for dim in self.dims)
        return max(k0 * k0 * k1 * k1 * k2 * k2, k0 * k0 * k1 * k1 * c2, k0 * k0 * c1 * c2, c0 * c1 * c2)


def frame_geometry(weight_shape, input_size, stride, padding, dilation, groups, padding_mode, side) -> FrameGeometry:
    """The public arguments of ``conv_frame_penalty`` as a ``FrameGeometry``; ``side="auto"`` takes
    the smaller Gram (the reference's rule, docs/conv.md)."""
    d = len(weight_shape) - 2
    kernel = tuple(weight_shape[2:])
    out = conv_output_size(input_size, kernel, stride, padding, dilation)
    m = weight_shape[0] * math.prod(out)
    n = weight_shape[1] * groups * math.prod(input_size)
    rows = side == "rows" or (side == "auto" and m < n)
    return FrameGeometry(expand3(kernel, d, 1), expand3(tuple(input_size), d, 1), expand3(stride, d, 1),
                         expand3(padding, d, 0), expand3(dilation, d, 1), padding_mode == "circular", rows)


def stats_geometry(weight: torch.Tensor, input_size, stride, padding, dilation, circular: bool,
                   rows: bool) -> FrameGeometry:
    """The ``FrameGeometry`` of a stats op's (already 3-D) arguments."""
    # int(): the class tables are a function of the kernel size (a dynamic size specialises)
    return FrameGeometry(tuple(int(k) for k in weight.shape[2:]), tuple(input_size), tuple(stride), tuple(padding),
                         tuple(dilation), circular, rows)


@functools.lru_cache(maxsize=256)
def class_tables(geo: FrameGeometry, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The class tables ``(n_cls_i, k_i, k_i, n_rel_i)`` on the device."""
    return tuple(torch.tensor(dim.table, dtype=dtype).view(dim.n_cls, dim.k, dim.k, len(dim.rel)).to(device)
                 for dim in geo.dims)


@functools.lru_cache(maxsize=256)
def _class_counts(counts: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(counts, dtype=dtype, device=device)


def class_counts(counts: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The positions per class (``frame_plan``'s ``counts``) as a ``(n_cls,)`` tensor on ``device``, cached
    per (counts, dtype, device): a layer's penalty asks for the same counts every step, and building
    them is a host→device copy (a stream sync on a GPU). Built afresh while torch.compile traces, so
    that no traced tensor lands in the cache. Read-only: callers must not modify it in place."""
    make = _class_counts.__wrapped__ if torch.compiler.is_compiling() else _class_counts
    return make(tuple(counts), dtype, device)


def stats_shape(weight_shape, geo: FrameGeometry, groups: int) -> tuple[int, int, int]:
    """``(G, n_cls, Cx)``: the stats' shape, ``Cx`` the channels of one group on V's side."""
    cx = weight_shape[0] // groups if geo.rows else weight_shape[1]
    return groups, geo.n_cls, cx


def signs_shape(geo: FrameGeometry, G: int, cx: int) -> tuple[int, ...]:
    """Shape of all ``V_κ`` at once, ``(G, Cx, Cx, n0, q0, n1, q1, n2, q2)``."""
    return (G, cx, cx) + tuple(x for dim in geo.dims for x in (dim.n_cls, len(dim.rel)))


def check_frame_work(geo: FrameGeometry, G: int, cx: int, op: str, limit: int, triton: bool = False) -> None:
    """Refuse (ValueError naming the size) a problem whose tap Gram ``X (G, Cx·K, Cx·K)``, one channel
    row of the contraction (the composite never splits a row) or the Triton combined class table
    (``NC·K²·Q``) would exceed ``limit`` bytes (``MAX_WORK_BYTES``; float32 counted, float64 doubles it)."""
    K = math.prod(geo.kernel)
    sizes = {"the tap Gram": G * (cx * K) ** 2, "one channel row of the class contraction": G * cx * geo.per_pair}
    if triton:
        sizes["the combined class table"] = geo.n_cls * K * K * math.prod(len(dim.rel) for dim in geo.dims)
    what, elements = max(sizes.items(), key=lambda item: item[1])
    nbytes = 4 * elements
    if nbytes > limit:
        raise ValueError(f"{op}: {what} needs {elements} elements ({nbytes / 2**30:.1f} GiB in float32), over "
                         f"MAX_WORK_BYTES={limit} (regkernels.reference.conv); use fewer channels per "
                         f"group or a smaller kernel")


def _constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing torch._dynamo (1–1.5 s) at
    ``import regkernels``: the decorator only sets this attribute, which dynamo reads when it traces
    a call (tests/test_import.py checks that the decorator still does only this)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_result
def frame_plan(op: str, shape: tuple[int, ...], input_size: tuple[int, ...], stride, padding, dilation, groups: int,
               padding_mode: str, side: str, triton: bool, limit: int) -> tuple:
    """The stats op's geometry arguments, the positions per class (flattened over the class grid)
    and the positions per channel: plain Python constants (torch.compile runs this once when
    tracing). Refuses a problem over the work limit (``check_frame_work``) before anything is
    allocated."""
    geo = frame_geometry(shape, input_size, stride, padding, dilation, groups, padding_mode, side)
    check_frame_work(geo, groups, shape[0] // groups if geo.rows else shape[1], op, limit, triton)
    c0, c1, c2 = (dim.counts for dim in geo.dims)
    counts = tuple(a * b * c for a in c0 for b in c1 for c in c2)
    args = (list(geo.kernel), list(geo.input_size), list(geo.stride), list(geo.padding), list(geo.dilation))
    return args, geo.circular, geo.rows, counts, geo.positions


def check_stats_grads(op: str, weight: torch.Tensor, geo: FrameGeometry, groups: int, grad_d, grad_r,
                      signs=None) -> None:
    """``grad_d``, ``grad_r``: floating ``(G, n_cls, Cx)`` on the weight's device; ``signs``: int8, empty
    or the forward's ``sign(V)`` shape."""
    want = stats_shape(weight.shape, geo, groups)
    for name, g in (("grad_d", grad_d), ("grad_r", grad_r)):
        if not (isinstance(g, torch.Tensor) and g.dtype.is_floating_point and tuple(g.shape) == want
                and g.device == weight.device and g.layout == torch.strided):
            raise RuntimeError(f"{op}: {name} must be a floating strided tensor of shape {want} (groups, border "
                               f"classes, channels) on {weight.device}; got "
                               f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}"
                               f"{f' {g.dtype} on {g.device}' if isinstance(g, torch.Tensor) else ''}")
    if signs is not None:
        shapes = ((0,), signs_shape(geo, groups, want[2]))
        if not (signs.dtype == torch.int8 and tuple(signs.shape) in shapes and signs.device == weight.device):
            raise RuntimeError(f"{op}: signs must be the forward's int8 output, of shape {shapes[1]} or (0,), on "
                               f"{weight.device}; got {tuple(signs.shape)} {signs.dtype} on {signs.device}")


# ----------------------------------------------------------------------------- the tap-Gram factor

def tap_gram_factor(W: torch.Tensor, groups: int, rows: bool) -> torch.Tensor:
    """``Z (G, ·, Cx·K)`` with ``X = Zᵀ Z`` the per-group tap Gram: for cols ``Z[g, o, (c, t)] =
    W[o, c, t]`` (Cx = C_in/g), for rows ``Z[g, c, (o, t)] = W[o, c, t]`` (Cx = C_out/g)."""
    c_out, c_in_g, K = W.shape[0], W.shape[1], math.prod(W.shape[2:])
    Wg = W.reshape(groups, c_out // groups, c_in_g, K)
    if rows:
        Wg = Wg.transpose(1, 2)
    return Wg.reshape(groups, Wg.shape[1], Wg.shape[2] * K)


def weight_of_factor(gZ: torch.Tensor, shape: torch.Size, rows: bool) -> torch.Tensor:
    """The inverse layout of ``tap_gram_factor``: ``∂Z`` back to the weight's shape."""
    c_out, c_in_g = shape[0], shape[1]
    groups = gZ.shape[0]
    # explicit sizes (no -1: a layer without channels has a 0-element factor)
    gW = gZ.reshape(groups, *((c_in_g, c_out // groups) if rows else (c_out // groups, c_in_g)),
                    math.prod(shape[2:]))
    if rows:
        gW = gW.transpose(1, 2)
    return gW.reshape(c_out, c_in_g, *shape[2:])


def factor_scale(Z: torch.Tensor) -> torch.Tensor:
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


# ----------------------------------------------------------------------------- the hinge

def frame_value(d: torch.Tensor, r: torch.Tensor, A: float, B: float, k: int, dtype: torch.dtype,
                counts: torch.Tensor | None = None) -> torch.Tensor:
    """docs/gram.md's ``(1/k) Σ_i [max(0, A − (d_i − r_i))² + max(0, d_i + r_i − B)²]``, each row
    ``i`` of ``d, r`` standing for ``counts[i]`` rows of the Gram (1 each without ``counts``)."""
    h = torch.clamp(A - (d - r), min=0) ** 2 + torch.clamp((d + r) - B, min=0) ** 2
    total = (h if counts is None else h * counts).sum()
    return (total / max(k, 1)).to(dtype)


def stack_layers(weights: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``L`` layers of one weight shape ``(C_out, C_in/g, *k)`` as ONE grouped conv ``(L·C_out, C_in/g, *k)``
    with ``L·g`` groups (docs/conv.md#conv_frame_penalty_multi), in the math ``dtype``; returns
    ``(W, scale)``.

    The implicit stats treat every group on its own (one tap-Gram block and one ``(n_cls, Cx)`` slice
    of ``d``, ``r`` per group; ``tap_gram_factor`` takes groups as consecutive runs of ``C_out/G``
    output channels on both sides), so group ``l·g + j`` of the stack is group ``j`` of layer ``l``.
    Each layer is divided by its own power of two ``scale[l]`` (``pow2_scale`` of its ``max|W_l|``:
    exact, and ``frame_values`` scales its ``d``, ``r`` back): the stats op's own range scaling is
    one factor for the whole stack, which would let a layer of huge weights push a small one's tap
    Gram into float32 underflow, or — when another layer holds NaN and that factor falls back to 1 —
    let a huge layer overflow to ``inf·0 = NaN``. So each layer gets the value its single-layer call
    gives. The stack is a differentiable ``torch.cat`` (``scale`` is a constant): gradients reach each
    layer's weight."""
    L = len(weights)
    W = torch.cat([w.to(dtype) for w in weights])
    if W.numel() == 0:
        return W, W.new_ones(L)
    scale = pow2_scale(W.detach().reshape(L, W.numel() // L).abs().amax(dim=1))
    return (W.reshape(L, -1) / scale[:, None]).reshape(W.shape), scale


def frame_values(d: torch.Tensor, r: torch.Tensor, A: float, B: float, L: int, k: int, dtype: torch.dtype,
                 counts: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(L,)`` frame penalties of ``L`` layers stacked as one grouped conv (``stack_layers``) from its
    stats ``d``, ``r`` of shape ``(L·g, n_cls, Cx)``: layer ``l`` owns groups ``l·g … l·g + g − 1``, and
    its value is ``frame_value`` of those rows, ``(1/k) Σ count · h(d, r)`` with ``k`` the size of ONE
    layer's Gram and ``counts (n_cls,)`` the positions per class. ``scale (L,)``: the layers' factors
    from ``stack_layers`` (their ``d``, ``r`` are scaled back by ``scale²`` first)."""
    shape = (L, d.shape[0] // L, *d.shape[1:])  # explicit: a layer without channels has no -1 to infer
    d, r = d.reshape(shape), r.reshape(shape)
    if scale is not None:
        # (x·σ)·σ, as the stats ops scale back: σ² alone may overflow where x·σ² does not
        s = scale.to(d.dtype).view(L, 1, 1, 1)
        d, r = d * s * s, r * s * s
    h = torch.clamp(A - (d - r), min=0) ** 2 + torch.clamp((d + r) - B, min=0) ** 2
    return ((h * counts[:, None]).sum(dim=(1, 2, 3)) / max(k, 1)).to(dtype)


def gershgorin_value(d: torch.Tensor, r: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min(d − r), max(d + r))``; ``(+inf, −inf)`` (the identities of min and max) when empty."""
    if d.numel() == 0:
        inf = torch.tensor(float("inf"), dtype=dtype, device=d.device)
        return inf, -inf
    return (d - r).min().to(dtype), (d + r).max().to(dtype)


# ----------------------------------------------------------------------------- torch.func

def vmap_by_loop(fn: Callable, info, in_dims, *args):
    """The vmap rule of an autograd.Function over an op without batch dims: ``fn`` on each sample
    (the batched arguments sliced along their vmapped dim, the others as they are), outputs
    stacked on dim 0. Weights are single layers, so the op cannot take the batch in one call;
    the loop runs below the vmap level, one op call per layer as an unbatched caller would make."""
    outs = [fn(*(a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a
                 for a, d in zip(args, in_dims)))
            for i in range(info.batch_size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0
