// Kernels and launchers of the clipped-statistics family (see stats.cuh for the semantics).
//
// Design (n >> d; ImageNet-shaped features are 1281167 x 1664):
//  * Row norms: one warp per row, float64 sums of squares, butterfly reduction (so every
//    lane holds the same, deterministic value), rescaled recomputation on overflow.
//  * Gram = SYRK on the upper triangle of output tiles. Few output tiles exist when d is
//    small, so the reduction over rows is split over S blocks per tile (S chosen to fill the
//    device in near-whole waves); each (tile, split) block writes its own partial, and a
//    fixed-order reduction sums the splits and mirrors the upper triangle. No atomics: the
//    result is bit-reproducible run to run.
//  * Engines (one kernel each; the input dtype is a run-time switch in the tile loader):
//      kMmaF64  : 128x128 tile, 16 rows per stage, 8 warps of 64x32, DMMA: mma.sync m16n8k8
//                 f64 on sm_90 (layout next to dmma_16x8x8), m8n8k4 f64 on sm_80 (and on sm_90
//                 with DPFC_GRAM_KERNEL=mma884: kMma884F64). m8n8k4 fragment layout (PTX ISA,
//                 "Matrix Fragments for mma.m8n8k4 with .f64 floating point type"; same as
//                 CUTLASS SM80_8x8x4_F64F64F64F64_TN):
//                   A (8x4, row): a0 = A[lane/4][lane%4]
//                   B (4x8, col): b0 = B[lane%4][lane/4]
//                   C/D (8x8):    c_i = C[lane/4][2*(lane%4) + i], i = 0, 1
//      kSimtF64 : 64x64 tile, 8 rows per stage, 256 threads with 4x4 double micro-tiles.
//      kSimtF32 : 128x128 tile, 8 rows per stage, 256 threads with 8x8 float micro-tiles;
//                 float accumulators are flushed into the float64 output every
//                 kFloat32BlockRows rows (the "float32 blocks reduced in float64" mode).
//      kTcTF32 / kTcBF16 (exploration modes "tf32" / "bf16"): 128x128 tile, 32 rows per stage,
//                 8 warps of 64x32, mma.sync m16n8k8 tf32 / m16n8k16 bf16 with float
//                 accumulators flushed to float64 as in kSimtF32. Fragment layouts (PTX ISA,
//                 "Matrix Fragments for mma.m16n8k8" (.tf32) and "for mma.m16n8k16 with
//                 floating point type" (.bf16)), g = lane / 4, t = lane % 4:
//                   A: a0 (g, k=t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)   [tf32]
//                      a0 (g, k=2t..2t+1), a1 (g+8, ..), a2 (g, 2t+8..), a3 (g+8, 2t+8..) [bf16]
//                   B: b0 (k=t, n=g), b1 (t+4, g)  [tf32];  b0 (2t..2t+1, g), b1 (2t+8.., g) [bf16]
//                   C: c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
//                 Shared tiles hold 32-bit words [k][m] (tf32) or [k/2][m] bf16 pairs (low
//                 half = even k), so both modes load fragments with identical word indexing.
//    In a diagonal tile of a symmetric problem, the warps of the MMA engines whose 64x32 warp
//    tile lies strictly below the diagonal skip their MMAs (2 of 8 warps): that part is never
//    read (the reduction mirrors the upper triangle).
//    All engines stage tiles through registers into double-buffered shared memory (one
//    barrier per stage), apply the per-row clip scale (and weight) while staging, and take
//    rows through an optional permutation (per-class segments).
//  * Class sums and counts: a stable counting sort of the labels (chunk histograms, a scan,
//    warp-level ranking with __match_any_sync), then one fused pass in class order that
//    computes each row's norm and scale and adds the scaled row to its class, in a fixed
//    order (deterministic, no floating-point atomics).
#include "cuda/stats.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "common/clip.hpp"
#include "common/errors.hpp"

namespace dpfc::cuda {

// ============================================================================================
// Host utilities
// ============================================================================================

int dtype_size(int dtype) {
  switch (dtype) {
    case kFloat32: return 4;
    case kFloat64: return 8;
    case kFloat16: return 2;
    case kBFloat16: return 2;
    default: return 0;
  }
}

bool dtype_valid(int dtype) { return dtype_size(dtype) > 0; }

void check_rows_view(const RowsView& x, const char* name) {
  const std::string nm(name);
  DPFC_EXPECTS(x.data != nullptr, nm + ": null device pointer");
  DPFC_EXPECTS(dtype_valid(x.dtype), nm + ": invalid dtype code");
  DPFC_EXPECTS(x.n >= 1 && x.d >= 1, nm + ": extents must be >= 1");
  DPFC_EXPECTS(x.n == 1 || x.ld >= x.d, nm + ": row stride must be >= d");
  DPFC_EXPECTS(x.n < (int64_t{1} << 31), nm + ": at most 2^31 - 1 rows");
  DPFC_EXPECTS(x.d < (int64_t{1} << 31), nm + ": at most 2^31 - 1 columns");
}

namespace {

constexpr int kMaxDevices = 64;
std::mutex g_pool_mutex;
cudaMemPool_t g_pools[kMaxDevices] = {};

cudaMemPool_t device_pool(int dev) {
  DPFC_EXPECTS(dev >= 0 && dev < kMaxDevices, "device ordinal out of range");
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_pools[dev] == nullptr) {
    cudaMemPoolProps props;
    std::memset(&props, 0, sizeof(props));
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = dev;
    cudaMemPool_t pool = nullptr;
    DPFC_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
    uint64_t threshold = uint64_t{1} << 30;  // keep up to 1 GiB cached between calls
    DPFC_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
    g_pools[dev] = pool;
  }
  return g_pools[dev];
}

int current_device() {
  int dev = 0;
  DPFC_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

}  // namespace

DeviceBuffer::DeviceBuffer(std::size_t bytes, cudaStream_t stream) : bytes_(bytes), stream_(stream) {
  if (bytes == 0) return;
  cudaMemPool_t pool = device_pool(current_device());
  const cudaError_t err = cudaMallocFromPoolAsync(&ptr_, bytes, pool, stream);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so later launch checks do not report it
    ptr_ = nullptr;
    bytes_ = 0;
    throw CudaError(std::string("CUDA error ") + cudaGetErrorName(err) + ": " +
                    cudaGetErrorString(err) + " allocating " + std::to_string(bytes) +
                    " bytes of workspace");
  }
}

void clear_stale_cuda_error() { cudaGetLastError(); }

void DeviceBuffer::release() noexcept {
  if (ptr_ != nullptr) {
    // Never throw from a destructor; a failure here leaves the block to the pool.
    if (cudaFreeAsync(ptr_, stream_) != cudaSuccess) cudaGetLastError();
    ptr_ = nullptr;
    bytes_ = 0;
  }
}

