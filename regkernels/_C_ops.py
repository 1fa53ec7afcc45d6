"""The Python side of the C++ ops (``torch.ops.regkernels.*``, schemas in csrc/regkernels.cpp).

For every C++ op: its fake (``register_fake``, for torch.compile and opcheck) and its autograd,
and the functions the families' backend tables name for the ``"cpu"`` and ``"cuda"`` backends
(they adapt the public arguments to the op's schema). Imported by ``regkernels._ext`` once the
extension has loaded; never imported when it has not. One section per op family.
"""
from __future__ import annotations

import torch

from regkernels._numerics import functorch_wrapped as _functorch_wrapped, through_function as _through_function


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
    if _functorch_wrapped(*mats):
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


def mhe_penalty(W: torch.Tensor, s: int = 2, half: bool = False, eps: float = 1e-4,
                angular: bool = False) -> torch.Tensor:
    return _gram_penalty_one("mhe_penalty", "mhe", W, 0, [float(s), float(half), float(eps), float(angular)])


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
# conv_to_matrix_dense / conv_to_matrix_dense_backward (csrc/cpu/conv_matrix_cpu.cpp): fakes, autograd,
# and the "cpu" row of conv_to_matrix (docs/conv.md).

from regkernels import _geometry as _conv_geometry  # noqa: E402
from regkernels.reference import conv as _conv_reference  # noqa: E402


@torch.library.register_fake("regkernels::conv_to_matrix_dense")
def _conv_to_matrix_dense_fake(weight, input_size, stride, padding, dilation, groups, circular):
    rows, cols = _conv_geometry.check_dense_args("regkernels::conv_to_matrix_dense", weight, input_size, stride,
                                                 padding, dilation, groups, circular)
    return weight.new_empty((rows, cols))


@torch.library.register_fake("regkernels::conv_to_matrix_dense_backward")
def _conv_to_matrix_dense_backward_fake(grad, weight, input_size, stride, padding, dilation, groups, circular):
    op = "regkernels::conv_to_matrix_dense_backward"
    shape = _conv_geometry.check_dense_args(op, weight, input_size, stride, padding, dilation, groups, circular)
    _conv_geometry.check_dense_grad(op, grad, weight, shape)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _conv_to_matrix_dense_setup(ctx, inputs, output) -> None:
    weight, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(weight)


def _conv_to_matrix_dense_grad(ctx, grad):
    (weight,) = ctx.saved_tensors
    return (torch.ops.regkernels.conv_to_matrix_dense_backward(grad, weight, *ctx.geometry),) + (None,) * 6


def _conv_to_matrix_dense_backward_setup(ctx, inputs, output) -> None:
    _grad, weight, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(weight)


def _conv_to_matrix_dense_backward_grad(ctx, grad_gw):
    # T is linear in the weight, so the backward gW = Bᵀ(grad) is linear in grad (B = the forward's
    # map) and does not depend on the weight's values: its derivative w.r.t. grad is the forward op
    # applied to the incoming ∂L/∂gW, and w.r.t. the weight 0. Double backward is exact, and the
    # chain closes: the forward op's own backward is again this backward op.
    (weight,) = ctx.saved_tensors
    return (torch.ops.regkernels.conv_to_matrix_dense(grad_gw.to(weight.dtype), *ctx.geometry), None) + (None,) * 6


# the raw ops stay differentiable (torch.ops.regkernels.*, opcheck); conv_to_matrix goes through
# _ConvToMatrixDense below, which torch.func can transform
torch.library.register_autograd("regkernels::conv_to_matrix_dense", _conv_to_matrix_dense_grad,
                                setup_context=_conv_to_matrix_dense_setup)
torch.library.register_autograd("regkernels::conv_to_matrix_dense_backward", _conv_to_matrix_dense_backward_grad,
                                setup_context=_conv_to_matrix_dense_backward_setup)


