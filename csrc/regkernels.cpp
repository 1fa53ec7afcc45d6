// Every op schema of regkernels._C, in one place (DESIGN.md). Implementations live in
// cpu/<op>_cpu.cpp and cuda/<op>_cuda.cu; fake (meta) implementations are registered in Python.
#include <Python.h>
#include <torch/library.h>

#include "beta_lasso_args.h"

namespace regkernels {

bool built_with_cuda() {
#ifdef REGKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace regkernels

TORCH_LIBRARY(regkernels, m) {
  m.def("built_with_cuda() -> bool", &regkernels::built_with_cuda);
  // Fused β-LASSO step (docs/beta_lasso.md#update-rule) over all tensors of one (device, dtype). Per tensor i:
  // hyper[6i:6i+6] = (lr, lam, beta·lam, momentum, 1 − dampening, weight_decay),
  // flags[3i:3i+3] = (use momentum, nesterov, first step). Updates params and bufs in place
  // and returns the int64 count of non-zeros of each updated parameter. params, grads and
  // (with momentum) bufs match per tensor in shape, dtype and device and are contiguous, or share
  // one dense layout (same strides, no gaps or overlap: updated as flat storage); the written
  // tensors (params, bufs with momentum) must not share memory (checked: they are updated
  // concurrently).
  m.def(
      "beta_lasso_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, float[] hyper, int[] flags) "
      "-> Tensor");
  // Counters of beta_lasso_step_'s launch-plan cache (csrc/beta_lasso_args.h), process-wide: [plans built,
  // cache hits, launches / chunks / 16-byte-aligned tensors of the last call]. For tests.
  m.def("_beta_lasso_plan_stats() -> int[]", &regkernels::beta_lasso_plan_stats_list);
  // Gram-matrix penalties (docs/gram.md) of many matrices in one call. mats[i] is (..., m, n)
  // (its leading dims flattened to one batch of b_i matrices),
  // sides[i] 0 = rows (W Wᵀ) / 1 = cols (Wᵀ W); kind 'frame' | 'diversity' | 'orthogonality' | 'mhe'
  // with params (A, B) | (tau, inclusive) | (squared) | (s, half, eps). Returns the
  // values (Σ b_i, in the math dtype: float32, or float64 for float64 mats) and, with need_grad,
  // per entry the (b_i, k, k) coefficients P with dR/dW = P·W (rows) or W·P (cols). params must be
  // finite (mhe: s in {0, 1, 2}, eps > 0). A matrix with NaN/Inf gives a NaN value and NaN
  // coefficients (+inf for orthogonality with an Inf entry), the others are unaffected.
  // Differentiable once: a create_graph=True backward gives the gradient, differentiating it raises.
  m.def(
      "gram_penalty_fwd(Tensor[] mats, str kind, int[] sides, float[] params, bool need_grad) "
      "-> (Tensor, Tensor[])");
  // dW_i = grad_b · P_b · W_b (rows) or grad_b · W_b · P_b (cols), in the dtype of mats[i]. grad is
  // floating, shape (Σ b_i,); coefs[i] is the forward's (b_i, k, k) in the math dtype (need_grad=True).
  // Its own backward raises (the forward's P is not differentiated).
  m.def("gram_penalty_bwd(Tensor[] mats, Tensor[] coefs, int[] sides, Tensor grad) -> Tensor[]");
  // Thin SVD of a batch X (b, m, n), float32/float64, by one-sided Jacobi (docs/svd.md#batched_svd; the math
  // is csrc/core/jacobi_svd.h): U (b, m, k), S (b, k) descending, Vh (b, k, n), k = min(m, n),
  // all contiguous. A matrix holding NaN/Inf gives NaN factors. Size range: max(m, n) <= 128 on
  // CPU, <= 64 on CUDA (the Python op falls back to torch.linalg.svd outside it).
  m.def("batched_svd(Tensor X) -> (Tensor, Tensor, Tensor)");
  // Dense matrix T (C_out·P_out, C_in·P_in) of a convolution on inputs of size input_size
  // (docs/conv.md#conv_to_matrix; the index map of regkernels.reference.conv.conv_to_matrix), in the weight's
  // dtype. weight is 5-D (C_out, C_in/groups, k0, k1, k2) and the int lists have 3 entries: the
  // Python op normalizes 1-D/2-D convolutions. circular: circular padding (entries of taps that
  // wrap onto one column add up), else zeros. Checked (TORCH_CHECK): a strided floating weight
  // on the kernel's device, lists of 3 ints below 2^31 with input_size >= 1, stride >= 1,
  // padding >= 0, dilation >= 1, groups >= 1 dividing C_out, output size >= 1, circular padding
  // <= input_size, and T's entry count within int64.
  m.def(
      "conv_to_matrix_dense(Tensor weight, int[] input_size, int[] stride, int[] padding, int[] dilation, "
      "int groups, bool circular) -> Tensor");
  // Its gradient w.r.t. weight: gW[o, c', t] = Σ_y grad[row(o, y), col(o, c', y, t)] over the
  // valid taps, contiguous in the weight's shape and dtype. grad: strided, T's shape, the
  // weight's dtype and device (the weight's values are not read). Linear in grad and the
  // adjoint of conv_to_matrix_dense, so its own autograd (registered in Python) is
  // conv_to_matrix_dense again: double backward is exact.
  m.def(
      "conv_to_matrix_dense_backward(Tensor grad, Tensor weight, int[] input_size, int[] stride, int[] padding, "
      "int[] dilation, int groups, bool circular) -> Tensor");
  // Frame statistics of a conv operator's Gram without T (docs/conv.md#conv_frame_penalty; the math is
  // regkernels.composite.conv's docstring): d and r per (group, border class, channel of V's rows), (G, NC, Cx)
  // in the math dtype (float32; float64 for float64 weights). weight is 5-D (C_out, C_in/groups, k0, k1, k2);
  // the geometry arrives as a plan (regkernels._C_ops._frame_cpu_plan): int32 rows (t, t', q, multiplicity),
  // sorted by class (class_ptr, NC + 1 offsets into the rows) and by offset q ∈ [0, n_offsets) within a class;
  // zero is offset 0's index. rows: the T Tᵀ side (V's channels are outputs), else Tᵀ T. With keep, the
  // third output is the scaled tap Gram X̂ (G, K·Cx, K·Cx) for the backward, else empty.
  m.def(
      "conv_frame_stats_cpu(Tensor weight, Tensor plan, Tensor class_ptr, int n_offsets, int zero, int groups, "
      "bool rows, bool keep) -> (Tensor, Tensor, Tensor)");
  // ∂L/∂weight from (∂L/∂d, ∂L/∂r), in the weight's shape and dtype; tap_gram is the forward's third output
  // (recomputed when empty). Not differentiable (its autograd, registered in Python, raises).
  m.def(
      "conv_frame_stats_cpu_backward(Tensor weight, Tensor tap_gram, Tensor grad_d, Tensor grad_r, Tensor plan, "
      "Tensor class_ptr, int n_offsets, int zero, int groups, bool rows) -> Tensor");
}

// Importable as the Python module regkernels._C; importing it runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
