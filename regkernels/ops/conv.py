"""Public ops on convolutions viewed as linear operators (docs/conv.md).

Each op checks its arguments (every message names the op, the argument and the expected form),
then runs the implementation ``TABLE`` gives for the backend, the weight's device and dtype:

* ``conv_to_matrix``, ``layout="dense"``: the C++ kernel on CPU tensors (``"cpu"``), the Triton
  kernel on CUDA tensors (``"triton"``). The sparse layouts (``"coo"`` / ``"csr"``) are their own
  table op, ``conv_to_matrix_sparse``: one composite on either device (``"torch"``: CSR order from
  a cached spatial plan, no dense intermediate) and the reference. So the table says which
  backends build which layout, and a named backend that does not build the requested layout
  raises the table's ValueError listing those that do (errors name ``conv_to_matrix(layout=...)``).
* ``conv_frame_penalty`` / ``conv_gershgorin_bounds``: exact, without ``T`` — the tap Gram contracted
  with per-dim border-class tables: ``"cpu"`` (the CPU default: C++, one BLAS tap Gram from its upper
  blocks, one fused parallel pass over the classes; the backward one transposed pass and one GEMM),
  ``"torch"`` (GEMMs in torch ops with a hand-written backward, any device; the CUDA default); the fused
  Triton form runs when named (``"triton"``, float16 / bfloat16 / float32). The reference builds ``T``
  and its Gram and refuses layers over 2 GiB.
* ``conv_frame_penalty_multi``: ``L`` layers of one weight shape and one geometry in one call of
  the implicit stats (the layers as one conv with ``L·groups`` groups), ``(L,)`` values; rows as
  ``conv_frame_penalty``'s.
* ``conv_singular_values`` / ``clip_conv_singular_values``: per-frequency SVDs on the batched Jacobi
  SVD kernel (``"cuda"``: the default on CUDA; ``"cpu"``: named only, LAPACK's complex SVD in the
  reference is faster on CPU). Named, a weight larger than the kernel takes raises ValueError;
  under ``backend=None`` such a weight takes the reference's complex SVD.
* ``conv_spectral_norm``: the reference only (power iteration through ``F.conv`` and
  ``F.conv_transpose``, which are already the fast kernels; the bound's Gram iteration is batched
  complex GEMMs). ``input_size=None`` with ``method="bound"``: the bound for every input size, from
  the layer's frequency response on a grid (docs/conv.md#a-bound-for-every-input-size).
* ``conv_orthogonality_penalty`` (and ``conv_orthogonality_penalty_multi``, several weights of one
  shape in one call): ``"torch"`` (the default on every device) takes the kernel's DFT on the
  ``(2k − 1)`` grid, where the self-correlation is diagonal: ``1 + 3m`` real GEMMs per layer (37 for
  3×3, against 81 tap pairs and the reference's 225), one table GEMM to the shifts, a backward of
  the same size; the reference is one ``conv`` of the kernel with itself (a loop for the multi op).
  ``side="cols"`` (input side, the rows of ``TᵀT``): ``"torch"`` forms the tap Gram (one GEMM per
  layer) and index-sums it into the phase rows (one small table GEMM per spatial dim); the
  reference sends one-hot pixels through the conv and its adjoint.

``backend=None`` takes the first row for the device that can run the dtype; a named backend that
cannot take the input raises ValueError listing those that can (``regkernels.ops._table``).

Shapes: ``weight`` is ``(C_out, C_in/groups, *k)`` with 1, 2 or 3 spatial dims ``d``;
``input_size`` is the spatial size ``(n_1, …, n_d)`` of one input sample (weights are
single layers, not batched; ``torch.func.vmap`` maps over a stack of them).
stride / padding / dilation are an int or a d-tuple. ``transposed=True`` (``conv_to_matrix``,
``conv_frame_penalty(_multi)``, ``conv_gershgorin_bounds``): ``weight`` is an ``nn.ConvTranspose{d}d``
weight ``(C_in, C_out/groups, *k)`` with that layer's own input size and geometry plus
``output_padding``; the ops work on its operator ``Tᵀ``, ``T`` the conv of ``weight`` on the
transposed conv's output size (docs/conv.md#transposed-convolutions).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from regkernels._geometry import conv_output_size, conv_transpose_output_size
from regkernels.distributed import accepts_sharded
from regkernels.ops._common import check_bounds, check_number, check_side, check_tensor
from regkernels.ops._table import HALF_AND_FLOAT, Kernel, Table, check_backend_keyword
from regkernels.reference.conv import ConvSpectralNorm, kernel_bound_axes, kernel_bound_grid, kernel_grid_excess

# an int (the same for every spatial dim) or one int per spatial dim
IntOrTuple = Union[int, Sequence[int]]

__all__ = [
    "conv_to_matrix",
    "conv_frame_penalty",
    "conv_gershgorin_bounds",
    "conv_frame_penalty_multi",
    "conv_orthogonality_penalty",
    "conv_orthogonality_penalty_multi",
    "conv_singular_values",
    "clip_conv_singular_values",
    "conv_spectral_norm",
    "ConvSpectralNorm",
]

_REF = "regkernels.reference.conv"

TABLE = Table("conv", [
    # conv_to_matrix with layout="dense"
    Kernel("conv_to_matrix", "cpu", "cpu", "regkernels._C_ops:conv_to_matrix",
           note="one pass per row of T; gather backward without atomics"),
    Kernel("conv_to_matrix", "cuda", "triton", "regkernels.triton.conv_matrix:conv_to_matrix",
           note="each program writes one tile of T from the inverse index map"),
    Kernel("conv_to_matrix", "any", "reference", f"{_REF}:conv_to_matrix"),
    # conv_to_matrix with layout="coo" / "csr"
    Kernel("conv_to_matrix_sparse", "any", "torch", "regkernels.composite.conv:conv_to_matrix",
           note="layout='coo' / 'csr': CSR order from a cached spatial plan, no dense intermediate"),
    Kernel("conv_to_matrix_sparse", "any", "reference", f"{_REF}:conv_to_matrix"),
    Kernel("conv_frame_penalty", "cpu", "cpu", "regkernels._C_ops:conv_frame_penalty",
           note="implicit, C++: BLAS tap Gram (upper blocks), one fused class pass; backward one GEMM"),
    Kernel("conv_frame_penalty", "any", "torch", "regkernels.composite.conv:conv_frame_penalty",
           note="implicit: border classes, no T"),
    Kernel("conv_frame_penalty", "cuda", "triton", "regkernels.triton.conv_frame:conv_frame_penalty",
           dtypes=HALF_AND_FLOAT, default=False, note="the implicit stats fused; computed in float32"),
    Kernel("conv_frame_penalty", "any", "reference", f"{_REF}:conv_frame_penalty", note="explicit T and its Gram"),
    Kernel("conv_gershgorin_bounds", "cpu", "cpu", "regkernels._C_ops:conv_gershgorin_bounds",
           note="implicit, C++: BLAS tap Gram (upper blocks), one fused class pass"),
    Kernel("conv_gershgorin_bounds", "any", "torch", "regkernels.composite.conv:conv_gershgorin_bounds",
           note="implicit: border classes, no T"),
    Kernel("conv_gershgorin_bounds", "cuda", "triton", "regkernels.triton.conv_frame:conv_gershgorin_bounds",
           dtypes=HALF_AND_FLOAT, default=False, note="the implicit stats fused; computed in float32"),
    Kernel("conv_gershgorin_bounds", "any", "reference", f"{_REF}:conv_gershgorin_bounds",
           note="explicit T and its Gram"),
    Kernel("conv_frame_penalty_multi", "cpu", "cpu", "regkernels._C_ops:conv_frame_penalty_multi",
           note="one C++ stats call for the L layers as L·groups groups"),
    Kernel("conv_frame_penalty_multi", "any", "torch", "regkernels.composite.conv:conv_frame_penalty_multi",
           note="L layers of one geometry as one conv with L·groups groups: one stats call"),
    Kernel("conv_frame_penalty_multi", "cuda", "triton", "regkernels.triton.conv_frame:conv_frame_penalty_multi",
           dtypes=HALF_AND_FLOAT, default=False, note="one fused stats call for the L layers; computed in float32"),
    Kernel("conv_frame_penalty_multi", "any", "reference", f"{_REF}:conv_frame_penalty_multi",
           note="explicit T and its Gram, one layer at a time"),
    Kernel("conv_orthogonality_penalty", "any", "torch", "regkernels.composite.conv:conv_orthogonality_penalty",
           note="side='rows': the kernel's DFT on the (2k − 1) grid: 1 + 3m real GEMMs per layer (Gauss), one "
                "table GEMM to the shifts; backward the same; side='cols': one tap-Gram GEMM, d table GEMMs to "
                "the phase rows"),
    Kernel("conv_orthogonality_penalty", "any", "reference", f"{_REF}:conv_orthogonality_penalty",
           note="side='rows': one conv of the kernel with itself; side='cols': one-hot pixels through the conv "
                "and its adjoint"),
    Kernel("conv_orthogonality_penalty_multi", "any", "torch",
           "regkernels.composite.conv:conv_orthogonality_penalty_multi",
           note="the layers stacked: batched DFT products (side='rows') or tap Grams (side='cols'), one call"),
    Kernel("conv_orthogonality_penalty_multi", "any", "reference", f"{_REF}:conv_orthogonality_penalty_multi",
           note="a loop over the reference"),
    Kernel("conv_singular_values", "cuda", "cuda", "regkernels._C_ops:conv_singular_values",
           note="Jacobi SVD of each frequency's real embedding"),
    Kernel("conv_singular_values", "cpu", "cpu", "regkernels._C_ops:conv_singular_values", default=False,
           note="Jacobi SVD of each frequency's real embedding; LAPACK's complex SVD is faster on CPU"),
    Kernel("conv_singular_values", "any", "reference", f"{_REF}:conv_singular_values", note="complex SVD"),
    Kernel("clip_conv_singular_values", "cuda", "cuda", "regkernels._C_ops:clip_conv_singular_values",
           note="Jacobi SVD of each frequency's real embedding"),
    Kernel("clip_conv_singular_values", "cpu", "cpu", "regkernels._C_ops:clip_conv_singular_values",
           default=False, note="Jacobi SVD of each frequency's real embedding; LAPACK's complex SVD is faster on CPU"),
    Kernel("clip_conv_singular_values", "any", "reference", f"{_REF}:clip_conv_singular_values",
           note="complex SVD"),
    Kernel("conv_spectral_norm", "any", "reference", f"{_REF}:conv_spectral_norm",
           note="power: F.conv / F.conv_transpose steps; bound: Gram iteration on the blocks of a "
                "circulant containing T"),
])

_WEIGHT_FORM = "(C_out, C_in/groups, *kernel) with 1, 2 or 3 spatial dims"


def _check_weight(op: str, weight) -> int:
    """A floating ``(C_out, C_in/groups, *k)`` weight; returns the number of spatial dims."""
    check_tensor(op, "weight", weight, ndim=(3, 4, 5), form=_WEIGHT_FORM)
    if any(k < 1 for k in weight.shape[2:]):
        raise ValueError(f"{op}: weight must have kernel sizes >= 1 {_WEIGHT_FORM}; got shape {tuple(weight.shape)}")
    return weight.dim() - 2


# the kernels index positions and taps with 32-bit ints (the raw ops refuse larger values too)
_INT_LIMIT = 2**31


def _check_input_size(op: str, input_size, d: int) -> tuple[int, ...]:
    form = (f"a sequence of {d} positive ints below 2^31 (the spatial size of one input, matching the "
            f"weight's {d} spatial dims)")
    if isinstance(input_size, torch.Tensor) or not isinstance(input_size, Sequence) \
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in input_size):
        raise TypeError(f"{op}: input_size must be {form}; got {input_size!r}")
    if len(input_size) != d or any(n < 1 or n >= _INT_LIMIT for n in input_size):
        raise ValueError(f"{op}: input_size must be {form}; got {tuple(input_size)}")
    return tuple(input_size)


def _check_ints(op: str, name: str, value, d: int, lo: int) -> tuple[int, ...]:
    """An int or a d-tuple of ints, each >= lo."""
    form = f"an int or a sequence of {d} ints, each >= {lo}"
    items = (value,) if isinstance(value, int) else value
    if isinstance(value, torch.Tensor) or not isinstance(items, Sequence) \
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{op}: {name} must be {form}; got {value!r}")
    if (not isinstance(value, int) and len(value) != d) or any(v < lo for v in items):
        raise ValueError(f"{op}: {name} must be {form}; got {value!r}")
    if any(v >= _INT_LIMIT for v in items):
        raise ValueError(f"{op}: {name} must be below 2^31 (the kernels index with 32-bit ints); got {value!r}")
    return tuple(items) * d if isinstance(value, int) else tuple(value)


def _check_kernel_geometry(op: str, weight, stride, padding, dilation, groups, padding_mode):
    """The geometry of T without its input size: ``(d, stride, padding, dilation)`` as tuples."""
    d = _check_weight(op, weight)
    s = _check_ints(op, "stride", stride, d, 1)
    p = _check_ints(op, "padding", padding, d, 0)
    dl = _check_ints(op, "dilation", dilation, d, 1)
    check_number(op, "groups", groups, lo=1, integer=True)
    if weight.shape[0] % groups:
        raise ValueError(f"{op}: groups must divide the output channels C_out = weight.shape[0] = "
                         f"{weight.shape[0]}; got groups={groups}")
    if padding_mode not in ("zeros", "circular"):
        raise ValueError(f"{op}: padding_mode must be 'zeros' or 'circular'; got {padding_mode!r}")
    return d, s, p, dl


def _check_geometry(op: str, weight, input_size, stride, padding, dilation, groups, padding_mode) -> None:
    """Everything that defines the operator T (docs/conv.md)."""
    d, s, p, dl = _check_kernel_geometry(op, weight, stride, padding, dilation, groups, padding_mode)
    size = _check_input_size(op, input_size, d)
    if padding_mode == "circular" and any(pi > n for pi, n in zip(p, size)):
        raise ValueError(f"{op}: padding must be <= input_size per dim for padding_mode='circular' (circular "
                         f"padding wraps at most once, as torch's); got padding={p}, input_size={size}")
    out = conv_output_size(size, weight.shape[2:], s, p, dl)
    if any(o < 1 for o in out):
        raise ValueError(f"{op}: the output size must be >= 1 per dim, i.e. input_size + 2·padding >= "
                         f"dilation·(kernel − 1) + 1; got output size {out} for input_size={size}, "
                         f"kernel={tuple(weight.shape[2:])}, padding={p}, dilation={dl}, stride={s}")


def _check_circular_fit(op: str, weight, input_size) -> None:
    d = _check_weight(op, weight)
    size = _check_input_size(op, input_size, d)
    if any(k > n for k, n in zip(weight.shape[2:], size)):
        raise ValueError(f"{op}: weight's kernel {tuple(weight.shape[2:])} must fit the circular input: need "
                         f"kernel size <= input_size per dim; got input_size={size}")


_TRANSPOSED_FORM = "(C_in, C_out/groups, *kernel) with 1, 2 or 3 spatial dims (an nn.ConvTranspose1d/2d/3d weight)"


def _check_transposed(op: str, weight, input_size, stride, padding, output_padding, dilation, groups, padding_mode,
                      transposed) -> tuple[int, ...] | None:
    """The ``transposed`` / ``output_padding`` keywords (docs/conv.md#transposed-convolutions).

    ``transposed=False``: ``output_padding`` must be 0; returns None (the caller checks the conv's
    geometry). ``transposed=True``: ``weight (C_in, C_out/groups, *k)`` is a ConvTranspose weight and
    ``input_size`` its input's spatial size; every argument is checked, and the result is the
    transposed conv's output size ``N``, the input size of the conv ``T`` (weight as a conv weight,
    same stride, padding, dilation, groups) whose adjoint the transposed conv is: its operator is
    ``Tᵀ``. Exact only for ``output_padding < stride`` per dim: a larger one (torch allows up to
    ``dilation − 1``) gives ``T`` output positions the transposed conv never reads, so it is refused.
    """
    if not isinstance(transposed, bool):
        raise TypeError(f"{op}: transposed must be True or False; got {transposed!r}")
    if not transposed:
        items = (output_padding,) if isinstance(output_padding, int) else output_padding
        if not isinstance(items, Sequence) or not all(isinstance(v, int) and not isinstance(v, bool) and v == 0
                                                      for v in items):
            raise ValueError(f"{op}: output_padding is for transposed=True (a ConvTranspose weight); a conv has "
                             f"none: leave it 0, or pass transposed=True; got output_padding={output_padding!r}")
        return None
    check_tensor(op, "weight", weight, ndim=(3, 4, 5), form=_TRANSPOSED_FORM)
    if any(k < 1 for k in weight.shape[2:]):
        raise ValueError(f"{op}: weight must have kernel sizes >= 1 {_TRANSPOSED_FORM}; got shape "
                         f"{tuple(weight.shape)}")
    d = weight.dim() - 2
    size = _check_input_size(op, input_size, d)
    s = _check_ints(op, "stride", stride, d, 1)
    p = _check_ints(op, "padding", padding, d, 0)
    dl = _check_ints(op, "dilation", dilation, d, 1)
    o = _check_ints(op, "output_padding", output_padding, d, 0)
    check_number(op, "groups", groups, lo=1, integer=True)
    if weight.shape[0] % groups:
        raise ValueError(f"{op}: groups must divide the input channels C_in = weight.shape[0] = {weight.shape[0]} "
                         f"of a transposed conv weight {_TRANSPOSED_FORM}; got groups={groups}")
    if padding_mode != "zeros":
        raise ValueError(f"{op}: transposed=True takes padding_mode='zeros' (the only one nn.ConvTranspose has); "
                         f"got {padding_mode!r}")
    if any(oi >= si for oi, si in zip(o, s)):
        raise ValueError(f"{op}: with transposed=True, output_padding must be < stride per dim (then the transposed "
                         f"conv is exactly the adjoint of the conv on its output size); got output_padding={o}, "
                         f"stride={s}: an output_padding >= stride (torch allows it below dilation) adds output "
                         f"positions no conv of this geometry reads, which these ops do not model")
    out = conv_transpose_output_size(size, weight.shape[2:], s, p, o, dl)
    if any(n < 1 for n in out):
        raise ValueError(f"{op}: the transposed conv's output size must be >= 1 per dim, i.e. "
                         f"(input_size − 1)·stride − 2·padding + dilation·(kernel − 1) + output_padding + 1 >= 1; got {out} for "
                         f"input_size={size}, kernel={tuple(weight.shape[2:])}, stride={s}, padding={p}, "
                         f"dilation={dl}, output_padding={o}")
    if any(n >= _INT_LIMIT for n in out):
        raise ValueError(f"{op}: the transposed conv's output size {out} must be below 2^31 per dim (the kernels "
                         f"index with 32-bit ints)")
    _check_geometry(op, weight, out, stride, padding, dilation, groups, padding_mode)
    return out


_SWAP = {"rows": "cols", "cols": "rows"}


def _transposed_side(weight, input_size, conv_size, groups: int, side: str) -> str:
    """The side of ``Gram(T, ·)`` equal to ``Gram(Tᵀ, side)``: ``Gram(Tᵀ, "rows") = Tᵀ T = Gram(T, "cols")``
    and vice versa; ``"auto"`` is resolved on ``Tᵀ``'s own shape first (for a square ``T`` the two
    Grams share eigenvalues but not Gershgorin discs). ``input_size`` is the transposed conv's,
    ``conv_size`` its output size (``T``'s input)."""
    if side == "auto":
        rows = weight.shape[1] * groups * math.prod(conv_size)   # Tᵀ: (C_out·∏N, C_in·∏n)
        cols = weight.shape[0] * math.prod(input_size)
        side = "cols" if rows >= cols else "rows"
    return _SWAP[side]


@accepts_sharded
def conv_to_matrix(weight: torch.Tensor, input_size: Sequence[int], stride: IntOrTuple = 1, padding: IntOrTuple = 0,
                   dilation: IntOrTuple = 1, groups: int = 1, padding_mode: str = "zeros", layout: str = "dense",
                   max_dense_bytes: int | None = None, *, transposed: bool = False, output_padding: IntOrTuple = 0,
                   backend: str | None = None) -> torch.Tensor:
    """The matrix ``T`` of a convolution on inputs of spatial size ``input_size`` (docs/conv.md).

    ``T @ x.reshape(-1) == conv(x[None], weight, None, stride, padding, dilation, groups).reshape(-1)``
    for ``x`` of shape ``(C_in, *input_size)``; ``padding_mode="circular"`` is circular
    padding then a conv with padding 0 (entries wrapping onto one input position add up).

    Args:
        weight: ``(C_out, C_in/groups, *k)``, 1–3 spatial dims, floating.
        input_size: ``(n_1, …, n_d)`` positive ints.
        layout: ``"dense"``, ``"coo"`` or ``"csr"`` (sparse: exactly the structural nonzeros).
        max_dense_bytes: size limit of the dense layout (default ``MAX_DENSE_BYTES`` = 2 GiB).
        transposed, output_padding: ``transposed=True`` takes an ``nn.ConvTranspose{d}d`` weight
            ``(C_in, C_out/groups, *k)`` with ITS input size, stride, padding, dilation, groups and
            ``output_padding`` (< stride), and returns the transposed conv's own matrix
            ``M = Tᵀ``: ``M @ x.reshape(-1) == conv_transpose(x[None], weight, None, stride, padding,
            output_padding, groups, dilation).reshape(-1)``, with ``T`` this op's matrix of ``weight``
            as a conv weight on the transposed conv's output size
            (docs/conv.md#transposed-convolutions). Dense: a transposed view of ``T``.

    Returns:
        ``(C_out·∏out_size, C_in·∏input_size)``, rows ``(o, y, x)`` and columns ``(c, u, v)``
        row-major; the weight's dtype; differentiable w.r.t. ``weight``.

    Raises:
        TypeError / ValueError: bad arguments (docs/design.md); ValueError for a dense result
        over ``max_dense_bytes``, or a sparse one whose entries and index plan exceed
        ``regkernels.reference.conv.MAX_WORK_BYTES`` (before allocating).

    Double backward: exact for the dense layout on every backend (``T`` is linear in the
    weight); the sparse layouts refuse ``create_graph=True`` with a RuntimeError (torch's
    sparse tensors have no double backward). The sparse index plans are cached per geometry in
    an LRU bounded by ``regkernels.composite.conv.PLAN_CACHE_BYTES`` (spatial structure only).

    Backends: ``"cpu"`` (C++) / ``"triton"`` build the dense layout, ``"torch"`` the sparse ones
    (the table op ``conv_to_matrix_sparse``); ``"reference"`` builds all three.
    """
    op = "conv_to_matrix"
    check_backend_keyword(op, backend)
    conv_size = _check_transposed(op, weight, input_size, stride, padding, output_padding, dilation, groups,
                                  padding_mode, transposed)
    if conv_size is None:
        _check_geometry(op, weight, input_size, stride, padding, dilation, groups, padding_mode)
    if layout not in ("dense", "coo", "csr"):
        raise ValueError(f"{op}: layout must be 'dense', 'coo' or 'csr'; got {layout!r}")
    if max_dense_bytes is not None:
        check_number(op, "max_dense_bytes", max_dense_bytes, lo=0, integer=True)
    # the sparse layouts are their own table op (module docstring)
    impl = TABLE.implementation(op if layout == "dense" else "conv_to_matrix_sparse", backend, weight.device,
                                weight.dtype, name=op if layout == "dense" else f"{op}(layout={layout!r})")
    if conv_size is None:
        return impl(weight, input_size, stride, padding, dilation, groups, padding_mode, layout, max_dense_bytes)
    # the transposed conv is the adjoint of the conv on its output size: M = Tᵀ
    T = impl(weight, conv_size, stride, padding, dilation, groups, padding_mode, layout, max_dense_bytes)
    if layout == "dense":
        return T.mT
    # a transposed COO is COO again (re-sorted); a transposed CSR is CSC, converted back
    return T.t().coalesce() if layout == "coo" else T.t().to_sparse_csr()


@accepts_sharded
def conv_frame_penalty(weight: torch.Tensor, input_size: Sequence[int], A: float, B: float,
                       stride: IntOrTuple = 1, padding: IntOrTuple = 0, dilation: IntOrTuple = 1, groups: int = 1,
                       padding_mode: str = "zeros", side: str = "auto", *, transposed: bool = False,
                       output_padding: IntOrTuple = 0, backend: str | None = None) -> torch.Tensor:
    """Frame penalty of the convolution operator ``T`` (docs/conv.md).

    ``= frame_penalty(conv_to_matrix(weight, input_size, …), A, B, side)``:
    ``V = Gram(T, side)``, ``d_i = V_ii``, ``r_i = Σ_{j≠i}|V_ij|``,
    ``R = (1/k)·Σ_i [max(0, A − (d_i − r_i))² + max(0, d_i + r_i − B)²]`` (docs/gram.md).

    Args:
        weight: ``(C_out, C_in/groups, *k)``; input_size: ``(n_1, …, n_d)``; ``0 ≤ A ≤ B``.
        side: ``"auto"``, ``"rows"`` (``T Tᵀ``) or ``"cols"`` (``Tᵀ T``).
        transposed, output_padding: ``transposed=True``: the penalty of a transposed conv's own
            operator ``M = conv_to_matrix(..., transposed=True)`` (an ``nn.ConvTranspose{d}d`` weight and
            its own input size, stride, padding, output_padding, dilation, groups), ``side`` taken on
            ``M``; exact (``Gram(M, side)`` is ``T``'s Gram on the other side,
            docs/conv.md#transposed-convolutions).

    Returns:
        0-dim tensor, the weight's dtype (float16/bfloat16 computed in float32); 0 for an
        empty Gram (k = 0).

    The implicit backends (``"torch"``, the default, and ``"triton"``) compute it exactly without
    ``T`` (memory independent of ``(C·∏n)²``: a 64-channel 3×3 layer on 32×32 inputs, whose ``T``
    has 4.3e9 entries, takes tens of milliseconds on a 2-core CPU); ``backend="reference"`` forms
    ``T`` and its Gram and raises ValueError over 2 GiB.

    A weight holding NaN/±inf gives NaN; finite weights whose Gram overflows give ``+inf`` (as the
    explicit path), with gradients NaN where they are undefined. The implicit backends refuse
    double backward (RuntimeError; ``backend="reference"`` supports it) and work over
    ``MAX_WORK_BYTES`` (ValueError, before allocating).
    """
    op = "conv_frame_penalty"
    check_backend_keyword(op, backend)
    conv_size = _check_transposed(op, weight, input_size, stride, padding, output_padding, dilation, groups,
                                  padding_mode, transposed)
    if conv_size is None:
        _check_geometry(op, weight, input_size, stride, padding, dilation, groups, padding_mode)
    check_bounds(op, "A", A, "B", B)
    check_side(op, side)
    impl = TABLE.implementation(op, backend, weight.device, weight.dtype)
    if conv_size is not None:
        side = _transposed_side(weight, input_size, conv_size, groups, side)
        input_size = conv_size
    return impl(weight, input_size, A, B, stride, padding, dilation, groups, padding_mode, side)


@accepts_sharded
def conv_frame_penalty_multi(weights: Sequence[torch.Tensor], input_size: Sequence[int], A: float, B: float,
                             stride: IntOrTuple = 1, padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                             groups: int = 1, padding_mode: str = "zeros", side: str = "auto", *,
                             transposed: bool = False, output_padding: IntOrTuple = 0,
                             backend: str | None = None) -> torch.Tensor:
    """``conv_frame_penalty`` of several layers of ONE geometry in one call
    (docs/conv.md#conv_frame_penalty_multi).

    ``weights``: a non-empty list of ``(C_out, C_in/groups, *k)`` tensors of one shape, dtype and
    device, all acting on inputs of ``input_size`` with the same stride, padding, dilation, groups,
    padding mode and side. Returns ``(L,)`` in the weights' dtype, entry ``l`` equal to
    ``conv_frame_penalty(weights[l], input_size, A, B, …)`` (to floating-point summation order).

    The implicit backends stack the layers as one conv with ``L·groups`` groups (the statistics are
    per group) and make one stats call for all of them; each layer is range-scaled on its own, so a
    layer holding NaN/inf gives NaN in its entry only, and the others' values and gradients are
    those of their single-layer calls. The tap Gram of all ``L`` layers is held at once (``L`` times
    one layer's) and the ``MAX_WORK_BYTES`` limit applies to the whole call. Double backward as
    ``conv_frame_penalty``. ``transposed=True`` / ``output_padding``: ConvTranspose weights of one
    geometry, as ``conv_frame_penalty``'s.
    """
    op = "conv_frame_penalty_multi"
    check_backend_keyword(op, backend)
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"{op}: weights must be a list or tuple of weight tensors {_WEIGHT_FORM}, one shape, dtype "
                        f"and device; got {type(weights).__name__}")
    if not weights:
        raise ValueError(f"{op}: weights must hold at least one weight tensor; got an empty {type(weights).__name__}")
    for i, w in enumerate(weights):
        check_tensor(op, f"weights[{i}]", w, ndim=(3, 4, 5), form=_WEIGHT_FORM)
    first = weights[0]
    for i, w in enumerate(weights):
        if w.shape != first.shape:
            raise ValueError(f"{op}: weights must all have one shape (they run as one grouped conv); weights[0] has "
                             f"{tuple(first.shape)}, weights[{i}] has {tuple(w.shape)}: call it once per shape, or "
                             f"conv_frame_penalty per layer")
        if w.dtype != first.dtype:
            raise TypeError(f"{op}: weights must all have one dtype; weights[0] is {first.dtype}, weights[{i}] is "
                            f"{w.dtype}: cast them to one dtype, or call it once per dtype")
        if w.device != first.device:
            raise ValueError(f"{op}: weights must all be on one device; weights[0] is on {first.device}, weights[{i}] "
                             f"on {w.device}: move them to one device, or call it once per device")
    conv_size = _check_transposed(op, first, input_size, stride, padding, output_padding, dilation, groups,
                                  padding_mode, transposed)
    if conv_size is None:
        _check_geometry(op, first, input_size, stride, padding, dilation, groups, padding_mode)
    check_bounds(op, "A", A, "B", B)
    check_side(op, side)
    impl = TABLE.implementation(op, backend, first.device, first.dtype)
    if conv_size is not None:
        side = _transposed_side(first, input_size, conv_size, groups, side)
        input_size = conv_size
    return impl(list(weights), input_size, A, B, stride, padding, dilation, groups, padding_mode, side)


