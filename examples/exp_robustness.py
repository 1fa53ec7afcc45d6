"""Experiment 5 (issue 20): hard SVB, soft SVB and the Jacobian penalty for robustness.

    python examples/exp_robustness.py            # full setting: 10 seeds, about a minute on 2 CPU cores
    python examples/exp_robustness.py --quick    # a few steps, one seed (what the test suite runs)

After RegDNNs (bioAI-Oslo, "Exploring soft and hard constraints in artificial neural networks"),
which compares no regularization, hard SVB, Jacobian regularization and others on clean accuracy
and under FGSM / PGD attacks. Here: examples/train.py's data (8×8 digits, 1437 train / 360
test, standardized pixels), model, optimizer (SGD lr 0.1, momentum 0.9), 5 epochs of batch 64,
and four settings per seed, same init and batch order:

- ``none``: no regularizer.
- ``svb``: hard singular value bounding, ``regkernels.nn.SVBProjector(model, eps=0.5,
  every=<steps per epoch>)``: every weight's singular values clamped into [1/1.5, 1.5] once per
  epoch (examples/train.py's ``--reg svb``; eps 0.5 once per epoch is the official SVB code's
  setting).
- ``soft_svb``: RegDNNs' "soft SVB", ``λ·‖WᵀW − I‖_F²`` with W the (out, in) weight matrix,
  i.e. ``regkernels.orthogonality_penalty(W, side="cols", squared=True)``; wired as
  ``Regularizer(model, "orthogonality", weight=λ, side="cols")``, the mean over every Conv /
  Linear layer (RegDNNs penalises LeNet's first Linear only). For wide matrices (all but the
  first conv here) ``side="cols"`` is ``side="rows"`` plus the constant n − m: same gradient.
  λ = train.py's ``DEFAULT_LAM["orthogonality"]`` = 0.01, which is also RegDNNs' default.
- ``jacobian``: ``λ · regkernels.jacobian_penalty(logits, x, n_proj=1)`` (Hoffman et al.'s
  random-projection estimate of the batch mean ‖∂logits/∂x‖_F²), λ = train.py's
  ``DEFAULT_LAM["jacobian"]`` = 0.003.

λ values are examples/train.py's DEFAULT_LAM (chosen there for training behaviour, not on
robustness); nothing is tuned on the test split. Evaluated on the 360 test digits after
training, in standardized pixel units (the training pixels have std 1; no clipping to the
pixel range): clean accuracy; accuracy under additive Gaussian noise N(0, σ²) per pixel
(``--noise-draws`` fixed-seed draws per σ, averaged); accuracy under an untargeted white-box
FGSM perturbation x + ε·sign(∇ₓ CE) of L∞ size ε; and, as diagnostics, the test-set mean
‖∂logits/∂x‖_F² (exact, 10 backward passes) and the product over layers of the weight
matrices' σ_max. Mean ± sample std over the seeds.

``main(argv)`` returns the result dict that ``--json`` writes; ``--png`` writes accuracy vs σ
and vs ε when matplotlib is installed (otherwise one line says it is skipped).
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
from regkernels.nn import Regularizer, SVBProjector

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # examples/exp_common.py
from exp_common import finite_json, fmt, load_train, stats  # noqa: E402

REPO = HERE.parent
OUT_DIR = REPO / "benchmarks" / "results" / "experiments"


T = load_train()

SETTINGS = ("none", "svb", "soft_svb", "jacobian")
SIGMAS = (0.25, 0.5, 1.0, 1.5)
EPSILONS = (0.05, 0.1, 0.2, 0.3)
NOISE_SEED = 12345
FULL = dict(seeds=10, epochs=5, steps_per_epoch=None, noise_draws=10)
QUICK = dict(seeds=1, epochs=1, steps_per_epoch=6, noise_draws=2)


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be comma-separated numbers; got {text!r}") from None
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"{name} must be one or more finite numbers > 0; got {text!r}")
    return tuple(sorted(set(vals)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"a few steps, one seed (defaults {QUICK}); for the test suite")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"number of seeds 0..N-1 (default {FULL['seeds']}, --quick {QUICK['seeds']})")
    p.add_argument("--epochs", type=int, default=None, help=f"default {FULL['epochs']} (train.py's)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cap on steps per epoch (default: all 23)")
    p.add_argument("--sigmas", type=lambda s: _floats(s, "--sigmas"), default=SIGMAS,
                   help="Gaussian noise std devs, comma-separated (default " + ",".join(map(str, SIGMAS)) + ")")
    p.add_argument("--epsilons", type=lambda s: _floats(s, "--epsilons"), default=EPSILONS,
                   help="FGSM L-inf sizes, comma-separated (default " + ",".join(map(str, EPSILONS)) + ")")
    p.add_argument("--noise-draws", type=int, default=None,
                   help=f"noise draws per sigma, averaged (default {FULL['noise_draws']})")
    p.add_argument("--json", default=str(OUT_DIR / "robustness.json"), metavar="PATH",
                   help="write the results here (default benchmarks/results/experiments/robustness.json)")
    p.add_argument("--png", default=str(OUT_DIR / "robustness.png"), metavar="PATH",
                   help="write the figure here when matplotlib is installed "
                        "(default benchmarks/results/experiments/robustness.png)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for name in ("seeds", "epochs", "steps_per_epoch", "noise_draws"):
        if getattr(args, name) is None:
            setattr(args, name, base[name])
    for name in ("seeds", "epochs", "steps_per_epoch", "noise_draws", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {v}")
    for name in ("json", "png"):
        if not getattr(args, name):
            p.error(f"--{name} must be a non-empty path")
    return args


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def noise_accuracy(model, x, y, sigma: float, draws: int) -> float:
    g = torch.Generator().manual_seed(NOISE_SEED)  # the same noise for every model
    return sum(accuracy(model, x + sigma * torch.randn(x.shape, generator=g), y) for _ in range(draws)) / draws


def fgsm_accuracy(model, x, y, eps: float) -> float:
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return accuracy(model, x.detach() + eps * grad.sign(), y)


def jacobian_norm(model, x) -> float:
    x = x.detach().clone().requires_grad_(True)
    return regkernels.jacobian_penalty(model(x), x, exact=True).item()


def sigma_summary(model) -> dict:
    """The weight matrices' σ range and the product of their σ_max (a loose Lipschitz bound of the weights alone)."""
    st = Regularizer(model, "frame", 1.0, A=0.5, B=2.0).stats()
    return {"sigma_min": min(s["sigma_min"] for s in st.values()),
            "sigma_max": max(s["sigma_max"] for s in st.values()),
            "sigma_max_product": math.prod(s["sigma_max"] for s in st.values())}


