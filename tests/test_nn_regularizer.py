"""Tests of the model-level Regularizer and the SVBProjector (docs/nn.md#regularizer).

Oracles: the public per-layer ops called by hand with each layer's own arguments (the
Regularizer must be exactly their weighted mean), float64 SVDs for the stats, and the SVB
bounds themselves for the projector.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import regkernels
from regkernels.nn import KINDS, Regularizer, SVBProjector

D64 = torch.float64
KIND_KW = {"frame": dict(A=0.5, B=2.0), "diversity": dict(tau=0.2), "orthogonality": {}, "mhe": {},
           "srip": {}, "conv_frame": dict(A=0.5, B=2.0), "ocnn": {}}


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(8, 8, 2, dilation=2, padding=1, padding_mode="circular"), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).double()


def _run(model: nn.Module) -> None:
    model(torch.randn(3, 2, 8, 8, dtype=D64))


def _by_hand(model: nn.Module, kind: str, kw: dict, generator=None) -> torch.Tensor:
    """The per-layer penalties of every Conv2d / Linear, each op called with the layer's arguments."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if kind in ("frame", "diversity", "orthogonality", "mhe", "srip"):
        op = {"frame": regkernels.frame_penalty, "diversity": regkernels.diversity_penalty,
              "orthogonality": regkernels.orthogonality_penalty, "mhe": regkernels.mhe_penalty,
              "srip": regkernels.srip_penalty}[kind]
        extra = dict(generator=generator) if kind == "srip" else {}
        # a grouped conv is a batch of matrices: the mean over groups (docs/gram.md#as_matrix)
        return torch.stack([op(regkernels.as_matrix(m.weight, getattr(m, "groups", 1)), **kw, **extra).mean()
                            for m in layers])
    sizes = [(8, 8), (8, 8), (4, 4)]
    vals = []
    for i, m in enumerate(layers):
        if isinstance(m, nn.Linear):
            w, geo, size = m.weight[..., None], dict(), (1,)
        else:
            w, size = m.weight, sizes[i]
            geo = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                       padding_mode=m.padding_mode)
        if kind == "conv_frame":
            vals.append(regkernels.conv_frame_penalty(w, size, kw["A"], kw["B"], **geo))
        else:
            g = geo.get("groups", 1)
            vals.append(torch.stack([regkernels.conv_orthogonality_penalty(wg, stride=geo.get("stride", 1))
                                     for wg in w.chunk(g)]).mean())
    return torch.stack(vals)


