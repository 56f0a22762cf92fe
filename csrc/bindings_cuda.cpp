// GPU entry points of dpfc_native._core. Arrays arrive as raw device pointers (from
// __cuda_array_interface__ on the Python side) with extents, strides and a stream.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <string>
#include <tuple>
#include <vector>

#include "common/errors.hpp"
#include "common/registry.hpp"

namespace py = pybind11;

namespace dpfc {

namespace {
// (index, name, compute capability major, minor) of every visible device; empty (not an error)
// without a driver or GPU. Whether this build has a kernel image for a device is decided
// in Python (dpfc_native.build_info) from these and the compiled architecture list.
std::vector<std::tuple<int, std::string, int, int>> devices() {
  std::vector<std::tuple<int, std::string, int, int>> out;
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return out;
  }
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    out.emplace_back(i, std::string(prop.name), prop.major, prop.minor);
  }
  return out;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}
}  // namespace

void register_cuda_bindings(py::module_& m) {
  m.def("cuda_devices", &devices,
        "(index, name, major, minor) of each visible CUDA device; empty without a driver.");
  m.def("cuda_runtime_version", &runtime_version, "CUDA runtime version compiled in.");
  for (BindingFn fn : binding_registry()) fn(m);
}

}  // namespace dpfc
