"""Training-loop pieces (docs/nn.md): the model-level ``Regularizer``, the ``SVBProjector``
schedule, the adversarial kernel regularizer with its kernel banks, ``spectrum`` (every layer's
operator spectrum and bounds in one table), and the initializers of ``regkernels.nn.init``
(``orthogonal_``, ``delta_orthogonal_``)."""
from regkernels.nn import init
from regkernels.nn.adversarial import AdversarialKernelRegularizer, gabor_bank, harvest_kernels
from regkernels.nn.regularizer import KINDS, NETWORK_KEY, Regularizer, SVBProjector
from regkernels.nn.spectrum import Spectrum, spectrum

__all__ = ["init", "KINDS", "NETWORK_KEY", "Regularizer", "SVBProjector", "AdversarialKernelRegularizer", "gabor_bank",
           "harvest_kernels", "spectrum", "Spectrum"]
