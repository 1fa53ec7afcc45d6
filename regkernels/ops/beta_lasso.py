"""The fused β-LASSO step (SPEC §4) as a torch.library custom op.

``torch.ops.regkernels.beta_lasso_step_`` is defined in csrc/regkernels.cpp with CPU and CUDA
kernels (csrc/cpu/beta_lasso_cpu.cpp, csrc/cuda/beta_lasso_cuda.cu). This module registers its
fake implementation and packs an optimizer's parameter list into the op's flat arguments;
``regkernels.optim.BetaLasso`` is the user-facing entry point.
"""
from __future__ import annotations

from typing import Sequence

import torch

from regkernels import _ext

__all__ = ["FUSED_DTYPES", "fused_backend_for", "pack_hyper", "beta_lasso_step_"]

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

if _ext.HAS_C:

    @torch.library.register_fake("regkernels::beta_lasso_step_")
    def _beta_lasso_step_fake(params, grads, bufs, hyper, flags):
        device = params[0].device if len(params) else torch.device("cpu")
        return torch.empty(len(params), dtype=torch.long, device=device)


def fused_backend_for(device: torch.device) -> str | None:
    """The kernel backend that can update tensors on ``device``, or None."""
    if not _ext.HAS_C:
        return None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and _ext.has_cuda_kernels():
        return "cuda"
    return None


def pack_hyper(lr: float, lam: float, beta: float, momentum: float, dampening: float, weight_decay: float,
               nesterov: bool, first: bool) -> tuple[list[float], list[int]]:
    """One tensor's entries of the op's ``hyper`` (6 floats) and ``flags`` (3 ints) tables.

    beta·lam and 1 − dampening are formed in double here, as the reference forms them in
    Python, and rounded to the math dtype by the kernel.
    """
    return ([float(lr), float(lam), float(beta) * float(lam), float(momentum), 1.0 - float(dampening),
             float(weight_decay)], [int(momentum != 0), int(bool(nesterov)), int(bool(first))])


def beta_lasso_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor],
                     hyper: Sequence[float], flags: Sequence[int]) -> torch.Tensor:
    """Run the fused op on tensors of one (device, dtype); returns the per-tensor non-zero counts."""
    return torch.ops.regkernels.beta_lasso_step_(list(params), list(grads), list(bufs), list(hyper), list(flags))
