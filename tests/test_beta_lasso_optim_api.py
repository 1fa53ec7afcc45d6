"""BetaLasso as a torch.optim citizen (docs/beta_lasso.md#tensor-learning-rate,
#torchoptim-flags, #fused-kernels): a Tensor lr (eager and under torch.compile with an LR
scheduler), SGD's constructor flags, and dense non-contiguous layouts through the fused kernel.
Oracle: the per-tensor reference, bit for bit in float32."""
from __future__ import annotations

import copy

import pytest
import torch

from regkernels import _ext
from regkernels.optim import BetaLasso

needs_ext = pytest.mark.skipif(not _ext.HAS_C, reason="compiled extension not built")

CFG = dict(lam=0.02, beta=1.0, momentum=0.9, weight_decay=1e-2)


def _grads(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def _run(params, opt, grads, sched=None, step=None):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = torch.empty_like(p).copy_(g)  # the parameter's layout
        (step or opt.step)()
        if sched is not None:
            sched.step()
    return params


# ------------------------------------------------------------------------------ Tensor lr
@needs_ext
@pytest.mark.parametrize("backend", [None, "reference"])
def test_tensor_lr_equals_float_lr(backend):
    """A float64 Tensor lr holds the float's value exactly: the same update, fused or reference."""
    shapes = [(7, 5), (40,)]
    grads = _grads(shapes, 6)
    a = [torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in shapes]
    b = [p.clone() for p in a]
    _run(a, BetaLasso(a, lr=torch.tensor(0.05, dtype=torch.float64), **CFG, backend=backend), grads)
    _run(b, BetaLasso(b, lr=0.05, **CFG, backend=backend), grads)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@needs_ext
def test_tensor_lr_changed_in_place_reaches_the_planned_step():
    """Schedulers fill_ a Tensor lr: the cached plan reads its value every step. float32 Tensor lr,
    fused vs reference bit for bit; a param group with its own Tensor lr."""
    shapes = [(9, 4), (33,)]
    grads = _grads(shapes, 8)
    runs = []
    for backend in (None, "reference"):
        ps = [torch.randn(s, generator=torch.Generator().manual_seed(2)) for s in shapes]
        lr0, lr1 = torch.tensor(0.1), torch.tensor(0.03)
        opt = BetaLasso([{"params": [ps[0]]}, {"params": [ps[1]], "lr": lr1}], lr=lr0, **CFG, backend=backend)
        for k, gs in enumerate(grads):
            _run(ps, opt, [gs])
            lr0.fill_(0.1 * 0.7 ** (k + 1))
            lr1.mul_(0.5)
        runs.append(ps)
        if backend is None:
            assert opt._plan is not None and not opt._plan.reference
    assert all(torch.equal(x, y) for x, y in zip(*runs))


@pytest.mark.parametrize("lr, err, match", [
    (torch.tensor([0.1]), ValueError, r"BetaLasso: a Tensor lr must be 0-dim; got shape \(1,\)"),
    (torch.tensor(1), TypeError, r"BetaLasso: a Tensor lr must be floating .*got torch.int64"),
    (torch.tensor(-0.1), ValueError, r"BetaLasso: lr must be finite and >= 0; got lr=-0.1"),
    (torch.tensor(float("nan")), ValueError, r"BetaLasso: lr must be finite and >= 0; got lr=nan"),
])
def test_tensor_lr_refused(lr, err, match):
    with pytest.raises(err, match=match):
        BetaLasso([torch.zeros(3)], lr=lr, lam=0.1, beta=1.0)
    opt = BetaLasso([torch.zeros(3)], lr=0.1, lam=0.1, beta=1.0)
    with pytest.raises(err, match=match):
        opt.add_param_group({"params": [torch.zeros(2)], "lr": lr})


@pytest.mark.parametrize("backend", [pytest.param(None, marks=needs_ext), "reference"])
def test_tensor_lr_set_bad_after_construction_refused_at_step(backend):
    p = torch.zeros(4)
    lr = torch.tensor(0.1)
    opt = BetaLasso([p], lr=lr, lam=0.1, beta=1.0, backend=backend)
    for _ in range(2):  # the full pass, then the planned step
        p.grad = torch.ones(4)
        opt.step()
    lr.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"BetaLasso: lr must be finite and >= 0; got lr=inf"):
        opt.step()


