"""Pure-torch references of every op (docs/): the test oracle, the CPU fallback and the
benchmark baseline. Written for reading; one module per op family."""
from regkernels.reference.beta_lasso import beta_lasso_update_
from regkernels.reference.conv import (
    clip_conv_singular_values,
    conv_frame_penalty,
    conv_gershgorin_bounds,
    conv_orthogonality_penalty,
    conv_singular_values,
    conv_to_matrix,
)
from regkernels.reference.gram import (
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
from regkernels.reference.jacobian import jacobian_penalty
from regkernels.reference.svd import batched_svd, clamp_singular_values, svb_

__all__ = [
    "beta_lasso_update_", "as_matrix", "frame_penalty", "gershgorin_bounds", "frame_bounds",
    "diversity_penalty", "orthogonality_penalty", "mhe_penalty", "srip_penalty", "penalty_multi",
    "conv_to_matrix", "conv_frame_penalty", "conv_gershgorin_bounds", "conv_orthogonality_penalty",
    "conv_singular_values", "clip_conv_singular_values", "batched_svd", "clamp_singular_values", "svb_",
    "jacobian_penalty",
]
