"""examples/exp_adversarial.py (issue 20, experiment 4): the --quick setting runs end to end and
writes a well-formed result; bad CLI values are refused.

The script is loaded from its path (examples/ is not a package). It needs scikit-learn's digits
(bundled with scikit-learn, no download): the tests skip without scikit-learn. The figure is
written only when matplotlib is installed; the suite does not need it.
"""
import importlib.util
import json
import math
import pathlib

import pytest

pytest.importorskip("sklearn")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "exp_adversarial.py"


@pytest.fixture(scope="module")
def exp():
    spec = importlib.util.spec_from_file_location("regkernels_exp_adversarial", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(exp, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp_adversarial")
    json_path, png_path = out / "adv.json", out / "adv.png"
    result = exp.main(["--quick", "--threads", "1", "--quiet", "--json", str(json_path), "--png", str(png_path)])
    return result, json_path, png_path


def test_quick_structure(exp, quick):
    result, json_path, png_path = quick
    on_disk = json.loads(json_path.read_text())
    assert on_disk["summary"].keys() == result["summary"].keys() == set(exp.SETTINGS)
    cfg = result["config"]
    assert cfg["quick"] and cfg["seeds"] == 1 and cfg["lam"] == exp.T.DEFAULT_LAM["adversarial"]
    assert cfg["n_test"] == 360 and cfg["n_train_full"] == 1437
    # a stratified 5 % subset: every one of the 10 classes, about 72 images
    assert 60 <= cfg["subset_size"] <= 80
    assert len(result["runs"]) == len(exp.SETTINGS) * cfg["seeds"]
    assert result["bank"]["harvested_size"] == 16 * 1 + 32 * 16 + 32 * 32
    for run in result["runs"]:
        assert 0.0 <= run["test_acc"] <= 1.0 and 0.0 <= run["train_acc"] <= 1.0
        assert len(run["first_layer_kernels"]) == 16
        assert all(len(k) == 3 and all(len(row) == 3 for row in k) for k in run["first_layer_kernels"])
        assert [c["step"] for c in run["curve"]][-1] == cfg["steps"]
        for c in run["curve"]:
            assert 0.0 <= c["d_real"] <= 1.0 and 0.0 <= c["d_fake"] <= 1.0
            assert math.isfinite(c["loss"])
        for bank in ("harvested", "gabor"):
            for v in run["similarity"][bank].values():
                assert -1.0 <= v <= 1.0 + 1e-6
        # the penalty is in the loss only when the regularizer is on
        assert all((c["penalty"] > 0) == (run["setting"] != "none") for c in run["curve"])
    for s in result["summary"].values():
        assert s["test_acc"]["std"] == 0.0 and s["test_acc"]["min"] == s["test_acc"]["max"]
    if result["png"] is None:
        assert not png_path.exists()
    else:
        assert png_path.stat().st_size > 0


def test_quick_is_reproducible(exp, quick, tmp_path):
    result, _, _ = quick
    again = exp.main(["--quick", "--threads", "1", "--quiet", "--json", str(tmp_path / "a.json"),
                      "--png", str(tmp_path / "a.png")])
    assert [r["test_acc"] for r in again["runs"]] == [r["test_acc"] for r in result["runs"]]
    assert [r["first_layer_kernels"] for r in again["runs"]] == [r["first_layer_kernels"] for r in result["runs"]]


def test_stratified_subset(exp):
    import torch

    y = torch.arange(10).repeat_interleave(100)
    idx = exp.stratified_subset(y, 0.05, seed=0)
    assert torch.equal(torch.bincount(y[idx]), torch.full((10,), 5))
    assert torch.equal(idx, exp.stratified_subset(y, 0.05, seed=0))
    assert len(torch.unique(idx)) == len(idx)


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--steps", "-3"], "--steps must be >= 1"),
    (["--fraction", "0"], "--fraction must be in (0, 1]"),
    (["--fraction", "1.5"], "--fraction must be in (0, 1]"),
    (["--lam", "-1"], "--lam must be a finite number >= 0"),
    (["--lam", "nan"], "--lam must be a finite number >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--json", ""], "--json must be a non-empty path"),
])
def test_bad_cli_values(exp, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        exp.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
