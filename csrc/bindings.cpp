// The private compiled module dpfc_native._core: CPU entry points, build facts, and (when
// compiled with CUDA) the GPU launchers registered by bindings_cuda.cpp.
//
// Binding naming scheme (every function of _core; python/dpfc_native/_core.pyi types them):
//   cpu_<op>   runs on the host, on NumPy arrays (cpu_gaussian_noise, cpu_sym_gaussian_noise,
//              cpu_grid_accumulate, cpu_mirror_upper, cpu_syrk_upper,
//              cpu_preprocess_rows, cpu_clip_rows).
//   cuda_<op>  a CUDA entry point: device pointers, extents and strides (in elements), a dtype
//              code (csrc/cuda/runtime.cuh DType: 0 float32, 1 float64, 2 float16,
//              3 bfloat16) and a stream, all as Python ints. It enqueues work on the stream
//              and never synchronises. cuda_devices and cuda_runtime_version are the
//              CUDA build facts.
//   <op>       backend-neutral helpers (philox4x32_10, eval_transform).
// <op> is the operation's name in dpfc_native.ops where ops has one (clip_rows, clipped_gram,
// gaussian_noise, cholesky, cho_solve, ...). Kernel choices (engine, schedule, chunk size) are
// arguments; nothing in csrc/ reads the environment (dpfc_native._config does, once).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <string>

#include "common/bind_args.hpp"
#include "common/clip.hpp"
#include "common/errors.hpp"
#include "common/philox.hpp"
#include "cpu/grid_cpu.hpp"
#include "cpu/noise_cpu.hpp"
#include "cpu/preprocess_cpu.hpp"
#include "cpu/syrk_cpu.hpp"

namespace py = pybind11;

#ifndef DPFC_VERSION
#define DPFC_VERSION "0.0.0"
#endif

