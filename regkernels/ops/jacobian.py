"""Public Jacobian penalty (docs/jacobian.md): argument checks → ``TABLE`` → implementation.

The penalty is a loop of autograd vector-Jacobian products through the user's model, so
there is no kernel to write: the table has the reference only, and every other backend name
raises, listing what exists.
"""
from __future__ import annotations

import torch

from regkernels._numerics import functorch_wrapped
from regkernels.ops._common import check_number, check_same_device, check_tensor
from regkernels.ops._table import Kernel, Table, check_backend_keyword

__all__ = ["TABLE", "jacobian_penalty"]

_OP = "jacobian_penalty"

TABLE = Table("jacobian", [
    Kernel(_OP, "any", "reference", "regkernels.reference.jacobian:jacobian_penalty",
           note="autograd vector-Jacobian products through the user's model (create_graph=True)"),
])


def _wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform (never while dynamo traces: it cannot
    trace the query, and the penalty's torch.autograd.grad breaks the graph there anyway)."""
    return functorch_wrapped(t)


def _check_inputs(y, x, n_proj, exact, generator) -> None:
    """The checks of docs/jacobian.md: y (B, C) floating, x (B, ...) floating and requiring grad, y in x's graph."""
    check_tensor(_OP, "y", y, ndim=2, form="(B, C)")
    check_tensor(_OP, "x", x, min_ndim=1, form="(B, ...)")
    check_same_device(_OP, y=y, x=x)
    if _wrapped(y) and not _wrapped(x):
        raise ValueError(f"{_OP}: y is a torch.func-transformed tensor and x is not: the penalty differentiates y "
                         "w.r.t. x with torch.autograd.grad, which under torch.func.grad / vjp needs x to be an input "
                         "of the transformed function (e.g. torch.func.grad(f, argnums=(0, 1))(params, x)); "
                         "torch.func.vmap of the penalty itself is not supported, vmap a torch.func.grad of it "
                         "with x among the grad's inputs")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{_OP}: x and y must share the batch dim B; got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if not x.requires_grad:
        raise ValueError(f"{_OP}: x must require grad (call x.requires_grad_() before computing y from it)")
    if not y.requires_grad:
        raise ValueError(f"{_OP}: y must be computed from x with autograd enabled; y does not require grad")
    check_number(_OP, "n_proj", n_proj, lo=1, integer=True)
    if not isinstance(exact, bool):
        raise TypeError(f"{_OP}: exact must be a bool; got {exact!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{_OP}: generator must be a torch.Generator or None; got {type(generator).__name__}")


def jacobian_penalty(y: torch.Tensor, x: torch.Tensor, n_proj: int = 1, exact: bool = False,
                     generator: torch.Generator | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Batch mean of ‖∂y_b/∂x_b‖_F², estimated with random projections (Hoffman et al. 2019).

    ``y (B, C)`` computed from ``x (B, ...)`` (x requires grad) → scalar, differentiable
    (built with create_graph) so it can be added to a loss. ``exact=False``:
    ``C/(n_proj·B) · Σ_p ‖∂(Σ_b v_pb·y_b)/∂x‖²`` with one unit vector v_pb per sample and
    projection, drawn from ``generator``; ``exact=True``: the C basis vectors, no factor.
    Under ``torch.func.grad`` / ``vjp`` (and ``vmap`` of those) x must be an input of the
    transformed function; ``torch.func.vmap`` of the penalty alone raises ValueError.
    Formula: docs/jacobian.md; details in ``regkernels.reference.jacobian``.
    """
    _check_inputs(y, x, n_proj, exact, generator)
    check_backend_keyword(_OP, backend)
    impl = TABLE.implementation(_OP, backend, y.device, y.dtype)
    return impl(y, x, n_proj=n_proj, exact=exact, generator=generator)
