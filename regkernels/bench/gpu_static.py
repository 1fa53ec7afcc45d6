"""``python -m regkernels.bench.gpu_static [--json PATH]``: every GPU kernel of the package,
compiled for sm_90 (H100 / H200) on a machine without a GPU, against the budget it declares.

Triton kernels are compiled through their real launchers: the table's ``"triton"`` entry
functions run forward and backward on CPU tensors with representative shapes of the benchmark
cases, while a stub Triton driver stands in for the GPU (target ``cuda:90``, every launch a
no-op, so the outputs are never read for their values). Each compiled variant's PTX goes
through ptxas ``-v`` (registers, spills, stack) and its cubin through nvdisasm (SASS: tensor-core
instructions HMMA/HGMMA, 64/128-bit global loads, instruction count). CUDA kernels are read
from the built extension (``cuobjdump -res-usage`` and ``-sass`` of its sm_90 code).

Occupancy is computed from registers, shared memory and block size with compute capability
9.0's rules (65536 registers per SM allocated per warp in units of 256, 64 warps, 32 blocks,
228 KiB shared memory with 1 KiB reserved per block).

Budgets: a Triton module declares ``GPU_BUDGETS = {"<kernel>": Budget(...)}`` beside its
launchers (``regkernels.triton._launch.Budget``); a CUDA source declares, beside each launch, a
line ``// GPU_BUDGET {"kernel": "<name substring>", "threads": 256, ...}`` (JSON, Budget's
fields). The run exits non-zero when a compiled kernel has no budget, breaks its budget, or
fails to compile, and when a declared budget names a kernel the workloads never compiled.
docs/design.md#gpu-static-report.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Iterable

# ---------------------------------------------------------------- H100 occupancy (cc 9.0)
SM_REGS = 65536
SM_MAX_WARPS = 64
SM_MAX_BLOCKS = 32
SM_SMEM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
REG_ALLOC_UNIT = 256  # registers, per warp
MAX_REGS_PER_THREAD = 255


def occupancy(regs: int, warps_per_block: int, smem_bytes: int) -> float:
    """Resident warps / 64 on one sm_90 SM for a kernel of ``regs`` registers per thread,
    ``warps_per_block`` warps and ``smem_bytes`` shared memory per block."""
    if warps_per_block <= 0:
        return 0.0
    regs_per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    # registers are split across the SM's 4 sub-partitions; a warp lives in one of them
    warps_by_regs = 4 * ((SM_REGS // 4) // regs_per_warp)
    by_regs = warps_by_regs // warps_per_block
    by_smem = SM_SMEM // (smem_bytes + SMEM_RESERVED_PER_BLOCK)
    by_warps = SM_MAX_WARPS // warps_per_block
    blocks = min(SM_MAX_BLOCKS, by_regs, by_smem, by_warps)
    return blocks * warps_per_block / SM_MAX_WARPS


# ---------------------------------------------------------------- report rows
@dataclasses.dataclass
class Row:
    source: str               # "triton:<module>" or "cuda:<file or so>"
    kernel: str               # function name (demangled base name for CUDA)
    variant: str              # dtype and the constexprs that distinguish compiled variants
    dtype: str | None
    warps: int
    regs: int
    spill_bytes: int          # spill stores + loads (ptxas), or the stack frame for CUDA
    stack_bytes: int
    smem_bytes: int
    occupancy: float
    mma: int                  # HMMA / HGMMA instructions in the SASS
    vector_loads: int         # 64/128-bit global loads (LDG / LDGSTS) in the SASS
    sass_instructions: int
    problems: list[str] = dataclasses.field(default_factory=list)


_MMA = re.compile(r"\b(?:HMMA|HGMMA|IMMA|DMMA)\b")
_VLOAD = re.compile(r"\b(?:LDG|LDGSTS)(?:\.[A-Z0-9_]+)*\.(?:64|128)\b")
_INSTR = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:\{\s*)?(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", re.M)


def sass_counts(sass: str) -> tuple[int, int, int]:
    """(tensor-core instructions, wide global loads, instructions) of one kernel's SASS text."""
    ops = _INSTR.findall(sass)
    mma = sum(1 for o in ops if _MMA.match(o))
    vec = sum(1 for o in ops if _VLOAD.match(o))
    return mma, vec, len(ops)


