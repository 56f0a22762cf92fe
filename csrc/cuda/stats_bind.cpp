// pybind11 entry points of the row operations (rows.cuh) and the clipped-statistics family
// (stats.cuh), and the workspace probe (runtime.cuh). Pointers and streams
// arrive as integers (CuPy's .data.ptr and cupy.cuda.get_current_stream().ptr); extents and
// strides in elements. The GIL is released around the (asynchronous) launches.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/errors.hpp"
#include "common/registry.hpp"
#include "cuda/bind_args.hpp"
#include "cuda/rows.cuh"
#include "cuda/runtime.cuh"
#include "cuda/stats.cuh"

namespace py = pybind11;

namespace dpfc::cuda {
namespace {

GramAccum parse_accum(const std::string& s) {
  if (s == "float64") return GramAccum::kFloat64;
  if (s == "float32") return GramAccum::kFloat32;
  if (s == "tf32") return GramAccum::kTF32;
  if (s == "bf16") return GramAccum::kBF16;
  throw std::invalid_argument("accumulate must be 'float64', 'float32', 'tf32' or 'bf16' (got '" +
                              s + "')");
}

GramKernel parse_kernel(const std::string& s) {
  if (s.empty() || s == "auto") return GramKernel::kAuto;
  if (s == "mma") return GramKernel::kMma;
  if (s == "simt") return GramKernel::kSimt;
  if (s == "mma884") return GramKernel::kMma884;
  throw std::invalid_argument("kernel must be 'auto', 'mma', 'mma884' or 'simt' (got '" + s + "')");
}

void check_out(std::uintptr_t p, const char* name) {
  DPFC_EXPECTS(p != 0, std::string(name) + ": null device pointer");
}

void clip_rows(std::uintptr_t x, int dtype, int64_t n, int64_t d, int64_t ldx, double clip_norm,
               std::uintptr_t out, int64_t ldo, std::uintptr_t scale, std::uintptr_t stream) {
  const RowsView v = make_rows(x, dtype, n, d, ldx);
  check_out(out, "out");
  check_out(scale, "scale");
  py::gil_scoped_release nogil;
  clear_stale_cuda_error();
  launch_clip_rows(v, clip_norm, as_ptr<void>(out), ldo, as_ptr<double>(scale), as_stream(stream));
}

void scale_rows(std::uintptr_t x, int dtype, int64_t n, int64_t d, int64_t ldx,
                std::uintptr_t scales, std::uintptr_t out, int64_t ldo, std::uintptr_t stream) {
  const RowsView v = make_rows(x, dtype, n, d, ldx);
  check_out(scales, "scales");
  check_out(out, "out");
  py::gil_scoped_release nogil;
  clear_stale_cuda_error();
  launch_scale_rows(v, as_ptr<double>(scales), as_ptr<void>(out), ldo, as_stream(stream));
}

void row_norms(std::uintptr_t x, int dtype, int64_t n, int64_t d, int64_t ldx, double clip_norm,
               std::uintptr_t norms, std::uintptr_t scales, std::uintptr_t stream) {
  const RowsView v = make_rows(x, dtype, n, d, ldx);
  DPFC_EXPECTS(norms != 0 || scales != 0, "norms/scales: at least one output");
  py::gil_scoped_release nogil;
  clear_stale_cuda_error();
  launch_row_norms(v, clip_norm, as_ptr<double>(norms), as_ptr<double>(scales), as_stream(stream));
}

void clipped_gram(std::uintptr_t x, int dtype, int64_t n, int64_t d, int64_t ldx, double clip_norm,
                  const std::string& accumulate, std::uintptr_t G, std::uintptr_t stream,
                  const std::string& kernel) {
  const RowsView v = make_rows(x, dtype, n, d, ldx);
  const GramAccum acc = parse_accum(accumulate);
  const GramKernel k = parse_kernel(kernel);
  check_out(G, "out");
  py::gil_scoped_release nogil;
  clear_stale_cuda_error();
  launch_clipped_gram(v, clip_norm, acc, as_ptr<double>(G), as_stream(stream), k);
}

void clipped_class_sums(std::uintptr_t x, int dtype, int64_t n, int64_t d, int64_t ldx,
                        std::uintptr_t labels, int64_t K, double clip_norm, std::uintptr_t B,
                        std::uintptr_t counts, std::uintptr_t stream) {
  const RowsView v = make_rows(x, dtype, n, d, ldx);
  check_out(labels, "labels");
  check_out(B, "out");
  DPFC_EXPECTS(K >= 1, "num_classes must be >= 1");
  py::gil_scoped_release nogil;
  clear_stale_cuda_error();
  launch_clipped_class_sums(v, as_ptr<const int32_t>(labels), K, clip_norm, as_ptr<double>(B),
                            as_ptr<int64_t>(counts), as_stream(stream));
}

void clipped_stats(std::uintptr_t x, int dtype, int64_t n, int64_t d, int64_t ldx,
                   std::uintptr_t labels, int64_t K, double clip_norm,
                   const std::string& accumulate, std::uintptr_t G, std::uintptr_t B,
                   std::uintptr_t counts, std::uintptr_t stream, const std::string& kernel) {
  const RowsView v = make_rows(x, dtype, n, d, ldx);
  const GramAccum acc = parse_accum(accumulate);
  const GramKernel k = parse_kernel(kernel);
  check_out(labels, "labels");
  check_out(G, "out G");
  check_out(B, "out B");
  check_out(counts, "out counts");
  DPFC_EXPECTS(K >= 1, "num_classes must be >= 1");
  py::gil_scoped_release nogil;
  clear_stale_cuda_error();
  launch_clipped_stats(v, as_ptr<const int32_t>(labels), K, clip_norm, acc, as_ptr<double>(G),
                       as_ptr<double>(B), as_ptr<int64_t>(counts), as_stream(stream), k);
}

void clipped_class_grams(std::uintptr_t x, int dtype, int64_t n, int64_t d, int64_t ldx,
                         std::uintptr_t labels, int64_t K, double clip_norm, std::uintptr_t A,
                         std::uintptr_t stream, const std::string& kernel) {
  const RowsView v = make_rows(x, dtype, n, d, ldx);
  const GramKernel k = parse_kernel(kernel);
  check_out(labels, "labels");
  check_out(A, "out");
  DPFC_EXPECTS(K >= 1, "num_classes must be >= 1");
  py::gil_scoped_release nogil;
  clear_stale_cuda_error();
  launch_clipped_class_grams(v, as_ptr<const int32_t>(labels), K, clip_norm, as_ptr<double>(A),
                             as_stream(stream), k);
}

void clipped_weighted_grams(std::uintptr_t x, int dtype, int64_t n, int64_t d, int64_t ldx,
                            std::uintptr_t w, int64_t ldw, int64_t K, double clip_norm,
                            std::uintptr_t H, std::uintptr_t stream, const std::string& kernel) {
  const RowsView v = make_rows(x, dtype, n, d, ldx);
  const GramKernel k = parse_kernel(kernel);
  check_out(w, "weights");
  check_out(H, "out");
  DPFC_EXPECTS(K >= 1 && ldw >= K, "weights: need num_classes >= 1 and row stride >= num_classes");
  py::gil_scoped_release nogil;
  clear_stale_cuda_error();
  launch_clipped_weighted_grams(v, as_ptr<const double>(w), ldw, K, clip_norm, as_ptr<double>(H),
                                as_stream(stream), k);
}

// Testing aid: allocates `bytes` from the workspace pool on `stream` and frees it. Asking for
// more than the device has raises dpfc_native._core.CudaError (not an abort).
void workspace_probe(std::uint64_t bytes, std::uintptr_t stream) {
  py::gil_scoped_release nogil;
  clear_stale_cuda_error();
  DeviceBuffer buf(static_cast<std::size_t>(bytes), as_stream(stream));
}

}  // namespace

void register_stats(py::module_& m) {
  m.def("cuda_clip_rows", &clip_rows, py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"),
        py::arg("ldx"), py::arg("clip_norm"), py::arg("out"), py::arg("ldo"), py::arg("scale"),
        py::arg("stream"),
        "out[i] = clip_scale(||x_i||, C) x_i (x's dtype, float32/float64); scale[i] float64.");
  m.def("cuda_scale_rows", &scale_rows, py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"),
        py::arg("ldx"), py::arg("scales"), py::arg("out"), py::arg("ldo"), py::arg("stream"),
        "out[i] = scales[i] x_i (float64 scales, product in double, x's dtype: float32/float64).");
  m.def("cuda_row_norms", &row_norms, py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"),
        py::arg("ldx"), py::arg("clip_norm"), py::arg("norms"), py::arg("scales"),
        py::arg("stream"), "Float64 row norms and clip scales (either output pointer may be 0).");
  m.def("cuda_clipped_gram", &clipped_gram, py::arg("x"), py::arg("dtype"), py::arg("n"),
        py::arg("d"), py::arg("ldx"), py::arg("clip_norm"), py::arg("accumulate"), py::arg("out"),
        py::arg("stream"), py::arg("kernel") = "auto",
        "G (d x d float64) = sum_i xbar_i xbar_i^T; accumulate 'float64' | 'float32' | 'tf32' | "
        "'bf16'.");
  m.def("cuda_clipped_class_sums", &clipped_class_sums, py::arg("x"), py::arg("dtype"),
        py::arg("n"), py::arg("d"), py::arg("ldx"), py::arg("labels"), py::arg("num_classes"),
        py::arg("clip_norm"), py::arg("out"), py::arg("counts"), py::arg("stream"),
        "B (K x d float64) = per-class sums of clipped rows; counts (int64, may be 0).");
  m.def("cuda_clipped_stats", &clipped_stats, py::arg("x"), py::arg("dtype"), py::arg("n"),
        py::arg("d"), py::arg("ldx"), py::arg("labels"), py::arg("num_classes"),
        py::arg("clip_norm"), py::arg("accumulate"), py::arg("out_gram"), py::arg("out_sums"),
        py::arg("out_counts"), py::arg("stream"), py::arg("kernel") = "auto",
        "Gram, class sums and class counts in one pass over x.");
  m.def("cuda_clipped_class_grams", &clipped_class_grams, py::arg("x"), py::arg("dtype"),
        py::arg("n"), py::arg("d"), py::arg("ldx"), py::arg("labels"), py::arg("num_classes"),
        py::arg("clip_norm"), py::arg("out"), py::arg("stream"), py::arg("kernel") = "auto",
        "A (K x d x d float64): per-class Gram matrices of clipped rows.");
  m.def("cuda_clipped_weighted_grams", &clipped_weighted_grams, py::arg("x"), py::arg("dtype"),
        py::arg("n"), py::arg("d"), py::arg("ldx"), py::arg("weights"), py::arg("ldw"),
        py::arg("num_classes"), py::arg("clip_norm"), py::arg("out"), py::arg("stream"),
        py::arg("kernel") = "auto",
        "H (K x d x d float64): H_l = sum_i weights[i, l] xbar_i xbar_i^T (float64 weights).");
  m.def("cuda_workspace_probe", &workspace_probe, py::arg("bytes"), py::arg("stream"),
        "Testing aid: allocate and free device workspace (raises CudaError when it cannot).");
}

}  // namespace dpfc::cuda

DPFC_REGISTER_BINDINGS(dpfc::cuda::register_stats);
