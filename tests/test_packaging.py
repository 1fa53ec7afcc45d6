"""Packaging: pyproject.toml, setup.py without torch, scripts/setup.sh's decisions (dry runs with a
stand-in interpreter: nothing is installed), LICENSE and py.typed."""
from __future__ import annotations

import os
import pathlib
import stat
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _stub_python(tmp_path: pathlib.Path, torch_version: str | None) -> str:
    """An interpreter stand-in for setup.sh: ``-c "import torch..."`` succeeds (printing
    ``torch_version``) or fails as without torch; anything else is an error (a dry run runs
    nothing else)."""
    path = tmp_path / "python"
    has = "1" if torch_version else "0"
    path.write_text(f"""#!/usr/bin/env bash
case "$2" in
  *"import torch"*) [ {has} = 1 ] || exit 1; echo "{torch_version or ''}"; exit 0 ;;
esac
echo "stub python: unexpected call $*" >&2; exit 3
""")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def _setup_sh(tmp_path, torch_version, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": _stub_python(tmp_path, torch_version), "SETUP_DRY_RUN": "1"}
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_setup_sh_keeps_an_installed_torch(tmp_path):
    res = _setup_sh(tmp_path, "2.13.0+cpu")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "setup.sh: keeping the installed torch 2.13.0+cpu" in lines
    assert not any(line.split()[2:3] == ["torch"] for line in lines if line.startswith("pip install"))
    assert not any("pybind11" in line for line in lines)
    # the editable build without isolation, against that torch
    assert "pip install --no-build-isolation -e ." in lines
    # no test tools without --test
    assert not any("pytest" in line for line in lines)


def test_setup_sh_installs_torch_only_when_missing_and_test_tools_on_request(tmp_path):
    res = _setup_sh(tmp_path, None, "--test")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "pip install torch" in lines
    assert "pip install pytest pytest-benchmark hypothesis scikit-learn" in lines


def test_setup_sh_refuses_unknown_arguments(tmp_path):
    res = _setup_sh(tmp_path, "2.14.0", "--tests")
    assert res.returncode == 2 and "unknown argument --tests (takes --test)" in res.stderr


def test_setup_py_without_torch_says_what_to_run():
    """What a plain ``pip install .`` meets (build isolation hides torch): one sentence, exit 1."""
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "pip install --no-build-isolation ." in res.stderr
    assert "Traceback" not in res.stderr


def test_pyproject_metadata_and_extras():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "regkernels" and project["requires-python"] == ">=3.10"
    assert project["dependencies"] == ["torch>=2.6"]
    # torch is not a build requirement: isolation would build against a second torch
    assert not any(r.startswith("torch") for r in meta["build-system"]["requires"])
    extras = project["optional-dependencies"]
    assert {"test", "triton", "examples", "plot"} <= set(extras)
    assert "pytest" in extras["test"] and extras["plot"] == ["matplotlib"]
    import regkernels

    assert project["version"] == regkernels.__version__


def test_license_and_py_typed_are_shipped():
    assert (ROOT / "LICENSE").read_text().startswith("BSD 3-Clause License")
    assert (ROOT / "regkernels" / "py.typed").exists()
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["regkernels"]


def _public_callables():
    import inspect

    import regkernels
    from regkernels import nn as rnn
    from regkernels.optim import BetaLasso

    found = {n: getattr(regkernels, n) for n in regkernels.__all__ if inspect.isfunction(getattr(regkernels, n))}
    classes = {f"nn.{n}": getattr(rnn, n) for n in rnn.__all__ if inspect.isclass(getattr(rnn, n))}
    classes["optim.BetaLasso"] = BetaLasso
    for name, cls in classes.items():
        for m, v in vars(cls).items():
            if inspect.isfunction(v) and (not m.startswith("_") or m == "__init__"):
                found[f"{name}.{m}"] = v
    return found


def test_public_signatures_have_type_hints():
    """Every parameter (self and *args / **kwargs aside) and every return of the public API is
    annotated (py.typed promises it)."""
    import inspect

    missing = {}
    for name, fn in _public_callables().items():
        sig = inspect.signature(fn)
        params = [p.name for p in sig.parameters.values() if p.annotation is inspect.Parameter.empty
                  and p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if params or (sig.return_annotation is inspect.Signature.empty and not name.endswith("__init__")):
            missing[name] = params
    assert not missing, missing
