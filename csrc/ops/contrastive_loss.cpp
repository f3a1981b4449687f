// contrastive_loss: the query-sharing pixel-level contrastive loss from explicit key sets
// (SPEC steps 5-6) and its backward. The forward also returns what the backward reads
// (queries, per-pixel cosines and norms, per-term statistics; see docs/DESIGN.md).
#include "library.h"

// The parameter lists repeat the declarations' (ops.h), as the device kernels' do (loss_ops.h): C++ writes a
// signature out at each definition.
namespace contrastmask_ops::ops {

LossOutputs contrastive_loss(const at::Tensor& z, const at::Tensor& labels, const at::Tensor& keys,
                             const at::Tensor& keep, double tau_easy, double tau_hard, bool share_queries,
                             c10::string_view formulation) {
  static auto op = contrastmask::typed_op<decltype(contrastive_loss)>(CONTRASTMASK_OP("contrastive_loss"));
  return op.call(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation);
}

at::Tensor contrastive_loss_backward(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& labels,
                                     const at::Tensor& keys, const at::Tensor& keep, const at::Tensor& queries,
                                     const at::Tensor& pixstats, const at::Tensor& termstats, double tau_easy,
                                     double tau_hard, bool share_queries, c10::string_view formulation) {
  static auto op =
      contrastmask::typed_op<decltype(contrastive_loss_backward)>(CONTRASTMASK_OP("contrastive_loss_backward"));
  return op.call(grad, z, labels, keys, keep, queries, pixstats, termstats, tau_easy, tau_hard, share_queries,
                 formulation);
}

}  // namespace contrastmask_ops::ops

TORCH_LIBRARY_FRAGMENT(CONTRASTMASK_LIBRARY, m) {
  m.def(
      "contrastive_loss(Tensor z, Tensor labels, Tensor keys, Tensor keep, float tau_easy, float tau_hard, "
      "bool share_queries, str formulation) -> (Tensor loss, Tensor queries, Tensor pixstats, Tensor termstats)");
  m.def(
      "contrastive_loss_backward(Tensor grad, Tensor z, Tensor labels, Tensor keys, Tensor keep, Tensor queries, "
      "Tensor pixstats, Tensor termstats, float tau_easy, float tau_hard, bool share_queries, str formulation) "
      "-> Tensor");
  // The stages of both (DESIGN, "Global query sharing"): the global loss runs them with collectives in between,
  // the two ops above run them in a row.
  m.def(
      "contrastive_loss_query_sums(Tensor z, Tensor labels, Tensor keys, Tensor keep, float tau_easy, "
      "float tau_hard, bool share_queries, str formulation) -> (Tensor query_sums, Tensor counts)");
  m.def(
      "contrastive_loss_cosines(Tensor z, Tensor labels, Tensor keys, Tensor keep, Tensor query_sums, "
      "Tensor counts, float tau_easy, float tau_hard, bool share_queries, str formulation) "
      "-> (Tensor queries, Tensor pixstats, Tensor lse)");
  m.def(
      "contrastive_loss_terms(Tensor z, Tensor labels, Tensor keys, Tensor keep, Tensor pixstats, Tensor lse, "
      "float tau_easy, float tau_hard, bool share_queries, str formulation) -> (Tensor termstats, Tensor pos_sums)");
  m.def(
      "contrastive_loss_finish(Tensor z, Tensor labels, Tensor keys, Tensor keep, Tensor termstats, "
      "Tensor pos_sums, Tensor counts, float tau_easy, float tau_hard, bool share_queries, str formulation) "
      "-> (Tensor loss, Tensor termstats)");
  m.def(
      "contrastive_loss_query_grads(Tensor grad, Tensor? neg_grad, Tensor z, Tensor labels, Tensor keys, "
      "Tensor keep, Tensor queries, Tensor pixstats, Tensor termstats, Tensor counts, float tau_easy, "
      "float tau_hard, bool share_queries, str formulation) -> (Tensor coef, Tensor dq, Tensor beta)");
  m.def(
      "contrastive_loss_dz(Tensor z, Tensor labels, Tensor keys, Tensor keep, Tensor queries, Tensor coef, "
      "Tensor dq, Tensor beta, Tensor counts, float tau_easy, float tau_hard, bool share_queries, "
      "str formulation) -> Tensor");
}
