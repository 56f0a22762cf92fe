// The Gram-family launchers, the class sort and the class sums (see stats.cuh).
//
// Design (n >> d; ImageNet-shaped features are 1281167 x 1664):
//  * Gram = SYRK on the upper triangle of output tiles (outer.cuh). Few output tiles exist when
//    d is small, so the reduction over rows is split over S blocks per tile (S chosen to fill
//    the device in near-whole waves); each (tile, split) block writes its own partial, and a
//    fixed-order reduction sums the splits and mirrors the upper triangle. No atomics: the
//    result is bit-reproducible run to run.
//  * Class sums and counts: a stable counting sort of the labels (chunk histograms, a scan,
//    warp-level ranking with __match_any_sync), then one fused pass in class order that
//    computes each row's norm and scale and adds the scaled row to its class, in a fixed
//    order (deterministic, no floating-point atomics).
#include "cuda/stats.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "common/clip.hpp"
#include "common/errors.hpp"
#include "cuda/device.cuh"
#include "cuda/outer.cuh"
#include "cuda/rows.cuh"
#include "cuda/runtime.cuh"

namespace dpfc::cuda {

GramKernel resolve_gram_kernel(GramKernel requested) {
  GramKernel k = requested == GramKernel::kAuto ? GramKernel::kMma : requested;
  if ((k == GramKernel::kMma || k == GramKernel::kMma884) && current_cc() < 80) {
    k = GramKernel::kSimt;  // no DMMA before sm_80
  }
  return k;
}

// ============================================================================================
// Stable counting sort of the labels: perm lists the rows of class 0, then class 1, ...,
// each class in increasing row order; offsets[l] = first position of class l, offsets[K] =
// number of rows with a valid label.
// ============================================================================================

namespace {

__global__ void label_hist_kernel(const int32_t* __restrict__ labels, int64_t n, int64_t K,
                                  int64_t chunk, int32_t* hist) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const int32_t lab = labels[r];
  if (lab < 0 || lab >= K) return;
  atomicAdd(&hist[(r / chunk) * K + lab], 1);
}

// Per class (one warp each): exclusive running count over chunks (in place) and the class
// total; 32 chunks per step with a warp scan (latency ~ nchunks / 32 round trips).
__global__ void label_chunk_scan_kernel(int32_t* hist, int64_t nchunks, int64_t K,
                                        int64_t* counts) {
  const int lane = threadIdx.x & 31;
  const int64_t k = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (k >= K) return;
  int64_t carry = 0;
  for (int64_t base = 0; base < nchunks; base += 32) {
    const int64_t c = base + lane;
    const int64_t h = c < nchunks ? hist[c * K + k] : 0;
    int64_t incl = h;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    if (c < nchunks) hist[c * K + k] = static_cast<int32_t>(carry + incl - h);
    carry += __shfl_sync(0xffffffffu, incl, 31);
  }
  if (lane == 0) counts[k] = carry;
}

// Exclusive scan of counts[0..K) into offsets[0..K], one block of 1024 threads.
__global__ void __launch_bounds__(1024)
    offsets_scan_kernel(const int64_t* __restrict__ counts, int64_t K, int64_t* offsets) {
  __shared__ int64_t warp_tot[32];
  __shared__ int64_t carry_s;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) carry_s = 0;
  __syncthreads();
  for (int64_t base = 0; base < K; base += 1024) {
    const int64_t idx = base + tid;
    const int64_t v = idx < K ? counts[idx] : 0;
    int64_t incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int64_t w = warp_tot[lane];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int64_t t = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += t;
      }
      warp_tot[lane] = w;  // inclusive prefix of warp totals
    }
    __syncthreads();
    const int64_t carry = carry_s;
    const int64_t before = (warp > 0 ? warp_tot[warp - 1] : 0) + incl - v;
    if (idx < K) offsets[idx] = carry + before;
    __syncthreads();
    if (tid == 1023) carry_s = carry + warp_tot[31];
    __syncthreads();
  }
  if (tid == 0) offsets[K] = carry_s;
}

