// Gram-matrix penalties on CPU (docs/gram.md): BLAS for the products, one fused C++ epilogue
// over the Gram instead of the reference's ~10 elementwise kernels.
//
// Forward, per matrix: V = Gram(W) (k×k) from BLAS, only the blocks on and above the diagonal
// for large k, mirrored so that V is exactly symmetric; then a first pass over V's rows gives the
// O(k) row statistics and the value; if a gradient is needed, a second pass overwrites V with
// P = S + Sᵀ (S_ij = ∂R/∂V_ij, csrc/core/gram_penalty.h), which the op returns for the backward.
// Backward: dW = g·P·W ("rows") or g·W·P ("cols"), one BLAS product per matrix. Stacks of small
// matrices run batched instead (one bmm for the stack, one parallel loop over its epilogues).
//
// All math is in float32 for float16 / bfloat16 / float32 inputs and in float64 for float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "../core/gram_penalty.h"
#include "blas_util.h"

namespace regkernels {
namespace {

using cpu::lane_sum;
using cpu::symmetric_gram;

enum class Kind { Frame, Diversity, Orthogonality, Mhe };

Kind parse_kind(c10::string_view kind) {
  if (kind == "frame") return Kind::Frame;
  if (kind == "diversity") return Kind::Diversity;
  if (kind == "orthogonality") return Kind::Orthogonality;
  if (kind == "mhe") return Kind::Mhe;
  TORCH_CHECK(false, "gram_penalty: kind must be 'frame', 'diversity', 'orthogonality' or 'mhe'; got '",
              std::string(kind), "'");
}

// params per kind: frame (A, B); diversity (tau, inclusive); orthogonality (squared); mhe (s, half, eps,
// angular)
size_t n_params(Kind kind) { return kind == Kind::Mhe ? 4 : (kind == Kind::Orthogonality ? 1 : 2); }

at::ScalarType math_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Rows per parallel work item: enough that a work item is ~16K Gram entries.
int64_t grain_rows(int64_t k) { return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(k, 1)); }

// f(lo, hi) over the rows [0, k) of a Gram, in parallel chunks of grain_rows(k) rows. Up to
// k = 128 that is one chunk: called directly, without the cost of a parallel region, which is
// most of an epilogue's time on a stack of tiny matrices.
template <typename F>
inline void for_rows(int64_t k, const F& f) {
  if (k <= grain_rows(k)) {
    f(0, k);
  } else {
    at::parallel_for(0, k, grain_rows(k), f);
  }
}

// The second pass of every epilogue: row i of V becomes row i of P, entry by entry
// (entry(i, j, V_ij), symmetric in i, j), then its diagonal diag(i, V_ii), computed first.
template <typename T, typename Entry, typename Diag>
void write_coefficients(T* V, int64_t k, Entry entry, Diag diag) {
  for_rows(k, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      T* v = V + i * k;
      const T d = diag(i, v[i]);
      for (int64_t j = 0; j < k; ++j) v[j] = entry(i, j, v[j]);
      v[i] = d;
    }
  });
}

// Per-row scratch of an epilogue: on the stack up to 64 rows, so that a stack of tiny matrices
// (one epilogue each) does not pay heap allocations per matrix.
template <typename T>
using RowVec = c10::SmallVector<T, 64>;

template <typename T>
double total_of(const RowVec<T>& rows) {
  double total = 0;
  for (const T x : rows) total += x;
  return total;
}

// ----------------------------------------------------------------------------- Gram

// ----------------------------------------------------------------------------- epilogues
// Each takes one symmetric k×k V, returns the penalty and, with need_grad, overwrites V by P.

