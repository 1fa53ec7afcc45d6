"""svb_(..., bn=...) and SVBProjector(..., bn=...): bounding BatchNorm scales (docs/svd.md#batchnorm-scales-bn).

The oracle below is written from the formula in the docs, channel by channel in Python floats
(float64): s_c = γ_c / sqrt(v_c + eps_bn), m = mean |s_c|, and |s_c| clamped into
[m/(1+eps), m·(1+eps)] with γ's sign kept (sign(0) = +1).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import regkernels
from regkernels.nn import SVBProjector
from regkernels.ops.svd import svb_bn_layers
from regkernels.reference import svd as R

EPS = 0.1


# ------------------------------------------------------------------------------ oracle

def oracle(gamma: torch.Tensor, var: torch.Tensor, eps_bn: float, eps: float) -> tuple[list[float], list[bool]]:
    """(new effective scales, channel kept) of one BatchNorm, from the documented formula."""
    g = [float(x) for x in gamma.double()]
    v = [float(x) for x in var.double()]
    std = [math.sqrt(x + eps_bn) for x in v]
    s = [a / b for a, b in zip(g, std)]
    m = sum(abs(x) for x in s) / len(s)
    lo, hi = m / (1 + eps), m * (1 + eps)
    out, kept = [], []
    for gc, sc in zip(g, s):
        sign = -1.0 if gc < 0 else 1.0
        out.append(sign * min(max(abs(sc), lo), hi))
        kept.append(lo <= abs(sc) <= hi)
    return out, kept


def scales(bn: nn.Module) -> torch.Tensor:
    return bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt()


# ------------------------------------------------------------------------------ models

def cnn(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Conv-BN-ReLU ×2, Linear-BatchNorm1d, and a BatchNorm1d after a ReLU (index 11), which
    follows no bounded layer. Running statistics and γ are set to known, spread-out values: some
    channels inside the band, some above, some below, a negative γ and a zero γ."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5, eps=1e-3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.BatchNorm1d(4))
    values = {
        1: ([1.0, 2.5, -0.8, 0.0, 1.1, 0.3], [1.0, 0.5, 2.0, 1.5, 1.2, 0.04]),
        4: ([0.5, 0.6, 0.55, 0.45, 0.52], [0.25, 0.36, 0.3, 0.2, 0.27]),   # all scales near 1: inside
        9: ([3.0, 0.2, 1.0, -1.5], [4.0, 0.01, 1.0, 2.25]),
        11: ([5.0, 0.1, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]),
    }
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # weights outside the band too
        for i, (g, v) in values.items():
            model[i].weight.copy_(torch.tensor(g))
            model[i].bias.copy_(torch.arange(len(g), dtype=torch.float32) * 0.1 - 0.2)
            model[i].running_var.copy_(torch.tensor(v))
            model[i].running_mean.copy_(torch.linspace(-1, 1, len(g)))
            model[i].num_batches_tracked.fill_(7)
    return model.to(dtype)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(model: nn.Module, before: dict[str, torch.Tensor], prefixes=None) -> bool:
    """Bit for bit equal to ``before`` (only the keys under ``prefixes`` when given)."""
    now = model.state_dict()
    keys = [k for k in before if prefixes is None or k.split(".")[0] in prefixes]
    return all(torch.equal(now[k], before[k]) for k in keys)


def assert_bounded(bn: nn.Module, gamma0: torch.Tensor, var: torch.Tensor, eps: float, rtol: float) -> None:
    want, kept = oracle(gamma0, var, bn.eps, eps)
    got = scales(bn)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=rtol, atol=0)
    for c, k in enumerate(kept):
        if k:  # a channel inside the band keeps its bits
            assert torch.equal(bn.weight[c], gamma0[c])


# ------------------------------------------------------------------------------ the bound itself

@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_bn_true_bounds_the_scales_after_bounded_layers_and_nothing_else(dtype, rtol):
    model = cnn(dtype)
    before = snapshot(model)
    n = regkernels.svb_(model, EPS, bn=True)
    assert n == 3  # the matrices only: BatchNorms are not counted
    for i in (1, 4, 9):
        bn = model[i]
        assert_bounded(bn, before[f"{i}.weight"], before[f"{i}.running_var"], EPS, rtol)
        for key in ("bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(bn, key), before[f"{i}.{key}"]), key
        assert bn.weight.dtype == dtype
    # the BatchNorm after the ReLU follows no bounded layer: untouched, bit for bit
    assert same(model, before, {"11"})
    # layer 4's scales all lie in the band: every bit kept
    assert same(model, before, {"4"})
    assert not same(model, before, {"1"}) and not same(model, before, {"9"})
    # the weights are bounded as without bn=
    for i in (0, 3, 8):
        s = torch.linalg.svdvals(model[i].weight.detach().reshape(model[i].weight.shape[0], -1).double())
        assert float(s.min()) >= 1 / (1 + EPS) - 1e-5 and float(s.max()) <= 1 + EPS + 1e-5


def test_sign_is_kept_zero_goes_up_and_the_spread_is_bounded():
    model = cnn()
    regkernels.svb_(model, EPS, bn=True)
    g1 = model[1].weight.detach()
    assert g1[2] < 0 and g1[3] > 0  # γ = -0.8 stays negative; γ = 0 becomes +m/(1+eps)·std
    assert model[9].weight[3] < 0
    for i in (1, 4, 9):
        a = scales(model[i]).abs()
        assert float(a.max() / a.min()) <= (1 + EPS) ** 2 * (1 + 1e-12)


def test_bn_false_is_the_default_and_changes_no_batchnorm():
    for kw in ({}, {"bn": False}, {"bn": []}):
        model = cnn()
        before = snapshot(model)
        assert regkernels.svb_(model, EPS, **kw) == 3
        assert same(model, before, {"1", "4", "9", "11"})
        assert not same(model, before, {"0"})  # the weights were bounded


def test_the_reference_and_the_public_op_agree():
    a, b = cnn(), cnn()
    R.svb_(a, EPS, bn=True)
    regkernels.svb_(b, EPS, bn=True)
    for i in (1, 4, 9, 11):
        assert torch.equal(a[i].weight, b[i].weight)


def test_low_precision_batchnorm_keeps_its_dtype():
    model = cnn(torch.float32)
    model[9].half()
    before = snapshot(model)
    regkernels.svb_(model, EPS, bn=True)
    assert model[9].weight.dtype == torch.float16
    want, _ = oracle(before["9.weight"], before["9.running_var"], model[9].eps, EPS)
    torch.testing.assert_close(scales(model[9]), torch.tensor(want, dtype=torch.float64), rtol=2e-3, atol=0)


# ------------------------------------------------------------------------------ which layers

def test_auto_selection_follows_module_order():
    assert svb_bn_layers(cnn()) == ["1", "4", "9"]
    # a parametrized conv's own submodules are skipped; the BatchNorm after it is found
    assert svb_bn_layers(nn.Sequential(parametrizations.weight_norm(nn.Conv2d(2, 3, 1)), nn.BatchNorm2d(3))) == ["1"]
    # the next module counts, containers included
    assert svb_bn_layers(nn.Sequential(nn.Sequential(nn.Conv2d(2, 3, 1)), nn.BatchNorm2d(3))) == ["1"]
    assert svb_bn_layers(nn.Sequential(nn.Sequential(nn.Conv2d(2, 3, 1)), nn.Sequential(nn.BatchNorm2d(3)))) == []
    # num_features must match the layer's outputs; a ConvTranspose is a bounded layer like a conv
    assert svb_bn_layers(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(4))) == []
    assert svb_bn_layers(nn.Sequential(nn.ConvTranspose2d(2, 3, 1), nn.BatchNorm2d(3))) == ["1"]
    assert svb_bn_layers(nn.Sequential(nn.ConvTranspose2d(3, 2, 1), nn.BatchNorm2d(3))) == []
    assert svb_bn_layers(nn.Conv2d(2, 3, 1)) == [] and svb_bn_layers(nn.BatchNorm2d(3)) == []
    # affine=False: left alone by bn=True
    assert svb_bn_layers(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, affine=False))) == []
    assert svb_bn_layers(cnn(), bn=False) == []


class Block(nn.Module):
    """A ResNet basic block as torchvision registers it (the forward does not matter here)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(cin, cout, 3), nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3), nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout))


