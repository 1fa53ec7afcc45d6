"""Public batched-SVD ops (docs/svd.md): argument checks → ``TABLE`` → implementation.

``batched_svd``, ``clamp_singular_values`` and ``svb_`` check their arguments and run the row
``TABLE.implementation`` picks. Kernel: ``regkernels::batched_svd``, a one-sided Jacobi SVD
(math in ``csrc/core/jacobi_svd.h``): ``"cpu"`` (csrc/cpu/svd_cpu.cpp, 8 float32 / 4 float64
matrices per AVX2 register) and ``"cuda"`` (csrc/cuda/svd_cuda.cu, one block per matrix); its
fake, autograd and table entries live in the svd section of ``regkernels._C_ops``.

==========  =====================================  ==========================================
device      default (``backend=None``)             ``backend="cpu"`` / ``"cuda"``
==========  =====================================  ==========================================
CPU         kernel for max(m, n) ≤ 64 (measured    kernel for min(m, n) ≤ 128, ValueError
            faster than LAPACK there), else        above
            torch.linalg.svd
CUDA        kernel for max(m, n) ≤ 64, else        kernel for min(m, n) ≤ 64, ValueError
            torch.linalg.svd                       above
==========  =====================================  ==========================================

A long matrix (only max(m, n) above the limit) is QR-reduced to its min(m, n)² factor first.
fp16/bf16 run in float32; a dimension of size 0 goes to the reference. The kernel entries are
torch.autograd.Functions with a vmap rule, so ``torch.func.grad`` / ``vjp`` / ``vmap`` and
``torch.compile(fullgraph=True)`` work on every backend.

``svb_`` has no rows of its own: it runs ``batched_svd``'s row for the backend (one call per
(m, n, dtype, device)) and, for ``operator=True``, the conv family's public
``clip_conv_singular_values`` with the same backend. The conv family's Sedghi rows
(``conv_singular_values`` / ``clip_conv_singular_values`` on the Jacobi kernel) point at the
functions of the same names in ``regkernels._C_ops``' svd section.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Callable

import torch
from torch import nn

from regkernels.distributed import accepts_sharded
from regkernels.ops import conv as _conv
from regkernels.ops._common import check_bounds, check_matrix, check_number, check_tensor
from regkernels.ops._table import Kernel, Table, check_backend_keyword
from regkernels.reference import svd as _ref

__all__ = ["TABLE", "batched_svd", "clamp_singular_values", "svb_", "svb_bn_layers"]

TABLE = Table("svd", [
    Kernel("batched_svd", "cpu", "cpu", "regkernels._C_ops:batched_svd",
           note="Jacobi kernel for max(m, n) <= 64 by default (QR-reduced long sides), min(m, n) <= 128 when named"),
    Kernel("batched_svd", "cuda", "cuda", "regkernels._C_ops:batched_svd",
           note="Jacobi kernel for min(m, n) <= 64 (QR-reduced long sides)"),
    Kernel("batched_svd", "any", "reference", "regkernels.reference.svd:batched_svd",
           note="torch.linalg.svd, NaN factors for a non-finite matrix"),
    Kernel("clamp_singular_values", "cpu", "cpu", "regkernels._C_ops:clamp_singular_values",
           note="the reference's divided-difference backward on the Jacobi kernel's SVD"),
    Kernel("clamp_singular_values", "cuda", "cuda", "regkernels._C_ops:clamp_singular_values",
           note="the reference's divided-difference backward on the Jacobi kernel's SVD"),
    Kernel("clamp_singular_values", "any", "reference", "regkernels.reference.svd:clamp_singular_values",
           note="torch.linalg.svd"),
])

# The backends whose table entries take ``strict`` (regkernels._C_ops): named, they use the
# kernel's whole size range and refuse what it cannot take; for backend=None they stay in the
# range measured faster than LAPACK and hand larger matrices to the reference.
_KERNEL_BACKENDS = ("cpu", "cuda")


def svd_function(device: torch.device, backend: str | None = None, dtype: torch.dtype = torch.float32, *,
                 name: str = "batched_svd") -> Callable:
    """The batched SVD ``batched_svd(·, backend=backend)`` runs for ``dtype`` tensors on ``device``
    (checked; errors name ``name``), for ``svb_`` and its checks."""
    check_backend_keyword(name, backend)
    impl = TABLE.implementation("batched_svd", backend, device, dtype, name=name)
    return functools.partial(impl, strict=True) if backend in _KERNEL_BACKENDS else impl


@accepts_sharded
def batched_svd(X: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a batch of matrices, ``torch.linalg.svd(X, full_matrices=False)``'s contract.

    ``X (..., m, n)`` floating → ``U (..., m, k)``, ``S (..., k)`` descending ≥ 0,
    ``Vh (..., k, n)``, ``k = min(m, n)``. fp16/bf16 are computed in float32 and returned
    in the input dtype; a non-finite matrix gives NaN factors for that matrix only.
    Differentiable (torch.func included). Formula and accuracy: docs/svd.md.
    """
    check_matrix("batched_svd", "X", X)
    check_backend_keyword("batched_svd", backend)
    impl = TABLE.implementation("batched_svd", backend, X.device, X.dtype)
    return impl(X, strict=True) if backend in _KERNEL_BACKENDS else impl(X)


