"""Pure-torch references for the batched SVD family (docs/svd.md): ``batched_svd``,
``clamp_singular_values`` and hard singular value bounding ``svb_``.

These are the test oracle, the CPU fallback and the benchmark baseline. They are written
for reading: every function states its shapes and formula, comments cite docs/svd.md.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Callable, NamedTuple, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from regkernels import distributed as _dist
from regkernels._dtypes import compute_dtype, upcast
from regkernels._numerics import functorch_wrapped
from regkernels.reference.conv import clip_conv_singular_values
from regkernels.reference.gram import as_matrix, conv_as_transposed

__all__ = ["batched_svd", "clamp_singular_values", "svb_", "collect_svb_weights", "SVBTarget", "SVB_LAYERS",
           "BN_LAYERS", "TRANSPOSED_LAYERS", "following_bn_layers", "select_bn_layers"]

SVDFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
InputSize = Union[int, Sequence[int], Mapping[torch.Tensor, Union[int, Sequence[int]]]]

# Layers whose weight svb_ projects when given a module. A ConvTranspose's weight is (in, out/g, *k):
# its matrix is as_matrix(W, groups, transposed=True), one row per output channel (docs/svd.md#svb_).
TRANSPOSED_LAYERS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
SVB_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + TRANSPOSED_LAYERS

def _svd(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``X (..., m, n)`` in X's own (float32/float64) dtype.

    LAPACK refuses a batch that holds a NaN ("failed to converge") and returns NaN for an
    Inf; docs/svd.md#batched_svd wants NaN for that matrix only. So every non-finite matrix is replaced
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
    ``torch.linalg.svd`` (formula: docs/svd.md#batched_svd).
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
    """The two k×k weight matrices of the spectral-function derivative (docs/svd.md#clamp_singular_values).

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

    fp16/bf16 inputs are decomposed and differentiated in float32. A first-order backward
    treats the saved factors as constants. Under ``create_graph=True`` the backward recomputes
    the factors with a differentiable ``svd`` of X and builds the same formula on them, so its
    derivative w.r.t. X (the second derivative) comes from the SVD's own gradient; that one
    divides by σ_i² − σ_j² and by σ, so it is refused (RuntimeError) where a singular value is
    repeated or zero (the ``tie`` / ``null`` sets of ``_spectral_weights``).
    """

    @staticmethod
    def forward(X: torch.Tensor, lo: float, hi: float,
                svd: SVDFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        U, S, Vh = svd(upcast(X))
        Y = (U * S.clamp(lo, hi)[..., None, :]) @ Vh
        return Y.to(X.dtype), U, S, Vh

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        X, lo, hi, svd = inputs
        _, U, S, Vh = output
        ctx.save_for_backward(X, U, S, Vh)
        ctx.lo, ctx.hi, ctx.svd = lo, hi, svd
        ctx.mark_non_differentiable(U, S, Vh)

    @staticmethod
    def backward(ctx, grad_Y, _gU, _gS, _gVh):
        X, U, S, Vh = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            U, S, Vh = ctx.svd(upcast(X))
            if not _under_functorch(grad_Y):
                _check_second_order(S.detach(), *X.shape[-2:])
        dX = _clamp_backward(grad_Y.to(U.dtype), U, S, Vh, ctx.lo, ctx.hi)
        return dX.to(grad_Y.dtype), None, None, None

    @staticmethod
    def vmap(info, in_dims, X, lo, hi, svd):
        # every step takes leading batch dims: the vmapped dim becomes one more of them
        return _ClampSingularValues.apply(X.movedim(in_dims[0], 0), lo, hi, svd), (0, 0, 0, 0)


def _under_functorch(t: torch.Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform (grad, vjp, vmap).

    Those transforms run every backward with grad mode on (they may differentiate it again), so
    a first-order ``torch.func.grad`` takes the differentiable branch of the backward above; the
    refusal ``_check_second_order`` is a host-side test (a ``bool`` of a tensor, impossible on a
    vmapped one) and is skipped there. The first-order gradient is the same either way; a
    second-order transform at repeated or zero singular values then gets NaN/Inf, not an error.
    Never true while dynamo traces (it cannot trace the functorch query and never wraps).
    """
    return functorch_wrapped(t)


def _check_second_order(S: torch.Tensor, m: int, n: int) -> None:
    """Refuse a second derivative through the SVD at repeated or zero singular values, where
    the SVD's gradient (terms 1/(σ_i² − σ_j²) and 1/σ) is infinite although the spectral
    function's second derivative may be finite: NaN/Inf would come back silently otherwise."""
    if S.numel() == 0:
        return
    eps = torch.finfo(S.dtype).eps
    si, sj = S[..., :, None], S[..., None, :]
    off = ~torch.eye(S.shape[-1], dtype=torch.bool, device=S.device)
    tie = ((si - sj).abs() <= 16 * eps * torch.maximum(si, sj)) & off
    null = S <= max(m, n) * eps * S.amax(dim=-1, keepdim=True)
    if bool(tie.any()) or bool(null.any()):
        raise RuntimeError(
            "clamp_singular_values: double backward (create_graph=True) is computed through the SVD's "
            "gradient, which is infinite at repeated or zero singular values, and this input has some; no "
            "backend computes it there (the first-order gradient is finite: call backward without "
            "create_graph)")


def clamp_singular_values(X: torch.Tensor, lo: float, hi: float, *, svd: SVDFn | None = None) -> torch.Tensor:
    """``Y = U · diag(clamp(S, lo, hi)) · Vh`` for ``X = U diag(S) Vh`` (formula: docs/svd.md#clamp_singular_values).

    Shapes: ``X (..., m, n)`` → ``Y (..., m, n)``, input dtype (fp16/bf16 computed in
    float32). Differentiable with the divided-difference gradient of a spectral function,
    which stays finite at repeated singular values (X orthogonal, X = I) where
    ``torch.linalg.svd``'s backward gives NaN/Inf; for singular values ``σ = 0`` with
    ``lo > 0`` the gradient is a finite convention (see ``_spectral_weights``).

    ``svd`` computes the thin SVD of the float32/float64 stack (default: LAPACK through
    ``torch.linalg.svd`` with the NaN handling of docs/svd.md#batched_svd); the kernels pass theirs.
    """
    return _ClampSingularValues.apply(X, float(lo), float(hi), svd if svd is not None else _svd)[0]


# ---------------------------------------------------------------------------------------
# svb_: hard singular value bounding, in place
# ---------------------------------------------------------------------------------------

class SVBTarget(NamedTuple):
    """One weight ``svb_`` bounds: its current value, conv ``groups``, the layer named in errors
    (``weights_or_module[i]`` for a tensor), ``write(new)``, which makes ``new`` the layer's
    effective weight (in place, through its parametrization or weight-norm hook if it has one), and
    whether it is a ConvTranspose weight ``(in, out/g, *k)`` (``transposed``)."""

    weight: torch.Tensor
    groups: int
    layer: str
    module: nn.Module | None
    write: Callable[[torch.Tensor], None]
    transposed: bool = False


def _refuse(op: str, layer: str, why: str) -> None:
    raise ValueError(f"{op}: cannot bound the weight of layer {layer!r}: {why}")


def _module_target(name: str, mod: nn.Module, op: str) -> tuple[object, SVBTarget]:
    """``(dedup key, target)`` for the weight of one SVB layer.

    A weight recomputed from other tensors at every access or forward would take an in-place
    write and lose it, so it is written where it comes from: a ``torch.nn.utils.parametrize``
    parametrization through its ``right_inverse`` (``module.weight = new``), the hook-based
    ``torch.nn.utils.weight_norm`` through ``weight_v ← new``, ``weight_g ← ‖new‖`` (per ``dim``).
    Everything else that recomputes the weight (a parametrization without ``right_inverse``,
    ``spectral_norm``, which always divides by σ_max, or any other non-Parameter weight) is
    refused, naming the layer.
    """
    layer = name or type(mod).__name__
    groups = getattr(mod, "groups", 1)
    transposed = isinstance(mod, TRANSPOSED_LAYERS)
    if parametrize.is_parametrized(mod, "weight"):
        plist = mod.parametrizations["weight"]
        missing = [type(p).__name__ for p in plist if not hasattr(p, "right_inverse")]
        if missing:
            _refuse(op, layer, f"its weight parametrization {', '.join(missing)} has no right_inverse, so a "
                               "bounded weight cannot be written back (give the parametrization a right_inverse or "
                               "remove it)")
        with torch.no_grad():
            value = mod.weight

        def write(new: torch.Tensor) -> None:
            mod.weight = new  # parametrize: right_inverse of the chain, stored in .original(s)

        return id(plist), SVBTarget(value, groups, layer, mod, write, transposed)
    for hook in mod._forward_pre_hooks.values():
        kind = type(hook).__name__
        if getattr(hook, "name", None) != "weight" or kind not in ("WeightNorm", "SpectralNorm"):
            continue
        if kind == "SpectralNorm":
            _refuse(op, layer, "torch.nn.utils.spectral_norm divides the weight by its σ_max at every forward, so "
                               "no written weight keeps singular values in the band; remove spectral_norm")
        g, v = mod.weight_g, mod.weight_v
        with torch.no_grad():
            value = hook.compute_weight(mod)

        def write(new: torch.Tensor, hook=hook, g=g, v=v) -> None:
            # W = g · v / ‖v‖ (norm over every dim but `dim`): v = W, g = ‖W‖ reproduces W
            v.copy_(new)
            g.copy_(torch.norm_except_dim(new, 2, hook.dim))
            setattr(mod, "weight", hook.compute_weight(mod))  # the cached weight the hook set last

        return id(v), SVBTarget(value, groups, layer, mod, write, transposed)
    w = mod.weight
    if not isinstance(w, nn.Parameter):
        _refuse(op, layer, f"its weight is a {type(w).__name__}, not an nn.Parameter, so it is computed from "
                           "something else (a hook, torch.nn.utils.prune, ...) and an in-place write may be thrown "
                           "away; pass the tensor itself if writing it is what you want")
    return id(w), SVBTarget(w, groups, layer, mod, w.copy_, transposed)


def collect_svb_weights(weights_or_module, op: str = "svb_") -> list[SVBTarget]:
    """The targets ``svb_`` bounds, each parameter once (tied weights are bounded once).

    A module contributes the weight of every ``SVB_LAYERS`` submodule (with its conv
    ``groups``, ConvTranspose weights marked ``transposed``; see ``_module_target`` for
    parametrized layers); a single tensor or an iterable
    of tensors is taken as ungrouped weights written in place. Raises ValueError naming the
    layer (and ``op``) for a weight that cannot be written back.
    """
    found: list[tuple[object, SVBTarget]] = []
    if isinstance(weights_or_module, nn.Module):
        for name, mod in weights_or_module.named_modules():
            if isinstance(mod, SVB_LAYERS) and isinstance(mod.weight, torch.Tensor):
                found.append(_module_target(name, mod, op))
    else:
        items = [weights_or_module] if isinstance(weights_or_module, torch.Tensor) else weights_or_module
        for i, w in enumerate(items):
            single = isinstance(weights_or_module, torch.Tensor)
            layer = "weights_or_module" if single else f"weights_or_module[{i}]"
            if w.grad_fn is not None and not w._is_view():
                _refuse(op, layer, f"it is the output of an operation (grad_fn={type(w.grad_fn).__name__}), e.g. the "
                                   "weight of a parametrized layer, so writing into it changes no parameter; pass the "
                                   "module")
            found.append((id(w), SVBTarget(w, 1, layer, None, w.copy_)))
    seen: set = set()
    unique = []
    for key, target in found:
        if key not in seen:
            seen.add(key)
            unique.append(target)
    return unique


def _bound(X: torch.Tensor, lo: float, hi: float, svd: SVDFn) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U clamp(S, lo, hi) Vh, inside)`` for a stack ``X (N, m, n)`` in its compute dtype.

    A matrix whose singular values all lie in [lo, hi] (``inside``, ``(N,)``) keeps its
    original bits: SVB is a projection, and re-synthesising U S Vh would only add rounding
    drift every call. The test allows the relative rounding ``max(m, n)·eps`` of a
    re-synthesised U S Vh, so a projected matrix stays put on the next call (the projection
    is idempotent). A matrix holding NaN/Inf has NaN singular values, is not inside, and
    becomes NaN (docs/index.md#numerical-behaviour: that matrix only).
    """
    U, S, Vh = svd(X)
    slack = max(X.shape[-2:]) * torch.finfo(X.dtype).eps
    inside = ((S >= lo * (1 - slack)) & (S <= hi * (1 + slack))).all(dim=-1)
    return torch.where(inside[:, None, None], X, (U * S.clamp(lo, hi)[..., None, :]) @ Vh), inside


def _matrices(t: SVBTarget) -> torch.Tensor:
    """The matrices svb_ bounds for one weight: ``as_matrix(W, groups)``, for a ConvTranspose
    ``as_matrix(W, groups, transposed=True)`` (a copy)."""
    return as_matrix(t.weight, t.groups, transposed=t.transposed)


def _from_matrices(t: SVBTarget, mats: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_matrices``: bounded matrices back into the weight's shape and layout."""
    if not t.transposed:
        return mats.reshape(t.weight.shape)
    cin, per, *kernel = t.weight.shape
    return conv_as_transposed(mats.reshape(per * t.groups, cin // t.groups, *kernel), t.groups)


def _svb_matrices(items: list[SVBTarget], lo: float, hi: float,
                  svd: SVDFn) -> tuple[int, list[tuple[SVBTarget, torch.Tensor]]]:
    """Bounded values of every ``as_matrix`` of the weights, one ``svd`` call per (m, n, dtype,
    device); returns the number of matrices and ``(target, new weight)`` for each weight that
    changes (nothing is written here).

    Grouping by the matrix shape (not the weight shape) merges e.g. a Linear (64, 576) with
    a Conv (64, 64, 3, 3), so the number of calls is at most the number of distinct
    (weight shape, dtype, device) groups.
    """
    groups: dict[tuple, list[SVBTarget]] = {}
    for t in items:
        mats = _matrices(t)
        key = (tuple(mats.shape[-2:]), t.weight.dtype, t.weight.device)
        groups.setdefault(key, []).append(t)
    count, updates = 0, []
    for key, members in groups.items():
        stacks = [_matrices(t).reshape(-1, *key[0]) for t in members]
        X = torch.cat(stacks).to(compute_dtype(key[1]))
        Y, inside = _bound(X, lo, hi, svd)
        sizes = [s.shape[0] for s in stacks]
        # which weights change at all: one host sync per group (not per weight); an unchanged
        # weight is not written, so a parametrization whose weight is already in the band is
        # left alone
        changed = torch.stack([~kept.all() for kept in inside.split(sizes)]).tolist()
        for t, part, change in zip(members, Y.to(key[1]).split(sizes), changed):
            if change:
                updates.append((t, _from_matrices(t, part)))
        count += X.shape[0]
    return count, updates


def _size_for(target: SVBTarget, input_size: InputSize | None) -> tuple[int, ...]:
    """The spatial input size of one conv weight for the operator branch, as a tuple of
    ``weight.dim() − 2`` ints (an int stands for the same size along every spatial dim); a
    dict is looked up by the weight tensor, then by the conv module."""
    weight = target.weight
    if input_size is None:
        raise ValueError(
            f"svb_: operator=True needs input_size= (the spatial size of the conv's input, a ConvTranspose's "
            f"output: an int, a tuple of {weight.dim() - 2} ints, or a dict weight or module -> size) for the conv "
            f"weight of layer "
            f"{target.layer!r}, shape {tuple(weight.shape)}")
    if isinstance(input_size, Mapping):
        key = weight if weight in input_size else target.module
        if key is None or key not in input_size:
            raise ValueError(f"svb_: input_size has no entry for the conv weight of layer {target.layer!r}, shape "
                             f"{tuple(weight.shape)} (keys: the weight tensor or the conv module)")
        input_size = input_size[key]
    if isinstance(input_size, int):
        return (input_size,) * (weight.dim() - 2)
    return tuple(input_size)


def _svb_operators(convs: list[tuple[SVBTarget, tuple[int, ...]]], lo: float, hi: float,
                   clip: Callable | None = None) -> tuple[int, list[tuple[SVBTarget, torch.Tensor]]]:
    """Bounded values of each conv *operator* (docs/conv.md#conv_singular_values, Sedghi et al.); returns the number
    of blocks and ``(target, new weight)`` per conv (nothing is written here).

    ``convs`` holds ``(target, input_size)``. A grouped conv is block diagonal over its
    groups, so each group's kernel slice ``(out/g, in/g, *k)`` is clipped on its own.
    Exact for circular padding and stride 1; the truncation to the kernel support makes the
    result an approximate projection.

    A ConvTranspose weight ``(in, out/g, *k)`` is clipped as it stands, as the conv weight of the
    conv ``T`` whose adjoint the layer is (its groups are the chunks of dim 0 too), on ``T``'s input
    size (the transposed conv's output size): the circular ``Tᵀ`` has ``T``'s singular values, and
    ``T' = U clamp(S) Vᴴ`` per frequency gives ``T'ᵀ = V clamp(S) Uᴴ``, so clipping ``T`` is
    clipping ``Tᵀ`` (docs/svd.md#svb_).
    """
    if clip is None:
        clip = clip_conv_singular_values

    updates = []
    for t, size in convs:
        blocks = [clip(block, size, lo, hi)[0] for block in t.weight.chunk(t.groups, dim=0)]
        updates.append((t, torch.cat(blocks).to(t.weight.dtype)))
    return sum(t.groups for t, _ in convs), updates


def _write_all(updates: list[tuple[SVBTarget, torch.Tensor]]) -> None:
    """Write every new weight; all or nothing.

    The writes through a parametrization's ``right_inverse`` go first and are checked: the
    layer's effective weight must come back as the bounded one (to √eps of the dtype,
    relative) — a right_inverse is only a right inverse on the parametrization's image, and a
    bounded weight outside it (say an ``orthogonal`` parametrization given a non-orthogonal
    matrix) would be stored as something else. On a mismatch or an error every
    parametrization is restored and a RuntimeError names the layer. Plain copies cannot fail
    and come last.
    """
    param = [(t, new) for t, new in updates
             if t.module is not None and parametrize.is_parametrized(t.module, "weight")]
    rest = [(t, new) for t, new in updates if not any(t is p for p, _ in param)]
    saved = [{k: v.detach().clone() for k, v in t.module.parametrizations["weight"].state_dict().items()}
             for t, _ in param]
    try:
        for t, new in param:
            t.write(new)
            eff = t.module.weight
            tol = torch.finfo(new.dtype).eps ** 0.5
            err = (eff.double() - new.double()).norm() / new.double().norm().clamp_min(torch.finfo(torch.float64).tiny)
            if not bool(err <= tol):
                raise RuntimeError(
                    f"svb_: layer {t.layer!r}: its weight parametrization's right_inverse does not reproduce the "
                    f"bounded weight (relative error {float(err):.3g}), i.e. the bounded weight is outside what the "
                    "parametrization can represent; no weight was changed")
    except Exception:
        for (t, _), state in zip(param, saved):
            live = t.module.parametrizations["weight"].state_dict(keep_vars=True)
            for k, v in state.items():
                live[k].data = v
        raise
    for t, new in rest:
        t.write(new)


# ---------------------------------------------------------------------------------------
# svb_(..., bn=...): bounding the scales of BatchNorm layers (Jia et al.'s bounded BN)
# ---------------------------------------------------------------------------------------

# Norm layers whose per-channel scale ``svb_(..., bn=...)`` bounds. SyncBatchNorm is the same
# function with statistics reduced across processes. The Lazy BatchNorms are not listed: they
# have no parameters before their first forward, after which they are BatchNorm1d/2d/3d.
BN_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

BNChoice = Union[bool, Iterable[Union[str, nn.Module]]]


def _bn_name(name: str, mod: nn.Module) -> str:
    return name or type(mod).__name__


def _refuse_bn(op: str, layer: str, why: str) -> None:
    raise ValueError(f"{op}: cannot bound the BatchNorm scale of layer {layer!r}: {why}")


def following_bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every BatchNorm (``BN_LAYERS``) that directly follows a layer svb_
    bounds, found from the module order (docs/svd.md#batchnorm-scales-bn):

    for each ``nn.Linear`` / ``nn.Conv1d/2d/3d`` / ``nn.ConvTranspose1d/2d/3d`` in
    ``model.named_modules()``, the next module in that order that is not one of the layer's own
    submodules (a parametrization) is taken if it
    is a BatchNorm whose ``num_features`` equals the layer's ``out_features`` / ``out_channels``.
    Containers count as modules, so a conv that ends one ``nn.Sequential`` is followed by the next
    container, not by that container's first child. Module order is registration order, not data
    flow: ``bn=[names]`` overrides it. BatchNorms without ``affine`` are included here (svb_ leaves
    them alone); each module once, in model order.
    """
    mods = list(model.named_modules())  # each module once, at its first name
    found, seen = [], set()
    with torch.no_grad():  # a parametrized layer's weight is computed on access
        for i, (name, mod) in enumerate(mods):
            if not name or not isinstance(mod, SVB_LAYERS) or not isinstance(mod.weight, torch.Tensor):
                continue  # the root module has no "next" module: all others are its submodules
            j, own = i + 1, name + "."
            while j < len(mods) and mods[j][0].startswith(own):  # its own submodules come right after it
                j += 1
            if j == len(mods):
                continue
            bn_name, bn = mods[j]
            width = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            if isinstance(bn, BN_LAYERS) and bn.num_features == width and id(bn) not in seen:
                seen.add(id(bn))
                found.append((bn_name, bn))
    return found


def _check_bn_layer(op: str, layer: str, mod: nn.Module) -> None:
    """Refuse (ValueError naming the layer) a BatchNorm whose scale bn= cannot bound."""
    if mod.weight is None:
        _refuse_bn(op, layer, "it has no γ (affine=False): its scale 1/sqrt(running_var + eps) is set by the "
                              "statistics alone, which svb_ does not change; leave it out of bn=[...]")
    if mod.running_var is None:
        _refuse_bn(op, layer, "it keeps no running statistics (track_running_stats=False), so its scale "
                              "γ/sqrt(var + eps) uses each batch's own variance and no parameter bounds it; leave "
                              "it out with bn=[names of the others]")
    if parametrize.is_parametrized(mod, "weight"):
        _refuse_bn(op, layer, "its γ (weight) is parametrized, and bn= writes γ in place; remove the "
                              "parametrization or leave the layer out of bn=[...]")
    for what, t in (("γ (weight)", mod.weight), ("running_var", mod.running_var)):
        if _dist.is_dtensor(t) and any(p.is_partial() for p in t.placements):
            _refuse_bn(op, layer, f"its {what} is a DTensor with placements {t.placements}; a Partial tensor "
                                  "holds summands, not pieces: redistribute it to Shard or Replicate placements first")


def select_bn_layers(weights_or_module, bn: BNChoice, op: str = "svb_") -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the BatchNorm layers ``svb_(weights_or_module, eps, bn=bn)`` bounds,
    checked (docs/svd.md#batchnorm-scales-bn).

    ``bn=False``: none. ``bn=True``: ``following_bn_layers`` of the model, without the BatchNorms
    that have no γ (``affine=False``, left alone). A list (any iterable) of module names, as
    ``model.named_modules()`` spells them, or of the BatchNorm modules themselves: exactly those.
    Raises TypeError for a ``bn`` of another form or a ``weights_or_module`` that is not a module,
    ValueError naming the layer for a name or module that is not a BatchNorm of the model or
    whose scale cannot be bounded (no γ when named, no running statistics, a parametrized γ, a
    Partial DTensor), and for two selected layers sharing one γ.
    """
    if isinstance(bn, bool):
        if not bn:
            return []
    elif isinstance(bn, (str, bytes)) or not isinstance(bn, Iterable):
        raise TypeError(f"{op}: bn must be a bool or a list of BatchNorm module names (or modules) of the model; "
                        f"got {type(bn).__name__}")
    if not isinstance(weights_or_module, nn.Module):
        raise TypeError(f"{op}: bn= needs weights_or_module to be an nn.Module (its BatchNorm layers are found in "
                        f"it); got {type(weights_or_module).__name__}")
    model = weights_or_module
    if bn is True:
        chosen = [(n, m) for n, m in following_bn_layers(model) if m.weight is not None]
    else:
        # every name of a module registered twice, but one name per module in messages
        by_name = dict(model.named_modules(remove_duplicate=False))
        by_id = {id(m): n for n, m in model.named_modules()}
        chosen, seen = [], set()
        for item in bn:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"{op}: bn names {item!r}, which is not a module of the model (names as "
                                     "model.named_modules() spells them)")
                name, mod = item, by_name[item]
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(f"{op}: bn holds a {type(item).__name__} that is not a module of the model")
                name, mod = by_id[id(item)], item
            else:
                raise TypeError(f"{op}: bn must be a bool or a list of BatchNorm module names (or modules) of the "
                                f"model; got an element of type {type(item).__name__}")
            if not isinstance(mod, BN_LAYERS):
                raise ValueError(f"{op}: bn names layer {_bn_name(name, mod)!r}, a {type(mod).__name__}, not a "
                                 "BatchNorm1d/2d/3d or SyncBatchNorm")
            if id(mod) not in seen:
                seen.add(id(mod))
                chosen.append((name, mod))
    owner: dict[int, str] = {}
    for name, mod in chosen:
        layer = _bn_name(name, mod)
        _check_bn_layer(op, layer, mod)
        if id(mod.weight) in owner:
            raise ValueError(f"{op}: BatchNorm layers {owner[id(mod.weight)]!r} and {layer!r} share one γ (weight), "
                             "whose bounded values would differ; bound at most one of them")
        owner[id(mod.weight)] = layer
    return chosen


def _bound_bn_scales(gammas: list[torch.Tensor], variances: list[torch.Tensor], bn_eps: list[float],
                     lo: float, hi: float, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[bool]]:
    """New γ of each BatchNorm (in ``dtype``) and whether it changes (docs/svd.md#batchnorm-scales-bn).

    Per layer, with ``s_c = γ_c / sqrt(running_var_c + eps_bn)`` and ``m = mean_c |s_c|``:
    ``γ_c ← sign(γ_c) · clamp(|s_c|, lo·m, hi·m) · sqrt(running_var_c + eps_bn)``, sign(0) = +1.
    A channel already inside the band (up to a relative slack of 4 rounding units) keeps its
    bits. A layer with a non-finite γ or running_var, a running_var + eps_bn that is not > 0 or
    a non-finite scale or mean gets γ = NaN (that layer only). The layers go through one padded
    ``(layers, max channels)`` batch, so the number of operations does not grow with the layers.
    """
    sizes = [g.numel() for g in gammas]
    G = torch.nn.utils.rnn.pad_sequence([g.reshape(-1).to(dtype) for g in gammas], batch_first=True)
    V = torch.nn.utils.rnn.pad_sequence([v.reshape(-1).to(dtype) for v in variances], batch_first=True,
                                        padding_value=1.0)
    n = torch.tensor(sizes, device=G.device)
    mask = torch.arange(G.shape[1], device=G.device) < n[:, None]
    std = (V + torch.tensor(bn_eps, dtype=dtype, device=G.device)[:, None]).sqrt()
    s = G / std
    a = s.abs()
    valid = (torch.isfinite(G) & torch.isfinite(std) & (std > 0) & torch.isfinite(s)) | ~mask
    m = torch.where(mask, a, 0).sum(dim=1, keepdim=True) / n[:, None].clamp_min(1)
    ok = valid.all(dim=1, keepdim=True) & torch.isfinite(m)
    lo_c, hi_c = m * lo, m * hi
    slack = 4 * torch.finfo(dtype).eps
    inside = (a >= lo_c * (1 - slack)) & (a <= hi_c * (1 + slack))
    sign = torch.where(G < 0, -1.0, 1.0).to(dtype)
    bounded = sign * torch.minimum(torch.maximum(a, lo_c), hi_c) * std
    new = torch.where(ok, torch.where(inside, G, bounded), torch.nan)
    changed = ((~(inside & ok)) & mask).any(dim=1).tolist()  # the one host sync
    return [new[i, :k] for i, k in enumerate(sizes)], changed


def _bn_updates(chosen: list[tuple[str, nn.Module]], lo: float, hi: float) -> list[tuple[Callable, torch.Tensor]]:
    """``(write, new γ)`` for each selected BatchNorm whose γ changes (nothing is written here).

    DTensor γ / running_var (FSDP2 shards BatchNorm parameters too) are gathered first (``gather``:
    one collective per bucket, every rank computes the same values) and each rank writes its own
    piece (``distribute_tensor`` without communication)."""
    if not chosen:
        return []
    tensors = [m.weight for _, m in chosen] + [m.running_var for _, m in chosen]
    full = _dist.gather(tensors)
    gammas, variances = full[:len(chosen)], full[len(chosen):]
    groups: dict[tuple, list[int]] = {}
    for i, (g, v) in enumerate(zip(gammas, variances)):
        dtype = torch.promote_types(compute_dtype(g.dtype), compute_dtype(v.dtype))
        groups.setdefault((dtype, g.device), []).append(i)
    updates = []
    for (dtype, _), idx in groups.items():
        new, changed = _bound_bn_scales([gammas[i] for i in idx], [variances[i] for i in idx],
                                        [float(chosen[i][1].eps) for i in idx], lo, hi, dtype)
        for i, value, change in zip(idx, new, changed):
            if change:
                gamma = chosen[i][1].weight
                write = _dist._write_piece(gamma) if _dist.is_dtensor(gamma) else gamma.copy_
                updates.append((write, value.to(gamma.dtype).reshape(gamma.shape)))
    return updates


def svb_(weights_or_module: nn.Module | torch.Tensor | Iterable[torch.Tensor], eps: float, *,
         operator: bool = False, input_size: InputSize | None = None, svd: SVDFn | None = None,
         clip: Callable | None = None, bn: BNChoice = False) -> int:
    """Hard singular value bounding, in place (formula: docs/svd.md#svb_, Jia et al.).

    ``W ← U · clamp(S, 1/(1+eps), 1+eps) · Vh`` for ``as_matrix(W) = U diag(S) Vh``,
    reshaped back into W, under ``torch.no_grad()`` (biases are never touched).

    ``weights_or_module``: an ``nn.Module`` (every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and
    ``nn.ConvTranspose1d/2d/3d`` weight in it, grouped convs per group, tied weights once; a
    ConvTranspose's matrices are ``as_matrix(W, groups, transposed=True)``), a single weight tensor, or
    an iterable of weight tensors (taken with groups = 1). Matrices of the same
    (m, n, dtype, device) go through ONE call of ``svd`` (default: ``batched_svd`` of this
    module); fp16/bf16 weights are decomposed in float32. Matrices already inside the band
    (up to a relative rounding slack of max(m, n)·eps) are left bit-for-bit unchanged, so
    a second call right after a first changes nothing.

    Parametrized layers are bounded through their parametrization: the layer's effective
    weight is projected and written back with ``module.weight = new`` (``right_inverse``;
    hook-based ``weight_norm``: ``weight_v``, ``weight_g``), so afterwards the effective
    weight has its singular values in the band. A weight that cannot be written back that
    way (no ``right_inverse``, ``spectral_norm``, a non-Parameter weight, a computed tensor
    passed directly) is refused with a ValueError naming the layer. All-or-nothing: every
    new value is computed first, and an error leaves every weight unchanged.

    ``operator=True`` bounds each conv weight's operator instead (docs/conv.md#conv_singular_values), which needs
    ``input_size``: an int or tuple of spatial sizes used for every conv, or a dict from
    weight tensor or conv module to its size (for a ConvTranspose: its OUTPUT size, the input
    size of the conv whose adjoint it is, ``_svb_operators``); Linear weights are bounded as matrices either
    way. ``clip`` is the ``clip_conv_singular_values(weight, size, lo, hi)`` to use (default:
    the reference).

    ``bn`` (docs/svd.md#batchnorm-scales-bn): ``True`` also bounds the scales of the BatchNorm
    layers that directly follow a bounded layer in module order (``following_bn_layers``), a list
    of BatchNorm names or modules bounds exactly those: with ``s_c = γ_c / sqrt(running_var_c +
    eps_bn)`` and ``m = mean_c |s_c|``, ``γ_c ← sign(γ_c) · clamp(|s_c|, m/(1+eps), m·(1+eps)) ·
    sqrt(running_var_c + eps_bn)`` (a band relative to the layer's mean scale, as Jia et al.'s
    bounded BN); β and the running statistics are not touched. These values are computed before
    any weight is written and written last.

    Returns the number of matrices projected (a grouped conv counts once per group, an
    operator-bounded conv once per group as well; BatchNorm layers are not counted).
    """
    lo, hi = 1.0 / (1.0 + eps), 1.0 + eps
    svd = svd if svd is not None else batched_svd

    def run(items: list[SVBTarget]) -> tuple[int, list[tuple[SVBTarget, torch.Tensor]]]:
        if not operator:
            return _svb_matrices(items, lo, hi, svd)
        convs = [(t, _size_for(t, input_size)) for t in items if t.weight.dim() > 2]
        mats = [t for t in items if t.weight.dim() == 2]
        n_ops, op_updates = _svb_operators(convs, lo, hi, clip) if convs else (0, [])
        n_mats, updates = _svb_matrices(mats, lo, hi, svd)
        return n_ops + n_mats, op_updates + updates

    with torch.no_grad():
        items = collect_svb_weights(weights_or_module)
        # the BatchNorm scales first: their new values depend on γ and the running variance only
        bn_updates = _bn_updates(select_bn_layers(weights_or_module, bn), lo, hi)
        # every new value is computed before any weight is written, so an error in any of
        # them leaves all weights as they were (sharded weights too: svb_sharded returns their
        # local pieces as updates)
        if _dist.any_dtensor(t.weight for t in items):
            count, updates = _dist.svb_sharded(items, run, operator, lambda t: _size_for(t, input_size))
        else:
            count, updates = run(items)
        _write_all(updates)
        for write, value in bn_updates:  # plain in-place copies: nothing left that can fail
            write(value)
    return count
