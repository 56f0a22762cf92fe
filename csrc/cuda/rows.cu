// Row norms, clip_rows and scale_rows (see rows.cuh).
#include "cuda/rows.cuh"

#include <cuda_runtime.h>

#include "common/clip.hpp"
#include "common/errors.hpp"
#include "cuda/device.cuh"
#include "cuda/runtime.cuh"

namespace dpfc::cuda {
namespace {

__global__ void __launch_bounds__(256)
    row_norms_kernel(const void* __restrict__ x, int dtype, int64_t n, int64_t d, int64_t ld,
                     double clip_norm, double* norms, double* scales) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t i = warp; i < n; i += nwarps) {
    double nrm = 0.0;
    DPFC_DISPATCH_DTYPE(dtype, T, nrm = warp_row_norm(static_cast<const T*>(x) + i * ld, d, lane));
    if (lane == 0) {
      if (norms != nullptr) norms[i] = nrm;
      if (scales != nullptr) scales[i] = clip_norm > 0.0 ? clip_scale(nrm, clip_norm) : 1.0;
    }
  }
}

// orow = cast(s row), the product formed in double (one warp, lane = its lane).
template <typename T>
__device__ __forceinline__ void warp_scale_row(const T* __restrict__ row, int64_t d, double s,
                                               T* __restrict__ orow, int lane) {
  for (int64_t j = lane; j < d; j += 32) orow[j] = static_cast<T>(s * to_double(row[j]));
}

template <typename T>
__global__ void __launch_bounds__(256)
    clip_rows_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t ld, double clip_norm,
                     T* __restrict__ out, int64_t ldo, double* scales) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t i = warp; i < n; i += nwarps) {
    const T* row = x + i * ld;
    const double s = clip_scale(warp_row_norm(row, d, lane), clip_norm);
    warp_scale_row(row, d, s, out + i * ldo, lane);
    if (lane == 0 && scales != nullptr) scales[i] = s;
  }
}

// out_i = cast(scales[i] x_i), the product formed in double (a tiny scale times a huge row stays
// in range; the scale itself may be subnormal in float).
template <typename T>
__global__ void __launch_bounds__(256)
    scale_rows_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t ld,
                      const double* __restrict__ scales, T* __restrict__ out, int64_t ldo) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t i = warp; i < n; i += nwarps) {
    warp_scale_row(x + i * ld, d, scales[i], out + i * ldo, lane);
  }
}

}  // namespace

void launch_row_norms(const RowsView& x, double clip_norm, double* norms, double* scales,
                      cudaStream_t stream) {
  check_rows_view(x, "x");
  row_norms_kernel<<<capped_grid(x.n, 8, 32), 256, 0, stream>>>(x.data, x.dtype, x.n, x.d, x.ld,
                                                                clip_norm, norms, scales);
  DPFC_CUDA_CHECK_LAUNCH();
}

void launch_clip_rows(const RowsView& x, double clip_norm, void* out, int64_t ldo, double* scales,
                      cudaStream_t stream) {
  check_rows_view(x, "x");
  DPFC_EXPECTS(out != nullptr, "out: null device pointer");
  DPFC_EXPECTS(x.n == 1 || ldo >= x.d, "out: row stride must be >= d");
  DPFC_EXPECTS(clip_norm > 0.0, "clip_norm must be > 0");
  DPFC_EXPECTS(x.dtype == kFloat32 || x.dtype == kFloat64,
               "clip_rows supports float32 and float64 (a float16/bfloat16 result could round "
               "above the clip norm)");
  const unsigned grid = capped_grid(x.n, 8, 32);
  if (x.dtype == kFloat32) {
    clip_rows_kernel<float><<<grid, 256, 0, stream>>>(static_cast<const float*>(x.data), x.n, x.d,
                                                      x.ld, clip_norm, static_cast<float*>(out),
                                                      ldo, scales);
  } else {
    clip_rows_kernel<double><<<grid, 256, 0, stream>>>(static_cast<const double*>(x.data), x.n, x.d,
                                                       x.ld, clip_norm, static_cast<double*>(out),
                                                       ldo, scales);
  }
  DPFC_CUDA_CHECK_LAUNCH();
}

void launch_scale_rows(const RowsView& x, const double* scales, void* out, int64_t ldo,
                       cudaStream_t stream) {
  check_rows_view(x, "x");
  DPFC_EXPECTS(scales != nullptr && out != nullptr, "scale_rows: null device pointer");
  DPFC_EXPECTS(x.n == 1 || ldo >= x.d, "out: row stride must be >= d");
  DPFC_EXPECTS(x.dtype == kFloat32 || x.dtype == kFloat64,
               "scale_rows supports float32 and float64");
  const unsigned grid = capped_grid(x.n, 8, 32);
  if (x.dtype == kFloat32) {
    scale_rows_kernel<float><<<grid, 256, 0, stream>>>(static_cast<const float*>(x.data), x.n, x.d,
                                                       x.ld, scales, static_cast<float*>(out), ldo);
  } else {
    scale_rows_kernel<double><<<grid, 256, 0, stream>>>(
        static_cast<const double*>(x.data), x.n, x.d, x.ld, scales, static_cast<double*>(out), ldo);
  }
  DPFC_CUDA_CHECK_LAUNCH();
}
}  // namespace dpfc::cuda
