// Host-side argument handling of regkernels::beta_lasso_step_, shared by the CPU and CUDA
// implementations: validation with named messages and unpacking of the per-tensor
// hyper-parameter table.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/beta_lasso.h"

namespace regkernels {

// Per-tensor layout of the flat `hyper` (float[]) and `flags` (int[]) schema arguments.
constexpr int64_t kHyperPerTensor = 6;  // lr, lam, beta·lam, momentum, 1 − dampening, weight_decay
constexpr int64_t kFlagsPerTensor = 3;  // use momentum, nesterov, first step (buffer not yet set)

struct BetaLassoFlags {
  bool weight_decay;
  bool momentum;
  bool nesterov;
  bool first;
};

inline void check_beta_lasso_args(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                                  at::ArrayRef<double> hyper, at::ArrayRef<int64_t> flags) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(bufs.size()) == n,
              "beta_lasso_step_: params, grads and bufs must have the same length; got ", n, ", ",
              grads.size(), ", ", bufs.size());
  TORCH_CHECK(static_cast<int64_t>(hyper.size()) == kHyperPerTensor * n,
              "beta_lasso_step_: hyper must hold ", kHyperPerTensor, " values per tensor (", kHyperPerTensor * n,
              "); got ", hyper.size());
  TORCH_CHECK(static_cast<int64_t>(flags.size()) == kFlagsPerTensor * n,
              "beta_lasso_step_: flags must hold ", kFlagsPerTensor, " values per tensor (", kFlagsPerTensor * n,
              "); got ", flags.size());
  if (n == 0) return;
  const auto dtype = params[0].scalar_type();
  const auto device = params[0].device();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "beta_lasso_step_: params must be float16, bfloat16, float32 or float64; got ", dtype);
  for (int64_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    const auto& g = grads[i];
    TORCH_CHECK(p.scalar_type() == dtype && p.device() == device,
                "beta_lasso_step_: all params of one call must share dtype and device; params[", i, "] is ",
                p.scalar_type(), " on ", p.device(), ", params[0] is ", dtype, " on ", device);
    TORCH_CHECK(g.scalar_type() == dtype && g.device() == device && g.sizes() == p.sizes(),
                "beta_lasso_step_: grads[", i, "] must match params[", i, "] in dtype, device and shape (",
                p.scalar_type(), " ", p.sizes(), " on ", p.device(), "); got ", g.scalar_type(), " ", g.sizes(),
                " on ", g.device());
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous(), "beta_lasso_step_: params[", i, "] and grads[", i,
                "] must be contiguous");
    if (flags[kFlagsPerTensor * i] != 0) {
      const auto& b = bufs[i];
      TORCH_CHECK(b.scalar_type() == dtype && b.device() == device && b.sizes() == p.sizes() &&
                      b.is_contiguous(),
                  "beta_lasso_step_: bufs[", i, "] must be a contiguous tensor matching params[", i,
                  "] when momentum is used; got ", b.scalar_type(), " ", b.sizes(), " on ", b.device(),
                  " (contiguous=", b.is_contiguous(), ")");
    }
  }
  // The written tensors (params, and bufs where momentum is used) must not share memory: their
  // chunks are updated concurrently, so an element reached through two of them would be read
  // and written by two threads in any order (results would change from run to run). Contiguous
  // tensors occupy [data, data + numel·itemsize); sorted by start, any overlap shows between
  // neighbours.
  struct Span {
    uintptr_t begin, end;
    const char* list;
    int64_t index;
  };
  std::vector<Span> spans;
  spans.reserve(2 * n);
  for (int64_t i = 0; i < n; ++i) {
    auto add = [&](const at::Tensor& t, const char* list) {
      if (t.numel() == 0) return;
      const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
      spans.push_back({begin, begin + static_cast<uintptr_t>(t.numel()) * t.element_size(), list, i});
    };
    add(params[i], "params");
    if (flags[kFlagsPerTensor * i] != 0) add(bufs[i], "bufs");
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t j = 1; j < spans.size(); ++j) {
    TORCH_CHECK(spans[j].begin >= spans[j - 1].end, "beta_lasso_step_: ", spans[j - 1].list, "[",
                spans[j - 1].index, "] and ", spans[j].list, "[", spans[j].index,
                "] share memory; every parameter and momentum buffer must be a separate tensor (list each "
                "parameter once)");
  }
}

template <typename T>
inline core::BetaLassoHyper<T> beta_lasso_hyper(at::ArrayRef<double> hyper, int64_t i) {
  const double* h = hyper.data() + kHyperPerTensor * i;
  // rounded to T here, as torch rounds a Python scalar operand to the tensor's math type
  return {static_cast<T>(h[0]), static_cast<T>(h[1]), static_cast<T>(h[2]),
          static_cast<T>(h[3]), static_cast<T>(h[4]), static_cast<T>(h[5])};
}

inline BetaLassoFlags beta_lasso_flags(at::ArrayRef<double> hyper, at::ArrayRef<int64_t> flags, int64_t i) {
  const int64_t* f = flags.data() + kFlagsPerTensor * i;
  return {hyper[kHyperPerTensor * i + 5] != 0.0, f[0] != 0, f[1] != 0, f[2] != 0};
}

// Calls fn.template operator()<WD, MOM, NESTEROV, FIRST>() with the flags as compile-time
// constants, so each inner loop is branch-free.
template <typename Fn>
inline auto dispatch_beta_lasso_flags(const BetaLassoFlags& f, Fn&& fn) {
#define RK_BL_CASE(WD, MOM, NES, FIRST) \
  if (f.weight_decay == WD && f.momentum == MOM && f.nesterov == NES && f.first == FIRST) \
    return fn.template operator()<WD, MOM, NES, FIRST>();
  RK_BL_CASE(false, false, false, false)
  RK_BL_CASE(true, false, false, false)
  RK_BL_CASE(false, true, false, false)
  RK_BL_CASE(false, true, false, true)
  RK_BL_CASE(false, true, true, false)
  RK_BL_CASE(false, true, true, true)
  RK_BL_CASE(true, true, false, false)
  RK_BL_CASE(true, true, false, true)
  RK_BL_CASE(true, true, true, false)
  RK_BL_CASE(true, true, true, true)
#undef RK_BL_CASE
  // without momentum the nesterov and first flags are irrelevant
  if (f.weight_decay) return fn.template operator()<true, false, false, false>();
  return fn.template operator()<false, false, false, false>();
}

}  // namespace regkernels
