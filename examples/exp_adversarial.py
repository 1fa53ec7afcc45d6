"""Experiment 4 (issue 20): adversarial kernel regularization on little data.

    python examples/exp_adversarial.py            # full setting: 5 seeds, a few minutes on 2 CPU cores
    python examples/exp_adversarial.py --quick    # a few steps, one seed (what the test suite runs)

The question (after Gavrilev et al., "Adversarial Regularization for Convolution Filters"): does
pulling the conv kernels of a model trained on very little data toward a bank of "good" kernels
with ``regkernels.nn.AdversarialKernelRegularizer`` change its kernels and its test accuracy?

1. Bank: a model of ``examples/train.py`` (same data, model, optimizer, 5 epochs, batch 64) is
   trained on the whole training split (1437 digits); ``regkernels.nn.harvest_kernels(model, 3)``
   takes every 3×3 kernel of its convs (16 + 512 + 1024 = 1552 kernels per model).
2. Little data: a stratified subset of the training split, ``--fraction`` (5 %) of every class,
   drawn once from a fixed seed (the same images for every run seed).
3. Three settings per seed, same init, batch order and step count:
   ``none`` (no regularizer; a discriminator is still trained on the side, against the harvested
   bank, to show how well D separates unregularized kernels — it never feeds back),
   ``harvested`` (the regularizer against the bank of step 1) and ``gabor`` (against
   ``regkernels.nn.gabor_bank(512, 3, seed)``, as ``examples/train.py --reg adversarial`` does).
   The regularizer is wired as in train.py: every 3×3 conv of the model, ``normalize=True`` (D
   judges kernel shape, not norm), λ = train.py's ``DEFAULT_LAM["adversarial"]`` (1.0) unless
   ``--lam`` says otherwise; nothing is tuned on the test split.
4. Reported: test accuracy (360 held-out digits) mean ± sample std over the seeds, D(real) and
   D(fake) over training (means over each logging interval), how close the learned kernels are
   to each bank (mean over kernels of the largest cosine similarity to a bank kernel), and a
   figure of the learned first-layer kernels per setting (seed 0) with the D curves.

``main(argv)`` returns the result dict that ``--json`` writes; ``--png`` writes the figure when
matplotlib is installed (otherwise one line says it is skipped).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time

import torch
import torch.nn.functional as F

import regkernels
from regkernels.nn import AdversarialKernelRegularizer, gabor_bank, harvest_kernels

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # examples/exp_common.py
from exp_common import finite_json, fmt, load_train, stats, stratified_subset  # noqa: E402

REPO = HERE.parent
OUT_DIR = REPO / "benchmarks" / "results" / "experiments"


T = load_train()

SETTINGS = ("none", "harvested", "gabor")
K = 3                    # the model's convs are 3×3
GABOR_N = 512            # as examples/train.py --reg adversarial
PRETRAIN_SEED = 1000     # the bank's model; distinct from the run seeds 0, 1, ...
SUBSET_SEED = 0          # the little-data subset is the same for every run seed
FULL = dict(seeds=5, steps=1000, batch=32, pretrain_epochs=5, log_every=50)
QUICK = dict(seeds=1, steps=12, batch=32, pretrain_epochs=1, log_every=4)
QUICK_PRETRAIN_STEPS = 5
COLLAPSE_TRAIN_ACC = 0.5  # a run whose final training-subset accuracy is below this has collapsed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"a few steps, one seed (defaults {QUICK}); for the test suite")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"number of run seeds 0..N-1 (default {FULL['seeds']}, --quick {QUICK['seeds']})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps on the subset (default {FULL['steps']}, --quick {QUICK['steps']})")
    p.add_argument("--batch", type=int, default=None, help=f"batch size on the subset (default {FULL['batch']})")
    p.add_argument("--fraction", type=float, default=0.05,
                   help="fraction of every class of the training split kept (default 0.05)")
    p.add_argument("--lam", type=float, default=None,
                   help=f"the regularizer's λ (default examples/train.py's DEFAULT_LAM['adversarial'] = "
                        f"{T.DEFAULT_LAM['adversarial']:g})")
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help=f"epochs of the bank's model on the full training split (default {FULL['pretrain_epochs']})")
    p.add_argument("--log-every", type=int, default=None,
                   help=f"steps per logged interval of D(real)/D(fake) and test accuracy (default {FULL['log_every']})")
    p.add_argument("--json", default=str(OUT_DIR / "adversarial.json"), metavar="PATH",
                   help="write the results here (default benchmarks/results/experiments/adversarial.json)")
    p.add_argument("--png", default=str(OUT_DIR / "adversarial.png"), metavar="PATH",
                   help="write the figure here when matplotlib is installed "
                        "(default benchmarks/results/experiments/adversarial.png)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for name in ("seeds", "steps", "batch", "pretrain_epochs", "log_every"):
        if getattr(args, name) is None:
            setattr(args, name, base[name])
    for name in ("seeds", "steps", "batch", "pretrain_epochs", "log_every", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {v}")
    if not (math.isfinite(args.fraction) and 0 < args.fraction <= 1):
        p.error(f"--fraction must be in (0, 1]; got {args.fraction}")
    if args.lam is None:
        args.lam = T.DEFAULT_LAM["adversarial"]
    elif not (math.isfinite(args.lam) and args.lam >= 0):
        p.error(f"--lam must be a finite number >= 0; got {args.lam}")
    for name in ("json", "png"):
        if not getattr(args, name):
            p.error(f"--{name} must be a non-empty path")
    return args


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def pretrain(x, y, x_test, y_test, epochs: int, max_steps: int | None):
    """examples/train.py's recipe (SGD lr 0.1, momentum 0.9, batch 64) on the full training split."""
    torch.manual_seed(PRETRAIN_SEED)
    model = T.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=T.LR, momentum=T.MOMENTUM)
    g = torch.Generator().manual_seed(PRETRAIN_SEED)
    batch = 64
    n_batches = math.ceil(len(y) / batch)
    steps = n_batches if max_steps is None else min(n_batches, max_steps)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model, accuracy(model, x_test, y_test)