DeviceBuffer::~DeviceBuffer() { release(); }

int current_sm_count() {
  int v = 0;
  DPFC_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, current_device()));
  return std::max(1, v);
}

int current_cc() {
  const int dev = current_device();
  int major = 0, minor = 0;
  DPFC_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  DPFC_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return major * 10 + minor;
}

GramKernel resolve_gram_kernel(GramKernel requested) {
  GramKernel k = requested;
  if (k == GramKernel::kAuto) {
    const char* env = std::getenv("DPFC_GRAM_KERNEL");
    const std::string v = env ? std::string(env) : std::string();
    if (v == "simt") {
      k = GramKernel::kSimt;
    } else if (v == "mma884") {
      k = GramKernel::kMma884;
    } else {
      DPFC_EXPECTS(v.empty() || v == "mma" || v == "auto",
                   "DPFC_GRAM_KERNEL must be 'mma', 'mma884', 'simt' or 'auto'");
      k = GramKernel::kMma;
    }
  }
  if ((k == GramKernel::kMma || k == GramKernel::kMma884) && current_cc() < 80) {
    k = GramKernel::kSimt;  // no DMMA before sm_80
  }
  return k;
}

// ============================================================================================
// Device helpers
// ============================================================================================

namespace {

__device__ __forceinline__ double to_double(float v) { return static_cast<double>(v); }
__device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ double to_double(__half v) { return static_cast<double>(__half2float(v)); }
__device__ __forceinline__ double to_double(__nv_bfloat16 v) {
  return static_cast<double>(__bfloat162float(v));
}
// Runs BODY with T bound to the storage type of dtype code CODE (device or host).
#define DPFC_DISPATCH_DTYPE(CODE, T, ...)        \
  switch (CODE) {                                \
    case kFloat32: {                             \
      using T = float;                           \
      __VA_ARGS__;                               \
    } break;                                     \
    case kFloat64: {                             \
      using T = double;                          \
      __VA_ARGS__;                               \
    } break;                                     \
    case kFloat16: {                             \
      using T = __half;                          \
      __VA_ARGS__;                               \
    } break;                                     \
    default: {                                   \
      using T = __nv_bfloat16;                   \
      __VA_ARGS__;                               \
    } break;                                     \
  }

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
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

// ============================================================================================
// Row norms and clip_rows
// ============================================================================================

__global__ void __launch_bounds__(256) row_norms_kernel(const void* __restrict__ x, int dtype,
                                                        int64_t n, int64_t d, int64_t ld,
                                                        double clip_norm, double* norms,
                                                        double* scales) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t i = warp; i < n; i += nwarps) {
    double nrm = 0.0;
    DPFC_DISPATCH_DTYPE(dtype, T,
                        nrm = warp_row_norm(static_cast<const T*>(x) + i * ld, d, lane));
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
__global__ void __launch_bounds__(256) clip_rows_kernel(const T* __restrict__ x, int64_t n,
                                                        int64_t d, int64_t ld, double clip_norm,
                                                        T* __restrict__ out, int64_t ldo,
                                                        double* scales) {
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
__global__ void __launch_bounds__(256) scale_rows_kernel(const T* __restrict__ x, int64_t n,
                                                         int64_t d, int64_t ld,
                                                         const double* __restrict__ scales,
                                                         T* __restrict__ out, int64_t ldo) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t i = warp; i < n; i += nwarps) {
    warp_scale_row(x + i * ld, d, scales[i], out + i * ldo, lane);
  }
}

unsigned rows_grid(int64_t n, int warps_per_block) {
  const int64_t want = (n + warps_per_block - 1) / warps_per_block;
  const int64_t cap = static_cast<int64_t>(current_sm_count()) * 32;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(want, cap)));
}

}  // namespace

void launch_row_norms(const RowsView& x, double clip_norm, double* norms, double* scales,
                      cudaStream_t stream) {
  check_rows_view(x, "x");
  row_norms_kernel<<<rows_grid(x.n, 8), 256, 0, stream>>>(x.data, x.dtype, x.n, x.d, x.ld,
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
  const unsigned grid = rows_grid(x.n, 8);
  if (x.dtype == kFloat32) {
    clip_rows_kernel<float><<<grid, 256, 0, stream>>>(static_cast<const float*>(x.data), x.n,
                                                      x.d, x.ld, clip_norm,
                                                      static_cast<float*>(out), ldo, scales);
  } else {
    clip_rows_kernel<double><<<grid, 256, 0, stream>>>(static_cast<const double*>(x.data), x.n,
                                                       x.d, x.ld, clip_norm,
                                                       static_cast<double*>(out), ldo, scales);
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
  const unsigned grid = rows_grid(x.n, 8);
  if (x.dtype == kFloat32) {
    scale_rows_kernel<float><<<grid, 256, 0, stream>>>(static_cast<const float*>(x.data), x.n,
                                                       x.d, x.ld, scales,
                                                       static_cast<float*>(out), ldo);
  } else {
    scale_rows_kernel<double><<<grid, 256, 0, stream>>>(static_cast<const double*>(x.data), x.n,
                                                        x.d, x.ld, scales,
                                                        static_cast<double*>(out), ldo);
  }
  DPFC_CUDA_CHECK_LAUNCH();
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
__global__ void __launch_bounds__(1024) offsets_scan_kernel(const int64_t* __restrict__ counts,
                                                            int64_t K, int64_t* offsets) {
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
  label_hist_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
      labels, n, K, chunk, hist.as<int32_t>());
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
constexpr int kCsCols = 8;                            // columns per thread
constexpr int64_t kCsRange = kCsThreads * kCsCols;    // columns per block (grid.y ranges)

// Block (l * P + p, y): piece p of class l's segment, columns [y * kCsRange, ...). Each warp
// takes one row of a batch of 8: its norm and scale; then every thread adds the 8 scaled rows
// to its columns in batch order (deterministic). out[(l * P + p) * d + c] = piece sum.
template <typename T>
__global__ void __launch_bounds__(kCsThreads, 2) norm_class_sum_kernel(
    const T* __restrict__ x, int64_t d, int64_t ld, double clip_norm,
    const int32_t* __restrict__ perm, const int64_t* __restrict__ offsets, int64_t P,
    double* __restrict__ scales, double* __restrict__ out) {
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

unsigned grid_for(int64_t total, int threads) {
  const int64_t want = (total + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(current_sm_count()) * 16;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(want, cap)));
}

// B (K x d) and scales[n] from the class-sorted rows.
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
                          static_cast<const T*>(x.data), x.d, x.ld, clip_norm, cs.perm,
                          cs.offsets, P, scales, dst));
  DPFC_CUDA_CHECK_LAUNCH();
  if (P > 1) {
    sum_pieces_kernel<<<grid_for(K * x.d, 256), 256, 0, stream>>>(dst, K, P, x.d, B);
    DPFC_CUDA_CHECK_LAUNCH();
  }
}

