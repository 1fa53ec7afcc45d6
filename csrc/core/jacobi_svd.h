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

// The launch shape of the CUDA kernel (csrc/cuda/svd_cuda.cu), here so that the CPU kernel runs
// complete_orthonormal over the same lane count. `group` (G) lanes handle one column pair of a
// tall M × N matrix: about 4 rows per lane, at most kJacobiMaxGroup lanes (a power of two
// dividing a warp), and at most kJacobiMaxThreads lanes for the ⌈N/2⌉ pairs of one step;
// `threads` rounds G·⌈N/2⌉ up to whole warps. For N ≤ 64 this gives G ≥ 8, so ⌈M/G⌉ ≤ 8 for
// M ≤ 64.
constexpr int kJacobiMaxGroup = 16;
constexpr int kJacobiMaxThreads = 256;
struct JacobiBlock {
  int group;    // G
  int threads;  // lanes of the block
};
RK_HOST_DEVICE JacobiBlock jacobi_block(int M, int N) {
  const int n_pairs = (N + 1) / 2;
  int G = 1;
  while (G < kJacobiMaxGroup && 4 * G < M) G *= 2;
  while (G > 1 && n_pairs * G > kJacobiMaxThreads) G /= 2;
  return {G, (n_pairs * G + 31) / 32 * 32};
}

// Runs a phase of lane-parallel code on one CPU thread: every lane in turn, which is a valid
// schedule of the phase because lanes of one phase never read what another lane of it writes.
// The CUDA kernel's counterpart runs lane threadIdx.x and then __syncthreads().
struct SerialLanes {
  int lanes;
  template <typename F>
  void operator()(F&& f) const {
    for (int l = 0; l < lanes; ++l) f(l);
  }
};

// Complete columns [done, total) of an orthonormal set of `rows`-vectors (rows ≥ total), written
// over `lanes` lanes: `phase(f)` runs f(lane) for every lane in [0, lanes) and returns once all
// of them have finished (a barrier), and within one phase a lane writes only entries no other lane
// of that phase reads. col(j, i) is a reference to entry i of column j; columns [0, done) are
// orthonormal already (to the Jacobi tolerance). Scratch: rest and w of `rows` entries, d of
// `total`. It runs only for numerically null columns (zero or rank-deficient X).
//
// Column j starts from the unit vector e_b farthest from the span so far: the largest
// rest[c] = 1 − Σ_{p<j} col(p, c)², which is ≥ (rows − j)/rows > 0 (kept up to date as columns are
// added, in the same order of subtraction as a fresh sum), ties to the smaller c. It is then made
// orthogonal to columns [0, j) by two passes of classical Gram–Schmidt — each pass all the dot
// products first, then one update, so the lanes split both — and normalized. The first pass needs
// no dot products: col(p)·e_b = col(p, b). A single pass leaves an error of order eps·‖w‖/‖w'‖
// (‖w'‖ ≥ √((rows − j)/rows) after projection); the second brings it to rounding ("twice is
// enough", Giraud, Langou & Rozložník 2005).
//
// Per column, four phases: (A) every lane that owns an entry finds b from rest (the same scan in
// every lane, so the same b) and writes its entries of w₁ = e_b − Σ_p col(p, b)·col(p); (B) lanes
// over p: d[p] = col(p)·w₁; (C) lanes over rows: w₂ = w₁ − Σ_p d[p]·col(p) into w; (D) every lane
// that owns an entry sums ‖w₂‖² in the same order, writes its entries of col(j) = w₂/‖w₂‖ and
// subtracts their squares from rest.
template <typename T, typename Col, typename Phase>
RK_HOST_DEVICE void complete_orthonormal(Col col, int rows, int done, int total, T* rest, T* w, T* d, int lanes,
                                         Phase phase) {
  phase([&](int lane) {
    for (int c = lane; c < rows; c += lanes) {
      T r = T(1);
      for (int p = 0; p < done; ++p) r -= col(p, c) * col(p, c);
      rest[c] = r;
    }
  });
  for (int j = done; j < total; ++j) {
    phase([&](int lane) {  // (A)
      if (lane >= rows) return;
      int b = 0;
      T best = rest[0];
      for (int c = 1; c < rows; ++c) {
        if (rest[c] > best) {
          best = rest[c];
          b = c;
        }
      }
      for (int i = lane; i < rows; i += lanes) {
        T v = i == b ? T(1) : T(0);
        for (int p = 0; p < j; ++p) v -= col(p, b) * col(p, i);
        col(j, i) = v;
      }
    });
    phase([&](int lane) {  // (B)
      for (int p = lane; p < j; p += lanes) {
        T s = T(0);
        for (int i = 0; i < rows; ++i) s += col(p, i) * col(j, i);
        d[p] = s;
      }
    });
    phase([&](int lane) {  // (C)
      for (int i = lane; i < rows; i += lanes) {
        T v = col(j, i);
        for (int p = 0; p < j; ++p) v -= d[p] * col(p, i);
        w[i] = v;
      }
    });
    phase([&](int lane) {  // (D)
      if (lane >= rows) return;
      T n2 = T(0);
      for (int i = 0; i < rows; ++i) n2 += w[i] * w[i];
      const T inv = T(1) / rk_sqrt(n2);
      for (int i = lane; i < rows; i += lanes) {
        const T v = w[i] * inv;
        col(j, i) = v;
        rest[i] -= v * v;
      }
    });
  }
}

}  // namespace core
}  // namespace regkernels
