// CPU helpers shared by the C++ kernels that sit on BLAS products: an exactly symmetric Gram from
// the blocks on and above its diagonal, and a vectorizable fixed-order sum.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace regkernels {
namespace cpu {

// Σ_{j ∈ [lo, hi)} f(j) with 16 independent partial sums: gcc vectorizes the fixed-width inner
// loop without reassociating (no -ffast-math), and the partial sums bound the rounding error
// like a pairwise sum would.
template <typename T, typename F>
inline T lane_sum(int64_t lo, int64_t hi, F f) {
  constexpr int L = 16;
  if (hi - lo < L) {  // the same sum in the same order as below (the other partial sums are 0)
    T total = 0;
    for (int64_t j = lo; j < hi; ++j) total += f(j);
    return total;
  }
  T acc[L] = {};
  int64_t j = lo;
  for (; j + L <= hi; j += L) {
    for (int l = 0; l < L; ++l) acc[l] += f(j + l);
  }
  for (int l = 0; j < hi; ++j, ++l) acc[l] += f(j);
  T total = 0;
  for (int l = 0; l < L; ++l) total += acc[l];
  return total;
}

// V (k×k, contiguous) = X Xᵀ for X of shape (k, inner), any strides, exactly symmetric. For
// large k only the nb(nb+1)/2 blocks on and above the diagonal are multiplied (nb ≤ max_blocks;
// nb = 4: 62 % of the flops of the full product, 8: 56 %); the strict lower triangle is then copied
// from the upper.
inline void symmetric_gram(const at::Tensor& X, at::Tensor V, int64_t max_blocks = 4) {
  const int64_t k = X.size(0);
  const int64_t nb = std::min<int64_t>(max_blocks, k >= 1024 ? k / 256 : (k >= 384 ? 2 : 1));
  const int64_t bs = (k + nb - 1) / nb;
  for (int64_t I = 0; I < nb; ++I) {
    const int64_t i0 = I * bs, il = std::min(k, i0 + bs) - i0;
    if (il <= 0) continue;
    for (int64_t J = I; J < nb; ++J) {
      const int64_t j0 = J * bs, jl = std::min(k, j0 + bs) - j0;
      if (jl <= 0) continue;
      auto out = V.narrow(0, i0, il).narrow(1, j0, jl);
      at::mm_out(out, X.narrow(0, i0, il), X.narrow(0, j0, jl).t());
    }
  }
  // mirror in 64×64 tiles: a work item owns a block of rows and writes only their strict lower
  // part, reading the upper triangle, which nobody writes
  constexpr int64_t kTile = 64;
  AT_DISPATCH_FLOATING_TYPES(V.scalar_type(), "symmetric_gram", [&] {
    scalar_t* v = V.data_ptr<scalar_t>();
    const int64_t tiles = (k + kTile - 1) / kTile;
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t ti = t0; ti < t1; ++ti) {
        const int64_t i_lo = ti * kTile, i_hi = std::min(k, i_lo + kTile);
        for (int64_t j_lo = 0; j_lo < i_hi; j_lo += kTile) {
          for (int64_t i = i_lo; i < i_hi; ++i) {
            const int64_t j_hi = std::min(i, j_lo + kTile);
            for (int64_t j = j_lo; j < j_hi; ++j) v[i * k + j] = v[j * k + i];
          }
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace regkernels
