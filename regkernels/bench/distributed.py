"""``python -m regkernels.bench.distributed [--world 2 4] [--width 64] [--repeat 3] [--json PATH]``:
what regkernels communicates per call on FSDP2-sharded weights, against the naive gather
(docs/distributed.md#measured).

The CIFAR ResNet-18 of the ``resnet18-cifar`` cases (``cifar_resnet18(width)``, its 20 convs and
the Linear head), float32, sharded with ``fully_shard`` per conv / Linear and at the root, in N
CPU processes with gloo (one thread each). Per entry point, rank 0 reports:

* ``collectives`` / ``bytes``: what regkernels issued (``regkernels.distributed.comm_counts``:
  bytes received per rank) and ``c10d``, the collectives c10d saw (``CommDebugMode``), for one
  call: a ``Regularizer`` forward + backward of each kind, ``stats()``, ``svb_``;
* ``naive``: the same for the workaround every rank could use without regkernels' support,
  ``penalty_multi([w.full_tensor() for w in weights])`` (one all-gather per parameter);
* ``ms``: wall time of the call, median and min–max over ``--repeat`` calls (the penalty itself is
  computed on every rank, so the time is dominated by it; the gather's part is ``gather_ms``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

KINDS = {"frame": dict(A=0.5, B=2.0), "orthogonality": {}, "diversity": dict(tau=0.3),
         "conv_frame": dict(A=0.5, B=2.0), "ocnn": {}}


def _timed(fn, repeat: int) -> tuple[object, dict]:
    times, out = [], None
    for _ in range(repeat):
        dist.barrier()
        t = time.perf_counter()
        out = fn()
        times.append(1e3 * (time.perf_counter() - t))
    return out, {"median": statistics.median(times), "min": min(times), "max": max(times)}


def _counted(fn) -> dict:
    """One call of ``fn``: regkernels' count and c10d's."""
    from torch.distributed.tensor.debug import CommDebugMode

    from regkernels import distributed as D

    D.reset_comm_counts()
    with CommDebugMode() as comm:
        fn()
    return {**D.comm_counts(), "c10d": comm.get_total_counts()}


def _measure(world: int, width: int, repeat: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    import regkernels as rk
    from regkernels.bench.cases_conv import cifar_resnet18
    from regkernels.nn import Regularizer

    model = cifar_resnet18(width)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    for m in layers:
        fully_shard(m)
    fully_shard(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out: dict = {"world": world, "width": width, "layers": len(layers), "weight_bytes": weight_bytes, "calls": {}}
    weights = [m.weight for m in layers]

    def naive_gather():
        return [w.full_tensor() for w in weights]

    def naive():
        full = naive_gather()
        return rk.penalty_multi(full, "frame", A=0.5, B=2.0, groups=[getattr(m, "groups", 1) for m in layers])

    for kind, kw in KINDS.items():
        reg = Regularizer(model, kind, 1.0, **kw)
        model(x)  # conv input sizes

        def call(reg=reg):
            reg().backward()

        row = _counted(call)
        _, row["ms"] = _timed(call, repeat)
        out["calls"][f"Regularizer[{kind}]"] = row
        reg.remove_hooks()
    from regkernels import distributed as D

    row = _counted(lambda: D.gather(weights))
    _, row["gather_ms"] = _timed(lambda: D.gather(weights), repeat)
    out["calls"]["gather (the weights, bucketed)"] = row
    # the naive gather: bytes are the full tensors' as the ring moves them
    row = _counted(naive_gather)
    row["collectives"], row["bytes"] = len(weights), int(weight_bytes * (world - 1) / world)
    _, row["gather_ms"] = _timed(naive_gather, repeat)
    out["calls"]["naive: [w.full_tensor() for w in weights]"] = row
    row = _counted(lambda: naive().sum().backward())
    row["collectives"], row["bytes"] = len(weights), int(weight_bytes * (world - 1) / world)
    _, row["ms"] = _timed(lambda: naive().sum().backward(), repeat)
    out["calls"]["naive: penalty_multi(full_tensor()s, 'frame') fwd+bwd"] = row
    reg = Regularizer(model, "frame", 1.0, A=0.5, B=2.0)
    row = _counted(reg.stats)
    _, row["ms"] = _timed(reg.stats, 1)
    out["calls"]["Regularizer.stats()"] = row
    row = _counted(lambda: rk.svb_(model, 0.5))
    _, row["ms"] = _timed(lambda: rk.svb_(model, 0.5), repeat)
    out["calls"]["svb_(model, 0.5)"] = row
    return out


def _worker(rank: int, world: int, init: str, width: int, repeat: int, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        res = _measure(world, width, repeat)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def run(world: int, width: int = 64, repeat: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "out.json")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), width, repeat, out_file), nprocs=world, join=True)
        with open(out_file) as f:
            return json.load(f)


def _table(res: dict) -> str:
    lines = [f"world {res['world']}, ResNet-18 width {res['width']}: {res['layers']} weights, "
             f"{res['weight_bytes'] / 2**20:.1f} MiB",
             f"{'call':<56} {'collectives':>11} {'c10d':>5} {'MiB/rank':>9} {'ms (median)':>12}"]
    for name, row in res["calls"].items():
        ms = row.get("ms", row.get("gather_ms"))
        lines.append(f"{name:<56} {row['collectives']:>11} {row['c10d']:>5} {row['bytes'] / 2**20:>9.2f} "
                     f"{ms['median']:>12.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    results = []
    for world in args.world:
        res = run(world, args.width, args.repeat)
        results.append(res)
        print(_table(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
