// Frame statistics of a convolution operator on CPU (docs/conv.md#conv_frame_penalty): for every border
// class κ and channel a of Gram(T, side), the diagonal d and the Gershgorin radius r, and their backward —
// without T. The math is regkernels.composite.conv's module docstring; the geometry (which tap pairs of which
// class land on which offset, with what multiplicity) arrives as a plan built in Python
// (regkernels._C_ops._frame_cpu_plan), so this file knows nothing of strides or padding.
//
// Layout: the tap-Gram factor is tap-major, Z[g, m, t·Cx + a] (m the summed channel, a the channel of V's
// rows: cols m = output o, a = input c; rows m = input c, a = output o), so that the tap Gram
// X[g] = Z[g]ᵀ Z[g] holds for every tap pair (t, t') a Cx × Cx block X[t·Cx + a, t'·Cx + a'] whose rows are
// contiguous in a'. One row a of V_κ at offset q is then a sum of contiguous rows of X:
//
//   V_κ[a, ·, q] = Σ_{(t, t', m) ∈ run(κ, q)} m · X[t·Cx + a, t'·Cx : (t' + 1)·Cx]
//
// Forward: X by BLAS from the blocks on and above its diagonal (csrc/cpu/blas_util.h: about half the
// flops of the full product), mirrored; then one pass in parallel over the rows (g, a): for each class
// and each offset run a vector of Cx entries is summed in a scratch row, its entry a at offset 0 is d
// and is zeroed (not subtracted), and r adds up the absolute values. Z is divided per group by a power
// of two σ_g near max|Z[g]| first (exact) and d, r are scaled back by σ_g² ((x·σ)·σ), so X never
// overflows on its own (regkernels._geometry.factor_scale). With keep, X̂ (the scaled X) is returned
// for the backward.
// Backward: gX[g, t·Cx + a, t'·Cx + a'] = Σ m · gV_κ[a, a', q] with gV = grad_r[κ, a] · sign(V_κ) off the
// entry (a, q = 0) and grad_d[κ, a] on it (sign(NaN) = 0, as torch.sign): the transposed pass, each row
// (g, a) owning the rows t·Cx + a of gX (no atomics); then gX ← gX + gXᵀ in place and ONE product
// gZ = Z·gX. V_κ's signs are recomputed from the kept X̂ (sign(V̂) = sign(V)), or from a recomputed X̂
// when the forward kept none.
//
// Math in float32 for float16 / bfloat16 / float32 weights, in float64 for float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "blas_util.h"

