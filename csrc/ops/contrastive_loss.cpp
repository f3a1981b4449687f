// contrastive_loss: the query-sharing pixel-level contrastive loss from explicit key sets
// (SPEC steps 5-6) and its backward. The forward also returns what the backward reads
// (queries, per-pixel cosines and norms, per-term statistics; see docs/DESIGN.md).
#include "library.h"

TORCH_LIBRARY_FRAGMENT(CONTRASTMASK_LIBRARY, m) {
  m.def(
      "contrastive_loss(Tensor z, Tensor labels, Tensor keys, Tensor keep, float tau_easy, float tau_hard, "
      "bool share_queries, str formulation) -> (Tensor loss, Tensor queries, Tensor pixstats, Tensor termstats)");
  m.def(
      "contrastive_loss_backward(Tensor grad, Tensor z, Tensor labels, Tensor keys, Tensor keep, Tensor queries, "
      "Tensor pixstats, Tensor termstats, float tau_easy, float tau_hard, bool share_queries, str formulation) "
      "-> Tensor");
}
