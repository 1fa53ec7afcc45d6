// Fused β-LASSO step on CPU: every tensor of one dtype in one call, parallel over fixed-size
// chunks of all tensors, non-zeros counted per chunk as a by-product of the write. The chunk
// table is the cached launch plan of ../beta_lasso_args.h, shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../beta_lasso_args.h"

namespace regkernels {

// Dense layouts (docs/beta_lasso.md#fused-kernels): the update is elementwise, so a parameter whose
// gradient (and momentum buffer) has its strides and covers its memory without gaps or overlap
// (channels_last weights, a transposed matrix) is updated as the flat array of its storage span.
// Fills `flat` (params, grads, bufs) with flat 1-D views and returns true when some tensor is not
// contiguous (false when all are: no allocation on the common path); refuses a dense layout the
// three tensors do not share. Mismatched list lengths and shapes are left to
// check_beta_lasso_args, which names them. Defined here with external linkage so the CUDA entry
// (compiled into the same extension) calls the same code.
bool beta_lasso_flat_args(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                          at::ArrayRef<int64_t> flags, std::vector<at::Tensor> (&flat)[3]) {
  const size_t n = params.size();
  if (grads.size() != n || bufs.size() != n || flags.size() != kFlagsPerTensor * n) return false;
  bool any = false;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const bool mom = flags[kFlagsPerTensor * i] != 0;
    if (p.is_contiguous() && g.is_contiguous() && (!mom || bufs[i].is_contiguous())) continue;
    if (g.sizes() != p.sizes() || (mom && bufs[i].sizes() != p.sizes())) continue;
    const bool shared = g.strides() == p.strides() && (!mom || bufs[i].strides() == p.strides());
    TORCH_CHECK(shared && p.is_non_overlapping_and_dense(), "beta_lasso_step_: params[", i, "] and grads[", i,
                "] must be contiguous, or share one dense layout (no gaps or overlap: channels_last, a transposed "
                "matrix ...) with bufs[", i, "] when momentum is used; got strides ", p.strides(), " and ",
                g.strides(), mom ? c10::str(" and ", bufs[i].strides()) : std::string(),
                p.is_non_overlapping_and_dense() ? "" : " (the parameter's layout has gaps or overlap)",
                "; make them contiguous or give the gradient and buffer the parameter's strides");
    if (!any) {
      flat[0] = params.vec();
      flat[1] = grads.vec();
      flat[2] = bufs.vec();
      any = true;
    }
    const int64_t numel = p.numel();
    flat[0][i] = p.as_strided({numel}, {1});
    flat[1][i] = g.as_strided({numel}, {1});
    if (mom) flat[2][i] = bufs[i].as_strided({numel}, {1});
  }
  return any;
}

namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per work item: amortises scheduling, fits an int32 count

// Built twice, for AVX2 and for the x86-64 baseline, and picked at load time (ifunc): the
// baseline SSE2 loop needs ~2 cycles per element, close to what one core's share of the memory
// bandwidth allows. The inlined element math follows each clone's target.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RK_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define RK_CPU_CLONES
#endif

template <bool WD, bool MOM, bool NES, bool FIRST, typename scalar_t, typename T>
RK_CPU_CLONES int32_t update_range(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ buf,
                     int64_t n, const core::BetaLassoHyper<T>& h) {
  // an int32 counter (a chunk has < 2^31 elements) keeps the loop vectorizable: gcc does not
  // mix 64-bit integer lanes with float lanes here
  int32_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    T b = (MOM && !FIRST) ? static_cast<T>(buf[i]) : T(0);
    const scalar_t out = static_cast<scalar_t>(
        core::beta_lasso_element<WD, MOM, NES, FIRST, T>(static_cast<T>(p[i]), static_cast<T>(g[i]), b, h));
    if (MOM) buf[i] = static_cast<scalar_t>(b);
    p[i] = out;
    count += static_cast<T>(out) != T(0);  // counted on the stored value (a NaN counts, as in count_nonzero)
  }
  return count;
}

// A launch this small runs on the calling thread: waking the pool costs more than the work
constexpr int64_t kSerialElements = 1 << 16;

template <typename scalar_t>
void step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::ArrayRef<double> hyper,
              at::ArrayRef<int64_t> flags, int64_t* nnz) {
  using T = at::opmath_type<scalar_t>;
  // the same cached plan (chunk table, slots, launches) as the CUDA kernel, so the CPU tests cover
  // its cache and launch logic; there is no device copy to make
  const auto plan = beta_lasso_plan(params, grads, bufs, hyper, flags, kChunk, /*keep=*/false,
                                    /*refuse_build=*/nullptr, [](BetaLassoPlan&) {});
  std::vector<int32_t> counts(plan->tasks.size(), 0);
  for (const PlanLaunch& launch : plan->launches) {
    const auto args = beta_lasso_slot_args<T>(*plan, launch, hyper, flags);
    auto body = [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const PlanTask& task = plan->tasks[c];
        const PlanTensor& m = plan->tensors[task.tensor];
        const int32_t s = m.slot - args.base;
        scalar_t* p = static_cast<scalar_t*>(m.param) + task.begin;
        const scalar_t* g = static_cast<const scalar_t*>(m.grad) + task.begin;
        scalar_t* b = m.buf ? static_cast<scalar_t*>(m.buf) + task.begin : nullptr;
        const int64_t len = std::min(kChunk, m.numel - task.begin);
        const auto& h = args.hyper[s];
        counts[c] = dispatch_beta_lasso_flags(beta_lasso_flags_of_mode(args.mode[s]),
                                              [&]<bool WD, bool MOM, bool NES, bool FIRST>() {
          return update_range<WD, MOM, NES, FIRST, scalar_t, T>(p, g, b, len, h);
        });
      }
    };
    if (launch.elements <= kSerialElements) {
      body(launch.task_begin, launch.task_end);
    } else {
      at::parallel_for(launch.task_begin, launch.task_end, 1, body);
    }
  }
  for (size_t c = 0; c < plan->tasks.size(); ++c) nnz[plan->tasks[c].tensor] += counts[c];
}

at::Tensor beta_lasso_step_cpu(at::TensorList params_in, at::TensorList grads_in, at::TensorList bufs_in,
                               at::ArrayRef<double> hyper, at::ArrayRef<int64_t> flags) {
  std::vector<at::Tensor> flat[3];
  const bool flattened = beta_lasso_flat_args(params_in, grads_in, bufs_in, flags, flat);
  const at::TensorList params = flattened ? at::TensorList(flat[0]) : params_in;
  const at::TensorList grads = flattened ? at::TensorList(flat[1]) : grads_in;
  const at::TensorList bufs = flattened ? at::TensorList(flat[2]) : bufs_in;
  check_beta_lasso_args(params, grads, bufs, hyper, flags);
  auto nnz = at::zeros({static_cast<int64_t>(params.size())}, at::TensorOptions().dtype(at::kLong));
  if (params.empty()) return nnz;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "beta_lasso_step_cpu", [&] {
    step_cpu<scalar_t>(params, grads, bufs, hyper, flags, nnz.data_ptr<int64_t>());
  });
  return nnz;
}

}  // namespace

TORCH_LIBRARY_IMPL(regkernels, CPU, m) { m.impl("beta_lasso_step_", &beta_lasso_step_cpu); }

}  // namespace regkernels
