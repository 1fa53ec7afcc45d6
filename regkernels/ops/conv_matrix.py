"""Kernels of ``conv_to_matrix`` (SPEC §2.1): the block-Toeplitz matrix ``T`` of a convolution.

Every geometry is normalised to three spatial dims (a 2-D conv is a 3-D one with a unit first
dim; ``_normalise``), so each kernel has one index map:
row ``(o, y)``, column ``(c, u)``, tap ``t`` of row ``(o, y)`` reads ``u_i = y_i·s_i − p_i + t_i·dil_i``
(zeros padding: only inside the input; circular: mod ``n_i``) of channel ``c = g(o)·C_in/g + c'``.

* dense: ``regkernels::conv_to_matrix_dense`` (C++ CPU kernel, csrc/cpu/conv_matrix_cpu.cpp: one
  pass per row, huge-page advice for the freshly allocated output) and
  ``regkernels::conv_to_matrix_triton`` (regkernels/triton/conv.py: each program writes one
  tile of ``T`` from the inverse index map). Both backward passes are gathers — each weight
  entry sums the gradient at the entries it was copied to — one owner per output, no atomics.
* sparse (``"coo"`` / ``"csr"``, either device): built directly in CSR order from the
  *spatial* structure (the sorted distinct input positions each output position reads,
  ``P_out × K`` integers, cached per geometry in an LRU bounded by ``PLAN_CACHE_BYTES``)
  broadcast over the channels: no dense intermediate and no sort of the ``nnz`` entries (the reference sorts them all). Values are
  one gather from the weight (summing taps that wrap onto one position), and their backward
  is the transposed gather (a segmented sum, no atomics).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

from regkernels import _ext
from regkernels.ops import conv as _conv
from regkernels.reference import conv as R

def _normalise(weight: torch.Tensor, input_size, stride, padding, dilation):
    """(5-D weight view, input_size, stride, padding, dilation as 3-lists)."""
    d = weight.dim() - 2
    w5 = weight.reshape(weight.shape[0], weight.shape[1], *R._expand3(tuple(weight.shape[2:]), d, 1))
    return (w5, list(R._expand3(tuple(input_size), d, 1)), list(R._expand3(stride, d, 1)),
            list(R._expand3(padding, d, 0)), list(R._expand3(dilation, d, 1)))


# ----------------------------------------------------------------------------- raw-op checks

def _check_dense_args(op: str, weight, input_size, stride, padding, dilation, groups, circular) -> tuple[int, int]:
    """The geometry checks of a dense op (the C++ kernels' ``make_geometry``, for the Triton ops and
    every fake); returns T's shape."""
    _conv.check_op_geometry(op, weight, input_size, stride, padding, dilation, groups, circular)
    rows, cols = R._matrix_shape(weight, input_size, stride, padding, dilation, groups)
    if rows * cols >= 2**63:
        raise RuntimeError(f"{op}: T of (C_out·P_out) × (C_in·P_in) entries overflows int64; got weight "
                           f"{tuple(weight.shape)}, input_size={list(input_size)}")
    return rows, cols


def _check_dense_grad(op: str, grad, weight, shape: tuple[int, int]) -> None:
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


# ----------------------------------------------------------------------------- dense: C++ (CPU)

def _save_weight(ctx, inputs, output):
    weight, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(weight)


def _backward_by(backward_op):
    """The autograd backward of a dense op whose backward op takes ``(grad, weight, *geometry)``."""
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return (backward_op(grad, weight, *ctx.geometry),) + (None,) * 6
    return backward


def _save_geometry(ctx, inputs, output):
    _grad, weight, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(weight)


def _double_backward_by(forward_op):
    """The autograd backward of a dense backward op. ``T`` is linear in the weight, so the backward
    ``gW = Bᵀ(grad)`` is linear in ``grad`` (``B`` = the forward's map) and does not depend on the
    weight's values: its derivative w.r.t. ``grad`` is the forward op applied to the incoming
    ``∂L/∂gW``, and w.r.t. the weight it is 0. This makes double backward (create_graph=True)
    exact, and the chain closes: the forward op's own backward is again this backward op."""
    def backward(ctx, grad_gw):
        (weight,) = ctx.saved_tensors
        return (forward_op(grad_gw.to(weight.dtype), *ctx.geometry), None) + (None,) * 6
    return backward


