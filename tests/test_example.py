"""examples/train.py: every --reg runs a few steps and returns sane records; the plain CNN learns.

The script is loaded from its path (examples/ is not a package). It needs scikit-learn's digits
(bundled with scikit-learn, no download): the tests skip without scikit-learn.
"""
import importlib.util
import json
import math
import os
import pathlib
import sys

import pytest

pytest.importorskip("sklearn")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("regkernels_example_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# what acts through the loss (penalty > 0) and what acts on the weights or the optimizer (0)
PENALTY_REGS = ("frame", "diversity", "orthogonality", "srip", "mhe", "conv_frame", "ocnn", "adversarial",
                "jacobian")
OTHER_REGS = ("none", "svb", "beta-lasso")
KEYS = ("epoch", "steps", "loss", "penalty", "test_acc", "model_ms", "reg_ms", "sigma_min", "sigma_max",
        "gershgorin_lo", "gershgorin_hi")


def test_every_reg_is_covered(train):
    assert set(train.REGS) == set(PENALTY_REGS + OTHER_REGS)
    assert set(train.DEFAULT_LAM) == set(train.REGS)


@pytest.mark.parametrize("reg", PENALTY_REGS + OTHER_REGS)
def test_reg_runs(train, reg, capsys):
    records = train.main(["--reg", reg, "--epochs", "1", "--steps-per-epoch", "5"])
    assert len(records) == 1
    rec = records[0]
    assert set(KEYS) <= set(rec), set(KEYS) - set(rec)
    assert rec["steps"] == 5
    assert math.isfinite(rec["loss"]) and rec["loss"] > 0
    assert 0.0 <= rec["test_acc"] <= 1.0
    assert math.isfinite(rec["penalty"])
    if reg in PENALTY_REGS:
        assert rec["penalty"] > 0, f"{reg}: the penalty term should be positive at initialisation"
    else:
        assert rec["penalty"] == 0
    assert rec["model_ms"] > 0 and rec["reg_ms"] >= 0
    if reg != "none":
        assert rec["reg_ms"] > 0
    assert 0 <= rec["sigma_min"] <= rec["sigma_max"] and math.isfinite(rec["sigma_max"])
    assert rec["gershgorin_lo"] <= rec["gershgorin_hi"]
    if reg == "beta-lasso":
        assert 0 < rec["nonzero_frac"] <= 1
    if reg == "adversarial":
        assert 0 < rec["d_real"] < 1 and 0 < rec["d_fake"] < 1
    out = capsys.readouterr().out
    assert "test acc" in out and "summary:" in out and f"reg {reg}" in out


def test_reference_backend_and_json(train, tmp_path):
    path = tmp_path / "run.json"
    records = train.main(["--reg", "frame", "--backend", "reference", "--epochs", "2", "--steps-per-epoch", "3",
                          "--json", str(path), "--quiet"])
    data = json.loads(path.read_text())
    assert data["epochs"] == records and len(records) == 2
    assert data["config"]["backend"] == "reference" and data["summary"]["reg"] == "frame"
    assert {"final_test_acc", "model_ms", "reg_ms", "reg_share_pct"} <= set(data["summary"])


def test_report_prints_the_spectrum_and_writes_it(train, tmp_path, capsys):
    path = tmp_path / "run.json"
    train.main(["--reg", "conv_frame", "--epochs", "1", "--steps-per-epoch", "2", "--report", "--json", str(path)])
    out = capsys.readouterr().out
    assert "spectrum of the trained model (input 1x8x8):" in out and "| layer | kind | input | σ_max" in out
    assert "| 0 | conv2d | 8×8 |" in out and "| 4 | conv2d | 4×4 |" in out and "| 9 | linear | — |" in out
    assert "Lipschitz bound" in out
    data = json.loads(path.read_text())
    layers = data["spectrum"]["layers"]
    assert [r["name"] for r in layers] == ["0", "2", "4", "7", "9"]
    assert [r["input_size"] for r in layers] == [[8, 8], [8, 8], [4, 4], None, None]
    for r in layers:
        assert 0 < r["sigma_max"] <= r["bound"] and math.isfinite(r["bound"]) and r["gershgorin_lo"] <= r["gershgorin_hi"]
    assert data["spectrum"]["lipschitz_bound"] == pytest.approx(math.prod(r["bound"] for r in layers))
    assert data["spectrum"]["lipschitz_estimate"] <= data["spectrum"]["lipschitz_bound"]
    # without --report the record structure is as before
    train.main(["--epochs", "1", "--steps-per-epoch", "1", "--json", str(path), "--quiet"])
    assert "spectrum" not in json.loads(path.read_text())


def test_bad_flags(train):
    with pytest.raises(SystemExit):
        train.main(["--reg", "nope"])
    with pytest.raises(SystemExit):
        train.main(["--epochs", "0"])


def test_missing_sklearn_message(train, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import raise ImportError
    with pytest.raises(SystemExit) as exc:
        train.main(["--epochs", "1"])
    assert "pip install scikit-learn" in str(exc.value.code)


def test_plain_cnn_learns(train):
    records = train.main(["--reg", "none", "--epochs", "3", "--quiet"])
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["test_acc"] >= 0.85


@pytest.mark.parametrize("reg", ["frame", "svb", "beta-lasso"])
def test_fsdp_two_processes_train_like_one(train, reg, tmp_path):
    """``--fsdp 2`` (run as a user runs it): FSDP2 in two gloo processes, each with half of every
    batch, ends where one process ends (the task gradients are averaged over equal halves, the
    regularizer acts on the sharded weights): the same test accuracy and singular value range, up
    to float32 reduction order."""
    import subprocess

    argv = ["--reg", reg, "--epochs", "1", "--steps-per-epoch", "4", "--threads", "1"]
    path = tmp_path / "fsdp.json"
    # the repository first on the path, as for the tests (an installed regkernels works the same)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(SCRIPT), *argv, "--fsdp", "2", "--json", str(path)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FSDP2 x 2 processes" in run.stdout and "summary:" in run.stdout
    got = json.loads(path.read_text())["epochs"][0]
    want = train.main(argv + ["--quiet"])[0]
    assert got["test_acc"] == pytest.approx(want["test_acc"], abs=1 / 360)  # one test image
    for key in ("sigma_min", "sigma_max", "gershgorin_lo", "gershgorin_hi"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
    if reg == "beta-lasso":  # nonzeros() counts the whole tensors on every rank
        assert got["nonzero_frac"] == pytest.approx(want["nonzero_frac"], abs=1e-3)


def test_fsdp_refuses_jacobian(train):
    with pytest.raises(SystemExit):
        train.main(["--reg", "jacobian", "--fsdp", "2"])