@pytest.mark.parametrize("kind", KINDS)
def test_regularizer_equals_the_mean_of_per_layer_ops(kind):
    model = _model()
    kw = dict(KIND_KW[kind])
    if kind == "srip":  # SRIP's start vectors: drawn in layer order from the generator
        kw["generator"] = torch.Generator().manual_seed(7)
    reg = Regularizer(model, kind, 0.3, **kw)
    _run(model)
    assert reg.names == ["0", "2", "4", "7"]
    got = reg()
    if kind == "srip":
        want = _by_hand(model, kind, {}, generator=torch.Generator().manual_seed(7))
    else:
        want = _by_hand(model, kind, kw)
        torch.testing.assert_close(reg.values(), want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got, 0.3 * want.mean(), atol=1e-12, rtol=1e-10)
    got.backward()
    assert all(m.weight.grad is not None for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


@pytest.mark.parametrize("kind", ["frame", "conv_frame", "ocnn"])
def test_regularizer_reference_backend_agrees(kind):
    model = _model()
    fast = Regularizer(model, kind, **KIND_KW[kind])
    ref = Regularizer(model, kind, backend="reference", **KIND_KW[kind])
    _run(model)
    torch.testing.assert_close(fast(), ref(), atol=1e-12, rtol=1e-10)


def test_exclusions_and_includes():
    model = _model()
    assert Regularizer(model, "frame", exclude=["2", "7"], **KIND_KW["frame"]).names == ["0", "4"]
    assert Regularizer(model, "frame", exclude=model[0], **KIND_KW["frame"]).names == ["2", "4", "7"]
    assert Regularizer(model, "frame", exclude=nn.Linear, **KIND_KW["frame"]).names == ["0", "2", "4"]
    assert Regularizer(model, "frame", include=nn.Linear, **KIND_KW["frame"]).names == ["7"]
    reg = Regularizer(model, "frame", exclude=["0", "2"], **KIND_KW["frame"])
    want = torch.stack([regkernels.frame_penalty(regkernels.as_matrix(model[4].weight), 0.5, 2.0),
                        regkernels.frame_penalty(model[7].weight, 0.5, 2.0)]).mean()
    torch.testing.assert_close(reg(), want)
    model.zero_grad()
    reg().backward()
    assert model[0].weight.grad is None and model[2].weight.grad is None  # excluded: untouched


@torch.no_grad()
def test_stats_match_exact_svds_and_gershgorin():
    model = _model()
    for kind in ("frame", "conv_frame"):
        reg = Regularizer(model, kind, **KIND_KW[kind])
        _run(model)
        stats = reg.stats()
        assert list(stats) == reg.names
        for name, m in reg.layers:
            mat = regkernels.as_matrix(m.weight.detach(), getattr(m, "groups", 1))
            s = torch.linalg.svdvals(mat)
            assert stats[name]["sigma_min"] == pytest.approx(float(s.min()), rel=1e-10)
            assert stats[name]["sigma_max"] == pytest.approx(float(s.max()), rel=1e-10)
            if kind == "frame":
                lo, hi = regkernels.gershgorin_bounds(mat)
            elif isinstance(m, nn.Linear):
                lo, hi = regkernels.gershgorin_bounds(m.weight)  # the operator of a Linear is W
            else:
                size = {"0": (8, 8), "2": (8, 8), "4": (4, 4)}[name]
                lo, hi = regkernels.conv_gershgorin_bounds(m.weight, size, m.stride, m.padding, m.dilation,
                                                           m.groups, m.padding_mode)
            assert stats[name]["gershgorin_lo"] == pytest.approx(float(lo.min()), rel=1e-10)
            assert stats[name]["gershgorin_hi"] == pytest.approx(float(hi.max()), rel=1e-10)
            # the Gershgorin interval encloses the Gram's eigenvalues, σ² of the matrix (frame kind)
            if kind == "frame":
                assert stats[name]["gershgorin_lo"] <= stats[name]["sigma_min"] ** 2 + 1e-12
                assert stats[name]["sigma_max"] ** 2 <= stats[name]["gershgorin_hi"] + 1e-12
            assert all(isinstance(v, float) for v in stats[name].values())


def test_conv_frame_input_sizes():
    model = _model()
    reg = Regularizer(model, "conv_frame", **KIND_KW["conv_frame"])
    with pytest.raises(ValueError, match=r"Regularizer: no input size for layer '0': run one forward pass first"):
        reg()
    given = Regularizer(model, "conv_frame", input_sizes={"0": (8, 8), "2": 8, "4": (4, 4)}, **KIND_KW["conv_frame"])
    _run(model)  # now the pre-hooks have recorded the same sizes
    torch.testing.assert_close(given(), reg())
    reg.remove_hooks()
    # padding="same" with an odd kernel is symmetric padding; an even one has no operator here
    same = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same").double())
    r = Regularizer(same, "conv_frame", input_sizes={"0": (5, 5)}, **KIND_KW["conv_frame"])
    torch.testing.assert_close(r(), regkernels.conv_frame_penalty(same[0].weight, (5, 5), 0.5, 2.0, padding=1))
    with pytest.raises(ValueError, match=r"layer '0' has padding='same' with an even dilated kernel"):
        Regularizer(nn.Sequential(nn.Conv2d(1, 2, 2, padding="same")), "conv_frame", **KIND_KW["conv_frame"])
    with pytest.raises(ValueError, match=r"layer '0' has padding_mode='reflect'"):
        Regularizer(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), "ocnn")


