"""regkernels.nn.spectrum and Regularizer.stats(operator=True) (docs/nn.md#spectrum,
docs/nn.md#regularizerstats), against float64 oracles: each layer's dense operator T from impulse
responses (tests/op_cases.py) and its SVD, its explicit Gram's Gershgorin discs and frame
penalty, and explicit products over the layers.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import regkernels
from regkernels.nn import NETWORK_KEY, Regularizer, spectrum
from op_cases import _conv_frame_parts, impulse_matrix

D64 = torch.float64
INPUT = (2, 8, 7)


def _model(seed=0) -> nn.Sequential:
    """Every kind of conv row: circular dilated 'same' (exact, Sedghi), zero-padded strided grouped
    (power), circular grouped 'same' (exact), circular padding wider than the kernel's half
    (power, rows repeat: its bound is its own size's), then a Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=2, dilation=2, padding_mode="circular"), nn.ReLU(),   # 8×7
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), nn.ReLU(),                     # 4×4
        nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="circular"), nn.ReLU(),      # 4×4
        nn.Conv2d(6, 3, 3, padding=2, padding_mode="circular"), nn.ReLU(),                # 6×6
        nn.Flatten(), nn.Linear(3 * 6 * 6, 5),
    ).double()


def _geometry(m: nn.Module) -> dict:
    if isinstance(m, nn.Linear):
        return {}
    return dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups, padding_mode=m.padding_mode)


def _oracle(m: nn.Module, size, A=0.5, B=2.0) -> dict:
    """σ_max, σ_min, Gershgorin bounds and frame penalty of the layer's dense operator."""
    w = m.weight.detach().double()
    w, size = (w[..., None], (1,)) if isinstance(m, nn.Linear) else (w, size)
    T = impulse_matrix(w, size, **_geometry(m))
    s = torch.linalg.svdvals(T)
    d, r = _conv_frame_parts(w, size, "auto", **_geometry(m))
    frame = (((A - (d - r)).clamp_min(0) ** 2) + ((d + r) - B).clamp_min(0) ** 2).mean()
    return {"sigma_max": s[0].item(), "sigma_min": s[-1].item(), "gershgorin_lo": (d - r).min().item(),
            "gershgorin_hi": (d + r).max().item(), "frame_penalty": frame.item()}


SIZES = {"0": (8, 7), "2": (8, 7), "4": (4, 4), "6": (4, 4), "9": None}
EXACT = {"0": True, "2": False, "4": True, "6": False, "9": True}


