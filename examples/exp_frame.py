"""Experiment: frame regularization vs its baselines on the 8×8 digits (issue 20, experiment 2).

    python examples/exp_frame.py                 # the full setting: 3 seeds × 7 regularizers × 2 data settings
    python examples/exp_frame.py --quick         # a few steps per configuration, one seed (the test suite)

The frame-regularization paper (Grigoryev, MIPT 2022) penalises, per layer, the rows of the Gram
matrix that break diagonal dominance of ``WᵀW − A·I`` and ``B·I − WᵀW`` — a Gershgorin
certificate that the layer's weights form a frame with bounds A, B — for plain weight matrices
and for convolutions through their block-Toeplitz operator, and compares it with MHE, weight
orthogonalization (soft orthogonality), SRIP and OCNN. This script repeats the comparison at
toy scale with ``regkernels.nn.Regularizer`` alone:

- data and model: ``load_data`` and ``build_model`` of examples/train.py (1437 train / 360 test
  digits, three 3×3 convs and two Linear layers), SGD with its learning rate and momentum,
  batch 64;
- regularizers: ``none``, ``frame`` and ``conv_frame`` (A = 0.5, B = 2), ``orthogonality``,
  ``srip``, ``mhe``, ``ocnn``, each with examples/train.py's ``DEFAULT_LAM`` (not tuned here;
  ``--lam KIND=VALUE`` overrides one);
- two data settings: ``full`` (all 1437 training images) and ``10pct`` (a fixed stratified subset:
  per class, ``round(fraction · n_class)`` images drawn with a fixed generator, independent of
  ``--seeds``; the pixels re-standardised with the subset's own mean and standard deviation, the
  test set with the same map). Both settings take the same number of optimizer steps
  (``--epochs`` epochs of the full set, 23 steps each), so the reduced set is seen ~10× more often;
- per run: the final test accuracy (no epoch selection), the final per-layer bounds — from
  ``Regularizer(model, "frame", A=0.5, B=2).stats()`` the Gershgorin bounds of each layer's
  ``as_matrix`` Gram and its exact σ range; from ``regkernels.nn.spectrum(model, (1, 8, 8))`` each
  operator's Gershgorin bounds, σ_max (power iteration) and certified bound; the exact σ range of
  each conv operator on its 8×8 / 4×4 input from ``regkernels.conv_to_matrix`` and an SVD — and
  the step split timed as examples/train.py times it: model = task forward + backward and
  optimizer step, regularizer = penalty forward + backward. Overhead = regularizer / model, both
  medians over the run's steps (the mean is in the JSON too).

Seed ``s`` fixes the model's initialisation and the batch order, so for one seed every
regularizer starts from the same weights. ``--json`` (default
benchmarks/results/experiments/frame.json) holds the configuration, every run and the summary
(mean, sample standard deviation, min and max over seeds); ``--png`` the figure when matplotlib
is importable (else one line says it is skipped). ``main(argv)`` returns the JSON's dict.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import DEFAULT_LAM, LR, MOMENTUM, REG_KW, build_model, load_data  # noqa: E402

import regkernels  # noqa: E402
from regkernels.nn import Regularizer  # noqa: E402

REGS = ("none", "frame", "conv_frame", "orthogonality", "srip", "mhe", "ocnn")
SETTINGS = ("full", "10pct")
A, B = 0.5, 2.0
BATCH = 64
DEFAULT_EPOCHS = 15          # of the full training set (23 steps each); the reduced set gets the same steps
QUICK_STEPS = 4
DIVERGED_LOSS = 0.9 * math.log(10)  # a run whose final task loss is above this ended at chance
SUBSET_SEED = 0              # the reduced training set is fixed, whatever --seeds is
INPUT = (1, 8, 8)
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "benchmarks", "results", "experiments")


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated non-negative integers (e.g. 0,1,2); "
                                         f"got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds takes distinct non-negative integers (e.g. 0,1,2); got {text!r}")
    return seeds


def _regs(text: str) -> list[str]:
    regs = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in regs if r not in REGS]
    if not regs or bad or len(set(regs)) != len(regs):
        raise argparse.ArgumentTypeError(f"--regs takes distinct names from {', '.join(REGS)}; got {text!r}")
    return regs


def _lam(text: str) -> tuple[str, float]:
    kind, sep, value = text.partition("=")
    try:
        lam = float(value)
    except ValueError:
        lam = math.nan
    if not sep or kind not in REGS or kind == "none" or not (math.isfinite(lam) and lam >= 0):
        raise argparse.ArgumentTypeError(f"--lam takes KIND=VALUE with KIND one of {', '.join(REGS[1:])} and a "
                                         f"finite VALUE >= 0; got {text!r}")
    return kind, lam


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_STEPS} steps per configuration and seed 0 only (a smoke run, well under a minute)")
    p.add_argument("--seeds", type=_seeds, default=None,
                   help="comma-separated seeds (default 0,1,2; --quick: 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs of the full training set (default {DEFAULT_EPOCHS}; the reduced setting runs "
                        f"the same number of steps)")
    p.add_argument("--fraction", type=float, default=0.1,
                   help="the reduced setting's share of each class (default 0.1)")
    p.add_argument("--regs", type=_regs, default=list(REGS), help=f"comma-separated subset of {','.join(REGS)}")
    p.add_argument("--lam", type=_lam, action="append", default=[], metavar="KIND=VALUE",
                   help="override examples/train.py's DEFAULT_LAM for one regularizer (repeatable)")
    p.add_argument("--json", default=os.path.join(RESULTS, "frame.json"), metavar="PATH",
                   help="where the results go (default benchmarks/results/experiments/frame.json; '' writes none)")
    p.add_argument("--png", default=os.path.join(RESULTS, "frame.png"), metavar="PATH",
                   help="the figure, when matplotlib is importable (default benchmarks/results/experiments/"
                        "frame.png; '' draws none)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be >= 1; got {args.epochs}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1; got {args.threads}")
    if not (0 < args.fraction <= 1):
        p.error(f"--fraction must be in (0, 1]; got {args.fraction}")
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    return args


def stratified_subset(y: torch.Tensor, fraction: float, seed: int = SUBSET_SEED) -> torch.Tensor:
    """Sorted indices of a fixed stratified subset: per class ``max(1, round(fraction · n_class))``."""
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        take = max(1, round(fraction * len(idx)))
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:take]])
    return torch.cat(keep).sort().values


def make_settings(fraction: float) -> dict:
    x_tr, y_tr, x_te, y_te = load_data(torch.device("cpu"))
    sub = stratified_subset(y_tr, fraction)
    xs = x_tr[sub]
    # the same affine map on the subset and the test set: as if the raw pixels were standardised
    # with the subset's own statistics (load_data used the full training set's)
    mu, sd = xs.mean(), xs.std()
    return {"full": (x_tr, y_tr, x_te, y_te),
            "10pct": ((xs - mu) / sd, y_tr[sub], (x_te - mu) / sd, y_te)}


def _weights_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def operator_sigma_range(model: nn.Module, sizes: dict) -> dict:
    """Exact ``(σ_min, σ_max)`` of each layer's operator: a conv's ``T`` on its recorded input size
    (``regkernels.conv_to_matrix``, dense, then an SVD in float64), a Linear's W."""
    out = {}
    for name, m in _weights_layers(model):
        w = m.weight.detach()
        if isinstance(m, nn.Conv2d):
            w = regkernels.conv_to_matrix(w, sizes[name], m.stride, m.padding, m.dilation, m.groups)
        s = torch.linalg.svdvals(w.double())
        out[name] = (float(s.min()), float(s.max()))
    return out