// One warp per chunk of rows, in row order: stable positions from the chunk's class bases.
__global__ void label_rank_kernel(const int32_t* __restrict__ labels, int64_t n, int64_t K,
                                  int64_t chunk, int64_t nchunks, int32_t* hist,
                                  const int64_t* __restrict__ offsets, int32_t* perm) {
  const int lane = threadIdx.x & 31;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (c >= nchunks) return;
  const unsigned lt_mask = (1u << lane) - 1u;
  const int64_t r_end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
  volatile int32_t* vhist = hist;  // counters are re-read after other lanes' updates
  for (int64_t r0 = c * chunk; r0 < r_end; r0 += 32) {
    const int64_t r = r0 + lane;
    int32_t lab = -1;
    if (r < r_end) {
      lab = labels[r];
      if (lab < 0 || lab >= K) lab = -1;
    }
    const unsigned peers = __match_any_sync(0xffffffffu, lab);
    volatile int32_t* slot = lab >= 0 ? &vhist[c * K + lab] : nullptr;
    if (lab >= 0) {
      const int64_t pos = offsets[lab] + *slot + __popc(peers & lt_mask);
      perm[pos] = static_cast<int32_t>(r);
    }
    __syncwarp();
    if (lab >= 0 && lane == __ffs(peers) - 1) *slot += __popc(peers);
    __syncwarp();
  }
}

struct ClassSort {
  DeviceBuffer perm_buf, offsets_buf, counts_buf;
  int32_t* perm = nullptr;
  int64_t* offsets = nullptr;
  int64_t* counts = nullptr;
};

// Fills cs (perm, offsets, counts). counts_out, when given, receives the class counts.
void class_sort(const int32_t* labels, int64_t n, int64_t K, int64_t* counts_out, ClassSort& cs,
                cudaStream_t stream) {
  DPFC_EXPECTS(labels != nullptr, "labels: null device pointer");
  DPFC_EXPECTS(K >= 1 && K < (int64_t{1} << 31), "num_classes must be in [1, 2^31)");
  // Chunk histograms hold nchunks * K int32: at most 2^26 entries (256 MiB).
  const int64_t max_entries = int64_t{1} << 26;
  // Each rank warp walks its chunk serially (chunk / 32 steps): short chunks for small n.
  int64_t chunk = n <= (int64_t{1} << 18) ? 256 : 1024;
  if (((n + chunk - 1) / chunk) * K > max_entries) {
    const int64_t max_chunks = std::max<int64_t>(1, max_entries / K);
    chunk = (n + max_chunks - 1) / max_chunks;
    chunk = ((chunk + 31) / 32) * 32;
  }
  const int64_t nchunks = (n + chunk - 1) / chunk;
  DeviceBuffer hist(static_cast<std::size_t>(nchunks * K) * sizeof(int32_t), stream);
  cs.perm_buf = DeviceBuffer(static_cast<std::size_t>(n) * sizeof(int32_t), stream);
  cs.offsets_buf = DeviceBuffer(static_cast<std::size_t>(K + 1) * sizeof(int64_t), stream);
  cs.perm = cs.perm_buf.as<int32_t>();
  cs.offsets = cs.offsets_buf.as<int64_t>();
  if (counts_out != nullptr) {
    cs.counts = counts_out;
  } else {
    cs.counts_buf = DeviceBuffer(static_cast<std::size_t>(K) * sizeof(int64_t), stream);
    cs.counts = cs.counts_buf.as<int64_t>();
  }
  DPFC_CUDA_CHECK(cudaMemsetAsync(hist.as<int32_t>(), 0, hist.bytes(), stream));
  label_hist_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(labels, n, K, chunk,
                                                                                hist.as<int32_t>());
  DPFC_CUDA_CHECK_LAUNCH();
  label_chunk_scan_kernel<<<static_cast<unsigned>((K + 7) / 8), 256, 0, stream>>>(
      hist.as<int32_t>(), nchunks, K, cs.counts);
  DPFC_CUDA_CHECK_LAUNCH();
  offsets_scan_kernel<<<1, 1024, 0, stream>>>(cs.counts, K, cs.offsets);
  DPFC_CUDA_CHECK_LAUNCH();
  label_rank_kernel<<<static_cast<unsigned>((nchunks + 3) / 4), 128, 0, stream>>>(
      labels, n, K, chunk, nchunks, hist.as<int32_t>(), cs.offsets, cs.perm);
  DPFC_CUDA_CHECK_LAUNCH();
}
}  // namespace