class _ConvToMatrixDense(torch.autograd.Function):
    """``regkernels::conv_to_matrix_dense`` for ``conv_to_matrix``. The op's ``register_autograd``
    does not run under ``torch.func.grad``; an autograd.Function with ``setup_context`` does (its
    forward calls the op below the transform), and its vmap rule runs the op once per layer.
    ``conv_to_matrix`` takes it under torch.func and torch.compile, the raw op (same backward)
    otherwise (``regkernels._numerics.through_function``)."""

    @staticmethod
    def forward(weight, input_size, stride, padding, dilation, groups, circular):
        return torch.ops.regkernels.conv_to_matrix_dense(weight, input_size, stride, padding, dilation, groups,
                                                         circular)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _conv_to_matrix_dense_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return (_ConvToMatrixDenseBackward.apply(grad, weight, *ctx.geometry),) + (None,) * 6

    @staticmethod
    def vmap(info, in_dims, *args):
        return _conv_geometry.vmap_by_loop(_ConvToMatrixDense.apply, info, in_dims, *args)


class _ConvToMatrixDenseBackward(torch.autograd.Function):
    """``regkernels::conv_to_matrix_dense_backward``; its derivative w.r.t. ``grad`` is the forward
    (``_conv_to_matrix_dense_backward_grad``), so double backward stays exact."""

    @staticmethod
    def forward(grad, weight, input_size, stride, padding, dilation, groups, circular):
        return torch.ops.regkernels.conv_to_matrix_dense_backward(grad, weight, input_size, stride, padding,
                                                                  dilation, groups, circular)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _conv_to_matrix_dense_backward_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_gw):
        (weight,) = ctx.saved_tensors
        return (_ConvToMatrixDense.apply(grad_gw.to(weight.dtype), *ctx.geometry), None) + (None,) * 6

    @staticmethod
    def vmap(info, in_dims, *args):
        return _conv_geometry.vmap_by_loop(_ConvToMatrixDenseBackward.apply, info, in_dims, *args)


def conv_to_matrix(weight: torch.Tensor, input_size, stride=1, padding=0, dilation=1, groups: int = 1,
                   padding_mode: str = "zeros", layout: str = "dense",
                   max_dense_bytes: int | None = None) -> torch.Tensor:
    """Dense ``T`` by the C++ kernel (one pass per row; its backward is a gather, one owner per
    weight entry), arguments as the reference's; the sparse layouts are backend ``"torch"``."""
    if layout != "dense":
        raise ValueError(f"conv_to_matrix: backend 'cpu' builds layout='dense' only; got layout={layout!r} "
                         f"(the sparse layouts: backends 'torch', 'reference')")
    shape = _conv_geometry.matrix_shape(weight, input_size, stride, padding, dilation, groups)
    _conv_reference.check_dense_matrix(weight, shape, max_dense_bytes)
    w5, *geometry = _conv_geometry.normalise(weight, input_size, stride, padding, dilation)
    if _through_function():
        return _ConvToMatrixDense.apply(w5, *geometry, groups, padding_mode == "circular")
    return torch.ops.regkernels.conv_to_matrix_dense(w5, *geometry, groups, padding_mode == "circular")


# ---------------------------------------------------------------------------- conv frame statistics
# conv_frame_stats_cpu / conv_frame_stats_cpu_backward (csrc/cpu/conv_frame_cpu.cpp: BLAS tap Gram from its
# upper blocks, one parallel pass for the class contraction; backward: the transposed pass and ONE product):
# the plan the kernel reads, fakes, autograd, and the "cpu" rows of conv_frame_penalty /
# conv_gershgorin_bounds (docs/conv.md#conv_frame_penalty).

import functools  # noqa: E402
import itertools  # noqa: E402

from regkernels._dtypes import compute_dtype as _compute_dtype  # noqa: E402

# The forward keeps the scaled tap Gram X̂ for the backward (saving the backward one GEMM, the larger
# half of the forward's time) when it needs at most this many bytes; above, the backward forms it again.
KEEP_TAP_GRAM_BYTES = 1 << 30

_FRAME_DOUBLE_BACKWARD = ("conv_frame_penalty / conv_gershgorin_bounds: double backward (a backward with "
                          "create_graph=True differentiated again) is not supported by backend='cpu'; "
                          "backend='reference' supports it")


