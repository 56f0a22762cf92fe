// Python entry points of the batched Cholesky kernels (see cholesky.cuh). Device
// pointers and the stream arrive as integers (CuPy's .data.ptr and stream .ptr);
// python/dpfc_native/_gpu_linalg.py validates shapes and makes the arrays contiguous.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "common/errors.hpp"
#include "common/registry.hpp"
#include "cuda/cholesky.cuh"

namespace py = pybind11;

namespace dpfc {
namespace {

bool is_f64(const std::string& dtype) {
  DPFC_EXPECTS(dtype == "float32" || dtype == "float64", "dtype must be 'float32' or 'float64'");
  return dtype == "float64";
}

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void cholesky_cuda(std::uintptr_t a, int64_t a_batch_stride, int64_t lda, std::uintptr_t shifts,
                   std::uintptr_t l, std::uintptr_t info, int64_t batch, int64_t d,
                   const std::string& dtype, std::uintptr_t stream, std::uintptr_t workspace,
                   int64_t workspace_bytes) {
  const bool f64 = is_f64(dtype);
  DPFC_EXPECTS(a != 0 && l != 0 && info != 0, "a, l and info must be device pointers");
  DPFC_EXPECTS(batch >= 1, "batch must be >= 1");
  DPFC_EXPECTS(d >= 1, "d must be >= 1");
  DPFC_EXPECTS(lda >= d, "lda must be >= d");
  DPFC_EXPECTS(a_batch_stride == 0 || a_batch_stride >= lda * (d - 1) + d,
               "a_batch_stride must be 0 (broadcast) or cover one matrix");
  DPFC_EXPECTS(workspace_bytes >= 0, "workspace_bytes must be >= 0");
  DPFC_EXPECTS(workspace != 0 || workspace_bytes == 0, "workspace_bytes given without workspace");
  void* ws = reinterpret_cast<void*>(workspace);
  const size_t ws_bytes = static_cast<size_t>(workspace_bytes);
  py::gil_scoped_release nogil;
  if (f64) {
    cuda::cholesky_batched<double>(reinterpret_cast<const double*>(a), a_batch_stride, lda,
                                   reinterpret_cast<const double*>(shifts),
                                   reinterpret_cast<double*>(l), reinterpret_cast<int32_t*>(info),
                                   batch, d, ws, ws_bytes, as_stream(stream));
  } else {
    cuda::cholesky_batched<float>(reinterpret_cast<const float*>(a), a_batch_stride, lda,
                                  reinterpret_cast<const float*>(shifts),
                                  reinterpret_cast<float*>(l), reinterpret_cast<int32_t*>(info),
                                  batch, d, ws, ws_bytes, as_stream(stream));
  }
}

void cho_solve_cuda(std::uintptr_t l, int64_t l_batch_stride, std::uintptr_t b,
                    int64_t b_batch_stride, int64_t ldb, std::uintptr_t x, int64_t batch, int64_t d,
                    int64_t m, const std::string& dtype, std::uintptr_t stream) {
  const bool f64 = is_f64(dtype);
  DPFC_EXPECTS(l != 0 && b != 0 && x != 0, "l, b and x must be device pointers");
  DPFC_EXPECTS(batch >= 1 && d >= 1 && m >= 1, "batch, d and m must be >= 1");
  DPFC_EXPECTS(ldb >= m, "ldb must be >= m");
  DPFC_EXPECTS(l_batch_stride == 0 || l_batch_stride >= d * d,
               "l_batch_stride must be 0 (broadcast) or >= d * d");
  DPFC_EXPECTS(b_batch_stride == 0 || b_batch_stride >= ldb * (d - 1) + m,
               "b_batch_stride must be 0 (broadcast) or cover one right-hand side block");
  DPFC_EXPECTS(x != b, "x must not alias b");
  py::gil_scoped_release nogil;
  if (f64) {
    cuda::cho_solve_batched<double>(reinterpret_cast<const double*>(l), l_batch_stride,
                                    reinterpret_cast<const double*>(b), b_batch_stride, ldb,
                                    reinterpret_cast<double*>(x), batch, d, m, as_stream(stream));
  } else {
    cuda::cho_solve_batched<float>(reinterpret_cast<const float*>(l), l_batch_stride,
                                   reinterpret_cast<const float*>(b), b_batch_stride, ldb,
                                   reinterpret_cast<float*>(x), batch, d, m, as_stream(stream));
  }
}

int64_t cholesky_workspace(int64_t batch, int64_t d, const std::string& dtype) {
  const bool f64 = is_f64(dtype);
  return static_cast<int64_t>(cuda::cholesky_workspace_bytes(batch, d, f64 ? 8 : 4));
}

std::string cholesky_plan(int64_t batch, int64_t d, const std::string& dtype) {
  const bool f64 = is_f64(dtype);
  DPFC_EXPECTS(batch >= 1 && d >= 1, "batch and d must be >= 1");
  return cuda::cholesky_plan(batch, d, f64 ? 8 : 4);
}

void register_cholesky(py::module_& m) {
  m.def("cholesky_cuda", &cholesky_cuda, py::arg("a"), py::arg("a_batch_stride"), py::arg("lda"),
        py::arg("shifts"), py::arg("l"), py::arg("info"), py::arg("batch"), py::arg("d"),
        py::arg("dtype"), py::arg("stream"), py::arg("workspace") = 0,
        py::arg("workspace_bytes") = 0,
        "Batched Cholesky of a[b] + shifts[b] I (lower triangle read; shifts may be 0 = "
        "none) into contiguous l (batch, d, d) and int32 info (batch,). Asynchronous on "
        "`stream`; a failed matrix's l is all NaN. workspace: 0 (allocated stream-ordered "
        "inside) or a device buffer of workspace_bytes (cholesky_workspace_cuda).");
  m.def("cholesky_workspace_cuda", &cholesky_workspace, py::arg("batch"), py::arg("d"),
        py::arg("dtype"),
        "Work-space bytes cholesky_cuda wants for these extents (0 for d <= 128).");
  m.def("cho_solve_cuda", &cho_solve_cuda, py::arg("l"), py::arg("l_batch_stride"), py::arg("b"),
        py::arg("b_batch_stride"), py::arg("ldb"), py::arg("x"), py::arg("batch"), py::arg("d"),
        py::arg("m"), py::arg("dtype"), py::arg("stream"),
        "Solve L L^T x = b for a batch (batch strides 0 broadcast); x contiguous (batch, d, m).");
  m.def("cholesky_plan_cuda", &cholesky_plan, py::arg("batch"), py::arg("d"), py::arg("dtype"),
        "The kernels cholesky_cuda would use for these extents (reads DPFC_CHOL_* variables).");
}

}  // namespace
}  // namespace dpfc

DPFC_REGISTER_BINDINGS(dpfc::register_cholesky);