def layer_bounds(model: nn.Module) -> tuple[dict, dict]:
    """Per layer the final bounds, and the model-level ``{lipschitz_bound, lipschitz_estimate}``."""
    mat = Regularizer(model, "frame", 1.0, A=A, B=B).stats()
    spec = regkernels.nn.spectrum(model, INPUT, A=A, B=B)
    rows = {r["name"]: r for r in spec.layers}
    exact = operator_sigma_range(model, {n: r["input_size"] for n, r in rows.items()})
    layers = {}
    for name, _ in _weights_layers(model):
        r = rows[name]
        layers[name] = {
            "kind": r["kind"], "input_size": list(r["input_size"]) if r["input_size"] else None,
            # as_matrix(W): Gershgorin bounds of the Gram the 'frame' penalty sees, exact σ range
            "gershgorin_lo": mat[name]["gershgorin_lo"], "gershgorin_hi": mat[name]["gershgorin_hi"],
            "sigma_min": mat[name]["sigma_min"], "sigma_max": mat[name]["sigma_max"],
            # the operator on its input size: what 'conv_frame' sees
            "op_gershgorin_lo": r["gershgorin_lo"], "op_gershgorin_hi": r["gershgorin_hi"],
            "op_sigma_min": exact[name][0], "op_sigma_max": exact[name][1],
            "op_sigma_max_power": r["sigma_max"], "op_bound_any_size": r["bound"],
            "op_frame_penalty": r["frame_penalty"],
        }
    return layers, {"lipschitz_bound": spec.lipschitz_bound, "lipschitz_estimate": spec.lipschitz_estimate}