def _frame_plan_lists(geo) -> tuple[list[int], list[int], int, int]:
    """The class contraction of ``geo`` as the kernel reads it: rows ``(t, t', q, multiplicity)`` of the
    combined table ``Π_i Cls_i[κ_i, t_i, t'_i, q_i]`` (taps, offsets and classes flattened row-major over
    the three dims, classes in the stats' order), grouped by class and sorted by offset within one;
    ``class_ptr`` the first row of each class; the number of offsets; the index of offset 0."""
    per_dim = []
    for dim in geo.dims:
        k, nr = dim.k, len(dim.rel)
        classes = [[] for _ in range(dim.n_cls)]
        for idx, mult in enumerate(dim.table):
            if mult:
                c, rest = divmod(idx, k * k * nr)
                t, rest = divmod(rest, k * nr)
                t2, q = divmod(rest, nr)
                classes[c].append((t, t2, q, int(mult)))
        per_dim.append((classes, k, nr))
    (c0, k0, r0), (c1, k1, r1), (c2, k2, r2) = per_dim
    plan, ptr = [], [0]
    for a, b, c in itertools.product(c0, c1, c2):
        rows = [((x0 * k1 + x1) * k2 + x2, (y0 * k1 + y1) * k2 + y2, (q0 * r1 + q1) * r2 + q2, m0 * m1 * m2)
                for (x0, y0, q0, m0), (x1, y1, q1, m1), (x2, y2, q2, m2) in itertools.product(a, b, c)]
        rows.sort(key=lambda row: row[2])
        for row in rows:
            plan.extend(row)
        ptr.append(len(plan) // 4)
    z0, z1, z2 = (dim.zero for dim in geo.dims)
    return plan, ptr, r0 * r1 * r2, (z0 * r1 + z1) * r2 + z2


@functools.lru_cache(maxsize=256)
def _frame_plan_cached(geo) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    plan, ptr, n_offsets, zero = _frame_plan_lists(geo)
    return (torch.tensor(plan, dtype=torch.int32).view(-1, 4), torch.tensor(ptr, dtype=torch.int32), n_offsets,
            zero)


def _frame_cpu_plan(geo) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(plan, class_ptr, n_offsets, zero)`` of ``_frame_plan_lists`` as int32 CPU tensors, cached per
    geometry (read-only); built afresh while torch.compile traces, so no traced tensor is cached."""
    if torch.compiler.is_compiling():
        return _frame_plan_cached.__wrapped__(geo)
    return _frame_plan_cached(geo)


def _check_stats_cpu(op, weight, plan, class_ptr, n_offsets, zero, groups):
    """The raw ops' checks the fakes repeat (the kernel's TORCH_CHECKs): RuntimeError naming ``op``."""
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 5 and weight.dtype.is_floating_point):
        raise RuntimeError(f"{op}: weight must be a floating 5-D (C_out, C_in/groups, k0, k1, k2) tensor; got "
                           f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if not (isinstance(groups, int) and groups >= 1 and weight.shape[0] % groups == 0):
        raise RuntimeError(f"{op}: groups must be >= 1 and divide C_out = {weight.shape[0]}; got groups = {groups}")
    if plan.dtype != torch.int32 or plan.dim() != 2 or plan.shape[1] != 4 or class_ptr.dtype != torch.int32 \
            or class_ptr.dim() != 1 or class_ptr.numel() < 1:
        raise RuntimeError(f"{op}: plan must be int32 (entries, 4) and class_ptr int32 (classes + 1,); got "
                           f"{plan.dtype} {tuple(plan.shape)}, {class_ptr.dtype} {tuple(class_ptr.shape)}")
    if not (isinstance(n_offsets, int) and isinstance(zero, int) and 0 <= zero < n_offsets):
        raise RuntimeError(f"{op}: need n_offsets >= 1 and 0 <= zero < n_offsets; got {n_offsets}, {zero}")


def _stats_cpu_shapes(weight, class_ptr, groups: int, rows: bool) -> tuple[int, int, int, int]:
    """``(G, NC, Cx, N)``: the stats' shape and the side of the tap Gram."""
    og, cg = weight.shape[0] // groups, weight.shape[1]
    cx = og if rows else cg
    return groups, class_ptr.shape[0] - 1, cx, math.prod(weight.shape[2:]) * cx


@torch.library.register_fake("regkernels::conv_frame_stats_cpu")
def _conv_frame_stats_cpu_fake(weight, plan, class_ptr, n_offsets, zero, groups, rows, keep):
    _check_stats_cpu("regkernels::conv_frame_stats_cpu", weight, plan, class_ptr, n_offsets, zero, groups)
    G, nc, cx, n = _stats_cpu_shapes(weight, class_ptr, groups, rows)
    d = weight.new_empty((G, nc, cx), dtype=_compute_dtype(weight.dtype))
    X = d.new_empty((G, n, n) if keep and G * nc * cx else (0,))
    return d, torch.empty_like(d), X


