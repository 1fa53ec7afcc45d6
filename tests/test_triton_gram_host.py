"""Host side of the grouped Triton Gram kernels (``regkernels.triton.gram``, docs/gram.md): the
cached launch plan, what a cached call dispatches, the layout classes, the order of the tile
tables, the backward's two paths, MHE half without a concatenation, and the device guard.

Triton runs interpreted on CPU tensors here (``TRITON_INTERPRET=1``, conftest), so shapes are
small. The interpreter's launch copies every tensor argument through torch ops of its own;
those are excluded from the op counts (they do not exist on a GPU), everything else the
launchers and the autograd path dispatch is counted.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

pytest.importorskip("triton")

from regkernels import _ext  # noqa: E402
from regkernels.ops import gram as G  # noqa: E402
from regkernels.reference import gram as R  # noqa: E402
from regkernels.triton import gram as TG  # noqa: E402

pytestmark = pytest.mark.skipif(not _ext.triton_interpreted(), reason="host checks run on the interpreter (CPU)")

_LAUNCHED = ["_row_norm_kernel", "_gram_fwd_kernel", "_finalize_kernel", "_gram_coef_kernel",
             "_gram_product_kernel", "_gram_bwd_kernel", "_split_sum_kernel"]

# Declared budget of aten ops (interpreter launches excluded) for a cached forward + backward.
# Measured (torch 2.14): frame_penalty and mhe_penalty(half) 23, penalty_multi (4 weights) 41:
# views, 3 + 2 torch.empty of outputs and scratch buffers, autograd's ones_like, the split of the
# flat gradient into views, the accumulation into .grad, and a detach per op output that the
# custom op's autograd wrapper adds. The margin is for torch versions that decompose a little
# differently; a host-built table (lift_fresh, _to_copy) is refused whatever the count.
HOST_OPS_ONE = 26
HOST_OPS_MULTI = 46


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64).div(max(shape[-1], 1) ** 0.5).float()


class _Recorder(TorchDispatchMode):
    """Records every op dispatched while active. A launch of one of the module's kernels runs
    with the mode disabled (the interpreter's argument copies are not host work on a GPU)."""

    def __init__(self, ops: list):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class _QuietLaunch:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else str(self.kernel))
            with _disable_current_modes():
                return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def record(monkeypatch):
    """``record(fn)`` → (ops, launches) of ``fn()``, including the ops inside the custom ops."""
    ops, launches = [], []
    for name in _LAUNCHED:
        monkeypatch.setattr(TG, name, _QuietLaunch(getattr(TG, name), launches))
    # a dispatch mode is popped while it handles an op, so the custom ops' bodies (the launchers)
    # get a recorder of their own
    for name in ("gram_penalty_forward", "gram_penalty_backward_flat"):
        inner = getattr(TG, name)

        def wrapped(*args, _inner=inner, **kwargs):
            with _Recorder(ops):
                return _inner(*args, **kwargs)
        monkeypatch.setattr(TG, name, wrapped)

    def run(fn):
        ops.clear()
        launches.clear()
        with _Recorder(ops):
            fn()
        return list(ops), list(launches)
    return run


def _forbidden(ops) -> list[str]:
    """Host↔device copies, reads of a tensor value, tensors made from host data, concatenations."""
    bad = []
    for func, args, kwargs, out in ops:
        name = func.overloadpacket.__name__
        if name in ("lift_fresh", "lift_fresh_copy", "_local_scalar_dense", "cat", "repeat_interleave", "item"):
            bad.append(str(func))
        elif name == "_to_copy" and isinstance(out, torch.Tensor) and args[0].device != out.device:
            bad.append(f"{func} {args[0].device} -> {out.device}")
        elif name == "copy_" and args[0].device != args[1].device:
            bad.append(f"{func} {args[1].device} -> {args[0].device}")
    return bad


def _weights():
    return [_randn(8, 4, 3, 3).requires_grad_(), _randn(16, 8).requires_grad_(),
            _randn(6, 40).requires_grad_(), _randn(5, 3, 2, 2).requires_grad_()]


