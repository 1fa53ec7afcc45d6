"""``BetaLasso``: SGD with an L1 term and hard thresholding (docs/beta_lasso.md), fused.

All parameters of one (device, dtype) are updated by one kernel launch (CPU or CUDA) that also
counts each tensor's non-zeros, so ``nonzeros()`` costs no extra pass over memory. Which
implementation updates a parameter is ``regkernels.ops.beta_lasso.TABLE``'s choice for its device
and dtype, as for every op.

Host work (docs/beta_lasso.md#launch-plan): a full pass over the parameters (backend resolution,
buffer creation, argument lists) runs on the first step and whenever something it resolved
changed; it leaves a ``_Plan``, and later steps only gather the gradients, check the plan still
holds (identities and values, before any update) and call the op once per launch. The op keeps
its chunk table cached on its side (on the device for CUDA), keyed by pointers, not values.

DTensor parameters (FSDP2, tensor parallelism; docs/beta_lasso.md#β-lasso-on-sharded-parameters)
are updated through their local shards, in the same launches as plain tensors of their device and
dtype; their momentum buffers are DTensors of the parameter's layout. Only ``nonzeros()``
communicates: one all-reduce per device mesh.
"""
from __future__ import annotations

import itertools
import math
import operator
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

from regkernels import distributed as _dist
from regkernels.ops._common import check_number
from regkernels.ops._table import check_backend_keyword
from regkernels.ops.beta_lasso import OP, TABLE, fused_takes, pack_hyper
from regkernels.reference.beta_lasso import beta_lasso_update_

# DTensor parameters are recognised without importing torch.distributed.tensor (0.3-1 s, at
# import regkernels): a process that has DTensors has imported it (regkernels.distributed)
_is_dtensor = _dist.is_dtensor

__all__ = ["BetaLasso"]

_OP = "BetaLasso"


def _check_lr_tensor(lr: torch.Tensor) -> None:
    """What a Tensor lr must be without reading it: 0-dim and floating."""
    if lr.dim() != 0:
        raise ValueError(f"{_OP}: a Tensor lr must be 0-dim; got shape {tuple(lr.shape)} (use lr.reshape(()))")
    if not lr.is_floating_point():
        raise TypeError(f"{_OP}: a Tensor lr must be floating (float32 or float64); got {lr.dtype}")


def _lr_value(lr: torch.Tensor) -> float:
    """A Tensor lr's value, read (``.item()``: a host sync for a CUDA tensor) and checked: a 0-dim
    floating tensor holding a finite number >= 0 (docs/beta_lasso.md#tensor-learning-rate)."""
    _check_lr_tensor(lr)
    value = lr.item()
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{_OP}: lr must be finite and >= 0; got lr={value} (a Tensor lr)")
    return value


