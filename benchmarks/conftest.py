"""pytest-benchmark suites over the runner's cases (regkernels/bench/cases_*.py).

    python -m pytest benchmarks --benchmark-json=bench.json            # the quick cases
    REGKERNELS_BENCH_ALL=1 python -m pytest benchmarks                  # every case
    python -m pytest benchmarks --benchmark-compare                     # against a saved run
    python -m pytest benchmarks -k "fwd or bwd"                         # forward / backward alone
    python -m pytest -q benchmarks --benchmark-disable                  # each call once: a smoke test

The runner (python -m regkernels.bench) is the main job and writes benchmarks/results/*.json;
these suites give the same cases pytest-benchmark's statistics and comparison tooling. Each case
runs per pass as the runner's ``--pass`` names them: ``both`` (the whole call), and ``fwd`` /
``bwd`` where the case times them apart (the backward's forward runs in the untimed setup).
"""