@accepts_sharded
def clamp_singular_values(X: torch.Tensor, lo: float, hi: float, *,
                          backend: str | None = None) -> torch.Tensor:
    """``U · diag(clamp(S, lo, hi)) · Vh`` for every matrix of ``X (..., m, n)`` (docs/svd.md).

    ``0 ≤ lo ≤ hi``. Differentiable; the gradient uses divided differences of the clamp, so
    it stays finite at repeated singular values (where torch.linalg.svd's backward does not).
    Twice differentiable on every backend (``create_graph=True`` differentiates the gradient
    through the SVD's own gradient) where the singular values are distinct and non-zero; at
    repeated or zero singular values the double backward raises a RuntimeError (under torch.func
    transforms that host-side check is skipped, see ``regkernels.reference.svd``). A matrix
    holding NaN/Inf gives NaN (value and gradient) for that matrix only.
    """
    check_matrix("clamp_singular_values", "X", X)
    check_bounds("clamp_singular_values", "lo", lo, "hi", hi)
    check_backend_keyword("clamp_singular_values", backend)
    impl = TABLE.implementation("clamp_singular_values", backend, X.device, X.dtype)
    return impl(X, lo, hi, strict=True) if backend in _KERNEL_BACKENDS else impl(X, lo, hi)


def _svb_weights(weights_or_module, op: str = "svb_") -> list[torch.Tensor]:
    """The weight tensors svb_ would touch, validated (used for checks only); raises for a
    layer whose weight cannot be written back (see ``regkernels.reference.svd.svb_``)."""
    if isinstance(weights_or_module, nn.Module):
        return [t.weight for t in _ref.collect_svb_weights(weights_or_module, op)]
    if isinstance(weights_or_module, torch.Tensor):
        items = [weights_or_module]
    elif isinstance(weights_or_module, Iterable) and not isinstance(weights_or_module, (str, bytes, dict)):
        items = list(weights_or_module)
    else:
        raise TypeError("svb_: weights_or_module must be an nn.Module, a weight tensor or an iterable of weight "
                        f"tensors; got {type(weights_or_module).__name__}")
    for i, w in enumerate(items):
        check_tensor("svb_", f"weights_or_module[{i}]", w, min_ndim=2, form="(out, in) or (out, in/groups, *kernel)")
    _ref.collect_svb_weights(items)
    return items


