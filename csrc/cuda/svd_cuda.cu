// Batched one-sided Jacobi SVD on CUDA (docs/svd.md#batched_svd; the per-pair math is csrc/core/jacobi_svd.h).
//
// One block per matrix. The tall matrix A (M × N, A = X or Xᵀ) and V (N × N) live in dynamic
// shared memory, column-major: column j of A at A + j·ldA, of V at V + j·ldV. A sweep is a
// round-robin tournament over the columns (N padded to even with a dummy column): each of its
// N_pad − 1 steps holds N_pad/2 disjoint pairs, every pair occurs once per sweep, and a group of
// G lanes (a power-of-two slice of a warp) handles one pair per step: lane r owns rows
// r, r + G, …, r + (R − 1)·G, keeps them in registers between the dot products and the rotation,
// and the three sums are butterfly-reduced with shuffles inside the group (xor butterflies leave
// the same bits in every lane, so all lanes derive the same (c, s)). G and R (rows per lane) are
// template parameters, so the row loops and the butterflies unroll into straight-line code with
// constant shared-memory offsets; the host picks G from core::jacobi_block (shared with the CPU
// kernel) and R = ⌈M/G⌉ rounded up to 4 or 8. Steps are separated by __syncthreads; the block
// stops after a sweep without rotation (or kJacobiMaxSweeps).
//
// Then σ_j = ‖a_j‖ and the stable descending order (by ‖a_j‖², ties by index, as the CPU
// kernel; numerically null columns, ‖a_j‖² ≤ null_norm2 < every live ‖a_j‖², come last).
// Columns are normalized in place and never moved: the order is the permutation s_perm
// (sorted slot → storage column), which the null-column completion and the output stores read
// through. The completion is core::complete_orthonormal, the code the CPU kernel runs, with lane =
// threadIdx.x over the whole block and a __syncthreads() after each of its phases.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>

#include "../core/jacobi_svd.h"