def test_spectrum_rows_match_the_dense_operators():
    model = _model()
    with torch.no_grad():
        model[2].weight[0] = 0  # one filter of zeros: sparsity
    sp = spectrum(model, INPUT)
    assert [r["name"] for r in sp.layers] == list(SIZES)
    assert [r["kind"] for r in sp.layers] == ["conv2d"] * 4 + ["linear"]
    layers = dict(model.named_modules())
    for row in sp.layers:
        m = layers[row["name"]]
        assert row["input_size"] == SIZES[row["name"]]
        want = _oracle(m, row["input_size"])
        assert row["exact"] is EXACT[row["name"]]
        if row["exact"]:
            assert row["sigma_max"] == pytest.approx(want["sigma_max"], rel=1e-9)
            assert row["sigma_min"] == pytest.approx(want["sigma_min"], rel=1e-7, abs=1e-12)
            assert row["sigma_max_rel_tol"] == 0
        else:  # power iteration: a lower bound, converged here
            assert want["sigma_max"] * (1 - 1e-4) <= row["sigma_max"] <= want["sigma_max"] * (1 + 1e-9)
            assert math.isnan(row["sigma_min"]) and 0 <= row["sigma_max_rel_tol"] < 1e-3
        assert row["bound"] >= want["sigma_max"] * (1 - 1e-12)
        assert row["bound_any_size"] is (row["name"] != "6")
        if row["bound_any_size"]:  # the bound for every input size: above a much larger input's σ_max too
            big = {"0": (14, 14), "2": (14, 12), "4": (10, 10), "9": None}[row["name"]]
            w = m.weight.detach()[..., None] if big is None else m.weight.detach()
            T = impulse_matrix(w, big or (1,), **_geometry(m))
            assert row["bound"] >= torch.linalg.matrix_norm(T, 2).item() * (1 - 1e-12)
        for key in ("gershgorin_lo", "gershgorin_hi", "frame_penalty"):
            assert row[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (row["name"], key)
        w = m.weight.detach()
        assert row["sparsity"] == (w == 0).sum().item() / w.numel()
    assert sp.layers[1]["sparsity"] == 0.25  # 1 filter of 4
    assert sp.lipschitz_bound == pytest.approx(math.prod(r["bound"] for r in sp.layers), rel=1e-15)
    assert sp.lipschitz_estimate == pytest.approx(math.prod(_oracle(layers[n], s)["sigma_max"]
                                                            for n, s in SIZES.items()), rel=1e-4)
    assert sp.lipschitz_estimate <= sp.lipschitz_bound


def test_the_bound_bounds_the_network():
    """The product of the bounds is above ‖f(x) − f(y)‖/‖x − y‖ of the ReLU chain (no biases, so
    the layers are linear maps and ReLU is 1-Lipschitz) on random pairs, and above the product of
    the exact σ_max."""
    model = _model(1)
    for m in model.modules():
        if getattr(m, "bias", None) is not None:
            m.bias = None
    sp = spectrum(model, INPUT)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, *INPUT, generator=g, dtype=D64), torch.randn(64, *INPUT, generator=g, dtype=D64)
    with torch.no_grad():
        ratio = (model(x) - model(y)).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert ratio.max().item() <= sp.lipschitz_bound
    assert sp.lipschitz_estimate <= sp.lipschitz_bound


def test_markdown_and_json():
    sp = spectrum(_model(), INPUT)
    text = sp.to_markdown()
    lines = text.splitlines()
    assert lines[0].startswith("| layer | kind | input | σ_max") and len(lines) == 2 + 5 + 2
    assert "| 0 | conv2d | 8×7 |" in text and "| 9 | linear | — |" in text and "~" in lines[3]  # layer 2: power
    assert "(at 4×4)" in lines[5]  # the circular conv whose rows repeat
    assert f"{sp.lipschitz_bound:.4g}" in lines[-1]
    data = json.loads(json.dumps(sp.as_dict()))
    assert data["input_size"] == list(INPUT) and len(data["layers"]) == 5
    assert data["layers"][0]["input_size"] == [8, 7] and data["layers"][4]["input_size"] is None
    assert data["lipschitz_bound"] == sp.lipschitz_bound


def test_conv1d_conv3d_and_a_frame_band():
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(27, 2)).double()
    sp = spectrum(model, (2, 9), A=0.2, B=1.0)
    assert [r["kind"] for r in sp.layers] == ["conv1d", "linear"] and sp.layers[0]["input_size"] == (9,)
    assert sp.layers[0]["frame_penalty"] == pytest.approx(_oracle(model[0], (9,), 0.2, 1.0)["frame_penalty"],
                                                          rel=1e-9)
    model = nn.Sequential(nn.Conv3d(1, 2, 2, padding=1, padding_mode="circular")).double()
    row = spectrum(model, (1, 3, 3, 2)).layers[0]
    assert row["kind"] == "conv3d" and row["input_size"] == (3, 3, 2)
    assert row["bound"] >= _oracle(model[0], (3, 3, 2))["sigma_max"]


