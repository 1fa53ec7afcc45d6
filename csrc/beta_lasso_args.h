// Host-side argument handling of regkernels::beta_lasso_step_, shared by the CPU and CUDA
// implementations: validation with named messages, unpacking of the per-tensor hyper-parameter
// table, and the cached launch plan (the chunk table).
//
// The launch plan (docs/beta_lasso.md#launch-plan) depends only on WHERE the tensors are: per
// tensor the param / grad / buf pointers, the element count, 16-byte alignment and a "slot"
// number; never on the hyper-parameter values. Tensors whose (hyper, mode) equal their
// predecessor's share a slot, so one param group is one slot whatever its lr is. A call looks its
// plan up by that key (a process-wide LRU of kPlanCacheSize plans; plans used under CUDA graph
// capture are never evicted, the graph keeps reading their device table) and builds it only on a
// miss. The values of the slots of one launch travel by value (SlotArgs: kernel arguments on
// CUDA), so a scheduler changing lr every step costs no table rebuild and no host-to-device copy.
// More than kMaxSlots slots split the work into several launches over consecutive tasks.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
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
}

// The written tensors (params, and bufs where momentum is used) must not share memory: their
// chunks are updated concurrently, so an element reached through two of them would be read and
// written by two threads in any order (results would change from run to run). Contiguous tensors
// occupy [data, data + numel·itemsize); sorted by start, any overlap shows between neighbours.
// Run when a launch plan is built: the plan's key holds every pointer and size this depends on,
// so a cached plan has passed it.
inline void check_beta_lasso_overlap(at::TensorList params, at::TensorList bufs, at::ArrayRef<int64_t> flags) {
  const int64_t n = static_cast<int64_t>(params.size());
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

// ----------------------------------------------------------------------------------- launch plan
// mode bits of a tensor: bit 0 weight decay, bit 1 momentum, bit 2 nesterov, bit 3 first step.
// Without momentum the nesterov and first flags do not matter and are cleared, so they cannot
// split a slot.
inline int32_t beta_lasso_mode(at::ArrayRef<double> hyper, at::ArrayRef<int64_t> flags, int64_t i) {
  const auto f = beta_lasso_flags(hyper, flags, i);
  const bool nes = f.momentum && f.nesterov;
  const bool first = f.momentum && f.first;
  return (f.weight_decay ? 1 : 0) | (f.momentum ? 2 : 0) | (nes ? 4 : 0) | (first ? 8 : 0);
}

inline BetaLassoFlags beta_lasso_flags_of_mode(int32_t mode) {
  return {(mode & 1) != 0, (mode & 2) != 0, (mode & 4) != 0, (mode & 8) != 0};
}

// One tensor of the chunk table; the CUDA kernel reads this very layout from device memory.
struct PlanTensor {
  void* param;
  const void* grad;
  void* buf;      // null without momentum
  int64_t numel;
  int32_t slot;   // index into the call's slot list (see the file comment)
  int32_t vec;    // 1: param, grad and buf all 16-byte aligned (vector loads allowed)
};
static_assert(sizeof(PlanTensor) == 40, "PlanTensor is compared with memcmp and copied to the device");

// One chunk: elements [begin, min(begin + chunk, numel)) of tensor `tensor`.
struct PlanTask {
  int64_t begin;
  int32_t tensor;
  int32_t pad;
};
static_assert(sizeof(PlanTask) == 16, "PlanTask is copied to the device");

// Consecutive tasks whose slots fit one SlotArgs: [slot_begin, slot_end) with at most kMaxSlots.
struct PlanLaunch {
  int64_t task_begin, task_end;
  int32_t slot_begin, slot_end;
  int64_t elements;
};

constexpr int32_t kMaxSlots = 16;  // 16 × 52 bytes of float64 SlotArgs: far below the 4 KB argument limit
constexpr size_t kPlanCacheSize = 16;

// The slot values of one launch, passed by value (CUDA: as a kernel argument).
template <typename T>
struct SlotArgs {
  core::BetaLassoHyper<T> hyper[kMaxSlots];
  int32_t mode[kMaxSlots];
  int32_t base;  // slot number of hyper[0]
};

struct BetaLassoPlan {
  at::ScalarType dtype;
  at::Device device{at::kCPU};
  int64_t chunk = 0;
  std::vector<PlanTensor> tensors;  // the key (with dtype, device, chunk)
  std::vector<PlanTask> tasks;
  std::vector<PlanLaunch> launches;
  std::vector<int64_t> slot_first;  // slot → its first tensor (where its values are read)
  int64_t vec_tensors = 0;
  bool keep = false;                      // used under graph capture: never evicted
  std::shared_ptr<void> device_table;     // the backend's copy of tensors + tasks (CUDA)
};

// Process-wide counters, read by the _beta_lasso_plan_stats op (tests check the cache with them).
struct PlanStats {
  std::atomic<int64_t> builds{0}, hits{0}, last_launches{0}, last_tasks{0}, last_vec_tensors{0};
};
inline PlanStats& beta_lasso_plan_stats() {
  static PlanStats stats;
  return stats;
}
inline std::vector<int64_t> beta_lasso_plan_stats_list() {
  auto& s = beta_lasso_plan_stats();
  return {s.builds.load(), s.hits.load(), s.last_launches.load(), s.last_tasks.load(), s.last_vec_tensors.load()};
}

// The key of this call: per tensor its pointers, size, alignment and slot. The slot of tensor i
// is its predecessor's when hyper[6i:6i+6] and the mode are equal (compared as values: NaN never
// is, which only costs a slot), else the next one.
inline std::vector<PlanTensor> beta_lasso_plan_key(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                                                   at::ArrayRef<double> hyper, at::ArrayRef<int64_t> flags) {
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<PlanTensor> key(n);
  int32_t slot = 0;
  int32_t prev_mode = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t mode = beta_lasso_mode(hyper, flags, i);
    if (i > 0) {
      bool same = mode == prev_mode;
      for (int64_t k = 0; same && k < kHyperPerTensor; ++k)
        same = hyper[kHyperPerTensor * i + k] == hyper[kHyperPerTensor * (i - 1) + k];
      slot += same ? 0 : 1;
    }
    prev_mode = mode;
    void* p = params[i].data_ptr();
    const void* g = grads[i].data_ptr();
    void* b = (mode & 2) ? bufs[i].data_ptr() : nullptr;
    const auto addr_bits = reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g) |
                           reinterpret_cast<uintptr_t>(b);
    key[i] = {p, g, b, params[i].numel(), slot, (addr_bits & 15) == 0 ? 1 : 0};
  }
  return key;
}

