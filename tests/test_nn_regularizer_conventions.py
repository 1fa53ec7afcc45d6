"""Regularizer's ``group_mode`` and ``reduction`` (docs/nn.md#regularizer, issue 19: peers'
conventions as options).

Oracle: the penalties written out here in float64 from explicit Gram matrices (torch ops only,
no regkernels call), on each layer's matrices as the option defines them: per group, the
``out/g`` consecutive filters of group i as the rows of one ``(out/g, in/g·∏k)`` matrix and the
layer's value the mean over its groups; ``"whole"``, the weight as one ``(out, in/g·∏k)`` matrix.
``reduction`` combines the per-layer values (one per selected layer, grouped or not).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import regkernels
from regkernels import distributed as D
from regkernels.nn import Regularizer

D64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
GRAM_KINDS = ("frame", "diversity", "orthogonality", "mhe", "srip")
KIND_KW = {"frame": dict(A=0.5, B=1.0), "diversity": dict(tau=0.2), "orthogonality": {}, "mhe": {},
           "srip": dict(n_iter=3), "conv_frame": dict(A=0.5, B=2.0), "ocnn": {}}
SRIP_SEED = 11


def _model(dtype=D64) -> nn.Module:
    """A grouped conv (groups=2), a depthwise conv (channel multiplier 2: two filters per group),
    a plain conv and a Linear."""
    torch.manual_seed(19)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.Conv2d(8, 16, 3, padding=1, groups=8),
                         nn.Conv2d(16, 6, 3, padding=1), nn.Flatten(), nn.Linear(6 * 5 * 5, 7)).to(dtype)


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _kw(kind: str) -> dict:
    kw = dict(KIND_KW[kind])
    if kind == "srip":
        kw["generator"] = torch.Generator().manual_seed(SRIP_SEED)
    return kw


# ----------------------------------------------------------------------------- the oracle
def _matrices(w: torch.Tensor, groups: int, group_mode: str) -> torch.Tensor:
    """``(g', rows, cols)``: the layer's matrices, filters as rows."""
    M = w.reshape(w.shape[0], -1)
    if group_mode == "whole" or groups == 1:
        return M.unsqueeze(0)
    return torch.stack(M.chunk(groups, dim=0))


def _gram(M: torch.Tensor, side: str) -> torch.Tensor:
    if side == "auto":
        side = "cols" if M.shape[0] >= M.shape[1] else "rows"
    return M @ M.T if side == "rows" else M.T @ M


def _penalty(kind: str, M: torch.Tensor, kw: dict, b: torch.Tensor | None = None) -> torch.Tensor:
    """One matrix's penalty, float64, from its explicit Gram (formulas: docs/gram.md)."""
    if kind == "frame":
        V = _gram(M, kw.get("side", "auto"))
        off = 1 - torch.eye(V.shape[0], dtype=V.dtype)
        d, r = V.diagonal(), (V.abs() * off).sum(1)
        return (torch.relu(kw["A"] - (d - r)) ** 2 + torch.relu((d + r) - kw["B"]) ** 2).mean()
    if kind == "diversity":
        U = M / M.norm(dim=1, keepdim=True).clamp_min(1e-12)
        C = U @ U.T
        off = ~torch.eye(C.shape[0], dtype=torch.bool)
        keep = off & ((C.detach().abs() >= kw["tau"]) if kw.get("inclusive", True) else (C.detach().abs() > kw["tau"]))
        return 0.5 * (C ** 2 * keep).sum()
    if kind == "orthogonality":
        V = _gram(M, "auto")
        return ((V - torch.eye(V.shape[0], dtype=V.dtype)) ** 2).sum()
    if kind == "mhe":  # s=2, half=False, eps=1e-4
        G = M @ M.T
        nu = (G.diagonal() + 1e-4).sqrt()
        cos = G / (nu[:, None] * nu[None, :])
        i, j = torch.triu_indices(G.shape[0], G.shape[0], offset=1)
        return (1 / (2 - 2 * cos[i, j])).mean()
    # srip: power iteration on Gram(M, "auto") − I from the start vector b
    E = _gram(M, "auto") - torch.eye(min(M.shape), dtype=M.dtype)
    v = b
    for _ in range(kw["n_iter"]):
        u = E @ v
        v = u / u.norm()
    return ((E @ v) ** 2).sum()


def _oracle(model: nn.Module, kind: str, group_mode: str, kw: dict | None = None) -> torch.Tensor:
    """``(L,)``: per selected layer, the mean over its matrices. SRIP's start vectors: one
    ``U(0,1)`` float32 draw per layer of shape ``(g', k)`` (``(k,)`` for one matrix), in layer order,
    from a generator seeded ``SRIP_SEED`` (docs/gram.md#penalty_multi)."""
    kw = KIND_KW[kind] if kw is None else kw
    gen = torch.Generator().manual_seed(SRIP_SEED)
    out = []
    for m in _layers(model):
        mats = _matrices(m.weight, getattr(m, "groups", 1), group_mode)
        starts = [None] * len(mats)
        if kind == "srip":
            k = min(mats.shape[-2:])
            shape = (len(mats), k) if len(mats) > 1 else (k,)
            starts = torch.rand(*shape, generator=gen, dtype=torch.float32).to(mats.dtype).reshape(len(mats), k)
        out.append(torch.stack([_penalty(kind, M, kw, b) for M, b in zip(mats, starts)]).mean())
    return torch.stack(out)


def _grads(model: nn.Module, value: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, [m.weight for m in _layers(model)], retain_graph=True))