@torch.library.register_fake("regkernels::conv_frame_stats_cpu_backward")
def _conv_frame_stats_cpu_backward_fake(weight, tap_gram, grad_d, grad_r, plan, class_ptr, n_offsets, zero, groups,
                                        rows):
    op = "regkernels::conv_frame_stats_cpu_backward"
    _check_stats_cpu(op, weight, plan, class_ptr, n_offsets, zero, groups)
    want = _stats_cpu_shapes(weight, class_ptr, groups, rows)[:3]
    for name, g in (("grad_d", grad_d), ("grad_r", grad_r)):
        if tuple(g.shape) != want or not g.dtype.is_floating_point:
            raise RuntimeError(f"{op}: {name} must be a floating tensor of shape {want} (groups, border classes, "
                               f"channels); got {g.dtype} {tuple(g.shape)}")
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _stats_cpu_setup(ctx, inputs, output) -> None:
    weight, plan, class_ptr, n_offsets, zero, groups, rows, _keep = inputs
    ctx.args = (n_offsets, zero, groups, rows)
    ctx.save_for_backward(weight, output[2], plan, class_ptr)


def _stats_cpu_grad(ctx, grad_d, grad_r, _grad_x):
    weight, X, plan, class_ptr = ctx.saved_tensors
    gW = torch.ops.regkernels.conv_frame_stats_cpu_backward(weight, X, grad_d, grad_r, plan, class_ptr, *ctx.args)
    return (gW,) + (None,) * 7


def _stats_cpu_refuse(ctx, *grads):
    # the second derivative of d / r (through sign(V) and the tap Gram) is not implemented, and
    # torch's default for an op without autograd is a warning and a silent 0
    raise RuntimeError(_FRAME_DOUBLE_BACKWARD)


torch.library.register_autograd("regkernels::conv_frame_stats_cpu", _stats_cpu_grad, setup_context=_stats_cpu_setup)
torch.library.register_autograd("regkernels::conv_frame_stats_cpu_backward", _stats_cpu_refuse,
                                setup_context=lambda ctx, inputs, output: None)


class _FrameStatsCPU(torch.autograd.Function):
    """``regkernels::conv_frame_stats_cpu`` under torch.func and torch.compile (a custom op's
    ``register_autograd`` does not run under ``torch.func.grad``); eager calls on plain tensors take the
    raw op, whose registered autograd is the same backward (``regkernels._numerics.through_function``)."""

    @staticmethod
    def forward(weight, plan, class_ptr, n_offsets, zero, groups, rows, keep):
        return torch.ops.regkernels.conv_frame_stats_cpu(weight, plan, class_ptr, n_offsets, zero, groups, rows, keep)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _stats_cpu_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    def backward(ctx, grad_d, grad_r, _grad_x):
        weight, X, plan, class_ptr = ctx.saved_tensors
        return (_FrameStatsCPUBackward.apply(weight, X, grad_d, grad_r, plan, class_ptr, *ctx.args),) + (None,) * 7

    @staticmethod
    def vmap(info, in_dims, *args):
        return _conv_geometry.vmap_by_loop(_FrameStatsCPU.apply, info, in_dims, *args)


class _FrameStatsCPUBackward(torch.autograd.Function):
    """``regkernels::conv_frame_stats_cpu_backward``, differentiable once: differentiating it raises."""

    @staticmethod
    def forward(weight, X, grad_d, grad_r, plan, class_ptr, n_offsets, zero, groups, rows):
        return torch.ops.regkernels.conv_frame_stats_cpu_backward(weight, X, grad_d, grad_r, plan, class_ptr,
                                                                  n_offsets, zero, groups, rows)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(_FRAME_DOUBLE_BACKWARD)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _conv_geometry.vmap_by_loop(_FrameStatsCPUBackward.apply, info, in_dims, *args)


