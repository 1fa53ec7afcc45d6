"""Pure-torch references for convolutions viewed as linear operators (docs/conv.md).

These are the test oracles, the CPU fallback and the benchmark baselines, written
for reading rather than speed:

* ``conv_to_matrix`` — the explicit (block-Toeplitz / block-circulant) matrix ``T`` of
  a convolution layer acting on inputs of a fixed size (docs/conv.md#conv_to_matrix), dense or sparse.
* ``conv_frame_penalty`` / ``conv_gershgorin_bounds`` — the frame penalty of ``T``
  computed EXPLICITLY from the dense matrix (docs/conv.md#conv_frame_penalty). Memory grows with
  ``(C·H·W)²``, so a size guard refuses large layers with a ``ValueError``;
  ``conv_frame_penalty_multi`` is the same for a list of layers, one at a time.
* ``conv_orthogonality_penalty`` — the OCNN kernel orthogonality penalty (docs/conv.md#conv_orthogonality_penalty),
  output side (``side="rows"``) or input side (``side="cols"``, ``conv_input_orthogonality``).
* ``conv_singular_values`` / ``clip_conv_singular_values`` — the singular values of a
  circular, stride-1 convolution through the FFT (Sedghi et al., docs/conv.md#conv_singular_values).
* ``conv_spectral_norm`` — the largest singular value of ``T``: power iteration through the conv
  and its adjoint, or a certified upper bound by Gram iteration on the blocks of a circulant that
  contains ``T`` (docs/conv.md#conv_spectral_norm).

Conventions shared by every function here: ``weight`` is ``(C_out, C_in/groups, *k)``
with 1, 2 or 3 spatial dims ``d``; ``input_size`` is the spatial size ``(n_1, …, n_d)``
of one input sample; stride / padding / dilation are an int or a d-tuple.
Low-precision weights (float16 / bfloat16) are handled by computing in float32 and
returning the input dtype, except ``conv_to_matrix`` whose entries are copies of the
weights and keep their dtype.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

# the index maps and the hinge are shared with the kernels' glue (one copy, regkernels/_geometry.py)
from regkernels._geometry import (conv_output_size, expand, frame_value, gershgorin_value, matrix_shape,
                                  spatial_index_map)
from regkernels._dtypes import compute_dtype, upcast
from regkernels._numerics import first_order_only, pow2_scale

__all__ = [
    "MAX_DENSE_BYTES",
    "MAX_WORK_BYTES",
    "conv_output_size",
    "conv_to_matrix",
    "conv_frame_penalty",
    "conv_gershgorin_bounds",
    "conv_frame_penalty_multi",
    "conv_orthogonality_penalty",
    "conv_orthogonality_penalty_multi",
    "conv_input_orthogonality",
    "conv_singular_values",
    "clip_conv_singular_values",
    "ConvSpectralNorm",
    "conv_spectral_norm",
    "circulant_embedding",
]

# Largest dense matrix (in bytes) the explicit references build; over it they raise
# ValueError before allocating. For the explicit frame penalty the count includes the
# Gram matrix and its absolute value (see ``frame_working_bytes``).
MAX_DENSE_BYTES = 2**31
# Largest working set (in bytes) of the other size-dependent intermediates: the sparse layouts'
# entries (indices and values), the OCNN self-convolution and its padded input, the Sedghi
# per-frequency blocks, the implicit conv frame path's tap Gram and contraction rows. Over it
# the op raises ValueError naming the size before allocating (docs/index.md#numerical-behaviour), never an allocator error.
MAX_WORK_BYTES = 2**34


def _check_dense_size(op: str, what: str, nbytes: int, limit: int | None, advice: str) -> None:
    limit = MAX_DENSE_BYTES if limit is None else limit
    if nbytes > limit:
        raise ValueError(f"{op}: {what} needs {nbytes} bytes ({nbytes / 2**30:.2f} GiB), over the dense size "
                         f"limit max_dense_bytes={limit}; {advice}")


def _matrix_entries(weight: torch.Tensor, input_size, stride, padding, dilation, groups: int, padding_mode: str):
    """All (row, col, value, valid) entries of T, each ``(C_out, C_in/g, P_out, K)``.

    Row of entry (o, c', p, t) = ``o·P_out + p``; column = ``(g(o)·C_in/g + c')·P_in + col[p, t]``
    with ``g(o) = o // (C_out/g)`` the group of filter o; value = ``weight[o, c', t]``.
    Invalid (zero-padding) entries keep a dummy in-range index and value 0, so the
    shapes never depend on data (which keeps the dense path traceable by torch.compile).
    """
    d = weight.dim() - 2
    c_out, c_in_g = weight.shape[0], weight.shape[1]
    kernel = tuple(weight.shape[2:])
    stride, padding, dilation = expand(stride, d), expand(padding, d), expand(dilation, d)
    col_sp, valid = spatial_index_map(tuple(input_size), kernel, stride, padding, dilation,
                                       padding_mode == "circular", weight.device)
    p_out, k = col_sp.shape
    p_in = math.prod(input_size)
    dev = weight.device
    o = torch.arange(c_out, device=dev).view(-1, 1, 1, 1)
    c = torch.arange(c_in_g, device=dev).view(1, -1, 1, 1)
    chan = (o // max(c_out // groups, 1)) * c_in_g + c  # input channel of (o, c')
    rows = (o * p_out + torch.arange(p_out, device=dev).view(1, 1, -1, 1)).expand(c_out, c_in_g, p_out, k)
    cols = chan * p_in + col_sp[None, None]
    w = weight.reshape(c_out, c_in_g, 1, k)
    vals = torch.where(valid[None, None], w, torch.zeros((), dtype=weight.dtype, device=dev))
    return rows, cols, vals, valid[None, None].expand(c_out, c_in_g, p_out, k)


def check_sparse_matrix(weight: torch.Tensor, input_size, stride, padding, dilation, layout: str) -> None:
    """The sparse layouts' size guard (every ``conv_to_matrix`` implementation runs it first): up to
    ``C_out·Cg·P_out·K`` structural entries, each an int64 column, an int64 row (COO) or its share
    of the row pointers (CSR) and a value, plus the spatial index map (``P_out·K``, about 12 int64
    temporaries while it is built) and the per-channel index plan (``Cg·P_out·K``, about 6). Over
    ``MAX_WORK_BYTES`` it raises ValueError naming the size, before allocating."""
    d = weight.dim() - 2
    kernel = tuple(weight.shape[2:])
    out = conv_output_size(tuple(input_size), kernel, expand(stride, d), expand(padding, d), expand(dilation, d))
    spatial = math.prod(out) * math.prod(kernel)
    c_out, c_in_g = weight.shape[0], weight.shape[1]
    entries = c_out * c_in_g * spatial
    nbytes = entries * (16 + weight.element_size()) + spatial * 8 * (12 + 6 * c_in_g)
    if nbytes > MAX_WORK_BYTES:
        raise ValueError(f"conv_to_matrix: the {layout!r} layout of T with up to {entries} structural entries "
                         f"({c_out}·{c_in_g}·{math.prod(out)}·{math.prod(kernel)}: C_out·C_in/groups·output "
                         f"positions·taps) needs about {nbytes} bytes ({nbytes / 2**30:.1f} GiB), over "
                         f"MAX_WORK_BYTES={MAX_WORK_BYTES}; use a smaller input_size or fewer channels")


def check_dense_matrix(weight: torch.Tensor, shape: tuple[int, int], limit: int | None) -> None:
    """The dense layout's size guard (every ``conv_to_matrix`` implementation runs it first)."""
    _check_dense_size("conv_to_matrix", f"the dense matrix of shape {shape}",
                      shape[0] * shape[1] * weight.element_size(), limit,
                      "use layout='coo' or layout='csr' (built without a dense intermediate) "
                      "or a larger max_dense_bytes")


