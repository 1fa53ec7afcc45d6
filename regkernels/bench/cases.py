"""Every benchmark case, one list per op family (``cases_<family>.py``), joined here."""
from __future__ import annotations

from regkernels.bench import cases_conv, cases_gram, cases_optim, cases_svd
from regkernels.bench._case import Case, Prepared, Staged, compiled, max_rel_err, penalty_case

__all__ = ["Case", "Prepared", "Staged", "all_cases", "penalty_case", "max_rel_err", "compiled"]

FAMILIES = (cases_gram, cases_conv, cases_svd, cases_optim)


def all_cases() -> list[Case]:
    """The cases of every family, in family order; (op, name) pairs are unique."""
    cases = [c for family in FAMILIES for c in family.CASES]
    seen: set[tuple[str, str]] = set()
    for c in cases:
        if (c.op, c.name) in seen:
            raise ValueError(f"duplicate benchmark case {c.op}/{c.name}")
        seen.add((c.op, c.name))
    return cases
