// The extension's Python module: importing sdalign_rt._C runs the TORCH_LIBRARY registrations in
// tree_ops.cpp. The ops are reached through torch.ops.sdalign_rt, so the module itself is empty
// (plain CPython init: no pybind11 compile cost).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
