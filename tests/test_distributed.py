"""Penalties, stats() and svb_ on sharded weights: FSDP2 ``fully_shard`` and DTensor tensor
parallelism (docs/distributed.md), in 2 and 4 CPU processes with gloo.

One spawn per world size runs every check (a process start costs seconds); each rank saves what
it computed, and the tests compare every rank's numbers with one process computing the same on
the unsharded model. float64 throughout, so "equal" means equal to ~1e-15 (the Gram route sums
the ranks' partial Grams in another order than one GEMM does; everything else is bit-identical).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import regkernels as rk
from regkernels import distributed as D
from regkernels.nn import Regularizer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

KINDS = {"frame": dict(A=0.5, B=2.0), "diversity": dict(tau=0.1), "orthogonality": {}, "mhe": {},
         "srip": dict(n_iter=3), "conv_frame": dict(A=0.5, B=2.0), "ocnn": {}}
TP_KINDS = ("orthogonality", "diversity", "mhe", "srip")  # the Gram route on a Shard(1) conv, and one kind without
EPS = 0.1  # svb_'s band [1/1.1, 1.1]: every random layer here has singular values outside it
TOL = dict(rtol=1e-12, atol=1e-13)


def _cnn() -> nn.Module:
    """A small CNN with a Linear head: a widening 1×1 conv (its Gram goes the reduce route under
    FSDP2), a conv whose 5 output channels do not split evenly over 2 or 4 ranks, a strided conv."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 40, 1), nn.ReLU(), nn.Conv2d(40, 5, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(5, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10)).double()


def _grouped() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                         nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1, padding_mode="circular", groups=2), nn.Flatten(),
                         nn.Linear(6 * 6 * 6, 3)).double()


def _tp_weights() -> dict[str, torch.Tensor]:
    """Full values of the tensor-parallel weights: one per placement."""
    g = torch.Generator().manual_seed(2)
    return {"shard1": torch.randn(6, 9, generator=g, dtype=torch.float64),
            "shard0": torch.randn(7, 5, generator=g, dtype=torch.float64),
            "conv_shard1": torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) / 3,
            "replicate": torch.randn(4, 6, generator=g, dtype=torch.float64)}


INPUT_SIZES = {"conv": (5, 5)}


def _mesh2d_model(mesh) -> nn.Module:
    """A Linear and a conv whose weights are DTensors on a 2-D mesh (what HSDP / FSDP x TP give)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(4)
    mods = nn.ModuleDict({"lin": nn.Linear(8, 6, bias=False), "conv": nn.Conv2d(4, 6, 3, padding=1, bias=False)})
    full = {"lin": torch.randn(6, 8, generator=g, dtype=torch.float64),
            "conv": torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) / 3}
    place = {"lin": [Shard(0), Shard(1)], "conv": [Replicate(), Shard(0)]}
    for name, m in mods.items():
        w = full[name] if mesh is None else distribute_tensor(full[name], mesh, place[name])
        m.weight = nn.Parameter(w)
    return mods


def _x(shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _full(t):
    return t.full_tensor() if D.is_dtensor(t) else t


def _kind_results(model: nn.Module, x: torch.Tensor | None, kinds=tuple(KINDS)) -> dict:
    """Per kind: values, gradients of the weights (full), stats(), the collectives one call made.
    ``x``: an input that records the conv input sizes (None: ``INPUT_SIZES``)."""
    out = {}
    for kind in kinds:
        kw = KINDS[kind]
        sizes = dict(input_sizes=INPUT_SIZES) if x is None and kind == "conv_frame" else {}
        reg = Regularizer(model, kind, 1.0, **sizes, **kw)
        if x is not None:
            model(x)  # records the conv input sizes
        for p in model.parameters():
            p.grad = None
        D.reset_comm_counts()
        values = reg.values()
        comm = D.comm_counts()
        (values * torch.arange(1, len(values) + 1, dtype=values.dtype)).sum().backward()
        out[kind] = dict(values=values.detach(), grads=[_full(m.weight.grad) for _, m in reg.layers],
                         stats=reg.stats(), comm=comm)
        reg.remove_hooks()
    return out


def _training(model: nn.Module, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of task loss + frame + ocnn regularizers, through the forward of ``net``."""
    frame, ocnn = Regularizer(model, "frame", 0.3, A=0.5, B=2.0), Regularizer(model, "ocnn", 0.01)
    for p in model.parameters():
        p.grad = None
    loss = nn.functional.cross_entropy(net(x), y) + frame() + ocnn()
    loss.backward()
    return [_full(p.grad) for p in model.parameters()]