def conv_to_matrix(weight: torch.Tensor, input_size: Sequence[int], stride=1, padding=0, dilation=1,
                   groups: int = 1, padding_mode: str = "zeros", layout: str = "dense",
                   max_dense_bytes: int | None = None) -> torch.Tensor:
    """The matrix ``T`` of a convolution acting on inputs of spatial size ``input_size``.

    formula: docs/conv.md#conv_to_matrix — for every ``x`` of shape ``(C_in, *input_size)``
    ``T @ x.reshape(-1) == conv(x[None], weight, None, stride, padding, dilation, groups).reshape(-1)``
    (``conv`` = F.conv1d/2d/3d; ``"circular"`` = circular padding then conv with padding 0).

    Args:
        weight: ``(C_out, C_in/groups, *k)``, d = 1, 2 or 3 spatial dims.
        input_size: ``(n_1, …, n_d)``.
        layout: ``"dense"`` (a strided tensor), ``"coo"`` (coalesced sparse COO) or
            ``"csr"`` (sparse CSR); the sparse layouts hold exactly the structural
            nonzeros (one per distinct (row, col) the index map reaches) and are built
            directly from the index map, without a dense intermediate.
        max_dense_bytes: size limit of the dense layout (default ``MAX_DENSE_BYTES``).

    Returns:
        ``T`` of shape ``(C_out·∏out_size, C_in·∏input_size)``; rows ordered ``(o, y, x)``
        and columns ``(c, u, v)`` row-major. Differentiable w.r.t. ``weight`` (the
        sparse layouts through their values).

    Raises:
        ValueError: a dense ``T`` over ``max_dense_bytes``, or a sparse one whose entries and
        index plan would exceed ``MAX_WORK_BYTES`` (before allocating).
    """
    shape = matrix_shape(weight, input_size, stride, padding, dilation, groups)
    if layout == "dense":
        check_dense_matrix(weight, shape, max_dense_bytes)
    else:
        check_sparse_matrix(weight, input_size, stride, padding, dilation, layout)
    rows, cols, vals, valid = _matrix_entries(weight, tuple(input_size), stride, padding, dilation,
                                              groups, padding_mode)
    if layout == "dense":
        # scatter with accumulation: circular entries that wrap onto one column add up;
        # invalid entries add 0 to a dummy position.
        flat = (rows * shape[1] + cols).reshape(-1)
        out = weight.new_zeros(shape[0] * shape[1])
        return out.index_put((flat,), vals.reshape(-1), accumulate=True).view(shape)
    return _sparse_matrix(rows[valid], cols[valid], vals[valid], shape, layout)


