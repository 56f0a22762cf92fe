// Python entry points of the batched Cholesky kernels (see cholesky.cuh). Device
// pointers and the stream arrive as integers (CuPy's .data.ptr and stream .ptr), the dtype as
// a runtime.cuh DType code (float32 or float64); python/dpfc_native/_gpu_linalg.py validates
// shapes and makes the arrays contiguous.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "common/errors.hpp"
#include "common/registry.hpp"
#include "cuda/bind_args.hpp"
#include "cuda/cholesky.cuh"
#include "cuda/runtime.cuh"

namespace py = pybind11;

namespace dpfc::cuda {
namespace {

bool is_f64(int dtype) {
  DPFC_EXPECTS(dtype == kFloat32 || dtype == kFloat64, "dtype must be 0 (float32) or 1 (float64)");
  return dtype == kFloat64;
}

CholeskyOptions make_options(const std::string& kernel, const std::string& schedule,
                             int small_max) {
  CholeskyOptions o;
  DPFC_EXPECTS(kernel == "mma" || kernel == "simt",
               "kernel must be 'mma' or 'simt', got '" + kernel + "'");
  o.mma = kernel == "mma";
  DPFC_EXPECTS(schedule == "auto" || schedule == "left" || schedule == "right",
               "schedule must be 'auto', 'left' or 'right', got '" + schedule + "'");
  o.schedule = schedule == "left"    ? CholeskySchedule::kLeft
               : schedule == "right" ? CholeskySchedule::kRight
                                     : CholeskySchedule::kAuto;
  DPFC_EXPECTS(small_max >= 0 && small_max <= 128, "small_max must be an integer in [0, 128]");
  o.small_max = small_max;
  return o;
}

void cholesky(std::uintptr_t a, int64_t a_batch_stride, int64_t lda, std::uintptr_t shifts,
              std::uintptr_t l, std::uintptr_t info, int64_t batch, int64_t d, int dtype,
              std::uintptr_t stream, std::uintptr_t workspace, int64_t workspace_bytes,
              const std::string& kernel, const std::string& schedule, int small_max) {
  const bool f64 = is_f64(dtype);
  const CholeskyOptions o = make_options(kernel, schedule, small_max);
  DPFC_EXPECTS(a != 0 && l != 0 && info != 0, "a, l and info must be device pointers");
  DPFC_EXPECTS(batch >= 1, "batch must be >= 1");
  DPFC_EXPECTS(d >= 1, "d must be >= 1");
  DPFC_EXPECTS(lda >= d, "lda must be >= d");
  DPFC_EXPECTS(a_batch_stride == 0 || a_batch_stride >= lda * (d - 1) + d,
               "a_batch_stride must be 0 (broadcast) or cover one matrix");
  DPFC_EXPECTS(workspace_bytes >= 0, "workspace_bytes must be >= 0");
  DPFC_EXPECTS(workspace != 0 || workspace_bytes == 0, "workspace_bytes given without workspace");
  void* ws = as_ptr<void>(workspace);
  const size_t ws_bytes = static_cast<size_t>(workspace_bytes);
  py::gil_scoped_release nogil;
  clear_stale_cuda_error();
  if (f64) {
    cholesky_batched<double>(as_ptr<const double>(a), a_batch_stride, lda,
                             as_ptr<const double>(shifts), as_ptr<double>(l), as_ptr<int32_t>(info),
                             batch, d, ws, ws_bytes, o, as_stream(stream));
  } else {
    cholesky_batched<float>(as_ptr<const float>(a), a_batch_stride, lda,
                            as_ptr<const float>(shifts), as_ptr<float>(l), as_ptr<int32_t>(info),
                            batch, d, ws, ws_bytes, o, as_stream(stream));
  }
}

void cho_solve(std::uintptr_t l, int64_t l_batch_stride, std::uintptr_t b, int64_t b_batch_stride,
               int64_t ldb, std::uintptr_t x, int64_t batch, int64_t d, int64_t m, int dtype,
               std::uintptr_t stream) {
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
  clear_stale_cuda_error();
  if (f64) {
    cho_solve_batched<double>(as_ptr<const double>(l), l_batch_stride, as_ptr<const double>(b),
                              b_batch_stride, ldb, as_ptr<double>(x), batch, d, m,
                              as_stream(stream));
  } else {
    cho_solve_batched<float>(as_ptr<const float>(l), l_batch_stride, as_ptr<const float>(b),
                             b_batch_stride, ldb, as_ptr<float>(x), batch, d, m, as_stream(stream));
  }
}

int64_t workspace_bytes(int64_t batch, int64_t d, int dtype, int small_max) {
  const bool f64 = is_f64(dtype);
  const CholeskyOptions o = make_options("mma", "auto", small_max);
  return static_cast<int64_t>(cuda::cholesky_workspace_bytes(batch, d, f64 ? 8 : 4, o));
}

std::string plan(int64_t batch, int64_t d, int dtype, const std::string& kernel,
                 const std::string& schedule, int small_max) {
  const bool f64 = is_f64(dtype);
  const CholeskyOptions o = make_options(kernel, schedule, small_max);
  DPFC_EXPECTS(batch >= 1 && d >= 1, "batch and d must be >= 1");
  return cuda::cholesky_plan(batch, d, f64 ? 8 : 4, o);
}

}  // namespace

void register_cholesky(py::module_& m) {
  m.def("cuda_cholesky", &cholesky, py::arg("a"), py::arg("a_batch_stride"), py::arg("lda"),
        py::arg("shifts"), py::arg("l"), py::arg("info"), py::arg("batch"), py::arg("d"),
        py::arg("dtype"), py::arg("stream"), py::arg("workspace") = 0,
        py::arg("workspace_bytes") = 0, py::arg("kernel") = "mma", py::arg("schedule") = "auto",
        py::arg("small_max") = 128,
        "Batched Cholesky of a[b] + shifts[b] I (lower triangle read; shifts may be 0 = "
        "none) into contiguous l (batch, d, d) and int32 info (batch,). Asynchronous on "
        "`stream`; a failed matrix's l is all NaN. workspace: 0 (allocated stream-ordered "
        "inside) or a device buffer of workspace_bytes (cuda_cholesky_workspace_bytes). "
        "kernel: float64 update GEMM 'mma' | 'simt'; schedule: 'auto' | 'left' | 'right'; "
        "small_max: largest d for the one-block kernel (0..128).");
  m.def("cuda_cholesky_workspace_bytes", &workspace_bytes, py::arg("batch"), py::arg("d"),
        py::arg("dtype"), py::arg("small_max") = 128,
        "Work-space bytes cuda_cholesky wants for these extents (0 for d <= small_max).");
  m.def("cuda_cho_solve", &cho_solve, py::arg("l"), py::arg("l_batch_stride"), py::arg("b"),
        py::arg("b_batch_stride"), py::arg("ldb"), py::arg("x"), py::arg("batch"), py::arg("d"),
        py::arg("m"), py::arg("dtype"), py::arg("stream"),
        "Solve L L^T x = b for a batch (batch strides 0 broadcast); x contiguous (batch, d, m).");
  m.def("cuda_cholesky_plan", &plan, py::arg("batch"), py::arg("d"), py::arg("dtype"),
        py::arg("kernel") = "mma", py::arg("schedule") = "auto", py::arg("small_max") = 128,
        "The kernels cuda_cholesky would use for these extents and options.");
}

}  // namespace dpfc::cuda

DPFC_REGISTER_BINDINGS(dpfc::cuda::register_cholesky);