// ============================================================================================
// Fused row norms + class sums, in class order (after class_sort)
// ============================================================================================

namespace {

constexpr int kCsThreads = 256;
constexpr int kCsCols = 8;                          // columns per thread
constexpr int64_t kCsRange = kCsThreads * kCsCols;  // columns per block (grid.y ranges)

// Block (l * P + p, y): piece p of class l's segment, columns [y * kCsRange, ...). Each warp
// takes one row of a batch of 8: its norm and scale; then every thread adds the 8 scaled rows
// to its columns in batch order (deterministic). out[(l * P + p) * d + c] = piece sum.
template <typename T>
__global__ void __launch_bounds__(kCsThreads, 2)
    norm_class_sum_kernel(const T* __restrict__ x, int64_t d, int64_t ld, double clip_norm,
                          const int32_t* __restrict__ perm, const int64_t* __restrict__ offsets,
                          int64_t P, double* __restrict__ scales, double* __restrict__ out) {
  __shared__ double s_scale[8];
  __shared__ int64_t s_row[8];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t l = blockIdx.x / P, p = blockIdx.x % P;
  const int64_t sb = offsets[l], len = offsets[l + 1] - sb;
  const int64_t rb = sb + len * p / P, re = sb + len * (p + 1) / P;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kCsRange + threadIdx.x;
  double acc[kCsCols];
#pragma unroll
  for (int q = 0; q < kCsCols; ++q) acc[q] = 0.0;
  for (int64_t r0 = rb; r0 < re; r0 += 8) {
    const int64_t r = r0 + warp;
    if (r < re) {
      const int64_t ri = perm[r];
      const double s = clip_scale(warp_row_norm(x + ri * ld, d, lane), clip_norm);
      if (lane == 0) {
        s_scale[warp] = s;
        s_row[warp] = ri;
        if (blockIdx.y == 0 && scales != nullptr) scales[ri] = s;
      }
    }
    __syncthreads();
    const int64_t rows = re - r0;
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      if (w < rows) {
        const double s = s_scale[w];
        const T* row = x + s_row[w] * ld;
#pragma unroll
        for (int q = 0; q < kCsCols; ++q) {
          const int64_t c = c0 + q * kCsThreads;
          if (c < d) acc[q] += s * to_double(row[c]);
        }
      }
    }
    __syncthreads();
  }
  double* o = out + (l * P + p) * d;
#pragma unroll
  for (int q = 0; q < kCsCols; ++q) {
    const int64_t c = c0 + q * kCsThreads;
    if (c < d) o[c] = acc[q];
  }
}

__global__ void sum_pieces_kernel(const double* __restrict__ part, int64_t K, int64_t P, int64_t d,
                                  double* __restrict__ B) {
  const int64_t total = K * d;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t l = idx / d, c = idx - l * d;
    double s = 0.0;
    for (int64_t p = 0; p < P; ++p) s += part[(l * P + p) * d + c];
    B[idx] = s;
  }
}

