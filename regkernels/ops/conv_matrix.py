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
  ``P_out × K`` integers, cached per geometry) broadcast over the channels: no dense
  intermediate and no sort of the ``nnz`` entries (the reference sorts them all). Values are
  one gather from the weight (summing taps that wrap onto one position), and their backward
  is the transposed gather (a segmented sum, no atomics).
"""
from __future__ import annotations

import functools
import math

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
        rows, cols = R._matrix_shape(weight, input_size, stride, padding, dilation, groups)
        return weight.new_empty((rows, cols))

    @torch.library.register_fake("regkernels::conv_to_matrix_dense_backward")
    def _dense_backward_fake(grad, weight, input_size, stride, padding, dilation, groups, circular):
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

        return TC.conv_to_matrix_dense(weight, tuple(input_size), tuple(stride), tuple(padding), tuple(dilation),
                                       groups, circular)

    @_dense_triton.register_fake
    def _dense_triton_fake(weight, input_size, stride, padding, dilation, groups, circular):
        rows, cols = R._matrix_shape(weight, input_size, stride, padding, dilation, groups)
        return weight.new_empty((rows, cols))

    @torch.library.custom_op("regkernels::conv_to_matrix_triton_backward", mutates_args=())
    def _dense_triton_backward(grad: torch.Tensor, weight: torch.Tensor, input_size: list[int], stride: list[int],
                               padding: list[int], dilation: list[int], groups: int,
                               circular: bool) -> torch.Tensor:
        from regkernels.triton import conv as TC

        return TC.conv_to_matrix_dense_backward(grad, weight, tuple(input_size), tuple(stride), tuple(padding),
                                                tuple(dilation), groups, circular)

    @_dense_triton_backward.register_fake
    def _dense_triton_backward_fake(grad, weight, input_size, stride, padding, dilation, groups, circular):
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


@functools.lru_cache(maxsize=128)
def _sparse_plan(kernel: tuple[int, ...], input_size: tuple[int, ...], stride, padding, dilation, circular: bool,
                 c_in_g: int, device: torch.device):
    """Index tensors of the CSR layout of one channel group (``Cg·S`` entries for ``S`` spatial
    nonzeros), computed once per geometry on the CPU from the reference's spatial index map.

    Returns ``(col, row, crow_p, index, inverse, S)``: entry ``e`` of an output channel's block
    (order: output position p, then c', then the position's sorted input positions) has column
    ``col[e]`` within the group and row ``row[e]`` within the channel; ``crow_p[p]`` is the first
    entry of position p; ``index (Cg·S, D)`` lists the taps ``c'·K + t`` summed into each entry
    (``Cg·K`` = none) and ``inverse (Cg·K, P_out)`` the entries each tap lands on (``Cg·S`` = none).
    """
    cols, valid = R._spatial_index_map(input_size, kernel, stride, padding, dilation, circular,
                                       torch.device("cpu"))
    p_out, K = cols.shape
    p_in = math.prod(input_size)
    pos = torch.arange(p_out)[:, None].expand(p_out, K)
    keys, slot = torch.unique(pos[valid] * p_in + cols[valid], sorted=True, return_inverse=True)
    S = keys.numel()
    sp_row, sp_col = keys // p_in, keys % p_in
    nnz_p = torch.bincount(sp_row, minlength=p_out)
    start_p = torch.cumsum(nnz_p, 0) - nnz_p
    # entry of (c', spatial nonzero e): Cg·start[p] + c'·nnz[p] + (e − start[p]) for p = row of e
    cg = torch.arange(c_in_g)[:, None]
    e = torch.arange(S)[None, :]
    where = (c_in_g * start_p[sp_row] + cg * nnz_p[sp_row] + (e - start_p[sp_row])).reshape(-1)
    col = torch.empty(c_in_g * S, dtype=torch.long)
    col[where] = (cg * p_in + sp_col).reshape(-1)
    row = torch.empty(c_in_g * S, dtype=torch.long)
    row[where] = sp_row.expand(c_in_g, S).reshape(-1)
    # taps summed into each spatial nonzero (several only where circular padding wraps)
    tap = torch.arange(K).expand(p_out, K)[valid]
    order = torch.argsort(slot, stable=True)
    count = torch.bincount(slot, minlength=S)
    D = int(count.max()) if S else 1
    rank = torch.arange(order.numel()) - (torch.cumsum(count, 0) - count)[slot[order]]
    taps_of = torch.full((S, D), -1, dtype=torch.long)
    taps_of[slot[order], rank] = tap[order]
    index = torch.full((c_in_g * S, D), c_in_g * K, dtype=torch.long)
    ok = taps_of >= 0
    flat_taps = (cg[:, :, None] * K + taps_of[None]).reshape(c_in_g * S, D)
    index[where] = torch.where(ok[None].expand(c_in_g, S, D).reshape(-1, D), flat_taps, c_in_g * K)
    # inverse: tap (c', t) of output position p lands on entry where[c', slot(p, t)]
    inverse = torch.full((c_in_g, K, p_out), c_in_g * S, dtype=torch.long)
    p_valid, t_valid = pos[valid], tap
    inverse[:, t_valid, p_valid] = where.view(c_in_g, S)[:, slot]
    crow_p = c_in_g * start_p
    to = functools.partial(torch.Tensor.to, device=device)
    return to(col), to(row), to(crow_p), to(index), to(inverse.reshape(c_in_g * K, p_out)), S


def _sparse(weight: torch.Tensor, input_size, stride, padding, dilation, groups: int, padding_mode: str,
            layout: str) -> torch.Tensor:
    d = weight.dim() - 2
    c_out, c_in_g = weight.shape[0], weight.shape[1]
    kernel = tuple(weight.shape[2:])
    geometry = (tuple(input_size), R._expand(stride, d), R._expand(padding, d), R._expand(dilation, d))
    col, row, crow_p, index, inverse, S = _sparse_plan(kernel, *geometry, padding_mode == "circular", c_in_g,
                                                       weight.device)
    shape = R._matrix_shape(weight, *geometry, groups)
    p_out, p_in = shape[0] // max(c_out, 1), math.prod(input_size)
    values = _GatherSum.apply(weight.reshape(c_out, c_in_g * math.prod(kernel)), index, inverse).reshape(-1)
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
