"""Weight initializers built on the batched SVD (docs/nn.md#orthogonal-initialization):
``orthogonal_`` and ``delta_orthogonal_``.

Both draw standard Gaussian matrices and keep their polar factor ``U Vh`` (from
``batched_svd``'s ``A = U diag(S) Vh``), which is Haar-distributed (see ``orthogonal_``).
Weights whose matrices have one shape go through one ``batched_svd`` call, so initialising a
whole model costs one call per distinct matrix shape (and compute dtype, device), not one per
layer. Everything runs under ``torch.no_grad()`` and writes the weights in place.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, TypeVar, Union

import torch
from torch import nn

from regkernels import distributed as _dist
from regkernels._dtypes import compute_dtype
from regkernels.ops import svd as _svd
from regkernels.ops._common import check_number, check_tensor
from regkernels.reference.gram import conv_as_transposed

__all__ = ["orthogonal_", "delta_orthogonal_", "INIT_LAYERS"]

# The layers whose weight ``orthogonal_`` initialises when given a module. A ConvTranspose's weight is
# (in, out/g, *k); its matrix is as_matrix(W, groups, transposed=True), one row per output channel.
TRANSPOSED_LAYERS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
INIT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + TRANSPOSED_LAYERS

# orthogonal_ returns its argument, whatever it was
_Weights = TypeVar("_Weights", bound=Union[torch.Tensor, nn.Module, Iterable[torch.Tensor]])


class _Target(NamedTuple):
    """One weight to initialise: the tensor, its conv ``groups`` (1 for a tensor given directly),
    how messages name it and whether it is a ConvTranspose weight ``(in, out/g, *k)``."""

    weight: torch.Tensor
    groups: int
    name: str
    transposed: bool = False

    def shape(self) -> tuple[int, int, int]:
        """``(groups, rows, cols)`` of its matrices: ``as_matrix(weight, groups[, transposed=True])``."""
        rows = self.weight.shape[1] if self.transposed else self.weight.shape[0] // self.groups
        return self.groups, rows, self.weight.numel() // (self.groups * rows)

    def from_matrices(self, Q: torch.Tensor) -> torch.Tensor:
        """Matrices ``(groups, rows, cols)`` back into the weight's shape and layout."""
        if not self.transposed:
            return Q.reshape(self.weight.shape)
        cin, per, *kernel = self.weight.shape
        return conv_as_transposed(Q.reshape(per * self.groups, cin // self.groups, *kernel), self.groups)


def _refuse_sharded(op: str, name: str, w: torch.Tensor) -> None:
    """A DTensor weight (FSDP2 / tensor parallel) would get a draw per rank, not one matrix:
    initialisation belongs before sharding."""
    if _dist.is_dtensor(w):
        raise ValueError(f"{op}: {name} is a DTensor (a sharded model); initialise the weights before "
                         "sharding it (before fully_shard / parallelize_module), where each is one full tensor")


def _module_targets(op: str, module: nn.Module) -> list[_Target]:
    """The weight of every ``INIT_LAYERS`` submodule, each parameter once (tied weights)."""
    found: list[_Target] = []
    seen: set[int] = set()
    for name, mod in module.named_modules():
        if not isinstance(mod, INIT_LAYERS) or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        layer = name or type(mod).__name__
        w = mod.weight
        if isinstance(w, nn.parameter.UninitializedParameter):
            raise ValueError(f"{op}: the weight of layer {layer!r} is not materialised yet (a lazy module); run "
                             "one forward pass first")
        if not isinstance(w, nn.Parameter):
            raise ValueError(
                f"{op}: cannot initialise the weight of layer {layer!r}: it is a {type(w).__name__}, not an "
                "nn.Parameter, so it is computed from other tensors (a parametrization, weight_norm, pruning, ...) "
                "and an in-place write would be lost; initialise the underlying parameter instead (e.g. "
                "layer.parametrizations.weight.original)")
        _refuse_sharded(op, f"the weight of layer {layer!r}", w)
        transposed = isinstance(mod, TRANSPOSED_LAYERS)
        check_tensor(op, f"the weight of layer {layer!r}", w, min_ndim=2,
                     form="(in, out/groups, *kernel)" if transposed else "(out, in) or (out, in/groups, *kernel)")
        if id(w) not in seen:
            seen.add(id(w))
            found.append(_Target(w, getattr(mod, "groups", 1), layer, transposed))
    if not found:
        raise ValueError(f"{op}: weight_or_weights (a {type(module).__name__}) has no nn.Linear, nn.Conv1d/2d/3d or "
                         "nn.ConvTranspose1d/2d/3d layer to initialise")
    return found


def _targets(op: str, weight_or_weights) -> list[_Target]:
    """The weights ``orthogonal_`` writes, checked: a module's Linear/Conv/ConvTranspose weights (with
    their groups), one tensor, or an iterable of tensors (groups = 1)."""
    if isinstance(weight_or_weights, nn.Module):
        return _module_targets(op, weight_or_weights)
    form = "(out, in) or (out, in/groups, *kernel)"
    if isinstance(weight_or_weights, torch.Tensor):
        _refuse_sharded(op, "weight_or_weights", weight_or_weights)
        check_tensor(op, "weight_or_weights", weight_or_weights, min_ndim=2, form=form)
        return [_Target(weight_or_weights, 1, "weight_or_weights")]
    if not isinstance(weight_or_weights, Iterable) or isinstance(weight_or_weights, (str, bytes, dict)):
        raise TypeError(f"{op}: weight_or_weights must be a weight tensor, a list of weight tensors or an nn.Module; "
                        f"got {type(weight_or_weights).__name__}")
    items = list(weight_or_weights)
    if not items:
        raise ValueError(f"{op}: weight_or_weights is empty; pass at least one weight tensor")
    found, seen = [], set()
    for i, w in enumerate(items):
        _refuse_sharded(op, f"weight_or_weights[{i}]", w)
        check_tensor(op, f"weight_or_weights[{i}]", w, min_ndim=2, form=form)
        if id(w) not in seen:  # the same tensor listed twice is drawn once
            seen.add(id(w))
            found.append(_Target(w, 1, f"weight_or_weights[{i}]"))
    return found


def _check_generator(op: str, generator, weights: Iterable[torch.Tensor]) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None; got {type(generator).__name__}")
    for w in weights:
        if w.device.type != generator.device.type:
            raise ValueError(f"{op}: generator must be on the weights' device ({w.device.type}); got a "
                             f"{generator.device.type} generator")


def _polar(A: torch.Tensor) -> torch.Tensor:
    """The polar factor ``U Vh`` of every matrix of ``A (N, r, c)`` (one ``batched_svd`` call):
    orthonormal rows for r ≤ c, orthonormal columns for r ≥ c."""
    U, _, Vh = _svd.batched_svd(A)
    return U @ Vh


def _orthogonal_matrices(draws: list[torch.Tensor]) -> list[torch.Tensor]:
    """The polar factors of Gaussian draws ``(g, r, c)`` (float32/float64), in their order; the
    draws of one (r, c, dtype, device) are stacked into one ``batched_svd`` call."""
    stacks: dict[tuple, list[int]] = {}
    for i, A in enumerate(draws):
        stacks.setdefault((*A.shape[1:], A.dtype, A.device), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(draws)
    for members in stacks.values():
        Q = _polar(torch.cat([draws[i] for i in members]))
        for i, part in zip(members, Q.split([draws[i].shape[0] for i in members])):
            out[i] = part
    return out


def orthogonal_(weight_or_weights: _Weights, gain: float = 1.0, *,
                generator: torch.Generator | None = None) -> _Weights:
    """Random (semi-)orthogonal initialisation, in place (docs/nn.md#orthogonal-initialization).

    Each weight is viewed as the matrix ``M (out, in·∏kernel)`` (a grouped conv layer given as a
    module: one matrix ``(out/g, in/g·∏kernel)`` per group; a ConvTranspose layer's weight
    ``(in, out/g, *kernel)`` as ``as_matrix(W, groups, transposed=True)``, the same shapes with one row
    per output channel) and set to ``gain · Q`` with ``Q``
    the polar factor ``U Vh`` of a standard Gaussian matrix ``A = U diag(S) Vh`` of that shape:

    - ``out ≤ in``: orthonormal rows, ``M Mᵀ = gain² I``;
    - ``out ≥ in``: orthonormal columns, ``Mᵀ M = gain² I``.

    Why the polar factor is Haar (uniform on the Stiefel manifold), like torch's sign-fixed QR:
    the Gaussian law of ``A`` is invariant under ``A → P A R`` for orthogonal ``P``, ``R``, and the
    polar factor is equivariant, ``polar(P A R) = P polar(A) R``, so the law of ``Q`` is
    invariant under both multiplications; the only such law is the uniform one. ``A`` has full
    rank almost surely, where the polar factor is unique, so the SVD's sign and basis choices do
    not matter and no sign fix is needed (QR needs one because its convention is not
    equivariant).

    ``weight_or_weights``: a weight tensor ``(out, in)`` or ``(out, in/groups, *kernel)`` (taken
    with groups = 1), an iterable of them, or an ``nn.Module`` (the weight of every
    ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` in it, grouped convs per group, a
    tied weight once; biases are not touched; a weight that is not an ``nn.Parameter``,
    e.g. of a parametrized layer, is refused). All matrices of one shape, compute dtype and
    device go through one ``batched_svd`` call.

    Draws: one ``torch.randn(groups, out/groups, in/groups·∏kernel)`` per weight, in the order
    given, in the weight's compute dtype on its device, from ``generator`` (on that device) or
    the default generator; so a list initialised in one call equals the same weights initialised
    one by one from the same generator state. Weights with no element are skipped.

    dtype: float32 / float64 are computed in their own dtype; float16 / bfloat16 in float32 and
    rounded on write (orthogonal up to that rounding). Runs under ``torch.no_grad()`` (a
    ``Parameter`` with ``requires_grad=True`` records no graph), writes through ``copy_`` (any
    strides), and checks every argument before drawing or writing anything.

    Raises ``TypeError`` for a non-tensor or non-floating weight, a ``gain`` that is not a real
    number, a ``generator`` that is not a ``torch.Generator``; ``ValueError`` for a weight with
    fewer than 2 dims, a non-finite ``gain``, an empty list, a module without such layers, a
    generator on another device. Returns ``weight_or_weights``.
    """
    op = "orthogonal_"
    targets = _targets(op, weight_or_weights)
    check_number(op, "gain", gain)
    _check_generator(op, generator, (t.weight for t in targets))
    todo = [t for t in targets if t.weight.numel() > 0]
    with torch.no_grad():
        # one draw per weight, in the weights' order, each in its compute dtype on its device
        draws = [torch.randn(*t.shape(), generator=generator, dtype=compute_dtype(t.weight.dtype),
                             device=t.weight.device) for t in todo]
        matrices = _orthogonal_matrices(draws)
        for t, Q in zip(todo, matrices):
            t.weight.copy_(t.from_matrices(Q * gain))
    return weight_or_weights


def delta_orthogonal_(weight: torch.Tensor, gain: float = 1.0, *, transposed: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Delta-orthogonal initialisation of a conv weight, in place (Xiao et al. 2018, "Dynamical
    Isometry and a Mean Field Theory of CNNs"; docs/nn.md#orthogonal-initialization).

    ``weight (out, in, *k)`` of a Conv1d/2d/3d (3, 4 or 5 dims), every ``k_i`` odd, ``out ≥ in``:
    every tap becomes 0 except the spatial centre ``c = (k_1//2, …)``, which becomes ``gain · Q``
    with ``Q (out, in)`` the polar factor of a standard Gaussian matrix (Haar-distributed, see
    ``orthogonal_``), so ``Qᵀ Q = I``. The convolution then maps ``x`` to ``gain · Q x`` at every
    position: with stride 1 and padding ``k//2``, zero or circular, the operator is
    ``gain · (Q ⊗ I)`` and all its singular values equal ``gain`` (an isometry times gain).

    ``out < in`` is refused (``Q`` could only have orthonormal rows and the operator would not
    be injective), as are even kernel sizes: they have no centre tap, and a delta placed off
    centre is a shifted identity, which zero padding truncates at the border. The weight is taken
    with groups = 1; for a grouped conv, initialise each group's slice
    ``weight[i·out/g:(i+1)·out/g]`` (needs ``out/g ≥ in/g``).

    ``transposed=True``: ``weight (in, out, *k)`` of a ConvTranspose1d/2d/3d, ``out ≥ in``, every
    ``k_i`` odd: the centre tap becomes ``gain · Qᵀ`` with ``Q (out, in)`` as above. The transposed
    conv is the adjoint of the conv with this weight, which maps ``y`` to ``gain · Qᵀ y`` per position,
    so it maps ``x`` to ``gain · Q x`` at every position: with stride 1, padding ``dilation·(k//2)``
    and output_padding 0 (output size = input size) its operator is ``gain · (Q ⊗ I)``, all singular
    values ``gain``. Groups as above (slices ``weight[i·in/g:(i+1)·in/g]``).

    Draw: one ``torch.randn(1, out, in)`` in the compute dtype on the weight's device from
    ``generator``; float16 / bfloat16 are computed in float32 and rounded on write. Runs under
    ``torch.no_grad()``, writes through ``copy_``; all arguments are checked first. Returns
    ``weight``.
    """
    op = "delta_orthogonal_"
    _refuse_sharded(op, "weight", weight)
    if not isinstance(transposed, bool):
        raise TypeError(f"{op}: transposed must be True or False; got {transposed!r}")
    if transposed:
        check_tensor(op, "weight", weight, ndim=(3, 4, 5),
                     form="(a ConvTranspose1d/2d/3d weight (in, out, *kernel), with transposed=True)")
        cin, out, *kernel = weight.shape
    else:
        check_tensor(op, "weight", weight, ndim=(3, 4, 5), form="(a Conv1d/2d/3d weight (out, in, *kernel))")
        out, cin, *kernel = weight.shape
    if out < cin:
        layout = "(in, out, *kernel) of a transposed conv" if transposed else "(out, in, *kernel)"
        raise ValueError(f"{op}: needs out >= in (the centre tap is an (out, in) matrix with orthonormal columns, "
                         f"Xiao et al. 2018); got weight of shape {tuple(weight.shape)}, read as {layout}, with "
                         f"out={out} < in={cin}")
    if any(k % 2 == 0 for k in kernel):
        raise ValueError(f"{op}: needs an odd kernel size in every spatial dim (an even kernel has no centre tap); "
                         f"got weight of shape {tuple(weight.shape)}, kernel {tuple(kernel)}")
    check_number(op, "gain", gain)
    _check_generator(op, generator, [weight])
    if weight.numel() == 0:
        return weight
    with torch.no_grad():
        A = torch.randn(1, out, cin, generator=generator, dtype=compute_dtype(weight.dtype), device=weight.device)
        (Q,) = _orthogonal_matrices([A])
        new = torch.zeros(weight.shape, dtype=Q.dtype, device=weight.device)
        # a ConvTranspose's tap is (in, out): the adjoint conv's, Qᵀ
        new[(slice(None), slice(None), *(k // 2 for k in kernel))] = (Q[0].mT if transposed else Q[0]) * gain
        weight.copy_(new)
    return weight
