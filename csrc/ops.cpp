// The extension module mmkernels._C: the op schemas (defined once, here) and
// the Python module object, whose import registers the kernels of csrc/cpu
// (and csrc/cuda when built with them) with the dispatcher.
//
// Op contract: mmkernels/ops/logsumexp.py (primitive), masked_logsumexp.py (the
// primitive with exclusions), siglip.py and similarity.py.
// Autograd formulas and fake kernels are attached in Python
// (mmkernels/compiled.py); one op serves the cpu and cuda backends, dispatched
// on the tensors' device.
#include <Python.h>
#include <exception>
#include <torch/library.h>

#include "common.h"
#include "cpu/gemm_bf16.h"
#include "cpu/kernels.h"
#include "cpu/tile_ops.h"
#ifdef MMKERNELS_WITH_CUDA
#include "cuda/launch.h"
#endif

TORCH_LIBRARY_FRAGMENT(mmkernels, m) {
  m.def("compiled_lse_fwd(Tensor a, Tensor b, Tensor scale, bool normalize) -> (Tensor, Tensor)");
  m.def(
      "compiled_lse_bwd(Tensor a, Tensor b, Tensor scale, bool normalize, Tensor row_lse, "
      "Tensor col_lse, Tensor g_row, Tensor g_col) -> (Tensor, Tensor)");
  // The primitive with exclusions and a frozen side (mmkernels/ops/masked_logsumexp.py).
  m.def(
      "compiled_masked_lse_fwd(Tensor a, Tensor b, Tensor scale, bool normalize, bool exclude_diagonal, "
      "Tensor positives, Tensor? row_groups, Tensor? col_groups, Tensor? row_threshold, "
      "Tensor? col_threshold) -> (Tensor, Tensor)");
  m.def(
      "compiled_masked_lse_bwd(Tensor a, Tensor b, Tensor scale, bool normalize, bool exclude_diagonal, "
      "Tensor positives, Tensor? row_groups, Tensor? col_groups, Tensor? row_threshold, "
      "Tensor? col_threshold, Tensor row_lse, Tensor col_lse, Tensor g_row, Tensor g_col, "
      "bool compute_pb, bool compute_pa) -> (Tensor, Tensor)");
  m.def(
      "compiled_siglip_fwd(Tensor a, Tensor b, Tensor scale, Tensor bias, bool normalize, "
      "bool positives_on_diagonal) -> Tensor");
  m.def(
      "compiled_siglip_bwd(Tensor a, Tensor b, Tensor scale, Tensor bias, bool normalize, "
      "bool positives_on_diagonal, Tensor g_row) -> (Tensor, Tensor, Tensor)");
  m.def("compiled_similarity_fwd(Tensor a, Tensor b, Tensor scale) -> Tensor");
  m.def("compiled_similarity_bwd(Tensor a, Tensor b, Tensor scale, Tensor grad) -> (Tensor, Tensor)");
}

