"""``spectrum(model, input_size)``: one table of every Linear / Conv / ConvTranspose layer's operator
spectrum and bounds, and the network's Lipschitz bound (docs/nn.md#spectrum).

The conv layers' input sizes come from forward pre-hooks on one ``torch.no_grad()`` forward pass
of zeros ``(1, *input_size)``; then, per layer in module order: the operator's ``σ_max`` (exact for
a Linear and for a circular stride-1 conv, else power iteration; ``σ_min`` where exact), the bound
for every input size (``conv_spectral_norm(weight, None, method="bound")``), the Gershgorin bounds
of the operator's Gram, the frame penalty for ``(A, B)`` and the fraction of zero weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from regkernels import distributed as _dist
from regkernels._geometry import expand
from regkernels.nn.regularizer import _CONVS, _TRANSPOSED, _conv_geometry, _InputSizes, operator_singular_values
from regkernels.ops import conv as _conv
from regkernels.ops import gram as _gram
from regkernels.ops._common import check_bounds

__all__ = ["spectrum", "Spectrum", "SPECTRUM_A", "SPECTRUM_B"]

# the frame penalty's default band [A, B] for the squared singular values (examples/train.py's logger)
SPECTRUM_A, SPECTRUM_B = 0.5, 2.0

# ConvTranspose (_TRANSPOSED, not a subclass of Conv) has the operator Tᵀ, T the conv of its weight
# on its OUTPUT size (docs/conv.md#transposed-convolutions): the same singular values
_KIND = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d",
         nn.ConvTranspose1d: "conv_transpose1d", nn.ConvTranspose2d: "conv_transpose2d",
         nn.ConvTranspose3d: "conv_transpose3d"}


@dataclass
class Spectrum:
    """What ``spectrum`` returns (docs/nn.md#spectrum).

    ``layers``: one dict per Linear / Conv / ConvTranspose layer in ``named_modules()`` order, with
    ``name``, ``kind`` (``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"conv3d"``, ``"conv_transpose1d"``,
    …), ``input_size`` (the recorded spatial size; None for a Linear), ``output_padding`` (a
    ConvTranspose's, as its call used it; None otherwise), ``sigma_max`` with ``sigma_max_rel_tol`` (0 where exact),
    ``sigma_min`` (NaN where not exact), ``exact``, ``bound`` with ``bound_rel_tol`` (certified, for
    every input size; ``bound_any_size`` False for a circular conv that repeats output rows, whose
    bound is its recorded size's), ``gershgorin_lo`` / ``gershgorin_hi`` (bounds on the eigenvalues of the
    operator's Gram: squared singular values), ``frame_penalty`` (for ``A``, ``B``) and ``sparsity``
    (the fraction of weight entries that are exactly 0). ``lipschitz_bound``: the product of the
    layers' ``bound``, a certified upper bound on the Lipschitz constant of the plain feed-forward
    chain of these layers with 1-Lipschitz activations between (no residual connections,
    normalisation or other layers with gain); ``lipschitz_estimate``: the product of their
    ``sigma_max`` (that chain's bound from the operators on this input size; from below where a
    ``sigma_max`` is a power estimate)."""

    layers: list[dict[str, Any]]
    lipschitz_bound: float
    lipschitz_estimate: float
    input_size: tuple[int, ...]
    A: float = SPECTRUM_A
    B: float = SPECTRUM_B
    columns: tuple[str, ...] = field(default=("name", "kind", "input_size", "sigma_max", "sigma_max_rel_tol",
                                              "sigma_min", "exact", "bound", "bound_rel_tol", "bound_any_size", "gershgorin_lo",
                                              "gershgorin_hi", "frame_penalty", "sparsity"), repr=False)

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values (lists, floats, str, bool, None) for ``json.dump``; NaN stays a float
        NaN (``json`` writes it as ``NaN``)."""
        return {"input_size": list(self.input_size), "A": self.A, "B": self.B,
                "lipschitz_bound": self.lipschitz_bound, "lipschitz_estimate": self.lipschitz_estimate,
                "layers": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}
                           for row in self.layers]}

    def to_markdown(self) -> str:
        """A Markdown table, one row per layer, and the two network products below it. ``√hi`` is the
        Gershgorin bound on ``σ_max``; ``~`` marks a power estimate (with its rel_tol), no mark an
        exact value."""
        def num(x: float) -> str:
            return "nan" if math.isnan(x) else f"{x:.4g}"

        head = ("| layer | kind | input | σ_max | σ_min | bound (any size) | √gersh hi | gersh lo | "
                f"frame penalty (A={self.A:g}, B={self.B:g}) | zeros |")
        lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
        for r in self.layers:
            size = "—" if r["input_size"] is None else "×".join(map(str, r["input_size"]))
            sigma = num(r["sigma_max"]) if r["exact"] else f"~{num(r['sigma_max'])} (rel_tol {r['sigma_max_rel_tol']:.1g})"
            root = math.sqrt(r["gershgorin_hi"]) if r["gershgorin_hi"] >= 0 else math.nan
            bound = num(r["bound"]) + ("" if r["bound_any_size"] else f" (at {size})")
            lines.append(f"| {r['name']} | {r['kind']} | {size} | {sigma} | {num(r['sigma_min'])} | "
                         f"{bound} | {num(root)} | {num(r['gershgorin_lo'])} | {num(r['frame_penalty'])} | "
                         f"{100 * r['sparsity']:.1f}% |")
        lines.append("")
        lines.append(f"Lipschitz bound (product of the bounds, plain chain with 1-Lipschitz activations): "
                     f"{num(self.lipschitz_bound)}; product of σ_max on input {'×'.join(map(str, self.input_size))}: "
                     f"{num(self.lipschitz_estimate)}")
        return "\n".join(lines)


def _check_input_size(op: str, input_size) -> tuple[int, ...]:
    form = "the model input's shape without the batch dim, a non-empty sequence of positive ints, e.g. (1, 28, 28)"
    if isinstance(input_size, torch.Tensor) or not isinstance(input_size, Sequence) or not input_size \
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in input_size):
        raise TypeError(f"{op}: input_size must be {form}; got {input_size!r}")
    if any(n < 1 for n in input_size):
        raise ValueError(f"{op}: input_size must be {form}; got {tuple(input_size)}")
    return tuple(input_size)


