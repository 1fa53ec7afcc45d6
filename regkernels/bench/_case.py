"""What a benchmark case is: the runner times ``Case``s; the families' lists are in ``cases_<family>.py``.

A ``Case`` names an op (the public op name) and a case (its shape or model, e.g.
``512x4608``, ``resnet50``, ``model-10M``). ``setup(device)`` builds the inputs and
returns a ``Prepared``: one zero-argument callable per provider (``eager`` = the
pure-torch reference, ``compile`` = ``torch.compile`` of that reference,
``regkernels`` = the public op with its default backend), an error function that
compares a provider's output with a float64 evaluation, and optionally the bytes
moved / flops of one call so the runner can report % of the machine's ceilings.

Each family module (``cases_<family>.py``) builds its literal ``CASES`` list; ``cases.all_cases``
joins them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

__all__ = ["Case", "Prepared", "penalty_case", "max_rel_err", "compiled"]


@dataclass
class Prepared:
    providers: dict[str, Callable[[], Any]]
    # error(output of a provider call) -> max relative error vs float64 (or None)
    error: Callable[[Any], float] | None = None
    bytes_moved: int | None = None
    flops: int | None = None
    note: str = ""
    # called before each provider's first call: providers that share (and mutate) one set of
    # buffers all start from the same state, so their errors compare like with like
    reset: Callable[[], None] | None = None


@dataclass
class Case:
    op: str
    name: str
    setup: Callable[[torch.device], Prepared]
    quick: bool = False
    devices: Sequence[str] = ("cpu", "cuda")
    tags: dict = field(default_factory=dict)


def max_rel_err(out, truth) -> float:
    """max |out − truth| / max |truth| over all tensors of (possibly nested) outputs."""
    if isinstance(out, (tuple, list)):
        errs = [max_rel_err(o, t) for o, t in zip(out, truth)]
        return max(errs) if errs else 0.0
    out = out.detach().to(torch.float64).cpu()
    truth = truth.detach().to(torch.float64).cpu()
    if out.numel() == 0:
        return 0.0
    scale = truth.abs().max().clamp_min(1e-300)
    return float((out - truth).abs().max() / scale)


def compiled(fn: Callable) -> Callable:
    """torch.compile of a reference, the ``compile`` provider (dynamic=False: fixed shapes)."""
    return torch.compile(fn, dynamic=False)


def penalty_case(op: str, name: str, reference_fn: Callable, public_fn: Callable,
                 make_inputs: Callable[[torch.device, torch.dtype], tuple], *, grad: bool = True,
                 kwargs: dict | None = None, quick: bool = False, bytes_moved=None, flops=None,
                 eager_fn: Callable | None = None, compile_factory: Callable[[], Callable] | None = None) -> Case:
    """Case for a differentiable op ``f(X, *rest, **kwargs)`` returning a tensor.

    ``reference_fn`` gives the float64 truth and, unless ``eager_fn`` / ``compile_factory``
    (which builds the compile provider's callable at setup) say otherwise, the eager and
    compile providers.

    With ``grad=True`` every provider runs forward and backward w.r.t. the first input
    (``out.sum().backward()``) and returns ``(out, grad)``; the error compares both with
    the float64 reference. ``make_inputs(device, dtype)`` returns the positional inputs;
    it must be deterministic (seeded) so the float64 copy matches.
    """
    kw = dict(kwargs or {})

    def setup(device: torch.device) -> Prepared:
        args = make_inputs(device, torch.float32)
        args64 = tuple(a.to(torch.float64) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                       for a in args)

        def runner(fn):
            def call(args=args):
                if not grad:
                    with torch.no_grad():
                        return fn(*args, **kw)
                x = args[0].detach().requires_grad_(True)
                out = fn(x, *args[1:], **kw)
                out.sum().backward()
                return out.detach(), x.grad
            return call

        truth = runner(reference_fn)(args64)
        comp = compile_factory() if compile_factory is not None else compiled(reference_fn)
        return Prepared(
            providers={"eager": runner(eager_fn or reference_fn), "compile": runner(comp),
                       "regkernels": runner(public_fn)},
            error=lambda out: max_rel_err(out, truth),
            bytes_moved=bytes_moved, flops=flops,
        )

    return Case(op=op, name=name, setup=setup, quick=quick)