# ----------------------------------------------------------------------------- group_mode
@pytest.mark.parametrize("group_mode", ["per_group", "whole"])
@pytest.mark.parametrize("kind", GRAM_KINDS)
def test_group_mode_values_and_gradients_equal_the_oracle(kind, group_mode):
    model = _model()
    reg = Regularizer(model, kind, 0.3, group_mode=group_mode, **_kw(kind))
    got = reg.values()
    want = _oracle(model, kind, group_mode)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(_grads(model, got.sum()), _grads(model, want.sum()), **TOL)
    if kind == "srip":  # a fresh generator: the call draws the same start vectors as values() did
        reg.kw["generator"] = torch.Generator().manual_seed(SRIP_SEED)
    value = reg()
    torch.testing.assert_close(value, 0.3 * want.mean(), **TOL)
    torch.testing.assert_close(_grads(model, value), _grads(model, 0.3 * want.mean()), **TOL)


@pytest.mark.parametrize("kind", GRAM_KINDS)
def test_group_mode_changes_only_the_grouped_layers(kind):
    model = _model()
    per_group = Regularizer(model, kind, group_mode="per_group", **_kw(kind)).values()
    whole = Regularizer(model, kind, group_mode="whole", **_kw(kind)).values()
    grouped = [getattr(m, "groups", 1) > 1 for m in _layers(model)]
    assert grouped == [True, True, False, False]
    for g, a, b in zip(grouped, per_group, whole):
        if g:
            assert not torch.allclose(a, b, rtol=1e-3), (kind, a, b)
        elif kind != "srip":  # srip: the grouped layers drew other start vectors before these
            assert torch.equal(a, b)


def test_whole_takes_a_depthwise_conv_with_one_filter_per_group():
    """mhe needs 2 rows per matrix: a depthwise conv without channel multiplier has 1 per group
    (refused at construction, naming the layer), 16 as a whole."""
    model = nn.Sequential(nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 4, 1)).double()
    with pytest.raises(ValueError, match=r"Regularizer: as_matrix\(layer '0'.weight\) needs at least 2 rows"):
        Regularizer(model, "mhe")
    reg = Regularizer(model, "mhe", group_mode="whole")
    torch.testing.assert_close(reg.values(), _oracle(model, "mhe", "whole"), **TOL)


@pytest.mark.parametrize("kind", ["conv_frame", "ocnn"])
def test_conv_kinds_refuse_whole(kind):
    with pytest.raises(ValueError, match=rf"Regularizer: group_mode='whole' is for the Gram kinds \(frame, "
                                         rf"diversity, orthogonality, mhe, srip\); kind='{kind}' penalises each "
                                         rf"layer's conv operator, which for a grouped conv is block-diagonal"):
        Regularizer(_model(), kind, group_mode="whole", **KIND_KW[kind])
    # a model without grouped convs is refused too: the option has no meaning for these kinds
    with pytest.raises(ValueError, match="group_mode='whole' is for the Gram kinds"):
        Regularizer(nn.Linear(3, 4), kind, include=nn.Linear, group_mode="whole", **KIND_KW[kind])
    Regularizer(_model(), kind, group_mode="per_group", **KIND_KW[kind])


def test_stats_follow_group_mode():
    """σ of the matrices the penalty acts on: the grouped layer's groups (min / max over them) or its
    whole matrix; Gershgorin bounds of that Gram."""
    model = _model()
    conv = model[0]
    for mode in ("per_group", "whole"):
        st = Regularizer(model, "orthogonality", group_mode=mode).stats()["0"]
        mats = _matrices(conv.weight.detach(), conv.groups, mode)
        s = torch.linalg.svdvals(mats)
        assert st["sigma_min"] == pytest.approx(float(s[:, -1].min()), rel=1e-12)
        assert st["sigma_max"] == pytest.approx(float(s[:, 0].max()), rel=1e-12)
        V = torch.stack([_gram(M, "auto") for M in mats])
        r = V.abs().sum(-1) - V.diagonal(dim1=-2, dim2=-1).abs()
        assert st["gershgorin_lo"] == pytest.approx(float((V.diagonal(dim1=-2, dim2=-1) - r).min()), rel=1e-12)
        assert st["gershgorin_hi"] == pytest.approx(float((V.diagonal(dim1=-2, dim2=-1) + r).max()), rel=1e-12)


