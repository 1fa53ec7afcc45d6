"""Benchmark cases of the conv-as-operator family (docs/conv.md).

Names are ``C_outxC_inxkxk@HxW`` (layer, input size), with ``-circular`` for circular padding.
``conv_to_matrix`` is timed forward only, dense (the C++ / Triton kernel) and CSR (the composite
builder, backend "torch"); bytes moved: the dense T written once.

``conv_frame_penalty`` per layer runs forward + backward at padding 1 with A = 0.5, B = 2; the
providers: eager / compile = the explicit reference (T and its Gram) and its ``torch.compile``,
regkernels = the public op's default backend, torch = ``backend="torch"`` (the composite implicit
class statistics, regkernels/composite/conv.py: the path every later kernel is measured against).
Layers over the explicit path's size guard make eager and compile record ValueError, and the
error is then measured against the composite implicit path in float64 (the tests check implicit
= explicit in float64 on a sweep). ``conv_orthogonality_penalty`` runs forward + backward; the
Sedghi ops forward only. Every forward + backward case (per layer and whole model) also times the
forward alone and the backward alone (passes ``fwd`` / ``bwd``, ``_case.split_prepared``).

``resnet18-cifar`` (both ``conv_frame_penalty`` and ``conv_orthogonality_penalty``): one call is
forward + backward of ``regkernels.nn.Regularizer(model, kind)`` over every conv and the Linear of
a CIFAR ResNet-18 (``cifar_resnet18``), with the conv input sizes recorded by one forward pass at
setup. Providers: regkernels (default backends), torch (``backend="torch"``), eager
(``backend="reference"``; for conv_frame the explicit reference refuses the model's large layers
before running any) and ``model-step``, the model's own training forward + backward (batch 64,
cross-entropy), so the runner reports every provider's time as a multiple of the model step
(``x_model_step``) from the same run. Split into passes, the model step's forward is the model's
training forward + the loss and its backward ``loss.backward()``, so ``x_model_step`` compares
forward with forward and backward with backward.

Cases tagged ``issue="16"`` are those of issue 16 ("Conv-operator regularizers at model
scale"): ``python -m regkernels.bench --device cpu --tag issue=16`` runs exactly them. All
inputs are seeded; the float64 truth is computed on first use.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from regkernels.bench._case import SPLIT, Case, Prepared, compiled, max_rel_err, penalty_case, split_prepared
from regkernels.ops import conv as C
from regkernels.nn import Regularizer
from regkernels.reference import conv as R

# this family's cases, in the order the runner lists them (appended below as they are built)
CASES: list[Case] = []


def register(case: Case) -> Case:
    CASES.append(case)
    return case


FRAME_KW = dict(A=0.5, B=2.0, padding=1)


def _weight(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """He-scaled random conv weight (std sqrt(2 / fan_in)), the same for every dtype."""
    g = torch.Generator().manual_seed(seed)
    fan_in = math.prod(shape[1:])
    return (torch.randn(shape, generator=g, dtype=torch.float64) * math.sqrt(2.0 / fan_in)).to(device, dtype)


def _parse(name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """'64x64x3x3@32x32' -> ((64, 64, 3, 3), (32, 32))."""
    layer, size = name.split("-")[0].split("@")
    return tuple(map(int, layer.split("x"))), tuple(map(int, size.split("x")))


def _params(name: str) -> dict:
    """A case name's layer and input size as the JSON's structured parameters:
    '64x64x3x3@32x32-circular' -> {"c_out": 64, "c_in": 64, "kh": 3, "kw": 3, "h": 32, "w": 32}."""
    if "@" not in name:
        return dict(zip(("c_out", "c_in", "kh", "kw"), map(int, name.split("-")[0].split("x"))))
    shape, size = _parse(name)
    return dict(zip(("c_out", "c_in", "kh", "kw"), shape)) | dict(zip(("h", "w"), size))


def _matrix_case(name: str, quick: bool = False) -> Case:
    """conv_to_matrix forward (padding 1); the error compares the densified result with a
    float64 dense matrix."""
    shape, size = _parse(name)
    layout = name.rsplit("-", 1)[1]

    def setup(device: torch.device) -> Prepared:
        w = _weight(shape, device, torch.float32)
        truth = R.conv_to_matrix(w.double(), size, padding=1)

        def provider(fn: Callable) -> Callable:
            return lambda: fn(w, size, padding=1, layout=layout)

        def error(out) -> float:
            return max_rel_err(out if layout == "dense" else out.to_dense(), truth)

        rows = shape[0] * math.prod(size)
        nbytes = rows * shape[1] * math.prod(size) * 4 if layout == "dense" else None
        return Prepared(providers={"eager": provider(R.conv_to_matrix),
                                   "compile": provider(compiled(R.conv_to_matrix)),
                                   "regkernels": provider(C.conv_to_matrix)},
                        error=error, bytes_moved=nbytes)

    return register(Case(op="conv_to_matrix", name=name, setup=setup, quick=quick, passes=("fwd",),
                         params=_params(name) | {"padding": 1, "layout": layout}))


def _frame_case(name: str, quick: bool = False, tags: dict | None = None) -> Case:
    """(Not registered: the list below registers it.) conv_frame_penalty forward + backward w.r.t. the weight, padding 1 (``-circular``: circular
    padding), and the forward and the backward alone (``split_prepared``). Unlike ``penalty_case``
    the float64 truth is computed lazily: for layers over the explicit path's size guard the
    providers raise ValueError and the truth is the composite implicit path's (backend "torch")
    in float64."""
    shape, size = _parse(name)
    mode = "circular" if name.endswith("-circular") else "zeros"
    kw = dict(FRAME_KW, padding_mode=mode)

    def setup(device: torch.device) -> Prepared:
        w = _weight(shape, device, torch.float32)
        truth: list = []

        def forward(fn: Callable, weight: torch.Tensor, **extra) -> Callable:
            def run():  # a fresh leaf per call: no gradient carries over
                x = weight.detach().requires_grad_(True)
                return x, fn(x, size, **kw, **extra)
            return run

        def backward(state):
            x, out = state
            out.backward()
            return out.detach(), x.grad

        def truth64():
            if not truth:
                try:
                    truth.append(backward(forward(R.conv_frame_penalty, w.double())()))
                except ValueError:  # over the explicit path's size guard
                    truth.append(backward(forward(C.conv_frame_penalty, w.double(), backend="torch")()))
            return truth[0]

        comp = compiled(R.conv_frame_penalty)
        _, explicit_bytes = R.frame_working_bytes(w, size, 1, 1, 1, 1, "auto")
        note = "" if explicit_bytes <= R.MAX_DENSE_BYTES else (
            f"the explicit path needs {explicit_bytes / 2**30:.1f} GiB (over its guard); max_rel_err is against the "
            "implicit composite path (backend 'torch') in float64")
        return split_prepared({"eager": forward(R.conv_frame_penalty, w), "compile": forward(comp, w),
                               "regkernels": forward(C.conv_frame_penalty, w),
                               "torch": forward(C.conv_frame_penalty, w, backend="torch")},
                              backward,
                              error_fwd=lambda state: max_rel_err(state[1], truth64()[0]),
                              error_bwd=lambda out: max_rel_err(out, truth64()),
                              note=note)

    return Case(op="conv_frame_penalty", name=name, setup=setup, quick=quick, tags=dict(tags or {}),
                params=_params(name) | {"padding": 1, "padding_mode": mode}, passes=SPLIT)


def _ocnn_case(name: str, quick: bool = False, side: str = "rows") -> Case:
    """OCNN at stride 1; ``side="cols"`` (the input side, docs/conv.md#input-side) is the case
    ``<shape>-cols``."""
    shape = tuple(map(int, name.split("x")))
    case_name, kwargs = (name, {}) if side == "rows" else (f"{name}-cols", {"side": side})
    return register(penalty_case("conv_orthogonality_penalty", case_name, R.conv_orthogonality_penalty,
                        C.conv_orthogonality_penalty, lambda device, dtype: (_weight(shape, device, dtype),),
                        kwargs=kwargs, quick=quick, params=_params(name) | {"side": side}))


def _sedghi_case(op: str, name: str, extra: tuple = (), quick: bool = False) -> Case:
    shape, size = _parse(name)
    return register(penalty_case(op, name, getattr(R, op), getattr(C, op),
                        lambda device, dtype: (_weight(shape, device, dtype), size, *extra), grad=False, quick=quick,
                        params=_params(name)))


# ---------------------------------------------------------------- a CIFAR ResNet-18, whole-model cases
class _BasicBlock(nn.Module):
    """Two 3×3 convs (padding 1, the first with the block's stride) with BatchNorm; a 1×1 conv of
    that stride (and BatchNorm) on the shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _CifarResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs: a 3×3 stride-1 stem without max-pooling, BasicBlocks
    [2, 2, 2, 2] at width·(1, 2, 4, 8) channels (stride 2 at the first block of stages 2–4),
    global average pooling, Linear to the classes."""

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        widths = [width, 2 * width, 4 * width, 8 * width]
        c_in = width
        for i, c_out in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def cifar_resnet18(width: int = 64, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """The seeded CIFAR ResNet-18 of the ``resnet18-cifar`` cases (``width`` 64 is the standard
    one: 64/128/256/512 channels); the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _CifarResNet18(width, num_classes)


def conv_input_sizes(model: nn.Module, image: int, device: torch.device) -> dict[str, tuple[int, ...]]:
    """Spatial input size of every conv of ``model``, by name, from one forward pass of a
    ``(1, 3, image, image)`` input in eval mode (BatchNorm statistics untouched)."""
    sizes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[2:])))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image, image, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sizes