namespace regkernels {
namespace {

constexpr int kMaxSide = 64;  // largest max(m, n) of this kernel
constexpr int kMaxThreads = core::kJacobiMaxThreads;
constexpr int kMaxRows = 8;   // rows of one column a lane holds: G·kMaxRows ≥ M (see core::jacobi_block)

template <typename T>
struct FloatTraits;
template <>
struct FloatTraits<float> {
  static constexpr float max_finite = FLT_MAX;
  static __device__ __forceinline__ float nan() { return __int_as_float(0x7fc00000); }
};
template <>
struct FloatTraits<double> {
  static constexpr double max_finite = DBL_MAX;
  static __device__ __forceinline__ double nan() { return __longlong_as_double(0x7ff8000000000000LL); }
};

struct SvdShape {
  int64_t sb;  // batch stride of X
  int64_t rs;  // stride of X along a row of A (A(i, j) = x[i·rs + j·cs])
  int64_t cs;  // stride of X along a column of A
  int m, n;    // X is m × n
  int M, N;    // A is M × N, M = max(m, n), N = k = min(m, n)
  int ldA, ldV;
};

// Sum over the G lanes of one group (all lanes get the same bits: a + b == b + a exactly).
template <int G, typename T>
__device__ __forceinline__ T group_sum(T v, unsigned mask) {
#pragma unroll
  for (int off = G >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off);
  return v;
}

// One phase of core::complete_orthonormal over the block: lane = thread, then a barrier. Every
// thread of the block calls it (the completion runs under a block-uniform condition).
struct BlockLanes {
  template <typename F>
  __device__ __forceinline__ void operator()(F&& f) const {
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
  }
};

// Sorted slot r of the output = src column perm[r] (length len). Row-major out, either
// (len × k) with the slot as a column (U-shaped) or (k × len) with the slot as a row (Vh-shaped).
template <typename T>
__device__ __forceinline__ void store_sorted(T* __restrict__ out, const T* src, int ld, const int* perm, int len,
                                             int k, bool slot_is_column) {
  for (int e = threadIdx.x; e < len * k; e += blockDim.x) {
    const int major = slot_is_column ? e / k : e / len;
    const int minor = e - major * (slot_is_column ? k : len);
    const int slot = slot_is_column ? minor : major, i = slot_is_column ? major : minor;
    out[e] = src[perm[slot] * ld + i];
  }
}

// blockDim.x is a multiple of 32 and a multiple of G (host side), ≤ kMaxThreads; G·R ≥ M.
template <typename T, int G, int R>
__global__ void __launch_bounds__(kMaxThreads)
    batched_svd_kernel(const T* __restrict__ X, T* __restrict__ U, T* __restrict__ S, T* __restrict__ Vh,
                       const SvdShape sh) {
  extern __shared__ __align__(16) unsigned char svd_smem[];
  __shared__ T s_norm2[kMaxSide];
  __shared__ int s_perm[kMaxSide];
  __shared__ T s_warp[kMaxThreads / 32];
  __shared__ T s_colnorm2[kMaxSide];  // also the completion's rest[]
  __shared__ T s_w[kMaxSide];
  __shared__ T s_d[kMaxSide];
  __shared__ int s_flag;  // A = Xᵀ
  __shared__ int s_ex;    // the scale exponent
  static_assert(G >= 1 && G <= core::kJacobiMaxGroup && (G & (G - 1)) == 0, "G: a power of two dividing a warp");
  static_assert(R >= 1 && R <= kMaxRows, "R: rows per lane");

  const int M = sh.M, N = sh.N, ldA = sh.ldA, ldV = sh.ldV;
  T* A = reinterpret_cast<T*>(svd_smem);
  T* V = A + N * ldA;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t bi = blockIdx.x;
  const T* x = X + bi * sh.sb;
  const int k = N;

  // ---- load: raw X into A, max |x| and finiteness (NaN fails the <= test) ----
  // walk X along its smaller stride so that consecutive threads read neighbouring addresses
  const bool cols_fast = (sh.cs < 0 ? -sh.cs : sh.cs) <= (sh.rs < 0 ? -sh.rs : sh.rs);
  T max_abs = T(0);
  int bad = 0;
  for (int e = tid; e < M * N; e += nthreads) {
    int i, j;
    if (cols_fast) {
      i = e / N;
      j = e - i * N;
    } else {
      j = e / M;
      i = e - j * M;
    }
    const T v = x[i * sh.rs + j * sh.cs];
    A[j * ldA + i] = v;
    const T a = core::rk_abs(v);
    bad |= !(a <= FloatTraits<T>::max_finite);
    max_abs = a > max_abs ? a : max_abs;
  }
  for (int off = 16; off > 0; off >>= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, max_abs, off);
    max_abs = o > max_abs ? o : max_abs;
  }
  if ((tid & 31) == 0) s_warp[tid >> 5] = max_abs;
  if (__syncthreads_or(bad)) {
    // the whole block takes this branch; a non-finite matrix needs no iteration: NaN factors
    const T nan = FloatTraits<T>::nan();
    T* u = U + bi * sh.m * k;
    T* s = S + bi * k;
    T* vh = Vh + bi * k * sh.n;
    for (int e = tid; e < sh.m * k; e += nthreads) u[e] = nan;
    for (int e = tid; e < k; e += nthreads) s[e] = nan;
    for (int e = tid; e < k * sh.n; e += nthreads) vh[e] = nan;
    return;
  }
  max_abs = s_warp[0];
  for (int w = 1; w < nthreads / 32; ++w) max_abs = s_warp[w] > max_abs ? s_warp[w] : max_abs;
  const int ex = core::jacobi_scale_exponent(max_abs);
  // the exponent and the orientation are needed again only at the stores: kept in shared memory
  // rather than in two registers across the sweeps (published by the barrier after V's init)
  if (tid == 0) {
    s_ex = ex;
    s_flag = sh.m < sh.n;
  }
  for (int e = tid; e < M * N; e += nthreads) {
    const int j = e / M, i = e - j * M;
    A[j * ldA + i] = core::rk_ldexp(A[j * ldA + i], -ex);
  }
  for (int e = tid; e < N * N; e += nthreads) {
    const int j = e / N, i = e - j * N;
    V[j * ldV + i] = i == j ? T(1) : T(0);
  }
  __syncthreads();
  // Orientation of a square X (as the CPU kernel's scan_group): one-sided Jacobi converges fast
  // on column-graded matrices and slowly on row-graded ones, so when the row norms spread wider
  // than the column norms A becomes Xᵀ (transposed in place) and the outputs swap roles.
  if (M == N) {  // block-uniform
    for (int t = tid; t < N; t += nthreads) {
      T row = T(0), col = T(0);
      for (int i = 0; i < N; ++i) {
        row += A[i * ldA + t] * A[i * ldA + t];
        col += A[t * ldA + i] * A[t * ldA + i];
      }
      s_norm2[t] = row;
      s_colnorm2[t] = col;
    }
    __syncthreads();
    if (tid == 0) {
      T rlo = s_norm2[0], rhi = s_norm2[0], clo = s_colnorm2[0], chi = s_colnorm2[0];
      for (int t = 1; t < N; ++t) {
        rlo = s_norm2[t] < rlo ? s_norm2[t] : rlo;
        rhi = s_norm2[t] > rhi ? s_norm2[t] : rhi;
        clo = s_colnorm2[t] < clo ? s_colnorm2[t] : clo;
        chi = s_colnorm2[t] > chi ? s_colnorm2[t] : chi;
      }
      const T tiny = core::JacobiLimits<T>::min_normal;  // floor of an underflowed squared norm
      // spread(rows) > spread(cols), cross-multiplied: rhi·clo' > chi·rlo' (clo', rlo' ≥ tiny);
      // in double, as the squared norms of a scaled matrix are ≤ N² and ≥ tiny
      const double lhs = static_cast<double>(rhi) * static_cast<double>(clo > tiny ? clo : tiny);
      const double rhs = static_cast<double>(chi) * static_cast<double>(rlo > tiny ? rlo : tiny);
      s_flag = lhs > rhs ? 1 : 0;
    }
    __syncthreads();
    if (s_flag != 0) {
      for (int e = tid; e < N * N; e += nthreads) {
        const int j = e / N, i = e - j * N;
        if (i < j) {
          const T a = A[j * ldA + i];
          A[j * ldA + i] = A[i * ldA + j];
          A[i * ldA + j] = a;
        }
      }
    }
    __syncthreads();
  }

