// Row operations on the GPU: float64 row norms, clipping and row scaling.
//
// Semantics (shared with the CPU path, python/dpfc_native/_cpu_stats.py):
//   norm_i = sqrt(sum_j double(x_ij)^2), recomputed with scaling by max_j |x_ij| when the
//   sum overflows; s_i = dpfc::clip_scale(norm_i, C); xbar_i = s_i x_i.
// Design: one warp per row, float64 sums of squares, butterfly reduction (every lane holds
// the same, deterministic value), rescaled recomputation on overflow.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/runtime.cuh"

namespace dpfc::cuda {

// norms[i] = ||x_i|| (float64), scales[i] = clip_scale(norms[i], clip_norm) when
// clip_norm > 0, else 1. Either output may be null.
void launch_row_norms(const RowsView& x, double clip_norm, double* norms, double* scales,
                      cudaStream_t stream);
// out_i = cast(s_i x_i) in x's dtype (float32/float64 only), row stride ldo; scales[i] = s_i.
void launch_clip_rows(const RowsView& x, double clip_norm, void* out, int64_t ldo, double* scales,
                      cudaStream_t stream);
// out_i = cast(scales[i] x_i) (product in double; float32/float64 only), row stride ldo.
void launch_scale_rows(const RowsView& x, const double* scales, void* out, int64_t ldo,
                       cudaStream_t stream);

}  // namespace dpfc::cuda
