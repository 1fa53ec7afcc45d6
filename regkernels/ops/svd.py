"""Public batched-SVD ops (SPEC §3): validation → backend choice → implementation.

``batched_svd``, ``clamp_singular_values`` and ``svb_`` validate their arguments (SPEC §7)
and dispatch through ``_TABLE`` (a ``KernelTable``).

Kernels: ``regkernels::batched_svd``, a one-sided Jacobi SVD (math in
``csrc/core/jacobi_svd.h``): ``"cpu"`` (csrc/cpu/svd_cpu.cpp, 8 float32 / 4 float64 matrices
per AVX2 register) and ``"cuda"`` (csrc/cuda/svd_cuda.cu, one block per matrix).

==========  =====================================  ==========================================
device      default (``backend=None``)             ``backend="cpu"`` / ``"cuda"``
==========  =====================================  ==========================================
CPU         kernel for max(m, n) ≤ 64 (measured    kernel for max(m, n) ≤ 128, torch.linalg.svd
            faster than LAPACK there), else        above
            torch.linalg.svd
CUDA        kernel for max(m, n) ≤ 64, else        the same
            torch.linalg.svd
==========  =====================================  ==========================================

A long matrix (only max(m, n) above the limit) is QR-reduced to its min(m, n)² factor first.
fp16/bf16 run in float32; a dimension of size 0 goes to the reference.

The op has a fake (meta) implementation and autograd (``_svd_backward``: the formula
torch.linalg.svd uses), so ``torch.compile(fullgraph=True)`` traces it.
``clamp_singular_values`` and ``svb_`` call the same SVD and keep their own backward /
in-place update.

The conv family's ``conv_singular_values`` / ``clip_conv_singular_values`` register kernels
here too: per-frequency SVDs on the kernel through the real embedding of each complex block;
by default on CUDA, only when named (``backend="cpu"``) on CPU, where LAPACK's complex SVD is
faster (``SEDGHI_DEFAULT``).
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Callable

import torch
from torch import nn

from regkernels import _ext
from regkernels.ops import conv as _conv
from regkernels.ops._common import KernelTable, check_bounds, check_matrix, check_number, check_tensor
from regkernels.reference import svd as _ref
from regkernels.reference._dtypes import upcast
from regkernels.reference._numerics import first_order_only

__all__ = ["batched_svd", "clamp_singular_values", "svb_"]

_TABLE = KernelTable(_ref)

# Largest max(m, n) the kernel takes (csrc: CPU kMaxSide, CUDA shared-memory layout) and the
# largest it is used for by default: on the 2-core EPYC CPU of benchmarks/results the kernel is
# 1.7x LAPACK at 64 x 64 and 0.8x at 128 x 128.
KERNEL_LIMIT = {"cpu": 128, "cuda": 64}
DEFAULT_LIMIT = {"cpu": 64, "cuda": 64}


# ----------------------------------------------------------------------------- the kernel op

def _svd_backward(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, gU, gS, gVh) -> torch.Tensor:
    """∂L/∂X of the thin real SVD X = U diag(S) Vh — the formula torch.linalg.svd's backward uses
    (so both agree, including where it is undefined: repeated singular values give inf/NaN
    unless the loss is invariant to the basis of the repeated subspace).

    With skew(A) = A − Aᵀ, E_ij = S_j² − S_i² (1 on the diagonal):
    core = (skew(Uᵀ gU) ∘ S_row + S_col ∘ skew(Vh gVhᵀ)) / E + diag(gS), and the tall/wide
    complement terms (I − UUᵀ) gU S⁻¹ Vh or U S⁻¹ gVh (I − VVᵀ).
    """
    m, n = U.shape[-2], Vh.shape[-1]
    k = S.shape[-1]
    if gU is None and gVh is None:
        return U @ (gS.unsqueeze(-1) * Vh) if gS is not None else U.new_zeros((*U.shape[:-1], n))
    S2 = S * S
    E = S2.unsqueeze(-2) - S2.unsqueeze(-1)
    E.diagonal(dim1=-2, dim2=-1).fill_(1)
    gA = torch.zeros_like(E)
    if gU is not None:
        UtgU = U.mT @ gU
        gA = gA + (UtgU - UtgU.mT) * S.unsqueeze(-2)
    if gVh is not None:
        VhgV = Vh @ gVh.mT
        gA = gA + S.unsqueeze(-1) * (VhgV - VhgV.mT)
    gA = gA / E
    if gS is not None:
        gA = gA + torch.diag_embed(gS)
    if m > k and gU is not None:
        gUSinv = gU / S.unsqueeze(-2)
        return (U @ gA + gUSinv - U @ (U.mT @ gUSinv)) @ Vh
    if n > k and gVh is not None:
        SinvgVh = gVh / S.unsqueeze(-1)
        return U @ (gA @ Vh + SinvgVh - (SinvgVh @ Vh.mT) @ Vh)
    return U @ gA @ Vh


if _ext.HAS_C:
    @torch.library.register_fake("regkernels::batched_svd")
    def _svd_fake(X: torch.Tensor):
        b, m, n = X.shape
        k = min(m, n)
        return X.new_empty((b, m, k)), X.new_empty((b, k)), X.new_empty((b, k, n))

    def _svd_setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*output)
        # unused outputs arrive as None, as in torch.linalg.svd's backward: a loss of S alone
        # then never divides by S_j² − S_i² (finite at repeated values, e.g. the doubled values
        # of the conv-operator embedding)
        ctx.set_materialize_grads(False)

    def _svd_autograd_backward(ctx, gU, gS, gVh):
        U, S, Vh = ctx.saved_tensors
        return _svd_backward(U, S, Vh, gU, gS, gVh)

    torch.library.register_autograd("regkernels::batched_svd", _svd_autograd_backward,
                                    setup_context=_svd_setup_context)


def _kernel_svd(X: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``X (..., m, n)`` through the kernel when ``max(m, n) ≤ limit`` (and both ≥ 1).

    A long matrix (``min(m, n) ≤ limit < max(m, n)``, e.g. a conv weight 64 × 576) is first
    reduced by a QR (LAPACK / cuSOLVER through torch.linalg.qr): X = Q R gives U = Q·U_R for a
    tall X; Xᵀ = Q R, so X = Rᵀ Qᵀ and Vh = Vh_{Rᵀ}·Qᵀ, for a wide one. The small square factor
    goes through the kernel. min(m, n) > limit runs the reference. fp16/bf16 run in float32
    and come back in the input dtype.
    """
    m, n = X.shape[-2:]
    if min(m, n) < 1 or min(m, n) > limit:
        return _ref.batched_svd(X)
    if max(m, n) > limit:
        Xc = upcast(X)
        if m >= n:
            Q, R = torch.linalg.qr(Xc)
            U, S, Vh = _kernel_svd(R, limit)
            return (Q @ U).to(X.dtype), S.to(X.dtype), Vh.to(X.dtype)
        Q, R = torch.linalg.qr(Xc.mT)
        U, S, Vh = _kernel_svd(R.mT, limit)
        return U.to(X.dtype), S.to(X.dtype), (Vh @ Q.mT).to(X.dtype)
    Xc = upcast(X)
    lead = X.shape[:-2]
    U, S, Vh = torch.ops.regkernels.batched_svd(Xc.reshape(-1, m, n))
    k = min(m, n)
    return (U.reshape(*lead, m, k).to(X.dtype), S.reshape(*lead, k).to(X.dtype),
            Vh.reshape(*lead, k, n).to(X.dtype))


