"""Public batched-SVD ops (SPEC §3): validation → backend choice → implementation.

``batched_svd``, ``clamp_singular_values`` and ``svb_`` validate their arguments (SPEC §7)
and dispatch through ``_TABLE`` (a ``KernelTable``). No kernel exists for this family yet,
so every call runs the pure-torch reference; a kernel backend registers itself there and
nothing else changes.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from regkernels.ops._common import KernelTable, check_bounds, check_matrix, check_number, check_tensor
from regkernels.reference import svd as _ref

__all__ = ["batched_svd", "clamp_singular_values", "svb_"]

# Kernels of this family register here (none yet: every op runs its reference); svb_ runs on
# the batched_svd kernel.
_TABLE = KernelTable(_ref)


def batched_svd(X: torch.Tensor, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a batch of matrices, ``torch.linalg.svd(X, full_matrices=False)``'s contract.

    ``X (..., m, n)`` floating → ``U (..., m, k)``, ``S (..., k)`` descending ≥ 0,
    ``Vh (..., k, n)``, ``k = min(m, n)``. fp16/bf16 are computed in float32 and returned
    in the input dtype; a non-finite matrix gives NaN factors for that matrix only.
    Differentiable. Formula and accuracy: SPEC §3.1.
    """
    check_matrix("batched_svd", "X", X)
    return _TABLE.implementation("batched_svd", backend, X.device)(X)


def clamp_singular_values(X: torch.Tensor, lo: float, hi: float, backend: str | None = None) -> torch.Tensor:
    """``U · diag(clamp(S, lo, hi)) · Vh`` for every matrix of ``X (..., m, n)`` (SPEC §3.2).

    ``0 ≤ lo ≤ hi``. Differentiable; the gradient uses divided differences of the clamp, so
    it stays finite at repeated singular values (where torch.linalg.svd's backward does not).
    """
    check_matrix("clamp_singular_values", "X", X)
    check_bounds("clamp_singular_values", "lo", lo, "hi", hi)
    return _TABLE.implementation("clamp_singular_values", backend, X.device)(X, lo, hi)


def _svb_weights(weights_or_module) -> list[torch.Tensor]:
    """The weight tensors svb_ would touch, validated (used for checks only)."""
    if isinstance(weights_or_module, nn.Module):
        return [w for w, _ in _ref.collect_svb_weights(weights_or_module)]
    if isinstance(weights_or_module, torch.Tensor):
        items = [weights_or_module]
    elif isinstance(weights_or_module, Iterable) and not isinstance(weights_or_module, (str, bytes, dict)):
        items = list(weights_or_module)
    else:
        raise TypeError("svb_: weights_or_module must be an nn.Module, a weight tensor or an iterable of weight "
                        f"tensors; got {type(weights_or_module).__name__}")
    for i, w in enumerate(items):
        check_tensor("svb_", f"weights_or_module[{i}]", w, min_ndim=2, form="(out, in) or (out, in/groups, *kernel)")
    return items


def _is_size(size) -> bool:
    """An int or a sequence of ints (bools excluded)."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if isinstance(size, Sequence) and not isinstance(size, str):
        return all(is_int(v) for v in size)
    return is_int(size)


def _check_input_size(input_size) -> None:
    """None, a size, or a mapping weight tensor → size (a size: an int or a tuple of ints)."""
    if input_size is None:
        return
    sizes = input_size.values() if isinstance(input_size, Mapping) else [input_size]
    for size in sizes:
        if not _is_size(size):
            raise TypeError("svb_: input_size must be None, an int, a tuple of ints (the conv input's spatial size) "
                            f"or a dict weight -> such a size; got {size!r}")


def svb_(weights_or_module: nn.Module | torch.Tensor | Iterable[torch.Tensor], eps: float, operator: bool = False,
         input_size: _ref.InputSize | None = None, backend: str | None = None) -> int:
    """Hard singular value bounding in place: ``W ← U clamp(S, 1/(1+eps), 1+eps) Vh`` (SPEC §3.3).

    ``weights_or_module``: an ``nn.Module`` (every Linear and Conv1d/2d/3d weight, grouped
    convs per group), a weight tensor, or an iterable of weight tensors (groups = 1).
    Runs under ``torch.no_grad()``, never touches biases, and sends all matrices of one
    (m, n, dtype, device) through one ``batched_svd`` call. ``operator=True`` bounds each
    conv operator (SPEC §2.3) and needs ``input_size`` (int, tuple, or dict weight → size).
    Returns the number of matrices projected. See ``regkernels.reference.svd.svb_``.
    """
    check_number("svb_", "eps", eps)
    if eps <= 0:
        raise ValueError(f"svb_: eps must be > 0 (singular values are bounded to [1/(1+eps), 1+eps]); got {eps}")
    if not isinstance(operator, bool):
        raise TypeError(f"svb_: operator must be a bool; got {operator!r}")
    _check_input_size(input_size)
    weights = _svb_weights(weights_or_module)
    # an unknown or missing backend fails before any weight changes
    for device in {w.device for w in weights} or {torch.device("cpu")}:
        _TABLE.implementation("batched_svd", backend, device, name="svb_")
    if not isinstance(weights_or_module, (nn.Module, torch.Tensor)):
        weights_or_module = weights  # a one-shot iterator was consumed by the checks above
    return _ref.svb_(weights_or_module, eps, operator=operator, input_size=input_size,
                     svd=lambda X: batched_svd(X, backend=backend))
