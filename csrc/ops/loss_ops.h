// The contrastive-loss operators' host side, written once for both devices: each operator checks its
// inputs, makes the stage's outputs and hands them to the device's kernels. A device is a struct (CpuLoss in
// csrc/cpu/loss_kernels.cpp, CudaLoss in csrc/cuda/loss_kernels.cu) with
//   Guard                                   made from z's device once loss_inputs has checked the inputs
//   forward(in, queries, pixstats, termstats) -> loss in z's dtype
//   backward(in, grad, queries, pixstats, termstats, dz)
//   query_sums(in, sums, counts)
//   cosines(in, sums, counts, queries, pixstats, lse)
//   terms(in, pixstats, lse, termstats, pos_sums)
//   finish(in, pos_sums, counts, termstats, loss)
//   query_grads(in, grad, neg_grad, queries, pixstats, termstats, counts, coef, dq, beta)
//   dz(in, queries, coef, dq, beta, counts, dz)
// each taking checked, contiguous tensors of the shapes in stage_tensors (loss_inputs.h) and filling the
// outputs; register_loss_ops<Device>(m) registers the operators for the device's dispatch key.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>

#include "loss_inputs.h"

namespace contrastmask {

// Runs the block `body` with scalar_t, z's dtype, and acc_t, the dtype the kernels accumulate it in:
// CM_DISPATCH_LOSS(in.z, "name", { ... }).
#define CM_DISPATCH_LOSS(z, name, ... /* body */)                                          \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (z).scalar_type(), name, [&] { \
    using acc_t = at::opmath_type<scalar_t>;                                                \
    __VA_ARGS__                                                                             \
  })

using LossOpTensors2 = std::tuple<at::Tensor, at::Tensor>;
using LossOpTensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// One operator call on Device: the checked inputs, z's device made current (Device::Guard) and the shapes
// of the tensors that pass between the stages.
template <typename Device>
struct LossCall {
  LossInputs in;
  typename Device::Guard guard;
  StageTensors st;

  LossCall(const at::Tensor& z, const at::Tensor& labels, const at::Tensor& keys, const at::Tensor& keep,
           double tau_easy, double tau_hard, bool share_queries, c10::string_view formulation)
      : in(loss_inputs(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation)),
        guard(in.z.device()),
        st(stage_tensors(in)) {}

  // A stage input in the accumulation dtype or in double (what the previous stage returned), contiguous.
  at::Tensor acc_input(const at::Tensor& t, const char* name, at::IntArrayRef shape) const {
    return check_stage(t, name, shape, in.acc, in);
  }
  at::Tensor double_input(const at::Tensor& t, const char* name, at::IntArrayRef shape) const {
    return check_stage(t, name, shape, at::kDouble, in);
  }
  at::Tensor counts(const at::Tensor& t) const { return double_input(t, "counts", {kNumCounts}); }
  at::Tensor zeros(at::IntArrayRef shape) const { return at::zeros(shape, in.acc_options()); }
  at::Tensor empty(at::IntArrayRef shape) const { return at::empty(shape, in.acc_options()); }
  at::Tensor empty_double(at::IntArrayRef shape) const { return at::empty(shape, in.double_options()); }
  at::Tensor empty_like_z() const {
    return at::empty(in.z.sizes(), in.z.options().memory_format(at::MemoryFormat::Contiguous));
  }
};

// ---------------------------------------------------------------- the local loss: the stages in a row

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_loss_op(
    const at::Tensor& z, const at::Tensor& labels, const at::Tensor& keys, const at::Tensor& keep, double tau_easy,
    double tau_hard, bool share_queries, c10::string_view formulation) {
  const LossCall<Device> c(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation);
  at::Tensor queries = c.zeros(c.st.queries), pixstats = c.zeros(c.st.pixstats), termstats = c.zeros(c.st.termstats);
  at::Tensor loss = Device::forward(c.in, queries, pixstats, termstats);
  return {loss, queries, pixstats, termstats};
}

template <typename Device>
at::Tensor contrastive_loss_backward_op(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& labels,
                                        const at::Tensor& keys, const at::Tensor& keep, const at::Tensor& queries,
                                        const at::Tensor& pixstats, const at::Tensor& termstats, double tau_easy,
                                        double tau_hard, bool share_queries, c10::string_view formulation) {
  const LossCall<Device> c(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation);
  check_backward_inputs(c.in, grad, queries, pixstats, termstats);
  at::Tensor dz = c.empty_like_z();
  if (c.in.N > 0) Device::backward(c.in, grad, queries.contiguous(), pixstats.contiguous(), termstats.contiguous(), dz);
  return dz;
}

// ---------------------------------------------------------------- the stage operators

// Each operator's parameter list is its schema's (csrc/ops/contrastive_loss.cpp), so these functions open
// alike: deliberate twins, one kernel per signature.

