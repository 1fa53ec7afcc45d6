"""examples/exp_beta_lasso.py (issue 20, experiment 1): the quick run's output is complete and sane,
the locality measure is right on units whose spread is known, bad CLI values are refused.

The script is loaded from its path (examples/ is not a package). It needs scikit-learn's digits
(bundled, no download): the tests skip without scikit-learn. matplotlib is optional: without it
the script prints one line and skips the figure.
"""
import importlib.util
import json
import math
import pathlib

import pytest
import torch

pytest.importorskip("sklearn")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "exp_beta_lasso.py"
CONFIGS = ("sgd", "beta0", "beta1", "beta50")
LAYERS = ("fc1", "fc2", "fc3")
MAX_SPREAD = 8 * math.sqrt(2)


@pytest.fixture(scope="module")
def exp():
    spec = importlib.util.spec_from_file_location("regkernels_exp_beta_lasso", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(exp, tmp_path_factory):
    path = tmp_path_factory.mktemp("exp") / "beta_lasso.json"
    result = exp.main(["--quick", "--json", str(path), "--no-png", "--threads", "1", "--quiet"])
    return result, path


def _strict_load(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_json_written_and_equal_to_return_value(quick):
    result, path = quick
    on_disk = _strict_load(path)          # no NaN / Infinity in the file
    assert on_disk == json.loads(json.dumps(result))


def test_structure(quick, exp):
    result, _ = quick
    assert {"config", "sizes", "references", "runs", "summary", "lam_sweep", "wall_s"} <= set(result)
    cfg = result["config"]
    assert cfg["quick"] and cfg["seeds"] == [0] and cfg["betas"] == [0, 1, 50]
    assert cfg["widths"][0] == 64 and cfg["widths"][-1] == 10
    assert result["lam_sweep"] == []      # --quick runs no sweep
    assert result["sizes"] == {"fc1": {"weight": 64 * 256, "bias": 256}, "fc2": {"weight": 256 * 64, "bias": 64},
                               "fc3": {"weight": 64 * 10, "bias": 10}}
    assert [r["config"] for r in result["runs"]] == list(CONFIGS)
    assert set(result["summary"]) == set(CONFIGS)
    for sm in result["summary"].values():
        assert {"test_acc", "nonzero_frac_final", "spread_mean", "spread_median", "spread_permuted_mean",
                "spread_permuted_matched_mean", "dead_units"} <= set(sm)
        assert set(sm["nonzero_frac_final"]) == {f"{k}.{t}" for k in LAYERS for t in ("weight", "bias")}


def test_per_epoch_records(quick):
    result, _ = quick
    sizes = result["sizes"]
    n_epochs = result["config"]["epochs"]
    for r in result["runs"]:
        epochs = r["epochs"]
        assert [e["epoch"] for e in epochs] == list(range(n_epochs + 1))
        assert epochs[0]["loss"] is None
        for e in epochs:
            assert 0.0 <= e["test_acc"] <= 1.0
            assert e["loss"] is None or (math.isfinite(e["loss"]) and e["loss"] > 0)
            for k in LAYERS:
                for t in ("weight", "bias"):
                    assert 0 <= e["nonzeros"][k][t] <= sizes[k][t]
        # every optimizer starts from the same dense initialisation (same seed)
        assert epochs[0]["nonzeros"] == sizes
        # the recorded count of increases matches the records
        for k in LAYERS:
            c = [e["nonzeros"][k]["weight"] for e in epochs]
            assert r["nonzero_count_increases"][k] == sum(b > a for a, b in zip(c, c[1:]))
    by = {r["config"]: r for r in result["runs"]}
    # plain SGD zeroes nothing: its counts stay at the layer sizes
    assert all(e["nonzeros"] == sizes for e in by["sgd"]["epochs"])
    # β = 50 thresholds at 50·λ: sparsity appears within the quick run, in every layer
    last = by["beta50"]["epochs"][-1]["nonzeros"]
    assert all(last[k]["weight"] < sizes[k]["weight"] for k in LAYERS)
    assert by["beta0"]["beta"] == 0 and by["beta50"]["beta"] == 50 and by["sgd"]["beta"] is None


def test_locality_numbers(quick):
    result, _ = quick
    refs = result["references"]
    assert refs["uniform_dense_px"] == pytest.approx(math.sqrt(2 * (8 ** 2 - 1) / 12), rel=1e-12)
    assert 0 < refs["pixel_std_weighted_px"] < refs["uniform_dense_px"]
    for r in result["runs"]:
        sp = r["spread"]
        live = 256 - sp["dead_units"]
        assert len(sp["final"]) == live and len(sp["permuted"]) == live and len(sp["permuted_matched"]) == live
        assert len(sp["init"]) == 256
        for key in ("final", "init", "permuted", "permuted_matched"):
            assert all(math.isfinite(v) and 0 <= v <= MAX_SPREAD for v in sp[key]), key
        if live:
            assert sp["final_summary"]["mean"] == pytest.approx(sum(sp["final"]) / live)
            assert min(sp["final"]) <= sp["final_summary"]["median"] <= max(sp["final"])
        # a random dense init is close to the uniform unit's spread
        assert abs(sp["init_summary"]["mean"] - refs["uniform_dense_px"]) < 0.3
    # the figure's filters: 16 units of seed 0, the same units for every optimizer
    fig = result["figure"]
    assert len(fig["units"]) == 16 == len(set(fig["units"])) and all(0 <= u < 256 for u in fig["units"])
    assert set(fig["weights"]) == set(CONFIGS)
    assert all(len(w) == 16 and all(len(row) == 64 for row in w) for w in fig["weights"].values())


def test_spread_on_known_units(exp):
    w = torch.zeros(5, 64)
    w[0, 27] = -3.0                                   # one pixel: spread 0
    w[1, 0], w[1, 7] = 1.0, -1.0                      # (0,0) and (0,7), equal |w|: 3.5 px
    w[2] = 1.0                                        # uniform: sqrt(2·63/12)
    w[3, 0], w[3, 63] = 2.0, 2.0                      # opposite corners: half the diagonal, 3.5·√2
    s = exp.spreads(w)
    assert s[0] == 0
    assert s[1] == pytest.approx(3.5)
    assert s[2] == pytest.approx(math.sqrt(10.5))
    assert s[3] == pytest.approx(3.5 * math.sqrt(2))
    assert math.isnan(s[4])                            # all-zero unit: no spread
    # the nulls keep a unit's number of pixels: a one-pixel unit stays at 0, a dead unit stays NaN,
    # and a uniform unit is the same under any permutation
    gen = torch.Generator().manual_seed(0)
    for matched in (False, True):
        p = exp.permuted_spreads(w, gen, matched=matched, draws=3)
        assert p[0] == 0 and math.isnan(p[4]) and p[2] == pytest.approx(math.sqrt(10.5))


def test_bad_cli_values_are_refused(exp, capsys):
    for argv in (["--seeds", "0"], ["--epochs", "0"], ["--threads", "-1"], ["--lam", "nan"], ["--lam", "-1e-3"],
                 ["--lam", "0"], ["--lr", "inf"], ["--lam-sweep", "1e-3,abc"], ["--lam-sweep", "1e-3,-1"]):
        with pytest.raises(SystemExit) as e:
            exp.parse_args(argv)
        assert e.value.code == 2, argv
    quick = exp.parse_args(["--quick"])
    assert quick.lam_sweep == []
    # a quick run never overwrites the recorded full-setting results
    assert quick.json.endswith("beta_lasso-quick.json") and quick.png.endswith("beta_lasso-quick.png")
    full = exp.parse_args([])
    assert full.json.endswith("beta_lasso.json") and full.png.endswith("beta_lasso.png")
    assert exp.parse_args(["--lam-sweep", "none"]).lam_sweep == []
    assert exp.parse_args(["--lam-sweep", "1e-4,1e-3"]).lam_sweep == [1e-4, 1e-3]


def test_figure_or_one_line_without_matplotlib(exp, tmp_path, capsys):
    png = tmp_path / "fig.png"
    exp.main(["--quick", "--json", "", "--png", str(png), "--threads", "1"])
    out = capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists()
        lines = [ln for ln in out.splitlines() if "matplotlib" in ln]
        assert len(lines) == 1 and "skipped" in lines[0] and "pip install matplotlib" in lines[0]
    else:
        assert png.exists() and png.stat().st_size > 0


def test_lam_sweep_reuses_the_main_runs(exp, quick):
    result, _ = quick
    lam = result["config"]["lam"]
    out = exp.main(["--quick", "--json", "", "--no-png", "--threads", "1", "--quiet",
                    "--lam-sweep", f"{lam!r},{3 * lam!r}"])
    rows = out["lam_sweep"]
    assert [(r["lam"], r["config"]) for r in rows] == [(v, c) for v in (lam, 3 * lam) for c in CONFIGS[1:]]
    assert [r["from_main_run"] for r in rows] == [True] * 3 + [False] * 3
    main = {r["config"]: r for r in out["runs"]}
    for r in rows[:3]:        # taken from the main runs: the same numbers
        assert r["final_test_acc"] == main[r["config"]]["final_test_acc"]
        assert r["dead_units"] == main[r["config"]]["spread"]["dead_units"]
    # a larger λ zeroes at least as much at β = 50 in this deterministic quick run
    assert rows[5]["nonzero_frac_final"]["fc1"] <= rows[2]["nonzero_frac_final"]["fc1"]
    # the quick runs are deterministic: the main runs equal the fixture's
    assert [r["final_test_acc"] for r in out["runs"]] == [r["final_test_acc"] for r in result["runs"]]