def _svb(make, shard, operator: bool) -> tuple[int, list[torch.Tensor], dict]:
    model = make()
    shard(model)
    D.reset_comm_counts()
    n = rk.svb_(model, EPS, operator=operator, input_size=6 if operator else None)
    return n, [_full(p).detach() for p in model.parameters()], D.comm_counts()


def _fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            fully_shard(layer)
    return fully_shard(model)


def _tp_model(mesh):
    """Linear / conv modules whose weights are DTensors placed Shard(1), Shard(0), Shard(1), Replicate."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    full = _tp_weights()
    mods = nn.ModuleDict({"shard1": nn.Linear(9, 6, bias=False), "shard0": nn.Linear(5, 7, bias=False),
                          "conv_shard1": nn.Conv2d(4, 6, 3, bias=False), "replicate": nn.Linear(6, 4, bias=False)})
    place = {"shard1": Shard(1), "shard0": Shard(0), "conv_shard1": Shard(1), "replicate": Replicate()}
    for name, m in mods.items():
        m.weight = nn.Parameter(distribute_tensor(full[name], mesh, [place[name]]))
    return mods


def _ops_on(weights: dict) -> dict:
    """Public ops given (DTensor) weights: values and gradients."""
    out = {}
    for name, w in weights.items():
        w.grad = None
        M = w if w.dim() == 2 else rk.as_matrix(w)
        vals = [rk.frame_penalty(M, 0.5, 2.0), rk.orthogonality_penalty(M), rk.diversity_penalty(M, 0.1),
                rk.mhe_penalty(M), rk.srip_penalty(M, generator=torch.Generator().manual_seed(5))]
        if w.dim() == 4:
            vals += [rk.conv_frame_penalty(w, (5, 5), 0.5, 2.0, padding=1),
                     rk.conv_orthogonality_penalty(w)]
        v = torch.stack(vals)
        (v * torch.arange(1, len(v) + 1, dtype=v.dtype)).sum().backward()
        out[name] = (v.detach(), _full(w.grad))
    multi = rk.penalty_multi(list(weights.values()), "frame", A=0.5, B=2.0)
    return {"ops": out, "multi": multi.detach()}


def _held_after_collectives(n: int = 48) -> list[int]:
    """The most references to a collective's tensors right after each of ``n`` rounds of the
    collectives regkernels issues, each through ``D._collective`` (as ``_all_gather_single`` does).
    Without the wait gloo's worker still holds some of them (count 2 or more) in a few rounds per
    hundred, and a process that exits then can abort (``D._collective``'s docstring)."""
    world = dist.get_world_size()
    held = []
    for i in range(n):
        inp = torch.full((1024 * world,), float(i))
        out = torch.empty_like(inp)
        D._collective(None, lambda: dist.all_to_all_single(out, inp), out, inp)
        held.append(max(out._use_count(), inp._use_count()))
        buf = torch.full((1024,), float(i))
        full = buf.new_empty(1024 * world)
        D._all_gather_single(full, buf, None)
        held.append(max(full._use_count(), buf._use_count()))
        flat = torch.full((1024,), float(i))
        D._collective(None, lambda: dist.all_reduce(flat), flat)
        held.append(flat._use_count())
    return held


def _worker(rank: int, world: int, init_file: str, out_prefix: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.tensor import init_device_mesh
        from torch.distributed.tensor.debug import CommDebugMode

        mesh = init_device_mesh("cpu", (world,))
        res: dict = {}
        model = _fsdp(_cnn())
        res["cnn"] = _kind_results(model, _x((2, 3, 8, 8)))
        # c10d's own count of one call, independent of regkernels' counter
        reg = Regularizer(model, "frame", 1.0, A=0.5, B=2.0)
        with CommDebugMode() as comm:
            reg()
        res["cnn_c10d"] = comm.get_total_counts()
        res["grouped"] = _kind_results(_fsdp(_grouped()), _x((2, 4, 6, 6)))
        # training: each rank takes its part of the batch; FSDP2 averages the task gradients and
        # the penalties' gradients arrive on the shards
        cnn = _cnn()
        net = _fsdp(cnn)
        x, y = _x((4, 3, 8, 8)), torch.arange(4) % 10
        part = slice(rank * 4 // world, (rank + 1) * 4 // world)
        res["training"] = _training(cnn, net, x[part], y[part])
        tp = _tp_model(mesh)
        res["tp_ops"] = _ops_on({name: m.weight for name, m in tp.items()})
        res["tp_reg"] = {}
        for kind in TP_KINDS:
            reg = Regularizer(tp, kind, 1.0, include=(nn.Linear, nn.Conv2d), **KINDS[kind])
            for m in tp.values():
                m.weight.grad = None
            D.reset_comm_counts()
            torch.manual_seed(11)  # SRIP's start vectors
            v = reg.values()
            comm = D.comm_counts()
            (v * torch.arange(1, len(v) + 1, dtype=v.dtype)).sum().backward()
            res["tp_reg"][kind] = (v.detach(), [_full(m.weight.grad) for m in tp.values()], comm)
        mesh2 = init_device_mesh("cpu", (world // 2, 2))
        res["mesh2d"] = _kind_results(_mesh2d_model(mesh2), None, kinds=("frame", "diversity", "conv_frame"))
        res["svb_mesh2d"] = _svb(lambda: _mesh2d_model(mesh2), lambda m: None, False)
        for operator in (False, True):
            res[f"svb_cnn_{operator}"] = _svb(_cnn, _fsdp, operator)
            res[f"svb_grouped_{operator}"] = _svb(_grouped, _fsdp, operator)
        res["svb_tp"] = _svb(lambda: _tp_model(mesh), lambda m: None, False)
        res["held"] = _held_after_collectives()
        torch.save(res, f"{out_prefix}{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    """Every rank's results, for a world of 2 and of 4 processes."""
    world = request.param
    tmp = tmp_path_factory.mktemp(f"dist{world}")
    mp.spawn(_worker, args=(world, str(tmp / "init"), str(tmp / "rank")), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _assert_kinds(got: dict, want: dict) -> None:
    for kind in KINDS:
        torch.testing.assert_close(got[kind]["values"], want[kind]["values"], **TOL, msg=kind)
        for a, b in zip(got[kind]["grads"], want[kind]["grads"]):
            torch.testing.assert_close(a, b, **TOL, msg=kind)
        for layer, stats in want[kind]["stats"].items():
            for key, value in stats.items():
                assert got[kind]["stats"][layer][key] == pytest.approx(value, rel=1e-12, abs=1e-13), (kind, layer, key)


def test_gloo_holds_no_tensor_after_a_collective_returns(ranks):
    """regkernels' collectives return only once gloo's worker thread has let go of their tensors,
    so a script whose last call is one of them exits cleanly (it aborted 1 exit in 8 before)."""
    for r, res in enumerate(ranks):
        assert set(res["held"]) == {1}, (r, sorted(set(res["held"])))


def test_fsdp2_cnn_every_kind_values_gradients_stats(ranks):
    want = _kind_results(_cnn(), _x((2, 3, 8, 8)))
    for res in ranks:
        _assert_kinds(res["cnn"], want)


def test_fsdp2_grouped_conv_every_kind(ranks):
    want = _kind_results(_grouped(), _x((2, 4, 6, 6)))
    for res in ranks:
        _assert_kinds(res["grouped"], want)


def test_fsdp2_regularizer_is_bucketed(ranks):
    """One all_gather for all the gathered layers (and one all_reduce for the Gram-route layers of
    frame/orthogonality), not one collective per parameter; c10d's own count agrees."""
    for res in ranks:
        for kind in KINDS:
            routed = kind in ("frame", "orthogonality")  # the 1x1 conv 3 -> 40: Gram 3x3 < weight 40x3
            assert res["cnn"][kind]["comm"]["collectives"] == (2 if routed else 1), kind
        assert res["cnn_c10d"] == 2


def test_fsdp2_training_gradients_equal_one_process(ranks):
    model = _cnn()
    x, y = _x((4, 3, 8, 8)), torch.arange(4) % 10
    want = _training(model, model, x, y)
    for res in ranks:
        for a, b in zip(res["training"], want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_dtensor_tensor_parallel_ops_and_regularizer(ranks):
    """Shard(0), Shard(1) (a Linear and a conv) and Replicate weights given to the public ops and
    to a Regularizer."""
    full = {name: w.clone().requires_grad_() for name, w in _tp_weights().items()}
    want = _ops_on(full)
    tp = nn.ModuleDict({n: _wrap(w) for n, w in _tp_weights().items()})
    reg_want = {}
    for kind in TP_KINDS:
        for m in tp.values():
            m.weight.grad = None
        reg = Regularizer(tp, kind, 1.0, include=(nn.Linear, nn.Conv2d), **KINDS[kind])
        torch.manual_seed(11)
        v = reg.values()
        (v * torch.arange(1, len(v) + 1, dtype=v.dtype)).sum().backward()
        reg_want[kind] = (v.detach(), [m.weight.grad for m in tp.values()])
    world = len(ranks)
    for res in ranks:
        for name, (v, g) in want["ops"].items():
            got_v, got_g = res["tp_ops"]["ops"][name]
            torch.testing.assert_close(got_v, v.detach(), **TOL, msg=name)
            torch.testing.assert_close(got_g, g, **TOL, msg=name)
        torch.testing.assert_close(res["tp_ops"]["multi"], want["multi"], **TOL)
        for kind in TP_KINDS:
            v, grads, comm = res["tp_reg"][kind]
            torch.testing.assert_close(v, reg_want[kind][0], **TOL, msg=kind)
            for a, b in zip(grads, reg_want[kind][1]):
                torch.testing.assert_close(a, b, **TOL, msg=kind)
            # the Shard(1) conv's rows Gram (6x6 against its 6x36 weight) is all-reduced; the
            # Shard(1) Linear (2·6² ≥ 6·9) and the Shard(0) one (cols Gram: 2·5² ≥ 7·5; rows
            # Grams need columns split) gathered in one bucket; Replicate() moves nothing
            routed = kind != "srip"  # SRIP is matrix-free: its layers are always gathered
            assert comm["collectives"] == (2 if routed else 1), (world, kind, comm)


def _wrap(w: torch.Tensor) -> nn.Module:
    m = nn.Linear(w.shape[1], w.shape[0], bias=False) if w.dim() == 2 else nn.Conv2d(w.shape[1], w.shape[0], 3,
                                                                                       bias=False)
    m.weight = nn.Parameter(w.clone())
    return m


@pytest.mark.parametrize("operator", [False, True])
@pytest.mark.parametrize("make", [_cnn, _grouped], ids=["cnn", "grouped"])
def test_svb_sharded_equals_one_process(ranks, make, operator):
    model = make()
    n = rk.svb_(model, EPS, operator=operator, input_size=6 if operator else None)
    name = f"svb_{'cnn' if make is _cnn else 'grouped'}_{operator}"
    weights = sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                  for p in [m.weight])
    for res in ranks:
        got_n, params, comm = res[name]
        assert got_n == n
        for a, b in zip(params, model.parameters()):
            assert torch.equal(a, b.detach())
        # two all_to_all_single: pieces to the owners, bounded pieces back; at most 2x the weights
        assert comm["collectives"] == 2
        assert comm["bytes"] <= 2 * weights


def test_svb_tensor_parallel_weights(ranks):
    model = nn.ModuleDict({n: _wrap(w) for n, w in _tp_weights().items()})
    n = rk.svb_(model, EPS)
    for res in ranks:
        got_n, params, comm = res["svb_tp"]
        assert got_n == n == 4
        for a, b in zip(params, model.parameters()):
            assert torch.equal(a, b.detach())


def test_svb_owners_balance_cost():
    """Every rank computes the same owners; the costliest layer alone on a rank when it dominates."""
    assert D._owners([1.0, 8.0, 1.0, 1.0], 2) == [1, 0, 1, 1]
    assert D._owners([3.0, 3.0, 2.0, 2.0, 2.0], 2) == [0, 1, 0, 1, 0]
    assert D._owners([], 4) == []


def test_gram_route_byte_rule():
    """Without a process group: the decision from shapes only, on a fake layout."""
    class Lay:
        def __init__(self, dim):
            self.dim = dim

    assert D._gram_route_for((40, 3), Lay(0), "cols")          # Gram 3x3 vs weight 40x3
    assert not D._gram_route_for((64, 576), Lay(0), "cols")    # 576² ≫ 64·576
    assert not D._gram_route_for((64, 576), Lay(0), "rows")    # rows Gram needs columns sharded
    assert D._gram_route_for((64, 576), Lay(1), "rows")        # 2·64² < 64·576
    assert not D._gram_route_for((6, 9), Lay(1), "rows")       # 72 ≥ 54


# ----------------------------------------------------------------------------- one process
@pytest.fixture(scope="module")
def one_rank(gloo_world_of_one):
    """A world of one process: DTensors whose collectives are local, for the refusals and for
    the paths that must not communicate."""
    from torch.distributed.tensor import init_device_mesh

    return init_device_mesh


def test_plain_tensors_are_not_moved(one_rank):
    ws = [torch.randn(3, 4), torch.randn(2, 2, 3, 3)]
    D.reset_comm_counts()
    out = D.gather(ws)
    assert all(a is b for a, b in zip(out, ws)) and D.comm_counts() == {"collectives": 0, "bytes": 0}


def test_svb_refuses_a_partial_weight(one_rank):
    from torch.distributed.tensor import DTensor, Partial

    lin = nn.Linear(4, 6, bias=False)
    lin.weight = nn.Parameter(DTensor.from_local(torch.randn(6, 4), one_rank("cpu", (1,)), [Partial()]))
    with pytest.raises(ValueError, match=r"svb_: layer 'Linear' has a DTensor weight with placements "
                                         r"\(Partial\(sum\),\); a Partial weight holds summands"):
        rk.svb_(lin, 0.1)


def test_two_dim_mesh_penalty_takes_dtensors_own_gather(one_rank):
    """A layout the buckets do not move (n-D mesh) is gathered by DTensor itself: still correct."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    full = torch.randn(6, 4, dtype=torch.float64)
    w = distribute_tensor(full, one_rank("cpu", (1, 1)), [Shard(0), Replicate()]).requires_grad_()
    D.reset_comm_counts()
    v = rk.frame_penalty(w, 0.5, 2.0)
    assert D.comm_counts()["collectives"] == 1
    ref = full.clone().requires_grad_()
    want = rk.frame_penalty(ref, 0.5, 2.0)
    torch.testing.assert_close(v, want)
    v.backward()
    want.backward()
    torch.testing.assert_close(w.grad.full_tensor(), ref.grad)


def test_svb_on_a_sharded_model_changes_nothing_when_a_later_write_fails(one_rank):
    """svb_'s all-or-nothing rule holds for sharded weights: their bounded pieces are written with
    the other updates, so a parametrized layer whose write fails leaves the DTensor weights as
    they were (they used to be written inside the exchange, before the failing write)."""
    from torch import nn
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.nn.utils import parametrize

    class LowerTriangular(nn.Module):  # right_inverse only inverts on triangular matrices
        def forward(self, X):
            return X.tril()

        def right_inverse(self, A):
            return A

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False))
    sharded = nn.Parameter(distribute_tensor(torch.randn(6, 6, generator=g) * 3, one_rank("cpu", (1,)), [Shard(0)]))
    model[0].weight = sharded
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(6, 6, generator=g).tril() * 3)
    parametrize.register_parametrization(model[1], "weight", LowerTriangular())
    before = [sharded.to_local().clone(), model[1].weight.detach().clone()]
    with pytest.raises(RuntimeError, match="right_inverse does not reproduce"):
        rk.svb_(model, 0.1)
    assert torch.equal(sharded.to_local(), before[0])
    assert torch.equal(model[1].weight.detach(), before[1])
    parametrize.remove_parametrizations(model[1], "weight")
    assert rk.svb_(model, 0.1) == 2  # without the failing layer both are bounded
    s = torch.linalg.svdvals(sharded.to_local())
    assert float(s.max()) <= 1.1 * (1 + 1e-5) and not torch.equal(sharded.to_local(), before[0])


def test_init_refuses_sharded_weights(one_rank):
    from torch.distributed.tensor import Shard, distribute_tensor

    w = distribute_tensor(torch.randn(8, 4, 3), one_rank("cpu", (1,)), [Shard(0)])
    before = w.to_local().clone()
    for call, name in ((lambda: rk.nn.init.orthogonal_(w), "weight_or_weights"),
                       (lambda: rk.nn.init.orthogonal_([w]), r"weight_or_weights\[0\]"),
                       (lambda: rk.nn.init.delta_orthogonal_(w), "weight")):
        with pytest.raises(ValueError, match=rf"{name} is a DTensor .*before sharding"):
            call()
    assert torch.equal(w.to_local(), before)


def test_public_op_on_a_dtensor_returns_a_plain_tensor(one_rank):
    from torch.distributed.tensor import Shard, distribute_tensor

    full = torch.randn(5, 7, dtype=torch.float64)
    w = distribute_tensor(full, one_rank("cpu", (1,)), [Shard(1)])
    for op in (lambda x: rk.orthogonality_penalty(x), lambda x: rk.batched_svd(x)[1],
               lambda x: rk.penalty_multi([x, x], "mhe"), lambda x: rk.frame_penalty(W=x, A=0.5, B=2.0),
               lambda x: rk.penalty_multi(weights=[x], kind="frame", A=0.5, B=2.0)):
        got, want = op(w), op(full)
        assert not D.is_dtensor(got)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind,kw", [
    ("frame", dict(A=0.5, B=2.0)), ("frame", dict(A=0.5, B=2.0, side="rows")), ("frame", dict(A=1.0, B=1.5, side="cols")),
    ("orthogonality", {}), ("orthogonality", dict(side="rows", squared=False)), ("orthogonality", dict(side="cols")),
    ("diversity", dict(tau=0.2)), ("diversity", dict(tau=0.0, inclusive=False)),
    ("mhe", {}), ("mhe", dict(s=0, half=True)), ("mhe", dict(s=1, eps=1e-2))])
@pytest.mark.parametrize("shape", [(7, 5), (4, 9)])
def test_penalty_from_gram_equals_the_penalty(kind, kw, shape):
    """The Gram route's formulas against the references on W (value and gradient, float64), and a
    zero row (diversity's norm at 0) and a NaN row (that matrix NaN) kept as the references keep them."""
    from regkernels.reference import gram as R

    g = torch.Generator().manual_seed(7)
    for W0 in (torch.randn(*shape, generator=g, dtype=torch.float64),
               torch.cat([torch.zeros(1, shape[1], dtype=torch.float64), torch.randn(shape[0] - 1, shape[1],
                                                                                     generator=g, dtype=torch.float64)])):
        W, V = W0.clone().requires_grad_(), W0.clone().requires_grad_()
        want = R.PENALTY_KINDS[kind](W, **kw)
        G = R.gram(V, R.gram_side(kind, *shape, kw.get("side", "auto")))
        got = R.penalty_from_gram(kind, G, **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        if torch.isfinite(want):
            want.backward()
            got.backward()
            torch.testing.assert_close(V.grad, W.grad, rtol=1e-10, atol=1e-12)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    W[1, 2] = float("nan")
    assert torch.isnan(R.penalty_from_gram(kind, R.gram(W, R.gram_side(kind, *shape, kw.get("side", "auto"))), **kw))


def test_two_dim_mesh_weights_penalties_and_svb(ranks):
    """DTensors on a 2-D mesh (world/2 x 2): gathered by DTensor itself (one collective per
    weight), bounded by every rank on the full value; equal to one process."""
    want = _kind_results(_mesh2d_model(None), None, kinds=("frame", "diversity", "conv_frame"))
    model = _mesh2d_model(None)
    n = rk.svb_(model, EPS)
    for res in ranks:
        for kind in ("frame", "diversity", "conv_frame"):
            got = res["mesh2d"][kind]
            torch.testing.assert_close(got["values"], want[kind]["values"], **TOL, msg=kind)
            for a, b in zip(got["grads"], want[kind]["grads"]):
                torch.testing.assert_close(a, b, **TOL, msg=kind)
            assert got["comm"]["collectives"] == 2, kind  # full_tensor() per weight
        got_n, params, _ = res["svb_mesh2d"]
        assert got_n == n
        for a, b in zip(params, model.parameters()):
            assert torch.equal(a, b.detach())



@pytest.mark.parametrize("backend, device, waits", [
    ("gloo", "cpu", True), ("gloo", "meta", True), ("cpu:gloo,cuda:nccl", "cpu", True),
    ("cpu:gloo,cuda:nccl", "meta", False), ("nccl", "meta", False), ("mpi", "cpu", False)])
def test_collective_waits_only_where_gloo_carries_the_tensors(monkeypatch, backend, device, waits):
    """The wait applies where gloo moves the tensors (a mixed backend's "cpu:gloo" for CPU
    tensors); NCCL's work objects are released later by its watchdog and are not waited for."""
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    assert D._gloo_runs(None, [torch.zeros(2, device=device)]) is waits
    assert D._gloo_runs(None, []) is False


def test_collective_returns_after_the_late_release_and_ignores_older_references(monkeypatch):
    """A stand-in worker keeps a reference to the tensor for 50 ms after the call returned:
    ``_collective`` returns only after it is dropped; a reference the caller held before the call
    (a view's) is not waited for."""
    import threading
    import time

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    x = torch.zeros(4)
    view = x[1:]  # the caller's own reference, before the call: count 2
    dropped = threading.Event()

    def call():
        held = [x[:2]]  # the "worker's" reference: count 3 until it drops it

        def worker():
            time.sleep(0.05)
            held.clear()
            dropped.set()

        threading.Thread(target=worker).start()

    start = time.monotonic()
    D._collective(None, call, x)
    # the worker's reference is gone on return (count 3 for 50 ms without the wait); the view's stays
    assert x._use_count() == 2
    assert dropped.wait(5)  # the worker sets it just after dropping the reference
    assert time.monotonic() - start < D.SETTLE_S / 2
    del view