def test_auto_selection_on_resnet_blocks_finds_every_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Block(4, 6), Block(6, 6))
    every = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert svb_bn_layers(model) == every and len(every) == 7


def test_named_override_bounds_exactly_those_layers():
    model = cnn()
    before = snapshot(model)
    regkernels.svb_(model, EPS, bn=["11"])
    assert same(model, before, {"1", "4", "9"})
    assert_bounded(model[11], before["11.weight"], before["11.running_var"], EPS, 1e-12)
    # modules instead of names, duplicates once, the same result
    other = cnn()
    regkernels.svb_(other, EPS, bn=(m for m in [other[11], other[11], other[4]]))
    assert torch.equal(other[11].weight, model[11].weight) and torch.equal(other[1].weight, before["1.weight"])
    assert svb_bn_layers(other, [other[11], "4", other[11]]) == ["11", "4"]
    # a module registered under two names can be named by either
    twice = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    twice.again = twice[1]
    assert svb_bn_layers(twice, ["again"]) == ["again"] and svb_bn_layers(twice, [twice.again]) == ["1"]


def test_affine_false_is_left_alone_and_refused_when_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        model[1].running_var.fill_(9.0)
        model[3].weight.copy_(torch.tensor([1.0, 4.0, 0.1, 1.0]))
    before = snapshot(model)
    regkernels.svb_(model, EPS, bn=True)
    assert same(model, before, {"1"}) and not same(model, before, {"3"})
    with pytest.raises(ValueError, match=r"svb_: cannot bound the BatchNorm scale of layer '1': it has no γ "
                                         r"\(affine=False\)"):
        regkernels.svb_(model, EPS, bn=["1"])


