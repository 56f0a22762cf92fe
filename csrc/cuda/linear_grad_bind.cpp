// pybind11 entry point of the clipped linear-layer gradient (linear_grad.cuh).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/errors.hpp"
#include "common/registry.hpp"
#include "cuda/bind_args.hpp"
#include "cuda/linear_grad.cuh"
#include "cuda/runtime.cuh"

namespace py = pybind11;

namespace dpfc::cuda {
namespace {

LinearLoss parse_loss(const std::string& s) {
  if (s == "sigmoid") return LinearLoss::kSigmoid;
  if (s == "softmax") return LinearLoss::kSoftmax;
  throw std::invalid_argument("loss must be 'sigmoid' or 'softmax' (got '" + s + "')");
}

LinearGradEngine parse_engine(const std::string& s) {
  if (s == "auto") return LinearGradEngine::kAuto;
  if (s == "simt32") return LinearGradEngine::kSimt32;
  if (s == "mma") return LinearGradEngine::kMma;
  if (s == "mma884") return LinearGradEngine::kMma884;
  if (s == "simt") return LinearGradEngine::kSimt;
  throw std::invalid_argument("engine must be 'auto', 'simt32', 'mma', 'mma884' or 'simt' (got '" +
                              s + "')");
}

void clipped_linear_grad(std::uintptr_t x, int dtype, int64_t n, int64_t d, int64_t ldx,
                         std::uintptr_t labels, std::uintptr_t w, int64_t ldw, std::uintptr_t bias,
                         int64_t K, double clip_norm, const std::string& loss, double feature_clip,
                         std::uintptr_t grad, std::uintptr_t n_clipped, std::uintptr_t stream,
                         const std::string& engine, int64_t chunk_rows) {
  const RowsView v = make_rows(x, dtype, n, d, ldx);
  const LinearLoss l = parse_loss(loss);
  const LinearGradEngine e = parse_engine(engine);
  DPFC_EXPECTS(chunk_rows >= 1, "chunk_rows must be >= 1");
  DPFC_EXPECTS(labels != 0, "labels: null device pointer");
  DPFC_EXPECTS(w != 0, "w: null device pointer");
  DPFC_EXPECTS(grad != 0 && n_clipped != 0, "out: null device pointer");
  DPFC_EXPECTS(K >= 1, "num_classes must be >= 1");
  py::gil_scoped_release nogil;
  clear_stale_cuda_error();
  launch_clipped_linear_grad(v, as_ptr<const int32_t>(labels), as_ptr<const void>(w), ldw,
                             as_ptr<const double>(bias), K, clip_norm, l, feature_clip,
                             as_ptr<double>(grad), as_ptr<int64_t>(n_clipped), e, chunk_rows,
                             as_stream(stream));
}

void residual_clip(std::uintptr_t z, int dtype, int64_t rows, int64_t K, std::uintptr_t labels,
                   std::uintptr_t norms, std::uintptr_t fscale, std::uintptr_t bias,
                   double clip_norm, const std::string& loss, std::uintptr_t bscale,
                   std::uintptr_t n_clipped, std::uintptr_t stream) {
  const LinearLoss l = parse_loss(loss);
  py::gil_scoped_release nogil;
  clear_stale_cuda_error();
  launch_residual_clip(as_ptr<void>(z), dtype, rows, K, as_ptr<const int32_t>(labels),
                       as_ptr<const double>(norms), as_ptr<const double>(fscale),
                       as_ptr<const double>(fscale), as_ptr<const double>(bias), clip_norm, l,
                       as_ptr<double>(bscale), as_ptr<int64_t>(n_clipped), as_stream(stream));
}

}  // namespace

void register_linear_grad(py::module_& m) {
  m.def("cuda_clipped_linear_grad", &clipped_linear_grad, py::arg("x"), py::arg("dtype"),
        py::arg("n"), py::arg("d"), py::arg("ldx"), py::arg("labels"), py::arg("w"), py::arg("ldw"),
        py::arg("bias"), py::arg("num_classes"), py::arg("clip_norm"), py::arg("loss"),
        py::arg("feature_clip"), py::arg("grad"), py::arg("n_clipped"), py::arg("stream"),
        py::arg("engine"), py::arg("chunk_rows"),
        "grad (K x d float64) = sum_i c_i r_i x_i^T with per-example clip factors c_i; "
        "n_clipped (one int64 on the device) = #{i : c_i < 1}. feature_clip <= 0: none; "
        "bias 0: zero bias. engine: 'auto' | 'simt32' | 'mma' | 'mma884' | 'simt' (outer "
        "product); chunk_rows: rows per chunk of logits.");
  m.def("cuda_residual_clip", &residual_clip, py::arg("z"), py::arg("dtype"), py::arg("rows"),
        py::arg("num_classes"), py::arg("labels"), py::arg("norms"), py::arg("fscale"),
        py::arg("bias"), py::arg("clip_norm"), py::arg("loss"), py::arg("bscale"),
        py::arg("n_clipped"), py::arg("stream"),
        "Row epilogue of the clipped gradient on logits z = X W^T formed by the caller: z <- "
        "r_i / ||r_i||, bscale[i] = s_i c_i ||r_i||, *n_clipped += #{c_i < 1} (fscale, bias: 0 "
        "for none).");
}

}  // namespace dpfc::cuda

DPFC_REGISTER_BINDINGS(dpfc::cuda::register_linear_grad);