template <typename T>
double frame_epilogue(T* V, int64_t k, const at::ArrayRef<double> params, bool need_grad) {
  // formula: docs/gram.md#frame_penalty; S_ij = (1/k) dr_i · sign(V_ij) (j ≠ i), S_ii = (1/k) dd_i
  const T A = static_cast<T>(params[0]), B = static_cast<T>(params[1]);
  RowVec<T> row(k), dr(k), dd(k);
  for_rows(k, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* v = V + i * k;
      // the diagonal is skipped, not subtracted, so a large d_i does not cancel r_i's low bits
      const T r = lane_sum<T>(0, i, [&](int64_t j) { return std::abs(v[j]); }) +
                  lane_sum<T>(i + 1, k, [&](int64_t j) { return std::abs(v[j]); });
      const auto f = core::frame_row<T>(v[i], r, A, B);
      row[i] = f.value;
      dr[i] = f.dr / static_cast<T>(k);
      dd[i] = f.dd / static_cast<T>(k);
    }
  });
  if (need_grad) {
    write_coefficients(
        V, k, [&](int64_t i, int64_t j, T x) { return (dr[i] + dr[j]) * core::sign0(x); },
        [&](int64_t i, T) { return T(2) * dd[i]; });
  }
  return total_of(row) / static_cast<double>(k);
}

template <typename T>
double diversity_epilogue(T* V, int64_t k, const at::ArrayRef<double> params, bool need_grad) {
  // formula: docs/gram.md#diversity_penalty with C_ij = V_ij / (n_i n_j), n_i = max(sqrt(V_ii), 1e-12) (F.normalize).
  // R = ½ Σ_{i≠j} mask_ij C_ij²: S_ij = mask_ij C_ij / (n_i n_j) for j ≠ i; through n_i,
  // S_ii = −Σ_j mask_ij C_ij² / n_i² (zero where the norm is clamped, as clamp_min's gradient).
  // NaN: a NaN norm is not clamped (clamp_min keeps NaN), and the mask is a 0/1 factor, as in the
  // reference's C²·mask: a NaN cosine gives NaN·0 = NaN in the value and in P even where it is
  // masked out (the diagonal, |C_ij| < tau). A squared norm that
  // overflows the math dtype (finite huge rows) leaves the row's cosines undefined: C_ij would be
  // inf/inf or a silent finite/inf = 0, so that norm is taken as NaN (the reference does the same).
  const T tau = static_cast<T>(params[0]);
  const bool inclusive = params[1] != 0.0;
  constexpr T kEps = T(1e-12);
  RowVec<T> nrm(k), acc(k);
  RowVec<bool> clamped(k);
  for (int64_t i = 0; i < k; ++i) {
    const T s = std::sqrt(V[i * k + i]);
    clamped[i] = s < kEps;
    nrm[i] = clamped[i] ? kEps : (std::isinf(s) ? std::numeric_limits<T>::quiet_NaN() : s);
  }
  auto mask = [&](T c) { const T a = std::abs(c); return (inclusive ? a >= tau : a > tau) ? T(1) : T(0); };
  for_rows(k, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* v = V + i * k;
      T s = 0;
      for (int64_t j = 0; j < k; ++j) {
        const T c = v[j] / (nrm[i] * nrm[j]);
        s += c * c * (j != i ? mask(c) : T(0));
      }
      acc[i] = s;
    }
  });
  if (need_grad) {
    write_coefficients(
        V, k,
        [&](int64_t i, int64_t j, T x) {
          const T nn = nrm[i] * nrm[j];
          const T c = x / nn;
          return T(2) * c * mask(c) / nn;
        },
        [&](int64_t i, T) { return clamped[i] ? T(0) : T(-2) * acc[i] / (nrm[i] * nrm[i]); });
  }
  return 0.5 * total_of(acc);
}

