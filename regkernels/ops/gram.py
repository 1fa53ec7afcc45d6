"""Public Gram-matrix penalty ops (SPEC §0, §1): validation, then dispatch.

Every op takes ``W`` of shape ``(..., m, n)`` (rows are filters) and returns one value
per matrix, shape ``(...)``; float16 / bfloat16 are computed in float32 and returned in
the input dtype. Each op checks its arguments (SPEC §7: the messages name the op, the
argument and the expected form), then ``_implementation`` picks the code for the
tensor's device: a registered kernel, or the pure-torch reference in
``regkernels.reference.gram`` (autograd through torch ops, exact gradients).
Inputs are never modified; non-contiguous and expanded inputs are fine.

Numerics, on every backend (SPEC §8): a matrix with a NaN or Inf entry, or whose Gram
overflows the compute dtype, gives NaN (``+inf`` where the formula is +∞, e.g. orthogonality
with an Inf entry) and a non-finite gradient, for that matrix only. ``√`` at 0 has the
subgradient 0 (``orthogonality_penalty(squared=False)`` at ``Gram(W) = I``).

Memory: the reference and the C++ kernel form the dense ``(batch, k, k)`` Gram stack; over
``regkernels.reference.gram.MAX_GRAM_BYTES`` (2 GiB, float32 or float64 entries) they raise
``ValueError`` naming the size before allocating. The Triton kernel holds no k×k array and
has no such limit.

Double backward (``create_graph=True``, then differentiating the gradient): the reference and
SRIP's kernel are differentiable twice. The C++ and Triton Gram kernels return the correct first
gradient under ``create_graph=True`` but raise ``RuntimeError`` (naming ``backend="reference"``)
when that gradient is differentiated.

Kernels (``backend=None`` picks the first available; the end of this module registers them):

==================  ==========================================  ==========================
op                  CPU tensors                                 CUDA tensors
==================  ==========================================  ==========================
frame, diversity,   ``"cpu"``: C++ (csrc/cpu/gram_cpu.cpp), all  ``"triton"``
orthogonality,      dtypes; ``"triton"`` only interpreted        (regkernels/triton/gram.py),
mhe,                (TRITON_INTERPRET=1, as CI runs it)          fp16/bf16/fp32; fp64 runs
penalty_multi                                                    the reference
srip                ``"cpu"``: torch, one-product backward       ``"cuda"``: the same code
gershgorin_bounds,  reference                                    reference
frame_bounds
==================  ==========================================  ==========================
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch

from regkernels.ops._common import (
    KernelTable,
    check_bounds,
    check_matrix,
    check_number,
    check_same_device,
    check_side,
    check_tensor,
)
from regkernels import _ext
from regkernels.reference import gram as R

__all__ = [
    "as_matrix", "frame_penalty", "gershgorin_bounds", "frame_bounds", "diversity_penalty",
    "orthogonality_penalty", "mhe_penalty", "srip_penalty", "penalty_multi",
]

# Kernels of this family register here (see the end of this module).
_TABLE = KernelTable(R)
_implementation = _TABLE.implementation


# ----------------------------------------------------------------------------- checks

def _check_W(op: str, W, name: str = "W") -> torch.Tensor:
    """A floating ``(..., m, n)`` tensor with m, n ≥ 1 (a zero-size batch is fine)."""
    check_matrix(op, name, W)
    if W.shape[-2] == 0 or W.shape[-1] == 0:
        raise ValueError(f"{op}: {name} must have m >= 1 rows and n >= 1 columns (..., m, n); "
                         f"got shape {tuple(W.shape)}")
    return W


def _check_bool(op: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be True or False; got {v!r}")
    return v


def _check_groups(op: str, name: str, weight: torch.Tensor, groups) -> None:
    check_number(op, "groups", groups, lo=1, integer=True)
    if weight.dim() == 2 and groups != 1:
        raise ValueError(f"{op}: groups must be 1 for a 2-D (Linear) {name}; got groups={groups}")
    if weight.shape[0] % groups:
        raise ValueError(f"{op}: groups must divide the output channels of {name} "
                         f"(dim 0 of shape {tuple(weight.shape)}); got groups={groups}")


def _frame_args(op: str, A: float, B: float, side: str = "auto") -> dict:
    check_bounds(op, "A", A, "B", B)
    check_side(op, side)
    return {"A": A, "B": B, "side": side}


def _diversity_args(op: str, tau: float, inclusive: bool = True) -> dict:
    check_number(op, "tau", tau, lo=0.0, hi=1.0)
    _check_bool(op, "inclusive", inclusive)
    return {"tau": tau, "inclusive": inclusive}


def _orthogonality_args(op: str, side: str = "auto", squared: bool = True) -> dict:
    check_side(op, side)
    _check_bool(op, "squared", squared)
    return {"side": side, "squared": squared}


def _mhe_args(op: str, s: int = 2, half: bool = False, eps: float = 1e-4) -> dict:
    check_number(op, "s", s, integer=True)
    if s not in (0, 1, 2):
        raise ValueError(f"{op}: s must be 0 (log energy), 1 or 2 (inverse power); got s={s}")
    _check_bool(op, "half", half)
    check_number(op, "eps", eps)
    if not eps > 0:
        raise ValueError(f"{op}: eps must be > 0; got eps={eps}")
    return {"s": s, "half": half, "eps": eps}


def _check_mhe_rows(op: str, name: str, W: torch.Tensor, half: bool) -> None:
    # the energy is a mean over pairs of rows: a single row has none unless [W; −W]
    if W.shape[-2] < 2 and not half:
        raise ValueError(f"{op}: {name} needs at least 2 rows (filters) to form a pair, or half=True; "
                         f"got shape {tuple(W.shape)}")


SRIP_MAX_ITER = 10_000


def _srip_args(op: str, n_iter: int = 1, generator: torch.Generator | None = None) -> dict:
    # the power iteration converges in a handful of steps (the official code uses 1-2); a bound
    # keeps a typo like 10**12 from running for hours
    check_number(op, "n_iter", n_iter, lo=1, hi=SRIP_MAX_ITER, integer=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None; got {type(generator).__name__}")
    return {"n_iter": n_iter, "generator": generator}


def _start_vector(W: torch.Tensor, generator: torch.Generator | None, op: str) -> torch.Tensor:
    """SRIP start vector ``b ~ U(0,1)^k``, one per matrix: ``(..., m, n)`` → ``(..., k)``.

    Drawn in float32 whatever W's dtype, so a seed gives the same start in every dtype.
    """
    if generator is not None and generator.device.type != W.device.type:
        raise ValueError(f"{op}: generator must be on W's device ({W.device.type}); got a "
                         f"{generator.device.type} generator")
    k = min(W.shape[-2], W.shape[-1])
    return torch.rand(*W.shape[:-2], k, generator=generator, device=W.device, dtype=torch.float32)


# ----------------------------------------------------------------------------- ops

def as_matrix(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A layer weight as the matrix the penalties act on (SPEC §0); a reshape, no kernel.

    Linear ``(out, in)`` → unchanged. Conv ``(out, in/g, *kernel)`` →
    ``(g, out/g, in/g · prod(kernel))``, one matrix per group, filters as rows; for
    ``groups == 1`` the group dim is dropped: ``(out, in · prod(kernel))``.
    """
    op = "as_matrix"
    check_tensor(op, "weight", weight, min_ndim=2, form="(out, in) or (out, in/groups, *kernel)")
    _check_groups(op, "weight", weight, groups)
    return R.as_matrix(weight, groups)


