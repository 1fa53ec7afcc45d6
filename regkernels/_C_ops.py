"""The Python side of the C++ ops (``torch.ops.regkernels.*``, schemas in csrc/regkernels.cpp).

For every C++ op: its fake (``register_fake``, for torch.compile and opcheck) and its autograd,
and the functions the families' backend tables name for the ``"cpu"`` and ``"cuda"`` backends
(they adapt the public arguments to the op's schema). Imported by ``regkernels._ext`` once the
extension has loaded; never imported when it has not. One section per op family.
"""
from __future__ import annotations

import torch


# ============================================================================ gram family
# (fakes, autograd and table entries of gram_penalty_fwd / gram_penalty_bwd)

# ============================================================================ end of gram family


# ============================================================================ conv family
# (fakes, autograd and table entries of conv_to_matrix_dense(_backward), conv_frame_stats* ...)

# ============================================================================ end of conv family


# ============================================================================ svd family
# (fakes, autograd and table entries of batched_svd; the Sedghi conv singular values)

# ============================================================================ end of svd family


# ============================================================================ beta_lasso family
# (fake and table entry of beta_lasso_step_)

# ============================================================================ end of beta_lasso family