# ----------------------------------------------------------------------------- reduction
@pytest.mark.parametrize("group_mode", ["per_group", "whole"])
@pytest.mark.parametrize("kind", GRAM_KINDS)
def test_reduction_is_over_layers(kind, group_mode):
    """mean: over the L selected layers (a grouped conv is one layer, itself the mean over its
    groups), not over the matrices; sum: Σ over the layers = L × the mean."""
    model = _model()
    want = _oracle(model, kind, group_mode)
    L = len(_layers(model))
    mean = Regularizer(model, kind, 0.3, group_mode=group_mode, reduction="mean", **_kw(kind))()
    total = Regularizer(model, kind, 0.3, group_mode=group_mode, reduction="sum", **_kw(kind))()
    torch.testing.assert_close(mean, 0.3 * want.sum() / L, **TOL)
    torch.testing.assert_close(total, 0.3 * want.sum(), **TOL)
    torch.testing.assert_close(total, L * mean, **TOL)
    torch.testing.assert_close(_grads(model, total), _grads(model, 0.3 * want.sum()), **TOL)
    if group_mode == "per_group":  # the mean over all 12 matrices is another number
        per_matrix = _oracle_matrices(model, kind).mean()
        assert not torch.allclose(mean, 0.3 * per_matrix, rtol=1e-3)


def _oracle_matrices(model: nn.Module, kind: str) -> torch.Tensor:
    """Every group's value, all layers (only kinds without start vectors, or srip with its draws)."""
    gen = torch.Generator().manual_seed(SRIP_SEED)
    vals = []
    for m in _layers(model):
        mats = _matrices(m.weight, getattr(m, "groups", 1), "per_group")
        k = min(mats.shape[-2:])
        starts = torch.rand(len(mats), k, generator=gen).double() if kind == "srip" else [None] * len(mats)
        vals += [_penalty(kind, M, KIND_KW[kind], b) for M, b in zip(mats, starts)]
    assert len(vals) == 2 + 8 + 1 + 1
    return torch.stack(vals)


@pytest.mark.parametrize("kind", ["conv_frame", "ocnn"])
def test_reduction_sum_for_the_conv_kinds(kind):
    model = _model()
    sizes = dict(input_sizes={"0": 5, "1": 5, "2": 5}) if kind == "conv_frame" else {}
    mean = Regularizer(model, kind, 0.3, **sizes, **KIND_KW[kind])
    total = Regularizer(model, kind, 0.3, reduction="sum", **sizes, **KIND_KW[kind])
    assert torch.equal(total(), 0.3 * total.values().sum())
    torch.testing.assert_close(total(), 4 * mean(), **TOL)


# ----------------------------------------------------------------------------- defaults
@pytest.mark.parametrize("dtype", [D64, torch.float32])
@pytest.mark.parametrize("kind", GRAM_KINDS + ("conv_frame", "ocnn"))
def test_defaults_are_the_previous_behaviour_bit_for_bit(kind, dtype):
    """No option, the explicit defaults, and (Gram kinds) the formula before the options existed,
    ``weight · penalty_multi(weights, kind, groups=each conv's groups).mean()``: the same bits,
    value and gradients."""
    model = _model(dtype)
    sizes = dict(input_sizes={"0": 5, "1": 5, "2": 5}) if kind == "conv_frame" else {}
    plain = Regularizer(model, kind, 0.3, **sizes, **_kw(kind))
    explicit = Regularizer(model, kind, 0.3, group_mode="per_group", reduction="mean", **sizes, **_kw(kind))
    a, b = plain(), explicit()
    assert torch.equal(a, b)
    ga, gb = _grads(model, a), _grads(model, b)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert plain.group_mode == "per_group" and plain.reduction == "mean"
    if kind in GRAM_KINDS:
        before = 0.3 * regkernels.penalty_multi([m.weight for m in _layers(model)], kind,
                                                groups=[getattr(m, "groups", 1) for m in _layers(model)],
                                                **_kw(kind)).mean()
        assert torch.equal(a, before)
        assert all(torch.equal(x, y) for x, y in zip(ga, _grads(model, before)))


