// The `contrastmask` operator library and the Python module stub that loads it.
// Each operator's schema is declared once, in csrc/ops/<op>.cpp; device kernels register in
// csrc/cpu and csrc/cuda. No pybind glue: Python reaches the ops through torch.ops.contrastmask.
#include <torch/library.h>

#ifndef CONTRASTMASK_NO_PYTHON  // the CMake build (CMakeLists.txt) is a plain shared library
#include <Python.h>

extern "C" {
// `import contrastmask_ops._C` runs the static initialisers that register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

// Claims the namespace; the operators are declared as fragments, one file each.
TORCH_LIBRARY(contrastmask, m) {}