namespace regkernels {
namespace {

using cpu::lane_sum;

// The shapes of one call: G groups, weight (G·Og, Cg, K); V's channels per group Cx and the summed
// channels M (cols: Cx = Cg, M = Og; rows: Cx = Og, M = Cg); N = K·Cx; NC classes, Q offsets.
struct Problem {
  int64_t G, Og, Cg, K, M, Cx, N, NC, Q, zero;
  bool rows;
};

at::ScalarType math_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

Problem make_problem(const char* op, const at::Tensor& weight, const at::Tensor& plan, const at::Tensor& kptr,
                     int64_t n_offsets, int64_t zero, int64_t groups, bool rows) {
  TORCH_CHECK(weight.layout() == at::kStrided, op, ": weight must be a strided (dense) tensor; got ", weight.layout());
  TORCH_CHECK(weight.device().is_cpu(), op, ": weight must be a CPU tensor; got ", weight.device());
  const auto dt = weight.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble, op,
              ": weight must be float16, bfloat16, float32 or float64; got ", dt);
  TORCH_CHECK(weight.dim() == 5, op, ": weight must be 5-D (C_out, C_in/groups, k0, k1, k2); got shape ",
              weight.sizes());
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, op, ": groups must be >= 1 and divide C_out = ",
              weight.size(0), "; got groups = ", groups);
  TORCH_CHECK(plan.device().is_cpu() && plan.scalar_type() == at::kInt && plan.dim() == 2 && plan.size(1) == 4 &&
                  plan.is_contiguous(),
              op, ": plan must be a contiguous int32 CPU tensor (entries, 4) of (t, t', q, multiplicity); got ",
              plan.scalar_type(), " ", plan.sizes(), " on ", plan.device());
  TORCH_CHECK(kptr.device().is_cpu() && kptr.scalar_type() == at::kInt && kptr.dim() == 1 && kptr.numel() >= 1 &&
                  kptr.is_contiguous(),
              op, ": class_ptr must be a contiguous int32 CPU tensor (classes + 1,); got ", kptr.scalar_type(), " ",
              kptr.sizes(), " on ", kptr.device());
  TORCH_CHECK(n_offsets >= 1 && zero >= 0 && zero < n_offsets, op, ": need n_offsets >= 1 and 0 <= zero < n_offsets; got ",
              n_offsets, ", ", zero);
  Problem P;
  P.G = groups;
  P.Og = weight.size(0) / groups;
  P.Cg = weight.size(1);
  P.K = weight.size(2) * weight.size(3) * weight.size(4);
  P.rows = rows;
  P.Cx = rows ? P.Og : P.Cg;
  P.M = rows ? P.Cg : P.Og;
  P.N = P.K * P.Cx;
  P.NC = kptr.numel() - 1;
  P.Q = n_offsets;
  P.zero = zero;
  // the plan's entries index rows and blocks of X: every one is checked once here, not in the loops
  const int32_t* e = plan.data_ptr<int32_t>();
  const int32_t* kp = kptr.data_ptr<int32_t>();
  const int64_t nnz = plan.size(0);
  TORCH_CHECK(kp[0] == 0 && kp[P.NC] == nnz, op, ": class_ptr must run from 0 to the plan's ", nnz, " entries; got ",
              kp[0], " .. ", kp[P.NC]);
  for (int64_t c = 0; c < P.NC; ++c) {
    TORCH_CHECK(kp[c] <= kp[c + 1], op, ": class_ptr must be non-decreasing; got ", kp[c], " > ", kp[c + 1]);
    for (int64_t i = kp[c]; i < kp[c + 1]; ++i) {
      const int32_t t = e[4 * i], t2 = e[4 * i + 1], q = e[4 * i + 2], m = e[4 * i + 3];
      TORCH_CHECK(t >= 0 && t < P.K && t2 >= 0 && t2 < P.K && q >= 0 && q < P.Q && m >= 1, op, ": plan entry ", i,
                  " = (", t, ", ", t2, ", ", q, ", ", m, ") is out of range for ", P.K, " taps and ", P.Q, " offsets");
      TORCH_CHECK(i == kp[c] || e[4 * (i - 1) + 2] <= q, op,
                  ": the plan's offsets must be sorted within each class (entry ", i, ")");
    }
  }
  TORCH_CHECK(P.N < (int64_t(1) << 31) && (P.N == 0 || P.G <= ((int64_t(1) << 62) / P.N) / P.N), op,
              ": the tap Gram (", P.G, ", ", P.N, ", ", P.N, ") overflows int64 indexing");
  return P;
}

// Z (G, M, N) tap-major in the math dtype, contiguous.
at::Tensor factor(const at::Tensor& weight, const Problem& P) {
  auto W = weight.to(math_dtype(weight.scalar_type())).reshape({P.G, P.Og, P.Cg, P.K});
  auto Z = P.rows ? W.permute({0, 2, 3, 1}) : W.permute({0, 1, 3, 2});  // (G, M, K, Cx)
  return Z.contiguous().view({P.G, P.M, P.N});
}

// ∂Z (G, M, N) back to the weight's shape and dtype (the inverse permutation of factor).
at::Tensor weight_of_factor(const at::Tensor& gZ, const at::Tensor& weight, const Problem& P) {
  auto g = gZ.view({P.G, P.M, P.K, P.Cx});
  g = P.rows ? g.permute({0, 3, 1, 2}) : g.permute({0, 1, 3, 2});  // (G, Og, Cg, K)
  return g.reshape(weight.sizes()).to(weight.scalar_type()).contiguous();
}

