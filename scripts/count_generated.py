"""Count the generated tests per (family, backend, device), from pytest's collection.

    python -m pytest tests/test_generated.py --collect-only -q | python scripts/count_generated.py

Ids are ``<op>-<backend>-<device>-<dtype>-<sample>``; ``oracle`` (reference vs oracle), ``default``
(torch.func on backend=None), ``bad`` and ``<backend> (refused)`` (a named backend the table cannot run
on CPU tensors must raise) are counted under those names in the backend column.
"""
import collections
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from op_cases import CASES  # noqa: E402

FAMILY = {c.name: c.family for c in CASES}
ID = re.compile(r"::(test_\w+)\[([A-Za-z_]+)-([a-z]+)-([a-z]+)")

counts = collections.Counter()
tests = collections.Counter()
for line in sys.stdin:
    m = ID.search(line)
    if not m:
        continue
    test, op, backend, device = m.groups()
    if backend in ("bad",):
        device = "-"
    if test == "test_named_backend_refused":
        backend += " (refused)"
    counts[(FAMILY.get(op, "?"), backend, device if device in ("cpu", "cuda") else "-")] += 1
    tests[test] += 1
print(f"{'family':12s} {'backend':18s} {'device':6s} {'tests':>6s}")
for (family, backend, device), n in sorted(counts.items()):
    print(f"{family:12s} {backend:18s} {device:6s} {n:6d}")
print(f"total {sum(counts.values())}")
print("per test function: " + ", ".join(f"{k} {v}" for k, v in sorted(tests.items())))