def test_nan_weights_stay_in_their_row():
    clean = spectrum(_model(), INPUT)
    model = _model()
    with torch.no_grad():
        model[2].weight[1, 0, 1, 1] = math.nan
    sp = spectrum(model, INPUT)
    for a, b in zip(clean.layers, sp.layers):
        keys = ("sigma_max", "bound", "gershgorin_lo", "gershgorin_hi", "frame_penalty")
        if a["name"] == "2":
            assert all(math.isnan(b[k]) for k in keys), b
        else:
            assert all(a[k] == b[k] for k in keys), (a, b)
    assert math.isnan(sp.lipschitz_bound) and math.isnan(sp.lipschitz_estimate)


def test_modes_restored_batchnorm_untouched_hooks_removed():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(3 * 8 * 7, 2)).double()
    model.train()
    model[2].eval()
    modes = [m.training for m in model.modules()]
    stats = (model[1].running_mean.clone(), model[1].num_batches_tracked.clone())
    spectrum(model, INPUT)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[1].running_mean, stats[0]) and torch.equal(model[1].num_batches_tracked, stats[1])
    assert all(not m._forward_pre_hooks for m in model.modules())
    # a forward that fails: the error names the shape, the hooks are gone and the modes restored
    with pytest.raises(RuntimeError, match=r"spectrum: the forward pass of zeros of shape \(1, 3, 8, 7\)"):
        spectrum(model, (3, 8, 7))
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert [m.training for m in model.modules()] == modes


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.spare = nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("model, size, exc, match", [
    (nn.Sequential(nn.ReLU(), nn.Flatten()), (2, 3), ValueError, r"spectrum: the model has no nn.Linear, nn.Conv"),
    (nn.Sequential(nn.ConvTranspose2d(2, 2, 3, dilation=2, output_padding=1)), (2, 5, 5), ValueError,
     r"spectrum: layer '0' \(ConvTranspose2d\) ran with output_padding \(1, 1\), not < its stride \(1, 1\)"),
    (_Unused(), (2, 6, 6), ValueError, r"spectrum: layer 'spare' was not called by the forward pass"),
    (nn.Sequential(nn.Conv2d(2, 2, 3, padding_mode="reflect", padding=1)), (2, 6, 6), ValueError,
     r"spectrum: layer '0' has padding_mode='reflect'"),
    (nn.Sequential(nn.Linear(3, 2)), (), TypeError, r"spectrum: input_size must be the model input's shape"),
    (nn.Sequential(nn.Linear(3, 2)), (0, 3), ValueError, r"spectrum: input_size must be"),
    (nn.Sequential(nn.Linear(3, 2)), torch.Size([3]), None, None),
    ("model", (3,), TypeError, r"spectrum: model must be an nn.Module"),
])
def test_bad_inputs(model, size, exc, match):
    if exc is None:  # a torch.Size is a sequence of ints: accepted
        assert len(spectrum(model, size).layers) == 1
        return
    with pytest.raises(exc, match=match):
        spectrum(model, size)


def test_bad_band():
    with pytest.raises(ValueError, match=r"spectrum: .*A"):
        spectrum(nn.Sequential(nn.Linear(3, 2)), (3,), A=3.0, B=2.0)


def test_sharded_linear_weights_are_gathered(gloo_world_of_one):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    plain = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    sharded = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    for p, s in zip((plain[0], plain[2]), (sharded[0], sharded[2])):
        s.weight = nn.Parameter(distribute_tensor(p.weight.detach().clone(), mesh, [Shard(0)]))
    a, b = spectrum(plain, (6,)), spectrum(sharded, (6,))
    assert a.layers == b.layers and a.lipschitz_bound == b.lipschitz_bound


# --------------------------------------------------------------------------- Regularizer.stats(operator=True)

def test_stats_without_operator_is_unchanged():
    model = _model()
    reg = Regularizer(model, "conv_frame", A=0.5, B=2.0)
    model(torch.zeros(1, *INPUT, dtype=D64))
    plain = reg.stats()
    assert reg.stats(operator=False) == plain
    assert all(set(v) == {"gershgorin_lo", "gershgorin_hi", "sigma_min", "sigma_max"} for v in plain.values())
    assert NETWORK_KEY not in plain


