// partition: label per pixel, 1 foreground / 0 background / -1 ignored (SPEC step 1).
// check_inputs=False: the masks' 0/1 values and the CAMs of novel ROIs are not checked (on CUDA, the read-back
// of the error word, a host sync, is skipped), so the call can be captured in a CUDA graph; bad values then
// give unspecified labels instead of an error.
#include "library.h"

TORCH_LIBRARY_FRAGMENT(CONTRASTMASK_LIBRARY, m) {
  m.def("partition(Tensor masks, Tensor? cams, Tensor is_novel, Tensor? valid, float delta, bool check_inputs=True) -> Tensor");
}