def train_run(setting, seed, args, data, log):
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = T.build_model()
    batch = 64
    n_batches = math.ceil(len(y_train) / batch)
    steps = n_batches if args.steps_per_epoch is None else min(n_batches, args.steps_per_epoch)
    reg = projector = None
    lam = 0.0
    if setting == "svb":
        projector = SVBProjector(model, eps=T.SVB_EPS, every=steps)
    elif setting == "soft_svb":
        lam = T.DEFAULT_LAM["orthogonality"]
        reg = Regularizer(model, "orthogonality", weight=lam, side="cols")
    elif setting == "jacobian":
        lam = T.DEFAULT_LAM["jacobian"]
    opt = torch.optim.SGD(model.parameters(), lr=T.LR, momentum=T.MOMENTUM)
    batch_gen = torch.Generator().manual_seed(seed)
    jac_gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    loss_sum = pen_sum = 0.0
    for _ in range(args.epochs):
        order = torch.randperm(len(y_train), generator=batch_gen)
        loss_sum = pen_sum = 0.0
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            x, y = x_train[idx], y_train[idx]
            if setting == "jacobian":
                x = x.detach().clone().requires_grad_(True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            pen = None
            if reg is not None:
                pen = reg()
            elif setting == "jacobian":
                pen = lam * regkernels.jacobian_penalty(logits, x, n_proj=1, generator=jac_gen)
            total = loss if pen is None else loss + pen
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            if projector is not None:
                projector.step()
            loss_sum += loss.item()
            pen_sum += 0.0 if pen is None else pen.item()
    seconds = time.perf_counter() - t0
    model.eval()
    out = {"setting": setting, "seed": seed, "lam": lam, "seconds": seconds,
           "final_epoch_loss": loss_sum / steps, "final_epoch_penalty": pen_sum / steps,
           "clean": accuracy(model, x_test, y_test),
           "noise": {str(s): noise_accuracy(model, x_test, y_test, s, args.noise_draws) for s in args.sigmas},
           "fgsm": {str(e): fgsm_accuracy(model, x_test, y_test, e) for e in args.epsilons},
           "jacobian_fro2_test": jacobian_norm(model, x_test), **sigma_summary(model)}
    log(f"  {setting:<8} seed {seed}: clean {out['clean']:.4f} | noise " +
        " ".join(f"{v:.3f}" for v in out["noise"].values()) + " | fgsm " +
        " ".join(f"{v:.3f}" for v in out["fgsm"].values()) +
        f" | |J|^2 {out['jacobian_fro2_test']:.2f} | prod sigma_max {out['sigma_max_product']:.1f} | {seconds:.1f} s")
    return out


def summarize(runs, args) -> dict:
    summary = {}
    for setting in SETTINGS:
        rs = [r for r in runs if r["setting"] == setting]
        summary[setting] = {
            "lam": rs[0]["lam"],
            "clean": stats([r["clean"] for r in rs]),
            "noise": {str(s): stats([r["noise"][str(s)] for r in rs]) for s in args.sigmas},
            "fgsm": {str(e): stats([r["fgsm"][str(e)] for r in rs]) for e in args.epsilons},
            "jacobian_fro2_test": stats([r["jacobian_fro2_test"] for r in rs]),
            "sigma_max_product": stats([r["sigma_max_product"] for r in rs]),
            "sigma_min": stats([r["sigma_min"] for r in rs]),
            "sigma_max": stats([r["sigma_max"] for r in rs]),
            "seconds_per_run": stats([r["seconds"] for r in rs]),
        }
    # paired by seed (same init and batch order): setting − none, per seed
    base = {r["seed"]: r for r in runs if r["setting"] == "none"}
    for setting in SETTINGS[1:]:
        rs = [r for r in runs if r["setting"] == setting]
        summary[setting]["paired_vs_none"] = {
            "clean": stats([r["clean"] - base[r["seed"]]["clean"] for r in rs]),
            "noise": {str(x): stats([r["noise"][str(x)] - base[r["seed"]]["noise"][str(x)] for r in rs])
                      for x in args.sigmas},
            "fgsm": {str(e): stats([r["fgsm"][str(e)] - base[r["seed"]]["fgsm"][str(e)] for r in rs])
                     for e in args.epsilons},
        }
    return summary


def paired_table(summary, args) -> str:
    """Per-seed differences to ``none`` (same init and batch order), mean ± sample std, in accuracy points."""
    cols = (["clean"] + [f"noise σ={s:g}" for s in args.sigmas] + [f"FGSM ε={e:g}" for e in args.epsilons])
    lines = ["| setting − none | " + " | ".join(cols) + " |", "| --- | " + " | ".join("---" for _ in cols) + " |"]
    for setting in SETTINGS[1:]:
        d = summary[setting]["paired_vs_none"]
        cells = [d["clean"]] + [d["noise"][str(x)] for x in args.sigmas] + [d["fgsm"][str(e)] for e in args.epsilons]
        lines.append(f"| {setting} | " + " | ".join(f"{100 * c['mean']:+.1f} ± {100 * c['std']:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def markdown_table(summary, args) -> str:
    cols = (["clean"] + [f"noise σ={s:g}" for s in args.sigmas] + [f"FGSM ε={e:g}" for e in args.epsilons])
    lines = ["| setting | λ | " + " | ".join(cols) + " | test ‖J‖_F² | Π σ_max |",
             "| --- | --- | " + " | ".join("---" for _ in cols) + " | --- | --- |"]
    for setting, s in summary.items():
        cells = [s["clean"]] + [s["noise"][str(x)] for x in args.sigmas] + [s["fgsm"][str(e)] for e in args.epsilons]
        lam = {"none": "—", "svb": f"eps {T.SVB_EPS:g}, once per epoch"}.get(setting, f"{s['lam']:g}")
        lines.append(f"| {setting} | {lam} | " + " | ".join(f"{fmt(c['mean'], '.3f')} ± {fmt(c['std'], '.3f')}" for c in cells) +
                     f" | {fmt(s['jacobian_fro2_test']['mean'], '.2f')} | {fmt(s['sigma_max_product']['mean'], '.1f')} |")
    return "\n".join(lines)


def plot(result, args, say) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: figure skipped (the JSON is still written)")
        return None
    fig, (ax_n, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"none": ("tab:gray", "o"), "svb": ("tab:blue", "s"), "soft_svb": ("tab:green", "^"),
              "jacobian": ("tab:red", "D")}
    for setting, s in result["summary"].items():
        color, marker = styles[setting]
        for ax, key, xs in ((ax_n, "noise", args.sigmas), (ax_f, "fgsm", args.epsilons)):
            pts = [(0.0, s["clean"])] + [(x, s[key][str(x)]) for x in xs]
            nan = float("nan")
            ax.errorbar([p[0] for p in pts], [nan if p[1]["mean"] is None else p[1]["mean"] for p in pts],
                        yerr=[nan if p[1]["std"] is None else p[1]["std"] for p in pts],
                        color=color, marker=marker, ms=4, capsize=3, label=setting)
    n = result["config"]["seeds"]
    ax_n.set_xlabel("Gaussian noise σ (standardized pixels)")
    ax_f.set_xlabel("FGSM ε (L∞, standardized pixels)")
    for ax, title in ((ax_n, "accuracy under input noise"), (ax_f, "accuracy under FGSM")):
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{title} (mean ± std, {n} seed{'s' if n > 1 else ''})", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    fig.savefig(args.png, dpi=110)
    plt.close(fig)
    say(f"figure: {args.png}")
    return args.png


def main(argv=None) -> dict:
    args = parse_args(argv)
    say = (lambda *a, **k: None) if args.quiet else print
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = T.load_data(torch.device("cpu"))
    say(f"exp_robustness: digits {len(data[1])} train / {len(data[3])} test | {args.epochs} epochs, batch 64"
        + (f", <= {args.steps_per_epoch} steps/epoch" if args.steps_per_epoch else "")
        + f" | seeds 0..{args.seeds - 1} | sigmas {list(args.sigmas)} | epsilons {list(args.epsilons)} | "
        f"{torch.get_num_threads()} threads")
    runs = [train_run(setting, seed, args, data, say) for seed in range(args.seeds) for setting in SETTINGS]
    summary = summarize(runs, args)
    wall = time.perf_counter() - t_start
    result = {
        "experiment": "issue 20 / 5: hard SVB, soft SVB and the Jacobian penalty for robustness",
        "command": "python examples/exp_robustness.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {"quick": args.quick, "seeds": args.seeds, "epochs": args.epochs, "batch": 64,
                   "steps_per_epoch": args.steps_per_epoch, "lr": T.LR, "momentum": T.MOMENTUM,
                   "sigmas": list(args.sigmas), "epsilons": list(args.epsilons), "noise_draws": args.noise_draws,
                   "noise_seed": NOISE_SEED, "svb": {"eps": T.SVB_EPS, "every": "once per epoch"},
                   "soft_svb": {"kind": "orthogonality", "side": "cols", "squared": True,
                                "lam": T.DEFAULT_LAM["orthogonality"], "layers": "every Conv2d / Linear (mean)"},
                   "jacobian": {"lam": T.DEFAULT_LAM["jacobian"], "n_proj": 1},
                   "lam_source": "examples/train.py DEFAULT_LAM / SVB_EPS (not tuned)",
                   "units": "standardized pixels (train std 1), no clipping",
                   "threads": torch.get_num_threads(), "n_test": len(data[3])},
        "summary": summary,
        "runs": runs,
        "wall_s": wall,
        "env": {"torch": torch.__version__, "python": platform.python_version(),
                "regkernels": os.path.dirname(regkernels.__file__), "machine": platform.machine()},
    }
    say("\n" + markdown_table(summary, args))
    say("\npaired by seed, accuracy points:\n" + paired_table(summary, args))
    say(f"\nwall time {wall:.1f} s")
    result["png"] = plot(result, args, say)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(finite_json(result), f, indent=1, allow_nan=False)
    say(f"results: {args.json}")
    return result


if __name__ == "__main__":
    main()
