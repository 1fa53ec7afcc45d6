"""Numerical helpers shared by the references and the kernels' torch glue: an exact power-of-two
scale that keeps sums of squares from overflowing, an identity whose backward refuses a second
derivative with a message the caller chooses, and the torch.func queries that pick between an
op's raw autograd and its ``torch.autograd.Function``."""
from __future__ import annotations

import torch


def functorch_wrapped(*tensors: torch.Tensor) -> bool:
    """Whether any of ``tensors`` is wrapped by a torch.func transform (grad, vjp, vmap).

    Kernel entries send such inputs through a ``torch.autograd.Function`` with ``setup_context``
    (which torch.func can transform) and plain tensors through the fast path (the op's own
    autograd): ``apply`` with ``setup_context`` binds its arguments with ``inspect.signature`` on
    every call, 40-120 µs on the 2-core CPU, as much as a small layer's kernel, per layer per
    step. Never true while dynamo traces: it cannot trace the query and never wraps tensors.
    """
    if torch.compiler.is_compiling():
        return False
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def through_function() -> bool:
    """Whether a call must take the op's ``torch.autograd.Function`` rather than the raw custom op:
    under a torch.func transform (a custom op's ``register_autograd`` does not run under
    ``torch.func.grad``) and while torch.compile traces (one traced path). Eager calls on plain
    tensors take the raw op, whose registered autograd is the same backward (host time: see
    ``functorch_wrapped``)."""
    return torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling()


def pow2_scale(big: torch.Tensor) -> torch.Tensor:
    """Elementwise, a power of two ``s`` with ``big/s ∈ [1, 2)`` for ``big = max|x| > 0``; 1 where
    ``big`` is 0 or non-finite.

    Dividing by ``s`` is exact, so quantities quadratic (or homogeneous) in ``x`` can be formed
    from ``x/s`` and scaled back without changing finite results, while products of ``x/s`` stay
    near 1 instead of overflowing. A NaN / Inf ``x`` keeps ``s = 1`` and reaches the result.
    """
    _, e = torch.frexp(big)  # big = f·2^e, f ∈ [0.5, 1)
    one = torch.ones_like(big)
    return torch.where(torch.isfinite(big) & (big > 0), torch.ldexp(one, e - 1), one)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose backward raises ``RuntimeError(message)`` under ``create_graph=True`` (grad
    mode is on in a backward exactly then), for results whose second derivative would otherwise
    be silently 0 or NaN."""

    @staticmethod
    def forward(x: torch.Tensor, message: str) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(ctx.message)
        return grad, None


def first_order_only(x: torch.Tensor, message: str) -> torch.Tensor:
    """``x``, differentiable once: differentiating its gradient again raises ``message``."""
    return _FirstOrderOnly.apply(x, message) if x.requires_grad else x
