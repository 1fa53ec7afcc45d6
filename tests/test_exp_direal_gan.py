"""examples/exp_direal_gan.py (issue 20, experiment 3): --quick runs and returns a sane result.

The script is loaded from its path (examples/ is not a package). It needs scikit-learn's digits
(bundled with scikit-learn, no download): the tests skip without scikit-learn. The figure needs
matplotlib, which the suite does not: without it the script says so and still writes the JSON.
"""
import importlib.util
import json
import math
import pathlib

import pytest

pytest.importorskip("sklearn")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "exp_direal_gan.py"


@pytest.fixture(scope="module")
def exp():
    spec = importlib.util.spec_from_file_location("regkernels_exp_direal_gan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(exp, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("direal_gan")
    json_path, png_path = tmp / "out.json", tmp / "out.png"
    result = exp.main(["--quick", "--threads", "1", "--json", str(json_path), "--png", str(png_path), "--quiet"])
    return result, json_path, png_path


def _in01(x):
    return 0.0 <= x <= 1.0


def test_threads_restored(exp, tmp_path):
    import torch

    before = torch.get_num_threads()
    exp.main(["--quick", "--steps", "2", "--samples", "20", "--threads", "1", "--quiet",
              "--json", str(tmp_path / "t.json"), "--png", str(tmp_path / "t.png")])
    assert torch.get_num_threads() == before


def test_quick_structure(exp, quick):
    result, json_path, png_path = quick
    assert json.loads(json_path.read_text())["summary"] == json.loads(json.dumps(result["summary"]))
    assert result["config"]["seeds"] == [0]
    assert result["config"]["steps"] == exp.QUICK_STEPS
    assert _in01(result["classifier_test_acc"])
    assert set(result["summary"]) == set(exp.CONDITIONS)
    assert {(r["seed"], r["cond"]) for r in result["runs"]} == {(0, c) for c in exp.CONDITIONS}
    assert result["wall_s"] > 0
    # the figure is drawn exactly when matplotlib is importable
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert png_path.exists() == has_mpl
    assert (result["figure"] is not None) == has_mpl
    assert "| metric |" in result["table_md"]


def test_quick_sanity(exp, quick):
    result = quick[0]
    n = result["config"]["samples"]
    for r in result["runs"]:
        assert r["finite"]
        for key in ("d_loss", "g_loss"):
            curve = r["curves"][key]
            assert len(curve) >= 1 and all(math.isfinite(v) and v >= 0 for v in curve)
        assert [h["step"] for h in r["history"]][-1] == result["config"]["steps"]
        for h in r["history"]:
            assert 0 <= h["n_classes"] <= 10
            assert len(h["hist"]) == 10 and sum(h["hist"]) == n and min(h["hist"]) >= 0
            assert 0.0 <= h["entropy_bits"] <= math.log2(10) + 1e-9
            assert 0.1 - 1e-6 <= h["confidence"] <= 1.0
            assert set(h["cos_G"]) == set(result["setup"]["regularized_layers"]["G"])
            assert set(h["cos_D"]) == set(result["setup"]["regularized_layers"]["D"])
            assert all(_in01(v) for v in list(h["cos_G"].values()) + list(h["cos_D"].values()))
            assert _in01(h["cos_G_mean"]) and _in01(h["cos_D_mean"])
            for net in ("G", "D"):
                assert all(_in01(v) for v in h[f"frac_ge_tau_{net}"].values())
                assert all(_in01(v) and v >= h[f"cos_{net}"][k] for k, v in h[f"maxcos_{net}"].items())
            assert h["penalty_G"] >= 0 and h["penalty_D"] >= 0
        # only the regularized run carries the weighted penalty terms
        assert (len(r["curves"]["weighted_penalty_G"]) > 0) == (r["cond"] == "direal")
    # same seed, same initialisation: the two conditions start from identical weights and samples
    first = {r["cond"]: r["history"][0] for r in result["runs"]}
    assert first["none"]["cos_G"] == first["direal"]["cos_G"]
    assert first["none"]["hist"] == first["direal"]["hist"]
    # the penalty lowers the (unweighted) diversity penalty it optimises
    fin = {r["cond"]: r["final"] for r in result["runs"]}
    assert fin["direal"]["penalty_G"] < fin["none"]["penalty_G"]
    for f in fin.values():  # the checkpoints of the 2nd half include the final one
        assert 0 <= f["min_classes_during"] <= f["n_classes"]
        assert 0.0 <= f["mean_entropy_during"] <= math.log2(10) + 1e-9
    for cond, s in result["summary"].items():
        assert 0 <= s["n_classes"]["mean"] <= 10 and s["n_classes"]["std"] >= 0
        assert sum(s["hist_total"]) == n * len(result["config"]["seeds"])
    # the real digits are judged as 10 classes when the classifier is any good
    if result["classifier_test_acc"] > 0.8:
        assert result["real_data_classes"]["n_classes"] == 10


def test_mean_abs_cos(exp):
    import torch

    assert exp.mean_abs_cos(torch.eye(4)) == 0.0
    assert abs(exp.mean_abs_cos(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) - 1.0) < 1e-12


@pytest.mark.parametrize("argv, msg", [
    (["--lam", "-1"], "--lam"), (["--lam", "nan"], "--lam"), (["--tau", "1.5"], "--tau"),
    (["--seeds", "a,b"], "--seeds"), (["--seeds", "1,1"], "--seeds"), (["--steps", "0"], "--steps"),
    (["--threads", "0"], "--threads"), (["--min-share", "0"], "--min-share"), (["--samples", "-3"], "--samples"),
])
def test_bad_cli_values(exp, argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        exp.parse_args(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