void run_class_sums(const RowsView& x, const ClassSort& cs, int64_t K, double clip_norm,
                    double* scales, double* B, cudaStream_t stream) {
  const int64_t ranges = (x.d + kCsRange - 1) / kCsRange;
  DPFC_EXPECTS(ranges <= 65535, "x: too many columns");
  const int64_t slots = static_cast<int64_t>(current_sm_count()) * 8;
  int64_t P = (2 * slots + K * ranges - 1) / (K * ranges);
  P = std::min(P, std::max<int64_t>(1, x.n / (K * 256)));
  P = std::max<int64_t>(1, P);
  DPFC_EXPECTS(K * P < (int64_t{1} << 31), "num_classes too large");
  DeviceBuffer part;
  double* dst = B;
  if (P > 1) {
    part = DeviceBuffer(static_cast<std::size_t>(K * P * x.d) * sizeof(double), stream);
    dst = part.as<double>();
  }
  const dim3 grid(static_cast<unsigned>(K * P), static_cast<unsigned>(ranges));
  DPFC_DISPATCH_DTYPE(x.dtype, T,
                      norm_class_sum_kernel<T><<<grid, kCsThreads, 0, stream>>>(
                          static_cast<const T*>(x.data), x.d, x.ld, clip_norm, cs.perm, cs.offsets,
                          P, scales, dst));
  DPFC_CUDA_CHECK_LAUNCH();
  if (P > 1) {
    sum_pieces_kernel<<<capped_grid(K * x.d, 256, 16), 256, 0, stream>>>(dst, K, P, x.d, B);
    DPFC_CUDA_CHECK_LAUNCH();
  }
}
}  // namespace

// ============================================================================================
// Gram-family launchers
// ============================================================================================

namespace {

OuterEngine gram_engine(GramAccum accum, GramKernel kernel) {
  if (accum == GramAccum::kFloat32) return OuterEngine::kSimtF32;
  if (accum == GramAccum::kTF32) return OuterEngine::kTcTF32;
  if (accum == GramAccum::kBF16) return OuterEngine::kTcBF16;
  switch (resolve_gram_kernel(kernel)) {
    case GramKernel::kMma: return OuterEngine::kMmaF64;
    case GramKernel::kMma884: return OuterEngine::kMma884F64;
    default: return OuterEngine::kSimtF64;
  }
}

constexpr std::size_t kMaxSplitBytes = std::size_t{512} << 20;

// G[l] (L matrices d x d) = sum over rows of batch l of fa fb x x^T (see OuterProblem).
void run_sym_grams(const RowsView& x, const double* scales, const double* w, int64_t ldw,
                   const int32_t* perm, const int64_t* seg, int64_t L, OuterEngine engine,
                   double* G, cudaStream_t stream) {
  const int64_t d = x.d;
  const int64_t tile = outer_tile_size(engine);
  const int64_t nt = (d + tile - 1) / tile;
  const int64_t T = nt * (nt + 1) / 2;
  const int slots = current_sm_count() * outer_blocks_per_sm(engine);
  const int64_t rows = seg != nullptr ? std::max<int64_t>(1, x.n / L) : x.n;
  const std::size_t split_bytes = static_cast<std::size_t>(L * d * d) * sizeof(double);
  const int64_t S = choose_splits(T * L, rows, 1024, slots, split_bytes, kMaxSplitBytes);
  OuterProblem p;
  p.a = p.b = x.data;
  p.a_dtype = p.b_dtype = x.dtype;
  p.lda = p.ldb = x.ld;
  p.M = p.N = d;
  p.sym = true;
  p.a_scale = p.b_scale = scales;
  p.w = w;
  p.ldw = ldw;
  p.perm = perm;
  p.seg = seg;
  p.n = x.n;
  p.L = L;
  p.S = S;
  p.out_ld = d;
  p.beta = false;
  if (S == 1) {
    p.out = G;
    p.out_lstride = d * d;
    p.out_sstride = 0;
    launch_outer(p, engine, stream);
    launch_sym_reduce(G, 1, d * d, 0, d, L, G, stream);
  } else {
    DeviceBuffer part(static_cast<std::size_t>(S) * split_bytes, stream);
    p.out = part.as<double>();
    p.out_lstride = S * d * d;
    p.out_sstride = d * d;
    launch_outer(p, engine, stream);
    launch_sym_reduce(part.as<double>(), S, S * d * d, d * d, d, L, G, stream);
  }
}

void check_clip(double clip_norm) {
  DPFC_EXPECTS(clip_norm > 0.0 && std::isfinite(clip_norm), "clip_norm must be finite and > 0");
}

}  // namespace

