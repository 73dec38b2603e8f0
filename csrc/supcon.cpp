// The op schemas (one place) and the `_C` module stub whose import runs the registrations.
// Kernels: csrc/cpu/ (CPU dispatch key, same library), csrc/cuda/ (CUDA dispatch key, the
// separate `_cuda` library, whose .cu defines its own PyInit__cuda stub).
// Fake kernels and autograd are registered in Python (modan_ext/ops.py).
#include <Python.h>

#include <torch/csrc/stable/library.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// views and the anchor range are SymInt: they follow the batch size, and torch.compile must keep
// them symbolic rather than specialise (and recompile) on every batch size.
STABLE_TORCH_LIBRARY(modan_ext, m) {
  m.def(
      "supcon_fwd(Tensor features, Tensor labels, int label_kind, SymInt views, "
      "SymInt anchor_begin, SymInt anchor_end, bool first_view_only, float temperature, "
      "float base_temperature, float threshold, int weighting, int normalization, "
      "bool allow_tf32) -> (Tensor, Tensor)");
  m.def(
      "supcon_bwd(Tensor grad_loss, Tensor features, Tensor labels, Tensor stats, "
      "int label_kind, SymInt views, SymInt anchor_begin, SymInt anchor_end, "
      "bool first_view_only, "
      "float temperature, float base_temperature, float threshold, int weighting, "
      "int normalization, bool allow_tf32) -> Tensor");
}
