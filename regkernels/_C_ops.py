"""The Python side of the C++ ops (``torch.ops.regkernels.*``, schemas in csrc/regkernels.cpp).

For every C++ op: its fake (``register_fake``, for torch.compile and opcheck) and its autograd,
and the functions the families' backend tables name for the ``"cpu"`` and ``"cuda"`` backends
(they adapt the public arguments to the op's schema). Imported by ``regkernels._ext`` once the
extension has loaded; never imported when it has not. One section per op family.
"""
from __future__ import annotations

import torch


# ============================================================================ gram family
# The C++ op gram_penalty_fwd (csrc/cpu/gram_cpu.cpp: BLAS Gram, one fused epilogue that also
# leaves the (batch, k, k) gradient coefficients P) and gram_penalty_bwd (dW = g·P·W, one BLAS
# product); their autograd is C++ (csrc/autograd/gram_autograd.cpp), the entry functions of the
# gram TABLE's "cpu" rows are below. docs/gram.md.

import math  # noqa: E402

from regkernels import _gram_kernels as _GK  # noqa: E402
from regkernels.composite import gram as _gram_composite  # noqa: E402
from regkernels.reference import gram as _gram_reference  # noqa: E402


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


class _GramPenaltyFunction(torch.autograd.Function):
    """gram_penalty_fwd for torch.func (grad, vjp, vmap): the C++ autograd cannot run under its
    transforms, so this Function calls the op below them. Only functorch-wrapped inputs come
    here (``_gram_values``): on plain tensors a Python Function costs more host time than the
    whole kernel on a small layer, and the C++ autograd is used.

    Inputs ``(kind, sides, params, need_grad, *mats)``; outputs ``(values, *coefs)``, the
    coefficients returned (non-differentiable) so that torch.func can save them.
    """

    @staticmethod
    def forward(kind, sides, params, need_grad, *mats):
        values, coefs = torch.ops.regkernels.gram_penalty_fwd(list(mats), kind, list(sides), list(params), need_grad)
        return (values, *coefs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        kind, sides, _params, _need_grad, *mats = inputs
        ctx.kind, ctx.sides, ctx.count = kind, sides, len(mats)
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*mats, *output[1:])

    @staticmethod
    def backward(ctx, grad_values, *_grad_coefs):
        grads = _GramPenaltyGradFunction.apply(ctx.kind, ctx.sides, grad_values, ctx.count, *ctx.saved_tensors)
        return (None, None, None, None, *grads)

    @staticmethod
    def vmap(info, in_dims, kind, sides, params, need_grad, *mats):
        V = info.batch_size
        mats = _GK.to_front(V, in_dims[4:], mats)
        values, *coefs = _GramPenaltyFunction.apply(kind, sides, params, need_grad, *mats)
        sizes = [math.prod(w.shape[1:-2]) for w in mats]
        # coefficients: (V·batch, k, k) → (V, batch, k, k); without need_grad they are (0,), unbatched
        coefs = [c.view(V, -1, *c.shape[1:]) if c.dim() == 3 else c for c in coefs]
        return ((_GK.batch_major(values, sizes, V), *coefs),
                (0, *[0 if c.dim() == 4 else None for c in coefs]))


class _GramPenaltyGradFunction(torch.autograd.Function):
    """gram_penalty_bwd as a graph node for torch.func and ``create_graph=True``: the values are
    the first gradient; differentiating them raises (P is a constant of the forward, so the
    derivative of dW = g·P·W would miss ∂P/∂W), naming backend='reference'.

    Inputs ``(kind, sides, grad, count, *mats, *coefs)`` (``count`` matrices).
    """

    @staticmethod
    def forward(kind, sides, grad, count, *tensors):
        mats, coefs = list(tensors[:count]), list(tensors[count:])
        return tuple(torch.ops.regkernels.gram_penalty_bwd(mats, coefs, list(sides), grad))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.kind = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_GK.no_double_backward(ctx.kind, "cpu"))

    @staticmethod
    def vmap(info, in_dims, kind, sides, grad, count, *tensors):
        V = info.batch_size
        mats = _GK.to_front(V, in_dims[4:4 + count], tensors[:count])
        # (V, batch, k, k) → (V·batch, k, k), matrix after matrix as the op lists them
        coefs = [c.flatten(0, 1) for c in _GK.to_front(V, in_dims[4 + count:], tensors[count:])]
        sizes = [math.prod(w.shape[1:-2]) for w in mats]
        grad = _GK.item_major(_GK.to_front(V, in_dims[2:3], [grad])[0], sizes)
        return _GramPenaltyGradFunction.apply(kind, sides, grad, count, *mats, *coefs), (0,) * count


