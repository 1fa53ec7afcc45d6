"""conv_spectral_norm(weight, input_size=None, method="bound"): the bound for every input size
(docs/conv.md#a-bound-for-every-input-size). Oracles in float64: the dense operator's SVD (impulse
responses, tests/op_cases.py) on several sizes of every geometry kind, the frequency response on
a fine grid (torch.fft + a dense matrix 2-norm per frequency), and a kernel whose supremum is
known in closed form (entrywise nonnegative: the response peaks at ω = 0).
"""
from __future__ import annotations

import math

import pytest
import torch

import regkernels
from op_cases import impulse_matrix

D64 = torch.float64
FACTOR = 1 / (1 - math.pi ** 2 / 512)  # the default grid's factor, docs/conv.md


def _weight(shape, seed, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    fan_in = math.prod(shape[1:])
    return torch.randn(*shape, generator=g, dtype=D64).mul(math.sqrt(2 / fan_in)).to(dtype)


def _exact(W, size, kw):
    return torch.linalg.matrix_norm(impulse_matrix(W, size, **kw), 2).item()


def _response_max(W, groups=1, n=256, dilation=1, stride=1):
    """max over an n-point grid per axis of the symbol's 2-norm, per group, from below the supremum
    the bound certifies: the stride-``s`` conv on ℓ²(ℤ^d) split into its ``∏s`` input phases is a
    stride-1 conv from ``C_in·∏s`` channels whose kernel at phase ρ holds the tap ``t`` with
    ``dil·t = s·a + ρ`` at offset ``a`` (built here by scattering the dilated kernel)."""
    d = W.dim() - 2
    dil = (dilation,) * d if isinstance(dilation, int) else tuple(dilation)
    st = (stride,) * d if isinstance(stride, int) else tuple(stride)
    # the dilated kernel, zeros between the taps
    Wd = W.new_zeros(*W.shape[:2], *[dl * (k - 1) + 1 for dl, k in zip(dil, W.shape[2:])])
    Wd[(slice(None), slice(None)) + tuple(slice(None, None, dl) for dl in dil)] = W
    # the phases: position u = s·a + ρ of the dilated kernel goes to channel (c, ρ), offset a
    span = [-(-e // s) for e, s in zip(Wd.shape[2:], st)]
    padded = Wd.new_zeros(*Wd.shape[:2], *[a * s for a, s in zip(span, st)])
    padded[(slice(None), slice(None)) + tuple(slice(0, e) for e in Wd.shape[2:])] = Wd
    shape = [Wd.shape[0], Wd.shape[1]] + [x for a, s in zip(span, st) for x in (a, s)]
    phases = padded.reshape(shape)  # (o, c, a_1, ρ_1, a_2, ρ_2, ...)
    order = [0, 1] + [3 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    poly = phases.permute(order).reshape(Wd.shape[0], -1, *span)
    per = W.shape[0] // groups
    best = 0.0
    for g in range(groups):
        F = torch.fft.fftn(poly[g * per:(g + 1) * per].double(), s=(n,) * d, dim=tuple(range(2, 2 + d)))
        blocks = F.permute(*range(2, 2 + d), 0, 1).reshape(-1, F.shape[0], F.shape[1])
        best = max(best, torch.linalg.matrix_norm(blocks, 2).max().item())
    return best


# (id, weight shape, geometry, input sizes): the bound is one number per weight, checked against
# the dense T of every size listed — zero padding of any width, strides that divide the size or
# not, dilation, groups, 1–3 spatial dims, and circular padding that repeats no row
GEOMETRIES = [
    ("zeros-p1", (4, 3, 3, 3), dict(padding=1), [(3, 3), (6, 5), (9, 8)]),
    ("zeros-p0", (3, 2, 3, 3), {}, [(3, 4), (7, 6)]),
    ("zeros-p4-wide", (3, 2, 3, 3), dict(padding=4), [(1, 2), (4, 5)]),
    ("zeros-s2", (4, 3, 3, 3), dict(stride=2, padding=1), [(7, 5), (8, 8)]),
    ("zeros-s3x2-even-kernel", (3, 2, 2, 4), dict(stride=(3, 2), padding=(0, 1)), [(8, 7), (5, 9)]),
    ("zeros-d2", (3, 2, 3, 3), dict(dilation=2, padding=2), [(7, 6), (10, 9)]),
    ("zeros-d3x1-s2", (3, 3, 3, 2), dict(dilation=(3, 1), stride=2, padding=1), [(9, 6)]),
    ("zeros-g2", (4, 2, 3, 3), dict(groups=2, padding=1), [(5, 5), (8, 7)]),
    ("zeros-depthwise", (3, 1, 3, 3), dict(groups=3, padding=1), [(6, 6), (11, 10)]),
    ("zeros-1d", (3, 2, 5), dict(padding=2, stride=2), [(9,), (40,)]),
    ("zeros-1d-k1", (3, 4, 1), {}, [(5,)]),
    ("zeros-3d", (2, 2, 2, 3, 2), dict(padding=1), [(3, 3, 2), (4, 4, 4)]),
    ("circular-p1", (4, 3, 3, 3), dict(padding=1, padding_mode="circular"), [(3, 3), (6, 5), (9, 8)]),
    ("circular-p0", (3, 2, 3, 3), dict(padding_mode="circular"), [(5, 6)]),
    ("circular-s2", (4, 3, 3, 3), dict(stride=2, padding=1, padding_mode="circular"), [(6, 8), (7, 5)]),
    ("circular-s3-g2", (4, 1, 3, 3), dict(stride=3, groups=2, padding_mode="circular"), [(6, 6), (7, 8)]),
    ("circular-d3-wraps", (2, 2, 3), dict(dilation=3, padding=3, padding_mode="circular"), [(4,), (5,), (13,)]),
    ("circular-3d", (2, 2, 2, 3, 2), dict(padding=(0, 1, 0), padding_mode="circular"), [(3, 3, 2), (2, 4, 3)]),
]
IDS = [g[0] for g in GEOMETRIES]


@pytest.mark.parametrize("gid, shape, kw, sizes", GEOMETRIES, ids=IDS)
def test_bound_holds_for_every_size(gid, shape, kw, sizes):
    """One number per weight, above σ_max of the dense T of every size; the same number whatever
    the padding (it does not enter; nor do stride and dilation for circular padding), and in float32."""
    for seed in range(2):
        W = _weight(shape, 200 + seed)
        out = regkernels.conv_spectral_norm(W, None, **kw, method="bound")
        groups, mode = kw.get("groups", 1), kw.get("padding_mode", "zeros")
        same = dict(groups=groups) if mode == "circular" else \
            dict(groups=groups, stride=kw.get("stride", 1), dilation=kw.get("dilation", 1))
        plain = regkernels.conv_spectral_norm(W, None, **same, method="bound")
        assert out.sigma.item() == plain.sigma.item() and out.rel_tol.item() == plain.rel_tol.item()
        for size in sizes:
            exact = _exact(W, size, kw)
            assert out.sigma.item() >= exact * (1 - 1e-12), (size, out, exact)
        assert 0 <= out.rel_tol.item() < 0.03
        out32 = regkernels.conv_spectral_norm(W.float(), None, **kw, method="bound")
        assert out32.sigma.dtype == torch.float32 and out32.sigma.item() >= out.sigma.item() * (1 - 1e-5)


def test_bound_is_the_response_supremum_times_the_grid_factor():
    """sigma = factor · max over the grid of ‖K̂‖₂ once the Gram steps converge: compared with the
    grid's blocks formed by torch.fft, for the default grid and a given one."""
    W = _weight((5, 4, 3, 3), 210)
    for grid, factor in ((None, FACTOR), ((40, 24), None)):
        out = regkernels.conv_spectral_norm(W, None, method="bound", n_iter=12, grid=grid)
        N = (32, 32) if grid is None else grid
        if factor is None:
            S = math.pi / N[0] + math.pi / N[1]  # σ_j = (3 − 1)/2 = 1 per axis
            factor = 1 / (1 - S ** 2 / 2)
        F = torch.fft.fftn(W, s=N, dim=(2, 3))
        grid_max = torch.linalg.matrix_norm(F.permute(2, 3, 0, 1).reshape(-1, 5, 4), 2).max().item()
        assert out.sigma.item() == pytest.approx(factor * grid_max, rel=1e-9)
        assert out.rel_tol.item() == pytest.approx(1 - 1 / factor, abs=1e-9)


def test_tight_where_the_supremum_is_known():
    """An entrywise nonnegative kernel peaks at ω = 0, a point of every grid: the supremum is
    ‖Σ_t K_t‖₂ exactly, a circular conv of any size attains it (Sedghi), and the bound brackets it
    with its own slack: sigma·(1 − rel_tol) ≤ sup ≤ sigma."""
    W = _weight((6, 4, 3, 3), 220).abs()
    sup = torch.linalg.matrix_norm(W.sum((2, 3)), 2).item()
    out = regkernels.conv_spectral_norm(W, None, method="bound", n_iter=10)
    assert out.sigma.item() * (1 - out.rel_tol.item()) <= sup * (1 + 1e-12) <= out.sigma.item() * (1 + 1e-12)
    assert out.sigma.item() <= FACTOR * sup * (1 + 1e-9)
    circular = regkernels.conv_singular_values(W, (7, 5)).max().item()
    assert circular == pytest.approx(sup, rel=1e-12)
    exact = _exact(W, (7, 5), dict(padding=1, padding_mode="circular"))
    assert exact == pytest.approx(sup, rel=1e-10)


@pytest.mark.parametrize("shape, groups, dilation", [((8, 8, 3, 3), 1, 1), ((8, 4, 5, 3), 2, 1), ((4, 4, 3), 1, 2),
                                                     ((3, 3, 3, 2, 3), 1, 1)])
def test_tight_against_large_inputs(shape, groups, dilation):
    """sigma ≤ (1 + rel_tol + 0.4 %) × σ_max of a large operator: the circular conv on a 96-point
    grid per axis (Sedghi, exact), and in 1-D the zero-padded conv on 300 points (dense SVD); and
    within its slack of the response's maximum on a fine grid."""
    W = _weight(shape, 230)
    d = W.dim() - 2
    out = regkernels.conv_spectral_norm(W, None, groups=groups, dilation=dilation, method="bound")
    sigma, rel = out.sigma.item(), out.rel_tol.item()
    fine = _response_max(W, groups, 512 if d < 3 else 96, dilation)
    assert fine <= sigma and sigma * (1 - rel) <= fine * (1 + 1e-3)
    n = 96 if d < 3 else 32
    per = W.shape[0] // groups
    Wd = W.new_zeros(*W.shape[:2], *[dilation * (k - 1) + 1 for k in W.shape[2:]])
    Wd[(slice(None), slice(None)) + (slice(None, None, dilation),) * d] = W
    circular = max(regkernels.conv_singular_values(Wd[g * per:(g + 1) * per], (n,) * d).max().item()
                   for g in range(groups))
    assert circular <= sigma <= (1 + rel + 4e-3) * circular, (sigma, circular, rel)
    if d == 1:
        pad = dilation * (W.shape[-1] - 1) // 2
        zeros = _exact(W, (300,), dict(padding=pad, dilation=dilation, groups=groups))
        assert zeros <= sigma <= (1 + rel + 4e-3) * zeros, (sigma, zeros, rel)


@pytest.mark.parametrize("shape, stride, dilation", [((6, 4, 3, 3), 2, 1), ((4, 4, 5, 3), (2, 3), 1),
                                                    ((4, 3, 3), 2, 3), ((4, 4, 2, 2), 2, 1)])
def test_strided_zero_padding_is_bounded_by_the_strided_response(shape, stride, dilation):
    """Zero padding with stride > 1: T is a restriction of the STRIDED conv on ℓ²(ℤ^d), whose norm
    (the sup of its polyphase symbol, built independently here) is below the stride-1 one. The
    bound brackets that sup within its slack, and a large zero-padded input comes close to it."""
    W = _weight(shape, 280)
    d = W.dim() - 2
    out = regkernels.conv_spectral_norm(W, None, stride=stride, dilation=dilation, method="bound")
    sigma, rel = out.sigma.item(), out.rel_tol.item()
    fine = _response_max(W, 1, 256 if d < 3 else 64, dilation, stride)
    assert fine <= sigma and sigma * (1 - rel) <= fine * (1 + 1e-3)
    assert fine < 0.98 * _response_max(W, 1, 256, dilation)  # the stride-1 sup: strictly looser here
    size = (400,) if d == 1 else (24, 24)
    pad = tuple(dl * (k - 1) // 2 for dl, k in zip((dilation,) * d, W.shape[2:]))
    zeros = _exact(W, size, dict(stride=stride, dilation=dilation, padding=pad))
    assert zeros * (1 - 1e-12) <= sigma <= (1 + rel + 0.03) * zeros, (sigma, zeros, rel)


def test_one_by_one_kernels_are_the_matrix_norm():
    """k = 1: one frequency, factor 1; the bound is max over groups of ‖K_g‖₂ (to the Gram slack)."""
    W = _weight((6, 5, 1, 1), 240)
    for groups in (1, 3):
        Wg = _weight((6, 2, 1, 1), 241) if groups == 3 else W
        out = regkernels.conv_spectral_norm(Wg, None, groups=groups, method="bound", n_iter=10)
        per = Wg.shape[0] // groups
        norm = max(torch.linalg.matrix_norm(Wg[g * per:(g + 1) * per, :, 0, 0], 2).item() for g in range(groups))
        assert norm * (1 - 1e-12) <= out.sigma.item() <= norm * (1 + out.rel_tol.item() + 1e-12)
        assert out.rel_tol.item() < 1e-6


def test_issue_example_pattern():
    """One layer (He-scaled 16×16×3×3, zero padding 1): exact σ_max(T) on 8×8 ≤ the bound for every
    size ≤ 1.02 × that on a large input, far below the Gershgorin bound √hi of the 8×8 operator."""
    W = _weight((16, 16, 3, 3), 0)
    exact = _exact(W, (8, 8), dict(padding=1))
    out = regkernels.conv_spectral_norm(W, None, padding=1, method="bound")
    lo, hi = regkernels.conv_gershgorin_bounds(W, (8, 8), padding=1)
    sedghi = regkernels.conv_singular_values(W, (64, 64)).max().item()
    assert exact <= out.sigma.item() <= 1.025 * sedghi
    assert out.sigma.item() < 0.55 * hi.sqrt().item()  # measured: exact 2.68, bound 2.84, √hi 5.91


def test_tol_stops_on_the_reported_slack():
    """tol compares with rel_tol (which includes the grid factor): a tol above 1 − 1/factor stops
    early, a tol below it runs every step."""
    W = _weight((8, 8, 3, 3), 250)
    full = regkernels.conv_spectral_norm(W, None, method="bound", n_iter=8)
    early = regkernels.conv_spectral_norm(W, None, method="bound", n_iter=8, tol=0.05)
    assert early.rel_tol.item() < 0.05 and early.sigma.item() >= full.sigma.item()
    below = regkernels.conv_spectral_norm(W, None, method="bound", n_iter=8, tol=0.01)
    assert below.sigma.item() == full.sigma.item()


def test_lists_nan_zero_empty_and_gradient():
    good = [_weight((4, 3, 3, 3), 260), _weight((4, 3, 3, 3), 261)]
    bad = good[0].clone()
    bad[1, 1, 0, 2] = math.nan
    out = regkernels.conv_spectral_norm([good[0], bad, good[1]], None, method="bound")
    assert out.sigma.shape == (3,) and out.sigma[1].isnan() and out.rel_tol[1].isnan()
    pair = regkernels.conv_spectral_norm(good, None, method="bound")
    torch.testing.assert_close(out.sigma[[0, 2]], pair.sigma, rtol=1e-12, atol=0)
    zero = regkernels.conv_spectral_norm(torch.zeros(3, 2, 3, 3, dtype=D64), None, method="bound")
    assert zero.sigma.item() == 0 and zero.rel_tol.item() == 0
    assert regkernels.conv_spectral_norm(torch.zeros(0, 2, 3, 3), None, method="bound").sigma.item() == 0
    W = _weight((2, 2, 3), 262).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: regkernels.conv_spectral_norm(w, None, method="bound").sigma, (W,))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(method="power"), ValueError, r"conv_spectral_norm: input_size=None .* needs method='bound'"),
    (dict(), ValueError, r"conv_spectral_norm: input_size=None .* needs method='bound'"),  # power by default
    (dict(method="bound", padding=2, padding_mode="circular"), ValueError,
     r"conv_spectral_norm: input_size=None with padding_mode='circular' needs 2·padding <= dilation·\(kernel − 1\)"),
    (dict(method="bound", grid=(2, 2)), ValueError, r"conv_spectral_norm: grid \(2, 2\) is too coarse .* \(32, 32\)"),
    (dict(method="bound", grid=1, stride=2), ValueError, r"conv_spectral_norm: grid \(1, 1\) is too coarse .* \(16, 16\)"),
    (dict(method="bound", grid=(4, 4, 4)), ValueError, r"conv_spectral_norm: grid must be an int or a sequence of 2"),
    (dict(method="bound", grid=0), ValueError, r"conv_spectral_norm: grid must be an int or a sequence of 2 ints, each >= 1"),
    (dict(method="bound", grid=2.5), TypeError, r"conv_spectral_norm: grid must be"),
    (dict(method="bound", stride=0), ValueError, r"conv_spectral_norm: stride must be"),
    (dict(method="bound", groups=3), ValueError, r"conv_spectral_norm: groups must divide"),
    (dict(method="bound", padding_mode="reflect"), ValueError, r"conv_spectral_norm: padding_mode must be"),
    (dict(method="exact"), ValueError, r"conv_spectral_norm: method must be 'power' or 'bound'"),
])
def test_bad_inputs(kwargs, exc, match):
    W = torch.randn(4, 2, 3, 3)
    with pytest.raises(exc, match=match):
        regkernels.conv_spectral_norm(W, None, **kwargs)


def test_circular_padding_that_repeats_rows_is_refused_for_a_reason():
    """Where 2·padding > dilation·(kernel − 1) a circular conv repeats output rows, and σ_max(T) can
    exceed the supremum: a 1×1 kernel with padding 1 on one point gives T = [K; K; K], √3·‖K‖."""
    W = _weight((3, 2, 1), 270)
    sup = regkernels.conv_spectral_norm(W, None, method="bound", n_iter=12).sigma.item()
    exact = _exact(W, (1,), dict(padding=1, padding_mode="circular"))
    assert exact == pytest.approx(math.sqrt(3) * torch.linalg.matrix_norm(W[..., 0], 2).item(), rel=1e-12)
    assert exact > 1.7 * sup
    with pytest.raises(ValueError, match="pass input_size"):
        regkernels.conv_spectral_norm(W, None, padding=1, padding_mode="circular", method="bound")


def test_grid_needs_no_input_size():
    with pytest.raises(ValueError, match=r"conv_spectral_norm: grid is for input_size=None .* drop grid"):
        regkernels.conv_spectral_norm(torch.randn(4, 2, 3, 3), (8, 8), method="bound", grid=16)


def test_torch_func_and_compile():
    """vmap maps layers (each its own bound), grad is autograd's; torch.compile(fullgraph=True) traces it."""
    Ws = torch.stack([_weight((3, 2, 3, 3), 290 + i) for i in range(3)])
    f = lambda w: regkernels.conv_spectral_norm(w, None, method="bound").sigma  # noqa: E731
    mapped = torch.func.vmap(f)(Ws)
    torch.testing.assert_close(mapped, torch.stack([f(w) for w in Ws]), rtol=1e-12, atol=0)
    W = Ws[0].clone().requires_grad_(True)
    g, = torch.autograd.grad(f(W), W)
    torch.testing.assert_close(torch.func.grad(f)(Ws[0]), g, rtol=1e-12, atol=0)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(Ws[1]), f(Ws[1]), rtol=1e-12, atol=0)
