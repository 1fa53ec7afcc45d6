"""Public Gram-matrix penalty ops (docs/gram.md): validation, then dispatch through ``TABLE``.

Every op takes ``W`` of shape ``(..., m, n)`` (rows are filters) and returns one value
per matrix, shape ``(...)``; float16 / bfloat16 are computed in float32 and returned in
the input dtype. Each op checks its arguments (the messages name the op, the argument and
the expected form), then ``TABLE.implementation`` picks the code for the tensor's device and
dtype: the first default row that takes them for ``backend=None``, the named row otherwise (a
named backend that cannot take the input raises ``ValueError`` listing those that can).
Inputs are never modified; non-contiguous and expanded inputs are fine.

Numerics, on every backend: a matrix with a NaN or Inf entry, or whose Gram overflows the
compute dtype, gives NaN (``+inf`` where the formula is +∞, e.g. orthogonality with an Inf
entry) and a non-finite gradient, for that matrix only. ``√`` at 0 has the subgradient 0
(``orthogonality_penalty(squared=False)`` at ``Gram(W) = I``).

Memory: the reference and the C++ kernel form the dense ``(batch, k, k)`` Gram stack; over
``regkernels.reference.gram.MAX_GRAM_BYTES`` (2 GiB, float32 or float64 entries) they raise
``ValueError`` naming the size before allocating. The Triton kernel holds no k×k array and
has no such limit.

Double backward (``create_graph=True``, then differentiating the gradient): the reference and
SRIP's composite are differentiable twice. The C++ and Triton Gram kernels return the correct
first gradient under ``create_graph=True`` but raise ``RuntimeError`` (naming
``backend="reference"``) when that gradient is differentiated.

torch.func (``grad``, ``vjp``, ``vmap``) works on every backend: the kernels take
functorch-wrapped inputs through Python ``autograd.Function``s with vmap rules
(regkernels/_gram_kernels.py), plain tensors through their own (C++ or custom-op) autograd.
``srip_penalty`` under ``vmap`` draws its start vector with ``torch.rand``: pass
``randomness="same"`` or ``"different"`` to ``vmap``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from regkernels.distributed import accepts_sharded
from regkernels.ops._common import (
    check_bounds,
    check_matrix,
    check_number,
    check_same_device,
    check_side,
    check_tensor,
)
from regkernels.ops._table import ALL_DTYPES, BACKENDS, HALF_AND_FLOAT, Kernel, Table, check_backend_keyword
from regkernels.reference import gram as R

__all__ = [
    "as_matrix", "frame_penalty", "gershgorin_bounds", "frame_bounds", "diversity_penalty",
    "orthogonality_penalty", "mhe_penalty", "srip_penalty", "penalty_multi", "TABLE",
]

_CPP = "C++ (csrc/cpu/gram_cpu.cpp): BLAS Gram, fused epilogue; the k×k Gram stack ≤ MAX_GRAM_BYTES"
_TRITON = "flash-style (regkernels/triton/gram.py), no k×k array; CPU tensors only when named and interpreted"
_SRIP_IN_MULTI = "; kind='srip' runs each weight through the SRIP composite (srip_penalty's 'torch' row)"

# Row order = preference for backend=None. Gershgorin and exact frame bounds have no kernel:
# they are diagnostics (Regularizer.frame_stats), not per-step penalties.
TABLE = Table("gram", [
    Kernel("frame_penalty", "cpu", "cpu", "regkernels._C_ops:frame_penalty", ALL_DTYPES, note=_CPP),
    Kernel("frame_penalty", "cuda", "triton", "regkernels.triton.gram:frame_penalty", HALF_AND_FLOAT, note=_TRITON),
    Kernel("frame_penalty", "any", "reference", "regkernels.reference.gram:frame_penalty"),
    Kernel("gershgorin_bounds", "any", "reference", "regkernels.reference.gram:gershgorin_bounds"),
    Kernel("frame_bounds", "any", "reference", "regkernels.reference.gram:frame_bounds",
           note="torch.linalg.svdvals"),
    Kernel("diversity_penalty", "cpu", "cpu", "regkernels._C_ops:diversity_penalty", ALL_DTYPES, note=_CPP),
    Kernel("diversity_penalty", "cuda", "triton", "regkernels.triton.gram:diversity_penalty", HALF_AND_FLOAT,
           note=_TRITON),
    Kernel("diversity_penalty", "any", "reference", "regkernels.reference.gram:diversity_penalty"),
    Kernel("orthogonality_penalty", "cpu", "cpu", "regkernels._C_ops:orthogonality_penalty", ALL_DTYPES,
           note=_CPP),
    Kernel("orthogonality_penalty", "cuda", "triton", "regkernels.triton.gram:orthogonality_penalty",
           HALF_AND_FLOAT, note=_TRITON),
    Kernel("orthogonality_penalty", "any", "reference", "regkernels.reference.gram:orthogonality_penalty"),
    Kernel("mhe_penalty", "cpu", "cpu", "regkernels._C_ops:mhe_penalty", ALL_DTYPES, note=_CPP),
    Kernel("mhe_penalty", "cuda", "triton", "regkernels.triton.gram:mhe_penalty", HALF_AND_FLOAT, note=_TRITON),
    Kernel("mhe_penalty", "any", "reference", "regkernels.reference.gram:mhe_penalty"),
    Kernel("srip_penalty", "any", "torch", "regkernels.composite.gram:srip_penalty",
           note="matrix-free power iteration, one-product hand-written backward, differentiable twice"),
    Kernel("srip_penalty", "any", "reference", "regkernels.reference.gram:srip_penalty"),
    Kernel("penalty_multi", "cpu", "cpu", "regkernels._C_ops:penalty_multi", ALL_DTYPES,
           note="all layers in one C++ call (one dtype)" + _SRIP_IN_MULTI),
    Kernel("penalty_multi", "cuda", "triton", "regkernels.triton.gram:penalty_multi", HALF_AND_FLOAT,
           note="all layers in one grouped launch per pass (one dtype)" + _SRIP_IN_MULTI),
    Kernel("penalty_multi", "any", "reference", "regkernels.reference.gram:penalty_multi",
           note="the only backend for weights of mixed dtypes (kinds other than srip)"),
])


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


def _mhe_args(op: str, s: int = 2, half: bool = False, eps: float = 1e-4, angular: bool = False) -> dict:
    check_number(op, "s", s, integer=True)
    if s not in (0, 1, 2):
        raise ValueError(f"{op}: s must be 0 (log energy), 1 or 2 (inverse power); got s={s}")
    _check_bool(op, "half", half)
    check_number(op, "eps", eps)
    if not eps > 0:
        raise ValueError(f"{op}: eps must be > 0; got eps={eps}")
    _check_bool(op, "angular", angular)
    return {"s": s, "half": half, "eps": eps, "angular": angular}


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

def _dispatch(op: str, backend, W: torch.Tensor) -> Callable:
    check_backend_keyword(op, backend)
    return TABLE.implementation(op, backend, W.device, W.dtype)


@accepts_sharded
def as_matrix(weight: torch.Tensor, groups: int = 1, *, transposed: bool = False) -> torch.Tensor:
    """A layer weight as the matrix the penalties act on (docs/gram.md#as_matrix); a reshape, no kernel.

    Linear ``(out, in)`` → unchanged. Conv ``(out, in/g, *kernel)`` →
    ``(g, out/g, in/g · prod(kernel))``, one matrix per group, filters as rows; for
    ``groups == 1`` the group dim is dropped: ``(out, in · prod(kernel))``.

    ``transposed=True``: ``weight`` is an ``nn.ConvTranspose1d/2d/3d`` weight ``(in, out/g, *kernel)``
    and the result is ``(g, out/g, in/g · prod(kernel))`` (``(out, in · prod(kernel))`` for
    ``groups == 1``), one row per output channel of the transposed conv: the filter that channel
    reads from its group's inputs (a copy, not a view). Same shapes and meaning as a conv's, so
    every row-wise penalty acts on the transposed conv's filters.
    """
    op = "as_matrix"
    _check_bool(op, "transposed", transposed)
    if transposed:
        check_tensor(op, "weight", weight, ndim=(3, 4, 5),
                     form="(in, out/groups, *kernel), an nn.ConvTranspose1d/2d/3d weight, with transposed=True")
        check_number(op, "groups", groups, lo=1, integer=True)
        if weight.shape[0] % groups:
            raise ValueError(f"{op}: groups must divide the input channels of a transposed conv weight (dim 0 of "
                             f"(in, out/groups, *kernel), shape {tuple(weight.shape)}); got groups={groups}")
        return R.as_matrix(weight, groups, transposed=True)
    check_tensor(op, "weight", weight, min_ndim=2, form="(out, in) or (out, in/groups, *kernel)")
    _check_groups(op, "weight", weight, groups)
    return R.as_matrix(weight, groups)


@accepts_sharded
def frame_penalty(W: torch.Tensor, A: float, B: float, side: str = "auto", *,
                  backend: str | None = None) -> torch.Tensor:
    """Frame regularizer (docs/gram.md): ``W (..., m, n)`` → ``(...)``.

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
    return _dispatch(op, backend, W)(W, **args)


@accepts_sharded
def gershgorin_bounds(W: torch.Tensor, side: str = "auto", *,
                      backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gershgorin bounds on the eigenvalues of ``Gram(W, side)``: ``(lo, hi)``, each ``W.shape[:-2]``.

    ``lo = min_i (d_i − r_i)``, ``hi = max_i (d_i + r_i)`` with d, r as in ``frame_penalty``.
    """
    op = "gershgorin_bounds"
    _check_W(op, W)
    check_side(op, side)
    return _dispatch(op, backend, W)(W, side)


@accepts_sharded
def frame_bounds(W: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact frame bounds ``(σ_min², σ_max²)`` over the k = min(m, n) singular values of W.

    ``W (..., m, n)`` → two tensors of shape ``(...)``.
    """
    op = "frame_bounds"
    _check_W(op, W)
    return _dispatch(op, backend, W)(W)


@accepts_sharded
def diversity_penalty(W: torch.Tensor, tau: float, inclusive: bool = True, *,
                      backend: str | None = None) -> torch.Tensor:
    """DiReAL filter diversity (docs/gram.md): ``W (..., m, n)`` → ``(...)``.

    ``C = Ŵ Ŵᵀ`` of the rows normalised by ``max(‖w_i‖, 1e-12)``;
    ``R = ½ Σ_{i≠j, |C_ij| ≥ tau} C_ij²`` (``inclusive=False``: ``|C_ij| > tau``); the
    mask carries no gradient. Needs ``0 ≤ tau ≤ 1``. NaN cosines are never masked out (NaN · 0):
    a matrix with NaN/Inf, or a row whose squared norm overflows, gives NaN. The reference and
    "cpu" backends refuse (``ValueError``) a dense m×m Gram stack over ``MAX_GRAM_BYTES``.
    """
    op = "diversity_penalty"
    _check_W(op, W)
    args = _diversity_args(op, tau, inclusive)
    return _dispatch(op, backend, W)(W, **args)


@accepts_sharded
def orthogonality_penalty(W: torch.Tensor, side: str = "auto", squared: bool = True, *,
                          backend: str | None = None) -> torch.Tensor:
    """Soft orthogonality (docs/gram.md): ``‖Gram(W, side) − I‖_F²`` (``squared=False``: the norm).

    ``W (..., m, n)`` → ``(...)``. The norm's gradient at ``Gram(W, side) = I`` is the subgradient
    0. A NaN entry gives NaN, an Inf entry +inf. The C++ kernel forms the min(m, n)² Gram for
    either side; the reference forms the Gram of ``side``; both refuse (``ValueError``) a dense
    Gram stack over ``MAX_GRAM_BYTES`` (module docstring).
    """
    op = "orthogonality_penalty"
    _check_W(op, W)
    args = _orthogonality_args(op, side, squared)
    return _dispatch(op, backend, W)(W, **args)


@accepts_sharded
def mhe_penalty(W: torch.Tensor, s: int = 2, half: bool = False, eps: float = 1e-4, angular: bool = False, *,
                backend: str | None = None) -> torch.Tensor:
    """Minimum hyperspherical energy (docs/gram.md): ``W (..., m, n)`` → ``(...)``.

    ``δ_ij = 2 − 2·w_i·w_j / (ν_i ν_j)`` with ``ν_i = sqrt(‖w_i‖² + eps)``; the energy
    ``−log δ`` (s=0), ``δ^(−1/2)`` (s=1) or ``δ^(−1)`` (s=2) is averaged over the pairs
    i < j of the rows (``half=True``: of ``[W; −W]``). ``angular=True`` uses the official code's
    angular energies of ``a = arccos(cos)/π + eps``: ``−log a`` (s=0), ``a^(−1)`` (s=1), ``a^(−2)``
    (s=2) (docs/gram.md#angular-energies). Needs ``eps > 0`` and at least
    2 rows unless ``half``. Duplicate filters give δ that rounds to 0 and an infinite
    energy; this is deliberately not clamped. A matrix with NaN/Inf gives NaN. The reference and
    "cpu" backends refuse (``ValueError``) a dense Gram stack over ``MAX_GRAM_BYTES`` (m×m; the
    reference's ``half`` forms the 2m×2m one).
    """
    op = "mhe_penalty"
    _check_W(op, W)
    args = _mhe_args(op, s, half, eps, angular)
    _check_mhe_rows(op, "W", W, half)
    return _dispatch(op, backend, W)(W, **args)


@accepts_sharded
def srip_penalty(W: torch.Tensor, n_iter: int = 1, generator: torch.Generator | None = None, *,
                 backend: str | None = None) -> torch.Tensor:
    """Spectral restricted isometry penalty (docs/gram.md): ``W (..., m, n)`` → ``(...)``.

    ``M = Gram(W, "auto") − I``; ``b ~ U(0,1)^k`` is drawn with ``torch.rand`` from
    ``generator`` (one per matrix, in float32, on W's device); ``n_iter`` power steps
    ``v = M b / ‖M b‖, b = v`` then ``R = ‖M v‖²``. ``M x`` is computed matrix-free
    (``Wᵀ(W x) − x`` or ``W(Wᵀ x) − x``) and gradients flow through v. No Gram is formed.
    Differentiable twice on every backend ("torch", the composite with a one-product backward:
    under ``create_graph=True`` its gradient is recomputed from W by torch ops).
    """
    op = "srip_penalty"
    _check_W(op, W)
    args = _srip_args(op, n_iter, generator)
    impl = _dispatch(op, backend, W)  # a refused backend draws nothing from the generator
    return impl(W, _start_vector(W, args["generator"], op), n_iter)


# ----------------------------------------------------------------------------- multi

# kind → (keyword arguments it takes, the required ones, their checker)
_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[..., dict]]] = {
    "frame": (("A", "B", "side"), ("A", "B"), _frame_args),
    "diversity": (("tau", "inclusive"), ("tau",), _diversity_args),
    "orthogonality": (("side", "squared"), (), _orthogonality_args),
    "mhe": (("s", "half", "eps", "angular"), (), _mhe_args),
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


@accepts_sharded
def penalty_multi(weights: Sequence[torch.Tensor], kind: str, *, backend: str | None = None,
                  **kw) -> torch.Tensor:
    """Per-layer penalty values for many weights of different shapes (docs/gram.md).

    ``weights``: list of Linear ``(out, in)`` / conv ``(out, in/g, *kernel)`` tensors on
    one device → ``(len(weights),)``, entry i = the ``kind`` penalty of
    ``as_matrix(weights[i], groups[i])`` (the mean over groups for a grouped conv).
    ``kind``: "frame" (A, B, side), "diversity" (tau, inclusive), "orthogonality"
    (side, squared), "mhe" (s, half, eps, angular) or "srip" (n_iter, generator: one start vector
    per weight, drawn in list order); ``groups``: one int or one per weight (default 1).
    A layer with NaN/Inf gives a non-finite entry; the other entries are unaffected. Dense
    backends check each layer's Gram stack against ``MAX_GRAM_BYTES``; the C++ and Triton
    kernels refuse double backward (module docstring). The kernels take one dtype for the
    whole list: weights of mixed dtypes (kinds other than "srip") run the reference, which
    computes each layer in its own dtype and promotes the values; naming a kernel backend for
    them raises ``ValueError``. An empty list gives an empty float32 tensor.
    """
    op = "penalty_multi"
    check_backend_keyword(op, backend)
    groups = kw.pop("groups", 1)
    args = _multi_args(op, kind, kw)
    per_weight = _check_weights(op, weights, groups, kind, args)
    device = weights[0].device if weights else torch.device("cpu")
    dtypes = list(dict.fromkeys(w.dtype for w in weights)) or [torch.float32]
    if len(dtypes) > 1 and kind != "srip":
        if backend is None:
            backend = "reference"
        elif backend in BACKENDS and backend != "reference":
            raise ValueError(f"{op}: weights of mixed dtypes ({', '.join(map(str, dtypes))}) run only on "
                             f"backend='reference' (or backend=None, which picks it): the {backend!r} kernel "
                             f"takes one dtype for the whole list; cast the weights to one dtype to use it")
    impl = TABLE.implementation(op, backend, device, dtypes)
    if not weights:
        return torch.empty(0)
    if kind == "srip":
        gen = args.pop("generator")
        args["b"] = [_start_vector(R.as_matrix(w, g), gen, op) for w, g in zip(weights, per_weight)]
    return impl(list(weights), kind, per_weight, **args)
