"""The β-LASSO update's backend table (docs/beta_lasso.md); ``regkernels.optim.BetaLasso`` is the
user-facing entry point and resolves its backend here, per parameter.

``torch.ops.regkernels.beta_lasso_step_`` is defined in csrc/regkernels.cpp with CPU and CUDA
kernels (csrc/cpu/beta_lasso_cpu.cpp, csrc/cuda/beta_lasso_cuda.cu); its fake and table entry
live in the beta_lasso section of ``regkernels._C_ops``. The rows differ in how many tensors one
call updates: the C++ entry is ONE fused launch over every parameter of one (device, dtype), its
per-tensor hyper-parameters packed by ``pack_hyper``, and returns their non-zero counts; the
reference updates one tensor (``regkernels.reference.beta_lasso.beta_lasso_update_``). The C++
rows also need a gradient of the parameter's dtype and strides, in a dense layout
(``fused_takes``).
"""
from __future__ import annotations

import operator

import torch

from regkernels.ops._table import Kernel, Table

__all__ = ["TABLE", "OP", "pack_hyper", "fused_takes"]

OP = "beta_lasso_update_"

TABLE = Table("beta_lasso", [
    Kernel(OP, "cpu", "cpu", "regkernels._C_ops:beta_lasso_step_",
           note="one fused launch per (device, dtype), non-zero counts included; dense tensors, shared strides"),
    Kernel(OP, "cuda", "cuda", "regkernels._C_ops:beta_lasso_step_",
           note="one fused launch per (device, dtype), non-zero counts included; dense tensors, shared strides"),
    Kernel(OP, "any", "reference", "regkernels.reference.beta_lasso:beta_lasso_update_",
           note="per-tensor torch ops"),
])


def fused_takes(p: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the fused kernels can update ``p`` with gradient ``g`` (plain tensors: a DTensor's
    local shards): one dtype, one shape and one set of strides that cover the memory without gaps
    or overlap (contiguous, channels_last, a transposed matrix ...): the update is elementwise,
    so the kernels run over the storage span as a flat array (docs/beta_lasso.md#fused-kernels)."""
    if g.dtype != p.dtype:
        return False
    if p.is_contiguous() and g.is_contiguous():
        return True
    return p.shape == g.shape and p.stride() == g.stride() and _dense(p)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``[data, data + numel)`` exactly once: ordered by stride,
    every dimension longer than 1 steps over all the ones before it."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=operator.itemgetter(1)):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def pack_hyper(lr: float, lam: float, beta: float, momentum: float, dampening: float, weight_decay: float,
               nesterov: bool, first: bool) -> tuple[list[float], list[int]]:
    """One tensor's entries of the fused op's ``hyper`` (6 floats) and ``flags`` (3 ints) tables.

    beta·lam and 1 − dampening are formed in double here, as the reference forms them in
    Python, and rounded to the math dtype by the kernel.
    """
    return ([float(lr), float(lam), float(beta) * float(lam), float(momentum), 1.0 - float(dampening),
             float(weight_decay)], [int(momentum != 0), int(bool(nesterov)), int(bool(first))])
