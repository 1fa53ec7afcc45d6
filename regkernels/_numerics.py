"""Numerical helpers shared by the references and the kernels' torch glue: an exact power-of-two
scale that keeps sums of squares from overflowing, and an identity whose backward refuses a
second derivative with a message the caller chooses."""
from __future__ import annotations

import torch


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