@needs_ext
def test_compiled_step_with_steplr_does_not_recompile_per_lr():
    """torch.compile(opt.step) with StepLR halving a Tensor lr every step for 12 steps: the step
    compiles for the first step and once more when the momentum buffers exist (torch 2.14: 1 graph
    after step 1, 2 after every later step), never per lr. Asserted: at most 4 graphs after step 2
    and no new graph in steps 3-12 (11 lr changes); parameters and counts equal the eager run's."""
    compiled_graphs = []

    def counting_backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    shapes = [(16, 8), (32,)]
    grads = _grads(shapes, 12)
    results = []
    for compiled in (True, False):
        torch._dynamo.reset()
        ps = [torch.randn(s, generator=torch.Generator().manual_seed(3)) for s in shapes]
        opt = BetaLasso(ps, lr=torch.tensor(0.1), **CFG)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        step = torch.compile(opt.step, backend=counting_backend) if compiled else opt.step
        counts = []
        for gs in grads:
            _run(ps, opt, [gs], sched, step)
            counts.append(len(compiled_graphs))
        if compiled:
            assert 1 <= counts[1] <= 4 and counts[-1] == counts[1], counts
            assert opt.param_groups[0]["lr"].item() == torch.tensor(0.1 * 0.5**12).item()  # float32
        results.append((ps, opt.nonzeros()))
    (a, nz_a), (b, nz_b) = results
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert nz_a == nz_b


# ------------------------------------------------------------------------ torch.optim flags
@needs_ext
@pytest.mark.parametrize("cfg", [dict(lam=0.02, beta=1.0), CFG,
                                 dict(lam=0.02, beta=2.0, momentum=0.9, nesterov=True, weight_decay=5e-3)])
def test_maximize_fused_equals_reference_and_negated_gradient(cfg):
    shapes = [(7, 13), (4097,), (33, 5, 3, 3)]
    grads = _grads(shapes, 20)
    a = [torch.randn(s, generator=torch.Generator().manual_seed(4)) * 0.1 for s in shapes]
    b, c = [p.clone() for p in a], [p.clone() for p in a]
    fused = BetaLasso(a, lr=0.05, **cfg, maximize=True)
    _run(a, fused, grads)
    _run(b, BetaLasso(b, lr=0.05, **cfg, maximize=True, backend="reference"), grads)
    _run(c, BetaLasso(c, lr=0.05, **cfg), [[-g for g in gs] for gs in grads])
    assert not fused._plan.reference
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))


@needs_ext
def test_maximize_leaves_grad_and_switches_per_group():
    p, q = torch.randn(10), torch.randn(10)
    opt = BetaLasso([{"params": [p], "maximize": True}, {"params": [q]}], lr=0.1, lam=0.0, beta=0.0)
    g = torch.ones(10)
    p.grad, q.grad = g.clone(), g.clone()
    p0, q0 = p.clone(), q.clone()
    opt.step()
    assert torch.equal(p.grad, g)
    assert torch.equal(p, p0 + 0.1) and torch.equal(q, q0 - 0.1)
    opt.param_groups[0]["maximize"] = False  # a new plan: the launch's negation changes
    p0 = p.clone()
    opt.step()
    assert torch.equal(p, p0 - 0.1)


def test_flags_stored_like_sgd_and_state_dict_round_trips():
    p = torch.zeros(3)
    opt = BetaLasso([p], lr=0.1, lam=0.1, beta=1.0, maximize=True, fused=None, foreach=None)
    sgd = torch.optim.SGD([torch.zeros(3)], lr=0.1, maximize=True)
    for name in ("maximize", "foreach", "fused", "differentiable"):
        assert opt.defaults[name] == opt.param_groups[0][name] == sgd.defaults[name]
    sd = copy.deepcopy(opt.state_dict())
    other = BetaLasso([torch.zeros(3)], lr=0.1, lam=0.1, beta=1.0)
    other.load_state_dict(sd)
    assert other.param_groups[0]["maximize"] is True
    # a state saved before the flags existed gets SGD's defaults
    for name in ("maximize", "foreach", "fused", "differentiable"):
        del sd["param_groups"][0][name]
    other.load_state_dict(sd)
    assert other.param_groups[0]["maximize"] is False and other.param_groups[0]["fused"] is None


