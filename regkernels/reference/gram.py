"""Pure-torch references for the Gram-matrix penalties (docs/gram.md).

These functions are the test oracle, the fallback for devices without a kernel and
the benchmark baseline, so they are written to be read next to docs/gram.md: one formula
per function, autograd through plain torch ops (the gradients are exact).

Conventions shared by every function here:

* ``W`` has shape ``(..., m, n)``; rows are filters / output units. Every op is applied
  to each matrix of the batch and the result has shape ``(...)``.
* ``Gram(W, side)``: ``"rows"`` → ``W Wᵀ`` (m×m), ``"cols"`` → ``Wᵀ W`` (n×n),
  ``"auto"`` → the smaller one (``Wᵀ W`` when m ≥ n), size ``k = min(m, n)``.
* float32 / float64 are computed natively. float16 / bfloat16 are computed in float32
  (Gram sums of hundreds of products overflow or lose all precision in half types)
  and the result is returned in the input dtype; gradients flow through the casts.
* ``|x|`` is ``torch.abs``, whose subgradient is ``sign(x)`` with ``sign(0) = 0``; ``√x`` at
  ``x = 0`` has the subgradient 0 (``sqrt0``).
* NaN/Inf (docs/index.md#numerical-behaviour): a matrix with a NaN or Inf entry, or whose Gram overflows the compute
  dtype, gives a NaN value (``+inf`` where the formula is +∞) and a non-finite gradient for
  that matrix only; nothing is clamped or dropped.
* Memory: the functions that form a dense k×k Gram refuse, with a ``ValueError`` naming the
  size before allocating, a Gram stack over ``MAX_GRAM_BYTES`` (``check_gram_bytes``).

No argument checking happens here beyond what the formulas need; the public ops in
``regkernels.ops.gram`` validate their inputs and then call these functions.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from regkernels._dtypes import upcast
from regkernels._numerics import pow2_scale

__all__ = [
    "MAX_GRAM_BYTES", "check_gram_bytes", "sqrt0",
    "as_matrix", "transposed_as_conv", "conv_as_transposed", "gram", "frame_penalty", "gershgorin_bounds",
    "frame_bounds", "diversity_penalty",
    "orthogonality_penalty", "mhe_penalty", "srip_penalty", "penalty_multi", "PENALTY_KINDS",
    "GRAM_KINDS", "gram_side", "penalty_from_gram",
]

# DiReAL normalises rows as F.normalize does: w / max(‖w‖₂, 1e-12) (docs/gram.md#diversity_penalty).
_NORMALIZE_EPS = 1e-12

# Largest dense Gram stack (batch · k² entries in the compute dtype, float32 or float64) that the
# reference and the CPU kernel form, in bytes: 2 GiB, as the dense conv matrices
# (regkernels.reference.conv.MAX_DENSE_BYTES). Their working memory is a small multiple of it (the
# kernel keeps the stack for the backward; the reference's autograd saves a few k×k tensors).
MAX_GRAM_BYTES = 2**31


def check_gram_bytes(op: str, what: str, batch: int, k: int, dtype: torch.dtype, advice: str) -> None:
    """Refuse (``ValueError``, before allocating) a Gram stack ``(batch, k, k)`` over ``MAX_GRAM_BYTES``.

    ``dtype`` is the input's; half types count as float32, the compute dtype. ``what`` names the
    argument and the Gram in the message, ``advice`` says what would fit.
    """
    itemsize = 8 if dtype == torch.float64 else 4
    nbytes = batch * k * k * itemsize
    if nbytes > MAX_GRAM_BYTES:
        grams = f"a dense {k}×{k} Gram matrix" if batch == 1 else f"{batch} dense {k}×{k} Gram matrices"
        raise ValueError(f"{op}: {what} needs {grams}: {nbytes} bytes ({nbytes / 2**30:.2f} GiB), over the limit "
                         f"MAX_GRAM_BYTES = {MAX_GRAM_BYTES} ({MAX_GRAM_BYTES / 2**30:.0f} GiB) of the reference and "
                         f"the CPU kernel; {advice}")


ADVICE_SIDE = ("side='auto' forms the smaller Gram (k = min(m, n)); otherwise split the batch, or use the "
               "Triton kernel (backend='triton', CUDA tensors), which never holds the k×k Gram")
ADVICE_ROWS = ("the penalty pairs all m rows (k = m): only fewer rows or a split batch fit, or the Triton "
               "kernel (backend='triton', CUDA tensors), which never holds the k×k Gram")


def _gram_guard(op: str, W: torch.Tensor, k: int, advice: str) -> None:
    check_gram_bytes(op, f"W of shape {tuple(W.shape)}", math.prod(W.shape[:-2]), k, W.dtype, advice)


def _gram_k(W: torch.Tensor, side: str) -> int:
    return W.shape[-2] if resolve_side(W, side) == "rows" else W.shape[-1]


class _Sqrt0(torch.autograd.Function):
    """``√x`` (x ≥ 0) with the derivative ``1/(2√x)`` except at the two ends of its range:

    * ``x = 0``: the subgradient 0, not ``inf · 0 = NaN`` (docs/index.md#numerical-behaviour);
    * ``x = +inf``: NaN, not 0. A sum of squares that overflowed is not a stationary point, and
      ``√``'s true derivative 0 there would hand the optimizer a silent zero gradient.

    NaN stays NaN. The backward is made of torch ops, so it differentiates again, and vmaps
    (the generated rule).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        zero = x == 0
        return torch.where(zero, 0.0, torch.where(zero, 1.0, x).sqrt())

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        zero = x == 0
        inner = 0.5 / torch.where(zero, 1.0, x).sqrt()
        slope = torch.where(zero, 0.0, torch.where(torch.isinf(x), torch.nan, inner))
        return grad * slope


def sqrt0(x: torch.Tensor) -> torch.Tensor:
    """``√x`` with the subgradient 0 at ``x = 0`` and a NaN derivative at ``x = +inf`` (``_Sqrt0``)."""
    return _Sqrt0.apply(x)


def frobenius0(E: torch.Tensor) -> torch.Tensor:
    """``‖E‖_F`` over the last two dims, with ``sqrt0``'s derivative, and no overflow of the sum of
    squares while the norm itself is finite.

    ``‖E‖ = s·‖E/s‖`` for any constant ``s > 0``; ``s = pow2_scale(max|E|)`` (detached: the
    identity holds for every ``s``, so the gradient is exactly ``E/‖E‖``) keeps every ``(E/s)²``
    at most 4, and dividing by a power of two is exact. ``s = 1`` where ``E`` is zero or
    non-finite (the NaN / Inf then reach the value unchanged).
    """
    s = pow2_scale(E.detach().abs().amax((-2, -1)) if E.numel() else E.new_zeros(E.shape[:-2]))
    return s * sqrt0((E / s[..., None, None]).square().sum((-2, -1)))


def resolve_side(W: torch.Tensor, side: str) -> str:
    """``"auto"`` → ``"cols"`` (Wᵀ W) when m ≥ n, else ``"rows"`` (W Wᵀ): the k×k Gram, k = min(m, n)."""
    if side != "auto":
        return side
    m, n = W.shape[-2:]
    return "cols" if m >= n else "rows"


def as_matrix(weight: torch.Tensor, groups: int = 1, transposed: bool = False) -> torch.Tensor:
    """A layer weight as the matrix (or per-group matrices) the penalties act on (docs/gram.md#as_matrix).

    Linear ``(out, in)`` is returned unchanged. Conv ``(out, in/g, *kernel)`` becomes
    ``(g, out/g, in/g · prod(kernel))``, one matrix per group with the filters as rows;
    for ``groups == 1`` the group dim is dropped: ``(out, in · prod(kernel))``.
    The result is a view of ``weight`` whenever ``reshape`` can make one.

    ``transposed=True``: ``weight`` is a ConvTranspose weight ``(in, out/g, *kernel)``; the
    result is ``as_matrix(transposed_as_conv(weight, groups), groups)``, rows = the transposed
    conv's output channels (a copy: the channel dims are swapped).
    """
    if transposed:
        return as_matrix(transposed_as_conv(weight, groups), groups)
    if weight.dim() <= 2:
        return weight
    out = weight.shape[0]
    if groups == 1:
        return weight.reshape(out, -1)
    # torch convs store output channels group-major: group i owns out/g consecutive filters
    return weight.reshape(groups, out // groups, -1)


def transposed_as_conv(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A ConvTranspose weight ``(in, out/g, *k)`` in conv layout ``(out, in/g, *k)`` (docs/gram.md#as_matrix).

    ``result[i·out/g + o, c] = weight[i·in/g + c, o]`` for group ``i``: row ``o`` of group ``i``
    holds what output channel ``o`` of the transposed conv reads from group ``i``'s ``in/g`` input
    channels, over the taps in their stored order. The equivalent stride-1 conv of the transposed
    conv has these filters with every tap flipped; a flip permutes the columns of the
    as-matrix, which leaves its singular values, row Gram and every penalty of docs/gram.md unchanged,
    so no flip is made. Inverse: ``conv_as_transposed``.
    """
    cin, per = weight.shape[0], weight.shape[1]
    kernel = weight.shape[2:]
    return (weight.reshape(groups, cin // groups, per, *kernel).transpose(1, 2)
            .reshape(groups * per, cin // groups, *kernel))


def conv_as_transposed(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The inverse of ``transposed_as_conv``: ``(out, in/g, *k)`` back to the ConvTranspose layout
    ``(in, out/g, *k)``."""
    out, per = weight.shape[0], weight.shape[1]
    kernel = weight.shape[2:]
    return (weight.reshape(groups, out // groups, per, *kernel).transpose(1, 2)
            .reshape(groups * per, out // groups, *kernel))


def gram(W: torch.Tensor, side: str = "auto") -> torch.Tensor:
    """``Gram(W, side)``: ``(..., m, n)`` → ``(..., m, m)`` for "rows", ``(..., n, n)`` for "cols".

    ``"auto"`` picks the k×k one, ``k = min(m, n)`` (``Wᵀ W`` when m ≥ n).
    """
    if resolve_side(W, side) == "rows":
        return W @ W.mT
    return W.mT @ W


def _diag_and_radius(W: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal ``d_i = V_ii`` and Gershgorin radius ``r_i = Σ_{j≠i} |V_ij|`` of ``V = Gram(W, side)``.

    ``W (..., m, n)`` → two ``(..., k)`` tensors. ``d_i`` is computed as the squared norm
    of row i ("rows") or column i ("cols") of W, the same number as ``V_ii``: under
    torch.compile (inductor, torch 2.14, CPU) the backward of ``V.diagonal()`` feeding the
    hinges was miscompiled at some shapes (2 % gradient error at 64×576). The diagonal
    is masked out of ``r`` rather than subtracted (``Σ_j |V_ij| − |V_ii|``) so that a
    large diagonal does not cancel the radius's low bits.
    """
    V = gram(W, side)
    d = W.square().sum(-1) if resolve_side(W, side) == "rows" else W.square().sum(-2)
    eye = torch.eye(V.shape[-1], dtype=torch.bool, device=V.device)
    r = V.abs().masked_fill(eye, 0).sum(-1)
    return d, r


def frame_penalty(W: torch.Tensor, A: float, B: float, side: str = "auto") -> torch.Tensor:
    """Frame regularizer (docs/gram.md#frame_penalty): ``(..., m, n)`` → ``(...)``.

    With ``V = Gram(W, side)`` (k×k), ``d_i = V_ii`` and ``r_i = Σ_{j≠i} |V_ij|``::

        R(W) = (1/k) Σ_i  max(0, A − (d_i − r_i))² + max(0, (d_i + r_i) − B)²

    Zero certifies ``A ≤ λ(V) ≤ B`` (``V − A·I`` and ``B·I − V`` diagonally dominant).
    """
    # formula: docs/gram.md#frame_penalty
    _gram_guard("frame_penalty", W, _gram_k(W, side), ADVICE_SIDE)
    d, r = _diag_and_radius(upcast(W), side)
    lower = torch.relu(A - (d - r)).square()
    upper = torch.relu((d + r) - B).square()
    return (lower + upper).mean(-1).to(W.dtype)


def gershgorin_bounds(W: torch.Tensor, side: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Gershgorin enclosure of the eigenvalues of ``Gram(W, side)`` (docs/gram.md#frame_penalty companion).

    Returns ``(lo, hi)``, each of shape ``W.shape[:-2]``::

        lo = min_i (d_i − r_i),   hi = max_i (d_i + r_i)
    """
    # formula: docs/gram.md#frame_penalty (companion)
    d, r = _diag_and_radius(upcast(W), side)
    return (d - r).amin(-1).to(W.dtype), (d + r).amax(-1).to(W.dtype)


def frame_bounds(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact frame bounds ``(σ_min², σ_max²)`` of ``W``, each of shape ``W.shape[:-2]``.

    ``σ`` are the ``k = min(m, n)`` singular values (``torch.linalg.svdvals``, descending),
    so these are the extreme eigenvalues of the k×k Gram ``Gram(W, "auto")``. A matrix
    holding NaN/Inf gives NaN for both bounds, that matrix only (docs/index.md#numerical-behaviour).
    """
    # formula: docs/gram.md#frame_penalty (companion). LAPACK fails the whole batch on a NaN matrix
    # ("failed to converge"), so non-finite matrices are decomposed as zeros and their
    # bounds overwritten with NaN; torch.where keeps the function differentiable.
    Wc = upcast(W)
    finite = torch.isfinite(Wc).all(dim=-1).all(dim=-1)  # (...)
    s = torch.linalg.svdvals(torch.where(finite[..., None, None], Wc, torch.zeros_like(Wc)))
    nan = float("nan")
    lo, hi = torch.where(finite, s[..., -1], nan), torch.where(finite, s[..., 0], nan)
    return lo.square().to(W.dtype), hi.square().to(W.dtype)


def diversity_penalty(W: torch.Tensor, tau: float, inclusive: bool = True) -> torch.Tensor:
    """DiReAL filter-diversity penalty (docs/gram.md#diversity_penalty): ``(..., m, n)`` → ``(...)``.

    Rows only. ``ŵ_i = w_i / max(‖w_i‖₂, 1e-12)``, ``C = Ŵ Ŵᵀ``::

        mask_ij = [i ≠ j] · [|C_ij| ≥ tau]          (inclusive=False: |C_ij| > tau)
        R(W)    = ½ Σ_{i,j} mask_ij · C_ij²         (the sum over unordered pairs)

    The mask is a constant for autograd.
    """
    _gram_guard("diversity_penalty", W, W.shape[-2], ADVICE_ROWS)
    # formula: docs/gram.md#diversity_penalty. F.normalize's norm overflows for finite huge rows (‖w‖² > the dtype's
    # max) and w / inf = 0 would then report them as orthogonal to everything: such a norm is NaN,
    # as in the kernels, which form C from the Gram of W. NaN cosines are kept: C² · mask is NaN
    # wherever C is (NaN · 0), though the mask (|C| ≥ tau) is false there.
    X = upcast(W)
    nrm = torch.linalg.vector_norm(X, dim=-1, keepdim=True)
    nrm = torch.where(nrm.isinf(), torch.nan, nrm).clamp_min(_NORMALIZE_EPS)
    Wn = X / nrm
    C = Wn @ Wn.mT
    a = C.detach().abs()
    over = a >= tau if inclusive else a > tau
    eye = torch.eye(C.shape[-1], dtype=torch.bool, device=C.device)
    mask = over & ~eye
    return (0.5 * (C.square() * mask).sum((-2, -1))).to(W.dtype)


def orthogonality_penalty(W: torch.Tensor, side: str = "auto", squared: bool = True) -> torch.Tensor:
    """Soft orthogonality (docs/gram.md#orthogonality_penalty): ``(..., m, n)`` → ``(...)``.

    ``R(W) = ‖Gram(W, side) − I‖_F²``; ``squared=False`` returns ``‖Gram(W, side) − I‖_F``.
    With ``side="cols"`` on a wide matrix (m < n) the rank of ``Wᵀ W`` is at most m < n,
    so the penalty can never reach zero; ``"auto"`` uses the k×k Gram. ``squared=False`` at
    ``Gram(W, side) = I`` has the subgradient 0.
    """
    # formula: docs/gram.md#orthogonality_penalty
    _gram_guard("orthogonality_penalty", W, _gram_k(W, side), ADVICE_SIDE)
    V = gram(upcast(W), side)
    eye = torch.eye(V.shape[-1], dtype=V.dtype, device=V.device)
    E = V - eye
    return (E.square().sum((-2, -1)) if squared else frobenius0(E)).to(W.dtype)


def mhe_penalty(W: torch.Tensor, s: int = 2, half: bool = False, eps: float = 1e-4,
                angular: bool = False) -> torch.Tensor:
    """Minimum hyperspherical energy (docs/gram.md#mhe_penalty): ``(..., m, n)`` → ``(...)``.

    Rows ``w_i`` (``half=True``: the 2m rows ``[W; −W]``), ``ν_i = sqrt(‖w_i‖² + eps)``::

        cos_ij = w_i·w_j / (ν_i ν_j),   δ_ij = 2 − 2·cos_ij
        e_ij   = −log δ_ij (s=0),  δ_ij^(−1/2) (s=1),  δ_ij^(−1) (s=2)
        R(W)   = mean of e_ij over the unordered pairs i < j

    ``angular=True`` (docs/gram.md#angular-energies): ``a_ij = arccos(cos_ij)/π + eps`` and
    ``e_ij = −log a_ij (s=0), a_ij^(−1) (s=1), a_ij^(−2) (s=2)``.

    Duplicate filters have ``δ = 2·eps / (‖w‖² + eps)``, which rounds to exactly 0 once
    ``‖w‖² ≫ eps``; the energy is then ``+inf`` (s = 0: ``-log 0``). This is not clamped.
    """
    # formula: docs/gram.md#mhe_penalty
    _gram_guard("mhe_penalty", W, 2 * W.shape[-2] if half else W.shape[-2], ADVICE_ROWS)
    if angular:
        return _mhe_angular(W, s, half, eps)
    X = upcast(W)
    if half:
        X = torch.cat([X, -X], dim=-2)
    p = X.shape[-2]
    nu = _mhe_nu(X, eps)
    cos = (X @ X.mT) / (nu[..., :, None] * nu[..., None, :])
    i, j = torch.triu_indices(p, p, offset=1, device=X.device)
    delta = 2 - 2 * cos[..., i, j]  # (..., p(p−1)/2), the pairs i < j
    if s == 0:
        energy = -torch.log(delta)
    elif s == 1:
        energy = torch.rsqrt(delta)
    else:
        energy = torch.reciprocal(delta)
    return energy.mean(-1).to(W.dtype)


def _mhe_nu(X: torch.Tensor, eps: float) -> torch.Tensor:
    """``ν_i = sqrt(‖x_i‖² + eps)`` of the rows of X; NaN where it overflows."""
    nu = (X.square().sum(-1) + eps).sqrt()
    # a row whose squared norm overflows (finite huge entries) would have cos = finite/inf = 0
    # against every normal row, silently: its ν is NaN (as the kernels do)
    return torch.where(nu.isinf(), torch.nan, nu)


def mhe_angle_energy(a: torch.Tensor, s: int) -> torch.Tensor:
    """The angular energy of the offset normalised angle ``a``: −log a, 1/a, 1/a² (s = 0, 1, 2)."""
    return -torch.log(a) if s == 0 else torch.reciprocal(a) if s == 1 else torch.reciprocal(a * a)


def mhe_normalised_angle(cos: torch.Tensor) -> torch.Tensor:
    """``arccos(cos)/π`` with cos rounded into [−1, 1] in value only: the derivative stays
    ``−1/(π·sqrt(1 − cos²))`` of the clamped cos (infinite at ±1), not the clamp's 0
    (docs/gram.md#angular-energies)."""
    clamped = cos - (cos - cos.clamp(-1.0, 1.0)).detach()
    return torch.acos(clamped) / math.pi


def mhe_antipodal_angle(sq: torch.Tensor, eps: float) -> torch.Tensor:
    """``arccos(−‖w‖²/ν²)/π`` of the pair ``(w, −w)`` from ``sq = ‖w‖²`` without cancellation:
    ``1 + cos = eps/ν²``, so the angle is ``1 − (2/π)·asin(sqrt(eps / (2ν²)))``."""
    z = torch.sqrt(eps / (2 * (sq + eps)))
    return 1 - (2 / math.pi) * torch.asin(z)


def _mhe_angular(W: torch.Tensor, s: int, half: bool, eps: float) -> torch.Tensor:
    X = upcast(W)
    return mhe_angular_from_gram(X @ X.mT, s, half, eps).to(W.dtype)


def mhe_angular_from_gram(G: torch.Tensor, s: int, half: bool, eps: float) -> torch.Tensor:
    """Angular MHE from the m×m rows Gram ``G = W Wᵀ`` (docs/gram.md#angular-energies).

    Plain: the mean over ``i < j`` of ``e(a(cos_ij))``. ``half``: the 2m rows ``[W; −W]`` have
    ``m(2m − 1)`` pairs: for ``i < j`` two at ``cos_ij`` and two at ``−cos_ij``, and the m pairs
    ``(w_i, −w_i)``, whose angle comes from ``‖w_i‖²`` alone (``mhe_antipodal_angle``): through
    ``cos = −‖w‖²/ν²`` it would be arccos at −1 within rounding, whose derivative is infinite.
    """
    m = G.shape[-1]
    sq = G.diagonal(dim1=-2, dim2=-1)
    nu = (sq + eps).sqrt()
    # a row whose squared norm overflows (finite huge entries) would have cos = finite/inf = 0
    # against every normal row, and its antipodal angle 1: NaN instead, as the kernels do
    nu = torch.where(nu.isinf(), torch.nan, nu)
    cos = G / (nu[..., :, None] * nu[..., None, :])
    i, j = torch.triu_indices(m, m, offset=1, device=G.device)
    c = cos[..., i, j]
    total = mhe_angle_energy(mhe_normalised_angle(c) + eps, s).sum(-1)
    if not half:
        return total / (m * (m - 1) / 2)
    total = 2 * total + 2 * mhe_angle_energy(mhe_normalised_angle(-c) + eps, s).sum(-1)
    self_a = mhe_antipodal_angle(torch.where(nu.isnan(), torch.nan, sq), eps) + eps
    total = total + mhe_angle_energy(self_a, s).sum(-1)
    return total / (m * (2 * m - 1))


def _gram_minus_identity_times(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``M x`` with ``M = Gram(W, "auto") − I``, matrix-free: ``(..., m, n)``, ``(..., k)`` → ``(..., k)``.

    ``Wᵀ (W x) − x`` when m ≥ n, ``W (Wᵀ x) − x`` otherwise: 4·m·n flops, no k×k Gram.
    """
    col = x.unsqueeze(-1)
    if resolve_side(W, "auto") == "cols":
        return (W.mT @ (W @ col)).squeeze(-1) - x
    return (W @ (W.mT @ col)).squeeze(-1) - x


def power_step_norm(u: torch.Tensor, dim: int) -> torch.Tensor:
    """``‖u‖`` along ``dim`` (keepdim), 1 where it is 0: the divisor of SRIP's ``v = u / ‖u‖``.

    ``u = M b = 0`` happens when ``M = Gram(W) − I`` is 0 (W with orthonormal rows or columns,
    e.g. the identity a layer may be initialised to): the penalty is then 0, a minimum, with
    gradient 0, where ``0 / 0`` would make value and gradient NaN. Dividing by 1 keeps ``v = 0``,
    so ``R = ‖M v‖² = 0``; NaN and Inf still propagate (``NaN > 0`` is false, ``u`` stays NaN).
    """
    n = torch.linalg.vector_norm(u, dim=dim, keepdim=True)
    return torch.where(n > 0, n, torch.ones_like(n))


def srip_penalty(W: torch.Tensor, b: torch.Tensor, n_iter: int = 1) -> torch.Tensor:
    """Spectral restricted isometry penalty (docs/gram.md#srip_penalty): ``(..., m, n)`` → ``(...)``.

    ``M = Gram(W, "auto") − I`` (k×k); ``b`` is the start vector, shape ``(..., k)``
    broadcastable against ``W.shape[:-2]`` (the public op draws ``b ~ U(0,1)^k``)::

        repeat n_iter times:  v = M b / ‖M b‖,  b = v
        R(W) = ‖M v‖²

    Gradients flow through ``v`` (as in the official SRIP code, which does not detach
    the power iteration). ``M x`` is computed matrix-free, never forming the Gram.
    """
    # formula: docs/gram.md#srip_penalty
    X = upcast(W)
    v = b.to(X.dtype)
    for _ in range(n_iter):
        u = _gram_minus_identity_times(X, v)
        v = u / power_step_norm(u, -1)
    return _gram_minus_identity_times(X, v).square().sum(-1).to(W.dtype)


GRAM_KINDS = ("frame", "orthogonality", "diversity", "mhe")


def gram_side(kind: str, m: int, n: int, side: str = "auto") -> str:
    """The Gram of an ``(m, n)`` matrix that penalty ``kind`` (one of ``GRAM_KINDS``) is a function
    of: ``side`` resolved for ``frame`` / ``orthogonality``, the rows' Gram for ``diversity`` / ``mhe``."""
    if kind in ("diversity", "mhe"):
        return "rows"
    return side if side != "auto" else ("cols" if m >= n else "rows")


def penalty_from_gram(kind: str, G: torch.Tensor, **kw) -> torch.Tensor:
    """Penalty ``kind`` of a matrix W given only ``G = Gram(W, gram_side(kind, ...))`` (k×k, in the
    compute dtype), the same formulas as the functions above with ``G`` in place of W's products:
    the squared row / column norms are ``G``'s diagonal, the cosines ``G_ij / (‖w_i‖ ‖w_j‖)``.
    The sharded Gram route (docs/distributed.md#the-gram-route) evaluates layers this way from the
    sum of the ranks' partial Grams. ``kw``: the kind's arguments (``side`` is ignored here)."""
    eye = torch.eye(G.shape[-1], dtype=torch.bool, device=G.device)
    diag = G.diagonal(dim1=-2, dim2=-1)
    if kind == "frame":
        r = G.abs().masked_fill(eye, 0).sum(-1)
        return (torch.relu(kw["A"] - (diag - r)).square() + torch.relu((diag + r) - kw["B"]).square()).mean(-1)
    if kind == "orthogonality":
        E = G - eye.to(G.dtype)
        return E.square().sum((-2, -1)) if kw.get("squared", True) else frobenius0(E)
    if kind == "diversity":
        nrm = sqrt0(diag)
        nrm = torch.where(nrm.isinf(), torch.nan, nrm).clamp_min(_NORMALIZE_EPS)
        C = G / (nrm[..., :, None] * nrm[..., None, :])
        a = C.detach().abs()
        over = a >= kw["tau"] if kw.get("inclusive", True) else a > kw["tau"]
        return 0.5 * (C.square() * (over & ~eye)).sum((-2, -1))
    if kw.get("angular", False):
        return mhe_angular_from_gram(G, kw.get("s", 2), kw.get("half", False), kw.get("eps", 1e-4))
    # mhe: the rows [W; −W] (half) have the Gram [[G, −G], [−G, G]]
    if kw.get("half", False):
        G = torch.cat([torch.cat([G, -G], -1), torch.cat([-G, G], -1)], -2)
        diag = G.diagonal(dim1=-2, dim2=-1)
    p = G.shape[-1]
    nu = (diag + kw.get("eps", 1e-4)).sqrt()
    nu = torch.where(nu.isinf(), torch.nan, nu)
    cos = G / (nu[..., :, None] * nu[..., None, :])
    i, j = torch.triu_indices(p, p, offset=1, device=G.device)
    delta = 2 - 2 * cos[..., i, j]
    s = kw.get("s", 2)
    energy = -torch.log(delta) if s == 0 else torch.rsqrt(delta) if s == 1 else torch.reciprocal(delta)
    return energy.mean(-1)


PENALTY_KINDS = {
    "frame": frame_penalty,
    "diversity": diversity_penalty,
    "orthogonality": orthogonality_penalty,
    "mhe": mhe_penalty,
    "srip": srip_penalty,
}


def penalty_multi(weights: Sequence[torch.Tensor], kind: str, groups: int | Sequence[int] = 1,
                  **kw) -> torch.Tensor:
    """One penalty value per layer weight (docs/gram.md#penalty_multi): list of weights → ``(len(weights),)``.

    Each weight is turned into a matrix with ``as_matrix`` (conv weights, ndim > 2; a
    2-D weight is one Linear matrix, never a batch) and penalised with the ``kind``
    reference (``"frame"``, ``"diversity"``, ``"orthogonality"``, ``"mhe"``, ``"srip"``)
    called with ``**kw``. A grouped conv gives ``(g, out/g, ·)`` matrices; its value is
    the mean over the groups (docs/gram.md#as_matrix). ``groups`` is one int for all weights or one
    per weight. For ``"srip"``, ``kw["b"]`` is a list with one start vector per weight,
    shaped ``(k,)`` or ``(g, k)`` like the weight's matrices.

    The values are returned in the promoted dtype of the weights; an empty list gives
    an empty float32 tensor.
    """
    # formula: docs/gram.md#penalty_multi (per layer) and docs/gram.md#as_matrix (mean over groups)
    fn = PENALTY_KINDS[kind]
    per_weight_groups = [groups] * len(weights) if isinstance(groups, int) else list(groups)
    if kind != "srip":  # SRIP is matrix-free; the others form each layer's Gram (checked first)
        for idx, (w, g) in enumerate(zip(weights, per_weight_groups)):
            mat = as_matrix(w, g)
            k = _gram_k(mat, kw.get("side", "auto")) if kind in ("frame", "orthogonality") else (
                mat.shape[-2] * (2 if kind == "mhe" and kw.get("half", False) else 1))
            check_gram_bytes("penalty_multi", f"as_matrix(weights[{idx}]) of shape {tuple(mat.shape)}",
                             math.prod(mat.shape[:-2]), k, mat.dtype,
                             ADVICE_SIDE if kind in ("frame", "orthogonality") else ADVICE_ROWS)
    starts = kw.pop("b", None)
    values = []
    for idx, (w, g) in enumerate(zip(weights, per_weight_groups)):
        extra = {"b": starts[idx]} if kind == "srip" else {}
        values.append(fn(as_matrix(w, g), **extra, **kw).reshape(-1).mean())
    if not values:
        return torch.empty(0)
    dtype = functools.reduce(torch.promote_types, [v.dtype for v in values])
    return torch.stack([v.to(dtype) for v in values])
