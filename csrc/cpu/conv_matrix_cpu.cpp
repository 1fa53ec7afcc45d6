// Dense matrix T of a convolution on CPU (docs/conv.md#conv_to_matrix) and its backward, for 5-D weights
// (C_out, Cg, k0, k1, k2); the Python op normalizes 1-D/2-D convolutions to 3 spatial dims.
//
// Index map (regkernels.reference.conv._matrix_entries): row r = o·P_out + y (y row-major over
// out_size), column (g·Cg + c')·P_in + u (u row-major over input_size), g = o / Og. Tap
// t = (t0, t1, t2) of output position y reads, per dim, w_i = y_i·s_i − p_i + t_i·dil_i: zero
// padding drops the tap unless 0 <= w_i < n_i; circular padding reads w_i mod n_i, so two taps
// of one row can land on one column (small inputs) and add up. The spatial column of a tap
// depends on (y, t) only, so it is tabulated once per call (TapTable) and shared by every
// (o, c').
//
// Forward: T is write-only and mostly zeros (a row is non-zero only inside its group's Cg·P_in
// columns, and there only at the taps), so its cost is memory traffic, dominated for large T by
// the kernel's page faults on first touch (hence advise_huge_pages); each row is written exactly
// once, in parallel over rows, while in cache (see write_rows).
// Backward: gW[o, c', t] = Σ_y [tap valid] grad[row(o, y), col(o, c', y, t)] (a gather: every
// tap of a duplicate column gets the entry's full gradient), each (o, c') owned by one thread.
//
// Sums are accumulated in float32 (float16 / bfloat16 / float32) or float64 and rounded once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace regkernels {
namespace {

// Outputs at least this large are advised onto transparent huge pages (advise_huge_pages).
constexpr int64_t kHugePageMinBytes = int64_t(4) << 20;
// Bound on every geometry entry (input_size, stride, padding, dilation): 2^31.
constexpr int64_t kMaxEntry = int64_t(1) << 31;

// The normalized geometry of one call.
struct Geometry {
  int64_t c_out, cg, groups, og, c_in;
  int64_t k[3], n[3], s[3], p[3], dil[3], out[3];
  int64_t K, P_in, P_out;
  bool circular;
};

Geometry make_geometry(const char* op, const at::Tensor& weight, at::IntArrayRef input_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool circular) {
  TORCH_CHECK(weight.layout() == at::kStrided, op, ": weight must be a strided (dense) tensor; got ", weight.layout());
  TORCH_CHECK(weight.dim() == 5, op, ": weight must be 5-D (C_out, C_in/groups, k0, k1, k2); got shape ",
              weight.sizes());
  TORCH_CHECK(weight.device().is_cpu(), op, ": weight must be a CPU tensor; got ", weight.device());
  const auto dt = weight.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble, op,
              ": weight must be float16, bfloat16, float32 or float64; got ", dt);
  TORCH_CHECK(input_size.size() == 3 && stride.size() == 3 && padding.size() == 3 && dilation.size() == 3, op,
              ": input_size, stride, padding and dilation must have 3 entries each; got ", input_size, ", ", stride,
              ", ", padding, ", ", dilation);
  // Every entry below 2^31 keeps y·s − p + t·dil and n + 2p − dil·(k − 1) inside int64.
  for (const auto list : {input_size, stride, padding, dilation}) {
    for (const int64_t v : list) {
      TORCH_CHECK(v > -kMaxEntry && v < kMaxEntry, op,
                  ": input_size, stride, padding and dilation must be ints below 2^31; got ", input_size, ", ", stride,
                  ", ", padding, ", ", dilation);
    }
  }
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1; got ", groups);
  Geometry G;
  G.c_out = weight.size(0);
  G.cg = weight.size(1);
  G.groups = groups;
  TORCH_CHECK(G.c_out % groups == 0, op, ": C_out (weight.size(0) = ", G.c_out, ") must be divisible by groups = ",
              groups);
  G.og = G.c_out / groups;
  G.c_in = G.cg * groups;
  G.circular = circular;
  G.K = G.P_in = G.P_out = 1;
  for (int i = 0; i < 3; ++i) {
    G.k[i] = weight.size(2 + i);
    G.n[i] = input_size[i];
    G.s[i] = stride[i];
    G.p[i] = padding[i];
    G.dil[i] = dilation[i];
    TORCH_CHECK(G.n[i] >= 1 && G.s[i] >= 1 && G.p[i] >= 0 && G.dil[i] >= 1, op,
                ": need input_size >= 1, stride >= 1, padding >= 0 and dilation >= 1; got input_size=", input_size,
                ", stride=", stride, ", padding=", padding, ", dilation=", dilation);
    TORCH_CHECK(!circular || G.p[i] <= G.n[i], op, ": circular padding must not exceed input_size; got padding=",
                padding, ", input_size=", input_size);
    const int64_t span = G.n[i] + 2 * G.p[i] - G.dil[i] * (G.k[i] - 1) - 1;
    TORCH_CHECK(span >= 0, op, ": the dilated kernel ", weight.sizes().slice(2), " does not fit input_size=",
                input_size, " with padding=", padding, ", dilation=", dilation);
    G.out[i] = span / G.s[i] + 1;
    G.K *= G.k[i];  // a product of tensor sizes: fits
    TORCH_CHECK(!c10::mul_overflows(G.P_in, G.n[i], &G.P_in) && !c10::mul_overflows(G.P_out, G.out[i], &G.P_out),
                op, ": the number of input or output positions overflows int64; got input_size=", input_size);
  }
  // T is (C_out·P_out, C_in·P_in): its element count must fit int64 (the Python op refuses
  // large dense results long before, by bytes)
  int64_t rows = 0, cols = 0, entries = 0;
  TORCH_CHECK(!c10::mul_overflows(G.c_out, G.P_out, &rows) && !c10::mul_overflows(G.c_in, G.P_in, &cols) &&
                  !c10::mul_overflows(rows, cols, &entries) && !c10::mul_overflows(G.P_out, G.K, &entries),
              op, ": T of (C_out·P_out) × (C_in·P_in) entries overflows int64; got weight ", weight.sizes(),
              ", input_size=", input_size);
  return G;
}

