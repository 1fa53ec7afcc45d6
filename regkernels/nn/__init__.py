"""Training-loop pieces (SPEC §5.1, §6): the model-level ``Regularizer``, the ``SVBProjector``
schedule and the adversarial kernel regularizer."""
from regkernels.nn.regularizer import KINDS, Regularizer, SVBProjector

__all__ = ["KINDS", "Regularizer", "SVBProjector"]
