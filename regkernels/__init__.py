"""regkernels: fast, exact kernels for neural-network weight regularizers.

The contract of every op is in docs/ (one page per op family); every op takes a keyword-only
``backend=None|"reference"|"torch"|"cpu"|"cuda"|"triton"`` (docs/index.md#backends).
"""
__version__ = "0.1.0"

from regkernels._ext import HAS_C as _HAS_C  # noqa: F401, E402  (loads the extension or warns once)
from regkernels.ops.gram import (
    as_matrix,
    diversity_penalty,
    frame_bounds,
    frame_penalty,
    gershgorin_bounds,
    mhe_penalty,
    orthogonality_penalty,
    penalty_multi,
    srip_penalty,
)
from regkernels.ops.conv import (
    clip_conv_singular_values,
    conv_frame_penalty,
    conv_frame_penalty_multi,
    conv_gershgorin_bounds,
    conv_orthogonality_penalty,
    conv_orthogonality_penalty_multi,
    conv_singular_values,
    conv_spectral_norm,
    conv_to_matrix,
)
from regkernels.ops.svd import batched_svd, clamp_singular_values, svb_
from regkernels.ops.jacobian import jacobian_penalty
from regkernels import nn, optim, reference  # noqa: E402

__all__ = [
    "as_matrix", "frame_penalty", "gershgorin_bounds", "frame_bounds", "diversity_penalty",
    "orthogonality_penalty", "mhe_penalty", "srip_penalty", "penalty_multi",
    "conv_to_matrix", "conv_frame_penalty", "conv_frame_penalty_multi", "conv_gershgorin_bounds",
    "conv_orthogonality_penalty", "conv_orthogonality_penalty_multi",
    "conv_singular_values", "clip_conv_singular_values", "conv_spectral_norm",
    "batched_svd", "clamp_singular_values", "svb_", "jacobian_penalty",
    "nn", "optim", "reference",
]
