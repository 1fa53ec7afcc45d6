// The β-LASSO element update (formula: docs/beta_lasso.md#update-rule), shared by the CPU and CUDA kernels.
//
//   d   = g + weight_decay·θ                         (if weight_decay)
//   buf = d (first step) | momentum·buf + (1 − dampening)·d      (if momentum)
//   d   = d + momentum·buf (nesterov) | buf (momentum) | d
//   θ'  = θ − lr·(d + lam·sign(θ))                   (sign of θ before the step, sign(0) = 0)
//   θ'  = θ' · [|θ'| ≥ beta·lam]
//
// Every product and sum is rounded once, in the order the torch reference
// (regkernels/reference/beta_lasso.py) evaluates it, so float32 results agree bit for bit.
// `T` is the math type: float for float16/bfloat16/float32 parameters, double for float64.
#pragma once

#include "common.h"

namespace regkernels {
namespace core {

// Hyper-parameters of one tensor, already rounded to the math type the way torch rounds a
// Python scalar operand (to the tensor's opmath type), so both paths see the same constants.
template <typename T>
struct BetaLassoHyper {
  T lr;
  T lam;
  T thr;                  // beta·lam, computed in double and then rounded
  T momentum;
  T one_minus_dampening;  // 1 − dampening, computed in double and then rounded
  T weight_decay;
};

// torch.sign on CPU: −1, 0, +1, and 0 for NaN (θ itself carries a NaN through the update).
// Written as a difference of comparisons so the CPU loop stays branch-free and vectorizes.
template <typename T>
RK_HOST_DEVICE T sign_of(T x) {
  return static_cast<T>(T(0) < x) - static_cast<T>(x < T(0));
}

// One element. `buf` is read (unless FIRST) and written when MOMENTUM. Returns the new θ.
template <bool WEIGHT_DECAY, bool MOMENTUM, bool NESTEROV, bool FIRST, typename T>
RK_HOST_DEVICE T beta_lasso_element(T theta, T g, T& buf, const BetaLassoHyper<T>& h) {
  T d = g;
  if (WEIGHT_DECAY) d = add_rn(d, mul_rn(theta, h.weight_decay));
  if (MOMENTUM) {
    const T b = FIRST ? d : add_rn(mul_rn(buf, h.momentum), mul_rn(d, h.one_minus_dampening));
    buf = b;
    d = NESTEROV ? add_rn(d, mul_rn(b, h.momentum)) : b;
  }
  const T step = add_rn(d, mul_rn(sign_of(theta), h.lam));
  const T updated = sub_rn(theta, mul_rn(step, h.lr));
  // |θ'| < thr, i.e. −thr < θ' < thr → 0; a NaN fails both tests and stays NaN
  const bool below = (updated < h.thr) & (-h.thr < updated);
  return below ? T(0) : updated;
}

}  // namespace core
}  // namespace regkernels