// ============================================================================================
// Outer-product engines
// ============================================================================================

struct OuterArgs {
  const void* a;
  const void* b;
  int64_t lda, ldb;
  int dtype;
  int sym;
  int beta;
  int64_t M, N;
  const double* a_scale;
  const double* b_scale;
  const double* w;
  int64_t ldw;
  const int32_t* perm;
  const int64_t* seg;
  int64_t n;
  int64_t L, S, T, tiles_n;
  double* out;
  int64_t out_ld, out_lstride, out_sstride;
  int64_t flush_stages;
};

struct BlockJob {
  int64_t m0, n0, l, s, rb, re;
};

// Upper-triangular tile index t = tj (tj + 1) / 2 + ti, 0 <= ti <= tj.
__device__ __forceinline__ void tri_decode(int64_t t, int64_t* ti, int64_t* tj) {
  int64_t c = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) * 0.5);
  while (c > 0 && c * (c + 1) / 2 > t) --c;
  while ((c + 1) * (c + 2) / 2 <= t) ++c;
  *tj = c;
  *ti = t - c * (c + 1) / 2;
}

template <int TILE>
__device__ __forceinline__ BlockJob decode_block(const OuterArgs& p) {
  const int64_t bid = blockIdx.x;
  const int64_t t = bid % p.T;
  const int64_t rest = bid / p.T;
  BlockJob j;
  j.s = rest % p.S;
  j.l = rest / p.S;
  int64_t ti, tj;
  if (p.sym) {
    tri_decode(t, &ti, &tj);
  } else {
    ti = t / p.tiles_n;
    tj = t - ti * p.tiles_n;
  }
  j.m0 = ti * TILE;
  j.n0 = tj * TILE;
  int64_t sb = 0, se = p.n;
  if (p.seg != nullptr) {
    sb = p.seg[j.l];
    se = p.seg[j.l + 1];
  }
  const int64_t len = se - sb;
  j.rb = sb + len * j.s / p.S;
  j.re = sb + len * (j.s + 1) / p.S;
  return j;
}

// Stages rows [rbase, rbase + BK) of the A and B tiles into registers, scaled and converted.
// TPR = NT / BK threads share a row: thread tid holds row k = tid / TPR, columns
// m = tid % TPR + TPR * c (c < BM / TPR): coalesced global loads, conflict-free stores, and
// the row's permutation entry and factors are read once per stage.
template <typename T, typename AccT, int BM, int BK, int NT>
__device__ __forceinline__ void load_rows_tile(const OuterArgs& p, const BlockJob& job,
                                               int64_t rbase, int tid, AccT* ra, AccT* rb) {
  constexpr int TPR = NT / BK;
  constexpr int EPT = BM / TPR;
  const int k = tid / TPR, c0 = tid % TPR;
  const int64_t r = rbase + k;
#pragma unroll
  for (int c = 0; c < EPT; ++c) {
    ra[c] = AccT(0);
    rb[c] = AccT(0);
  }
  if (r < job.re) {
    const int64_t pr = p.perm != nullptr ? static_cast<int64_t>(p.perm[r]) : r;
    double fa = p.a_scale != nullptr ? p.a_scale[pr] : 1.0;
    if (p.w != nullptr) fa *= p.w[pr * p.ldw + job.l];
    const double fb = p.b_scale != nullptr ? p.b_scale[pr] : 1.0;
    const T* arow = static_cast<const T*>(p.a) + pr * p.lda + job.m0;
    const T* brow = static_cast<const T*>(p.b) + pr * p.ldb + job.n0;
    const int64_t ma = p.M - job.m0, nb = p.N - job.n0;
    // xbar = s x in float64, then (float engines) rounded once to float: the same values as
    // the CPU path's float32 blocks, and no overflow for float64 inputs beyond float range.
#pragma unroll
    for (int c = 0; c < EPT; ++c) {
      const int m = c0 + TPR * c;
      if (m < ma) ra[c] = static_cast<AccT>(to_double(arow[m]) * fa);
      if (m < nb) rb[c] = static_cast<AccT>(to_double(brow[m]) * fb);
    }
  }
}

template <typename AccT, int BM, int BK, int NT>
__device__ __forceinline__ void load_rows_tile_any(const OuterArgs& p, const BlockJob& job,
                                                   int64_t rbase, int tid, AccT* ra, AccT* rb) {
  DPFC_DISPATCH_DTYPE(p.dtype, T, (load_rows_tile<T, AccT, BM, BK, NT>(p, job, rbase, tid, ra, rb)));
}

// Writes the staged registers into shared tiles As, Bs ([BK][LDS]) at the loader's layout.
template <typename AccT, int BM, int BK, int NT, int LDS>
__device__ __forceinline__ void store_rows_tile(AccT* As, AccT* Bs, int tid, const AccT* ra,
                                                const AccT* rb) {
  constexpr int TPR = NT / BK;
  constexpr int EPT = BM / TPR;
  const int k = tid / TPR, c0 = tid % TPR;
#pragma unroll
  for (int c = 0; c < EPT; ++c) {
    As[k * LDS + c0 + TPR * c] = ra[c];
    Bs[k * LDS + c0 + TPR * c] = rb[c];
  }
}

// Hides a value from loop-invariant code motion (keeps the rarely run flush from pinning
// 64 precomputed output addresses in registers for the whole main loop).
template <typename V>
__device__ __forceinline__ V opaque(V v) {
  static_assert(sizeof(V) == 8 || sizeof(V) == 4, "opaque: 4 or 8 bytes");
  if constexpr (sizeof(V) == 8) {
    asm volatile("" : "+l"(v));
  } else {
    asm volatile("" : "+r"(v));
  }
  return v;
}

template <typename AccT, int H>
__device__ __forceinline__ void load_vec16(const AccT* ptr, AccT* v) {
  static_assert(H * sizeof(AccT) == 16, "16-byte shared-memory vectors");
  if constexpr (sizeof(AccT) == 4) {
    const float4 t = *reinterpret_cast<const float4*>(ptr);
    v[0] = t.x;
    v[1] = t.y;
    v[2] = t.z;
    v[3] = t.w;
  } else {
    const double2 t = *reinterpret_cast<const double2*>(ptr);
    v[0] = t.x;
    v[1] = t.y;
  }
}

// Row (or column) of micro-tile element i of thread coordinate t: two groups of TM/2
// consecutive indices, BM/2 apart (conflict-free 16-byte shared loads).
template <int BM, int TM>
__device__ __forceinline__ int micro_index(int t, int i) {
  constexpr int H = TM / 2;
  return i < H ? t * H + i : BM / 2 + t * H + (i - H);
}

