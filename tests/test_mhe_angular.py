"""MHE's angular energies, ``mhe_penalty(..., angular=True)`` (docs/gram.md#angular-energies).

Every backend against a float64 transcription of the official code's angular variants (the MHE
repository's ``a0`` / ``a1`` / ``a2`` powers, written out here as that code computes them: the
filters as columns, ``arccos`` of the normalised inner products over π plus 1e-4, the strict upper
triangle summed and divided by the number of pairs), the half-space form's antipodal pairs at large
norms, NaN placement, and the model-level paths (penalty_multi, Regularizer, the sharded Gram route).
The generated cases (tests/op_cases.py, ``angular-*``) add opcheck, compile, vmap and gradcheck.
"""
from __future__ import annotations

import math

import pytest
import torch

import regkernels
from regkernels import _ext
from regkernels.nn import Regularizer
from regkernels.reference import gram as R

BACKENDS = ["reference", "cpu"] + (["triton"] if _ext.has_triton() and _ext.triton_interpreted() else [])


def official_angular(W: torch.Tensor, power: int, half: bool) -> torch.Tensor:
    """The official code's angular MHE of one (m, n) matrix, float64, without its loss weights
    (1e-1 or 1 for ``a1`` / ``a2``, which are the user's ``weight``)."""
    filt = W.double().T  # (n, m): the official code holds the filters as columns
    if half:
        filt = torch.cat([filt, -filt], dim=1)
    n_filt = filt.shape[1]
    norm = torch.sqrt((filt * filt).sum(0, keepdim=True) + 1e-4)
    inner = (filt.T @ filt) / (norm.T @ norm)
    angle = torch.acos(inner) / math.pi + 1e-4
    final = -torch.log(angle) if power == 0 else angle ** (-float(power))
    final = torch.triu(final, diagonal=1)  # the code subtracts the lower band, diagonal included
    return final.sum() / (n_filt * (n_filt - 1) / 2.0)


def _rows(m: int, n: int, seed: int = 0, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, n, generator=g, dtype=torch.float64) * scale / math.sqrt(n)).to(dtype)


def _on(backend: str):
    # the triton backend runs interpreted on CPU tensors here
    return {"backend": backend}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("s", [0, 1, 2])
def test_matches_the_official_formula(backend, s, half):
    W = _rows(9, 13, seed=s)
    dtype = torch.float32 if backend == "triton" else torch.float64
    got = regkernels.mhe_penalty(W.to(dtype), s, half, angular=True, **_on(backend))
    want = official_angular(W, s, half)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=0)


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("s", [0, 1, 2])
def test_reference_gradcheck(s, half):
    W = _rows(5, 4, seed=10 + s, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: R.mhe_penalty(x, s, half, 1e-4, True), (W,))
    assert torch.autograd.gradgradcheck(lambda x: R.mhe_penalty(x, s, half, 1e-4, True), (W,))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("s", [0, 2])
def test_half_antipodal_pairs_at_large_norms(backend, s):
    """‖w‖² = 10⁶ ≫ eps: the pair (w, −w) has 1 + cos = eps/ν² ≈ 10⁻¹⁰, below float32's
    resolution, so cos rounds to −1 where arccos has an infinite derivative. The kernels take the
    angle from ‖w‖² (docs/gram.md#angular-energies): value and gradient stay finite and agree
    with the float64 reference."""
    W = _rows(6, 10, seed=3, scale=1000.0)
    X = W.clone().requires_grad_()
    v = regkernels.mhe_penalty(X, s, True, angular=True, backend=backend)
    v.backward()
    X64 = W.double().requires_grad_()
    v64 = R.mhe_penalty(X64, s, True, 1e-4, True)
    v64.backward()
    assert torch.isfinite(X.grad).all()
    torch.testing.assert_close(v.double(), v64.detach(), rtol=1e-5, atol=0)
    scale = X64.grad.abs().max().item()
    torch.testing.assert_close(X.grad.double(), X64.grad, rtol=0, atol=1e-4 * scale)


def test_naive_antipodal_angle_fails_at_large_norms():
    """Why the antipodal pairs need their own formula (so the test above can fail): through cos
    in float32, the official code's half form at ‖w‖² = 10⁶ takes arccos at or past −1, and its
    gradient is not finite."""
    X = _rows(6, 10, seed=3, scale=1000.0).requires_grad_()
    filt = torch.cat([X.T, -X.T], dim=1)
    norm = torch.sqrt((filt * filt).sum(0, keepdim=True) + 1e-4)
    inner = (filt.T @ filt) / (norm.T @ norm)
    angle = torch.acos(inner) / math.pi + 1e-4
    (torch.triu(angle ** -2.0, diagonal=1).sum() / (12 * 11 / 2)).backward()
    assert not torch.isfinite(X.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_matrix(backend):
    W = torch.stack([_rows(5, 7, seed=s) for s in range(3)])
    W[1, 2, 3] = float("nan")
    v = regkernels.mhe_penalty(W, 1, True, angular=True, backend=backend)
    assert v[1].isnan() and torch.isfinite(v[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_filters_have_the_offset_energy(backend):
    """Two identical rows: the angle is arccos(‖w‖²/ν²)/π, tiny; the energy is finite (the eps
    offset), unlike the Euclidean form's +inf."""
    W = _rows(4, 6, seed=5, dtype=torch.float64)
    W[1] = W[0]
    dtype = torch.float32 if backend == "triton" else torch.float64
    got = regkernels.mhe_penalty(W.to(dtype), 0, angular=True, backend=backend)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), official_angular(W, 0, False), rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_multi_and_regularizer(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 4 * 4, 10))
    weights = [model[0].weight, model[3].weight]
    mats = [w.detach().reshape(w.shape[0], -1) for w in weights]
    want = torch.stack([official_angular(m, 2, True) for m in mats])
    got = regkernels.penalty_multi(weights, "mhe", s=2, half=True, angular=True, backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    reg = Regularizer(model, "mhe", weight=0.5, s=2, half=True, angular=True, backend=backend)
    torch.testing.assert_close(reg().double(), 0.5 * want.mean(), rtol=1e-5, atol=0)


def test_sharded_gram_route_formula():
    """The sharded Gram route evaluates a layer from its Gram alone (penalty_from_gram)."""
    W = _rows(7, 5, seed=8, dtype=torch.float64)
    for half in (False, True):
        got = R.penalty_from_gram("mhe", W @ W.T, s=1, half=half, eps=1e-4, angular=True)
        torch.testing.assert_close(got, official_angular(W, 1, half), rtol=1e-12, atol=0)


def test_bad_angular_is_refused():
    W = _rows(3, 4)
    with pytest.raises(TypeError, match=r"mhe_penalty: angular must be True or False"):
        regkernels.mhe_penalty(W, angular=1)
    with pytest.raises(TypeError, match=r"penalty_multi: angular must be True or False"):
        regkernels.penalty_multi([W], "mhe", angular="no")
