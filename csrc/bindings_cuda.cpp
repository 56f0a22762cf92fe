// GPU entry points of dpfc_native._core. Arrays arrive as raw device pointers (from
// __cuda_array_interface__ on the Python side) with extents, strides and a stream.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include "common/errors.hpp"
#include "common/registry.hpp"

namespace py = pybind11;

namespace dpfc {

namespace {
// Number of usable devices; 0 (not an error) without a driver or GPU.
int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}
}  // namespace

void register_cuda_bindings(py::module_& m) {
  m.def("cuda_device_count", &device_count, "Number of CUDA devices (0 without a driver).");
  m.def("cuda_runtime_version", &runtime_version, "CUDA runtime version compiled in.");
  for (BindingFn fn : binding_registry()) fn(m);
}

}  // namespace dpfc
