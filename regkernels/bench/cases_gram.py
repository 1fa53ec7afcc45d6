"""Benchmark cases for the Gram-matrix penalties (docs/gram.md#conventions): single layers and whole models.

Single-layer cases time forward + backward of one ``(m, n)`` weight per op at the
shapes of real layers (conv weights as matrices: 64×576 is a 64-filter 3×3 conv over
64 channels, …; 1024×1024 and 4096×1024 are MLP layers). The model cases time
``penalty_multi(kind="frame")`` over every conv / linear weight of ResNet-18 and
ResNet-50 (shapes written out from the torchvision architectures). Every case also times the
forward alone and the backward alone (passes ``fwd`` / ``bwd``, ``_case.split_prepared``).

Weights are seeded ``N(0, 1/n)`` so every row has norm ≈ 1, like an initialised layer.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from regkernels.bench._case import SPLIT, Case, Prepared, compiled, max_rel_err, penalty_case, split_prepared
from regkernels.ops import gram as G
from regkernels.reference import gram as R

# this family's cases, in the order the runner lists them (appended below as they are built)
CASES: list[Case] = []


def register(case: Case) -> Case:
    CASES.append(case)
    return case


SHAPES = {
    "64x576": (64, 576),
    "128x1152": (128, 1152),
    "256x2304": (256, 2304),
    "512x4608": (512, 4608),
    "1024x1024": (1024, 1024),
    "4096x1024": (4096, 1024),
}
QUICK = "64x576"
SEED = 0
# SRIP's start vector b comes from this seed, both for the reference (given b) and for
# the public op (a generator seeded alike draws the identical float32 b).
SRIP_SEED = 1234
FRAME_A, FRAME_B = 0.5, 2.0


def _weight(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    fan_in = math.prod(shape[1:])
    w = torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)
    return w.to(device=device, dtype=dtype)


def _srip_b(device: torch.device, k: int) -> torch.Tensor:
    return torch.rand(k, generator=torch.Generator(device=device).manual_seed(SRIP_SEED),
                      device=device, dtype=torch.float32)


# Every SRIP provider draws its start vector b from the seeded generator inside the timed call,
# as the public op does (the positional b is only the float64 truth's copy of that start).
def _srip_reference(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return R.srip_penalty(W, _srip_b(W.device, min(W.shape[-2:])))


def _srip_compile() -> Callable:
    ref = compiled(R.srip_penalty)

    def call(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # the generator is not traceable: the draw stays outside the compiled reference
        return ref(W, _srip_b(W.device, min(W.shape[-2:])))
    return call


def _srip_public(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return G.srip_penalty(W, generator=torch.Generator(device=W.device).manual_seed(SRIP_SEED))


def _diversity_tau(n: int) -> float:
    # cosines of random rows of length n spread as N(0, 1/n): tau = 2.5/√n keeps ~1 % of the
    # pairs in the mask at every shape (a fixed tau = 0.1 selects none from n ≈ 2000 on, and
    # the case would time a penalty that is identically 0)
    return round(2.5 / math.sqrt(n), 4)


def _gram_flops(m: int, n: int, k: int) -> int:
    # one k×k Gram from (m, n): 2·m·n·k; the backward's product with the Gram gradient costs as much
    return 2 * (2 * m * n * k)


def _register_single_layer() -> None:
    for name, (m, n) in SHAPES.items():
        k = min(m, n)

        def make(device, dtype, m=m, n=n):
            return (_weight((m, n), device, dtype, SEED),)

        def make_srip(device, dtype, m=m, n=n, k=k):
            return (_weight((m, n), device, dtype, SEED), _srip_b(device, k))

        quick = name == QUICK
        params = {"m": m, "n": n}
        register(penalty_case("frame_penalty", name, R.frame_penalty, G.frame_penalty, make,
                     kwargs={"A": FRAME_A, "B": FRAME_B}, quick=quick, flops=_gram_flops(m, n, k), params=params))
        register(penalty_case("diversity_penalty", name, R.diversity_penalty, G.diversity_penalty, make,
                     kwargs={"tau": _diversity_tau(n)}, quick=quick, flops=_gram_flops(m, n, m), params=params))
        register(penalty_case("orthogonality_penalty", name, R.orthogonality_penalty, G.orthogonality_penalty, make,
                     quick=quick, flops=_gram_flops(m, n, k), params=params))
        register(penalty_case("mhe_penalty", name, R.mhe_penalty, G.mhe_penalty, make,
                     quick=quick, flops=_gram_flops(m, n, m), params=params))
        # the official code's angular half-space form (docs/gram.md#angular-energies): the same Gram,
        # an arccos per pair in the epilogue
        register(penalty_case("mhe_penalty", f"{name}-angular-half", R.mhe_penalty, G.mhe_penalty, make,
                     kwargs={"s": 2, "half": True, "angular": True}, quick=quick, flops=_gram_flops(m, n, m),
                     params={**params, "angular": True, "half": True}))
        # M x costs 4·m·n (W x and Wᵀ·, matrix-free); n_iter = 1 means 2 applications; ×2 backward
        register(penalty_case("srip_penalty", name, R.srip_penalty, _srip_public, make_srip,
                     quick=quick, flops=2 * 2 * (4 * m * n), eager_fn=_srip_reference, compile_factory=_srip_compile,
                     params=params))


def _resnet18_shapes() -> list[tuple[int, ...]]:
    """Conv / linear weight shapes of torchvision's resnet18 (BasicBlock, [2, 2, 2, 2])."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7)]
    c_in = 64
    for c, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            shapes += [(c, c_in, 3, 3), (c, c, 3, 3)]
            if block == 0 and (stride != 1 or c_in != c):
                shapes.append((c, c_in, 1, 1))  # downsample projection
            c_in = c
    return shapes + [(1000, 512)]