@pytest.mark.parametrize("which", ["frame_penalty", "penalty_multi", "mhe_half"])
def test_cached_call_host_work(record, which):
    W = _randn(40, 24).requires_grad_()
    ws = _weights()
    if which == "frame_penalty":
        def step():
            G.frame_penalty(W, 0.5, 1.5, backend="triton").backward()
        budget = HOST_OPS_ONE
    elif which == "penalty_multi":
        def step():
            G.penalty_multi(ws, "frame", backend="triton", A=0.5, B=1.5).sum().backward()
        budget = HOST_OPS_MULTI
    else:
        def step():
            G.mhe_penalty(W, 2, True, backend="triton").backward()
        budget = HOST_OPS_ONE
    TG._PLANS.clear()
    first, _ = record(step)
    ops, launches = record(step)
    names = [str(f) for f, *_ in ops]
    print(f"{which}: {len(ops)} ops on a cached call ({len(first)} on the first), {len(launches)} launches: {names}")
    assert _forbidden(ops) == []
    assert "aten.neg.default" not in names  # MHE half: no [W; −W] built
    assert len(ops) <= budget, names
    # the first call builds the plan (its tables come from host lists), the cached one does not
    assert any(f.overloadpacket.__name__ == "lift_fresh" for f, *_ in first)
    # fixed launches: forward 2 per layout class (norms, partials) and the finalize, backward 2
    # per class (coefficients, P·X); penalty_multi's list has rows and cols weights: 2 classes
    assert len(launches) == (9 if which == "penalty_multi" else 5)


def test_plan_cache_keys():
    TG._PLANS.clear()
    W = _randn(2, 40, 24)
    p1 = TG._plan([W], "frame", [0], [0.5, 1.5])
    assert TG._plan([W.clone()], "frame", [0], [0.5, 1.5]) is p1           # same shapes and strides
    assert TG._plan([W], "frame", [0], [0.2, 3.0]) is p1                    # params are launch scalars
    assert TG._plan([W], "frame", [1], [0.5, 1.5]) is not p1                # side
    assert TG._plan([W], "orthogonality", [0], []) is not p1                # kind
    assert TG._plan([W.mT.contiguous().mT], "frame", [0], [0.5, 1.5]) is not p1  # strides
    assert TG._plan([_randn(2, 40, 25)], "frame", [0], [0.5, 1.5]) is not p1    # shape
    assert TG._plan([W.half()], "frame", [0], [0.5, 1.5]) is not p1          # dtype
    assert TG._plan([W, W], "frame", [0, 0], [0.5, 1.5]) is not p1           # list
    assert len(TG._PLANS) == 7


def test_plan_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(TG, "PLAN_CACHE_SIZE", 3)
    TG._PLANS.clear()
    plans = [TG._plan([_randn(1, 5, 3 + i)], "frame", [0], [0.5, 1.5]) for i in range(5)]
    assert len(TG._PLANS) == 3 and list(TG._PLANS.values()) == plans[2:]


def test_pointer_table_follows_the_inputs():
    # a cached plan reads this call's inputs: its pointer table is rewritten when a pointer changes
    TG._PLANS.clear()
    mats = [_randn(2, 37, 11), _randn(1, 5, 40)]
    plan = TG._plan(mats, "frame", [0, 1], [0.5, 1.5])
    assert plan.ptrs.tolist() == [w.data_ptr() for w in mats]
    table = plan.ptrs
    assert TG._plan(mats, "frame", [0, 1], [0.5, 1.5]).ptrs is table     # unchanged: nothing rewritten
    other = [w.clone() + 1 for w in mats]
    values, _ = TG.gram_penalty_forward(other, "frame", [0, 1], [0.5, 1.5])
    assert TG._plan(other, "frame", [0, 1], [0.5, 1.5]) is plan
    assert plan.ptrs.tolist() == [w.data_ptr() for w in other]
    want = torch.cat([R.frame_penalty(other[0].double(), 0.5, 1.5, "rows"),
                      R.frame_penalty(other[1].double(), 0.5, 1.5, "cols")])
    torch.testing.assert_close(values.double(), want, atol=1e-5, rtol=1e-5)


