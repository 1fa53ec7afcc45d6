"""``python -m regkernels.bench``: time every op against its eager reference and torch.compile.

For each case and provider (``eager``, ``compile``, ``regkernels``, and any further provider a
case brings, e.g. ``torch`` for a named backend or ``model-step`` for a model's own training
step): one first call (compiles where needed; its output is checked against float64) and warm-up
calls; then the providers are timed round-robin, one call each per round, so drift of the machine
falls on all alike; median and p20/p80 in ms, peak memory of one call, and the ratios of the
regkernels provider against the others measured in the same run (and, where a case has a
``model-step`` provider, every provider's time as a multiple of it: ``x_model_step``). The machine's own ceilings (copy bandwidth, matmul
rate) are measured first, and cases that declare their bytes or flops report % of them.
Results go to ``--json PATH`` with the machine, the versions and how the run timed.

How one call is timed (``CallTimer``): on CPU, ``time.perf_counter`` around the call. On CUDA,
a pair of CUDA events recorded on the current stream around the call, read after the end
event completes: the GPU's own clock, free of the host's sync latency and timer jitter that a
wall clock around ``torch.cuda.synchronize`` adds to every sub-millisecond call. Before the
start event the device is synchronized, L2 is flushed (a write over a buffer twice its size,
as ``triton.testing.do_bench`` does) and synchronized again, so each call starts with an idle
GPU and a cold cache: the interval then holds the call's host launch work too wherever the
GPU waits on it (which is what a user of a host-bound op sees), and no provider's launches
overlap the previous provider's tail. CUDA calls get a longer warm-up (clocks ramp up from
idle, and the first launches load modules).

What is timed of a call (``--pass``, repeatable): ``both`` (the default) is the whole call,
forward + backward for the penalties; ``fwd`` the forward alone, with autograd recording as in
training; ``bwd`` the backward alone, its forward run untimed before each call (a ``Staged``
call). Cases list what they offer (``--list``); the split applies on CPU and CUDA alike.

Selecting: ``--op``, ``--case PATTERN`` (fnmatch), ``--tag KEY=VALUE``, ``--dtype``, ``--quick``;
``--threads N`` sets torch's thread count first.

Output: the run prints only its own lines. Third-party warnings and torch's log lines are off
while it runs (``quiet_third_party``), and the profiler that measures CPU memory has its C++
lines sent to /dev/null. On a terminal, stderr carries a progress line, ``[i/N] op case pass
provider`` with the time spent and an ETA, rewritten in place; piped or redirected, nothing of
it. Per row the JSON holds the ``pass``, ``dtype``, the case's ``params`` (its shape as a dict),
and the spread of its times: ``iqr_ms`` / ``iqr_rel`` next to median, p20 / p80, min / max. A
row whose IQR exceeds ``NOISY_IQR_REL`` of its median, or during whose timing other processes
used more CPU than the run leaves idle (``other_cpu_cores``: a steady load slows every call alike
and leaves the spread small), gets ``"noisy": true``, its ``noisy_reasons`` and a printed warning. The document also holds the machine (CPU model and flags, threads, torch's build and
CPU capability, the GPU), the git commit and whether the tree had uncommitted changes.

Ctrl-C stops the run and keeps what it measured: the finished cases go to ``--json`` with
``"partial": true`` and the case it stopped in, and the exit status is 130.

``--markdown`` prints the results as a markdown table (op, case, each provider's ms, speedups vs
eager and vs compile): ``--markdown`` alone for this run, ``--markdown PATH.json`` for a results
file, without running anything. ``--plot PNG`` draws the speedups (matplotlib, optional), of this
run or, with ``--markdown PATH.json``, of that file.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fnmatch
import io
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Callable, Iterator, TextIO

import torch

from regkernels.bench._case import PASSES, Staged
from regkernels.bench.cases import Case, Prepared, all_cases

PROVIDERS = ("eager", "compile", "regkernels")
# a case's own providers beyond PROVIDERS that the ratios name
MODEL_STEP = "model-step"
# the error of a standard provider that a case does not have (whole-model cases have no compile)
NO_PROVIDER = "no such provider for this case"


# ---------------------------------------------------------------- timing and memory
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stages(fn: Callable[[], Any]) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """(untimed part, timed part) of a call: a ``Staged`` call's own, else nothing and the call."""
    if isinstance(fn, Staged):
        return fn.before, fn.timed
    return (lambda: None), (lambda _state: fn())


@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """File descriptor 2 onto /dev/null for the block: the profiler's C++ side (kineto) writes a
    ``profiler_start`` / ``profiler_stop`` line per use and a ``gpuGetDeviceCount failed`` error
    on machines without a GPU straight to fd 2, past Python's ``sys.stderr``; its log-level
    variable (``KINETO_LOG_LEVEL``) does not reach the first kind. Only the memory measurement
    runs inside."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class CallTimer:
    """Times one call in ms: ``timer(fn)``. ``describe()`` says how, for the JSON.

    CPU: ``perf_counter`` around the call. CUDA: events around the call after a sync, an L2
    flush and a second sync (module docstring). ``event``, ``synchronize`` and ``flush`` are
    parameters so a test can drive the CUDA path with fakes on a machine without a GPU.
    """

    def __init__(self, device: torch.device, *, event: Callable[[], Any] | None = None,
                 synchronize: Callable[[], None] | None = None, flush: Callable[[], None] | None = None,
                 flush_bytes: int = 0):
        self.device = device
        self.cuda = device.type == "cuda"
        self.flush_bytes = flush_bytes
        if not self.cuda:
            return
        self._event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self._synchronize = synchronize or (lambda: torch.cuda.synchronize(device))
        if flush is None and flush_bytes:
            buf = torch.empty(flush_bytes // 4, dtype=torch.int32, device=device)
            flush = buf.zero_
        self._flush = flush or (lambda: None)

    @classmethod
    def for_device(cls, device: torch.device) -> "CallTimer":
        if device.type != "cuda":
            return cls(device)
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
        return cls(device, flush_bytes=2 * l2)

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Times ``fn()``; of a ``Staged`` call, only its ``timed`` part (``before`` runs first,
        outside the interval: on CUDA before the sync and the flush)."""
        before, timed = _stages(fn)
        state = before()
        if not self.cuda:
            t0 = time.perf_counter()
            timed(state)
            return (time.perf_counter() - t0) * 1e3
        start, end = self._event(), self._event()
        self._synchronize()
        self._flush()
        self._synchronize()  # the flush done: the start event fires as soon as it is recorded
        # the current stream of the current device: where the cases (``torch.device("cuda")``)
        # put their tensors and so where every provider launches
        start.record()
        timed(state)
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    def describe(self) -> dict:
        if not self.cuda:
            return {"method": "perf_counter", "per_call": "host wall clock around the call"}
        return {"method": "cuda_events",
                "per_call": "CUDA events on the current stream around the call; before it: device sync, "
                            "L2 flush, device sync",
                "l2_flush_bytes": self.flush_bytes}


