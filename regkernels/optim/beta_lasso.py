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
import operator
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

from regkernels.ops._common import check_number
from regkernels.ops._table import check_backend_keyword
from regkernels.ops.beta_lasso import OP, TABLE, fused_takes, pack_hyper
from regkernels.reference.beta_lasso import beta_lasso_update_

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor

    _DTENSOR: tuple[type, ...] = (DTensor,)
else:  # torch built without torch.distributed: no parameter can be a DTensor
    _DTENSOR = ()

__all__ = ["BetaLasso"]

_OP = "BetaLasso"


def _check_hyper(group: dict) -> None:
    """A group's hyper-parameters: finite Python numbers (docs/beta_lasso.md), lr, lam, beta, momentum,
    weight_decay >= 0, nesterov a bool that needs momentum > 0 and dampening = 0."""
    for name in ("lr", "lam", "beta", "momentum", "weight_decay"):
        check_number(_OP, name, group[name], lo=0)
    check_number(_OP, "dampening", group["dampening"])
    nesterov, momentum, dampening = group["nesterov"], group["momentum"], group["dampening"]
    if not isinstance(nesterov, bool):
        raise TypeError(f"{_OP}: nesterov must be a bool; got {nesterov!r}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{_OP}: nesterov=True requires momentum > 0 and dampening = 0; "
                         f"got momentum={momentum}, dampening={dampening}")


_HYPER_KEYS = ("lr", "lam", "beta", "momentum", "dampening", "weight_decay", "nesterov")
_GRAD = operator.attrgetter("grad")
_BUF = operator.itemgetter("momentum_buffer")
_NONES = itertools.repeat(None)


def _local(t: torch.Tensor) -> torch.Tensor:
    """What the kernels update for ``t``: its local shard (a view of the DTensor's own storage
    under no_grad) or ``t`` itself."""
    return t.to_local() if isinstance(t, _DTENSOR) else t


def _layout(t: torch.Tensor) -> tuple | None:
    return (t.device_mesh, t.placements) if isinstance(t, _DTENSOR) else None


def _local_grad(p: torch.Tensor, g: torch.Tensor, gi: int, pi: int) -> torch.Tensor:
    """The local shard of DTensor ``p``'s gradient ``g``, in ``p``'s placements.

    A gradient placed otherwise (a Partial one holds summands, a Shard(1) one of a Shard(0)
    parameter the wrong slice) is redistributed: one collective per such gradient and step,
    which FSDP2 and DTensor autograd never need (they give gradients the parameter's layout)."""
    if not isinstance(g, _DTENSOR):
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
            return f"a DTensor with placements {tuple(t.placements)}" if isinstance(t, _DTENSOR) else "a torch.Tensor"
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
        torch.distributed.all_reduce(total, group=group)
    return total.tolist()


class _Launch:
    """Argument lists of one fused launch: every parameter of one (device, dtype), and where they
    came from (``picks``: per contributing group, its index and the indices of its parameters in
    this launch, or None for all of them), so a plan can gather the gradients again. ``params``
    are the parameters (their counts are reported for them), ``args`` what the kernel updates:
    the same tensors, or a DTensor's local shard (``dtensors``: its index, the DTensor and its
    momentum buffer, so a plan can take the local views again)."""

    __slots__ = ("fused", "params", "args", "grads", "bufs", "hyper", "flags", "placeholder", "picks", "states",
                 "dtensors")

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

    def pick(self, gi: int, pi: int) -> None:
        if not self.picks or self.picks[-1][0] != gi:
            self.picks.append((gi, []))
        self.picks[-1][1].append(pi)


class _GroupPlan:
    """One param group as the last full pass saw it: its params (by identity), which had a
    gradient, and its hyper-parameters (values and types, so a float → bool change is rechecked).
    ``dtensors``: the indices of its DTensor parameters, whose gradients are taken local per step."""

    __slots__ = ("group", "params", "members", "mask", "dtensors", "types", "values", "hyper", "flags")

    def __init__(self, group: dict, mask: tuple[bool, ...]):
        self.group = group
        self.params = group["params"]
        self.members = tuple(self.params)
        self.mask = mask
        self.dtensors = tuple(i for i, p in enumerate(self.members) if isinstance(p, _DTENSOR))
        self.set_hyper(group)

    def set_hyper(self, group: dict) -> None:
        self.values = tuple(map(group.__getitem__, _HYPER_KEYS))
        self.types = tuple(map(type, self.values))
        # the steady flags: a plan exists only once every momentum buffer does
        self.hyper, self.flags = pack_hyper(*self.values, False)