namespace {

namespace cpu = mmkernels::cpu;

// A run-time choice of the CPU kernels as Python sees it: the name in use (a bad
// forcing environment variable raises ValueError), the names this CPU runs, a setter.
struct Choice {
  const char* (*current)();
  const char* const* (*supported)(int* count);
  bool (*set)(const char* name);
  const char* what;          // for the setter's error
  const char* listing_call;  // the Python call that lists the names
};

const Choice kIsa = {[] { return cpu::tile_ops_f32().isa; }, &cpu::supported_isas, &cpu::set_isa, "isa",
                     "cpu_isas()"};
const Choice kBf16Products = {&cpu::bf16_products_name, &cpu::supported_bf16_products, &cpu::set_bf16_products,
                              "bf16 products", "cpu_bf16_products_supported()"};

PyObject* current_of(const Choice& choice) {
  try {
    return PyUnicode_FromString(choice.current());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyObject* supported_of(const Choice& choice) {
  int count = 0;
  const char* const* names = choice.supported(&count);
  PyObject* out = PyTuple_New(count);
  for (int k = 0; out != nullptr && k < count; ++k) PyTuple_SET_ITEM(out, k, PyUnicode_FromString(names[k]));
  return out;
}

PyObject* set_of(const Choice& choice, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  if (!choice.set(name)) {
    PyErr_Format(PyExc_ValueError, "%s: %R is not one this CPU runs (see %s)", choice.what, arg, choice.listing_call);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* cpu_isa(PyObject*, PyObject*) { return current_of(kIsa); }
PyObject* cpu_isas(PyObject*, PyObject*) { return supported_of(kIsa); }
PyObject* set_cpu_isa(PyObject*, PyObject* arg) { return set_of(kIsa, arg); }
PyObject* cpu_bf16_products(PyObject*, PyObject*) { return current_of(kBf16Products); }
PyObject* cpu_bf16_products_supported(PyObject*, PyObject*) { return supported_of(kBf16Products); }
PyObject* set_cpu_bf16_products(PyObject*, PyObject* arg) { return set_of(kBf16Products, arg); }

PyObject* set_cpu_tile_shape(PyObject*, PyObject* args) {
  long long rows = 0, cols = 0;
  if (!PyArg_ParseTuple(args, "LL", &rows, &cols)) return nullptr;
  if (rows <= 0 || cols <= 0) {
    PyErr_Format(PyExc_ValueError, "tile shape: expected positive rows and cols, got (%lld, %lld)", rows, cols);
    return nullptr;
  }
  const cpu::TileShape old = cpu::set_tile_shape({rows, cols});
  return Py_BuildValue("(LL)", static_cast<long long>(old.rows), static_cast<long long>(old.cols));
}

PyObject* products_computed(PyObject*, PyObject*) {
  const auto counts = mmkernels::products_computed();
  return Py_BuildValue("(LLL)", static_cast<long long>(counts[0]), static_cast<long long>(counts[1]),
                       static_cast<long long>(counts[2]));
}

#ifdef MMKERNELS_WITH_CUDA
PyObject* set_cuda_band_rows(PyObject*, PyObject* arg) {
  const long long rows = PyLong_AsLongLong(arg);
  if (rows == -1 && PyErr_Occurred()) return nullptr;
  return PyLong_FromLongLong(mmkernels::cuda::set_band_rows(rows));
}
#endif

PyMethodDef kMethods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set of the float CPU tile kernels in use."},
    {"cpu_isas", cpu_isas, METH_NOARGS, "Instruction sets compiled in that this CPU runs, best first."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Use the float CPU tile kernels of this instruction set (tests)."},
    {"cpu_bf16_products", cpu_bf16_products, METH_NOARGS,
     "Tile products of bf16 inputs on CPU: \"avx512_bf16\" or \"fp32\"."},
    {"cpu_bf16_products_supported", cpu_bf16_products_supported, METH_NOARGS,
     "The bf16 tile products this CPU runs, best first."},
    {"set_cpu_bf16_products", set_cpu_bf16_products, METH_O, "Use these bf16 tile products (tests)."},
    {"set_cpu_tile_shape", set_cpu_tile_shape, METH_VARARGS,
     "Set the CPU kernels' tile edges (rows, cols); returns the previous ones (tests)."},
    {"products_computed", products_computed, METH_NOARGS,
     "(S, pb, pa): N x M x D products the masked backward kernels computed so far (tests)."},
#ifdef MMKERNELS_WITH_CUDA
    {"set_cuda_band_rows", set_cuda_band_rows, METH_O,
     "Rows of S per band of the CUDA kernels (0: from the memory budget); returns the previous value."},
#endif
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "Compiled kernels of mmkernels (csrc/); importing registers them.", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
#ifdef MMKERNELS_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "WITH_CPU", 1) < 0 ||
      PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