def time_calls(fn: Callable[[], Any], timer: CallTimer, *, min_reps: int, max_reps: int,
               budget_s: float) -> list[float]:
    """Times in ms of individual calls (``timer``), at least ``min_reps``, then until ``budget_s``
    of wall time has passed or ``max_reps`` calls."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        times.append(timer(fn))
    return times


def warm_up(fn: Callable[[], Any], timer: CallTimer, quick: bool) -> int:
    """Untimed calls after the first: CUDA at least 3 and up to 0.25 s (clocks ramp up from idle,
    allocator pools fill); CPU as before, 1 (quick) or 3 calls within 0.5 s. Returns the count."""
    if timer.cuda:
        return len(time_calls(fn, timer, min_reps=3, max_reps=50, budget_s=0.25))
    return len(time_calls(fn, timer, min_reps=1 if quick else 3, max_reps=5, budget_s=0.5))


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes of tensor memory one call needs above what was allocated before it (of a ``Staged``
    call, its timed part: ``before`` runs first, outside the measurement).

    CUDA: the caching allocator's peak. CPU: the peak of the running sum of torch's CPU
    allocations and frees during the call, from the profiler's memory events (the resident
    set size cannot see it: glibc serves most blocks from memory it already holds). Memory that
    C++ code takes outside torch's allocator (std::vector, BLAS workspaces) is not counted.
    """
    before, timed = _stages(fn)
    state = before()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        timed(state)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    # the profiler's C++ side prints lines of its own on fd 2 (``_quiet_stderr_fd``); an
    # exception of the call still propagates
    with _quiet_stderr_fd():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            timed(state)
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)


def _vm_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_growth(fn: Callable[[], Any]) -> int | None:
    """Bytes by which the process's peak resident set rose above its resident set during one call
    (Linux: the kernel's high-water mark ``VmHWM`` reset through ``/proc/self/clear_refs``), or None
    where that is not available.

    Unlike ``peak_memory`` on CPU this sees every allocation that brings in new pages, torch's or
    not (std::vector, BLAS workspaces, thread stacks); it misses what the allocator serves from
    pages the process already holds, so it is a lower bound as well: read the two together.
    """
    before_call, timed = _stages(fn)
    state = before_call()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
    except OSError:
        return None
    before = _vm_kib("VmRSS")
    timed(state)
    peak = _vm_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


MEMORY = {"peak_mem_bytes": "CPU: peak of the running sum of torch's CPU allocations and frees during one call "
                            "(profiler memory events; memory taken outside torch's allocator is not counted); "
                            "CUDA: the caching allocator's peak above what was allocated before the call",
          "peak_rss_bytes": "CPU on Linux: growth of the process's peak resident set (VmHWM, reset before the call) "
                            "over its resident set during one call: counts any new pages, torch's or not, misses "
                            "memory reused from pages already held"}


# ---------------------------------------------------------------- machine ceilings
def measure_ceilings(device: torch.device, quick: bool, timer: CallTimer | None = None) -> dict:
    """The machine's own ceilings, measured in this run.

    ``copy_bandwidth_GBps``: ``dst.copy_(src)``, counted as bytes read + written (STREAM's
    convention; the write-allocate read of ``dst`` is not counted, so in-place kernels can
    exceed 100 % of it). ``inplace_add_bandwidth_GBps``: ``x.add_(y)``, two reads and one
    write of the same arrays, the access pattern of an optimizer step: the fair ceiling for
    in-place updates. ``matmul_fp32_GFLOPs``: a float32 ``m×m @ m×m``. Timed like the cases.
    """
    timer = timer or CallTimer.for_device(device)
    n = (1 << 26) if device.type == "cuda" else (1 << 25)  # 256 / 128 MiB of float32
    budget = 1.0 if quick else 3.0
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)

    def rate(fn, nbytes: int) -> float:
        t = time_calls(fn, timer, min_reps=5, max_reps=50, budget_s=budget)
        return round(nbytes / (_quantile(t, 0.5) * 1e-3) / 1e9, 2)

    out = {"copy_bandwidth_GBps": rate(lambda: dst.copy_(src), 2 * n * 4),
           "inplace_add_bandwidth_GBps": rate(lambda: dst.add_(src), 3 * n * 4), "stream_bytes": n * 4}
    m = 4096 if device.type == "cuda" else 1024
    a = torch.randn(m, m, device=device)
    b = torch.randn(m, m, device=device)
    t = time_calls(lambda: a @ b, timer, min_reps=3, max_reps=30, budget_s=budget)
    out.update(matmul_fp32_GFLOPs=round(2 * m ** 3 / (_quantile(t, 0.5) * 1e-3) / 1e9, 1), matmul_size=m)
    if device.type == "cuda":
        out["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return out


# the CPU features the kernels are built around: the CPU kernels vectorize for AVX2 + FMA
# (8 float32 lanes), and torch picks its own kernels by AVX2 / AVX-512
CPU_FLAGS = ("avx2", "avx512f", "fma")


def _cpuinfo() -> tuple[str | None, dict[str, bool | None]]:
    """CPU model and ``CPU_FLAGS`` (None: unknown), from /proc/cpuinfo on Linux; elsewhere
    ``platform``'s name and torch's own probes of AVX2 / AVX-512 (``torch.cpu``; none for FMA)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.readlines()
    except OSError:
        lines = []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
    flags = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), None)
    if flags is not None:
        return model or platform.processor() or None, {f: f in flags for f in CPU_FLAGS}
    probes = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported"}
    found = {f: getattr(torch.cpu, probes[f])() if hasattr(torch.cpu, probes.get(f, "")) else None for f in CPU_FLAGS}
    return model or platform.processor() or None, found


def machine_info(device: torch.device) -> dict:
    """The machine as far as it matters to the times: CPU model and flags, cores and torch's thread
    counts, torch's build (``torch.__config__.show()``) and the CPU kernels it dispatches to
    (``torch.backends.cpu.get_cpu_capability()``), memory, the GPU where the run is on one."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "device": str(device)}
    if hasattr(os, "getloadavg"):  # other work on a shared machine slows every provider (the 1-min mean)
        info["load_average_at_start"] = round(os.getloadavg()[0], 2)
    cpu, flags = _cpuinfo()
    info["cpu"] = cpu
    info["cpu_flags"] = flags
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["torch_config"] = torch.__config__.show()
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1])
        info["memory_GiB"] = round(mem / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device if device.type == "cuda" else 0)
        info["gpu"] = props.name
        info["gpu_memory_GiB"] = round(props.total_memory / 2 ** 30, 1)
        info["sm_count"] = props.multi_processor_count
    return info