@accepts_sharded
def conv_gershgorin_bounds(weight: torch.Tensor, input_size: Sequence[int], stride: IntOrTuple = 1,
                           padding: IntOrTuple = 0, dilation: IntOrTuple = 1, groups: int = 1,
                           padding_mode: str = "zeros", side: str = "auto", *, transposed: bool = False,
                           output_padding: IntOrTuple = 0,
                           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gershgorin bounds ``(min_i(d_i − r_i), max_i(d_i + r_i))`` of ``Gram(T, side)``
    (docs/gram.md's companion, on the operator of docs/conv.md): two 0-dim tensors enclosing
    every eigenvalue of the Gram matrix; ``(+inf, −inf)`` for an empty Gram. ``transposed=True`` /
    ``output_padding``: the bounds of ``Gram(M, side)`` for a transposed conv's operator ``M``, as
    ``conv_frame_penalty``'s (docs/conv.md#transposed-convolutions)."""
    op = "conv_gershgorin_bounds"
    check_backend_keyword(op, backend)
    conv_size = _check_transposed(op, weight, input_size, stride, padding, output_padding, dilation, groups,
                                  padding_mode, transposed)
    if conv_size is None:
        _check_geometry(op, weight, input_size, stride, padding, dilation, groups, padding_mode)
    check_side(op, side)
    impl = TABLE.implementation(op, backend, weight.device, weight.dtype)
    if conv_size is not None:
        side = _transposed_side(weight, input_size, conv_size, groups, side)
        input_size = conv_size
    return impl(weight, input_size, stride, padding, dilation, groups, padding_mode, side)


OCNN_SIDES = ("rows", "cols")


def check_ocnn_side(op: str, side, padding) -> str:
    """``side`` of the OCNN ops: ``"rows"`` (output side, ``T Tᵀ``) or ``"cols"`` (input side,
    ``Tᵀ T``); ``padding`` picks output-side shifts, so ``"cols"`` refuses one."""
    if not isinstance(side, str) or side not in OCNN_SIDES:
        raise ValueError(f"{op}: side must be 'rows' (output side: the kernel convolved with itself, T Tᵀ) or "
                         f"'cols' (input side: the rows of Tᵀ T); got {side!r}")
    if side == "cols" and padding is not None:
        raise ValueError(f"{op}: padding selects the output side's shifts (side='rows'); side='cols' takes every "
                         f"row of Tᵀ T in full and has no padding: pass padding=None; got padding={padding!r}")
    return side


@accepts_sharded
def conv_orthogonality_penalty(weight: torch.Tensor, stride: IntOrTuple = 1, padding: IntOrTuple | None = None,
                               side: str = "rows", *, backend: str | None = None) -> torch.Tensor:
    """OCNN orthogonality penalty of a conv kernel (docs/conv.md#conv_orthogonality_penalty).

    ``side="rows"`` (output side, the default): ``P = ⌊(k−1)/S⌋·S`` unless given;
    ``O = conv(K, K, stride=S, padding=P)`` ``(o, o, *s)``; target ``I_o`` at the spatial centre
    ``⌊s/2⌋``; ``R = ‖O − target‖_F²``.

    ``side="cols"`` (input side, docs/conv.md#input-side): for ``T`` the stride-``S``
    conv, ``R = Σ_r ‖V_r − target‖_F²`` over the ``∏S`` phases ``r`` of the input grid, ``V_r`` the
    rows of ``TᵀT`` at an input pixel of phase ``r`` (``(c, c, *(2k − 1))``, every shift), target
    ``I_c`` at shift 0. Stride 1: ``R`` is the official ``conv_orth_dist`` squared.

    Args:
        weight: ``(o, c, *k)``, 1–3 spatial dims; stride: int or d-tuple >= 1;
            padding: None, or int / d-tuple >= 0 (``side="rows"`` only; ``padding=1`` reproduces
            the official ``deconv_orth_dist``); side: ``"rows"`` or ``"cols"``.

    Returns:
        0-dim tensor in the weight's dtype (float16/bfloat16 computed in float32). Output side: no
        filters give 0, no input channels ``o`` (``O = 0``). Input side: no input channels give 0,
        no filters ``c·∏S``. Work over ``MAX_WORK_BYTES`` (output side: ``O`` plus the padded kernel
        or the DFT products; input side: the tap Gram and its phase rows) raises ValueError before
        allocating.
    """
    op = "conv_orthogonality_penalty"
    check_backend_keyword(op, backend)
    d = _check_weight(op, weight)
    _check_ints(op, "stride", stride, d, 1)
    if padding is not None:
        _check_ints(op, "padding", padding, d, 0)
    check_ocnn_side(op, side, padding)
    impl = TABLE.implementation(op, backend, weight.device, weight.dtype)
    return impl(weight, stride, padding, side)


@accepts_sharded
def conv_orthogonality_penalty_multi(weights: Sequence[torch.Tensor], stride: IntOrTuple = 1,
                                     padding: IntOrTuple | None = None, side: str = "rows", *,
                                     backend: str | None = None) -> torch.Tensor:
    """OCNN penalties of several weights of one shape, dtype and device in one call
    (docs/conv.md#conv_orthogonality_penalty_multi).

    Entry ``i`` equals ``conv_orthogonality_penalty(weights[i], stride, padding, side)``; ``"torch"``
    (the default) stacks the weights and evaluates every layer with batched GEMMs (``side="rows"``:
    the DFT products; ``side="cols"``: the tap Grams), ``"reference"`` loops.

    Args:
        weights: a non-empty list or tuple of ``(o, c, *k)`` tensors (1–3 spatial dims) of equal
            shape, dtype and device; stride, padding, side: as ``conv_orthogonality_penalty``, shared.

    Returns:
        ``(len(weights),)`` in the weights' dtype (float16/bfloat16 computed in float32). A weight
        holding NaN/inf gives NaN in its own entry only. Work over ``MAX_WORK_BYTES`` (the DFT
        products and ``O``, or the tap Grams and phase rows, of all the layers) raises ValueError
        before allocating: split the list.
    """
    op = "conv_orthogonality_penalty_multi"
    check_backend_keyword(op, backend)
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"{op}: weights must be a list or tuple of weight tensors {_WEIGHT_FORM}; got "
                        f"{type(weights).__name__} (a stacked tensor: pass list(stack))")
    if not weights:
        raise ValueError(f"{op}: weights must hold at least one weight tensor; got an empty {type(weights).__name__}")
    for i, w in enumerate(weights):
        check_tensor(op, f"weights[{i}]", w, ndim=(3, 4, 5), form=_WEIGHT_FORM)
    if any(k < 1 for k in weights[0].shape[2:]):
        raise ValueError(f"{op}: weights[0] must have kernel sizes >= 1 {_WEIGHT_FORM}; got shape "
                         f"{tuple(weights[0].shape)}")
    first = weights[0]
    _check_alike(op, "weights", weights, "all weights must", " or conv_orthogonality_penalty per weight")
    d = first.dim() - 2
    _check_ints(op, "stride", stride, d, 1)
    if padding is not None:
        _check_ints(op, "padding", padding, d, 0)
    check_ocnn_side(op, side, padding)
    impl = TABLE.implementation(op, backend, first.device, first.dtype)
    return impl(list(weights), stride, padding, side)


# the Sedghi rows' backends: their functions take strict=True when named (regkernels._C_ops, svd section)
_SEDGHI_KERNELS = ("cpu", "cuda")


@accepts_sharded
def conv_singular_values(weight: torch.Tensor, input_size: Sequence[int], *,
                         backend: str | None = None) -> torch.Tensor:
    """Singular values of the circular stride-1 convolution on ``input_size`` (docs/conv.md).

    ``F = fftn(weight, s=input_size)`` over the spatial dims → one ``C_out × C_in``
    matrix per frequency → its singular values.

    Args:
        weight: ``(C_out, C_in, *k)`` with ``k_i ≤ n_i``; input_size: ``(n_1, …, n_d)``.

    Returns:
        ``(∏input_size, min(C_out, C_in))``, row f = frequency f (row-major fftn order),
        descending within a row; real, the weight's dtype. A weight holding NaN/inf gives NaN
        (values and gradient) on every backend. The kernel backends refuse double backward
        (RuntimeError; ``backend="reference"`` supports it); work over ``MAX_WORK_BYTES`` raises
        ValueError before allocating.

    Backends: ``"cuda"`` (the default on CUDA) and ``"cpu"`` (named only) run each frequency's
    ``2·C_out × 2·C_in`` real embedding on the batched Jacobi SVD kernel; named, they raise
    ValueError for a weight larger than the kernel takes, while ``backend=None`` runs such a
    weight on the reference's complex SVD.
    """
    op = "conv_singular_values"
    check_backend_keyword(op, backend)
    _check_circular_fit(op, weight, input_size)
    impl = TABLE.implementation(op, backend, weight.device, weight.dtype)
    if backend in _SEDGHI_KERNELS:  # named: a weight the SVD kernel cannot take raises, no silent fallback
        return impl(weight, input_size, strict=True)
    return impl(weight, input_size)


@accepts_sharded
def clip_conv_singular_values(weight: torch.Tensor, input_size: Sequence[int], lo: float, hi: float, *,
                              backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp the circular operator's singular values into ``[lo, hi]`` (docs/conv.md).

    Per frequency ``U diag(clamp(σ, lo, hi)) Vᴴ``, inverse FFT, real part, truncated to the
    kernel's support — an APPROXIMATE projection because of the truncation (exact when
    the kernel has the input's size).

    Returns:
        ``(new_weight, singular_values)``: the weight's shape and dtype, and the
        ``(∏input_size, min(C_out, C_in))`` singular values of ``new_weight``; NaN for a weight
        holding NaN/inf. Double backward and size limits as ``conv_singular_values``.
    """
    op = "clip_conv_singular_values"
    check_backend_keyword(op, backend)
    _check_circular_fit(op, weight, input_size)
    check_bounds(op, "lo", lo, "hi", hi)
    impl = TABLE.implementation(op, backend, weight.device, weight.dtype)
    if backend in _SEDGHI_KERNELS:
        return impl(weight, input_size, lo, hi, strict=True)
    return impl(weight, input_size, lo, hi)


def _check_alike(op: str, name: str, weights: Sequence[torch.Tensor], subject: str, alternative: str = "") -> None:
    """The weights of a multi-layer call share one shape, dtype and device; a ValueError names the
    first that differs and what does."""
    first = weights[0]
    for i, w in enumerate(weights[1:], 1):
        for what, a, b in (("shape", tuple(w.shape), tuple(first.shape)), ("dtype", w.dtype, first.dtype),
                           ("device", w.device, first.device)):
            if a != b:
                raise ValueError(f"{op}: {subject} have one shape, dtype and device; got {name}[0] with {what} {b}, "
                                 f"{name}[{i}] with {what} {a} (call it once per {what}{',' if alternative else ''}"
                                 f"{alternative})")


_METHODS = ("power", "bound")


def _check_kernel_only(op: str, weight, stride, padding, dilation, groups, padding_mode, method, grid) -> None:
    """``conv_spectral_norm(input_size=None)``: the geometry without an input size, the method, the
    grid (docs/conv.md#a-bound-for-every-input-size)."""
    d, s, p, dl = _check_kernel_geometry(op, weight, stride, padding, dilation, groups, padding_mode)
    if isinstance(method, str) and method == "power":
        raise ValueError(f"{op}: input_size=None (a bound for every input size) needs method='bound'; "
                         f"method='power' iterates on the operator of one input size: pass input_size")
    kernel = tuple(weight.shape[2:])
    if padding_mode == "circular" and any(2 * pi > di * (k - 1) for pi, di, k in zip(p, dl, kernel)):
        raise ValueError(f"{op}: input_size=None with padding_mode='circular' needs 2·padding <= "
                         f"dilation·(kernel − 1) per dim (then no output row repeats, for any input size); got "
                         f"padding={p}, dilation={dl}, kernel={kernel}: pass input_size (the bound for one size "
                         f"counts the repeated rows)")
    if grid is not None:
        grid = _check_ints(op, "grid", grid, d, 1)
        axes = kernel_bound_axes(kernel, s, dl, padding_mode)
        excess = kernel_grid_excess(axes, grid)
        if excess ** 2 >= 2:
            raise ValueError(f"{op}: grid {grid} is too coarse for kernel {kernel} (stride {s}, dilation {dl}, "
                             f"padding_mode={padding_mode!r}): the grid factor needs S = Σ_j A_j/2·π/M_j < √2, got "
                             f"S = {excess:.4g}; the default grid is {kernel_bound_grid(axes)} (grid=None)")


@accepts_sharded
def conv_spectral_norm(weight: torch.Tensor | Sequence[torch.Tensor], input_size: Sequence[int] | None,
                       stride: IntOrTuple = 1, padding: IntOrTuple = 0, dilation: IntOrTuple = 1, groups: int = 1,
                       padding_mode: str = "zeros", *, method: str = "power", n_iter: int | None = None,
                       tol: float | None = None, generator: torch.Generator | None = None,
                       grid: IntOrTuple | None = None, backend: str | None = None) -> ConvSpectralNorm:
    """σ_max of the convolution operator ``T`` (``conv_to_matrix``'s matrix) (docs/conv.md#conv_spectral_norm).

    Args:
        weight: ``(C_out, C_in/groups, *k)``, or a non-empty list / tuple of ``L`` such tensors of
            one shape, dtype and device (one geometry for all), evaluated together.
        input_size, stride, padding, dilation, groups, padding_mode: the geometry, as
            ``conv_frame_penalty``'s. ``input_size=None`` (``method="bound"`` only): a bound that
            holds for EVERY input size and zero padding (and circular padding with
            ``2·padding <= dilation·(kernel − 1)``): the supremum of the layer's frequency response
            (the strided one for zero padding; independent of the padding), certified from a
            frequency grid (docs/conv.md#a-bound-for-every-input-size).
        method: ``"power"`` (an estimate by power iteration on ``TᵀT``, through the conv and its
            transpose; a lower bound of σ_max in exact arithmetic) or ``"bound"`` (a certified upper
            bound: Gram iteration on the per-frequency blocks of a periodic conv that contains
            ``T``; every padding mode, stride, dilation and groups).
        n_iter: the most steps (power: 100, bound: 6 by default); an int >= 1.
        tol: stop at the first step whose ``rel_tol`` is below it for every layer (power: 1e-6,
            bound: 0, i.e. run all ``n_iter``, by default); a real >= 0. Under torch.compile and
            torch.func every step runs (the test would read a value on the host).
        generator: the power method's start vector is drawn from it (on the weight's device); the
            bound draws nothing.
        grid: ``input_size=None`` only: the frequencies per axis ``M_j`` (an int or a d-tuple >= 1;
            default ``8·d·A_j`` with ``A_j = k_j − 1``, or ``⌊dilation·(k_j − 1)/stride⌋`` on a
            zero-padded strided axis, and 1 where ``A_j = 0``: a grid factor of 1/(1 − π²/512) ≈ 1.0197).

    Returns:
        ``ConvSpectralNorm(sigma, rel_tol)``, 0-dim each for one weight, ``(L,)`` for a list; the
        weight's dtype (float16 / bfloat16 computed in float32). ``rel_tol``: power — the relative
        gain of the estimate over the second half of its steps, ``(μ_k − μ_{⌊k/2⌋})/μ_k`` (``inf``
        after one step; a heuristic, not a bound on the error: a near-double top singular value
        can hold the estimate on a plateau); bound — the certified slack, further Gram steps can
        lower ``sigma`` by at most this fraction (``input_size=None``: ``sup_ω ‖K̂(ω)‖₂``, the best
        bound that holds for every input size, is at least ``sigma·(1 − rel_tol)``). ``sigma_power ≤ σ_max(T) ≤ sigma_bound`` is a
        certified bracket (in exact arithmetic). ``sigma`` is differentiable (autograd through
        every step); ``rel_tol`` is not. A layer holding NaN/±inf gives NaN in its entries; an
        empty layer gives 0.

    Raises:
        TypeError / ValueError: bad arguments (each message names the op and the argument);
        ValueError for work over ``MAX_WORK_BYTES`` (the power iterates kept for the backward, or
        the bound's frequency blocks), before allocating.
    """
    op = "conv_spectral_norm"
    check_backend_keyword(op, backend)
    if isinstance(weight, (list, tuple)):
        if not weight:
            raise ValueError(f"{op}: weight must be a tensor {_WEIGHT_FORM} or a non-empty list of them; got an "
                             f"empty {type(weight).__name__}")
        for i, w in enumerate(weight):
            check_tensor(op, f"weight[{i}]", w, ndim=(3, 4, 5), form=_WEIGHT_FORM)
        first = weight[0]
        _check_alike(op, "weight", weight, "the weights of a list must")
    elif isinstance(weight, torch.Tensor):
        first = weight
    else:
        raise TypeError(f"{op}: weight must be a torch.Tensor {_WEIGHT_FORM} or a list / tuple of them; got "
                        f"{type(weight).__name__}")
    if input_size is None:
        _check_kernel_only(op, first, stride, padding, dilation, groups, padding_mode, method, grid)
    else:
        _check_geometry(op, first, input_size, stride, padding, dilation, groups, padding_mode)
        if grid is not None:
            raise ValueError(f"{op}: grid is for input_size=None (the bound for every input size) only; with "
                             f"input_size={tuple(input_size)} the bound uses that size's own periodic grid: "
                             f"drop grid")
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"{op}: method must be 'power' or 'bound'; got {method!r}")
    if n_iter is not None:
        check_number(op, "n_iter", n_iter, lo=1, integer=True)
    if tol is not None:
        check_number(op, "tol", tol, lo=0)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{op}: generator must be a torch.Generator or None; got {type(generator).__name__}")
        if generator.device.type != first.device.type:
            raise ValueError(f"{op}: generator must be on the weight's device ({first.device.type}); got a "
                             f"{generator.device.type} generator")
    impl = TABLE.implementation(op, backend, first.device, first.dtype)
    if input_size is None:
        grid = None if grid is None else _check_ints(op, "grid", grid, first.dim() - 2, 1)
        return impl(weight if isinstance(weight, torch.Tensor) else list(weight), None, stride, padding, dilation,
                    groups, padding_mode, method, n_iter, tol, generator, grid=grid)
    return impl(weight if isinstance(weight, torch.Tensor) else list(weight), tuple(input_size), stride, padding,
                dilation, groups, padding_mode, method, n_iter, tol, generator)
