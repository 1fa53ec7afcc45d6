// Autograd for regkernels::gram_penalty_fwd (docs/gram.md), in C++: the op is called once per
// layer list per step, and a Python autograd wrapper cost more than the whole CPU kernel on
// small layers (~0.3 ms per forward + backward at 64×576). The forward keeps the (batch, k, k)
// coefficients P the kernel leaves; the backward is regkernels::gram_penalty_bwd (dW = g·P·W).
//
// Double backward is not implemented: P is a constant of the forward, so differentiating dW = g·P·W
// would miss ∂P/∂W and give a wrong second derivative. A backward with create_graph=True still
// returns the correct first gradient (gradient-penalty code asks for it), but through
// GramPenaltyGrad, whose own backward raises an error that names the op and backend="reference".
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace regkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = std::tuple<at::Tensor, std::vector<at::Tensor>>(at::TensorList, c10::string_view, at::IntArrayRef,
                                                              at::ArrayRef<double>, bool);
using BwdSig = std::vector<at::Tensor>(at::TensorList, at::TensorList, at::IntArrayRef, const at::Tensor&);

// The public ops behind each kind, for the error message.
std::string ops_of_kind(const std::string& kind) {
  return kind.empty() ? std::string("the Gram penalties (frame, diversity, orthogonality, mhe)")
                      : kind + "_penalty (and penalty_multi with kind='" + kind + "')";
}

// dW = gram_penalty_bwd(...) as a node of the graph: the values are the first gradient, and
// differentiating them raises (see the top of this file).
class GramPenaltyGrad : public torch::autograd::Function<GramPenaltyGrad> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList mats, at::TensorList coefs, at::IntArrayRef sides,
                               const at::Tensor& grad, std::string kind) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("regkernels::gram_penalty_bwd", "").typed<BwdSig>();
    ctx->saved_data["kind"] = kind;
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(mats, coefs, sides, grad);
  }

  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, ops_of_kind(ctx->saved_data["kind"].toStringRef()),
                ": double backward (differentiating a gradient taken with create_graph=True) is not supported by "
                "the C++ kernel (backend='cpu'); use backend='reference', which differentiates twice through "
                "torch ops");
  }
};

class GramPenalty : public torch::autograd::Function<GramPenalty> {
 public:
  // mats is an at::TensorList so that every matrix is an autograd input; the other arguments
  // are one non-differentiable input each
  static variable_list forward(AutogradContext* ctx, at::TensorList mats, c10::string_view kind,
                               at::IntArrayRef sides, at::ArrayRef<double> params, bool need_grad) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("regkernels::gram_penalty_fwd", "").typed<FwdSig>();
    at::Tensor values;
    std::vector<at::Tensor> coefs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(values, coefs) = op.call(mats, kind, sides, params, need_grad);
    }
    std::vector<at::Tensor> saved(mats.begin(), mats.end());
    saved.insert(saved.end(), coefs.begin(), coefs.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["count"] = static_cast<int64_t>(mats.size());
    ctx->saved_data["sides"] = sides.vec();
    ctx->saved_data["need_grad"] = need_grad;
    ctx->saved_data["kind"] = std::string(kind);
    ctx->mark_non_differentiable(coefs);
    variable_list out{values};
    out.insert(out.end(), coefs.begin(), coefs.end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("regkernels::gram_penalty_bwd", "").typed<BwdSig>();
    TORCH_CHECK(ctx->saved_data["need_grad"].toBool(),
                "regkernels::gram_penalty_fwd was called with need_grad=False; its backward needs the "
                "coefficients need_grad=True keeps");
    const auto saved = ctx->get_saved_variables();
    const int64_t count = ctx->saved_data["count"].toInt();
    const std::vector<at::Tensor> mats(saved.begin(), saved.begin() + count);
    const std::vector<at::Tensor> coefs(saved.begin() + count, saved.end());
    const auto sides = ctx->saved_data["sides"].toIntVector();
    // grad mode is on in a backward exactly when it was asked for with create_graph=True
    variable_list grads =
        at::GradMode::is_enabled()
            // as at::TensorList: autograd takes the tensors of a TensorList argument as inputs, those of
            // a std::vector as opaque data
            ? GramPenaltyGrad::apply(at::TensorList(mats), at::TensorList(coefs), sides, grad_outputs[0],
                                     ctx->saved_data["kind"].toStringRef())
            : op.call(mats, coefs, sides, grad_outputs[0]);
    grads.resize(grads.size() + 4);  // kind, sides, params, need_grad: no gradient
    return grads;
  }
};

std::tuple<at::Tensor, std::vector<at::Tensor>> gram_penalty_fwd_autograd(at::TensorList mats, c10::string_view kind,
                                                                          at::IntArrayRef sides,
                                                                          at::ArrayRef<double> params, bool need_grad) {
  auto out = GramPenalty::apply(mats, kind, sides, params, need_grad);
  return {out[0], std::vector<at::Tensor>(out.begin() + 1, out.end())};
}

// The raw backward op as an autograd node too: without it, calling it on tensors that require grad
// fails inside the kernel (out= products do not support autograd) instead of with a clear message.
std::vector<at::Tensor> gram_penalty_bwd_autograd(at::TensorList mats, at::TensorList coefs, at::IntArrayRef sides,
                                                  const at::Tensor& grad) {
  return GramPenaltyGrad::apply(mats, coefs, sides, grad, std::string());
}

}  // namespace

TORCH_LIBRARY_IMPL(regkernels, Autograd, m) {
  m.impl("gram_penalty_fwd", &gram_penalty_fwd_autograd);
  m.impl("gram_penalty_bwd", &gram_penalty_bwd_autograd);
}

}  // namespace regkernels
