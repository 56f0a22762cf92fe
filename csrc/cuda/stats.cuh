// Clipped sufficient statistics on the GPU: the clipped Gram matrix (a SYRK), class sums and
// counts, per-class and per-class-weighted Gram matrices. Row norms and clipping: rows.cuh;
// the engines: outer.cuh; conventions: runtime.cuh.
//
// Semantics (shared with the CPU path, python/dpfc_native/_cpu_stats.py), with
// xbar_i = clip_scale(||x_i||, C) x_i as in rows.cuh:
//   G = sum_i xbar_i xbar_i^T (full symmetric d x d, float64),
//   B[l] = sum_{y_i = l} xbar_i (float64), counts[l] = #{i : y_i = l} (int64),
//   A_l = sum_{y_i = l} xbar_i xbar_i^T, H_l = sum_i w_il xbar_i xbar_i^T.
//
// Accumulation modes of the Gram family:
//   kFloat64: operands converted to double, products and sums in double (DMMA tensor cores
//             by default, FP64 SIMT with kernel = kSimt). Error ~ sqrt(n) 2^-53.
//   kFloat32: xbar = s_i x_i computed in float64 and rounded to float (as the CPU path does),
//             products summed in float over blocks of at most kFloat32BlockRows rows, block
//             partials added in double. Error per
//             entry <= (kFloat32BlockRows + 8) eps32 sum_i |xbar_ia xbar_ib| (worst case),
//             typically sqrt(kFloat32BlockRows) eps32 relative.
//   kTF32 / kBF16 (exploration): as kFloat32, but the float xbar is rounded to TF32 (cvt.rna,
//             u = 2^-11) or bfloat16 (round to nearest even, u = 2^-8) and multiplied on the
//             tensor cores (mma.sync m16n8k8 tf32 / m16n8k16 bf16, float accumulation).
//             Error per entry <= (2u + u^2 + (kFloat32BlockRows + 8) eps32) sum_i |xbar_ia
//             xbar_ib|: about 1.2e-3 (tf32) and 8.1e-3 (bf16) of the absolute sums at worst.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/runtime.cuh"

namespace dpfc::cuda {

enum class GramAccum : int { kFloat64 = 0, kFloat32 = 1, kTF32 = 2, kBF16 = 3 };

// Which engine accumulates in float64: DMMA (mma.sync f64: m16n8k8 on sm_90, m8n8k4 on sm_80;
// kMma884 forces m8n8k4) or FP64 SIMT. kAuto is kMma. A DMMA choice on a device without DMMA
// (before sm_80) resolves to kSimt.
enum class GramKernel : int { kAuto = 0, kMma = 1, kSimt = 2, kMma884 = 3 };
GramKernel resolve_gram_kernel(GramKernel requested);

// ---- Gram family ----------------------------------------------------------------------------
// G (d x d, contiguous) = sum_i xbar_i xbar_i^T.
void launch_clipped_gram(const RowsView& x, double clip_norm, GramAccum accum, double* G,
                         cudaStream_t stream, GramKernel kernel = GramKernel::kAuto);
// B (K x d, contiguous); counts (K, int64) may be null. labels: int32, values in [0, K)
// (rows with other values are ignored).
void launch_clipped_class_sums(const RowsView& x, const int32_t* labels, int64_t K,
                               double clip_norm, double* B, int64_t* counts, cudaStream_t stream);
// One pass over x for norms, class sums and counts, then the Gram SYRK.
void launch_clipped_stats(const RowsView& x, const int32_t* labels, int64_t K, double clip_norm,
                          GramAccum accum, double* G, double* B, int64_t* counts,
                          cudaStream_t stream, GramKernel kernel = GramKernel::kAuto);
// A (K x d x d, contiguous): A_l = sum_{y_i = l} xbar_i xbar_i^T, float64.
void launch_clipped_class_grams(const RowsView& x, const int32_t* labels, int64_t K,
                                double clip_norm, double* A, cudaStream_t stream,
                                GramKernel kernel = GramKernel::kAuto);
// H (K x d x d, contiguous): H_l = sum_i w[i * ldw + l] xbar_i xbar_i^T, float64 weights.
void launch_clipped_weighted_grams(const RowsView& x, const double* w, int64_t ldw, int64_t K,
                                   double clip_norm, double* H, cudaStream_t stream,
                                   GramKernel kernel = GramKernel::kAuto);

}  // namespace dpfc::cuda
