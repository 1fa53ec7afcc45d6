"""BetaLasso on DTensor parameters (docs/beta_lasso.md#β-lasso-on-sharded-parameters).

CPU processes with the gloo backend train a small CNN sharded with FSDP2 (``fully_shard`` per
layer and on its root; 5 output channels, uneven over 2 and 4 ranks) and three tensor-parallel
weights (``Shard(1)``, ``Shard(0)``, ``Replicate()``) next to a plain parameter, with fixed
gradients set per step (the full gradient, sliced to each parameter's placements), so nothing
depends on FSDP's gradient reduction. Each rank's parameters must equal a one-process run on
plain tensors bit for bit; ``step()`` must communicate nothing and ``nonzeros()`` must give the
whole tensors' counts on every rank with one all-reduce per device mesh. A
``torch.distributed.checkpoint`` save and load in a fresh model and optimizer must resume
identically. Every check of one world size runs in ONE spawn (starting processes dominates).
"""
from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from regkernels.optim import BetaLasso

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

if dist.is_available():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

STEPS = 20
SAVE_AT = 10  # the checkpointed run saves after this many steps
RELOAD_AT = 5  # one run reloads its own state_dict() after this many steps
CFGS = {"momentum": dict(lr=0.05, lam=0.01, beta=2.0, momentum=0.9),
        "nesterov": dict(lr=0.05, lam=0.01, beta=2.0, momentum=0.9, nesterov=True, weight_decay=1e-3)}
RUNS = [(name, backend) for name in CFGS for backend in (None, "reference")]
CHECKPOINTED = ("nesterov", None)
TP = {"col": "Shard(1)", "row": "Shard(0)", "rep": "Replicate()"}  # the tensor-parallel weights
# world 4 only: weights on a 2-D mesh covering the world and on a 2-D mesh of half of it
MESH_2D = {"a": ("Shard(0)", "Replicate()"), "b": ("Replicate()", "Shard(1)"), "c": ("Shard(0)", "Shard(1)"),
           "d": ("Replicate()", "Replicate()")}
SUB_2D = {"e": ("Shard(0)", "Replicate()"), "f": ("Replicate()", "Shard(1)")}
SHAPES_2D = {"a": (6, 7), "b": (5, 9), "c": (7, 6), "d": (4, 4), "e": (5, 3), "f": (3, 5)}


class Net(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.cnn = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 8, 3, stride=2, padding=1),
                                 nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 5))
        self.col = nn.Parameter(torch.randn(6, 7) * 0.1)
        self.row = nn.Parameter(torch.randn(9, 5) * 0.1)
        self.rep = nn.Parameter(torch.randn(4, 6) * 0.1)
        self.plain = nn.Parameter(torch.randn(3, 4) * 0.1)  # stays a plain tensor, one copy per rank


def _input() -> torch.Tensor:
    return torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(7))


def _placement(text: str):
    return {"Shard(0)": Shard(0), "Shard(1)": Shard(1), "Replicate()": Replicate()}[text]


def _full_grad(name: str, shape, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + step)
    return torch.randn(shape, generator=g) * 0.1


def _set_grads(named: dict, step: int) -> None:
    """The same full gradient in every process, each DTensor given its own slice of it."""
    for name, p in named.items():
        g = _full_grad(name, p.shape, step)
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor) else g


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


# ----------------------------------------------------------------------------- one process
def _reference_run(cfg: dict, backend, params: dict, steps: int = STEPS) -> tuple:
    """``steps`` steps on plain tensors: the parameters and nonzeros() a sharded run must match."""
    opt = BetaLasso(list(params.values()), **cfg, backend=backend)
    for k in range(steps):
        for name, p in params.items():
            p.grad = _full_grad(name, p.shape, k)
        opt.step()
    return {n: p.detach().clone() for n, p in params.items()}, opt.nonzeros()


def _plain_2d() -> dict:
    g = torch.Generator().manual_seed(3)
    return {n: nn.Parameter(torch.randn(s, generator=g) * 0.05) for n, s in SHAPES_2D.items()}


# ----------------------------------------------------------------------------- the workers
def _shard(net: Net, mesh) -> dict:
    """FSDP2 on the CNN (each layer with weights, then its root), DTensor placements on the
    tensor-parallel weights; returns the parameters by name, in net.parameters() order."""
    for layer in (net.cnn[0], net.cnn[2], net.cnn[5]):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(net.cnn, mesh=mesh, reshard_after_forward=True)
    for name, placement in TP.items():
        full = getattr(net, name).detach()
        setattr(net, name, nn.Parameter(distribute_tensor(full, mesh, [_placement(placement)], src_data_rank=None)))
    return dict(net.named_parameters())


