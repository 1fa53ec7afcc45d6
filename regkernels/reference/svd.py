"""Pure-torch references for the batched SVD family (SPEC §3): ``batched_svd``,
``clamp_singular_values`` and hard singular value bounding ``svb_``.

These are the test oracle, the CPU fallback and the benchmark baseline. They are written
for reading: every function states its shapes and formula, comments cite the SPEC.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Callable, Union

import torch
from torch import nn

from regkernels.reference._dtypes import compute_dtype, upcast
from regkernels.reference.gram import as_matrix

__all__ = ["batched_svd", "clamp_singular_values", "svb_", "collect_svb_weights", "SVB_LAYERS"]

SVDFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
InputSize = Union[int, Sequence[int], Mapping[torch.Tensor, Union[int, Sequence[int]]]]

# Layers whose weight svb_ projects when given a module. ConvTranspose is left out on
# purpose: its weight is (in, out/g, *k), so the as_matrix rows would not be filters.
SVB_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

def _svd(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``X (..., m, n)`` in X's own (float32/float64) dtype.

    LAPACK refuses a batch that holds a NaN ("failed to converge") and returns NaN for an
    Inf; SPEC §3.1 wants NaN for that matrix only. So every non-finite matrix is replaced
    by zeros for the decomposition and its factors are overwritten with NaN afterwards.
    Both steps are ``torch.where`` so the function stays traceable and differentiable.
    """
    finite = torch.isfinite(X).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)  # (..., 1, 1)
    U, S, Vh = torch.linalg.svd(torch.where(finite, X, torch.zeros_like(X)), full_matrices=False)
    nan = float("nan")
    return (torch.where(finite, U, nan), torch.where(finite[..., 0], S, nan), torch.where(finite, Vh, nan))


