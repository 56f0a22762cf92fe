// Clipped sufficient statistics on the GPU: row norms and clipping, the clipped Gram
// matrix (a SYRK), class sums and counts, per-class and per-class-weighted Gram matrices.
//
// Conventions (../../notes/cuda_conventions.md): launchers take raw device pointers,
// extents and strides in elements plus a stream, validate with DPFC_EXPECTS, launch,
// check the launch, and never synchronise. Workspace comes from a per-device stream-ordered
// memory pool (DeviceBuffer below), so nothing here waits on the host.
//
// Semantics (shared with the CPU path, python/dpfc_native/ops.py):
//   norm_i = sqrt(sum_j double(x_ij)^2), recomputed with scaling by max_j |x_ij| when the
//   sum overflows; s_i = dpfc::clip_scale(norm_i, C); xbar_i = s_i x_i.
//   G = sum_i xbar_i xbar_i^T (full symmetric d x d, float64),
//   B[l] = sum_{y_i = l} xbar_i (float64), counts[l] = #{i : y_i = l} (int64),
//   A_l = sum_{y_i = l} xbar_i xbar_i^T, H_l = sum_i w_il xbar_i xbar_i^T.
//
// Accumulation modes of the Gram family:
//   kFloat64: operands converted to double, products and sums in double (DMMA tensor cores
//             by default, FP64 SIMT with DPFC_GRAM_KERNEL=simt). Error ~ sqrt(n) 2^-53.
//   kFloat32: xbar = s_i x_i computed in float64 and rounded to float (as the CPU path does),
//             products summed in float over blocks of at most kFloat32BlockRows rows, block
//             partials added in double. Error per
//             entry <= (kFloat32BlockRows + 8) eps32 sum_i |xbar_ia xbar_ib| (worst case),
//             typically sqrt(kFloat32BlockRows) eps32 relative.
//   kTF32 / kBF16 (exploration): as kFloat32, but the float xbar is rounded to TF32 (cvt.rna,
//             u = 2^-11) or bfloat16 (round to nearest even, u = 2^-8) and multiplied on the
//             tensor cores (mma.sync m16n8k8 tf32 / m16n8k16 bf16, float accumulation).
//             Error per entry <= (2u + u^2 + (kFloat32BlockRows + 8) eps32) sum_i |xbar_ia xbar_ib|:
//             about 1.2e-3 (tf32) and 8.1e-3 (bf16) of the absolute sums at worst.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/errors.hpp"

namespace dpfc::cuda {

// Element type codes shared by the bindings and the Python glue (_gpu_stats.py).
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
int dtype_size(int dtype);
bool dtype_valid(int dtype);

enum class GramAccum : int { kFloat64 = 0, kFloat32 = 1, kTF32 = 2, kBF16 = 3 };

// Which engine accumulates in float64: DMMA (mma.sync f64: m16n8k8 on sm_90, m8n8k4 on sm_80;
// kMma884 forces m8n8k4) or FP64 SIMT. kAuto reads DPFC_GRAM_KERNEL (mma|mma884|simt;
// default mma where the device has DMMA).
enum class GramKernel : int { kAuto = 0, kMma = 1, kSimt = 2, kMma884 = 3 };
GramKernel resolve_gram_kernel(GramKernel requested);

constexpr int64_t kFloat32BlockRows = 4096;

// A row-major matrix view: n rows of d elements, row stride ld (elements, >= d unless
// n == 1), element stride 1.
struct RowsView {
  const void* data = nullptr;
  int dtype = kFloat32;
  int64_t n = 0, d = 0, ld = 0;
};
void check_rows_view(const RowsView& x, const char* name);

// Stream-ordered device workspace from a per-device pool that keeps up to 1 GiB cached
// (allocation cost stays out of repeated calls). Freed on the stream at destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(std::size_t bytes, cudaStream_t stream);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_), stream_(o.stream_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = o.ptr_;
      bytes_ = o.bytes_;
      stream_ = o.stream_;
      o.ptr_ = nullptr;
      o.bytes_ = 0;
    }
    return *this;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  std::size_t bytes() const { return bytes_; }

 private:
  void release() noexcept;
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
  cudaStream_t stream_ = nullptr;
};

// Clears a non-sticky error left in the runtime's last-error slot by an earlier, unrelated
// call (so the launch checks report only our own launches). Called at every entry point.
void clear_stale_cuda_error();

// Number of multiprocessors and compute capability (major*10+minor) of the current device.
int current_sm_count();
int current_cc();

// ---- Row norms and clipping ---------------------------------------------------------------
// norms[i] = ||x_i|| (float64), scales[i] = clip_scale(norms[i], clip_norm) when
// clip_norm > 0, else 1. Either output may be null.
void launch_row_norms(const RowsView& x, double clip_norm, double* norms, double* scales,
                      cudaStream_t stream);
// out_i = cast(s_i x_i) in x's dtype (float32/float64 only), row stride ldo; scales[i] = s_i.
void launch_clip_rows(const RowsView& x, double clip_norm, void* out, int64_t ldo,
                      double* scales, cudaStream_t stream);
// out_i = cast(scales[i] x_i) (product in double; float32/float64 only), row stride ldo.
void launch_scale_rows(const RowsView& x, const double* scales, void* out, int64_t ldo,
                       cudaStream_t stream);

// ---- Gram family ----------------------------------------------------------------------------
// G (d x d, contiguous) = sum_i xbar_i xbar_i^T.
void launch_clipped_gram(const RowsView& x, double clip_norm, GramAccum accum, double* G,
                         cudaStream_t stream, GramKernel kernel = GramKernel::kAuto);
// B (K x d, contiguous); counts (K, int64) may be null. labels: int32, values in [0, K)
// (rows with other values are ignored).
void launch_clipped_class_sums(const RowsView& x, const int32_t* labels, int64_t K,
                               double clip_norm, double* B, int64_t* counts,
                               cudaStream_t stream);
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