def _train_sharded(mesh, cfg: dict, backend, ckpt: str | None) -> tuple[dict, list, torch.Tensor]:
    net = Net()
    named = _shard(net, mesh)
    x = _input()
    with torch.no_grad():
        net.cnn(x)  # FSDP's lazy initialisation, then resharded: the optimizer steps the shards
    opt = BetaLasso(named.values(), **cfg, backend=backend)
    reload = ckpt is None and backend is None
    plans = []  # the plans the steps left: a full pass makes a new one, a planned step keeps it
    for k in range(STEPS):
        _set_grads(named, k)
        with CommDebugMode() as comm:
            opt.step()
        assert comm.get_total_counts() == 0, comm.get_comm_counts()
        if not plans or plans[-1] is not opt._plan:
            plans.append(opt._plan)
        if k + 1 == RELOAD_AT and reload:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        if k + 1 == SAVE_AT and ckpt is not None:
            msd, osd = get_state_dict(net, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    assert None not in plans and len(plans) == 1 + reload, plans
    if backend is None:  # every parameter, DTensor or plain, in the one fused launch
        assert not opt._plan.reference and [len(lp.params) for lp in opt._plan.launches] == [len(named)]
    for name, p in named.items():
        buf = opt.state[p]["momentum_buffer"]
        if isinstance(p, DTensor):
            assert isinstance(buf, DTensor) and buf.placements == p.placements and buf.device_mesh == p.device_mesh
            assert buf.shape == p.shape and buf.to_local().shape == p.to_local().shape, name
        else:
            assert type(buf) is torch.Tensor, name
    with CommDebugMode() as comm:
        nonzeros = opt.nonzeros()
    assert comm.get_comm_counts() == {torch.ops.c10d.allreduce_: 1}, comm.get_comm_counts()
    with torch.no_grad():
        out = net.cnn(x)  # FSDP gathers the updated shards
    return {n: _full(p) for n, p in named.items()}, nonzeros, out


def _resume_from_checkpoint(mesh, cfg: dict, ckpt: str) -> tuple[dict, list]:
    """A fresh model (other weights) and optimizer: get_state_dict (torch steps the empty optimizer
    once with lr 0 and zero gradients to make its state), dcp.load, set_state_dict, and the
    remaining steps."""
    net = Net(seed=1)
    named = _shard(net, mesh)
    opt = BetaLasso(named.values(), **cfg)
    msd, osd = get_state_dict(net, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    set_state_dict(net, opt, model_state_dict=msd, optim_state_dict=osd)
    for k in range(SAVE_AT, STEPS):
        _set_grads(named, k)
        opt.step()
    return {n: _full(p) for n, p in named.items()}, opt.nonzeros()


def _redistributed_grads(mesh, rank: int) -> dict:
    """Gradients placed otherwise than their parameters: redistributed by step() (a collective)."""
    net = Net()
    named = _shard(net, mesh)
    tp = {n: named[n] for n in TP}
    opt = BetaLasso(tp.values(), **CFGS["momentum"])
    for k in range(4):
        for name, p in tp.items():
            g = _full_grad(name, p.shape, k)
            if name == "col":  # Shard(1) parameter, Shard(0) gradient
                p.grad = distribute_tensor(g, mesh, [Shard(0)], src_data_rank=None)
            elif name == "row":  # Shard(0) parameter, replicated gradient
                p.grad = distribute_tensor(g, mesh, [Replicate()], src_data_rank=None)
            else:  # replicated parameter, Partial gradient (rank 0 holds all of it: the sum is exact)
                p.grad = DTensor.from_local(g if rank == 0 else torch.zeros_like(g), mesh, [Partial()])
        opt.step()
    return {n: _full(p) for n, p in tp.items()}


def _two_dim_meshes(world: int) -> tuple[dict, list, int]:
    mesh2 = init_device_mesh("cpu", (2, world // 2))
    sub = init_device_mesh("cpu", (2, world // 2, 1), mesh_dim_names=("pp", "dp", "tp"))["dp", "tp"]
    named = {}
    for n, p in _plain_2d().items():
        mesh, placements = (mesh2, MESH_2D[n]) if n in MESH_2D else (sub, SUB_2D[n])
        named[n] = nn.Parameter(distribute_tensor(p.detach(), mesh, [_placement(t) for t in placements],
                                                  src_data_rank=None))
    opt = BetaLasso(named.values(), **CFGS["nesterov"])
    for k in range(STEPS):
        _set_grads(named, k)
        opt.step()
    with CommDebugMode() as comm:
        nonzeros = opt.nonzeros()
    return {n: _full(p) for n, p in named.items()}, nonzeros, comm.get_total_counts()


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        out = {}
        for name, backend in RUNS:
            ckpt = f"{tmp}/ckpt" if (name, backend) == CHECKPOINTED else None
            out[name, backend] = _train_sharded(mesh, CFGS[name], backend, ckpt)
        out["resumed"] = _resume_from_checkpoint(mesh, CFGS[CHECKPOINTED[0]], f"{tmp}/ckpt")
        out["redistributed"] = _redistributed_grads(mesh, rank)
        if world == 4:
            out["2d"] = _two_dim_meshes(world)
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the test
@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_and_tensor_parallel_match_one_process(tmp_path, world):
    mp.spawn(_worker, args=(world, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    x = _input()
    for name, backend in RUNS:
        net = Net()
        params, nonzeros = _reference_run(CFGS[name], backend, dict(net.named_parameters()))
        assert 0 < sum(map(sum, nonzeros)) < sum(p.numel() for p in params.values())  # thresholding at work
        with torch.no_grad():
            want_out = net.cnn(x)
        for r, got in enumerate(ranks):
            got_params, got_nonzeros, got_out = got[name, backend]
            for n, p in params.items():
                assert torch.equal(got_params[n], p), (name, backend, r, n)
            assert got_nonzeros == nonzeros, (name, backend, r)
            torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6)
        if (name, backend) == CHECKPOINTED:
            for r, got in enumerate(ranks):
                got_params, got_nonzeros = got["resumed"]
                assert all(torch.equal(got_params[n], p) for n, p in params.items()), r
                assert got_nonzeros == nonzeros, r

    net = Net()
    want, _ = _reference_run(CFGS["momentum"], None, {n: getattr(net, n) for n in TP}, steps=4)
    for r, got in enumerate(ranks):
        assert all(torch.equal(got["redistributed"][n], p) for n, p in want.items()), r

    if world == 4:
        want, nonzeros = _reference_run(CFGS["nesterov"], None, _plain_2d())
        for r, got in enumerate(ranks):
            got_params, got_nonzeros, comm = got["2d"]
            assert all(torch.equal(got_params[n], p) for n, p in want.items()), r
            assert got_nonzeros == nonzeros, r
            # one all-reduce on the mesh that covers the world, one on the half mesh's "dp" dimension
            assert comm == 2


# ----------------------------------------------------------------------------- one process, refusals
@pytest.fixture(scope="module")
def mesh(gloo_world_of_one):
    return init_device_mesh("cpu", (1,))


@pytest.mark.parametrize("backend", [None, "reference"])
def test_momentum_buffer_is_a_dtensor_of_the_parameter_layout(mesh, backend):
    p = nn.Parameter(distribute_tensor(torch.randn(5, 3), mesh, [Shard(1)], src_data_rank=None))
    p.grad = distribute_tensor(torch.randn(5, 3), mesh, [Shard(1)], src_data_rank=None)
    opt = BetaLasso([p], lr=0.1, lam=0.01, beta=1.0, momentum=0.9, backend=backend)
    opt.step()
    buf = opt.state[p]["momentum_buffer"]
    assert isinstance(buf, DTensor)
    assert buf.device_mesh == mesh and buf.placements == (Shard(1),) and buf.shape == p.shape
    assert torch.equal(buf.to_local(), p.grad.to_local())  # buf = d on the first step
    assert isinstance(opt.state_dict()["state"][0]["momentum_buffer"], DTensor)


def test_dtensor_refusals(mesh):
    partial = nn.Parameter(DTensor.from_local(torch.randn(4), mesh, [Partial()]))
    with pytest.raises(ValueError, match=r"BetaLasso: parameter 1 of param group 0 is a DTensor with placements "
                                         r"\(Partial\(sum\),\); a Partial placement .* give it Shard or Replicate"):
        BetaLasso([nn.Parameter(torch.randn(3)), partial], lr=0.1, lam=0.01, beta=1.0)

    p = nn.Parameter(distribute_tensor(torch.randn(4, 2), mesh, [Shard(0)], src_data_rank=None))
    opt = BetaLasso([p], lr=0.1, lam=0.01, beta=1.0, momentum=0.9)
    p.grad = torch.randn(4, 2)
    with pytest.raises(TypeError, match=r"BetaLasso: parameter 0 of param group 0 is a DTensor but its gradient "
                                        r"is a Tensor; give it a DTensor gradient"):
        opt.step()
    p.grad = distribute_tensor(torch.randn(4, 2), mesh, [Shard(0)], src_data_rank=None)
    opt.state[p]["momentum_buffer"] = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"BetaLasso: the momentum buffer of parameter 0 of param group 0 is a "
                                         r"torch.Tensor, the parameter a DTensor with placements \(Shard\(dim=0\),\)"):
        opt.step()