// σ_g per group: a power of two with max|Z[g]|/σ_g ∈ [1, 2); 1 for a zero or non-finite group (its NaN /
// Inf then reaches d and r). regkernels._numerics.pow2_scale, per group.
std::vector<double> group_scales(const at::Tensor& Z) {
  std::vector<double> s(Z.size(0), 1.0);
  if (Z.numel() == 0) return s;
  const auto big = Z.abs().amax({1, 2}).to(at::kDouble).contiguous();
  const double* b = big.data_ptr<double>();
  for (int64_t g = 0; g < Z.size(0); ++g) {
    if (std::isfinite(b[g]) && b[g] > 0) {
      int e;
      std::frexp(b[g], &e);  // b = f·2^e, f ∈ [0.5, 1)
      s[g] = std::ldexp(1.0, e - 1);
    }
  }
  return s;
}

// X̂ (G, N, N) = (Z[g]/σ_g)ᵀ (Z[g]/σ_g), exactly symmetric.
at::Tensor tap_gram(const at::Tensor& Z, const std::vector<double>& sigma, const Problem& P) {
  auto X = at::empty({P.G, P.N, P.N}, Z.options());
  for (int64_t g = 0; g < P.G; ++g) {
    auto Zg = sigma[g] == 1.0 ? Z.select(0, g) : Z.select(0, g) / sigma[g];
    if (P.M == 0) {
      X.select(0, g).zero_();
    } else {
      cpu::symmetric_gram(Zg.t(), X.select(0, g), /*max_blocks=*/8);
    }
  }
  return X;
}

// The sum of one offset run of class κ for row a of group g: v = Σ m · X[t·Cx + a, t'·Cx : (t'+1)·Cx].
// Returns the index of the first entry after the run.
template <typename T>
inline int64_t run_sum(const T* Xg, const int32_t* e, int64_t i, int64_t end, int64_t a, const Problem& P, T* v) {
  const int64_t q = e[4 * i + 2];
  bool first = true;
  for (; i < end && e[4 * i + 2] == q; ++i) {
    const T* src = Xg + (e[4 * i] * P.Cx + a) * P.N + e[4 * i + 1] * P.Cx;
    const T m = static_cast<T>(e[4 * i + 3]);
    if (first) {
      if (m == T(1)) {
        for (int64_t j = 0; j < P.Cx; ++j) v[j] = src[j];
      } else {
        for (int64_t j = 0; j < P.Cx; ++j) v[j] = m * src[j];
      }
      first = false;
    } else if (m == T(1)) {
      for (int64_t j = 0; j < P.Cx; ++j) v[j] += src[j];
    } else {
      for (int64_t j = 0; j < P.Cx; ++j) v[j] += m * src[j];
    }
  }
  return i;
}

// Rows (g, a) per parallel work item: about 64K entries of X read per item.
int64_t grain(const Problem& P) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(P.K * P.N, 1)); }

template <typename T>
void contract_forward(const T* X, const int32_t* e, const int32_t* kp, const Problem& P,
                      const std::vector<double>& sigma, T* d, T* r) {
  at::parallel_for(0, P.G * P.Cx, grain(P), [&](int64_t lo, int64_t hi) {
    std::vector<T> v(P.Cx);
    for (int64_t ga = lo; ga < hi; ++ga) {
      const int64_t g = ga / P.Cx, a = ga % P.Cx;
      const T* Xg = X + g * P.N * P.N;
      const T s = static_cast<T>(sigma[g]);
      for (int64_t c = 0; c < P.NC; ++c) {
        T dv = 0, rv = 0;
        for (int64_t i = kp[c]; i < kp[c + 1];) {
          const int64_t q = e[4 * i + 2];
          i = run_sum(Xg, e, i, kp[c + 1], a, P, v.data());
          if (q == P.zero) {  // the diagonal entry: d, and zeroed (not subtracted) out of r
            dv = v[a];
            v[a] = 0;
          }
          rv += lane_sum<T>(0, P.Cx, [&](int64_t j) { return std::abs(v[j]); });
        }
        const int64_t out = (g * P.NC + c) * P.Cx + a;
        d[out] = dv * s * s;  // (x·σ)·σ: σ² alone may overflow where x·σ² does not
        r[out] = rv * s * s;
      }
    }
  });
}

