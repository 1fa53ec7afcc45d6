// One-sided (Hestenes) Jacobi SVD: the math shared by the CPU and CUDA kernels (docs/svd.md#batched_svd).
//
// The kernels always work on a tall matrix A (M × N, M ≥ N = k): a wide X is decomposed as
// Xᵀ = V S Uᵀ. A is scaled by an exact power of two so that max|a| ∈ [0.5, 1), which keeps
// every squared column norm (≤ M·N·1) and every product of entries away from overflow and,
// for all but numerically null columns, from underflow.
//
// A sweep visits every column pair (p, q) once. With α = ‖a_p‖², β = ‖a_q‖², γ = a_p·a_q the
// plane rotation by θ,
//     a_p ← cosθ·a_p − sinθ·a_q,   a_q ← sinθ·a_p + cosθ·a_q        (the same on the columns of V)
// with ζ = (β − α)/(2γ), t = tanθ = sign(ζ)/(|ζ| + √(1 + ζ²)) makes the two columns orthogonal
// (t is the smaller root of t² + 2ζt − 1 = 0, so |θ| ≤ π/4). It is applied in the form
//     a_p ← a_p − s·(a_q + τ·a_p),   a_q ← a_q + s·(a_p − τ·a_q),   s = sinθ, τ = tan(θ/2)
// (τ = s/(1 + cosθ)), whose rounding shrinks with the angle: the form with a rounded cosθ ≈ 1
// departs from orthogonality by ~eps per rotation whatever the angle, and over the hundreds of
// rotations of a 64-column float32 matrix that left VᵀV − I at 1.3e-5 (docs/svd.md#batched_svd asks 1e-5);
// this form gives 8e-7 there. A pair is rotated only while |γ| > tol·√α·√β, tol = √M·eps
// (LAPACK's sgesvj/dgesvj choice). A sweep without a rotation ends the iteration; sweeps are
// bounded, so a matrix never hangs a kernel. At the end σ_j = ‖a_j‖, u_j = a_j/σ_j (orthonormal
// to tol by the stopping test itself) and A·Vᵀ = X·2^-e, so U diag(σ) Vᵀ reconstructs X to
// rounding.
//
// A column whose squared norm is at or below null_norm2 (the products forming it may have lost
// relative precision to underflow) is numerically null: it takes part in no rotation, and its
// u_j is completed to an orthonormal basis by complete_orthonormal (zero and rank-deficient
// matrices still give orthonormal U).
#pragma once

#include <cfloat>
#include <cmath>

#include "common.h"

