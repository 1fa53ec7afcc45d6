// Batched one-sided Jacobi SVD on CPU (docs/svd.md#batched_svd; the per-pair math is csrc/core/jacobi_svd.h).
//
// SIMD across matrices: a group of L = 32 bytes / sizeof(T) matrices (8 float / 4 double, one
// AVX2 register) is interleaved lane by lane, entry (row i, column j) of the group's tall
// matrices stored at A[(j·M + i)·L + lane]. Every loop of a sweep then runs over contiguous lanes
// with no horizontal reduction: the column dot products, the rotation parameters and the row
// updates of all L matrices are one vector operation each, and every lane follows the same
// cyclic pair order. A lane whose pair is already orthogonal applies the identity rotation; the
// group stops after a sweep in which no lane rotated (or at kJacobiMaxSweeps). Groups run in
// parallel over the batch. The final sort, normalization and null-column completion are per
// matrix and scalar (O(k·M) against the sweeps' O(k²·M) per sweep). The completion is
// core::complete_orthonormal run over the lanes the CUDA kernel's block would have
// (core::jacobi_block), each phase's lanes one after another: the same code and the same split as
// on the GPU, so these tests check the math the CUDA kernel runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../core/jacobi_svd.h"

namespace regkernels {
namespace {

constexpr int64_t kMaxSide = 128;  // largest max(m, n) of the kernel path (docs/svd.md#batched_svd stretch size)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RK_SVD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define RK_SVD_CLONES
#endif

// Where one group's matrices come from and go to. Lane l holds batch entry first + l (lanes
// past the batch end are zero matrices whose results are dropped).
template <typename T>
struct SvdIO {
  const T* x;
  int64_t sb, sm, sn;  // strides of X (b, m, n)
  T* u;                // (b, m, k)
  T* s;                // (b, k)
  T* vh;               // (b, k, n)
  int64_t b, m, n;
};

// One AVX2 register of lanes; may_alias, as for the intrinsics' __m256, so the same buffer is
// also read and written lane by lane through T* in load_scaled / store_group.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float vec __attribute__((vector_size(32), __may_alias__));
};
template <>
struct Simd<double> {
  typedef double vec __attribute__((vector_size(32), __may_alias__));
};

// The rotation parameters of one column pair in every lane; returns whether any lane rotates.
// Kept out of line as a plain loop over lanes: that form gcc vectorizes (sqrt, division and the
// selects become one AVX2 instruction each), inlined into the sweep it does not.
template <typename T, int L>
RK_SVD_CLONES __attribute__((noinline)) int lane_rotations(const T* __restrict__ alpha, const T* __restrict__ beta,
                                                           const T* __restrict__ gamma, T* __restrict__ s,
                                                           T* __restrict__ tau, T tol, T null2) {
  int live = 0;
  for (int l = 0; l < L; ++l) live |= core::jacobi_rotation(alpha[l], beta[l], gamma[l], tol, null2, s[l], tau[l]);
  return live;
}

// The sweeps for one group of L interleaved tall matrices: A (M × N) and V (N × N) as one
// vector per entry, entry (i, j) at [j·rows + i]. Stops after a sweep in which no lane rotated
// under `tol` (or after kJacobiMaxSweeps).
template <typename T, int L>
RK_SVD_CLONES void jacobi_sweeps(typename Simd<T>::vec* __restrict__ A, typename Simd<T>::vec* __restrict__ V, int M,
                                int N, T tol) {
  using vec = typename Simd<T>::vec;
  static_assert(sizeof(vec) == L * sizeof(T), "one vector holds the L lanes");
  const T null2 = core::jacobi_null_norm2<T>(M);
  for (int sweep = 0; sweep < core::kJacobiMaxSweeps; ++sweep) {
    bool rotated = false;
    for (int p = 0; p < N - 1; ++p) {
      vec* __restrict__ ap = A + static_cast<int64_t>(p) * M;
      vec* __restrict__ vp = V + static_cast<int64_t>(p) * N;
      for (int q = p + 1; q < N; ++q) {
        vec* __restrict__ aq = A + static_cast<int64_t>(q) * M;
        vec* __restrict__ vq = V + static_cast<int64_t>(q) * N;
        vec alpha = {}, beta = {}, gamma = {};
        for (int i = 0; i < M; ++i) {
          const vec x = ap[i], y = aq[i];
          alpha += x * x;
          beta += y * y;
          gamma += x * y;
        }
        vec s, tau;
        if (!lane_rotations<T, L>(reinterpret_cast<const T*>(&alpha), reinterpret_cast<const T*>(&beta),
                                  reinterpret_cast<const T*>(&gamma), reinterpret_cast<T*>(&s),
                                  reinterpret_cast<T*>(&tau), tol, null2))
          continue;
        rotated = true;
        for (int i = 0; i < M; ++i) core::jacobi_rotate(ap[i], aq[i], s, tau);
        for (int i = 0; i < N; ++i) core::jacobi_rotate(vp[i], vq[i], s, tau);
      }
    }
    if (!rotated) break;
  }
}

// x·2^-e, exactly as ldexp (a library call per entry) but as one multiply: 2^-e is a normal
// double for every exponent a float has, and for all but the extreme double exponents.
template <typename T>
inline T scale_down(T x, int e) {
  if (std::is_same_v<T, float> || (e > -1000 && e < 1000)) {
    return static_cast<T>(static_cast<double>(x) * std::ldexp(1.0, -e));
  }
  return core::rk_ldexp(x, -e);
}

// What load and store need to know about one lane's matrix.
struct LaneInfo {
  int exp;          // the power-of-two scale exponent
  bool bad;         // holds a NaN / Inf
  bool transposed;  // A = Xᵀ: always for a wide X; for a square X when its rows are more graded
};

// Per lane: scale exponent, finiteness, orientation. One-sided Jacobi converges in a few sweeps
// on column-graded matrices (X = B·D) but slowly on row-graded ones (D·B, ~30 sweeps and no
// convergence in float64 at a 1e40 spread), so a square X whose row norms spread wider than its
// column norms is decomposed as Xᵀ (a tall X has no such choice).
template <typename T>
void scan_group(const SvdIO<T>& io, int64_t first, int lanes, LaneInfo* info, std::vector<double>& rows,
                std::vector<double>& cols) {
  for (int l = 0; l < lanes; ++l) {
    const T* x = io.x + (first + l) * io.sb;
    T max_abs = T(0);
    bool finite = true;
    for (int64_t i = 0; i < io.m; ++i) {
      for (int64_t j = 0; j < io.n; ++j) {
        const T v = x[i * io.sm + j * io.sn];
        finite &= std::isfinite(v);
        max_abs = std::max(max_abs, std::abs(v));
      }
    }
    info[l].bad = !finite;
    info[l].exp = finite ? core::jacobi_scale_exponent(max_abs) : 0;
    info[l].transposed = io.m < io.n;
    if (io.m != io.n || !finite || max_abs == T(0)) continue;
    std::fill(rows.begin(), rows.end(), 0.0);
    std::fill(cols.begin(), cols.end(), 0.0);
    for (int64_t i = 0; i < io.m; ++i) {
      for (int64_t j = 0; j < io.n; ++j) {
        const double v = scale_down(static_cast<double>(x[i * io.sm + j * io.sn]), info[l].exp);
        rows[i] += v * v;
        cols[j] += v * v;
      }
    }
    auto spread = [](const std::vector<double>& v) {
      const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
      return *hi / std::max(*lo, std::numeric_limits<double>::min());
    };
    info[l].transposed = spread(rows) > spread(cols);
  }
}

// A (M × N, L lanes) = X·2^-e, or Xᵀ·2^-e for a transposed lane; a non-finite matrix and the
// lanes past `lanes` are zeros.
template <typename T, int L>
void load_scaled(const SvdIO<T>& io, int64_t first, int lanes, const LaneInfo* info, T* A, int M, int N) {
  std::fill(A, A + static_cast<int64_t>(M) * N * L, T(0));
  for (int l = 0; l < lanes; ++l) {
    if (info[l].bad) continue;
    const T* x = io.x + (first + l) * io.sb;
    const bool tr = info[l].transposed;
    for (int64_t i = 0; i < io.m; ++i) {
      for (int64_t j = 0; j < io.n; ++j) {
        // A[row i][col j] = X[i][j], transposed: A[row j][col i] = X[i][j]
        const int64_t row = tr ? j : i, col = tr ? i : j;
        A[(col * M + row) * L + l] = scale_down(x[i * io.sm + j * io.sn], info[l].exp);
      }
    }
  }
}

template <typename T, int L>
void set_identity(T* V, int N) {
  std::fill(V, V + static_cast<int64_t>(N) * N * L, T(0));
  for (int j = 0; j < N; ++j) {
    for (int l = 0; l < L; ++l) V[(static_cast<int64_t>(j) * N + j) * L + l] = T(1);
  }
}

// Per lane: σ_j, the stable descending order, normalized (and completed) U columns, written to
// the outputs in torch.linalg.svd's layout. `ucols` is M × N scratch (column-major), `fill`
// 2·M + N scratch for the completion.
template <typename T, int L>
void store_group(const SvdIO<T>& io, int64_t first, int lanes, const LaneInfo* info, const T* A, const T* V, int M,
                 int N, std::vector<T>& ucols, std::vector<T>& sigma, std::vector<int>& order, std::vector<T>& fill) {
  const T null2 = core::jacobi_null_norm2<T>(M);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const int64_t k = N;
  for (int l = 0; l < lanes; ++l) {
    const int64_t bi = first + l;
    T* u = io.u + bi * io.m * k;
    T* s = io.s + bi * k;
    T* vh = io.vh + bi * k * io.n;
    if (info[l].bad) {
      std::fill(u, u + io.m * k, nan);
      std::fill(s, s + k, nan);
      std::fill(vh, vh + k * io.n, nan);
      continue;
    }
    for (int j = 0; j < N; ++j) {
      T a2 = T(0);
      for (int i = 0; i < M; ++i) {
        const T v = A[(static_cast<int64_t>(j) * M + i) * L + l];
        a2 += v * v;
      }
      sigma[j] = a2;  // squared for now
    }
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return sigma[a] > sigma[b]; });
    int rank = 0;
    for (int j = 0; j < N; ++j) {
      const int src = order[j];
      const T a2 = sigma[src];
      if (a2 > null2) {
        ++rank;
        const T inv = T(1) / std::sqrt(a2);
        for (int i = 0; i < M; ++i) {
          ucols[static_cast<int64_t>(j) * M + i] = A[(static_cast<int64_t>(src) * M + i) * L + l] * inv;
        }
      }
      s[j] = core::rk_ldexp(std::sqrt(a2), info[l].exp);
    }
    if (rank < N) {
      auto col = [&](int j, int i) -> T& { return ucols[static_cast<int64_t>(j) * M + i]; };
      const int block_lanes = core::jacobi_block(M, N).threads;
      core::complete_orthonormal<T>(col, M, rank, N, fill.data(), fill.data() + M, fill.data() + 2 * M, block_lanes,
                                    core::SerialLanes{block_lanes});
    }
    // U_A = ucols (M × N), V_A = V columns in `order` (N × N); X = U_A S V_Aᵀ, or, transposed,
    // X = V_A S U_Aᵀ
    for (int j = 0; j < N; ++j) {
      const T* vcol = V + static_cast<int64_t>(order[j]) * N * L + l;
      const T* ucol = ucols.data() + static_cast<int64_t>(j) * M;
      if (!info[l].transposed) {
        for (int64_t i = 0; i < io.m; ++i) u[i * k + j] = ucol[i];
        for (int64_t i = 0; i < io.n; ++i) vh[j * io.n + i] = vcol[i * L];
      } else {
        for (int64_t i = 0; i < io.m; ++i) u[i * k + j] = vcol[i * L];
        for (int64_t i = 0; i < io.n; ++i) vh[j * io.n + i] = ucol[i];
      }
    }
  }
}

