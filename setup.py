"""Build of regkernels._C (one extension module for every op).

C++ CPU sources are always built. The CUDA sources are built when torch is a CUDA build and
nvcc is found; FORCE_CUDA=1 demands them (error if impossible), REGKERNELS_CPU_ONLY=1 skips
them. Install after torch, without build isolation so the build never swaps the user's torch:

    pip install --no-build-isolation -e .

Metadata and extras are in pyproject.toml.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

# nvcc lives in /usr/local/cuda on our machines; torch would otherwise guess /usr/local
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch  # noqa: E402
except ImportError:
    # pip's build isolation (a plain `pip install .`) hides the torch the extension must be built
    # against; one sentence, no traceback
    sys.exit("regkernels: building the extension needs the torch you will run it with, which this build "
             "environment does not have: install torch first, then run "
             "`pip install --no-build-isolation .` (or `bash scripts/setup.sh` in a checkout)")
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _decide_cuda() -> tuple[bool, str]:
    if _env_flag("REGKERNELS_CPU_ONLY"):
        return False, "REGKERNELS_CPU_ONLY=1"
    nvcc = None
    if cpp_extension.CUDA_HOME:
        cand = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        nvcc = cand if os.path.exists(cand) else None
    nvcc = nvcc or shutil.which("nvcc")
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    elif nvcc is None:
        reason = "nvcc not found (set CUDA_HOME)"
    else:
        return True, f"torch CUDA {torch.version.cuda}, nvcc at {nvcc}"
    if _env_flag("FORCE_CUDA"):
        sys.exit(f"regkernels setup: FORCE_CUDA=1 but CUDA cannot be built: {reason}")
    return False, reason


def _nvidia_wheel_includes() -> list[str]:
    """Headers the toolkit here lacks (cuBLAS/cuSPARSE) ship in the nvidia-* wheels."""
    try:
        import nvidia  # the namespace package of the nvidia-* wheels torch depends on
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += [d for d in glob.glob(os.path.join(base, "*", "include")) + glob.glob(os.path.join(base, "cu*", "include"))
                 if os.path.isdir(d)]
    return sorted(set(dirs))


def _extension():
    with_cuda, why = _decide_cuda()
    sources = [os.path.join("csrc", "regkernels.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))) \
        + sorted(glob.glob(os.path.join("csrc", "autograd", "*.cpp")))
    # -ffp-contract=off: no FMA contraction, so CPU kernels match the op-by-op torch reference
    # bit for bit (docs/beta_lasso.md#update-rule); -fno-math-errno -fno-trapping-math: sqrt is one instruction and
    # selects may evaluate both sides, so branch-free loops over SIMD lanes vectorize (the Jacobi
    # SVD's rotations; results are unchanged: no reassociation, no contraction, errno and FP
    # exception flags are never read); -fopenmp: at::parallel_for is OpenMP-based in torch
    # (-Wno-psabi: gcc's note that 32-byte vector arguments changed ABI in gcc 4.6; ours never
    # cross a library boundary)
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-Wno-psabi", "-fopenmp"]
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        cxx.append("-DREGKERNELS_WITH_CUDA")
        extra["nvcc"] = ["-O3", "-DREGKERNELS_WITH_CUDA", "--expt-relaxed-constexpr"]
        include_dirs += _nvidia_wheel_includes()
        ext_cls = cpp_extension.CUDAExtension
        arch = os.environ["TORCH_CUDA_ARCH_LIST"]
        print(f"regkernels setup: building CPU + CUDA kernels ({why}; TORCH_CUDA_ARCH_LIST={arch})")
    else:
        ext_cls = cpp_extension.CppExtension
        print(f"regkernels setup: building CPU kernels only ({why})")
    return ext_cls("regkernels._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                   extra_link_args=["-fopenmp"])


class _BuildExt(cpp_extension.BuildExtension):
    """torch's BuildExtension (ninja) with a persistent object directory, ``build/objects``: pip's
    editable and wheel builds give setuptools a fresh temporary one each time, so every re-run
    recompiled all sources (2–3 min); with the objects kept, ninja rebuilds only what changed."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "objects")



def _write_build_info() -> None:
    """``regkernels/_build_info.py``: the torch this build compiles against (before setuptools copies
    the package, so wheels carry it too)."""
    with open(os.path.join(ROOT, "regkernels", "_build_info.py"), "w") as f:
        f.write(f"# written by setup.py\nTORCH_VERSION = {torch.__version__!r}\n")


_write_build_info()
# metadata, dependencies and extras: pyproject.toml
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt.with_options(no_python_abi_suffix=False)},
)