def test_no_running_statistics_is_refused_and_nothing_changes():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1),
                          nn.BatchNorm2d(3, track_running_stats=False))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
        model[1].weight.copy_(torch.tensor([1.0, 5.0, 0.2]))
    before = snapshot(model)
    msg = r"svb_: cannot bound the BatchNorm scale of layer '3': it keeps no running statistics"
    for bn in (True, ["1", "3"]):
        with pytest.raises(ValueError, match=msg):
            regkernels.svb_(model, EPS, bn=bn)
        assert same(model, before)  # weights and the first BatchNorm as well
    regkernels.svb_(model, EPS, bn=["1"])  # the override leaves it out
    assert not same(model, before, {"1"})


# ------------------------------------------------------------------------------ all or nothing

def test_a_later_bad_layer_changes_nothing():
    # the parametrized Linear at the end cannot take its bounded weight (RuntimeError at the write)
    model = cnn()
    model.append(parametrizations.orthogonal(nn.Linear(4, 3)))  # not square: the scaled original stays scaled
    with torch.no_grad():
        model[12].parametrizations.weight.original.mul_(3)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"svb_: layer '12': its weight parametrization's right_inverse"):
        regkernels.svb_(model, EPS, bn=True)
    assert same(model, before)
    # a conv found while computing (operator=True without its input size)
    model = cnn()
    before = snapshot(model)
    with pytest.raises(ValueError, match="input_size has no entry"):
        regkernels.svb_(model, EPS, operator=True, input_size={model[0]: 8}, bn=True)
    assert same(model, before)
    # a later BatchNorm that is refused
    model = cnn()
    model.append(nn.BatchNorm1d(4, track_running_stats=False))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer '12': it keeps no running statistics"):
        regkernels.svb_(model, EPS, bn=["1", "9", "12"])
    assert same(model, before)


def test_non_finite_statistics_make_that_layer_nan_only():
    model = cnn()
    with torch.no_grad():
        model[1].running_var[2] = float("nan")
        model[9].weight[0] = float("inf")
        model[4].running_var.zero_()
        model[4].eps = 0.0  # v + eps_bn = 0: no finite scale
    before = snapshot(model)
    regkernels.svb_(model, EPS, bn=True)
    for i in (1, 4, 9):
        assert torch.isnan(model[i].weight).all()
        torch.testing.assert_close(model[i].running_var, before[f"{i}.running_var"], rtol=0, atol=0, equal_nan=True)
    assert same(model, before, {"11"})
    # a NaN layer does not spoil the others
    model = cnn()
    with torch.no_grad():
        model[1].weight[0] = float("nan")
    before = snapshot(model)
    regkernels.svb_(model, EPS, bn=True)
    assert torch.isnan(model[1].weight).all()
    assert_bounded(model[9], before["9.weight"], before["9.running_var"], EPS, 1e-12)


# ------------------------------------------------------------------------------ SVBProjector

def test_projector_passes_bn_on_its_schedule_and_records_it():
    model = cnn()
    before = snapshot(model)
    proj = SVBProjector(model, EPS, every=2, bn=True)
    assert proj.step() == 0 and same(model, before)
    assert proj.step() == 3
    for i in (1, 9):
        assert_bounded(model[i], before[f"{i}.weight"], before[f"{i}.running_var"], EPS, 1e-12)
    assert same(model, before, {"11"})
    state = proj.state_dict()
    assert state == {"steps": 2, "eps": EPS, "every": 2, "operator": False, "bn": True}
    fresh = SVBProjector(model, EPS, every=2, bn=True)
    fresh.load_state_dict(state)
    assert fresh.steps == 2
    # a list is kept as names; bn=False keeps the old state, without "bn"
    named = SVBProjector(model, EPS, every=2, bn=[model[11]])
    assert named.bn == ["11"] and named.state_dict()["bn"] == ["11"]
    plain = SVBProjector(model, EPS, every=2)
    assert set(plain.state_dict()) == {"steps", "eps", "every", "operator"}
    assert SVBProjector(model, EPS, bn=[]).bn is False
    with pytest.raises(ValueError, match=r"SVBProjector.load_state_dict: the state was saved with bn=True, this "
                                         r"projector has bn=False"):
        plain.load_state_dict(state)
    with pytest.raises(ValueError, match=r"saved with bn=False, this projector has bn=True"):
        fresh.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match=r"saved with bn=True, this projector has bn=\['11'\]"):
        named.load_state_dict(state)