def frame_penalty(W: torch.Tensor, A: float, B: float, side: str = "auto", *,
                  backend: str | None = None) -> torch.Tensor:
    """Frame regularizer (SPEC §1.1): ``W (..., m, n)`` → ``(...)``.

    ``V = Gram(W, side)`` (k×k), ``d_i = V_ii``, ``r_i = Σ_{j≠i} |V_ij|``::

        R(W) = (1/k) Σ_i max(0, A − (d_i − r_i))² + max(0, (d_i + r_i) − B)²

    Zero certifies ``A ≤ λ(V) ≤ B``. Needs ``0 ≤ A ≤ B`` (finite numbers, not bools). ``side``:
    "auto" (the k×k Gram, k = min(m, n)), "rows" (W Wᵀ) or "cols" (Wᵀ W). A matrix with NaN/Inf,
    or whose Gram overflows, gives NaN. The reference and "cpu" backends refuse (``ValueError``)
    a dense Gram stack over ``MAX_GRAM_BYTES`` (module docstring).
    """
    op = "frame_penalty"
    _check_W(op, W)
    args = _frame_args(op, A, B, side)
    return _implementation(op, backend, W.device)(W, **args)


def gershgorin_bounds(W: torch.Tensor, side: str = "auto", *,
                      backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gershgorin bounds on the eigenvalues of ``Gram(W, side)``: ``(lo, hi)``, each ``W.shape[:-2]``.

    ``lo = min_i (d_i − r_i)``, ``hi = max_i (d_i + r_i)`` with d, r as in ``frame_penalty``.
    """
    op = "gershgorin_bounds"
    _check_W(op, W)
    check_side(op, side)
    return _implementation(op, backend, W.device)(W, side)


def frame_bounds(W: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact frame bounds ``(σ_min², σ_max²)`` over the k = min(m, n) singular values of W.

    ``W (..., m, n)`` → two tensors of shape ``(...)``.
    """
    op = "frame_bounds"
    _check_W(op, W)
    return _implementation(op, backend, W.device)(W)


def diversity_penalty(W: torch.Tensor, tau: float, inclusive: bool = True, *,
                      backend: str | None = None) -> torch.Tensor:
    """DiReAL filter diversity (SPEC §1.2): ``W (..., m, n)`` → ``(...)``.

    ``C = Ŵ Ŵᵀ`` of the rows normalised by ``max(‖w_i‖, 1e-12)``;
    ``R = ½ Σ_{i≠j, |C_ij| ≥ tau} C_ij²`` (``inclusive=False``: ``|C_ij| > tau``); the
    mask carries no gradient. Needs ``0 ≤ tau ≤ 1``. NaN cosines are never masked out (NaN · 0):
    a matrix with NaN/Inf, or a row whose squared norm overflows, gives NaN. The reference and
    "cpu" backends refuse (``ValueError``) a dense m×m Gram stack over ``MAX_GRAM_BYTES``.
    """
    op = "diversity_penalty"
    _check_W(op, W)
    args = _diversity_args(op, tau, inclusive)
    return _implementation(op, backend, W.device)(W, **args)


def orthogonality_penalty(W: torch.Tensor, side: str = "auto", squared: bool = True, *,
                          backend: str | None = None) -> torch.Tensor:
    """Soft orthogonality (SPEC §1.3): ``‖Gram(W, side) − I‖_F²`` (``squared=False``: the norm).

    ``W (..., m, n)`` → ``(...)``. The norm's gradient at ``Gram(W, side) = I`` is the subgradient
    0. A NaN entry gives NaN, an Inf entry +inf. The C++ kernel forms the min(m, n)² Gram for
    either side; the reference forms the Gram of ``side``; both refuse (``ValueError``) a dense
    Gram stack over ``MAX_GRAM_BYTES`` (module docstring).
    """
    op = "orthogonality_penalty"
    _check_W(op, W)
    args = _orthogonality_args(op, side, squared)
    return _implementation(op, backend, W.device)(W, **args)


def mhe_penalty(W: torch.Tensor, s: int = 2, half: bool = False, eps: float = 1e-4, *,
                backend: str | None = None) -> torch.Tensor:
    """Minimum hyperspherical energy (SPEC §1.4): ``W (..., m, n)`` → ``(...)``.

    ``δ_ij = 2 − 2·w_i·w_j / (ν_i ν_j)`` with ``ν_i = sqrt(‖w_i‖² + eps)``; the energy
    ``−log δ`` (s=0), ``δ^(−1/2)`` (s=1) or ``δ^(−1)`` (s=2) is averaged over the pairs
    i < j of the rows (``half=True``: of ``[W; −W]``). Needs ``eps > 0`` and at least
    2 rows unless ``half``. Duplicate filters give δ that rounds to 0 and an infinite
    energy; this is deliberately not clamped. A matrix with NaN/Inf gives NaN. The reference and
    "cpu" backends refuse (``ValueError``) a dense Gram stack over ``MAX_GRAM_BYTES`` (m×m; the
    reference's ``half`` forms the 2m×2m one).
    """
    op = "mhe_penalty"
    _check_W(op, W)
    args = _mhe_args(op, s, half, eps)
    _check_mhe_rows(op, "W", W, half)
    return _implementation(op, backend, W.device)(W, **args)


def srip_penalty(W: torch.Tensor, n_iter: int = 1, generator: torch.Generator | None = None, *,
                 backend: str | None = None) -> torch.Tensor:
    """Spectral restricted isometry penalty (SPEC §1.5): ``W (..., m, n)`` → ``(...)``.

    ``M = Gram(W, "auto") − I``; ``b ~ U(0,1)^k`` is drawn with ``torch.rand`` from
    ``generator`` (one per matrix, in float32, on W's device); ``n_iter`` power steps
    ``v = M b / ‖M b‖, b = v`` then ``R = ‖M v‖²``. ``M x`` is computed matrix-free
    (``Wᵀ(W x) − x`` or ``W(Wᵀ x) − x``) and gradients flow through v. No Gram is formed.
    Differentiable twice on every backend ("cpu"/"cuda": the second derivative goes through the
    reference's torch ops).
    """
    op = "srip_penalty"
    _check_W(op, W)
    args = _srip_args(op, n_iter, generator)
    b = _start_vector(W, args["generator"], op)
    return _implementation(op, backend, W.device)(W, b, n_iter)


# ----------------------------------------------------------------------------- multi

# kind → (keyword arguments it takes, the required ones, their checker)
_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[..., dict]]] = {
    "frame": (("A", "B", "side"), ("A", "B"), _frame_args),
    "diversity": (("tau", "inclusive"), ("tau",), _diversity_args),
    "orthogonality": (("side", "squared"), (), _orthogonality_args),
    "mhe": (("s", "half", "eps"), (), _mhe_args),
    "srip": (("n_iter", "generator"), (), _srip_args),
}


