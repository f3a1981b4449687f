// partition: label per pixel, 1 foreground / 0 background / -1 ignored (SPEC step 1).
// check_inputs=False: the masks' 0/1 values and the CAMs of novel ROIs are not checked (on CUDA, the read-back
// of the error word, a host sync, is skipped), so the call can be captured in a CUDA graph; bad values then
// give unspecified labels instead of an error.
#include "library.h"

namespace contrastmask_ops::ops {

at::Tensor partition(const at::Tensor& masks, const c10::optional<at::Tensor>& cams, const at::Tensor& is_novel,
                     const c10::optional<at::Tensor>& valid, double delta, bool check_inputs) {
  static auto op = contrastmask::typed_op<decltype(partition)>(CONTRASTMASK_OP("partition"));
  return op.call(masks, cams, is_novel, valid, delta, check_inputs);
}

}  // namespace contrastmask_ops::ops

TORCH_LIBRARY_FRAGMENT(CONTRASTMASK_LIBRARY, m) {
  m.def("partition(Tensor masks, Tensor? cams, Tensor is_novel, Tensor? valid, float delta, bool check_inputs=True) -> Tensor");
}