template <typename T>
void contract_backward(const T* X, const int32_t* e, const int32_t* kp, const Problem& P, const T* gd, const T* gr,
                       T* gX) {
  at::parallel_for(0, P.G * P.Cx, grain(P), [&](int64_t lo, int64_t hi) {
    std::vector<T> v(P.Cx);
    for (int64_t ga = lo; ga < hi; ++ga) {
      const int64_t g = ga / P.Cx, a = ga % P.Cx;
      const T* Xg = X + g * P.N * P.N;
      T* gXg = gX + g * P.N * P.N;
      for (int64_t c = 0; c < P.NC; ++c) {
        const int64_t at_ = (g * P.NC + c) * P.Cx + a;
        const T cd = gd[at_], cr = gr[at_];
        for (int64_t i = kp[c]; i < kp[c + 1];) {
          const int64_t q = e[4 * i + 2];
          const int64_t end = run_sum(Xg, e, i, kp[c + 1], a, P, v.data());
          // v ← ∂L/∂V_κ[a, ·, q]: grad_r · sign(v) (torch.sign: 0 for 0 and NaN), grad_d on the diagonal entry
          for (int64_t j = 0; j < P.Cx; ++j) v[j] = cr * static_cast<T>((v[j] > 0) - (v[j] < 0));
          if (q == P.zero) v[a] = cd;
          for (; i < end; ++i) {
            T* dst = gXg + (e[4 * i] * P.Cx + a) * P.N + e[4 * i + 1] * P.Cx;
            const T m = static_cast<T>(e[4 * i + 3]);
            if (m == T(1)) {
              for (int64_t j = 0; j < P.Cx; ++j) dst[j] += v[j];
            } else {
              for (int64_t j = 0; j < P.Cx; ++j) dst[j] += m * v[j];
            }
          }
        }
      }
    }
  });
}

