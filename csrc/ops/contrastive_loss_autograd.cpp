// Autograd of contrastive_loss, in C++ so that Python and libtorch users get the same backward
// (as torchvision's csrc/ops/autograd/). Its backward runs contrastive_loss_backward; that op's own
// autograd kernel refuses to be differentiated, so create_graph=True gives the first-order gradient
// and a gradient of that gradient raises instead of silently missing the second-order term.
#include <torch/autograd.h>

#include <string>

#include "library.h"

namespace contrastmask {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kDoubleBackwardMessage =
    "contrastmask_ops: the fused contrastive loss has no double backward (its gradient is not differentiable), "
    "so this higher-order gradient would silently miss the loss's second-order term. Use "
    "contrastmask_ops.reference.query_sharing_contrastive_loss / contrastive_loss_from_keys (same semantics, pure "
    "PyTorch) where you need gradients of gradients.";

using ops::LossOutputs;

class ContrastiveLoss : public torch::autograd::Function<ContrastiveLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z, const at::Tensor& labels,
                               const at::Tensor& keys, const at::Tensor& keep, double tau_easy, double tau_hard,
                               bool share_queries, c10::string_view formulation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, queries, pixstats, termstats] =
        ops::contrastive_loss(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation);
    ctx->save_for_backward({z, labels, keys, keep, queries, pixstats, termstats});
    ctx->saved_data["tau_easy"] = tau_easy;
    ctx->saved_data["tau_hard"] = tau_hard;
    ctx->saved_data["share_queries"] = share_queries;
    ctx->saved_data["formulation"] = std::string(formulation);
    ctx->mark_non_differentiable({queries, pixstats, termstats});
    return {loss, queries, pixstats, termstats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor dz;
    if (ctx->needs_input_grad(0)) {
      // Through the dispatcher at the autograd level: with create_graph=True this records the backward
      // op's node, whose own backward raises.
      dz = ops::contrastive_loss_backward(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                                          saved[6], ctx->saved_data["tau_easy"].toDouble(),
                                          ctx->saved_data["tau_hard"].toDouble(),
                                          ctx->saved_data["share_queries"].toBool(),
                                          ctx->saved_data["formulation"].toStringRef());
    }
    return {dz, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class ContrastiveLossBackward : public torch::autograd::Function<ContrastiveLossBackward> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& z, const at::Tensor& labels,
                               const at::Tensor& keys, const at::Tensor& keep, const at::Tensor& queries,
                               const at::Tensor& pixstats, const at::Tensor& termstats, double tau_easy,
                               double tau_hard, bool share_queries, c10::string_view formulation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return {ops::contrastive_loss_backward(grad, z, labels, keys, keep, queries, pixstats, termstats, tau_easy,
                                           tau_hard, share_queries, formulation)};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, kDoubleBackwardMessage);
  }
};

LossOutputs contrastive_loss_autograd(const at::Tensor& z, const at::Tensor& labels, const at::Tensor& keys,
                                      const at::Tensor& keep, double tau_easy, double tau_hard, bool share_queries,
                                      c10::string_view formulation) {
  auto out = ContrastiveLoss::apply(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation);
  return {out[0], out[1], out[2], out[3]};
}

at::Tensor contrastive_loss_backward_autograd(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& labels,
                                              const at::Tensor& keys, const at::Tensor& keep,
                                              const at::Tensor& queries, const at::Tensor& pixstats,
                                              const at::Tensor& termstats, double tau_easy, double tau_hard,
                                              bool share_queries, c10::string_view formulation) {
  return ContrastiveLossBackward::apply(grad, z, labels, keys, keep, queries, pixstats, termstats, tau_easy,
                                        tau_hard, share_queries, formulation)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(CONTRASTMASK_LIBRARY, Autograd, m) {
  m.impl("contrastive_loss", &contrastive_loss_autograd);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_autograd);
}

}  // namespace contrastmask
