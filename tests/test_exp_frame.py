"""examples/exp_frame.py (issue 20, experiment 2): the --quick run writes a JSON of sane structure.

The script is loaded from its path (examples/ is not a package); it needs scikit-learn's digits
(bundled, no download), so the tests skip without scikit-learn. matplotlib is optional: without
it the figure is skipped with one printed line and the JSON is still written.
"""
import importlib.util
import json
import math
import pathlib

import pytest

pytest.importorskip("sklearn")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "exp_frame.py"
REGS = {"none", "frame", "conv_frame", "orthogonality", "srip", "mhe", "ocnn"}
LAYER_KEYS = {"sigma_min", "sigma_max", "gershgorin_lo", "gershgorin_hi", "op_sigma_min", "op_sigma_max",
              "op_gershgorin_lo", "op_gershgorin_hi", "op_sigma_max_power", "op_bound_any_size"}


@pytest.fixture(scope="module")
def exp():
    spec = importlib.util.spec_from_file_location("regkernels_example_exp_frame", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(exp, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp_frame")
    paths = {"json": tmp / "frame.json", "png": tmp / "frame.png"}
    result = exp.main(["--quick", "--threads", "1", "--json", str(paths["json"]), "--png", str(paths["png"])])
    return result, paths


def test_quick_structure(exp, quick):
    result, paths = quick
    assert set(exp.REGS) == REGS
    data = json.loads(paths["json"].read_text())
    assert set(data) >= {"config", "runs", "summary", "wall_s"}
    cfg = data["config"]
    assert cfg["quick"] and cfg["seeds"] == [0] and cfg["steps"] == exp.QUICK_STEPS
    assert set(cfg["regs"]) == REGS and cfg["lam"]["none"] == 0
    assert "DEFAULT_LAM" in cfg["lam_source"]
    n = cfg["n_train"]
    assert n["full"] == 1437 and 130 <= n["10pct"] <= 160
    assert {(r["setting"], r["reg"]) for r in data["runs"]} == {(s, g) for s in exp.SETTINGS for g in REGS}
    assert set(data["summary"]) == set(exp.SETTINGS)
    for setting in exp.SETTINGS:
        assert set(data["summary"][setting]) == REGS
        for reg, s in data["summary"][setting].items():
            assert s["test_acc"]["n"] == 1 and s["test_acc"]["std"] == 0
    if paths["png"].exists():
        assert paths["png"].stat().st_size > 1000
    assert result["config"] == cfg  # main returns what it wrote


def test_quick_sanity(quick):
    result, _ = quick
    for r in result["runs"]:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["train_acc"] <= 1.0
        assert r["steps"] == 4 and math.isfinite(r["final_loss"]) and r["final_loss"] > 0
        assert r["model_ms_median"] > 0 and r["reg_ms_median"] >= 0 and r["overhead"] >= 0
        if r["reg"] == "none":
            assert r["reg_ms_median"] < 0.5 and r["final_penalty"] == 0
        else:
            assert r["reg_ms_median"] > 0 and r["final_penalty"] > 0, r["reg"]
        assert len(r["layers"]) == 5
        for name, lay in r["layers"].items():
            assert LAYER_KEYS <= set(lay), name
            assert 0 <= lay["sigma_min"] <= lay["sigma_max"] < math.inf
            assert 0 <= lay["op_sigma_min"] <= lay["op_sigma_max"] < math.inf
            assert lay["gershgorin_lo"] <= lay["gershgorin_hi"] and lay["op_gershgorin_lo"] <= lay["op_gershgorin_hi"]
            # Gershgorin bounds contain the squared singular values; the power estimate is at most
            # the exact σ_max and the certified bound at least it
            tol = 1e-3 * (1 + lay["op_sigma_max"] ** 2)
            assert lay["op_gershgorin_lo"] - tol <= lay["op_sigma_min"] ** 2
            assert lay["op_sigma_max"] ** 2 <= lay["op_gershgorin_hi"] + tol
            assert lay["op_sigma_max_power"] <= lay["op_sigma_max"] * (1 + 1e-3)
            assert lay["op_sigma_max"] <= lay["op_bound_any_size"] * (1 + 1e-3)
            if lay["kind"] == "linear":  # a Linear's operator is its matrix
                assert lay["op_sigma_max"] == pytest.approx(lay["sigma_max"], rel=1e-3)
        b = r["bounds"]
        assert b["op_sigma_min"] <= b["op_sigma_max"] and b["sigma_min"] <= b["sigma_max"]
        assert r["lipschitz_estimate"] <= r["lipschitz_bound"] * (1 + 1e-3)
    for setting in result["summary"].values():
        for s in setting.values():
            a = s["test_acc"]
            assert 0 <= a["min"] <= a["mean"] <= a["max"] <= 1


def test_markdown_table(exp, quick):
    md = exp.to_markdown(quick[0])
    for reg in REGS:
        assert f"| {reg} |" in md
    assert "Per layer (full data)" in md and "Per layer (10pct data)" in md


def test_figure_or_skip_line(quick, capsys, exp, tmp_path):
    # the figure is written when matplotlib is importable, else one line says it is skipped
    result, _ = quick
    png = tmp_path / "f.png"
    made = exp.plot(result, str(png), print)
    out = capsys.readouterr().out
    if made:
        assert png.exists() and png.stat().st_size > 1000
    else:
        assert not png.exists() and "figure" in out and "skipped" in out and out.count("\n") == 1


def test_stratified_subset(exp):
    import torch

    y = torch.arange(10).repeat_interleave(torch.tensor([140, 150, 141, 146, 148, 142, 143, 145, 138, 144]))
    a, b = exp.stratified_subset(y, 0.1), exp.stratified_subset(y, 0.1)
    assert torch.equal(a, b)  # fixed
    counts = torch.bincount(y[a], minlength=10)
    assert all(abs(c - 0.1 * n) <= 0.5 for c, n in zip(counts.tolist(), torch.bincount(y).tolist()))
    assert len(set(a.tolist())) == len(a)


@pytest.mark.parametrize("argv, needle", [
    (["--seeds", "a,b"], "--seeds"),
    (["--seeds", "0,0"], "--seeds"),
    (["--seeds", "-1"], "--seeds"),
    (["--epochs", "0"], "--epochs"),
    (["--threads", "0"], "--threads"),
    (["--fraction", "0"], "--fraction"),
    (["--fraction", "1.5"], "--fraction"),
    (["--regs", "frame,nope"], "--regs"),
    (["--lam", "frame"], "--lam"),
    (["--lam", "frame=-1"], "--lam"),
    (["--lam", "none=1"], "--lam"),
    (["--lam", "frame=nan"], "--lam"),
])
def test_bad_cli_values(exp, argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        exp.parse_args(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_lam_override_and_defaults(exp):
    args = exp.parse_args(["--lam", "frame=0.3", "--regs", "none,frame", "--seeds", "4,5"])
    assert dict(args.lam) == {"frame": 0.3} and args.regs == ["none", "frame"] and args.seeds == [4, 5]
    assert exp.parse_args(["--quick"]).seeds == [0] and exp.parse_args([]).seeds == [0, 1, 2]
