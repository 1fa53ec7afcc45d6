// Fused β-LASSO step on CUDA: all tensors of one (device, dtype) in ONE launch.
//
// Multi-tensor chunking: the host cuts every tensor into chunks of kChunk elements and writes a
// table (one TensorMeta per tensor, one ChunkTask per block) into pinned memory, copied to the
// device on the current stream without a sync. Block b updates chunk b; the per-tensor
// non-zero count is reduced in the block and added with one atomicAdd per block.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../beta_lasso_args.h"

namespace regkernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = kThreads * 16;  // elements per block

template <typename T>
struct TensorMeta {
  void* param;
  const void* grad;
  void* buf;
  int64_t numel;
  core::BetaLassoHyper<T> hyper;
  int32_t mode;  // bit 0 weight decay, bit 1 momentum, bit 2 nesterov, bit 3 first step
  int32_t pad;
};

struct ChunkTask {
  int64_t begin;
  int32_t tensor;
  int32_t pad;
};

template <bool WD, bool MOM, bool NES, bool FIRST, typename scalar_t, typename T>
__device__ __forceinline__ int64_t update_chunk(const TensorMeta<T>& m, int64_t begin, int64_t end) {
  scalar_t* __restrict__ p = static_cast<scalar_t*>(m.param);
  const scalar_t* __restrict__ g = static_cast<const scalar_t*>(m.grad);
  scalar_t* __restrict__ buf = static_cast<scalar_t*>(m.buf);
  int64_t count = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    T b = (MOM && !FIRST) ? static_cast<T>(buf[i]) : T(0);
    const scalar_t out =
        static_cast<scalar_t>(core::beta_lasso_element<WD, MOM, NES, FIRST, T>(static_cast<T>(p[i]),
                                                                                static_cast<T>(g[i]), b, m.hyper));
    if (MOM) buf[i] = static_cast<scalar_t>(b);
    p[i] = out;
    count += static_cast<T>(out) != T(0);
  }
  return count;
}

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads)
    beta_lasso_kernel(const TensorMeta<T>* __restrict__ metas, const ChunkTask* __restrict__ tasks,
                      unsigned long long* __restrict__ nnz) {
  const ChunkTask task = tasks[blockIdx.x];
  const TensorMeta<T> m = metas[task.tensor];
  const int64_t end = min(task.begin + kChunk, m.numel);
  int64_t count;
  // the mode is uniform over the block: no divergence from this switch
  switch (m.mode) {
    case 0b0000: count = update_chunk<false, false, false, false, scalar_t, T>(m, task.begin, end); break;
    case 0b0001: count = update_chunk<true, false, false, false, scalar_t, T>(m, task.begin, end); break;
    case 0b0010: count = update_chunk<false, true, false, false, scalar_t, T>(m, task.begin, end); break;
    case 0b1010: count = update_chunk<false, true, false, true, scalar_t, T>(m, task.begin, end); break;
    case 0b0110: count = update_chunk<false, true, true, false, scalar_t, T>(m, task.begin, end); break;
    case 0b1110: count = update_chunk<false, true, true, true, scalar_t, T>(m, task.begin, end); break;
    case 0b0011: count = update_chunk<true, true, false, false, scalar_t, T>(m, task.begin, end); break;
    case 0b1011: count = update_chunk<true, true, false, true, scalar_t, T>(m, task.begin, end); break;
    case 0b0111: count = update_chunk<true, true, true, false, scalar_t, T>(m, task.begin, end); break;
    default: count = update_chunk<true, true, true, true, scalar_t, T>(m, task.begin, end); break;
  }
  // block reduction of the non-zero count: warp shuffles, then one value per warp
  __shared__ unsigned long long warp_sums[kThreads / 32];
  unsigned long long c = static_cast<unsigned long long>(count);
  for (int off = 16; off > 0; off >>= 1) c += __shfl_down_sync(0xffffffffu, c, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    atomicAdd(nnz + task.tensor, total);
  }
}

int32_t mode_bits(const BetaLassoFlags& f) {
  // without momentum the nesterov and first flags do not matter
  const bool nes = f.momentum && f.nesterov;
  const bool first = f.momentum && f.first;
  return (f.weight_decay ? 1 : 0) | (f.momentum ? 2 : 0) | (nes ? 4 : 0) | (first ? 8 : 0);
}

template <typename scalar_t>
void step_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::ArrayRef<double> hyper,
               at::ArrayRef<int64_t> flags, at::Tensor& nnz) {
  using T = at::opmath_type<scalar_t>;
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<TensorMeta<T>> metas(n);
  std::vector<ChunkTask> tasks;
  for (int64_t t = 0; t < n; ++t) {
    const auto f = beta_lasso_flags(hyper, flags, t);
    metas[t] = {params[t].data_ptr(), grads[t].data_ptr(), f.momentum ? bufs[t].data_ptr() : nullptr,
                params[t].numel(), beta_lasso_hyper<T>(hyper, t), mode_bits(f), 0};
    for (int64_t b = 0; b < params[t].numel(); b += kChunk) tasks.push_back({b, static_cast<int32_t>(t), 0});
  }
  if (tasks.empty()) return;
  TORCH_CHECK(tasks.size() < (1u << 31), "beta_lasso_step_: too many chunks for one launch");
  // one pinned staging buffer → one async copy; the caching host allocator keeps it alive until
  // the copy has run
  const size_t meta_bytes = metas.size() * sizeof(TensorMeta<T>);
  const size_t task_offset = (meta_bytes + 15) / 16 * 16;
  const size_t total = task_offset + tasks.size() * sizeof(ChunkTask);
  auto staging = at::empty({static_cast<int64_t>(total)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(staging.data_ptr(), metas.data(), meta_bytes);
  std::memcpy(static_cast<char*>(staging.data_ptr()) + task_offset, tasks.data(), tasks.size() * sizeof(ChunkTask));
  auto table = staging.to(params[0].device(), /*non_blocking=*/true);
  const char* base = static_cast<const char*>(table.data_ptr());
  auto stream = c10::cuda::getCurrentCUDAStream();
  beta_lasso_kernel<scalar_t, T><<<static_cast<unsigned>(tasks.size()), kThreads, 0, stream>>>(
      reinterpret_cast<const TensorMeta<T>*>(base), reinterpret_cast<const ChunkTask*>(base + task_offset),
      reinterpret_cast<unsigned long long*>(nnz.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor beta_lasso_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                                at::ArrayRef<double> hyper, at::ArrayRef<int64_t> flags) {
  check_beta_lasso_args(params, grads, bufs, hyper, flags);
  if (params.empty()) return at::zeros({0}, at::TensorOptions().dtype(at::kLong));
  TORCH_CHECK(params[0].is_cuda(), "beta_lasso_step_: CUDA implementation called with ", params[0].device(), " tensors");
  c10::cuda::CUDAGuard guard(params[0].device());
  auto nnz = at::zeros({static_cast<int64_t>(params.size())}, params[0].options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "beta_lasso_step_cuda", [&] {
    step_cuda<scalar_t>(params, grads, bufs, hyper, flags, nnz);
  });
  return nnz;
}

}  // namespace

TORCH_LIBRARY_IMPL(regkernels, CUDA, m) { m.impl("beta_lasso_step_", &beta_lasso_step_cuda); }

}  // namespace regkernels
