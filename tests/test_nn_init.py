"""Tests of regkernels.nn.init: orthogonal_ and delta_orthogonal_ (docs/nn.md#orthogonal-initialization).

Oracles, all in float64 and independent of regkernels' SVD: the Gram W Wᵀ (or Wᵀ W) against
gain² I; the polar factor of the same Gaussian draw computed with torch.linalg.svd in float64;
for delta_orthogonal_ the conv operator's singular values from the FFT (conv_singular_values,
circular) and from the dense operator matrix (conv_to_matrix + torch.linalg.svdvals, zero and
circular padding), and the norm of an actual convolution's output.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import regkernels
from regkernels.nn import init
from regkernels.ops import svd as svd_module

D64 = torch.float64
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _tol(dtype: torch.dtype) -> float:
    """Bound on max |W Wᵀ − gain² I| / gain² for a weight of ``dtype``: the computing dtype's SVD
    error, plus for half precision the rounding of each entry on write (|δ| ≤ u per entry gives
    at most 2u(1 + u) on a Gram entry of unit vectors)."""
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        return 2e-5
    u = torch.finfo(dtype).eps / 2
    return 2 * u * (1 + u) + 2e-5


def _gram_error(M: torch.Tensor, gain: float) -> float:
    """max |G − gain² I| / gain² in float64, G the k×k Gram of the (m, n) matrix M, k = min(m, n)."""
    M = M.to(D64)
    G = M @ M.mT if M.shape[-2] <= M.shape[-1] else M.mT @ M
    eye = torch.eye(G.shape[-1], dtype=D64)
    return ((G - gain**2 * eye).abs().max() / gain**2).item()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _polar64(A: torch.Tensor) -> torch.Tensor:
    """Oracle: the polar factor of A in float64 through LAPACK."""
    U, _, Vh = torch.linalg.svd(A.to(D64), full_matrices=False)
    return U @ Vh


SHAPES = {
    "linear-wide": (5, 12),
    "linear-tall": (12, 5),
    "linear-square": (7, 7),
    "conv2d-3x3": (16, 3, 3, 3),      # 16 x 27: rows
    "conv2d-tall": (20, 2, 3, 3),     # 20 x 18: columns
    "conv1d": (6, 4, 5),              # 6 x 20
    "conv3d": (8, 2, 3, 3, 3),        # 8 x 54
    "1xN": (1, 9),
    "Nx1": (9, 1),
    "long-qr-path": (64, 64, 3, 3),   # 64 x 576: QR-reduced onto the kernel by batched_svd
    "over-kernel-range": (100, 130),  # min > 64: batched_svd's LAPACK fallback
}


# ------------------------------------------------------------------------------ orthogonal_

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_orthogonal_rows_or_columns_are_orthonormal_times_gain(name, dtype):
    shape = SHAPES[name]
    gain = 1.0 if len(shape) % 2 else 1.7
    w = torch.empty(shape, dtype=dtype)
    assert init.orthogonal_(w, gain) is w
    assert w.dtype == dtype and w.shape == shape
    M = w.reshape(shape[0], -1)
    assert _gram_error(M, gain) <= _tol(dtype), (name, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", ["linear-wide", "linear-tall", "linear-square", "conv2d-3x3", "1xN", "Nx1",
                                  "long-qr-path", "over-kernel-range"])
def test_orthogonal_is_the_polar_factor_of_the_documented_gaussian_draw(name, dtype):
    shape = SHAPES[name]
    m, n = shape[0], math.prod(shape[1:])
    w = torch.empty(shape, dtype=dtype)
    init.orthogonal_(w, 0.5, generator=_gen(11))
    A = torch.randn(1, m, n, generator=_gen(11), dtype=dtype)  # the draw docs/nn.md names
    expected = 0.5 * _polar64(A)[0]
    # the polar factor moves by ~‖δA‖ / σ_min under the SVD's rounding (measured ≤ 6e-7 in float32
    # over 20 seeds of these shapes; the seed is fixed, so the bound is deterministic)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(w.reshape(m, n).to(D64), expected, rtol=0, atol=tol)


def test_half_precision_is_the_float32_result_rounded():
    for dtype in (torch.float16, torch.bfloat16):
        w_half = init.orthogonal_(torch.empty(12, 20, dtype=dtype), 1.3, generator=_gen(5))
        w32 = init.orthogonal_(torch.empty(12, 20), 1.3, generator=_gen(5))
        assert torch.equal(w_half, w32.to(dtype))


def test_grouped_convs_of_a_module_are_orthogonal_per_group():
    wide = nn.Conv2d(8, 12, 3, groups=4)    # weight (12, 2, 3, 3): 4 groups of 3 x 18, rows
    tall = nn.Conv1d(4, 16, 1, groups=2)    # weight (16, 2, 1): 2 groups of 8 x 2, columns
    init.orthogonal_(nn.Sequential(wide, tall), 2.0)
    for conv, g in ((wide, 4), (tall, 2)):
        blocks = conv.weight.detach().reshape(g, conv.out_channels // g, -1)
        for b in blocks:
            assert _gram_error(b, 2.0) <= _tol(torch.float32)
    # the whole (12, 18) matrix is not row-orthonormal: groups are drawn independently
    assert _gram_error(wide.weight.detach().reshape(12, -1), 2.0) > 1e-2
    # a tensor given directly is one matrix (groups = 1)
    w = init.orthogonal_(torch.empty(12, 2, 3, 3))
    assert _gram_error(w.reshape(12, -1), 1.0) <= _tol(torch.float32)


def test_a_model_takes_one_batched_svd_call_per_matrix_shape(monkeypatch):
    assert regkernels.batched_svd is svd_module.batched_svd  # the public op, spied where init calls it
    calls = []
    real = svd_module.batched_svd

    def spy(X, **kw):
        calls.append((tuple(X.shape), X.dtype))
        return real(X, **kw)

    monkeypatch.setattr(svd_module, "batched_svd", spy)
    shared = nn.Linear(16, 16)
    model = nn.Sequential(
        nn.Linear(16, 16), shared, nn.Linear(16, 16), shared,  # the tied layer counts once
        nn.Conv2d(4, 8, 3), nn.Conv2d(4, 8, 3),                 # 8 x 36 each
        nn.Conv2d(8, 16, 3, groups=2),                          # 2 groups of 8 x 36
        nn.Conv2d(8, 8, 3), nn.Linear(72, 8),                   # 8 x 72: a conv and a Linear together
        nn.Linear(16, 16).half(),                               # half is computed in float32: with the 16 x 16s
        nn.Linear(16, 16).double())                             # float64: its own call
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    assert init.orthogonal_(model, generator=_gen(1)) is model
    assert sorted(calls, key=str) == sorted([((4, 16, 16), torch.float32), ((4, 8, 36), torch.float32),
                                             ((2, 8, 72), torch.float32), ((1, 16, 16), D64)], key=str)
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            g = mod.groups if isinstance(mod, nn.Conv2d) else 1
            for b in mod.weight.detach().reshape(g, mod.weight.shape[0] // g, -1):
                assert _gram_error(b, 1.0) <= _tol(mod.weight.dtype), name
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            assert torch.equal(p, biases[n]), n


def test_a_list_in_one_call_equals_the_weights_one_by_one():
    shapes = [(6, 10), (6, 10), (8, 2, 3), (3, 3), (6, 10)]
    together = [torch.empty(s) for s in shapes]
    assert init.orthogonal_(together, generator=_gen(3)) is together
    g = _gen(3)
    for w, s in zip(together, shapes):
        assert torch.equal(w, init.orthogonal_(torch.empty(s), generator=g))
    # a generator (one-shot iterable) works too and is returned as given
    ws = [torch.empty(4, 5), torch.empty(5, 4)]
    it = (w for w in ws)
    assert init.orthogonal_(it) is it
    assert all(_gram_error(w, 1.0) <= _tol(torch.float32) for w in ws)


def test_reproducible_with_a_generator_and_seed_dependent():
    a = init.orthogonal_(torch.empty(7, 13), generator=_gen(42))
    b = init.orthogonal_(torch.empty(7, 13), generator=_gen(42))
    c = init.orthogonal_(torch.empty(7, 13), generator=_gen(43))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1
    torch.manual_seed(9)
    d = init.orthogonal_(torch.empty(7, 13))
    torch.manual_seed(9)
    assert torch.equal(d, init.orthogonal_(torch.empty(7, 13)))  # default generator


def test_distribution_moments_of_haar_matrices():
    """Haar on the Stiefel manifold: E[W] = 0, E[W_ij²] = 1/max(m, n); for square matrices
    P(det = +1) = 1/2 (an unfixed QR would bias the diagonal's signs). Fixed seed, bounds at
    ≥ 5 standard deviations of the sample means: deterministic and far from the edge."""
    n_draws = 400
    wide = [torch.empty(6, 10, dtype=D64) for _ in range(n_draws)]
    init.orthogonal_(wide, generator=_gen(2024))
    W = torch.stack(wide)
    assert W.mean(0).abs().max() < 0.1            # std of each mean: sqrt(1/10 / 400) ≈ 0.016
    assert ((W**2).mean(0) - 0.1).abs().max() < 0.05
    square = [torch.empty(5, 5, dtype=D64) for _ in range(n_draws)]
    init.orthogonal_(square, generator=_gen(7))
    Q = torch.stack(square)
    assert Q.diagonal(dim1=-2, dim2=-1).mean().abs() < 0.05   # std ≈ sqrt(1/5 / 2000) ≈ 0.01
    dets = torch.linalg.det(Q)
    torch.testing.assert_close(dets.abs(), torch.ones(n_draws, dtype=D64))
    assert abs((dets > 0).double().mean().item() - 0.5) < 0.15   # binomial std 0.025


def test_in_place_on_a_parameter_without_recording_a_graph():
    lin = nn.Linear(9, 4)
    w = lin.weight
    with torch.enable_grad():
        assert init.orthogonal_(w, 1.5) is w
    assert lin.weight is w and w.is_leaf and w.requires_grad and w.grad_fn is None
    assert _gram_error(w.detach(), 1.5) <= _tol(torch.float32)
    conv = nn.Conv2d(3, 5, 3)
    with torch.enable_grad():
        assert init.delta_orthogonal_(conv.weight) is conv.weight
    assert conv.weight.is_leaf and conv.weight.grad_fn is None and conv.weight.requires_grad


def test_non_contiguous_weights_are_written_in_their_logical_order():
    base = torch.zeros(10, 6)
    view = base.t()                                      # (6, 10), strides (1, 6)
    init.orthogonal_(view, generator=_gen(4))
    assert torch.equal(view, init.orthogonal_(torch.empty(6, 10), generator=_gen(4)))
    assert torch.equal(base, view.t())
    assert _gram_error(view, 1.0) <= _tol(torch.float32)
    # a conv weight as a permuted view
    storage = torch.zeros(3, 3, 4, 8)
    conv_view = storage.permute(3, 2, 0, 1)              # (8, 4, 3, 3)
    init.delta_orthogonal_(conv_view, generator=_gen(4))
    assert torch.equal(conv_view, init.delta_orthogonal_(torch.empty(8, 4, 3, 3), generator=_gen(4)))


def test_empty_weights_are_left_alone():
    w = torch.empty(0, 5)
    assert init.orthogonal_([w, torch.empty(3, 0)])[0] is w
    assert init.delta_orthogonal_(torch.empty(0, 0, 3)).shape == (0, 0, 3)


def test_orthogonal_refuses_bad_input_naming_op_and_argument():
    with pytest.raises(TypeError, match=r"orthogonal_: weight_or_weights must have a floating dtype"):
        init.orthogonal_(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"orthogonal_: weight_or_weights must have at least 2 dims"):
        init.orthogonal_(torch.empty(5))
    with pytest.raises(ValueError, match=r"orthogonal_: weight_or_weights\[1\] must have at least 2 dims"):
        init.orthogonal_([torch.empty(3, 3), torch.empty(4)])
    with pytest.raises(TypeError, match=r"orthogonal_: weight_or_weights\[0\] must be a torch.Tensor"):
        init.orthogonal_([nn.Linear(3, 3)])
    with pytest.raises(ValueError, match=r"orthogonal_: weight_or_weights is empty"):
        init.orthogonal_([])
    for bad in (3, "weight", {"w": torch.empty(2, 2)}):
        with pytest.raises(TypeError, match=r"orthogonal_: weight_or_weights must be a weight tensor"):
            init.orthogonal_(bad)
    with pytest.raises(ValueError, match=r"orthogonal_: .*has no nn.Linear, nn.Conv1d/2d/3d or "
                                         r"nn.ConvTranspose1d/2d/3d layer"):
        init.orthogonal_(nn.Sequential(nn.ReLU(), nn.Flatten()))
    for gain in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"orthogonal_: gain must be finite"):
            init.orthogonal_(torch.empty(3, 3), gain)
    for gain in (True, "1", torch.tensor(1.0), None):
        with pytest.raises(TypeError, match=r"orthogonal_: gain must be a real number"):
            init.orthogonal_(torch.empty(3, 3), gain)
    with pytest.raises(TypeError, match=r"orthogonal_: generator must be a torch.Generator or None"):
        init.orthogonal_(torch.empty(3, 3), generator=0)
    lin = nn.Linear(4, 4)
    parametrize.register_parametrization(lin, "weight", _Scale())
    with pytest.raises(ValueError, match=r"orthogonal_: cannot initialise the weight of layer '0'.*not an nn.Parameter"):
        init.orthogonal_(nn.Sequential(lin))


class _Scale(nn.Module):
    def forward(self, x):
        return 2 * x


def test_an_error_changes_nothing_and_draws_nothing():
    good = torch.zeros(3, 4)
    g = _gen(8)
    state = g.get_state()
    with pytest.raises(ValueError, match=r"weight_or_weights\[1\]"):
        init.orthogonal_([good, torch.empty(2)], generator=g)
    with pytest.raises(ValueError, match=r"gain"):
        init.orthogonal_([good], float("nan"), generator=g)
    assert torch.equal(good, torch.zeros(3, 4))
    assert torch.equal(g.get_state(), state)


# ------------------------------------------------------------------------------ delta_orthogonal_

DELTA_CASES = {
    "conv1d": ((8, 4, 3), (7,)),
    "conv2d": ((6, 6, 3, 3), (5, 5)),
    "conv2d-5x5": ((6, 3, 5, 5), (6, 6)),
    "conv2d-1x3": ((5, 5, 1, 3), (4, 5)),
    "conv3d": ((4, 2, 3, 3, 3), (4, 4, 4)),
}


@pytest.mark.parametrize("case", list(DELTA_CASES))
def test_delta_orthogonal_structure(case):
    shape, _ = DELTA_CASES[case]
    w = torch.randn(shape, dtype=D64)
    assert init.delta_orthogonal_(w, 1.7) is w
    centre = (slice(None), slice(None), *(k // 2 for k in shape[2:]))
    Q = w[centre]
    rest = w.clone()
    rest[centre] = 0
    assert torch.equal(rest, torch.zeros_like(w))
    G = Q.mT @ Q                                        # (in, in): columns orthonormal
    torch.testing.assert_close(G, 1.7**2 * torch.eye(shape[1], dtype=D64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("gain", [1.0, 0.6])
@pytest.mark.parametrize("case", list(DELTA_CASES))
def test_delta_orthogonal_operator_is_an_isometry_times_gain(case, gain):
    shape, size = DELTA_CASES[case]
    w = init.delta_orthogonal_(torch.empty(shape, dtype=D64), gain, generator=_gen(17))
    padding = tuple(k // 2 for k in shape[2:])
    n_in = shape[1] * math.prod(size)
    # circular, stride 1: every frequency's singular values (Sedghi et al., via the FFT)
    sv = regkernels.conv_singular_values(w, size)
    assert sv.shape == (math.prod(size), min(shape[:2]))
    torch.testing.assert_close(sv, torch.full_like(sv, gain), rtol=0, atol=1e-6)
    # the dense operator, zero and circular padding: all in·∏n singular values equal gain
    for mode in ("zeros", "circular"):
        T = regkernels.conv_to_matrix(w, size, padding=padding, padding_mode=mode)
        assert T.shape == (shape[0] * math.prod(size), n_in)
        s = torch.linalg.svdvals(T)
        torch.testing.assert_close(s, torch.full((n_in,), gain, dtype=D64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_delta_orthogonal_conv_layer_preserves_norms(mode):
    conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode, bias=False).double()
    init.delta_orthogonal_(conv.weight, 1.3, generator=_gen(2))
    x = torch.randn(4, 3, 9, 11, dtype=D64)
    with torch.no_grad():
        y = conv(x)
    torch.testing.assert_close(y.flatten(1).norm(dim=1), 1.3 * x.flatten(1).norm(dim=1), rtol=1e-12, atol=0)


def test_delta_orthogonal_centre_is_the_polar_factor_of_the_draw_and_half_rounds():
    w = init.delta_orthogonal_(torch.empty(7, 4, 3, 3, dtype=D64), 2.0, generator=_gen(6))
    expected = 2.0 * _polar64(torch.randn(1, 7, 4, generator=_gen(6), dtype=D64))[0]
    torch.testing.assert_close(w[:, :, 1, 1], expected, rtol=0, atol=1e-12)
    w16 = init.delta_orthogonal_(torch.empty(7, 4, 3, dtype=torch.bfloat16), generator=_gen(6))
    w32 = init.delta_orthogonal_(torch.empty(7, 4, 3), generator=_gen(6))
    assert torch.equal(w16, w32.to(torch.bfloat16))
    assert _gram_error(w16[:, :, 1], 1.0) <= _tol(torch.bfloat16)


def test_delta_orthogonal_refusals():
    with pytest.raises(ValueError, match=r"delta_orthogonal_: needs out >= in.*out=3 < in=5"):
        init.delta_orthogonal_(torch.empty(3, 5, 3, 3))
    with pytest.raises(ValueError, match=r"delta_orthogonal_: needs an odd kernel size.*no centre tap"):
        init.delta_orthogonal_(torch.empty(4, 4, 2, 2))
    with pytest.raises(ValueError, match=r"delta_orthogonal_: needs an odd kernel size.*kernel \(3, 4\)"):
        init.delta_orthogonal_(torch.empty(4, 4, 3, 4))
    for shape in ((4, 4), (4, 4, 3, 3, 3, 3)):
        with pytest.raises(ValueError, match=r"delta_orthogonal_: weight must have 3 or 4 or 5 dims.*Conv1d/2d/3d"):
            init.delta_orthogonal_(torch.empty(shape))
    with pytest.raises(TypeError, match=r"delta_orthogonal_: weight must be a torch.Tensor"):
        init.delta_orthogonal_(nn.Conv2d(2, 2, 3))
    with pytest.raises(TypeError, match=r"delta_orthogonal_: weight must have a floating dtype"):
        init.delta_orthogonal_(torch.zeros(4, 4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"delta_orthogonal_: gain must be finite"):
        init.delta_orthogonal_(torch.empty(4, 4, 3), float("nan"))
    with pytest.raises(TypeError, match=r"delta_orthogonal_: generator must be a torch.Generator"):
        init.delta_orthogonal_(torch.empty(4, 4, 3), generator="seed")
    w = torch.zeros(3, 5, 3)
    with pytest.raises(ValueError):
        init.delta_orthogonal_(w)
    assert torch.equal(w, torch.zeros(3, 5, 3))


def test_public_names():
    assert regkernels.nn.init is init
    assert set(init.__all__) >= {"orthogonal_", "delta_orthogonal_"}


def test_the_docs_example_runs():
    """docs/nn.md#orthogonal-initialization's example, executed as written."""
    import pathlib
    import re

    page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "nn.md").read_text(encoding="utf-8")
    section = page[page.index("## Orthogonal initialization"):]
    (code,) = re.findall(r"### Example\n\n```python\n(.*?)```", section, flags=re.S)
    exec(compile(code, "docs/nn.md#orthogonal-initialization", "exec"), {})
