"""Benchmark cases of the conv-as-operator family (docs/conv.md).

Names are ``C_outxC_inxkxk@HxW`` (layer, input size). ``conv_to_matrix`` is timed forward
only, dense (the C++ / Triton kernel) and CSR (the composite builder, backend "torch"); bytes
moved: the dense T written once. ``conv_frame_penalty`` runs forward + backward at padding 1 with
A = 0.5, B = 2; the providers eager / compile are the explicit reference (T and its Gram),
regkernels the implicit class statistics (backend "torch", regkernels/composite/conv.py). Its two
large cases exceed the explicit path's size guard, so eager and compile record ValueError there
and the error of the implicit path is measured against itself in float64 (the tests check
implicit = explicit in float64 on a sweep). ``conv_orthogonality_penalty`` runs forward +
backward; the Sedghi ops forward only. All inputs are seeded; the float64 truth is computed on
first use.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from regkernels.bench._case import Case, Prepared, compiled, max_rel_err, penalty_case
from regkernels.ops import conv as C
from regkernels.reference import conv as R

# this family's cases, in the order the runner lists them (appended below as they are built)
CASES: list[Case] = []


def register(case: Case) -> Case:
    CASES.append(case)
    return case


FRAME_KW = dict(A=0.5, B=2.0, padding=1)


def _weight(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """He-scaled random conv weight (std sqrt(2 / fan_in)), the same for every dtype."""
    g = torch.Generator().manual_seed(seed)
    fan_in = math.prod(shape[1:])
    return (torch.randn(shape, generator=g, dtype=torch.float64) * math.sqrt(2.0 / fan_in)).to(device, dtype)


def _parse(name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """'64x64x3x3@32x32' -> ((64, 64, 3, 3), (32, 32))."""
    layer, size = name.split("-")[0].split("@")
    return tuple(map(int, layer.split("x"))), tuple(map(int, size.split("x")))


def _matrix_case(name: str, quick: bool = False) -> Case:
    """conv_to_matrix forward (padding 1); the error compares the densified result with a
    float64 dense matrix."""
    shape, size = _parse(name)
    layout = name.rsplit("-", 1)[1]

    def setup(device: torch.device) -> Prepared:
        w = _weight(shape, device, torch.float32)
        truth = R.conv_to_matrix(w.double(), size, padding=1)

        def provider(fn: Callable) -> Callable:
            return lambda: fn(w, size, padding=1, layout=layout)

        def error(out) -> float:
            return max_rel_err(out if layout == "dense" else out.to_dense(), truth)

        rows = shape[0] * math.prod(size)
        nbytes = rows * shape[1] * math.prod(size) * 4 if layout == "dense" else None
        return Prepared(providers={"eager": provider(R.conv_to_matrix),
                                   "compile": provider(compiled(R.conv_to_matrix)),
                                   "regkernels": provider(C.conv_to_matrix)},
                        error=error, bytes_moved=nbytes)

    return register(Case(op="conv_to_matrix", name=name, setup=setup, quick=quick))


def _frame_case(name: str, quick: bool = False) -> Case:
    """conv_frame_penalty forward + backward w.r.t. the weight. Unlike ``penalty_case`` the
    float64 truth is computed lazily: for layers over the explicit path's size guard the
    providers raise ValueError and no truth is ever needed."""
    shape, size = _parse(name)

    def setup(device: torch.device) -> Prepared:
        w = _weight(shape, device, torch.float32)
        truth: list = []

        def run(fn: Callable, weight: torch.Tensor):
            x = weight.detach().requires_grad_(True)
            out = fn(x, size, **FRAME_KW)
            out.backward()
            return out.detach(), x.grad

        def error(out) -> float:
            if not truth:
                try:
                    truth.append(run(R.conv_frame_penalty, w.double()))
                except ValueError:  # over the explicit path's size guard
                    truth.append(run(C.conv_frame_penalty, w.double()))
            return max_rel_err(out, truth[0])

        comp = compiled(R.conv_frame_penalty)
        _, explicit_bytes = R.frame_working_bytes(w, size, 1, 1, 1, 1, "auto")
        note = "" if explicit_bytes <= R.MAX_DENSE_BYTES else (
            f"the explicit path needs {explicit_bytes / 2**30:.1f} GiB (over its guard); max_rel_err is against the "
            "implicit path in float64")
        return Prepared(providers={"eager": lambda: run(R.conv_frame_penalty, w), "compile": lambda: run(comp, w),
                                   "regkernels": lambda: run(C.conv_frame_penalty, w)}, error=error, note=note)

    return register(Case(op="conv_frame_penalty", name=name, setup=setup, quick=quick))


def _ocnn_case(name: str, quick: bool = False) -> Case:
    shape = tuple(map(int, name.split("x")))
    return register(penalty_case("conv_orthogonality_penalty", name, R.conv_orthogonality_penalty,
                        C.conv_orthogonality_penalty, lambda device, dtype: (_weight(shape, device, dtype),),
                        quick=quick))


def _sedghi_case(op: str, name: str, extra: tuple = (), quick: bool = False) -> Case:
    shape, size = _parse(name)
    return register(penalty_case(op, name, getattr(R, op), getattr(C, op),
                        lambda device, dtype: (_weight(shape, device, dtype), size, *extra), grad=False, quick=quick))


_matrix_case("16x16x3x3@16x16-dense", quick=True)
_matrix_case("16x16x3x3@16x16-csr")
_matrix_case("64x64x3x3@8x8-dense")
_matrix_case("64x64x3x3@8x8-csr")

_frame_case("16x16x3x3@8x8", quick=True)
_frame_case("64x64x3x3@32x32")
_frame_case("256x256x3x3@8x8")

_ocnn_case("64x64x3x3", quick=True)
_ocnn_case("512x512x3x3")

# 1024 frequencies, one 64×64 complex matrix each
_sedghi_case("conv_singular_values", "16x16x3x3@8x8", quick=True)
_sedghi_case("conv_singular_values", "64x64x3x3@32x32")
_sedghi_case("clip_conv_singular_values", "16x16x3x3@8x8", extra=(0.8, 1.2), quick=True)
_sedghi_case("clip_conv_singular_values", "64x64x3x3@32x32", extra=(0.8, 1.2))
