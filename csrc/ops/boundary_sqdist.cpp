// boundary_sqdist: exact squared Euclidean distance to each mask's boundary (SPEC step 2).
// check_inputs: as for partition.
#include "library.h"

TORCH_LIBRARY_FRAGMENT(CONTRASTMASK_LIBRARY, m) {
  m.def("boundary_sqdist(Tensor masks, bool check_inputs=True) -> Tensor");
}