def test_stats_operator_matches_the_dense_operators():
    model = _model()
    reg = Regularizer(model, "conv_frame", A=0.5, B=2.0)
    model(torch.zeros(1, *INPUT, dtype=D64))
    out = reg.stats(operator=True)
    assert list(out) == list(SIZES) + [NETWORK_KEY]
    layers = dict(model.named_modules())
    plain = reg.stats()
    sp = spectrum(model, INPUT)
    for row in sp.layers:
        name = row["name"]
        got, want = out[name], _oracle(layers[name], SIZES[name])
        assert {k: got[k] for k in plain[name]} == plain[name]  # the operator=False entries, unchanged
        assert got["operator_sigma_max"] == row["sigma_max"]  # the same computation as spectrum's
        if EXACT[name]:
            assert got["operator_sigma_max"] == pytest.approx(want["sigma_max"], rel=1e-9)
            assert got["operator_sigma_min"] == pytest.approx(want["sigma_min"], rel=1e-7, abs=1e-12)
            assert got["operator_rel_tol"] == 0
        else:
            assert want["sigma_max"] * (1 - 1e-4) <= got["operator_sigma_max"] <= want["sigma_max"] * (1 + 1e-9)
            assert math.isnan(got["operator_sigma_min"]) and got["operator_rel_tol"] == row["sigma_max_rel_tol"]
    net = out[NETWORK_KEY]
    assert net["sigma_max_product"] == pytest.approx(math.prod(out[n]["operator_sigma_max"] for n in SIZES),
                                                     rel=1e-15)
    assert net["rel_tol"] == pytest.approx(1 - math.prod(1 - out[n]["operator_rel_tol"] for n in SIZES), rel=1e-12)
    assert all(isinstance(v, float) for e in out.values() for v in e.values())


def test_stats_operator_needs_input_sizes():
    model = _model()
    reg = Regularizer(model, "conv_frame", A=0.5, B=2.0)
    with pytest.raises(ValueError, match=r"Regularizer.stats\(operator=True\): no input size for layer '0': run one "
                                         r"forward pass"):
        reg.stats(operator=True)
    frame = Regularizer(model, "frame", A=0.5, B=2.0)
    with pytest.raises(ValueError, match=r"no input size for conv layer '0': a Regularizer of kind='frame' does not "
                                         r"record input sizes .* regkernels.nn.spectrum\(model, input_size\)"):
        frame.stats(operator=True)
    assert set(frame.stats()) == set(SIZES)  # operator=False needs no size
    mlp = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    out = Regularizer(mlp, "diversity", tau=0.3).stats(operator=True)
    for name in ("0", "2"):
        s = torch.linalg.svdvals(mlp[int(name)].weight.detach())
        assert out[name]["operator_sigma_max"] == pytest.approx(s[0].item(), rel=1e-12)
        assert out[name]["operator_sigma_min"] == pytest.approx(s[-1].item(), rel=1e-9)
    assert out[NETWORK_KEY]["rel_tol"] == 0
    with pytest.raises(TypeError, match=r"Regularizer.stats: operator must be True or False"):
        reg.stats(operator="yes")


def test_stats_operator_nan_layer():
    model = _model()
    reg = Regularizer(model, "conv_frame", A=0.5, B=2.0)
    model(torch.zeros(1, *INPUT, dtype=D64))
    with torch.no_grad():
        model[4].weight[0, 0, 0, 0] = math.nan
    out = reg.stats(operator=True)
    assert math.isnan(out["4"]["operator_sigma_max"]) and math.isnan(out[NETWORK_KEY]["sigma_max_product"])
    assert math.isfinite(out["2"]["operator_sigma_max"]) and math.isfinite(out["9"]["operator_sigma_max"])