template <typename T>
double orthogonality_epilogue(T* V, int64_t k, const at::ArrayRef<double> params, bool need_grad, double offset) {
  // formula: docs/gram.md#orthogonality_penalty: R² = Σ_ij (V_ij − δ_ij)² + offset; S = 2(V − I), P = 4(V − I);
  // squared=False: R = sqrt(R²) and P/(2R), with the subgradient 0 at R = 0 (Gram(W) = I exactly,
  // docs/index.md#numerical-behaviour). offset: see gram_penalty_fwd_cpu. The diagonal is skipped, not subtracted: with an
  // infinite entry Σ_j V_ij² − V_ii² would be inf − inf = NaN where the formula is +inf.
  // squared=False: ‖V − I‖ = s·‖(V − I)/s‖ with s the power of two just below max|V_ij − δ_ij|, so
  // the sum of squares cannot overflow while the norm is finite (entries ~1e17 in float32: the
  // squares overflow, the norm does not); dividing by a power of two is exact, and squared=True
  // keeps s = 1 (the same bits as without it). A NaN / Inf entry keeps s = 1 and reaches the value.
  const bool squared = params[0] != 0.0;
  T scale = T(1);
  if (!squared) {
    double big = 0;
    bool finite = true;
    for (int64_t i = 0; i < k * k && finite; ++i) {
      const double x = std::abs(static_cast<double>(V[i]) - (i % (k + 1) == 0 ? 1.0 : 0.0));
      finite = x <= std::numeric_limits<double>::max();
      big = std::max(big, x);
    }
    if (finite && big > 0) {
      int e = 0;
      std::frexp(big, &e);  // big = f·2^e, f ∈ [0.5, 1): (V − I)/2^(e−1) ∈ [−2, 2]
      scale = std::ldexp(T(1), e - 1);
    }
  }
  const T inv = T(1) / scale;
  RowVec<T> row(k);
  for_rows(k, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* v = V + i * k;
      const T e = (v[i] - T(1)) * inv;
      row[i] = lane_sum<T>(0, i, [&](int64_t j) { const T x = v[j] * inv; return x * x; }) +
               lane_sum<T>(i + 1, k, [&](int64_t j) { const T x = v[j] * inv; return x * x; }) + e * e;
    }
  });
  const double s = static_cast<double>(scale);
  const double r2 = offset / (s * s) + total_of(row);
  const double value = squared ? r2 : s * std::sqrt(r2);
  if (need_grad) {
    // squared=False: ∂R/∂V = (V − I)/R, with the subgradient 0 at R = 0 and NaN at R = inf (an
    // overflowed norm is not a stationary point: 2/inf = 0 would be a silent zero gradient)
    const T coef = squared ? T(4)
                           : (value == 0.0 ? T(0)
                                           : (std::isinf(value) ? std::numeric_limits<T>::quiet_NaN()
                                                                : static_cast<T>(2.0 / value)));
    write_coefficients(
        V, k, [&](int64_t, int64_t, T x) { return coef * x; }, [&](int64_t, T x) { return coef * (x - T(1)); });
  }
  return value;
}

template <typename T>
double mhe_epilogue(T* V, int64_t k, const at::ArrayRef<double> params, bool need_grad) {
  // formula: docs/gram.md#mhe_penalty. ν_i = sqrt(V_ii + eps), c_ij = V_ij / (ν_i ν_j), pair term T(c) of
  // core::mhe_pair (angular: core::mhe_angle_pair) over the unordered pairs, R = (Σ_{i<j} T(c_ij)
  // [+ Σ_i e(pair (w_i, −w_i)) if half]) / npairs with npairs = p(p − 1)/2 over the p = m (or 2m) rows.
  // S_ij = T'(c_ij) / (npairs ν_i ν_j) for i < j; through ν_i, S_ii = Σ_{j≠i} T'(c_ij)·(−c_ij/2) /
  // (npairs ν_i²); half adds the pair (w_i, −w_i): Euclidean through its c_ii = V_ii/(V_ii + eps),
  // dc/dV_ii = eps/ν_i⁴; angular through core::mhe_antipodal's d/dV_ii (no arccos at −1).
  const int s = static_cast<int>(params[0]);
  const bool half = params[1] != 0.0;
  const T eps = static_cast<T>(params[2]);
  const bool angular = params[3] != 0.0;
  const double p = half ? 2.0 * k : static_cast<double>(k);
  const T inv_pairs = static_cast<T>(2.0 / (p * (p - 1.0)));
  const auto pair = [&](T c) { return angular ? core::mhe_angle_pair<T>(c, s, half, eps) : core::mhe_pair<T>(c, s, half); };
  RowVec<T> nu(k), val(k), dsum(k);
  // a squared norm that overflows the math dtype (finite huge rows) makes ν_i NaN, not inf: c_ij =
  // V_ij / (ν_i ν_j) would be a silent finite/inf = 0 against every normal row (as in diversity)
  for (int64_t i = 0; i < k; ++i) {
    const T nu_i = std::sqrt(V[i * k + i] + eps);
    nu[i] = std::isinf(nu_i) ? std::numeric_limits<T>::quiet_NaN() : nu_i;
  }
  for_rows(k, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* v = V + i * k;
      T vs = 0, ds = 0;
      for (int64_t j = 0; j < k; ++j) {
        if (j == i) continue;
        const T c = v[j] / (nu[i] * nu[j]);
        const auto t = pair(c);
        if (j > i) vs += t.value;
        ds += t.dc * (T(-0.5) * c);
      }
      ds /= nu[i] * nu[i];
      if (half && angular) {
        // ν_i² − eps, NaN with ν_i (an overflowed norm)
        const auto t = core::mhe_antipodal<T>(nu[i] * nu[i] - eps, s, eps);
        vs += t.value;
        ds += t.dc;
      } else if (half) {
        const T ni2 = nu[i] * nu[i];
        const T dp = T(2) + T(2) * (v[i] / ni2);
        vs += core::mhe_energy<T>(dp, s);
        ds += core::mhe_denergy<T>(dp, s) * T(2) * eps / (ni2 * ni2);
      }
      val[i] = vs;
      dsum[i] = ds * inv_pairs;
    }
  });
  if (need_grad) {
    write_coefficients(
        V, k,
        [&](int64_t i, int64_t j, T x) {
          const T nn = nu[i] * nu[j];
          return pair(x / nn).dc * inv_pairs / nn;
        },
        [&](int64_t i, T) { return T(2) * dsum[i]; });
  }
  return total_of(val) * static_cast<double>(inv_pairs);
}