def test_flags_backend_aliases():
    p = torch.zeros(3)
    assert BetaLasso([p], lr=0.1, lam=0.1, beta=1.0, fused=False).backend == "reference"
    assert BetaLasso([p], lr=0.1, lam=0.1, beta=1.0, foreach=False).backend == "reference"
    opt = BetaLasso([p], lr=0.1, lam=0.1, beta=1.0, foreach=False)
    assert copy.deepcopy(opt).backend == "reference"
    opt.load_state_dict(opt.state_dict())  # keeps the optimizer's backend
    assert opt.backend == "reference"


@needs_ext
def test_fused_true_requires_the_fused_kernel():
    p = torch.randn(6, 10)[:, ::2]  # gaps: no fused kernel takes it
    p.grad = torch.randn(6, 5)
    for kw in (dict(fused=True), dict(foreach=True)):
        with pytest.raises(ValueError, match=r"BetaLasso: fused=True \(or foreach=True\) cannot update a torch.float32 "
                                             r"parameter on cpu with strides \(10, 2\)"):
            BetaLasso([p], lr=0.1, lam=0.1, beta=1.0, **kw).step()
    q = torch.randn(5)
    q.grad = torch.randn(5)
    opt = BetaLasso([q], lr=0.1, lam=0.1, beta=1.0, fused=True)
    opt.step()
    assert opt._plan.launches and not opt._plan.reference


@pytest.mark.parametrize("kw, err, match", [
    (dict(differentiable=True), ValueError, r"BetaLasso: differentiable=True is not supported: the update is one "
                                            r"in-place fused op with no autograd formula"),
    (dict(capturable=True), ValueError, r"BetaLasso: capturable=True is not supported: .*captured CUDA graph would "
                                        r"replay the lr of its capture"),
    (dict(maximize=1), TypeError, r"BetaLasso: maximize must be a bool; got 1"),
    (dict(foreach="yes"), TypeError, r"BetaLasso: foreach must be None or a bool; got 'yes'"),
    (dict(foreach=True, fused=False), ValueError, r"BetaLasso: foreach=True and fused=False contradict each other"),
    (dict(fused=True, backend="reference"), ValueError, r"BetaLasso: foreach/fused=True asks for the fused kernel, "
                                                         r"backend='reference'"),
    (dict(fused=False, backend="cpu"), ValueError, r"BetaLasso: foreach/fused=False asks for the per-tensor "
                                                    r"reference, backend='cpu'"),
])
def test_flags_refused_with_reason(kw, err, match):
    with pytest.raises(err, match=match):
        BetaLasso([torch.zeros(3)], lr=0.1, lam=0.1, beta=1.0, **kw)


@pytest.mark.parametrize("group, err, match", [
    ({"fused": False}, ValueError, r"BetaLasso: param group 1 has fused=False, the optimizer fused=None; fused "
                                   r"chooses the backend of the whole optimizer"),
    ({"capturable": True}, ValueError, r"BetaLasso: capturable=True is not supported"),
    ({"differentiable": True}, ValueError, r"BetaLasso: differentiable=True is not supported"),
])
def test_flags_refused_in_a_param_group(group, err, match):
    opt = BetaLasso([torch.zeros(3)], lr=0.1, lam=0.1, beta=1.0)
    with pytest.raises(err, match=match):
        opt.add_param_group({"params": [torch.zeros(2)], **group})
    assert len(opt.param_groups) == 1


# ----------------------------------------------------------------------------- dense layouts
def _channels_last(*shape):
    return torch.nn.Parameter(torch.randn(*shape).to(memory_format=torch.channels_last) * 0.1)


def _transposed(m, n):
    return torch.nn.Parameter((torch.randn(n, m) * 0.1).t())