def test_fsdp2_conv_model(gloo_world_of_one):
    """FSDP2 (fully_shard) in a world of one: the forward pass of zeros runs through FSDP's
    unsharding, the weights are gathered, and every row equals the plain model's."""
    from torch.distributed.fsdp import fully_shard

    plain, sharded = _model(), _model()
    for m in sharded.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fully_shard(m)
    fully_shard(sharded)
    a, b = spectrum(plain, INPUT), spectrum(sharded, INPUT)
    assert [r["name"] for r in b.layers] == [r["name"] for r in a.layers]
    for ra, rb in zip(a.layers, b.layers):
        for k, v in ra.items():
            assert rb[k] == (pytest.approx(v, rel=1e-12, nan_ok=True) if isinstance(v, float) else v), (ra["name"], k)


# --------------------------------------------------------------------------- ConvTranspose layers

def _transposed_model() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),                                      # 7×6 → 4×3
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), nn.ReLU(),  # → 8×6
        nn.ConvTranspose2d(6, 3, 2, dilation=2, padding=1),                                       # → 8×6
    ).double()


def _transposed_oracle(m: nn.Module, in_size, out_size, A=0.5, B=2.0) -> dict:
    """The layer's own dense matrix: F.conv_transpose2d's impulse responses, independent of the conv
    view (its columns are the outputs of one-hot inputs), and its smaller Gram."""
    c_in = m.weight.shape[0]
    n = c_in * math.prod(in_size)
    basis = torch.eye(n, dtype=D64).reshape(n, c_in, *in_size)
    out = torch.nn.functional.conv_transpose2d(basis, m.weight.detach(), None, m.stride, m.padding, m.output_padding,
                                               m.groups, m.dilation)
    assert tuple(out.shape[2:]) == tuple(out_size)
    M = out.reshape(n, -1).T  # (C_out·∏N, C_in·∏n)
    s = torch.linalg.svdvals(M)
    G = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    d = G.diagonal()
    r = G.abs().sum(1) - d.abs()
    frame = (((A - (d - r)).clamp_min(0) ** 2) + ((d + r) - B).clamp_min(0) ** 2).mean()
    return {"sigma_max": s[0].item(), "gershgorin_lo": (d - r).min().item(), "gershgorin_hi": (d + r).max().item(),
            "frame_penalty": frame.item()}


def test_spectrum_and_stats_take_conv_transpose_layers():
    model = _transposed_model()
    sp = spectrum(model, (2, 7, 6))
    assert [r["kind"] for r in sp.layers] == ["conv2d", "conv_transpose2d", "conv_transpose2d"]
    layers = dict(model.named_modules())
    outs = {"2": (8, 6), "4": (8, 6)}
    for row in sp.layers[1:]:
        m = layers[row["name"]]
        want = _transposed_oracle(m, row["input_size"], outs[row["name"]])
        # power iteration (100 steps): a lower bound; layer 4's top two σ are close, 0.12 % short
        assert want["sigma_max"] * (1 - 1e-2) <= row["sigma_max"] <= want["sigma_max"] * (1 + 1e-9)
        assert row["bound"] >= want["sigma_max"] * (1 - 1e-12) and row["bound_any_size"]
        for key in ("gershgorin_lo", "gershgorin_hi", "frame_penalty"):
            assert row[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (row["name"], key)
    assert sp.layers[1]["output_padding"] == (1, 1) and sp.layers[2]["output_padding"] == (0, 0)
    reg = Regularizer(model, "conv_frame", A=0.5, B=2.0, include=(nn.Conv2d, nn.ConvTranspose2d))
    model(torch.zeros(1, 2, 7, 6, dtype=D64))
    out = reg.stats(operator=True)
    for row in sp.layers:
        assert out[row["name"]]["operator_sigma_max"] == row["sigma_max"]


def test_stats_operator_needs_a_transposed_layers_size():
    model = nn.Sequential(nn.ConvTranspose2d(2, 2, 3, dilation=2, output_padding=1)).double()
    reg = Regularizer(model, "orthogonality", include=nn.ConvTranspose2d)
    with pytest.raises(ValueError, match=r"no input size for conv layer '0'"):
        reg.stats(operator=True)