// Per output position y, its valid taps packed to the front of a row of K entries:
// (spatial column u, flat tap t), t ascending, so duplicate columns are summed in tap order
// like the reference's index_put.
struct TapTable {
  std::vector<int64_t> col, tap;  // (P_out, K) each
  std::vector<int64_t> count;     // (P_out)
};

// Non-negative w mod n for w in [−n, 2n) (circular padding never reaches further: p <= n and
// the last tap ends inside the padded input).
inline int64_t wrap(int64_t w, int64_t n) { return w < 0 ? w + n : (w >= n ? w - n : w); }

TapTable make_taps(const Geometry& G) {
  TapTable tt;
  tt.col.resize(G.P_out * G.K);
  tt.tap.resize(G.P_out * G.K);
  tt.count.resize(G.P_out);
  // per dim i the input index of (y_i, t_i), or −1 where the tap falls in the zero padding
  std::vector<int64_t> u[3];
  for (int i = 0; i < 3; ++i) {
    u[i].resize(G.out[i] * G.k[i]);
    for (int64_t y = 0; y < G.out[i]; ++y) {
      for (int64_t t = 0; t < G.k[i]; ++t) {
        const int64_t w = y * G.s[i] - G.p[i] + t * G.dil[i];
        u[i][y * G.k[i] + t] = G.circular ? wrap(w, G.n[i]) : (w >= 0 && w < G.n[i] ? w : -1);
      }
    }
  }
  const int64_t n12 = G.n[1] * G.n[2];
  at::parallel_for(0, G.P_out, std::max<int64_t>(1, 4096 / std::max<int64_t>(G.K, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t y = lo; y < hi; ++y) {
      const int64_t y0 = y / (G.out[1] * G.out[2]), y1 = (y / G.out[2]) % G.out[1], y2 = y % G.out[2];
      int64_t* col = tt.col.data() + y * G.K;
      int64_t* tap = tt.tap.data() + y * G.K;
      int64_t m = 0;
      for (int64_t t0 = 0; t0 < G.k[0]; ++t0) {
        const int64_t u0 = u[0][y0 * G.k[0] + t0];
        if (u0 < 0) continue;
        for (int64_t t1 = 0; t1 < G.k[1]; ++t1) {
          const int64_t u1 = u[1][y1 * G.k[1] + t1];
          if (u1 < 0) continue;
          for (int64_t t2 = 0; t2 < G.k[2]; ++t2) {
            const int64_t u2 = u[2][y2 * G.k[2] + t2];
            if (u2 < 0) continue;
            col[m] = u0 * n12 + u1 * G.n[2] + u2;
            tap[m] = (t0 * G.k[1] + t1) * G.k[2] + t2;
            ++m;
          }
        }
      }
      tt.count[y] = m;
    }
  });
  return tt;
}

