"""Composite implementations of the conv family (backend ``"torch"``): torch ops with a hand-written
backward, device-generic. See docs/conv.md.

* ``conv_frame_penalty`` / ``conv_gershgorin_bounds``: exact, without the operator's matrix ``T``
  (its Gram ``V = Gram(T, side)`` has ``(C·∏n)²`` entries, 17 GB for a 64-channel layer on 32×32
  inputs; here it is never formed). Memory and time depend on the channel counts, the kernel size
  and the number of border classes, not on ``∏n``.
* ``conv_to_matrix`` in the sparse layouts (``"coo"`` / ``"csr"``, either device): built directly in
  CSR order from the *spatial* structure (the sorted distinct input positions each output position
  reads, ``P_out × K`` integers, cached per geometry in an LRU bounded by ``PLAN_CACHE_BYTES``)
  broadcast over the channels: no dense intermediate and no sort of the ``nnz`` entries (the
  reference sorts them all). Values are one gather from the weight (summing taps that wrap onto one
  position), and their backward is the transposed gather (a segmented sum, no atomics).

The frame statistics: for every row ``i`` of ``V`` its diagonal ``d_i`` and its Gershgorin radius
``r_i = Σ_{j≠i} |V_ij|``.

Math (all dims normalised to three spatial dims; a 2-D conv is a 3-D one with a unit first dim).

* Per spatial dim ``i`` let ``E_i[y, t, u] ∈ {0, 1}`` say that tap ``t`` of output position ``y``
  reads input position ``u`` (``w = y·s − p + t·dil``; zeros padding: ``u = w`` if ``0 ≤ w < n``, else
  nothing; circular: ``u = w mod n``). The operator is ``T = Σ_t W[:, :, t] ⊗ E_t`` with
  ``E_t = E_0[:, t_0, :] ⊗ E_1[:, t_1, :] ⊗ E_2[:, t_2, :]`` (a Kronecker product over dims, in
  the row-major order of ``T``'s rows and columns, docs/conv.md), so for ``side = "cols"`` (``Tᵀ T``, rows of V = input
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
  border position near a zero-padded edge has its own. Under circular padding an offset ``q`` is
  taken modulo the side's index range (``n``, or the output size for rows) and labelled by one
  fixed residue: the columns of one row are distinct indices of that range, hence distinct
  residues, so a label still names a single column, and wrapped edges whose columns coincide
  with the interior's share its class (stride 1, same padding: one class per dim). A class table
  ``Cls_i`` holds each class's pattern over the reachable offsets ``q``, with multiplicities
  (circular taps can reach one position twice). The tables are built in pure Python
  (``regkernels._geometry.class_positions``): the positions are cut where some pattern can change
  (a set of cut points fixed by ``k``, ``s``, ``p``, ``dil``), one pattern is computed per piece
  and residue, and equal ones are merged: work independent of ``n`` (cached), which also lets
  the fake implementation size the outputs.
* For every class combination ``κ = (κ_0, κ_1, κ_2)``::

      V_κ[a, a', q] = Σ_{t,t'} X[a, a', t, t'] · Π_i Cls_i[κ_i, t_i, t'_i, q_i]

  is the full nonzero part of row ``(a, p)`` of ``V`` for any ``p`` in class ``κ``: ``d`` is the
  entry ``a' = a, q = 0``; ``r`` the absolute sum of the others (the diagonal is zeroed, not
  subtracted: no cancellation, and ``|x|`` has subgradient 0 at 0 as docs/gram.md wants). Every
  distinct column ``(a', p + q)`` appears once, so the sums are exact, not bounds. The
  contraction runs one dim at a time (three small GEMMs) in blocks of rows ``a`` so the working
  set stays under ``_BLOCK_ELEMENTS``.
* Penalty: ``(1/k) Σ_κ count(κ) Σ_a h(d, r)`` with ``k = C·∏P`` the size of ``V`` (docs/gram.md's
  hinge ``h``). Its gradient: ``∂/∂V_κ = count(κ)/k · (h_d at the diagonal, h_r · sign(V_κ)
  elsewhere)``, contracted back through the class tables to ``∂X`` and then
  ``∂Z = Z (∂X + ∂Xᵀ)`` for ``X = Zᵀ Z``. The backward op recomputes ``V_κ`` block by block
  (the forward keeps only ``d`` and ``r``).
* Range: ``X`` is formed from ``Z`` divided by a power of two near ``max|Z|`` and ``d``, ``r`` are
  scaled back (``regkernels._geometry.factor_scale``), so ``X`` never overflows on its own: a layer
  whose ``d`` or ``r`` exceeds the dtype's range gets ``+inf`` (penalty ``+inf``), a layer holding
  NaN/inf gets NaN — both as the explicit ``frame_penalty(conv_to_matrix(...))``.
* Double backward (``create_graph=True`` then differentiating again) raises RuntimeError (the
  stats' backward ops refuse it); ``backend="reference"`` supports it. Problems whose tap Gram or
  contraction rows exceed ``MAX_WORK_BYTES`` raise ValueError before allocating
  (``regkernels._geometry.check_frame_work``).

The op ``regkernels::conv_frame_stats`` returns ``(d, r)`` per (group, class, channel) in the
math dtype (float32, or float64 for float64 weights); ``regkernels::conv_frame_stats_backward``
maps ``(∂d, ∂r)`` to ``∂W``. Both are torch.library custom ops (fakes, autograd) whose work is
GEMMs; under torch.func (and torch.compile) the public ops reach them through ``_FrameStats``
(a ``torch.autograd.Function`` with a vmap rule, so grad / vjp / vmap work). The geometry (border classes, the factor
layout) is ``regkernels._geometry``; the explicit reference (``regkernels.reference.conv``) is the
oracle.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections import OrderedDict

import torch

from regkernels import _geometry as CG
from regkernels._numerics import through_function
from regkernels.reference import conv as R
from regkernels._dtypes import compute_dtype

# Upper bound on the elements of one block's largest intermediate (the contraction's and the
# backward's temporaries are a small multiple of it): 2^22 float32 = 16 MiB.
_BLOCK_ELEMENTS = 1 << 22
# The forward keeps sign(V_κ) (int8) for the backward when all of it has at most this many
# entries (16 MiB); above, the backward contracts V again block by block.
_SIGN_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------- frame statistics: the math

def _block_rows(G: int, cx: int, geo: CG.FrameGeometry) -> int:
    """Rows ``a`` per block: the largest intermediate of the contraction per (a, a') pair is
    ``geo.per_pair`` (the remaining tap pairs × the classes × offsets after each one-dim step)."""
    return max(1, min(cx, _BLOCK_ELEMENTS // max(1, G * cx * geo.per_pair)))


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


def _keeps_signs(geo: CG.FrameGeometry, G: int, cx: int, keep: bool) -> bool:
    return keep and math.prod(CG.signs_shape(geo, G, cx)) <= _SIGN_ELEMENTS


def _diagonal(a0: int, b: int, geo: CG.FrameGeometry, device) -> tuple:
    """Index of the entries (a, a' = a0 + a, offset 0 in every dim) of a block of V: its diagonal."""
    a = torch.arange(b, device=device)
    z0, z1, z2 = (dim.zero for dim in geo.dims)
    return (slice(None), a, a0 + a, slice(None), z0, slice(None), z1, slice(None), z2)


def _blocks(geo: CG.FrameGeometry, Z: torch.Tensor, tables):
    """Yield ``(a0, b, V_κ block)`` over blocks of V's channel rows."""
    G, _, cxK = Z.shape
    K = math.prod(geo.kernel)
    cx = cxK // K
    X = Z.mT @ Z  # (G, Cx·K, Cx·K), the per-group tap Gram
    step = _block_rows(G, cx, geo)
    for a0 in range(0, cx, step):
        b = min(step, cx - a0)
        yield a0, b, _contract(X[:, a0 * K:(a0 + b) * K].reshape(G, b, K, cx, K), tables, geo.kernel)


def _stats_forward(weight: torch.Tensor, geo: CG.FrameGeometry, groups: int,
                   keep_signs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = compute_dtype(weight.dtype)
    Z = CG.tap_gram_factor(weight.to(dtype), groups, geo.rows)
    scale = CG.factor_scale(Z)
    Z = Z / scale  # exact; V, d, r are quadratic in Z: scaled back by scale² below
    G, cx = Z.shape[0], Z.shape[2] // math.prod(geo.kernel)
    tables = CG.class_tables(geo, dtype, weight.device)
    keep = _keeps_signs(geo, G, cx, keep_signs)
    signs = Z.new_empty(CG.signs_shape(geo, G, cx) if keep else (0,), dtype=torch.int8)
    ds, rs = [], []
    for a0, b, V in _blocks(geo, Z, tables):
        diag = _diagonal(a0, b, geo, Z.device)
        ds.append(V[diag])  # (G, b, n0, n1, n2)
        if keep:  # the backward's ∂|V|/∂V, so that it need not contract V again
            signs[:, a0:a0 + b] = V.sign()
        A = V.abs_()
        A[diag] = A.new_zeros(())  # a device scalar: a Python 0 would be a host tensor (lift_fresh)
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
                    geo: CG.FrameGeometry, groups: int) -> torch.Tensor:
    dtype = compute_dtype(weight.dtype)
    Z = CG.tap_gram_factor(weight.to(dtype), groups, geo.rows)
    tables = CG.class_tables(geo, dtype, weight.device)
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
        blocks = ((a0, b, V.sign_()) for a0, b, V in _blocks(geo, Z / CG.factor_scale(Z), tables))
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
    return CG.weight_of_factor(gZ, weight.shape, geo.rows).to(weight.dtype).contiguous()


# ----------------------------------------------------------------------------- frame statistics: custom ops

@torch.library.custom_op("regkernels::conv_frame_stats", mutates_args=())
def _conv_frame_stats(weight: torch.Tensor, input_size: list[int], stride: list[int], padding: list[int],
                      dilation: list[int], groups: int, circular: bool, rows: bool,
                      keep_signs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d, r, signs)``: ``d``, ``r`` per (group, class, channel) of the conv operator's Gram (see
    the module docstring) and, with ``keep_signs`` when it is small enough, ``sign(V_κ)`` as int8
    for the backward (else an empty tensor). ``weight`` is 5-D ``(C_out, C_in/g, k0, k1, k2)``
    and the lists have 3 entries."""
    CG.check_op_geometry("regkernels::conv_frame_stats", weight, input_size, stride, padding, dilation, groups,
                         circular)
    geo = CG.stats_geometry(weight, input_size, stride, padding, dilation, circular, rows)
    return _stats_forward(weight, geo, groups, keep_signs)


@_conv_frame_stats.register_fake
def _conv_frame_stats_fake(weight, input_size, stride, padding, dilation, groups, circular, rows, keep_signs):
    CG.check_op_geometry("regkernels::conv_frame_stats", weight, input_size, stride, padding, dilation, groups,
                         circular)
    geo = CG.stats_geometry(weight, input_size, stride, padding, dilation, circular, rows)
    G, n_cls, cx = CG.stats_shape(weight.shape, geo, groups)
    d = weight.new_empty((G, n_cls, cx), dtype=compute_dtype(weight.dtype))
    keep = _keeps_signs(geo, G, cx, keep_signs)
    signs = weight.new_empty(CG.signs_shape(geo, G, cx) if keep else (0,), dtype=torch.int8)
    return d, torch.empty_like(d), signs


@torch.library.custom_op("regkernels::conv_frame_stats_backward", mutates_args=())
def _conv_frame_stats_backward(weight: torch.Tensor, grad_d: torch.Tensor, grad_r: torch.Tensor,
                               signs: torch.Tensor, input_size: list[int], stride: list[int], padding: list[int],
                               dilation: list[int], groups: int, circular: bool, rows: bool) -> torch.Tensor:
    """``∂L/∂weight`` from ``(∂L/∂d, ∂L/∂r)``; ``signs`` as the forward returned them."""
    op = "regkernels::conv_frame_stats_backward"
    CG.check_op_geometry(op, weight, input_size, stride, padding, dilation, groups, circular)
    geo = CG.stats_geometry(weight, input_size, stride, padding, dilation, circular, rows)
    CG.check_stats_grads(op, weight, geo, groups, grad_d, grad_r, signs)
    return _stats_backward(weight, grad_d, grad_r, signs, geo, groups)


@_conv_frame_stats_backward.register_fake
def _conv_frame_stats_backward_fake(weight, grad_d, grad_r, signs, input_size, stride, padding, dilation, groups,
                                    circular, rows):
    op = "regkernels::conv_frame_stats_backward"
    CG.check_op_geometry(op, weight, input_size, stride, padding, dilation, groups, circular)
    CG.check_stats_grads(op, weight, CG.stats_geometry(weight, input_size, stride, padding, dilation, circular, rows),
                         groups, grad_d, grad_r, signs)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


_DOUBLE_BACKWARD = ("conv_frame_penalty / conv_gershgorin_bounds: double backward (a backward with create_graph=True "
                    "differentiated again) is not supported by backend='torch'; backend='reference' supports it")


def _stats_setup(ctx, inputs, output) -> None:
    weight, *geometry, _keep = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(weight, output[2])


def _stats_op_backward(ctx, grad_d, grad_r, _grad_signs):
    weight, signs = ctx.saved_tensors  # grads of unused outputs arrive as zeros (materialized)
    gW = torch.ops.regkernels.conv_frame_stats_backward(weight, grad_d, grad_r, signs, *ctx.geometry)
    return (gW,) + (None,) * 8


def _refuse_double_backward(ctx, *grads):
    # the second derivative of d / r (through sign(V) and the tap Gram) is not implemented, and
    # torch's default for an op without autograd is a warning and a silent 0
    raise RuntimeError(_DOUBLE_BACKWARD)


def _no_context(ctx, inputs, output) -> None:
    pass


# the raw ops stay differentiable (torch.ops.regkernels.*, opcheck); the public ops go through
# _FrameStats below, which torch.func can transform
_conv_frame_stats.register_autograd(_stats_op_backward, setup_context=_stats_setup)
_conv_frame_stats_backward.register_autograd(_refuse_double_backward, setup_context=_no_context)


class _FrameStats(torch.autograd.Function):
    """``regkernels::conv_frame_stats`` for the public ops. A custom op's ``register_autograd`` does
    not run under ``torch.func.grad``; an autograd.Function with ``setup_context`` does (its forward
    calls the op below the transform), and its vmap rule runs the op once per layer. Taken under
    torch.func and torch.compile; eager calls on plain tensors take the raw op, whose registered
    autograd is the same backward (``regkernels._numerics.through_function``)."""

    @staticmethod
    def forward(weight, input_size, stride, padding, dilation, groups, circular, rows, keep_signs):
        return torch.ops.regkernels.conv_frame_stats(weight, input_size, stride, padding, dilation, groups,
                                                     circular, rows, keep_signs)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        weight, *geometry, _keep = inputs
        ctx.geometry = geometry
        ctx.save_for_backward(weight, output[2])
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    def backward(ctx, grad_d, grad_r, _grad_signs):
        weight, signs = ctx.saved_tensors
        return (_FrameStatsBackward.apply(weight, grad_d, grad_r, signs, *ctx.geometry),) + (None,) * 8

    @staticmethod
    def vmap(info, in_dims, *args):
        return CG.vmap_by_loop(_FrameStats.apply, info, in_dims, *args)


class _FrameStatsBackward(torch.autograd.Function):
    """``regkernels::conv_frame_stats_backward``, differentiable once: differentiating it raises."""

    @staticmethod
    def forward(weight, grad_d, grad_r, signs, input_size, stride, padding, dilation, groups, circular, rows):
        return torch.ops.regkernels.conv_frame_stats_backward(weight, grad_d, grad_r, signs, input_size, stride,
                                                              padding, dilation, groups, circular, rows)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(_DOUBLE_BACKWARD)

    @staticmethod
    def vmap(info, in_dims, *args):
        return CG.vmap_by_loop(_FrameStatsBackward.apply, info, in_dims, *args)


# ----------------------------------------------------------------------------- frame statistics: the entries

def _stats(op: str, weight: torch.Tensor, input_size, stride, padding, dilation, groups: int, padding_mode: str,
           side: str):
    """``(d, r, counts, k)``: the stats op's ``(G, n_cls, Cx)`` outputs, the positions per class
    ``(n_cls,)`` and the size k of the Gram."""
    (kernel, *geometry), circular, rows, counts, positions = CG.frame_plan(
        op, tuple(weight.shape), tuple(input_size), stride, padding, dilation, groups, padding_mode, side, False,
        R.MAX_WORK_BYTES)
    w5 = weight.reshape(weight.shape[0], weight.shape[1], *kernel)
    keep_signs = torch.is_grad_enabled() and weight.requires_grad
    if through_function():
        d, r, _ = _FrameStats.apply(w5, *geometry, groups, circular, rows, keep_signs)
    else:
        d, r, _ = torch.ops.regkernels.conv_frame_stats(w5, *geometry, groups, circular, rows, keep_signs)
    counts = CG.class_counts(counts, d.dtype, d.device)  # cached on the device
    return d, r, counts, d.shape[0] * d.shape[2] * positions


def conv_frame_penalty(weight: torch.Tensor, input_size, A: float, B: float, stride=1, padding=0, dilation=1,
                       groups: int = 1, padding_mode: str = "zeros", side: str = "auto") -> torch.Tensor:
    """docs/conv.md's frame penalty without ``T``: ``(1/k) Σ_κ count(κ) Σ_a h(d, r)`` (module docstring);
    arguments as the reference's."""
    d, r, counts, k = _stats("conv_frame_penalty", weight, input_size, stride, padding, dilation, groups,
                             padding_mode, side)
    return CG.frame_value(d, r, A, B, k, weight.dtype, counts=counts[:, None])


def conv_gershgorin_bounds(weight: torch.Tensor, input_size, stride=1, padding=0, dilation=1, groups: int = 1,
                           padding_mode: str = "zeros", side: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(min(d − r), max(d + r))`` over the classes (every class has a position)."""
    d, r, _, _ = _stats("conv_gershgorin_bounds", weight, input_size, stride, padding, dilation, groups,
                        padding_mode, side)
    return CG.gershgorin_value(d, r, weight.dtype)


def conv_frame_penalty_multi(weights, input_size, A: float, B: float, stride=1, padding=0, dilation=1,
                             groups: int = 1, padding_mode: str = "zeros", side: str = "auto") -> torch.Tensor:
    """``(L,)``: ``conv_frame_penalty`` of each of ``L`` layers of one shape and geometry, from ONE stats
    call: the layers stacked as one conv with ``L·groups`` groups (``regkernels._geometry.stack_layers``;
    docs/conv.md#conv_frame_penalty_multi)."""
    L = len(weights)
    W, scale = CG.stack_layers(weights, compute_dtype(weights[0].dtype))
    d, r, counts, k = _stats("conv_frame_penalty_multi", W, input_size, stride, padding, dilation, L * groups,
                             padding_mode, side)
    return CG.frame_values(d, r, A, B, L, k // L, weights[0].dtype, counts, scale)


# ----------------------------------------------------------------------------- conv_to_matrix, sparse layouts

class _GatherSum(torch.autograd.Function):
    """``out[:, i] = Σ_j src[:, index[i, j]]`` with ``index == src.shape[1]`` reading 0; the
    backward is the same gather with the transposed index ``inverse`` (each source column's
    destinations), so both directions are owner-computes sums without atomics. Plain torch ops
    in both directions: torch.func generates its vmap rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(src: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ext = torch.cat([src, src.new_zeros(src.shape[0], 1)], dim=1)
        picked = ext[:, index]
        return picked[..., 0] if index.shape[1] == 1 else picked.sum(-1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, index, inverse = inputs
        ctx.save_for_backward(index, inverse)

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
    cols, valid = CG.spatial_index_map(input_size, kernel, stride, padding, dilation, circular, torch.device("cpu"))
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


def conv_to_matrix(weight: torch.Tensor, input_size, stride=1, padding=0, dilation=1, groups: int = 1,
                   padding_mode: str = "zeros", layout: str = "coo",
                   max_dense_bytes: int | None = None) -> torch.Tensor:
    """``T`` in the sparse ``layout`` (``"coo"`` or ``"csr"``), arguments as the reference's
    (``max_dense_bytes`` is for the dense layout, which this backend does not build: the dense
    kernels are the ``"cpu"`` and ``"triton"`` backends). Built directly in CSR order from the
    cached spatial plan (module docstring); the values' backward is the transposed gather."""
    if layout not in ("coo", "csr"):
        raise ValueError(f"conv_to_matrix: backend 'torch' builds layout='coo' or layout='csr'; got layout={layout!r} "
                         f"(the dense layout: backends 'cpu', 'triton', 'reference')")
    R.check_sparse_matrix(weight, input_size, stride, padding, dilation, layout)
    d = weight.dim() - 2
    c_out, c_in_g = weight.shape[0], weight.shape[1]
    kernel = tuple(weight.shape[2:])
    geometry = (tuple(input_size), CG.expand(stride, d), CG.expand(padding, d), CG.expand(dilation, d))
    col, row, crow_p, index, inverse, S = _sparse_plan(kernel, *geometry, padding_mode == "circular", c_in_g,
                                                       weight.device)
    shape = CG.matrix_shape(weight, *geometry, groups)
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




# ----------------------------------------------------------------------------- OCNN through the kernel's DFT
#
# O = conv(K, K, stride=S, padding=P) (docs/conv.md#conv_orthogonality_penalty) samples the full
# self-correlation C_δ[a, b] = Σ_{c,t} K[a, c, t + δ]·K[b, c, t] (|δ_i| ≤ k_i − 1) at the shifts
# δ(y) = y·S − P; shifts outside that support are exactly 0. On the periodic grid N_i = 2k_i − 1 the
# circular self-correlation equals C (no wrap reaches the support), so with K̂_ω = Σ_t K_t e^{−iθ(ω,t)}
# (o × c per frequency, θ(ω, t) = 2π Σ_i ω_i t_i / N_i) the DFT diagonalises it:
# C_δ = (1/N) Σ_ω H_ω e^{iθ(ω,δ)}, H_ω = K̂_ω K̂_ωᴴ. K is real, so ω and −ω are conjugate and only
# ω = 0 and one of each of the m = (N − 1)/2 pairs are formed. With K̂ = A + iB per pair, the
# Hermitian product takes three real GEMMs (Gauss): P1 = AAᵀ, P2 = BBᵀ, P3 = (A + B)(A − B)ᵀ give
# Re H = P1 + P2 and Im H = P3 − P1 + P2. For 3×3 that is 1 + 3·12 = 37 products of o × c by c × o
# (the tap Gram takes 81 blocks, the reference conv 225 tap products). Every map between K, the
# GEMM operands, the products and O is linear and small, so it is one cached table per geometry:
#   operands F·K (rows A₀, A, B, A + B, A − B), P = (A₀A₀ᵀ, AAᵀ, BBᵀ, (A + B)(A − B)ᵀ), O = Finv·P.
# Backward of ⟨gO, O⟩: gP = Finvᵀ gO and, per pair, gA = M1 A + M3 (A + B), gB = M2 B − M3 (A + B)
# with M1 = gP1 + gP1ᵀ + 2gP3, M2 = gP2 + gP2ᵀ − 2gP3, M3 = gP3ᵀ − gP3 (M0 = gP1₀ + gP1₀ᵀ at ω = 0):
# M = Bm·gO + Cm·gOᵀ (one table GEMM), Y_j = M_j (A₀, A, B, A + B)_j (the same 37 GEMMs), gK = G·Y.
# Where S | P, O_{−δ} = O_δᵀ and M = BCs·gO needs no transpose (_OcnnPenalty.backward). Layers of
# one shape go through as one stack (L, o, c, *k): batched GEMMs, one table GEMM per step.

@functools.lru_cache(maxsize=256)
def _ocnn_table_rows(kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...]):
    """The tables of one geometry as nested lists of floats: ``F (n + m, K)``, ``Finv (n_shift, n)``,
    ``BC (n, 2·n_shift)``, ``G (K, n)`` with ``n = 1 + 3m`` products (module comment), and where the
    stride divides the padding ``BCs (n, n_shift)``. Pure Python
    (torch.compile traces it as constants), O((K + n_shift)·n) per geometry."""
    N = [2 * k - 1 for k in kernel]
    size = math.prod(N)
    freqs = list(itertools.product(*[range(n) for n in N]))  # row-major, as the flat index
    pairs = []  # one frequency of each conjugate pair: the one whose flat index is below its partner's
    for f, w in enumerate(freqs):
        partner = 0
        for wi, n in zip(w, N):
            partner = partner * n + (-wi) % n
        if 0 < f < partner:
            pairs.append(w)

    def phases(points):  # θ(ω, x) = 2π Σ_i ω_i x_i / N_i, per pair and point
        return [[2 * math.pi * sum(wi * xi / n for wi, xi, n in zip(w, x, N)) for x in points] for w in pairs]

    th = phases(list(itertools.product(*[range(k) for k in kernel])))  # (m, K)
    cos = [[math.cos(v) for v in row] for row in th]
    sin = [[math.sin(v) for v in row] for row in th]
    ones = [[1.0] * math.prod(kernel)]
    neg_sin = [[-v for v in row] for row in sin]
    c_minus_s = [[a - b for a, b in zip(r, q)] for r, q in zip(cos, sin)]
    c_plus_s = [[a + b for a, b in zip(r, q)] for r, q in zip(cos, sin)]
    # K̂ = A + iB: A = Σ K cos θ, B = −Σ K sin θ; rows A₀, A, B, A + B (the left operands) and A − B
    F = ones + cos + neg_sin + c_minus_s + c_plus_s
    G = [list(col) for col in zip(*(ones + cos + neg_sin + c_plus_s))]  # (K, n): gK from Y
    # shifts y over the grid ⌊2P/S⌋ + 1 per dim, row-major; δ = y·S − P; rows off the support are 0
    out = [2 * p // s + 1 for p, s in zip(padding, stride)]
    Finv = []
    for y in itertools.product(*[range(n) for n in out]):
        delta = [yi * s - p for yi, s, p in zip(y, stride, padding)]
        if any(abs(d) > k - 1 for d, k in zip(delta, kernel)):
            Finv.append([0.0] * (1 + 3 * len(pairs)))
            continue
        ph = phases([delta])
        c, s = [math.cos(r[0]) for r in ph], [math.sin(r[0]) for r in ph]
        Finv.append([1.0 / size] + [2 * (a + b) / size for a, b in zip(c, s)]
                    + [2 * (a - b) / size for a, b in zip(c, s)] + [-2 * b / size for b in s])
    m = len(pairs)
    Bm = []  # acts on gO; Cm, acting on gOᵀ, is Finv itself (gP1, gP2, gP3 enter M as their transposes)
    for row in Finv:
        f0, f1, f2, f3 = row[:1], row[1:1 + m], row[1 + m:1 + 2 * m], row[1 + 2 * m:]
        Bm.append(f0 + [a + 2 * b for a, b in zip(f1, f3)] + [a - 2 * b for a, b in zip(f2, f3)] + [-b for b in f3])
    BC = [list(a) + list(b) for a, b in zip(zip(*Bm), zip(*Finv))]
    # S | P per dim: shift y and its mirror (out − 1 − y) have δ and −δ, the target sits at δ = 0, and
    # O_{−δ} = O_δᵀ, so gOᵀ is gO mirrored and Bm·gO + Cm·gOᵀ = (Bm + Cm mirrored)·gO
    BCs = None
    if all(p % s == 0 for p, s in zip(padding, stride)):
        BCs = [[b + c for b, c in zip(rb, reversed(rc))] for rb, rc in zip(zip(*Bm), zip(*Finv))]
    return F, Finv, BC, G, BCs


@functools.lru_cache(maxsize=256)
def _ocnn_tables(kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    rows = _ocnn_table_rows.__wrapped__ if torch.compiler.is_compiling() else _ocnn_table_rows
    F, Finv, BC, G, BCs = rows(kernel, stride, padding)
    n = len(G[0])  # kernel sizes are >= 1: K >= 1 taps, and >= 1 shift
    shapes = ((len(F), len(G)), (len(Finv), n), (n, 2 * len(Finv)), (len(G), n), (n, len(Finv)))
    return tuple(None if t is None else torch.tensor(t, dtype=torch.float64).reshape(shape).to(device, dtype)
                 for t, shape in zip((F, Finv, BC, G, BCs), shapes))


def ocnn_tables(kernel, stride, padding, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(F, Finv, BC, G, BCs)`` of the module comment (``BCs`` None unless S | P), cached per
    (geometry, dtype, device): a host→device copy per call would be a stream sync on a GPU. Built
    afresh while torch.compile traces (no traced tensor in the cache), as ``_geometry.class_counts``.
    Read-only."""
    make = _ocnn_tables.__wrapped__ if torch.compiler.is_compiling() else _ocnn_tables
    return make(tuple(kernel), tuple(stride), tuple(padding), dtype, torch.device(device))


def _operands(W: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """``F`` applied over the taps of the stack ``W (L, o, c, *k)``: ``(rows, L, o, c)``, one GEMM."""
    L, o, c = W.shape[:3]
    K = math.prod(W.shape[3:])
    Wt = W.reshape(L, o, c, K).permute(3, 0, 1, 2).reshape(K, L * o * c)
    return torch.mm(F, Wt).view(F.shape[0], L, o, c)


def _products(ops: torch.Tensor, Finv: torch.Tensor) -> torch.Tensor:
    """``O (n_shift, L, o, o)`` from the operands ``(n + m, L, o, c)`` of ``_operands``."""
    L, o, c = ops.shape[1:]
    n = Finv.shape[1]
    m = (n - 1) // 3
    sym = ops[:1 + 2 * m].reshape((1 + 2 * m) * L, o, c)
    P12 = torch.bmm(sym, sym.mT).view(1 + 2 * m, L * o * o)  # A₀A₀ᵀ, AAᵀ, BBᵀ
    P3 = torch.bmm(ops[1 + 2 * m:n].reshape(m * L, o, c), ops[n:].reshape(m * L, o, c).mT).view(m, L * o * o)
    O = torch.mm(Finv[:, :1 + 2 * m], P12).addmm_(Finv[:, 1 + 2 * m:], P3)
    return O.view(Finv.shape[0], L, o, o)


def _centre_distance(O: torch.Tensor, centre: int) -> torch.Tensor:
    """``‖O_l − target‖²`` per layer of ``O (n_shift, L, o, o)``: each shift's squared norm as a dot
    product (one read of O), the centre's from ``O_c − I``, never ``‖O‖² − 2 tr + o``, which cancels
    for near-orthogonal kernels."""
    S, L, o = O.shape[:3]
    flat = O.reshape(S * L, 1, o * o)
    sq = torch.bmm(flat, flat.mT).view(S, L)
    D = (O[centre] - torch.eye(o, dtype=O.dtype, device=O.device)).reshape(L, 1, o * o)
    return torch.cat([sq[:centre], torch.bmm(D, D.mT).view(1, L), sq[centre + 1:]]).sum(0)


def _weight_grad(M: torch.Tensor, ops: torch.Tensor, G: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``Y_j = M_j·ops_j`` for the ``n`` left operands and ``gK = G·Y``, laid out as the stack ``shape``
    (``M (n, L, o, o)``, ``ops (n + m, L, o, c)``)."""
    n, L, o = M.shape[:3]
    c = ops.shape[-1]
    Y = torch.bmm(M.reshape(n * L, o, o), ops[:n].reshape(n * L, o, c))
    gK = torch.mm(G, Y.view(n, L * o * c))  # (K, L·o·c)
    return gK.view(G.shape[0], L, o, c).permute(1, 2, 3, 0).reshape(shape)


def _penalty_grad(W: torch.Tensor, g: torch.Tensor, F, Finv, BC, G, centre: int) -> torch.Tensor:
    """``g``-weighted ``∂/∂W`` of the penalties, from ``W`` in differentiable torch ops (the path of a
    second derivative and of torch.func): O again, ``gO = 2g·(O − target)``, ``Bm·gO + Cm·gOᵀ``."""
    L, o = W.shape[:2]
    n = G.shape[1]
    ops = _operands(W, F)
    O = _products(ops, Finv)
    eye = torch.eye(o, dtype=O.dtype, device=O.device)
    gO = torch.cat([O[:centre], (O[centre] - eye)[None], O[centre + 1:]]) * (2 * g).view(1, L, 1, 1)
    both = torch.cat([gO, gO.mT]).view(2 * gO.shape[0], L * o * o)
    M = torch.mm(BC, both).view(n, L, o, o)
    return _weight_grad(M, ops, G, W.shape)


class _OcnnPenalty(torch.autograd.Function):
    """The penalties ``(L,)`` of a stack ``W (L, o, c, *k)`` through the kernel's DFT, returning also
    ``O`` and the GEMM operands (non-differentiable, for the backward). First-order backward (grad
    mode off, as in ``loss.backward()``): from the saved ``O`` and operands, and where the stride
    divides the padding without a transpose (``M = BCs·gO``), ``gO = 2g·(O − target)`` folded in.
    A backward that builds a graph (double backward, torch.func) recomputes from ``W`` in
    differentiable torch ops (``_penalty_grad``): the second derivative is exact. ``setup_context``
    and a generated vmap rule: torch.func and torch.compile take it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(W, F, Finv, BC, G, BCs, centre):
        ops = _operands(W, F)
        O = _products(ops, Finv)
        return _centre_distance(O, centre), O, ops

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        W, F, Finv, BC, G, BCs, centre = inputs
        _, O, ops = output
        ctx.mark_non_differentiable(O, ops)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for O and the operands
        ctx.save_for_backward(W, F, Finv, BC, G, BCs, O, ops)
        ctx.centre = centre

    @staticmethod
    def backward(ctx, g, _gO, _gops):
        W, F, Finv, BC, G, BCs, O, ops = ctx.saved_tensors
        if g is None:
            return (None,) * 7
        centre = ctx.centre
        if torch.is_grad_enabled() or BCs is None:
            return _penalty_grad(W, g, F, Finv, BC, G, centre), None, None, None, None, None, None
        S, L, o = O.shape[:3]
        n = G.shape[1]
        g2 = 2 * g
        M = torch.mm(BCs, O.reshape(S, L * o * o)).view(n, L, o, o)  # BCs·O, then ·2g − BCs[:, c]·2g·I
        M.mul_(g2.view(1, L, 1, 1))
        M.diagonal(dim1=-2, dim2=-1).sub_(BCs[:, centre].view(n, 1, 1) * g2.view(1, L, 1))
        return _weight_grad(M, ops, G, W.shape), None, None, None, None, None, None


def _ocnn_geometry(shape: tuple[int, ...], stride, padding) -> tuple[tuple[int, ...], tuple[int, ...]]:
    d = len(shape) - 2
    S = CG.expand(stride, d)
    P = tuple((k - 1) // s * s for k, s in zip(shape[2:], S)) if padding is None else CG.expand(padding, d)
    return S, P


def check_ocnn_work(op: str, L: int, shape: tuple[int, ...], stride, padding, dtype: torch.dtype) -> None:
    """Refuse (ValueError naming the size, before allocating) a stack whose DFT operands
    ``(n + m, L, o, c)``, products ``(n, L, o, o)`` and ``O (n_shift, L, o, o)`` exceed
    ``MAX_WORK_BYTES`` in the compute dtype (``n = 1 + 3m``, ``m = (∏(2k − 1) − 1)/2``)."""
    S, P = _ocnn_geometry(shape, stride, padding)
    o, c = shape[0], shape[1]
    m = (math.prod([2 * k - 1 for k in shape[2:]]) - 1) // 2
    n = 1 + 3 * m
    out = tuple(2 * p // s + 1 for p, s in zip(P, S))
    elements = L * ((n + m) * o * c + (n + math.prod(out)) * o * o)  # operands, products, O
    nbytes = elements * torch.empty((), dtype=compute_dtype(dtype)).element_size()
    if nbytes > R.MAX_WORK_BYTES:
        raise ValueError(f"{op}: the DFT products of {L} layer(s) of shape {tuple(shape)} and the self-convolution O "
                         f"of shape {(o, o, *out)} need {nbytes} bytes ({nbytes / 2**30:.1f} GiB), over MAX_WORK_BYTES="
                         f"{R.MAX_WORK_BYTES} (regkernels.reference.conv); use fewer layers per call, fewer filters "
                         f"or a smaller padding")


def ocnn_stack(W: torch.Tensor, stride, padding) -> torch.Tensor:
    """The penalties ``(L,)`` of a stack ``W (L, o, c, *k)`` in the compute dtype (no checks)."""
    S, P = _ocnn_geometry(tuple(W.shape[1:]), stride, padding)
    W = W.to(compute_dtype(W.dtype))
    tables = ocnn_tables(W.shape[3:], S, P, W.dtype, W.device)
    out = tuple(2 * p // s + 1 for p, s in zip(P, S))
    centre = 0  # target I at the centre ⌊s/2⌋ per dim: its flat index in the row-major shift grid
    for n in out:
        centre = centre * n + n // 2
    return _OcnnPenalty.apply(W, *tables, centre)[0]


# ----------------------------------------------------------------------------- OCNN input side: the tap Gram
#
# side="cols" (docs/conv.md#input-side): the rows of TᵀT for T the stride-S conv on an
# unbounded input. Row (c, u) has the entries
#   V_r[c, c', q] = Σ_{t ≡ r (mod S), 0 ≤ t < k, 0 ≤ t + q < k} X[(c, t), (c', t + q)],
#   X = Zᵀ Z the tap Gram, Z = K as (o, c·∏k),
# which depend on u only through its phase r = u mod S (per dim): the taps t reading u are those
# with t ≡ u, each through its own output. So V over all phases and shifts q ∈ (−k, k) is an index
# sum of the tap Gram X: every tap pair (t, t') lands in exactly one slot (r, q) = (t mod S, t' − t).
# That map is a Kronecker product over the dims of 0/1 tables A_i (min(S_i, k_i)·(2k_i − 1), k_i²),
# applied one dim at a time (d table GEMMs over the L·c² channel pairs). A phase with r_i ≥ k_i is read
# by no tap: its rows are 0 and add c each, c·(∏S − ∏min(S, k)) in all. Autograd differentiates the
# GEMMs (exact to any order; torch.func and torch.compile trace them).

@functools.lru_cache(maxsize=256)
def _cols_table_rows(kernel: tuple[int, ...], stride: tuple[int, ...]):
    """Per dim ``A_i`` (nested lists, ``(min(S, k)·(2k − 1), k²)``, row ``r·(2k − 1) + q + k − 1``,
    column ``t·k + t'``), and the 0/1 mask over the flattened slots of the entries at ``q = 0``."""
    tables, masks = [], []
    for k, s in zip(kernel, stride):
        w = 2 * k - 1
        A = [[0.0] * (k * k) for _ in range(min(s, k) * w)]
        for t in range(k):
            for t2 in range(k):
                A[(t % s) * w + t2 - t + k - 1][t * k + t2] = 1.0
        tables.append(A)
        masks.append([1.0 if j % w == k - 1 else 0.0 for j in range(min(s, k) * w)])
    mask = [1.0]
    for m in masks:  # row-major over the dims, as the slots after the table GEMMs
        mask = [a * b for a in mask for b in m]
    return tables, mask


@functools.lru_cache(maxsize=256)
def _cols_tables(kernel: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    rows = _cols_table_rows.__wrapped__ if torch.compiler.is_compiling() else _cols_table_rows
    tables, mask = rows(kernel, stride)
    return ([torch.tensor(A, dtype=dtype, device=device) for A in tables],
            torch.tensor(mask, dtype=dtype, device=device))


def cols_tables(kernel, stride, dtype: torch.dtype, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``([A_1 … A_d], mask)`` of the comment above, cached per (geometry, dtype, device) as
    ``ocnn_tables`` (built afresh while torch.compile traces). Read-only."""
    make = _cols_tables.__wrapped__ if torch.compiler.is_compiling() else _cols_tables
    return make(tuple(kernel), tuple(stride), dtype, torch.device(device))


def check_cols_work(op: str, L: int, shape: tuple[int, ...], stride, dtype: torch.dtype) -> None:
    """Refuse (ValueError naming the size, before allocating) a stack whose tap Gram ``(L, c·∏k, c·∏k)``,
    the intermediates of the table GEMMs, the phase rows and their distance to the target exceed
    ``MAX_WORK_BYTES`` in the compute dtype."""
    o, c, kernel = shape[0], shape[1], tuple(shape[2:])
    S = CG.expand(stride, len(kernel))
    slots = [min(s, k) * (2 * k - 1) for s, k in zip(S, kernel)]
    pairs = [k * k for k in kernel]
    # the Gram as (∏k²) pairs, each table GEMM's output (the first i dims as slots), the rows and V − target
    per_pair = sum([math.prod(slots[:i]) * math.prod(pairs[i:]) for i in range(len(kernel) + 1)]) \
        + 2 * math.prod(slots)
    layer = (c * c * (per_pair + math.prod(pairs)) + o * c * math.prod(kernel)) \
        * torch.empty((), dtype=compute_dtype(dtype)).element_size()
    nbytes = L * layer
    if nbytes > R.MAX_WORK_BYTES:
        fit = R.MAX_WORK_BYTES // layer
        advice = (f"use at most {fit} layers per call" if fit else
                  "one layer alone is over it: backend='reference' needs the one-hot images of its phases instead")
        raise ValueError(f"{op}: side='cols': the tap Grams of {L} layer(s) of shape {tuple(shape)} "
                         f"({c * math.prod(kernel)}² each) and their phase rows need {nbytes} bytes "
                         f"({nbytes / 2**30:.1f} GiB), over MAX_WORK_BYTES={R.MAX_WORK_BYTES} "
                         f"(regkernels.reference.conv), {layer} bytes per layer; {advice}")


def cols_stack(W: torch.Tensor, stride) -> torch.Tensor:
    """The input-side penalties ``(L,)`` of a stack ``W (L, o, c, *k)`` in the compute dtype (no checks)."""
    W = W.to(compute_dtype(W.dtype))
    L, o, c = W.shape[:3]
    kernel = tuple(W.shape[3:])
    d = len(kernel)
    S = CG.expand(stride, d)
    tables, mask = cols_tables(kernel, S, W.dtype, W.device)
    Z = W.reshape(L, o, c * math.prod(kernel))
    X = torch.bmm(Z.mT, Z)  # the tap Gram, one GEMM per layer; layers never mix (a NaN stays in its entry)
    # (L, c, t_1…t_d, c', t'_1…t'_d) → (t_1, t'_1, …, t_d, t'_d, L, c, c'): dim i's tap pair leads
    X = X.view(L, c, *kernel, c, *kernel)
    X = X.permute(*[j for i in range(d) for j in (2 + i, 3 + d + i)], 0, 1, 2 + d)
    X = X.reshape(*[k * k for k in kernel], L * c * c)
    for A in tables:  # contract the leading tap pair, its slots appended last: (…, L·c·c, n_1, …, n_i)
        X = torch.tensordot(X, A, dims=([0], [1]))
    V = X.reshape(L, c, c, mask.shape[0])
    target = torch.eye(c, dtype=V.dtype, device=V.device)[:, :, None] * mask  # I_c at every phase's q = 0
    dead = c * (math.prod(S) - math.prod([min(s, k) for s, k in zip(S, kernel)]))
    return (V - target).square().sum((1, 2, 3)) + float(dead)


def conv_orthogonality_penalty(weight: torch.Tensor, stride=1, padding=None, side: str = "rows") -> torch.Tensor:
    """OCNN penalty (docs/conv.md#conv_orthogonality_penalty): ``side="rows"`` through the kernel's DFT,
    ``side="cols"`` through the tap Gram; float16 / bfloat16 computed in float32, the result in the
    weight's dtype."""
    op = "conv_orthogonality_penalty"
    if side == "cols":
        check_cols_work(op, 1, tuple(weight.shape), stride, weight.dtype)
        return cols_stack(weight[None], stride)[0].to(weight.dtype)
    check_ocnn_work(op, 1, tuple(weight.shape), stride, padding, weight.dtype)
    return ocnn_stack(weight[None], stride, padding)[0].to(weight.dtype)


def conv_orthogonality_penalty_multi(weights: list[torch.Tensor], stride=1, padding=None,
                                     side: str = "rows") -> torch.Tensor:
    """``(L,)``: the OCNN penalty of each weight (all of one shape, dtype and device) in one batched
    evaluation (docs/conv.md#conv_orthogonality_penalty_multi)."""
    op = "conv_orthogonality_penalty_multi"
    w = weights[0]
    if side == "cols":
        check_cols_work(op, len(weights), tuple(w.shape), stride, w.dtype)
        return cols_stack(torch.stack(list(weights)), stride).to(w.dtype)
    check_ocnn_work(op, len(weights), tuple(w.shape), stride, padding, w.dtype)
    return ocnn_stack(torch.stack(list(weights)), stride, padding).to(w.dtype)
