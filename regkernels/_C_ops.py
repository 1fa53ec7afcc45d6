"""The Python side of the C++ ops (``torch.ops.regkernels.*``, schemas in csrc/regkernels.cpp).

For every C++ op: its fake (``register_fake``, for torch.compile and opcheck) and its autograd,
and the functions the families' backend tables name for the ``"cpu"`` and ``"cuda"`` backends
(they adapt the public arguments to the op's schema). Imported by ``regkernels._ext`` once the
extension has loaded; never imported when it has not. One section per op family.
"""
from __future__ import annotations

import torch


# ============================================================================ gram family
# (fakes, autograd and table entries of gram_penalty_fwd / gram_penalty_bwd)

# ============================================================================ end of gram family


# ============================================================================ conv family
# conv_to_matrix_dense / conv_to_matrix_dense_backward (csrc/cpu/conv_matrix_cpu.cpp): fakes, autograd,
# and the "cpu" row of conv_to_matrix (docs/conv.md).

from regkernels import _geometry as _conv_geometry  # noqa: E402
from regkernels.reference import conv as _conv_reference  # noqa: E402


@torch.library.register_fake("regkernels::conv_to_matrix_dense")
def _conv_to_matrix_dense_fake(weight, input_size, stride, padding, dilation, groups, circular):
    rows, cols = _conv_geometry.check_dense_args("regkernels::conv_to_matrix_dense", weight, input_size, stride,
                                                 padding, dilation, groups, circular)
    return weight.new_empty((rows, cols))


@torch.library.register_fake("regkernels::conv_to_matrix_dense_backward")
def _conv_to_matrix_dense_backward_fake(grad, weight, input_size, stride, padding, dilation, groups, circular):
    op = "regkernels::conv_to_matrix_dense_backward"
    shape = _conv_geometry.check_dense_args(op, weight, input_size, stride, padding, dilation, groups, circular)
    _conv_geometry.check_dense_grad(op, grad, weight, shape)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _conv_to_matrix_dense_setup(ctx, inputs, output) -> None:
    weight, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(weight)


def _conv_to_matrix_dense_grad(ctx, grad):
    (weight,) = ctx.saved_tensors
    return (torch.ops.regkernels.conv_to_matrix_dense_backward(grad, weight, *ctx.geometry),) + (None,) * 6


def _conv_to_matrix_dense_backward_setup(ctx, inputs, output) -> None:
    _grad, weight, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(weight)


def _conv_to_matrix_dense_backward_grad(ctx, grad_gw):
    # T is linear in the weight, so the backward gW = Bᵀ(grad) is linear in grad (B = the forward's
    # map) and does not depend on the weight's values: its derivative w.r.t. grad is the forward op
    # applied to the incoming ∂L/∂gW, and w.r.t. the weight 0. Double backward is exact, and the
    # chain closes: the forward op's own backward is again this backward op.
    (weight,) = ctx.saved_tensors
    return (torch.ops.regkernels.conv_to_matrix_dense(grad_gw.to(weight.dtype), *ctx.geometry), None) + (None,) * 6


# the raw ops stay differentiable (torch.ops.regkernels.*, opcheck); conv_to_matrix goes through
# _ConvToMatrixDense below, which torch.func can transform
torch.library.register_autograd("regkernels::conv_to_matrix_dense", _conv_to_matrix_dense_grad,
                                setup_context=_conv_to_matrix_dense_setup)
torch.library.register_autograd("regkernels::conv_to_matrix_dense_backward", _conv_to_matrix_dense_backward_grad,
                                setup_context=_conv_to_matrix_dense_backward_setup)


class _ConvToMatrixDense(torch.autograd.Function):
    """``regkernels::conv_to_matrix_dense`` for ``conv_to_matrix``. The op's ``register_autograd``
    does not run under ``torch.func.grad``; an autograd.Function with ``setup_context`` does (its
    forward calls the op below the transform), and its vmap rule runs the op once per layer.
    ``conv_to_matrix`` takes it under torch.func and torch.compile, the raw op (same backward)
    otherwise (``regkernels._geometry.through_function``)."""

    @staticmethod
    def forward(weight, input_size, stride, padding, dilation, groups, circular):
        return torch.ops.regkernels.conv_to_matrix_dense(weight, input_size, stride, padding, dilation, groups,
                                                         circular)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _conv_to_matrix_dense_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return (_ConvToMatrixDenseBackward.apply(grad, weight, *ctx.geometry),) + (None,) * 6

    @staticmethod
    def vmap(info, in_dims, *args):
        return _conv_geometry.vmap_by_loop(_ConvToMatrixDense.apply, info, in_dims, *args)


class _ConvToMatrixDenseBackward(torch.autograd.Function):
    """``regkernels::conv_to_matrix_dense_backward``; its derivative w.r.t. ``grad`` is the forward
    (``_conv_to_matrix_dense_backward_grad``), so double backward stays exact."""

    @staticmethod
    def forward(grad, weight, input_size, stride, padding, dilation, groups, circular):
        return torch.ops.regkernels.conv_to_matrix_dense_backward(grad, weight, input_size, stride, padding,
                                                                  dilation, groups, circular)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _conv_to_matrix_dense_backward_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_gw):
        (weight,) = ctx.saved_tensors
        return (_ConvToMatrixDense.apply(grad_gw.to(weight.dtype), *ctx.geometry), None) + (None,) * 6

    @staticmethod
    def vmap(info, in_dims, *args):
        return _conv_geometry.vmap_by_loop(_ConvToMatrixDenseBackward.apply, info, in_dims, *args)


def conv_to_matrix(weight: torch.Tensor, input_size, stride=1, padding=0, dilation=1, groups: int = 1,
                   padding_mode: str = "zeros", layout: str = "dense",
                   max_dense_bytes: int | None = None) -> torch.Tensor:
    """Dense ``T`` by the C++ kernel (one pass per row; its backward is a gather, one owner per
    weight entry), arguments as the reference's; the sparse layouts are backend ``"torch"``."""
    if layout != "dense":
        raise ValueError(f"conv_to_matrix: backend 'cpu' builds layout='dense' only; got layout={layout!r} "
                         f"(the sparse layouts: backends 'torch', 'reference')")
    shape = _conv_geometry.matrix_shape(weight, input_size, stride, padding, dilation, groups)
    _conv_reference._check_dense_matrix(weight, shape, max_dense_bytes)
    w5, *geometry = _conv_geometry.normalise(weight, input_size, stride, padding, dilation)
    if _conv_geometry.through_function():
        return _ConvToMatrixDense.apply(w5, *geometry, groups, padding_mode == "circular")
    return torch.ops.regkernels.conv_to_matrix_dense(w5, *geometry, groups, padding_mode == "circular")

# ============================================================================ end of conv family


# ============================================================================ svd family
# (fakes, autograd and table entries of batched_svd; the Sedghi conv singular values)

# ============================================================================ end of svd family


# ============================================================================ beta_lasso family
# (fake and table entry of beta_lasso_step_)

# ============================================================================ end of beta_lasso family
