"""β-LASSO vs SGD on a fully-connected net: does the first layer become sparse and local?

    PYTHONPATH=. python examples/exp_beta_lasso.py             # full setting: 5 seeds + λ sweep, ~3 min
    PYTHONPATH=. python examples/exp_beta_lasso.py --quick     # a few steps, one seed (the test)

Issue 20, experiment 1: Neyshabur (2020, "Towards Learning Convolutions from Scratch") trains
S-FC, the fully-connected sibling of a shallow conv net, with β-LASSO and reports sparse
first-layer filters concentrated around one location (SGD's are dense), with better accuracy than
SGD at β = 0, 1 and 50. This script repeats that on scikit-learn's 8×8 digits, offline, with
``regkernels.optim.BetaLasso``.

Data: ``load_data`` of ``examples/train.py`` (1437 train / 360 test images, fixed split,
standardised), flattened to 64 inputs; pixel k is at (row, col) = (k // 8, k % 8).

Model, S-FC scaled to 8×8: Linear(64→256) → ReLU → Linear(256→64) → ReLU → Linear(64→10).
The paper's S-FC is its shallow conv net (one conv layer, then two fully-connected layers) with
the conv replaced by a dense layer with as many outputs: three weight layers, the first much wider
than the input. Here the first layer has as many units as a 16-channel conv at stride 2 on 8×8
would output, 16·4·4 = 256, 4× the input width: room for local filters to tile the image (4 units
per pixel) while W1 (16,384 weights) stays small enough for 20 runs in a few minutes on 2 cores.
The second hidden layer is 64 wide (a bottleneck before the 10 classes, much narrower than the
first, as in S-FC); the layers' weight counts are 16,384 / 16,384 / 640.

Training, the same for every optimizer (the reproduction's setting, scaled): no momentum, no
weight decay, batch 64 (23 steps per epoch), learning rate 0.1 annealed to 0 by a cosine over
all steps (``CosineAnnealingLR`` stepped per batch), ``--epochs`` epochs (default 150). SGD is
``torch.optim.SGD``; β-LASSO is ``BetaLasso(lr, lam, beta)`` at β = 0, 1, 50, applied to every
parameter (weights and biases). For one seed every optimizer starts from the same initial
weights and sees the same batches (paired runs).

λ (``--lam``, default 1e-3): chosen by the sweep the full setting runs after the main runs
(``--lam-sweep``, default λ ∈ {1e-4, 3e-4, 1e-3, 3e-3, 1e-2}, seed 0, every β; recorded in the
JSON under ``lam_sweep``): the largest λ at which β = 50 still trains to within about two points
of SGD's test accuracy while zeroing most first-layer weights. At 1e-4 and 3e-4 β = 50 keeps
~80 % / ~50 % of the first layer (little to see); at 3e-3 β = 0 and 1 lose about two points and
β = 50 zeroes every weight (chance accuracy); at 1e-2 nothing trains. The paper's
λ = 2e-5 (CIFAR-10, 400 epochs) zeroes almost nothing in our 3,450 steps: the total L1 shrinkage
a weight can receive, Σ lr·λ ≈ 0.05·3450·λ, must reach the size of the initial weights
(|w| ≤ 1/8 in the first layer) for sparsity to appear.

Recorded per epoch (epoch 0 = initialisation): test accuracy and the non-zero count of every
layer's weight and bias (counted with ``torch.count_nonzero``; for β-LASSO also checked against
the counts ``BetaLasso.nonzeros()`` made during the update, and a mismatch is an error). Non-zero
counts need not be monotone: a zeroed weight whose gradient step exceeds β·λ comes back.

Locality, at the end (and at initialisation): for each first-layer unit with weights w over the
64 pixels p = (row, col), its spread around its centroid, in pixels:
``c = Σ|w_p|·p / Σ|w_p|``, ``spread = sqrt(Σ|w_p|·‖p − c‖² / Σ|w_p|)``. Units whose weights are
all zero have no spread; they are left out and counted (``dead_units``). A unit with one non-zero
pixel has spread 0, so a sparse unit is "local" by this measure partly because it is sparse; the
reference numbers separate that from spatial arrangement:

- a uniform (dense) unit on the 8×8 grid: ``sqrt(2·(8² − 1)/12)`` = 3.24 px;
- a unit whose |w_p| is pixel p's standard deviation over the training images: what "weights
  only where the digits vary" gives (the digits leave the border empty);
- ``permuted``: each trained unit with its non-zero weights moved to as many random pixels
  (uniform over the 64; 20 draws): same sparsity and values, no arrangement;
- ``permuted_matched``: the same, with the pixels drawn in proportion to how many units of the
  layer use each pixel: also keeps the layer's pixel usage (the empty border), so the gap between
  a unit's spread and this null is locality in the unit's own arrangement.

For SGD and β = 0 (no exact zeros) both nulls are plain permutations. Summaries: mean and median
over the live units of a run, then mean and half-range ((max − min)/2) over seeds.

Outputs (``--quick``: ``beta_lasso-quick.*`` instead, so that it never overwrites the recorded
results): ``--json PATH`` (default benchmarks/results/experiments/beta_lasso.json): the
configuration, per run the per-epoch records and the spreads, and the summary over seeds;
``--png PATH`` (default beta_lasso.png next to it): first-layer filters of seed 0, 16 units per
optimizer (the same units in every row, so the same initial weights: the 16 lowest-index units
that are non-zero under every optimizer), the spread histograms and
the first layer's non-zero fraction per epoch. The figure needs matplotlib (``pip install
matplotlib`` or the ``plot`` extra); without it the script says so in one line and writes the
JSON. ``main(argv)`` returns the dict that the JSON holds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import N_TRAIN, SPLIT_SEED, load_data  # noqa: E402  (examples/train.py)

import regkernels  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "benchmarks", "results", "experiments")

SIDE = 8                       # digits are SIDE × SIDE
WIDTHS = (64, 256, 64, 10)     # S-FC scaled to 8×8 (module docstring)
LR = 0.1
LAM = 1e-3
LAM_SWEEP = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
BATCH = 64
EPOCHS = 150
BETAS = (0, 1, 50)
CONFIGS = (("sgd", None),) + tuple((f"beta{b}", b) for b in BETAS)
LABELS = {"sgd": "SGD", **{f"beta{b}": f"β-LASSO β={b}" for b in BETAS}}
LAYERS = ("fc1", "fc2", "fc3")
N_PERMUTATIONS = 20
QUICK = dict(epochs=2, steps_per_epoch=5, seeds=1)
MAX_SPREAD = SIDE * math.sqrt(2)   # loose bound for the sanity checks (the true maximum is 3.5·√2)


def build_model() -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model if isinstance(m, nn.Linear)]


def pixel_coords() -> torch.Tensor:
    """``(64, 2)`` float64: (row, col) of each flattened pixel."""
    k = torch.arange(SIDE * SIDE)
    return torch.stack([k // SIDE, k % SIDE], 1).to(torch.float64)


def spreads(w: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
    """Spread (px) of |w| around its centroid for every row of ``w`` (``(units, pixels)``); NaN for an all-zero row.

    ``coords``: ``(pixels, 2)`` positions of the columns (default: the 64 pixels of the 8×8 grid).
    """
    a = w.detach().abs().to(torch.float64)
    p = pixel_coords() if coords is None else coords
    mass = a.sum(1, keepdim=True)
    c = a @ p / mass                                           # (units, 2); NaN where mass == 0
    d2 = ((p.unsqueeze(0) - c.unsqueeze(1)) ** 2).sum(-1)      # (units, pixels)
    s = ((a * d2).sum(1, keepdim=True) / mass).sqrt().squeeze(1)
    return torch.where(mass.squeeze(1) > 0, s, torch.full_like(s, math.nan))


def permuted_spreads(w: torch.Tensor, gen: torch.Generator, matched: bool,
                     draws: int = N_PERMUTATIONS) -> torch.Tensor:
    """Each unit's spread with its non-zero weights moved to random pixels, mean of ``draws`` draws (NaN: dead unit).

    The same values on the same number of pixels, without their arrangement. ``matched=False``: the
    pixels are drawn uniformly from the 64. ``matched=True``: drawn (without replacement) with
    probability proportional to the number of the layer's units that use each pixel (non-zero
    weight), so that pixels the layer rarely uses (the digits' empty border) stay rarely used; for a
    dense layer (every unit uses every pixel) both are a plain permutation.
    """
    w = w.detach()
    nz = w != 0
    usage = nz.sum(0).to(torch.float64) if matched else torch.ones(w.shape[1], dtype=torch.float64)
    out = torch.zeros(w.shape[0], dtype=torch.float64)
    for _ in range(draws):
        moved = torch.zeros_like(w)
        for i in range(w.shape[0]):
            vals = w[i][nz[i]]
            k = len(vals)
            if k:
                pix = torch.multinomial(usage, k, replacement=False, generator=gen)
                moved[i, pix] = vals
        out += spreads(moved)
    return out / draws


def _round(x, digits: int = 5):
    """Floats of a JSON-ready structure rounded to ``digits`` significant digits (keeps the file small)."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else x
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    return x


def _f(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _summary(values: list[float]) -> dict:
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return {"n": 0, "mean": None, "median": None}   # every unit dead: no spread
    return {"n": len(v), "mean": statistics.fmean(v), "median": statistics.median(v)}


def _over_seeds(values: list[float]) -> dict:
    """mean, half-range ((max − min)/2), min, max over seeds (None values, e.g. no live unit, left out)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "half_range": None, "min": None, "max": None, "n_seeds": 0}
    return {"mean": statistics.fmean(values), "half_range": (max(values) - min(values)) / 2,
            "min": min(values), "max": max(values), "n_seeds": len(values)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['epochs']} epochs of {QUICK['steps_per_epoch']} steps, one seed (the test)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default 5; --quick: 1)")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs (default {EPOCHS}; --quick: {QUICK['epochs']})")
    p.add_argument("--lam", type=float, default=LAM, help=f"β-LASSO's λ (default {LAM:g})")
    p.add_argument("--lam-sweep", default=None, metavar="L1,L2,...",
                   help="also train β-LASSO (every β, seed 0) at each of these λ and record it, or 'none' "
                        f"(default {','.join(f'{v:g}' for v in LAM_SWEEP)}; --quick: none)")
    p.add_argument("--lr", type=float, default=LR,
                   help=f"initial learning rate, cosine-annealed to 0 (default {LR})")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="where to write the results ('': nowhere; default benchmarks/results/experiments/"
                        "beta_lasso.json, with --quick beta_lasso-quick.json)")
    p.add_argument("--png", default=None, metavar="PATH",
                   help="where to write the figure (default: the --json default with .png)")
    p.add_argument("--no-png", action="store_true", help="do not draw the figure")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    args = p.parse_args(argv)
    for name in ("seeds", "epochs", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name} must be >= 1; got {v}")
    for name in ("lam", "lr"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v > 0):
            p.error(f"--{name} must be a finite number > 0; got {v}")
    # a --quick run never overwrites the full setting's recorded results
    suffix = "-quick" if args.quick else ""
    if args.json is None:
        args.json = os.path.join(OUT_DIR, f"beta_lasso{suffix}.json")
    if args.png is None:
        args.png = os.path.join(OUT_DIR, f"beta_lasso{suffix}.png")
    if args.lam_sweep is None:
        args.lam_sweep = [] if args.quick else list(LAM_SWEEP)
    elif args.lam_sweep.strip().lower() == "none":
        args.lam_sweep = []
    else:
        try:
            lams = [float(v) for v in args.lam_sweep.split(",")]
        except ValueError:
            p.error(f"--lam-sweep takes comma-separated numbers or 'none'; got {args.lam_sweep!r}")
        bad = [v for v in lams if not (math.isfinite(v) and v > 0)]
        if bad:
            p.error(f"--lam-sweep values must be finite numbers > 0; got {bad}")
        args.lam_sweep = lams
    args.steps_per_epoch = QUICK["steps_per_epoch"] if args.quick else None
    if args.seeds is None:
        args.seeds = QUICK["seeds"] if args.quick else 5
    if args.epochs is None:
        args.epochs = QUICK["epochs"] if args.quick else EPOCHS
    return args


def _counts(model: nn.Module) -> dict:
    return {name: {"weight": int(torch.count_nonzero(m.weight)), "bias": int(torch.count_nonzero(m.bias))}
            for name, m in zip(LAYERS, linear_layers(model))}


def _check_counts(opt: regkernels.optim.BetaLasso, counts: dict) -> None:
    """The optimizer's own counts (made by the fused update) must equal torch.count_nonzero's."""
    theirs = [n for group in opt.nonzeros() for n in group]
    ours = [c[k] for c in counts.values() for k in ("weight", "bias")]
    if theirs != ours:
        raise RuntimeError(f"BetaLasso.nonzeros() {theirs} disagrees with torch.count_nonzero {ours}")


def run_one(config: str, beta, seed: int, data, args, lam: float) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = build_model()
    params = list(model.parameters())
    if beta is None:
        opt = torch.optim.SGD(params, lr=args.lr)
    else:
        opt = regkernels.optim.BetaLasso(params, lr=args.lr, lam=lam, beta=beta)
    n_batches = math.ceil(len(y_train) / BATCH)
    steps = n_batches if args.steps_per_epoch is None else min(n_batches, args.steps_per_epoch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps, eta_min=0.0)
    batch_gen = torch.Generator().manual_seed(seed)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            return (model(x_test).argmax(1) == y_test).double().mean().item()

    w0 = linear_layers(model)[0].weight.detach().clone()
    records = [{"epoch": 0, "test_acc": _round(evaluate(), 6), "loss": None, "nonzeros": _counts(model)}]
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(y_train), generator=batch_gen)
        loss_sum = 0.0
        for step in range(steps):
            idx = order[step * BATCH:(step + 1) * BATCH]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            raise RuntimeError(f"{config} seed {seed}: the training loss is not finite at epoch {epoch}")
        counts = _counts(model)
        if beta is not None:
            _check_counts(opt, counts)
        records.append({"epoch": epoch, "test_acc": _round(evaluate(), 6), "loss": _round(loss_sum / steps),
                        "nonzeros": counts})
    wall = time.perf_counter() - t0

    w1 = linear_layers(model)[0].weight.detach()
    s_final = spreads(w1)
    s_init = spreads(w0)
    s_perm = permuted_spreads(w1, torch.Generator().manual_seed(1000 + seed), matched=False)
    s_match = permuted_spreads(w1, torch.Generator().manual_seed(2000 + seed), matched=True)
    weight_counts = [[e["nonzeros"][k]["weight"] for e in records] for k in LAYERS]
    increases = {k: sum(b > a for a, b in zip(c, c[1:])) for k, c in zip(LAYERS, weight_counts)}
    finite = lambda t: _round([float(v) for v in t if math.isfinite(v)])  # noqa: E731
    return {
        "config": config, "beta": beta, "lam": None if beta is None else lam, "seed": seed, "wall_s": wall,
        "steps_per_epoch": steps,
        "epochs": records,
        "final_test_acc": records[-1]["test_acc"],
        "spread": {"final": finite(s_final), "init": finite(s_init),
                   "permuted": finite(s_perm), "permuted_matched": finite(s_match),
                   "single_pixel_units": int(((w1 != 0).sum(1) == 1).sum()),
                   "dead_units": int(torch.isnan(s_final).sum()),
                   "final_summary": _summary(finite(s_final)), "init_summary": _summary(finite(s_init)),
                   "permuted_summary": _summary(finite(s_perm)),
                   "permuted_matched_summary": _summary(finite(s_match))},
        "nonzero_count_increases": increases,
        "_w1": w1.clone() if seed == 0 else None,   # for the figure's units; not written
    }


def references(x_train: torch.Tensor) -> dict:
    uniform = float(spreads(torch.ones(1, SIDE * SIDE))[0])
    pixel_std = x_train.reshape(len(x_train), -1).to(torch.float64).std(0)
    return {"uniform_dense_px": uniform,
            "uniform_dense_formula": "sqrt(2*(8^2-1)/12)",
            "pixel_std_weighted_px": float(spreads(pixel_std.unsqueeze(0))[0])}


def summarize(runs: list[dict], sizes: dict) -> dict:
    out = {}
    for config, _ in CONFIGS:
        rs = [r for r in runs if r["config"] == config]
        if not rs:
            continue
        nz = {}
        for layer in LAYERS:
            for kind in ("weight", "bias"):
                fr = [r["epochs"][-1]["nonzeros"][layer][kind] / sizes[layer][kind] for r in rs]
                nz[f"{layer}.{kind}"] = _over_seeds(fr)
        out[config] = {
            "label": LABELS[config],
            "test_acc": _over_seeds([r["final_test_acc"] for r in rs]),
            "best_epoch_test_acc": _over_seeds([max(e["test_acc"] for e in r["epochs"]) for r in rs]),
            "nonzero_frac_final": nz,
            "spread_mean": _over_seeds([r["spread"]["final_summary"]["mean"] for r in rs]),
            "spread_median": _over_seeds([r["spread"]["final_summary"]["median"] for r in rs]),
            "spread_permuted_mean": _over_seeds([r["spread"]["permuted_summary"]["mean"] for r in rs]),
            "spread_permuted_median": _over_seeds([r["spread"]["permuted_summary"]["median"] for r in rs]),
            "spread_permuted_matched_mean": _over_seeds(
                [r["spread"]["permuted_matched_summary"]["mean"] for r in rs]),
            "spread_permuted_matched_median": _over_seeds(
                [r["spread"]["permuted_matched_summary"]["median"] for r in rs]),
            "single_pixel_units": _over_seeds([r["spread"]["single_pixel_units"] for r in rs]),
            "runs_with_nonzero_count_increase": {k: sum(r["nonzero_count_increases"][k] > 0 for r in rs)
                                                 for k in LAYERS},
            "spread_init_mean": _over_seeds([r["spread"]["init_summary"]["mean"] for r in rs]),
            "dead_units": _over_seeds([r["spread"]["dead_units"] for r in rs]),
            "wall_s": _over_seeds([r["wall_s"] for r in rs]),
        }
    return out


def figure_units(runs: list[dict], n_show: int = 16) -> dict:
    """Seed 0's first-layer filters of ``n_show`` units, the same units for every optimizer (same
    initial weights): the lowest-index units that are non-zero under every optimizer (then any)."""
    w = {r["config"]: r["_w1"] for r in runs if r["seed"] == 0}
    live = torch.stack([(x != 0).any(1) for x in w.values()]).all(0)
    units = torch.nonzero(live).flatten()[:n_show].tolist()
    units += [j for j in range(live.numel()) if j not in units][:n_show - len(units)]
    return {"units": units, "weights": {c: _round(x[units].tolist(), 4) for c, x in w.items()}}


def plot(result: dict, path: str, say) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: the figure is skipped (pip install matplotlib, or the 'plot' extra)")
        return False
    runs0 = {r["config"]: r for r in result["runs"] if r["seed"] == 0}
    configs = [c for c, _ in CONFIGS if c in runs0]
    units = result["figure"]["units"]
    weights = {c: torch.tensor(result["figure"]["weights"][c]) for c in configs}
    n_show = len(units)
    fig = plt.figure(figsize=(16, 1.15 * len(configs) + 3.9))
    gs = fig.add_gridspec(len(configs) + 1, n_show, height_ratios=[1] * len(configs) + [2.6],
                          hspace=0.3, wspace=0.06)
    for row, config in enumerate(configs):
        w = weights[config]
        for j in range(len(units)):
            ax = fig.add_subplot(gs[row, j])
            img = w[j].reshape(SIDE, SIDE)
            vmax = float(img.abs().max()) or 1.0
            ax.imshow(img.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(LABELS[config], fontsize=9)
            nz = int(torch.count_nonzero(w[j]))
            ax.set_title(f"u{units[j]}: {nz} nz", fontsize=7)
    bottom = gs[len(configs), :].subgridspec(1, 2, wspace=0.25)
    ax = fig.add_subplot(bottom[0, 0])
    bins = [i * 0.1 for i in range(0, 46)]
    for config in configs:
        vals = [v for r in result["runs"] if r["config"] == config for v in r["spread"]["final"]]
        ax.hist(vals, bins=bins, histtype="step", density=True, label=LABELS[config])
    refs = result["references"]
    ax.axvline(refs["uniform_dense_px"], color="k", ls="--", lw=1, label="uniform dense unit")
    ax.axvline(refs["pixel_std_weighted_px"], color="gray", ls=":", lw=1, label="|w| = pixel std")
    ax.set_xlabel("spread of |w| around its centroid (px), live first-layer units, all seeds")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(bottom[0, 1])
    size = result["sizes"]["fc1"]["weight"]
    for config in configs:
        r = runs0[config]
        ax.plot([e["epoch"] for e in r["epochs"]], [e["nonzeros"]["fc1"]["weight"] / size for e in r["epochs"]],
                label=LABELS[config])
    ax.set_xlabel("epoch")
    ax.set_ylabel("first-layer weights non-zero (fraction)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(f"S-FC {'-'.join(map(str, WIDTHS))} on 8x8 digits, {cfg['epochs']} epochs, λ = {cfg['lam']:g}: "
                 f"first-layer filters of seed 0 (units live in every row; nz = non-zero weights; colour scale "
                 f"per filter, white = 0)", fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return True


def _line(r: dict, sizes: dict) -> str:
    last = r["epochs"][-1]["nonzeros"]
    sp = r["spread"]
    return (f"{LABELS[r['config']]:<15} acc {r['final_test_acc']:.4f} | non-zero "
            + " ".join(f"{k} {last[k]['weight'] / sizes[k]['weight']:.3f}" for k in LAYERS)
            + f" | spread mean {_f(sp['final_summary']['mean'])} median {_f(sp['final_summary']['median'])} px"
            + f" (permuted {_f(sp['permuted_summary']['mean'])},"
            + f" matched {_f(sp['permuted_matched_summary']['mean'])})"
            + f", dead {sp['dead_units']} | {r['wall_s']:.1f} s")


def lam_sweep(lams: list[float], data, args, sizes: dict, say, done: list[dict]) -> list[dict]:
    """β-LASSO at every β for each λ, seed 0 (how the default λ was chosen); SGD does not depend on λ.

    A (λ, β) that the main runs already trained at seed 0 (``done``) is taken from them (the runs are
    deterministic: training it again gives the same numbers).
    """
    rows = []
    for lam in lams:
        for config, beta in CONFIGS[1:]:
            r = next((d for d in done if d["seed"] == 0 and d["config"] == config and d["lam"] == lam), None)
            reused = r is not None
            if not reused:
                r = run_one(config, beta, 0, data, args, lam)
            say(f"  lam {lam:<7g} " + _line(r, sizes) + (" (main run)" if reused else ""))
            sp = r["spread"]
            rows.append({"lam": lam, "config": config, "beta": beta, "final_test_acc": r["final_test_acc"],
                         "nonzero_frac_final": {k: r["epochs"][-1]["nonzeros"][k]["weight"] / sizes[k]["weight"]
                                                for k in LAYERS},
                         "spread_mean": sp["final_summary"]["mean"], "spread_median": sp["final_summary"]["median"],
                         "spread_permuted_matched_mean": sp["permuted_matched_summary"]["mean"],
                         "dead_units": sp["dead_units"], "from_main_run": reused})
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    say = (lambda *a, **k: None) if args.quiet else print
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_data(torch.device("cpu"))
    x_train, y_train, x_test, y_test = data
    data = (x_train.flatten(1), y_train, x_test.flatten(1), y_test)
    sizes = {name: {"weight": m.weight.numel(), "bias": m.bias.numel()}
             for name, m in zip(LAYERS, linear_layers(build_model()))}
    refs = references(data[0])
    say(f"digits 8x8: {len(y_train)} train / {len(y_test)} test | S-FC {'-'.join(map(str, WIDTHS))} | "
        f"{args.epochs} epochs x {args.steps_per_epoch or math.ceil(len(y_train) / BATCH)} steps, batch {BATCH}, "
        f"lr {args.lr:g} cosine | lam {args.lam:g} | {args.seeds} seed(s) | {torch.get_num_threads()} thread(s)")
    say(f"reference spreads: uniform dense unit {refs['uniform_dense_px']:.3f} px, "
        f"|w| = pixel std {refs['pixel_std_weighted_px']:.3f} px")
    t0 = time.perf_counter()
    runs = []
    for seed in range(args.seeds):
        for config, beta in CONFIGS:
            r = run_one(config, beta, seed, data, args, args.lam)
            runs.append(r)
            say(f"seed {seed} " + _line(r, sizes))
    wall = time.perf_counter() - t0
    sweep = []
    if args.lam_sweep:
        say(f"lam sweep (seed 0, {args.epochs} epochs):")
        t1 = time.perf_counter()
        sweep = lam_sweep(args.lam_sweep, data, args, sizes, say, runs)
        say(f"lam sweep wall {time.perf_counter() - t1:.1f} s")
    figure = figure_units(runs)
    for r in runs:
        del r["_w1"]
    result = {
        "experiment": "issue 20 exp 1: beta-LASSO vs SGD on an S-FC MLP, 8x8 digits",
        "config": {"widths": list(WIDTHS), "lr": args.lr, "schedule": "cosine per step to 0", "momentum": 0.0,
                   "batch": BATCH, "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch
                   or math.ceil(len(y_train) / BATCH), "lam": args.lam, "lam_sweep": args.lam_sweep,
                   "betas": list(BETAS),
                   "seeds": list(range(args.seeds)), "quick": args.quick, "threads": torch.get_num_threads(),
                   "n_train": N_TRAIN, "n_test": len(y_test), "split_seed": SPLIT_SEED,
                   "torch": torch.__version__, "permutation_draws": N_PERMUTATIONS},
        "sizes": sizes,
        "references": refs,
        "wall_s": wall,
        "runs": runs,
        "lam_sweep": sweep,
        "figure": figure,
        "total_wall_s": time.perf_counter() - t0,
    }
    result["summary"] = summarize(runs, sizes)
    say(f"summary over {args.seeds} seed(s), mean ± half-range; wall {wall:.1f} s for these runs"
        + (f", {result['total_wall_s']:.1f} s with the λ sweep" if sweep else ""))
    for config, sm in result["summary"].items():
        say(f"  {sm['label']:<15} acc {sm['test_acc']['mean']:.4f} ± {sm['test_acc']['half_range']:.4f} | "
            f"fc1 non-zero {sm['nonzero_frac_final']['fc1.weight']['mean']:.3f} | spread mean "
            f"{_f(sm['spread_mean']['mean'])} median {_f(sm['spread_median']['mean'])} px "
            f"(random pixels {_f(sm['spread_permuted_mean']['mean'])}, usage-matched "
            f"{_f(sm['spread_permuted_matched_mean']['mean'])})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, allow_nan=False, separators=(",", ":"))
        say(f"wrote {args.json}")
    if not args.no_png and args.png and plot(result, args.png, say):
        say(f"wrote {args.png}")
    return result


if __name__ == "__main__":
    main()