if _ext.HAS_C:

    @torch.library.register_fake("regkernels::conv_to_matrix_dense")
    def _dense_fake(weight, input_size, stride, padding, dilation, groups, circular):
        rows, cols = _check_dense_args("regkernels::conv_to_matrix_dense", weight, input_size, stride, padding,
                                       dilation, groups, circular)
        return weight.new_empty((rows, cols))

    @torch.library.register_fake("regkernels::conv_to_matrix_dense_backward")
    def _dense_backward_fake(grad, weight, input_size, stride, padding, dilation, groups, circular):
        op = "regkernels::conv_to_matrix_dense_backward"
        shape = _check_dense_args(op, weight, input_size, stride, padding, dilation, groups, circular)
        _check_dense_grad(op, grad, weight, shape)
        return torch.empty_like(weight, memory_format=torch.contiguous_format)

    torch.library.register_autograd("regkernels::conv_to_matrix_dense",
                                    _backward_by(torch.ops.regkernels.conv_to_matrix_dense_backward),
                                    setup_context=_save_weight)
    torch.library.register_autograd("regkernels::conv_to_matrix_dense_backward",
                                    _double_backward_by(torch.ops.regkernels.conv_to_matrix_dense),
                                    setup_context=_save_geometry)


# ----------------------------------------------------------------------------- dense: Triton

if _ext.has_triton():

    @torch.library.custom_op("regkernels::conv_to_matrix_triton", mutates_args=())
    def _dense_triton(weight: torch.Tensor, input_size: list[int], stride: list[int], padding: list[int],
                      dilation: list[int], groups: int, circular: bool) -> torch.Tensor:
        from regkernels.triton import conv as TC

        _check_dense_args("regkernels::conv_to_matrix_triton", weight, input_size, stride, padding, dilation, groups,
                          circular)
        return TC.conv_to_matrix_dense(weight, tuple(input_size), tuple(stride), tuple(padding), tuple(dilation),
                                       groups, circular)

    @_dense_triton.register_fake
    def _dense_triton_fake(weight, input_size, stride, padding, dilation, groups, circular):
        rows, cols = _check_dense_args("regkernels::conv_to_matrix_triton", weight, input_size, stride, padding,
                                       dilation, groups, circular)
        return weight.new_empty((rows, cols))

    @torch.library.custom_op("regkernels::conv_to_matrix_triton_backward", mutates_args=())
    def _dense_triton_backward(grad: torch.Tensor, weight: torch.Tensor, input_size: list[int], stride: list[int],
                               padding: list[int], dilation: list[int], groups: int,
                               circular: bool) -> torch.Tensor:
        from regkernels.triton import conv as TC

        op = "regkernels::conv_to_matrix_triton_backward"
        _check_dense_grad(op, grad, weight, _check_dense_args(op, weight, input_size, stride, padding, dilation,
                                                              groups, circular))
        return TC.conv_to_matrix_dense_backward(grad, weight, tuple(input_size), tuple(stride), tuple(padding),
                                                tuple(dilation), groups, circular)

    @_dense_triton_backward.register_fake
    def _dense_triton_backward_fake(grad, weight, input_size, stride, padding, dilation, groups, circular):
        op = "regkernels::conv_to_matrix_triton_backward"
        _check_dense_grad(op, grad, weight, _check_dense_args(op, weight, input_size, stride, padding, dilation,
                                                              groups, circular))
        return torch.empty_like(weight, memory_format=torch.contiguous_format)

    _dense_triton.register_autograd(_backward_by(torch.ops.regkernels.conv_to_matrix_triton_backward),
                                    setup_context=_save_weight)
    _dense_triton_backward.register_autograd(_double_backward_by(torch.ops.regkernels.conv_to_matrix_triton),
                                             setup_context=_save_geometry)


# ----------------------------------------------------------------------------- sparse

