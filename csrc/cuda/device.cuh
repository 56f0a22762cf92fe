// Device-side helpers shared by the kernel families: element conversion, the dtype dispatch,
// warp reductions, the float64 row norm and the upper-triangle index decoder. Device code
// only (include from .cu files). The helpers have internal linkage: every translation unit
// is its own device module and inlines its own copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/runtime.cuh"

namespace dpfc::cuda {
namespace {

__device__ __forceinline__ double to_double(float v) { return static_cast<double>(v); }
__device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ double to_double(__half v) {
  return static_cast<double>(__half2float(v));
}
__device__ __forceinline__ double to_double(__nv_bfloat16 v) {
  return static_cast<double>(__bfloat162float(v));
}
// Runs BODY with T bound to the storage type of dtype code CODE (device or host).
#define DPFC_DISPATCH_DTYPE(CODE, T, ...) \
  switch (CODE) {                         \
    case kFloat32: {                      \
      using T = float;                    \
      __VA_ARGS__;                        \
    } break;                              \
    case kFloat64: {                      \
      using T = double;                   \
      __VA_ARGS__;                        \
    } break;                              \
    case kFloat16: {                      \
      using T = __half;                   \
      __VA_ARGS__;                        \
    } break;                              \
    default: {                            \
      using T = __nv_bfloat16;            \
      __VA_ARGS__;                        \
    } break;                              \
  }

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Warp maximum (fmax for double, fmaxf for float: NaN-ignoring).
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ||row|| in float64 by one warp (every lane returns the same value). Sums of squares of the
// converted elements; if the sum overflows (float64 input with |x| > ~1e154), recomputes
// max|x| * ||row / max|x|||.
template <typename T>
__device__ double warp_row_norm(const T* __restrict__ row, int64_t d, int lane) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t j = lane;
#pragma unroll 2
  for (; j + 96 < d; j += 128) {
    const double a = to_double(row[j]);
    const double b = to_double(row[j + 32]);
    const double c = to_double(row[j + 64]);
    const double e = to_double(row[j + 96]);
    s0 += a * a;
    s1 += b * b;
    s2 += c * c;
    s3 += e * e;
  }
  for (; j < d; j += 32) {
    const double a = to_double(row[j]);
    s0 += a * a;
  }
  const double s = warp_sum((s0 + s1) + (s2 + s3));
  if (isfinite(s)) return sqrt(s);
  double m = 0.0;
  for (j = lane; j < d; j += 32) m = fmax(m, fabs(to_double(row[j])));
  m = warp_max(m);
  if (!(m > 0.0) || !isfinite(m)) return s;
  double t = 0.0;
  for (j = lane; j < d; j += 32) {
    const double a = to_double(row[j]) / m;
    t += a * a;
  }
  t = warp_sum(t);
  return m * sqrt(t);
}

// Upper-triangular index t = j (j + 1) / 2 + i, 0 <= i <= j, back to (i, j): a square-root
// guess in F (double for 64-bit indices, float for int) corrected by exact integer steps.
template <typename I, typename F = std::conditional_t<sizeof(I) == 8, double, float>>
__device__ __forceinline__ void tri_decode(I t, I* ti, I* tj) {
  I c = static_cast<I>((sqrt(F(8) * static_cast<F>(t) + F(1)) - F(1)) * F(0.5));
  while (c > 0 && c * (c + 1) / 2 > t) --c;
  while ((c + 1) * (c + 2) / 2 <= t) ++c;
  *tj = c;
  *ti = t - c * (c + 1) / 2;
}

}  // namespace
}  // namespace dpfc::cuda