def _resnet50_shapes() -> list[tuple[int, ...]]:
    """Conv / linear weight shapes of torchvision's resnet50 (Bottleneck ×4, [3, 4, 6, 3])."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7)]
    c_in = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        c_out = 4 * width
        for block in range(blocks):
            shapes += [(width, c_in, 1, 1), (width, width, 3, 3), (c_out, width, 1, 1)]
            if block == 0:
                shapes.append((c_out, c_in, 1, 1))  # downsample projection
            c_in = c_out
    return shapes + [(1000, 2048)]


def _multi_flops(shapes: list[tuple[int, ...]], groups: int = 1) -> int:
    total = 0
    for s in shapes:
        m, n = s[0] // groups, math.prod(s[1:])  # per group: (out/g, in/g · prod(kernel))
        total += groups * _gram_flops(m, n, min(m, n))
    return total


def _register_stacks() -> None:
    """frame_penalty on stacks of many tiny matrices (the C++ kernel's batched path)."""
    for name, shape, quick in (("4096x4x4", (4096, 4, 4), True), ("4096x16x16", (4096, 16, 16), False)):
        def make(device, dtype, shape=shape):
            gen = torch.Generator(device="cpu").manual_seed(SEED)
            w = torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[-1])
            return (w.to(device=device, dtype=dtype),)

        b, m, n = shape
        register(penalty_case("frame_penalty", name, R.frame_penalty, G.frame_penalty, make,
                     kwargs={"A": FRAME_A, "B": FRAME_B}, quick=quick, flops=b * _gram_flops(m, n, min(m, n)),
                     params={"batch": b, "m": m, "n": n}))


def _multi_case(name: str, shapes: list[tuple[int, ...]], quick: bool, groups: int = 1) -> Case:
    """(Not registered: the list below registers it.) ``penalty_multi(weights, "frame", A, B, groups)``
    forward + backward over a whole model's weights (fresh leaves per call), and the forward and
    the backward alone (``split_prepared``)."""
    kw = {"A": FRAME_A, "B": FRAME_B, "groups": groups}

    def forward(fn: Callable, weights: list[torch.Tensor]) -> Callable:
        def run():
            leaves = [w.detach().requires_grad_(True) for w in weights]
            return leaves, fn(leaves, "frame", **kw)
        return run

    def backward(state):
        leaves, out = state
        out.sum().backward()
        return out.detach(), [w.grad for w in leaves]

    def setup(device: torch.device) -> Prepared:
        weights = [_weight(s, device, torch.float32, SEED + i) for i, s in enumerate(shapes)]
        truth = backward(forward(R.penalty_multi, [w.to(torch.float64) for w in weights])())
        return split_prepared(
            {"eager": forward(R.penalty_multi, weights),
             "compile": forward(compiled(R.penalty_multi), weights),
             "regkernels": forward(G.penalty_multi, weights)},
            backward,
            error_fwd=lambda state: max_rel_err(state[1], truth[0]),
            error_bwd=lambda out: max_rel_err(out, truth),
            flops=_multi_flops(shapes, groups),
            note=f"{len(shapes)} weights, kind=frame, A={FRAME_A}, B={FRAME_B}, groups={groups}",
        )

    params = {"model": name, "weights": len(shapes), "numel": sum(math.prod(s) for s in shapes), "groups": groups}
    return Case(op="penalty_multi", name=name, setup=setup, quick=quick, params=params, passes=SPLIT)


_register_single_layer()
_register_stacks()
register(_multi_case("resnet18", _resnet18_shapes(), quick=True))
# a depthwise conv (groups = channels): 1024 matrices of 1×9, the Regularizer's default path
register(_multi_case("depthwise1024", [(1024, 1, 3, 3)], quick=True, groups=1024))
register(_multi_case("resnet50", _resnet50_shapes(), quick=False))