  // ---- sweeps ----
  // Round robin with the fixed player L = N_pad − 1: in step t group 0 pairs (t, L) and group
  // g ≥ 1 pairs ((t + g) mod L, (t − g) mod L). L is odd, so a pair {a, b} < L occurs only in the
  // step t ≡ (a + b)/2 (mod L), and {a, L} only in step a: each pair once per sweep. When N is
  // odd, L = N is the dummy column and group 0 idles. Consecutive groups of a warp thus touch
  // consecutive columns, which ldA ≡ ldV ≡ G (mod one bank row) spreads over distinct banks.
  const T tol = core::jacobi_tolerance<T>(M);
  const T null2 = core::jacobi_null_norm2<T>(M);
  const int n_pad = N + (N & 1), L = n_pad - 1, n_pairs = n_pad >> 1;
  const int group = tid / G, r = tid & (G - 1);
  // the group's lanes; shuffles name only them, so groups may idle independently
  constexpr unsigned group_bits = G >= 32 ? 0xffffffffu : ((1u << G) - 1u);
  const unsigned mask = group_bits << ((tid & 31) & ~(G - 1));
  for (int sweep = 0; sweep < core::kJacobiMaxSweeps; ++sweep) {
    int rotated = 0;
    for (int t = 0; t < L; ++t) {
      if (group < n_pairs) {
        int p = t, q = L;
        if (group > 0) {
          p = t + group;  // < 2L
          if (p >= L) p -= L;
          q = t - group;  // > −L
          if (q < 0) q += L;
        }
        // p < L ≤ N always; only q can be the dummy column
        if (q < N) {
          T* ap = A + p * ldA;
          T* aq = A + q * ldA;
          T xp[R], xq[R];
          T alpha = T(0), beta = T(0), gamma = T(0);
#pragma unroll
          for (int h = 0; h < R; ++h) {
            const int i = r + h * G;
            xp[h] = T(0);
            xq[h] = T(0);
            if (i < M) {
              xp[h] = ap[i];
              xq[h] = aq[i];
              alpha += xp[h] * xp[h];
              beta += xq[h] * xq[h];
              gamma += xp[h] * xq[h];
            }
          }
          alpha = group_sum<G>(alpha, mask);
          beta = group_sum<G>(beta, mask);
          gamma = group_sum<G>(gamma, mask);
          T sn, tau;
          // same inputs in every lane of the group → same (sn, tau, live): group-uniform branch
          if (core::jacobi_rotation(alpha, beta, gamma, tol, null2, sn, tau)) {
            rotated = 1;
#pragma unroll
            for (int h = 0; h < R; ++h) {
              const int i = r + h * G;
              if (i < M) {
                core::jacobi_rotate(xp[h], xq[h], sn, tau);
                ap[i] = xp[h];
                aq[i] = xq[h];
              }
            }
            T* vp = V + p * ldV;
            T* vq = V + q * ldV;
#pragma unroll
            for (int h = 0; h < R; ++h) {
              const int i = r + h * G;
              if (i < N) {
                T a = vp[i], b = vq[i];
                core::jacobi_rotate(a, b, sn, tau);
                vp[i] = a;
                vq[i] = b;
              }
            }
          }
        }
      }
      if (t + 1 < L) __syncthreads();  // the last step's barrier is the __syncthreads_or below
    }
    if (!__syncthreads_or(rotated)) break;
  }