template <typename T>
double run_epilogue(Kind kind, T* V, int64_t k, at::ArrayRef<double> params, bool need_grad, double offset) {
  switch (kind) {
    case Kind::Frame: return frame_epilogue<T>(V, k, params, need_grad);
    case Kind::Diversity: return diversity_epilogue<T>(V, k, params, need_grad);
    case Kind::Orthogonality: return orthogonality_epilogue<T>(V, k, params, need_grad, offset);
    case Kind::Mhe: return mhe_epilogue<T>(V, k, params, need_grad);
  }
  return 0;
}

// ----------------------------------------------------------------------------- ops

// Leading dims of a (..., m, n) matrix stack flattened: (batch, m, n), batch possibly 0.
int64_t batch_of(const at::Tensor& w) {
  int64_t b = 1;
  for (int64_t d = 0; d < w.dim() - 2; ++d) b *= w.size(d);
  return b;
}
at::Tensor as_batch(const at::Tensor& w) { return w.reshape({batch_of(w), w.size(-2), w.size(-1)}); }

// Matrices with k below this take the batched path: one at::bmm for the Grams of the whole stack
// (backward: for all its P·W products) and one parallel loop over the matrices, each running its
// epilogue serially. A loop over matrices pays a BLAS call and a parallel region per matrix, which
// dominates for tiny k (4096 matrices of 4×4, a depthwise conv's 1×9 groups). From k = 384
// symmetric_gram multiplies fewer blocks than the full product and the epilogue's own parallel
// loop over rows has enough work, so large matrices are taken one at a time. The choice depends
// on k only, never on the batch size: a matrix gets the same bits alone or in any stack.
constexpr int64_t kBatchedMaxK = 384;

bool use_batched(int64_t k) { return k < kBatchedMaxK; }

// Copies the upper triangle of a k×k block onto its strict lower triangle: a batched GEMM does not
// promise bit-equal V_ij and V_ji, and the epilogues read V as exactly symmetric.
template <typename T>
void mirror_upper(T* v, int64_t k) {
  for (int64_t i = 1; i < k; ++i) {
    for (int64_t j = 0; j < i; ++j) v[i * k + j] = v[j * k + i];
  }
}

void check_mats(const char* op, at::TensorList mats, at::IntArrayRef sides) {
  TORCH_CHECK(mats.size() == sides.size(), op, ": need one side per matrix; got ", mats.size(),
              " matrices and ", sides.size(), " sides");
  for (size_t i = 0; i < mats.size(); ++i) {
    const auto& w = mats[i];
    TORCH_CHECK(w.defined(), op, ": mats[", i, "] is an undefined tensor");
    TORCH_CHECK(w.dim() >= 2 && w.size(-2) >= 1 && w.size(-1) >= 1, op, ": mats[", i,
                "] must have shape (..., m, n) with m, n >= 1; got ", w.sizes());
    TORCH_CHECK(w.device().is_cpu(), op, ": mats[", i, "] must be a CPU tensor; got ", w.device());
    TORCH_CHECK(at::isFloatingType(w.scalar_type()), op, ": mats[", i, "] must be floating; got ",
                w.scalar_type());
    TORCH_CHECK(w.scalar_type() == mats[0].scalar_type(), op, ": all mats must share one dtype; got ",
                mats[0].scalar_type(), " and ", w.scalar_type());
    TORCH_CHECK(sides[i] == 0 || sides[i] == 1, op, ": sides must be 0 (rows) or 1 (cols); got ", sides[i]);
  }
}

