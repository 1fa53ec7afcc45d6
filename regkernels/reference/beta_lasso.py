"""β-LASSO update, the pure-torch reference (formula: docs/beta_lasso.md#update-rule; seed: "Towards Learning
Convolutions from Scratch", Neyshabur 2020).

Per parameter θ with gradient g::

    d   = g, or −g with maximize
    d   = d + weight_decay·θ                                    (if weight_decay)
    buf = d (first step) | momentum·buf + (1 − dampening)·d      (if momentum)
    d   = d + momentum·buf (nesterov) | buf (momentum) | d
    θ   = θ − lr·(d + lam·sign(θ))        # sign of θ before this step, sign(0) = 0
    θ   = θ · [|θ| ≥ beta·lam]

Written one rounding per torch op, in the order the fused kernels (csrc/core/beta_lasso.h)
evaluate it, so that the float32 kernels agree with it bit for bit. float16/bfloat16 are
updated in float32 math and rounded once on store; the momentum buffer has the parameter's
dtype (as torch.optim.SGD).
"""
from __future__ import annotations

import torch

__all__ = ["beta_lasso_update_"]


@torch.no_grad()
def beta_lasso_update_(param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, *,
                       lr: float | torch.Tensor, lam: float, beta: float, momentum: float = 0.0,
                       dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                       maximize: bool = False) -> torch.Tensor | None:
    """Update ``param`` in place with one β-LASSO step; return the momentum buffer.

    ``buf`` is the momentum buffer (same shape and dtype as ``param``), ``None`` on the first
    step, when a new buffer holding ``d`` is created and returned. Without momentum the
    return value is ``None``. Python-float hyper-parameters are rounded to the math dtype by
    torch, as the kernels round them; so is a 0-dim Tensor ``lr`` (used as a tensor: no host
    read), the same value.
    """
    math = torch.float64 if param.dtype == torch.float64 else torch.float32
    theta = param.to(math)
    d = grad.to(math)
    if maximize:
        d = -d  # exact: the kernels take the negated gradient
    if weight_decay != 0:
        d = d + theta * weight_decay
    if momentum != 0:
        if buf is None:
            b = d.clone()
            buf = b.to(param.dtype)
        else:
            b = buf.to(math) * momentum + d * (1.0 - dampening)
            buf.copy_(b)
        # the unrounded float32 buffer value is used in this step; the stored copy is rounded
        d = d + b * momentum if nesterov else b
    step = d + torch.sign(theta) * lam
    theta = theta - step * lr
    # "below the threshold → 0" rather than "keep where ≥": a NaN stays visible
    theta = torch.where(theta.abs() < beta * lam, 0.0, theta)
    param.copy_(theta)
    return buf