  // ---- σ, order, U ----
  const int n_groups = nthreads / G;
  for (int j = group; j < N; j += n_groups) {  // group-uniform trip count
    const T* aj = A + j * ldA;
    T a2 = T(0);
    for (int i = r; i < M; i += G) a2 += aj[i] * aj[i];
    a2 = group_sum<G>(a2, mask);
    if (r == 0) s_norm2[j] = a2;
  }
  __syncthreads();
  for (int j = tid; j < N; j += nthreads) {
    const T aj = s_norm2[j];
    int rank = 0;
    for (int i = 0; i < N; ++i) {
      const T ai = s_norm2[i];
      rank += (ai > aj) | ((ai == aj) & (i < j));
    }
    s_perm[rank] = j;
  }
  // live columns scaled to unit norm; null ones are left for the completion (or dropped)
  int n_live = 0;
  for (int j = 0; j < N; ++j) n_live += s_norm2[j] > null2;  // same in every thread
  for (int e = tid; e < M * N; e += nthreads) {
    const int j = e / M, i = e - j * M;
    const T a2 = s_norm2[j];
    if (a2 > null2) A[j * ldA + i] *= T(1) / core::rk_sqrt(a2);
  }
  __syncthreads();
  if (n_live < N) {  // block-uniform: every thread runs every phase
    // sorted slots [0, n_live) hold the live columns (their ‖a‖² > null2 ≥ any null one's)
    T* a_st = A;
    const int* perm = s_perm;
    auto col = [a_st, perm, ldA](int j, int i) -> T& { return a_st[perm[j] * ldA + i]; };
    core::complete_orthonormal<T>(col, M, n_live, N, s_colnorm2, s_w, s_d, nthreads, BlockLanes{});
  }

