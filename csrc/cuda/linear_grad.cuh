// Clipped per-example gradient sum of a linear layer (DP-FC / DP-SGD on features) without
// per-example gradients in memory.
//
// For row i (optionally feature-clipped first: x_i <- clip_scale(||x_i||, feature_clip) x_i):
//   z_i = W x_i + b;  sigmoid: r_i = (sigmoid(z_i) - e_{y_i}) / K;  softmax: r_i = softmax(z_i) -
//   e_{y_i}
//   ||g_i||_F = ||r_i||_2 ||x_i||_2 (g_i = r_i x_i^T has rank one), c_i = clip_scale(||g_i||, C)
//   grad = sum_i c_i r_i x_i^T (K x d, float64),  n_clipped = #{i : c_i < 1}.
//
// Design: rows are processed in chunks (bounded workspace: Z is chunk x K). Per chunk:
//   1. logits Z = X W^T + b: SIMT GEMM (float FFMA for float32 input, double FMA for float64;
//      no TF32), the feature-clip scale applied to the finished dot products;
//   2. a row epilogue (one warp per row) computes p, r, ||r||, c_i, overwrites Z with
//      u_i = r_i / ||r_i|| and stores the row factor f_i = s_i c_i ||r_i|| (s_i the feature-clip
//      scale), counting clipped rows (block-aggregated integer atomics: exact);
//   3. grad partials += U^T (f X) with the outer-product engine of outer.cu (float32 input:
//      float products in blocks of <= 4096 rows reduced in float64; float64 input: DMMA).
//      The split keeps both float operands in range (c_i r_i alone is subnormal in float for
//      rows with a huge ||x_i||, too coarse for the 2^-20 clip margin).
// Only the chunk's Z (<= 128 MiB), one double per chunk row and the split partials of grad are
// ever stored.
// The default GPU path (dpfc_native._gpu_stats, grad engine "cublas") runs steps 1 and 3 as
// cuBLAS GEMMs through CuPy instead and calls only the pieces: launch_row_norms,
// launch_residual_clip (step 2, finishing the logits with the feature-clip scale and bias) and
// launch_scale_rows (f X in double); on the H100 that is 1.4x faster than the native passes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/runtime.cuh"

namespace dpfc::cuda {

enum class LinearLoss : int { kSigmoid = 0, kSoftmax = 1 };

// Engine of step 3 (the outer product U^T (f X)). kAuto: FP32 SIMT in float32 blocks reduced in
// float64 for float32 input (kSimt32), DMMA for float64 input. kSimt32 on float64 input means
// kAuto. kMma: DMMA (m16n8k8 on sm_90, m8n8k4 on sm_80; FP64 SIMT before sm_80), kMma884:
// DMMA m8n8k4, kSimt: FP64 SIMT; these three run the float32 input in float64.
enum class LinearGradEngine : int { kAuto = 0, kSimt32 = 1, kMma = 2, kMma884 = 3, kSimt = 4 };

// x: float32 or float64 rows; w: K x d of the same dtype with row stride ldw; bias: K float64
// (may be null: zero bias); labels: int32 in [0, K). grad: K x d float64, contiguous.
// n_clipped: one int64 on the device (written, not accumulated). feature_clip <= 0: none.
// chunk_rows (>= 1): rows per chunk (the logits workspace holds chunk_rows x K values).
void launch_clipped_linear_grad(const RowsView& x, const int32_t* labels, const void* w,
                                int64_t ldw, const double* bias, int64_t K, double clip_norm,
                                LinearLoss loss, double feature_clip, double* grad,
                                int64_t* n_clipped, LinearGradEngine engine, int64_t chunk_rows,
                                cudaStream_t stream);

// The row epilogue (step 2) alone; also what the cuBLAS path of dpfc_native._gpu_stats calls
// on logits it formed itself. z: rows x K, contiguous, float32/float64. logit = zscale[i] z +
// zbias[l] (either may be null: the logits are already finished). Overwrites z with
// u_i = r_i / ||r_i||, writes bscale[i] = s_i c_i ||r_i|| and adds #{c_i < 1} to *n_clipped.
// norms: ||x_i|| before the feature clip (float64); fscale: s_i (null: no feature clip).
void launch_residual_clip(void* z, int dtype, int64_t rows, int64_t K, const int32_t* labels,
                          const double* norms, const double* fscale, const double* zscale,
                          const double* zbias, double clip_norm, LinearLoss loss, double* bscale,
                          int64_t* n_clipped, cudaStream_t stream);

}  // namespace dpfc::cuda
