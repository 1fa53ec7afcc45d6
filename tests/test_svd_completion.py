"""The null-column completion of the batched Jacobi SVD (``core::complete_orthonormal``,
csrc/core/jacobi_svd.h) against docs/svd.md#batched_svd: zero and rank-deficient matrices — e.g.
weights pruned by β-LASSO — still give orthonormal U and Vh, ``X = U diag(S) Vh`` to the documented
tolerance and exact zeros where the math has them.

The completion is written over lanes (phases separated by barriers). The CUDA kernel runs it with
one lane per thread of its block; the CPU kernel runs the very same code over the same lane count
(``core::jacobi_block``), each phase's lanes one after the other. So these CPU tests check the
math and the lane split the GPU runs: the shapes below are chosen (see ``_lanes``) to cover fewer
lanes than rows (strided loops over rows and over columns) and more lanes than rows (idle lanes).
Each test also runs on CUDA where a GPU exists (marked ``cuda``).
"""
from __future__ import annotations

import pytest
import torch

from regkernels import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_C, reason="regkernels._C not built")

TOLS = {torch.float32: 1e-5, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _op(X: torch.Tensor):
    return torch.ops.regkernels.batched_svd(X)


def _lanes(m: int, n: int) -> tuple[int, int]:
    """(lanes, rows) of the completion for an m × n X: core::jacobi_block's thread count for the
    tall A (M × N), written out again here so the shape lists can be checked for coverage."""
    M, N = max(m, n), min(m, n)
    pairs, G = (N + 1) // 2, 1
    while G < 16 and 4 * G < M:
        G *= 2
    while G > 1 and pairs * G > 256:
        G //= 2
    return (pairs * G + 31) // 32 * 32, M


# odd, tall, wide, tiny and full sizes; CUDA takes max(m, n) ≤ 64, the CPU kernel up to 128
SHAPES = [(1, 1), (1, 7), (7, 1), (5, 3), (3, 5), (17, 17), (33, 33), (63, 17), (17, 63), (64, 1), (1, 64),
          (64, 37), (29, 64), (64, 64)]
CPU_SHAPES = [(128, 5), (5, 128), (127, 127), (128, 128), (100, 65)]


def _shapes(device: str):
    return SHAPES + (CPU_SHAPES if device == "cpu" else [])


def test_shapes_cover_both_lane_splits():
    splits = [_lanes(m, n) for m, n in SHAPES + CPU_SHAPES]
    assert any(lanes < rows for lanes, rows in splits)  # e.g. 64 × 1: 32 lanes over 64 rows
    assert any(lanes > rows for lanes, rows in splits)  # e.g. 64 × 64: 256 lanes over 64 rows


def _check(X: torch.Tensor, out, tol: float) -> None:
    """docs/svd.md#batched_svd's measures, in float64 on the CPU, per matrix of the batch."""
    U, Sv, Vh = (t.detach().to(torch.float64).cpu() for t in out)
    X64 = X.detach().to(torch.float64).cpu()
    b, m, n = X.shape
    k = min(m, n)
    assert U.shape == (b, m, k) and Sv.shape == (b, k) and Vh.shape == (b, k, n)
    assert out[0].dtype == X.dtype and out[0].is_contiguous() and out[2].is_contiguous()
    eye = torch.eye(k, dtype=torch.float64)
    orth_u = (U.mT @ U - eye).abs().amax((-2, -1))
    orth_v = (Vh @ Vh.mT - eye).abs().amax((-2, -1))
    assert (orth_u <= tol).all(), orth_u.max()
    assert (orth_v <= tol).all(), orth_v.max()
    norm = torch.linalg.matrix_norm(X64)
    recon = torch.linalg.matrix_norm(X64 - U @ torch.diag_embed(Sv) @ Vh)
    assert (recon <= tol * norm).all(), (recon / norm.clamp_min(1e-300)).max()
    truth = torch.linalg.svdvals(X64)
    assert ((Sv - truth).abs() <= tol * truth[:, :1]).all()
    assert (Sv >= 0).all() and (Sv[:, :-1] >= Sv[:, 1:]).all()


def _zero_some(b: int, count: int, n: int) -> torch.Tensor:
    """(b, n) masks with `count` zeros at scattered places (the rest ones)."""
    keep = torch.ones(b, n, dtype=torch.float64)
    for i in range(b):
        keep[i, torch.randperm(n)[:count]] = 0
    return keep


def _pruned(b: int, m: int, n: int, zero_rows: int, zero_cols: int) -> torch.Tensor:
    """Gaussian weights with `zero_rows` rows and `zero_cols` columns zeroed at scattered places
    (pruned filters and inputs, the pattern β-LASSO leaves) and a third of the rest zero."""
    X = torch.randn(b, m, n, dtype=torch.float64) * (torch.rand(b, m, n) < 2 / 3)
    return X * _zero_some(b, zero_rows, m)[:, :, None] * _zero_some(b, zero_cols, n)[:, None, :]


def _null_count(m: int, n: int, zero_rows: int, zero_cols: int) -> int:
    """Exactly zero columns of the kernel's tall A, at least: A = X for m > n, Xᵀ for m < n, either
    for a square X (the kernel picks the orientation from the row and column norms)."""
    if m > n:
        return zero_cols
    if m < n:
        return zero_rows
    return min(zero_rows, zero_cols)


def _check_completed(X: torch.Tensor, out, dtype: torch.dtype, nulls: int) -> None:
    """The contract, plus proof that the completion ran: an exactly null column of A has σ = 0
    exactly (σ² is its squared norm) and is the only way to get one from a non-zero X."""
    _check(X, out, TOLS[dtype])
    zeros = (out[1] == 0).sum(-1).cpu()
    assert (zeros >= nulls).all(), (zeros, nulls)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_matrix_factors_are_exact_identity_columns(dtype, device):
    """A zero X: every column is null, so all of U_A comes from the completion, which starts from
    e_0, e_1, … in turn and must reproduce them exactly: U = I[:m, :k], S = 0, Vh = I[:k, :n]."""
    for m, n in _shapes(device):
        X = torch.zeros(3, m, n, dtype=dtype, device=device)
        U, Sv, Vh = _op(X)
        k = min(m, n)
        assert torch.equal(U.cpu(), torch.eye(m, k, dtype=dtype).expand(3, m, k)), (m, n)
        assert torch.equal(Sv.cpu(), torch.zeros(3, k, dtype=dtype)), (m, n)
        assert torch.equal(Vh.cpu(), torch.eye(k, n, dtype=dtype).expand(3, k, n)), (m, n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_one_with_zero_rows_and_columns(dtype, device):
    """u vᵀ with zeros in u and v: exactly null columns (completed) beside near-parallel ones that
    Jacobi reduces to rounding level (not null: they stay live columns)."""
    for m, n in _shapes(device):
        zr, zc = m // 3, n // 3
        u = torch.randn(3, m, 1, dtype=torch.float64) * _zero_some(3, zr, m)[:, :, None]
        v = torch.randn(3, 1, n, dtype=torch.float64) * _zero_some(3, zc, n)[:, None, :]
        X = (u @ v).to(dtype).to(device)
        _check_completed(X, _op(X), dtype, _null_count(m, n, zr, zc))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_deficient_with_repeated_zero_singular_values(dtype, device):
    """B C of rank r with zero rows in B and zero columns in C: repeated exact zero singular
    values from the completion, the other k − r small ones from Jacobi."""
    for m, n in _shapes(device):
        k = min(m, n)
        for r in sorted({2, k // 2}):
            if not 2 <= r < k:
                continue
            zr, zc = (m - 1) // 4, (n - 1) // 4
            B = torch.randn(2, m, r, dtype=torch.float64) * _zero_some(2, zr, m)[:, :, None]
            C = torch.randn(2, r, n, dtype=torch.float64) * _zero_some(2, zc, n)[:, None, :]
            X = (B @ C).to(dtype).to(device)
            _check_completed(X, _op(X), dtype, _null_count(m, n, zr, zc))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pruned_weights(dtype, device):
    for m, n in _shapes(device):
        for zr, zc in [(m // 2, 0), (0, n // 2), (m - 1, n - 1), (m // 4, (3 * n) // 4)]:
            X = _pruned(2, m, n, zr, zc).to(dtype).to(device)
            _check_completed(X, _op(X), dtype, _null_count(m, n, zr, zc))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_last_completed_columns_orthogonal_to_rounding(dtype, device):
    """Many null columns of a large A: the last ones start from a unit vector with only ~1/M of
    its squared norm outside the span so far. One Gram–Schmidt pass leaves a non-orthogonality of
    order eps·M there (~200 eps at M = 127), the second brings it to rounding. With it U and Vh are
    orthonormal to the order of the Jacobi stopping tolerance √M·eps, much tighter than the
    documented 1e-5 / 1e-12."""
    eps = torch.finfo(dtype).eps
    sizes = [(64, 64), (64, 61), (61, 64)] + ([(127, 127), (128, 128), (128, 100), (100, 128)] if device == "cpu" else [])
    for m, n in sizes:
        k = min(m, n)
        eye = torch.eye(k, dtype=torch.float64)
        for zr, zc in [(m // 2, 0), (0, n // 2), (m // 3, n // 3)]:
            X = _pruned(8, m, n, zr, zc).to(dtype).to(device)
            U, Sv, Vh = (t.cpu().double() for t in _op(X))
            assert ((Sv == 0).sum(-1) >= _null_count(m, n, zr, zc)).all()
            bound = 4 * max(m, n) ** 0.5 * eps
            err = max((U.mT @ U - eye).abs().max().item(), (Vh @ Vh.mT - eye).abs().max().item())
            assert err <= bound, (m, n, zr, zc, err / eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_numerically_null_but_nonzero_columns(dtype, device):
    """Columns of A ~1e-30 of the largest entry (float32) or ~1e-300 (float64) are below the null
    threshold after scaling: completed rather than normalized, yet X is reconstructed to
    tolerance (their σ, not zero, is kept)."""
    tiny = 1e-30 if dtype == torch.float32 else 1e-300
    for m, n in [(64, 64), (64, 37), (17, 63), (33, 33), (9, 2)]:
        X = torch.randn(2, m, n, dtype=torch.float64)
        X[:, :, ::3] *= tiny  # columns of A for m ≥ n
        X[:, ::3, :] *= tiny  # columns of A for m < n
        X = X.to(dtype).to(device)
        out = _op(X)
        _check(X, out, TOLS[dtype])
        k = min(m, n)
        n_tiny = len(range(0, n if m >= n else m, 3))
        # the tiny columns are null: their σ (≤ ~1e-30 · max) sit at the end, untouched by rotations
        assert (out[1][:, k - n_tiny:].cpu().double() <= 1e3 * tiny * X.abs().amax().cpu().double()).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n", [(64, 64), (37, 20), (20, 37), (9, 9)])
def test_batched_mixture_and_nan_only_for_its_matrix(m, n, dtype, device):
    """Full-rank, zero, rank-1, pruned, NaN and Inf matrices in one batch (spread over the CPU
    kernel's SIMD groups of 8 / 4 lanes): NaN factors for the non-finite ones only, the contract for
    every other, and each result bit-identical to decomposing that matrix alone."""
    k = min(m, n)
    kinds = [
        torch.randn(m, n, dtype=torch.float64),
        torch.zeros(m, n, dtype=torch.float64),
        torch.randn(m, 1, dtype=torch.float64) @ torch.randn(1, n, dtype=torch.float64),
        _pruned(1, m, n, m // 2, n // 2)[0],
        torch.randn(m, max(1, k // 2), dtype=torch.float64) @ torch.randn(max(1, k // 2), n, dtype=torch.float64),
    ]
    X = torch.stack([kinds[i % len(kinds)] for i in range(11)]).to(dtype).to(device)
    bad = [3, 8]
    X[3, m // 2, n - 1] = float("nan")  # a pruned matrix with one NaN
    X[8, 0, 0] = float("inf")
    U, Sv, Vh = _op(X)
    for i in bad:
        assert U[i].isnan().all() and Sv[i].isnan().all() and Vh[i].isnan().all()
    good = [i for i in range(11) if i not in bad]
    assert not any(t[good].isnan().any() for t in (U, Sv, Vh))
    _check(X[good], (U[good], Sv[good], Vh[good]), TOLS[dtype])
    for i in good:
        alone = _op(X[i:i + 1].clone())
        for a, b in zip((U, Sv, Vh), alone):
            assert torch.equal(a[i:i + 1], b), i