class _LaunchPlan:
    __slots__ = ("fused", "params", "args", "bufs", "hyper", "flags", "picks", "whole", "states", "state_bufs",
                 "dtensors")

    def __init__(self, launch: _Launch, groups: list[_GroupPlan]):
        self.fused = launch.fused
        self.params = launch.params
        self.args = launch.args
        self.bufs = launch.bufs
        self.dtensors = launch.dtensors
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

        d = g + weight_decay·θ                                  (if weight_decay)
        buf = d (first step) | momentum·buf + (1 − dampening)·d (if momentum)
        d = d + momentum·buf (nesterov) | buf (momentum) | d
        θ = θ − lr·(d + lam·sign(θ))      # sign of θ before this step, sign(0) = 0
        θ = θ · [|θ| ≥ beta·lam]

    The L1 term stays outside the momentum buffer; ``beta = 0`` never zeroes. With the
    defaults this is the paper's algorithm.

    Args:
        params: iterable of parameters or of param-group dicts (``torch.optim`` convention).
        lr: learning rate (≥ 0).
        lam: L1 strength λ (≥ 0).
        beta: threshold factor: entries with ``|θ| < beta·lam`` become 0 after the step (≥ 0).
        momentum, dampening, weight_decay, nesterov: as in ``torch.optim.SGD``.
        backend: ``None`` (fused kernel where one exists for the device and dtype, otherwise
            the reference), ``"reference"`` (per-tensor torch ops), ``"cpu"`` or ``"cuda"``
            (the fused kernel; a ValueError at ``step()`` for a parameter it cannot update,
            listing the backends that can).

    float16/bfloat16 parameters are updated in float32 math; in float32 the fused CPU update
    equals the reference bit for bit.

    DTensor parameters (FSDP2 ``fully_shard``, tensor parallelism) are updated through their
    local shards by the same launches, with no communication, so each rank's shard equals that
    slice of a one-process run bit for bit; their momentum buffers are DTensors of the
    parameter's layout (``state_dict()`` and ``torch.distributed.checkpoint`` see DTensor
    state). A gradient placed otherwise than its parameter is redistributed first (a collective
    in ``step()``). ``nonzeros()`` counts a DTensor over the whole tensor, with one all-reduce
    per device mesh (docs/beta_lasso.md#β-lasso-on-sharded-parameters).

    Refused with a TypeError/ValueError: hyper-parameters that are not finite Python numbers in
    their range (bools included; every group's values are checked when the group is added and
    again at each step), complex parameters, a parameter listed twice, a DTensor parameter with a
    ``Partial`` placement. ``copy.deepcopy`` and pickling keep ``backend``; ``nonzeros()`` works
    under ``torch.compile(opt.step)``.
    """

    def __init__(self, params: Iterable, lr: float, lam: float, beta: float, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 backend: str | None = None):
        check_backend_keyword(_OP, backend)
        defaults = dict(lr=lr, lam=lam, beta=beta, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov)
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
            if isinstance(p, _DTENSOR) and any(pl.is_partial() for pl in p.placements):
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
        self.backend = state.get("backend")
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
            return None
        if fused_takes(t, g):
            return impl
        if self.backend is None:
            return None
        raise ValueError(
            f"{_OP}: backend={self.backend!r} cannot update a {t.dtype} parameter on {t.device} "
            f"(contiguous={t.is_contiguous()}, gradient {g.dtype} contiguous={g.is_contiguous()}): the fused kernels "
            "take contiguous parameters with contiguous gradients of their dtype; backend='reference' or None "
            "takes any")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
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
            # types first: comparing a Tensor value with == would not give a bool
            if tuple(map(type, values)) != gp.types or values != gp.values:
                _check_hyper(group)  # a scheduler or a user may have changed lr etc. since the last step
                if (values[3] != 0) != (gp.values[3] != 0):
                    return set()  # momentum switched on or off: buffers and launches change
                gp.set_hyper(group)
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
            try:
                counts = lp.fused(args, lp.grads(grads_by_group), bufs, lp.hyper, lp.flags)
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
            _check_hyper(group)  # a scheduler or a user may have changed lr etc. since construction
            hyper, flags = pack_hyper(group["lr"], group["lam"], group["beta"], group["momentum"],
                                      group["dampening"], group["weight_decay"], group["nesterov"], False)
            flags_first = flags[:2] + [1]
            momentum = group["momentum"] != 0
            params = group["params"]
            if planning:
                group_plans.append(_GroupPlan(group, tuple(p.grad is not None for p in params)))
            for pi, p in enumerate(params):
                t, g = p, p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("BetaLasso does not support sparse gradients")
                dtensor = isinstance(p, _DTENSOR)
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
                        # the kernel writes buf = d on this first step; a DTensor's is a DTensor of its layout
                        buf = state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.contiguous_format)
                        first = True
                    elif not _local(buf).is_contiguous():
                        buf = state["momentum_buffer"] = buf.contiguous()
                    local_buf = _local(buf)
                    launch.states.append(state)
                if dtensor:
                    launch.dtensors.append((len(launch.args), p, buf))
                launch.params.append(p)
                launch.args.append(t)
                launch.grads.append(g)
                launch.bufs.append(local_buf)
                launch.hyper += hyper
                launch.flags += flags_first if first else flags
                launch.pick(gi, pi)
        for launch in launches.values():
            if done and any(id(p) in done for p in launch.params):
                continue  # updated by the planned step before it gave up (a whole launch, always)
            counts = launch.fused(launch.args, launch.grads, launch.bufs, launch.hyper, launch.flags)
            self._counts.append((launch.params, counts))
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
                                 weight_decay=group["weight_decay"], nesterov=group["nesterov"])
        if buf is None and new is not None:
            if isinstance(p, _DTENSOR):
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
                if isinstance(p, _DTENSOR):
                    sharded.setdefault(p.device_mesh, []).append(p)
        for mesh, ps in sharded.items():
            totals = _sum_over_mesh(mesh, [by_param.get(id(p), 0) if _first_copy(p) else 0 for p in ps])
            by_param.update((id(p), n) for p, n in zip(ps, totals) if id(p) in by_param)
        return [[by_param.get(id(p)) for p in group["params"]] for group in self.param_groups]
