// Fused β-LASSO step on CUDA: all tensors of one (device, dtype) in one launch (docs/beta_lasso.md#fused-kernels).
//
// Multi-tensor chunking: the chunk table (one PlanTensor per tensor, one PlanTask per block) is the
// cached launch plan of ../beta_lasso_args.h. It lives on the device across steps: it is built and
// copied (pinned staging buffer, non-blocking, on the current stream) only when the parameter set
// changes: pointers, sizes, dtype, which tensors have momentum, slot boundaries. The
// hyper-parameters travel by value as a kernel argument (SlotArgs), so a step with a new lr costs
// the launch and nothing else: no host-to-device copy and no read of device memory. That also
// makes a step graph-capturable once its plan exists (a capture never builds one: it would bake
// a copy from a staging buffer the host reuses); a captured graph replays the hyper-parameters
// it was captured with.
//
// Block b updates chunk b: rounds of kPerThread (8, or 4 for float64) elements per thread, every load of a round
// issued before any store (memory-level parallelism), with 16-byte vector loads when the tensor
// is 16-byte aligned (decided per tensor on the host when the plan is built) and the chunk is
// full; a tensor's last partial chunk and misaligned tensors take masked scalar loads with the
// same structure. The per-tensor non-zero count is reduced in the block and added with one
// atomicAdd per block. The element math is core::beta_lasso_element, shared with the CPU kernel.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../beta_lasso_args.h"

