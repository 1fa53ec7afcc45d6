"""What the paper-experiment scripts (examples/exp_adversarial.py, examples/exp_robustness.py) share:
examples/train.py loaded as a module, summaries over seeds, strict JSON, a stratified subset."""
from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent


def load_train():
    """examples/train.py as a module (examples/ is not a package; loaded by path, under its own name)."""
    name = "regkernels_example_train"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def stats(values) -> dict:
    """mean, sample std (0 for one value), min and max over the finite values, how many were not
    finite (a diverged run), and the values themselves (None where not finite)."""
    v = [float(x) for x in values]
    ok = [x for x in v if math.isfinite(x)]
    out = {"n": len(v), "nonfinite": len(v) - len(ok), "values": [x if math.isfinite(x) else None for x in v]}
    if not ok:
        return {"mean": None, "std": None, "min": None, "max": None, **out}
    mean = sum(ok) / len(ok)
    std = math.sqrt(sum((x - mean) ** 2 for x in ok) / (len(ok) - 1)) if len(ok) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(ok), "max": max(ok), **out}


def fmt(x, spec: str) -> str:
    """x formatted with spec, or "n/a" for None (every value was non-finite)."""
    return "n/a" if x is None else format(x, spec)


def finite_json(obj):
    """obj with every non-finite float replaced by None, so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def stratified_subset(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices: round(fraction · n_c) (at least 1) images of every class c, drawn with a fixed seed, sorted."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().squeeze(1)
        n = max(1, round(fraction * len(idx)))
        picks.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(picks).sort().values
