"""The conv family's GPU readiness checks that run without a GPU (issue 15): the host work of a
cached call (no host→device copy, no device→host read, no tensor built from host lists), the
Triton compile keys (geometry arguments are not specialized, so one compiled kernel serves many
geometries), the budgets each launched kernel declares, and the run-time index maps of the dense
``conv_to_matrix`` kernel through the interpreter (tile skip, wrap loop, int64 indexing)."""
from __future__ import annotations

import collections

import pytest
import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from regkernels import _ext
from regkernels.ops import conv as C
from regkernels.reference import conv as R

TRITON_ON_CPU = _ext.triton_interpreted()
needs_triton = pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton interpreter not available")

# ops that mean host work on the hot path: a tensor built from host data (torch.tensor), a
# read of a tensor's value on the host (.item(), bool(t), .tolist())
_HOST_OPS = ("aten.lift_fresh", "aten.lift_fresh_copy", "aten._local_scalar_dense", "aten.item")


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched, and the copies whose source and destination devices differ."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.device_copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        self.ops[f"aten.{name.split('.')[-1]}" if not name.startswith("aten.") else name] += 1
        opdef = custom_ops.OPDEFS.get(f"{func.namespace}::{func._opname}") if func.namespace == "regkernels" else None
        if opdef is not None:
            # a custom op is one dispatch; its body (the launchers, the plan caches) is where the
            # host work would be, so run that body under the counter too
            with self:
                out = opdef._init_fn(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_, torch.ops.aten._copy_from):
            src = args[1] if func.overloadpacket is torch.ops.aten.copy_ else args[0]
            dst = args[0] if func.overloadpacket is torch.ops.aten.copy_ else out
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device != dst.device:
                self.device_copies.append(str(func))
            if "device" in kwargs and kwargs["device"] is not None and torch.device(kwargs["device"]) != src.device:
                self.device_copies.append(str(func))
        return out


def _count(fn, monkeypatch) -> _OpCounter:
    """The ops ``fn`` dispatches, counting Triton launches as one op each: the interpreter runs a
    launch by copying its tensors to and from numpy (aten ops a GPU launch does not make)."""
    counter = _OpCounter()
    if TRITON_ON_CPU:
        from triton.runtime import interpreter
        launch = interpreter.GridExecutor.__call__

        def quiet_launch(self, *args, **kwargs):
            counter.ops["triton launch"] += 1
            with _disable_current_modes():
                return launch(self, *args, **kwargs)
        monkeypatch.setattr(interpreter.GridExecutor, "__call__", quiet_launch)
    with counter:
        fn()
    return counter


def _frame_step(backend: str, w: torch.Tensor):
    def step():
        w.grad = None
        C.conv_frame_penalty(w, (5, 6), 0.5, 2.0, padding=1, groups=2, backend=backend).backward()
    return step


def _matrix_step(padding_mode: str, w: torch.Tensor):
    def step():
        w.grad = None
        T = C.conv_to_matrix(w, (5, 6), padding=1, groups=2, padding_mode=padding_mode, backend="triton")
        T.sum().backward()
    return step


def _assert_no_host_work(counter: _OpCounter, what: str) -> None:
    host = {op: n for op, n in counter.ops.items() if op in _HOST_OPS}
    assert not host, f"{what}: host work on a cached call: {host}"
    assert not counter.device_copies, f"{what}: copies between devices on a cached call: {counter.device_copies}"


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON_ON_CPU else []))
def test_conv_frame_penalty_cached_call_has_no_host_work(backend, monkeypatch):
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    step = _frame_step(backend, w)
    step()  # the first call for this geometry builds and caches the class tables and counts
    counter = _count(step, monkeypatch)
    _assert_no_host_work(counter, f"conv_frame_penalty(backend={backend!r}) forward + backward")
    print(f"conv_frame_penalty({backend}) fwd+bwd: {sum(counter.ops.values())} aten ops", dict(counter.ops))


@needs_triton
@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_conv_to_matrix_dense_triton_cached_call_has_no_host_work(padding_mode, monkeypatch):
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    step = _matrix_step(padding_mode, w)
    step()
    counter = _count(step, monkeypatch)
    _assert_no_host_work(counter, f"conv_to_matrix(dense, {padding_mode}, backend='triton') forward + backward")
    print(f"conv_to_matrix({padding_mode}) fwd+bwd: {sum(counter.ops.values())} aten ops", dict(counter.ops))


# ----------------------------------------------------------------------------- compile keys