// 32-byte aligned scratch of `count` vectors (std::vector<vec> would drop the vector attributes).
template <typename T>
struct AlignedLanes {
  using vec = typename Simd<T>::vec;
  static constexpr int L = sizeof(vec) / sizeof(T);
  std::vector<T> storage;
  T* data;
  explicit AlignedLanes(size_t count) : storage((count + 1) * L) {
    data = storage.data() + (L - (reinterpret_cast<uintptr_t>(storage.data()) % sizeof(vec)) / sizeof(T)) % L;
  }
  vec* vecs(size_t offset = 0) { return reinterpret_cast<vec*>(data) + offset; }
  T* lanes(size_t offset = 0) { return data + offset * L; }
};

template <typename T>
void svd_cpu_impl(const SvdIO<T>& io) {
  constexpr int L = 32 / sizeof(T);
  const int M = static_cast<int>(std::max(io.m, io.n)), N = static_cast<int>(std::min(io.m, io.n));
  const size_t mn = static_cast<size_t>(M) * N, nn = static_cast<size_t>(N) * N;
  const int64_t groups = (io.b + L - 1) / L;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    AlignedLanes<T> buf(mn + nn);  // A, then V
    std::vector<T> ucols(mn), sigma(N), fill(2 * static_cast<size_t>(M) + N);
    std::vector<int> order(N);
    std::vector<double> rows(io.m), cols(io.n);
    LaneInfo info[L];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t first = g * L;
      const int lanes = static_cast<int>(std::min<int64_t>(L, io.b - first));
      scan_group(io, first, lanes, info, rows, cols);
      load_scaled<T, L>(io, first, lanes, info, buf.lanes(), M, N);
      set_identity<T, L>(buf.lanes(mn), N);
      jacobi_sweeps<T, L>(buf.vecs(), buf.vecs(mn), M, N, core::jacobi_tolerance<T>(M));
      store_group<T, L>(io, first, lanes, info, buf.lanes(), buf.lanes(mn), M, N, ucols, sigma, order, fill);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_svd_cpu(const at::Tensor& X) {
  TORCH_CHECK(X.dim() == 3, "regkernels::batched_svd (CPU): X must be (b, m, n); got shape ", X.sizes());
  TORCH_CHECK(X.scalar_type() == at::kFloat || X.scalar_type() == at::kDouble,
              "regkernels::batched_svd (CPU): X must be float32 or float64; got ", X.scalar_type());
  const int64_t b = X.size(0), m = X.size(1), n = X.size(2);
  TORCH_CHECK(m >= 1 && n >= 1 && std::max(m, n) <= kMaxSide, "regkernels::batched_svd (CPU): the kernel takes ",
              "1 <= m, n and max(m, n) <= ", kMaxSide, " (larger matrices go to torch.linalg.svd); got m=", m,
              ", n=", n);
  const int64_t k = std::min(m, n);
  auto U = at::empty({b, m, k}, X.options());
  auto S = at::empty({b, k}, X.options());
  auto Vh = at::empty({b, k, n}, X.options());
  if (b == 0) return {U, S, Vh};
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "batched_svd_cpu", [&] {
    SvdIO<scalar_t> io{X.const_data_ptr<scalar_t>(), X.stride(0), X.stride(1), X.stride(2), U.data_ptr<scalar_t>(),
                       S.data_ptr<scalar_t>(), Vh.data_ptr<scalar_t>(), b, m, n};
    svd_cpu_impl<scalar_t>(io);
  });
  return {U, S, Vh};
}

}  // namespace
}  // namespace regkernels

TORCH_LIBRARY_IMPL(regkernels, CPU, m) { m.impl("batched_svd", &regkernels::batched_svd_cpu); }
