// Host code of one contrastive-loss call shared by the CPU and CUDA kernels: the checked, contiguous
// inputs with their shapes, the formulation, the accumulation dtype, and the check of the tensors the
// backward gets back from the forward.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "../contrastmask/loss_math.h"
#include "checks.h"

namespace contrastmask {

inline Formulation parse_formulation(c10::string_view formulation) {
  if (formulation == "paper") return Formulation::kPaper;
  if (formulation == "released") return Formulation::kReleased;
  TORCH_CHECK_VALUE(false, "formulation: expected \"paper\" or \"released\", got \"", std::string(formulation), "\"");
}

// Sums run in float32 for float32/float16/bfloat16 z and in float64 for float64 z (at::opmath_type).
inline at::ScalarType loss_acc_dtype(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The sizes of one call: ROIs, channels, pixels per ROI, query groups (1 when shared, else N); the kernels'
// jobs start from them.
struct LossSizes {
  int64_t N = 0, C = 0, P = 0, G = 0;
};

struct LossInputs : LossSizes {
  at::Tensor z, labels, keys, keep;  // contiguous
  bool share_queries;
  double tau_easy, tau_hard;
  Formulation formulation;
  at::ScalarType acc;

  template <typename acc_t>
  LossParams<acc_t> params() const {
    return LossParams<acc_t>{static_cast<acc_t>(tau_easy), static_cast<acc_t>(tau_hard), formulation};
  }
  at::TensorOptions acc_options() const { return z.options().dtype(acc); }
  at::TensorOptions double_options() const { return z.options().dtype(at::kDouble); }
};

inline LossInputs loss_inputs(const at::Tensor& z, const at::Tensor& labels, const at::Tensor& keys,
                              const at::Tensor& keep, double tau_easy, double tau_hard, bool share_queries,
                              c10::string_view formulation) {
  check_loss_inputs(z, labels, keys, keep, tau_easy, tau_hard);
  LossInputs in;
  in.formulation = parse_formulation(formulation);
  in.z = z.contiguous();
  in.labels = labels.contiguous();
  in.keys = keys.contiguous();
  in.keep = keep.contiguous();
  in.N = z.size(0);
  in.C = z.size(1);
  in.P = z.size(2) * z.size(3);
  in.G = share_queries ? 1 : in.N;
  in.share_queries = share_queries;
  in.tau_easy = tau_easy;
  in.tau_hard = tau_hard;
  in.acc = loss_acc_dtype(z);
  return in;
}

// The backward's saved tensors must be what the forward returned for these inputs. Checked here for
// both devices, so that a wrong call fails with a message instead of reading out of bounds.
inline void check_saved(const at::Tensor& t, const char* name, at::IntArrayRef shape, const LossInputs& in) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", shape,
                    " (what the forward returns for this z), got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == in.acc, name, ": expected dtype ", in.acc, ", got ", t.scalar_type());
  check_same_device(t, name, in.z, "z");
}

// Shapes of the tensors that pass between the loss's stages (DESIGN, "Global query sharing"; the fake
// kernels in contrastmask_ops/fake_kernels.py give the same).
struct StageTensors {
  std::vector<int64_t> query_sums, queries, pixstats, lse, termstats, pos_sums, coef, dq, beta;
};

constexpr int64_t kNumBackwardCoefs = 8;  // per key pixel: a, gamma, b and 1/|k| of each query side

inline StageTensors stage_tensors(const LossInputs& in) {
  StageTensors s;
  s.query_sums = {in.G, 2, in.C};
  s.queries = {in.G, kQueryRows, in.C};
  s.pixstats = {in.N, 4, in.P};
  s.lse = {in.G, kNumTerms, 2};
  s.termstats = {in.G, kNumTerms, kNumTermStats};
  s.pos_sums = {in.G, kNumTerms, kNumPosStats};
  s.coef = {in.N, kNumBackwardCoefs, in.P};
  s.dq = {in.G, 2, in.C};
  s.beta = {in.G, 2};
  return s;
}

// A stage's input: the shape and dtype the previous stage gives for these inputs, on z's device;
// returned contiguous.
inline at::Tensor check_stage(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                              const LossInputs& in) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", shape,
                    " (what the previous stage returns for this z), got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  check_same_device(t, name, in.z, "z");
  return t.contiguous();
}

inline void check_grad(const at::Tensor& grad, const char* name, const LossInputs& in) {
  TORCH_CHECK_VALUE(grad.dim() == 0, name, ": expected the gradient of a scalar loss (shape ()), got shape ",
                    grad.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(grad.scalar_type()), name, ": expected a floating-point dtype, got ",
                    grad.scalar_type());
  check_same_device(grad, name, in.z, "z");  // read on the host (CPU) or copied (CUDA): never a meta tensor
}

inline void check_backward_inputs(const LossInputs& in, const at::Tensor& grad, const at::Tensor& queries,
                                  const at::Tensor& pixstats, const at::Tensor& termstats) {
  check_grad(grad, "grad", in);
  check_saved(queries, "queries", {in.G, kQueryRows, in.C}, in);
  check_saved(pixstats, "pixstats", {in.N, 4, in.P}, in);
  check_saved(termstats, "termstats", {in.G, kNumTerms, kNumTermStats}, in);
}

}  // namespace contrastmask
