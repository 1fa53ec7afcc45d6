"""What every Triton launcher of the package shares: the device a launch runs on, and the
static budget each kernel declares beside its launcher (checked by
``python -m regkernels.bench.gpu_static``, docs/design.md#gpu-static-report).

Importable without Triton (torch only), so the static report can read budgets and tests can
check the device guard on any machine.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

__all__ = ["Budget", "on_device"]


@dataclass(frozen=True)
class Budget:
    """Limits a kernel must meet when compiled for sm_90 (H100/H200).

    ``max_spill_bytes``: bytes of spill stores + loads reported by ptxas (0: no spills).
    ``min_occupancy``: resident warps / 64 on one SM, from registers, shared memory and block
    size (the CUDA occupancy rules of compute capability 9.0).
    ``mma_dtypes``: input dtypes (``"float16"``, ``"bfloat16"``, ``"float32"``) for which the SASS
    must contain tensor-core instructions (HMMA / HGMMA).
    ``vector_loads``: the SASS must contain at least one 64- or 128-bit global load.
    ``max_registers``: registers per thread, when a kernel wants a tighter cap than occupancy.
    ``threads``: block size of a CUDA kernel (Triton kernels report ``num_warps`` themselves).
    ``dtype_arg``: the argument whose element type is the kernel's input dtype (default: the first
    floating-point pointer argument).
    ``note``: why the budget is what it is, when it is not the default.
    """

    max_spill_bytes: int = 0
    min_occupancy: float = 0.25
    mma_dtypes: tuple[str, ...] = ()
    vector_loads: bool = False
    max_registers: int | None = None
    threads: int | None = None
    dtype_arg: str | None = None
    note: str = field(default="", compare=False)


def on_device(t: torch.Tensor):
    """Context for launching a kernel on ``t``'s device and that device's current stream.

    Triton launches on ``torch.cuda.current_device()`` and its current stream; a CUDA tensor on
    another device needs that device made current for the launch (a no-op context when it already
    is, and for CPU tensors, which only the interpreter or the static report launch on).
    """
    dev = t.device
    if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
        return torch.cuda.device(dev.index)
    return contextlib.nullcontext()