def machine_line(info: dict) -> str:
    """One line for the header: CPU, its flags, threads, torch and its CPU capability, the GPU."""
    flags = info.get("cpu_flags") or {}
    flag_text = "flags " + " ".join(f if on else f"{f}?" if on is None else f"no-{f}" for f, on in flags.items())
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (f"{info.get('cpu') or 'unknown CPU'} ({info['cpu_count']} cores, {flag_text}), torch "
            f"{torch.__version__} (CPU capability {info['torch_cpu_capability']}), {info['torch_threads']} threads{gpu}")


def git_info() -> dict:
    """The commit the package was run from (``git rev-parse HEAD`` in its directory) and whether
    tracked files differed from it; both None where git or the repository is not there (an
    installed copy)."""
    import regkernels

    root = os.path.dirname(os.path.dirname(os.path.abspath(regkernels.__file__)))

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def versions() -> dict:
    import regkernels
    from regkernels import _ext

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "regkernels": regkernels.__version__,
           "extension": _ext.HAS_C, "extension_cuda": _ext.has_cuda_kernels() if _ext.HAS_C else False}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


# ---------------------------------------------------------------- running cases
def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]


def time_interleaved(fns: dict[str, Callable[[], Any]], timer: CallTimer, *, min_reps: int, max_reps: int,
                     budget_s: float) -> dict[str, list[float]]:
    """Round-robin timing: one call of each provider per round, so a drift of the machine
    (frequency, neighbours on a shared host) affects all providers alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < budget_s):
        for name, fn in fns.items():
            times[name].append(timer(fn))
        rounds += 1
    return times


def case_providers(prep: Prepared) -> list[str]:
    """The standard providers, then the case's own (``torch``, ``model-step``, …) in its order."""
    return list(PROVIDERS) + [p for p in prep.providers if p not in PROVIDERS]


# a row's timings are "noisy" when their interquartile range is above this fraction of their
# median (and there are at least NOISY_MIN_REPS of them: fewer give no quartiles worth the name).
# On a quiet 2-core VM (no other process: other_cpu_cores <= 0.03 on every row) the rows of a
# --quick run of every pass had a median IQR of 8 % of their median and a largest of 24 % (short
# calls, 30 rounds); 15 % flagged 15 of those 132 rows, so the limit is 30 %: a spread that wide
# means other work came and went during the row (a steady load is the other test's, below).
NOISY_IQR_REL = 0.30
NOISY_MIN_REPS = 5


def spread(times: list[float]) -> dict:
    """The statistics of one row's timings (ms): median, p20 / p80, min / max, the interquartile
    range ``iqr_ms`` and ``iqr_rel`` (IQR / median), ``reps`` and ``noisy`` (``NOISY_IQR_REL``)."""
    med = _quantile(times, 0.5)
    iqr = _quantile(times, 0.75) - _quantile(times, 0.25)
    rel = iqr / med if med > 0 else 0.0
    return {"median_ms": round(med, 4), "p20_ms": round(_quantile(times, 0.2), 4),
            "p80_ms": round(_quantile(times, 0.8), 4), "min_ms": round(min(times), 4), "max_ms": round(max(times), 4),
            "iqr_ms": round(iqr, 4), "iqr_rel": round(rel, 4), "reps": len(times),
            "noisy": len(times) >= NOISY_MIN_REPS and rel > NOISY_IQR_REL}


# a row's timings are also "noisy" when other work took CPU time while they were taken: a steady
# load (a build beside the run) slows every call alike, so the spread stays small while the medians
# grow (the eager β-LASSO step once took 1,512 ms under such a load against 25.8 ms on a quiet
# machine, with an IQR of a few percent). ``other_cpu_cores`` is the mean number of cores that
# something other than this process used during the row's timing window (``cpu_sample``: the
# machine's busy time from /proc/stat, hypervisor steal included, minus this process's CPU time);
# the row is noisy when that exceeds LOAD_OTHER_CORES plus the cores this run leaves idle
# (``cpu_count - torch threads``), over a window of at least LOAD_MIN_WINDOW_S (the kernel counts
# CPU time in 10 ms ticks, too coarse for shorter ones; a shorter timing is followed by an idle
# wait to that length, whose CPU use is then all other work's). Linux only; elsewhere None.
LOAD_OTHER_CORES = 0.25
LOAD_MIN_WINDOW_S = 0.25