namespace regkernels {

// Defined in ../cpu/beta_lasso_cpu.cpp (always part of the same extension): the dense-layout
// handling both entries share.
bool beta_lasso_flat_args(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                          at::ArrayRef<int64_t> flags, std::vector<at::Tensor> (&flat)[3]);

namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;  // elements per block
// 4 blocks of 256 threads per SM (50 % occupancy on sm_90) caps registers at 64 per thread
constexpr int kMinBlocks = 4;

// Per round, each thread loads kPerThread elements of every array before it stores any: 8 (two
// 16-byte vectors of float32, one of 16-bit types), 4 for float64 (two vectors; 8 would need 80
// registers and spill under the 64 the occupancy allows). kIters rounds make one chunk.
template <typename scalar_t>
struct Pack {
  static constexpr int kPerThread = sizeof(scalar_t) == 8 ? 4 : 8;
  static constexpr int kIters = static_cast<int>(kChunk / (kThreads * kPerThread));
  static constexpr int kVec = 16 / sizeof(scalar_t);  // elements per 16-byte vector
  static constexpr int kVecs = kPerThread / kVec;
  struct alignas(16) Vec {
    scalar_t v[kVec];
  };
  static_assert(kPerThread % kVec == 0 && kIters * kThreads * kPerThread == kChunk, "a chunk is whole rounds of vectors");
};

// One full, aligned chunk. Round r, vector k of thread t covers vector (r·kVecs + k)·kThreads + t
// of the chunk: each warp-wide load is 512 contiguous bytes.
template <bool WD, bool MOM, bool NES, bool FIRST, typename scalar_t, typename T>
__device__ __forceinline__ int update_vec(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                          scalar_t* __restrict__ buf, const core::BetaLassoHyper<T>& h) {
  using P = Pack<scalar_t>;
  using Vec = typename P::Vec;
  Vec* pv = reinterpret_cast<Vec*>(p);
  const Vec* gv = reinterpret_cast<const Vec*>(g);
  Vec* bv = reinterpret_cast<Vec*>(buf);
  int count = 0;
#pragma unroll
  for (int r = 0; r < P::kIters; ++r) {
    Vec pr[P::kVecs], gr[P::kVecs], br[P::kVecs];
#pragma unroll
    for (int k = 0; k < P::kVecs; ++k) {
      const int i = (r * P::kVecs + k) * kThreads + threadIdx.x;
      pr[k] = pv[i];
      gr[k] = gv[i];
      if (MOM && !FIRST) br[k] = bv[i];
    }
#pragma unroll
    for (int k = 0; k < P::kVecs; ++k) {
#pragma unroll
      for (int j = 0; j < P::kVec; ++j) {
        T b = (MOM && !FIRST) ? static_cast<T>(br[k].v[j]) : T(0);
        const scalar_t out = static_cast<scalar_t>(core::beta_lasso_element<WD, MOM, NES, FIRST, T>(
            static_cast<T>(pr[k].v[j]), static_cast<T>(gr[k].v[j]), b, h));
        if (MOM) br[k].v[j] = static_cast<scalar_t>(b);
        pr[k].v[j] = out;
        count += static_cast<T>(out) != T(0);  // counted on the stored value, as on CPU
      }
    }
#pragma unroll
    for (int k = 0; k < P::kVecs; ++k) {
      const int i = (r * P::kVecs + k) * kThreads + threadIdx.x;
      if (MOM) bv[i] = br[k];
      pv[i] = pr[k];
    }
  }
  return count;
}

// A partial or misaligned chunk of n elements: the same rounds with masked scalar loads; element
// (r·kPerThread + k)·kThreads + t, so each warp-wide load is contiguous.
template <bool WD, bool MOM, bool NES, bool FIRST, typename scalar_t, typename T>
__device__ __forceinline__ int update_scalar(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                             scalar_t* __restrict__ buf, int n, const core::BetaLassoHyper<T>& h) {
  using P = Pack<scalar_t>;
  int count = 0;
#pragma unroll
  for (int r = 0; r < P::kIters; ++r) {
    scalar_t pr[P::kPerThread], gr[P::kPerThread], br[P::kPerThread];
#pragma unroll
    for (int k = 0; k < P::kPerThread; ++k) {
      const int i = (r * P::kPerThread + k) * kThreads + threadIdx.x;
      if (i < n) {
        pr[k] = p[i];
        gr[k] = g[i];
        if (MOM && !FIRST) br[k] = buf[i];
      }
    }
#pragma unroll
    for (int k = 0; k < P::kPerThread; ++k) {
      const int i = (r * P::kPerThread + k) * kThreads + threadIdx.x;
      if (i < n) {
        T b = (MOM && !FIRST) ? static_cast<T>(br[k]) : T(0);
        const scalar_t out = static_cast<scalar_t>(core::beta_lasso_element<WD, MOM, NES, FIRST, T>(
            static_cast<T>(pr[k]), static_cast<T>(gr[k]), b, h));
        if (MOM) buf[i] = static_cast<scalar_t>(b);
        p[i] = out;
        count += static_cast<T>(out) != T(0);
      }
    }
  }
  return count;
}

template <bool WD, bool MOM, bool NES, bool FIRST, typename scalar_t, typename T>
__device__ __forceinline__ int update_chunk(const PlanTensor& m, int64_t begin, const core::BetaLassoHyper<T>& h) {
  scalar_t* p = static_cast<scalar_t*>(m.param) + begin;
  const scalar_t* g = static_cast<const scalar_t*>(m.grad) + begin;
  scalar_t* buf = MOM ? static_cast<scalar_t*>(m.buf) + begin : nullptr;
  // pointers read from the table are generic; these let the compiler use global loads and stores
  // (LDG/STG) instead of generic ones (LD/ST)
  __builtin_assume(__isGlobal(p));
  __builtin_assume(__isGlobal(g));
  if (MOM) __builtin_assume(__isGlobal(buf));
  const int64_t n = m.numel - begin < kChunk ? m.numel - begin : kChunk;
  // begin is a multiple of kChunk, so an aligned tensor has aligned full chunks
  if (m.vec && n == kChunk) return update_vec<WD, MOM, NES, FIRST, scalar_t, T>(p, g, buf, h);
  return update_scalar<WD, MOM, NES, FIRST, scalar_t, T>(p, g, buf, static_cast<int>(n), h);
}

// `args` is a __grid_constant__ kernel argument: indexed by the block's slot in place, never copied
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    beta_lasso_kernel(const PlanTensor* __restrict__ metas, const PlanTask* __restrict__ tasks,
                      const __grid_constant__ SlotArgs<T> args, unsigned long long* __restrict__ nnz) {
  const PlanTask task = tasks[blockIdx.x];
  const PlanTensor m = metas[task.tensor];
  const int s = m.slot - args.base;
  const core::BetaLassoHyper<T> h = args.hyper[s];
  int count;
  // the mode is uniform over the block: no divergence from this switch
  switch (args.mode[s]) {
    case 0b0000: count = update_chunk<false, false, false, false, scalar_t, T>(m, task.begin, h); break;
    case 0b0001: count = update_chunk<true, false, false, false, scalar_t, T>(m, task.begin, h); break;
    case 0b0010: count = update_chunk<false, true, false, false, scalar_t, T>(m, task.begin, h); break;
    case 0b1010: count = update_chunk<false, true, false, true, scalar_t, T>(m, task.begin, h); break;
    case 0b0110: count = update_chunk<false, true, true, false, scalar_t, T>(m, task.begin, h); break;
    case 0b1110: count = update_chunk<false, true, true, true, scalar_t, T>(m, task.begin, h); break;
    case 0b0011: count = update_chunk<true, true, false, false, scalar_t, T>(m, task.begin, h); break;
    case 0b1011: count = update_chunk<true, true, false, true, scalar_t, T>(m, task.begin, h); break;
    case 0b0111: count = update_chunk<true, true, true, false, scalar_t, T>(m, task.begin, h); break;
    default: count = update_chunk<true, true, true, true, scalar_t, T>(m, task.begin, h); break;
  }
  // block reduction of the non-zero count: warp shuffles, then one value per warp
  __shared__ unsigned warp_sums[kThreads / 32];
  unsigned c = static_cast<unsigned>(count);
  for (int off = 16; off > 0; off >>= 1) c += __shfl_down_sync(0xffffffffu, c, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    atomicAdd(nnz + task.tensor, total);
  }
}

// The plan's device copy: [tensors | tasks] in one allocation, and the event that marks its upload
// (a step on another stream waits for it once, then records its use for the allocator).
struct DeviceTable {
  at::Tensor table;
  size_t task_offset = 0;
  at::cuda::CUDAEvent uploaded;
  c10::StreamId stream_id = 0;
};

void upload_plan(BetaLassoPlan& plan, const c10::cuda::CUDAStream& stream) {
  const size_t meta_bytes = plan.tensors.size() * sizeof(PlanTensor);
  const size_t task_offset = (meta_bytes + 15) / 16 * 16;
  const size_t total = task_offset + plan.tasks.size() * sizeof(PlanTask);
  auto staging = at::empty({static_cast<int64_t>(total)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(staging.data_ptr(), plan.tensors.data(), meta_bytes);
  std::memcpy(static_cast<char*>(staging.data_ptr()) + task_offset, plan.tasks.data(),
              plan.tasks.size() * sizeof(PlanTask));
  auto dt = std::make_shared<DeviceTable>();
  dt->table = at::empty({static_cast<int64_t>(total)}, at::TensorOptions().dtype(at::kByte).device(plan.device));
  // non-blocking from pinned memory; the caching host allocator keeps `staging` from reuse until
  // the copy has run
  dt->table.copy_(staging, /*non_blocking=*/true);
  dt->task_offset = task_offset;
  dt->uploaded.record(stream);
  dt->stream_id = stream.id();
  plan.device_table = dt;
}

template <typename scalar_t>
void step_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::ArrayRef<double> hyper,
               at::ArrayRef<int64_t> flags, at::Tensor& nnz) {
  using T = at::opmath_type<scalar_t>;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool capturing = at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
  const auto plan = beta_lasso_plan(
      params, grads, bufs, hyper, flags, kChunk, /*keep=*/capturing,
      capturing ? "beta_lasso_step_: this parameter set has no launch plan yet and one cannot be built during CUDA "
                  "graph capture (it copies the chunk table to the device); run one step before capturing "
                  "(a warm-up), with the same parameters, gradients and momentum buffers"
                : nullptr,
      [&](BetaLassoPlan& p) { upload_plan(p, stream); });
  if (plan->tasks.empty()) return;
  auto& dt = *std::static_pointer_cast<DeviceTable>(plan->device_table);
  // another stream waits for the upload once per call. Not under capture: torch.cuda.graph
  // synchronizes before it captures, and a kept plan's table is never freed
  if (dt.stream_id != stream.id() && !capturing) {
    dt.uploaded.block(stream);
    c10::cuda::CUDACachingAllocator::recordStream(dt.table.storage().data_ptr(), stream);
  }
  const char* base = static_cast<const char*>(dt.table.const_data_ptr());
  const auto* metas = reinterpret_cast<const PlanTensor*>(base);
  const auto* tasks = reinterpret_cast<const PlanTask*>(base + dt.task_offset);
  auto* counts = reinterpret_cast<unsigned long long*>(nnz.data_ptr<int64_t>());
  for (const PlanLaunch& launch : plan->launches) {
    const auto args = beta_lasso_slot_args<T>(*plan, launch, hyper, flags);
    // GPU_BUDGET {"kernel": "beta_lasso_kernel", "threads": 256, "min_occupancy": 0.5, "vector_loads": true}
    beta_lasso_kernel<scalar_t, T><<<static_cast<unsigned>(launch.task_end - launch.task_begin), kThreads, 0, stream>>>(
        metas, tasks + launch.task_begin, args, counts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor beta_lasso_step_cuda(at::TensorList params_in, at::TensorList grads_in, at::TensorList bufs_in,
                                at::ArrayRef<double> hyper, at::ArrayRef<int64_t> flags) {
  // dense non-contiguous layouts as flat views, exactly as on CPU
  std::vector<at::Tensor> flat[3];
  const bool flattened = beta_lasso_flat_args(params_in, grads_in, bufs_in, flags, flat);
  const at::TensorList params = flattened ? at::TensorList(flat[0]) : params_in;
  const at::TensorList grads = flattened ? at::TensorList(flat[1]) : grads_in;
  const at::TensorList bufs = flattened ? at::TensorList(flat[2]) : bufs_in;
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