def _multi_args(op: str, kind, kw: dict) -> dict:
    """Check ``kind`` and its keyword arguments; returns the checked arguments."""
    if not isinstance(kind, str) or kind not in _KINDS:
        raise ValueError(f"{op}: kind must be one of {', '.join(map(repr, _KINDS))}; got {kind!r}")
    params, required, checker = _KINDS[kind]
    unknown = [k for k in kw if k not in params]
    missing = [k for k in required if k not in kw]
    if unknown or missing:
        raise TypeError(f"{op}: kind={kind!r} takes keyword arguments {', '.join(params)} (required: "
                        f"{', '.join(required) or 'none'}) and groups; got unknown {unknown}, missing {missing}")
    return checker(op, **kw)


def _check_weights(op: str, weights, groups, kind: str, args: dict,
                   names: Sequence[str] | None = None) -> list[int]:
    """Check the weight list and ``groups``; returns one groups value per weight.

    ``names``: what the messages call each weight (``Regularizer`` passes the layers' names);
    default ``weights[i]``.
    """
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"{op}: weights must be a list or tuple of weight tensors (out, in) or "
                        f"(out, in/groups, *kernel); got {type(weights).__name__}")
    if isinstance(groups, (list, tuple)):
        per_weight = list(groups)
        if len(per_weight) != len(weights):
            raise ValueError(f"{op}: groups must be one int or one per weight ({len(weights)}); "
                             f"got {len(per_weight)} values")
    else:
        per_weight = [groups] * len(weights)
    labels = [f"weights[{i}]" for i in range(len(weights))] if names is None else list(names)
    for name, w, g in zip(labels, weights, per_weight):
        check_tensor(op, name, w, min_ndim=2, form="(out, in) or (out, in/groups, *kernel)")
        _check_groups(op, name, w, g)
        mat = R.as_matrix(w, g)
        _check_W(op, mat, f"as_matrix({name})")
        if kind == "mhe":
            _check_mhe_rows(op, f"as_matrix({name})", mat, args["half"])
    check_same_device(op, **dict(zip(labels, weights)))
    return per_weight