def _tool(name: str) -> str:
    """A CUDA binary tool: Triton's bundled copy first (it matches Triton's ptxas), then the toolkit."""
    try:
        import triton
        p = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if p.exists():
            return str(p)
    except ImportError:
        pass
    for d in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        p = pathlib.Path(d) / "bin" / name
        if d and p.exists():
            return str(p)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"gpu_static: {name} not found (Triton's bundled tools or a CUDA toolkit)")


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"gpu_static: {' '.join(cmd[:2])} failed: {res.stderr.strip()[:2000]}")
    return res.stdout + res.stderr


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_usage(ptx: str, arch: str, workdir: str) -> tuple[int, int, int]:
    """(registers, spill store + load bytes, stack frame bytes) from ``ptxas -v`` on one kernel's PTX."""
    src = os.path.join(workdir, "k.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    out = _run([_tool("ptxas"), f"-arch={arch}", "-v", src, "-o", os.path.join(workdir, "k.o")])
    regs = int(_PTXAS_REGS.search(out).group(1)) if _PTXAS_REGS.search(out) else 0
    m = _PTXAS_FRAME.search(out)
    stack, st, ld = (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else (0, 0, 0)
    return regs, st + ld, stack


# ---------------------------------------------------------------- the stub driver
class _StubDriver:
    """A Triton driver for compiling without a GPU: target sm_90, launches do nothing.

    Built lazily (it subclasses Triton's DriverBase) so importing this module needs no Triton.
    """

    @staticmethod
    def make():
        import torch
        from triton.backends.compiler import GPUTarget
        from triton.backends.driver import DriverBase

        class Utils:
            def load_binary(self, name, kernel, shared, device):
                return 0, 0, 0, 0, 1024  # module, function, n_regs, n_spills, max threads

            def get_device_properties(self, device):
                return {"max_shared_mem": SM_SMEM - SMEM_RESERVED_PER_BLOCK, "multiprocessor_count": 132,
                        "max_num_regs": SM_REGS, "warpSize": 32}

        class Stub(DriverBase):
            launches = 0

            def __init__(self):
                self.utils = Utils()

                def launcher(src, metadata):
                    def run(*args):
                        Stub.launches += 1
                    return run
                self.launcher_cls = launcher

            @classmethod
            def is_active(cls):
                return True

            def map_python_to_cpp_type(self, ty):
                return ty

            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

            def get_active_torch_device(self):
                return torch.device("cpu")

            def get_benchmarker(self):
                raise RuntimeError("gpu_static: the stub driver compiles only; nothing can be timed")

            def get_current_device(self):
                return 0

            def set_current_device(self, device):
                pass

            def get_current_stream(self, device):
                return 0

            def get_device_interface(self):
                return torch.cuda

        return Stub()


# ---------------------------------------------------------------- Triton workloads
def _weights_gram(torch, dtype):
    from regkernels.bench import cases_gram as CGm
    gen = torch.Generator().manual_seed(0)

    def w(shape):
        return (torch.randn(shape, generator=gen) / max(1, shape[-1]) ** 0.5).to(dtype)

    singles = [w(CGm.SHAPES[s]) for s in ("64x576", "256x2304", "4096x1024")]
    resnet18 = [w(s) for s in CGm._resnet18_shapes()]
    return singles, resnet18


def triton_workloads() -> list[tuple[str, Callable[[], None]]]:
    """(name, call) pairs: forward + backward through every Triton table entry on shapes of the
    benchmark cases, in float32, bfloat16 and float16 (the dtypes the Triton rows take)."""
    import torch

    from regkernels.bench import cases_conv as CC
    from regkernels.triton import conv_frame as TF
    from regkernels.triton import conv_matrix as TM
    from regkernels.triton import gram as TG

    def fwd_bwd(fn, x, *args, **kw):
        def call():
            x_ = x.detach().requires_grad_(True)
            out = fn(x_, *args, **kw)
            out = out[0] if isinstance(out, tuple) else out
            out.float().sum().backward()
        return call

    def multi(weights, kind, **kw):
        def call():
            ws = [w.detach().requires_grad_(True) for w in weights]
            TG.penalty_multi(ws, kind, [1] * len(ws), **kw).float().sum().backward()
        return call

    out: list[tuple[str, Callable[[], None]]] = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        dn = str(dtype).removeprefix("torch.")
        singles, resnet18 = _weights_gram(torch, dtype)
        kinds = [("frame", TG.frame_penalty, (0.5, 2.0)), ("diversity", TG.diversity_penalty, (0.3,)),
                 ("orthogonality", TG.orthogonality_penalty, ()), ("mhe", TG.mhe_penalty, ()),
                 ("mhe-half", lambda W: TG.mhe_penalty(W, 2, True, 1e-4), ()),
                 ("mhe-angular-half", lambda W: TG.mhe_penalty(W, 2, True, 1e-4, True), ())]
        for W in singles:
            shape = "x".join(map(str, W.shape))
            for kname, fn, args in kinds:
                if dtype == torch.float16 and kname not in ("frame", "diversity"):
                    continue  # the fp16 variants compile the same code paths as bf16
                out.append((f"gram {kname} {shape} {dn}", fwd_bwd(fn, W, *args)))
        out.append((f"gram penalty_multi frame resnet18 {dn}", multi(resnet18, "frame", A=0.5, B=2.0)))
        if dtype == torch.float16:
            continue
        for name in ("64x64x3x3@8x8", "16x16x3x3@8x8"):
            (wshape, size) = CC._parse(name)
            gen = torch.Generator().manual_seed(1)
            weight = torch.randn(wshape, generator=gen).to(dtype)
            for mode in ("zeros", "circular"):
                out.append((f"conv_to_matrix {name} {mode} {dn}",
                            fwd_bwd(TM.conv_to_matrix, weight, size, 1, 1, 1, 1, mode)))
        for name in ("64x64x3x3@32x32", "16x16x3x3@8x8"):
            (wshape, size) = CC._parse(name)
            weight = torch.randn(wshape, generator=torch.Generator().manual_seed(2)).to(dtype)
            for mode in ("zeros", "circular"):
                out.append((f"conv_frame_penalty {name} {mode} {dn}",
                            fwd_bwd(TF.conv_frame_penalty, weight, size, 0.5, 2.0, 1, 1, 1, 1, mode)))
    return out


TRITON_MODULES = ("regkernels.triton.gram", "regkernels.triton.conv_matrix", "regkernels.triton.conv_frame")


def _dtype_of(signature: dict, budget) -> str | None:
    """The input dtype of a compiled variant: the argument the budget names, else the first
    floating-point pointer argument (``*bf16`` → ``bfloat16``)."""
    names = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}
    items = list(signature.items())
    if budget is not None and budget.dtype_arg:
        items = [(k, v) for k, v in items if k == budget.dtype_arg]
    for _, ty in items:
        if isinstance(ty, str) and ty.startswith("*") and ty[1:] in names:
            return names[ty[1:]]
    return None


def _variant(ck) -> dict[str, str]:
    """What tells compiled variants of one kernel apart: its constexpr values (block sizes aside)
    and the integer arguments Triton specialized (``==1`` folded, ``%16`` divisibility)."""
    out: dict[str, str] = {}
    names = list(ck.src.fn.arg_names)
    for key, val in (getattr(ck.src, "constants", {}) or {}).items():
        idx = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        name = names[idx] if isinstance(idx, int) and idx < len(names) else str(key)
        if not name.startswith("BLOCK") and not isinstance(val, (type(None),)):
            out[name] = str(val)
    for key, attrs in (getattr(ck.src, "attrs", {}) or {}).items():
        idx = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        name = names[idx] if isinstance(idx, int) and idx < len(names) else str(key)
        if any(a and a[0] == "tt.divisibility" for a in attrs):
            out[name] = "%16"
    return out


def _distinguish(rows: list[Row], raw: list[dict[str, str]]) -> None:
    """Set each row's variant to the constexprs / specializations that differ between the
    compiled variants of its kernel (the rest is common to all and only clutters the table)."""
    groups: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for i, r in enumerate(rows):
        groups[(r.source, r.kernel)].append(i)
    for idxs in groups.values():
        keys = sorted({k for i in idxs for k in raw[i]})
        differ = [k for k in keys if len({raw[i].get(k) for i in idxs}) > 1]
        for i in idxs:
            rows[i].variant = " ".join(f"{k}={raw[i][k]}" if raw[i].get(k) != "%16" else f"{k}%16"
                                       for k in differ if k in raw[i])


def triton_rows(workdir: str, log: Callable[[str], None]) -> tuple[list[Row], list[str]]:
    """Compile every workload through the stub driver; one Row per compiled kernel variant."""
    import importlib

    import torch
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("gpu_static: run without TRITON_INTERPRET=1 (interpreted kernels do not compile)")
    driver.set_active(_StubDriver.make())
    errors: list[str] = []
    torch.manual_seed(0)
    for name, call in triton_workloads():
        try:
            call()
        except Exception as exc:  # a compile error is a finding: report it and go on
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            log(f"  FAILED {name}: {type(exc).__name__}: {exc}")

    rows: list[Row] = []
    raw: list[dict[str, str]] = []
    declared: dict[tuple[str, str], object] = {}
    for modname in TRITON_MODULES:
        mod = importlib.import_module(modname)
        budgets = getattr(mod, "GPU_BUDGETS", {})
        for kname, b in budgets.items():
            declared[(modname, kname)] = b
        for attr, fn in sorted(vars(mod).items()):
            if not isinstance(fn, JITFunction):
                continue
            compiled = [ck for caches in fn.device_caches.values() for ck in caches[0].values()]
            for ck in compiled:
                budget = budgets.get(fn.__name__)
                regs, spills, stack = ptxas_usage(ck.asm["ptx"], "sm_90a", workdir)
                cubin = os.path.join(workdir, "k.cubin")
                with open(cubin, "wb") as f:
                    f.write(ck.asm["cubin"])
                mma, vec, n = sass_counts(_run([_tool("nvdisasm"), "-c", cubin]))
                warps = ck.metadata.num_warps
                smem = ck.metadata.shared
                dtype = _dtype_of(ck.src.signature, budget)
                row = Row(f"triton:{modname.rsplit('.', 1)[1]}", fn.__name__, "", dtype, warps, regs,
                          spills, stack, smem, occupancy(regs, warps, smem), mma, vec, n)
                row.problems = check(row, budget)
                rows.append(row)
                raw.append(_variant(ck))
    compiled_names = {(f"regkernels.triton.{r.source.split(':')[1]}", r.kernel) for r in rows}
    for key in sorted(declared):
        if key not in compiled_names:
            errors.append(f"{key[0]}.{key[1]}: a budget is declared but no workload compiled this kernel")
    _distinguish(rows, raw)
    rows.sort(key=lambda r: (r.source, r.kernel, r.dtype or "", r.variant))
    del triton
    return rows, errors


# ---------------------------------------------------------------- CUDA kernels
_BUDGET_LINE = re.compile(r"//\s*GPU_BUDGET\s+(\{.*\})\s*$")


def cuda_budgets(csrc: pathlib.Path) -> list[dict]:
    """The ``// GPU_BUDGET {...}`` declarations of every .cu file under ``csrc``."""
    out = []
    for path in sorted(csrc.rglob("*.cu")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            m = _BUDGET_LINE.search(line)
            if m:
                try:
                    spec = json.loads(m.group(1))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"gpu_static: {path}:{lineno}: GPU_BUDGET is not valid JSON: {exc}") from exc
                spec["_where"] = f"{path.name}:{lineno}"
                out.append(spec)
    return out


_RES_FN = re.compile(r"Function ([^\s:]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _split_sass(text: str) -> dict[str, str]:
    """cuobjdump -sass output → {mangled function name: its SASS text}."""
    parts: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            parts[current] = ""
        elif current:
            parts[current] += line + "\n"
    return parts


def _demangled_base(name: str) -> str:
    """``ns::kernel<args>`` of a mangled CUDA kernel name (namespaces and parameters dropped)."""
    try:
        dem = _run(["c++filt", name]).strip()
    except (RuntimeError, FileNotFoundError):
        return name
    dem = dem.replace("(anonymous namespace)::", "")
    m = re.match(r"(?:void\s+)?(?:\w+::)*(\w+(?:<[^()]*>)?)\(", dem)
    return m.group(1) if m else dem


def cuda_rows(so_path: str, csrc: pathlib.Path) -> tuple[list[Row], list[str]]:
    """One Row per sm_90 kernel in the built extension."""
    import torch
    from regkernels.triton._launch import Budget

    specs = cuda_budgets(csrc)
    res = _run([_tool("cuobjdump"), "-res-usage", "-arch", "sm_90", so_path])
    sass = _split_sass(_run([_tool("cuobjdump"), "-sass", "-arch", "sm_90", so_path]))
    rows, errors = [], []
    used: set[int] = set()
    for m in _RES_FN.finditer(res):
        name, regs, stack, shared, local = m.group(1), *map(int, m.group(2, 3, 4, 5))
        shared = max(0, shared - SMEM_RESERVED_PER_BLOCK)  # sm_90 cubins count the reserved 1 KiB
        matches = [i for i, s in enumerate(specs) if s["kernel"] in name]
        spec = specs[matches[0]] if matches else None
        used.update(matches)
        fields = {f.name for f in dataclasses.fields(Budget)}
        budget = Budget(**{k: (tuple(v) if k == "mma_dtypes" else v) for k, v in (spec or {}).items()
                           if k in fields}) if spec else None
        threads = (budget.threads if budget and budget.threads else 0)
        mma, vec, n = sass_counts(sass.get(name, ""))
        warps = threads // 32
        row = Row(f"cuda:{pathlib.Path(so_path).name.split('.')[0]}", _demangled_base(name), "", None, warps, regs,
                  stack + local, stack, shared, occupancy(regs, warps, shared) if warps else 0.0, mma, vec, n)
        row.problems = check(row, budget)
        if budget is not None and not budget.threads:
            row.problems.append("the CUDA budget must give the block size (\"threads\")")
        rows.append(row)
    for i, s in enumerate(specs):
        if i not in used:
            errors.append(f"{s['_where']}: GPU_BUDGET names kernel {s['kernel']!r}, which the built extension lacks")
    del torch
    return rows, errors


# ---------------------------------------------------------------- budgets
def check(row: Row, budget) -> list[str]:
    """The ways ``row`` breaks ``budget`` (a missing budget is one)."""
    if budget is None:
        return ["no GPU_BUDGET declared for this kernel"]
    problems = []
    if row.spill_bytes > budget.max_spill_bytes:
        problems.append(f"spills {row.spill_bytes} B > {budget.max_spill_bytes} B")
    if row.warps and row.occupancy + 1e-9 < budget.min_occupancy:
        problems.append(f"occupancy {row.occupancy:.0%} < {budget.min_occupancy:.0%}")
    if budget.max_registers is not None and row.regs > budget.max_registers:
        problems.append(f"{row.regs} registers > {budget.max_registers}")
    if row.dtype in budget.mma_dtypes and row.mma == 0:
        problems.append(f"no tensor-core instruction for {row.dtype}")
    if budget.vector_loads and row.vector_loads == 0:
        problems.append("no 64/128-bit global load")
    return problems


# ---------------------------------------------------------------- report
def render(rows: list[Row]) -> str:
    head = ("source", "kernel", "variant", "dtype", "warps", "regs", "spill B", "smem B", "occ", "mma", "vec ld",
            "SASS", "budget")
    table = [head] + [(r.source, r.kernel, r.variant[:60], r.dtype or "-", str(r.warps), str(r.regs),
                       str(r.spill_bytes), str(r.smem_bytes), f"{r.occupancy:.0%}", str(r.mma), str(r.vector_loads),
                       str(r.sass_instructions), "ok" if not r.problems else "; ".join(r.problems))
                      for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip() for t in table)


def summarize(rows: list[Row]) -> str:
    """One line per kernel over its compiled variants: register range, worst spill and occupancy,
    the dtypes whose variants use tensor cores, wide loads, and how many variants break the budget."""
    groups: dict[tuple[str, str], list[Row]] = collections.defaultdict(list)
    for r in rows:
        groups[(r.source, r.kernel.split("<")[0])].append(r)
    head = ("source", "kernel", "variants", "regs", "max spill B", "min occ", "mma in", "vec ld", "over budget")
    table = [head]
    for (src, kernel), rs in groups.items():
        mma = sorted({r.dtype or "-" for r in rs if r.mma})
        table.append((src, kernel, str(len(rs)), f"{min(r.regs for r in rs)}-{max(r.regs for r in rs)}",
                      str(max(r.spill_bytes for r in rs)), f"{min(r.occupancy for r in rs):.0%}",
                      ",".join(mma) or "none", f"{min(r.vector_loads for r in rs)}-{max(r.vector_loads for r in rs)}",
                      str(sum(1 for r in rs if r.problems))))
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip() for t in table)


def _extension_path() -> str | None:
    try:
        from regkernels import _C
    except ImportError:
        return None
    return getattr(_C, "__file__", None)


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m regkernels.bench.gpu_static", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write the rows and findings as JSON")
    ap.add_argument("--only", choices=("triton", "cuda"), help="one kind of kernel only")
    args = ap.parse_args(list(argv) if argv is not None else None)

    if os.environ.get("TRITON_INTERPRET") == "1":
        # kernels decorated while interpreted never compile: start again without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "regkernels.bench.gpu_static", *(argv or sys.argv[1:])],
                              env=env).returncode

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows: list[Row] = []
    errors: list[str] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as workdir:
        if args.only in (None, "triton"):
            try:
                import triton  # noqa: F401
            except ImportError:
                notes.append("Triton is not installed: no Triton kernel checked")
            else:
                r, e = triton_rows(workdir, log)
                rows += r
                errors += e
        if args.only in (None, "cuda"):
            from regkernels import _ext
            so = _extension_path()
            csrc = pathlib.Path(__file__).resolve().parents[2] / "csrc"
            if so is None or not _ext.HAS_C or not _ext.has_cuda_kernels():
                notes.append("the extension was built without its CUDA sources: no CUDA kernel checked")
            elif not csrc.is_dir():
                notes.append(f"no csrc/ beside the package ({csrc}): CUDA budgets unknown")
            else:
                r, e = cuda_rows(so, csrc)
                rows += r
                errors += e
    print(render(rows))
    print()
    print(summarize(rows))
    bad = [r for r in rows if r.problems]
    for n in notes:
        print(f"note: {n}")
    for e in errors:
        print(f"error: {e}")
    print(f"gpu_static: {len(rows)} compiled kernels (sm_90), {len(bad)} over budget, {len(errors)} errors")
    if args.json:
        try:
            import triton
            tv = triton.__version__
        except ImportError:
            tv = None
        payload = {"target": "sm_90 (H100/H200)", "triton": tv, "rows": [dataclasses.asdict(r) for r in rows],
                   "errors": errors, "notes": notes,
                   "occupancy_model": {"regs_per_sm": SM_REGS, "max_warps": SM_MAX_WARPS,
                                       "max_blocks": SM_MAX_BLOCKS, "smem_per_sm": SM_SMEM}}
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 1 if bad or errors else 0


if __name__ == "__main__":
    sys.exit(main())
