"""Host work per call of the GPU hot paths (issue 15, "host work per call"): after a warm-up call for
the same shapes, a forward + backward of ``frame_penalty`` and ``penalty_multi`` (ResNet-18 weight
list) on the Triton backend and a ``BetaLasso.step()`` on a 60-tensor model dispatch at most a small
declared number of ops, none of them a copy between devices, a pinned buffer, a ``torch.tensor`` of
host data or a read of a tensor value (``tests/hostwork.py`` says what is counted and flagged).

On this machine Triton runs interpreted (conftest sets ``TRITON_INTERPRET=1``); the interpreter's
own copies at each launch are excluded by ``HostWork``. On a GPU machine (``scripts/gpu_check.sh``)
the ``cuda`` cases run the compiled kernels, where host copies are visible as device changes.

The first half checks the counter itself, so a budget that passes means something.
"""
from __future__ import annotations

import os

import pytest
import torch

import regkernels
from regkernels.bench.cases_gram import _resnet18_shapes
from regkernels.bench.cases_optim import model_10m_shapes
from regkernels.optim import BetaLasso

from hostwork import HostWork

# ----------------------------------------------------------------------------- budgets
# Ops dispatched by one cached call, outside kernel launches. What a call cannot avoid: its
# outputs and the gradients (an allocation each), the views between weight and matrix shapes,
# autograd's seed gradient and its accumulation into ``.grad``. The launch plan, the problem and
# tile tables and the split buffers must come from a device-side cache: no op per call.
#
# frame_penalty fwd + bwd of one 64×96 weight, measured after issue 15's cached plans (15 ops):
# 5 allocations (values, stats, the backward's coefficient buffer P, the flat dW, autograd's
# seed), 5 views (batch view, values' view, dW's view back to W's shape), 3 detaches (the custom
# ops' autograd wrappers), the seed's ones_like and the split of the flat dW. Every one is an
# allocation or metadata; none moves data or reads a value. 16 leaves one to spare.
FRAME_FWD_BWD = 16
# penalty_multi over n weights: the frame_penalty ops once, plus per weight metadata only: the
# matrix and batch views in the forward, the flat dW's per-weight view and its view back to the
# weight's shape, the detach of each gradient output, and .grad (measured 155 for 21 weights:
# 15 + 6.7 per weight).
MULTI_BASE = 16
MULTI_PER_WEIGHT = 7
# BetaLasso.step() over any number of tensors: the fused op's placeholder and its non-zero counts
# output (2), and two to spare for a cache check of the chunk table that stays on the device.
BETA_LASSO_STEP = 4

# Interpreted Triton is slow: ResNet-18's channel counts divided by this (layers, kinds and kernel
# sizes kept; the stem's 3 input channels kept).
CHANNEL_DIVISOR = 16

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _check(hw: HostWork, budget: int, what: str) -> None:
    # pytest.fail, not assert: the report is the message, without the introspection of a Counter
    if hw.flagged:
        pytest.fail(f"host work a cached GPU call must not do (budget {budget} ops):\n{hw.report(what)}",
                    pytrace=False)
    if hw.total > budget:
        pytest.fail(f"over the budget of {budget} ops:\n{hw.report(what)}", pytrace=False)


# ----------------------------------------------------------------------------- the counter itself
def test_counter_flags_each_kind_of_host_work():
    x = torch.randn(8)
    reps = torch.full((8,), 2)
    with HostWork() as hw:
        torch.tensor([1.0, 2.0])  # (a)
        x.to("meta")  # (b) a copy to another device
        x[0].item()  # (c)
        torch.nonzero(x > 0)  # (c)
        torch.equal(x, x)  # (c)
        torch.repeat_interleave(x, reps)  # (d)
        torch.repeat_interleave(x, reps, output_size=16)  # fine: no size read back
        x * 2  # fine
    flagged = " | ".join(hw.flagged)
    for op in ("lift_fresh", "_to_copy", "_local_scalar_dense", "nonzero", "equal"):
        assert op in flagged, (op, hw.report("probe"))
    assert sum(n for k, n in hw.flagged.items() if "repeat_interleave" in k) == 1, hw.report("probe")
    assert not any(k.startswith("aten.mul") for k in hw.flagged)
    assert hw.ops["aten.mul.Tensor"] == 1