def _record_sizes(op: str, model: nn.Module, layers, input_size, dtype, device) -> _InputSizes:
    """Each conv's spatial input size (and a ConvTranspose's output_padding as called), recorded by
    the Regularizer's pre-hooks (``_InputSizes``) on one no-grad forward pass of zeros. The modules'
    train/eval flags are restored and the hooks removed, also when the forward raises."""
    sizes = _InputSizes(layers, None)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # BatchNorm / dropout: no running-statistics update, no randomness
        with torch.no_grad():
            model(torch.zeros((1, *input_size), dtype=dtype, device=device))
    except Exception as e:
        raise RuntimeError(f"{op}: the forward pass of zeros of shape (1, {', '.join(map(str, input_size))}) "
                           f"that records the conv input sizes failed: {type(e).__name__}: {e}") from e
    finally:
        sizes.remove()
        for m, mode in modes:
            m.training = mode
    return sizes


@torch.no_grad()
def spectrum(model: nn.Module, input_size: Sequence[int], *, A: float = SPECTRUM_A,
             B: float = SPECTRUM_B) -> Spectrum:
    """Every Linear / Conv1d/2d/3d / ConvTranspose1d/2d/3d layer's operator spectrum and bounds,
    and the network's Lipschitz bound (docs/nn.md#spectrum).

    Args:
        model: the network; its Linear, Conv and ConvTranspose layers (those with a weight), in
            ``named_modules()`` order, are reported. A ConvTranspose's operator is the adjoint of
            the conv of its weight on its output size, with the same singular values; its call's
            ``output_padding`` (``output_size=`` may choose it) must be < its stride per dim.
        input_size: the model input's shape without the batch dim, e.g. ``(1, 28, 28)``: one
            forward pass of zeros ``(1, *input_size)`` (no grad, eval mode, the modules' modes
            restored after) records each conv's spatial input size.
        A, B: the frame penalty's band (defaults 0.5, 2.0).

    Returns:
        ``Spectrum`` (``.layers``, ``.lipschitz_bound``, ``.lipschitz_estimate``,
        ``.to_markdown()``, ``.as_dict()``). A layer holding NaN/Inf gets NaN in its row (and in
        the products), the other rows are unaffected. DTensor (FSDP2) weights are gathered
        (call it on every rank). Half precision is computed in float32.
    """
    op = "spectrum"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be an nn.Module; got {type(model).__name__}")
    size = _check_input_size(op, input_size)
    check_bounds(op, "A", A, "B", B)
    layers = []
    for name, m in model.named_modules():
        if getattr(m, "weight", None) is None:
            continue
        if isinstance(m, (nn.Linear,) + _CONVS):
            layers.append((name, m))
    if not layers:
        raise ValueError(f"{op}: the model has no nn.Linear, nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d layer "
                         f"with a weight")
    geometry = {name: _conv_geometry(op, name, m) for name, m in layers if isinstance(m, _CONVS)}
    first = _dist.stand_in(layers[0][1].weight)
    # no conv, no size to record: no forward pass (a model with DTensor weights outside FSDP2 could not run one)
    sizes = _record_sizes(op, model, layers, size, first.dtype, first.device) if geometry else None
    weights = _dist.gather([m.weight for _, m in layers])
    rows = []
    for (name, m), w in zip(layers, weights):
        w = w.detach()
        w = w if w.dtype == torch.float64 else w.float()
        kind = next(v for t, v in _KIND.items() if isinstance(m, t))
        op_size, extra = None, {}
        if isinstance(m, nn.Linear):
            in_size, geo, any_size = None, None, True
            bound = _conv.conv_spectral_norm(w.unsqueeze(-1), None, method="bound")
            lo, hi = _gram.gershgorin_bounds(w, "auto")
            frame = _gram.frame_penalty(w, A, B)
        else:
            if not sizes.recorded(m):
                raise ValueError(f"{op}: layer {name!r} was not called by the forward pass of zeros of shape "
                                 f"(1, {', '.join(map(str, size))}); spectrum reports the layers a forward "
                                 f"pass runs")
            in_size, geo = sizes.input_size(op, name, m), geometry[name]
            if isinstance(m, _TRANSPOSED):
                op_size = sizes.operator_size(op, name, m)
                extra = {"transposed": True, "output_padding": _call_output_padding(op, name, m, sizes)}
            args = (geo["stride"], geo["padding"], geo["dilation"], geo["groups"], geo["padding_mode"])
            # a circular conv that repeats output rows has no bound for every size: its own size's
            any_size = geo["padding_mode"] == "zeros" or _no_repeated_rows(w, geo)
            # (a ConvTranspose's bound is its conv T's: zero padding, σ(Tᵀ) = σ(T))
            bound = _conv.conv_spectral_norm(w, None if any_size else in_size, *args, method="bound")
            lo, hi = _conv.conv_gershgorin_bounds(w, in_size, *args, **extra)
            frame = _conv.conv_frame_penalty(w, in_size, A, B, *args, **extra)
        # the operator's singular values: a ConvTranspose's are those of T on its output size
        top, bottom, rel, exact = operator_singular_values(m, w, op_size or in_size, geo)
        rows.append({"name": name, "kind": kind, "input_size": in_size,
                     "output_padding": extra.get("output_padding") if not isinstance(m, nn.Linear) else None,
                     "sigma_max": top, "sigma_max_rel_tol": rel,
                     "sigma_min": bottom, "exact": exact, "bound": float(bound.sigma),
                     "bound_rel_tol": float(bound.rel_tol), "bound_any_size": any_size,
                     "gershgorin_lo": float(lo.amin()), "gershgorin_hi": float(hi.amax()),
                     "frame_penalty": float(frame), "sparsity": float((w == 0).sum()) / max(1, w.numel())})
    return Spectrum(layers=rows, lipschitz_bound=math.prod(r["bound"] for r in rows),
                    lipschitz_estimate=math.prod(r["sigma_max"] for r in rows), input_size=size, A=float(A),
                    B=float(B))


def _call_output_padding(op: str, name: str, m: nn.Module, sizes: _InputSizes) -> tuple[int, ...]:
    """The output_padding a ConvTranspose's call used (``output_size=`` may choose it); ValueError
    unless < stride per dim (then its operator is exactly the adjoint of a conv,
    docs/conv.md#transposed-convolutions)."""
    pad = sizes.output_padding(name, m)
    if any(p >= s for p, s in zip(pad, m.stride)):
        raise ValueError(f"{op}: layer {name!r} ({type(m).__name__}) ran with output_padding {pad}, not < its stride "
                         f"{tuple(m.stride)}: its operator is then not the adjoint of a conv; exclude it (run "
                         f"spectrum on the other layers)")
    return pad


def _no_repeated_rows(w: torch.Tensor, geo: dict) -> bool:
    """A circular conv repeats no output row for any input size when ``2·padding <= dilation·(k − 1)``
    per dim (docs/conv.md#a-bound-for-every-input-size)."""
    d = w.dim() - 2
    padding, dilation = expand(geo["padding"], d), expand(geo["dilation"], d)
    return all(2 * p <= dl * (k - 1) for p, dl, k in zip(padding, dilation, w.shape[2:]))
