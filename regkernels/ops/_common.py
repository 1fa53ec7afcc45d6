"""Argument checks shared by every public op (docs/index.md#bad-input): every message names the
op, the argument and the expected form. Backend selection is ``regkernels.ops._table``."""
from __future__ import annotations

import math
from typing import Sequence

import torch


def check_tensor(op: str, name: str, x, *, min_ndim: int | None = None, ndim: int | Sequence[int] | None = None,
                 floating: bool = True, form: str = "") -> torch.Tensor:
    """Check that ``x`` is a tensor of a floating dtype with the expected number of dims.

    Raises TypeError for a non-tensor or non-floating dtype and ValueError for a wrong
    ndim; every message names the op, the argument and the expected form.
    """
    what = f" {form}" if form else ""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor{what}; got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor{what}; got layout {x.layout} "
                        f"(call .to_dense() first)")
    if floating and not x.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must have a floating dtype (float16, bfloat16, float32, float64); got {x.dtype}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dims{what}; got shape {tuple(x.shape)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            raise ValueError(f"{op}: {name} must have {' or '.join(map(str, allowed))} dims{what}; got shape {tuple(x.shape)}")
    return x


def check_matrix(op: str, name: str, x) -> torch.Tensor:
    """A (..., m, n) floating tensor."""
    return check_tensor(op, name, x, min_ndim=2, form="(..., m, n)")


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    devs = {k: t.device for k, t in tensors.items() if isinstance(t, torch.Tensor)}
    uniq = set(devs.values())
    if len(uniq) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"{op}: all tensors must be on one device; got {listing}")
    return next(iter(uniq)) if uniq else torch.device("cpu")


def check_side(op: str, side: str) -> str:
    if side not in ("auto", "rows", "cols"):
        raise ValueError(f"{op}: side must be 'auto', 'rows' or 'cols'; got {side!r}")
    return side


def check_bounds(op: str, lo_name: str, lo: float, hi_name: str, hi: float, *, nonneg: bool = True) -> None:
    """``0 ≤ lo ≤ hi`` (or just ``lo ≤ hi`` with nonneg=False), finite real numbers (bools refused)."""
    check_number(op, lo_name, lo)
    check_number(op, hi_name, hi)
    if nonneg and lo < 0:
        raise ValueError(f"{op}: {lo_name} must be >= 0; got {lo_name}={lo}")
    if lo > hi:
        raise ValueError(f"{op}: need {lo_name} <= {hi_name}; got {lo_name}={lo}, {hi_name}={hi}")


def check_number(op: str, name: str, v, *, lo: float | None = None, hi: float | None = None, integer: bool = False):
    """A finite Python number (an int when ``integer``) in ``[lo, hi]``; bools and tensors refused.

    docs/index.md#numerical-behaviour: hyperparameters are finite Python numbers. ``True`` is an int to Python but never a
    bound or a rate here, and ``inf`` / ``nan`` would turn every result into inf or NaN silently.
    """
    kind = "an integer (a Python int)" if integer else "a real number (a Python int or float)"
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise TypeError(f"{op}: {name} must be {kind}, not {type(v).__name__}; got {v!r}")
    if not integer and not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be finite; got {name}={v}")
    if lo is not None and v < lo:
        raise ValueError(f"{op}: {name} must be >= {lo}; got {name}={v}")
    if hi is not None and v > hi:
        raise ValueError(f"{op}: {name} must be <= {hi}; got {name}={v}")
    return v