def penalty_multi(weights: Sequence[torch.Tensor], kind: str, backend: str | None = None,
                  **kw) -> torch.Tensor:
    """Per-layer penalty values for many weights of different shapes (SPEC §1.7).

    ``weights``: list of Linear ``(out, in)`` / conv ``(out, in/g, *kernel)`` tensors on
    one device → ``(len(weights),)``, entry i = the ``kind`` penalty of
    ``as_matrix(weights[i], groups[i])`` (the mean over groups for a grouped conv).
    ``kind``: "frame" (A, B, side), "diversity" (tau, inclusive), "orthogonality"
    (side, squared), "mhe" (s, half, eps) or "srip" (n_iter, generator: one start vector
    per weight, drawn in list order); ``groups``: one int or one per weight (default 1).
    A layer with NaN/Inf gives a non-finite entry; the other entries are unaffected. Dense
    backends check each layer's Gram stack against ``MAX_GRAM_BYTES``; the C++ and Triton
    kernels refuse double backward (module docstring).
    """
    op = "penalty_multi"
    groups = kw.pop("groups", 1)
    args = _multi_args(op, kind, kw)
    per_weight = _check_weights(op, weights, groups, kind, args)
    device = weights[0].device if weights else torch.device("cpu")
    impl = _implementation(op, backend, device)
    if kind == "srip":
        gen = args.pop("generator")
        args["b"] = [_start_vector(R.as_matrix(w, g), gen, op) for w, g in zip(weights, per_weight)]
    return impl(list(weights), kind, per_weight, **args)


