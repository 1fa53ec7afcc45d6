"""Model-level regularizers for training loops (docs/nn.md#regularizer): ``Regularizer`` and ``SVBProjector``.

``Regularizer(model, kind, weight, …)`` selects layers once (``include`` types, minus
``exclude``) and on each call returns ``weight · mean over the selected layers`` (``reduction="sum"``:
the sum) of the ``kind`` penalty, with as few kernel launches as the kind allows:

==================  ============================================================================
kind                per-layer penalty (docs/gram.md, docs/conv.md) and how the model's layers are batched
==================  ============================================================================
``frame``           ``frame_penalty(as_matrix(W, groups), A, B, side)`` — every layer in one
``diversity``       ``penalty_multi`` call (one grouped kernel launch per pass); ``diversity``,
``orthogonality``   ``orthogonality``, ``mhe``, ``srip`` likewise, with their
``mhe``, ``srip``   own keyword arguments
``conv_frame``      ``conv_frame_penalty`` of each layer's operator at its own stride, padding,
                    dilation, groups, padding mode and input size (recorded by a forward pre-hook
                    or given as ``input_sizes``); one ``conv_frame_penalty_multi`` call (one exact
                    implicit evaluation) per set of convs of equal weight shape and geometry
``ocnn``            ``conv_orthogonality_penalty`` at each layer's stride; the layers (group chunks
                    of grouped convs) of equal shape, stride, dtype and device go through one
                    ``conv_orthogonality_penalty_multi`` call per such set
==================  ============================================================================

A ``nn.Linear`` is the 1×1 convolution of a 1-point input, so the conv kinds take it as the
operator ``W`` itself (``conv_frame`` of a Linear is ``frame_penalty(W)``, ``ocnn`` is
``‖W Wᵀ − I‖²``, with ``side="cols"`` ``‖Wᵀ W − I‖²``). Penalties of grouped convs are the mean over groups (docs/gram.md#as_matrix);
for the Gram kinds ``group_mode="whole"`` takes a grouped conv's weight ``(out, in/g, *k)`` as ONE
matrix ``(out, in/g·∏k)`` instead (DiReAL's and the SVB code's convention). ``values()`` is one
entry per selected layer whatever the groups, and ``reduction`` combines those entries.

``nn.ConvTranspose1d/2d/3d`` layers (when ``include`` names them) are taken in their own orientation
(docs/nn.md#transposed-convolutions): the Gram kinds use ``as_matrix(W, g, transposed=True)`` (one row
per output channel), ``conv_frame`` the layer's operator ``Tᵀ`` (the conv ops' ``transposed=True``, its
own input size), ``ocnn`` OCNN's penalty of ``W`` as ``T``'s kernel with the side swapped (the layer's
output side is ``T``'s input side).

``stats()`` returns per layer, as plain floats for a logger: the Gershgorin bounds of the Gram
the penalty acts on (eigenvalues of that Gram are squared singular values) and the exact
σ_min / σ_max of the weight matrix ``as_matrix(W, groups)``.

``SVBProjector(model, eps, every)`` calls ``svb_`` after every ``every``-th ``step()`` (``bn=True``:
also the BatchNorm scales, docs/svd.md#batchnorm-scales-bn).
Both work on a DDP-wrapped model's ``module`` (replicated weights give identical penalties on
every rank) and on FSDP2 / DTensor-sharded models, given the model itself: every rank computes the
same value from the full weights, gathered in buckets (or, for the Gram kinds' layers where it
moves fewer bytes, from all-reduced partial Grams), and the gradients arrive on
the shards (docs/distributed.md).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from regkernels import _geometry as CG
from regkernels import distributed as _dist
from regkernels.ops import conv as _conv
from regkernels.ops import gram as _gram
from regkernels.ops import svd as _svd
from regkernels.ops._common import check_bounds, check_number, check_side
from regkernels.ops._table import BACKENDS
from regkernels.reference import gram as _ref_gram
from regkernels.reference.svd import BNChoice, InputSize

__all__ = ["Regularizer", "SVBProjector", "KINDS", "NETWORK_KEY"]

MATRIX_KINDS = ("frame", "diversity", "orthogonality", "mhe", "srip")
CONV_KINDS = ("conv_frame", "ocnn")
KINDS = MATRIX_KINDS + CONV_KINDS
GROUP_MODES = ("per_group", "whole")
REDUCTIONS = ("mean", "sum")
# ConvTranspose layers are taken in their own orientation (docs/nn.md#transposed-convolutions): the
# Gram kinds act on as_matrix(W, groups, transposed=True) (one row per output channel), the conv kinds
# on the transposed conv's operator, the adjoint of the conv whose weight W is
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d) + _TRANSPOSED


def _select(op: str, model: nn.Module, include, exclude) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module that is an ``include`` type and not excluded (by name,
    by module or by type), in ``named_modules`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be an nn.Module; got {type(model).__name__}")
    include = tuple(include) if isinstance(include, (list, tuple)) else (include,)
    if not include or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in include):
        raise TypeError(f"{op}: include must be an nn.Module subclass or a tuple of them; got {include!r}")
    exclude = [] if exclude is None else list(exclude) if isinstance(exclude, (list, tuple, set)) else [exclude]
    names = {name for name, _ in model.named_modules()}
    for e in exclude:
        if isinstance(e, str) and e not in names:
            raise ValueError(f"{op}: exclude names a module the model does not have: {e!r}")

    def excluded(name: str, module: nn.Module) -> bool:
        return any(e == name if isinstance(e, str) else e is module if isinstance(e, nn.Module)
                   else isinstance(e, type) and isinstance(module, e) for e in exclude)

    chosen = [(n, m) for n, m in model.named_modules()
              if isinstance(m, include) and getattr(m, "weight", None) is not None and not excluded(n, m)]
    if not chosen:
        raise ValueError(f"{op}: no layer selected: the model has no {' / '.join(t.__name__ for t in include)} "
                         f"with a weight outside exclude")
    return chosen


class _InputSizes:
    """Spatial input size of each conv, recorded by forward pre-hooks (overridable by name).

    A ConvTranspose's hook also records the output_padding its call used: ``layer(x, output_size=…)``
    picks one per call, which may differ from ``layer.output_padding``."""

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], given: dict | None):
        self._given = dict(given or {})
        self._seen: dict[int, tuple[int, ...]] = {}
        self._pads: dict[int, tuple[int, ...]] = {}
        self._handles = [m.register_forward_pre_hook(self._record_transposed, with_kwargs=True)
                         if isinstance(m, _TRANSPOSED) else m.register_forward_pre_hook(self._record)
                         for _, m in layers if isinstance(m, _CONVS)]

    def _record(self, module: nn.Module, args: tuple) -> None:
        d = module.weight.dim() - 2
        self._seen[id(module)] = tuple(int(n) for n in args[0].shape[-d:])

    def _record_transposed(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._record(module, args)
        output_size = args[1] if len(args) > 1 else kwargs.get("output_size")
        if output_size is None:
            self._pads[id(module)] = tuple(module.output_padding)
            return
        # the output_padding torch derives from output_size: its excess over the least output size
        d = module.weight.dim() - 2
        least = CG.conv_transpose_output_size(self._seen[id(module)], module.kernel_size, module.stride,
                                              module.padding, 0, module.dilation)
        self._pads[id(module)] = tuple(int(o) - n for o, n in zip(list(output_size)[-d:], least))

    def input_size(self, op: str, name: str, module: nn.Module) -> tuple[int, ...]:
        if name in self._given:
            size = self._given[name]
            return (size,) * (module.weight.dim() - 2) if isinstance(size, int) else tuple(size)
        if id(module) not in self._seen:
            raise ValueError(f"{op}: no input size for layer {name!r}: run one forward pass first (a pre-hook "
                             f"records it) or pass input_sizes={{{name!r}: (H, W)}}")
        return self._seen[id(module)]

    def recorded(self, module: nn.Module) -> bool:
        """Whether a forward pass called ``module`` since the hooks were registered."""
        return id(module) in self._seen

    def output_padding(self, name: str, module: nn.Module) -> tuple[int, ...]:
        """A ConvTranspose's output_padding as its last call used it (the module's when given by name
        or not yet called)."""
        if name in self._given:
            return tuple(module.output_padding)
        return self._pads.get(id(module), tuple(module.output_padding))

    def get(self, op: str, name: str, module: nn.Module) -> tuple[int, ...]:
        """The input size of layer ``name``; for a ConvTranspose whose last call chose another
        output_padding (``output_size=``) than the module's, a ValueError (its operator is another one)."""
        size = self.input_size(op, name, module)
        pad = self._pads.get(id(module)) if name not in self._given else None
        if pad is not None and pad != tuple(module.output_padding):
            raise ValueError(f"{op}: layer {name!r} was last called with output_size=, which made its output_padding "
                             f"{pad}, not the module's {tuple(module.output_padding)}: its operator is not the one "
                             f"the module describes; set layer.output_padding = {pad} (and call it without "
                             f"output_size), or exclude the layer")
        return size

    def operator_size(self, op: str, name: str, module: nn.Module) -> tuple[int, ...]:
        """The input size of the conv whose operator the layer is or is the adjoint of: a conv's own input
        size; a ConvTranspose's OUTPUT size, computed from its recorded input size with its stride,
        padding, dilation, kernel and the output_padding of its last call (the circular model's grid of
        svb_'s operator mode)."""
        size = self.input_size(op, name, module)
        if not isinstance(module, _TRANSPOSED):
            return size
        return CG.conv_transpose_output_size(size, module.kernel_size, module.stride, module.padding,
                                             self.output_padding(name, module), module.dilation)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _conv_geometry(op: str, name: str, module: nn.Module) -> dict[str, Any]:
    """The operator arguments of a conv layer (docs/conv.md#conv_to_matrix); a Linear is a 1×1 conv.
    ``transposed`` / ``output_padding`` are the conv ops' keywords: a ConvTranspose passes its own
    geometry with ``transposed=True`` (docs/conv.md#transposed-convolutions)."""
    if isinstance(module, nn.Linear):
        return dict(stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros", transposed=False,
                    output_padding=0)
    if isinstance(module, _TRANSPOSED):
        # nn.ConvTranspose has neither string paddings nor padding modes other than "zeros"
        return dict(stride=tuple(module.stride), padding=tuple(module.padding), dilation=tuple(module.dilation),
                    groups=module.groups, padding_mode=module.padding_mode, transposed=True,
                    output_padding=tuple(module.output_padding))
    padding = module.padding
    if isinstance(padding, str):  # nn.ConvNd(padding="valid" / "same")
        if padding == "valid":
            padding = 0
        else:
            total = [dl * (k - 1) for dl, k in zip(module.dilation, module.kernel_size)]
            if any(t % 2 for t in total):
                raise ValueError(f"{op}: layer {name!r} has padding='same' with an even dilated kernel "
                                 f"{tuple(module.kernel_size)}: asymmetric padding has no operator here")
            padding = tuple(t // 2 for t in total)
    if module.padding_mode not in ("zeros", "circular"):
        raise ValueError(f"{op}: layer {name!r} has padding_mode={module.padding_mode!r}; the conv operator "
                         f"kinds take 'zeros' or 'circular'")
    return dict(stride=tuple(module.stride), padding=tuple(padding) if not isinstance(padding, int) else padding,
                dilation=tuple(module.dilation), groups=module.groups, padding_mode=module.padding_mode,
                transposed=False, output_padding=0)


def _matrix_weight(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """``w`` (the layer's full weight) in the layout ``as_matrix(·, groups)`` takes: a ConvTranspose's
    ``(in, out/g, *k)`` as ``(out, in/g, *k)`` (``regkernels.reference.gram.transposed_as_conv``), so that
    ``as_matrix(·, g)`` is ``as_matrix(w, g, transposed=True)`` and ``as_matrix(·, 1)`` the whole
    ``(out, in/g·∏k)`` matrix (``group_mode="whole"``); every other weight unchanged."""
    if isinstance(module, _TRANSPOSED):
        return _ref_gram.transposed_as_conv(w, module.groups)
    return w


def _matrix_stand_in(module: nn.Module) -> torch.Tensor:
    """``_matrix_weight``'s shape, dtype and device for argument checks, without reading or copying the weight."""
    w = _dist.stand_in(module.weight)
    if isinstance(module, _TRANSPOSED):
        g = module.groups
        return w.new_zeros(1).expand(w.shape[1] * g, w.shape[0] // g, *w.shape[2:])
    return w


def _float32_if_half(w: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 weights as float32 (differentiable cast): the ops return values in the
    weight's dtype, and a penalty of a half-precision model easily exceeds fp16's 65504; the
    model-level value is float32 for every kind (docs/index.md#numerical-behaviour), its gradient reaches the weights."""
    return w.float() if w.dtype in (torch.float16, torch.bfloat16) else w


def _as_conv_weight(module: nn.Module, w: torch.Tensor | None = None) -> torch.Tensor:
    """The weight of ``module`` (or ``w``, its full value) as a conv weight: a Linear's gets a 1-point kernel dim.
    A ConvTranspose's ``(in, out/g, *k)`` is unchanged: it is the conv weight of the conv ``T`` whose
    adjoint the layer is (the conv ops take it with ``transposed=True``; ``ocnn`` penalises ``T``'s
    kernel as it stands, docs/nn.md#transposed-convolutions)."""
    w = module.weight if w is None else w
    return w.unsqueeze(-1) if isinstance(module, nn.Linear) else w


def _check_choice(op: str, name: str, value, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{op}: {name} must be a str, one of {', '.join(map(repr, allowed))}; got "
                        f"{type(value).__name__} {value!r}")
    if value not in allowed:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


class Regularizer:
    """``weight · mean_l penalty(layer_l)`` (or ``Σ_l``) over the selected layers of ``model``
    (docs/nn.md#regularizer).

    Args:
        model: the network (a DDP-wrapped model: pass ``ddp.module``; an FSDP2 / DTensor model: itself).
        kind: one of ``KINDS`` (module docstring).
        weight: the factor λ ≥ 0 of the returned value.
        include: layer types selected (default Conv2d and Linear); layers need a ``weight``.
            ConvTranspose1d/2d/3d are taken when named (module docstring).
        exclude: names (as in ``named_modules``), modules or types to leave out.
        input_sizes: ``conv_frame`` only: ``{layer name: spatial input size}``, else recorded by a
            forward pre-hook on each conv (run one forward pass before the first call).
        backend: passed to every op the kind runs (``None``: each op's default for the device;
            a name from ``regkernels.ops._table.BACKENDS``, e.g. ``"reference"``). A named
            backend that one of those ops does not have for the layers' device and dtype raises
            that op's ValueError (listing what it has) at the call; nothing falls back.
        group_mode: how a grouped conv ``(out, in/g, *k)`` enters a Gram kind: ``"per_group"``
            (default) the mean over its g matrices ``(out/g, in/g·∏k)``; ``"whole"`` one matrix
            ``(out, in/g·∏k)`` (``as_matrix(W, 1)``). Linear and ungrouped layers are one matrix
            either way. The conv kinds refuse ``"whole"`` (a grouped conv's operator is
            block-diagonal: its groups never mix).
        reduction: ``"mean"`` (default) or ``"sum"`` of the per-layer values ``values()`` (one
            entry per selected layer, a grouped conv included).
        **kw: the kind's arguments: ``frame`` / ``conv_frame`` ``A, B`` (required), ``side``;
            ``diversity`` ``tau`` (required), ``inclusive``; ``orthogonality`` ``side, squared``;
            ``mhe`` ``s, half, eps, angular``; ``srip`` ``n_iter, generator``; ``ocnn`` ``padding``, ``side``
            (``"rows"``: output side, default; ``"cols"``: input side, without padding).

    Calling it returns a 0-dim tensor (float32 for float16/bfloat16 weights, every kind: the
    layers are evaluated in float32) with gradients to every selected weight. Every argument
    is checked here (the kind's keyword arguments as its op checks them, ``input_sizes``
    against each conv's geometry, ``backend``); sizes recorded by the pre-hooks are checked
    at the first call.
    """

    def __init__(self, model: nn.Module, kind: str, weight: float = 1.0,
                 include: type | Sequence[type] = (nn.Conv2d, nn.Linear), exclude: Iterable | None = None, *,
                 input_sizes: dict | None = None, backend: str | None = None, group_mode: str = "per_group",
                 reduction: str = "mean", **kw):
        op = "Regularizer"
        if kind not in KINDS:
            raise ValueError(f"{op}: kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
        check_number(op, "weight", weight, lo=0)
        _check_choice(op, "group_mode", group_mode, GROUP_MODES)
        _check_choice(op, "reduction", reduction, REDUCTIONS)
        if kind in CONV_KINDS and group_mode == "whole":
            raise ValueError(f"{op}: group_mode='whole' is for the Gram kinds ({', '.join(MATRIX_KINDS)}); "
                             f"kind={kind!r} penalises each layer's conv operator, which for a grouped conv is "
                             f"block-diagonal by construction (its groups never mix), so there is no whole-weight "
                             f"matrix to penalise: use group_mode='per_group'")
        self.kind, self.weight, self.backend, self.kw = kind, float(weight), backend, dict(kw)
        self.group_mode, self.reduction = group_mode, reduction
        self.layers = _select(op, model, include, exclude)
        if kind in MATRIX_KINDS:
            # validates kind's arguments once, on the selected weights
            _gram._check_weights(op, [_matrix_stand_in(m) for _, m in self.layers], self._groups(), kind,
                                 _gram._multi_args(op, kind, dict(kw)),
                                 names=[f"layer {name!r}.weight" for name in self.names])
        elif kind == "conv_frame":
            missing = [a for a in ("A", "B") if a not in kw]
            unknown = [a for a in kw if a not in ("A", "B", "side")]
            if missing or unknown:
                raise TypeError(f"{op}: kind='conv_frame' takes A, B (required) and side; got unknown {unknown}, "
                                f"missing {missing}")
            check_bounds(op, "A", kw["A"], "B", kw["B"])
            check_side(op, kw.get("side", "auto"))
            for name, m in self.layers:
                if isinstance(m, _TRANSPOSED) and any(o >= s for o, s in zip(m.output_padding, m.stride)):
                    raise ValueError(f"{op}: kind='conv_frame' needs output_padding < stride per dim for a "
                                     f"ConvTranspose (then its operator is exactly the adjoint of a conv); layer "
                                     f"{name!r} has output_padding={tuple(m.output_padding)}, stride="
                                     f"{tuple(m.stride)}: exclude it or use a Gram kind")
        elif kind == "ocnn":
            if any(a not in ("padding", "side") for a in kw):
                raise TypeError(f"{op}: kind='ocnn' takes padding and side only; got {sorted(kw)}")
            _conv.check_ocnn_side(op, kw.get("side", "rows"), kw.get("padding"))
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of None, {', '.join(map(repr, BACKENDS))}; got {backend!r}")
        if kind in CONV_KINDS:
            self._geometry = {name: _conv_geometry(op, name, m) for name, m in self.layers}
        if kind == "ocnn" and kw.get("padding") is not None:
            for name, m in self.layers:
                _conv._check_ints(f"{op} (layer {name!r})", "padding", kw["padding"], _as_conv_weight(m).dim() - 2, 0)
                if isinstance(m, _TRANSPOSED):
                    raise ValueError(f"{op}: kind='ocnn' with padding cannot take ConvTranspose layer {name!r}: "
                                     f"padding picks the output-side shifts of a conv, and a ConvTranspose's output "
                                     f"side is the input side (side='cols') of the conv whose adjoint it is, which has "
                                     f"no padding; pass padding=None or exclude the layer")
        if input_sizes is not None:
            if kind != "conv_frame":
                raise TypeError(f"{op}: input_sizes is for kind='conv_frame' only; got kind={kind!r}")
            self._check_input_sizes(op, input_sizes)
        self._sizes = _InputSizes(self.layers, input_sizes) if kind == "conv_frame" else None

    def _check_input_sizes(self, op: str, input_sizes) -> None:
        """Each given size names a selected conv layer and gives its operator a valid geometry
        (the check ``conv_frame_penalty`` makes), so a bad size fails here, not at the first call."""
        if not isinstance(input_sizes, dict):
            raise TypeError(f"{op}: input_sizes must be a dict layer name -> spatial input size; got "
                            f"{type(input_sizes).__name__}")
        layers = dict(self.layers)
        for name, size in input_sizes.items():
            if name not in layers or not isinstance(layers[name], _CONVS):
                raise ValueError(f"{op}: input_sizes names {name!r}, which is not a selected conv layer; selected "
                                 f"convs: {[n for n, m in self.layers if isinstance(m, _CONVS)]}")
            m, geo = layers[name], self._geometry[name]
            size = (size,) * (m.weight.dim() - 2) if isinstance(size, int) and not isinstance(size, bool) else size
            where, w = f"{op} (layer {name!r})", _dist.stand_in(m.weight.detach())
            if geo["transposed"]:  # a ConvTranspose's own input size, checked as the conv ops check it
                _conv._check_transposed(where, w, size, geo["stride"], geo["padding"], geo["output_padding"],
                                        geo["dilation"], geo["groups"], geo["padding_mode"], True)
            else:
                _conv._check_geometry(where, w, size, geo["stride"], geo["padding"], geo["dilation"], geo["groups"],
                                      geo["padding_mode"])

    def _groups(self) -> list[int]:
        """The ``groups`` of ``as_matrix`` per layer: each conv's own, or 1 for every layer with
        ``group_mode="whole"`` (Gram kinds only: the conv kinds refuse it)."""
        if self.group_mode == "whole":
            return [1] * len(self.layers)
        return [getattr(m, "groups", 1) for _, m in self.layers]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.layers]

    def values(self) -> torch.Tensor:
        """The per-layer penalties ``(L,)``, one per selected layer (before the reduction and the factor)."""
        weights = [m.weight for _, m in self.layers]
        if not torch.compiler.is_compiling() and _dist.any_dtensor(weights):
            return self._sharded_values(weights)
        return torch.stack(self._values(weights, range(len(self.layers))))

    def _values(self, weights: Sequence[torch.Tensor], idx: Sequence[int]) -> list[torch.Tensor]:
        """0-dim penalties of the layers ``idx`` whose (full) weights are ``weights``."""
        if self.kind in MATRIX_KINDS:
            groups = self._groups()
            mats = [_float32_if_half(_matrix_weight(self.layers[i][1], w)) for i, w in zip(idx, weights)]
            return list(_gram.penalty_multi(mats, self.kind, backend=self.backend,
                                            groups=[groups[i] for i in idx], **self.kw).unbind(0))
        if self.kind == "ocnn":
            return self._ocnn_values(weights)
        return self._conv_frame_values(weights)

    def _sharded_values(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """``values()`` of DTensor weights (FSDP2, tensor parallelism; docs/distributed.md): the
        layers of a Gram kind (``frame``, ``orthogonality``, ``diversity``, ``mhe``) whose Gram is
        the sum of the ranks' partial Grams and smaller than half the weight
        (``regkernels.distributed.gram_route``) reduce their partial Grams; every other layer is
        gathered (bucketed). Every rank gets the same values. A grouped conv takes the Gram route
        only with ``group_mode="whole"`` (one matrix, whose Gram is a sum over the shards like any
        ungrouped layer's); per group it is gathered."""
        out: list = [None] * len(weights)
        routed: dict[int, list[tuple[int, torch.Tensor, object]]] = {}
        if self.kind in _ref_gram.GRAM_KINDS:
            for i, (w, g) in enumerate(zip(weights, self._groups())):
                side = _ref_gram.gram_side(self.kind, w.shape[0], math.prod(w.shape[1:]), self.kw.get("side", "auto"))
                # a ConvTranspose's matrix rows are not its dim 0, whose pieces the shards hold: gathered
                transposed = isinstance(self.layers[i][1], _TRANSPOSED)
                lay = _dist.gram_route(w, side) if g == 1 and not transposed else None
                if lay is not None:
                    local = _float32_if_half(w.to_local())
                    partial = _ref_gram.gram(local.reshape(local.shape[0], -1), side)
                    routed.setdefault(id(lay.group), []).append((i, partial, lay))
        on_route = {i for parts in routed.values() for i, _, _ in parts}
        rest = [i for i in range(len(weights)) if i not in on_route]
        if rest:
            for i, v in zip(rest, self._values(_dist.gather([weights[i] for i in rest]), rest)):
                out[i] = v
        for parts in routed.values():
            lay = parts[0][2]
            for (i, _, _), G in zip(parts, _dist.all_reduce_sum([P for _, P, _ in parts], lay.group, lay.world)):
                out[i] = _ref_gram.penalty_from_gram(self.kind, G, **self.kw)
        dtype = functools.reduce(torch.promote_types, [v.dtype for v in out])
        return torch.stack([v.to(dtype) for v in out])

    def _conv_frame_values(self, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``conv_frame`` per layer (0-dim tensors in ``self.layers`` order) in as few calls as the shapes
        allow: every Linear in one ``penalty_multi`` call (its operator is W itself: ``frame_penalty(W)``),
        and the convs in one ``conv_frame_penalty_multi`` call per set of layers of equal weight shape,
        dtype, device and geometry (input size, stride, padding, dilation, groups, padding mode), which
        the op runs as one grouped conv (docs/nn.md#regularizer)."""
        op, (A, B), side = "Regularizer", (self.kw["A"], self.kw["B"]), self.kw.get("side", "auto")
        out: list = [None] * len(self.layers)
        linear = [i for i, (_, m) in enumerate(self.layers) if isinstance(m, nn.Linear)]
        if linear:
            values = _gram.penalty_multi([_float32_if_half(weights[i]) for i in linear], "frame",
                                         backend=self.backend, A=A, B=B, side=side)
            for i, v in zip(linear, values):
                out[i] = v
        sets: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        for i, (name, m) in enumerate(self.layers):
            if out[i] is not None:
                continue
            w, geo = _float32_if_half(_as_conv_weight(m, weights[i])), self._geometry[name]
            d = w.dim() - 2
            # int and tuple spellings of one padding are one geometry
            key = (tuple(w.shape), w.dtype, w.device, tuple(self._sizes.get(op, name, m)),
                   *(CG.expand(geo[a], d) for a in ("stride", "padding", "dilation")), geo["groups"],
                   geo["padding_mode"], geo["transposed"], CG.expand(geo["output_padding"], d))
            sets.setdefault(key, []).append((i, w))
        for (_, _, _, size, stride, padding, dilation, groups, mode, transposed, out_pad), members in sets.items():
            # a ConvTranspose: its own input size and geometry, the op takes its operator Tᵀ (side on Tᵀ)
            values = _conv.conv_frame_penalty_multi([w for _, w in members], size, A, B, stride, padding, dilation,
                                                    groups, mode, side, transposed=transposed,
                                                    output_padding=out_pad, backend=self.backend)
            for (i, _), v in zip(members, values):
                out[i] = v
        return out

    def _ocnn_values(self, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer (0-dim): the mean over its group chunks of ``conv_orthogonality_penalty`` at its
        stride (with the ``padding`` / ``side`` given). Every chunk of equal (shape, stride, dtype,
        device), across layers, goes through one ``conv_orthogonality_penalty_multi`` call."""
        buckets: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        for i, (name, m) in enumerate(self.layers):
            w, geo = _float32_if_half(_as_conv_weight(m, weights[i])), self._geometry[name]
            stride = tuple(geo["stride"]) if not isinstance(geo["stride"], int) else (geo["stride"],) * (w.dim() - 2)
            # a ConvTranspose is the adjoint Tᵀ of the conv T its weight is the kernel of: its output
            # side (M Mᵀ = Tᵀ T) is T's input side, so the side swaps (docs/nn.md#transposed-convolutions)
            side = self.kw.get("side", "rows")
            side = {"rows": "cols", "cols": "rows"}[side] if geo["transposed"] else side
            chunks = w.chunk(geo["groups"], dim=0)
            for wg in chunks:
                buckets.setdefault((tuple(wg.shape), stride, side, wg.dtype, wg.device), []).append((i, wg))
        per_layer: list[list[torch.Tensor]] = [[] for _ in self.layers]
        for (_, stride, side, _, _), items in buckets.items():
            values = _conv.conv_orthogonality_penalty_multi([wg for _, wg in items], stride, self.kw.get("padding"),
                                                           side, backend=self.backend)
            for (i, _), v in zip(items, values.unbind(0)):
                per_layer[i].append(v)
        # grouped: the mean over groups (docs/gram.md#as_matrix)
        return [torch.stack(vs).mean() for vs in per_layer]

    def __call__(self) -> torch.Tensor:
        values = self.values()
        return self.weight * (values.sum() if self.reduction == "sum" else values.mean())

    @torch.no_grad()
    def stats(self, operator: bool = False) -> dict[str, dict[str, float]]:
        """Per layer: ``gershgorin_lo`` / ``gershgorin_hi`` (bounds on the eigenvalues of the Gram
        the penalty acts on: the operator's for ``conv_frame``, else ``Gram(as_matrix(W))`` on the
        kind's side) and ``sigma_min`` / ``sigma_max`` (exact, of ``as_matrix(W, groups)``; with
        ``group_mode="whole"`` groups is 1, the one matrix the penalty acts on). A layer holding
        NaN/Inf gets NaN entries; the other layers are unaffected and nothing raises. No combined
        value, so ``reduction`` does not enter.

        ``operator=True`` (docs/nn.md#regularizerstats) adds per layer ``operator_sigma_max``,
        ``operator_sigma_min`` and ``operator_rel_tol``: the singular values of the layer's operator
        on its recorded input size (a Linear: W; a ConvTranspose: the conv of its weight on its
        output size, whose adjoint it is, the same singular values; a circular stride-1 conv whose outputs are its
        inputs' positions once: exact, Sedghi; any other conv: ``σ_max`` by power iteration with
        its ``rel_tol``, a heuristic, and ``σ_min`` NaN), and under the key ``NETWORK_KEY``
        (``".network"``, which no module name can be) ``{"sigma_max_product", "rel_tol"}``: the
        product of those ``σ_max`` — for a plain feed-forward chain of exactly the selected layers
        with 1-Lipschitz activations between them (no residual connections, normalisation or other
        layers with gain), an upper bound on its Lipschitz constant in ℓ² where every entry is
        exact; a power estimate is at most its true ``σ_max``, and ``rel_tol = 1 − ∏(1 − rel_tol_l)``
        says how far the product may be below. Conv layers need their input sizes: recorded only
        for ``kind="conv_frame"`` (after one forward pass); other kinds raise ``ValueError`` for a
        conv layer (use ``regkernels.nn.spectrum``)."""
        if not isinstance(operator, bool):
            raise TypeError(f"Regularizer.stats: operator must be True or False; got {operator!r}")
        sizes = self._operator_sizes() if operator else None
        out = {}
        side = self.kw.get("side", "auto")
        # the Gram side of the non-operator kinds; ocnn's is rows unless side="cols" (the input taps')
        matrix_side = side if self.kind in ("frame", "orthogonality") or (self.kind, side) == ("ocnn", "cols") \
            else "rows" if self.kind in ("diversity", "mhe", "ocnn") else "auto"
        # sharded weights: gathered once, bucketed (docs/distributed.md)
        weights = _dist.gather([m.weight for _, m in self.layers])
        for (name, m), g, w in zip(self.layers, self._groups(), weights):
            M = _gram.as_matrix(_matrix_weight(m, w), g)
            M = M if M.dtype == torch.float64 else M.float()
            if self.kind == "conv_frame":
                geo = self._geometry[name]
                size = (1,) if isinstance(m, nn.Linear) else self._sizes.get("Regularizer.stats", name, m)
                lo, hi = _conv.conv_gershgorin_bounds(_as_conv_weight(m, w), size, geo["stride"], geo["padding"],
                                                      geo["dilation"], geo["groups"], geo["padding_mode"], side,
                                                      transposed=geo["transposed"],
                                                      output_padding=geo["output_padding"], backend=self.backend)
            else:
                lo, hi = _gram.gershgorin_bounds(M, matrix_side)
            if min(M.shape[-2:]) > 0:
                # frame_bounds gives NaN for a non-finite matrix (LAPACK's svdvals would raise for
                # the whole model); amin/amax propagate a group's NaN to the layer
                s2_min, s2_max = _gram.frame_bounds(M)
                s_min, s_max = float(s2_min.amin().sqrt()), float(s2_max.amax().sqrt())
            else:
                s_min = s_max = math.nan
            out[name] = {"gershgorin_lo": float(lo.amin()), "gershgorin_hi": float(hi.amax()),
                         "sigma_min": s_min, "sigma_max": s_max}
        if operator:
            product, kept = 1.0, 1.0
            for (name, m), w in zip(self.layers, weights):
                # the conv kinds keep each layer's geometry; the others read it here
                geo = None if isinstance(m, nn.Linear) else getattr(self, "_geometry", {}).get(name) \
                    or _conv_geometry("Regularizer.stats(operator=True)", name, m)
                top, bottom, rel, _ = operator_singular_values(m, w, sizes[name], geo)
                out[name].update(operator_sigma_max=top, operator_sigma_min=bottom, operator_rel_tol=rel)
                product, kept = product * top, kept * (1 - rel)
            out[NETWORK_KEY] = {"sigma_max_product": product, "rel_tol": 1 - kept}
        return out

    def _operator_sizes(self) -> dict[str, tuple[int, ...] | None]:
        """Each selected layer's input size for ``stats(operator=True)`` (None for a Linear), or the
        ValueError that says which layer has none and what to do."""
        op = "Regularizer.stats(operator=True)"
        sizes = {}
        for name, m in self.layers:
            if isinstance(m, nn.Linear):
                sizes[name] = None
            elif self._sizes is None:
                raise ValueError(f"{op}: no input size for conv layer {name!r}: a Regularizer of kind={self.kind!r} "
                                 f"does not record input sizes (only kind='conv_frame' does, after one forward "
                                 f"pass); call regkernels.nn.spectrum(model, input_size), which records them "
                                 f"itself")
            else:
                # a ConvTranspose: its output size, the input size of the conv T whose adjoint it is
                # (the same singular values, docs/conv.md#transposed-convolutions) when output_padding < stride
                sizes[name] = self._sizes.operator_size(op, name, m)
                pad = self._sizes.output_padding(name, m) if isinstance(m, _TRANSPOSED) else ()
                if any(p >= st for p, st in zip(pad, m.stride)):
                    raise ValueError(f"{op}: layer {name!r} ({type(m).__name__}) runs with output_padding {pad}, "
                                     f"not < its stride {tuple(m.stride)}: its operator is then not the adjoint of "
                                     f"a conv; exclude it")
        return sizes

    def remove_hooks(self) -> None:
        """Remove the input-size pre-hooks (``conv_frame``)."""
        if self._sizes is not None:
            self._sizes.remove()

    def __repr__(self) -> str:
        return (f"Regularizer(kind={self.kind!r}, weight={self.weight}, layers={len(self.layers)}, "
                f"group_mode={self.group_mode!r}, reduction={self.reduction!r}, kw={self.kw})")


# the key of the model-level entry of Regularizer.stats(operator=True): a module name never starts
# with "." (named_modules joins non-empty names with "."; the root is "")
NETWORK_KEY = ".network"


def operator_singular_values(module: nn.Module, w: torch.Tensor, size: tuple[int, ...] | None,
                             geo: dict | None) -> tuple[float, float, float, bool]:
    """``(σ_max, σ_min, rel_tol, exact)`` of a Linear's matrix or a conv's operator on inputs of ``size``
    (``geo``: ``_conv_geometry``'s stride, padding, dilation, groups, padding_mode), for monitoring
    (docs/nn.md#regularizerstats): exact (``rel_tol`` 0) for a Linear and for a circular stride-1
    conv whose every output is one input position once (``2·padding = dilation·(k − 1)``, the
    dilated kernel within the input: ``T`` is then the periodic conv with its rows permuted, whose
    singular values are Sedghi's, one group at a time); otherwise ``σ_max`` by
    ``conv_spectral_norm(method="power")`` (seeded, a lower bound with its heuristic ``rel_tol``)
    and ``σ_min`` NaN. Half precision is computed in float32; a non-finite weight gives NaN; a
    layer without channels gives ``σ_max = 0``, ``σ_min`` NaN. The ops run on their default backend."""
    w = w.detach()
    w = w if w.dtype == torch.float64 else w.float()
    if isinstance(module, nn.Linear):
        if min(w.shape) == 0:
            return 0.0, math.nan, 0.0, True
        s2_min, s2_max = _gram.frame_bounds(w)
        return float(s2_max.sqrt()), float(s2_min.sqrt()), 0.0, True
    groups = geo["groups"]
    if min(w.shape[0] // groups, w.shape[1]) == 0:
        return 0.0, math.nan, 0.0, True
    d = w.dim() - 2
    kernel = w.shape[2:]
    stride, padding, dilation = (CG.expand(geo[a], d) for a in ("stride", "padding", "dilation"))
    span = [dl * (k - 1) for dl, k in zip(dilation, kernel)]
    if (geo["padding_mode"] == "circular" and all(s == 1 for s in stride)
            and all(2 * p == e and e < n for p, e, n in zip(padding, span, size))):
        # the dilated kernel: the taps at dil·t, zeros between
        wd = w.new_zeros(*w.shape[:2], *[e + 1 for e in span])
        wd[(slice(None), slice(None)) + tuple(slice(None, None, dl) for dl in dilation)] = w
        sv = torch.cat([_conv.conv_singular_values(part, size).flatten() for part in wd.chunk(groups, dim=0)])
        return float(sv.max()), float(sv.min()), 0.0, True
    gen = torch.Generator(device=w.device).manual_seed(0)
    sigma, rel = _conv.conv_spectral_norm(w, size, stride, padding, dilation, groups, geo["padding_mode"],
                                          method="power", generator=gen)
    return float(sigma), math.nan, float(rel), False


class SVBProjector:
    """Hard singular value bounding on a schedule (docs/nn.md#svbprojector): after every ``every``-th
    ``step()`` (call it after ``optimizer.step()``) every Linear / Conv / ConvTranspose weight of ``model``
    gets ``W ← U clamp(S, 1/(1+eps), 1+eps) Vh`` in place (a ConvTranspose's matrix:
    ``as_matrix(W, groups, transposed=True)``).

    ``operator=True`` bounds each conv's operator instead (docs/conv.md#conv_singular_values; circular, stride-1 model):
    the input sizes are recorded by forward pre-hooks, or given as ``input_size`` (int, tuple or
    ``{weight or conv module: size}``, as ``svb_`` takes them; for a ConvTranspose its output size,
    which the hooks compute from its input size). ``step()`` returns the number of
    matrices projected (0 on the steps in between). Every argument is checked here as ``svb_``
    checks it (eps finite and > 0, operator a bool, input_size, a backend with the SVD on the
    model's devices), and so are the layers (parametrized weights: see ``svb_``).
    ``bn=True`` also bounds the scales of the BatchNorms that directly follow a Linear / Conv
    (``bn=[names or modules]``: those BatchNorms), as ``svb_(..., bn=...)`` does
    (docs/svd.md#batchnorm-scales-bn); a list is kept as the layers' names.
    ``state_dict()`` / ``load_state_dict()`` carry the step counter across a resume.
    """

    def __init__(self, model: nn.Module, eps: float, every: int = 1, operator: bool = False,
                 input_size: InputSize | None = None, backend: str | None = None, bn: BNChoice = False):
        op = "SVBProjector"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{op}: model must be an nn.Module; got {type(model).__name__}")
        check_number(op, "every", every, lo=1, integer=True)
        # svb_'s own checks (eps > 0 and finite, operator, input_size, a backend with the SVD on
        # the model's devices) and its layer checks (parametrized weights that cannot be written
        # back), now rather than at the every-th step
        _svd.check_svb_args(op, eps, operator, input_size, backend,
                             [p for p in model.parameters() if p.is_floating_point()])
        _svd._svb_weights(model, op)
        # the BatchNorm selection, checked now (names kept, so state_dict() can record it)
        self.bn = _svd._svb_bn(model, bn, op) or False  # an empty list bounds no BatchNorm: bn=False
        self.model, self.eps, self.every, self.operator = model, float(eps), every, operator
        self.input_size, self.backend, self.steps = input_size, backend, 0
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, _CONVS)]
        self._sizes = _InputSizes(convs, None) if operator and input_size is None else None
        self._convs = convs

    def step(self) -> int:
        self.steps += 1
        if self.steps % self.every:
            return 0
        size = self.input_size
        if self._sizes is not None:
            # keyed by module: a parametrized conv's weight is a new tensor at every access; a
            # ConvTranspose's operator is bounded on its output size (svb_'s input_size for it)
            size = {m: self._sizes.operator_size("SVBProjector", n, m) for n, m in self._convs}
        return _svd.svb_(self.model, self.eps, operator=self.operator, input_size=size, backend=self.backend,
                         bn=self.bn)

    def state_dict(self) -> dict:
        """What a resumed run needs to project on the same steps: the step counter and the
        configuration it counts against
        (docs/nn.md#resuming-svbprojector-and-adversarialkernelregularizer); with ``bn`` enabled
        also ``"bn"`` (True or the list of BatchNorm names), absent for ``bn=False``."""
        state = {"steps": self.steps, "eps": self.eps, "every": self.every, "operator": self.operator}
        if self.bn is not False:
            state["bn"] = self.bn if self.bn is True else list(self.bn)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue from ``state_dict()`` of an SVBProjector with the same eps, every, operator and
        bn (a ValueError otherwise: the projection schedule would silently change)."""
        op = "SVBProjector.load_state_dict"
        if not isinstance(state_dict, dict):
            raise TypeError(f"{op}: expected the dict SVBProjector.state_dict() returns; got "
                            f"{type(state_dict).__name__}")
        base = {"steps", "eps", "every", "operator"}
        if set(state_dict) not in (base, base | {"bn"}):
            raise ValueError(f"{op}: expected the dict SVBProjector.state_dict() returns, with keys "
                             f"['eps', 'every', 'operator', 'steps'] (and 'bn' when bn is enabled); got "
                             f"{sorted(state_dict)}")
        # a state without "bn" was saved with bn=False
        saved = {"bn": False, **state_dict}
        for key in ("eps", "every", "operator", "bn"):
            if saved[key] != getattr(self, key):
                raise ValueError(f"{op}: the state was saved with {key}={saved[key]!r}, this projector has "
                                 f"{key}={getattr(self, key)!r}; build the SVBProjector with the saved "
                                 "configuration to resume")
        check_number(op, "steps", state_dict["steps"], lo=0, integer=True)
        self.steps = state_dict["steps"]

    def remove_hooks(self) -> None:
        if self._sizes is not None:
            self._sizes.remove()
