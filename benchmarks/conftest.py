"""pytest-benchmark suites over the runner's cases (regkernels/bench/cases_*.py).

    python -m pytest benchmarks --benchmark-json=bench.json            # the quick cases
    REGKERNELS_BENCH_ALL=1 python -m pytest benchmarks                  # every case
    python -m pytest benchmarks --benchmark-compare                     # against a saved run

The runner (python -m regkernels.bench) is the main job and writes benchmarks/results/*.json;
these suites give the same cases pytest-benchmark's statistics and comparison tooling.
"""
