// The outer-product engines (SYRK / GEMM over rows), the row-major X W^T GEMM, and the
// fixed-order reductions of split partials: the GEMM-shaped core of the statistics
// (stats.cu) and of the clipped linear-layer gradient (linear_grad.cu).
//
// Engines (one kernel each; the input dtype is a run-time switch in the tile loader):
//   kMmaF64  : 128x128 tile, 16 rows per stage, 8 warps of 64x32, DMMA: mma.sync m16n8k8 f64 on
//              sm_90, m8n8k4 f64 on sm_80 (kMma884F64: m8n8k4 on any sm_80+ device).
//   kSimtF64 : 64x64 tile, 8 rows per stage, 256 threads with 4x4 double micro-tiles.
//   kSimtF32 : 128x128 tile, 8 rows per stage, 256 threads with 8x8 float micro-tiles; float
//              accumulators are flushed into the float64 output every kFloat32BlockRows rows
//              (the "float32 blocks reduced in float64" mode).
//   kTcTF32 / kTcBF16 (exploration): 128x128 tile, 32 rows per stage, 8 warps of 64x32,
//              mma.sync m16n8k8 tf32 / m16n8k16 bf16 with float accumulators flushed to float64
//              as in kSimtF32 (fragment layouts: ptx.cuh). Shared tiles hold 32-bit words
//              [k][m] (tf32) or [k/2][m] bf16 pairs (low half = even k), so both modes load
//              fragments with identical word indexing.
// In a diagonal tile of a symmetric problem, the warps of the MMA engines whose 64x32 warp tile
// lies strictly below the diagonal skip their MMAs (2 of 8 warps): that part is never read (the
// reduction mirrors the upper triangle). All engines stage tiles through registers into
// double-buffered shared memory (one barrier per stage), apply the per-row factors while
// staging, and take rows through an optional permutation (per-class segments).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/runtime.cuh"

namespace dpfc::cuda {

// Rows per float32 block of the float-accumulating engines (their partial sums are flushed
// into float64 after at most this many rows).
constexpr int64_t kFloat32BlockRows = 4096;

// ---- The shared outer-product engine (also used by linear_grad.cu) ---------------------------
// For every batch entry l < L and split s < S:
//   out[l, s] (+)= sum_{r in rows(l, s)} (a_r * fa_r) (b_r * fb_r)^T     (M x N block)
// where row r of the (optionally permuted) row space maps to physical row p = perm[r] (or r),
// a_r = A[p, 0:M], b_r = B[p, 0:N], fa_r = a_scale[p] * w[p * ldw + l] (each factor 1 when its
// pointer is null), fb_r = b_scale[p]. rows(l, s) is split s of S equal parts of the segment
// [seg[l], seg[l+1]) (or [0, n) when seg is null). sym: A == B, M == N, only output tiles on or
// above the diagonal are computed (each computed tile is written whole).
// out[l, s] is at out + l * out_lstride + s * out_sstride with row stride out_ld. beta != 0
// adds to what is there, else overwrites.
enum class OuterEngine : int {
  kMmaF64 = 0,     // DMMA, best shape for the device (m16n8k8 on sm_90, else m8n8k4)
  kSimtF64 = 1,    // FP64 FMA
  kSimtF32 = 2,    // FP32 FMA, float blocks flushed to float64
  kTcTF32 = 3,     // tensor cores, tf32 operands, float blocks flushed to float64
  kTcBF16 = 4,     // tensor cores, bf16 operands, float blocks flushed to float64
  kMma884F64 = 5,  // DMMA m8n8k4 (sm_80 shape) on any sm_80+ device
};
struct OuterProblem {
  const void* a = nullptr;
  int a_dtype = kFloat32;
  int64_t lda = 0;
  const void* b = nullptr;
  int b_dtype = kFloat32;
  int64_t ldb = 0;
  int64_t M = 0, N = 0;
  bool sym = false;
  const double* a_scale = nullptr;
  const double* b_scale = nullptr;
  const double* w = nullptr;
  int64_t ldw = 0;
  const int32_t* perm = nullptr;
  const int64_t* seg = nullptr;
  int64_t n = 0;
  int64_t L = 1, S = 1;
  double* out = nullptr;
  int64_t out_ld = 0, out_lstride = 0, out_sstride = 0;
  bool beta = false;
};
int64_t outer_tile_size(OuterEngine engine);
// Blocks of this engine resident per multiprocessor (occupancy), at least 1.
int outer_blocks_per_sm(OuterEngine engine);
// Split count for `base_blocks` output tiles over `rows` rows: fills the device in near-whole
// waves while keeping >= min_rows rows per split and S * split_bytes <= max_bytes.
int64_t choose_splits(int64_t base_blocks, int64_t rows, int64_t min_rows, int slots,
                      std::size_t split_bytes, std::size_t max_bytes);
void launch_outer(const OuterProblem& p, OuterEngine engine, cudaStream_t stream);

// Z[i, l] = sum_j (x_scale[i] x[i, j]) w[l, j] + bias[l] for i < x.n, l < K (x_scale and bias
// may be null). x and w: both float32 (float FFMA, Z float32) or both float64 (double FMA,
// Z float64); w row stride ldw; Z row stride ldz. A 128x128 (float) / 64x64 (double) SIMT GEMM.
void launch_rows_matmul_nt(const RowsView& x, const double* x_scale, const void* w, int64_t ldw,
                           int64_t K, const double* bias, void* z, int64_t ldz,
                           cudaStream_t stream);

// out[i] = sum_{s < S} part[s * sstride + i] for i < count (fixed order).
void launch_sum_splits(const double* part, int64_t S, int64_t sstride, int64_t count, double* out,
                       bool beta, cudaStream_t stream);
// G[l] (d x d) = symmetric matrix from the upper triangle of sum_s part[l, s]; part may
// alias G when S == 1 (in-place mirror).
void launch_sym_reduce(const double* part, int64_t S, int64_t part_lstride, int64_t part_sstride,
                       int64_t d, int64_t L, double* G, cudaStream_t stream);
}  // namespace dpfc::cuda
