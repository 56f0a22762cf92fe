// pybind11 entry points of the GPU Gaussian noise (noise.cuh).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "common/bind_args.hpp"
#include "common/errors.hpp"
#include "common/philox.hpp"
#include "common/registry.hpp"
#include "cuda/bind_args.hpp"
#include "cuda/noise.cuh"
#include "cuda/runtime.cuh"

namespace py = pybind11;

namespace dpfc::cuda {
namespace {

void sym_noise(std::uintptr_t out, int dtype, int64_t batch, int64_t d, double std,
               std::array<uint32_t, 4> key_words, uint64_t block0, std::uintptr_t stream) {
  DPFC_EXPECTS(out != 0, "out: null device pointer");
  const NoiseKey key = key_from_words(key_words);
  py::gil_scoped_release nogil;
  clear_stale_cuda_error();
  launch_sym_gaussian_noise(as_ptr<void>(out), dtype, batch, d, std, key, block0,
                            as_stream(stream));
}

void gauss_noise(std::uintptr_t out, int dtype, int64_t count, double std,
                 std::array<uint32_t, 4> key_words, uint64_t block0, std::uintptr_t stream) {
  DPFC_EXPECTS(out != 0, "out: null device pointer");
  const NoiseKey key = key_from_words(key_words);
  py::gil_scoped_release nogil;
  clear_stale_cuda_error();
  launch_gaussian_noise(as_ptr<void>(out), dtype, count, std, key, block0, as_stream(stream));
}

}  // namespace

void register_noise(py::module_& m) {
  m.def("cuda_sym_gaussian_noise", &sym_noise, py::arg("out"), py::arg("dtype"), py::arg("batch"),
        py::arg("d"), py::arg("std"), py::arg("key_words"), py::arg("block0"), py::arg("stream"),
        "Fill out (batch, d, d; dtype 0 float32 / 1 float64) with symmetric Gaussian noise, "
        "bit-identical to cpu_sym_gaussian_noise.");
  m.def("cuda_gaussian_noise", &gauss_noise, py::arg("out"), py::arg("dtype"), py::arg("count"),
        py::arg("std"), py::arg("key_words"), py::arg("block0"), py::arg("stream"),
        "Fill count contiguous values with N(0, std^2), bit-identical to cpu_gaussian_noise.");
}

}  // namespace dpfc::cuda

DPFC_REGISTER_BINDINGS(dpfc::cuda::register_noise);