void launch_clipped_gram(const RowsView& x, double clip_norm, GramAccum accum, double* G,
                         cudaStream_t stream, GramKernel kernel) {
  check_rows_view(x, "x");
  check_clip(clip_norm);
  DPFC_EXPECTS(G != nullptr, "out: null device pointer");
  const OuterEngine engine = gram_engine(accum, kernel);
  DeviceBuffer scales(static_cast<std::size_t>(x.n) * sizeof(double), stream);
  launch_row_norms(x, clip_norm, nullptr, scales.as<double>(), stream);
  run_sym_grams(x, scales.as<double>(), nullptr, 0, nullptr, nullptr, 1, engine, G, stream);
}

void launch_clipped_class_sums(const RowsView& x, const int32_t* labels, int64_t K,
                               double clip_norm, double* B, int64_t* counts, cudaStream_t stream) {
  check_rows_view(x, "x");
  check_clip(clip_norm);
  DPFC_EXPECTS(B != nullptr, "out: null device pointer");
  ClassSort cs;
  class_sort(labels, x.n, K, counts, cs, stream);
  DeviceBuffer scales(static_cast<std::size_t>(x.n) * sizeof(double), stream);
  run_class_sums(x, cs, K, clip_norm, scales.as<double>(), B, stream);
}

void launch_clipped_stats(const RowsView& x, const int32_t* labels, int64_t K, double clip_norm,
                          GramAccum accum, double* G, double* B, int64_t* counts,
                          cudaStream_t stream, GramKernel kernel) {
  check_rows_view(x, "x");
  check_clip(clip_norm);
  DPFC_EXPECTS(G != nullptr && B != nullptr && counts != nullptr, "out: null device pointer");
  const OuterEngine engine = gram_engine(accum, kernel);
  ClassSort cs;
  class_sort(labels, x.n, K, counts, cs, stream);
  DeviceBuffer scales(static_cast<std::size_t>(x.n) * sizeof(double), stream);
  // Rows with a label outside [0, K) are not visited by the class pass: give them scale 0
  // first so the Gram and the class sums see the same rows (ops validates labels anyway).
  DPFC_CUDA_CHECK(cudaMemsetAsync(scales.as<double>(), 0, scales.bytes(), stream));
  run_class_sums(x, cs, K, clip_norm, scales.as<double>(), B, stream);
  run_sym_grams(x, scales.as<double>(), nullptr, 0, nullptr, nullptr, 1, engine, G, stream);
}

void launch_clipped_class_grams(const RowsView& x, const int32_t* labels, int64_t K,
                                double clip_norm, double* A, cudaStream_t stream,
                                GramKernel kernel) {
  check_rows_view(x, "x");
  check_clip(clip_norm);
  DPFC_EXPECTS(A != nullptr, "out: null device pointer");
  const OuterEngine engine = gram_engine(GramAccum::kFloat64, kernel);
  ClassSort cs;
  class_sort(labels, x.n, K, nullptr, cs, stream);
  DeviceBuffer scales(static_cast<std::size_t>(x.n) * sizeof(double), stream);
  launch_row_norms(x, clip_norm, nullptr, scales.as<double>(), stream);
  run_sym_grams(x, scales.as<double>(), nullptr, 0, cs.perm, cs.offsets, K, engine, A, stream);
}

void launch_clipped_weighted_grams(const RowsView& x, const double* w, int64_t ldw, int64_t K,
                                   double clip_norm, double* H, cudaStream_t stream,
                                   GramKernel kernel) {
  check_rows_view(x, "x");
  check_clip(clip_norm);
  DPFC_EXPECTS(w != nullptr, "weights: null device pointer");
  DPFC_EXPECTS(K >= 1 && ldw >= K, "weights: row stride must be >= num_classes");
  DPFC_EXPECTS(H != nullptr, "out: null device pointer");
  const OuterEngine engine = gram_engine(GramAccum::kFloat64, kernel);
  DeviceBuffer scales(static_cast<std::size_t>(x.n) * sizeof(double), stream);
  launch_row_norms(x, clip_norm, nullptr, scales.as<double>(), stream);
  run_sym_grams(x, scales.as<double>(), w, ldw, nullptr, nullptr, K, engine, H, stream);
}

}  // namespace dpfc::cuda