def test_backward_uses_the_forwards_plan(monkeypatch):
    built = []
    init = TG._Plan.__init__

    def counting_init(self, *args, **kwargs):
        built.append(args)
        init(self, *args, **kwargs)
    monkeypatch.setattr(TG._Plan, "__init__", counting_init)
    TG._PLANS.clear()
    ws = _weights()
    for _ in range(2):
        G.penalty_multi(ws, "frame", backend="triton", A=0.5, B=1.5).sum().backward()
    assert len(built) == 1  # one plan for both passes of both steps


def test_backward_op_returns_one_flat_gradient():
    mats = [_randn(2, 5, 8), _randn(1, 7, 3).half().float()]
    _, stats = torch.ops.regkernels.gram_penalty_triton(mats, "frame", [0, 1], [0.5, 1.5])
    flat = torch.ops.regkernels.gram_penalty_triton_bwd(mats, "frame", [0, 1], [0.5, 1.5], stats, torch.ones(3))
    assert isinstance(flat, torch.Tensor) and flat.shape == (2 * 5 * 8 + 7 * 3,) and flat._base is None
    half = [w.half() for w in mats]
    _, stats = torch.ops.regkernels.gram_penalty_triton(half, "frame", [0, 1], [0.5, 1.5])
    flat16 = torch.ops.regkernels.gram_penalty_triton_bwd(half, "frame", [0, 1], [0.5, 1.5], stats, torch.ones(3))
    assert flat16.dtype == torch.float16  # written in the inputs' dtype by the kernel, no conversion pass


# ----------------------------------------------------------------- layouts, order, alignment

def test_layout_classes():
    TG._PLANS.clear()
    rows, cols, generic = _randn(2, 37, 16), _randn(1, 5, 40), _randn(1, 41, 13).mT
    plan = TG._plan([rows], "frame", [0], [0.5, 1.5])
    assert [ln.layout for ln in plan.launches] == [TG.LAYOUT_INNER_UNIT]
    assert plan.launches[0].align == 4  # 16-byte aligned, n = 16 and row stride 16: vector loads
    plan = TG._plan([cols], "frame", [1], [0.5, 1.5])
    assert [ln.layout for ln in plan.launches] == [TG.LAYOUT_GRAM_UNIT] and plan.launches[0].align == 4  # p = 40
    plan = TG._plan([generic], "frame", [0], [0.5, 1.5])
    assert [ln.layout for ln in plan.launches] == [TG.LAYOUT_GENERIC] and plan.launches[0].align == 1
    plan = TG._plan([rows[:, :, 1:]], "frame", [0], [0.5, 1.5])  # a shifted base: no alignment promise
    assert [ln.layout for ln in plan.launches] == [TG.LAYOUT_INNER_UNIT] and plan.launches[0].align == 1
    # three classes in one call: at most two launches, the smaller unit-stride class runs generic
    plan = TG._plan([rows, cols, generic], "frame", [0, 1, 0], [0.5, 1.5])
    assert [(ln.layout, sorted(ln.groups)) for ln in plan.launches] == [(TG.LAYOUT_GENERIC, [1, 2]),
                                                                       (TG.LAYOUT_INNER_UNIT, [0])]


def test_layouts_give_the_reference(monkeypatch):
    # the same matrices through each layout class (and the merged generic one) match float64
    mats = [_randn(2, 37, 16), _randn(1, 5, 40), _randn(1, 41, 13).mT, _randn(1, 20, 8)[:, :, 1:]]
    sides = [0, 1, 0, 0]
    grad = torch.randn(5)
    values, stats = TG.gram_penalty_forward(mats, "frame", sides, [0.5, 1.5])
    grads = TG.gram_penalty_backward(mats, "frame", sides, [0.5, 1.5], stats, grad)
    start = 0
    for W, sd, dW in zip(mats, sides, grads):
        X = W.double().requires_grad_()
        v = R.frame_penalty(X, 0.5, 1.5, ("rows", "cols")[sd])
        (v * grad[start:start + W.shape[0]].double()).sum().backward()
        torch.testing.assert_close(values[start:start + W.shape[0]].double(), v.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dW.double(), X.grad, atol=1e-5 * X.grad.abs().max().item(), rtol=1e-5)
        start += W.shape[0]