// acc += As^T Bs for one stage (As, Bs: [BK][LDS], element (k, m)).
template <typename AccT, int BM, int BK, int TM, int LDS>
__device__ __forceinline__ void simt_stage(const AccT* __restrict__ As, const AccT* __restrict__ Bs,
                                           int tx, int ty, AccT (&acc)[TM][TM]) {
  constexpr int H = TM / 2;
#pragma unroll
  for (int k = 0; k < BK; ++k) {
    AccT a[TM], b[TM];
    load_vec16<AccT, H>(As + k * LDS + ty * H, a);
    load_vec16<AccT, H>(As + k * LDS + BM / 2 + ty * H, a + H);
    load_vec16<AccT, H>(Bs + k * LDS + tx * H, b);
    load_vec16<AccT, H>(Bs + k * LDS + BM / 2 + tx * H, b + H);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int j = 0; j < TM; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
  }
}

// out (+)= acc for the thread's micro-tile; zeroes acc.
template <typename AccT, int BM, int TM>
__device__ __forceinline__ void simt_flush(const OuterArgs& p, const BlockJob& job, int tx_in,
                                           int ty_in, AccT (&acc)[TM][TM], bool add) {
  double* o = opaque(p.out + job.l * p.out_lstride + job.s * p.out_sstride);
  const int64_t m0 = opaque(job.m0), n0 = opaque(job.n0);
  const int tx = opaque(tx_in), ty = opaque(ty_in);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + micro_index<BM, TM>(ty, i);
#pragma unroll
    for (int j = 0; j < TM; ++j) {
      const int64_t nn = n0 + micro_index<BM, TM>(tx, j);
      if (m < p.M && nn < p.N) {
        double* q = o + m * p.out_ld + nn;
        *q = (add ? *q : 0.0) + static_cast<double>(acc[i][j]);
      }
      acc[i][j] = AccT(0);
    }
  }
}

// SIMT engine: BM x BM output tile, BK rows per stage, (BM/TM)^2 threads of TM x TM.
template <typename AccT, int BM, int BK, int TM>
__global__ void __launch_bounds__((BM / TM) * (BM / TM), 2)
    outer_simt_kernel(const OuterArgs p) {
  constexpr int NT = (BM / TM) * (BM / TM);
  constexpr int EPT = BK * BM / NT;
  static_assert(NT % BK == 0 && BM % (NT / BK) == 0, "tile configuration");
  static_assert((BM / TM) * (TM / 2) * 2 == BM, "micro-tile layout");
  __shared__ __align__(16) AccT As[2][BK][BM];
  __shared__ __align__(16) AccT Bs[2][BK][BM];
  const int tid = threadIdx.x;
  const int tx = tid % (BM / TM), ty = tid / (BM / TM);
  const BlockJob job = decode_block<BM>(p);
  AccT acc[TM][TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TM; ++j) acc[i][j] = AccT(0);
  }
  AccT ra[EPT], rb[EPT];
  const int64_t nstages = job.re > job.rb ? (job.re - job.rb + BK - 1) / BK : 0;
  if (nstages > 0) {
    load_rows_tile_any<AccT, BM, BK, NT>(p, job, job.rb, tid, ra, rb);
    store_rows_tile<AccT, BM, BK, NT, BM>(&As[0][0][0], &Bs[0][0][0], tid, ra, rb);
  }
  __syncthreads();
  bool first = true;
  int64_t since = 0;
  for (int64_t st = 0; st < nstages; ++st) {
    const int cur = static_cast<int>(st & 1);
    const bool more = st + 1 < nstages;
    if (more) load_rows_tile_any<AccT, BM, BK, NT>(p, job, job.rb + (st + 1) * BK, tid, ra, rb);
    simt_stage<AccT, BM, BK, TM, BM>(&As[cur][0][0], &Bs[cur][0][0], tx, ty, acc);
    if (more) store_rows_tile<AccT, BM, BK, NT, BM>(&As[cur ^ 1][0][0], &Bs[cur ^ 1][0][0], tid, ra, rb);
    __syncthreads();
    if (p.flush_stages > 0 && ++since == p.flush_stages && more) {
      simt_flush<AccT, BM, TM>(p, job, tx, ty, acc, first ? p.beta != 0 : true);
      first = false;
      since = 0;
    }
  }
  simt_flush<AccT, BM, TM>(p, job, tx, ty, acc, first ? p.beta != 0 : true);
}

// ---- DMMA engine -----------------------------------------------------------------------------
constexpr int kMmaTile = 128;
constexpr int kMmaBK = 16;
constexpr int kMmaLDS = kMmaTile + 4;  // (4k + g) mod 16 distinct: conflict-free fragment loads
constexpr int kMmaThreads = 256;
constexpr int kMmaSmemBytes = 2 * 2 * kMmaBK * kMmaLDS * static_cast<int>(sizeof(double));

// D = A B + C on one 8x8x4 double tile (see the fragment layout in the file header).
__device__ __forceinline__ void dmma_8x8x4(double& c0, double& c1, double a, double b) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
               : "+d"(c0), "+d"(c1)
               : "d"(a), "d"(b));
#else
  (void)c0;
  (void)c1;
  (void)a;
  (void)b;
  __trap();
#endif
}

// The m16n8k8 operand fragments of a warp's 64 x 32 tile for k-step row r0 (= 8 ks + lane % 4)
// from shared stages stored [k][column] with row stride LDS; as and bs already point at the
// warp's columns plus lane / 4. a[q]: rows 16 q and 16 q + 8 at k rows r0 and r0 + 4; b[nt]:
// column 8 nt at the same k rows. One layout for the f64 DMMA (PTX .f64 = the .tf32 layout)
// and the tf32 / bf16 words of the float engine (bf16: one word = two k values).
template <int LDS, typename T>
__device__ __forceinline__ void load_frags_m16n8k8(const T* as, const T* bs, int r0,
                                                   T (&a)[4][4], T (&b)[4][2]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    a[q][0] = as[r0 * LDS + q * 16];
    a[q][1] = as[r0 * LDS + q * 16 + 8];
    a[q][2] = as[(r0 + 4) * LDS + q * 16];
    a[q][3] = as[(r0 + 4) * LDS + q * 16 + 8];
  }
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    b[nt][0] = bs[r0 * LDS + nt * 8];
    b[nt][1] = bs[(r0 + 4) * LDS + nt * 8];
  }
}

// D = A B + C on one 16x8x8 double tile (sm_90). Fragments: a0 (g, t), a1 (g+8, t),
// a2 (g, t+4), a3 (g+8, t+4); b0 (t, g), b1 (t+4, g); c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t),
// c3 (g+8, 2t+1) (PTX ISA "Matrix Fragments for mma.m16n8k8", .f64 = the .tf32 layout;
// CUTLASS SM90_16x8x8_F64F64F64F64_TN).
__device__ __forceinline__ void dmma_16x8x8(double (&c)[4], const double (&a)[4],
                                            const double (&b)[2]) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f64.f64.f64.f64 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+d"(c[0]), "+d"(c[1]), "+d"(c[2]), "+d"(c[3])
      : "d"(a[0]), "d"(a[1]), "d"(a[2]), "d"(a[3]), "d"(b[0]), "d"(b[1]));