// Back the 2 MB-aligned interior of a fresh buffer by transparent huge pages, before its first
// write. A write-only kernel over a fresh buffer spends most of its time in the 4 KB page faults
// of the first touch (the kernel zeroing each page); 2 MB pages take 512× fewer faults. Where
// THP is "madvise" (not "always") only advised ranges get them. The return value is ignored:
// this is advice, and the kernel is correct without it.
void advise_huge_pages(void* ptr, int64_t bytes) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

// ----------------------------------------------------------------------------- forward

// One pass per row: the row (16 KB for the benchmark layers, in L1/L2) is zeroed and every tap
// of every c' of its group added in place, so each line of T is written once, while in cache.
// float32 / float64 accumulate in the row itself; float16 / bfloat16 in a per-thread float32
// buffer of the group's Cg·P_in columns, rounded once into the row. Plain stores: after a huge
// page fault the kernel's zeroing has just left the page in cache, and measured non-temporal
// stores gained nothing (while leaving a smaller T out of cache for its consumer).
template <typename scalar_t, typename acc_t>
void write_rows(const Geometry& G, const TapTable& tt, const acc_t* w, scalar_t* out) {
  constexpr bool direct = std::is_same_v<acc_t, scalar_t>;
  const int64_t seg = G.cg * G.P_in;  // columns of one group
  const int64_t N = G.groups * seg;   // row length
  const int64_t rows = G.c_out * G.P_out;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(N, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> buf(direct ? 0 : seg);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r / G.P_out, y = r % G.P_out, g = o / G.og;
      const int64_t m = tt.count[y];
      const int64_t* col = tt.col.data() + y * G.K;
      const int64_t* tap = tt.tap.data() + y * G.K;
      scalar_t* row = out + r * N;
      acc_t* acc;
      if constexpr (direct) {
        std::memset(row, 0, N * sizeof(scalar_t));
        acc = row + g * seg;
      } else {
        std::memset(row, 0, g * seg * sizeof(scalar_t));
        std::memset(row + (g + 1) * seg, 0, (N - (g + 1) * seg) * sizeof(scalar_t));
        std::fill(buf.begin(), buf.end(), acc_t(0));
        acc = buf.data();
      }
      for (int64_t c = 0; c < G.cg; ++c) {
        acc_t* b = acc + c * G.P_in;
        const acc_t* wc = w + (o * G.cg + c) * G.K;
        for (int64_t j = 0; j < m; ++j) b[col[j]] += wc[tap[j]];
      }
      if constexpr (!direct) {
        scalar_t* dst = row + g * seg;
        for (int64_t j = 0; j < seg; ++j) dst[j] = static_cast<scalar_t>(buf[j]);
      }
    }
  });
}

