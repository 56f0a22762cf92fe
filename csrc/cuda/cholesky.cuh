// Batched Cholesky factorisation and Cholesky solves on the GPU.
//
// Semantics (identical to the CPU path in python/dpfc_native/_cpu_linalg.py):
//   * Only the LOWER triangle of each input matrix is read (element (r, c) with c <= r).
//   * L is lower triangular, zeros strictly above the diagonal, every element written.
//   * info[b] = 0 on success, else k = 1-based index of the first pivot
//     a_kk - sum_j L_kj^2 that is not > 0 (NaN is "not > 0"): LAPACK potrf's info for
//     finite input. A failed matrix's L is filled entirely with NaN.
//   * Nothing here synchronises the stream.
//
// Layout: matrices are row-major; matrix b of a batch starts at ptr + b * batch_stride
// (batch_stride 0 broadcasts one matrix to the whole batch). Outputs are contiguous.
//
// Kernels (cholesky.cu):
//   d <= 128: one thread block per matrix, the matrix held in registers as 8x4 tiles
//     (tiers 32/64/128), right-looking with 4-column panels factored by one warp.
//   d > 128: blocked (nb = 64): "panel" kernels factor the 64x64 diagonal tile and solve
//     the tiles below it; "update" kernels apply the GEMM/SYRK updates with double
//     mma.sync.m8n8k4 (tensor cores, sm_80+) or a SIMT fallback. Left-looking (one read
//     of A, fewest bytes: large batches) or right-looking (most parallel tiles per launch:
//     small batches) schedule. 2 launches per 64 columns (+ init / finish).
// Kernel options (CholeskyOptions below; for benchmarking and fallbacks): the float64 update
// GEMM, the schedule and the largest d for the one-block kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

namespace dpfc {
namespace cuda {

enum class CholeskySchedule : int { kAuto = 0, kLeft = 1, kRight = 2 };

struct CholeskyOptions {
  bool mma = true;  // float64 update GEMM on the tensor cores (false: SIMT; float32 is SIMT)
  CholeskySchedule schedule = CholeskySchedule::kAuto;
  int small_max = 128;  // largest d for the one-block kernel, 0..128 (0: every size blocked)
};

// Factor a[b] + shift[b] I (shifts may be null: no shift) for b < batch.
//   a: input, row stride lda >= d, batch stride a_batch_stride (elements, may be 0).
//   shifts: null or `batch` values added to the diagonal (same dtype).
//   l: output (batch, d, d) contiguous. info: output (batch,) int32.
// Work space: none for the one-block kernel (d <= 128); the blocked path keeps the
// diagonal factors of a chunk of the batch there, nblk = ceil(d / 64) tiles of 64 x 64 per
// matrix. Pass `workspace` (16-byte aligned, workspace_bytes >= one matrix's share; the
// batch is processed in chunks that fit) or null: then cudaMallocAsync/cudaFreeAsync on
// `stream`, at most cholesky_workspace_bytes(...) bytes.
template <typename T>
void cholesky_batched(const T* a, int64_t a_batch_stride, int64_t lda, const T* shifts, T* l,
                      int32_t* info, int64_t batch, int64_t d, void* workspace,
                      size_t workspace_bytes, const CholeskyOptions& options, cudaStream_t stream);

// Work space the call would like (0 for the one-block kernel; at most 1 GiB).
size_t cholesky_workspace_bytes(int64_t batch, int64_t d, int dtype_bytes,
                                const CholeskyOptions& options);

// Solve L L^T x = b for each batch entry.
//   l: (., d, d) lower factor, batch stride l_batch_stride (0: one L for all).
//   b: (., d, m) right-hand sides, row stride ldb >= m, batch stride b_batch_stride (0: one b
//   for all). x: output (batch, d, m) contiguous; must not alias b.
// A factor with NaN (a failed factorisation) gives NaN in its solutions.
template <typename T>
void cho_solve_batched(const T* l, int64_t l_batch_stride, const T* b, int64_t b_batch_stride,
                       int64_t ldb, T* x, int64_t batch, int64_t d, int64_t m, cudaStream_t stream);

// The kernels a call with these extents would use, as a short text (tests, benchmarks).
std::string cholesky_plan(int64_t batch, int64_t d, int dtype_bytes,
                          const CholeskyOptions& options);

}  // namespace cuda
}  // namespace dpfc
