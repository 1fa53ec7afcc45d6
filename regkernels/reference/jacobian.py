"""Pure-torch reference of the Jacobian penalty (docs/jacobian.md#jacobian_penalty, Hoffman, Roberts & Yaida 2019,
"Robust Learning with Jacobian Regularization", as used by RegDNNs).

Provenance of the choices below: the authors' ``JacobianReg`` draws one random unit
vector *per sample* (a ``(B, C)`` tensor whose rows are normalised), takes one
vector-Jacobian product for the whole batch and returns ``½ · C/(n·B) · Σ_p ‖Jᵀv_p‖²``.
This reference keeps the per-sample vectors and drops the ½, so it estimates ‖J‖_F²
itself as docs/jacobian.md#jacobian_penalty states it (``2 ×`` the authors' value).
"""
from __future__ import annotations

import torch

__all__ = ["jacobian_penalty", "projection_vectors"]


def projection_vectors(B: int, C: int, *, dtype: torch.dtype, device: torch.device | str,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, C)`` rows uniform on the unit sphere of R^C (normalised Gaussians): one
    projection's vectors, one per sample.

    Drawn on the generator's device (a CPU generator cannot fill a CUDA tensor) and then
    moved; for C = 1 the rows are ±1, whose sign a squared norm does not see.
    """
    source = generator.device if generator is not None else device
    v = torch.randn(B, C, generator=generator, device=source, dtype=dtype)
    return (v / v.norm(dim=1, keepdim=True)).to(device)


def _vjp_sq_norm(y: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``‖∂(Σ_b v_b·y_b)/∂x‖²`` = Σ_b ‖J_bᵀ v_b‖² when rows of y depend on their own rows of x.

    ``create_graph=True`` keeps the result differentiable w.r.t. everything y depends on
    (the penalty is added to a training loss).
    """
    (g,) = torch.autograd.grad(y, x, grad_outputs=v, create_graph=True, retain_graph=True, allow_unused=True)
    if g is None:
        raise ValueError("jacobian_penalty: y does not depend on x (x is not in y's autograd graph)")
    return g.pow(2).sum()


def jacobian_penalty(y: torch.Tensor, x: torch.Tensor, n_proj: int = 1, exact: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Batch mean of ‖∂y_b/∂x_b‖_F² (formula: docs/jacobian.md#jacobian_penalty).

    Shapes: ``y (B, C)`` computed from ``x (B, ...)`` (x requires grad) → scalar.

    Estimator (``exact=False``)::

        R = C / (n_proj · B) · Σ_p ‖∂(Σ_b v_pb · y_b) / ∂x‖²,   v_pb uniform on S^{C−1}

    unbiased because ``E[v vᵀ] = I/C`` for v uniform on the sphere:
    ``E‖J_bᵀ v‖² = tr(J_b J_bᵀ)/C``. Every sample gets its own v_pb (as the authors' code);
    with independent vectors the estimate stays unbiased for the full ‖∂y/∂x‖_F²/B even
    when samples interact (e.g. BatchNorm in training mode).

    ``exact=True`` uses the C basis vectors instead (C backward passes, no factor C):
    ``R = 1/B · Σ_c ‖∂(Σ_b y_bc)/∂x‖²``, which equals the batch mean of ‖J_b‖_F² when each
    output row depends only on its own input row.

    ``generator`` seeds the projections (reproducible); B = 0 or C = 0 gives 0 still
    attached to y's graph.
    """
    if not x.requires_grad:
        raise ValueError("jacobian_penalty: x must require grad (call x.requires_grad_() before computing y)")
    if not y.requires_grad:
        raise ValueError("jacobian_penalty: y must be computed from x with autograd enabled; y does not require grad")
    B, C = y.shape
    if B == 0 or C == 0:
        return y.sum() * 0
    if exact:
        basis = torch.eye(C, dtype=y.dtype, device=y.device)
        total = sum(_vjp_sq_norm(y, x, basis[c].expand(B, C)) for c in range(C))
        return total / B
    total = sum(_vjp_sq_norm(y, x, projection_vectors(B, C, dtype=y.dtype, device=y.device, generator=generator))
                for _ in range(n_proj))
    return total * (C / (n_proj * B))