#else
  (void)c;
  (void)a;
  (void)b;
  __trap();
#endif
}

// 8 warps as 2 (rows) x 4 (columns); warp tile 64 x 32 = 8 x 4 m8n8k4 tiles (M16 = false) or
// 4 x 4 m16n8k8 tiles (M16 = true, sm_90 only). Both hold 64 accumulators per thread.
template <bool M16>
__global__ void __launch_bounds__(kMmaThreads, 1) outer_mma_kernel(const OuterArgs p) {
  extern __shared__ __align__(16) double mma_smem[];
  double* As = mma_smem;                          // [2][kMmaBK][kMmaLDS]
  double* Bs = mma_smem + 2 * kMmaBK * kMmaLDS;   // [2][kMmaBK][kMmaLDS]
  constexpr int EPT = kMmaBK * kMmaTile / kMmaThreads;  // 8
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int g = lane >> 2, tig = lane & 3;
  const BlockJob job = decode_block<kMmaTile>(p);
  const bool skip_lower = p.sym && job.m0 == job.n0 && wm * 64 >= wn * 32 + 32;
  double acc[8][4][2];  // M16: acc[2q + (i >> 1)][nt][i & 1] holds c_i of m16 tile q
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = 0.0;
  }
  double ra[EPT], rb[EPT];
  const int64_t nstages = job.re > job.rb ? (job.re - job.rb + kMmaBK - 1) / kMmaBK : 0;
  if (nstages > 0) {
    load_rows_tile_any<double, kMmaTile, kMmaBK, kMmaThreads>(p, job, job.rb, tid, ra, rb);
    store_rows_tile<double, kMmaTile, kMmaBK, kMmaThreads, kMmaLDS>(As, Bs, tid, ra, rb);
  }
  __syncthreads();
  for (int64_t st = 0; st < nstages; ++st) {
    const int cur = static_cast<int>(st & 1);
    const bool more = st + 1 < nstages;
    if (more) {
      load_rows_tile_any<double, kMmaTile, kMmaBK, kMmaThreads>(p, job, job.rb + (st + 1) * kMmaBK,
                                                                tid, ra, rb);
    }
    const double* as = As + cur * kMmaBK * kMmaLDS + wm * 64 + g;
    const double* bs = Bs + cur * kMmaBK * kMmaLDS + wn * 32 + g;
    if (skip_lower) {
      // Warp tile strictly below the diagonal of a diagonal tile: never read (mirrored).
    } else if constexpr (M16) {
#pragma unroll
      for (int ks = 0; ks < kMmaBK / 8; ++ks) {
        double a[4][4], b[4][2];
        load_frags_m16n8k8<kMmaLDS>(as, bs, ks * 8 + tig, a, b);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            double c[4] = {acc[2 * q][nt][0], acc[2 * q][nt][1], acc[2 * q + 1][nt][0],
                           acc[2 * q + 1][nt][1]};
            dmma_16x8x8(c, a[q], b[nt]);
            acc[2 * q][nt][0] = c[0];
            acc[2 * q][nt][1] = c[1];
            acc[2 * q + 1][nt][0] = c[2];
            acc[2 * q + 1][nt][1] = c[3];
          }
        }
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < kMmaBK / 4; ++kk) {
        const int k = kk * 4 + tig;
        double a[8], b[4];
#pragma unroll
        for (int mt = 0; mt < 8; ++mt) a[mt] = as[k * kMmaLDS + mt * 8];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) b[nt] = bs[k * kMmaLDS + nt * 8];
#pragma unroll
        for (int mt = 0; mt < 8; ++mt) {
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) dmma_8x8x4(acc[mt][nt][0], acc[mt][nt][1], a[mt], b[nt]);
        }
      }
    }
    if (more) {
      store_rows_tile<double, kMmaTile, kMmaBK, kMmaThreads, kMmaLDS>(
          As + (cur ^ 1) * kMmaBK * kMmaLDS, Bs + (cur ^ 1) * kMmaBK * kMmaLDS, tid, ra, rb);
    }
    __syncthreads();
  }
  // Both layouts: acc[r][nt][i] is element (row 8 r + g, column 8 nt + 2 tig + i) of the
  // warp tile (m16 tile q = rows 16 q .. 16 q + 15 = 8-row blocks 2q and 2q + 1).
  double* o = p.out + job.l * p.out_lstride + job.s * p.out_sstride;
  const bool add = p.beta != 0;
#pragma unroll
  for (int mt = 0; mt < 8; ++mt) {
    const int64_t mm = job.m0 + wm * 64 + mt * 8 + g;
    if (mm >= p.M) continue;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int64_t nn = job.n0 + wn * 32 + nt * 8 + 2 * tig + i;
        if (nn < p.N) {
          double* q = o + mm * p.out_ld + nn;
          *q = (add ? *q : 0.0) + acc[mt][nt][i];
        }
      }
    }
  }
}

// ---- Tensor-core float engine (tf32 / bf16 operands, float accumulation) ------------------------
constexpr int kTcTile = 128;
constexpr int kTcBK = 32;     // rows of X per stage
constexpr int kTcLDW = 136;   // words per shared row: (8 t + g) mod 32 distinct (conflict-free)
constexpr int kTcThreads = 256;

template <bool BF16>
struct TcCfg {
  static constexpr int kRows = BF16 ? kTcBK / 2 : kTcBK;  // word rows per stage and operand
  static constexpr int kSteps = kRows / 8;                // mma k-steps per stage
  static constexpr int kSmemBytes = 2 * 2 * kRows * kTcLDW * 4;
};

__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
#else
  r = __float_as_uint(v);
#endif
  return r;
}

template <bool BF16>
__device__ __forceinline__ void tc_mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  (void)c;
  (void)a;
  (void)b;
  __trap();
#endif
}

// Staged floats (loader layout: row k = tid / 8, columns tid % 8 + 8 c) -> shared words.
template <bool BF16>
__device__ __forceinline__ void tc_store(uint32_t* As, uint32_t* Bs, int tid, const float* ra,
                                         const float* rb) {
  constexpr int TPR = kTcThreads / kTcBK;  // 8
  constexpr int EPT = kTcTile / TPR;       // 16
  const int k = tid / TPR, c0 = tid % TPR;
#pragma unroll
  for (int c = 0; c < EPT; ++c) {
    const int m = c0 + TPR * c;
    if constexpr (BF16) {
      __nv_bfloat16* ah = reinterpret_cast<__nv_bfloat16*>(As);
      __nv_bfloat16* bh = reinterpret_cast<__nv_bfloat16*>(Bs);
      const int h = ((k >> 1) * kTcLDW + m) * 2 + (k & 1);
      ah[h] = __float2bfloat16_rn(ra[c]);
      bh[h] = __float2bfloat16_rn(rb[c]);
    } else {
      As[k * kTcLDW + m] = to_tf32(ra[c]);
      Bs[k * kTcLDW + m] = to_tf32(rb[c]);
    }
  }
}