class _Recorder:
    """Stands in for a Triton kernel: records the launch arguments instead of running."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _compile_key(kernel, args, kwargs, honour_do_not_specialize=True):
    """The specialization part of Triton's compile key for one launch (the JITFunction binder's
    rule: each argument's type and its ==1 / divisible-by-16 attribute unless it is marked
    ``do_not_specialize``; constexprs by value)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, native_specialize_impl

    fn = getattr(kernel, "fn", kernel)
    dns = getattr(kernel, "kwargs", {}).get("do_not_specialize") or getattr(kernel, "do_not_specialize", None)
    jit = JITFunction(fn, do_not_specialize=dns if honour_do_not_specialize else None)
    launch_kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    values = list(args) + [launch_kwargs[p.name] for p in jit.params[len(args):]]
    key = []
    for p, v in zip(jit.params, values):
        if p.is_constexpr:
            key.append(("constexpr", str(v)))
        else:
            key.append(native_specialize_impl(BaseBackend, v, p.is_const, not p.do_not_specialize,
                                              not p.do_not_specialize_on_alignment))
    return tuple(key) + (kwargs.get("num_warps"),)


@needs_triton
def test_conv_to_matrix_geometries_share_one_compiled_kernel(monkeypatch):
    from regkernels.triton import conv_matrix as TM

    fwd, bwd = _Recorder(TM._conv_matrix_fwd_kernel), _Recorder(TM._conv_matrix_bwd_kernel)
    monkeypatch.setattr(TM, "_conv_matrix_fwd_kernel", fwd)
    monkeypatch.setattr(TM, "_conv_matrix_bwd_kernel", bwd)
    w = torch.randn(4, 3, 1, 3, 3)
    # differ in input size, stride, padding, output size (values 1 and multiples of 16 included);
    # alike in dtype, padding mode, dilation, rank, block sizes and T's column count modulo 16
    geometries = [((1, 16, 16), (1, 1, 1), (0, 1, 1)), ((1, 16, 32), (1, 2, 2), (0, 2, 0)),
                  ((1, 12, 24), (1, 1, 3), (0, 0, 1))]
    for size, stride, padding in geometries:
        T = TM.conv_to_matrix_dense(w, size, stride, padding, (1, 1, 1), 1, False)
        TM.conv_to_matrix_dense_backward(torch.zeros_like(T), w, size, stride, padding, (1, 1, 1), 1, False)
    for rec in (fwd, bwd):
        keys = {_compile_key(rec.kernel, *call) for call in rec.calls}
        assert len(keys) == 1, f"{rec.kernel.__name__}: {len(keys)} compiled variants for {len(rec.calls)} geometries"
        # the same launches with Triton's default specialization compile several variants: the
        # arguments marked do_not_specialize are what makes the geometries share one
        assert len({_compile_key(rec.kernel, *call, honour_do_not_specialize=False) for call in rec.calls}) > 1


@needs_triton
def test_conv_frame_stats_geometries_share_one_compiled_kernel(monkeypatch):
    from regkernels.triton import conv_frame as TF

    fwd, bwd = _Recorder(TF._class_stats_fwd_kernel), _Recorder(TF._class_stats_bwd_kernel)
    monkeypatch.setattr(TF, "_class_stats_fwd_kernel", fwd)
    monkeypatch.setattr(TF, "_class_stats_bwd_kernel", bwd)
    for shape, size in (((4, 3, 3, 3), (5, 6)), ((6, 5, 3, 3), (16, 16)), ((16, 1, 3, 3), (9, 17))):
        w = torch.randn(shape)
        _, Z, tab, zero, _ = TF._stats_problem(w.reshape(*shape[:2], 1, 3, 3), [1, *size], [1, 1, 1], [0, 1, 1],
                                               [1, 1, 1], 1, False, False, "test")
        X = TF.tap_gram(Z).view(1, shape[1], 9, shape[1], 9)
        d, r = TF.class_stats_forward(X, tab, zero)
        TF.class_stats_backward(X, tab, zero, torch.ones_like(d), torch.ones_like(r))
    for rec in (fwd, bwd):
        keys = {_compile_key(rec.kernel, *call) for call in rec.calls}
        assert len(keys) == 1, f"{rec.kernel.__name__}: {len(keys)} compiled variants for {len(rec.calls)} geometries"
        assert len({_compile_key(rec.kernel, *call, honour_do_not_specialize=False) for call in rec.calls}) > 1


# ----------------------------------------------------------------------------- budgets

def test_every_launched_conv_kernel_declares_a_budget():
    import pathlib
    import re

    from regkernels.triton._launch import Budget

    for name in ("conv_matrix", "conv_frame"):
        path = pathlib.Path(__file__).parent.parent / "regkernels" / "triton" / f"{name}.py"
        source = path.read_text()
        launched = set(re.findall(r"(\w+)\[[^\]]*\]\(", source)) & set(re.findall(r"def (\w+)\(", source))
        assert launched, name
        if not TRITON_ON_CPU:
            continue
        module = __import__(f"regkernels.triton.{name}", fromlist=["GPU_BUDGETS"])
        assert set(module.GPU_BUDGETS) == launched, (name, launched)
        assert all(isinstance(b, Budget) for b in module.GPU_BUDGETS.values())
