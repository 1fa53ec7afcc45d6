"""examples/exp_robustness.py (issue 20, experiment 5): the --quick setting runs end to end and
writes a well-formed result; the attacks and the noise behave; bad CLI values are refused.

The script is loaded from its path (examples/ is not a package). It needs scikit-learn's digits
(bundled with scikit-learn, no download): the tests skip without scikit-learn. The figure is
written only when matplotlib is installed; the suite does not need it.
"""
import importlib.util
import json
import math
import pathlib

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "exp_robustness.py"


@pytest.fixture(scope="module")
def exp():
    spec = importlib.util.spec_from_file_location("regkernels_exp_robustness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(exp, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp_robustness")
    json_path, png_path = out / "rob.json", out / "rob.png"
    result = exp.main(["--quick", "--threads", "1", "--quiet", "--sigmas", "0.5,1", "--epsilons", "0.1,0.3",
                       "--json", str(json_path), "--png", str(png_path)])
    return result, json_path, png_path


def test_quick_structure(exp, quick):
    result, json_path, png_path = quick
    on_disk = json.loads(json_path.read_text())
    assert on_disk["summary"].keys() == result["summary"].keys() == set(exp.SETTINGS)
    cfg = result["config"]
    assert cfg["quick"] and cfg["seeds"] == 1
    assert cfg["sigmas"] == [0.5, 1.0] and cfg["epsilons"] == [0.1, 0.3]
    assert cfg["soft_svb"]["lam"] == exp.T.DEFAULT_LAM["orthogonality"]
    assert cfg["jacobian"]["lam"] == exp.T.DEFAULT_LAM["jacobian"]
    assert cfg["svb"]["eps"] == exp.T.SVB_EPS
    assert len(result["runs"]) == len(exp.SETTINGS)
    for run in result["runs"]:
        assert set(run["noise"]) == {"0.5", "1.0"} and set(run["fgsm"]) == {"0.1", "0.3"}
        for acc in [run["clean"], *run["noise"].values(), *run["fgsm"].values()]:
            assert 0.0 <= acc <= 1.0
        assert math.isfinite(run["jacobian_fro2_test"]) and run["jacobian_fro2_test"] >= 0
        assert run["sigma_min"] <= run["sigma_max"]
        assert (run["final_epoch_penalty"] > 0) == (run["setting"] in ("soft_svb", "jacobian"))
    # hard SVB has just projected (once per epoch, the last step included): every σ in [1/1.5, 1.5]
    svb = next(r for r in result["runs"] if r["setting"] == "svb")
    eps = exp.T.SVB_EPS
    assert 1 / (1 + eps) - 1e-4 <= svb["sigma_min"] and svb["sigma_max"] <= 1 + eps + 1e-4
    for s in result["summary"].values():
        assert s["clean"]["std"] == 0.0
    if result["png"] is None:
        assert not png_path.exists()
    else:
        assert png_path.stat().st_size > 0


def test_attacks_on_a_known_model(exp):
    # a linear classifier that separates two classes by the sign of the first pixel with margin 1
    torch.manual_seed(0)
    x = torch.zeros(200, 1, 2, 2)
    y = torch.arange(200) % 2
    x[:, 0, 0, 0] = torch.where(y == 1, 1.0, -1.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[-1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
        model[1].bias.zero_()
    assert exp.accuracy(model, x, y) == 1.0
    # FGSM moves every pixel by eps: below the margin nothing flips, above it everything does
    assert exp.fgsm_accuracy(model, x, y, 0.5) == 1.0
    assert exp.fgsm_accuracy(model, x, y, 1.5) == 0.0
    # small noise changes nothing; the same seed gives the same number
    assert exp.noise_accuracy(model, x, y, 0.01, draws=3) == 1.0
    assert exp.noise_accuracy(model, x, y, 1.0, draws=3) == exp.noise_accuracy(model, x, y, 1.0, draws=3)
    # ‖J‖_F² of logits = W x is ‖W‖_F² = 2
    assert exp.jacobian_norm(model, x) == pytest.approx(2.0)


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--noise-draws", "-1"], "--noise-draws must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--sigmas", "0.5,abc"], "--sigmas must be comma-separated numbers"),
    (["--sigmas", "-1"], "--sigmas must be one or more finite numbers > 0"),
    (["--epsilons", "inf"], "--epsilons must be one or more finite numbers > 0"),
    (["--png", ""], "--png must be a non-empty path"),
])
def test_bad_cli_values(exp, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        exp.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