// out (+)= acc for the warp's 64x32 tile; zeroes acc.
__device__ __forceinline__ void tc_flush(const OuterArgs& p, const BlockJob& job, int wm_in,
                                         int wn_in, int lane_in, float (&acc)[4][4][4], bool add) {
  double* o = opaque(p.out + job.l * p.out_lstride + job.s * p.out_sstride);
  const int64_t m0 = opaque(job.m0), n0 = opaque(job.n0);
  const int wm = opaque(wm_in), wn = opaque(wn_in), lane = opaque(lane_in);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = m0 + wm * 64 + mt * 16 + g + (i >> 1) * 8;
        const int64_t nn = n0 + wn * 32 + nt * 8 + 2 * t + (i & 1);
        if (m < p.M && nn < p.N) {
          double* q = o + m * p.out_ld + nn;
          *q = (add ? *q : 0.0) + static_cast<double>(acc[mt][nt][i]);
        }
        acc[mt][nt][i] = 0.0f;
      }
    }
  }
}

template <bool BF16>
__global__ void __launch_bounds__(kTcThreads, 1) outer_tc_kernel(const OuterArgs p) {
  using Cfg = TcCfg<BF16>;
  extern __shared__ __align__(16) uint32_t tc_smem[];
  uint32_t* As = tc_smem;                              // [2][kRows][kTcLDW]
  uint32_t* Bs = tc_smem + 2 * Cfg::kRows * kTcLDW;    // [2][kRows][kTcLDW]
  constexpr int STAGE = Cfg::kRows * kTcLDW;
  constexpr int EPT = kTcBK * kTcTile / kTcThreads;    // 16
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int g = lane >> 2, t = lane & 3;
  const BlockJob job = decode_block<kTcTile>(p);
  const bool skip_lower = p.sym && job.m0 == job.n0 && wm * 64 >= wn * 32 + 32;
  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
    }
  }
  float ra[EPT], rb[EPT];
  const int64_t nstages = job.re > job.rb ? (job.re - job.rb + kTcBK - 1) / kTcBK : 0;
  if (nstages > 0) {
    load_rows_tile_any<float, kTcTile, kTcBK, kTcThreads>(p, job, job.rb, tid, ra, rb);
    tc_store<BF16>(As, Bs, tid, ra, rb);
  }
  __syncthreads();
  bool first = true;
  int64_t since = 0;
  for (int64_t st = 0; st < nstages; ++st) {
    const int cur = static_cast<int>(st & 1);
    const bool more = st + 1 < nstages;
    if (more) {
      load_rows_tile_any<float, kTcTile, kTcBK, kTcThreads>(p, job, job.rb + (st + 1) * kTcBK,
                                                            tid, ra, rb);
    }
    const uint32_t* as = As + cur * STAGE + wm * 64 + g;
    const uint32_t* bs = Bs + cur * STAGE + wn * 32 + g;
#pragma unroll
    for (int ks = 0; ks < Cfg::kSteps; ++ks) {
      if (skip_lower) break;  // warp tile below the diagonal of a diagonal tile: unused
      uint32_t a[4][4], b[4][2];
      load_frags_m16n8k8<kTcLDW>(as, bs, ks * 8 + t, a, b);
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) tc_mma<BF16>(acc[mt][nt], a[mt], b[nt]);
      }
    }
    if (more) tc_store<BF16>(As + (cur ^ 1) * STAGE, Bs + (cur ^ 1) * STAGE, tid, ra, rb);
    __syncthreads();
    if (p.flush_stages > 0 && ++since == p.flush_stages && more) {
      tc_flush(p, job, wm, wn, lane, acc, first ? p.beta != 0 : true);
      first = false;
      since = 0;
    }
  }
  tc_flush(p, job, wm, wn, lane, acc, first ? p.beta != 0 : true);
}

// ---- Reductions ------------------------------------------------------------------------------
__global__ void sum_splits_kernel(const double* __restrict__ part, int64_t S, int64_t sstride,
                                  int64_t count, double* __restrict__ out, int beta) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double s = beta ? out[i] : 0.0;
    for (int64_t k = 0; k < S; ++k) s += part[k * sstride + i];
    out[i] = s;
  }
}

// Block (t, l): 32x32 block pair (bi <= bj) of matrix l. Sums the splits of the upper block,
// writes it and its mirror through shared memory (both coalesced).
__global__ void __launch_bounds__(256) sym_reduce_kernel(const double* part, int64_t S,
                                                         int64_t plstride, int64_t psstride,
                                                         int64_t d, int64_t T32, double* G) {
  __shared__ double tile[32][33];
  const int64_t t = blockIdx.x % T32;
  const int64_t l = blockIdx.x / T32;
  int64_t bi, bj;
  tri_decode(t, &bi, &bj);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const double* P = part + l * plstride;
  for (int r = ty; r < 32; r += 8) {
    const int64_t i = bi * 32 + r, j = bj * 32 + tx;
    double v = 0.0;
    if (i < d && j < d) {
      for (int64_t s = 0; s < S; ++s) v += P[s * psstride + i * d + j];
    }
    tile[r][tx] = v;
  }
  __syncthreads();
  double* Gl = G + l * d * d;
  for (int r = ty; r < 32; r += 8) {
    const int64_t i = bi * 32 + r, j = bj * 32 + tx;
    if (i < d && j < d) Gl[i * d + j] = (bi < bj || r <= tx) ? tile[r][tx] : tile[tx][r];
  }
  if (bi < bj) {
    for (int r = ty; r < 32; r += 8) {
      const int64_t i = bj * 32 + r, j = bi * 32 + tx;
      if (i < d && j < d) Gl[i * d + j] = tile[tx][r];
    }
  }
}

// ---- Row-major X times row-major W^T (logits) -------------------------------------------------
struct NtArgs {
  const void* x;
  int64_t ldx;
  const double* xs;
  int64_t n, d;
  const void* w;
  int64_t ldw, K;
  const double* bias;
  void* z;
  int64_t ldz, tiles_n;
};