def test_projector_checks_bn_at_construction():
    model = cnn()
    with pytest.raises(TypeError, match=r"SVBProjector: bn must be a bool or a list of BatchNorm module names"):
        SVBProjector(model, EPS, bn="1")
    with pytest.raises(ValueError, match=r"SVBProjector: bn names layer '7', a Flatten, not a BatchNorm"):
        SVBProjector(model, EPS, bn=["7"])
    model.append(nn.Linear(4, 2))
    model.append(nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ValueError, match=r"SVBProjector: cannot bound the BatchNorm scale of layer '13'"):
        SVBProjector(model, EPS, bn=True)


# ------------------------------------------------------------------------------ bad arguments

def _shared_gamma() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[3].weight = model[1].weight
    return model


def _parametrized_gamma() -> nn.Module:
    class Pos(nn.Module):
        def forward(self, x):
            return x.abs()

        def right_inverse(self, x):
            return x

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    parametrize.register_parametrization(model[1], "weight", Pos())
    return model


@pytest.mark.parametrize("make, bn, exc, match", [
    (cnn, "1", TypeError, r"svb_: bn must be a bool or a list of BatchNorm module names \(or modules\) of the "
                          r"model; got str"),
    (cnn, 1, TypeError, r"svb_: bn must be a bool or a list .*; got int"),
    (cnn, None, TypeError, r"svb_: bn must be a bool or a list .*; got NoneType"),
    (cnn, [1], TypeError, r"svb_: bn must be .*; got an element of type int"),
    (cnn, ["nope"], ValueError, r"svb_: bn names 'nope', which is not a module of the model"),
    (cnn, ["0"], ValueError, r"svb_: bn names layer '0', a Conv2d, not a BatchNorm1d/2d/3d or SyncBatchNorm"),
    (cnn, [nn.BatchNorm2d(6)], ValueError, r"svb_: bn holds a BatchNorm2d that is not a module of the model"),
    (_shared_gamma, ["1", "3"], ValueError, r"svb_: BatchNorm layers '1' and '3' share one γ"),
    (_parametrized_gamma, True, ValueError, r"svb_: cannot bound the BatchNorm scale of layer '1': its γ "
                                            r"\(weight\) is parametrized"),
])
def test_bad_bn_arguments(make, bn, exc, match):
    model = make()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        regkernels.svb_(model, EPS, bn=bn)
    assert same(model, before)


def test_bn_needs_a_module():
    w = torch.randn(4, 4) * 3
    kept = w.clone()
    with pytest.raises(TypeError, match=r"svb_: bn= needs weights_or_module to be an nn.Module .*; got Tensor"):
        regkernels.svb_(w, EPS, bn=True)
    with pytest.raises(TypeError, match=r"svb_: bn= needs weights_or_module to be an nn.Module .*; got list"):
        regkernels.svb_([w], EPS, bn=["1"])
    assert torch.equal(w, kept)
    with pytest.raises(TypeError, match=r"svb_bn_layers: model must be an nn.Module; got Tensor"):
        svb_bn_layers(w)


# ------------------------------------------------------------------------------ sharded (one process)

@pytest.fixture(scope="module")
def one_rank(gloo_world_of_one):
    return gloo_world_of_one


def test_fsdp2_sharded_batchnorm_equals_one_process(one_rank):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model, plain = cnn(torch.float32), cnn(torch.float32)
    fully_shard(model)
    assert isinstance(model[1].weight, DTensor)
    assert regkernels.svb_(model, EPS, bn=True) == regkernels.svb_(plain, EPS, bn=True)
    for (k, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        a = a.full_tensor() if isinstance(a, DTensor) else a
        assert torch.equal(a, b), k


def test_partial_dtensor_gamma_is_refused(one_rank):
    from torch.distributed.tensor import DTensor, Partial, init_device_mesh

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    mesh = init_device_mesh("cpu", (1,))
    model[1].weight = nn.Parameter(DTensor.from_local(torch.ones(4), mesh, [Partial()]))
    with pytest.raises(ValueError, match=r"svb_: cannot bound the BatchNorm scale of layer '1': its γ \(weight\) is "
                                         r"a DTensor with placements \(Partial\(sum\),\)"):
        regkernels.svb_(model, EPS, bn=True)
