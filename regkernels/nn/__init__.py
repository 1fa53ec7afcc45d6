"""Training-loop pieces (docs/nn.md): the model-level ``Regularizer``, the ``SVBProjector``
schedule and the adversarial kernel regularizer with its kernel banks."""
from regkernels.nn.adversarial import AdversarialKernelRegularizer, gabor_bank, harvest_kernels
from regkernels.nn.regularizer import KINDS, Regularizer, SVBProjector

__all__ = ["KINDS", "Regularizer", "SVBProjector", "AdversarialKernelRegularizer", "gabor_bank", "harvest_kernels"]
