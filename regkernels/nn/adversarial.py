"""Adversarial kernel regularization (docs/nn.md#adversarialkernelregularizer; seed: adversarial regularization for conv filters).

A small discriminator D learns to tell a bank of "good" k×k kernels (harvested from a model
trained on a large data set, or synthetic Gabor filters) from the kernels of the convolutions
being trained; the conv weights get the GAN generator loss, so they drift toward the bank's
distribution. The generator is the identity (G(z) = z): the "fake" samples are the weights.

One training step, as in the seed's Algorithm 1::

    loss = task_loss + reg.generator_loss()     # λ · mean(−log σ(D(fake)))
    loss.backward(); optimizer.step()           # optimizer holds the model's parameters only
    reg.discriminator_step()                    # one Adam step of D on real vs fake.detach()

Both mean σ(D(real)) and mean σ(D(fake)) tend to 0.5 when D can no longer tell them apart.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import skip_init

from regkernels import distributed as _dist
from regkernels.ops._common import check_number, check_tensor

__all__ = ["gabor_bank", "harvest_kernels", "AdversarialKernelRegularizer", "GABOR_MAX_ENTRIES"]

_CLS = "AdversarialKernelRegularizer"
# Largest n·k·k gabor_bank draws: its float64 working set is about eight arrays of that many
# entries (grids, rotated coordinates, envelope, carrier), 4 GiB at this limit.
GABOR_MAX_ENTRIES = 2**26
# torch.Generator.manual_seed takes the 64-bit seeds 0 ... 2**64 − 1
_SEED_MAX = 2**64 - 1

# LeakyReLU slope of the discriminator, as in DCGAN's discriminator (Radford et al.), which the
# seed follows.
_SLOPE = 0.2


def gabor_bank(n: int, k: int, seed: int = 0, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n, k, k)`` random Gabor filters, each with zero mean and unit L2 norm.

    Filter: ``g(x, y) = exp(−(x'² + γ²y'²) / (2σ²)) · cos(2π x'/λ + ψ)`` on the centred grid
    ``x, y ∈ {−(k−1)/2, …, (k−1)/2}``, ``x' = x cos θ + y sin θ``, ``y' = −x sin θ + y cos θ``,
    with ``θ ~ U[0, π)``, ``λ ~ U[2, 2k]`` (from the Nyquist limit to twice the support),
    ``ψ ~ U[0, 2π)``, ``σ ~ U[max(0.5, k/6), k/2]``, ``γ ~ U[0.5, 1]``; then
    ``g ← (g − mean g) / ‖g − mean g‖``. Drawn in float64 on the CPU from
    ``torch.Generator().manual_seed(seed)``, so a seed gives the same bank on every device and
    dtype (up to the final rounding). ``k >= 2``: a zero-mean 1×1 kernel is 0. ``seed`` is a
    64-bit seed, ``0 <= seed < 2**64``; ``n·k·k <= GABOR_MAX_ENTRIES`` (the float64 working set
    is about eight times that many entries), else a ValueError before anything is allocated.
    """
    op = "gabor_bank"
    check_number(op, "n", n, lo=1, integer=True)
    check_number(op, "k", k, integer=True)
    if k < 2:
        raise ValueError(f"{op}: k must be >= 2 (a zero-mean 1x1 kernel is 0 and cannot have unit norm); got {k}")
    check_number(op, "seed", seed, lo=0, hi=_SEED_MAX, integer=True)
    if n * k * k > GABOR_MAX_ENTRIES:
        raise ValueError(f"{op}: a bank of n·k·k = {n}·{k}·{k} = {n * k * k} entries needs about "
                         f"{8 * 8 * n * k * k / 2**30:.3g} GiB of float64 working memory; the limit is "
                         f"GABOR_MAX_ENTRIES = {GABOR_MAX_ENTRIES} entries (draw fewer or smaller kernels)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{op}: dtype must be a floating torch.dtype; got {dtype!r}")
    g = torch.Generator().manual_seed(seed)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, 1, 1, generator=g, dtype=torch.float64)

    theta, lam, psi = u(0.0, math.pi), u(2.0, 2.0 * k), u(0.0, 2.0 * math.pi)
    sigma, gamma = u(max(0.5, k / 6), k / 2), u(0.5, 1.0)
    r = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    xr = x * theta.cos() + y * theta.sin()
    yr = -x * theta.sin() + y * theta.cos()
    bank = torch.exp(-(xr**2 + (gamma * yr) ** 2) / (2 * sigma**2)) * torch.cos(2 * math.pi * xr / lam + psi)
    bank = bank - bank.mean(dim=(1, 2), keepdim=True)
    # σ ≥ k/6 keeps the envelope from collapsing to one pixel and σ ≤ k/2 keeps it from being
    # flat, so the centred filter is far from 0; the clamp only guards the division.
    bank = bank / bank.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
    return bank.to(dtype=dtype, device=device)


