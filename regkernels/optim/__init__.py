"""Optimizers: ``BetaLasso`` (SPEC §4)."""
from regkernels.optim.beta_lasso import BetaLasso

__all__ = ["BetaLasso"]