def test_counter_opens_custom_ops():
    """Host work inside a custom op's implementation is counted: the mode is pushed again for it."""

    @torch.library.custom_op("regkernels_test::host_table", mutates_args=())
    def host_table(x: torch.Tensor) -> torch.Tensor:
        return x + torch.tensor([1.0, 2.0, 3.0], device=x.device)

    x = torch.randn(3)
    with HostWork() as hw:
        host_table(x)
    assert hw.custom["regkernels_test.host_table.default"] == 1
    assert any(k.startswith("aten.lift_fresh") for k in hw.flagged), hw.report("custom op")
    assert hw.ops["aten.add.Tensor"] == 1


def test_counter_opens_cpp_custom_ops():
    """A C++ op's own allocations reach the mode too (the CUDA β-LASSO stages its chunk table
    inside regkernels::beta_lasso_step_): the op returns a fresh counts tensor, so at least one
    aten op is dispatched from inside it."""
    from regkernels.ops.beta_lasso import pack_hyper

    p, g, no_buf = torch.randn(5), torch.randn(5), torch.empty(0)
    hyper, flags = pack_hyper(0.1, 0.01, 1.0, 0.0, 0.0, 0.0, False, False)
    with HostWork() as hw:
        counts = torch.ops.regkernels.beta_lasso_step_([p], [g], [no_buf], hyper, flags)
    assert hw.custom["regkernels.beta_lasso_step_.default"] == 1
    assert counts.shape == (1,) and hw.total >= 1, hw.report("beta_lasso_step_")


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's copies exist only under TRITON_INTERPRET=1")
def test_counter_excludes_the_interpreters_own_copies():
    """The interpreter copies each tensor argument at a launch with aten ops a compiled launch does
    not dispatch; HostWork counts the launch, not those ops."""
    import triton
    import triton.language as tl

    @triton.jit
    def _add_one(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n) + 1, mask=offs < n)

    x = torch.randn(16)
    y = torch.empty_like(x)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Everything(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Everything.n += 1
            return func(*args, **(kwargs or {}))

    with Everything():
        _add_one[(1,)](x, y, 16, BLOCK=16)
    assert Everything.n > 0  # the interpreter does dispatch ops: the exclusion is needed
    with HostWork() as hw:
        _add_one[(1,)](x, y, 16, BLOCK=16)
    assert hw.total == 0 and hw.launches["_add_one"] == 1, hw.report("one launch")
    assert torch.equal(y, x + 1)


# ----------------------------------------------------------------------------- the budgets
@pytest.mark.parametrize("device", DEVICES)
def test_frame_penalty_triton_forward_backward(device):
    W = (torch.randn(64, 96, device=device) / 10).requires_grad_()

    def call():
        W.grad = None
        regkernels.frame_penalty(W, 0.5, 2.0, backend="triton").backward()

    call()  # warm-up: compiles, fills the plan cache for these shapes
    with HostWork() as hw:
        call()
    _check(hw, FRAME_FWD_BWD, "frame_penalty 64x96 forward + backward, backend='triton'")


def _resnet18_scaled() -> list[tuple[int, ...]]:
    out = []
    for s in _resnet18_shapes():
        c_in = s[1] if s[1] == 3 else s[1] // CHANNEL_DIVISOR  # the stem's RGB input stays
        out.append((s[0] // CHANNEL_DIVISOR, c_in, *s[2:]))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_penalty_multi_resnet18_triton_forward_backward(device):
    shapes = _resnet18_scaled() if device == "cpu" else _resnet18_shapes()
    assert len(shapes) == 21  # 20 convs (3 projections) and the classifier, as in ResNet-18
    weights = [(torch.randn(s, device=device) / 10).requires_grad_() for s in shapes]

    def call():
        for w in weights:
            w.grad = None
        regkernels.penalty_multi(weights, "frame", A=0.5, B=2.0, backend="triton").sum().backward()

    call()
    with HostWork() as hw:
        call()
    budget = MULTI_BASE + MULTI_PER_WEIGHT * len(weights)
    _check(hw, budget, f"penalty_multi ResNet-18 ({len(weights)} weights, channels /"
                       f"{CHANNEL_DIVISOR if device == 'cpu' else 1}) forward + backward, backend='triton'")


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("device", DEVICES)
def test_beta_lasso_step(device, momentum):
    shapes = model_10m_shapes()
    assert len(shapes) == 60
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.05).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    opt = BetaLasso(params, lr=0.1, lam=2e-5, beta=50.0, momentum=momentum,
                    weight_decay=1e-4 if momentum else 0.0)
    opt.step()  # warm-up: the first step makes momentum buffers and the chunk table
    with HostWork() as hw:
        opt.step()
    _check(hw, BETA_LASSO_STEP, f"BetaLasso.step() on {len(params)} tensors (momentum={momentum})")