def _frame_stats_cpu(op: str, weight: torch.Tensor, input_size, stride, padding, dilation, groups: int,
                     padding_mode: str, side: str):
    """``(d, r, counts, k)`` as ``regkernels.composite.conv._stats``, by the C++ kernel."""
    (kernel, *geometry), circular, rows, counts, positions = _conv_geometry.frame_plan(
        op, tuple(weight.shape), tuple(input_size), stride, padding, dilation, groups, padding_mode, side, False,
        _conv_reference.MAX_WORK_BYTES)
    geo = _conv_geometry.FrameGeometry(tuple(kernel), *(tuple(g) for g in geometry), circular, rows)
    plan, class_ptr, n_offsets, zero = _frame_cpu_plan(geo)
    w5 = weight.reshape(weight.shape[0], weight.shape[1], *kernel)
    G, _, cx, n = _stats_cpu_shapes(w5, class_ptr, groups, rows)
    itemsize = 8 if weight.dtype == torch.float64 else 4
    keep = torch.is_grad_enabled() and weight.requires_grad and G * n * n * itemsize <= KEEP_TAP_GRAM_BYTES
    args = (w5, plan, class_ptr, n_offsets, zero, groups, rows, keep)
    if _through_function():
        d, r, _ = _FrameStatsCPU.apply(*args)
    else:
        d, r, _ = torch.ops.regkernels.conv_frame_stats_cpu(*args)
    counts = _conv_geometry.class_counts(counts, d.dtype, d.device)  # cached on the device
    return d, r, counts, G * cx * positions


def conv_frame_penalty(weight: torch.Tensor, input_size, A: float, B: float, stride=1, padding=0, dilation=1,
                       groups: int = 1, padding_mode: str = "zeros", side: str = "auto") -> torch.Tensor:
    """docs/conv.md's frame penalty on the C++ kernel's stats, arguments as the reference's."""
    d, r, counts, k = _frame_stats_cpu("conv_frame_penalty", weight, input_size, stride, padding, dilation, groups,
                                       padding_mode, side)
    return _conv_geometry.frame_value(d, r, A, B, k, weight.dtype, counts=counts[:, None])