// params per kind (see n_params); non-finite values would make every value NaN or inf silently,
// and an MHE s outside {0, 1, 2} would run the s = 2 energy
void check_params(const char* op, Kind kind, c10::string_view kind_name, at::ArrayRef<double> params) {
  TORCH_CHECK(params.size() == n_params(kind), op, ": kind '", std::string(kind_name), "' takes ", n_params(kind),
              " params; got ", params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(std::isfinite(params[i]), op, ": params must be finite; got params[", i, "] = ", params[i]);
  }
  if (kind == Kind::Mhe) {
    TORCH_CHECK(params[0] == 0 || params[0] == 1 || params[0] == 2, op,
                ": mhe params[0] (s) must be 0, 1 or 2; got ", params[0]);
    TORCH_CHECK(params[2] > 0, op, ": mhe params[2] (eps) must be > 0; got ", params[2]);
    TORCH_CHECK(params[3] == 0 || params[3] == 1, op, ": mhe params[3] (angular) must be 0 or 1; got ", params[3]);
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>> gram_penalty_fwd_cpu(at::TensorList mats, c10::string_view kind_name,
                                                                     at::IntArrayRef sides, at::ArrayRef<double> params,
                                                                     bool need_grad) {
  const char* op = "gram_penalty_fwd";
  const Kind kind = parse_kind(kind_name);
  check_mats(op, mats, sides);
  check_params(op, kind, kind_name, params);
  const auto dtype = mats.empty() ? at::kFloat : math_dtype(mats[0].scalar_type());
  int64_t total = 0;
  for (const auto& w : mats) total += batch_of(w);
  auto values = at::empty({total}, at::TensorOptions().dtype(dtype));
  std::vector<at::Tensor> coefs;
  coefs.reserve(mats.size());
  int64_t offset = 0;
  for (size_t i = 0; i < mats.size(); ++i) {
    const auto W = as_batch(mats[i]).to(dtype);
    const int64_t batch = W.size(0), m = W.size(1), n = W.size(2);
    bool rows = sides[i] == 0;
    double ortho_offset = 0;
    if (kind == Kind::Orthogonality) {
      // ‖Wᵀ W − I_n‖² = ‖W Wᵀ − I_m‖² + (n − m) (the Grams share their non-zero eigenvalues), same
      // gradient: the k×k Gram serves either side, exactly and without cancellation
      ortho_offset = static_cast<double>((rows ? m : n) - std::min(m, n));
      rows = m < n || (m == n && rows);
    }
    const int64_t k = rows ? m : n;
    auto V = at::empty({batch, k, k}, W.options());
    const bool batched = use_batched(k);
    if (batched) {
      const auto X = rows ? W : W.transpose(1, 2);  // (batch, k, inner): V_b = X_b X_bᵀ
      at::bmm_out(V, X, X.transpose(1, 2));
    }
    AT_DISPATCH_FLOATING_TYPES(dtype, "gram_penalty_fwd_cpu", [&] {
      scalar_t* out = values.data_ptr<scalar_t>() + offset;
      if (batched) {
        scalar_t* v = V.data_ptr<scalar_t>();
        auto one = [&](int64_t b) {
          scalar_t* vb = v + b * k * k;
          mirror_upper(vb, k);
          out[b] = static_cast<scalar_t>(run_epilogue<scalar_t>(kind, vb, k, params, need_grad, ortho_offset));
        };
        if (batch == 1) {
          one(0);  // outside a parallel region, so the epilogue's loop over rows can run in parallel
        } else {
          // ~16K Gram entries per work item; the epilogues' loops over rows run serially in here
          // (each row is computed alone either way: the bits do not depend on the threading)
          at::parallel_for(0, batch, std::max<int64_t>(1, grain_rows(k) / k), [&](int64_t lo, int64_t hi) {
            for (int64_t b = lo; b < hi; ++b) one(b);
          });
        }
      } else {
        for (int64_t b = 0; b < batch; ++b) {
          auto Vb = V.select(0, b);
          symmetric_gram(rows ? W.select(0, b) : W.select(0, b).t(), Vb);
          out[b] = static_cast<scalar_t>(
              run_epilogue<scalar_t>(kind, Vb.data_ptr<scalar_t>(), k, params, need_grad, ortho_offset));
        }
      }
    });
    coefs.push_back(need_grad ? V : at::empty({0}, W.options()));
    offset += batch;
  }
  return {values, coefs};
}

std::vector<at::Tensor> gram_penalty_bwd_cpu(at::TensorList mats, at::TensorList coefs, at::IntArrayRef sides,
                                             const at::Tensor& grad) {
  const char* op = "gram_penalty_bwd";
  check_mats(op, mats, sides);
  TORCH_CHECK(coefs.size() == mats.size(), op, ": need one coefficient tensor per matrix; got ", coefs.size(),
              " for ", mats.size(), " matrices");
  int64_t total = 0;
  for (const auto& w : mats) total += batch_of(w);
  TORCH_CHECK(grad.defined() && grad.device().is_cpu() && at::isFloatingType(grad.scalar_type()), op,
              ": grad must be a floating CPU tensor; got ",
              grad.defined() ? grad.toString() + " on " + grad.device().str() : std::string("an undefined tensor"));
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == total, op, ": grad must have shape (", total,
              ",), one entry per matrix of mats; got ", grad.sizes());
  const auto dtype = mats.empty() ? at::kFloat : math_dtype(mats[0].scalar_type());
  std::vector<at::Tensor> out;
  out.reserve(mats.size());
  const auto g = grad.to(at::kDouble).contiguous();
  const double* gp = g.data_ptr<double>();
  int64_t offset = 0;
  for (size_t i = 0; i < mats.size(); ++i) {
    const auto& P = coefs[i];
    const int64_t batch = batch_of(mats[i]), m = mats[i].size(-2), n = mats[i].size(-1);
    TORCH_CHECK(P.defined() && P.device().is_cpu() && P.scalar_type() == dtype, op, ": coefs[", i,
                "] must be a CPU tensor of the math dtype ", dtype, "; got ",
                P.defined() ? P.toString() + " on " + P.device().str() : std::string("an undefined tensor"));
    TORCH_CHECK(P.dim() == 3 && P.size(0) == batch && P.size(1) == P.size(2) && (P.size(1) == m || P.size(1) == n),
                op, ": coefs[", i, "] must have shape (", batch, ", k, k) with k = ", m, " (rows) or ", n,
                " (cols) for mats[", i, "] of shape ", mats[i].sizes(), "; got ", P.sizes(),
                " (was the forward run with need_grad=True?)");
    const auto W = as_batch(mats[i]).to(dtype);
    // P is m×m (rows) or n×n (cols); for a square W the side says which Gram it came from
    // (orthogonality always uses the k×k Gram, and for a square W that is the side asked for)
    const bool rows = P.size(1) == m && (m != n || sides[i] == 0);
    at::Tensor dW;
    if (use_batched(P.size(1))) {
      dW = rows ? at::bmm(P, W) : at::bmm(W, P);
      dW.mul_(g.narrow(0, offset, batch).to(dtype).view({batch, 1, 1}));
    } else {
      dW = at::empty(W.sizes(), W.options());
      for (int64_t b = 0; b < batch; ++b) {
        auto o = dW.select(0, b);
        // beta = 0: the uninitialised output is never read
        if (rows) {
          at::addmm_out(o, o, P.select(0, b), W.select(0, b), 0, gp[offset + b]);
        } else {
          at::addmm_out(o, o, W.select(0, b), P.select(0, b), 0, gp[offset + b]);
        }
      }
    }
    out.push_back(dW.view(mats[i].sizes()).to(mats[i].scalar_type()));
    offset += batch;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(regkernels, CPU, m) {
  m.impl("gram_penalty_fwd", &gram_penalty_fwd_cpu);
  m.impl("gram_penalty_bwd", &gram_penalty_bwd_cpu);
}

}  // namespace regkernels
