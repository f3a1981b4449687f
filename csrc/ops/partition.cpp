// partition: label per pixel, 1 foreground / 0 background / -1 ignored (SPEC step 1).
#include "library.h"

TORCH_LIBRARY_FRAGMENT(CONTRASTMASK_LIBRARY, m) {
  m.def("partition(Tensor masks, Tensor? cams, Tensor is_novel, Tensor? valid, float delta) -> Tensor");
}
