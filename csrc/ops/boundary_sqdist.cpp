// boundary_sqdist: exact squared Euclidean distance to each mask's boundary (SPEC step 2).
// check_inputs: as for partition.
#include "library.h"

namespace contrastmask_ops::ops {

at::Tensor boundary_sqdist(const at::Tensor& masks, bool check_inputs) {
  static auto op = contrastmask::typed_op<decltype(boundary_sqdist)>(CONTRASTMASK_OP("boundary_sqdist"));
  return op.call(masks, check_inputs);
}

}  // namespace contrastmask_ops::ops

TORCH_LIBRARY_FRAGMENT(CONTRASTMASK_LIBRARY, m) {
  m.def("boundary_sqdist(Tensor masks, bool check_inputs=True) -> Tensor");
}
