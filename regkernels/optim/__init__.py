"""Optimizers: ``BetaLasso`` (docs/beta_lasso.md#update-rule)."""
from regkernels.optim.beta_lasso import BetaLasso

__all__ = ["BetaLasso"]