def _regularizer(model: nn.Module, kind: str, backend: str | None, sizes: dict) -> Callable[[], torch.Tensor]:
    """``Regularizer(model, kind, backend=...)`` over every conv and the Linear (its default
    include). conv_frame sends a Linear through ``penalty_multi``, which has no "torch" row: for
    backend "torch" the convs go through the composite and the Linear through its default, in the
    same mean over all layers."""
    kw = dict(A=0.5, B=2.0) if kind == "conv_frame" else {}
    sized = dict(input_sizes=sizes) if kind == "conv_frame" else {}
    if kind == "conv_frame" and backend == "torch":
        convs = Regularizer(model, kind, include=nn.Conv2d, backend="torch", **sized, **kw)
        linear = Regularizer(model, kind, include=nn.Linear, **kw)
        n_c, n_l = len(convs.layers), len(linear.layers)
        return lambda: (n_c * convs() + n_l * linear()) / (n_c + n_l)
    return Regularizer(model, kind, backend=backend, **sized, **kw)


def _explicit_refusal(model: nn.Module, sizes: dict) -> str | None:
    """Why ``backend="reference"`` would refuse conv_frame on this model: the first conv whose
    dense T plus Gram is over ``MAX_DENSE_BYTES`` (the reference's own size rule,
    ``frame_working_bytes``), or None. Checked for every layer before any runs: the explicit
    path runs layers in order, and this model's stem alone (T 65536×3072) would take tens of
    seconds before the first refusal."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shape, nbytes = R.frame_working_bytes(m.weight, sizes[name], m.stride, m.padding, m.dilation, m.groups,
                                                  "auto")
            if nbytes > R.MAX_DENSE_BYTES:
                return (f"conv_frame_penalty: the explicit reference (backend='reference') refuses layer {name!r}: "
                        f"dense T of shape {shape} plus its Gram need {nbytes / 2**30:.1f} GiB, over MAX_DENSE_BYTES "
                        f"({R.MAX_DENSE_BYTES / 2**30:.0f} GiB); checked for every layer before running any")
    return None


def _resnet_setup(kind: str, width: int = 64, image: int = 32, batch: int = 64) -> Callable[[torch.device], Prepared]:
    """Setup of a whole-model case: ``kind`` "conv_frame" or "ocnn" over ``cifar_resnet18(width)``
    at ``image``×``image`` inputs; the ``model-step`` provider trains on a batch of ``batch``
    (the tests use a narrow model on small images to stay fast)."""

    def setup(device: torch.device) -> Prepared:
        model = cifar_resnet18(width).to(device)
        sizes = conv_input_sizes(model, image, device)
        weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

        # state of a forward: (value, the weights whose gradients the call returns); the model
        # step's is (loss, None): it computes something else, nothing to compare
        def forward(reg: Callable[[], torch.Tensor], ws: list[torch.Tensor]) -> Callable:
            def run():
                for w in ws:  # the weights are shared by every call: no gradient carries over
                    w.grad = None
                return reg(), ws
            return run

        def backward(state):
            value, ws = state
            value.backward()
            return None if ws is None else (value.detach(), [w.grad for w in ws])

        def provider(backend: str | None) -> Callable:
            return forward(_regularizer(model, kind, backend, sizes), weights)

        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, image, image, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)

        def model_step():  # the training forward + loss; backward: loss.backward()
            model.train()
            for p in model.parameters():
                p.grad = None
            return F.cross_entropy(model(x), y), None

        truth: list = []

        def truth64():  # float64 copy of the model, the composite (conv_frame) or the reference (ocnn)
            if not truth:
                model64 = copy.deepcopy(model).double()
                ws64 = [m.weight for m in model64.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
                reg64 = _regularizer(model64, kind, "torch" if kind == "conv_frame" else "reference", sizes)
                truth.append(backward(forward(reg64, ws64)()))
            return truth[0]

        def error_fwd(state) -> float | None:
            value, ws = state
            return None if ws is None else max_rel_err(value, truth64()[0])

        def error_bwd(out) -> float | None:
            return None if out is None else max_rel_err(out, truth64())  # None: the model step

        forwards: dict[str, Callable] = {"eager": provider("reference"), "regkernels": provider(None),
                                         "torch": provider("torch"), "model-step": model_step}
        refusal = _explicit_refusal(model, sizes) if kind == "conv_frame" else None
        if refusal is not None:
            def refused():  # in every pass: the forward raises
                raise ValueError(refusal)
            forwards["eager"] = refused
        layers = len(weights)
        note = (f"Regularizer(kind={kind!r}) over {layers} layers (every conv and the Linear), forward + backward; "
                "regkernels: default backends, torch: backend='torch'"
                + (" (the Linear through penalty_multi's default: it has no 'torch' row)" if kind == "conv_frame" else "")
                + f", eager: backend='reference'; model-step: the model's training forward + backward, batch {batch}, "
                  f"{image}x{image}, cross-entropy; x_model_step = median / model-step median"
                + "; pass fwd: each forward alone (model-step: training forward + cross-entropy loss), pass bwd: "
                  "each backward alone (model-step: loss.backward()), its forward untimed before each call")
        return split_prepared(forwards, backward, error_fwd, error_bwd, note=note)

    return setup


def _resnet_case(op: str, kind: str, name: str = "resnet18-cifar", tags: dict | None = None, **size) -> Case:
    """(Not registered: the list below registers it.) ``size``: ``_resnet_setup``'s width, image, batch."""
    dims = {"width": 64, "image": 32, "batch": 64} | size  # _resnet_setup's defaults
    return Case(op=op, name=name, setup=_resnet_setup(kind, **size), tags=dict(tags or {}),
                params={"model": "cifar_resnet18", "kind": kind} | dims, passes=SPLIT)