@needs_ext
@pytest.mark.parametrize("cfg", [dict(lam=0.02, beta=1.0), CFG, dict(CFG, maximize=True)])
def test_dense_layouts_go_fused_and_match_reference(cfg):
    """channels_last conv weights and a transposed matrix: the fused launch updates them (the plan
    has no reference entry), bit for bit the reference's result; buffers keep the strides."""
    torch.manual_seed(5)
    make = [lambda: _channels_last(8, 6, 3, 3), lambda: _transposed(7, 13), lambda: _channels_last(4, 3, 1, 5)]
    a = [m() for m in make]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]  # clone keeps the layout
    assert all(not p.is_contiguous() and q.stride() == p.stride() for p, q in zip(a, b))
    grads = _grads([p.shape for p in a], 20)
    fused = BetaLasso(a, lr=0.05, **cfg, backend="cpu")
    ref = BetaLasso(b, lr=0.05, **cfg, backend="reference")
    calls = []
    launch = fused._full_step

    _run(a, fused, grads[:1])
    assert not fused._plan.reference and fused._plan.launches[0].params == a
    fused._full_step = lambda done: calls.append(done) or launch(done)  # the remaining steps: planned
    _run(a, fused, grads[1:])
    _run(b, ref, grads)
    assert calls == []
    for p, q in zip(a, b):
        assert torch.equal(p, q) and p.stride() == q.stride()
        if cfg.get("momentum"):
            assert fused.state[p]["momentum_buffer"].stride() == p.stride()
            assert torch.equal(fused.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
    assert fused.nonzeros() == ref.nonzeros()


@needs_ext
def test_loaded_contiguous_buffer_for_channels_last_weight_is_relaid():
    p = _channels_last(4, 3, 3, 3)
    opt = BetaLasso([p], lr=0.05, **CFG)
    _run([p], opt, _grads([p.shape], 2))
    sd = opt.state_dict()
    sd["state"][0]["momentum_buffer"] = sd["state"][0]["momentum_buffer"].contiguous()
    opt.load_state_dict(sd)
    _run([p], opt, _grads([p.shape], 1))
    assert opt.state[p]["momentum_buffer"].stride() == p.stride() and not opt._plan.reference


@needs_ext
def test_mismatched_strides_fall_back_or_raise():
    p = _channels_last(4, 3, 3, 3)
    p.grad = torch.randn(p.shape)  # contiguous: other strides than the parameter
    q = p.detach().clone()
    q.grad = p.grad.clone()
    opt = BetaLasso([p], lr=0.05, lam=0.02, beta=1.0)
    opt.step()
    assert opt._plan.reference and not opt._plan.launches
    BetaLasso([q], lr=0.05, lam=0.02, beta=1.0, backend="reference").step()
    assert torch.equal(p, q)
    with pytest.raises(ValueError, match=r"BetaLasso: backend='cpu' cannot update a torch.float32 parameter on cpu "
                                         r"with strides \(27, 1, 9, 3\) from a torch.float32 gradient with strides "
                                         r"\(27, 9, 3, 1\)"):
        BetaLasso([p], lr=0.05, lam=0.02, beta=1.0, backend="cpu").step()


@needs_ext
def test_raw_op_dense_layouts():
    """The op takes dense layouts shared by param, grad and buf; other layouts are refused naming
    the strides."""
    p = torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last)
    g = torch.randn(p.shape).to(memory_format=torch.channels_last)
    buf = torch.empty_like(p)
    hyper, flags = [0.1, 0.0, 0.0, 0.9, 1.0, 0.0], [1, 0, 1]
    ref, rg = p.clone(), g.clone()
    counts = torch.ops.regkernels.beta_lasso_step_([p], [g], [buf], hyper, flags)
    assert torch.equal(p, ref - rg * 0.1) and torch.equal(buf, g) and counts.tolist() == [p.count_nonzero().item()]
    with pytest.raises(RuntimeError, match=r"beta_lasso_step_: params\[0\] and grads\[0\] must be contiguous, or "
                                           r"share one dense layout .* with bufs\[0\] when momentum is used; got "
                                           r"strides \[12, 1, 6, 3\] and \[12, 4, 2, 1\] and \[12, 1, 6, 3\]"):
        torch.ops.regkernels.beta_lasso_step_([p], [g.contiguous()], [buf], hyper, flags)
    with pytest.raises(RuntimeError, match=r"got strides \[12, 1, 6, 3\] and \[12, 1, 6, 3\] and \[12, 4, 2, 1\]"):
        torch.ops.regkernels.beta_lasso_step_([p], [g], [buf.contiguous()], hyper, flags)
    with pytest.raises(RuntimeError, match=r"got strides \[10, 2\] and \[10, 2\] \(the parameter's layout has gaps"):
        torch.ops.regkernels.beta_lasso_step_([torch.randn(4, 10)[:, ::2]], [torch.randn(4, 10)[:, ::2]], [buf],
                                              hyper, [0, 0, 0])