def batched_svd(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD with the contract of ``torch.linalg.svd(X, full_matrices=False)``.

    Shapes: ``X (..., m, n)`` → ``U (..., m, k)``, ``S (..., k)`` non-negative descending,
    ``Vh (..., k, n)``, ``k = min(m, n)``, ``X = U diag(S) Vh``. fp16/bf16 are computed in
    float32 and returned in the input dtype; a matrix holding NaN/Inf gives NaN factors for
    that matrix only; an empty batch gives empty factors. Differentiable like
    ``torch.linalg.svd`` (formula: SPEC §3.1).
    """
    U, S, Vh = _svd(upcast(X))
    return U.to(X.dtype), S.to(X.dtype), Vh.to(X.dtype)


# ---------------------------------------------------------------------------------------
# clamp_singular_values: Y = U · clamp(S, lo, hi) · Vh with a divided-difference backward
# ---------------------------------------------------------------------------------------

def _clamp_derivative(S: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """f′(σ) for f = clamp(·, lo, hi): 1 on the open interval (lo, hi), 0 outside.

    The kinks σ = lo, hi count as outside, the convention of ``torch.clamp``'s own
    backward, so this op's gradient equals autograd through ``U·clamp(S)·Vh`` wherever
    that one is defined (distinct singular values), ties at the kinks included. One
    exception: singular values are never negative, so for lo = 0 the kink at 0 is never
    crossed and f(σ) = σ on [0, hi); there f′(0) = 1 is the true one-sided derivative,
    which keeps Y = X's gradient exact at rank-deficient X when the band holds it.
    """
    above_lo = (S > lo) | (lo == 0)
    return (above_lo & (S < hi)).to(S.dtype)


def _ratio(num: torch.Tensor, den: torch.Tensor, degenerate: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``degenerate`` is False, ``fallback`` where it is True.

    The denominator is swapped for 1 on degenerate entries first, so the unselected
    branch never produces 0/0 and no NaN reaches the gradient through ``where``.
    """
    safe = torch.where(degenerate, torch.ones_like(den), den)
    return torch.where(degenerate, fallback, num / safe)


def _spectral_weights(S: torch.Tensor, lo: float, hi: float, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two k×k weight matrices of the spectral-function derivative (SPEC §3.2).

    ``D_ij = (f(σ_i) − f(σ_j)) / (σ_i − σ_j)``, with the limit ``(f′(σ_i) + f′(σ_j))/2``
    (= f′(σ) for a tie) when ``|σ_i − σ_j| ≤ 16·eps·max(σ_i, σ_j)`` (relative tolerance;
    two zeros are a tie); ``A_ij = (f(σ_i) + f(σ_j)) / (σ_i + σ_j)`` (its diagonal is
    f(σ)/σ), with the same fallback when ``σ_i + σ_j`` is at the numerical-rank threshold
    ``max(m, n)·eps·σ_max`` or below.

    For clamp both ratios are numerically benign away from the fallbacks: for close σ the
    difference f(σ_i) − f(σ_j) is exact in floating point (Sterbenz), so D ∈ [0, 1] even
    just above the tolerance. The fallback of A is the exact limit of f(σ)/σ when lo = 0
    (f′(0) = 1 there, see ``_clamp_derivative``). For lo > 0 a zero singular value is
    lifted to lo along an arbitrary singular pair, Y is discontinuous at such X and the
    fallback f′(0) = 0 is a convention that keeps the gradient finite.
    """
    eps = torch.finfo(S.dtype).eps
    F = S.clamp(lo, hi)
    dF = _clamp_derivative(S, lo, hi)
    si, sj = S[..., :, None], S[..., None, :]
    fi, fj = F[..., :, None], F[..., None, :]
    limit = (dF[..., :, None] + dF[..., None, :]) / 2
    tie = (si - sj).abs() <= 16 * eps * torch.maximum(si, sj)
    D = _ratio(fi - fj, si - sj, tie, limit)
    s_max = S.amax(dim=-1, keepdim=True)[..., None] if S.shape[-1] > 0 else torch.zeros_like(si)
    null = (si + sj) <= max(m, n) * eps * s_max
    A = _ratio(fi + fj, si + sj, null, limit)
    return D, A


def _clamp_backward(grad: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                    lo: float, hi: float) -> torch.Tensor:
    """Gradient of ``<grad, U f(S) Vh>`` w.r.t. X, f = clamp(·, lo, hi).

    Derivation (square core): with ``dP = Uᵀ dX V`` and ``Uᵀ dU = Ω_U``, ``Vᵀ dV = Ω_V``
    skew, ``dP = Ω_U Σ + dΣ − Σ Ω_V``. Split the off-diagonal of dP into its symmetric
    part s and antisymmetric part t: s_ij = (Ω_U − Ω_V)_ij (σ_j − σ_i)/2,
    t_ij = (Ω_U + Ω_V)_ij (σ_i + σ_j)/2. The same rotations act on Y = U F Vᵀ, so

        Uᵀ dY V = D ∘ sym(dP) + A ∘ skew(dP)      (diag: f′(σ_i) dP_ii = D_ii dP_ii)

    a self-adjoint map of dP, hence with ``G = Uᵀ grad V``:
    ``∂/∂X = U [D ∘ sym(G) + A ∘ skew(G)] Vᵀ``.

    Non-square complement: for m > k, ``dU`` also has ``(I − UUᵀ) dX V Σ⁻¹`` which moves
    Y by ``(I − UUᵀ) dX V diag(f/σ) Vᵀ``; its adjoint adds
    ``(I − UUᵀ) grad V diag(f/σ) Vᵀ``. For n > k symmetrically
    ``U diag(f/σ) Uᵀ grad (I − VVᵀ)``. ``f/σ`` is diag(A), with A's fallback at σ = 0.
    """
    m, n = U.shape[-2], Vh.shape[-1]
    k = S.shape[-1]
    D, A = _spectral_weights(S, lo, hi, m, n)
    V = Vh.mT
    G = U.mT @ grad @ V
    sym, skew = (G + G.mT) / 2, (G - G.mT) / 2
    dX = U @ (D * sym + A * skew) @ Vh
    a = A.diagonal(dim1=-2, dim2=-1)
    if m > k:  # tall: left complement (I − UUᵀ) grad V diag(f/σ) Vᵀ
        dX = dX + ((grad @ V - U @ G) * a[..., None, :]) @ Vh
    if n > k:  # wide: right complement U diag(f/σ) Uᵀ grad (I − VVᵀ)
        dX = dX + U @ ((U.mT @ grad - G @ Vh) * a[..., :, None])
    return dX


class _ClampSingularValues(torch.autograd.Function):
    """Y = U clamp(S) Vh, backward by divided differences (see ``_clamp_backward``).

    fp16/bf16 inputs are decomposed and differentiated in float32. The backward is
    once-differentiable: it treats the saved factors as constants.
    """

    @staticmethod
    def forward(X: torch.Tensor, lo: float, hi: float,
                svd: SVDFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        U, S, Vh = svd(upcast(X))
        Y = (U * S.clamp(lo, hi)[..., None, :]) @ Vh
        return Y.to(X.dtype), U, S, Vh

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, lo, hi, _ = inputs
        _, U, S, Vh = output
        ctx.save_for_backward(U, S, Vh)
        ctx.lo, ctx.hi = lo, hi
        ctx.mark_non_differentiable(U, S, Vh)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_Y, _gU, _gS, _gVh):
        U, S, Vh = ctx.saved_tensors
        dX = _clamp_backward(grad_Y.to(U.dtype), U, S, Vh, ctx.lo, ctx.hi)
        return dX.to(grad_Y.dtype), None, None, None


def clamp_singular_values(X: torch.Tensor, lo: float, hi: float, *, svd: SVDFn | None = None) -> torch.Tensor:
    """``Y = U · diag(clamp(S, lo, hi)) · Vh`` for ``X = U diag(S) Vh`` (formula: SPEC §3.2).

    Shapes: ``X (..., m, n)`` → ``Y (..., m, n)``, input dtype (fp16/bf16 computed in
    float32). Differentiable with the divided-difference gradient of a spectral function,
    which stays finite at repeated singular values (X orthogonal, X = I) where
    ``torch.linalg.svd``'s backward gives NaN/Inf; for singular values ``σ = 0`` with
    ``lo > 0`` the gradient is a finite convention (see ``_spectral_weights``).

    ``svd`` computes the thin SVD of the float32/float64 stack (default: LAPACK through
    ``torch.linalg.svd`` with the NaN handling of SPEC §3.1); the kernels pass theirs.
    """
    return _ClampSingularValues.apply(X, float(lo), float(hi), svd if svd is not None else _svd)[0]


# ---------------------------------------------------------------------------------------
# svb_: hard singular value bounding, in place
# ---------------------------------------------------------------------------------------

def collect_svb_weights(weights_or_module) -> list[tuple[torch.Tensor, int]]:
    """``(weight, groups)`` for every weight to project, each parameter once.

    A module contributes the weight of every ``SVB_LAYERS`` submodule (with its conv
    ``groups``); a single tensor or an iterable of tensors is taken as ungrouped weights.
    """
    if isinstance(weights_or_module, nn.Module):
        found = [(mod.weight, getattr(mod, "groups", 1)) for mod in weights_or_module.modules()
                 if isinstance(mod, SVB_LAYERS) and isinstance(mod.weight, torch.Tensor)]
    elif isinstance(weights_or_module, torch.Tensor):
        found = [(weights_or_module, 1)]
    else:
        found = [(w, 1) for w in weights_or_module]
    seen: set[int] = set()
    unique = []
    for w, g in found:  # tied weights (shared parameters) are projected once
        if id(w) not in seen:
            seen.add(id(w))
            unique.append((w, g))
    return unique


def _bound(X: torch.Tensor, lo: float, hi: float, svd: SVDFn) -> torch.Tensor:
    """``U clamp(S, lo, hi) Vh`` for a stack ``X (N, m, n)`` in its compute dtype.

    A matrix whose singular values all lie in [lo, hi] keeps its original bits: SVB is a
    projection, and re-synthesising U S Vh would only add rounding drift every call. The
    test allows the relative rounding ``max(m, n)·eps`` of a re-synthesised U S Vh, so a
    projected matrix stays put on the next call (the projection is idempotent).
    """
    U, S, Vh = svd(X)
    slack = max(X.shape[-2:]) * torch.finfo(X.dtype).eps
    inside = ((S >= lo * (1 - slack)) & (S <= hi * (1 + slack))).all(dim=-1)[:, None, None]
    return torch.where(inside, X, (U * S.clamp(lo, hi)[..., None, :]) @ Vh)


def _svb_matrices(items: list[tuple[torch.Tensor, int]], lo: float, hi: float, svd: SVDFn) -> int:
    """Project every ``as_matrix`` of the weights, one ``svd`` call per (m, n, dtype, device).

    Grouping by the matrix shape (not the weight shape) merges e.g. a Linear (64, 576) with
    a Conv (64, 64, 3, 3), so the number of calls is at most the number of distinct
    (weight shape, dtype, device) groups.
    """
    groups: dict[tuple, list[tuple[torch.Tensor, int]]] = {}
    for w, g in items:
        mats = as_matrix(w, g)
        key = (tuple(mats.shape[-2:]), w.dtype, w.device)
        groups.setdefault(key, []).append((w, g))
    count = 0
    for key, members in groups.items():
        stacks = [as_matrix(w, g).reshape(-1, *key[0]) for w, g in members]
        X = torch.cat(stacks).to(compute_dtype(members[0][0].dtype))
        Y = _bound(X, lo, hi, svd).to(members[0][0].dtype)
        for (w, _), part in zip(members, Y.split([s.shape[0] for s in stacks])):
            w.copy_(part.reshape(w.shape))
        count += X.shape[0]
    return count


def _size_for(weight: torch.Tensor, input_size: InputSize | None) -> tuple[int, ...]:
    """The spatial input size of one conv weight for the operator branch, as a tuple of
    ``weight.dim() − 2`` ints (an int stands for the same size along every spatial dim)."""
    if input_size is None:
        raise ValueError(
            f"svb_: operator=True needs input_size= (the spatial size of the conv's input: an int, a tuple "
            f"of {weight.dim() - 2} ints, or a dict weight -> size) for the conv weight of shape {tuple(weight.shape)}")
    if isinstance(input_size, Mapping):
        if weight not in input_size:
            raise ValueError(f"svb_: input_size has no entry for the conv weight of shape {tuple(weight.shape)}")
        input_size = input_size[weight]
    if isinstance(input_size, int):
        return (input_size,) * (weight.dim() - 2)
    return tuple(input_size)


def _svb_operators(convs: list[tuple[torch.Tensor, int, tuple[int, ...]]], lo: float, hi: float,
                   clip: Callable | None = None) -> int:
    """Bound the singular values of each conv *operator* (SPEC §2.3, Sedghi et al.).

    ``convs`` holds ``(weight, groups, input_size)``. A grouped conv is block diagonal over
    its groups, so each group's kernel slice ``(out/g, in/g, *k)`` is clipped on its own.
    Exact for circular padding and stride 1; the truncation to the kernel support makes the
    result an approximate projection.
    """
    if clip is None:
        from regkernels.reference.conv import clip_conv_singular_values as clip  # conv family, imported only here

    for w, g, size in convs:
        for block in w.chunk(g, dim=0):
            new_block, _ = clip(block, size, lo, hi)
            block.copy_(new_block)
    return sum(g for _, g, _ in convs)


def svb_(weights_or_module: nn.Module | torch.Tensor | Iterable[torch.Tensor], eps: float, *,
         operator: bool = False, input_size: InputSize | None = None, svd: SVDFn | None = None,
         clip: Callable | None = None) -> int:
    """Hard singular value bounding, in place (formula: SPEC §3.3, Jia et al.).

    ``W ← U · clamp(S, 1/(1+eps), 1+eps) · Vh`` for ``as_matrix(W) = U diag(S) Vh``,
    reshaped back into W, under ``torch.no_grad()`` (biases are never touched).

    ``weights_or_module``: an ``nn.Module`` (every ``nn.Linear`` and ``nn.Conv1d/2d/3d``
    weight in it, grouped convs per group, tied weights once), a single weight tensor, or
    an iterable of weight tensors (taken with groups = 1). Matrices of the same
    (m, n, dtype, device) go through ONE call of ``svd`` (default: ``batched_svd`` of this
    module); fp16/bf16 weights are decomposed in float32. Matrices already inside the band
    (up to a relative rounding slack of max(m, n)·eps) are left bit-for-bit unchanged, so
    a second call right after a first changes nothing.

    ``operator=True`` bounds each conv weight's operator instead (SPEC §2.3), which needs
    ``input_size``: an int or tuple of spatial sizes used for every conv, or a dict from
    weight tensor to its size; Linear weights are bounded as matrices either way. ``clip`` is
    the ``clip_conv_singular_values(weight, size, lo, hi)`` to use (default: the reference).

    Returns the number of matrices projected (a grouped conv counts once per group, an
    operator-bounded conv once per group as well).
    """
    lo, hi = 1.0 / (1.0 + eps), 1.0 + eps
    svd = svd if svd is not None else batched_svd
    items = collect_svb_weights(weights_or_module)
    with torch.no_grad():
        if not operator:
            return _svb_matrices(items, lo, hi, svd)
        # every conv's input size is resolved before any weight changes
        convs = [(w, g, _size_for(w, input_size)) for w, g in items if w.dim() > 2]
        mats = [(w, g) for w, g in items if w.dim() == 2]
        return (_svb_operators(convs, lo, hi, clip) if convs else 0) + _svb_matrices(mats, lo, hi, svd)