namespace dpfc {

// Whether a's dtype is T's (equivalent descriptors: an array's descriptor need not be the
// very object py::dtype::of<T>() returns, e.g. after unpickling).
template <class T>
bool has_dtype(const py::array& a) {
  return py::detail::npy_api::get().PyArray_EquivTypes_(a.dtype().ptr(), py::dtype::of<T>().ptr());
}
#ifdef DPFC_WITH_CUDA
void register_cuda_bindings(py::module_& m);  // bindings_cuda.cpp
#endif

namespace {

// A C-contiguous, writeable array of float32 or float64: returns true for float64.
bool check_float_out(const py::array& out, const char* name) {
  DPFC_EXPECTS(out.writeable(), std::string(name) + " must be writeable");
  DPFC_EXPECTS(out.flags() & py::array::c_style, std::string(name) + " must be C-contiguous");
  const bool f64 = has_dtype<double>(out);
  const bool f32 = has_dtype<float>(out);
  DPFC_EXPECTS(f64 || f32, std::string(name) + " must be float32 or float64");
  return f64;
}

void sym_noise_cpu(py::array out, double std, std::array<uint32_t, 4> key, uint64_t block0) {
  const bool f64 = check_float_out(out, "out");
  DPFC_EXPECTS(out.ndim() == 3 && out.shape(1) == out.shape(2),
               "out must have shape (batch, d, d)");
  DPFC_EXPECTS(std >= 0.0, "std must be non-negative");
  const int64_t batch = out.shape(0), d = out.shape(1);
  const NoiseKey k = key_from_words(key);
  void* data = out.mutable_data();
  py::gil_scoped_release nogil;
  if (f64) {
    cpu::sym_gaussian_noise(static_cast<double*>(data), batch, d, std, k, block0);
  } else {
    cpu::sym_gaussian_noise(static_cast<float*>(data), batch, d, std, k, block0);
  }
}

void gaussian_noise_cpu(py::array out, double std, std::array<uint32_t, 4> key, uint64_t block0) {
  const bool f64 = check_float_out(out, "out");
  DPFC_EXPECTS(std >= 0.0, "std must be non-negative");
  const int64_t count = out.size();
  const NoiseKey k = key_from_words(key);
  void* data = out.mutable_data();
  py::gil_scoped_release nogil;
  if (f64) {
    cpu::gaussian_noise(static_cast<double*>(data), count, std, k, block0);
  } else {
    cpu::gaussian_noise(static_cast<float*>(data), count, std, k, block0);
  }
}

// (hi, lo) += q exactly (lo kept in [0, 2^32)) for q = nearbyint(v * scale), over all of v or
// (tri_d = d) the lower triangles of its d x d matrices; 0 on success, 1 when v * scale has
// NaN/Inf, 2 when some |q| > limit (then nothing is added).
// The accumulators are updated in place: never a converted copy.
// Checks the rows x (C-ordered float32 or float64, 2-D), their float64 output (C-ordered,
// writeable, x's shape; may be x) and the clip bound; returns whether x is float64.
bool check_rows_in_out(const py::array& x, const py::array& out, double clip) {
  const bool f64 = has_dtype<double>(x);
  DPFC_EXPECTS(f64 || has_dtype<float>(x), "x must be float32 or float64");
  DPFC_EXPECTS(x.flags() & py::array::c_style, "x must be C-contiguous");
  DPFC_EXPECTS(x.ndim() == 2, "x must be 2-D (m, d)");
  DPFC_EXPECTS(has_dtype<double>(out), "out must be float64");
  DPFC_EXPECTS(out.writeable(), "out must be writeable");
  DPFC_EXPECTS(out.flags() & py::array::c_style, "out must be C-contiguous");
  DPFC_EXPECTS(out.ndim() == 2 && out.shape(0) == x.shape(0) && out.shape(1) == x.shape(1),
               "out must have the shape of x");
  DPFC_EXPECTS(clip > 0.0 && std::isfinite(clip), "clip must be finite and > 0");
  return f64;
}

void check_int64_out(const py::array& a, const char* name) {
  DPFC_EXPECTS(has_dtype<int64_t>(a), std::string(name) + " must be int64");
  DPFC_EXPECTS(a.writeable(), std::string(name) + " must be writeable");
  DPFC_EXPECTS(a.flags() & py::array::c_style, std::string(name) + " must be C-contiguous");
}

int grid_accumulate_cpu(const py::array& v, double scale, double limit, py::array hi, py::array lo,
                        int64_t tri_d) {
  DPFC_EXPECTS(has_dtype<double>(v), "v must be float64");
  DPFC_EXPECTS(v.flags() & py::array::c_style, "v must be C-contiguous");
  check_int64_out(hi, "hi");
  check_int64_out(lo, "lo");
  DPFC_EXPECTS(hi.size() == v.size() && lo.size() == v.size(),
               "v, hi and lo must have the same number of elements");
  DPFC_EXPECTS(limit > 0.0 && limit <= 4611686018427387904.0, "limit must be in (0, 2^62]");
  DPFC_EXPECTS(tri_d >= 0, "tri_d must be >= 0");
  // tri_d <= size / tri_d first: tri_d * tri_d must not overflow (2^32 wrapped to 0).
  DPFC_EXPECTS(tri_d == 0 || (tri_d <= v.size() / tri_d && v.size() % (tri_d * tri_d) == 0),
               "with tri_d = d > 0, v must hold whole d x d matrices");
  const auto* pv = static_cast<const double*>(v.data());
  auto* ph = static_cast<int64_t*>(hi.mutable_data());
  auto* pl = static_cast<int64_t*>(lo.mutable_data());
  const int64_t n = v.size();
  py::gil_scoped_release nogil;
  return static_cast<int>(cpu::grid_accumulate(pv, n, tri_d, scale, limit, ph, pl));
}

// In place: the upper triangle of a Fortran-ordered (d, d) float64 matrix copied to its lower.
void mirror_upper_cpu(py::array a) {
  DPFC_EXPECTS(has_dtype<double>(a), "a must be float64");
  DPFC_EXPECTS(a.writeable(), "a must be writeable");
  DPFC_EXPECTS(a.ndim() == 2 && a.shape(0) == a.shape(1), "a must be square (d, d)");
  DPFC_EXPECTS(a.flags() & py::array::f_style, "a must be Fortran-contiguous");
  auto* p = static_cast<double*>(a.mutable_data());
  const int64_t d = a.shape(0);
  py::gil_scoped_release nogil;
  cpu::mirror_upper(p, d);
}

// c (F-ordered (d, d), upper triangle) = alpha a a^T + beta c through the BLAS ?syrk in the
// capsule `fn` (from scipy.linalg.cython_blas.__pyx_capi__; its signature string is checked
// by the caller), for a F-ordered (d, m) of c's dtype, without the GIL.
void syrk_upper_cpu(const py::capsule& fn, const py::array& a, py::array c, double alpha,
                    double beta) {
  const bool f64 = has_dtype<double>(c);
  DPFC_EXPECTS(f64 || has_dtype<float>(c), "c must be float32 or float64");
  DPFC_EXPECTS(f64 ? has_dtype<double>(a) : has_dtype<float>(a),
               "a and c must have the same dtype");
  DPFC_EXPECTS(c.writeable(), "c must be writeable");
  DPFC_EXPECTS(
      a.ndim() == 2 && c.ndim() == 2 && c.shape(0) == c.shape(1) && a.shape(0) == c.shape(0),
      "a must be (d, m) and c (d, d)");
  DPFC_EXPECTS((a.flags() & py::array::f_style) && (c.flags() & py::array::f_style),
               "a and c must be Fortran-contiguous");
  const int64_t d = c.shape(0);
  const int64_t m = a.shape(1);
  DPFC_EXPECTS(d < (int64_t{1} << 31) && m < (int64_t{1} << 31), "sizes must fit in int32");
  // The capsule's name is its C signature (Cython's __pyx_capi__, with SciPy's typedefs
  // for the float types): only ?syrk of c's type, as _cpu_stats._syrk_capsule expects.
  const std::string t = std::string("__pyx_t_5scipy_6linalg_11cython_blas_") + (f64 ? "d" : "s");
  const std::string want = "void (char *, char *, int *, int *, " + t + " *, " + t + " *, int *, " +
                           t + " *, " + t + " *, int *)";
  const char* name = PyCapsule_GetName(fn.ptr());
  if (name == nullptr && PyErr_Occurred()) throw py::error_already_set();
  DPFC_EXPECTS(name != nullptr && want == name,
               "fn must be the ?syrk capsule of c's type (signature " + want + ")");
  void* ptr = PyCapsule_GetPointer(fn.ptr(), name);
  if (ptr == nullptr) throw py::error_already_set();
  const void* pa = a.data();
  void* pc = c.mutable_data();
  py::gil_scoped_release nogil;
  if (f64) {
    cpu::syrk_upper(reinterpret_cast<cpu::SyrkFn<double>>(ptr), d, m, alpha,
                    static_cast<const double*>(pa), beta, static_cast<double*>(pc));
  } else {
    cpu::syrk_upper(reinterpret_cast<cpu::SyrkFn<float>>(ptr), d, m, static_cast<float>(alpha),
                    static_cast<const float*>(pa), static_cast<float>(beta),
                    static_cast<float*>(pc));
  }
}

// The estimators' fused preprocessing (centre, normalise, clip) of the C-ordered rows x
// (float32 or float64) into the C-ordered float64 out of the same shape (out may be x);
// center is None or float64 (d,). Returns the first row that is not finite after
// centring, or -1.
int64_t preprocess_rows_cpu(const py::array& x, py::array out, const py::object& center,
                            bool normalize, double clip) {
  const bool f64 = check_rows_in_out(x, out, clip);
  const int64_t m = x.shape(0);
  const int64_t d = x.shape(1);
  const double* pc = nullptr;
  py::array c;
  if (!center.is_none()) {
    DPFC_EXPECTS(py::isinstance<py::array>(center),
                 "center must be None or a C-contiguous float64 (d,) array");
    c = py::reinterpret_borrow<py::array>(center);
    DPFC_EXPECTS(has_dtype<double>(c) && (c.flags() & py::array::c_style) && c.ndim() == 1 &&
                     c.shape(0) == d,
                 "center must be a C-contiguous float64 (d,) array");
    pc = static_cast<const double*>(c.data());
  }
  const void* px = x.data();
  auto* po = static_cast<double*>(out.mutable_data());
  py::gil_scoped_release nogil;
  return f64 ? cpu::preprocess_rows(static_cast<const double*>(px), m, d, pc, normalize, clip, po)
             : cpu::preprocess_rows(static_cast<const float*>(px), m, d, pc, normalize, clip, po);
}

// The ops' clipping of the C-ordered rows x (float32 or float64) into the C-ordered
// float64 out of the same shape (out may be x), the clip factors into the float64 (m,)
// scales.
void clip_rows_cpu(const py::array& x, py::array out, py::array scales, double clip) {
  const bool f64 = check_rows_in_out(x, out, clip);
  DPFC_EXPECTS(has_dtype<double>(scales) && scales.writeable() &&
                   (scales.flags() & py::array::c_style) && scales.ndim() == 1 &&
                   scales.shape(0) == x.shape(0),
               "scales must be a writeable C-contiguous float64 (m,) array");
  const int64_t m = x.shape(0);
  const int64_t d = x.shape(1);
  const void* px = x.data();
  auto* po = static_cast<double*>(out.mutable_data());
  auto* ps = static_cast<double*>(scales.mutable_data());
  py::gil_scoped_release nogil;
  if (f64) {
    cpu::clip_rows(static_cast<const double*>(px), m, d, clip, po, ps);
  } else {
    cpu::clip_rows(static_cast<const float*>(px), m, d, clip, po, ps);
  }
}

std::array<uint32_t, 4> philox_raw(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key) {
  Philox4x32 c{{counter[0], counter[1], counter[2], counter[3]}};
  const Philox4x32 r = philox4x32_10(c, key[0], key[1]);
  return {r.v[0], r.v[1], r.v[2], r.v[3]};
}

// Elementwise evaluation of the shared transcendental kernels, for host unit tests.
py::array_t<double> eval_transform(py::array_t<double, py::array::c_style | py::array::forcecast> t,
                                   const std::string& which) {
  py::array_t<double> out(t.request().shape);
  const double* in = t.data();
  double* o = out.mutable_data();
  const int64_t n = t.size();
  for (int64_t k = 0; k < n; ++k) {
    if (which == "log") {
      o[k] = detail::log_unit(in[k]);
    } else if (which == "cos2pi" || which == "sin2pi") {
      double c, s;
      detail::sincos_2pi(in[k], &c, &s);
      o[k] = which == "cos2pi" ? c : s;
    } else {
      throw std::invalid_argument("which must be 'log', 'cos2pi' or 'sin2pi'");
    }
  }
  return out;
}

}  // namespace
}  // namespace dpfc

