"""What a benchmark case is: the runner times ``Case``s; the families' lists are in ``cases_<family>.py``.

A ``Case`` names an op (the public op name) and a case (its shape or model, e.g.
``512x4608``, ``resnet50``, ``model-10M``). ``setup(device)`` builds the inputs and
returns a ``Prepared``: one zero-argument callable per provider (``eager`` = the
pure-torch reference, ``compile`` = ``torch.compile`` of that reference,
``regkernels`` = the public op with its default backend), an error function that
compares a provider's output with a float64 evaluation, and optionally the bytes
moved / flops of one call so the runner can report % of the machine's ceilings.

A case also states what it is, for the results JSON and the runner's selectors: ``params``
(its shape or model as a dict, e.g. ``{"m": 64, "n": 576}``), ``dtype`` (of its inputs) and
``passes``, the parts of a call it can time: ``("fwd",)`` for a forward-only op, ``("both",)``
for forward + backward as one call, ``("both", "fwd", "bwd")`` where ``Prepared.passes`` also
holds the forward and the backward alone. A backward alone is a ``Staged`` call: its forward
runs untimed before each timed backward. ``split_prepared`` builds all three passes of a
differentiable case from one forward per provider and one backward (``penalty_case`` and the
family modules' own differentiable cases all use it).

Each family module (``cases_<family>.py``) builds its literal ``CASES`` list; ``cases.all_cases``
joins them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

__all__ = ["Case", "Prepared", "Staged", "penalty_case", "split_prepared", "max_rel_err", "compiled"]

# the passes a case may time (``Case.passes``); "both" is forward + backward in one call
PASSES = ("fwd", "bwd", "both")
# ``Case.passes`` of a case whose ``Prepared`` comes from ``split_prepared``
SPLIT = ("both", "fwd", "bwd")


@dataclass(frozen=True)
class Staged:
    """A call whose ``before()`` runs untimed and whose ``timed(state)`` is the part measured
    (the backward alone: its forward must run before every call, as the graph is freed).
    Calling it runs both: code that does not time (first call, error check) treats it as any call."""
    before: Callable[[], Any]
    timed: Callable[[Any], Any]

    def __call__(self) -> Any:
        return self.timed(self.before())


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
    # "fwd" / "bwd": the forward alone and the backward alone (a ``Staged`` call per provider),
    # each with its own error function; present where the case's ``passes`` name them
    passes: dict[str, "Prepared"] = field(default_factory=dict)


@dataclass
class Case:
    op: str
    name: str
    setup: Callable[[torch.device], Prepared]
    quick: bool = False
    devices: Sequence[str] = ("cpu", "cuda")
    tags: dict = field(default_factory=dict)
    # the shape or model as structured values, e.g. {"batch": 4096, "m": 8, "n": 8}
    params: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    # the whole call first: ("fwd",) forward only, ("both",) forward + backward unsplit,
    # ("both", "fwd", "bwd") split as well (module docstring)
    passes: tuple[str, ...] = ("both",)


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


def split_prepared(forwards: dict[str, Callable[[], Any]], backward: Callable[[Any], Any],
                   error_fwd: Callable[[Any], float | None] | None, error_bwd: Callable[[Any], float | None] | None,
                   **prepared: Any) -> Prepared:
    """``Prepared`` of a differentiable case, split (its ``Case.passes`` are ``SPLIT``).

    ``forwards[provider]()`` runs one provider's forward with autograd recording, as in training,
    and returns a state that keeps the graph alive (e.g. ``(leaf, out)``); ``backward(state)``
    runs the backward and returns what the whole call returns (e.g. ``(value, grads)``). From
    them, per provider:

    - the whole call (``providers``, pass "both"): ``backward(forward())``, checked by ``error_bwd``;
    - ``passes["fwd"]``: ``forward()``, its state returned (the runner holds it, graph and all,
      until it has checked it), checked by ``error_fwd`` (the value only);
    - ``passes["bwd"]``: ``Staged(forward, backward)``, the forward untimed before each timed
      backward, checked by ``error_bwd`` (value and gradients).

    A forward must leave no gradient from an earlier call where ``backward`` reads one: it
    differentiates fresh leaves (``w.detach().requires_grad_(True)``), or it sets the ``.grad``
    of the shared tensors it differentiates to None first (untimed in the "bwd" pass), so
    repeated calls give the same gradients. An error function may return None (nothing to
    compare, e.g. a model's own training step). ``prepared``: the whole call's other ``Prepared``
    fields (``bytes_moved``, ``flops``, ``note``, ``reset``); the passes fall back to its note and
    reset (the runner's rule).
    """
    return Prepared(
        providers={p: (lambda f=f: backward(f())) for p, f in forwards.items()},
        error=error_bwd,
        passes={"fwd": Prepared(providers=dict(forwards), error=error_fwd),
                "bwd": Prepared(providers={p: Staged(f, backward) for p, f in forwards.items()}, error=error_bwd)},
        **prepared)


def penalty_case(op: str, name: str, reference_fn: Callable, public_fn: Callable,
                 make_inputs: Callable[[torch.device, torch.dtype], tuple], *, grad: bool = True,
                 kwargs: dict | None = None, quick: bool = False, bytes_moved=None, flops=None,
                 eager_fn: Callable | None = None, compile_factory: Callable[[], Callable] | None = None,
                 params: dict | None = None, dtype: torch.dtype = torch.float32) -> Case:
    """Case for a differentiable op ``f(X, *rest, **kwargs)`` returning a tensor.

    ``reference_fn`` gives the float64 truth and, unless ``eager_fn`` / ``compile_factory``
    (which builds the compile provider's callable at setup) say otherwise, the eager and
    compile providers.

    With ``grad=True`` every provider runs forward and backward w.r.t. the first input
    (``out.sum().backward()``) and returns ``(out, grad)``; the error compares both with
    the float64 reference; it is also split into ``passes`` "fwd" (the forward with autograd
    recording, as in training; error of the value) and "bwd" (the backward alone, its forward
    run untimed first). ``make_inputs(device, dtype)`` returns the positional inputs (``dtype``:
    the case's); it must be deterministic (seeded) so the float64 copy matches.
    """
    kw = dict(kwargs or {})

    def setup(device: torch.device) -> Prepared:
        args = make_inputs(device, dtype)
        args64 = tuple(a.to(torch.float64) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                       for a in args)
        providers = {"eager": eager_fn or reference_fn,
                     "compile": compile_factory() if compile_factory is not None else compiled(reference_fn),
                     "regkernels": public_fn}
        if not grad:
            def call(fn, args=args):
                with torch.no_grad():
                    return fn(*args, **kw)

            truth = call(reference_fn, args64)
            return Prepared(providers={p: (lambda fn=fn: call(fn)) for p, fn in providers.items()},
                            error=lambda out: max_rel_err(out, truth), bytes_moved=bytes_moved, flops=flops)

        def forward(fn, args=args):
            def run():  # a fresh leaf per call: no gradient carries over
                x = args[0].detach().requires_grad_(True)
                return x, fn(x, *args[1:], **kw)
            return run

        def backward(state):
            x, out = state
            out.sum().backward()
            return out.detach(), x.grad

        truth = backward(forward(reference_fn, args64)())
        return split_prepared({p: forward(fn) for p, fn in providers.items()}, backward,
                              error_fwd=lambda state: max_rel_err(state[1], truth[0]),
                              error_bwd=lambda out: max_rel_err(out, truth), bytes_moved=bytes_moved, flops=flops)

    return Case(op=op, name=name, setup=setup, quick=quick, params=dict(params or {}), dtype=dtype,
                passes=SPLIT if grad else ("fwd",))