# ----------------------------------------------------------------------------- kernels
#
# The fused kernels compute one penalty over a list of matrices ``mats[i]`` of shape
# ``(batch_i, m_i, n_i)`` per call (a single op is a list of one; penalty_multi is a whole
# model), "sides" 0 = rows (W Wᵀ) / 1 = cols (Wᵀ W), and the kind's scalar params:
#   frame (A, B) · diversity (tau, inclusive) · orthogonality (squared) · mhe (s, half, eps).
# CPU: the C++ custom op ``regkernels::gram_penalty_fwd`` (csrc/cpu/gram_cpu.cpp): BLAS Gram, one
# fused epilogue that also leaves the k×k gradient coefficients P for the backward
# ``regkernels::gram_penalty_bwd`` (dW = P·W, one BLAS product). SRIP has no Gram to fuse: its
# fast path (below) is torch matvecs with a hand-written backward.

KERNEL_KINDS = ("frame", "diversity", "orthogonality", "mhe")
_ROWS_ONLY = ("diversity", "mhe")


def _kernel_params(kind: str, args: dict) -> list[float]:
    if kind == "frame":
        return [float(args["A"]), float(args["B"])]
    if kind == "diversity":
        return [float(args["tau"]), float(args["inclusive"])]
    if kind == "orthogonality":
        return [float(args["squared"])]
    return [float(args["s"]), float(args["half"]), float(args["eps"])]


def _side_code(W: torch.Tensor, kind: str, args: dict) -> int:
    if kind in _ROWS_ONLY:
        return 0
    return 0 if R._resolve_side(W, args.get("side", "auto")) == "rows" else 1


def _as_batch(W: torch.Tensor) -> torch.Tensor:
    """``(..., m, n)`` → ``(B, m, n)`` (a view when possible; B may be 0)."""
    return W.reshape(math.prod(W.shape[:-2]), *W.shape[-2:])


if _ext.HAS_C:

    @torch.library.register_fake("regkernels::gram_penalty_fwd")
    def _gram_penalty_fwd_fake(mats, kind, sides, params, need_grad):
        # the math dtype: float64 for float64 mats, else float32
        dtype = torch.float64 if mats and mats[0].dtype == torch.float64 else torch.float32
        device = mats[0].device if mats else torch.device("cpu")
        batches = [math.prod(w.shape[:-2]) for w in mats]
        values = torch.empty(sum(batches), dtype=dtype, device=device)
        coefs = []
        for w, side, batch in zip(mats, sides, batches):
            m, n = w.shape[-2], w.shape[-1]
            k = min(m, n) if kind == "orthogonality" else (m if side == 0 else n)
            shape = (batch, k, k) if need_grad else (0,)
            coefs.append(torch.empty(shape, dtype=dtype, device=device))
        return values, coefs

    @torch.library.register_fake("regkernels::gram_penalty_bwd")
    def _gram_penalty_bwd_fake(mats, coefs, sides, grad):
        return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in mats]

    # autograd of gram_penalty_fwd is registered in C++ (csrc/autograd/gram_autograd.cpp)