@pytest.mark.parametrize("call,exc,match", [
    (lambda m: Regularizer(m, "spectral"), ValueError, r"Regularizer: kind must be one of 'frame'"),
    (lambda m: Regularizer(m, "frame", -1.0, A=0.5, B=2.0), ValueError, r"Regularizer: weight must be >= 0"),
    (lambda m: Regularizer(m, "frame"), TypeError, r"kind='frame' takes keyword arguments A, B, side"),
    (lambda m: Regularizer(m, "frame", A=2.0, B=1.0), ValueError, r"need A <= B"),
    (lambda m: Regularizer(m, "conv_frame", A=0.5), TypeError, r"kind='conv_frame' takes A, B .* missing \['B'\]"),
    (lambda m: Regularizer(m, "ocnn", stride=2), TypeError, r"kind='ocnn' takes padding and side only"),
    (lambda m: Regularizer(m, "frame", exclude=["9"], A=0.5, B=1.0), ValueError, r"exclude names a module .* '9'"),
    (lambda m: Regularizer(m, "frame", include=nn.LSTM, A=0.5, B=1.0), ValueError, r"no layer selected"),
    (lambda m: Regularizer(m, "frame", include=3, A=0.5, B=1.0), TypeError, r"include must be an nn.Module"),
    (lambda m: Regularizer(m.state_dict(), "frame", A=0.5, B=1.0), TypeError, r"model must be an nn.Module"),
    (lambda m: SVBProjector(m, -0.1), ValueError, r"SVBProjector: eps must be > 0"),
    (lambda m: SVBProjector(m, 0.1, every=0), ValueError, r"SVBProjector: every must be >= 1"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(_model())


def test_svb_projector_schedule_and_bounds():
    model = _model()
    proj = SVBProjector(model, eps=0.1, every=3)
    before = [m.weight.detach().clone() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert proj.step() == 0 and proj.step() == 0
    after2 = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(torch.equal(a, b) for a, b in zip(before, after2))  # untouched between projections
    assert proj.step() == 1 + 2 + 1 + 1  # the grouped conv projects each of its 2 groups
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            s = torch.linalg.svdvals(regkernels.as_matrix(m.weight.detach(), getattr(m, "groups", 1)))
            assert float(s.min()) >= 1 / 1.1 - 1e-9 and float(s.max()) <= 1.1 + 1e-9


def test_svb_projector_operator_mode_records_input_sizes():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular")).double()
    proj = SVBProjector(model, eps=0.05, operator=True)
    model(torch.randn(1, 3, 6, 6, dtype=D64))
    assert proj.step() == 1
    sv = regkernels.conv_singular_values(model[0].weight.detach(), (6, 6))
    before = regkernels.conv_singular_values(torch.randn(3, 3, 3, 3, dtype=D64), (6, 6))
    # an approximate projection (truncation to the 3×3 support): closer to the band than a random kernel
    assert float((sv - 1).abs().max()) < float((before - 1).abs().max())
    assert math.isfinite(float(sv.sum()))


def test_regularizer_errors_name_the_layer_not_a_list_index():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 1))
    with pytest.raises(ValueError, match=r"Regularizer: as_matrix\(layer '2'\.weight\) needs at least 2 rows"):
        Regularizer(model, "mhe")


def test_regularizer_takes_every_backend_name_and_a_named_backend_raises_the_ops_error():
    """Every backend name is accepted ("torch" included); a name the kind's op lacks for the
    layers' device raises that op's ValueError at the call, it never falls back silently."""
    from regkernels.ops._table import BACKENDS

    model = _model()
    _run(model)
    for name in BACKENDS:
        for kind in KINDS:
            Regularizer(model, kind, backend=name, **KIND_KW[kind])
    with pytest.raises(ValueError, match=r"'cuda'"):
        Regularizer(model, "frame", backend="cuda", **KIND_KW["frame"])()
    with pytest.raises(ValueError, match=r"Regularizer: backend must be one of None, 'reference', 'torch'"):
        Regularizer(model, "frame", backend="fast", **KIND_KW["frame"])


def test_svb_projector_state_dict_resumes_the_schedule():
    """A projector loaded after 4 steps of every=3 projects on step 6, as the uninterrupted one."""
    model = _model()
    proj = SVBProjector(model, eps=0.1, every=3)
    assert [proj.step() for _ in range(4)][2] > 0
    state = proj.state_dict()
    assert state == {"steps": 4, "eps": 0.1, "every": 3, "operator": False}
    fresh = SVBProjector(model, eps=0.1, every=3)
    fresh.load_state_dict(state)
    assert fresh.step() == 0 and fresh.step() > 0 and fresh.steps == 6


@pytest.mark.parametrize("state, match", [
    ({"steps": 1, "eps": 0.1, "every": 2, "operator": False}, r"SVBProjector.load_state_dict: the state was saved with "
                                                              r"every=2, this projector has every=3"),
    ({"steps": 1, "eps": 0.2, "every": 3, "operator": False}, r"saved with eps=0.2, this projector has eps=0.1"),
    ({"steps": 1, "eps": 0.1, "every": 3}, r"expected the dict SVBProjector.state_dict\(\) returns"),
    ({"steps": -1, "eps": 0.1, "every": 3, "operator": False}, r"SVBProjector.load_state_dict: steps must be >= 0"),
])
def test_svb_projector_load_state_dict_refuses_another_configuration(state, match):
    proj = SVBProjector(_model(), eps=0.1, every=3)
    with pytest.raises(ValueError, match=match):
        proj.load_state_dict(state)
    assert proj.steps == 0