def _summary_of_layers(layers: dict) -> dict:
    v = list(layers.values())
    lo = lambda k: min(x[k] for x in v)  # noqa: E731
    hi = lambda k: max(x[k] for x in v)  # noqa: E731
    return {"sigma_min": lo("sigma_min"), "sigma_max": hi("sigma_max"),
            "gershgorin_lo": lo("gershgorin_lo"), "gershgorin_hi": hi("gershgorin_hi"),
            "op_sigma_min": lo("op_sigma_min"), "op_sigma_max": hi("op_sigma_max"),
            "op_gershgorin_lo": lo("op_gershgorin_lo"), "op_gershgorin_hi": hi("op_gershgorin_hi")}


def _make_reg(model: nn.Module, kind: str, lam: float):
    if kind == "none":
        return None
    return Regularizer(model, kind, weight=lam, **REG_KW.get(kind, {}))


def warm_up(regs) -> None:
    """One penalty forward + backward per kind on a throwaway model: one-time costs (library
    loading, thread pools, caches) stay out of the first timed run."""
    model = build_model()
    for kind in regs:
        reg = _make_reg(model, kind, 1.0)
        F.cross_entropy(model(torch.zeros(2, *INPUT)), torch.zeros(2, dtype=torch.int64)).backward()
        if reg is not None:
            reg().backward()


def run_one(data, kind: str, lam: float, seed: int, steps: int) -> dict:
    x_tr, y_tr, x_te, y_te = data
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model()
    gen = torch.Generator().manual_seed(seed)
    reg = _make_reg(model, kind, lam)  # before the first forward: conv_frame records input sizes
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    n = len(y_tr)
    model_ms, reg_ms, losses, pens = [], [], [], []
    step = 0
    model.train()
    while step < steps:
        order = torch.randperm(n, generator=gen)
        for b in range(math.ceil(n / BATCH)):
            if step == steps:
                break
            idx = order[b * BATCH:(b + 1) * BATCH]
            opt.zero_grad(set_to_none=True)
            t = time.perf_counter()
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])       # (a) task forward + backward
            loss.backward()
            t_a = time.perf_counter()
            pen = None
            if reg is not None:                                       # (b) penalty forward + backward
                pen = reg()
                pen.backward()
            t_b = time.perf_counter()
            opt.step()                                                # (c) optimizer step
            t_c = time.perf_counter()
            model_ms.append(1e3 * ((t_a - t) + (t_c - t_b)))
            reg_ms.append(1e3 * (t_b - t_a))
            losses.append(loss.item())
            pens.append(0.0 if pen is None else pen.item())
            step += 1
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
        train_acc = (model(x_tr).argmax(1) == y_tr).float().mean().item()
    layers, net = layer_bounds(model)
    tail = max(1, min(len(losses), 23))
    m_med, r_med = statistics.median(model_ms), statistics.median(reg_ms)
    m_mean, r_mean = statistics.fmean(model_ms), statistics.fmean(reg_ms)
    return {
        "reg": kind, "lam": lam, "seed": seed, "steps": steps, "n_train": n,
        "test_acc": acc, "train_acc": train_acc,
        "final_loss": statistics.fmean(losses[-tail:]), "final_penalty": statistics.fmean(pens[-tail:]),
        "model_ms_median": m_med, "reg_ms_median": r_med, "model_ms_mean": m_mean, "reg_ms_mean": r_mean,
        "overhead": r_med / m_med, "overhead_mean": r_mean / m_mean,
        "overhead_min": min(reg_ms) / min(model_ms),
        # learned, then blew up: the final task loss back near log(10) (chance) after a batch below half of it
        "diverged": not math.isfinite(statistics.fmean(losses[-tail:]))
        or (statistics.fmean(losses[-tail:]) >= DIVERGED_LOSS and min(losses) < 0.5 * math.log(10)),
        "layers": layers, "bounds": _summary_of_layers(layers), **net,
        "train_s": train_s, "wall_s": time.perf_counter() - t0,
    }