def _check_hyper(group: dict, read_lr: bool = True) -> float | torch.Tensor:
    """A group's hyper-parameters (docs/beta_lasso.md): lr, lam, beta, momentum, weight_decay finite
    Python numbers >= 0 (lr also a 0-dim floating Tensor), dampening finite, nesterov a bool that
    needs momentum > 0 and dampening = 0, maximize a bool, differentiable False.
    Returns lr as a float: a Tensor lr is read for that unless ``read_lr`` is False (under
    torch.compile, where reading it would make its value a constant of the graph), then returned
    as is after its dtype and shape checks."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        _prepare_tensor_lr()
        if read_lr:
            lr = _lr_value(lr)
        else:
            _check_lr_tensor(lr)
    else:
        lr = check_number(_OP, "lr", lr, lo=0)
    for name in ("lam", "beta", "momentum", "weight_decay"):
        check_number(_OP, name, group[name], lo=0)
    check_number(_OP, "dampening", group["dampening"])
    nesterov, momentum, dampening = group["nesterov"], group["momentum"], group["dampening"]
    for name in ("nesterov", "maximize"):
        if not isinstance(group[name], bool):
            raise TypeError(f"{_OP}: {name} must be a bool; got {group[name]!r}")
    if group["differentiable"] is not False:
        raise ValueError(f"{_OP}: differentiable={group['differentiable']!r} is not supported: the update is one "
                         "in-place fused op with no autograd formula, so no graph can run through step(); "
                         "use differentiable=False (the default)")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{_OP}: nesterov=True requires momentum > 0 and dampening = 0; "
                         f"got momentum={momentum}, dampening={dampening}")
    return lr


def _check_capturable(capturable) -> None:
    """capturable must be False. Not kept in the param groups: torch.compile's optimizer support
    sets group["capturable"] = True in the traced view of every group (the convention of torch's
    optimizers that have the flag), which says nothing about this optimizer."""
    if capturable is not False:
        raise ValueError(f"{_OP}: capturable={capturable!r} is not supported: the fused op takes the "
                         "hyper-parameters as host values (a Tensor lr is read with .item() each step), so a "
                         "captured CUDA graph would replay the lr of its capture; use capturable=False (a step "
                         "with constant hyper-parameters can still be captured after one warm-up step)")


def _resolve_backend(backend: str | None, foreach, fused) -> tuple[str | None, bool]:
    """``backend`` with torch.optim's ``foreach`` / ``fused`` flags folded in
    (docs/beta_lasso.md#torchoptim-flags), and whether every parameter must take a fused kernel.
    True for either means the fused kernel (BetaLasso's fused launch is already multi-tensor),
    False the per-tensor reference (torch's for-loop implementation), None no preference."""
    for name, v in (("foreach", foreach), ("fused", fused)):
        if v is not None and not isinstance(v, bool):
            raise TypeError(f"{_OP}: {name} must be None or a bool; got {v!r}")
    wants = {v for v in (foreach, fused) if v is not None}
    if len(wants) > 1:
        raise ValueError(f"{_OP}: foreach={foreach} and fused={fused} contradict each other: True asks for the "
                         "fused kernel, False for the per-tensor reference; give one of them")
    if not wants:
        return backend, False
    if wants == {False}:
        if backend not in (None, "reference"):
            raise ValueError(f"{_OP}: foreach/fused=False asks for the per-tensor reference, backend={backend!r} "
                             "for a fused kernel; give one of them")
        return "reference", False
    if backend == "reference":
        raise ValueError(f"{_OP}: foreach/fused=True asks for the fused kernel, backend='reference' for the "
                         "per-tensor ops; give one of them")
    return backend, True


_HYPER_KEYS = ("lr", "lam", "beta", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
# torch.optim.SGD's flags (docs/beta_lasso.md#torchoptim-flags): every group holds them, as in SGD
# (capturable, which SGD lacks, is refused and not kept: _check_capturable); foreach and fused
# choose the backend of the whole optimizer, so a group cannot differ
_FLAG_DEFAULTS = {"maximize": False, "foreach": None, "fused": None, "differentiable": False}
_GRAD = operator.attrgetter("grad")
_BUF = operator.itemgetter("momentum_buffer")
_NONES = itertools.repeat(None)


def _launch_reading_lr(launches: list[_Launch]) -> list[torch.Tensor]:
    """The fused launches of a step under torch.compile, their Tensor lrs (``lr_at``: hyper
    index, tensor) read now. Outside the graph (one graph break per step) so that the values stay
    data: read while tracing, they would be constants of the graph, every new lr a recompilation.
    Returns each launch's non-zero counts."""
    read: dict[int, float] = {}
    out = []
    for launch in launches:
        hyper = list(launch.hyper)
        for i, lr in launch.lr_at:
            if id(lr) not in read:
                read[id(lr)] = _lr_value(lr)
            hyper[i] = read[id(lr)]
        out.append(launch.fused(launch.args, launch.grads, launch.bufs, hyper, launch.flags))
    return out


# ``torch.compiler.disable(_launch_reading_lr)``, made when the first Tensor lr is checked outside a
# compiled region (torch.compiler.disable imports torch._dynamo, 1-1.5 s, which import regkernels
# does not pay); None until then
_LAUNCH_OUTSIDE_GRAPH = None


def _launch_outside_graph(launches: list[_Launch]) -> list[torch.Tensor]:
    """``_launch_reading_lr`` outside the compiled graph where it was prepared (a Tensor lr seen by
    an eager check: construction, add_param_group, or an eager step); an lr that became a Tensor
    only inside a compiled step is read while tracing (a recompilation per new value)."""
    launch = _LAUNCH_OUTSIDE_GRAPH or _launch_reading_lr
    return launch(launches)


def _prepare_tensor_lr() -> None:
    global _LAUNCH_OUTSIDE_GRAPH
    if _LAUNCH_OUTSIDE_GRAPH is None and not torch.compiler.is_compiling():
        _LAUNCH_OUTSIDE_GRAPH = torch.compiler.disable(_launch_reading_lr)


def _negated(grads: list, at: list[int]) -> list:
    """``grads`` with the gradients at ``at`` negated (maximize: the kernels take d = −g as the
    gradient; a copy, the user's .grad is not touched)."""
    grads = list(grads)
    for i in at:
        grads[i] = torch.neg(grads[i])
    return grads


def _local(t: torch.Tensor) -> torch.Tensor:
    """What the kernels update for ``t``: its local shard (a view of the DTensor's own storage
    under no_grad) or ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


def _layout(t: torch.Tensor) -> tuple | None:
    return (t.device_mesh, t.placements) if _is_dtensor(t) else None


def _local_grad(p: torch.Tensor, g: torch.Tensor, gi: int, pi: int) -> torch.Tensor:
    """The local shard of DTensor ``p``'s gradient ``g``, in ``p``'s placements.

    A gradient placed otherwise (a Partial one holds summands, a Shard(1) one of a Shard(0)
    parameter the wrong slice) is redistributed: one collective per such gradient and step,
    which FSDP2 and DTensor autograd never need (they give gradients the parameter's layout)."""
    if not _is_dtensor(g):
        raise TypeError(f"{_OP}: parameter {pi} of param group {gi} is a DTensor but its gradient is a "
                        f"{type(g).__name__}; give it a DTensor gradient on the parameter's mesh (placements "
                        f"{tuple(p.placements)}), e.g. distribute_tensor(grad, p.device_mesh, p.placements)")
    if _layout(g) != _layout(p):
        if g.device_mesh != p.device_mesh:
            raise ValueError(f"{_OP}: the gradient of parameter {pi} of param group {gi} is on device mesh "
                             f"{g.device_mesh}, the parameter on {p.device_mesh}; give it a gradient on the "
                             "parameter's mesh")
        g = g.redistribute(p.device_mesh, p.placements)
    return g.to_local()


def _stored_buf(p: torch.Tensor, state: dict, gi: int, pi: int) -> torch.Tensor | None:
    """``p``'s momentum buffer in ``state`` (None before the first step), refused unless it has
    ``p``'s layout: a DTensor on the same mesh and placements for a DTensor, a tensor otherwise."""
    buf = state.get("momentum_buffer")
    if buf is not None and _layout(buf) != _layout(p):
        def kind(t):
            return f"a DTensor with placements {tuple(t.placements)}" if _is_dtensor(t) else "a torch.Tensor"
        raise ValueError(f"{_OP}: the momentum buffer of parameter {pi} of param group {gi} is {kind(buf)}, the "
                         f"parameter {kind(p)}; load optimizer state saved with the parameters' layout "
                         "(torch.distributed.checkpoint with get_state_dict/set_state_dict reshards it)")
    return buf


def _first_copy(p: torch.Tensor) -> bool:
    """Whether this rank holds the copy of DTensor ``p``'s shard that ``nonzeros()`` counts: the
    one at coordinate 0 of every mesh dimension ``p`` is replicated over."""
    coordinate = p.device_mesh.get_coordinate()
    return all(c == 0 for c, pl in zip(coordinate, p.placements) if pl.is_replicate())


def _sum_over_mesh(mesh, values: list[int]) -> list[int]:
    """``values`` summed over the ranks of ``mesh``: one all-reduce (per mesh dimension larger
    than 1 for a multi-dimensional mesh that is only part of the world, which has no group of
    its own)."""
    total = torch.tensor(values, dtype=torch.int64, device=mesh.device_type)
    if mesh.ndim == 1:
        groups = [mesh.get_group()]
    elif mesh.size() == torch.distributed.get_world_size():
        groups = [None]  # the default group: the mesh's ranks
    else:
        groups = [mesh.get_group(d) for d in range(mesh.ndim) if mesh.size(d) > 1]
    for group in groups:
        _dist._collective(group, lambda g=group: torch.distributed.all_reduce(total, group=g), total)
    return total.tolist()


class _Launch:
    """Argument lists of one fused launch: every parameter of one (device, dtype), and where they
    came from (``picks``: per contributing group, its index and the indices of its parameters in
    this launch, or None for all of them), so a plan can gather the gradients again. ``params``
    are the parameters (their counts are reported for them), ``args`` what the kernel updates:
    the same tensors, or a DTensor's local shard (``dtensors``: its index, the DTensor and its
    momentum buffer, so a plan can take the local views again)."""

    __slots__ = ("fused", "params", "args", "grads", "bufs", "hyper", "flags", "placeholder", "picks", "states",
                 "dtensors", "negate", "lr_at")

    def __init__(self, fused: Callable, placeholder: torch.Tensor):
        self.fused = fused  # the table's fused entry for this (device, dtype)
        self.params: list[torch.Tensor] = []
        self.args: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.bufs: list[torch.Tensor] = []
        self.hyper: list[float] = []
        self.flags: list[int] = []
        self.placeholder = placeholder  # stands in for the buffer of tensors without momentum
        self.picks: list[tuple[int, list[int]]] = []
        self.states: list[dict] = []  # the state dicts of its momentum parameters (their buffers checked per step)
        self.dtensors: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        self.negate: list[int] = []  # indices of the tensors of maximize groups (their gradient negated)
        self.lr_at: list[tuple[int, torch.Tensor]] = []  # under torch.compile: hyper index → Tensor lr

    def pick(self, gi: int, pi: int) -> None:
        if not self.picks or self.picks[-1][0] != gi:
            self.picks.append((gi, []))
        self.picks[-1][1].append(pi)


class _GroupPlan:
    """One param group as the last full pass saw it: its params (by identity), which had a
    gradient, and its hyper-parameters (values and types, so a float → bool change is rechecked;
    a Tensor lr by the value read from it, ``tensor_lr``).
    ``dtensors``: the indices of its DTensor parameters, whose gradients are taken local per step."""

    __slots__ = ("group", "params", "members", "mask", "dtensors", "types", "values", "tensor_lr", "hyper", "flags")

    def __init__(self, group: dict, mask: tuple[bool, ...], lr: float):
        self.group = group
        self.params = group["params"]
        self.members = tuple(self.params)
        self.mask = mask
        self.dtensors = tuple(i for i, p in enumerate(self.members) if _is_dtensor(p))
        self.set_hyper(group, lr)

    def set_hyper(self, group: dict, lr: float) -> None:
        """``lr``: the group's lr as a float (read from a Tensor lr)."""
        values = tuple(map(group.__getitem__, _HYPER_KEYS))
        self.types = tuple(map(type, values))
        self.tensor_lr = isinstance(values[0], torch.Tensor)
        self.values = (lr,) + values[1:]
        # the steady flags: a plan exists only once every momentum buffer does
        self.hyper, self.flags = pack_hyper(*self.values[:-1], False)


class _LaunchPlan:
    __slots__ = ("fused", "params", "args", "bufs", "hyper", "flags", "picks", "whole", "states", "state_bufs",
                 "dtensors", "negate")

    def __init__(self, launch: _Launch, groups: list[_GroupPlan]):
        self.fused = launch.fused
        self.params = launch.params
        self.args = launch.args
        self.bufs = launch.bufs
        self.dtensors = launch.dtensors
        self.negate = launch.negate
        # a group all of whose parameters are in this launch in order passes its gradient list as is
        self.picks = [(gi, None if idx == list(range(len(groups[gi].members))) else idx) for gi, idx in launch.picks]
        self.states = launch.states
        self.state_bufs = [st["momentum_buffer"] for st in launch.states]
        self.set_hyper(groups)

    def set_hyper(self, groups: list[_GroupPlan]) -> None:
        hyper: list[float] = []
        flags: list[int] = []
        for gi, idx in self.picks:
            n = len(groups[gi].members) if idx is None else len(idx)
            hyper += groups[gi].hyper * n
            flags += groups[gi].flags * n
        self.hyper, self.flags = hyper, flags

    def local_args(self) -> tuple[list, list]:
        """The kernel's parameter and buffer lists for this step. A DTensor's local views are taken
        again: FSDP2 may give a parameter a new local tensor under the same DTensor object (its
        load_state_dict hook re-pads the shard)."""
        if not self.dtensors:
            return self.args, self.bufs
        args, bufs = self.args.copy(), self.bufs.copy()
        for i, p, buf in self.dtensors:
            args[i] = p.to_local()
            if buf is not None:
                bufs[i] = buf.to_local()
        return args, bufs

    def grads(self, grads_by_group: list[list]) -> list:
        if len(self.picks) == 1 and self.picks[0][1] is None:
            return grads_by_group[self.picks[0][0]]
        out = []
        for gi, idx in self.picks:
            gr = grads_by_group[gi]
            out += gr if idx is None else [gr[i] for i in idx]
        return out


class _Plan:
    """What a full pass of ``step()`` resolved (docs/beta_lasso.md#launch-plan), reused by later
    steps while the optimizer's state object, the param groups (their params by identity, which
    have a gradient, hyper-parameter values) and the momentum buffers are the same. Gradients are
    gathered again every step (a DTensor's as its local shard); their layout is checked by the
    fused op itself."""

    __slots__ = ("state", "groups", "launches", "reference")

    def __init__(self, state, groups: list[_GroupPlan], launches: list[_LaunchPlan],
                 reference: list[tuple[torch.Tensor, int, int]]):
        self.state = state
        self.groups = groups
        self.launches = launches
        self.reference = reference  # (param, group index, index in the group) updated by the reference


class BetaLasso(Optimizer):
    r"""β-LASSO (Neyshabur 2020) with optional momentum, Nesterov and weight decay.

    For every parameter θ with a gradient g (parameters without one are skipped)::

        d = g, or −g with maximize
        d = d + weight_decay·θ                                  (if weight_decay)
        buf = d (first step) | momentum·buf + (1 − dampening)·d (if momentum)
        d = d + momentum·buf (nesterov) | buf (momentum) | d
        θ = θ − lr·(d + lam·sign(θ))      # sign of θ before this step, sign(0) = 0
        θ = θ · [|θ| ≥ beta·lam]

    The L1 term stays outside the momentum buffer; ``beta = 0`` never zeroes. With the
    defaults this is the paper's algorithm.

    Args:
        params: iterable of parameters or of param-group dicts (``torch.optim`` convention).
        lr: learning rate (≥ 0): a Python number or a 0-dim floating Tensor, which
            ``torch.compile(opt.step)`` does not specialize on, so a scheduler changing it causes no
            recompilation; it is read once per step (docs/beta_lasso.md#tensor-learning-rate).
        lam: L1 strength λ (≥ 0).
        beta: threshold factor: entries with ``|θ| < beta·lam`` become 0 after the step (≥ 0).
        momentum, dampening, weight_decay, nesterov: as in ``torch.optim.SGD``.
        maximize, foreach, fused, differentiable, capturable: ``torch.optim.SGD``'s flags
            (docs/beta_lasso.md#torchoptim-flags): ``maximize`` ascends; ``fused``/``foreach``
            True require the fused kernel, False select the reference; ``differentiable=True``
            and ``capturable=True`` are refused.
        backend: ``None`` (fused kernel where one exists for the device and dtype, otherwise
            the reference), ``"reference"`` (per-tensor torch ops), ``"cpu"`` or ``"cuda"``
            (the fused kernel; a ValueError at ``step()`` for a parameter it cannot update,
            listing the backends that can).

    float16/bfloat16 parameters are updated in float32 math; in float32 the fused CPU update
    equals the reference bit for bit. The fused kernels take any dense layout (contiguous,
    channels_last, transposed) that the gradient shares; momentum buffers get the parameter's.

    DTensor parameters (FSDP2 ``fully_shard``, tensor parallelism) are updated through their
    local shards by the same launches, with no communication, so each rank's shard equals that
    slice of a one-process run bit for bit; their momentum buffers are DTensors of the
    parameter's layout (``state_dict()`` and ``torch.distributed.checkpoint`` see DTensor
    state). A gradient placed otherwise than its parameter is redistributed first (a collective
    in ``step()``). ``nonzeros()`` counts a DTensor over the whole tensor, with one all-reduce
    per device mesh (docs/beta_lasso.md#β-lasso-on-sharded-parameters).

    Refused with a TypeError/ValueError: hyper-parameters that are not finite Python numbers in
    their range (a Tensor lr: 0-dim, floating, finite, ≥ 0; bools included; every group's values
    are checked when the group is added and again at each step), complex parameters, a parameter listed twice, a DTensor parameter with a
    ``Partial`` placement. ``copy.deepcopy`` and pickling keep ``backend``; ``nonzeros()`` works
    under ``torch.compile(opt.step)``.
    """

    def __init__(self, params: Iterable, lr: float | torch.Tensor, lam: float, beta: float, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 differentiable: bool = False, capturable: bool = False, backend: str | None = None):
        check_backend_keyword(_OP, backend)
        _check_capturable(capturable)
        backend, self._require_fused = _resolve_backend(backend, foreach, fused)
        defaults = dict(lr=lr, lam=lam, beta=beta, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, foreach=foreach,
                        fused=fused, differentiable=differentiable)
        _check_hyper(defaults)
        super().__init__(params, defaults)
        self.backend = backend
        # the table's refusal now, not at the first step: a name it does not know, or a backend that
        # has no row for a parameter's device and dtype
        for device, dtype in {(p.device, p.dtype) for g in self.param_groups for p in g["params"]}:
            TABLE.implementation(OP, backend, device, dtype, name=_OP)
        # counts of the last step: (params updated by one launch, their int64 counts tensor)
        self._counts: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        self._plan: _Plan | None = None  # what the last full step resolved (step() reuses it)

    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group`` plus β-LASSO's checks: the group's
        hyper-parameters (as the constructor checks them), real floating parameters (sign(θ)
        and |θ| ≥ β·λ have no meaning for complex ones: pass ``torch.view_as_real(p)`` to treat
        real and imaginary parts as separate entries), no parameter twice (the fused kernel
        would update it twice concurrently, with results that change from run to run) and no
        DTensor with a ``Partial`` placement (its local tensors are summands of the weights, which
        cannot be thresholded one by one)."""
        group = dict(param_group)
        _check_capturable(group.pop("capturable", False))
        for name in ("foreach", "fused"):
            if name in group and name in self.defaults and group[name] != self.defaults[name]:
                raise ValueError(f"{_OP}: param group {len(self.param_groups)} has {name}={group[name]!r}, the "
                                 f"optimizer {name}={self.defaults[name]!r}; {name} chooses the backend of the "
                                 "whole optimizer: give it to the constructor only")
        params = group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # a set is refused by torch's own check
            params = group["params"] = list(params)
        seen: dict[int, int] = {}
        for i, p in enumerate([params] if isinstance(params, torch.Tensor) else params):
            if not isinstance(p, torch.Tensor):
                continue  # torch's check names it
            if p.is_complex():
                raise TypeError(f"{_OP}: parameter {i} of param group {len(self.param_groups)} is complex ({p.dtype}); "
                                "β-LASSO is defined for real parameters (view it as real pairs with "
                                "torch.view_as_real)")
            if _is_dtensor(p) and any(pl.is_partial() for pl in p.placements):
                raise ValueError(f"{_OP}: parameter {i} of param group {len(self.param_groups)} is a DTensor with "
                                 f"placements {tuple(p.placements)}; a Partial placement holds summands of the "
                                 "weights, which cannot be thresholded one by one: give it Shard or Replicate "
                                 "placements (redistribute it before building the optimizer)")
            if id(p) in seen:
                raise ValueError(f"{_OP}: parameter {i} of param group {len(self.param_groups)} is the same tensor as "
                                 f"parameter {seen[id(p)]}; list each parameter once")
            seen[id(p)] = i
        super().add_param_group(group)
        self._plan = None
        try:
            _check_hyper(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles defaults, state and param_groups only
        return {**super().__getstate__(), "backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # state saved before the torch.optim flags existed: their defaults, as SGD does
        for group in (self.defaults, *self.param_groups):
            for name, default in _FLAG_DEFAULTS.items():
                group.setdefault(name, default)
        if "backend" in state:  # pickling; load_state_dict keeps the optimizer's own backend
            self.backend = state["backend"]
            self._require_fused = bool(self.defaults.get("foreach") or self.defaults.get("fused"))
        # the counts are tied to the parameter objects of the last step: a copy has not stepped
        self._counts = []
        self._plan = None  # load_state_dict comes through here: new state, new buffers

    def _fused_for(self, t: torch.Tensor, g: torch.Tensor, impls: dict) -> Callable | None:
        """The fused update that takes parameter ``t`` with gradient ``g`` (a DTensor's local
        shards: what the kernel would see), from the table's row for its device and dtype, or
        None for the per-tensor reference. ``impls`` caches the table's answer per (device,
        dtype) for one step. A named fused backend that cannot take ``t`` raises."""
        key = (t.device, t.dtype)
        if key not in impls:
            impls[key] = TABLE.implementation(OP, self.backend, t.device, t.dtype, name=_OP)
        impl = impls[key]
        if impl is beta_lasso_update_:
            if self._require_fused:
                raise ValueError(f"{_OP}: fused=True (or foreach=True) but no fused kernel updates {t.dtype} "
                                 f"parameters on {t.device}; leave fused/foreach None to use the reference there")
            return None
        if fused_takes(t, g):
            return impl
        if self.backend is None and not self._require_fused:
            return None
        asked = f"backend={self.backend!r}" if self.backend is not None else "fused=True (or foreach=True)"
        raise ValueError(
            f"{_OP}: {asked} cannot update a {t.dtype} parameter on {t.device} with strides {t.stride()} from a "
            f"{g.dtype} gradient with strides {g.stride()}: the fused kernels take a gradient of the parameter's "
            "dtype and strides, in a dense layout (contiguous, channels_last, transposed ...); "
            "backend='reference' or None takes any")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # cleared, never rebound: torch.compile(opt.step) does not write attribute assignments
        # on the optimizer back (nonzeros() would see an empty list) but replays list mutations
        self._counts.clear()
        plan = self._plan
        if plan is not None and not torch.compiler.is_compiling():
            done = self._planned_step(plan)
            if done is None:
                return loss
            self._full_step(done)  # the counts of launches that ran stay
        else:
            self._full_step(())
        return loss

    def _planned_step(self, plan: _Plan) -> set[int] | None:
        """The step through ``plan``: None when it ran, else the ids of the parameters already
        updated (launches that ran before one refused its arguments) for the full pass to skip.
        Everything the plan depends on is checked before the first update."""
        self._plan = None  # restored at the end: an exception on the way leaves no plan
        groups = self.param_groups
        if self.state is not plan.state or len(groups) != len(plan.groups):
            return set()
        grads_by_group = []
        rehyper = False
        for gi, (group, gp) in enumerate(zip(groups, plan.groups)):
            params = group["params"]
            if (group is not gp.group or params is not gp.params or len(params) != len(gp.members)
                    or not all(map(operator.is_, params, gp.members))):
                return set()
            grads = list(map(_GRAD, params))
            if tuple(map(operator.is_not, grads, _NONES)) != gp.mask:
                return set()
            for i in gp.dtensors:
                if grads[i] is not None:
                    grads[i] = _local_grad(params[i], grads[i], gi, i)
            values = tuple(map(group.__getitem__, _HYPER_KEYS))
            types = tuple(map(type, values))
            if gp.tensor_lr and types == gp.types:
                # a scheduler fills a Tensor lr in place: its value is read once per step
                values = (_lr_value(values[0]),) + values[1:]
            # types first: comparing a Tensor value with == would not give a bool
            if types != gp.types or values != gp.values:
                lr = _check_hyper(group)  # a scheduler or a user may have changed lr etc. since the last step
                if (values[3] != 0) != (gp.values[3] != 0) or values[-1] != gp.values[-1]:
                    return set()  # momentum or maximize switched: buffers and launches change
                gp.set_hyper(group, lr)
                rehyper = True
            grads_by_group.append(grads)
        for lp in plan.launches:
            try:
                if not all(map(operator.is_, map(_BUF, lp.states), lp.state_bufs)):
                    return set()
            except KeyError:  # a buffer was removed from the state
                return set()
        for p, gi, pi in plan.reference:
            if grads_by_group[gi][pi].is_sparse:
                raise RuntimeError("BetaLasso does not support sparse gradients")
        if rehyper:
            for lp in plan.launches:
                lp.set_hyper(plan.groups)
        for k, lp in enumerate(plan.launches):
            args, bufs = lp.local_args()
            grads = lp.grads(grads_by_group)
            if lp.negate:
                grads = _negated(grads, lp.negate)
            try:
                counts = lp.fused(args, grads, bufs, lp.hyper, lp.flags)
            except RuntimeError:
                # the op checks its arguments before it writes anything: a gradient that changed
                # dtype, layout or device is the full pass's to route (reference or error)
                return {id(p) for done in plan.launches[:k] for p in done.params}
            self._counts.append((lp.params, counts))
        for p, gi, pi in plan.reference:
            self._reference_update(p, _local(p), grads_by_group[gi][pi], gi, pi)
        self._plan = plan
        return None

    def _full_step(self, done) -> None:
        """The step from scratch: resolves every parameter's backend, creates momentum buffers,
        updates, and (outside torch.compile) leaves the plan later steps reuse. ``done``: ids of
        parameters this step has already updated."""
        self._plan = None
        planning = not torch.compiler.is_compiling()
        # (device, dtype) → the fused op's argument lists, filled in one pass over the params
        launches: dict[tuple[torch.device, torch.dtype], _Launch] = {}
        impls: dict[tuple[torch.device, torch.dtype], Callable] = {}
        group_plans: list[_GroupPlan] = []
        reference: list[tuple[torch.Tensor, int, int]] = []
        for gi, group in enumerate(self.param_groups):
            # a scheduler or a user may have changed lr etc. since construction. Under torch.compile a
            # Tensor lr stays a tensor: the launch reads it outside the graph (_launch_reading_lr)
            lr = _check_hyper(group, read_lr=planning)
            lr_tensor = lr if isinstance(lr, torch.Tensor) else None
            hyper, flags = pack_hyper(0.0 if lr_tensor is not None else lr, group["lam"], group["beta"],
                                      group["momentum"], group["dampening"], group["weight_decay"],
                                      group["nesterov"], False)
            flags_first = flags[:2] + [1]
            momentum = group["momentum"] != 0
            maximize = group["maximize"]
            params = group["params"]
            if planning:
                group_plans.append(_GroupPlan(group, tuple(p.grad is not None for p in params), lr))
            for pi, p in enumerate(params):
                t, g = p, p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("BetaLasso does not support sparse gradients")
                dtensor = _is_dtensor(p)
                if dtensor:
                    t, g = p.to_local(), _local_grad(p, g, gi, pi)
                fused = self._fused_for(t, g, impls)
                if fused is None:
                    reference.append((p, gi, pi))
                    if id(p) not in done:
                        self._reference_update(p, t, g, gi, pi)
                    continue
                launch = launches.get((t.device, t.dtype))
                if launch is None:
                    launch = launches[(t.device, t.dtype)] = _Launch(fused, t.new_empty(0))
                buf, local_buf, first = None, launch.placeholder, False
                if momentum:
                    state = self.state[p]
                    buf = _stored_buf(p, state, gi, pi)
                    if buf is None:
                        # the kernel writes buf = d on this first step; empty_like keeps the parameter's
                        # dense layout (the kernel needs its strides); a DTensor's is a DTensor of its layout
                        buf = state["momentum_buffer"] = torch.empty_like(p)
                        first = True
                    elif _local(buf).stride() != t.stride():  # e.g. loaded contiguous for a channels_last weight
                        buf = state["momentum_buffer"] = torch.empty_like(p).copy_(buf)
                    local_buf = _local(buf)
                    launch.states.append(state)
                if dtensor:
                    launch.dtensors.append((len(launch.args), p, buf))
                if maximize:
                    launch.negate.append(len(launch.args))
                    g = torch.neg(g)
                if lr_tensor is not None:
                    launch.lr_at.append((len(launch.hyper), lr_tensor))
                launch.params.append(p)
                launch.args.append(t)
                launch.grads.append(g)
                launch.bufs.append(local_buf)
                launch.hyper += hyper
                launch.flags += flags_first if first else flags
                launch.pick(gi, pi)
        # a launch the planned step ran before it gave up is skipped (it is always a whole launch)
        run = [launch for launch in launches.values() if not (done and any(id(p) in done for p in launch.params))]
        if any(launch.lr_at for launch in run):
            all_counts = _launch_outside_graph(run)
        else:
            all_counts = [launch.fused(launch.args, launch.grads, launch.bufs, launch.hyper, launch.flags)
                          for launch in run]
        self._counts.extend(zip((launch.params for launch in run), all_counts))
        if planning:
            self._plan = _Plan(self.state, group_plans, [_LaunchPlan(launch, group_plans) for launch in launches.values()],
                               reference)

    def _reference_update(self, p: torch.Tensor, t: torch.Tensor, g: torch.Tensor, gi: int, pi: int) -> None:
        """The reference update of parameter ``pi`` of group ``gi``, ``p``, on ``t`` with gradient ``g``
        (``p`` and ``p.grad`` or, for a DTensor, their local shards: the update is elementwise)."""
        group = self.param_groups[gi]
        state = self.state[p]
        buf = _stored_buf(p, state, gi, pi)
        new = beta_lasso_update_(t, g, None if buf is None else _local(buf), lr=group["lr"], lam=group["lam"],
                                 beta=group["beta"], momentum=group["momentum"], dampening=group["dampening"],
                                 weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                                 maximize=group["maximize"])
        if buf is None and new is not None:
            if _is_dtensor(p):
                buf = torch.empty_like(p)
                buf.to_local().copy_(new)
                new = buf
            state["momentum_buffer"] = new
        self._counts.append(([p], torch.count_nonzero(t).reshape(1)))

    def nonzeros(self) -> list[list[int | None]]:
        """Non-zero count of every parameter after the last ``step()``, per param group.

        ``None`` for parameters the last step skipped (no gradient). The counts were made by
        the update itself; reading them synchronizes with the device once per launch. A DTensor
        parameter's count is over the whole tensor: every rank of its device mesh must call
        ``nonzeros()``, which all-reduces the local counts once per mesh (a replicated shard is
        counted once, from the rank at coordinate 0 of the replicated mesh dimensions).
        """
        by_param: dict[int, int] = {}
        for params, counts in self._counts:
            by_param.update(zip(map(id, params), counts.tolist()))
        # every DTensor parameter of the groups, in their order: the reduced vectors must line up
        # on every rank, whichever launch or reference path counted a parameter there
        sharded: dict = {}  # device mesh → its DTensor parameters
        for group in self.param_groups:
            for p in group["params"]:
                if _is_dtensor(p):
                    sharded.setdefault(p.device_mesh, []).append(p)
        for mesh, ps in sharded.items():
            totals = _sum_over_mesh(mesh, [by_param.get(id(p), 0) if _first_copy(p) else 0 for p in ps])
            by_param.update((id(p), n) for p, n in zip(ps, totals) if id(p) in by_param)
        return [[by_param.get(id(p)) for p in group["params"]] for group in self.param_groups]
