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
"""
from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import json
import os
import platform
import sys
import time
from typing import Any, Callable

import torch

from regkernels.bench.cases import Case, Prepared, all_cases

PROVIDERS = ("eager", "compile", "regkernels")
# a case's own providers beyond PROVIDERS that the ratios name
MODEL_STEP = "model-step"


# ---------------------------------------------------------------- timing and memory
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = self._event(), self._event()
        self._synchronize()
        self._flush()
        self._synchronize()  # the flush done: the start event fires as soon as it is recorded
        # the current stream of the current device: where the cases (``torch.device("cuda")``)
        # put their tensors and so where every provider launches
        start.record()
        fn()
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
    """Bytes of tensor memory one call needs above what was allocated before it.

    CUDA: the caching allocator's peak. CPU: the peak of the running sum of torch's CPU
    allocations and frees during the call, from the profiler's memory events (the resident
    set size cannot see it: glibc serves most blocks from memory it already holds). Memory that
    C++ code takes outside torch's allocator (std::vector, BLAS workspaces) is not counted.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
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
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
    except OSError:
        return None
    before = _vm_kib("VmRSS")
    fn()
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


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if hasattr(os, "getloadavg"):  # other work on a shared machine slows every provider (the 1-min mean)
        info["load_average_at_start"] = round(os.getloadavg()[0], 2)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1])
        info["memory_GiB"] = round(mem / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_GiB"] = round(props.total_memory / 2 ** 30, 1)
        info["sm_count"] = props.multi_processor_count
    return info


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


def run_case(case: Case, device: torch.device, ceilings: dict, quick: bool, log: Callable[[str], None],
             timer: CallTimer | None = None, rounds: int | None = None) -> list[dict]:
    """Rows of one case: per provider a checked first call and warm-up, then interleaved timing
    (``rounds``: exactly that many rounds after a single warm-up call, instead of the quick / full
    time budgets)."""
    timer = timer or CallTimer.for_device(device)
    try:
        prep = case.setup(device)
    except Exception as exc:  # a case that cannot be built here is recorded, not fatal
        return [{"op": case.op, "case": case.name, "provider": p, "error": f"setup: {_error_text(exc)}"}
                for p in PROVIDERS]
    names = case_providers(prep)
    rows = {p: {"op": case.op, "case": case.name, "provider": p} for p in names}
    ready: dict[str, Callable[[], Any]] = {}
    for provider in names:
        fn = prep.providers.get(provider)
        row = rows[provider]
        if fn is None:
            row["error"] = "no such provider for this case"
            continue
        try:
            if prep.reset is not None:
                prep.reset()
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
    try:
        times = time_interleaved(ready, timer, **reps)
    except Exception as exc:
        times = {}
        for provider in ready:
            rows[provider]["error"] = _error_text(exc)
    for provider, ts in times.items():
        row = rows[provider]
        row.update(median_ms=round(_quantile(ts, 0.5), 4), p20_ms=round(_quantile(ts, 0.2), 4),
                   p80_ms=round(_quantile(ts, 0.8), 4), min_ms=round(min(ts), 4), max_ms=round(max(ts), 4),
                   reps=len(ts), peak_mem_bytes=peak_memory(ready[provider], device))
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
    out_rows = [rows[p] for p in names]
    for row in out_rows:
        log(f"  {case.op:28s} {case.name:28s} {row['provider']:10s} "
            + (f"{row['median_ms']:10.3f} ms" if "median_ms" in row else f"error: {row.get('error')}"))
    _add_ratios(out_rows)
    if prep.note:
        for r in out_rows:
            r["note"] = prep.note
    return out_rows


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


def select_cases(ops: list[str] | None, quick: bool, device: torch.device, names: list[str] | None = None,
                 tags: list[str] | None = None) -> list[Case]:
    """The cases for ``device``: of the ``ops`` (all if None), whose name matches one of the
    ``names`` patterns (fnmatch, e.g. ``resnet18-cifar`` or ``*-circular``), whose tags hold every
    ``KEY=VALUE`` of ``tags``, and quick if ``quick``."""
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
    if quick:
        cases = [c for c in cases if c.quick]
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m regkernels.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", action="append", help="public op name to run (repeatable); default: all")
    ap.add_argument("--case", action="append", metavar="PATTERN",
                    help="case name or fnmatch pattern (repeatable), e.g. resnet18-cifar or '*-circular'")
    ap.add_argument("--tag", action="append", metavar="KEY=VALUE",
                    help="only cases tagged so (repeatable), e.g. issue=16 for the cases of issue 16")
    ap.add_argument("--quick", action="store_true", help="the small case of every op, few repetitions")
    ap.add_argument("--rounds", type=int, default=None, metavar="N",
                    help="exactly N timed rounds per case after one warm-up call (default: quick 5-30 rounds "
                         "within 1 s per provider, full 10-200 within 4 s)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--json", metavar="PATH", help="write the results JSON here")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="torch.set_num_threads(N) first (default: torch's; the JSON records the count)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--support-matrix", action="store_true",
                    help="print the README's support matrix (markdown, from the backend tables) and exit")
    args = ap.parse_args(argv)
    if args.support_matrix:
        from regkernels.bench.support import support_matrix

        print(support_matrix())
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("regkernels.bench: --device cuda but no CUDA device is available")
    for flag in ("rounds", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"regkernels.bench: --{flag} must be >= 1; got {getattr(args, flag)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cases = select_cases(args.op, args.quick, device, args.case, args.tag)
    if args.list:
        for c in cases:
            tags = " ".join(f"{k}={v}" for k, v in c.tags.items())
            print(f"{c.op:28s} {c.name:28s}{'  (quick)' if c.quick else ''}{'  ' + tags if tags else ''}")
        return 0

    tty = sys.stderr.isatty()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if tty else sys.stdout, flush=True)

    log(f"regkernels.bench on {device}: {len(cases)} cases" + (" (quick)" if args.quick else ""))
    timer = CallTimer.for_device(device)
    machine = machine_info(device)  # before the runs: its load average is the one they start under
    ceilings = measure_ceilings(device, args.quick, timer)
    log(f"  ceilings: copy {ceilings['copy_bandwidth_GBps']} GB/s, in-place add {ceilings['inplace_add_bandwidth_GBps']} GB/s, "
        f"fp32 matmul {ceilings['matmul_fp32_GFLOPs']} GFLOP/s")
    results: list[dict] = []
    for case in cases:
        results += run_case(case, device, ceilings, args.quick, log, timer, rounds=args.rounds)

    timing = dict(timer.describe(), first_call="host wall clock to a device sync (includes compiles)",
                  warmup="CUDA: >= 3 calls and up to 0.25 s; CPU: 1 (quick or --rounds) or 3 calls",
                  rounds="round-robin, one call of each provider per round; median, p20, p80, min, max"
                         + (f"; exactly {args.rounds} rounds (--rounds)" if args.rounds is not None else ""))
    doc = {"machine": machine, "versions": versions(), "ceilings": ceilings, "timing": timing,
           "memory": {k: v for k, v in MEMORY.items() if device.type == "cpu" or k == "peak_mem_bytes"},
           "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python -m regkernels.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
           "results": results}
    if hasattr(os, "getloadavg"):
        doc["machine"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    _print_summary(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    failed = [r for r in results if r["provider"] == "regkernels" and "error" in r]
    return 1 if failed and not all("setup" in r["error"] or "ValueError" in r["error"] for r in failed) else 0


def _print_summary(results: list[dict]) -> None:
    """The table of the standard providers, then for cases with providers of their own (``torch``,
    ``model-step``) one line per provider with its time, regkernels' speedup over it and its
    multiple of the model step; peak memory per provider."""
    print(f"{'op':28s} {'case':28s} {'eager ms':>10s} {'compile ms':>11s} {'regk ms':>10s} "
          f"{'vs eager':>9s} {'vs comp':>8s} {'max rel err':>12s}")
    cases: dict[tuple[str, str], dict[str, dict]] = {}
    for r in results:
        cases.setdefault((r["op"], r["case"]), {})[r["provider"]] = r

    def ms(r):
        return f"{r['median_ms']:.3f}" if r and "median_ms" in r else "err"

    for (op, name), by in cases.items():
        k = by.get("regkernels", {})
        err = k.get("max_rel_err")
        print(f"{op:28s} {name:28s} {ms(by.get('eager')):>10s} {ms(by.get('compile')):>11s} {ms(k):>10s} "
              f"{k.get('speedup_vs_eager', float('nan')):9.2f} {k.get('speedup_vs_compile', float('nan')):8.2f} "
              f"{(f'{err:.2e}' if isinstance(err, float) else '-'):>12s}")
    extra = {key: by for key, by in cases.items() if set(by) - set(PROVIDERS)}
    if not extra:
        return
    print()
    print(f"{'op':28s} {'case':28s} {'provider':10s} {'median ms':>10s} {'min ms':>10s} {'regk vs it':>10s} "
          f"{'x model-step':>12s} {'peak MB':>8s} {'rss MB':>7s} {'max rel err':>12s}")
    for (op, name), by in extra.items():
        speed = by.get("regkernels", {})
        for provider, r in by.items():
            if "median_ms" not in r:
                print(f"{op:28s} {name:28s} {provider:10s} {'error: ' + str(r.get('error'))[:90]}")
                continue
            vs = speed.get(f"speedup_vs_{provider}")
            mb = (lambda b: f"{b / 1e6:.1f}" if isinstance(b, int) else "-")
            err = r.get("max_rel_err")
            print(f"{op:28s} {name:28s} {provider:10s} {r['median_ms']:10.2f} {r['min_ms']:10.2f} "
                  f"{(f'{vs:.2f}' if vs is not None else '-'):>10s} "
                  f"{(str(r['x_model_step']) if 'x_model_step' in r else '-'):>12s} "
                  f"{mb(r.get('peak_mem_bytes')):>8s} {mb(r.get('peak_rss_bytes')):>7s} "
                  f"{(f'{err:.2e}' if isinstance(err, float) else '-'):>12s}")