def _unit(k: torch.Tensor) -> torch.Tensor:
    k = k.reshape(k.shape[0], -1)
    return k / k.norm(dim=1, keepdim=True).clamp_min(1e-12)


def bank_similarity(kernels: torch.Tensor, bank: torch.Tensor) -> float:
    """Mean over the kernels of the largest cosine similarity to any bank kernel (1 = every kernel is in the bank's span of shapes)."""
    return (_unit(kernels) @ _unit(bank).T).max(1).values.mean().item()


def first_layer(model) -> torch.Tensor:
    return model[0].weight.detach().reshape(-1, K, K).clone()


def train_run(setting, seed, args, data, subset, banks, log):
    x_train, y_train, x_test, y_test = data
    xs, ys = x_train[subset], y_train[subset]
    torch.manual_seed(seed)
    model = T.build_model()
    init_first = first_layer(model)
    opt = torch.optim.SGD(model.parameters(), lr=T.LR, momentum=T.MOMENTUM)
    # none: a discriminator against the harvested bank trained on the side (monitor only, never in the loss)
    bank = banks["gabor" if setting == "gabor" else "harvested"]
    adv = AdversarialKernelRegularizer(model, bank, lam=args.lam, generator=torch.Generator().manual_seed(seed),
                                       normalize=True)
    batch_gen = torch.Generator().manual_seed(seed)
    batch = min(args.batch, len(ys))
    order, pos = torch.randperm(len(ys), generator=batch_gen), 0
    curve = []
    acc_loss = acc_pen = acc_real = acc_fake = 0.0
    n_in = 0
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        if pos + batch > len(ys):  # a new epoch over the subset
            order, pos = torch.randperm(len(ys), generator=batch_gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        loss = F.cross_entropy(model(xs[idx]), ys[idx])
        total = loss
        pen = 0.0
        if setting != "none":
            g_loss = adv.generator_loss()
            total = loss + g_loss
            pen = g_loss.item()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        d = adv.discriminator_step()
        acc_loss += loss.item()
        acc_pen += pen
        acc_real += d["d_real"]
        acc_fake += d["d_fake"]
        n_in += 1
        if step % args.log_every == 0 or step == args.steps:
            curve.append({"step": step, "loss": acc_loss / n_in, "penalty": acc_pen / n_in,
                          "d_real": acc_real / n_in, "d_fake": acc_fake / n_in,
                          "test_acc": accuracy(model, x_test, y_test)})
            acc_loss = acc_pen = acc_real = acc_fake = 0.0
            n_in = 0
    seconds = time.perf_counter() - t0
    all_kernels = harvest_kernels(model, K)
    first = first_layer(model)
    train_acc = accuracy(model, xs, ys)
    out = {
        "setting": setting, "seed": seed, "seconds": seconds,
        # collapsed: the run no longer fits its own training subset (judged on training data, not test)
        "collapsed": not train_acc >= COLLAPSE_TRAIN_ACC,
        "test_acc": curve[-1]["test_acc"], "train_acc": train_acc,
        "d_real_final": curve[-1]["d_real"], "d_fake_final": curve[-1]["d_fake"],
        "final_loss": curve[-1]["loss"],
        "similarity": {name: {"first_layer": bank_similarity(first, b), "all_layers": bank_similarity(all_kernels, b),
                              "first_layer_at_init": bank_similarity(init_first, b)}
                       for name, b in banks.items()},
        "curve": curve, "first_layer_kernels": first.tolist(),
    }
    log(f"  {setting:<9} seed {seed}: test acc {out['test_acc']:.4f} | train acc {out['train_acc']:.3f} | "
        f"D(real) {out['d_real_final']:.3f} D(fake) {out['d_fake_final']:.3f} | "
        + ("COLLAPSED | " if out["collapsed"] else "") +
        f"sim first layer: harvested {out['similarity']['harvested']['first_layer']:.3f}, "
        f"gabor {out['similarity']['gabor']['first_layer']:.3f} | {seconds:.1f} s")
    return out


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for setting in SETTINGS:
        rs = [r for r in runs if r["setting"] == setting]
        if not rs:
            continue
        n_points = len(rs[0]["curve"])
        curve = [{"step": rs[0]["curve"][i]["step"],
                  **{key: stats([r["curve"][i][key] for r in rs])["mean"]
                     for key in ("loss", "penalty", "d_real", "d_fake", "test_acc")}} for i in range(n_points)]
        summary[setting] = {
            "test_acc": stats([r["test_acc"] for r in rs]),
            "train_acc": stats([r["train_acc"] for r in rs]),
            "collapsed_runs": sum(r["collapsed"] for r in rs), "runs": len(rs),
            "d_real_final": stats([r["d_real_final"] for r in rs]),
            "d_fake_final": stats([r["d_fake_final"] for r in rs]),
            "similarity": {bank: {where: stats([r["similarity"][bank][where] for r in rs])
                                  for where in ("first_layer", "all_layers", "first_layer_at_init")}
                           for bank in ("harvested", "gabor")},
            "mean_curve": curve,
        }
    # paired by seed (same init, batch order and subset): setting − none
    base = {r["seed"]: r for r in runs if r["setting"] == "none"}
    for setting in SETTINGS[1:]:
        rs = [r for r in runs if r["setting"] == setting and r["seed"] in base]
        if rs:
            summary[setting]["paired_test_acc_vs_none"] = stats([r["test_acc"] - base[r["seed"]]["test_acc"] for r in rs])
    return summary


def markdown_table(summary: dict) -> str:
    lines = ["| setting | bank D is trained on | test acc (mean ± std) | min–max | train acc | final D(real) | "
             "final D(fake) | collapsed runs | test acc − none, paired by seed | "
             "first-layer similarity to harvested / Gabor bank |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for setting, s in summary.items():
        bank = {"none": "harvested (monitor only)", "harvested": "harvested", "gabor": "Gabor"}[setting]
        sim = s["similarity"]
        lines.append(
            f"| {setting} | {bank} | {s['test_acc']['mean']:.4f} ± {s['test_acc']['std']:.4f} | "
            f"{s['test_acc']['min']:.4f}–{s['test_acc']['max']:.4f} | {s['train_acc']['mean']:.3f} | "
            f"{fmt(s['d_real_final']['mean'], '.3f')} | {fmt(s['d_fake_final']['mean'], '.3f')} | "
            f"{s['collapsed_runs']} of {s['runs']} | "
            + (f"{100 * s['paired_test_acc_vs_none']['mean']:+.1f} ± {100 * s['paired_test_acc_vs_none']['std']:.1f} "
               "points | " if "paired_test_acc_vs_none" in s else "— | ") +
            f"{fmt(sim['harvested']['first_layer']['mean'], '.3f')} / {fmt(sim['gabor']['first_layer']['mean'], '.3f')} |")
    return "\n".join(lines)


def _kernel_mosaic(kernels: torch.Tensor, per_row: int = 8, gap: int = 1) -> torch.Tensor:
    """(n, k, k) → one image of the kernels in rows of ``per_row``, each scaled to max |value| 1, NaN gaps."""
    n, k, _ = kernels.shape
    rows = math.ceil(n / per_row)
    img = torch.full((rows * (k + gap) - gap, per_row * (k + gap) - gap), float("nan"))
    for i, kern in enumerate(kernels):
        r, c = divmod(i, per_row)
        img[r * (k + gap):r * (k + gap) + k, c * (k + gap):c * (k + gap) + k] = kern / kern.abs().max().clamp_min(1e-12)
    return img


def plot(result: dict, path: str, say) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: figure skipped (the JSON is still written)")
        return None
    runs = result["runs"]
    seed0 = min(r["seed"] for r in runs)
    rows = [("pretrained on all digits\n(the harvested bank)", torch.tensor(result["bank"]["pretrained_first_layer"]))]
    for setting in SETTINGS:
        r = next(r for r in runs if r["setting"] == setting and r["seed"] == seed0)
        label = {"none": "none", "harvested": "adversarial,\nharvested bank", "gabor": "adversarial,\nGabor bank"}[setting]
        rows.append((f"{label}\n(seed {seed0}, acc {r['test_acc']:.3f})", torch.tensor(r["first_layer_kernels"])))
    rows.append(("Gabor bank\n(first 16)", torch.tensor(result["bank"]["gabor_sample"])))
    fig = plt.figure(figsize=(12, 11))
    gs = fig.add_gridspec(len(rows), 2, width_ratios=[1, 1.3], wspace=0.45, hspace=0.35)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")
    for i, (label, kernels) in enumerate(rows):
        ax = fig.add_subplot(gs[i, 0])
        ax.imshow(_kernel_mosaic(kernels).numpy(), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
        for s in ax.spines.values():
            s.set_visible(False)
    if rows:
        fig.axes[0].set_title("first-layer 3×3 kernels\n(each scaled to max |w| = 1; red +, blue −)", fontsize=9)
    colors = {"none": "tab:gray", "harvested": "tab:blue", "gabor": "tab:orange"}
    half = len(rows) // 2
    ax_d = fig.add_subplot(gs[:half, 1])
    ax_a = fig.add_subplot(gs[half:, 1])
    nan = float("nan")
    for setting, s in result["summary"].items():
        steps = [c["step"] for c in s["mean_curve"]]
        s = {"mean_curve": [{k: nan if v is None else v for k, v in c.items()} for c in s["mean_curve"]]}
        ax_d.plot(steps, [c["d_real"] for c in s["mean_curve"]], color=colors[setting], ls="-",
                  label=f"{setting}: D(real)")
        ax_d.plot(steps, [c["d_fake"] for c in s["mean_curve"]], color=colors[setting], ls="--",
                  label=f"{setting}: D(fake)")
        ax_a.plot(steps, [c["test_acc"] for c in s["mean_curve"]], color=colors[setting], label=setting)
    ax_d.axhline(0.5, color="k", lw=0.5, ls=":")
    ax_d.set_ylim(0, 1)
    ax_d.set_ylabel("D output (mean over interval)")
    ax_d.set_title(f"discriminator, λ = {result['config']['lam']:g}, mean over {result['config']['seeds']} seeds\n"
                   "(none: D trained on the side only)", fontsize=9)
    ax_d.legend(fontsize=7, ncol=2)
    ax_a.set_xlabel("training step on the subset")
    ax_a.set_ylabel("test accuracy")
    ax_a.set_title(f"test accuracy, {result['config']['subset_size']} training digits, mean over seeds "
                   "(collapsed runs included)", fontsize=9)
    ax_a.legend(fontsize=7)
    ax_a.grid(alpha=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    say(f"figure: {path}")
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    say = (lambda *a, **k: None) if args.quiet else print
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = T.load_data(torch.device("cpu"))
    x_train, y_train, x_test, y_test = data
    subset = stratified_subset(y_train, args.fraction, SUBSET_SEED)

    pre_model, pre_acc = pretrain(x_train, y_train, x_test, y_test, args.pretrain_epochs,
                                  QUICK_PRETRAIN_STEPS if args.quick else None)
    banks = {"harvested": harvest_kernels(pre_model, K), "gabor": gabor_bank(GABOR_N, K, seed=0)}
    say(f"exp_adversarial: bank model trained on {len(y_train)} digits ({args.pretrain_epochs} epochs): "
        f"test acc {pre_acc:.4f}, {banks['harvested'].shape[0]} harvested 3x3 kernels | Gabor bank {GABOR_N} | "
        f"subset {len(subset)} digits ({args.fraction:g} of each class) | lam {args.lam:g} | "
        f"{args.steps} steps, batch {min(args.batch, len(subset))} | seeds 0..{args.seeds - 1} | "
        f"{torch.get_num_threads()} threads")

    runs = []
    for seed in range(args.seeds):
        for setting in SETTINGS:
            runs.append(train_run(setting, seed, args, data, subset, banks, say))
    summary = summarize(runs)
    wall = time.perf_counter() - t_start
    result = {
        "experiment": "issue 20 / 4: adversarial kernel regularization on little data",
        "command": "python examples/exp_adversarial.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {"quick": args.quick, "seeds": args.seeds, "steps": args.steps,
                   "batch": min(args.batch, len(subset)), "fraction": args.fraction, "subset_size": len(subset),
                   "subset_seed": SUBSET_SEED, "lam": args.lam,
                   "lam_source": "examples/train.py DEFAULT_LAM['adversarial'] (not tuned)"
                                 if args.lam == T.DEFAULT_LAM["adversarial"] else "--lam",
                   "normalize": True, "regularized": "every 3x3 conv of the model (as examples/train.py)",
                   "lr": T.LR, "momentum": T.MOMENTUM, "pretrain_epochs": args.pretrain_epochs,
                   "pretrain_seed": PRETRAIN_SEED, "gabor_n": GABOR_N, "log_every": args.log_every,
                   "threads": torch.get_num_threads(), "n_test": len(y_test), "n_train_full": len(y_train)},
        "bank": {"pretrained_test_acc": pre_acc, "harvested_size": banks["harvested"].shape[0],
                 "pretrained_first_layer": first_layer(pre_model).tolist(),
                 "gabor_sample": banks["gabor"][:16].tolist()},
        "summary": summary,
        "runs": runs,
        "wall_s": wall,
        "env": {"torch": torch.__version__, "python": platform.python_version(),
                "regkernels": os.path.dirname(regkernels.__file__), "machine": platform.machine()},
    }
    say("\n" + markdown_table(summary))
    say(f"\nwall time {wall:.1f} s")
    result["png"] = plot(result, args.png, say)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(finite_json(result), f, indent=1, allow_nan=False)
    say(f"results: {args.json}")
    return result


if __name__ == "__main__":
    main()
