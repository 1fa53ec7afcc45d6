"""Training-loop pieces (docs/nn.md): the model-level ``Regularizer``, the ``SVBProjector``
schedule, the adversarial kernel regularizer with its kernel banks, and the initializers of
``regkernels.nn.init`` (``orthogonal_``, ``delta_orthogonal_``)."""
from regkernels.nn import init
from regkernels.nn.adversarial import AdversarialKernelRegularizer, gabor_bank, harvest_kernels
from regkernels.nn.regularizer import KINDS, Regularizer, SVBProjector

__all__ = ["init", "KINDS", "Regularizer", "SVBProjector", "AdversarialKernelRegularizer", "gabor_bank", "harvest_kernels"]
