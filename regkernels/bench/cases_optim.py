"""Benchmark cases of the fused β-LASSO step (docs/beta_lasso.md#update-rule).

``model-10M``: 10M parameters over 60 tensors of mixed sizes (conv / linear / bias shapes of
a mid-sized CNN); ``tensor-16M``: one 16M-element tensor; ``model-10M-momentum``: the
first case with momentum 0.9 and weight decay. eager = the per-tensor torch reference loop,
compile = torch.compile of that loop, regkernels = ``BetaLasso.step()`` (one fused launch).
"""
from __future__ import annotations

import torch

from regkernels.bench._case import Case, Prepared, compiled, max_rel_err
from regkernels.optim import BetaLasso
from regkernels.reference.beta_lasso import beta_lasso_update_

# this family's cases, in the order the runner lists them (appended below as they are built)
CASES: list[Case] = []


def register(case: Case) -> Case:
    CASES.append(case)
    return case


# paper-like hyper-parameters: lam = 2e-5, beta = 50 (threshold 1e-3)
HYPER = dict(lr=0.1, lam=2e-5, beta=50.0)


def model_10m_shapes() -> list[tuple[int, ...]]:
    """60 tensors, 10.0M elements: 3×3 convs, biases, 1×1 convs, two linear layers."""
    shapes: list[tuple[int, ...]] = []
    for c in range(32, 305, 16):  # 18 stages
        shapes += [(c, c, 3, 3), (c,), (c, c // 2, 1, 1)]
    shapes += [(2048, 1536), (2048,), (1000, 844), (1000,), (256,), (336,)]
    return shapes


def _make(shapes, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [(torch.randn(s, generator=g) * 0.05).to(device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    return params, grads


def _beta_lasso_case(name: str, shapes: list[tuple[int, ...]], momentum: float, weight_decay: float,
                     quick: bool) -> Case:
    hyper = dict(HYPER, momentum=momentum, weight_decay=weight_decay)

    def setup(device: torch.device) -> Prepared:
        numel = sum(torch.Size(s).numel() for s in shapes)

        def reference_step(params, grads, bufs):
            for i, (p, g) in enumerate(zip(params, grads)):
                bufs[i] = beta_lasso_update_(p, g, bufs[i], **hyper)
            return params

        p64, g64 = _make(shapes, device, torch.float64)
        truth = reference_step(p64, g64, [None] * len(shapes))
        # entries whose float64 pre-threshold value u lies within ~8 float32 ulps of beta·lam
        # (ulps of the operands: θ − lr·g cancels) are decided by rounding, kept in one precision
        # and zeroed in the other: they are excluded from the error
        thr = hyper["beta"] * hyper["lam"]
        decided = []
        for p0, g in zip(*_make(shapes, device, torch.float64)):
            u = p0.clone()
            beta_lasso_update_(u, g, None, **dict(hyper, beta=0.0))
            slack = 1e-6 * (p0.abs() + hyper["lr"] * g.abs() + thr)
            decided.append((u.abs() - thr).abs() > slack)

        def error(out) -> float:
            return max_rel_err([o[m] for o, m in zip(out, decided)], [t[m] for t, m in zip(truth, decided)])

        # one set of buffers for all providers: the same memory placement for each (separate
        # allocations differ by up to ~15 % in achieved bandwidth on the same machine)
        start, grads = _make(shapes, device)
        params = [p.clone() for p in start]
        bufs: list[torch.Tensor | None] = [None] * len(shapes)
        for p, g in zip(params, grads):
            p.grad = g
        opt = BetaLasso(params, **hyper)

        def reset() -> None:
            for p, p0 in zip(params, start):
                p.copy_(p0)
            bufs[:] = [None] * len(shapes)
            opt.state.clear()

        def eager_provider(fn):
            return lambda: fn(params, grads, bufs)

        def fused():
            opt.step()
            return params

        streams = 5 if momentum else 3  # θ, g read, θ written (+ buf read and written)
        return Prepared(
            providers={"eager": eager_provider(reference_step), "compile": eager_provider(compiled(reference_step)),
                       "regkernels": fused},
            error=error,
            note="max_rel_err excludes entries within 8 float32 ulps of the threshold beta·lam",
            reset=reset,
            bytes_moved=streams * 4 * numel,
        )

    params = {"tensors": len(shapes), "numel": sum(torch.Size(s).numel() for s in shapes), "momentum": momentum,
              "weight_decay": weight_decay}
    # one optimizer step: no backward to split off
    return register(Case(op="beta_lasso", name=name, setup=setup, quick=quick, params=params, passes=("fwd",)))


_beta_lasso_case("model-10M", model_10m_shapes(), 0.0, 0.0, quick=True)
_beta_lasso_case("tensor-16M", [(16 * 1024 * 1024,)], 0.0, 0.0, quick=True)
_beta_lasso_case("model-10M-momentum", model_10m_shapes(), 0.9, 1e-4, quick=False)