template <typename Device>
LossOpTensors2 query_sums_op(const at::Tensor& z, const at::Tensor& labels, const at::Tensor& keys,
                             const at::Tensor& keep, double tau_easy, double tau_hard, bool share_queries,
                             c10::string_view formulation) {
  const LossCall<Device> c(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation);
  at::Tensor sums = at::zeros(c.st.query_sums, c.in.double_options()), counts = c.empty_double({kNumCounts});
  Device::query_sums(c.in, sums, counts);
  return {sums, counts};
}

template <typename Device>
LossOpTensors3 cosines_op(const at::Tensor& z, const at::Tensor& labels, const at::Tensor& keys,
                          const at::Tensor& keep, const at::Tensor& query_sums, const at::Tensor& counts,
                          double tau_easy, double tau_hard, bool share_queries, c10::string_view formulation) {
  const LossCall<Device> c(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation);
  at::Tensor queries = c.zeros(c.st.queries), pixstats = c.zeros(c.st.pixstats), lse = c.empty(c.st.lse);
  Device::cosines(c.in, c.double_input(query_sums, "query_sums", c.st.query_sums), c.counts(counts), queries,
                  pixstats, lse);
  return {queries, pixstats, lse};
}

template <typename Device>
LossOpTensors2 terms_op(const at::Tensor& z, const at::Tensor& labels, const at::Tensor& keys,
                        const at::Tensor& keep, const at::Tensor& pixstats, const at::Tensor& lse,
                        double tau_easy, double tau_hard, bool share_queries, c10::string_view formulation) {
  const LossCall<Device> c(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation);
  at::Tensor termstats = c.zeros(c.st.termstats), pos_sums = c.empty(c.st.pos_sums);
  Device::terms(c.in, c.acc_input(pixstats, "pixstats", c.st.pixstats), c.acc_input(lse, "lse", c.st.lse),
                termstats, pos_sums);
  return {termstats, pos_sums};
}

template <typename Device>
LossOpTensors2 finish_op(const at::Tensor& z, const at::Tensor& labels, const at::Tensor& keys,
                         const at::Tensor& keep, const at::Tensor& termstats_in, const at::Tensor& pos_sums,
                         const at::Tensor& counts, double tau_easy, double tau_hard, bool share_queries,
                         c10::string_view formulation) {
  const LossCall<Device> c(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation);
  at::Tensor termstats = c.acc_input(termstats_in, "termstats", c.st.termstats).clone(), loss = c.empty({});
  Device::finish(c.in, c.acc_input(pos_sums, "pos_sums", c.st.pos_sums), c.counts(counts), termstats, loss);
  return {loss, termstats};
}

template <typename Device>
LossOpTensors3 query_grads_op(const at::Tensor& grad, const c10::optional<at::Tensor>& neg_grad,
                              const at::Tensor& z, const at::Tensor& labels, const at::Tensor& keys,
                              const at::Tensor& keep, const at::Tensor& queries, const at::Tensor& pixstats,
                              const at::Tensor& termstats, const at::Tensor& counts, double tau_easy,
                              double tau_hard, bool share_queries, c10::string_view formulation) {
  const LossCall<Device> c(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation);
  check_backward_inputs(c.in, grad, queries, pixstats, termstats);
  if (neg_grad) check_grad(*neg_grad, "neg_grad", c.in);
  at::Tensor coef = c.empty(c.st.coef), dq = c.empty(c.st.dq), beta = c.empty_double(c.st.beta);
  Device::query_grads(c.in, grad, neg_grad, queries.contiguous(), pixstats.contiguous(), termstats.contiguous(),
                      c.counts(counts), coef, dq, beta);
  return {coef, dq, beta};
}

template <typename Device>
at::Tensor dz_op(const at::Tensor& z, const at::Tensor& labels, const at::Tensor& keys, const at::Tensor& keep,
                 const at::Tensor& queries, const at::Tensor& coef, const at::Tensor& dq, const at::Tensor& beta,
                 const at::Tensor& counts, double tau_easy, double tau_hard, bool share_queries,
                 c10::string_view formulation) {
  const LossCall<Device> c(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation);
  at::Tensor dz = c.empty_like_z();
  Device::dz(c.in, c.acc_input(queries, "queries", c.st.queries), c.acc_input(coef, "coef", c.st.coef),
             c.acc_input(dq, "dq", c.st.dq), c.double_input(beta, "beta", c.st.beta), c.counts(counts), dz);
  return dz;
}

template <typename Device>
void register_loss_ops(torch::Library& m) {
  m.impl("contrastive_loss", &contrastive_loss_op<Device>);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_op<Device>);
  m.impl("contrastive_loss_query_sums", &query_sums_op<Device>);
  m.impl("contrastive_loss_cosines", &cosines_op<Device>);
  m.impl("contrastive_loss_terms", &terms_op<Device>);
  m.impl("contrastive_loss_finish", &finish_op<Device>);
  m.impl("contrastive_loss_query_grads", &query_grads_op<Device>);
  m.impl("contrastive_loss_dz", &dz_op<Device>);
}

}  // namespace contrastmask
