"""Transposed convolutions (nn.ConvTranspose1d/2d/3d) across as_matrix, the conv-operator ops,
Regularizer, svb_ / SVBProjector and the initializers (docs/conv.md#transposed-convolutions).

Every oracle here is independent of the code under test: operators are built from
F.conv_transpose impulse responses, matrices by explicit index loops, penalties from their
formulas on those explicit matrices, all in float64.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regkernels
from regkernels.nn import Regularizer, SVBProjector
from regkernels.nn import init
from regkernels.ops.svd import svb_bn_layers

DT = torch.float64
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ----------------------------------------------------------------------------- oracles

def impulse_matrix(W, n, stride=1, padding=0, output_padding=0, dilation=1, groups=1):
    """The transposed conv's matrix: column j is its response to the j-th unit input (C_in, *n)."""
    cin, d = W.shape[0], W.dim() - 2
    basis = torch.eye(cin * math.prod(n), dtype=W.dtype).reshape(-1, cin, *n)
    out = _CONV_T[d](basis, W, None, stride, padding, output_padding, groups, dilation)
    return out.reshape(basis.shape[0], -1).T


def filter_matrices(W, groups):
    """Per group, the (out/g, in/g·∏k) matrix whose row o is what output channel o reads: W[i·in/g + c, o, taps]."""
    cin, per = W.shape[0], W.shape[1]
    kk = math.prod(W.shape[2:])
    mats = []
    for i in range(groups):
        M = torch.empty(per, (cin // groups) * kk, dtype=W.dtype)
        for o in range(per):
            for c in range(cin // groups):
                M[o, c * kk:(c + 1) * kk] = W[i * (cin // groups) + c, o].reshape(-1)
        mats.append(M)
    return mats


def weight_from_filter_matrices(mats, shape):
    cin, per, *k = shape
    groups = len(mats)
    kk = math.prod(k)
    W = torch.empty(shape, dtype=mats[0].dtype)
    for i, M in enumerate(mats):
        for o in range(per):
            for c in range(cin // groups):
                W[i * (cin // groups) + c, o] = M[o, c * kk:(c + 1) * kk].reshape(k)
    return W


def gram(M, side):
    if side == "auto":
        side = "cols" if M.shape[0] >= M.shape[1] else "rows"
    return M @ M.T if side == "rows" else M.T @ M


def disc_edges(M, side):
    V = gram(M, side)
    d = V.diagonal()
    r = V.abs().sum(1) - d.abs()
    return d - r, d + r


def frame_oracle(M, A, B, side):
    lo, hi = disc_edges(M, side)
    return ((A - lo).clamp_min(0) ** 2 + (hi - B).clamp_min(0) ** 2).mean()


def orthogonality_oracle(M, side="auto"):
    V = gram(M, side)
    return ((V - torch.eye(V.shape[0], dtype=V.dtype)) ** 2).sum()


def diversity_oracle(M, tau):
    U = M / M.norm(dim=1, keepdim=True)
    C = U @ U.T
    mask = (C.abs() >= tau) & ~torch.eye(C.shape[0], dtype=torch.bool)
    return 0.5 * (C[mask] ** 2).sum()


def ocnn_rows_oracle(K, stride):
    """OCNN's output-side penalty of a conv kernel K (o, c, *k): ‖conv(K, K, stride, P) − I at the centre‖²,
    P = ⌊(k−1)/S⌋·S (docs/conv.md#conv_orthogonality_penalty)."""
    d = K.dim() - 2
    s = (stride,) * d if isinstance(stride, int) else tuple(stride)
    P = tuple((k - 1) // si * si for k, si in zip(K.shape[2:], s))
    O = _CONV[d](K, K, None, s, P)
    target = torch.zeros_like(O)
    centre = tuple(n // 2 for n in O.shape[2:])
    target[(torch.arange(K.shape[0]), torch.arange(K.shape[0]), *centre)] = 1.0
    return ((O - target) ** 2).sum()


# ----------------------------------------------------------------------------- conv_to_matrix

# (d, C_in, C_out, kernel, input size, stride, padding, output_padding, dilation, groups)
GEOMETRIES = [
    (1, 3, 5, (3,), (4,), 1, 0, 0, 1, 1),
    (1, 4, 6, (2,), (5,), 2, 1, 1, 1, 2),
    (1, 3, 3, (3,), (4,), 2, 2, 1, 2, 1),
    (2, 3, 5, (3, 2), (3, 4), 1, 1, 0, 1, 1),
    (2, 2, 6, (3, 3), (3, 3), 2, 1, 1, 1, 2),
    (2, 3, 1, (2, 3), (2, 3), (2, 1), (0, 1), (1, 0), (2, 1), 1),
    (2, 6, 4, (3, 3), (3, 2), 1, 2, 0, 2, 2),
    (3, 3, 5, (2, 2, 3), (2, 3, 2), 1, 0, 0, 1, 1),
    (3, 2, 4, (3, 2, 2), (2, 2, 2), 2, (1, 0, 1), 1, (1, 2, 1), 2),
]


def _case(case):
    d, cin, cout, k, n, s, p, o, dl, g = case
    W = torch.randn(cin, cout // g, *k, dtype=DT, generator=torch.Generator().manual_seed(hash(case) % 2**31))
    return W, n, dict(stride=s, padding=p, output_padding=o, dilation=dl, groups=g)


@pytest.mark.parametrize("case", GEOMETRIES, ids=lambda c: f"{c[0]}d-s{c[5]}-p{c[6]}-op{c[7]}-dl{c[8]}-g{c[9]}")
def test_conv_to_matrix_transposed_is_the_impulse_response(case):
    W, n, geo = _case(case)
    expected = impulse_matrix(W, n, **geo)
    kw = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"], groups=geo["groups"],
              transposed=True, output_padding=geo["output_padding"])
    for backend in (None, "reference"):
        M = regkernels.conv_to_matrix(W, n, backend=backend, **kw)
        assert M.shape == expected.shape
        torch.testing.assert_close(M, expected, rtol=0, atol=1e-12)
    for layout in ("coo", "csr"):
        S = regkernels.conv_to_matrix(W, n, layout=layout, **kw)
        assert S.layout == (torch.sparse_coo if layout == "coo" else torch.sparse_csr)
        torch.testing.assert_close(S.to_dense(), expected, rtol=0, atol=1e-12)
    # differentiable w.r.t. the weight: the same gradient as through the impulse responses
    Wg = W.clone().requires_grad_(True)
    probe = torch.randn(expected.shape, dtype=DT)
    (regkernels.conv_to_matrix(Wg, n, **kw) * probe).sum().backward()
    We = W.clone().requires_grad_(True)
    (impulse_matrix(We, n, **geo) * probe).sum().backward()
    torch.testing.assert_close(Wg.grad, We.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", GEOMETRIES[::2], ids=lambda c: f"{c[0]}d-s{c[5]}-g{c[9]}")
def test_operator_penalties_of_the_transposed_conv(case):
    W, n, geo = _case(case)
    M = impulse_matrix(W, n, **geo)
    kw = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"], groups=geo["groups"],
              transposed=True, output_padding=geo["output_padding"])
    A, B = 0.3, 1.7
    for side in ("rows", "cols", "auto"):
        expected = frame_oracle(M, A, B, side)
        for backend in (None, "torch", "reference"):
            got = regkernels.conv_frame_penalty(W, n, A, B, side=side, backend=backend, **kw)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        lo, hi = regkernels.conv_gershgorin_bounds(W, n, side=side, **kw)
        e_lo, e_hi = disc_edges(M, side)
        torch.testing.assert_close(lo, e_lo.min(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(hi, e_hi.max(), rtol=1e-10, atol=1e-12)
    W2 = torch.randn_like(W)
    multi = regkernels.conv_frame_penalty_multi([W, W2], n, A, B, side="rows", **kw)
    torch.testing.assert_close(multi, torch.stack([frame_oracle(M, A, B, "rows"),
                                                   frame_oracle(impulse_matrix(W2, n, **geo), A, B, "rows")]),
                               rtol=1e-10, atol=1e-12)


def test_auto_side_of_a_square_transposed_operator_is_taken_on_its_own_shape():
    # T and Tᵀ square: Gram(Tᵀ, "auto") = Tᵀ's own "cols" Gram = T Tᵀ, whose discs differ from Tᵀ T's
    W = torch.randn(2, 2, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    M = impulse_matrix(W, (4,), padding=1)
    assert M.shape[0] == M.shape[1]
    assert not torch.allclose(frame_oracle(M, 0.9, 1.1, "rows"), frame_oracle(M, 0.9, 1.1, "cols"))
    got = regkernels.conv_frame_penalty(W, (4,), 0.9, 1.1, padding=1, transposed=True)
    torch.testing.assert_close(got, frame_oracle(M, 0.9, 1.1, "cols"), rtol=1e-10, atol=1e-12)


def test_circular_transposed_operator_has_the_conv_singular_values():
    # the circular model: T u = conv(circular pad of u, W); Tᵀ (the transposed conv's operator) has T's
    # singular values, which conv_singular_values gives for the weight as it stands
    W = torch.randn(3, 2, 3, 3, dtype=DT, generator=torch.Generator().manual_seed(4))
    N = (4, 5)
    cols = []
    for j in range(2 * math.prod(N)):
        u = torch.zeros(2 * math.prod(N), dtype=DT)
        u[j] = 1
        cols.append(F.conv2d(F.pad(u.reshape(1, 2, *N), (0, 2, 0, 2), mode="circular"), W).reshape(-1))
    M = torch.stack(cols, 1).T
    expected = torch.linalg.svdvals(M).sort().values
    got = regkernels.conv_singular_values(W, N).reshape(-1).sort().values
    torch.testing.assert_close(got, expected[-got.numel():], rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- as_matrix

@pytest.mark.parametrize("shape,groups", [((3, 5, 3, 2), 1), ((6, 2, 3), 2), ((4, 3, 2, 2, 1), 2), ((5, 1, 3, 3), 5)])
def test_as_matrix_transposed_rows_are_the_output_filters(shape, groups):
    W = torch.randn(shape, dtype=DT)
    got = regkernels.as_matrix(W, groups, transposed=True)
    mats = filter_matrices(W, groups)
    expected = mats[0] if groups == 1 else torch.stack(mats)
    assert torch.equal(got, expected)


def test_as_matrix_transposed_is_the_equivalent_stride1_conv():
    # conv_transpose(x, W) at stride 1, padding 0 is conv(x, W_eq, padding=k−1) with
    # W_eq = W.transpose(0, 1) with flipped taps: the as-matrix rows are W_eq's filters up to that flip
    W = torch.randn(3, 4, 3, 2, dtype=DT, generator=torch.Generator().manual_seed(5))
    W_eq = W.transpose(0, 1).flip(2, 3)
    x = torch.randn(1, 3, 5, 6, dtype=DT)
    torch.testing.assert_close(F.conv_transpose2d(x, W), F.conv2d(x, W_eq, padding=(2, 1)))
    M = regkernels.as_matrix(W, transposed=True)
    torch.testing.assert_close(torch.linalg.svdvals(M), torch.linalg.svdvals(regkernels.as_matrix(W_eq)))
    torch.testing.assert_close(M @ M.T, regkernels.as_matrix(W_eq) @ regkernels.as_matrix(W_eq).T)


# ----------------------------------------------------------------------------- Regularizer

def _model():
    torch.manual_seed(7)
    return nn.Sequential(
        nn.ConvTranspose2d(3, 6, 3, stride=2, padding=1, output_padding=1),
        nn.ConvTranspose2d(6, 4, (3, 2), padding=(2, 0), dilation=(2, 1), groups=2),
        nn.Conv2d(4, 3, 3),
    ).double()


_X = (3, 4)  # the input's spatial size


def _layer_matrices(m, group_mode="per_group"):
    W = m.weight.detach()
    if isinstance(m, nn.Conv2d):
        mats = [b.reshape(b.shape[0], -1) for b in W.chunk(m.groups, 0)]
    else:
        mats = filter_matrices(W, m.groups)
    return [torch.cat(mats)] if group_mode == "whole" else mats


def _sizes(model):
    sizes, x = [], torch.zeros(1, 3, *_X, dtype=DT)
    for m in model:
        sizes.append(tuple(x.shape[2:]))
        x = m(x)
    return sizes


@pytest.mark.parametrize("kind,kw,oracle", [
    ("frame", dict(A=0.4, B=1.5, side="rows"), lambda M: frame_oracle(M, 0.4, 1.5, "rows")),
    ("frame", dict(A=0.4, B=1.5, side="cols"), lambda M: frame_oracle(M, 0.4, 1.5, "cols")),
    ("orthogonality", {}, orthogonality_oracle),
    ("diversity", dict(tau=0.2), lambda M: diversity_oracle(M, 0.2)),
])
@pytest.mark.parametrize("group_mode", ["per_group", "whole"])
def test_regularizer_gram_kinds_on_transposed_layers(kind, kw, oracle, group_mode):
    model = _model()
    reg = Regularizer(model, kind, include=(nn.Conv2d, nn.ConvTranspose2d), group_mode=group_mode, **kw)
    expected = torch.stack([torch.stack([oracle(M) for M in _layer_matrices(m, group_mode)]).mean() for m in model])
    values = reg.values()
    torch.testing.assert_close(values, expected, rtol=1e-10, atol=1e-12)
    values.sum().backward()
    assert all(m.weight.grad is not None and (m.weight.grad.abs().sum() > 0) == (v > 0) for m, v in zip(model, values))


@pytest.mark.parametrize("side", ["rows", "cols", "auto"])
def test_regularizer_conv_frame_on_transposed_layers(side):
    model = _model()
    reg = Regularizer(model, "conv_frame", include=(nn.Conv2d, nn.ConvTranspose2d), A=0.4, B=1.5, side=side)
    model(torch.randn(2, 3, *_X, dtype=DT))  # the pre-hooks record each layer's input size
    expected = []
    for m, n in zip(model, _sizes(model)):
        W = m.weight.detach()
        if isinstance(m, nn.ConvTranspose2d):
            M = impulse_matrix(W, n, m.stride, m.padding, m.output_padding, m.dilation, m.groups)
        else:  # a conv's matrix is the adjoint of the transposed conv's on its output
            out = tuple(F.conv2d(torch.zeros(1, 4, *n, dtype=DT), W).shape[2:])
            M = impulse_matrix(W, out).T
        expected.append(frame_oracle(M, 0.4, 1.5, side))
    torch.testing.assert_close(reg.values(), torch.stack(expected), rtol=1e-10, atol=1e-12)
    # given sizes instead of recorded ones: the same values
    given = Regularizer(model, "conv_frame", include=(nn.Conv2d, nn.ConvTranspose2d), A=0.4, B=1.5, side=side,
                        input_sizes=dict(zip(["0", "1", "2"], _sizes(model))))
    torch.testing.assert_close(given.values(), torch.stack(expected), rtol=1e-10, atol=1e-12)
    stats = reg.stats()
    M0 = impulse_matrix(model[0].weight.detach(), _X, 2, 1, 1, 1, 1)
    lo, hi = disc_edges(M0, side)
    assert stats["0"]["gershgorin_lo"] == pytest.approx(float(lo.min()), rel=1e-9)
    assert stats["0"]["gershgorin_hi"] == pytest.approx(float(hi.max()), rel=1e-9)
    s = torch.linalg.svdvals(filter_matrices(model[0].weight.detach(), 1)[0])
    assert stats["0"]["sigma_max"] == pytest.approx(float(s.max()), rel=1e-9)


def test_regularizer_ocnn_on_transposed_layers_swaps_the_side():
    model = _model()
    for side, t_side in (("rows", "cols"), ("cols", "rows")):
        reg = Regularizer(model, "ocnn", include=(nn.Conv2d, nn.ConvTranspose2d), side=side)
        values = reg.values()
        for i, m in enumerate(model):
            W, s = m.weight.detach(), m.stride
            eff = t_side if isinstance(m, nn.ConvTranspose2d) else side
            want = torch.stack([regkernels.conv_orthogonality_penalty(b, s, side=eff) for b in W.chunk(m.groups, 0)])
            torch.testing.assert_close(values[i], want.mean(), rtol=1e-10, atol=1e-12)
            if eff == "rows":  # the output-side formula, spelled out
                oracle = torch.stack([ocnn_rows_oracle(b, s) for b in W.chunk(m.groups, 0)]).mean()
                torch.testing.assert_close(values[i], oracle, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- svb_ / SVBProjector

def _svb_oracle(W, groups, eps):
    mats = []
    for M in filter_matrices(W, groups):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        mats.append(U @ torch.diag(S.clamp(1 / (1 + eps), 1 + eps)) @ Vh)
    return weight_from_filter_matrices(mats, W.shape)


def test_svb_matrix_mode_on_transposed_layers():
    torch.manual_seed(8)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.ConvTranspose1d(3, 5, 2),
                          nn.ConvTranspose3d(2, 2, (1, 2, 2))).double()
    for p in model.parameters():
        p.data.mul_(3.0)
    expected = [_svb_oracle(m.weight.detach(), m.groups, 0.1) for m in model]
    biases = [m.bias.detach().clone() for m in model]
    assert regkernels.svb_(model, 0.1) == 2 + 1 + 1
    for m, want, b in zip(model, expected, biases):
        torch.testing.assert_close(m.weight.detach(), want, rtol=1e-10, atol=1e-12)
        assert torch.equal(m.bias, b)
        for M in filter_matrices(m.weight.detach(), m.groups):
            s = torch.linalg.svdvals(M)
            assert s.min() >= 1 / 1.1 - 1e-12 and s.max() <= 1.1 + 1e-12


def test_svb_operator_mode_on_a_transposed_layer_is_exact_when_the_kernel_fills_the_grid():
    torch.manual_seed(9)
    layer = nn.ConvTranspose2d(2, 3, 3, padding=1).double()
    layer.weight.data.mul_(3.0)
    W0 = layer.weight.detach().clone()
    regkernels.svb_(layer, 0.1, operator=True, input_size=3)
    torch.testing.assert_close(layer.weight.detach(),
                               regkernels.clip_conv_singular_values(W0, (3, 3), 1 / 1.1, 1.1)[0])
    # the transposed conv's own circular operator, from impulse responses: Tᵀ with T u = conv(circular pad u)
    cols = []
    for j in range(2 * 9):
        x = torch.zeros(2 * 9, dtype=DT)
        x[j] = 1
        y = F.conv_transpose2d(x.reshape(1, 2, 3, 3), layer.weight.detach())  # (1, 3, 5, 5): fold it onto 3×3
        folded = torch.zeros(1, 3, 3, 3, dtype=DT)
        for a in range(5):
            for b in range(5):
                folded[..., a % 3, b % 3] += y[..., a, b]
        cols.append(folded.reshape(-1))
    s = torch.linalg.svdvals(torch.stack(cols, 1))
    assert s.min() >= 1 / 1.1 - 1e-9 and s.max() <= 1.1 + 1e-9


def test_svb_projector_bounds_a_transposed_layer_on_its_output_size():
    torch.manual_seed(10)
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)).double()
    model[0].weight.data.mul_(3.0)
    twin = nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)).double()
    twin.load_state_dict(model.state_dict())
    proj = SVBProjector(model, 0.1, operator=True)
    model(torch.randn(1, 2, 3, 4, dtype=DT))  # input 3×4 → output 6×8
    assert proj.step() == 1
    regkernels.svb_(twin, 0.1, operator=True, input_size={twin[0]: (6, 8)})
    assert torch.equal(model[0].weight, twin[0].weight)


def test_a_call_with_output_size_is_seen():
    # nn.ConvTranspose picks the output_padding per call from output_size=: conv_frame refuses a call
    # whose choice is not the module's, the projector takes the size the call produced
    layer = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1).double()
    reg = Regularizer(layer, "conv_frame", include=nn.ConvTranspose2d, A=0.5, B=2.0)
    proj = SVBProjector(layer, 0.1, operator=True)
    x = torch.randn(1, 2, 3, 4, dtype=DT)
    assert layer(x, output_size=(6, 8)).shape[2:] == (6, 8)
    with pytest.raises(ValueError, match=r"Regularizer: layer '' was last called "
                                         r"with output_size=, which made its output_padding \(1, 1\), not the "
                                         r"module's \(0, 0\).*set layer.output_padding = \(1, 1\)"):
        reg()
    twin = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1).double()
    twin.load_state_dict(layer.state_dict())
    proj.step()
    regkernels.svb_(twin, 0.1, operator=True, input_size=(6, 8))
    assert torch.equal(layer.weight, twin.weight)
    layer(x)  # without output_size: the module's output_padding again
    expected = frame_oracle(impulse_matrix(layer.weight.detach(), (3, 4), 2, 1), 0.5, 2.0, "auto")
    torch.testing.assert_close(reg(), expected, rtol=1e-10, atol=1e-12)


def test_svb_bn_follows_a_transposed_conv():
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 1), nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 2, 1, groups=1),
                          nn.BatchNorm2d(3))
    assert svb_bn_layers(model) == ["1"]
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 4.0, 0.25]))
    std = (model[1].running_var + model[1].eps).sqrt()
    before = model[1].weight.detach() / std
    m = before.abs().mean()
    regkernels.svb_(model, 0.5, bn=True)
    # the scales clamped into the band around their mean before the bound (docs/svd.md#batchnorm-scales-bn)
    torch.testing.assert_close(model[1].weight.detach() / std, before.clamp(m / 1.5, m * 1.5))


# ----------------------------------------------------------------------------- initializers

def test_orthogonal_init_of_transposed_layers():
    model = nn.Sequential(nn.ConvTranspose2d(6, 4, 3, groups=2), nn.ConvTranspose1d(2, 5, 3),
                          nn.ConvTranspose1d(4, 3, 1))
    init.orthogonal_(model, gain=2.0, generator=torch.Generator().manual_seed(0))
    for m in model:
        for M in filter_matrices(m.weight.detach().double(), m.groups):
            G = gram(M, "rows" if M.shape[0] <= M.shape[1] else "cols")
            torch.testing.assert_close(G, 4.0 * torch.eye(G.shape[0], dtype=DT), rtol=0, atol=1e-5)


@pytest.mark.parametrize("d,dilation", [(1, 1), (2, 2), (3, 1)])
def test_delta_orthogonal_transposed_is_an_isometry(d, dilation):
    layer = getattr(nn, f"ConvTranspose{d}d")(3, 5, 3, padding=dilation, dilation=dilation, bias=False).double()
    init.delta_orthogonal_(layer.weight, gain=1.5, transposed=True, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, *(4,) * d, dtype=DT)
    y = layer(x)
    assert y.shape[2:] == x.shape[2:]
    torch.testing.assert_close(y.norm(), 1.5 * x.norm(), rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- bad inputs

def test_bad_inputs_name_the_op_the_argument_and_what_works():
    W = torch.randn(4, 3, 3, 3, dtype=DT)
    with pytest.raises(ValueError, match=r"conv_to_matrix: with transposed=True, output_padding must be < stride "
                                         r"per dim .*got output_padding=\(1, 1\), stride=\(1, 1\)"):
        regkernels.conv_to_matrix(W, (4, 4), dilation=2, transposed=True, output_padding=1)
    with pytest.raises(ValueError, match=r"conv_frame_penalty: transposed=True takes padding_mode='zeros'"):
        regkernels.conv_frame_penalty(W, (4, 4), 0.5, 2.0, padding=1, padding_mode="circular", transposed=True)
    with pytest.raises(ValueError, match=r"conv_gershgorin_bounds: output_padding is for transposed=True .*leave it "
                                         r"0, or pass transposed=True"):
        regkernels.conv_gershgorin_bounds(W, (4, 4), stride=2, output_padding=1)
    with pytest.raises(TypeError, match=r"conv_to_matrix: transposed must be True or False; got 1"):
        regkernels.conv_to_matrix(W, (4, 4), transposed=1)
    with pytest.raises(ValueError, match=r"conv_frame_penalty_multi: groups must divide the input channels C_in = "
                                         r"weight.shape\[0\] = 4 of a transposed conv weight"):
        regkernels.conv_frame_penalty_multi([W], (4, 4), 0.5, 2.0, groups=3, transposed=True)
    with pytest.raises(ValueError, match=r"conv_to_matrix: the transposed conv's output size must be >= 1 per dim"):
        regkernels.conv_to_matrix(torch.randn(2, 2, 1, dtype=DT), (1,), padding=1, transposed=True)
    with pytest.raises(ValueError, match=r"conv_to_matrix: output_padding must be an int or a sequence of 2 ints"):
        regkernels.conv_to_matrix(W, (4, 4), stride=2, transposed=True, output_padding=(1, 1, 1))
    with pytest.raises(ValueError, match=r"as_matrix: weight must have 3 or 4 or 5 dims \(in, out/groups, \*kernel\), "
                                         r"an nn.ConvTranspose1d/2d/3d weight"):
        regkernels.as_matrix(torch.randn(3, 4), transposed=True)
    with pytest.raises(ValueError, match=r"as_matrix: groups must divide the input channels of a transposed conv "
                                         r"weight .*got groups=3"):
        regkernels.as_matrix(W, 3, transposed=True)
    with pytest.raises(TypeError, match=r"as_matrix: transposed must be True or False"):
        regkernels.as_matrix(W, transposed="yes")
    bad = nn.Sequential(nn.ConvTranspose2d(2, 2, 3, dilation=2, output_padding=1))
    with pytest.raises(ValueError, match=r"Regularizer: kind='conv_frame' needs output_padding < stride per dim for "
                                         r"a ConvTranspose .*layer '0'.*exclude it or use a Gram kind"):
        Regularizer(bad, "conv_frame", include=nn.ConvTranspose2d, A=0.5, B=2.0)
    with pytest.raises(ValueError, match=r"Regularizer: kind='ocnn' with padding cannot take ConvTranspose layer "
                                         r"'0'.*pass padding=None or exclude the layer"):
        Regularizer(_model(), "ocnn", include=(nn.Conv2d, nn.ConvTranspose2d), padding=1)
    with pytest.raises(ValueError, match=r"Regularizer \(layer '0'\): input_size must be a sequence of 2 positive ints"):
        Regularizer(_model(), "conv_frame", include=nn.ConvTranspose2d, A=0.5, B=2.0, input_sizes={"0": (0, 3)})
    with pytest.raises(ValueError, match=r"delta_orthogonal_: needs out >= in .*read as \(in, out, \*kernel\) of a "
                                         r"transposed conv, with out=3 < in=4"):
        init.delta_orthogonal_(torch.empty(4, 3, 3), transposed=True)
    with pytest.raises(ValueError, match=r"svb_: operator=True needs input_size= \(the spatial size of the conv's "
                                         r"input, a ConvTranspose's output"):
        regkernels.svb_(nn.ConvTranspose2d(2, 3, 3), 0.1, operator=True)
