"""scripts/setup.sh run for real (not a dry run) where a user already has an older torch: a fresh
venv holding torch 2.13.0's CPU build, then the Quick start's setup twice. The installed torch
must be kept (setup.sh never replaces it, and nothing it installs pulls a newer one), the
extension must build against it, and the second run must rebuild nothing (ninja keeps the objects
in build/objects). Takes ~3-5 min on 2 cores, most of it the first build; skipped where pip has no
local wheel of torch 2.13.0 (find-links) or cannot install its dependencies."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
OLD_TORCH = "2.13.0"


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def _copy_checkout(dst: pathlib.Path) -> None:
    """The files git tracks, as they are on disk (no build outputs, no compiled extension)."""
    res = _run(["git", "-C", ROOT, "ls-files", "-z"], timeout=60)
    if res.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    for rel in filter(None, res.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _objects(repo: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(repo)): p.stat().st_mtime_ns for p in (repo / "build" / "objects").rglob("*.o")}


@pytest.mark.skipif(sys.platform != "linux", reason="setup.sh and the CPU wheel of torch 2.13.0: Linux")
def test_setup_sh_keeps_an_older_torch_and_a_rerun_rebuilds_nothing(tmp_path):
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", venv], timeout=120).returncode == 0
    py = venv / "bin" / "python"
    # only a local copy of the wheel (pip's find-links): from PyPI, torch 2.13.0 for Linux is a CUDA
    # build of several GB
    probe = _run([py, "-m", "pip", "download", "--quiet", "--no-index", "--no-deps", "--only-binary", ":all:",
                  "-d", tmp_path / "wheel", f"torch=={OLD_TORCH}"], timeout=600)
    if probe.returncode != 0:
        pytest.skip(f"no local wheel of torch {OLD_TORCH} for pip (find-links): {probe.stderr.strip().splitlines()[-1:]}")
    res = _run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                *(tmp_path / "wheel").glob("torch-*.whl")], timeout=900)
    if res.returncode != 0:
        pytest.skip(f"pip cannot install torch {OLD_TORCH}'s dependencies here: {res.stderr.strip().splitlines()[-1:]}")
    before = _run([py, "-c", "import torch; print(torch.__version__)"], timeout=120).stdout.strip()
    assert before.startswith(OLD_TORCH)
    repo = tmp_path / "repo"
    _copy_checkout(repo)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHON=str(py), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", MAX_JOBS="2")

    first = _run(["bash", repo / "scripts" / "setup.sh"], cwd=repo, env=env, timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"setup.sh: keeping the installed torch {before}" in first.stdout
    assert f"| torch {before} | extension: True" in first.stdout
    objects = _objects(repo)
    assert objects, "the build kept no objects in build/objects"

    second = _run(["bash", repo / "scripts" / "setup.sh"], cwd=repo, env=env, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"| torch {before} | extension: True" in second.stdout
    assert _objects(repo) == objects, "a re-run with no source changed recompiled objects"
    after = _run([py, "-c", "import torch; print(torch.__version__)"], timeout=120).stdout.strip()
    assert after == before
    # the extension it built loads and runs in that torch
    check = _run([py, "-c", "import torch, regkernels; from regkernels import _ext; assert _ext.HAS_C; "
                  "w = torch.randn(8, 16, requires_grad=True); regkernels.frame_penalty(w, A=0.5, B=2.0).backward(); "
                  "print('ok', regkernels.frame_penalty(w.detach(), A=0.5, B=2.0, backend='cpu').item())"],
                 cwd=tmp_path, env=env, timeout=300)
    assert check.returncode == 0 and check.stdout.startswith("ok"), check.stderr[-3000:]