  // ---- outputs: X = U_A diag(σ) V_Aᵀ, or V_A diag(σ) U_Aᵀ when A = Xᵀ ----
  T* u = U + bi * sh.m * k;
  T* s = S + bi * k;
  T* vh = Vh + bi * k * sh.n;
  const int ex_out = s_ex;
  for (int j = tid; j < N; j += nthreads) s[j] = core::rk_ldexp(core::rk_sqrt(s_norm2[s_perm[j]]), ex_out);
  if (s_flag == 0) {
    store_sorted(u, A, ldA, s_perm, M, N, true);
    store_sorted(vh, V, ldV, s_perm, N, N, false);
  } else {
    store_sorted(u, V, ldV, s_perm, N, N, true);
    store_sorted(vh, A, ldA, s_perm, M, N, false);
  }
}

// The smallest ld ≥ len with ld ≡ G (mod the 128-byte bank row): the columns of consecutive
// groups of a warp then start G banks apart (see the sweep's ordering comment).
int padded_ld(int len, int G, int elem_bytes) {
  const int w = 128 / elem_bytes;
  return len + (((G - len) % w) + w) % w;
}

template <typename T>
void launch_svd(const at::Tensor& X, at::Tensor& U, at::Tensor& S, at::Tensor& Vh) {
  const int64_t b = X.size(0);
  SvdShape sh;
  sh.m = static_cast<int>(X.size(1));
  sh.n = static_cast<int>(X.size(2));
  sh.M = std::max(sh.m, sh.n);
  sh.N = std::min(sh.m, sh.n);
  sh.sb = X.stride(0);
  sh.rs = sh.m >= sh.n ? X.stride(1) : X.stride(2);
  sh.cs = sh.m >= sh.n ? X.stride(2) : X.stride(1);
  const core::JacobiBlock blk = core::jacobi_block(sh.M, sh.N);
  const int G = blk.group, threads = blk.threads;
  const int rows_per_lane = (sh.M + G - 1) / G;
  TORCH_INTERNAL_ASSERT(rows_per_lane <= kMaxRows && threads <= kMaxThreads, "batched_svd (CUDA): bad lane split");
  sh.ldA = padded_ld(sh.M, G, static_cast<int>(sizeof(T)));
  sh.ldV = padded_ld(sh.N, G, static_cast<int>(sizeof(T)));
  const size_t smem = static_cast<size_t>(sh.N) * (sh.ldA + sh.ldV) * sizeof(T);
  // The (G, R) pairs core::jacobi_block gives for max(m, n) ≤ 64: M ≤ 4·G (R = 4) while G < 16,
  // except that G = 16 halves to 8 for more than 16 pairs (N > 32), and then M ≤ 64 = 8·G (R = 8).
  const int R = rows_per_lane <= 4 ? 4 : 8;
  void (*kernel)(const T*, T*, T*, T*, const SvdShape) = nullptr;
  switch (G * 16 + R) {
    case 1 * 16 + 4: kernel = batched_svd_kernel<T, 1, 4>; break;
    case 2 * 16 + 4: kernel = batched_svd_kernel<T, 2, 4>; break;
    case 4 * 16 + 4: kernel = batched_svd_kernel<T, 4, 4>; break;
    case 8 * 16 + 4: kernel = batched_svd_kernel<T, 8, 4>; break;
    case 8 * 16 + 8: kernel = batched_svd_kernel<T, 8, 8>; break;
    case 16 * 16 + 4: kernel = batched_svd_kernel<T, 16, 4>; break;
  }
  TORCH_INTERNAL_ASSERT(kernel != nullptr, "batched_svd (CUDA): no kernel instance for G=", G, ", R=", R);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  // GPU_BUDGET {"kernel": "batched_svd_kernel", "threads": 256, "min_occupancy": 0.25, "note": "256 threads: the 64x64 shape (32 pairs x G = 8); fp64 64x64 holds 72 KB of dynamic shared memory, 3 blocks per SM"}
  kernel<<<static_cast<unsigned>(b), threads, smem, stream>>>(X.const_data_ptr<T>(), U.data_ptr<T>(),
                                                              S.data_ptr<T>(), Vh.data_ptr<T>(), sh);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_svd_cuda(const at::Tensor& X) {
  TORCH_CHECK(X.dim() == 3, "regkernels::batched_svd (CUDA): X must be (b, m, n); got shape ", X.sizes());
  TORCH_CHECK(X.scalar_type() == at::kFloat || X.scalar_type() == at::kDouble,
              "regkernels::batched_svd (CUDA): X must be float32 or float64; got ", X.scalar_type());
  TORCH_CHECK(X.is_cuda(), "regkernels::batched_svd (CUDA): CUDA implementation called with a ", X.device(),
              " tensor");
  const int64_t b = X.size(0), m = X.size(1), n = X.size(2);
  TORCH_CHECK(m >= 1 && n >= 1 && std::max(m, n) <= kMaxSide, "regkernels::batched_svd (CUDA): the kernel takes ",
              "1 <= m, n and max(m, n) <= ", kMaxSide, " (larger matrices go to torch.linalg.svd); got m=", m,
              ", n=", n);
  TORCH_CHECK(b <= INT_MAX, "regkernels::batched_svd (CUDA): at most ", INT_MAX, " matrices per call; got ", b);
  c10::cuda::CUDAGuard guard(X.device());
  const int64_t k = std::min(m, n);
  auto U = at::empty({b, m, k}, X.options());
  auto S = at::empty({b, k}, X.options());
  auto Vh = at::empty({b, k, n}, X.options());
  if (b == 0) return {U, S, Vh};
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "batched_svd_cuda", [&] { launch_svd<scalar_t>(X, U, S, Vh); });
  return {U, S, Vh};
}

}  // namespace

TORCH_LIBRARY_IMPL(regkernels, CUDA, m) { m.impl("batched_svd", &batched_svd_cuda); }

}  // namespace regkernels