// A ← A + Aᵀ for each (n × n) matrix of a contiguous (G, n, n) tensor, in place. Work item (g, tile of rows i)
// owns the entries (i, j) and (j, i) with j ≤ i, so no two items touch one entry.
template <typename T>
void symmetrize(T* A, int64_t G, int64_t n) {
  constexpr int64_t kTile = 64;
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, G * tiles, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      T* Ag = A + (w / tiles) * n * n;
      const int64_t i_lo = (w % tiles) * kTile, i_hi = std::min(n, i_lo + kTile);
      for (int64_t j_lo = 0; j_lo < i_hi; j_lo += kTile) {
        for (int64_t i = i_lo; i < i_hi; ++i) {
          const int64_t j_hi = std::min(i, j_lo + kTile);
          for (int64_t j = j_lo; j < j_hi; ++j) {
            const T s = Ag[i * n + j] + Ag[j * n + i];
            Ag[i * n + j] = s;
            Ag[j * n + i] = s;
          }
        }
      }
      for (int64_t i = i_lo; i < i_hi; ++i) Ag[i * n + i] += Ag[i * n + i];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_frame_stats_cpu(const at::Tensor& weight, const at::Tensor& plan,
                                                                   const at::Tensor& class_ptr, int64_t n_offsets,
                                                                   int64_t zero, int64_t groups, bool rows, bool keep) {
  const char* op = "regkernels::conv_frame_stats_cpu";
  const Problem P = make_problem(op, weight, plan, class_ptr, n_offsets, zero, groups, rows);
  const auto math = math_dtype(weight.scalar_type());
  auto d = at::zeros({P.G, P.NC, P.Cx}, weight.options().dtype(math));
  auto r = at::zeros_like(d);
  if (d.numel() == 0) {
    return {d, r, at::empty({0}, d.options())};
  }
  const auto Z = factor(weight, P);
  const auto sigma = group_scales(Z);
  auto X = tap_gram(Z, sigma, P);
  AT_DISPATCH_FLOATING_TYPES(math, "conv_frame_stats_cpu", [&] {
    contract_forward<scalar_t>(X.data_ptr<scalar_t>(), plan.data_ptr<int32_t>(), class_ptr.data_ptr<int32_t>(), P,
                               sigma, d.data_ptr<scalar_t>(), r.data_ptr<scalar_t>());
  });
  return {d, r, keep ? X : at::empty({0}, d.options())};
}

at::Tensor conv_frame_stats_cpu_backward(const at::Tensor& weight, const at::Tensor& tap_gram_kept,
                                         const at::Tensor& grad_d, const at::Tensor& grad_r, const at::Tensor& plan,
                                         const at::Tensor& class_ptr, int64_t n_offsets, int64_t zero, int64_t groups,
                                         bool rows) {
  const char* op = "regkernels::conv_frame_stats_cpu_backward";
  const Problem P = make_problem(op, weight, plan, class_ptr, n_offsets, zero, groups, rows);
  const auto math = math_dtype(weight.scalar_type());
  for (const auto* g : {&grad_d, &grad_r}) {
    TORCH_CHECK(g->layout() == at::kStrided && g->device().is_cpu() && at::isFloatingType(g->scalar_type()) &&
                    g->sizes() == at::IntArrayRef({P.G, P.NC, P.Cx}),
                op, ": ", g == &grad_d ? "grad_d" : "grad_r", " must be a floating strided CPU tensor of shape (",
                P.G, ", ", P.NC, ", ", P.Cx, ") (groups, border classes, channels); got ", g->scalar_type(), " ",
                g->sizes(), " on ", g->device());
  }
  TORCH_CHECK(tap_gram_kept.numel() == 0 ||
                  (tap_gram_kept.device().is_cpu() && tap_gram_kept.scalar_type() == math &&
                   tap_gram_kept.sizes() == at::IntArrayRef({P.G, P.N, P.N}) && tap_gram_kept.is_contiguous()),
              op, ": tap_gram must be empty or the forward's contiguous (", P.G, ", ", P.N, ", ", P.N, ") ", math,
              " CPU tensor; got ", tap_gram_kept.scalar_type(), " ", tap_gram_kept.sizes());
  if (weight.numel() == 0 || P.NC == 0 || P.Cx == 0) {
    return at::zeros_like(weight, at::MemoryFormat::Contiguous);
  }
  const auto Z = factor(weight, P);
  const auto X = tap_gram_kept.numel() ? tap_gram_kept : tap_gram(Z, group_scales(Z), P);
  const auto gd = grad_d.to(math).contiguous(), gr = grad_r.to(math).contiguous();
  auto gX = at::zeros({P.G, P.N, P.N}, Z.options());
  AT_DISPATCH_FLOATING_TYPES(math, "conv_frame_stats_cpu_backward", [&] {
    contract_backward<scalar_t>(X.data_ptr<scalar_t>(), plan.data_ptr<int32_t>(), class_ptr.data_ptr<int32_t>(), P,
                                gd.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(), gX.data_ptr<scalar_t>());
    symmetrize<scalar_t>(gX.data_ptr<scalar_t>(), P.G, P.N);  // X = ZᵀZ: ∂Z = Z (∂X + ∂Xᵀ)
  });
  return weight_of_factor(at::bmm(Z, gX), weight, P);
}

}  // namespace

TORCH_LIBRARY_IMPL(regkernels, CPU, m) {
  m.impl("conv_frame_stats_cpu", &conv_frame_stats_cpu);
  m.impl("conv_frame_stats_cpu_backward", &conv_frame_stats_cpu_backward);
}

}  // namespace regkernels