PYBIND11_MODULE(_core, m) {
  m.doc() = "dpfc_native native core (private: use dpfc_native.ops)";
  m.attr("__version__") = DPFC_VERSION;
#ifdef DPFC_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.attr("cuda_arches") = std::string(DPFC_CUDA_ARCHES);
#else
  m.attr("cuda_compiled") = false;
  m.attr("cuda_arches") = std::string();
#endif
  m.attr("clip_margin") = dpfc::kClipMargin;

  m.def("philox4x32_10", &dpfc::philox_raw, py::arg("counter"), py::arg("key"),
        "Raw Philox4x32-10 block: four 32-bit counter words, two key words.");
  m.def("cpu_sym_gaussian_noise", &dpfc::sym_noise_cpu, py::arg("out"), py::arg("std"),
        py::arg("key_words"), py::arg("block0"),
        "Fill out (batch, d, d) with symmetric Gaussian noise (diag std, off-diag std/sqrt 2).");
  m.def("cpu_gaussian_noise", &dpfc::gaussian_noise_cpu, py::arg("out"), py::arg("std"),
        py::arg("key_words"), py::arg("block0"),
        "Fill a contiguous array with i.i.d. N(0, std^2) from the Philox stream.");
  m.def("cpu_grid_accumulate", &dpfc::grid_accumulate_cpu, py::arg("v"), py::arg("scale"),
        py::arg("limit"), py::arg("hi"), py::arg("lo"), py::arg("tri_d") = 0,
        "Exact two-limb fixed-grid accumulation of float64 values (with tri_d = d, only the "
        "lower triangles of d x d matrices); returns a status code.");
  m.def("cpu_mirror_upper", &dpfc::mirror_upper_cpu, py::arg("a"),
        "Copy the upper triangle of a Fortran-ordered float64 (d, d) matrix to its lower.");
  m.def("cpu_syrk_upper", &dpfc::syrk_upper_cpu, py::arg("fn"), py::arg("a"), py::arg("c"),
        py::arg("alpha"), py::arg("beta"),
        "c = alpha a a^T + beta c (upper triangle) through a ?syrk capsule, without the GIL.");
  m.def("cpu_preprocess_rows", &dpfc::preprocess_rows_cpu, py::arg("x"), py::arg("out"),
        py::arg("center"), py::arg("normalize"), py::arg("clip"),
        "Centre, normalise and clip rows into float64 out; the first non-finite row or -1.");
  m.def("cpu_clip_rows", &dpfc::clip_rows_cpu, py::arg("x"), py::arg("out"), py::arg("scales"),
        py::arg("clip"), "Clip rows into float64 out (the shared clip factor) and their scales.");
  m.def("eval_transform", &dpfc::eval_transform, py::arg("t"), py::arg("which"),
        "Evaluate the shared log / cos(2 pi t) / sin(2 pi t) kernels (testing aid).");

  py::register_exception<dpfc::CudaError>(m, "CudaError", PyExc_RuntimeError);
#ifdef DPFC_WITH_CUDA
  dpfc::register_cuda_bindings(m);
#endif
}