def _gram_values(mats: list[torch.Tensor], kind: str, sides: list[int], params: list[float]) -> torch.Tensor:
    """One value per matrix of ``mats`` (each ``(..., m, n)``, taken as they are: no reshape node
    in the autograd graph), in the compute dtype."""
    if _GK.functorch_wrapped(mats):
        return _GramPenaltyFunction.apply(kind, tuple(sides), tuple(params), torch.is_grad_enabled(), *mats)[0]
    need_grad = torch.is_grad_enabled() and any(w.requires_grad for w in mats)
    values, _ = torch.ops.regkernels.gram_penalty_fwd(mats, kind, sides, params, need_grad)
    return values


def _gram_penalty_one(op: str, kind: str, W: torch.Tensor, side: int, params: list[float]) -> torch.Tensor:
    _GK.check_dense_gram(op, "W", W, kind, side)
    return _gram_values([W], kind, [side], params).view(W.shape[:-2]).to(W.dtype)


def frame_penalty(W: torch.Tensor, A: float, B: float, side: str = "auto") -> torch.Tensor:
    return _gram_penalty_one("frame_penalty", "frame", W, _GK.side_code(W, "frame", side), [float(A), float(B)])


def diversity_penalty(W: torch.Tensor, tau: float, inclusive: bool = True) -> torch.Tensor:
    return _gram_penalty_one("diversity_penalty", "diversity", W, 0, [float(tau), float(inclusive)])


def orthogonality_penalty(W: torch.Tensor, side: str = "auto", squared: bool = True) -> torch.Tensor:
    return _gram_penalty_one("orthogonality_penalty", "orthogonality", W, _GK.side_code(W, "orthogonality", side),
                             [float(squared)])


def mhe_penalty(W: torch.Tensor, s: int = 2, half: bool = False, eps: float = 1e-4) -> torch.Tensor:
    return _gram_penalty_one("mhe_penalty", "mhe", W, 0, [float(s), float(half), float(eps)])


def penalty_multi(weights: list[torch.Tensor], kind: str, groups: list[int], **args) -> torch.Tensor:
    """Every weight of the list in one call of the C++ op (one dtype; the public op checks).
    kind="srip" has no Gram to fuse: each weight goes through the SRIP composite."""
    if kind == "srip":
        return _gram_composite.srip_penalty_multi(weights, groups, args["b"], args["n_iter"])
    mats = [_gram_reference.as_matrix(w, g) for w, g in zip(weights, groups)]
    sides = [_GK.side_code(mat, kind, args.get("side", "auto")) for mat in mats]
    for i, (mat, side) in enumerate(zip(mats, sides)):
        _GK.check_dense_gram("penalty_multi", f"as_matrix(weights[{i}])", mat, kind, side)
    values = _gram_values(mats, kind, sides, _GK.kernel_params(kind, args))
    return _GK.group_means(values, mats).to(weights[0].dtype)

# ============================================================================ end of gram family


# ============================================================================ conv family
# (fakes, autograd and table entries of conv_to_matrix_dense(_backward), conv_frame_stats* ...)

# ============================================================================ end of conv family


# ============================================================================ svd family
# (fakes, autograd and table entries of batched_svd; the Sedghi conv singular values)

# ============================================================================ end of svd family


# ============================================================================ beta_lasso family
# (fake and table entry of beta_lasso_step_)

# ============================================================================ end of beta_lasso family