ISSUE16 = {"issue": "16"}

_matrix_case("16x16x3x3@16x16-dense", quick=True)
_matrix_case("16x16x3x3@16x16-csr")
_matrix_case("64x64x3x3@8x8-dense")
_matrix_case("64x64x3x3@8x8-csr")

register(_frame_case("16x16x3x3@8x8", quick=True))
# the layers of a CIFAR ResNet-18 (issue 16), zero and circular padding
for _layer in ("64x64x3x3@32x32", "128x128x3x3@16x16", "256x256x3x3@8x8", "512x512x3x3@4x4"):
    register(_frame_case(_layer, tags=ISSUE16))
    register(_frame_case(f"{_layer}-circular", tags=ISSUE16))
register(_resnet_case("conv_frame_penalty", "conv_frame", tags=ISSUE16))

_ocnn_case("64x64x3x3", quick=True)
_ocnn_case("512x512x3x3")
_ocnn_case("64x64x3x3", quick=True, side="cols")
_ocnn_case("512x512x3x3", side="cols")
register(_resnet_case("conv_orthogonality_penalty", "ocnn", tags=ISSUE16))

# 1024 frequencies, one 64×64 complex matrix each
_sedghi_case("conv_singular_values", "16x16x3x3@8x8", quick=True)
_sedghi_case("conv_singular_values", "64x64x3x3@32x32")
_sedghi_case("clip_conv_singular_values", "16x16x3x3@8x8", extra=(0.8, 1.2), quick=True)
_sedghi_case("clip_conv_singular_values", "64x64x3x3@32x32", extra=(0.8, 1.2))
