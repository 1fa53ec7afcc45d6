// Per-entry math of the Gram-matrix penalties (docs/gram.md#conventions), shared by the CPU epilogues and any
// device kernel: the value each Gram entry (or row) contributes and its derivative.
//
// Every penalty here is a function of V = Gram(W) (k×k, symmetric). Its gradient is written as
// dR/dW = P·W ("rows", V = W Wᵀ) or W·P ("cols", V = Wᵀ W) with P = S + Sᵀ, S_ij = ∂R/∂V_ij taken
// with the k² entries of V as independent variables. The kernels build P from V and O(k) row
// statistics, so one matrix product gives dW.
#pragma once

#include <cmath>

#include "common.h"

namespace regkernels {
namespace core {

// sign with sign(0) = 0, the subgradient of |x| (docs/gram.md#conventions), and sign(NaN) = NaN as torch.sign: a
// NaN Gram entry must reach the gradient coefficients P instead of becoming a zero coefficient.
template <typename T>
RK_HOST_DEVICE T sign0(T x) {
  return x != x ? x : static_cast<T>((x > T(0)) - (x < T(0)));
}

// max(0, x) that keeps NaN, as torch.relu: a NaN hinge argument (a NaN entry of W, or d − r =
// inf − inf once the Gram overflows) must give a NaN value and NaN coefficients, not 0 (docs/index.md#numerical-behaviour).
template <typename T>
RK_HOST_DEVICE T relu_nan(T x) {
  return x < T(0) ? T(0) : x;
}

// Frame penalty (docs/gram.md#frame_penalty), one row i of V with diagonal d and Gershgorin radius r:
//   lower = relu(A − (d − r))², upper = relu((d + r) − B)², row value = lower + upper.
// For R = (1/k) Σ_i row value: ∂R/∂r_i = (2/k)(lo + up) (→ S_ij = that · sign(V_ij), j ≠ i) and
// ∂R/∂d_i = (2/k)(up − lo) (→ S_ii). relu'(0) = 0 as in torch, which the squares make moot; NaN
// arguments stay NaN in the value and both derivatives.
template <typename T>
struct FrameRow {
  T value;   // lower + upper
  T dr;      // ∂(row value)/∂r, before the 1/k
  T dd;      // ∂(row value)/∂d, before the 1/k
};

template <typename T>
RK_HOST_DEVICE FrameRow<T> frame_row(T d, T r, T A, T B) {
  const T lo_arg = A - (d - r);  // evaluated in the reference's order
  const T up_arg = (d + r) - B;
  const T lo = relu_nan(lo_arg);
  const T up = relu_nan(up_arg);
  return {lo * lo + up * up, T(2) * (lo + up), T(2) * (up - lo)};
}

// MHE energy of one pair (docs/gram.md#mhe_penalty) as a function of δ = 2 − 2·cos:
//   s = 0: −log δ,  s = 1: δ^(−1/2),  s = 2: 1/δ; and its derivative d(energy)/dδ.
// δ = 0 gives +inf (duplicate filters); nothing is clamped.
template <typename T>
RK_HOST_DEVICE T mhe_energy(T delta, int s) {
  if (s == 0) return -std::log(delta);
  if (s == 1) return T(1) / std::sqrt(delta);
  return T(1) / delta;
}

template <typename T>
RK_HOST_DEVICE T mhe_denergy(T delta, int s) {
  if (s == 0) return T(-1) / delta;
  if (s == 1) return T(-0.5) / (delta * std::sqrt(delta));
  return T(-1) / (delta * delta);
}

// MHE pair term as a function of c = cos_ij for one unordered pair (i, j) of rows of W.
// Plain: the pair (w_i, w_j), T(c) = e(2 − 2c). half=True adds the rows −W (docs/gram.md#mhe_penalty): the pairs
// (w_i, w_j), (−w_i, −w_j) have δ = 2 − 2c and (w_i, −w_j), (−w_i, w_j) have δ = 2 + 2c, so
// T(c) = 2·(e(2 − 2c) + e(2 + 2c)). Returns T and dT/dc.
template <typename T>
struct PairTerm {
  T value;
  T dc;
};

template <typename T>
RK_HOST_DEVICE PairTerm<T> mhe_pair(T c, int s, bool half) {
  const T dm = T(2) - T(2) * c;
  if (!half) return {mhe_energy(dm, s), T(-2) * mhe_denergy(dm, s)};
  const T dp = T(2) + T(2) * c;
  return {T(2) * (mhe_energy(dm, s) + mhe_energy(dp, s)),
          T(2) * (T(-2) * mhe_denergy(dm, s) + T(2) * mhe_denergy(dp, s))};
}

// Angular MHE (docs/gram.md#angular-energies): the energy of a = arccos(c)/π + eps,
//   s = 0: −log a,  s = 1: 1/a,  s = 2: 1/a²; and its derivative d(energy)/da.
template <typename T>
RK_HOST_DEVICE T mhe_angle_energy(T a, int s) {
  if (s == 0) return -std::log(a);
  if (s == 1) return T(1) / a;
  return T(1) / (a * a);
}

template <typename T>
RK_HOST_DEVICE T mhe_angle_denergy(T a, int s) {
  if (s == 0) return T(-1) / a;
  if (s == 1) return T(-1) / (a * a);
  return T(-2) / (a * a * a);
}

// One angle term e(a(c)) and its derivative in c. c is rounded into [−1, 1] (|c| < 1 in exact
// arithmetic since eps > 0); da/dc = −1/(π·sqrt((1 − c)(1 + c))) is infinite at ±1, as in the
// reference (no clamp of the derivative). NaN passes through.
template <typename T>
struct Angle {
  T t;   // arccos(c)/π
  T da;  // d t/dc = −1/(π·sqrt((1 − c)(1 + c))), even in c
};

template <typename T>
RK_HOST_DEVICE Angle<T> mhe_angle(T c) {
  const T pi = T(3.14159265358979323846);
  const T cc = c > T(1) ? T(1) : (c < T(-1) ? T(-1) : c);
  return {std::acos(cc) / pi, T(-1) / (pi * std::sqrt((T(1) - cc) * (T(1) + cc)))};
}

template <typename T>
RK_HOST_DEVICE PairTerm<T> mhe_angle_term(T c, int s, T eps) {
  const Angle<T> g = mhe_angle(c);
  const T a = g.t + eps;
  return {mhe_angle_energy(a, s), mhe_angle_denergy(a, s) * g.da};
}

// Angular pair term of one unordered pair (i, j), as mhe_pair: plain e(a(c)); half=True the four
// pairs of ±w_i, ±w_j: T(c) = 2·(e(a(c)) + e(a(−c))). Returns T and dT/dc.
// For half=True one arccos serves both angles, arccos(−c) = π − arccos(c), and da/dc is the
// same at ±c (sqrt((1 − c)(1 + c)) is even): one acos and one sqrt per pair instead of two each.
// The subtraction's rounding (≤ ulp(π)/π in a) is below what c's own rounding moves arccos by
// (dθ/dc ≥ 1 for every c).
template <typename T>
RK_HOST_DEVICE PairTerm<T> mhe_angle_pair(T c, int s, bool half, T eps) {
  if (!half) return mhe_angle_term(c, s, eps);
  const Angle<T> g = mhe_angle(c);
  const T ap = g.t + eps, am = (T(1) - g.t) + eps;  // a(c), a(−c)
  // d a(−c)/dc = −da: T'(c) = 2·(e'(a(c)) − e'(a(−c)))·da
  return {T(2) * (mhe_angle_energy(ap, s) + mhe_angle_energy(am, s)),
          T(2) * (mhe_angle_denergy(ap, s) - mhe_angle_denergy(am, s)) * g.da};
}

// The antipodal pair (w, −w) of half=True from sq = ‖w‖² (value and d/d sq): 1 + cos = eps/ν²
// exactly, so a = 1 − (2/π)·asin(z) + eps with z = sqrt(eps/(2ν²)), ν² = sq + eps, and
// da/dsq = z / (π ν² sqrt(1 − z²)); through cos = −sq/ν² it would be arccos at −1 within rounding.
template <typename T>
RK_HOST_DEVICE PairTerm<T> mhe_antipodal(T sq, int s, T eps) {
  const T pi = T(3.14159265358979323846);
  const T nu2 = sq + eps;
  const T z = std::sqrt(eps / (T(2) * nu2));
  const T a = T(1) - (T(2) / pi) * std::asin(z) + eps;
  const T da = z / (pi * nu2 * std::sqrt(T(1) - z * z));
  return {mhe_angle_energy(a, s), mhe_angle_denergy(a, s) * da};
}

}  // namespace core
}  // namespace regkernels