// Block tile BM rows of X x BM rows of W, BK features per stage; the row scale multiplies the
// finished dot products. Thread tid always stages
// feature k = tid % BK of rows m = tid / BK + (NT / BK) q (transposed into [k][m] tiles; the
// +16 bytes of row padding make those stores conflict-free).
template <typename AccT, int BM, int BK, int TM>
__global__ void __launch_bounds__((BM / TM) * (BM / TM), 2) nt_gemm_kernel(const NtArgs p) {
  constexpr int NT = (BM / TM) * (BM / TM);
  constexpr int EPT = BM * BK / NT;
  constexpr int RSTEP = NT / BK;
  constexpr int LDS = BM + 16 / static_cast<int>(sizeof(AccT));
  static_assert(NT % BK == 0 && (BM * BK) % NT == 0, "tile configuration");
  __shared__ __align__(16) AccT As[2][BK][LDS];
  __shared__ __align__(16) AccT Bs[2][BK][LDS];
  const int tid = threadIdx.x;
  const int tx = tid % (BM / TM), ty = tid / (BM / TM);
  const int64_t ti = blockIdx.x / p.tiles_n, tj = blockIdx.x - (blockIdx.x / p.tiles_n) * p.tiles_n;
  const int64_t i0 = ti * BM, l0 = tj * BM;
  const int kk = tid % BK, mr = tid / BK;
  const AccT* X = static_cast<const AccT*>(p.x);
  const AccT* W = static_cast<const AccT*>(p.w);
  // Rows handled by this thread are fixed for the whole block: i0 + mr + RSTEP q.
  // Valid rows of this thread's sequence (clamped to a small int: fewer live registers).
  const int64_t rem_x = p.n - (i0 + mr), rem_w = p.K - (l0 + mr);
  const int rows_x = static_cast<int>(rem_x < BM ? rem_x : BM);
  const int rows_w = static_cast<int>(rem_w < BM ? rem_w : BM);
  const AccT* xb = X + (i0 + mr) * p.ldx + kk;
  const AccT* wb = W + (l0 + mr) * p.ldw + kk;
  const int64_t xstep = RSTEP * p.ldx, wstep = RSTEP * p.ldw;
  AccT acc[TM][TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TM; ++j) acc[i][j] = AccT(0);
  }
  AccT ra[EPT], rb[EPT];
  auto load = [&](int64_t j0) {
    const bool inj = j0 + kk < p.d;
#pragma unroll
    for (int q = 0; q < EPT; ++q) {
      ra[q] = (inj && RSTEP * q < rows_x) ? xb[q * xstep + j0] : AccT(0);
      rb[q] = (inj && RSTEP * q < rows_w) ? wb[q * wstep + j0] : AccT(0);
    }
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int q = 0; q < EPT; ++q) {
      As[buf][kk][mr + RSTEP * q] = ra[q];
      Bs[buf][kk][mr + RSTEP * q] = rb[q];
    }
  };
  const int64_t nstages = (p.d + BK - 1) / BK;
  load(0);
  store(0);
  __syncthreads();
  for (int64_t st = 0; st < nstages; ++st) {
    const int cur = static_cast<int>(st & 1);
    const bool more = st + 1 < nstages;
    if (more) load((st + 1) * BK);
    simt_stage<AccT, BM, BK, TM, LDS>(&As[cur][0][0], &Bs[cur][0][0], tx, ty, acc);
    if (more) store(cur ^ 1);
    __syncthreads();
  }
  AccT* Z = static_cast<AccT*>(p.z);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = i0 + micro_index<BM, TM>(ty, i);
    if (row >= p.n) continue;
    // (s x) . w computed as s (x . w): the row scale is applied once, here.
    const AccT sc = p.xs != nullptr ? static_cast<AccT>(p.xs[row]) : AccT(1);
#pragma unroll
    for (int j = 0; j < TM; ++j) {
      const int64_t l = l0 + micro_index<BM, TM>(tx, j);
      if (l < p.K) {
        const AccT b = p.bias != nullptr ? static_cast<AccT>(p.bias[l]) : AccT(0);
        Z[row * p.ldz + l] = acc[i][j] * sc + b;
      }
    }
  }
}

void ensure_mma_smem() {
  DPFC_CUDA_CHECK(cudaFuncSetAttribute(outer_mma_kernel<false>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       kMmaSmemBytes));
  DPFC_CUDA_CHECK(cudaFuncSetAttribute(outer_mma_kernel<true>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       kMmaSmemBytes));
}

void ensure_tc_smem() {
  DPFC_CUDA_CHECK(cudaFuncSetAttribute(outer_tc_kernel<false>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       TcCfg<false>::kSmemBytes));
  DPFC_CUDA_CHECK(cudaFuncSetAttribute(outer_tc_kernel<true>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       TcCfg<true>::kSmemBytes));
}

}  // namespace

int64_t outer_tile_size(OuterEngine engine) {
  return engine == OuterEngine::kSimtF64 ? 64 : 128;
}

int outer_blocks_per_sm(OuterEngine engine) {
  int nb = 0;
  switch (engine) {
    case OuterEngine::kMmaF64:
    case OuterEngine::kMma884F64:
      ensure_mma_smem();
      DPFC_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &nb, outer_mma_kernel<false>, kMmaThreads, kMmaSmemBytes));
      break;
    case OuterEngine::kSimtF64:
      DPFC_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &nb, outer_simt_kernel<double, 64, 8, 4>, 256, 0));
      break;
    case OuterEngine::kTcTF32:
      ensure_tc_smem();
      DPFC_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &nb, outer_tc_kernel<false>, kTcThreads, TcCfg<false>::kSmemBytes));
      break;
    case OuterEngine::kTcBF16:
      ensure_tc_smem();
      DPFC_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &nb, outer_tc_kernel<true>, kTcThreads, TcCfg<true>::kSmemBytes));
      break;
    default:
      DPFC_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &nb, outer_simt_kernel<float, 128, 8, 8>, 256, 0));
      break;
  }
  return std::max(1, nb);
}

int64_t choose_splits(int64_t base_blocks, int64_t rows, int64_t min_rows, int slots,
                      std::size_t split_bytes, std::size_t max_bytes) {
  if (base_blocks <= 0 || slots <= 0) return 1;
  int64_t smax = std::max<int64_t>(1, rows / std::max<int64_t>(1, min_rows));
  if (split_bytes > 0) {
    smax = std::min<int64_t>(smax, std::max<int64_t>(1, static_cast<int64_t>(max_bytes / split_bytes)));
  }
  smax = std::min<int64_t>(smax, 1024);
  if (base_blocks >= 4 * static_cast<int64_t>(slots)) return 1;  // tail wave <= 25%
  int64_t best = 1;
  double best_eff = -1.0;
  for (int64_t s = 1; s <= smax; ++s) {
    const int64_t total = base_blocks * s;
    const int64_t waves = (total + slots - 1) / slots;
    const double eff = static_cast<double>(total) / static_cast<double>(waves * slots);
    if (eff > best_eff + 1e-9) {
      best = s;
      best_eff = eff;
    }
    if (eff >= 0.95) break;
  }
  return best;
}

