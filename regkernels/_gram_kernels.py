"""How the gram family's fused kernels are called: what the C++ entry functions (regkernels/_C_ops.py)
and the Triton ones (regkernels/triton/gram.py) share, in one copy (docs/gram.md).

The kernels compute one penalty over a list of matrices ``mats[i]`` (a single op is a list of
one; ``penalty_multi`` is a whole model) given per matrix a side code, 0 = rows (``W Wᵀ``) or
1 = cols (``Wᵀ W``), and the kind's scalar params as floats: frame ``[A, B]``, diversity
``[tau, inclusive]``, orthogonality ``[squared]`` (the C++ kernel; Triton takes ``[]`` and the
norm is taken here), mhe ``[s, half, eps, angular]``.

torch.func: the kernels' autograd (C++ for the C++ op, ``register_autograd`` for the Triton
custom op) cannot run under torch.func transforms, so functorch-wrapped inputs go through a
Python ``autograd.Function`` with ``setup_context`` and a vmap rule instead
(``regkernels._numerics.functorch_wrapped``). The vmap rules run the kernel once on the batched stack: every op
takes leading batch dims, so the vmapped dim is moved to the front; the kernels' flat outputs
(one value per matrix, the Triton stats) list matrix after matrix, and ``batch_major`` /
``item_major`` convert them between that order and the (vmap batch, …) one.

Imports the reference only (no cycle with regkernels.ops, _C_ops or the Triton module).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from regkernels.reference import gram as R

ROWS_ONLY = ("diversity", "mhe")


def side_code(W: torch.Tensor, kind: str, side: str = "auto") -> int:
    """The kernel's side code of ``W`` for ``kind``: 0 = rows (W Wᵀ), 1 = cols (Wᵀ W)."""
    if kind in ROWS_ONLY:
        return 0
    return 0 if R.resolve_side(W, side) == "rows" else 1


def kernel_params(kind: str, args: dict) -> list[float]:
    """The checked keyword arguments of ``kind`` as the kernels' float params."""
    if kind == "frame":
        return [float(args["A"]), float(args["B"])]
    if kind == "diversity":
        return [float(args["tau"]), float(args["inclusive"])]
    if kind == "orthogonality":
        return [float(args["squared"])]
    return [float(args["s"]), float(args["half"]), float(args["eps"]), float(args.get("angular", False))]


def check_dense_gram(op: str, what: str, W: torch.Tensor, kind: str, side: int) -> None:
    """The C++ kernel's Gram stack against ``R.MAX_GRAM_BYTES`` (ValueError before allocating).

    It forms ``(batch, k, k)``: k = m ("rows", side 0) or n ("cols"), for orthogonality always
    min(m, n) (the identity in gram_penalty_fwd_cpu), and keeps it for the backward.
    """
    m, n = W.shape[-2:]
    k = min(m, n) if kind == "orthogonality" else (m if side == 0 else n)
    R.check_gram_bytes(op, f"{what} of shape {tuple(W.shape)}", math.prod(W.shape[:-2]), k, W.dtype,
                       R.ADVICE_ROWS if kind in ROWS_ONLY else R.ADVICE_SIDE)


def as_batch(W: torch.Tensor) -> torch.Tensor:
    """``(..., m, n)`` → ``(B, m, n)`` (a view when possible; B may be 0)."""
    return W.reshape(math.prod(W.shape[:-2]), *W.shape[-2:])


@functools.lru_cache(maxsize=64)
def _group_mean_tables(counts: tuple[int, ...], dtype: torch.dtype,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``values`` holding ``counts[i]`` consecutive group values of weight i: the weight of
    each value (``index``) and ``1 / counts`` (``scale``). Cached: a model's counts repeat every
    step, and building them cost more than the kernel on a depthwise conv's 1×9 groups."""
    index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(device)
    scale = torch.tensor([1.0 / c for c in counts], dtype=dtype).to(device)
    return index, scale


def group_means(values: torch.Tensor, mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """One value per weight from the kernel's one per matrix: a grouped conv's ``(g, ·, ·)``
    matrices give the mean over their groups (docs/gram.md, as_matrix)."""
    counts = [m.shape[0] if m.dim() == 3 else 1 for m in mats]
    if all(c == 1 for c in counts):
        return values
    # (built afresh while tracing, so that no traced tensor lands in the cache)
    tables = _group_mean_tables.__wrapped__ if torch.compiler.is_compiling() else _group_mean_tables
    index, scale = tables(tuple(counts), values.dtype, values.device)
    return torch.zeros(len(mats), dtype=values.dtype, device=values.device).index_add(0, index, values) * scale


def no_double_backward(kind: str, backend: str) -> str:
    """The error of a kernel's gradient when it is differentiated (P is a constant of the forward)."""
    return (f"{kind}_penalty (and penalty_multi with kind={kind!r}): double backward (differentiating a gradient "
            f"taken with create_graph=True) is not supported by the {backend!r} kernel; use "
            f"backend='reference', which differentiates twice through torch ops")


# ----------------------------------------------------------------------------- torch.func

def to_front(batch_size: int, dims: Sequence[int | None], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor with its vmapped dim moved to the front (an unbatched one expanded, a view)."""
    return [t.movedim(d, 0) if d is not None else t.expand(batch_size, *t.shape) for t, d in zip(tensors, dims)]


def batch_major(flat: torch.Tensor, sizes: Sequence[int], batch_size: int) -> torch.Tensor:
    """A kernel's flat output over batched items → ``(batch_size, Σ sizes)``.

    Item i (a matrix stack moved to the front) holds ``batch_size · sizes[i]`` consecutive
    entries in (vmap index, entry) order; the result holds, per vmap index, every item's
    entries in item order, as the unbatched call would."""
    parts = flat.split([batch_size * s for s in sizes])
    return torch.cat([p.view(batch_size, s) for p, s in zip(parts, sizes)], 1)


def item_major(batched: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The inverse of ``batch_major``: ``(batch_size, Σ sizes)`` → the kernels' flat order."""
    return torch.cat([p.reshape(-1) for p in batched.split(list(sizes), 1)])