def _matching_convs(model: nn.Module, k: int) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (k, k)]


def harvest_kernels(model: nn.Module, k: int) -> torch.Tensor:
    """``(N, k, k)``: every spatial kernel of every ``nn.Conv2d`` in ``model`` whose
    ``kernel_size == (k, k)``, in ``model.modules()`` order — ``weight.detach().reshape(-1, k, k)``
    of each, concatenated (a copy: later training of ``model`` does not change the bank).
    ``N = Σ out·in/groups`` over the matching convs.
    """
    op = "harvest_kernels"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be an nn.Module; got {type(model).__name__}")
    check_number(op, "k", k, lo=1, integer=True)
    convs = _matching_convs(model, k)
    if not convs:
        raise ValueError(f"{op}: model has no nn.Conv2d with kernel_size ({k}, {k})")
    return torch.cat([c.weight.detach().reshape(-1, k, k) for c in convs])


class AdversarialKernelRegularizer(nn.Module):
    """GAN-style regularizer pulling conv kernels toward a bank of good kernels (docs/nn.md#adversarialkernelregularizer).

    ``convs``: an ``nn.Module`` (every ``nn.Conv2d`` in it with ``kernel_size == (k, k)`` is
    regularized; the modules are found once, their ``.weight`` is read at each call), one
    ``nn.Conv2d`` of kernel size ``(k, k)``, or a list of weight tensors / Parameters
    ``(..., k, k)``. ``real``: the bank ``(N, k, k)`` (copied; D and the bank live on its
    device and dtype, the weights must be on the same device and are cast to its dtype).

    D (``self.discriminator``) is an MLP ``k·k → hidden → hidden → 1`` (a logit) with
    LeakyReLU(0.2), initialised like ``nn.Linear`` but from ``generator`` when one is given, and
    trained by its own ``Adam(lr)``. Batches are drawn without replacement with ``generator``
    (global RNG when None): fixed seeds give identical runs.

    Scale: D sees the raw kernels, as in the original method (docs/nn.md), so it can separate real from fake by their
    norm alone. Pass a bank scaled like the weights (``gabor_bank`` kernels have unit norm,
    ``harvest_kernels`` keeps a trained model's scale), or ``normalize=True`` to divide every
    kernel by its L2 norm before D (D then judges shape only and the loss is blind to scale).

    D's parameters are part of this module, so ``reg.parameters()`` lists them; the task
    optimizer must hold the model's parameters, not this module's. ``generator_loss`` reads D
    through detached copies of its parameters, so no gradient ever lands on D from it.

    ``state_dict()`` also holds D's optimizer state, the generator's state and the configuration
    (``_extra_state``), so a run resumed with ``load_state_dict()`` continues identically
    (docs/nn.md#resuming-svbprojector-and-adversarialkernelregularizer).
    """

    def __init__(self, convs: nn.Module | Sequence[torch.Tensor], real: torch.Tensor, lam: float = 1.0, hidden: int = 64, batch: int = 256,
                 lr: float = 1e-3, generator: torch.Generator | None = None, *, normalize: bool = False):
        super().__init__()
        check_tensor(_CLS, "real", real, ndim=3, form="(N, k, k)")
        if real.shape[1] != real.shape[2]:
            raise ValueError(f"{_CLS}: real must be a bank of square kernels (N, k, k); got shape {tuple(real.shape)}")
        if real.shape[0] == 0 or real.shape[1] == 0:
            raise ValueError(f"{_CLS}: real must hold at least one kernel (N, k, k) with N, k >= 1; "
                             f"got shape {tuple(real.shape)}")
        if real.device.type != "meta" and not bool(torch.isfinite(real).all()):
            # D would train on NaN/Inf and every loss would turn NaN
            bad = int((~torch.isfinite(real)).flatten(1).any(1).sum())
            raise ValueError(f"{_CLS}: real must hold finite kernels; {bad} of its {real.shape[0]} kernels hold "
                             "NaN or Inf")
        check_number(_CLS, "lam", lam, lo=0)
        check_number(_CLS, "hidden", hidden, lo=1, integer=True)
        check_number(_CLS, "batch", batch, lo=1, integer=True)
        check_number(_CLS, "lr", lr)
        if not lr > 0:
            raise ValueError(f"{_CLS}: lr must be > 0; got {lr}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{_CLS}: generator must be a torch.Generator or None; got {type(generator).__name__}")
        if not isinstance(normalize, bool):
            raise TypeError(f"{_CLS}: normalize must be a bool; got {normalize!r}")
        self.k = k = real.shape[-1]
        self.lam, self.batch, self.normalize, self.generator = float(lam), batch, normalize, generator
        # Kept outside the module tree (plain attributes of a tuple type) so that the model's
        # parameters appear neither in reg.parameters() nor in reg.state_dict().
        self._convs, self._weights = self._collect(convs, k, real.device)
        self.register_buffer("real", real.detach().clone(), persistent=False)
        # skip_init: the layers are filled below from `generator`, not from the global RNG
        lin = [skip_init(nn.Linear, i, o, device=real.device, dtype=real.dtype)
               for i, o in ((k * k, hidden), (hidden, hidden), (hidden, 1))]
        self.discriminator = nn.Sequential(lin[0], nn.LeakyReLU(_SLOPE), lin[1], nn.LeakyReLU(_SLOPE), lin[2])
        with torch.no_grad():
            for layer in lin:
                # nn.Linear's default init: kaiming_uniform(a=√5) makes the weight's bound
                # 1/√fan_in, the same as the bias's.
                bound = 1.0 / math.sqrt(layer.in_features)
                for p in (layer.weight, layer.bias):
                    p.copy_(self._uniform(p.shape, bound))
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=lr)

    @staticmethod
    def _collect(convs, k: int, device: torch.device) -> tuple[tuple, tuple]:
        if isinstance(convs, nn.Conv2d):
            if tuple(convs.kernel_size) != (k, k):
                raise ValueError(f"{_CLS}: convs is an nn.Conv2d with kernel_size {tuple(convs.kernel_size)}, "
                                 f"but the bank real holds ({k}, {k}) kernels")
            found = (convs,)
        elif isinstance(convs, nn.Module):
            found = tuple(_matching_convs(convs, k))
            if not found:
                raise ValueError(f"{_CLS}: convs has no nn.Conv2d with kernel_size ({k}, {k}) (the bank's kernel size)")
        elif isinstance(convs, (list, tuple)):
            if not convs:
                raise ValueError(f"{_CLS}: convs must hold at least one weight tensor (..., {k}, {k}); got an empty "
                                 f"{type(convs).__name__}")
            for i, w in enumerate(convs):
                check_tensor(_CLS, f"convs[{i}]", w, min_ndim=2, form=f"(..., {k}, {k})")
                if tuple(w.shape[-2:]) != (k, k):
                    raise ValueError(f"{_CLS}: convs[{i}] must have shape (..., {k}, {k}) to match the bank real; "
                                     f"got {tuple(w.shape)}")
            found = ()
        else:
            raise TypeError(f"{_CLS}: convs must be an nn.Module, an nn.Conv2d or a list of weight tensors "
                            f"(..., {k}, {k}); got {type(convs).__name__}")
        weights = tuple(c.weight for c in found) if found else tuple(convs)
        for i, w in enumerate(weights):
            if not w.dtype.is_floating_point:
                raise TypeError(f"{_CLS}: conv weight {i} must have a floating dtype; got {w.dtype}")
            if w.device != device:
                raise ValueError(f"{_CLS}: conv weights and the bank real must be on one device; "
                                 f"got weight {i} on {w.device}, real on {device}")
        return found, (() if found else weights)

    def _rng_device(self) -> torch.device:
        # draws happen where the generator lives (the CPU without one), then move to the data,
        # so a CPU generator drives a CUDA model and a CUDA generator works too
        return self.generator.device if self.generator is not None else torch.device("cpu")

    def _uniform(self, shape, bound: float) -> torch.Tensor:
        u = torch.rand(shape, generator=self.generator, dtype=torch.float64, device=self._rng_device())
        return (u * 2 - 1) * bound

    def _pick(self, n: int) -> torch.Tensor:
        """Indices of a random batch of min(batch, n) out of n, without replacement."""
        return torch.randperm(n, generator=self.generator, device=self._rng_device())[: min(self.batch, n)]

    def _kernels(self) -> torch.Tensor:
        ws = [c.weight for c in self._convs] if self._convs else self._weights
        # sharded weights (FSDP2 / DTensor): the full kernels, gathered in buckets; every rank
        # then draws the same batches and trains the same D (docs/distributed.md)
        ws = _dist.gather(ws)
        return torch.cat([w.reshape(-1, self.k, self.k) for w in ws])

    def _logits(self, x: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        """D's logits ``(b,)`` for kernels ``(b, k, k)``."""
        x = x.to(self.real.dtype).flatten(1)
        if self.normalize:
            # eps keeps an all-zero kernel (e.g. a pruned filter) at 0 instead of NaN
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if params is None:
            return self.discriminator(x).squeeze(1)
        return functional_call(self.discriminator, params, (x,)).squeeze(1)

    def fake(self) -> torch.Tensor:
        """A random batch ``(b, k, k)``, ``b = min(batch, N_w)``, of the regularized kernels
        (``weight.reshape(-1, k, k)`` of every weight, concatenated), differentiable w.r.t. the
        weights (G = identity)."""
        kernels = self._kernels()
        return kernels[self._pick(kernels.shape[0]).to(kernels.device)]

    def generator_loss(self) -> torch.Tensor:
        """``lam · mean(−log σ(D(fake)))`` — the non-saturating generator loss — as a scalar
        to add to the task loss. Computed as ``softplus(−D)``, exact for logits of any size
        (``log σ`` of a very negative logit would underflow). Gradients reach the conv weights
        only: D is evaluated with detached copies of its parameters."""
        params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return self.lam * F.softplus(-self._logits(self.fake(), params)).mean()

    def forward(self) -> torch.Tensor:
        """``generator_loss()``, so ``reg()`` can be added to a loss."""
        return self.generator_loss()

    def _config(self) -> dict:
        """What a saved state must have been trained with to continue here."""
        return {"k": self.k, "hidden": self.discriminator[0].out_features, "bank": self.real.shape[0],
                "lam": self.lam, "batch": self.batch, "normalize": self.normalize,
                "generator": self.generator is not None}

    def get_extra_state(self) -> dict:
        """``state_dict()``'s ``_extra_state`` entry, next to D's parameters: D's Adam state, the
        state of ``generator`` (None without one) and the configuration, so a resumed run continues
        identically (docs/nn.md#resuming-svbprojector-and-adversarialkernelregularizer). The bank is
        not saved (a non-persistent buffer): build the regularizer with the same bank. Without a
        generator the draws come from torch's global RNG, whose state is the caller's to save."""
        return {"config": self._config(), "optimizer": self.optimizer.state_dict(),
                "generator": None if self.generator is None else self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        """Restores ``get_extra_state()``; a ValueError for a state saved with another configuration."""
        op = f"{_CLS}.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"{op}: _extra_state must be the dict {_CLS}.state_dict() saves; got "
                            f"{type(state).__name__}")
        if set(state) != {"config", "optimizer", "generator"}:
            raise ValueError(f"{op}: _extra_state must be the dict {_CLS}.state_dict() saves (keys config, optimizer, "
                             f"generator); got keys {sorted(state)}")
        mine = self._config()
        if state["config"] != mine:
            diff = ", ".join(f"{k}={state['config'].get(k)!r} (here {v!r})" for k, v in mine.items()
                             if state["config"].get(k) != v)
            raise ValueError(f"{op}: the state was saved by a regularizer configured otherwise: {diff}; build it "
                             "with the saved configuration (generator: whether one was given) to resume")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.generator is not None:
            self.generator.set_state(state["generator"])

    def discriminator_step(self) -> dict[str, float]:
        """One Adam step of D on a random batch of the bank (real) vs ``fake().detach()``.

        Loss ``lam · (mean(−log σ(D(real))) + mean(−log(1 − σ(D(fake)))))``, computed as
        ``lam · (mean softplus(−D(real)) + mean softplus(D(fake)))``. Returns
        ``{"d_real": mean σ(D(real)), "d_fake": mean σ(D(fake)), "loss": …}`` measured on this
        batch before the step. D's gradients are reset first, so stray gradients (e.g. from a
        backward through D elsewhere) never enter the step. ``lam = 0`` leaves D unchanged.

        A batch whose loss is not finite (a fake kernel holding NaN/Inf: a diverged layer) is
        not stepped on: D keeps its parameters, so the NaN stays in the diverged layer instead of
        entering D for good, and the returned numbers show it. It trains under
        ``torch.no_grad()`` too (the step enables grad for D); under ``torch.inference_mode()``
        it raises, as no gradient can be taken there.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{_CLS}.discriminator_step: cannot train the discriminator under "
                               "torch.inference_mode() (no gradient can be taken there); call it outside")
        real = self.real[self._pick(self.real.shape[0]).to(self.real.device)]
        with torch.no_grad():
            fake = self.fake()
        with torch.enable_grad():
            lr, lf = self._logits(real), self._logits(fake)
            loss = self.lam * (F.softplus(-lr).mean() + F.softplus(lf).mean())
        self.optimizer.zero_grad(set_to_none=True)
        # one host sync for the three numbers, which also decide whether to step
        d_real, d_fake, value = torch.stack([torch.sigmoid(lr).mean(), torch.sigmoid(lf).mean(),
                                             loss.detach()]).tolist()
        if math.isfinite(value):
            loss.backward()
            self.optimizer.step()
        return {"d_real": d_real, "d_fake": d_fake, "loss": value}