def _agg(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


SUMMARY_KEYS = ("test_acc", "train_acc", "overhead", "overhead_mean", "overhead_min", "model_ms_median",
                "reg_ms_median", "lipschitz_bound")


def summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault(r["setting"], {}).setdefault(r["reg"], []).append(r)
    summary: dict = {}
    for setting, by_reg in out.items():
        summary[setting] = {}
        for reg, rs in by_reg.items():
            s = {k: _agg([r[k] for r in rs]) for k in SUMMARY_KEYS}
            s["diverged"] = sum(r["diverged"] for r in rs)
            base = {r["seed"]: r["test_acc"] for r in by_reg.get("none", [])}
            if reg != "none" and all(r["seed"] in base for r in rs):
                # paired by seed (same initial weights and batch order)
                s["test_acc_minus_none"] = _agg([r["test_acc"] - base[r["seed"]] for r in rs])
            s["bounds"] = {k: _agg([r["bounds"][k] for r in rs]) for k in rs[0]["bounds"]}
            s["layers"] = {name: {k: _agg([r["layers"][name][k] for r in rs])
                                  for k in ("sigma_min", "sigma_max", "gershgorin_lo", "gershgorin_hi",
                                            "op_sigma_min", "op_sigma_max", "op_gershgorin_lo", "op_gershgorin_hi")}
                           for name in rs[0]["layers"]}
            summary[setting][reg] = s
    return summary


def _pm(a: dict, fmt: str = ".3f") -> str:
    return f"{a['mean']:{fmt}} ± {a['std']:{fmt}}"


def to_markdown(result: dict) -> str:
    """The tables of frame.md: accuracy / bounds / overhead per regularizer, and per-layer σ ranges."""
    s, lam = result["summary"], result["config"]["lam"]
    regs = result["config"]["regs"]
    settings = [k for k in SETTINGS if k in s]
    lines = ["| regularizer | λ | test acc, full | test acc, 10 % | operator σ range (exact), full | "
             "as_matrix σ range, full | Gershgorin lo..hi: as_matrix / operator, full | Lipschitz bound, full "
             "(median) | overhead (reg / model), full: medians / minima |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for reg in regs:
        cells = []
        for st in ("full", "10pct"):
            a = s[st][reg]["test_acc"] if st in settings else None
            div = s[st][reg]["diverged"] if a is not None else 0
            cells.append("—" if a is None else _pm(a) + (f" (min {a['min']:.3f})" if a["n"] > 1 else "")
                         + (f", {div}/{a['n']} diverged" if div else ""))
        b = s[settings[0]][reg]["bounds"]
        ov, om = s[settings[0]][reg]["overhead"], s[settings[0]][reg]["overhead_min"]
        over = "—" if reg == "none" else \
            f"{100 * ov['mean']:.0f} % ± {100 * ov['std']:.0f} / {100 * om['mean']:.0f} % ± {100 * om['std']:.0f}"
        lines.append(f"| {reg} | {lam[reg]:g} | {cells[0]} | {cells[1]} | "
                     f"{b['op_sigma_min']['mean']:.2g}–{b['op_sigma_max']['mean']:.2f} | "
                     f"{b['sigma_min']['mean']:.3f}–{b['sigma_max']['mean']:.2f} | "
                     f"{b['gershgorin_lo']['mean']:.2f}..{b['gershgorin_hi']['mean']:.2f} / "
                     f"{b['op_gershgorin_lo']['mean']:.1f}..{b['op_gershgorin_hi']['mean']:.1f} | "
                     f"{s[settings[0]][reg]['lipschitz_bound']['median']:.3g} | {over} |")
    for st in settings:
        names = list(s[st][regs[0]]["layers"])
        kinds = {n: result["runs"][0]["layers"][n]["kind"] for n in names}
        lines += ["", f"Per layer ({st} data): exact operator σ_min–σ_max (mean over seeds); the frame target "
                  f"is [√A, √B] = [{math.sqrt(A):.2f}, {math.sqrt(B):.2f}]", "",
                  "| regularizer | " + " | ".join(f"{n} ({kinds[n]})" for n in names) + " |",
                  "| --- | " + " | ".join("---" for _ in names) + " |"]
        for reg in regs:
            L = s[st][reg]["layers"]
            lines.append(f"| {reg} | " + " | ".join(
                f"{L[n]['op_sigma_min']['mean']:.2g}–{L[n]['op_sigma_max']['mean']:.2f}" for n in names) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str, say) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say(f"matplotlib is not installed: the figure ({path}) is skipped; the JSON is still written")
        return False
    s, regs = result["summary"], result["config"]["regs"]
    settings = [k for k in SETTINGS if k in s]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    axes = axes.flatten()
    x = range(len(regs))
    width = 0.38
    ax = axes[0]
    for i, st in enumerate(settings):
        means = [s[st][r]["test_acc"]["mean"] for r in regs]
        lo = [m - s[st][r]["test_acc"]["min"] for m, r in zip(means, regs)]
        hi = [s[st][r]["test_acc"]["max"] - m for m, r in zip(means, regs)]
        ax.bar([j + (i - 0.5) * width for j in x], means, width, yerr=[lo, hi], capsize=3,
               label=f"{st} ({result['config']['n_train'][st]} train)")
        for j, r in enumerate(regs):
            if s[st][r]["diverged"]:
                ax.annotate(f"{s[st][r]['diverged']}/{s[st][r]['test_acc']['n']}\ndiverged",
                            (j + (i - 0.5) * width, means[j]), ha="center", va="bottom", fontsize=7)
    allacc = [s[st][r]["test_acc"]["min"] for st in settings for r in regs]
    ax.set_ylim(max(0.0, min(allacc) - 0.05), 1.0)
    ax.set_xticks(list(x), regs, rotation=30)
    ax.set_ylabel("test accuracy (bars: min..max over seeds)")
    ax.set_title("accuracy, mean over seeds")
    ax.legend(loc="lower right", fontsize=8)
    st0 = settings[0]
    names = list(s[st0][regs[0]]["layers"])
    kinds = {n: result["runs"][0]["layers"][n]["kind"] for n in names}
    for ax, pre, what in ((axes[1], "", "as_matrix(W)"), (axes[2], "op_", "operator on its input (exact)")):
        w = 0.8 / len(names)
        for k, name in enumerate(names):
            for j, r in enumerate(regs):
                L = s[st0][r]["layers"][name]
                ax.plot([j + (k - (len(names) - 1) / 2) * w] * 2,
                        [L[pre + "sigma_min"]["mean"], L[pre + "sigma_max"]["mean"]], lw=4, solid_capstyle="butt",
                        color=f"C{k}", label=f"layer {name} ({kinds[name]})" if j == 0 else None)
        ax.axhspan(math.sqrt(A), math.sqrt(B), color="0.85", zorder=0, label="[√A, √B]")
        ax.set_yscale("log")
        ax.set_xticks(list(x), regs, rotation=30)
        ax.set_ylabel("σ_min..σ_max per layer")
        ax.set_title(f"final σ of {what}, {st0} data, mean over seeds", fontsize=10)
    axes[1].legend(fontsize=7, ncol=2)
    ax = axes[3]
    for i, (key, label) in enumerate((("overhead", "medians over steps"), ("overhead_min", "minima over steps"))):
        ov = [100 * s[st0][r][key]["mean"] for r in regs]
        err = [100 * s[st0][r][key]["std"] for r in regs]
        ax.bar([j + (i - 0.5) * width for j in x], ov, width, yerr=err, capsize=3, color=f"C{i + 2}", label=label)
    ax.set_xticks(list(x), regs, rotation=30)
    ax.set_ylabel("penalty fwd+bwd / model step (%)")
    ax.set_title(f"step overhead, {st0} data ({result['config']['threads']} thread(s); bars: std over seeds)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle(f"digits 8×8, small CNN, {result['config']['steps']} steps, seeds "
                 f"{','.join(map(str, result['config']['seeds']))}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    say(f"figure: {path}")
    return True


def main(argv=None) -> dict:
    args = parse_args(argv)
    say = (lambda *a, **k: None) if args.quiet else print
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    lam = {r: (0.0 if r == "none" else DEFAULT_LAM[r]) for r in REGS}
    lam.update(dict(args.lam))
    steps_per_epoch = math.ceil(1437 / BATCH)
    steps = QUICK_STEPS if args.quick and args.epochs is None else (args.epochs or DEFAULT_EPOCHS) * steps_per_epoch
    data = make_settings(args.fraction)
    n_train = {k: len(v[1]) for k, v in data.items()}
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    config = {"regs": args.regs, "settings": list(SETTINGS), "seeds": args.seeds, "steps": steps,
              "epochs_full": steps / steps_per_epoch, "batch": BATCH, "lr": LR, "momentum": MOMENTUM,
              "A": A, "B": B, "lam": {r: lam[r] for r in args.regs}, "lam_source": "examples/train.py DEFAULT_LAM"
              + ("" if not args.lam else f", overridden: {dict(args.lam)}"), "fraction": args.fraction,
              "subset_seed": SUBSET_SEED, "n_train": n_train, "n_test": len(data["full"][3]), "quick": args.quick,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "cpus": os.cpu_count(), "loadavg_1min_at_start": load}
    say(f"frame experiment: {len(args.regs)} regularizers x {len(SETTINGS)} data settings "
        f"(train {n_train['full']} / {n_train['10pct']}, test {config['n_test']}) x seeds {args.seeds} | "
        f"{steps} steps, batch {BATCH} | {config['threads']} threads | lam {config['lam']}")
    warm_up(args.regs)
    runs = []
    hdr = f"{'setting':>7} {'seed':>4} {'reg':>13} {'test acc':>8} {'op sigma min..max':>19} {'overhead':>8} {'s':>5}"
    say(hdr)
    say("-" * len(hdr))
    for seed in args.seeds:
        for setting in SETTINGS:
            for reg in args.regs:
                r = {"setting": setting, **run_one(data[setting], reg, lam[reg], seed, steps)}
                runs.append(r)
                b = r["bounds"]
                say(f"{setting:>7} {seed:>4} {reg:>13} {r['test_acc']:>8.4f} "
                    f"{b['op_sigma_min']:>8.4f}..{b['op_sigma_max']:<8.3f} {100 * r['overhead']:>7.1f}% "
                    f"{r['wall_s']:>5.1f}")
    result = {"config": config, "runs": runs, "summary": summarize(runs)}
    result["wall_s"] = time.perf_counter() - t_start
    say("")
    say(to_markdown(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        say(f"json: {args.json}")
    if args.png:
        plot(result, args.png, say)
    say(f"wall time {result['wall_s']:.1f} s")
    return result


if __name__ == "__main__":
    main()