def _is_size(size) -> bool:
    """An int >= 1 or a sequence of such ints (bools excluded)."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if isinstance(size, Sequence) and not isinstance(size, str):
        return len(size) > 0 and all(is_int(v) for v in size)
    return is_int(size)


def _check_input_size(op: str, input_size) -> None:
    """None, a size, or a mapping weight tensor / conv module → size (a size: an int or a tuple of ints)."""
    if input_size is None:
        return
    sizes = input_size.values() if isinstance(input_size, Mapping) else [input_size]
    for size in sizes:
        if not _is_size(size):
            raise TypeError(f"{op}: input_size must be None, an int, a tuple of ints (the conv input's spatial size, "
                            f"each >= 1) or a dict weight or conv module -> such a size; got {size!r}")


def check_svb_args(op: str, eps, operator, input_size, backend, tensors: Iterable[torch.Tensor]) -> None:
    """The arguments of ``svb_`` (also checked by ``SVBProjector`` at construction): eps a finite
    number > 0, operator a bool, input_size as ``svb_`` takes it, backend one that has the SVD
    for every (device, dtype) of ``tensors`` (the weights)."""
    # 1 + eps must stay finite in float32 (fp16 / bf16 weights are bounded in float32 math)
    check_number(op, "eps", eps, hi=1e38)
    if eps <= 0:
        raise ValueError(f"{op}: eps must be > 0 (singular values are bounded to [1/(1+eps), 1+eps]); got {eps}")
    if not isinstance(operator, bool):
        raise TypeError(f"{op}: operator must be a bool; got {operator!r}")
    _check_input_size(op, input_size)
    for device, dtype in {(t.device, t.dtype) for t in tensors} or {(torch.device("cpu"), torch.float32)}:
        svd_function(device, backend, dtype, name=op)


def _svb_bn(weights_or_module, bn: _ref.BNChoice, op: str = "svb_") -> bool | list[str]:
    """``bn`` checked (``regkernels.reference.svd.select_bn_layers``) and in the form svb_ passes
    on: a bool, or the list of the selected layers' names (modules and one-shot iterators
    resolved)."""
    chosen = _ref.select_bn_layers(weights_or_module, bn, op)
    return bn if isinstance(bn, bool) else [name for name, _ in chosen]


def svb_bn_layers(model: nn.Module, bn: _ref.BNChoice = True) -> list[str]:
    """The names of the BatchNorm layers ``svb_(model, eps, bn=bn)`` bounds, in model order
    (docs/svd.md#batchnorm-scales-bn); raises as svb_ would for a ``bn`` it refuses. With
    ``bn=True``: the BatchNorms that directly follow a Linear / Conv / ConvTranspose in ``model.named_modules()``
    order (with γ; ``affine=False`` ones are left alone)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"svb_bn_layers: model must be an nn.Module; got {type(model).__name__}")
    return [name for name, _ in _ref.select_bn_layers(model, bn, "svb_bn_layers")]


def svb_(weights_or_module: nn.Module | torch.Tensor | Iterable[torch.Tensor], eps: float, operator: bool = False,
         input_size: _ref.InputSize | None = None, *, backend: str | None = None,
         bn: _ref.BNChoice = False) -> int:
    """Hard singular value bounding in place: ``W ← U clamp(S, 1/(1+eps), 1+eps) Vh`` (docs/svd.md).

    ``weights_or_module``: an ``nn.Module`` (every Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d
    weight, grouped convs per group; a ConvTranspose's matrices are ``as_matrix(W, groups,
    transposed=True)``), a weight tensor, or an iterable of weight tensors (groups = 1).
    Runs under ``torch.no_grad()``, never touches biases, and sends all matrices of one
    (m, n, dtype, device) through one ``batched_svd`` call. ``operator=True`` bounds each
    conv operator (docs/conv.md) and needs ``input_size`` (int, tuple, or dict weight / conv
    module → size; for a ConvTranspose its output size, docs/svd.md#svb_). Parametrized layers
    (``torch.nn.utils.parametrize`` with a ``right_inverse``, hook-based ``weight_norm``) are bounded through the parametrization;
    weights that cannot be written back are refused naming the layer. ``bn=True`` also bounds
    the scale γ_c/sqrt(running_var_c + eps_bn) of each BatchNorm that directly follows a
    Linear / Conv / ConvTranspose in module order into ``[m/(1+eps), m·(1+eps)]``, m the layer's mean |scale|
    (γ rewritten, β and the statistics kept); ``bn=[names or modules]`` names the BatchNorms
    instead (docs/svd.md#batchnorm-scales-bn). All arguments and all new values are settled
    before the first weight changes: an error changes nothing. Returns the number of matrices
    projected (BatchNorms not counted). See ``regkernels.reference.svd.svb_``.
    """
    weights = _svb_weights(weights_or_module)
    # an unknown or missing backend fails before any weight changes
    check_svb_args("svb_", eps, operator, input_size, backend, weights)
    bn = _svb_bn(weights_or_module, bn)
    if not isinstance(weights_or_module, (nn.Module, torch.Tensor)):
        weights_or_module = weights  # a one-shot iterator was consumed by the checks above
    return _ref.svb_(weights_or_module, eps, operator=operator, input_size=input_size,
                     svd=functools.partial(_svb_svd, backend=backend),
                     clip=functools.partial(_conv.clip_conv_singular_values, backend=backend), bn=bn)


def _svb_svd(X: torch.Tensor, *, backend: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batched_svd(X, backend=backend)`` with errors naming svb_ (one call per stack of matrices)."""
    return svd_function(X.device, backend, X.dtype, name="svb_")(X)
