"""Counting the host work of a region of code: every op it dispatches, and the ops that would cost a
GPU run a copy between host and device or a synchronizing read of a tensor value (issue 15, "host
work per call"; used by tests/test_host_budget.py).

``HostWork`` is a ``TorchDispatchMode``. Three design points:

* **Custom ops are opened.** A mode's handler runs with the mode popped, so the ops a custom op's
  implementation dispatches (the Gram launch plan is built inside ``regkernels::gram_penalty_triton``;
  the β-LASSO chunk table inside ``regkernels::beta_lasso_step_``'s C++ kernel) would be invisible.
  For an op outside the ``aten`` namespace the handler pushes the mode again and redispatches the
  op to the backend keys below ``Python``, so its implementation's ops, Python or C++, reach the
  mode. What is counted are the leaves: aten ops (and any op that does not open); the custom ops
  themselves are listed apart (``custom``); ``profiler`` markers (``record_function``, which
  ``Optimizer.step`` opens) are not counted.
* **Kernel launches are excluded, precisely.** Under ``TRITON_INTERPRET=1`` a launch is
  ``triton.runtime.interpreter.GridExecutor.__call__``, which copies every tensor argument's
  storage to host tensors and back with aten ops (``new_empty``, ``set_``, ``copy_``): ~10 ops per
  argument that a compiled launch does not dispatch at all. While the mode is active that method
  is wrapped: ops dispatched inside it are not counted, and the launch is counted by kernel name
  instead (``launches``). Nothing else is excluded.
* **What is flagged** (``flagged``), whatever the budget:
  (a) ``aten.lift_fresh`` / ``lift_fresh_copy``: a ``torch.tensor(...)`` of host data;
  (b) a copy between devices: any op whose tensor arguments and results lie on more than one
      device (``_to_copy``, ``to``, ``copy_``, an index on another device, …; 0-dim CPU tensors
      are scalars and do not count), and any op that pins memory (``pin_memory=True``,
      ``_pin_memory``);
  (c) a read of a tensor value on the host: ``_local_scalar_dense``, ``item``, ``is_nonzero``,
      ``nonzero``, ``equal``;
  (d) ``repeat_interleave`` with a tensor of repeats and no ``output_size`` (its output size is a
      device→host read).
  On CPU, (b) can only see pinning: a ``.to(device)`` of a CPU tensor is a no-op there. Host-made
  tensors are caught by (a) and the plan building by the op count itself.
"""
from __future__ import annotations

import collections
import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["HostWork"]

_BELOW_PYTHON = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)

_LIFT = {"lift_fresh", "lift_fresh_copy"}
_VALUE_READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal"}
_PIN = {"_pin_memory", "pin_memory"}


def _flag(func, args, kwargs, out) -> str | None:
    """Why ``func`` is host work a GPU call must not do (None when it is not)."""
    name = func._schema.name.split("::", 1)[-1]
    if name in _LIFT:
        return "torch.tensor of host data"
    if name in _VALUE_READS:
        return "reads a tensor value on the host"
    if name == "repeat_interleave" and isinstance(args[0] if func._overloadname == "Tensor" else
                                                 (args[1] if len(args) > 1 else kwargs.get("repeats")),
                                                 torch.Tensor) and kwargs.get("output_size") is None:
        return "repeat_interleave with tensor repeats and no output_size (reads the size back)"
    if name in _PIN or kwargs.get("pin_memory"):
        return "pins host memory"
    devices = {t.device for t in tree_leaves((args, kwargs, out))
               if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}
    if len(devices) > 1:
        return "copies between devices " + " and ".join(sorted(map(str, devices)))
    return None


class HostWork(TorchDispatchMode):
    """``with HostWork() as hw: ...`` then ``hw.total``, ``hw.ops``, ``hw.flagged``, ``hw.report()``.

    ``ops``: Counter of leaf op names dispatched outside kernel launches. ``flagged``: Counter of
    ``"op: reason"``. ``launches``: Counter of kernel names launched (interpreter only).
    ``custom``: Counter of custom ops opened.
    """

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.flagged: collections.Counter[str] = collections.Counter()
        self.launches: collections.Counter[str] = collections.Counter()
        self.custom: collections.Counter[str] = collections.Counter()
        self._in_launch = 0
        self._depth = 0
        self._unpatch = None

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    # ------------------------------------------------------------ the interpreter's launch boundary
    def _patch_launches(self) -> None:
        try:
            from triton.runtime import interpreter
        except ImportError:  # no Triton: nothing launches through the interpreter
            return
        original = interpreter.GridExecutor.__call__
        work = self

        @functools.wraps(original)
        def launch(executor, *args, **kwargs):
            work.launches[executor.fn.__name__] += 1
            work._in_launch += 1
            try:
                return original(executor, *args, **kwargs)
            finally:
                work._in_launch -= 1

        interpreter.GridExecutor.__call__ = launch

        def unpatch():
            interpreter.GridExecutor.__call__ = original
        self._unpatch = unpatch

    def __enter__(self):
        # re-entered from __torch_dispatch__ to open a custom op: patch once, at the outermost entry
        if self._depth == 0:
            self._patch_launches()
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._depth -= 1
            if self._depth == 0 and self._unpatch is not None:
                self._unpatch()
                self._unpatch = None

    # ------------------------------------------------------------ counting
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_launch:
            return func(*args, **kwargs)
        if func.namespace == "profiler":  # record_function markers (optimizer.step has them): no work
            return func(*args, **kwargs)
        if func.namespace != "aten":
            self.custom[str(func)] += 1
            keys = None
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    k = torch._C._dispatch_keys(t)
                    keys = k if keys is None else keys | k
            if keys is not None:
                with self:  # the implementation's own ops reach this mode too
                    return func.redispatch(keys & _BELOW_PYTHON, *args, **kwargs)
        out = func(*args, **kwargs)
        name = str(func)
        self.ops[name] += 1
        why = _flag(func, args, kwargs, out)
        if why is not None:
            self.flagged[f"{name}: {why}"] += 1
        return out

    def report(self, title: str = "") -> str:
        """The counts, most frequent first: what a failing budget prints."""
        lines = [f"{title}: {self.total} ops outside kernel launches"
                 f" ({sum(self.launches.values())} launches: {dict(self.launches)})"]
        if self.flagged:
            lines.append("  flagged:")
            lines += [f"    {n:4d}  {what}" for what, n in self.flagged.most_common()]
        lines.append("  ops:")
        lines += [f"    {n:4d}  {op}" for op, n in self.ops.most_common()]
        if self.custom:
            lines.append("  custom ops opened: " + ", ".join(f"{op} ×{n}" for op, n in self.custom.items()))
        return "\n".join(lines)
