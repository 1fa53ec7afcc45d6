"""The static sm_90 report (``python -m regkernels.bench.gpu_static``): its occupancy model, SASS
counting and budget checks on known inputs, and one full run over every kernel of the package,
which must exit 0 (every kernel compiled, within the budget declared beside its launcher).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

from regkernels import _ext
from regkernels.bench import gpu_static as GS
from regkernels.triton._launch import Budget


@pytest.mark.parametrize("regs, warps, smem, expected", [
    (32, 4, 0, 1.0),            # 16 blocks of 4 warps fill the 64 warp slots
    (128, 4, 0, 0.25),          # 4096 registers per warp: 16 warps
    (255, 4, 0, 0.125),         # rounded to 256 per thread: 8 warps, 2 blocks
    (168, 4, 16384, 0.1875),    # 5376 per warp → 3 per sub-partition, 12 warps, 3 blocks
    (32, 4, 100 * 1024, 0.125),  # shared memory: 2 blocks of 101 KiB
    (64, 8, 0, 0.5),            # 32 warps by registers
])
def test_occupancy_follows_the_sm90_rules(regs, warps, smem, expected):
    assert GS.occupancy(regs, warps, smem) == pytest.approx(expected)


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/              @!P0 LDG.E R8, desc[UR4][R2.64] ;
        /*0030*/                   HMMA.16816.F32.BF16 R12, R4, R8, R12 ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0050*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR6][R4.64] ;
        /*0060*/                   EXIT ;
"""


def test_sass_counts_tensor_core_and_wide_loads():
    mma, vec, n = GS.sass_counts(SASS)
    assert (mma, vec, n) == (2, 2, 7)


def _row(**kw):
    base = dict(source="triton:x", kernel="k", variant="", dtype="bfloat16", warps=4, regs=64, spill_bytes=0,
                stack_bytes=0, smem_bytes=0, occupancy=0.5, mma=0, vector_loads=0, sass_instructions=10)
    base.update(kw)
    return GS.Row(**base)


def test_budget_checks_name_each_breach():
    assert GS.check(_row(), None) == ["no GPU_BUDGET declared for this kernel"]
    assert GS.check(_row(), Budget()) == []
    problems = GS.check(_row(spill_bytes=8, occupancy=0.125, regs=200),
                        Budget(mma_dtypes=("bfloat16",), vector_loads=True, max_registers=128))
    assert problems == ["spills 8 B > 0 B", "occupancy 12% < 25%", "200 registers > 128",
                        "no tensor-core instruction for bfloat16", "no 64/128-bit global load"]
    # mma is required only for the dtypes the budget names
    assert GS.check(_row(dtype="float32"), Budget(mma_dtypes=("bfloat16",))) == []


def test_cuda_budget_lines_are_parsed_and_bad_json_is_an_error(tmp_path):
    (tmp_path / "a.cu").write_text('x();\n  // GPU_BUDGET {"kernel": "foo_kernel", "threads": 128}\n')
    specs = GS.cuda_budgets(tmp_path)
    assert [(s["kernel"], s["threads"], s["_where"]) for s in specs] == [("foo_kernel", 128, "a.cu:2")]
    (tmp_path / "b.cu").write_text("// GPU_BUDGET {kernel: foo}\n")
    with pytest.raises(ValueError, match="b.cu:1: GPU_BUDGET is not valid JSON"):
        GS.cuda_budgets(tmp_path)


def test_every_triton_module_declares_a_budget_for_each_kernel_it_launches():
    if not _ext.has_triton():
        pytest.skip("Triton is not installed")
    for name in GS.TRITON_MODULES:
        mod = importlib.import_module(name)
        budgets = getattr(mod, "GPU_BUDGETS", None)
        assert isinstance(budgets, dict) and budgets, f"{name} declares no GPU_BUDGETS"
        for kernel, budget in budgets.items():
            assert isinstance(budget, Budget), f"{name}.GPU_BUDGETS[{kernel!r}] is not a Budget"
            assert hasattr(mod, kernel), f"{name}.GPU_BUDGETS names {kernel!r}, which the module lacks"


@pytest.mark.skipif(not _ext.has_triton(), reason="Triton is not installed")
def test_the_static_report_passes_for_every_kernel(tmp_path):
    """The whole report, as CI runs it: every Triton kernel compiled for sm_90 through its launchers
    and every CUDA kernel of the build, within budget (exit 0), and the JSON lists them."""
    out = tmp_path / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "regkernels.bench.gpu_static", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=1800)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    payload = json.loads(out.read_text())
    kernels = {(r["source"], r["kernel"].split("<")[0]) for r in payload["rows"]}
    for name in GS.TRITON_MODULES:
        for kernel in importlib.import_module(name).GPU_BUDGETS:
            assert (f"triton:{name.rsplit('.', 1)[1]}", kernel) in kernels
    if _ext.HAS_C and _ext.has_cuda_kernels():
        assert any(src.startswith("cuda:") for src, _ in kernels)
    assert payload["errors"] == []