# Triton (regkernels/triton/gram.py): flash-style, no k×k array in memory; the forward keeps
# O(k) row statistics per matrix and the backward recomputes the Gram tiles. Python custom ops
# (the launchers build a problem table on the host); CUDA tensors, or CPU tensors when
# interpreted (TRITON_INTERPRET=1, how CI runs them). float16 / bfloat16 / float32 only.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if _ext.has_triton():

    @torch.library.custom_op("regkernels::gram_penalty_triton", mutates_args=())
    def _gram_penalty_triton(mats: list[torch.Tensor], kind: str, sides: list[int],
                             params: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        from regkernels.triton import gram as TG

        return TG.gram_penalty_forward(mats, kind, sides, params)

    @_gram_penalty_triton.register_fake
    def _gram_penalty_triton_fake(mats, kind, sides, params):
        device = mats[0].device if mats else torch.device("cpu")
        values = torch.empty(sum(w.shape[0] for w in mats), dtype=torch.float32, device=device)
        from regkernels.triton import gram as TG

        stats = torch.empty(TG.stats_numel(mats, kind, sides, params), dtype=torch.float32, device=device)
        return values, stats

    @torch.library.custom_op("regkernels::gram_penalty_triton_bwd", mutates_args=())
    def _gram_penalty_triton_bwd(mats: list[torch.Tensor], kind: str, sides: list[int], params: list[float],
                                 stats: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
        from regkernels.triton import gram as TG

        grads = TG.gram_penalty_backward(mats, kind, sides, params, stats, grad)
        # the launcher's gradients are views of one float32 buffer; outputs must not alias
        return [d.to(w.dtype) if w.dtype != d.dtype or len(grads) == 1 else d.clone() for w, d in zip(mats, grads)]

    @_gram_penalty_triton_bwd.register_fake
    def _gram_penalty_triton_bwd_fake(mats, kind, sides, params, stats, grad):
        return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in mats]

    def _gram_penalty_triton_setup(ctx, inputs, output):
        mats, kind, sides, params = inputs
        ctx.kind, ctx.sides, ctx.params = kind, list(sides), list(params)
        ctx.save_for_backward(output[1], *mats)

    def _triton_bwd_setup(ctx, inputs, output):
        ctx.kind = inputs[1]

    def _triton_bwd_backward(ctx, *grads):
        raise RuntimeError(_no_double_backward(ctx.kind, "triton"))

    # the gradient's own backward: the kernel's P is recomputed from constants of the forward
    # (row statistics), not differentiated, so a second derivative is refused
    _gram_penalty_triton_bwd.register_autograd(_triton_bwd_backward, setup_context=_triton_bwd_setup)

    def _gram_penalty_triton_backward(ctx, grad_values, _grad_stats):
        stats, *mats = ctx.saved_tensors
        grads = torch.ops.regkernels.gram_penalty_triton_bwd(mats, ctx.kind, ctx.sides, ctx.params, stats,
                                                            grad_values)
        # an empty params list (orthogonality) is a pytree node, not a leaf: mirror it
        return list(grads), None, None, ([] if not ctx.params else None)

    _gram_penalty_triton.register_autograd(_gram_penalty_triton_backward, setup_context=_gram_penalty_triton_setup)


def _no_double_backward(kind: str, backend: str) -> str:
    return (f"{kind}_penalty (and penalty_multi with kind={kind!r}): double backward (differentiating a gradient "
            f"taken with create_graph=True) is not supported by the {backend!r} kernel; use "
            f"backend='reference', which differentiates twice through torch ops")


def _triton_values(mats: list[torch.Tensor], kind: str, sides: list[int], params: list[float]) -> torch.Tensor:
    if kind == "orthogonality":  # the kernel computes ‖V − I‖²; the norm is its sqrt (autograd)
        values, _ = torch.ops.regkernels.gram_penalty_triton(mats, kind, sides, [])
        return values if params[0] else R.sqrt0(values)  # subgradient 0 at Gram(W) = I
    values, _ = torch.ops.regkernels.gram_penalty_triton(mats, kind, sides, params)
    return values


def _needs_grad(mats: Sequence[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(w.requires_grad for w in mats)


def _cpu_values(mats: list[torch.Tensor], kind: str, sides: list[int], params: list[float]) -> torch.Tensor:
    # the C++ op takes (..., m, n) stacks as they are (no reshape node in the autograd graph)
    values, _ = torch.ops.regkernels.gram_penalty_fwd(mats, kind, sides, params, _needs_grad(mats))
    return values


def _triton_values_batched(mats, kind, sides, params) -> torch.Tensor:
    return _triton_values([_as_batch(W) for W in mats], kind, sides, params)


def _check_dense_gram(op: str, what: str, W: torch.Tensor, kind: str, side: int) -> None:
    """The C++ kernel's Gram stack against ``R.MAX_GRAM_BYTES`` (ValueError before allocating).

    It forms ``(batch, k, k)``: k = m ("rows", side 0) or n ("cols"), for orthogonality always
    min(m, n) (the identity in gram_penalty_fwd_cpu), and keeps it for the backward.
    """
    m, n = W.shape[-2:]
    k = min(m, n) if kind == "orthogonality" else (m if side == 0 else n)
    R.check_gram_bytes(op, f"{what} of shape {tuple(W.shape)}", math.prod(W.shape[:-2]), k, W.dtype,
                       R.ADVICE_ROWS if kind in _ROWS_ONLY else R.ADVICE_SIDE)


def _single_kernel(kind: str, run: Callable, dtypes, dense: bool) -> Callable:
    """A registered kernel for one matrix op: ``W (..., m, n)`` → ``(...)`` via the list form.

    Dtypes the kernel does not take (Triton: float64) run the reference. ``dense``: the kernel
    forms the k×k Gram stack (the C++ kernel), whose size is checked first.
    """
    def impl(W: torch.Tensor, **args) -> torch.Tensor:
        if W.dtype not in dtypes:
            return getattr(R, _PUBLIC_OF_KIND[kind])(W, **args)
        side = _side_code(W, kind, args)
        if dense:
            _check_dense_gram(_PUBLIC_OF_KIND[kind], "W", W, kind, side)
        values = run([W], kind, [side], _kernel_params(kind, args))
        return values.view(W.shape[:-2]).to(W.dtype)
    impl.__name__ = f"{kind}_penalty_{run.__name__.strip('_')}"
    return impl


@functools.lru_cache(maxsize=64)
def _group_mean_tables(counts: tuple[int, ...], dtype: torch.dtype,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``values`` holding ``counts[i]`` consecutive group values of weight i: the weight of
    each value (``index``) and ``1 / counts`` (``scale``). Cached: a model's counts repeat every
    step, and building them cost more than the kernel on a depthwise conv's 1×9 groups."""
    index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(device)
    scale = torch.tensor([1.0 / c for c in counts], dtype=dtype).to(device)
    return index, scale


def _multi_kernel(run: Callable, dtypes, dense: bool) -> Callable:
    """A registered kernel for ``penalty_multi``: every weight of the list in one call of ``run``."""
    def impl(weights: list[torch.Tensor], kind: str, groups, **args) -> torch.Tensor:
        if kind == "srip":  # matrix-free: no Gram to fuse; each weight through the SRIP kernel
            values = [_srip_kernel(R.as_matrix(w, g), b, args["n_iter"]).reshape(-1).mean()
                      for w, g, b in zip(weights, groups, args["b"])]
            return torch.stack(values).to(functools.reduce(torch.promote_types, [w.dtype for w in weights]))
        if len({w.dtype for w in weights}) != 1 or weights[0].dtype not in dtypes:
            # mixed dtypes (the reference promotes per layer) or one the kernel does not take
            return R.penalty_multi(weights, kind, groups, **args)
        mats = [R.as_matrix(w, g) for w, g in zip(weights, groups)]
        sides = [_side_code(m, kind, args) for m in mats]
        if dense:
            for i, (mat, side) in enumerate(zip(mats, sides)):
                _check_dense_gram("penalty_multi", f"as_matrix(weights[{i}])", mat, kind, side)
        values = run(mats, kind, sides, _kernel_params(kind, args))
        counts = [m.shape[0] if m.dim() == 3 else 1 for m in mats]
        if any(c != 1 for c in counts):  # grouped convs: the mean over their groups (SPEC §0)
            # (built afresh while tracing, so that no traced tensor lands in the cache)
            tables = _group_mean_tables.__wrapped__ if torch.compiler.is_compiling() else _group_mean_tables
            index, scale = tables(tuple(counts), values.dtype, values.device)
            values = torch.zeros(len(mats), dtype=values.dtype, device=values.device).index_add(
                0, index, values) * scale
        return values.to(weights[0].dtype)
    impl.__name__ = f"penalty_multi_{run.__name__.strip('_')}"
    return impl


# ----------------------------------------------------------------------------- SRIP
# SRIP is matrix-free already; what autograd makes slow is its backward: every matvec W·x
# records an outer-product gradient, so dW is built from 4·(n_iter + 1) rank-1 updates, each a
# full pass over an m×n buffer. Here the rank-1 terms are collected and dW is written once.


class _SripPowerIteration(torch.autograd.Function):
    """SPEC §1.5 with a hand-written backward; same value and gradient as the reference.

    With X = W ("cols", M = WᵀW − I) or X = Wᵀ ("rows"), M v = Xᵀ(X v) − v for v ∈ R^q.
    Forward: v_0 = b, u_t = M v_{t−1}, v_t = u_t/‖u_t‖ (t = 1..T), y = M v_T, R = ‖y‖².
    Backward: ū_{T+1} = 2ḡ y; through v_t = u_t/‖u_t‖: ū_t = (v̄_t − v_t (v_t·v̄_t))/‖u_t‖, where
    v̄_{t} = M ū_{t+1}. Each application v ↦ M v with upstream ū contributes
    X̄ += (X v) ūᵀ + (X ū) vᵀ, so X̄ = P Qᵀ with P = [X v_a, X ū_a], Q = [ū_a, v_a]: one
    batched product of inner size 2(T + 1).
    """

    @staticmethod
    def forward(ctx, W, b, n_iter):
        X = W if R._resolve_side(W, "auto") == "cols" else W.mT  # (..., p, q)
        v = b.to(W.dtype).expand(*W.shape[:-2], b.shape[-1]).unsqueeze(-1)  # (..., q, 1)
        vs, xvs, norms = [], [], []
        for _ in range(n_iter):
            xv = X @ v
            u = X.mT @ xv - v
            nrm = torch.linalg.vector_norm(u, dim=-2, keepdim=True)
            vs.append(v), xvs.append(xv), norms.append(nrm)
            v = u / nrm
        xv = X @ v
        y = X.mT @ xv - v
        vs.append(v), xvs.append(xv)
        ctx.save_for_backward(W, b, y, *vs, *xvs, *norms)
        ctx.n_iter = n_iter
        return y.square().sum((-2, -1))

    @staticmethod
    def backward(ctx, grad):
        W, b, y, *rest = ctx.saved_tensors
        T = ctx.n_iter
        if torch.is_grad_enabled():
            # create_graph=True (grad mode is on in a backward exactly then): the formula below
            # takes v_t, X v_t and ‖u_t‖ as constants of the forward, so differentiating it would
            # miss their dependence on W (a wrong Hessian). The gradient is then taken through the
            # reference's torch ops from the same W and b, which autograd differentiates again.
            with torch.enable_grad():
                value = R.srip_penalty(W, b, T)
            (dW,) = torch.autograd.grad(value, W, grad, create_graph=True)
            return dW, None, None
        vs, xvs, norms = rest[:T + 1], rest[T + 1:2 * T + 2], rest[2 * T + 2:]
        cols = R._resolve_side(W, "auto") == "cols"
        X = W if cols else W.mT
        ubar = 2 * grad[..., None, None] * y  # upstream of the last application
        P, Q = [], []
        for a in range(T, -1, -1):  # applications in reverse: input vs[a], upstream ubar
            xu = X @ ubar
            P += [xvs[a], xu]
            Q += [ubar, vs[a]]
            if a == 0:
                break
            vbar = X.mT @ xu - ubar  # M ū
            v = vs[a]  # = u_a / ‖u_a‖, the output of application a − 1's normalisation
            ubar = (vbar - v * (v * vbar).sum(-2, keepdim=True)) / norms[a - 1]
        dX = torch.cat(P, -1) @ torch.cat(Q, -1).mT
        return (dX if cols else dX.mT), None, None


def _srip_kernel(W: torch.Tensor, b: torch.Tensor, n_iter: int = 1) -> torch.Tensor:
    return _SripPowerIteration.apply(R.upcast(W), b, n_iter).to(W.dtype)


_PUBLIC_OF_KIND = {"frame": "frame_penalty", "diversity": "diversity_penalty",
                   "orthogonality": "orthogonality_penalty", "mhe": "mhe_penalty"}


def _register(device_type: str, backend: str, run: Callable, dtypes, dense: bool) -> None:
    for kind, op in _PUBLIC_OF_KIND.items():
        _TABLE.register(op, device_type, backend, _single_kernel(kind, run, dtypes, dense))
    _TABLE.register("penalty_multi", device_type, backend, _multi_kernel(run, dtypes, dense))


# earlier registrations are preferred: CPU tensors take the C++ kernel unless backend="triton"
_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
if _ext.HAS_C:
    _register("cpu", "cpu", _cpu_values, _ALL_DTYPES, dense=True)
if _ext.has_triton():
    _register("cuda", "triton", _triton_values_batched, TRITON_DTYPES, dense=False)
    if _ext.triton_interpreted():
        _register("cpu", "triton", _triton_values_batched, TRITON_DTYPES, dense=False)
# SRIP's fast path is torch matvecs with the one-product backward above, on either device
_TABLE.register("srip_penalty", "cpu", "cpu", _srip_kernel)
_TABLE.register("srip_penalty", "cuda", "cuda", _srip_kernel)
