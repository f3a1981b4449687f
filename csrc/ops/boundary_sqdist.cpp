// boundary_sqdist: exact squared Euclidean distance to each mask's boundary (SPEC step 2).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(contrastmask, m) {
  m.def("boundary_sqdist(Tensor masks) -> Tensor");
}