// Tasks in tensor order, cut into launches of at most kMaxSlots consecutive slots.
inline void build_beta_lasso_plan(BetaLassoPlan& plan) {
  const auto& ts = plan.tensors;
  for (size_t t = 0; t < ts.size(); ++t) {
    if (t == 0 || ts[t].slot != ts[t - 1].slot) plan.slot_first.push_back(static_cast<int64_t>(t));
    plan.vec_tensors += ts[t].vec;
    for (int64_t b = 0; b < ts[t].numel; b += plan.chunk) plan.tasks.push_back({b, static_cast<int32_t>(t), 0});
  }
  TORCH_CHECK(plan.tasks.size() < (1u << 31), "beta_lasso_step_: too many chunks for one call (",
              plan.tasks.size(), "); split the parameters over several optimizers");
  for (size_t k = 0; k < plan.tasks.size(); ++k) {
    const PlanTensor& m = ts[plan.tasks[k].tensor];
    const int64_t len = std::min(plan.chunk, m.numel - plan.tasks[k].begin);
    if (plan.launches.empty() || m.slot - plan.launches.back().slot_begin >= kMaxSlots)
      plan.launches.push_back({static_cast<int64_t>(k), static_cast<int64_t>(k), m.slot, m.slot, 0});
    auto& l = plan.launches.back();
    l.task_end = static_cast<int64_t>(k) + 1;
    l.slot_end = m.slot + 1;
    l.elements += len;
  }
}