def sparse_values(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` for a sparse ``T``, differentiable once: torch's sparse constructors and
    ``values()`` have no double backward (the second derivative would silently be 0), on every
    backend, so a ``create_graph=True`` backward raises."""
    return first_order_only(values, f"conv_to_matrix: double backward (create_graph=True) is not supported for "
                                    f"layout={layout!r} on any backend (torch's sparse tensors have no double "
                                    f"backward); layout='dense' supports it on every backend")


def _sparse_matrix(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int],
                   layout: str) -> torch.Tensor:
    """Coalesced COO (or CSR) from possibly repeated (row, col) entries.

    The structure is coalesced by hand (unique keys + index_add of the values) so the
    values stay an ordinary differentiable function of the weight.
    """
    keys, inverse = torch.unique(rows * shape[1] + cols, sorted=True, return_inverse=True)
    values = sparse_values(vals.new_zeros(keys.numel()).index_add(0, inverse, vals), layout)
    r, c = keys // shape[1], keys % shape[1]
    if layout == "coo":
        return torch.sparse_coo_tensor(torch.stack([r, c]), values, shape, is_coalesced=True,
                                       check_invariants=False)
    # CSR: keys are sorted row-major, so the column/value order is already CSR order
    counts = torch.bincount(r, minlength=shape[0])
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return torch.sparse_csr_tensor(crow, c, values, shape, check_invariants=False)


def _frame_terms(T: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d, r)`` of ``V = Gram(T, side)``: diagonal and Gershgorin radii
    ``r_i = Σ_{j≠i} |V_ij|`` (formula: docs/gram.md#frame_penalty). Private on purpose: this module
    stands alone, independent of the matrix-penalty references."""
    m, n = T.shape
    rows = side == "rows" or (side == "auto" and m < n)
    V = T @ T.mT if rows else T.mT @ T
    d = V.diagonal()
    off = ~torch.eye(V.shape[0], dtype=torch.bool, device=V.device)
    # zero the diagonal instead of subtracting |V_ii| from the full row sum: no
    # cancellation, and |x| has subgradient 0 at 0 (docs/gram.md#conventions)
    r = torch.where(off, V.abs(), torch.zeros((), dtype=V.dtype, device=V.device)).sum(-1)
    return d, r


def frame_working_bytes(weight: torch.Tensor, input_size, stride, padding, dilation, groups: int,
                         side: str) -> tuple[tuple[int, int], int]:
    """Shape of T and the bytes of the explicit path: T plus the Gram V and |V| (k×k)."""
    m, n = matrix_shape(weight, input_size, stride, padding, dilation, groups)
    k = m if side == "rows" else n if side == "cols" else min(m, n)
    itemsize = torch.empty((), dtype=compute_dtype(weight.dtype)).element_size()
    return (m, n), (m * n + 2 * k * k) * itemsize


def _explicit_frame(op: str, weight, input_size, stride, padding, dilation, groups, padding_mode, side):
    shape, nbytes = frame_working_bytes(weight, input_size, stride, padding, dilation, groups, side)
    _check_dense_size(op, f"the explicit reference (dense T of shape {shape} plus its Gram matrix)", nbytes,
                      None, "use a smaller layer or input_size (conv_to_matrix(..., layout='coo' or "
                      "layout='csr') gives T without the dense matrix)")
    T = conv_to_matrix(upcast(weight), input_size, stride, padding, dilation, groups,
                       padding_mode, max_dense_bytes=nbytes)
    return _frame_terms(T, side)


def conv_frame_penalty(weight: torch.Tensor, input_size: Sequence[int], A: float, B: float, stride=1, padding=0,
                       dilation=1, groups: int = 1, padding_mode: str = "zeros", side: str = "auto") -> torch.Tensor:
    """Frame penalty of the convolution operator, computed explicitly from the dense ``T``.

    formula: docs/conv.md#conv_frame_penalty = docs/gram.md#frame_penalty applied to ``T = conv_to_matrix(weight, input_size, …)``:
    ``V = Gram(T, side)`` (k×k), ``d_i = V_ii``, ``r_i = Σ_{j≠i}|V_ij|``,
    ``R = (1/k)·Σ_i [max(0, A − (d_i − r_i))² + max(0, d_i + r_i − B)²]``.

    Args:
        weight: ``(C_out, C_in/groups, *k)``; input_size: ``(n_1, …, n_d)``; ``0 ≤ A ≤ B``.
        side: ``"auto"`` (the smaller Gram), ``"rows"`` (``T Tᵀ``) or ``"cols"`` (``Tᵀ T``).

    Returns:
        A 0-dim tensor in the weight's dtype (float16/bfloat16 computed in float32). An
        operator whose chosen Gram is empty (k = 0, e.g. no output channels with
        ``side="auto"``) has penalty 0.

    Raises:
        ValueError: when T plus its Gram matrix would exceed ``MAX_DENSE_BYTES`` (the
        explicit path's memory grows with ``(C·∏n)²``).
    """
    d, r = _explicit_frame("conv_frame_penalty", weight, input_size, stride, padding, dilation, groups,
                           padding_mode, side)
    return frame_value(d, r, A, B, d.numel(), weight.dtype)


def conv_gershgorin_bounds(weight: torch.Tensor, input_size: Sequence[int], stride=1, padding=0, dilation=1,
                           groups: int = 1, padding_mode: str = "zeros",
                           side: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Gershgorin bounds of ``Gram(T, side)``: ``(min_i(d_i − r_i), max_i(d_i + r_i))``.

    formula: docs/gram.md#frame_penalty companion, on the explicit ``T`` of docs/conv.md#conv_to_matrix (same arguments and
    size guard as ``conv_frame_penalty``). Two 0-dim tensors in the weight's dtype;
    every eigenvalue of ``V`` lies in ``[lo, hi]``. For an empty Gram (k = 0) the
    bounds are the identities of min and max: ``(+inf, −inf)``.
    """
    d, r = _explicit_frame("conv_gershgorin_bounds", weight, input_size, stride, padding, dilation, groups,
                           padding_mode, side)
    return gershgorin_value(d, r, weight.dtype)


def conv_frame_penalty_multi(weights: Sequence[torch.Tensor], input_size: Sequence[int], A: float, B: float,
                             stride=1, padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros",
                             side: str = "auto") -> torch.Tensor:
    """``(L,)``: ``conv_frame_penalty`` of each weight in the list (one geometry for all), explicitly, one
    layer at a time (docs/conv.md#conv_frame_penalty_multi)."""
    return torch.stack([conv_frame_penalty(w, input_size, A, B, stride, padding, dilation, groups, padding_mode,
                                           side) for w in weights])


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_orthogonality_penalty(weight: torch.Tensor, stride=1, padding=None, side: str = "rows") -> torch.Tensor:
    """OCNN kernel orthogonality penalty (Wang et al., "Orthogonal Convolutional Neural Networks").

    ``side="cols"``: the input side, ``conv_input_orthogonality`` below. ``side="rows"`` (the
    output side), formula: docs/conv.md#conv_orthogonality_penalty — ``P = ⌊(k−1)/S⌋·S`` per dim unless given,
    ``O = conv(K, K, stride=S, padding=P)`` of shape ``(o, o, *s)`` (the filters used as a
    batch of o inputs, ``s = ⌊2P/S⌋ + 1``), target ``T`` = ``I_o`` at the spatial centre
    ``⌊s/2⌋`` and 0 elsewhere, ``R = ‖O − T‖_F²``.

    Args:
        weight: ``(o, c, *k)`` with 1, 2 or 3 spatial dims (OCNN uses conv2d).
        padding: None for the default rule; ``padding=1`` reproduces the official code
            (whose centre is misplaced for stride 2). The official code returns the norm,
            not its square.

    Returns:
        A 0-dim tensor in the weight's dtype (float16/bfloat16 computed in float32).
    """
    if side == "cols":
        return conv_input_orthogonality(weight, stride)
    d = weight.dim() - 2
    if weight.shape[0] == 0:
        return weight.sum()  # no filters: an empty sum, 0, still attached to the graph
    S = expand(stride, d)
    P = tuple((k - 1) // s * s for k, s in zip(weight.shape[2:], S)) if padding is None else expand(padding, d)
    o, c, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    out = tuple(2 * p // s + 1 for p, s in zip(P, S))  # (k + 2P − k)/S + 1 per dim
    itemsize = torch.empty((), dtype=compute_dtype(weight.dtype)).element_size()
    nbytes = (o * o * math.prod(out) + o * c * math.prod([k + 2 * p for k, p in zip(kernel, P)])) * itemsize
    if nbytes > MAX_WORK_BYTES:
        raise ValueError(f"conv_orthogonality_penalty: the self-convolution O of shape {(o, o, *out)} and the padded "
                         f"kernel need {nbytes} bytes ({nbytes / 2**30:.1f} GiB), over MAX_WORK_BYTES="
                         f"{MAX_WORK_BYTES}; use a smaller padding (the default ⌊(k−1)/S⌋·S already covers every "
                         f"overlap of the kernel with itself)")
    K = upcast(weight)
    if c == 0:  # no input channels: O = K ⋆ K is an empty sum, 0 (kept attached to the graph)
        O = K.sum() + K.new_zeros((o, o, *out))
    else:
        O = _CONV[d](K, K, stride=S, padding=P)
    centre = (slice(None), slice(None)) + tuple(s // 2 for s in O.shape[2:])
    target = torch.zeros_like(O)
    target[centre] = torch.eye(o, dtype=O.dtype, device=O.device)
    return ((O - target) ** 2).sum().to(weight.dtype)


def conv_orthogonality_penalty_multi(weights: Sequence[torch.Tensor], stride=1, padding=None,
                                     side: str = "rows") -> torch.Tensor:
    """``(L,)``: ``conv_orthogonality_penalty`` of each weight, one at a time
    (docs/conv.md#conv_orthogonality_penalty_multi)."""
    return torch.stack([conv_orthogonality_penalty(w, stride, padding, side) for w in weights])


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_input_orthogonality(weight: torch.Tensor, stride=1) -> torch.Tensor:
    """OCNN input-side orthogonality, ``conv_orthogonality_penalty(side="cols")``
    (docs/conv.md#input-side): ``R = Σ_r ‖row block r of TᵀT − [I_c at shift 0]‖_F²``.

    ``T`` is the stride-``S`` convolution on an unbounded input; ``TᵀT`` is periodic with period
    ``S`` per dim, so its rows fall into ``∏S`` phases ``r`` (the input pixel's position mod ``S``),
    and the rows ``(·, u)`` of one phase are all alike. Here each phase's rows are formed as
    ``TᵀT e_(ch, u)`` for every input channel ``ch`` at one pixel ``u`` of that phase: one-hot
    images through the conv and its adjoint (``conv_transpose``), on an unpadded grid large enough
    that every tap reading ``u`` has its output and every column reached lies inside. A phase with
    ``r_i ≥ k_i`` in some dim is read by no tap: its rows are 0 and add ``‖−I_c‖² = c`` each.

    Returns a 0-dim tensor in the weight's dtype (float16/bfloat16 computed in float32).
    """
    op = "conv_orthogonality_penalty"
    d = weight.dim() - 2
    o, c, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    S = expand(stride, d)
    phases = [min(s, k) for s, k in zip(S, kernel)]  # the phases some tap reads, per dim
    # dead phases (some r_i ≥ k_i): rows of TᵀT equal to 0, each adding c
    dead = c * (math.prod(S) - math.prod(phases))
    K = upcast(weight)
    if o == 0 or c == 0:  # T has no rows or no columns: TᵀT = 0 (conv refuses a weight without filters)
        return (K.sum() + float(c * math.prod(S))).to(weight.dtype)
    # the pixel of phase r sits at u = base + r, base = S·⌊(k − 1)/S⌋ (a multiple of S; u ≥ every tap
    # t ≡ r, t < k), on a grid of n = base + min(S, k) + k − 1 points: the outputs (u − t)/S ∈ [0, base/S]
    # of its taps exist (n − k ≥ base) and its widest column, u + k − 1, is inside
    base = [s * ((k - 1) // s) for s, k in zip(S, kernel)]
    n = [b + p + k - 1 for b, p, k in zip(base, phases, kernel)]
    m = [(ni - k) // s + 1 for ni, k, s in zip(n, kernel, S)]
    B = c * math.prod(phases)
    itemsize = torch.empty((), dtype=K.dtype).element_size()
    nbytes = B * (2 * c * math.prod(n) + o * math.prod(m)) * itemsize
    if nbytes > MAX_WORK_BYTES:
        raise ValueError(f"{op}: side='cols': the {B} basis images of shape {(c, *n)} and their convs need {nbytes} "
                         f"bytes ({nbytes / 2**30:.1f} GiB), over MAX_WORK_BYTES={MAX_WORK_BYTES}; the 'torch' "
                         f"backend (the tap Gram path) needs about c²·(∏k)² entries instead")
    # X[(r, ch)] = e_(ch, u_r): the one-hot pixel u_r = base + r of each phase times I_c over the channels
    pixels = [0] * math.prod(phases)
    for j, r in enumerate(itertools.product(*[range(p) for p in phases])):
        for ni, b, ri in zip(n, base, r):
            pixels[j] = pixels[j] * ni + b + ri  # row-major flat index of u_r on the n grid
    onehot = torch.zeros(len(pixels), math.prod(n), dtype=K.dtype, device=K.device)
    onehot[torch.arange(len(pixels), device=K.device), torch.tensor(pixels, device=K.device)] = 1.0
    eye = torch.eye(c, dtype=K.dtype, device=K.device)
    X = (eye[None, :, :, None] * onehot[:, None, None, :]).reshape(B, c, *n)
    Y = _CONV[d](X, K, stride=S)  # T e_(ch, u): (B, o, *m)
    pad = tuple(ni - ((mi - 1) * s + k) for ni, mi, s, k in zip(n, m, S, kernel))  # < S: the adjoint's size n
    Z = _CONV_TRANSPOSE[d](Y, K, stride=S, output_padding=pad)  # TᵀT e_(ch, u): row (ch, u) of TᵀT
    return (((Z - X) ** 2).sum() + float(dead)).to(weight.dtype)


def _check_fits(op: str, weight: torch.Tensor, input_size: Sequence[int]) -> None:
    """The kernel fits the circular input, and the per-frequency work fits ``MAX_WORK_BYTES``: the
    complex blocks ``(∏n, C_out, C_in)`` and their SVD factors (about 3× the blocks in all)."""
    kernel = tuple(weight.shape[2:])
    if any(k > n for k, n in zip(kernel, input_size)):
        raise ValueError(f"{op}: the kernel {kernel} must fit the circular input: need kernel size <= input_size "
                         f"per dim; got input_size={tuple(input_size)}")
    itemsize = torch.empty((), dtype=compute_dtype(weight.dtype)).element_size()
    entries = math.prod(input_size) * weight.shape[0] * weight.shape[1]
    nbytes = 3 * 2 * entries * itemsize
    if nbytes > MAX_WORK_BYTES:
        raise ValueError(f"{op}: the {math.prod(input_size)} per-frequency {weight.shape[0]}×{weight.shape[1]} "
                         f"blocks and their SVDs need about {nbytes} bytes ({nbytes / 2**30:.1f} GiB), over "
                         f"MAX_WORK_BYTES={MAX_WORK_BYTES}; use a smaller input_size")


def _frequency_matrices(weight: torch.Tensor, input_size: Sequence[int], onesided: bool = False) -> torch.Tensor:
    """``(F, C_out, C_in)`` complex: the DFT of the zero-padded kernel at every frequency,
    frequencies in row-major ``fftn`` order (``F = ∏n``). The circular stride-1 operator
    is block-diagonalised by the d-dim DFT into exactly these blocks (Sedghi et al., Thm. 6).

    ``onesided=True`` keeps only the ``rfftn`` half (last dim ``n_d//2 + 1``): a real kernel's
    blocks at ``−f`` are the conjugates of those at ``f`` and carry no new information.
    """
    d = weight.dim() - 2
    spatial = tuple(range(2, 2 + d))
    transform = torch.fft.rfftn if onesided else torch.fft.fftn
    Fk = transform(upcast(weight), s=tuple(input_size), dim=spatial)
    return Fk.permute(*range(2, 2 + d), 0, 1).reshape(-1, weight.shape[0], weight.shape[1])


def real_embedding(blocks: torch.Tensor) -> torch.Tensor:
    """``(..., 2m, 2n)`` real ``[[A, −B], [B, A]]`` of complex ``blocks = A + iB (..., m, n)`` (docs/conv.md#conv_singular_values).

    It represents the blocks' action on (Re x, Im x), so its SVD is theirs with every singular value twice
    and every spectral function commutes with it: ``f(E(X)) = E(f(X))`` for
    ``f = U clamp(S) Vh``, whatever basis an SVD picks inside the doubled subspaces.
    """
    A, B = blocks.real, blocks.imag
    return torch.cat([torch.cat([A, -B], dim=-1), torch.cat([B, A], dim=-1)], dim=-2)


def _split_nonfinite(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(finite blocks, bad, nan)`` for a batch of blocks: the non-finite blocks (``bad``, any NaN
    or ±inf entry) replaced by zeros, and per block ``nan = |Σ(B − B)|``, which is NaN exactly for the
    bad blocks (``inf − inf``, ``NaN − NaN``) and 0 for the others, with a NaN gradient for every
    entry of a bad block (and 0 for the others: ``|·|`` has subgradient 0 at 0).

    LAPACK's SVD refuses non-finite input and the Jacobi kernel returns NaN factors; docs/index.md#numerical-behaviour wants
    one behaviour: such a block's singular values (and clipped block) are NaN, forward and gradient,
    and the other blocks are unaffected. The zeroed blocks keep the SVD away from the bad entries;
    the results of the bad blocks are then taken from ``nan``."""
    bad = ~torch.isfinite(blocks).flatten(-2).all(-1)
    nan = (blocks - blocks).sum((-2, -1)).abs()
    return torch.where(bad[..., None, None], torch.zeros((), dtype=blocks.dtype, device=blocks.device), blocks), \
        bad, nan


def _block_svdvals(blocks: torch.Tensor, svd: Callable | None) -> torch.Tensor:
    """Singular values (descending) of every complex block: LAPACK's complex SVD, or ``svd`` (a real
    batched thin SVD) of the real embedding, whose doubled values are taken once each. A block
    holding NaN/inf has NaN singular values (``_split_nonfinite``)."""
    blocks, bad, nan = _split_nonfinite(blocks)
    S = torch.linalg.svdvals(blocks) if svd is None else svd(real_embedding(blocks))[1][..., 0::2]
    return torch.where(bad[..., None], nan[..., None], S)


def _clamp_blocks(blocks: torch.Tensor, lo: float, hi: float, clamp: Callable | None) -> torch.Tensor:
    """``U clamp(S, lo, hi) Vᴴ`` of every complex block, by LAPACK's complex SVD or by ``clamp`` on
    the real embeddings; NaN for a block holding NaN/inf (``_split_nonfinite``)."""
    blocks, bad, nan = _split_nonfinite(blocks)
    if clamp is None:
        U, S, Vh = torch.linalg.svd(blocks, full_matrices=False)
        Y = (U * S.clamp(lo, hi).to(U.dtype)[..., None, :]) @ Vh
    else:
        m, n = blocks.shape[-2:]
        Y = clamp(real_embedding(blocks), lo, hi)
        Y = torch.complex(Y[..., :m, :n], Y[..., m:, :n])
    return torch.where(bad[..., None, None], nan[..., None, None].to(Y.dtype), Y)


def conv_singular_values(weight: torch.Tensor, input_size: Sequence[int], *, svd: Callable | None = None) -> torch.Tensor:
    """Singular values of the circular, stride-1 convolution on inputs of size ``input_size``.

    formula: docs/conv.md#conv_singular_values — ``F = fftn(weight, s=input_size)`` over the spatial dims gives
    one ``C_out × C_in`` complex matrix per frequency; the union of their singular
    values is the spectrum of the operator (for odd kernels that is
    ``conv_to_matrix(weight, input_size, padding=k//2, padding_mode="circular")``; the
    shift by the padding multiplies each block by a unit phase and leaves the singular
    values unchanged).

    Args:
        weight: ``(C_out, C_in, *k)`` with ``k_i ≤ n_i``; input_size: ``(n_1, …, n_d)``.

    Returns:
        ``(∏n, min(C_out, C_in))``: row ``f`` holds the singular values of frequency ``f``
        (row-major over the ``fftn`` frequency grid), in descending order. Real dtype of
        the weight (float16/bfloat16 computed in float32).

    ``svd``: a real batched thin SVD to run on the ``2·C_out × 2·C_in`` real embeddings of the
    blocks (``real_embedding``) instead of LAPACK's complex SVD; the kernels pass theirs.
    """
    _check_fits("conv_singular_values", weight, input_size)
    if weight.numel() == 0:  # no channels: nothing to transform (FFT backends reject empty inputs)
        return weight.new_zeros((math.prod(input_size), min(weight.shape[0], weight.shape[1])))
    return _block_svdvals(_frequency_matrices(weight, input_size), svd).to(weight.dtype)


def clip_conv_singular_values(weight: torch.Tensor, input_size: Sequence[int], lo: float, hi: float, *,
                              svd: Callable | None = None,
                              clamp: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp the operator's singular values into ``[lo, hi]`` (Sedghi et al., docs/conv.md#conv_singular_values).

    Per frequency ``F_f = U diag(σ) Vᴴ`` → ``U diag(clamp(σ, lo, hi)) Vᴴ``; the inverse
    FFT of the clipped blocks is a kernel of the full input size, whose real part is
    truncated back to the kernel's support ``k`` (computed on the ``rfftn`` half of the
    frequencies, which gives that real part directly). The truncation makes this an
    APPROXIMATE projection: the returned singular values (those of the truncated kernel)
    can leave ``[lo, hi]`` again unless ``k = input_size``.

    Args:
        weight: ``(C_out, C_in, *k)`` with ``k_i ≤ n_i``; input_size: ``(n_1, …, n_d)``;
            ``0 ≤ lo ≤ hi``.

    Returns:
        ``(new_weight, singular_values)``: ``new_weight`` has the weight's shape and
        dtype; ``singular_values`` is ``conv_singular_values(new_weight, input_size)``,
        shape ``(∏n, min(C_out, C_in))``. The input is not modified. ``svd`` as in
        ``conv_singular_values`` (for the returned values); ``clamp``: a real batched
        ``clamp_singular_values(X, lo, hi)`` for the real embeddings, given with ``svd`` (the kernel
        backends pass ``regkernels.reference.svd.clamp_singular_values`` on their SVD: the
        embedding doubles every singular value, where an SVD's own backward divides by
        σ_j² − σ_i² = 0, so the clamp needs that op's divided-difference gradient).
    """
    if (svd is None) != (clamp is None):
        raise ValueError("clip_conv_singular_values: svd and clamp are given together (the kernel backends' "
                         "real SVD and clamp) or not at all (LAPACK's complex SVD)")
    _check_fits("clip_conv_singular_values", weight, input_size)
    if weight.numel() == 0:
        return weight.clone(), conv_singular_values(weight, input_size, svd=svd)
    d = weight.dim() - 2
    # one-sided: clamping commutes with conjugation, so the clipped blocks keep the
    # Hermitian symmetry of a real kernel and irfftn returns the real part of ifftn of
    # the full set, at half the SVDs
    Fk = _frequency_matrices(weight, input_size, onesided=True)
    clipped = _clamp_blocks(Fk, lo, hi, clamp)
    # back to (C_out, C_in, n_1, …, n_d//2 + 1) and through the inverse DFT
    half = (*input_size[:-1], input_size[-1] // 2 + 1)
    blocks = clipped.reshape(*half, weight.shape[0], weight.shape[1]).permute(d, d + 1, *range(d))
    full = torch.fft.irfftn(blocks, s=tuple(input_size), dim=tuple(range(2, 2 + d)))
    support = (slice(None), slice(None)) + tuple(slice(0, k) for k in weight.shape[2:])
    new_weight = full[support].to(weight.dtype)
    return new_weight, conv_singular_values(new_weight, input_size, svd=svd)


# ----------------------------------------------------------------------------- conv_spectral_norm

class ConvSpectralNorm(NamedTuple):
    """What ``conv_spectral_norm`` returns (docs/conv.md#conv_spectral_norm).

    ``sigma``: the estimate (``method="power"``: a lower bound of σ_max(T) in exact arithmetic) or
    the certified upper bound (``method="bound"``). ``rel_tol``: the tolerance the iteration
    reached — the power estimate's relative gain over the second half of its steps (a heuristic,
    not a bound on the error), or the bound's certified slack (further Gram iterations can lower
    ``sigma`` by at most this fraction). Both are 0-dim for one weight, ``(L,)`` for a list of
    ``L``; the weight's dtype; ``rel_tol`` carries no gradient.
    """

    sigma: torch.Tensor
    rel_tol: torch.Tensor


# the defaults of n_iter / tol per method (docs/conv.md#conv_spectral_norm)
POWER_ITERATIONS = 100
POWER_TOL = 1e-6
GRAM_ITERATIONS = 6
GRAM_TOL = 0.0

_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def spectral_norm_settings(method: str, n_iter: int | None, tol: float | None) -> tuple[int, float]:
    """``(n_iter, tol)`` with the method's defaults filled in."""
    if method == "power":
        return (POWER_ITERATIONS if n_iter is None else n_iter), (POWER_TOL if tol is None else tol)
    return (GRAM_ITERATIONS if n_iter is None else n_iter), (GRAM_TOL if tol is None else tol)


def _may_stop_early() -> bool:
    """Whether the convergence test may be read on the host to stop early: not while dynamo traces
    (the branch would break the graph) and not under a torch.func transform (vmap cannot read a
    batched value). There every one of the ``n_iter`` steps runs, which only tightens the result."""
    if torch.compiler.is_compiling():
        return False
    return not torch._C._are_functorch_transforms_active()


def _stacked_layers(weights: Sequence[torch.Tensor]):
    """``(W, scale, bad, nan)``: the layers stacked ``(L, C_out, C_in/g, *k)`` in the compute dtype,
    each divided by its own power of two ``scale[l]`` (exact; σ is homogeneous of degree 1, so
    ``σ(W) = s·σ(W/s)`` for a constant ``s``: nothing overflows while σ itself is finite), with the
    layers holding NaN/±inf zeroed; ``nan[l]`` is NaN, with a NaN gradient for every entry, exactly
    for those, and 0 with a zero gradient for the others."""
    W = torch.stack([upcast(w) for w in weights])
    flat = W.flatten(1)
    bad = ~torch.isfinite(flat).all(1)
    # a constant NaN per bad layer times its entries: NaN value and derivative (a real |x − x| would
    # have derivative sign(NaN) = 0 in torch), exactly 0 for the finite layers
    poison = torch.where(bad, torch.full((), math.nan, dtype=W.dtype, device=W.device),
                         torch.zeros((), dtype=W.dtype, device=W.device))
    nan = (flat * poison[:, None]).sum(1)
    big = flat.detach().abs().amax(1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    scale = pow2_scale(big)
    view = (-1,) + (1,) * (W.dim() - 1)
    W = torch.where(bad.view(view), torch.zeros((), dtype=W.dtype, device=W.device), W) / scale.view(view)
    return W, scale, bad, nan


# ---- method="power"

def _apply_T(W2: torch.Tensor, x: torch.Tensor, stride, padding, dilation, groups: int, circular: bool):
    """``T x`` for a batch of one input ``(1, C, *n)``: the conv (circular: pad, then no padding)."""
    conv = _CONV[W2.dim() - 2]
    if circular:
        pads = [q for p in reversed(padding) for q in (p, p)]
        return conv(F.pad(x, pads, mode="circular"), W2, None, stride, 0, dilation, groups)
    return conv(x, W2, None, stride, padding, dilation, groups)


def _apply_T_adjoint(W2: torch.Tensor, y: torch.Tensor, input_size, stride, padding, dilation, groups: int,
                     circular: bool):
    """``Tᵀ y``: the transposed conv back to the (circularly padded) input size, then, for circular
    padding, the adjoint of the padding, which adds every padded position onto the input position
    it copied (``(j − p) mod n``)."""
    d = W2.dim() - 2
    conv_padding = (0,) * d if circular else tuple(padding)
    target = tuple(n + 2 * p for n, p in zip(input_size, padding)) if circular else tuple(input_size)
    # conv_transpose gives (o − 1)·s − 2p + dil·(k − 1) + 1 positions; output_padding adds the rows the
    # forward's floor dropped (0 ≤ it ≤ s − 1, as torch requires)
    extra = tuple(t - ((o - 1) * s - 2 * p + dl * (k - 1) + 1)
                  for t, o, s, p, dl, k in zip(target, y.shape[2:], stride, conv_padding, dilation, W2.shape[2:]))
    z = _CONV_T[d](y, W2, None, stride, conv_padding, extra, groups, dilation)
    if circular:
        for i, (n, p) in enumerate(zip(input_size, padding)):
            dim = 2 + i
            index = (torch.arange(n + 2 * p, device=z.device) - p) % n
            shape = list(z.shape)
            shape[dim] = n
            z = z.new_zeros(shape).index_add(dim, index, z)
    return z


def _unit_rows(x: torch.Tensor, tiny: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / ‖x‖, ‖x‖)`` per row of ``(L, N)``; a zero row stays zero."""
    norm = torch.linalg.vector_norm(x, dim=1)
    return x / norm.clamp_min(tiny)[:, None], norm


def _power_sigma(W: torch.Tensor, input_size, stride, padding, dilation, groups: int, circular: bool,
                 n_iter: int, tol: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Power iteration on ``TᵀT`` for the ``L`` stacked layers at once (one conv with ``L·groups``
    groups: group ``l·g + j`` is group ``j`` of layer ``l``); ``(μ, rel)`` per layer.

    Step: ``u = T v``, ``w = Tᵀ u``, ``μ = ‖w‖ / ‖u‖``, ``v ← w / ‖w‖``. ``‖Tᵀu‖ ≤ σ_max ‖u‖`` makes
    every ``μ`` a lower bound of σ_max; with ``m_j = ⟨(TᵀT)^j v₀, v₀⟩``, ``μ_k² = m_{2k+2}/m_{2k+1}``,
    a ratio of consecutive moments of a positive measure, which never decreases (Cauchy–Schwarz),
    and tends to σ_max² when ``v₀`` meets the top right singular vector (a Gaussian start does, with
    probability 1). ``rel = (μ_k − μ_{⌊k/2⌋}) / μ_k``, the relative gain over the second half of the
    run (``inf`` after one step): about the remaining error where the convergence is algebraic (a
    top of the spectrum without a gap, as on large inputs), above it where it is geometric; a
    per-step change would understate the first by a factor of order ``k`` (and is 0 whenever a
    float32 step leaves μ unchanged). The loop stops at the first step with ``rel < tol`` for every
    layer, where ``_may_stop_early`` allows reading it."""
    L, c_out, c_in_g = W.shape[:3]
    c_in = c_in_g * groups
    W2 = W.reshape(L * c_out, c_in_g, *W.shape[3:])
    tiny = torch.finfo(W.dtype).tiny
    start = torch.randn((L, c_in, *input_size), generator=generator, device=W.device, dtype=torch.float32)
    v, _ = _unit_rows(start.to(W.dtype).reshape(L, -1), tiny)
    shape_in = (1, L * c_in, *input_size)
    history = []  # μ_1, μ_2, … (detached): the gain over the second half of the run
    early = tol > 0 and _may_stop_early()
    for step in range(1, n_iter + 1):
        u = _apply_T(W2, v.reshape(shape_in), stride, padding, dilation, L * groups, circular)
        w = _apply_T_adjoint(W2, u, input_size, stride, padding, dilation, L * groups, circular)
        nu = torch.linalg.vector_norm(u.reshape(L, -1), dim=1)
        v, nw = _unit_rows(w.reshape(L, -1), tiny)
        mu = nw / nu.clamp_min(tiny)  # u = 0 (v in T's null space) gives w = 0 and μ = 0
        history.append(mu.detach())
        rel = (torch.full_like(history[0], math.inf) if step == 1 else
               (history[-1] - history[step // 2 - 1]).abs() / history[-1].clamp_min(tiny))
        if early and step >= 2 and bool((rel < tol).all()):
            break
    return mu, rel


# ---- method="bound"

def circulant_embedding(input_size, kernel, stride, padding, dilation, padding_mode: str):
    """``(N, g, m)`` per dim: ``T = R·C·E`` (docs/conv.md#conv_spectral_norm), where ``C`` is the
    conv of stride ``g`` on a periodic grid of ``N`` points (``g | N``), ``E`` an isometry of the
    inputs into that grid and ``R`` picks each output of ``T`` as a row of ``C``, no row more than
    ``m`` times (the product of the per-dim ``m``), so ``σ_max(T) ≤ √m·σ_max(C)``.

    Per dim, with ``k_e = dil·(k − 1) + 1`` and ``o`` the output size:

    * zeros: ``g = s``; ``N`` the least multiple of ``s`` with ``N ≥ n + p`` and ``N ≥ s·o``; the
      input sits at ``[p, p + n)`` of the grid. The conv reads padded positions up to
      ``n + 2p − 1 < N + p``: those below ``N`` hold the same values on the grid, those at ``N`` or
      above are zeros of the padding and wrap to ``[0, p)``, zeros of the grid. Output ``i`` is row
      ``i`` of ``C``: ``m = 1``.
    * circular: ``N = n``, ``g = gcd(s, n)``, ``E`` the roll by ``p``; output ``i`` is row
      ``(s/g)·i mod (n/g)`` of ``C``. ``s/g`` is coprime to ``n/g``, so ``i ↦ (s/g)·i`` permutes the
      residues mod ``n/g`` and a row is hit ``⌈o/(n/g)⌉`` times at most (1 for the usual paddings).
    """
    out = []
    for n, k, s, p, dl in zip(input_size, kernel, stride, padding, dilation):
        o = (n + 2 * p - dl * (k - 1) - 1) // s + 1
        if padding_mode == "circular":
            g = math.gcd(s, n)
            out.append((n, g, -(-o // (n // g))))
        else:
            need = max(n + p, s * o)
            out.append((-(-need // s) * s, s, 1))
    return out


def _dft_taps(k: int, dilation: int, g: int, N: int, half: bool, device, dtype) -> torch.Tensor:
    """``(k, g, F)`` complex: tap ``t`` sits at grid offset ``τ = dil·t = g·a + ρ``; its entry is
    ``exp(−2πi·ω·a/M)`` at phase ``ρ`` (0 at the other phases), ``M = N/g``, ``ω ∈ [0, M)`` (``half``:
    ``[0, M//2]``). Taps whose ``a`` agree mod ``M`` add up, as they do in the periodic conv."""
    M = N // g
    freqs = torch.arange(M // 2 + 1 if half else M, device=device)
    tau = torch.arange(k, device=device) * dilation
    # the phase index a·ω mod M in integers: exact angles for any grid size
    angle = (2 * math.pi / M) * (((tau // g)[:, None] * freqs[None, :]) % M).to(torch.float64)
    wave = torch.polar(torch.ones_like(angle), -angle)
    onehot = (tau[:, None] % g == torch.arange(g, device=device)[None, :]).to(torch.float64)
    return (onehot[:, :, None] * wave[:, None, :]).to(dtype)


def _frequency_blocks(W: torch.Tensor, groups: int, dilation, grid) -> torch.Tensor:
    """``(L, F, groups, C_out/groups, (C_in/groups)·∏g)`` complex: the blocks that
    block-diagonalise ``C`` (``grid``: ``circulant_embedding``'s ``(N, g, m)`` per dim), one per
    frequency of the ``M = N/g`` grid (the last dim's ``M//2 + 1`` nonnegative ones: a real
    kernel's block at ``−ω`` is the conjugate of the one at ``ω`` and has its singular values).

    ``C z[r] = Σ_ρ Σ_t W_t z_ρ[r + a_t]`` with the phases ``z_ρ[b] = z[g·b + ρ]``: the DFT of length
    ``M`` of ``C z`` at ``ω`` is ``Σ_ρ conj(Ŵ_ρ(ω)) ẑ_ρ(ω)`` (``Ŵ_ρ`` the DFT of the taps at phase
    ``ρ``), and ``z ↦ (ẑ_ρ)`` is unitary up to the factor ``√M`` the output's DFT shares. So
    ``σ(C) = ⋃_ω σ([Ŵ_ρ(ω)]_ρ)`` (conjugation leaves singular values be)."""
    L, c_out, c_in_g = W.shape[:3]
    kernel = W.shape[3:]
    d = len(kernel)
    cdt = torch.complex128 if W.dtype == torch.float64 else torch.complex64
    mats = [_dft_taps(k, dl, g, N, i == d - 1, W.device, cdt)
            for i, (k, dl, (N, g, _)) in enumerate(zip(kernel, dilation, grid))]
    letters = "xyz"[:d]
    spec = (f"loi{letters}," + ",".join(f"{t}{t.upper()}{f}" for t, f in zip(letters, "pqr"))
            + f"->l{'pqr'[:d]}oi{letters.upper()}")
    A = torch.einsum(spec, W.to(cdt), *mats)  # (L, F_1.., C_out, C_in/g, g_1..)
    F_total = math.prod(A.shape[1:1 + d])
    G = math.prod(A.shape[3 + d:])
    return A.reshape(L, F_total, groups, c_out // groups, c_in_g * G)


def _gram_bound(blocks: torch.Tensor, n_iter: int, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper and lower bounds of ``σ_max`` of every block by ``n_iter`` Gram iterations; the loop
    stops at the first step where, for every layer (dim 0), ``1 − max lower / max upper < tol``.

    ``G₀ = A``, ``G_{k+1} = G_kᴴ G_k``: ``σ_max(G_{k+1}) = σ_max(G_k)²``, so
    ``σ_max(A)^{2^t} = σ_max(G_t) ≤ ‖G_t‖_F``: ``upper = ‖G_t‖_F^{1/2^t}``. And
    ``‖G_t‖_F = ‖G_{t−1}ᴴG_{t−1}‖_F ≤ σ_max(G_{t−1})·‖G_{t−1}‖_F`` gives
    ``lower = (‖G_t‖_F / ‖G_{t−1}‖_F)^{1/2^{t−1}} ≤ σ_max(A)``. Each ``G_k`` is kept divided by its
    Frobenius norm ``r_k`` (``Ĝ_k``, so ``G_{k+1}`` is formed from ``Ĝ_k``): then
    ``upper = r_0·∏_{k≥1} r_k^{1/2^k}`` and ``lower = upper·r_t^{1/2^t}``, where every ``r_k`` with
    ``k ≥ 1`` lies in ``[c^{−1/2}, 1]`` (``c`` the Gram's side): no overflow, no underflow. The first
    Gram is taken on the smaller side (``AAᴴ`` has ``AᴴA``'s nonzero eigenvalues and norm)."""
    r0 = torch.linalg.matrix_norm(blocks)
    nonzero = r0 > 0  # a zero block: both bounds 0, and no 0/0 anywhere (nor in the gradient)
    one = torch.ones((), dtype=r0.dtype, device=r0.device)
    H = blocks / torch.where(nonzero, r0, one)[..., None, None].to(blocks.dtype)
    H = H.mH @ H if H.shape[-1] <= H.shape[-2] else H @ H.mH
    upper = r0
    early = tol > 0 and _may_stop_early()
    for k in range(1, n_iter + 1):
        if k > 1:
            H = H.mH @ H
        r = torch.where(nonzero, torch.linalg.matrix_norm(H), one)
        H = H / r[..., None, None].to(H.dtype)
        upper = upper * r ** (0.5 ** k)
        lower = upper * r ** (0.5 ** k)
        if early and k < n_iter and bool((_slack(upper, lower) < tol).all()):
            break
    return upper, lower


def _slack(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Per layer ``1 − max lower / max upper`` over its blocks (0 for a zero layer)."""
    hi, lo = upper.detach().flatten(1).amax(1), lower.detach().flatten(1).amax(1)
    return torch.where(hi > 0, 1 - lo / hi.clamp_min(torch.finfo(hi.dtype).tiny), torch.zeros_like(hi))


def _bound_sigma(W: torch.Tensor, input_size, stride, padding, dilation, groups: int, padding_mode: str,
                 n_iter: int, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    grid = circulant_embedding(input_size, W.shape[3:], stride, padding, dilation, padding_mode)
    blocks = _frequency_blocks(W, groups, dilation, grid)
    upper, lower = _gram_bound(blocks, n_iter, tol)
    m = math.prod([mi for _, _, mi in grid])
    return math.sqrt(m) * upper.flatten(1).amax(1), _slack(upper, lower)


# ---- method="bound" without an input size (docs/conv.md#a-bound-for-every-input-size)

# default grid: M_j = KERNEL_GRID_OVERSAMPLING · d · A_j frequencies along axis j (1 where A_j = 0),
# so Σ_j (A_j/2)·π/M_j = π/(2·KERNEL_GRID_OVERSAMPLING) whatever d and the kernel, and the grid
# factor is 1/(1 − π²/512) ≈ 1.0197
KERNEL_GRID_OVERSAMPLING = 8


def kernel_bound_axes(kernel: Sequence[int], stride, dilation, padding_mode: str) -> list[tuple[int, int, int]]:
    """Per axis ``(dil, g, A)`` of the operator whose norm bounds ``T`` for every input size: the
    stride-``g`` conv on ``ℓ²(ℤ)`` with taps at ``dil·t``, whose symbol's entries have frequencies
    ``a_t = ⌊dil·t/g⌋ ∈ [0, A]``. Zero padding with stride ``s > 1``: ``(dil, s, ⌊dil·(k − 1)/s⌋)``
    (``T`` is a restriction of the strided conv itself). Stride 1, and circular padding (whose rows
    are rows of a stride-1 periodic conv): ``(1, 1, k − 1)`` — the stride-1 response ``K̂(dil⊙ω)``
    has the supremum of ``K̂(ω)``, as ``ω ↦ dil⊙ω`` maps the torus onto itself."""
    out = []
    for k, s, dl in zip(kernel, stride, dilation):
        if padding_mode == "zeros" and s > 1:
            out.append((dl, s, dl * (k - 1) // s))
        else:
            out.append((1, 1, k - 1))
    return out


def kernel_bound_grid(axes: Sequence[tuple[int, int, int]], grid=None) -> tuple[int, ...]:
    """The frequencies per axis ``M_j`` of the input-size-free bound: ``grid`` or the default."""
    if grid is not None:
        return tuple(grid)
    d = len(axes)
    return tuple(1 if A == 0 else KERNEL_GRID_OVERSAMPLING * d * A for _, _, A in axes)


def kernel_grid_excess(axes: Sequence[tuple[int, int, int]], grid: Sequence[int]) -> float:
    """``S = Σ_j σ_j·h_j`` with ``σ_j = A_j/2`` (the exponential type along axis j of the symbol's
    entries once centred) and ``h_j = π/M_j`` (the farthest any frequency lies from the grid along
    axis j). The grid factor is ``1/(1 − S²/2)``, valid for ``S² < 2``."""
    return sum(A / 2 * math.pi / M for (_, _, A), M in zip(axes, grid))


def _kernel_bound_sigma(W: torch.Tensor, groups: int, axes, grid: Sequence[int], n_iter: int,
                        tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = sup_ω ‖A(ω)‖₂`` bounded from above, ``A(ω)`` the symbol (per group) of the conv on
    ``ℓ²(ℤ^d)`` of ``kernel_bound_axes`` — ``σ_max`` of ``T`` for every input size
    (docs/conv.md#a-bound-for-every-input-size). ``A(ω)`` is ``_frequency_blocks``' block at the
    frequencies of a grid of ``M_j`` points per axis (a periodic grid of ``M_j·g_j`` points, stride
    ``g_j``); Bernstein's inequality gives ``B ≤ max_grid ‖A‖₂ / (1 − S²/2)``
    (``S = kernel_grid_excess``), and each grid block's ``‖A‖₂`` is bounded by Gram iteration
    (``_gram_bound``). So ``sigma = factor · max upper``, and since every grid block's norm is at most
    ``B``, ``B ≥ max lower``: ``rel_tol = 1 − max lower / sigma`` (neither more Gram steps nor a finer
    grid can certify less than ``sigma·(1 − rel_tol)``). ``tol`` is compared with that ``rel_tol``:
    the Gram loop stops when its own slack is below ``1 − factor·(1 − tol)`` (never, when that is ≤ 0)."""
    factor = 1 / (1 - kernel_grid_excess(axes, grid) ** 2 / 2)
    blocks = _frequency_blocks(W, groups, [dl for dl, _, _ in axes], [(M * g, g, 1) for (_, g, _), M in zip(axes, grid)])
    gram_tol = max(0.0, 1 - factor * (1 - tol)) if tol > 0 else 0.0
    upper, lower = _gram_bound(blocks, n_iter, gram_tol)
    hi = upper.flatten(1).amax(1)
    lo = lower.detach().flatten(1).amax(1)
    sigma = factor * hi
    top = sigma.detach()
    rel = torch.where(top > 0, 1 - lo / top.clamp_min(torch.finfo(top.dtype).tiny), torch.zeros_like(top))
    return sigma, rel


def _kernel_bound_bytes(shape, dtype: torch.dtype, groups: int, axes, grid: Sequence[int], n_iter: int,
                        graph: bool) -> int:
    """Bytes of the input-size-free bound's frequency blocks and Gram powers (``MAX_WORK_BYTES``)."""
    L, c_out, c_in_g = shape[:3]
    itemsize = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    freqs = math.prod(grid[:-1]) * (grid[-1] // 2 + 1)
    a, b = c_out // groups, c_in_g * math.prod([g for _, g, _ in axes])
    per = a * b + (n_iter + 2 if graph else 3) * min(a, b) ** 2
    return 2 * itemsize * L * freqs * groups * per


def _spectral_norm_bytes(shape, dtype: torch.dtype, input_size, stride, padding, dilation, groups: int,
                         padding_mode: str, method: str, n_iter: int, graph: bool) -> tuple[int, str]:
    """Bytes of the working set of ``L`` layers of ``shape = (L, C_out, C_in/g, *k)`` and what it
    holds (the ``MAX_WORK_BYTES`` check)."""
    L, c_out, c_in_g, *kernel = shape
    itemsize = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    if method == "power":
        out = conv_output_size(input_size, kernel, stride, padding, dilation)
        padded = [n + 2 * p for n, p in zip(input_size, padding)] if padding_mode == "circular" else input_size
        vec = L * (c_in_g * groups * (math.prod(input_size) + math.prod(padded)) + c_out * math.prod(out))
        kept = 2 * (n_iter + 1) if graph else 3
        return kept * vec * itemsize, f"the power iterates ({'every step kept for the backward' if graph else 'three'})"
    grid = circulant_embedding(input_size, kernel, stride, padding, dilation, padding_mode)
    steps = [N // g for N, g, _ in grid]
    freqs = math.prod(steps[:-1]) * (steps[-1] // 2 + 1)
    a, b = c_out // groups, c_in_g * math.prod([g for _, g, _ in grid])
    per = a * b + (n_iter + 2 if graph else 3) * min(a, b) ** 2
    return 2 * itemsize * L * freqs * groups * per, "the per-frequency blocks and their Gram powers"


def conv_spectral_norm(weight, input_size: Sequence[int] | None, stride=1, padding=0, dilation=1, groups: int = 1,
                       padding_mode: str = "zeros", method: str = "power", n_iter: int | None = None,
                       tol: float | None = None, generator: torch.Generator | None = None,
                       grid: Sequence[int] | None = None) -> ConvSpectralNorm:
    """σ_max of the conv operator ``T`` of ``conv_to_matrix`` (docs/conv.md#conv_spectral_norm).

    ``weight``: one ``(C_out, C_in/groups, *k)`` tensor, or a list of ``L`` of one shape (sigma and
    rel_tol then have shape ``(L,)``); the other arguments as ``conv_to_matrix``'s.

    * ``method="power"``: ``n_iter`` (default 100) steps of ``v ← TᵀTv/‖TᵀTv‖`` from a Gaussian start
      drawn from ``generator`` (float32, ``(L, C_in, *n)``), ``T`` applied as ``F.conv{d}d`` and
      ``Tᵀ`` as ``F.conv_transpose{d}d`` (plus the fold of circular padding); ``sigma`` is
      ``‖TᵀTv‖/‖Tv‖``, a lower bound of σ_max that never decreases from step to step. It stops
      early at the first step ``k`` whose relative gain since step ``⌊k/2⌋`` is below ``tol``
      (default 1e-6) for every layer.
      Differentiable: autograd through every step (the exact derivative of the returned value).
    * ``method="bound"``: ``n_iter`` (default 6) Gram iterations on the frequency blocks of the
      circulant ``C`` that contains ``T`` (``circulant_embedding``), ``sigma = √m·max ‖G_t‖_F^{1/2^t}``
      ≥ σ_max(T), for every padding mode, stride, dilation and groups; ``tol`` (default 0, i.e. all
      ``n_iter`` steps) stops at a certified slack below it.
    * ``input_size=None`` (``method="bound"`` only): a bound for EVERY input size and zero padding
      (and circular padding that repeats no output row): the supremum of the symbol of the conv on
      ``ℓ²(ℤ^d)`` (strided for zero padding) certified from a grid of ``grid`` frequencies per axis
      (``_kernel_bound_sigma``; docs/conv.md#a-bound-for-every-input-size).

    The early stop reads a value on the host, so it is skipped under torch.compile and torch.func
    (all ``n_iter`` steps run). A layer holding NaN/±inf gives NaN (sigma and rel_tol); an empty
    layer gives 0. float16 / bfloat16 are computed in float32.
    """
    op = "conv_spectral_norm"
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    first = weights[0]
    d = first.dim() - 2
    stride, padding, dilation = expand(stride, d), expand(padding, d), expand(dilation, d)
    n_iter, tol = spectral_norm_settings(method, n_iter, tol)
    graph = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
    if input_size is None:
        axes = kernel_bound_axes(first.shape[2:], stride, dilation, padding_mode)
        grid = kernel_bound_grid(axes, grid)
        nbytes = _kernel_bound_bytes((len(weights), *first.shape), first.dtype, groups, axes, grid, n_iter, graph)
        what = "the per-frequency blocks of the grid and their Gram powers"
    else:
        nbytes, what = _spectral_norm_bytes((len(weights), *first.shape), first.dtype, input_size, stride, padding,
                                            dilation, groups, padding_mode, method, n_iter, graph)
    if nbytes > MAX_WORK_BYTES:
        advice = ("call it under torch.no_grad() (no iterate is kept), with fewer n_iter, or on fewer layers"
                  if method == "power" else "a coarser grid, fewer layers or torch.no_grad()" if input_size is None
                  else "use a smaller input_size, fewer layers or torch.no_grad()")
        raise ValueError(f"{op}: {what} need {nbytes} bytes ({nbytes / 2**30:.1f} GiB), over MAX_WORK_BYTES="
                         f"{MAX_WORK_BYTES}; {advice}")
    W, scale, bad, nan = _stacked_layers(weights)
    if W.numel() == 0:  # no channels: T maps to or from the zero space, σ_max = 0
        sigma, rel = W.flatten(1).sum(1), W.new_zeros(W.shape[0])
    elif input_size is None:
        sigma, rel = _kernel_bound_sigma(W, groups, axes, grid, n_iter, tol)
    elif method == "power":
        sigma, rel = _power_sigma(W, input_size, stride, padding, dilation, groups, padding_mode == "circular",
                                  n_iter, tol, generator)
    else:
        sigma, rel = _bound_sigma(W, input_size, stride, padding, dilation, groups, padding_mode, n_iter, tol)
    sigma = torch.where(bad, nan, sigma * scale)
    rel = torch.where(bad, nan.detach(), rel)
    if isinstance(weight, torch.Tensor):
        sigma, rel = sigma[0], rel[0]
    return ConvSpectralNorm(sigma.to(first.dtype), rel.to(first.dtype))
