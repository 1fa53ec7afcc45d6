"""The math dtype of the references: float16 / bfloat16 inputs are computed in float32 (Gram
sums, FFTs and SVDs lose too much in 8–11 mantissa bits; CPU FFTs and LAPACK reject them) and
the result is returned in the input dtype; float32 / float64 are computed as they are."""
from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in LOW_PRECISION else dtype


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its compute dtype (no copy for float32 / float64)."""
    return x.to(compute_dtype(x.dtype))