class BetaLassoPlanCache {
 public:
  std::shared_ptr<BetaLassoPlan> find(const std::vector<PlanTensor>& key, at::ScalarType dtype, at::Device device,
                                      int64_t chunk, bool keep) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = plans_.begin(); it != plans_.end(); ++it) {
      const BetaLassoPlan& p = **it;
      if (p.dtype != dtype || p.device != device || p.chunk != chunk || p.tensors.size() != key.size() ||
          (!key.empty() && std::memcmp(p.tensors.data(), key.data(), key.size() * sizeof(PlanTensor)) != 0))
        continue;
      (*it)->keep = (*it)->keep || keep;
      plans_.splice(plans_.begin(), plans_, it);  // most recently used first
      return plans_.front();
    }
    return nullptr;
  }

  void insert(std::shared_ptr<BetaLassoPlan> plan) {
    std::lock_guard<std::mutex> lock(mutex_);
    plans_.push_front(std::move(plan));
    // evict the least recently used plan that is not kept; callers hold their plan by shared_ptr
    size_t evictable = 0;
    for (const auto& p : plans_) evictable += p->keep ? 0 : 1;
    for (auto it = plans_.end(); evictable > kPlanCacheSize && it != plans_.begin();) {
      --it;
      if (!(*it)->keep) {
        it = plans_.erase(it);
        --evictable;
      }
    }
  }

 private:
  std::mutex mutex_;
  std::list<std::shared_ptr<BetaLassoPlan>> plans_;
};

inline BetaLassoPlanCache& beta_lasso_plan_cache() {
  static BetaLassoPlanCache cache;
  return cache;
}

// The plan of this call: cached, or built (after the overlap check) and handed to `upload` (the
// backend's copy of the table) before it is cached. `refuse_build`: a miss raises with that
// message instead (CUDA graph capture must not bake a host-to-device copy into the graph).
template <typename Upload>
std::shared_ptr<const BetaLassoPlan> beta_lasso_plan(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                                                     at::ArrayRef<double> hyper, at::ArrayRef<int64_t> flags,
                                                     int64_t chunk, bool keep, const char* refuse_build,
                                                     Upload&& upload) {
  auto& stats = beta_lasso_plan_stats();
  auto key = beta_lasso_plan_key(params, grads, bufs, hyper, flags);
  const auto dtype = params[0].scalar_type();
  const auto device = params[0].device();
  std::shared_ptr<BetaLassoPlan> plan = beta_lasso_plan_cache().find(key, dtype, device, chunk, keep);
  if (plan) {
    stats.hits.fetch_add(1);
  } else {
    TORCH_CHECK(refuse_build == nullptr, refuse_build);
    check_beta_lasso_overlap(params, bufs, flags);
    plan = std::make_shared<BetaLassoPlan>();
    plan->dtype = dtype;
    plan->device = device;
    plan->chunk = chunk;
    plan->tensors = std::move(key);
    plan->keep = keep;
    build_beta_lasso_plan(*plan);
    upload(*plan);
    beta_lasso_plan_cache().insert(plan);
    stats.builds.fetch_add(1);
  }
  stats.last_launches.store(static_cast<int64_t>(plan->launches.size()));
  stats.last_tasks.store(static_cast<int64_t>(plan->tasks.size()));
  stats.last_vec_tensors.store(plan->vec_tensors);
  return plan;
}

// The values of one launch's slots, read from the call's hyper / flags at each slot's first tensor.
template <typename T>
SlotArgs<T> beta_lasso_slot_args(const BetaLassoPlan& plan, const PlanLaunch& launch, at::ArrayRef<double> hyper,
                                 at::ArrayRef<int64_t> flags) {
  SlotArgs<T> a{};
  a.base = launch.slot_begin;
  for (int32_t s = launch.slot_begin; s < launch.slot_end; ++s) {
    const int64_t t = plan.slot_first[s];
    a.hyper[s - launch.slot_begin] = beta_lasso_hyper<T>(hyper, t);
    a.mode[s - launch.slot_begin] = beta_lasso_mode(hyper, flags, t);
  }
  return a;
}

}  // namespace regkernels