namespace regkernels {
namespace core {

template <typename T>
struct JacobiLimits;
template <>
struct JacobiLimits<float> {
  static constexpr float eps = FLT_EPSILON;
  static constexpr float min_normal = FLT_MIN;
};
template <>
struct JacobiLimits<double> {
  static constexpr double eps = DBL_EPSILON;
  static constexpr double min_normal = DBL_MIN;
};

// A sweep costs N²/2 pair visits; from a random start float32 converges in ≤ 10 sweeps for
// N ≤ 64, float64 in ≤ 12. The bound only matters for pathological input.
constexpr int kJacobiMaxSweeps = 30;

RK_HOST_DEVICE float rk_sqrt(float x) { return sqrtf(x); }
RK_HOST_DEVICE double rk_sqrt(double x) { return sqrt(x); }
RK_HOST_DEVICE float rk_abs(float x) { return fabsf(x); }
RK_HOST_DEVICE double rk_abs(double x) { return fabs(x); }
RK_HOST_DEVICE float rk_copysign(float a, float b) { return copysignf(a, b); }
RK_HOST_DEVICE double rk_copysign(double a, double b) { return copysign(a, b); }
RK_HOST_DEVICE float rk_ldexp(float x, int e) { return ldexpf(x, e); }
RK_HOST_DEVICE double rk_ldexp(double x, int e) { return ldexp(x, e); }
RK_HOST_DEVICE int rk_exponent(float x) {
  int e = 0;
  frexpf(x, &e);
  return e;
}
RK_HOST_DEVICE int rk_exponent(double x) {
  int e = 0;
  frexp(x, &e);
  return e;
}

// Stopping tolerance of the rotation test for a tall matrix with `rows` rows.
template <typename T>
RK_HOST_DEVICE T jacobi_tolerance(int rows) {
  return JacobiLimits<T>::eps * rk_sqrt(static_cast<T>(rows));
}

// Squared column norms at or below this are numerically null (see the header comment): below
// rows·min_normal/eps a sum of `rows` products may hold denormal terms.
template <typename T>
RK_HOST_DEVICE T jacobi_null_norm2(int rows) {
  return static_cast<T>(rows) * (JacobiLimits<T>::min_normal / JacobiLimits<T>::eps);
}

// The power-of-two exponent e with max_abs·2^-e ∈ [0.5, 1) (0 for a zero matrix). Scaling by
// rk_ldexp(x, -e) is exact except where an entry drops into the denormals.
template <typename T>
RK_HOST_DEVICE int jacobi_scale_exponent(T max_abs) {
  return max_abs > T(0) ? rk_exponent(max_abs) : 0;
}

// The rotation (s, τ) = (sinθ, tan(θ/2)) for one column pair; returns false (and s = τ = 0, the
// identity) when the pair is already orthogonal to tolerance, either column is null, or the angle
// is below what the type can represent (t = 0, so a "rotation" would change nothing and the sweep
// would never end). Branch-free, so a loop over SIMD lanes of independent matrices vectorizes.
// For |ζ| > 1, t = sign(ζ)·r/(1 + √(1 + r²)) with r = 1/|ζ|, the same value without forming ζ²
// (which overflows for columns ~1e19 apart in float32); ζ itself may be ±inf (r = 0, t = 0).
template <typename T>
RK_HOST_DEVICE bool jacobi_rotation(T alpha, T beta, T gamma, T tol, T null2, T& s, T& tau) {
  bool live = (alpha > null2) & (beta > null2) & (rk_abs(gamma) > tol * rk_sqrt(alpha) * rk_sqrt(beta));
  const T g = live ? gamma : T(1);
  const T zeta = (beta - alpha) / (T(2) * g);
  const T az = rk_abs(zeta);
  const T r = T(1) / (az > T(1) ? az : T(1));
  const T mag = az > T(1) ? r / (T(1) + rk_sqrt(T(1) + r * r)) : T(1) / (az + rk_sqrt(T(1) + az * az));
  const T t = rk_copysign(mag, zeta);
  live = live & (t != T(0));
  const T c = T(1) / rk_sqrt(T(1) + t * t);
  s = live ? c * t : T(0);
  tau = live ? (c * t) / (T(1) + c) : T(0);
  return live;
}

// Apply the rotation to one row of the column pair (x = a_p[i], y = a_q[i]). Also instantiated
// with SIMD vector types (one lane per matrix) by the CPU kernel.
template <typename T>
RK_HOST_DEVICE void jacobi_rotate(T& x, T& y, T s, T tau) {
  const T xp = x - s * (y + tau * x);
  const T yq = y + s * (x - tau * y);
  x = xp;
  y = yq;
}

// Complete columns [done, total) of an orthonormal set of `rows`-vectors. col(j, i) is a
// reference to entry i of column j; columns [0, done) are orthonormal already. Column j starts
// from the unit vector e_c farthest from the span so far (largest 1 − Σ_p col(p, c)², which is
// ≥ (rows − j)/rows > 0 because rows ≥ total), then two passes of classical Gram–Schmidt and a
// normalization. Serial; it runs only for numerically null columns (zero or rank-deficient X).
template <typename T, typename Col>
RK_HOST_DEVICE void complete_orthonormal(Col col, int rows, int done, int total) {
  for (int j = done; j < total; ++j) {
    int best = 0;
    T best_rest = T(-1);
    for (int c = 0; c < rows; ++c) {
      T rest = T(1);
      for (int p = 0; p < j; ++p) rest -= col(p, c) * col(p, c);
      if (rest > best_rest) {
        best_rest = rest;
        best = c;
      }
    }
    for (int i = 0; i < rows; ++i) col(j, i) = i == best ? T(1) : T(0);
    for (int pass = 0; pass < 2; ++pass) {
      for (int p = 0; p < j; ++p) {
        T d = T(0);
        for (int i = 0; i < rows; ++i) d += col(p, i) * col(j, i);
        for (int i = 0; i < rows; ++i) col(j, i) -= d * col(p, i);
      }
    }
    T n2 = T(0);
    for (int i = 0; i < rows; ++i) n2 += col(j, i) * col(j, i);
    const T inv = T(1) / rk_sqrt(n2);
    for (int i = 0; i < rows; ++i) col(j, i) *= inv;
  }
}

}  // namespace core
}  // namespace regkernels