at::Tensor conv_to_matrix_dense_cpu(const at::Tensor& weight, at::IntArrayRef input_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                    bool circular) {
  const char* op = "regkernels::conv_to_matrix_dense (CPU)";
  const Geometry G = make_geometry(op, weight, input_size, stride, padding, dilation, groups, circular);
  auto T = at::empty({G.c_out * G.P_out, G.c_in * G.P_in}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (T.numel() == 0) return T;
  const int64_t bytes = T.numel() * static_cast<int64_t>(T.element_size());
  if (bytes >= kHugePageMinBytes) advise_huge_pages(T.data_ptr(), bytes);
  const TapTable tt = make_taps(G);
  const auto acc_type = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto w = weight.to(acc_type).contiguous();  // (C_out, Cg, K) in acc_t, small
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "conv_to_matrix_dense_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    write_rows<scalar_t, acc_t>(G, tt, w.const_data_ptr<acc_t>(), T.data_ptr<scalar_t>());
  });
  return T;
}

// ----------------------------------------------------------------------------- backward

// One (o, c') per work item: its K sums run over y in ascending order, so the result does not
// depend on the thread count.
template <typename scalar_t, typename acc_t>
void gather_taps(const Geometry& G, const TapTable& tt, const scalar_t* grad, int64_t s0, int64_t s1, scalar_t* gw) {
  const int64_t items = G.c_out * G.cg;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(G.P_out * G.K, 1));
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> acc(G.K);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t o = i / G.cg, c = i % G.cg, g = o / G.og;
      const int64_t col0 = (g * G.cg + c) * G.P_in;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t y = 0; y < G.P_out; ++y) {
        const scalar_t* row = grad + (o * G.P_out + y) * s0 + col0 * s1;
        const int64_t m = tt.count[y];
        const int64_t* col = tt.col.data() + y * G.K;
        const int64_t* tap = tt.tap.data() + y * G.K;
        for (int64_t j = 0; j < m; ++j) acc[tap[j]] += static_cast<acc_t>(row[col[j] * s1]);
      }
      scalar_t* dst = gw + i * G.K;
      for (int64_t t = 0; t < G.K; ++t) dst[t] = static_cast<scalar_t>(acc[t]);
    }
  });
}

at::Tensor conv_to_matrix_dense_backward_cpu(const at::Tensor& grad, const at::Tensor& weight,
                                             at::IntArrayRef input_size, at::IntArrayRef stride,
                                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                             bool circular) {
  const char* op = "regkernels::conv_to_matrix_dense_backward (CPU)";
  const Geometry G = make_geometry(op, weight, input_size, stride, padding, dilation, groups, circular);
  TORCH_CHECK(grad.layout() == at::kStrided, op, ": grad must be a strided (dense) tensor; got ", grad.layout());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == G.c_out * G.P_out && grad.size(1) == G.c_in * G.P_in, op,
              ": grad must have the shape of T, (", G.c_out * G.P_out, ", ", G.c_in * G.P_in, "); got ", grad.sizes());
  TORCH_CHECK(grad.device().is_cpu(), op, ": grad must be a CPU tensor; got ", grad.device());
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), op, ": grad must have the weight's dtype ",
              weight.scalar_type(), "; got ", grad.scalar_type());
  auto gw = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (gw.numel() == 0) return gw;
  const TapTable tt = make_taps(G);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "conv_to_matrix_dense_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gather_taps<scalar_t, acc_t>(G, tt, grad.const_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1),
                                 gw.data_ptr<scalar_t>());
  });
  return gw;
}

}  // namespace
}  // namespace regkernels

TORCH_LIBRARY_IMPL(regkernels, CPU, m) {
  m.impl("conv_to_matrix_dense", &regkernels::conv_to_matrix_dense_cpu);
  m.impl("conv_to_matrix_dense_backward", &regkernels::conv_to_matrix_dense_backward_cpu);
}