def conv_frame_penalty_multi(weights, input_size, A: float, B: float, stride=1, padding=0, dilation=1,
                             groups: int = 1, padding_mode: str = "zeros", side: str = "auto") -> torch.Tensor:
    """``(L,)``: ``conv_frame_penalty`` of ``L`` layers of one shape and geometry from ONE kernel call, the
    layers concatenated as one conv with ``L·groups`` groups (docs/conv.md#conv_frame_penalty_multi). The
    kernel scales every group by its own power of two, so no per-layer scale is needed here."""
    L = len(weights)
    W = torch.cat(list(weights))
    d, r, counts, k = _frame_stats_cpu("conv_frame_penalty_multi", W, input_size, stride, padding, dilation,
                                       L * groups, padding_mode, side)
    return _conv_geometry.frame_values(d, r, A, B, L, k // L, weights[0].dtype, counts)


def conv_gershgorin_bounds(weight: torch.Tensor, input_size, stride=1, padding=0, dilation=1, groups: int = 1,
                           padding_mode: str = "zeros", side: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(min(d − r), max(d + r))`` over the classes, on the C++ kernel's stats."""
    d, r, _, _ = _frame_stats_cpu("conv_gershgorin_bounds", weight, input_size, stride, padding, dilation, groups,
                                  padding_mode, side)
    return _conv_geometry.gershgorin_value(d, r, weight.dtype)

# ============================================================================ end of conv family


# ============================================================================ svd family
# (fakes, autograd and table entries of batched_svd; the Sedghi conv singular values)

from regkernels.reference import conv as _conv_ref  # noqa: E402
from regkernels.reference import svd as _svd_ref  # noqa: E402
from regkernels._dtypes import upcast as _upcast  # noqa: E402
from regkernels._numerics import first_order_only as _first_order_only  # noqa: E402

# Largest max(m, n) the Jacobi kernel takes (csrc: CPU kMaxSide, CUDA shared-memory layout), by
# device: a named backend ("cpu" / "cuda") uses it whole. backend=None uses the kernel only up to
# SVD_DEFAULT_LIMIT, the range where it was measured faster than LAPACK: on the 2-core EPYC CPU of
# benchmarks/results the kernel is 1.7x LAPACK at 64 x 64 and 0.8x at 128 x 128.
SVD_KERNEL_LIMIT = {"cpu": 128, "cuda": 64}
SVD_DEFAULT_LIMIT = {"cpu": 64, "cuda": 64}


def _svd_backward(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, gU, gS, gVh) -> torch.Tensor:
    """∂L/∂X of the thin real SVD X = U diag(S) Vh — the formula torch.linalg.svd's backward uses
    (so both agree, including where it is undefined: repeated singular values give inf/NaN
    unless the loss is invariant to the basis of the repeated subspace).

    With skew(A) = A − Aᵀ, E_ij = S_j² − S_i² (1 on the diagonal):
    core = (skew(Uᵀ gU) ∘ S_row + S_col ∘ skew(Vh gVhᵀ)) / E + diag(gS), and the tall/wide
    complement terms (I − UUᵀ) gU S⁻¹ Vh or U S⁻¹ gVh (I − VVᵀ). Plain torch ops on any leading
    dims, so it runs under torch.func transforms and is itself differentiable.
    """
    m, n = U.shape[-2], Vh.shape[-1]
    k = S.shape[-1]
    if gU is None and gVh is None:
        return U @ (gS.unsqueeze(-1) * Vh) if gS is not None else U.new_zeros((*U.shape[:-1], n))
    S2 = S * S
    E = S2.unsqueeze(-2) - S2.unsqueeze(-1)
    E = E + torch.eye(k, dtype=E.dtype, device=E.device)  # the diagonal of E is 0: make it 1
    gA = torch.zeros_like(E)
    if gU is not None:
        UtgU = U.mT @ gU
        gA = gA + (UtgU - UtgU.mT) * S.unsqueeze(-2)
    if gVh is not None:
        VhgV = Vh @ gVh.mT
        gA = gA + S.unsqueeze(-1) * (VhgV - VhgV.mT)
    gA = gA / E
    if gS is not None:
        gA = gA + torch.diag_embed(gS)
    if m > k and gU is not None:
        gUSinv = gU / S.unsqueeze(-2)
        return (U @ gA + gUSinv - U @ (U.mT @ gUSinv)) @ Vh
    if n > k and gVh is not None:
        SinvgVh = gVh / S.unsqueeze(-1)
        return U @ (gA @ Vh + SinvgVh - (SinvgVh @ Vh.mT) @ Vh)
    return U @ gA @ Vh


@torch.library.register_fake("regkernels::batched_svd")
def _batched_svd_fake(X: torch.Tensor):
    b, m, n = X.shape
    k = min(m, n)
    return X.new_empty((b, m, k)), X.new_empty((b, k)), X.new_empty((b, k, n))


def _batched_svd_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*output)
    # unused outputs arrive as None, as in torch.linalg.svd's backward: a loss of S alone then
    # never divides by S_j² − S_i² (finite at repeated values, e.g. the doubled values of the
    # conv-operator embedding)
    ctx.set_materialize_grads(False)


def _batched_svd_autograd_backward(ctx, gU, gS, gVh):
    U, S, Vh = ctx.saved_tensors
    return _svd_backward(U, S, Vh, gU, gS, gVh)


# the op's own autograd: plain tensors (and opcheck, direct users) run it; torch.func cannot
# (a custom op's registered autograd is an autograd.Function without setup_context to functorch),
# so tensors wrapped by a transform go through _JacobiSVD (_jacobi_op)
torch.library.register_autograd("regkernels::batched_svd", _batched_svd_autograd_backward,
                                setup_context=_batched_svd_setup_context)


def _jacobi_raw(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op on ``X (..., m, n)``: leading dims flattened into its batch and restored."""
    *lead, m, n = X.shape
    k = min(m, n)
    U, S, Vh = torch.ops.regkernels.batched_svd(X.reshape(-1, m, n))
    return U.reshape(*lead, m, k), S.reshape(*lead, k), Vh.reshape(*lead, k, n)


def _jacobi_op(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel, differentiable: the op itself (its registered autograd) for plain tensors and
    under torch.compile, ``_JacobiSVD`` for tensors wrapped by a torch.func transform.

    Two paths because ``autograd.Function.apply`` with ``setup_context`` binds its arguments with
    ``inspect.signature`` on every call: measured 40-90 µs on an 8 × 8 × 8 batch on the 2-core
    CPU, as much as the kernel, for a call made per layer per step. The functorch query cannot be
    traced by dynamo, and dynamo never sees wrapped tensors, hence the is_compiling guard.
    """
    if _functorch_wrapped(X):
        return _JacobiSVD.apply(X)
    return _jacobi_raw(X)


class _JacobiSVD(torch.autograd.Function):
    """The kernel on float32/float64 ``X (..., m, n)`` for inputs wrapped by torch.func
    (``_jacobi_op``). ``forward`` runs below the transform; ``vmap`` moves the vmapped dim in
    front of the leading dims the op already takes, so a vmap is one kernel launch over the stack.
    """

    @staticmethod
    def forward(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _jacobi_raw(X)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _batched_svd_setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, gU, gS, gVh):
        U, S, Vh = ctx.saved_tensors
        return _svd_backward(U, S, Vh, gU, gS, gVh)

    @staticmethod
    def vmap(info, in_dims, X):
        return _JacobiSVD.apply(X.movedim(in_dims[0], 0)), (0, 0, 0)


def _jacobi_svd(X: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``X (..., m, n)`` through the kernel when ``max(m, n) ≤ limit`` (and both ≥ 1).

    A long matrix (``min(m, n) ≤ limit < max(m, n)``, e.g. a conv weight 64 × 576) is first
    reduced by a QR (LAPACK / cuSOLVER through torch.linalg.qr): X = Q R gives U = Q·U_R for a
    tall X; Xᵀ = Q R, so X = Rᵀ Qᵀ and Vh = Vh_{Rᵀ}·Qᵀ, for a wide one. The small square factor
    goes through the kernel. min(m, n) > limit or an empty side runs the reference. fp16/bf16
    run in float32 and come back in the input dtype.
    """
    m, n = X.shape[-2:]
    if min(m, n) < 1 or min(m, n) > limit:
        return _svd_ref.batched_svd(X)
    Xc = _upcast(X)
    if max(m, n) > limit:
        if m >= n:
            Q, R = torch.linalg.qr(Xc)
            U, S, Vh = _jacobi_op(R)
            U = Q @ U
        else:
            Q, R = torch.linalg.qr(Xc.mT)
            U, S, Vh = _jacobi_op(R.mT)
            Vh = Vh @ Q.mT
    else:
        U, S, Vh = _jacobi_op(Xc)
    return U.to(X.dtype), S.to(X.dtype), Vh.to(X.dtype)


def _svd_default_range(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batched_svd`` for backend=None: the kernel in its measured-faster range, LAPACK above."""
    return _jacobi_svd(X, SVD_DEFAULT_LIMIT[X.device.type])


def _svd_kernel_range(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batched_svd`` for a named backend: the kernel on every size it takes."""
    return _jacobi_svd(X, SVD_KERNEL_LIMIT[X.device.type])


def _check_svd_fits(op: str, X: torch.Tensor) -> None:
    """A named kernel backend refuses a matrix it cannot decompose (min(m, n) past its limit;
    only the long side past it is QR-reduced onto the kernel)."""
    m, n = X.shape[-2:]
    device = X.device.type
    limit = SVD_KERNEL_LIMIT[device]
    if min(m, n) > limit:
        raise ValueError(f"{op}: backend={device!r} (the Jacobi SVD kernel) takes matrices with min(m, n) <= "
                         f"{limit} on {device} tensors; got X of shape {tuple(X.shape)}; backend='reference' or "
                         "None takes any size")


def batched_svd(X: torch.Tensor, *, strict: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Table entry of ``batched_svd`` ("cpu" / "cuda"). ``strict``: the backend was named — the
    kernel's whole range, ValueError beyond it; otherwise the measured-faster range and the
    reference beyond it."""
    if strict:
        _check_svd_fits("batched_svd", X)
        return _svd_kernel_range(X)
    return _svd_default_range(X)


def clamp_singular_values(X: torch.Tensor, lo: float, hi: float, *, strict: bool = False) -> torch.Tensor:
    """Table entry of ``clamp_singular_values`` ("cpu" / "cuda"): the reference's divided-difference
    autograd on the kernel's SVD; ``strict`` as in ``batched_svd``."""
    if strict:
        _check_svd_fits("clamp_singular_values", X)
        return _svd_ref.clamp_singular_values(X, lo, hi, svd=_svd_kernel_range)
    return _svd_ref.clamp_singular_values(X, lo, hi, svd=_svd_default_range)


def _sedghi_fits(op: str, weight: torch.Tensor, strict: bool) -> bool:
    """Whether the real ``2·C_out × 2·C_in`` embedding of the frequency blocks fits the kernel
    (64 channels on CPU, 32 on CUDA); past it ``strict`` (a named backend) raises, else the
    reference (LAPACK's / cuSOLVER's complex SVD) runs."""
    device = weight.device.type
    limit = SVD_KERNEL_LIMIT[device]
    if 2 * max(weight.shape[0], weight.shape[1]) <= limit:
        return True
    if strict:
        raise ValueError(f"{op}: backend={device!r} runs the per-frequency SVDs on the Jacobi kernel through the "
                         f"real 2·C_out × 2·C_in embedding of each block, and the kernel takes 2·max(C_out, C_in) "
                         f"<= {limit} on {device} tensors; got C_out={weight.shape[0]}, C_in={weight.shape[1]}; "
                         "backend='reference' takes any size")
    return False


def _sedghi_first_order(x: torch.Tensor, op: str, backend: str) -> torch.Tensor:
    """An output of a Sedghi kernel, differentiable once: the second derivative would go through
    the SVD of the real embedding, whose doubled singular values make the SVD's backward divide
    by 0 (a NaN second derivative). Applied to the outputs, so that this refusal (which names the
    backend that supports it) is the first node a ``create_graph=True`` backward meets.

    Not under torch.func transforms: they run every backward with grad mode on (the refusal would
    fire on a first-order torch.func.grad) and the identity has no vmap rule; there a second-order
    transform gets the NaN described above instead of an error."""
    if _functorch_wrapped(x):
        return x
    return _first_order_only(x, f"{op}: double backward (create_graph=True) is not supported by "
                                f"backend={backend!r}; backend='reference' supports it")


def conv_singular_values(weight: torch.Tensor, input_size, *, strict: bool = False) -> torch.Tensor:
    """Conv-family table entry ("cpu" / "cuda"): ``regkernels.reference.conv.conv_singular_values``
    with the per-frequency SVDs on the Jacobi kernel (docs/conv.md). First-order differentiable.
    ``strict`` (the backend was named): a weight whose embedding the kernel cannot take raises
    ValueError; otherwise it goes to the reference."""
    if not _sedghi_fits("conv_singular_values", weight, strict):
        return _conv_ref.conv_singular_values(weight, input_size)
    out = _conv_ref.conv_singular_values(weight, input_size, svd=_svd_kernel_range)
    return _sedghi_first_order(out, "conv_singular_values", weight.device.type)


def _clamp_kernel_range(X: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return _svd_ref.clamp_singular_values(X, lo, hi, svd=_svd_kernel_range)


def clip_conv_singular_values(weight: torch.Tensor, input_size, lo: float, hi: float, *,
                              strict: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv-family table entry ("cpu" / "cuda"): ``regkernels.reference.conv.clip_conv_singular_values``
    on the Jacobi kernel, as ``conv_singular_values``."""
    if not _sedghi_fits("clip_conv_singular_values", weight, strict):
        return _conv_ref.clip_conv_singular_values(weight, input_size, lo, hi)
    new_weight, sv = _conv_ref.clip_conv_singular_values(weight, input_size, lo, hi, svd=_svd_kernel_range,
                                                          clamp=_clamp_kernel_range)
    return (_sedghi_first_order(new_weight, "clip_conv_singular_values", weight.device.type),
            _sedghi_first_order(sv, "clip_conv_singular_values", weight.device.type))

# ============================================================================ end of svd family


# ============================================================================ beta_lasso family
# (fake and table entry of beta_lasso_step_)

@torch.library.register_fake("regkernels::beta_lasso_step_")
def _beta_lasso_step_fake(params, grads, bufs, hyper, flags):
    device = params[0].device if len(params) else torch.device("cpu")
    return torch.empty(len(params), dtype=torch.long, device=device)


def beta_lasso_step_(params, grads, bufs, hyper, flags) -> torch.Tensor:
    """Table entry of the β-LASSO update ("cpu" / "cuda"): one fused launch over every tensor of one
    (device, dtype), with ``hyper`` / ``flags`` packed by ``regkernels.ops.beta_lasso.pack_hyper``;
    returns the per-tensor non-zero counts (int64)."""
    return torch.ops.regkernels.beta_lasso_step_(list(params), list(grads), list(bufs), list(hyper), list(flags))

# ============================================================================ end of beta_lasso family
