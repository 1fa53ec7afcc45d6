"""The benchmark runner: ``python -m regkernels.bench`` (see runner.py)."""