class _GatherSum(torch.autograd.Function):
    """``out[:, i] = Σ_j src[:, index[i, j]]`` with ``index == src.shape[1]`` reading 0; the
    backward is the same gather with the transposed index ``inverse`` (each source column's
    destinations), so both directions are owner-computes sums without atomics."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index, inverse)
        ext = torch.cat([src, src.new_zeros(src.shape[0], 1)], dim=1)
        picked = ext[:, index]
        return picked[..., 0] if index.shape[1] == 1 else picked.sum(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        index, inverse = ctx.saved_tensors
        return _GatherSum.apply(grad, inverse, index), None, None


# Index plans of the sparse layouts, kept per (geometry, device) in an LRU bounded by bytes:
# only the spatial structure is cached (``P_out·K``-sized, independent of the channel counts);
# the per-channel plan is broadcast from it on every call. A plan larger than the whole budget
# is used once and not kept.
PLAN_CACHE_BYTES = 64 << 20
_plan_cache: OrderedDict[tuple, tuple[tuple, int]] = OrderedDict()


def _plan_cache_bytes() -> int:
    """Bytes held by the sparse plan cache (never above ``PLAN_CACHE_BYTES``)."""
    return sum(nbytes for _, nbytes in _plan_cache.values())


def _spatial_plan(kernel: tuple[int, ...], input_size: tuple[int, ...], stride, padding, dilation, circular: bool,
                  device: torch.device) -> tuple[torch.Tensor, ...]:
    """The spatial CSR structure of one channel pair, from the reference's spatial index map
    (computed on the CPU, cached on ``device``; see ``PLAN_CACHE_BYTES``).

    Returns ``(sp_row, sp_col, start_p, nnz_p, taps_of, slot)``: the ``S`` spatial nonzeros in
    row-major order (output position ``sp_row[e]``, input position ``sp_col[e]``), each output
    position's first nonzero and count, ``taps_of (S, D)`` the taps summed into each nonzero
    (``-1`` = none; ``D > 1`` only where circular padding wraps taps onto one position) and
    ``slot (K, P_out)`` the nonzero each tap of each output lands on (``S`` = none: zero padding).
    """
    key = (kernel, input_size, stride, padding, dilation, circular, device)
    if key in _plan_cache:
        _plan_cache.move_to_end(key)
        return _plan_cache[key][0]
    cols, valid = R._spatial_index_map(input_size, kernel, stride, padding, dilation, circular, torch.device("cpu"))
    p_out, K = cols.shape
    p_in = math.prod(input_size)
    pos = torch.arange(p_out)[:, None].expand(p_out, K)
    keys, slot = torch.unique(pos[valid] * p_in + cols[valid], sorted=True, return_inverse=True)
    S = keys.numel()
    sp_row, sp_col = keys // p_in, keys % p_in
    nnz_p = torch.bincount(sp_row, minlength=p_out)
    start_p = torch.cumsum(nnz_p, 0) - nnz_p
    # taps summed into each spatial nonzero (several only where circular padding wraps)
    tap = torch.arange(K).expand(p_out, K)[valid]
    order = torch.argsort(slot, stable=True)
    count = torch.bincount(slot, minlength=S)
    D = int(count.max()) if S else 1
    rank = torch.arange(order.numel()) - (torch.cumsum(count, 0) - count)[slot[order]]
    taps_of = torch.full((S, D), -1, dtype=torch.long)
    taps_of[slot[order], rank] = tap[order]
    slot_tp = torch.full((K, p_out), S, dtype=torch.long)
    slot_tp[tap, pos[valid]] = slot
    plan = tuple(t.to(device) for t in (sp_row, sp_col, start_p, nnz_p, taps_of, slot_tp))
    nbytes = sum(t.numel() * t.element_size() for t in plan)
    if nbytes <= PLAN_CACHE_BYTES:
        while _plan_cache and _plan_cache_bytes() + nbytes > PLAN_CACHE_BYTES:
            _plan_cache.popitem(last=False)
        _plan_cache[key] = (plan, nbytes)
    return plan


def _sparse_plan(kernel: tuple[int, ...], input_size: tuple[int, ...], stride, padding, dilation, circular: bool,
                 c_in_g: int, device: torch.device):
    """Index tensors of the CSR layout of one channel group (``Cg·S`` entries for ``S`` spatial
    nonzeros), broadcast over the channels from the cached spatial plan.

    Returns ``(col, row, crow_p, index, inverse, S)``: entry ``e`` of an output channel's block
    (order: output position p, then c', then the position's sorted input positions) has column
    ``col[e]`` within the group and row ``row[e]`` within the channel; ``crow_p[p]`` is the first
    entry of position p; ``index (Cg·S, D)`` lists the taps ``c'·K + t`` summed into each entry
    (``Cg·K`` = none) and ``inverse (Cg·K, P_out)`` the entries each tap lands on (``Cg·S`` = none).
    """
    sp_row, sp_col, start_p, nnz_p, taps_of, slot_tp = _spatial_plan(kernel, input_size, stride, padding, dilation,
                                                                      circular, device)
    S, D = taps_of.shape
    K, p_out = slot_tp.shape
    p_in = math.prod(input_size)
    # entry of (c', spatial nonzero e): Cg·start[p] + c'·nnz[p] + (e − start[p]) for p = row of e
    cg = torch.arange(c_in_g, device=device)[:, None]
    e = torch.arange(S, device=device)[None, :]
    where = (c_in_g * start_p[sp_row] + cg * nnz_p[sp_row] + (e - start_p[sp_row])).reshape(-1)
    col = torch.empty(c_in_g * S, dtype=torch.long, device=device)
    col[where] = (cg * p_in + sp_col).reshape(-1)
    row = torch.empty(c_in_g * S, dtype=torch.long, device=device)
    row[where] = sp_row.expand(c_in_g, S).reshape(-1)
    index = torch.empty((c_in_g * S, D), dtype=torch.long, device=device)
    flat_taps = (cg[:, :, None] * K + taps_of[None]).reshape(c_in_g * S, D)
    index[where] = torch.where((taps_of >= 0)[None].expand(c_in_g, S, D).reshape(-1, D), flat_taps, c_in_g * K)
    # inverse: tap (c', t) of output position p lands on entry where[c', slot(p, t)]
    where_ext = torch.cat([where.view(c_in_g, S), torch.full((c_in_g, 1), c_in_g * S, device=device)], dim=1)
    inverse = where_ext[:, slot_tp]  # (Cg, K, P_out)
    return col, row, c_in_g * start_p, index, inverse.reshape(c_in_g * K, p_out), S


def _sparse(weight: torch.Tensor, input_size, stride, padding, dilation, groups: int, padding_mode: str,
            layout: str) -> torch.Tensor:
    R._check_sparse_matrix(weight, input_size, stride, padding, dilation, layout)
    d = weight.dim() - 2
    c_out, c_in_g = weight.shape[0], weight.shape[1]
    kernel = tuple(weight.shape[2:])
    geometry = (tuple(input_size), R._expand(stride, d), R._expand(padding, d), R._expand(dilation, d))
    col, row, crow_p, index, inverse, S = _sparse_plan(kernel, *geometry, padding_mode == "circular", c_in_g,
                                                       weight.device)
    shape = R._matrix_shape(weight, *geometry, groups)
    p_out, p_in = shape[0] // max(c_out, 1), math.prod(input_size)
    values = _GatherSum.apply(weight.reshape(c_out, c_in_g * math.prod(kernel)), index, inverse).reshape(-1)
    values = R.sparse_values(values, layout)
    o = torch.arange(c_out, device=weight.device)[:, None]
    group_col = (o // max(c_out // groups, 1)) * (c_in_g * p_in)
    columns = (col[None] + group_col).reshape(-1)
    if layout == "coo":
        rows = (row[None] + o * p_out).reshape(-1)
        return torch.sparse_coo_tensor(torch.stack([rows, columns]), values, shape, is_coalesced=True,
                                       check_invariants=False)
    block = c_in_g * S  # entries per output channel
    crow = torch.cat([(crow_p[None] + o * block).reshape(-1),
                      torch.full((1,), c_out * block, dtype=torch.long, device=weight.device)])
    return torch.sparse_csr_tensor(crow, columns, values, shape, check_invariants=False)


# ----------------------------------------------------------------------------- the kernels

def _kernel(dense_op):
    """A ``conv_to_matrix`` implementation: ``dense_op`` (every floating dtype) for the dense
    layout, after the size guard; ``_sparse`` for the others."""
    def impl(weight, input_size, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros",
             layout="dense", max_dense_bytes=None):
        if layout != "dense":
            return _sparse(weight, input_size, stride, padding, dilation, groups, padding_mode, layout)
        shape = R._matrix_shape(weight, input_size, stride, padding, dilation, groups)
        R._check_dense_matrix(weight, shape, max_dense_bytes)
        w5, *geometry = _normalise(weight, input_size, stride, padding, dilation)
        return dense_op(w5, *geometry, groups, padding_mode == "circular")
    return impl


if _ext.HAS_C:
    _conv._TABLE.register("conv_to_matrix", "cpu", "cpu", _kernel(torch.ops.regkernels.conv_to_matrix_dense))
if _ext.has_triton():
    _triton = _kernel(torch.ops.regkernels.conv_to_matrix_triton)
    _conv._TABLE.register("conv_to_matrix", "cuda", "triton", _triton)
    if _ext.triton_interpreted():
        _conv._TABLE.register("conv_to_matrix", "cpu", "triton", _triton)