# ----------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(group_mode="Whole"), ValueError, r"Regularizer: group_mode must be one of 'per_group', 'whole'; "
                                           r"got 'Whole'"),
    (dict(group_mode=None), TypeError, r"Regularizer: group_mode must be a str, one of 'per_group', 'whole'; "
                                       r"got NoneType None"),
    (dict(group_mode=2), TypeError, r"Regularizer: group_mode must be a str, one of 'per_group', 'whole'; got int 2"),
    (dict(reduction="avg"), ValueError, r"Regularizer: reduction must be one of 'mean', 'sum'; got 'avg'"),
    (dict(reduction=["sum"]), TypeError, r"Regularizer: reduction must be a str, one of 'mean', 'sum'; "
                                         r"got list \['sum'\]"),
])
def test_bad_options_fail_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Regularizer(_model(), "frame", A=0.5, B=2.0, **kwargs)


# ----------------------------------------------------------------------------- peers' factors
def test_peer_factors_of_the_docs_table():
    """docs/nn.md's table, from the peers' formulas as docs/gram.md describes them: WO's frame hinge
    summed over the rows' Gram, summed over layers, = Σ_l k_l · values()_l (k_l = the Gram's size);
    DiReAL's Σ_{i≠j} [|C_ij| > tau] C_ij² of the whole weight, summed over layers, = 2 · ours with
    inclusive=False, group_mode="whole", reduction="sum"."""
    model = _model()
    reg = Regularizer(model, "frame", A=0.5, B=1.0, side="rows", group_mode="whole", reduction="sum")
    k = torch.tensor([m.weight.shape[0] for m in _layers(model)], dtype=D64)
    wo = 0.0
    for m in _layers(model):
        V = m.weight.reshape(m.weight.shape[0], -1) @ m.weight.reshape(m.weight.shape[0], -1).T
        d, r = V.diagonal(), V.abs().sum(1) - V.diagonal().abs()
        wo = wo + (torch.relu(0.5 - (d - r)) ** 2 + torch.relu((d + r) - 1.0) ** 2).sum()
    torch.testing.assert_close((k * reg.values()).sum(), wo, **TOL)

    reg = Regularizer(model, "diversity", tau=0.2, inclusive=False, group_mode="whole", reduction="sum")
    direal = 0.0
    for m in _layers(model):
        U = nn.functional.normalize(m.weight.reshape(m.weight.shape[0], -1), dim=1)
        C = U @ U.T
        direal = direal + (C ** 2 * ((C.abs() > 0.2) & ~torch.eye(C.shape[0], dtype=torch.bool))).sum()
    torch.testing.assert_close(2 * reg(), direal, **TOL)


# ----------------------------------------------------------------------------- sharded weights
@pytest.fixture(scope="module")
def one_rank(gloo_world_of_one):
    """A world of one gloo process: DTensor weights take Regularizer's sharded path."""
    from torch.distributed.tensor import init_device_mesh

    return init_device_mesh("cpu", (1,))


def _sharded_model(mesh) -> tuple[nn.Module, nn.Module]:
    """The same weights plain and as ``Shard(0)`` DTensors (FSDP2's placement). The widening grouped
    1×1 conv's whole matrix (40, 2) has a 2×2 Gram: the Gram route's case."""
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(23)
    plain = nn.Sequential(nn.Conv2d(4, 40, 1, groups=2), nn.Conv2d(40, 8, 3, groups=4), nn.Flatten(),
                          nn.Linear(8, 5)).double()
    sharded = nn.Sequential(nn.Conv2d(4, 40, 1, groups=2), nn.Conv2d(40, 8, 3, groups=4), nn.Flatten(),
                            nn.Linear(8, 5)).double()
    for p, s in zip(_layers(plain), _layers(sharded)):
        s.weight = nn.Parameter(distribute_tensor(p.weight.detach().clone(), mesh, [Shard(0)]))
    return plain, sharded


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("group_mode", ["per_group", "whole"])
@pytest.mark.parametrize("kind", GRAM_KINDS)
def test_sharded_weights_take_both_options(one_rank, kind, group_mode, reduction, monkeypatch):
    plain, sharded = _sharded_model(one_rank)
    routed = []
    real = D.all_reduce_sum
    monkeypatch.setattr(D, "all_reduce_sum", lambda parts, *a, **k: routed.append(len(parts)) or real(parts, *a, **k))
    got = Regularizer(sharded, kind, 0.3, group_mode=group_mode, reduction=reduction, **_kw(kind))()
    # the grouped 1x1 conv reduces its partial Gram only as one matrix (frame / orthogonality: the cols Gram)
    assert routed == ([1] if group_mode == "whole" and kind in ("frame", "orthogonality") else [])
    want = _oracle(plain, kind, group_mode)
    want = 0.3 * (want.sum() if reduction == "sum" else want.mean())
    assert not D.is_dtensor(got)
    torch.testing.assert_close(got, want, **TOL)
    got.backward()
    for s, g in zip(_layers(sharded), _grads(plain, want)):
        torch.testing.assert_close(s.weight.grad.full_tensor(), g, **TOL)