void launch_outer(const OuterProblem& p, OuterEngine engine, cudaStream_t stream) {
  DPFC_EXPECTS(p.a != nullptr && p.b != nullptr, "outer: null operand pointer");
  DPFC_EXPECTS(p.out != nullptr, "outer: null output pointer");
  DPFC_EXPECTS(dtype_valid(p.a_dtype) && p.a_dtype == p.b_dtype,
               "outer: operands must share a valid dtype");
  DPFC_EXPECTS(p.M >= 1 && p.N >= 1 && p.n >= 0 && p.L >= 1 && p.S >= 1, "outer: bad extents");
  DPFC_EXPECTS(p.out_ld >= p.N, "outer: output row stride must be >= N");
  DPFC_EXPECTS(!p.sym || (p.M == p.N && p.a == p.b && p.lda == p.ldb && p.a_scale == p.b_scale),
               "outer: symmetric problems need A == B");
  DPFC_EXPECTS(p.w == nullptr || p.ldw >= p.L, "outer: weight row stride must be >= L");
  OuterArgs a;
  a.a = p.a;
  a.b = p.b;
  a.lda = p.lda;
  a.ldb = p.ldb;
  a.dtype = p.a_dtype;
  a.sym = p.sym ? 1 : 0;
  a.beta = p.beta ? 1 : 0;
  a.M = p.M;
  a.N = p.N;
  a.a_scale = p.a_scale;
  a.b_scale = p.b_scale;
  a.w = p.w;
  a.ldw = p.ldw;
  a.perm = p.perm;
  a.seg = p.seg;
  a.n = p.n;
  a.L = p.L;
  a.S = p.S;
  const int64_t tile = outer_tile_size(engine);
  const int64_t tm = (p.M + tile - 1) / tile, tn = (p.N + tile - 1) / tile;
  a.T = p.sym ? tm * (tm + 1) / 2 : tm * tn;
  a.tiles_n = tn;
  a.out = p.out;
  a.out_ld = p.out_ld;
  a.out_lstride = p.out_lstride;
  a.out_sstride = p.out_sstride;
  const bool tc = engine == OuterEngine::kTcTF32 || engine == OuterEngine::kTcBF16;
  if (tc) DPFC_EXPECTS(current_cc() >= 80, "tf32/bf16 accumulation needs sm_80 or newer");
  a.flush_stages = engine == OuterEngine::kSimtF32 ? kFloat32BlockRows / 8
                   : tc                            ? kFloat32BlockRows / kTcBK
                                                   : 0;
  const int64_t blocks = a.T * p.L * p.S;
  DPFC_EXPECTS(blocks < (int64_t{1} << 31), "outer: problem too large for one launch");
  const unsigned grid = static_cast<unsigned>(blocks);
  switch (engine) {
    case OuterEngine::kMmaF64:
      ensure_mma_smem();
      if (current_cc() >= 90) {
        outer_mma_kernel<true><<<grid, kMmaThreads, kMmaSmemBytes, stream>>>(a);
      } else {
        outer_mma_kernel<false><<<grid, kMmaThreads, kMmaSmemBytes, stream>>>(a);
      }
      break;
    case OuterEngine::kMma884F64:
      ensure_mma_smem();
      outer_mma_kernel<false><<<grid, kMmaThreads, kMmaSmemBytes, stream>>>(a);
      break;
    case OuterEngine::kSimtF64:
      outer_simt_kernel<double, 64, 8, 4><<<grid, 256, 0, stream>>>(a);
      break;
    case OuterEngine::kTcTF32:
      ensure_tc_smem();
      outer_tc_kernel<false><<<grid, kTcThreads, TcCfg<false>::kSmemBytes, stream>>>(a);
      break;
    case OuterEngine::kTcBF16:
      ensure_tc_smem();
      outer_tc_kernel<true><<<grid, kTcThreads, TcCfg<true>::kSmemBytes, stream>>>(a);
      break;
    default:
      outer_simt_kernel<float, 128, 8, 8><<<grid, 256, 0, stream>>>(a);
      break;
  }
  DPFC_CUDA_CHECK_LAUNCH();
}

void launch_rows_matmul_nt(const RowsView& x, const double* x_scale, const void* w, int64_t ldw,
                           int64_t K, const double* bias, void* z, int64_t ldz,
                           cudaStream_t stream) {
  check_rows_view(x, "x");
  DPFC_EXPECTS(x.dtype == kFloat32 || x.dtype == kFloat64, "x must be float32 or float64");
  DPFC_EXPECTS(w != nullptr && z != nullptr, "w/z: null device pointer");
  DPFC_EXPECTS(K >= 1 && (K == 1 || ldw >= x.d) && ldz >= K, "w/z: bad extents or strides");
  NtArgs a;
  a.x = x.data;
  a.ldx = x.ld;
  a.xs = x_scale;
  a.n = x.n;
  a.d = x.d;
  a.w = w;
  a.ldw = ldw;
  a.K = K;
  a.bias = bias;
  a.z = z;
  a.ldz = ldz;
  const int64_t tile = x.dtype == kFloat32 ? 128 : 64;
  a.tiles_n = (K + tile - 1) / tile;
  const int64_t blocks = ((x.n + tile - 1) / tile) * a.tiles_n;
  DPFC_EXPECTS(blocks < (int64_t{1} << 31), "matmul: problem too large for one launch");
  if (x.dtype == kFloat32) {
    nt_gemm_kernel<float, 128, 8, 8><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(a);
  } else {
    nt_gemm_kernel<double, 64, 8, 4><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(a);
  }
  DPFC_CUDA_CHECK_LAUNCH();
}

void launch_sum_splits(const double* part, int64_t S, int64_t sstride, int64_t count, double* out,
                       bool beta, cudaStream_t stream) {
  DPFC_EXPECTS(part != nullptr && out != nullptr && S >= 1 && count >= 0, "sum_splits: bad args");
  if (count == 0) return;
  sum_splits_kernel<<<grid_for(count, 256), 256, 0, stream>>>(part, S, sstride, count, out,
                                                               beta ? 1 : 0);
  DPFC_CUDA_CHECK_LAUNCH();
}

void launch_sym_reduce(const double* part, int64_t S, int64_t part_lstride, int64_t part_sstride,
                       int64_t d, int64_t L, double* G, cudaStream_t stream) {
  DPFC_EXPECTS(part != nullptr && G != nullptr && S >= 1 && d >= 1 && L >= 1,
               "sym_reduce: bad args");
  DPFC_EXPECTS(S == 1 || part != G, "sym_reduce: in place only without splits");
  const int64_t nb = (d + 31) / 32;
  const int64_t T32 = nb * (nb + 1) / 2;
  DPFC_EXPECTS(T32 * L < (int64_t{1} << 31), "sym_reduce: too many blocks");
  sym_reduce_kernel<<<static_cast<unsigned>(T32 * L), dim3(32, 8), 0, stream>>>(
      part, S, part_lstride, part_sstride, d, T32, G);
  DPFC_CUDA_CHECK_LAUNCH();
}

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
                               double clip_norm, double* B, int64_t* counts,
                               cudaStream_t stream) {
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
