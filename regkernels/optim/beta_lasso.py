"""``BetaLasso``: SGD with an L1 term and hard thresholding (docs/beta_lasso.md), fused.

All parameters of one (device, dtype) are updated by one kernel launch (CPU or CUDA) that also
counts each tensor's non-zeros, so ``nonzeros()`` costs no extra pass over memory. Which
implementation updates a parameter is ``regkernels.ops.beta_lasso.TABLE``'s choice for its device
and dtype, as for every op.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

from regkernels.ops._common import check_number
from regkernels.ops._table import check_backend_keyword
from regkernels.ops.beta_lasso import OP, TABLE, fused_takes, pack_hyper
from regkernels.reference.beta_lasso import beta_lasso_update_

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


class _Launch:
    """Argument lists of one fused launch: every parameter of one (device, dtype)."""

    __slots__ = ("fused", "params", "grads", "bufs", "hyper", "flags", "placeholder")

    def __init__(self, fused: Callable, placeholder: torch.Tensor):
        self.fused = fused  # the table's fused entry for this (device, dtype)
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.bufs: list[torch.Tensor] = []
        self.hyper: list[float] = []
        self.flags: list[int] = []
        self.placeholder = placeholder  # stands in for the buffer of tensors without momentum


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

    Refused with a TypeError/ValueError: hyper-parameters that are not finite Python numbers in
    their range (bools included; every group's values are checked when the group is added and
    again at each step), complex parameters, a parameter listed twice. ``copy.deepcopy`` and
    pickling keep ``backend``; ``nonzeros()`` works under ``torch.compile(opt.step)``.
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

    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group`` plus β-LASSO's checks: the group's
        hyper-parameters (as the constructor checks them), real floating parameters (sign(θ)
        and |θ| ≥ β·λ have no meaning for complex ones: pass ``torch.view_as_real(p)`` to treat
        real and imaginary parts as separate entries) and no parameter twice (the fused kernel
        would update it twice concurrently, with results that change from run to run)."""
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
            if id(p) in seen:
                raise ValueError(f"{_OP}: parameter {i} of param group {len(self.param_groups)} is the same tensor as "
                                 f"parameter {seen[id(p)]}; list each parameter once")
            seen[id(p)] = i
        super().add_param_group(group)
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

    def _fused_for(self, p: torch.Tensor, impls: dict) -> Callable | None:
        """The fused update that takes ``p`` (the table's row for its device and dtype), or None
        for the per-tensor reference. ``impls`` caches the table's answer per (device, dtype)
        for one step. A named fused backend that cannot take ``p`` raises."""
        key = (p.device, p.dtype)
        if key not in impls:
            impls[key] = TABLE.implementation(OP, self.backend, p.device, p.dtype, name=_OP)
        impl = impls[key]
        if impl is beta_lasso_update_:
            return None
        if fused_takes(p):
            return impl
        if self.backend is None:
            return None
        g = p.grad
        raise ValueError(
            f"{_OP}: backend={self.backend!r} cannot update a {p.dtype} parameter on {p.device} "
            f"(contiguous={p.is_contiguous()}, gradient {g.dtype} contiguous={g.is_contiguous()}): the fused kernels "
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
        # (device, dtype) → the fused op's argument lists, filled in one pass over the params
        launches: dict[tuple[torch.device, torch.dtype], _Launch] = {}
        impls: dict[tuple[torch.device, torch.dtype], Callable] = {}
        for group in self.param_groups:
            _check_hyper(group)  # a scheduler or a user may have changed lr etc. since construction
            hyper, flags = pack_hyper(group["lr"], group["lam"], group["beta"], group["momentum"],
                                      group["dampening"], group["weight_decay"], group["nesterov"], False)
            flags_first = flags[:2] + [1]
            momentum = group["momentum"] != 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BetaLasso does not support sparse gradients")
                fused = self._fused_for(p, impls)
                if fused is None:
                    self._reference_update(p, group)
                    continue
                launch = launches.get((p.device, p.dtype))
                if launch is None:
                    launch = launches[(p.device, p.dtype)] = _Launch(fused, p.new_empty(0))
                buf, first = launch.placeholder, False
                if momentum:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        # the kernel writes buf = d on this first step
                        buf = state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.contiguous_format)
                        first = True
                    elif not buf.is_contiguous():
                        buf = state["momentum_buffer"] = buf.contiguous()
                launch.params.append(p)
                launch.grads.append(p.grad)
                launch.bufs.append(buf)
                launch.hyper += hyper
                launch.flags += flags_first if first else flags
        for launch in launches.values():
            counts = launch.fused(launch.params, launch.grads, launch.bufs, launch.hyper, launch.flags)
            self._counts.append((launch.params, counts))
        return loss

    def _reference_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        buf = beta_lasso_update_(p, p.grad, state.get("momentum_buffer"), lr=group["lr"], lam=group["lam"],
                                 beta=group["beta"], momentum=group["momentum"], dampening=group["dampening"],
                                 weight_decay=group["weight_decay"], nesterov=group["nesterov"])
        if buf is not None:
            state["momentum_buffer"] = buf
        self._counts.append(([p], torch.count_nonzero(p).reshape(1)))

    def nonzeros(self) -> list[list[int | None]]:
        """Non-zero count of every parameter after the last ``step()``, per param group.

        ``None`` for parameters the last step skipped (no gradient). The counts were made by
        the update itself; reading them synchronizes with the device once per launch.
        """
        by_param: dict[int, int] = {}
        for params, counts in self._counts:
            for p, c in zip(params, counts.tolist()):
                by_param[id(p)] = int(c)
        return [[by_param.get(id(p)) for p in group["params"]] for group in self.param_groups]