def test_tiles_in_descending_work():
    TG._PLANS.clear()
    mats = [_randn(1, 10, 8), _randn(2, 70, 50), _randn(1, 40, 200), _randn(3, 33, 9)]
    plan = TG._plan(mats, "frame", [0] * 4, [0.5, 1.5])
    (ln,) = plan.launches
    p = [w.shape[1] for w in mats]
    n = [w.shape[2] for w in mats]
    tiles = ln.tiles.tolist()
    work = [-(-p[g] // TG.BLOCK_J) * n[g] for g, _, _ in tiles]
    assert work == sorted(work, reverse=True) and work[0] > work[-1]
    assert sorted(map(tuple, tiles)) == sorted((g, b, ib) for g, w in enumerate(mats) for b in range(w.shape[0])
                                               for ib in range(-(-p[g] // TG.BLOCK_I)))
    ptiles = ln.ptiles.tolist()
    assert [p[g] for g, *_ in ptiles] == sorted((p[g] for g, *_ in ptiles), reverse=True)
    assert len(ptiles) == sum(w.shape[0] * -(-p[g] // TG.PRODUCT_BLOCK_I) * -(-n[g] // TG.BLOCK_N)
                              for g, w in enumerate(mats))


def test_plan_follows_the_tile_config(monkeypatch):
    """The plan's tile tables use the launch's blocks (64 on a GPU, 32 interpreted), so the tile
    config is part of the cache key: a plan built for one never serves the other."""
    TG._PLANS.clear()
    W = _randn(1, 130, 24)
    interp = TG._plan([W], "frame", [0], [0.5, 1.5])
    assert interp.cfg == TG.tile_config(W.dtype, interpreted=True)
    assert interp.launches[0].n_tiles == -(-130 // TG.BLOCK_I)
    monkeypatch.setattr(TG._ext, "triton_interpreted", lambda: False)
    gpu = TG._plan([W], "frame", [0], [0.5, 1.5])
    assert gpu is not interp and gpu.cfg == TG.tile_config(W.dtype, interpreted=False)
    assert gpu.launches[0].n_tiles == -(-130 // TG.GPU_BLOCK_I)
    assert gpu.splits == -(-130 // TG.GPU_BLOCK_J) and interp.splits == -(-130 // TG.BLOCK_J)
    # the product tiles do not depend on it
    assert gpu.launches[0].n_ptiles == interp.launches[0].n_ptiles
    assert TG._plan([W], "frame", [0], [0.5, 1.5]) is gpu
    monkeypatch.setattr(TG, "FP32_DOT", "ieee")  # another precision: another plan (its cfg is launched)
    ieee = TG._plan([W], "frame", [0], [0.5, 1.5])
    assert ieee is not gpu and ieee.cfg["DOT_PRECISION"] == "ieee"
    monkeypatch.setattr(TG, "GPU_BLOCK_I", 128)
    assert TG._plan([W], "frame", [0], [0.5, 1.5]).launches[0].n_tiles == 2


# ----------------------------------------------------------------- the backward's two paths

CASES = [("frame", 0, [0.5, 1.5]), ("frame", 1, [0.3, 1.2]), ("diversity", 0, [0.1, 1.0]),
         ("orthogonality", 1, []), ("mhe", 0, [2, 0.0, 1e-4, 0.0]), ("mhe", 0, [1, 1.0, 1e-4, 0.0])]


def _reference(W, kind, side, params):
    sd = ("rows", "cols")[side]
    if kind == "frame":
        return R.frame_penalty(W, params[0], params[1], sd)
    if kind == "diversity":
        return R.diversity_penalty(W, params[0], bool(params[1]))
    if kind == "orthogonality":
        return R.orthogonality_penalty(W, sd)
    return R.mhe_penalty(W, int(params[0]), bool(params[1]), params[2])


@pytest.mark.parametrize("path", ["product", "split", "split_bounded"])
@pytest.mark.parametrize("kind,side,params", CASES, ids=[f"{k}{s}{'_half' if k == 'mhe' and p[1] else ''}"
                                                         for k, s, p in CASES])
def test_backward_paths(monkeypatch, kind, side, params, path):
    W = _randn(2, 40, 36)
    p = W.shape[1 + side]
    # P_MAX_SIDE sends this p (40 or 36) to one path or the other
    monkeypatch.setattr(TG, "P_MAX_SIDE", 64 if path == "product" else 32)
    if path == "split_bounded":
        # partials capped at one float32 copy of dX: one backward split where the forward has 2
        monkeypatch.setattr(TG, "SPLIT_MAX_BYTES", 4 * W.numel())
        monkeypatch.setattr(TG, "TARGET_PROGRAMS", 10**6)
    plan = TG._plan([W], kind, [side], params)
    assert plan.product_path == (path == "product") and plan.max_p == p
    if path == "split_bounded":
        assert (plan.splits, plan.bwd_splits) == (2, 1)
    grad = torch.randn(2)
    values, stats = TG.gram_penalty_forward([W], kind, [side], params)
    (dW,) = TG.gram_penalty_backward([W], kind, [side], params, stats, grad)
    X = W.double().requires_grad_()
    v = _reference(X, kind, side, params)
    (v * grad.double()).sum().backward()
    torch.testing.assert_close(values.double(), v.detach(), atol=2e-5 * v.abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(dW.double(), X.grad, atol=2e-5 * X.grad.abs().max().item(), rtol=1e-5)


def test_mhe_half_reads_w_in_place():
    # [W; −W] is never built: W's own Gram (p = m, stats of m rows), W read through the pointer table
    W = _randn(3, 21, 10)
    plan = TG._plan([W], "mhe", [0], [2, 1.0, 1e-4, 0.0])
    assert plan.max_p == 21 and plan.ptrs.tolist() == [W.data_ptr()]
    values, stats = TG.gram_penalty_forward([W], "mhe", [0], [2, 1.0, 1e-4, 0.0])
    assert stats.numel() == 3 * 21 * 3 == TG.stats_numel([W], "mhe", [0], [2, 1.0, 1e-4, 0.0])
    torch.testing.assert_close(values.double(), R.mhe_penalty(W.double(), 2, True, 1e-4), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- device

def test_every_launch_runs_under_on_device(monkeypatch):
    # each launch happens inside on_device(<an input>) (the inputs' device and its current stream)
    depth, seen = [0], []

    @contextlib.contextmanager
    def guard(t):
        assert isinstance(t, torch.Tensor)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1
    monkeypatch.setattr(TG, "on_device", guard)

    class Check:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            seen.append(depth[0])
            return self.kernel[grid]
    for name in _LAUNCHED:
        monkeypatch.setattr(TG, name, Check(getattr(TG, name)))
    mats = [_randn(2, 37, 11), _randn(1, 5, 40)]
    for p_max in (1024, 0):
        monkeypatch.setattr(TG, "P_MAX_SIDE", p_max)
        values, stats = TG.gram_penalty_forward(mats, "diversity", [0, 0], [0.1, 1.0])
        TG.gram_penalty_backward(mats, "diversity", [0, 0], [0.1, 1.0], stats, torch.ones(3))
    assert len(seen) >= 10 and all(d == 1 for d in seen)


def test_gpu_budgets_cover_every_launched_kernel():
    assert sorted(TG.GPU_BUDGETS) == sorted(_LAUNCHED)
    for name in ("_gram_fwd_kernel", "_gram_coef_kernel", "_gram_product_kernel", "_gram_bwd_kernel"):
        # tensor cores for every dtype: native bf16/fp16, tf32x3 (or the split tf32 products) for float32
        assert set(TG.GPU_BUDGETS[name].mma_dtypes) == {"float16", "bfloat16", "float32"}
        # 8 warps over a 64 × 64 fp32 tile: one program per SM where a variant needs > 128 registers
        assert TG.GPU_BUDGETS[name].min_occupancy == 0.125 and TG.GPU_BUDGETS[name].note
    assert all(b.max_spill_bytes == 0 for b in TG.GPU_BUDGETS.values())
    assert all(b.min_occupancy >= 0.25 for k, b in TG.GPU_BUDGETS.items()
               if k in ("_row_norm_kernel", "_finalize_kernel", "_split_sum_kernel"))