def cpu_sample() -> tuple[float, float, float] | None:
    """(monotonic wall s, the machine's busy CPU-seconds so far, this process's CPU-seconds so
    far), or None where /proc/stat is missing. Busy = user + nice + system + irq + softirq +
    steal of the aggregate ``cpu`` line (guest time is inside user already)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        if fields[0] != "cpu":
            return None
        ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / hz
    return time.monotonic(), busy, time.process_time()


def other_cpu_cores(start, end) -> float | None:
    """The mean number of cores busy with anything but this process between two ``cpu_sample``s,
    or None when either is missing or the window is shorter than LOAD_MIN_WINDOW_S."""
    if start is None or end is None or end[0] - start[0] < LOAD_MIN_WINDOW_S:
        return None
    other = (end[1] - start[1]) - (end[2] - start[2])
    return round(max(0.0, other) / (end[0] - start[0]), 2)


def load_is_noisy(other_cores: float | None, cpu_count: int | None = None, threads: int | None = None) -> bool:
    """Whether ``other_cores`` of other work competed with this run: over LOAD_OTHER_CORES beyond
    the cores the run leaves idle (``cpu_count`` minus torch's ``threads``)."""
    if other_cores is None:
        return False
    cpu_count = cpu_count or os.cpu_count() or 1
    threads = threads or torch.get_num_threads()
    return other_cores > LOAD_OTHER_CORES + max(0, cpu_count - threads)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def case_passes(case: Case, requested: list[str] | None = None) -> list[str]:
    """The passes of ``case`` to time for the ``--pass`` values ``requested`` (default ``both``):
    ``both`` is the case's whole call (its forward where it has no backward), ``fwd`` / ``bwd``
    are timed where the case offers them (``Case.passes``)."""
    out: list[str] = []
    for want in requested or ["both"]:
        label = case.passes[0] if want == "both" else want
        if label in case.passes and label not in out:
            out.append(label)
    return out


def run_case(case: Case, device: torch.device, ceilings: dict, quick: bool, log: Callable[[str], None],
             timer: CallTimer | None = None, rounds: int | None = None, passes: list[str] | None = None,
             status: Callable[[str], None] | None = None) -> list[dict]:
    """Rows of one case: per pass (``case_passes``; default the whole call) and provider a checked
    first call and warm-up, then interleaved timing (``rounds``: exactly that many rounds after a
    single warm-up call, instead of the quick / full time budgets). ``status(text)`` is told what
    runs now (the progress line)."""
    timer = timer or CallTimer.for_device(device)
    status = status or (lambda text: None)
    passes = passes or case_passes(case)
    base = {"dtype": _dtype_name(case.dtype), "params": dict(case.params)}
    status("setup")
    try:
        prep = case.setup(device)
    except Exception as exc:  # a case that cannot be built here is recorded, not fatal
        return [{"op": case.op, "case": case.name, "provider": p, "pass": name, **base,
                 "error": f"setup: {_error_text(exc)}"} for name in passes for p in PROVIDERS]
    out_rows: list[dict] = []
    for name in passes:
        part = prep if name == case.passes[0] else prep.passes.get(name)
        if part is None:
            out_rows += [{"op": case.op, "case": case.name, "provider": p, "pass": name, **base,
                          "error": f"the case's setup gave no {name!r} pass"} for p in PROVIDERS]
            continue
        rows = _run_pass(case, part, name, base, device, ceilings, quick, timer, rounds,
                         reset=part.reset or prep.reset, status=status)
        for row in rows:
            log(f"  {case.op:28s} {case.name:28s} {name:4s} {row['provider']:10s} "
                + (f"{row['median_ms']:10.3f} ms" if "median_ms" in row else f"error: {row.get('error')}"))
            if row.get("noisy"):
                log(f"  noisy: {case.op} {case.name} {name} {row['provider']}: {_noise_text(row)}: "
                    "the machine was busy; rerun before trusting its ratios")
        _add_ratios(rows)
        note = part.note or prep.note
        if note:
            for r in rows:
                r["note"] = note
        out_rows += rows
    return out_rows


def _noise_text(row: dict) -> str:
    """Why ``row`` is noisy, in words (``noisy_reasons``)."""
    parts = []
    if "spread" in row.get("noisy_reasons", ["spread"]):
        parts.append(f"the IQR of its times, {row['iqr_ms']:.3g} ms, is {100 * row['iqr_rel']:.0f} % of the median "
                     f"{row['median_ms']:.3g} ms (over {100 * NOISY_IQR_REL:.0f} %)")
    if "load" in row.get("noisy_reasons", []):
        parts.append(f"other processes used {row['other_cpu_cores']} cores while it was timed (over "
                     f"{LOAD_OTHER_CORES} beyond the {max(0, (os.cpu_count() or 1) - torch.get_num_threads())} "
                     "this run leaves idle)")
    return "; ".join(parts)


def _run_pass(case: Case, prep: Prepared, pass_name: str, base: dict, device: torch.device, ceilings: dict,
              quick: bool, timer: CallTimer, rounds: int | None, reset: Callable[[], None] | None,
              status: Callable[[str], None]) -> list[dict]:
    names = case_providers(prep)
    rows = {p: {"op": case.op, "case": case.name, "provider": p, "pass": pass_name, **base} for p in names}
    ready: dict[str, Callable[[], Any]] = {}
    for provider in names:
        fn = prep.providers.get(provider)
        row = rows[provider]
        if fn is None:
            row["error"] = NO_PROVIDER
            continue
        status(f"{pass_name} {provider}")
        try:
            if reset is not None:
                reset()
            t0 = time.perf_counter()
            out = fn()  # first call: compiles for the compile provider
            _sync(device)
            row["first_call_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
            row["max_rel_err"] = prep.error(out) if prep.error is not None else None
            del out
            row["warmup_calls"] = warm_up(fn, timer, quick or rounds is not None)
            ready[provider] = fn
        except Exception as exc:
            row["error"] = _error_text(exc)
    if rounds is not None:
        reps = dict(min_reps=rounds, max_reps=rounds, budget_s=0.0)
    else:
        reps = dict(min_reps=5 if quick else 10, max_reps=30 if quick else 200,
                    budget_s=len(ready) * (1.0 if quick else 4.0))
    status(f"{pass_name} timing {', '.join(ready)}")
    before = cpu_sample()
    try:
        times = time_interleaved(ready, timer, **reps)
    except Exception as exc:
        times = {}
        for provider in ready:
            rows[provider]["error"] = _error_text(exc)
    if before is not None and time.monotonic() - before[0] < LOAD_MIN_WINDOW_S:
        # too short for /proc/stat's 10 ms ticks: the window is extended by idling (this process
        # then takes no CPU, so what the machine is busy with is other work's)
        time.sleep(LOAD_MIN_WINDOW_S - (time.monotonic() - before[0]) + 0.01)
    other = other_cpu_cores(before, cpu_sample())
    for provider, ts in times.items():
        row = rows[provider]
        status(f"{pass_name} memory {provider}")
        row.update(spread(ts), other_cpu_cores=other, peak_mem_bytes=peak_memory(ready[provider], device))
        reasons = ["spread"] if row["noisy"] else []
        if load_is_noisy(other):
            reasons.append("load")
        row["noisy"] = bool(reasons)
        if reasons:
            row["noisy_reasons"] = reasons
        if device.type == "cpu":
            row["peak_rss_bytes"] = peak_rss_growth(ready[provider])
        sec = row["median_ms"] * 1e-3
        if prep.bytes_moved:
            row["GBps"] = round(prep.bytes_moved / sec / 1e9, 2)
            row["pct_copy_bandwidth"] = round(100 * row["GBps"] / ceilings["copy_bandwidth_GBps"], 1)
            row["pct_inplace_add_bandwidth"] = round(100 * row["GBps"] / ceilings["inplace_add_bandwidth_GBps"], 1)
        if prep.flops:
            row["GFLOPs"] = round(prep.flops / sec / 1e9, 2)
            row["pct_matmul_fp32"] = round(100 * row["GFLOPs"] / ceilings["matmul_fp32_GFLOPs"], 1)
    return [rows[p] for p in names]


def _add_ratios(rows: list[dict]) -> None:
    """Speedups of the regkernels provider over every other provider of the case from the same
    run (``speedup_vs_<provider>``; not over ``model-step``, which computes something else), and
    where the case has a model step, each provider's time as a multiple of it (``x_model_step``)."""
    by = {r["provider"]: r for r in rows if "median_ms" in r}
    k = by.get("regkernels")
    if k is not None:
        for other, r in by.items():
            if other not in ("regkernels", MODEL_STEP):
                k[f"speedup_vs_{other}"] = round(r["median_ms"] / k["median_ms"], 3)
    step = by.get(MODEL_STEP)
    if step is not None:
        for name, r in by.items():
            if name != MODEL_STEP:
                r["x_model_step"] = round(r["median_ms"] / step["median_ms"], 3)


# the dtypes --dtype takes (the cases state theirs: Case.dtype)
DTYPES = ("float16", "bfloat16", "float32", "float64")


def select_cases(ops: list[str] | None, quick: bool, device: torch.device, names: list[str] | None = None,
                 tags: list[str] | None = None, dtypes: list[str] | None = None,
                 passes: list[str] | None = None) -> list[Case]:
    """The cases for ``device``: of the ``ops`` (all if None), whose name matches one of the
    ``names`` patterns (fnmatch, e.g. ``resnet18-cifar`` or ``*-circular``), whose tags hold every
    ``KEY=VALUE`` of ``tags``, whose dtype is one of ``dtypes``, that offer one of the ``passes``
    (``case_passes``), and quick if ``quick``."""
    cases = [c for c in all_cases() if device.type in c.devices]
    if ops:
        known = sorted({c.op for c in cases})
        unknown = [o for o in ops if o not in known]
        if unknown:
            raise SystemExit(f"regkernels.bench: unknown --op {', '.join(unknown)}; known ops: {', '.join(known)}")
        cases = [c for c in cases if c.op in ops]
    if names:
        unmatched = [n for n in names if not any(fnmatch.fnmatchcase(c.name, n) for c in cases)]
        if unmatched:
            raise SystemExit(f"regkernels.bench: --case {', '.join(unmatched)} matches no case"
                             + (f" of --op {', '.join(ops)}" if ops else "") + "; --list shows them")
        cases = [c for c in cases if any(fnmatch.fnmatchcase(c.name, n) for n in names)]
    for tag in tags or []:
        key, sep, value = tag.partition("=")
        if not sep:
            raise SystemExit(f"regkernels.bench: --tag takes KEY=VALUE; got {tag!r}")
        cases = [c for c in cases if str(c.tags.get(key)) == value]
    if tags and not cases:
        raise SystemExit(f"regkernels.bench: no case has the tags {', '.join(tags)}")
    if dtypes:
        have = sorted({_dtype_name(c.dtype) for c in cases})
        cases = [c for c in cases if _dtype_name(c.dtype) in dtypes]
        if not cases:
            raise SystemExit(f"regkernels.bench: no selected case runs in --dtype {', '.join(dtypes)}; "
                             f"their dtypes: {', '.join(have)}")
    if passes:
        cases = [c for c in cases if case_passes(c, passes)]
        if not cases:
            raise SystemExit(f"regkernels.bench: no selected case offers --pass {', '.join(passes)}; "
                             "--list shows each case's passes")
    if quick:
        cases = [c for c in cases if c.quick]
    return cases


# ---------------------------------------------------------------- progress
def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """``[i/N] op case pass provider  this case 3s, elapsed 1m02s, ETA 4m10s`` on one terminal
    line, rewritten in place (``\\r``) on every change and every ``tick_s`` from a background
    thread, so a long case shows that it is alive. Writes nothing unless ``stream`` is a terminal
    (a log file or a pipe gets only the runner's own lines). The ETA is the mean time of the
    cases done so far times the cases left."""

    def __init__(self, total: int, stream: TextIO | None = None, tick_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.total, self.tick_s, self.clock = total, tick_s, clock
        self.done = 0
        self.index, self.label, self.stage = 0, "", ""
        self.t0 = self.case_t0 = clock()
        self._width = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._thread = threading.Thread(target=self._tick, name="regkernels.bench progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._clear()

    def start_case(self, index: int, case: Case) -> None:
        self.index, self.label, self.stage, self.case_t0 = index, f"{case.op} {case.name}", "", self.clock()
        self.draw()

    def end_case(self) -> None:
        self.done += 1

    def status(self, stage: str) -> None:
        self.stage = stage
        self.draw()

    def line(self) -> str:
        now = self.clock()
        elapsed = now - self.t0
        eta = _duration(elapsed / self.done * (self.total - self.done)) if self.done else "?"
        what = " ".join(part for part in (f"[{self.index}/{self.total}]", self.label, self.stage) if part)
        return f"{what}  this case {_duration(now - self.case_t0)}, elapsed {_duration(elapsed)}, ETA {eta}"

    def draw(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            # longer than the terminal, the line would wrap and \r would no longer reach its start
            text = self.line()[:max(20, shutil.get_terminal_size().columns - 1)]
            self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
            self.stream.flush()
            self._width = len(text)

    def print(self, msg: str, file: TextIO) -> None:
        """``msg`` on a line of its own (above the progress line, which is drawn again after it)."""
        with self._lock:
            self._clear()
            print(msg, file=file, flush=True)
        self.draw()

    def _clear(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def _tick(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.draw()


# ---------------------------------------------------------------- third-party noise
@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Third-party warnings off for the block (dynamo's "does not know how to trace" and
    inductor's FutureWarnings, printed while the compile providers compile), regkernels' own kept;
    torch's loggers at ERROR (inductor logs "No CUDA runtime is found" on a CPU-only machine)."""
    names = ["torch"] + [n for n in logging.root.manager.loggerDict if n.startswith("torch.")]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("default", module=r"regkernels(\.|$)")
        for lg in loggers:
            lg.setLevel(max(lg.level, logging.ERROR))
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


# ---------------------------------------------------------------- the command
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m regkernels.bench", description=__doc__.split("\n\n")[0],
                                 epilog="Exit status: 0, 1 when a regkernels provider failed, 130 after Ctrl-C "
                                        "(the cases done so far are written to --json, marked \"partial\": true).")
    ap.add_argument("--op", action="append", help="public op name to run (repeatable); default: all")
    ap.add_argument("--case", action="append", metavar="PATTERN",
                    help="case name or fnmatch pattern (repeatable), e.g. resnet18-cifar or '*-circular'")
    ap.add_argument("--tag", action="append", metavar="KEY=VALUE",
                    help="only cases tagged so (repeatable), e.g. issue=16 for the cases of issue 16")
    ap.add_argument("--dtype", action="append", choices=DTYPES,
                    help="only cases whose inputs have this dtype (repeatable); the cases are float32 today")
    ap.add_argument("--pass", dest="passes", action="append", choices=PASSES,
                    help="what to time of a call (repeatable): both = the whole call (forward + backward, or "
                         "the forward of a forward-only op; the default), fwd = the forward alone (with autograd "
                         "recording, as in training), bwd = the backward alone (its forward runs untimed before "
                         "each call); fwd and bwd select the cases that offer them (--list shows which)")
    ap.add_argument("--quick", action="store_true", help="the small case of every op, few repetitions")
    ap.add_argument("--rounds", type=int, default=None, metavar="N",
                    help="exactly N timed rounds per case after one warm-up call (default: quick 5-30 rounds "
                         "within 1 s per provider, full 10-200 within 4 s)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--json", metavar="PATH", help="write the results JSON here")
    ap.add_argument("--markdown", nargs="*", default=None, metavar="JSON",
                    help="print the results as a markdown table: with JSON files, of their rows (those --op, --case, "
                         "--pass, --dtype select; several files add a run column), without running anything: the "
                         "README's benchmark tables are this output; alone, of this run (after the plain table)")
    ap.add_argument("--plot", metavar="PNG",
                    help="draw regkernels' speedups vs eager and vs compile per op and case to this PNG (needs "
                         "matplotlib); of --markdown's JSON when given, else of this run")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="torch.set_num_threads(N) first (default: torch's; the JSON records the count)")
    ap.add_argument("--update-readme", metavar="README",
                    help="regenerate the benchmark tables of this README in place (each between a "
                         "'<!-- bench-table: --markdown FILE.json ... -->' marker and '<!-- bench-table:end -->' is "
                         "that --markdown output) and exit")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--support-matrix", action="store_true",
                    help="print the README's support matrix (markdown, from the backend tables) and exit")
    args = ap.parse_args(argv)
    if args.support_matrix:
        from regkernels.bench.support import support_matrix

        print(support_matrix())
        return 0
    if args.update_readme:
        with open(args.update_readme) as f:
            text, n = update_readme(f.read(), os.path.dirname(os.path.abspath(args.update_readme)))
        with open(args.update_readme, "w") as f:
            f.write(text)
        print(f"regenerated {n} benchmark tables in {args.update_readme}")
        return 0
    if args.plot:
        _pyplot()  # fail before a run, not after it
    if args.markdown:  # results files: render them, run nothing
        docs = []
        for path in args.markdown:
            try:
                with open(path) as f:
                    docs.append((path, json.load(f)))
            except (OSError, ValueError) as exc:
                raise SystemExit(f"regkernels.bench: --markdown cannot read {path}: {exc}; give JSON files that "
                                 "--json wrote, or --markdown alone to render this run") from None
        if args.tag:
            raise SystemExit("regkernels.bench: --tag does not apply to --markdown FILE (results files do not "
                             "record tags); select rows with --op, --case, --pass or --dtype")
        table = render_markdown(docs, ops=args.op, names=args.case, passes=args.passes, dtypes=args.dtype)
        if table.count("\n|") < 2:
            raise SystemExit(f"regkernels.bench: --markdown: no row of {', '.join(args.markdown)} matches the "
                             "--op / --case / --pass / --dtype given")
        print(table)
        if args.plot:
            # the rows of the table, under the first file's machine
            plot({"results": [r for _, d in docs for r in select_rows(d.get("results", []), args.op, args.case,
                                                                       args.passes, args.dtype)],
                  "machine": docs[0][1].get("machine", {}), "partial": any(d.get("partial") for _, d in docs)},
                 args.plot)
            print(f"wrote {args.plot}")
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("regkernels.bench: --device cuda but no CUDA device is available")
    for flag in ("rounds", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"regkernels.bench: --{flag} must be >= 1; got {getattr(args, flag)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cases = select_cases(args.op, args.quick, device, args.case, args.tag, args.dtype, args.passes)
    if args.list:
        for c in cases:
            tags = " ".join(f"{k}={v}" for k, v in c.tags.items())
            print(f"{c.op:28s} {c.name:28s} {_dtype_name(c.dtype):8s} {'/'.join(c.passes):12s}"
                  f"{'  (quick)' if c.quick else ''}{'  ' + tags if tags else ''}")
        return 0

    tty = sys.stderr.isatty()
    with Progress(len(cases)) as progress:
        def log(msg: str) -> None:
            progress.print(msg, sys.stderr if tty else sys.stdout)

        doc, interrupted = _run(args, argv, cases, device, log, progress)
    _print_summary(doc["results"])
    if args.markdown == []:
        print()
        print(render_markdown(doc))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}" + (" (partial)" if interrupted else ""))
    if args.plot and speedup_series(doc)[0]:
        plot(doc, args.plot)
        print(f"wrote {args.plot}")
    elif args.plot:
        print(f"regkernels.bench: no regkernels speedup measured, {args.plot} not drawn", file=sys.stderr)
    if interrupted:
        where = (f"{len(doc['results'])} rows ({doc['cases_done']} of {doc['cases_selected']} cases done)"
                 + (f" written to {args.json}, marked \"partial\": true" if args.json else "; no --json given, nothing written"))
        print(f"regkernels.bench: interrupted (Ctrl-C) during {doc['interrupted_at']}: {where}", file=sys.stderr)
        return 130
    failed = [r for r in doc["results"] if r["provider"] == "regkernels" and "error" in r]
    return 1 if failed and not all("setup" in r["error"] or "ValueError" in r["error"] for r in failed) else 0


def _run(args: argparse.Namespace, argv: list[str] | None, cases: list[Case], device: torch.device,
         log: Callable[[str], None], progress: Progress) -> tuple[dict, bool]:
    """The run: header, ceilings, the cases; returns the results document and whether Ctrl-C cut
    it short (then it holds the cases done before, ``"partial": true``)."""
    log(f"regkernels.bench on {device}: {len(cases)} cases" + (" (quick)" if args.quick else ""))
    timer = CallTimer.for_device(device)
    machine = machine_info(device)  # before the runs: its load average is the one they start under
    git = git_info()
    log(f"  machine: {machine_line(machine)}")
    log(f"  commit: {git['commit'] or 'unknown (not a git checkout)'}" + (" (uncommitted changes)" if git["dirty"] else ""))
    load = machine.get("load_average_at_start")
    if load is not None and load > 1 + (os.cpu_count() or 1) / 2:  # this process itself counts as one
        log(f"  warning: load average {load} on {os.cpu_count()} cores at the start: other work is running, "
            "times will be noisy (rows say \"noisy\")")
    results: list[dict] = []
    ceilings: dict = {}
    at = "the ceilings"
    done = 0
    try:
        with quiet_third_party():
            progress.status("measuring the machine's ceilings")
            ceilings = measure_ceilings(device, args.quick, timer)
            log(f"  ceilings: copy {ceilings['copy_bandwidth_GBps']} GB/s, in-place add "
                f"{ceilings['inplace_add_bandwidth_GBps']} GB/s, fp32 matmul {ceilings['matmul_fp32_GFLOPs']} GFLOP/s")
            for i, case in enumerate(cases, 1):
                at = f"{case.op} {case.name}"
                progress.start_case(i, case)
                results += run_case(case, device, ceilings, args.quick, log, timer, rounds=args.rounds,
                                    passes=case_passes(case, args.passes), status=progress.status)
                progress.end_case()
                done = i
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    timing = dict(timer.describe(), first_call="host wall clock to a device sync (includes compiles)",
                  warmup="CUDA: >= 3 calls and up to 0.25 s; CPU: 1 (quick or --rounds) or 3 calls",
                  rounds="round-robin, one call of each provider per round; median, p20, p80, min, max"
                         + (f"; exactly {args.rounds} rounds (--rounds)" if args.rounds is not None else ""),
                  spread=f"iqr_ms = p75 - p25 of the row's times, iqr_rel = iqr_ms / median_ms; noisy: at least "
                         f"{NOISY_MIN_REPS} reps and iqr_rel > {NOISY_IQR_REL} (noisy_reasons 'spread'), or "
                         f"other_cpu_cores (the mean cores other processes used, hypervisor steal included, while "
                         f"the pass was timed; Linux /proc/stat, windows >= {LOAD_MIN_WINDOW_S} s) over "
                         f"{LOAD_OTHER_CORES} beyond cpu_count - torch_threads (noisy_reasons 'load')",
                  passes="both: the whole call; fwd: the forward alone; bwd: the backward alone (its forward "
                         "runs before each call, untimed)")
    doc = {"machine": machine, "versions": versions(), "git": git, "ceilings": ceilings, "timing": timing,
           "memory": {k: v for k, v in MEMORY.items() if device.type == "cpu" or k == "peak_mem_bytes"},
           "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python -m regkernels.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
           "partial": interrupted, "cases_selected": len(cases), "cases_done": done, "results": results}
    if interrupted:
        doc["interrupted_at"] = at
    if hasattr(os, "getloadavg"):
        doc["machine"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    return doc, interrupted


def _groups(results: list[dict]) -> dict[tuple[str, str, str], dict[str, dict]]:
    """Rows by (op, case, pass), then by provider, in the order of the run."""
    groups: dict[tuple[str, str, str], dict[str, dict]] = {}
    for r in results:
        groups.setdefault((r["op"], r["case"], r.get("pass", "both")), {})[r["provider"]] = r
    return groups


def _print_summary(results: list[dict]) -> None:
    """The table of the standard providers, then for cases with providers of their own (``torch``,
    ``model-step``) one line per provider with its time, regkernels' speedup over it and its
    multiple of the model step; peak memory per provider. ``noisy`` marks a case with a noisy row."""
    print(f"{'op':28s} {'case':28s} {'pass':4s} {'eager ms':>10s} {'compile ms':>11s} {'regk ms':>10s} "
          f"{'vs eager':>9s} {'vs comp':>8s} {'max rel err':>12s}")
    cases = _groups(results)

    def ms(r):
        return f"{r['median_ms']:.3f}" if r and "median_ms" in r else "err"

    for (op, name, pass_name), by in cases.items():
        k = by.get("regkernels", {})
        err = k.get("max_rel_err")
        noisy = [p for p, r in by.items() if r.get("noisy")]
        print(f"{op:28s} {name:28s} {pass_name:4s} {ms(by.get('eager')):>10s} {ms(by.get('compile')):>11s} "
              f"{ms(k):>10s} {k.get('speedup_vs_eager', float('nan')):9.2f} "
              f"{k.get('speedup_vs_compile', float('nan')):8.2f} {(f'{err:.2e}' if isinstance(err, float) else '-'):>12s}"
              + (f"  noisy: {', '.join(noisy)}" if noisy else ""))
    extra = {key: by for key, by in cases.items() if set(by) - set(PROVIDERS)}
    if not extra:
        return
    print()
    print(f"{'op':28s} {'case':28s} {'pass':4s} {'provider':10s} {'median ms':>10s} {'min ms':>10s} {'regk vs it':>10s} "
          f"{'x model-step':>12s} {'peak MB':>8s} {'rss MB':>7s} {'max rel err':>12s}")
    for (op, name, pass_name), by in extra.items():
        speed = by.get("regkernels", {})
        for provider, r in by.items():
            if "median_ms" not in r:
                print(f"{op:28s} {name:28s} {pass_name:4s} {provider:10s} {'error: ' + str(r.get('error'))[:90]}")
                continue
            vs = speed.get(f"speedup_vs_{provider}")
            mb = (lambda b: f"{b / 1e6:.1f}" if isinstance(b, int) else "-")
            err = r.get("max_rel_err")
            print(f"{op:28s} {name:28s} {pass_name:4s} {provider:10s} {r['median_ms']:10.2f} {r['min_ms']:10.2f} "
                  f"{(f'{vs:.2f}' if vs is not None else '-'):>10s} "
                  f"{(str(r['x_model_step']) if 'x_model_step' in r else '-'):>12s} "
                  f"{mb(r.get('peak_mem_bytes')):>8s} {mb(r.get('peak_rss_bytes')):>7s} "
                  f"{(f'{err:.2e}' if isinstance(err, float) else '-'):>12s}"
                  + ("  noisy" if r.get("noisy") else ""))


# ---------------------------------------------------------------- --markdown and --plot
def _ms_cell(r: dict | None) -> str:
    if r is None or r.get("error") == NO_PROVIDER:
        return ""
    if "median_ms" not in r:
        return str(r.get("error", "error")).removeprefix("setup: ").split(":")[0]  # the exception's type
    ms = r["median_ms"]
    text = f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"
    return text + (" †" if r.get("noisy") else "")


def select_rows(results: list[dict], ops: list[str] | None = None, names: list[str] | None = None,
                passes: list[str] | None = None, dtypes: list[str] | None = None) -> list[dict]:
    """The rows of a results file that ``--op`` / ``--case`` (fnmatch) / ``--pass`` / ``--dtype``
    select (``--markdown JSON``): a row without a ``pass`` or ``dtype`` (files written before the
    runner recorded them) is a whole call ("both") in float32, as every case then was. As when
    running, "both" is a case's whole call: the "fwd" rows of a forward-only case (one with no
    "both" rows) are its whole call too."""
    split = {(r["op"], r["case"]) for r in results if r.get("pass", "both") == "both"}

    def pass_of(r: dict) -> set[str]:
        label = r.get("pass", "both")
        return {label, "both"} if label == "fwd" and (r["op"], r["case"]) not in split else {label}

    def keep(r: dict) -> bool:
        return ((not ops or r["op"] in ops) and (not names or any(fnmatch.fnmatchcase(r["case"], n) for n in names))
                and (not passes or bool(pass_of(r) & set(passes)))
                and (not dtypes or r.get("dtype", "float32") in dtypes))

    return [r for r in results if keep(r)]


def _rate_cell(k: dict) -> str:
    """regkernels' rate against the run's ceiling: GB/s and % of the in-place add_ (or copy)
    bandwidth, or GFLOP/s and % of the fp32 matmul rate; empty where the case declares neither."""
    if "GBps" in k:
        pct, of = (k["pct_inplace_add_bandwidth"], "add_") if "pct_inplace_add_bandwidth" in k else (
            k.get("pct_copy_bandwidth"), "copy")
        return f"{k['GBps']:.3g} GB/s, {pct:.0f} % of {of}" if pct is not None else f"{k['GBps']:.3g} GB/s"
    if "GFLOPs" in k:
        pct = k.get("pct_matmul_fp32")
        return f"{k['GFLOPs']:.3g} GFLOP/s, {pct:.0f} % of matmul" if pct is not None else f"{k['GFLOPs']:.3g} GFLOP/s"
    return ""


def _run_link(path: str) -> str:
    """A results file as a markdown link named by its file name without ``.json``."""
    return f"[{os.path.basename(path).removesuffix('.json')}]({path})"


def _run_line(doc: dict) -> str:
    machine, git = doc.get("machine", {}), doc.get("git") or {}
    commit = git.get("commit")
    return (f"{machine.get('cpu') or 'unknown CPU'}, {machine.get('torch_threads', '?')} threads, device "
            f"{machine.get('device', '?')}, torch {doc.get('versions', {}).get('torch', '?')}, commit "
            f"{commit[:12] if commit else 'not recorded'}{' (uncommitted changes)' if git.get('dirty') else ''}, "
            f"{doc.get('timestamp', '')}")


def render_markdown(docs: dict | list[tuple[str, dict]], *, ops: list[str] | None = None,
                    names: list[str] | None = None, passes: list[str] | None = None,
                    dtypes: list[str] | None = None) -> str:
    """Results as a markdown table (the README's benchmark tables are this function's output,
    ``--markdown FILE.json ...``): op, case (and pass where a case has several), each provider's
    median ms, regkernels' speedups vs eager and vs compile, its rate against the run's ceilings
    where the case declares bytes or flops, and with several files the run each row comes from;
    † marks a noisy row. ``docs``: one results document, or (path, document) pairs; the rows are
    those ``select_rows`` keeps, in the files' order."""
    sources = [("", docs)] if isinstance(docs, dict) else list(docs)
    groups: dict[tuple[int, str, str, str], dict[str, dict]] = {}
    for i, (_, doc) in enumerate(sources):
        for (op, name, pass_name), by in _groups(select_rows(doc.get("results", []), ops, names, passes,
                                                             dtypes)).items():
            groups[(i, op, name, pass_name)] = by
    extra = [p for by in groups.values() for p in by if p not in PROVIDERS]
    providers = list(PROVIDERS) + list(dict.fromkeys(extra))
    passes_of: dict[tuple[int, str, str], set] = {}
    for i, op, name, pass_name in groups:
        passes_of.setdefault((i, op, name), set()).add(pass_name)
    show_pass = any(len(p) > 1 for p in passes_of.values())
    show_rate = any(_rate_cell(by.get("regkernels", {})) for by in groups.values())
    show_run = len(sources) > 1
    head = (["op", "case"] + (["pass"] if show_pass else []) + [f"{p} ms" for p in providers]
            + ["vs eager", "vs compile"] + (["regkernels rate"] if show_rate else []) + (["run"] if show_run else []))
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (i, op, name, pass_name), by in groups.items():
        k = by.get("regkernels", {})
        ratios = [f"{k[key]:.2f}×" if key in k else "—" for key in ("speedup_vs_eager", "speedup_vs_compile")]
        cells = ([f"`{op}`", name] + ([pass_name] if show_pass else []) + [_ms_cell(by.get(p)) for p in providers]
                 + ratios + ([_rate_cell(k)] if show_rate else [])
                 + ([_run_link(sources[i][0])] if show_run else []))
        lines.append("| " + " | ".join(cells) + " |")
    used = sorted({i for i, *_ in groups})
    if show_run:
        notes = [f"{_run_link(sources[i][0])}: {_run_line(sources[i][1])}." for i in used]
    else:
        notes = [_run_line(sources[0][1]) + "."]
    rows = [r for by in groups.values() for r in by.values()]
    if any(r.get("noisy") for r in rows):
        notes.append(f"† noisy: the interquartile range of the row's times is over {100 * NOISY_IQR_REL:.0f} % of "
                     "its median, or other processes took CPU time while it was timed (the machine was busy); its "
                     "ratios are suspect.")
    for i in used:
        if sources[i][1].get("partial"):
            notes.append(f"Partial run{' ' + sources[i][0] if show_run else ''}: interrupted during "
                         f"{sources[i][1].get('interrupted_at')}.")
    return "\n".join(lines) + "\n\n" + "  \n".join(notes)


# a README table generated by --markdown: the marker holds the arguments, the body is their output
README_TABLE = re.compile(r"(<!-- bench-table: (?P<args>[^>]*?) -->\n)(?P<body>(?:(?!<!-- bench-table).)*?)"
                          r"(<!-- bench-table:end -->)", re.S)


def update_readme(text: str, root: str) -> tuple[str, int]:
    """``text`` with every README benchmark table regenerated: between ``<!-- bench-table: ARGS -->``
    and ``<!-- bench-table:end -->`` goes the output of ``python -m regkernels.bench ARGS`` (ARGS
    start with ``--markdown FILE.json``; paths relative to ``root``, the README's directory).
    Returns the text and the number of tables."""
    count = 0

    def table(m: re.Match) -> str:
        nonlocal count
        args = shlex.split(m.group("args"))
        if not args or args[0] != "--markdown" or len(args) < 2 or args[1].startswith("-"):
            raise SystemExit(f"regkernels.bench: a README bench-table marker must start with --markdown FILE.json; "
                             f"got {m.group('args')!r}")
        out = io.StringIO()
        with contextlib.chdir(root), contextlib.redirect_stdout(out):
            main(args)
        count += 1
        return m.group(1) + out.getvalue().rstrip("\n") + "\n" + m.group(4)

    return README_TABLE.sub(table, text), count


def speedup_series(doc: dict) -> tuple[list[str], dict[str, list[float | None]]]:
    """Labels ``op case [pass]`` and, per baseline (eager, compile), regkernels' speedup over it
    (None where not measured): what ``--plot`` draws."""
    labels: list[str] = []
    series: dict[str, list[float | None]] = {"eager": [], "compile": []}
    groups = _groups(doc.get("results", []))
    for (op, name, pass_name), by in groups.items():
        k = by.get("regkernels", {})
        if not any(f"speedup_vs_{b}" in k for b in series):
            continue
        labels.append(f"{op} {name}" + (f" [{pass_name}]" if pass_name != "both" else ""))
        for b in series:
            series[b].append(k.get(f"speedup_vs_{b}"))
    return labels, series


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("regkernels.bench: --plot needs matplotlib, which is not installed (pip install matplotlib, or "
                         "the package's plot extra: pip install --no-build-isolation '.[plot]'); "
                         "--json and --markdown work without it") from None
    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    return plt


def plot(doc: dict, path: str) -> None:
    """Horizontal bars of regkernels' speedup vs eager and vs compile per op and case (log scale,
    a line at 1×) to the PNG ``path``."""
    plt = _pyplot()
    labels, series = speedup_series(doc)
    if not labels:
        raise SystemExit("regkernels.bench: --plot: no row has a regkernels speedup to draw")
    height = 0.38
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.32 * len(labels)))
    ys = list(range(len(labels)))
    for j, (baseline, values) in enumerate(series.items()):
        ax.barh([y + (j - 0.5) * height for y in ys], [v if v is not None else 0 for v in values], height,
                label=f"vs {baseline}")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of regkernels (ratio of medians, log scale)")
    machine = doc.get("machine", {})
    ax.set_title(f"regkernels.bench on {machine.get('device', '?')}: {machine.get('cpu') or ''}"
                 + (" (partial run)" if doc.get("partial") else ""), fontsize=9)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
