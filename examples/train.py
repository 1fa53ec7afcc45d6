"""Train a small CNN on scikit-learn's 8×8 digits with one regkernels regularizer.

    python examples/train.py --reg frame            # one of: none (default), frame, diversity,
                                                    # orthogonality, srip, mhe, conv_frame, ocnn,
                                                    # svb, beta-lasso, adversarial, jacobian

Data: ``sklearn.datasets.load_digits()`` (1797 images 8×8, 10 classes, bundled with
scikit-learn, no download), a fixed split of 1437 train / 360 test images (a seeded
permutation, independent of ``--seed``), pixels ÷ 16 then standardised with the training set's
mean and standard deviation. Model: Conv(1→16) → Conv(16→32, stride 2) → Conv(32→32) →
Linear(512→64) → Linear(64→10), ReLUs between; SGD with momentum 0.9 (``beta-lasso`` replaces
it by ``regkernels.optim.BetaLasso`` with the same learning rate and momentum).

``--fsdp N`` trains the same model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard`` on
every Conv/Linear and on the root) in N CPU processes (gloo): each rank takes its part of every
batch, the regularizers run on the sharded weights (docs/distributed.md) and rank 0 prints. The
loss and penalty columns are rank 0's; test accuracy and the singular value columns are global.

One table line per epoch: mean task loss, mean penalty term (what is added to the loss; 0 for
``none``, ``svb`` and ``beta-lasso``, which act through the weights), test accuracy, the mean
wall time of a training step split into the model's part (forward + backward of the task loss,
optimizer step) and the regularizer's part (penalty forward + backward, SVB projection,
discriminator step), and the layers' singular value range and Gershgorin bounds of the Gram
matrices (from ``Regularizer(model, "frame", A=0.5, B=2.0).stats()``, whatever ``--reg`` is). The
last column carries what is particular to the regularizer (β-LASSO's non-zero fraction, the
discriminator's mean outputs). ``main(argv)`` returns the per-epoch records; ``--json PATH``
writes them with the run's configuration and summary. ``--report`` prints, after training, the
table of ``regkernels.nn.spectrum(model, (1, 8, 8))`` (every layer's operator σ_max / σ_min, its
bound for every input size, Gershgorin bounds, frame penalty, zero fraction, and the network's
Lipschitz bound; docs/nn.md#spectrum), and ``--json`` then holds it under ``"spectrum"``.

How the split is measured, per step: (a) task forward + ``backward()``; (b) penalty forward +
its own ``backward()`` (gradients accumulate into the same ``.grad``); (c) ``optimizer.step()``;
(d) ``SVBProjector.step()`` / ``discriminator_step()``. model = a + c, regularizer = b + d.
The task backward of ``jacobian`` keeps its graph (``retain_graph=True``): the penalty
differentiates through it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import regkernels
from regkernels.nn import Regularizer, SVBProjector

REG_KINDS = ("frame", "diversity", "orthogonality", "srip", "mhe", "conv_frame", "ocnn")
REGS = ("none",) + REG_KINDS + ("svb", "beta-lasso", "adversarial", "jacobian")
# Default factor λ per regularizer: about the largest (in steps of ~3×) that still trains to
# ~0.95 test accuracy in 5 epochs, so the penalty visibly moves the weights (frame: the σ range
# ends near [0.7, 1.4]; beta-lasso: about half the weights end at zero). conv_frame at 0.03
# and above, jacobian at 0.1 and beta-lasso at 1e-3 hurt training. mhe (s=2) barely moves at any
# λ here: random filters are already close to its minimum energy.
DEFAULT_LAM = {
    "none": 0.0, "frame": 1.0, "diversity": 0.1, "orthogonality": 0.01, "srip": 0.1, "mhe": 0.1,
    "conv_frame": 0.01, "ocnn": 0.001, "svb": 0.0, "beta-lasso": 3e-4, "adversarial": 1.0, "jacobian": 0.003,
}
REG_KW = {"frame": dict(A=0.5, B=2.0), "conv_frame": dict(A=0.5, B=2.0), "diversity": dict(tau=0.3)}
LR, MOMENTUM = 0.1, 0.9
SVB_EPS = 0.5
N_TRAIN, SPLIT_SEED = 1437, 0


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def load_data(device: torch.device):
    """``(x_train, y_train, x_test, y_test)``: digits as ``(N, 1, 8, 8)`` float32, labels int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("examples/train.py needs scikit-learn for its data set (the 8x8 digits bundled with it): "
                 "pip install scikit-learn (or pip install -e '.[examples]')")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    tr, te = perm[:N_TRAIN], perm[N_TRAIN:]
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reg", choices=REGS, default="none", help="the regularizer (default: none)")
    p.add_argument("--lam", type=float, default=None,
                   help="its factor λ (default per regularizer: " +
                        ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LAM.items() if k not in ("none", "svb")) +
                        "; svb takes none: it projects with eps=0.5)")
    p.add_argument("--svb-every", type=int, default=None,
                   help="svb: project after every N-th step (default: once per epoch)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=LR, help=f"SGD / BetaLasso learning rate (default {LR})")
    p.add_argument("--seed", type=int, default=0, help="model init and batch order (the split is fixed)")
    p.add_argument("--backend", choices=("auto", "reference"), default="auto",
                   help="regkernels backend: auto = the fastest for the device, reference = pure torch")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cap on training steps per epoch")
    p.add_argument("--json", default=None, metavar="PATH", help="write the per-epoch records as JSON")
    p.add_argument("--report", action="store_true",
                   help="after training, print every layer's operator spectrum and bounds and the network's "
                        "Lipschitz bound (regkernels.nn.spectrum; in the --json output as 'spectrum')")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quiet", action="store_true", help="print nothing (main still returns the records)")
    p.add_argument("--fsdp", type=int, default=None, metavar="N",
                   help="train sharded with FSDP2 in N CPU processes (gloo); rank 0 prints")
    args = p.parse_args(argv)
    for name in ("epochs", "batch", "steps_per_epoch", "svb_every", "threads", "fsdp"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {v}")
    if args.lam is not None and not args.lam >= 0:
        p.error(f"--lam must be >= 0; got {args.lam}")
    if args.fsdp is not None and args.device != "cpu":
        p.error("--fsdp runs CPU processes with gloo; use --device cpu")
    if args.fsdp is not None and args.reg == "jacobian":
        p.error("--fsdp does not run --reg jacobian: this script times the task backward and the penalty's "
                "backward separately, and FSDP2 frees the unsharded weights after the first one (in your own "
                "loop, add the Jacobian penalty to the loss and call backward once)")
    if args.fsdp is not None and args.batch < args.fsdp:
        p.error(f"--batch ({args.batch}) must be >= --fsdp ({args.fsdp}): every rank takes part of each batch")
    return args


def _frame_summary(stats: dict) -> dict:
    """Over the layers: min σ_min, max σ_max of the weights, Gershgorin bounds of their Grams."""
    v = list(stats.values())
    return {"sigma_min": min(s["sigma_min"] for s in v), "sigma_max": max(s["sigma_max"] for s in v),
            "gershgorin_lo": min(s["gershgorin_lo"] for s in v), "gershgorin_hi": max(s["gershgorin_hi"] for s in v)}


class _Timer:
    """Wall-clock seconds since the last ``lap()``; synchronizes CUDA so kernels are counted."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.t = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self) -> float:
        t, self.t = self.t, self._now()
        return self.t - t


def _shard(model: nn.Module) -> nn.Module:
    """FSDP2: every Conv/Linear its own unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fully_shard(m)
    return fully_shard(model)


def _rank_main(rank: int, world: int, init_file: str, argv, out_file: str) -> None:
    """One ``--fsdp`` process: joins the gloo group, trains, rank 0 saves the records."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        records = _train(parse_args(argv), rank, world)
        if rank == 0:
            torch.save(records, out_file)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.fsdp is None:
        return _train(args, 0, 1)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "records.pt")
        mp.spawn(_rank_main, args=(args.fsdp, os.path.join(tmp, "init"), argv if argv is not None else sys.argv[1:],
                                   out_file), nprocs=args.fsdp, join=True)
        return torch.load(out_file, weights_only=False)


def _train(args: argparse.Namespace, rank: int, world: int) -> list[dict]:
    say = (lambda *a, **k: None) if args.quiet or rank else print
    if args.threads or world > 1:
        # --fsdp: the machine's threads shared among the processes unless --threads says otherwise
        torch.set_num_threads(args.threads or max(1, torch.get_num_threads() // world))
    device = torch.device(args.device)
    backend = None if args.backend == "auto" else "reference"
    reg_name = args.reg
    lam = DEFAULT_LAM[reg_name] if args.lam is None else args.lam

    x_train, y_train, x_test, y_test = load_data(device)
    torch.manual_seed(args.seed)
    model = build_model().to(device)
    if world > 1:
        _shard(model)
    batch_gen = torch.Generator().manual_seed(args.seed)
    n_batches = math.ceil(len(y_train) / args.batch)
    steps = n_batches if args.steps_per_epoch is None else min(n_batches, args.steps_per_epoch)

    # Regularizers are built before the first forward: conv_frame's pre-hooks record input sizes.
    reg = projector = adv = None
    if reg_name in REG_KINDS:
        reg = Regularizer(model, reg_name, weight=lam, backend=backend, **REG_KW.get(reg_name, {}))
    elif reg_name == "svb":
        projector = SVBProjector(model, eps=SVB_EPS, every=args.svb_every or steps, backend=backend)
    elif reg_name == "adversarial":
        from regkernels.nn.adversarial import AdversarialKernelRegularizer, gabor_bank
        bank = gabor_bank(512, 3, seed=args.seed).to(device)
        # normalize=True: D judges the kernels' shape, not their norm (the bank has unit-norm
        # kernels, the convs' are 0.1–0.6; on raw kernels D wins by the norm alone).
        adv = AdversarialKernelRegularizer(model, bank, lam=lam, generator=torch.Generator().manual_seed(args.seed),
                                           normalize=True)
    logger = reg if reg_name == "frame" else Regularizer(model, "frame", 1.0, backend=backend, A=0.5, B=2.0)

    if reg_name == "beta-lasso":
        opt = regkernels.optim.BetaLasso(model.parameters(), lr=args.lr, lam=lam, beta=50, momentum=MOMENTUM,
                                         backend=backend)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=MOMENTUM)

    say(f"digits 8x8: {len(y_train)} train / {len(y_test)} test | reg {reg_name} (lam {lam:g}) | "
        f"backend {args.backend} | {steps} steps/epoch x {args.epochs} epochs, batch {args.batch} | "
        f"{torch.get_num_threads()} threads, {device}" + (f" | FSDP2 x {world} processes" if world > 1 else ""))
    header = (f"{'epoch':>5} {'loss':>8} {'penalty':>9} {'test acc':>8} {'model ms':>9} {'reg ms':>8} "
              f"{'sigma min..max':>15} {'gersh(WWt) lo..hi':>19}  extra")
    say(header)
    say("-" * len(header))

    records: list[dict] = []
    all_model_ms: list[float] = []
    all_reg_ms: list[float] = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(y_train), generator=batch_gen).to(device)
        loss_sum = pen_sum = 0.0
        model_s = reg_s = 0.0
        d_real = d_fake = 0.0
        for step in range(steps):
            idx = order[step * args.batch:(step + 1) * args.batch]
            if world > 1:
                idx = idx.tensor_split(world)[rank]  # this rank's part of the batch
            x, y = x_train[idx], y_train[idx]
            if reg_name == "jacobian":
                x = x.detach().requires_grad_(True)
            opt.zero_grad(set_to_none=True)
            timer = _Timer(device)
            # (a) task forward + backward
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward(retain_graph=reg_name == "jacobian")
            t_a = timer.lap()
            # (b) penalty forward + backward (accumulates into the same .grad)
            penalty = None
            if reg is not None:
                penalty = reg()
            elif adv is not None:
                penalty = adv.generator_loss()
            elif reg_name == "jacobian":
                penalty = lam * regkernels.jacobian_penalty(logits, x, n_proj=1, backend=backend)
            if penalty is not None:
                penalty.backward()
            t_b = timer.lap()
            # (c) optimizer step
            opt.step()
            t_c = timer.lap()
            # (d) projector / discriminator step
            if projector is not None:
                projector.step()
            elif adv is not None:
                d = adv.discriminator_step()
                d_real += d["d_real"]
                d_fake += d["d_fake"]
            t_d = timer.lap()
            model_s += t_a + t_c
            reg_s += t_b + t_d
            all_model_ms.append(1e3 * (t_a + t_c))
            all_reg_ms.append(1e3 * (t_b + t_d))
            loss_sum += loss.item()
            pen_sum += 0.0 if penalty is None else penalty.item()

        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        bounds = _frame_summary(logger.stats())
        rec = {"epoch": epoch, "steps": steps, "loss": loss_sum / steps, "penalty": pen_sum / steps,
               "test_acc": acc, "model_ms": 1e3 * model_s / steps, "reg_ms": 1e3 * reg_s / steps, **bounds}
        extra = ""
        if reg_name == "beta-lasso":
            nz = sum(n for group in opt.nonzeros() for n in group if n is not None)
            total = sum(p.numel() for p in model.parameters())
            rec["nonzero_frac"] = nz / total
            extra = f"nonzero {nz}/{total} ({100 * nz / total:.1f}%)"
        elif adv is not None:
            rec["d_real"], rec["d_fake"] = d_real / steps, d_fake / steps
            extra = f"D(real) {rec['d_real']:.3f} D(fake) {rec['d_fake']:.3f}"
        elif projector is not None:
            extra = f"svb eps {SVB_EPS} every {projector.every} steps"
        records.append(rec)
        say(f"{epoch:>5} {rec['loss']:>8.4f} {rec['penalty']:>9.3g} {acc:>8.4f} {rec['model_ms']:>9.2f} "
            f"{rec['reg_ms']:>8.2f} {bounds['sigma_min']:>7.3f}..{bounds['sigma_max']:<6.3f} "
            f"{bounds['gershgorin_lo']:>9.3f}..{bounds['gershgorin_hi']:<8.3f}  {extra}".rstrip())

    m_ms = sum(all_model_ms) / len(all_model_ms)
    r_ms = sum(all_reg_ms) / len(all_reg_ms)
    share = 100 * r_ms / (m_ms + r_ms)
    summary = {"reg": reg_name, "lam": lam, "final_test_acc": records[-1]["test_acc"], "model_ms": m_ms,
               "reg_ms": r_ms, "reg_share_pct": share}
    say(f"summary: reg {reg_name} (lam {lam:g}) | final test acc {records[-1]['test_acc']:.4f} | "
        f"ms/step model {m_ms:.2f}, regularizer {r_ms:.2f} | regularizer share {share:.1f}%")
    report = None
    if args.report:  # --fsdp: every rank runs it (the forward pass and the weight gathers are collective)
        report = regkernels.nn.spectrum(model, tuple(x_train.shape[1:]))
        say(f"\nspectrum of the trained model (input {'x'.join(map(str, x_train.shape[1:]))}):")
        say(report.to_markdown())
    if args.json and rank == 0:  # --fsdp: one writer
        out = {"config": vars(args), "summary": summary, "epochs": records}
        if report is not None:
            out["spectrum"] = report.as_dict()
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return records


if __name__ == "__main__":
    main()