def _kernel_for(device_type: str, limit: dict[str, int]) -> Callable:
    return lambda X: _kernel_svd(X, limit[device_type])


def svd_function(device: torch.device, backend: str | None = None, *, name: str = "batched_svd") -> Callable:
    """The batched SVD ``batched_svd(·, backend=backend)`` runs on ``device`` (validated; errors
    name ``name``), for the ops built on it (``clamp_singular_values``, ``svb_``, the
    conv-operator SVDs). An explicit kernel backend takes the kernel's whole size range."""
    impl = _TABLE.implementation("batched_svd", backend, device, name=name)
    if backend in KERNEL_LIMIT:
        return _kernel_for(device.type, KERNEL_LIMIT)
    return impl


def batched_svd(X: torch.Tensor, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a batch of matrices, ``torch.linalg.svd(X, full_matrices=False)``'s contract.

    ``X (..., m, n)`` floating → ``U (..., m, k)``, ``S (..., k)`` descending ≥ 0,
    ``Vh (..., k, n)``, ``k = min(m, n)``. fp16/bf16 are computed in float32 and returned
    in the input dtype; a non-finite matrix gives NaN factors for that matrix only.
    Differentiable. Formula and accuracy: SPEC §3.1.
    """
    check_matrix("batched_svd", "X", X)
    return svd_function(X.device, backend)(X)


def clamp_singular_values(X: torch.Tensor, lo: float, hi: float, backend: str | None = None) -> torch.Tensor:
    """``U · diag(clamp(S, lo, hi)) · Vh`` for every matrix of ``X (..., m, n)`` (SPEC §3.2).

    ``0 ≤ lo ≤ hi``. Differentiable; the gradient uses divided differences of the clamp, so
    it stays finite at repeated singular values (where torch.linalg.svd's backward does not).
    Twice differentiable on every backend (``create_graph=True`` differentiates the gradient
    through the SVD's own gradient) where the singular values are distinct and non-zero; at
    repeated or zero singular values the double backward raises a RuntimeError. A matrix
    holding NaN/Inf gives NaN (value and gradient) for that matrix only.
    """
    check_matrix("clamp_singular_values", "X", X)
    check_bounds("clamp_singular_values", "lo", lo, "hi", hi)
    return _ref.clamp_singular_values(X, lo, hi, svd=svd_function(X.device, backend, name="clamp_singular_values"))


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


def check_svb_args(op: str, eps, operator, input_size, backend, devices: Iterable[torch.device]) -> None:
    """The arguments of ``svb_`` (also checked by ``SVBProjector`` at construction): eps a finite
    number > 0, operator a bool, input_size as ``svb_`` takes it, backend one that has the SVD
    on every device of ``devices``."""
    # 1 + eps must stay finite in float32 (fp16 / bf16 weights are bounded in float32 math)
    check_number(op, "eps", eps, hi=1e38)
    if eps <= 0:
        raise ValueError(f"{op}: eps must be > 0 (singular values are bounded to [1/(1+eps), 1+eps]); got {eps}")
    if not isinstance(operator, bool):
        raise TypeError(f"{op}: operator must be a bool; got {operator!r}")
    _check_input_size(op, input_size)
    for device in set(devices) or {torch.device("cpu")}:
        svd_function(device, backend, name=op)


def svb_(weights_or_module: nn.Module | torch.Tensor | Iterable[torch.Tensor], eps: float, operator: bool = False,
         input_size: _ref.InputSize | None = None, backend: str | None = None) -> int:
    """Hard singular value bounding in place: ``W ← U clamp(S, 1/(1+eps), 1+eps) Vh`` (SPEC §3.3).

    ``weights_or_module``: an ``nn.Module`` (every Linear and Conv1d/2d/3d weight, grouped
    convs per group), a weight tensor, or an iterable of weight tensors (groups = 1).
    Runs under ``torch.no_grad()``, never touches biases, and sends all matrices of one
    (m, n, dtype, device) through one ``batched_svd`` call. ``operator=True`` bounds each
    conv operator (SPEC §2.3) and needs ``input_size`` (int, tuple, or dict weight / conv
    module → size). Parametrized layers (``torch.nn.utils.parametrize`` with a
    ``right_inverse``, hook-based ``weight_norm``) are bounded through the parametrization;
    weights that cannot be written back are refused naming the layer. All arguments and all
    new values are settled before the first weight changes: an error changes nothing.
    Returns the number of matrices projected. See ``regkernels.reference.svd.svb_``.
    """
    weights = _svb_weights(weights_or_module)
    # an unknown or missing backend fails before any weight changes
    check_svb_args("svb_", eps, operator, input_size, backend, [w.device for w in weights])
    if not isinstance(weights_or_module, (nn.Module, torch.Tensor)):
        weights_or_module = weights  # a one-shot iterator was consumed by the checks above
    return _ref.svb_(weights_or_module, eps, operator=operator, input_size=input_size,
                     svd=lambda X: svd_function(X.device, backend, name="svb_")(X),
                     clip=functools.partial(_conv.clip_conv_singular_values, backend=backend))


# ----------------------------------------------------------------------------- registrations

def _sedghi_first_order(x: torch.Tensor, op: str, backend: str) -> torch.Tensor:
    """An output of a Sedghi kernel, differentiable once: the second derivative would go through
    the SVD of the real embedding, whose doubled singular values make the SVD's backward divide
    by 0 (a NaN second derivative). Applied to the outputs, so that this refusal (which names the
    backend that supports it) is the first node a ``create_graph=True`` backward meets."""
    return first_order_only(x, f"{op}: double backward (create_graph=True) is not supported by "
                               f"backend={backend!r}; backend='reference' supports it")


def _sedghi_kernels(device_type: str) -> tuple[Callable, Callable]:
    """conv_singular_values / clip_conv_singular_values (SPEC §2.3, conv family) with the
    per-frequency SVDs on the kernel, through the real 2·C_out × 2·C_in embedding of each
    complex block; LAPACK's / cuSOLVER's complex SVD (the reference) where the embedding is
    larger than the kernel takes (64 channels on CPU, 32 on CUDA)."""
    limit = KERNEL_LIMIT[device_type]
    svd = _kernel_for(device_type, KERNEL_LIMIT)

    def fits(weight: torch.Tensor) -> bool:
        return 2 * max(weight.shape[0], weight.shape[1]) <= limit

    def values(weight: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
        if not fits(weight):
            return _conv.R.conv_singular_values(weight, input_size)
        out = _conv.R.conv_singular_values(weight, input_size, svd=svd)
        return _sedghi_first_order(out, "conv_singular_values", device_type)

    def clip(weight: torch.Tensor, input_size: Sequence[int], lo: float, hi: float):
        if not fits(weight):
            return _conv.R.clip_conv_singular_values(weight, input_size, lo, hi)
        new_weight, sv = _conv.R.clip_conv_singular_values(weight, input_size, lo, hi, svd=svd)
        return tuple(_sedghi_first_order(t, "clip_conv_singular_values", device_type) for t in (new_weight, sv))

    return values, clip


# On CPU the Sedghi kernels run only when named (backend="cpu"): LAPACK's complex SVD of a
# C × C block is cheaper than Jacobi with vectors on its 2C × 2C embedding. Measured on the
# 2-core EPYC (benchmarks/results/README.md, issue 4): 0.44x (values) and 0.61x (clip) of the
# reference at 16 channels on 8 × 8, and 0.15x for the values at 64 channels on 32 × 32.
SEDGHI_DEFAULT = {"cpu": False, "cuda": True}

# backend=None runs batched_svd's kernel within DEFAULT_LIMIT (the measured-faster range);
# svd_function gives an explicitly named kernel backend the kernel's whole KERNEL_LIMIT.
if _ext.HAS_C:
    for _device in ("cpu", "cuda") if _ext.has_cuda_kernels() else ("cpu",):
        _TABLE.register("batched_svd", _device, _device, _kernel_for(_device, DEFAULT_LIMIT))
        _values, _clip = _sedghi_kernels(_device)
        _conv._TABLE.register("conv_singular_values", _device, _device, _values, default=SEDGHI_DEFAULT[_device])
        _conv._TABLE.register("clip_conv_singular_values", _device, _device, _clip, default=SEDGHI_DEFAULT[_device])
