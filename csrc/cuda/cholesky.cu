// Batched Cholesky factorisation and solves: kernels and launchers (see cholesky.cuh).
//
// Design notes (numbers are for an H100 SXM: 132 SMs, FP64 tensor = FP32 FFMA = ~67
// TFLOP/s, FP64 FFMA = ~34 TFLOP/s, ~3 TB/s):
//
// * d <= 128 (RegChol): one block per matrix. Each thread from 32 on owns an 8x4 tile
//   (R, C) of the lower triangle (tiles with C <= 2R+1): 32 values in registers, identity
//   padding beyond d. Right-looking over 4-column panels: the panel's owners copy it to
//   shared memory; warp 0 (a dedicated warp, so its registers do not add to an owner's)
//   factors it in registers (pivot test, sqrt, scale, in-panel update, shuffles); every
//   owner of a trailing tile applies the rank-4 update from shared memory (24 16-byte
//   loads per 128 FMAs). Two named barriers per panel, no shared-memory copy of the
//   matrix, so several matrices share an SM. Tiers D = 32, 64, 128 (64, 128, 320 threads).
// * d > 128: blocked with nb = 64.
//     panel kernel (one block per 64-row tile of block column J): factors the diagonal
//       tile with RegChol<64> (every block of the launch does this redundantly: a few us
//       of latency, cheaper than another launch), then block 0 writes L_JJ to a work space
//       (not over the diagonal tile, which the other blocks of the launch are reading;
//       no later step reads it) and info, the others solve X L_JJ^T = C for their tile
//       (4 threads per row, column-by-column substitution with shuffles, like reference
//       dtrsm's right-looking loop). A finish kernel copies the L_JJ into place and fills
//       failed matrices with NaN. Work space: nblk 64x64 tiles per matrix, from the
//       caller (CuPy's pool, via the glue) or cudaMallocAsync; batch chunks of <= 1 GiB.
//     update kernel: C -= P_I P_J^T on 64x64 tiles. float64: double mma.sync.m8n8k4
//       (PTX ISA "Matrix Fragments for mma.m8n8k4 with .f64": A row = lane>>2,
//       col = lane%4; B row = lane%4, col = lane>>2; C row = lane>>2,
//       cols 2*(lane%4)+{0,1}); both operands are rows of L, so both fragments are read
//       along k. 4 warps x (32x32) per block, cp.async 3-stage pipeline, KC = 16.
//       SIMT fallback (kernel option simt, and float32): 256 threads x 4x4.
//     left-looking: per block column J, update(C = A_IJ - L_I,<J L_J,<J^T) then panel.
//       Reads A once, streams L_I,<J (d^3/(6 nb) elements per matrix): large batches.
//     right-looking: copy A, then per J: panel, update of all trailing tiles with K = 64.
//       Many tiles per launch (batch 1 fills the GPU) at ~2x the memory traffic.
// * Failure: the first failing pivot stops its matrix: info is set by the panel (or
//   small) kernel, later kernels skip the matrix, and the finish pass fills its L with NaN.
// * Solve (cho_solve): one block per (matrix, 8 right-hand-side columns) sweeps forward
//   then backward over 64-row blocks: a GEMM of the block row against the solved rows
//   (SIMT, split over 8 warps, reduced in shared memory), then substitution on the 64x64
//   diagonal block by one warp per column. One launch, no work space.
#include "cuda/cholesky.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common/errors.hpp"
#include "common/hostdevice.hpp"
#include "cuda/device.cuh"
#include "cuda/ptx.cuh"
#include "cuda/runtime.cuh"

namespace dpfc {
namespace cuda {
namespace {

constexpr int kNb = 64;  // block size of the blocked factorisation
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxGridY = 65535;

template <typename T>
__device__ __forceinline__ T quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
  return __int_as_float(0x7fc00000);
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000ll);
}

// n consecutive T from 16-byte aligned shared memory, as 16-byte loads.
template <int N>
__device__ __forceinline__ void lds_vec(const double* p, double (&out)[N]) {
  static_assert(N % 2 == 0, "even count");
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const double2 v = reinterpret_cast<const double2*>(p)[i];
    out[2 * i] = v.x;
    out[2 * i + 1] = v.y;
  }
}
template <int N>
__device__ __forceinline__ void lds_vec(const float* p, float (&out)[N]) {
  static_assert(N % 4 == 0, "multiple of 4");
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    const float4 v = reinterpret_cast<const float4*>(p)[i];
    out[4 * i] = v.x;
    out[4 * i + 1] = v.y;
    out[4 * i + 2] = v.z;
    out[4 * i + 3] = v.w;
  }
}

// ---------------------------------------------------------------------------------------
// RegChol: Cholesky of one D x D matrix (D = 32, 64, 128) held in registers as 8x4 tiles.
// ---------------------------------------------------------------------------------------

template <typename T, int D>
struct RegCholSmem {
  T panel[2][4][D];  // two panel buffers: [column in panel][row]
  int fail;          // 0, or jb + 1-based column in the panel of the first failure
};

template <typename T, int D>
struct RegChol {
  static constexpr int kTR = 8, kTC = 4;
  static constexpr int kNR = D / kTR;
  static constexpr int kTiles = kNR * (kNR + 1);  // sum over R of (2R + 2) tiles
  // Warp 0 factors the panels; threads 32 .. 32 + kTiles - 1 own the tiles. The roles are
  // separate branches, so the panel's registers do not add to a tile owner's.
  static constexpr int kThreads = 32 + (kTiles + 31) / 32 * 32;

  // Warp 0: factor panel rows [jb, n) x columns [jb, jb + 4), held in registers (lane
  // owns rows jb + lane + 32 q), broadcasts by shuffles; the result goes back to P.
  // Returns 0 or the 1-based panel column of the first pivot that is not > 0.
  static __device__ __forceinline__ int panel_factor(T (*P)[D], int jb, int n, int lane) {
    constexpr int kQ = D / 32;
    const int ncols = min(4, n - jb);
    T p[kQ][4];
#pragma unroll
    for (int q = 0; q < kQ; ++q) {
      const int r = jb + lane + 32 * q;
#pragma unroll
      for (int t = 0; t < 4; ++t) p[q][t] = r < n ? P[t][r] : T(0);
    }
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      if (t >= ncols) break;
      const T piv = __shfl_sync(kFullMask, p[0][t], t);  // row jb + t: lane t, q = 0
      if (!(piv > T(0))) return t + 1;                   // NaN is not > 0 (uniform)
      const T ljj = sqrt(piv);
      const T inv = T(1) / ljj;
#pragma unroll
      for (int q = 0; q < kQ; ++q) {
        const int r = lane + 32 * q;  // row jb + r
        p[q][t] = r < t ? T(0) : (r == t ? ljj : p[q][t] * inv);
      }
#pragma unroll
      for (int t2 = t + 1; t2 < 4; ++t2) {
        const T l21 = __shfl_sync(kFullMask, p[0][t], t2);  // L[jb + t2][jb + t]
#pragma unroll
        for (int q = 0; q < kQ; ++q) {
          if (lane + 32 * q >= t2) p[q][t2] = fma(-p[q][t], l21, p[q][t2]);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kQ; ++q) {
      const int r = jb + lane + 32 * q;
      if (r < n) {
#pragma unroll
        for (int t = 0; t < 4; ++t) P[t][r] = p[q][t];
      }
    }
    return 0;
  }

  // Factor the n x n leading part (n <= D) of one matrix. Called by every thread of the
  // block (blockDim.x >= kThreads, a multiple of 32). elem(r, c), c <= r < n, reads the
  // lower triangle; on success put(r, c, v) receives every element with r, c < n of the
  // owned tiles (L, zeros above the diagonal). Returns, in every thread, 0 or the
  // 1-based index of the first pivot that is not > 0 (put is then not called).
  // Warp 0 and the owners run separate loops meeting at the same number of named
  // barriers (PTX bar.sync 1 counts arrivals per barrier, not per code location).
  template <class Elem, class Put>
  static __device__ __forceinline__ int run(RegCholSmem<T, D>& sm, int n, int tid, Elem&& elem,
                                            Put&& put) {
    const int lane = tid & 31, warp = tid >> 5;
    const unsigned nthreads = blockDim.x;
    int fail = 0;
    if (tid == 0) sm.fail = 0;  // read only after the second barrier of a step
    if (warp == 0) {
      for (int jb = 0, step = 0; jb < n; jb += 4, ++step) {
        named_barrier(nthreads);  // the panel is in shared memory
        const int f = panel_factor(sm.panel[step & 1], jb, n, lane);
        if (f != 0 && lane == 0) sm.fail = jb + f;
        named_barrier(nthreads);  // the factored panel and the status are visible
        if (f != 0) {
          fail = jb + f;
          break;
        }
      }
      return fail;
    }
    // Tile owners: tile (R, C) = rows 8R..8R+7, cols 4C..4C+3, C <= 2R + 1.
    const bool active = tid >= 32 && tid < 32 + kTiles;
    int R = 0, C = 0;
    if (active) {
      const int t = tid - 32;
      int r = static_cast<int>((sqrtf(4.0f * static_cast<float>(t) + 1.0f) - 1.0f) * 0.5f);
      while (r > 0 && r * (r + 1) > t) --r;
      while ((r + 1) * (r + 2) <= t) ++r;
      R = r;
      C = t - r * (r + 1);
    }
    T a[kTR][kTC];
#pragma unroll
    for (int i = 0; i < kTR; ++i) {
#pragma unroll
      for (int k = 0; k < kTC; ++k) {
        const int r = kTR * R + i, c = kTC * C + k;
        T v = T(0);
        if (active) {
          if (r < n && c < n) {
            if (c <= r) v = elem(r, c);
          } else if (r == c) {
            v = T(1);  // identity padding beyond n
          }
        }
        a[i][k] = v;
      }
    }
    for (int jb = 0, step = 0; jb < n; jb += 4, ++step) {
      T(*P)[D] = sm.panel[step & 1];
      const int cp = jb >> 2;
      if (active && C == cp) {
#pragma unroll
        for (int i = 0; i < kTR; ++i) {
#pragma unroll
          for (int k = 0; k < kTC; ++k) P[k][kTR * R + i] = a[i][k];
        }
      }
      named_barrier(nthreads);
      named_barrier(nthreads);
      fail = *static_cast<volatile int*>(&sm.fail);
      if (fail != 0) return fail;
      if (active) {
        if (C == cp) {
#pragma unroll
          for (int i = 0; i < kTR; ++i) {
#pragma unroll
            for (int k = 0; k < kTC; ++k) a[i][k] = P[k][kTR * R + i];
          }
        } else if (C > cp && kTR * R < n) {
          // Not unrolled: one panel column's 12 values live at a time.
#pragma unroll 1
          for (int t = 0; t < 4; ++t) {
            T pr[kTR], pc[kTC];
            lds_vec(&P[t][kTR * R], pr);
            lds_vec(&P[t][kTC * C], pc);
#pragma unroll
            for (int i = 0; i < kTR; ++i) {
#pragma unroll
              for (int k = 0; k < kTC; ++k) a[i][k] = fma(-pr[i], pc[k], a[i][k]);
            }
          }
        }
      }
    }
    if (active) {
#pragma unroll
      for (int i = 0; i < kTR; ++i) {
#pragma unroll
        for (int k = 0; k < kTC; ++k) {
          const int r = kTR * R + i, c = kTC * C + k;
          if (r < n && c < n) put(r, c, c <= r ? a[i][k] : T(0));
        }
      }
    }
    return 0;
  }
};

// ---------------------------------------------------------------------------------------
// Small matrices: one block per matrix.
// ---------------------------------------------------------------------------------------

template <typename T>
struct FactorArgs {
  const T* a;
  int64_t a_bs;
  int64_t lda;
  const T* shifts;
  T* l;
  int32_t* info;
  int64_t batch;
  int d;
};

template <typename T, int D>
__global__ void __launch_bounds__(RegChol<T, D>::kThreads, (D == 128 ? 2 : 4))
    chol_small_kernel(FactorArgs<T> p) {
  __shared__ __align__(16) RegCholSmem<T, D> sm;
  const int tid = threadIdx.x;
  const int n = p.d;
  const int nthreads = blockDim.x;
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    const T* ab = p.a + b * p.a_bs;
    const T shift = p.shifts != nullptr ? p.shifts[b] : T(0);
    T* lb = p.l + b * static_cast<int64_t>(n) * n;
    const int fail = RegChol<T, D>::run(
        sm, n, tid,
        [&](int r, int c) {
          const T v = ab[static_cast<int64_t>(r) * p.lda + c];
          return r == c ? v + shift : v;
        },
        [&](int r, int c, T v) { lb[r * n + c] = v; });
    if (fail != 0) {
      const T nan = quiet_nan<T>();
      for (int idx = tid; idx < n * n; idx += nthreads) lb[idx] = nan;
    } else {
      // Strictly-upper elements no tile covers: columns >= 8 (r / 8) + 8.
      const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
      for (int r = warp; r < n; r += nwarps) {
        for (int c = 8 * (r / 8) + 8 + lane; c < n; c += 32) lb[r * n + c] = T(0);
      }
    }
    if (tid == 0) p.info[b] = fail;
    __syncthreads();  // shared memory is reused by the next matrix
  }
}

// ---------------------------------------------------------------------------------------
// Blocked path: panel kernel (diagonal tile + triangular solves below it).
// ---------------------------------------------------------------------------------------

constexpr int kPanelThreads = 256;

DPFC_HD int d_blocks(int d) { return (d + kNb - 1) / kNb; }

template <typename T>
struct PanelSmem {
  RegCholSmem<T, kNb> rc;
  T ls[kNb][kNb + 1];  // L_JJ, lower, zeros above, identity padding
  T rdiag[kNb];
  int skip;
};

// Block (x, y): tile row I = J + x of block column J for matrices y, y + gridDim.y, ...
template <typename T>
__global__ void __launch_bounds__(kPanelThreads, 2)
    chol_panel_kernel(T* l, T* w, int32_t* info, int64_t batch, int d, int J, int zero_upper) {
  __shared__ __align__(16) PanelSmem<T> sm;
  const int tid = threadIdx.x, lane = tid & 31;
  const int I = J + static_cast<int>(blockIdx.x);
  const int j0 = J * kNb, n = min(kNb, d - j0);
  const int i0 = I * kNb, m = min(kNb, d - i0);
  const int64_t dd = static_cast<int64_t>(d) * d;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    // info[b] may be written by block 0 of this launch: one read, shared by the block.
    if (tid == 0) sm.skip = info[b];
    __syncthreads();
    const int skip = sm.skip;
    __syncthreads();
    if (skip != 0) continue;
    T* lb = l + b * dd;
    // L_JJ into shared memory: identity/zeros where the tiles do not write (above the
    // diagonal, padding), then the factor's lower part from the tile owners.
    for (int idx = tid; idx < kNb * kNb; idx += kPanelThreads) {
      const int r = idx / kNb, c = idx % kNb;
      if (c > r || r >= n) sm.ls[r][c] = (r == c) ? T(1) : T(0);
    }
    const int fail = RegChol<T, kNb>::run(
        sm.rc, n, tid, [&](int r, int c) { return lb[static_cast<int64_t>(j0 + r) * d + j0 + c]; },
        [&](int r, int c, T v) {
          if (c <= r) sm.ls[r][c] = v;
        });
    if (fail != 0) {
      if (blockIdx.x == 0 && tid == 0) info[b] = j0 + fail;
      continue;  // uniform: every thread has the same `fail`
    }
    __syncthreads();
    if (tid < kNb) sm.rdiag[tid] = T(1) / sm.ls[tid][tid];
    __syncthreads();
    if (blockIdx.x == 0) {
      // L_JJ goes to the work space, not over the diagonal tile: the other blocks of this
      // launch are reading that tile. The diagonal tile is not read again by any later
      // step of either schedule; chol_finish_kernel copies the factors into place.
      T* wt = w + (b * static_cast<int64_t>(d_blocks(d)) + J) * (kNb * kNb);
      for (int idx = tid; idx < kNb * kNb; idx += kPanelThreads) {
        const int r = idx / kNb, c = idx % kNb;
        wt[idx] = c <= r ? sm.ls[r][c] : T(0);
      }
    } else {
      // X L_JJ^T = C for the m x 64 tile (n == 64 here since i0 > j0). Thread (row, q)
      // holds columns q, q + 4, ..., q + 60 of one row.
      const int row = tid >> 2, q = tid & 3;
      const bool rok = row < m;
      T* crow = lb + static_cast<int64_t>(i0 + (rok ? row : 0)) * d + j0;
      T x[16];
#pragma unroll
      for (int u = 0; u < 16; ++u) x[u] = rok ? crow[q + 4 * u] : T(0);
      const int base_lane = lane & ~3;
#pragma unroll
      for (int c = 0; c < kNb; ++c) {
        const int uc = c >> 2, qc = c & 3;
        const T xc = __shfl_sync(kFullMask, x[uc] * sm.rdiag[c], base_lane | qc);
        if (q == qc) x[uc] = xc;
#pragma unroll
        for (int u2 = uc; u2 < 16; ++u2) {
          if (u2 > uc || q > qc) x[u2] = fma(-xc, sm.ls[4 * u2 + q][c], x[u2]);
        }
      }
      if (rok) {
#pragma unroll
        for (int u = 0; u < 16; ++u) crow[q + 4 * u] = x[u];
      }
      if (zero_upper) {
        for (int idx = tid; idx < kNb * kNb; idx += kPanelThreads) {
          const int cc = idx / kNb, rr = idx % kNb;
          if (cc < n && rr < m) lb[static_cast<int64_t>(j0 + cc) * d + i0 + rr] = T(0);
        }
      }
    }
    __syncthreads();  // shared memory is reused by the next matrix
  }
}

// ---------------------------------------------------------------------------------------
// Blocked path: update kernel C -= P_I P_J^T (64 x 64 tiles, K in chunks of 16).
// ---------------------------------------------------------------------------------------

template <typename T, bool kMma>
struct UpdCfg {
  static constexpr int kThreads = kMma ? 128 : 256;
  static constexpr int kKc = 16;
  static constexpr int kPitch = kMma ? kKc + 4 : kKc + 1;  // conflict-free fragment reads
  static constexpr int kStages = 3;
  static constexpr int kMinBlocks = kMma ? 3 : 2;
  static constexpr int kStageElems = 2 * kNb * kPitch;  // A tile + B tile
  static constexpr size_t kSmemBytes = sizeof(T) * kStageElems * kStages;
};

template <typename T>
struct UpdateArgs {
  const T* a;  // mode 0: the input (lower triangle read)
  int64_t a_bs;
  int64_t lda;
  const T* shifts;
  T* l;
  const int32_t* info;
  int64_t batch;
  int d;
  int mode;  // 0: left-looking block column `step`; 1: right-looking trailing after panel `step`
  int step;
};

// Copies rows r0 + [0, 64) of L, columns k .. k + kKc, for op = A (r0 = i0) and B
// (r0 = c0), in copies of kV elements. Thread: one column chunk, rows rb + q * kRpp.
template <typename T, int kV, int kThr, int kKc, int kP>
__device__ __forceinline__ void copy_tiles(T* stage, const T* lb, int d, int i0, int c0, int k,
                                           int tid) {
  constexpr int kCpr = kKc / kV;     // copies per row
  constexpr int kRpp = kThr / kCpr;  // rows per pass
  constexpr int kPasses = kNb / kRpp;
  static_assert(kThr % kCpr == 0 && kNb % kRpp == 0, "even split");
  const int ch = tid % kCpr, rb = tid / kCpr;
#pragma unroll
  for (int op = 0; op < 2; ++op) {
    const int row0 = (op ? c0 : i0) + rb;
    const T* src0 = lb + static_cast<int64_t>(row0) * d + k + ch * kV;
    T* dst0 = stage + op * kNb * kP + rb * kP + ch * kV;
#pragma unroll
    for (int q = 0; q < kPasses; ++q) {
      const bool ok = row0 + q * kRpp < d;
      const T* src = ok ? src0 + static_cast<int64_t>(q * kRpp) * d : lb;
      cp_async_zfill<kV* static_cast<int>(sizeof(T))>(dst0 + q * kRpp * kP, src, ok);
    }
  }
}

// One stage: rows i0.. (A) and c0.. (B) of L, columns k .. k + KC, into shared memory.
// kVec: 16-byte copies (needs 16-byte aligned rows: d a multiple of 16 / sizeof(T) and
// a 16-byte aligned l; only with the mma layout, whose pitch keeps 16-byte alignment).
template <typename T, bool kMma, bool kVec>
__device__ __forceinline__ void load_stage(T* stage, const T* lb, int d, int i0, int c0, int k,
                                           int tid) {
  using Cfg = UpdCfg<T, kMma>;
  static_assert(!kVec || kMma, "16-byte copies need the mma pitch");
  constexpr int kV = kVec ? 16 / static_cast<int>(sizeof(T)) : 1;
  copy_tiles<T, kV, Cfg::kThreads, Cfg::kKc, Cfg::kPitch>(stage, lb, d, i0, c0, k, tid);
}

template <typename T, bool kMma, bool kVec>
__global__ void __launch_bounds__(UpdCfg<T, kMma>::kThreads, UpdCfg<T, kMma>::kMinBlocks)
    chol_update_kernel(UpdateArgs<T> p) {
  using Cfg = UpdCfg<T, kMma>;
  constexpr int kP = Cfg::kPitch, kKc = Cfg::kKc, kS = Cfg::kStages;
  static_assert(!kMma || std::is_same<T, double>::value, "mma path is float64 only");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int tid = threadIdx.x;
  const int d = p.d;
  int I, Jt, kb, ke;
  if (p.mode == 0) {
    I = p.step + static_cast<int>(blockIdx.x);
    Jt = p.step;
    kb = 0;
    ke = p.step * kNb;
  } else {
    int ip, jp;
    tri_decode(static_cast<int>(blockIdx.x), &jp, &ip);
    I = p.step + 1 + ip;
    Jt = p.step + 1 + jp;
    kb = p.step * kNb;
    ke = kb + kNb;
  }
  const int i0 = I * kNb, c0 = Jt * kNb;
  const int nk = (ke - kb) / kKc;
  const int64_t dd = static_cast<int64_t>(d) * d;

  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    if (p.info[b] != 0) continue;  // written only by earlier launches: uniform
    T* lb = p.l + b * dd;

    // Accumulators: mma: warp tile 32x32 = 4x4 fragments of 8x8 (2 values per lane);
    // simt: rows ty + 16 i, cols tx + 16 j.
    T acc[4][4][kMma ? 2 : 1];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < (kMma ? 2 : 1); ++e) acc[i][j][e] = T(0);

    if (nk > 0) {
#pragma unroll
      for (int s = 0; s < kS - 1; ++s) {
        if (s < nk)
          load_stage<T, kMma, kVec>(smem + s * Cfg::kStageElems, lb, d, i0, c0, kb + s * kKc, tid);
        cp_async_commit();
      }
      for (int kt = 0; kt < nk; ++kt) {
        cp_async_wait<kS - 2>();
        __syncthreads();
        {
          const int nxt = kt + kS - 1;
          if (nxt < nk)
            load_stage<T, kMma, kVec>(smem + (nxt % kS) * Cfg::kStageElems, lb, d, i0, c0,
                                      kb + nxt * kKc, tid);
          cp_async_commit();
        }
        const T* sA = smem + (kt % kS) * Cfg::kStageElems;
        const T* sB = sA + kNb * kP;
        if constexpr (kMma) {
          const int warp = tid >> 5, lane = tid & 31;
          const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
          const int fr = lane >> 2, fk = lane & 3;
#pragma unroll
          for (int kk = 0; kk < kKc; kk += 4) {
            double af[4], bf[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) af[i] = sA[(wm + 8 * i + fr) * kP + kk + fk];
#pragma unroll
            for (int j = 0; j < 4; ++j) bf[j] = sB[(wn + 8 * j + fr) * kP + kk + fk];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
              for (int j = 0; j < 4; ++j) dmma_8x8x4(acc[i][j][0], acc[i][j][1], af[i], bf[j]);
          }
        } else {
          const int ty = tid >> 4, tx = tid & 15;
#pragma unroll
          for (int kk = 0; kk < kKc; ++kk) {
            T av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) av[i] = sA[(ty + 16 * i) * kP + kk];
#pragma unroll
            for (int j = 0; j < 4; ++j) bv[j] = sB[(tx + 16 * j) * kP + kk];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
              for (int j = 0; j < 4; ++j) acc[i][j][0] = fma(av[i], bv[j], acc[i][j][0]);
          }
        }
      }
      cp_async_wait<0>();
      __syncthreads();  // the stages are reused by the next matrix
    }

    // Epilogue: mode 0 writes base - acc with base = masked A (+ shift on the diagonal)
    // and zeros above the diagonal; mode 1 subtracts in place (lower part only).
    const T* ab = p.a + b * p.a_bs;
    const T shift = (p.mode == 0 && p.shifts != nullptr) ? p.shifts[b] : T(0);
    auto put = [&](int rl, int cl, T v) {
      const int gr = i0 + rl, gc = c0 + cl;
      if (gr >= d || gc >= d) return;
      T* dst = lb + static_cast<int64_t>(gr) * d + gc;
      if (p.mode == 0) {
        T out = T(0);
        if (gc <= gr) {
          T base = ab[static_cast<int64_t>(gr) * p.lda + gc];
          if (gr == gc) base += shift;
          out = base - v;
        }
        *dst = out;
      } else if (gc <= gr) {
        *dst = *dst - v;
      }
    };
    if constexpr (kMma) {
      const int warp = tid >> 5, lane = tid & 31;
      const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
      const int fr = lane >> 2, fk = lane & 3;
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) put(wm + 8 * i + fr, wn + 8 * j + 2 * fk + e, acc[i][j][e]);
    } else {
      const int ty = tid >> 4, tx = tid & 15;
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) put(ty + 16 * i, tx + 16 * j, acc[i][j][0]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Blocked path helpers: copy of the lower triangle (right-looking), NaN fill of failures.
// ---------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(256) chol_init_kernel(FactorArgs<T> p) {
  const int d = p.d;
  const int64_t dd = static_cast<int64_t>(d) * d;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    const T* ab = p.a + b * p.a_bs;
    T* lb = p.l + b * dd;
    const T shift = p.shifts != nullptr ? p.shifts[b] : T(0);
    for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < dd;
         idx += stride) {
      const int r = static_cast<int>(idx / d),
                c = static_cast<int>(idx - static_cast<int64_t>(r) * d);
      T v = T(0);
      if (c <= r) {
        v = ab[static_cast<int64_t>(r) * p.lda + c];
        if (r == c) v += shift;
      }
      lb[idx] = v;
    }
  }
}

// Last pass of the blocked path: a failed matrix's L becomes all NaN; a successful one
// gets its diagonal factors L_JJ from the work space (lower part and zeros above).
template <typename T>
__global__ void __launch_bounds__(256)
    chol_finish_kernel(T* l, const T* w, const int32_t* info, int64_t batch, int d) {
  const int64_t dd = static_cast<int64_t>(d) * d;
  const int nblk = d_blocks(d);
  const int64_t nw = static_cast<int64_t>(nblk) * kNb * kNb;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    T* lb = l + b * dd;
    if (info[b] != 0) {
      const T nan = quiet_nan<T>();
      for (int64_t idx = first; idx < dd; idx += stride) lb[idx] = nan;
      continue;
    }
    const T* wb = w + b * nw;
    for (int64_t idx = first; idx < nw; idx += stride) {
      const int J = static_cast<int>(idx / (kNb * kNb));
      const int r = static_cast<int>(idx / kNb) % kNb, c = static_cast<int>(idx % kNb);
      const int gr = J * kNb + r, gc = J * kNb + c;
      if (gr < d && gc < d) lb[static_cast<int64_t>(gr) * d + gc] = wb[idx];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Solve L L^T X = B: one block per (matrix, 8 columns), forward then backward sweep.
// ---------------------------------------------------------------------------------------

constexpr int kSolveRB = 64;  // rows per block row
constexpr int kSolveKC = 64;  // k per staged chunk
constexpr int kSolveNC = 8;   // right-hand-side columns per block (one warp each)
constexpr int kSolveThreads = 256;

template <typename T>
struct SolveSmem {
  T lbuf[kSolveRB][kSolveKC + 1];   // L chunk [row][k]; then the reduction [warp][col][row]
  T ybuf[kSolveKC][kSolveNC];       // solved rows [k][col]
  T ldiag[kSolveRB][kSolveRB + 1];  // diagonal block, lower, identity padding
  T rdiag[kSolveRB];
};
static_assert(sizeof(double) * kSolveRB * (kSolveKC + 1) >=
                  sizeof(double) * 8 * kSolveNC * kSolveRB,
              "the reduction buffer aliases lbuf");

template <typename T>
struct SolveArgs {
  const T* l;
  int64_t l_bs;
  const T* b;
  int64_t b_bs;
  int64_t ldb;
  T* x;
  int64_t batch;
  int d;
  int m;
};

template <typename T>
__global__ void __launch_bounds__(kSolveThreads, 2) cho_solve_kernel(SolveArgs<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SolveSmem<T>& s = *reinterpret_cast<SolveSmem<T>*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int d = p.d, m = p.m;
  const int c0 = static_cast<int>(blockIdx.x) * kSolveNC;
  const int nbr = (d + kSolveRB - 1) / kSolveRB;
  T* red = &s.lbuf[0][0];  // [warp][col][row], valid between the GEMM and the substitution

  for (int64_t bi = blockIdx.y; bi < p.batch; bi += gridDim.y) {
    const T* lb = p.l + bi * p.l_bs;
    const T* bb = p.b + bi * p.b_bs;
    T* xb = p.x + bi * static_cast<int64_t>(d) * m;

    for (int pass = 0; pass < 2; ++pass) {  // 0: L y = b, 1: L^T x = y
      const bool fwd = pass == 0;
      for (int step = 0; step < nbr; ++step) {
        const int I = fwd ? step : nbr - 1 - step;
        const int r0 = I * kSolveRB, rb = min(kSolveRB, d - r0), r1 = r0 + rb;
        // GEMM over k in [0, r0) (forward) or [r1, d) (backward), chunks of 64.
        const int kbeg = fwd ? 0 : r1, kend = fwd ? r0 : d;
        const int nch = (kend - kbeg + kSolveKC - 1) / kSolveKC;
        T acc0[kSolveNC], acc1[kSolveNC];
#pragma unroll
        for (int j = 0; j < kSolveNC; ++j) acc0[j] = acc1[j] = T(0);

        constexpr int kLPer = kSolveRB * kSolveKC / kSolveThreads;  // 16
        constexpr int kYPer = kSolveKC * kSolveNC / kSolveThreads;  // 2
        T lreg[kLPer], yreg[kYPer];
        auto fetch = [&](int kc) {
#pragma unroll
          for (int it = 0; it < kLPer; ++it) {
            const int idx = tid + it * kSolveThreads;
            T v = T(0);
            if (fwd) {  // element (row, k) = L[r0 + row][kc + k], coalesced along k
              const int row = idx / kSolveKC, k = idx % kSolveKC;
              if (row < rb) v = lb[static_cast<int64_t>(r0 + row) * d + kc + k];
            } else {  // element (row, k) = L[kc + k][r0 + row], coalesced along row
              const int k = idx / kSolveRB, row = idx % kSolveRB;
              if (row < rb && kc + k < d) v = lb[static_cast<int64_t>(kc + k) * d + r0 + row];
            }
            lreg[it] = v;
          }
#pragma unroll
          for (int it = 0; it < kYPer; ++it) {
            const int idx = tid + it * kSolveThreads;
            const int k = idx / kSolveNC, j = idx % kSolveNC;
            yreg[it] =
                (kc + k < d && c0 + j < m) ? xb[static_cast<int64_t>(kc + k) * m + c0 + j] : T(0);
          }
        };
        auto stash = [&]() {
#pragma unroll
          for (int it = 0; it < kLPer; ++it) {
            const int idx = tid + it * kSolveThreads;
            if (fwd) {
              s.lbuf[idx / kSolveKC][idx % kSolveKC] = lreg[it];
            } else {
              s.lbuf[idx % kSolveRB][idx / kSolveRB] = lreg[it];
            }
          }
#pragma unroll
          for (int it = 0; it < kYPer; ++it) {
            const int idx = tid + it * kSolveThreads;
            s.ybuf[idx / kSolveNC][idx % kSolveNC] = yreg[it];
          }
        };
        if (nch > 0) fetch(kbeg);
        for (int ch = 0; ch < nch; ++ch) {
          stash();
          __syncthreads();
          if (ch + 1 < nch) fetch(kbeg + (ch + 1) * kSolveKC);
#pragma unroll
          for (int kq = 0; kq < kSolveKC / 8; ++kq) {
            const int k = warp + 8 * kq;
            const T l0 = s.lbuf[lane][k], l1 = s.lbuf[lane + 32][k];
            T yv[kSolveNC];
            lds_vec(&s.ybuf[k][0], yv);
#pragma unroll
            for (int j = 0; j < kSolveNC; ++j) {
              acc0[j] = fma(l0, yv[j], acc0[j]);
              acc1[j] = fma(l1, yv[j], acc1[j]);
            }
          }
          __syncthreads();
        }
        // Partial sums to shared memory (aliases lbuf: every read of it is done), and the
        // diagonal block.
#pragma unroll
        for (int j = 0; j < kSolveNC; ++j) {
          red[(warp * kSolveNC + j) * kSolveRB + lane] = acc0[j];
          red[(warp * kSolveNC + j) * kSolveRB + lane + 32] = acc1[j];
        }
        for (int idx = tid; idx < kSolveRB * kSolveRB; idx += kSolveThreads) {
          const int r = idx / kSolveRB, c = idx % kSolveRB;
          T v;
          if (r < rb && c < rb) {
            v = c <= r ? lb[static_cast<int64_t>(r0 + r) * d + r0 + c] : T(0);
          } else {
            v = r == c ? T(1) : T(0);
          }
          s.ldiag[r][c] = v;
        }
        __syncthreads();
        if (tid < kSolveRB) s.rdiag[tid] = T(1) / s.ldiag[tid][tid];
        // Warp j solves column c0 + j; lane holds rows lane and lane + 32.
        const int j = warp;
        const bool cok = c0 + j < m;
        T v[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = lane + 32 * h;
          T rhs = T(0);
          if (cok && row < rb) {
            rhs = fwd ? bb[static_cast<int64_t>(r0 + row) * p.ldb + c0 + j]
                      : xb[static_cast<int64_t>(r0 + row) * m + c0 + j];
          }
          T sum = T(0);
#pragma unroll
          for (int g = 0; g < 8; ++g) sum += red[(g * kSolveNC + j) * kSolveRB + row];
          v[h] = rhs - sum;
        }
        __syncthreads();  // rdiag visible
        if (fwd) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            for (int ii = 0; ii < 32; ++ii) {
              const int i = 32 * h + ii;
              if (i >= rb) break;
              const T yi = __shfl_sync(kFullMask, v[h] * s.rdiag[i], ii);
              if (lane == ii) v[h] = yi;
              if (h == 0) {
                if (lane > ii) v[0] = fma(-s.ldiag[lane][i], yi, v[0]);
                v[1] = fma(-s.ldiag[lane + 32][i], yi, v[1]);
              } else if (lane > ii) {
                v[1] = fma(-s.ldiag[lane + 32][i], yi, v[1]);
              }
            }
          }
        } else {
#pragma unroll
          for (int h = 1; h >= 0; --h) {
            for (int ii = 31; ii >= 0; --ii) {
              const int i = 32 * h + ii;
              if (i >= rb) continue;
              const T xi = __shfl_sync(kFullMask, v[h] * s.rdiag[i], ii);
              if (lane == ii) v[h] = xi;
              if (h == 1) {
                if (lane < ii) v[1] = fma(-s.ldiag[i][lane + 32], xi, v[1]);
                v[0] = fma(-s.ldiag[i][lane], xi, v[0]);
              } else if (lane < ii) {
                v[0] = fma(-s.ldiag[i][lane], xi, v[0]);
              }
            }
          }
        }
        if (cok) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = lane + 32 * h;
            if (row < rb) xb[static_cast<int64_t>(r0 + row) * m + c0 + j] = v[h];
          }
        }
        __syncthreads();  // x rows visible to the block; shared memory free
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------

void check_options(const CholeskyOptions& o) {
  DPFC_EXPECTS(o.small_max >= 0 && o.small_max <= 128, "small_max must be in [0, 128]");
}

bool use_left_looking(const CholeskyOptions& o, int64_t batch, int64_t d) {
  if (o.schedule != CholeskySchedule::kAuto) return o.schedule == CholeskySchedule::kLeft;
  // Left-looking moves the fewest bytes but has only batch x (nblk - J) tiles per launch,
  // each with a K of J*64; right-looking has ~batch x (nblk - J)^2 / 2 tiles with K = 64.
  const int64_t nblk = (d + kNb - 1) / kNb;
  return batch * nblk >= 4 * static_cast<int64_t>(current_sm_count());
}

unsigned grid_y(int64_t batch) {
  return static_cast<unsigned>(batch < kMaxGridY ? batch : kMaxGridY);
}

template <typename T, bool kMma, bool kVec>
void launch_update(const UpdateArgs<T>& args, unsigned tiles, cudaStream_t stream) {
  using Cfg = UpdCfg<T, kMma>;
  dim3 grid(tiles, grid_y(args.batch));
  chol_update_kernel<T, kMma, kVec><<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args);
  DPFC_CUDA_CHECK_LAUNCH();
}

// Work space bound of the blocked path (the diagonal factors of a chunk of the batch).
constexpr size_t kWorkspaceBytes = size_t(1) << 30;

// One chunk of the batch (fa.batch matrices) through the blocked schedule; w holds
// fa.batch * nblk diagonal tiles.
template <typename T, bool kMma, bool kVec>
void factor_blocked_chunk(const FactorArgs<T>& fa, T* w, bool left, cudaStream_t stream) {
  const int d = fa.d;
  const int nblk = d_blocks(d);
  const unsigned gy = grid_y(fa.batch);
  UpdateArgs<T> ua{};
  ua.a = fa.a;
  ua.a_bs = fa.a_bs;
  ua.lda = fa.lda;
  ua.shifts = fa.shifts;
  ua.l = fa.l;
  ua.info = fa.info;
  ua.batch = fa.batch;
  ua.d = d;
  const int64_t dd = static_cast<int64_t>(d) * d;
  const unsigned gx = static_cast<unsigned>(std::min<int64_t>((dd + 1023) / 1024, 1024));
  if (left) {
    for (int J = 0; J < nblk; ++J) {
      ua.mode = 0;
      ua.step = J;
      launch_update<T, kMma, kVec>(ua, static_cast<unsigned>(nblk - J), stream);
      chol_panel_kernel<T><<<dim3(static_cast<unsigned>(nblk - J), gy), kPanelThreads, 0, stream>>>(
          fa.l, w, fa.info, fa.batch, d, J, 1);
      DPFC_CUDA_CHECK_LAUNCH();
    }
  } else {
    chol_init_kernel<T><<<dim3(gx, gy), 256, 0, stream>>>(fa);
    DPFC_CUDA_CHECK_LAUNCH();
    for (int K = 0; K < nblk; ++K) {
      chol_panel_kernel<T><<<dim3(static_cast<unsigned>(nblk - K), gy), kPanelThreads, 0, stream>>>(
          fa.l, w, fa.info, fa.batch, d, K, 0);
      DPFC_CUDA_CHECK_LAUNCH();
      const int rest = nblk - K - 1;
      if (rest > 0) {
        ua.mode = 1;
        ua.step = K;
        launch_update<T, kMma, kVec>(ua, static_cast<unsigned>(rest * (rest + 1) / 2), stream);
      }
    }
  }
  chol_finish_kernel<T><<<dim3(gx, gy), 256, 0, stream>>>(fa.l, w, fa.info, fa.batch, d);
  DPFC_CUDA_CHECK_LAUNCH();
}

int64_t blocked_bytes_per_matrix(int64_t d, int64_t elem_bytes) {
  return ((d + kNb - 1) / kNb) * kNb * kNb * elem_bytes;
}

// Matrices per work-space chunk (at least 1).
int64_t blocked_chunk(int64_t batch, int64_t d, int64_t elem_bytes, size_t budget) {
  const int64_t per = blocked_bytes_per_matrix(d, elem_bytes);
  return std::max<int64_t>(1, std::min<int64_t>(batch, static_cast<int64_t>(budget) / per));
}

template <typename T, bool kMma, bool kVec>
void factor_blocked(const FactorArgs<T>& fa, const CholeskyOptions& o, void* workspace,
                    size_t workspace_bytes, cudaStream_t stream) {
  DPFC_CUDA_CHECK(cudaFuncSetAttribute(chol_update_kernel<T, kMma, kVec>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(UpdCfg<T, kMma>::kSmemBytes)));
  const int64_t per_matrix = blocked_bytes_per_matrix(fa.d, sizeof(T));
  T* w = static_cast<T*>(workspace);
  const bool own = w == nullptr;
  int64_t chunk;
  if (own) {
    chunk = blocked_chunk(fa.batch, fa.d, sizeof(T), kWorkspaceBytes);
    DPFC_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&w),
                                    static_cast<size_t>(chunk * per_matrix), stream));
  } else {
    DPFC_EXPECTS(reinterpret_cast<std::uintptr_t>(workspace) % 16 == 0,
                 "workspace must be 16-byte aligned");
    DPFC_EXPECTS(static_cast<int64_t>(workspace_bytes) >= per_matrix,
                 "workspace too small: see cholesky_workspace_bytes");
    chunk = blocked_chunk(fa.batch, fa.d, sizeof(T), workspace_bytes);
  }
  try {
    for (int64_t b0 = 0; b0 < fa.batch; b0 += chunk) {
      FactorArgs<T> part = fa;
      part.batch = std::min<int64_t>(chunk, fa.batch - b0);
      part.a = fa.a + b0 * fa.a_bs;
      part.shifts = fa.shifts != nullptr ? fa.shifts + b0 : nullptr;
      part.l = fa.l + b0 * static_cast<int64_t>(fa.d) * fa.d;
      part.info = fa.info + b0;
      factor_blocked_chunk<T, kMma, kVec>(part, w, use_left_looking(o, part.batch, fa.d), stream);
    }
  } catch (...) {
    if (own) cudaFreeAsync(w, stream);
    throw;
  }
  if (own) DPFC_CUDA_CHECK(cudaFreeAsync(w, stream));
}

template <typename T, int D>
void launch_small(const FactorArgs<T>& fa, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(fa.batch, 0x7fffffff));
  chol_small_kernel<T, D><<<grid, RegChol<T, D>::kThreads, 0, stream>>>(fa);
  DPFC_CUDA_CHECK_LAUNCH();
}

}  // namespace

size_t cholesky_workspace_bytes(int64_t batch, int64_t d, int dtype_bytes,
                                const CholeskyOptions& o) {
  DPFC_EXPECTS(dtype_bytes == 4 || dtype_bytes == 8, "dtype_bytes must be 4 or 8");
  DPFC_EXPECTS(batch >= 1 && d >= 1, "batch and d must be >= 1");
  check_options(o);
  if (d <= o.small_max) return 0;
  return static_cast<size_t>(blocked_chunk(batch, d, dtype_bytes, kWorkspaceBytes) *
                             blocked_bytes_per_matrix(d, dtype_bytes));
}

template <typename T>
void cholesky_batched(const T* a, int64_t a_batch_stride, int64_t lda, const T* shifts, T* l,
                      int32_t* info, int64_t batch, int64_t d, void* workspace,
                      size_t workspace_bytes, const CholeskyOptions& o, cudaStream_t stream) {
  DPFC_EXPECTS(batch >= 1 && batch <= 0x7fffffff, "batch must be in [1, 2^31)");
  DPFC_EXPECTS(d >= 1 && d <= 32768, "d must be in [1, 32768]");
  DPFC_EXPECTS(lda >= d, "lda must be >= d");
  DPFC_EXPECTS(a_batch_stride >= 0, "a_batch_stride must be >= 0");
  DPFC_EXPECTS(a != nullptr && l != nullptr && info != nullptr, "null pointer");
  check_options(o);
  DPFC_CUDA_CHECK(cudaMemsetAsync(info, 0, sizeof(int32_t) * static_cast<size_t>(batch), stream));
  FactorArgs<T> fa{a, a_batch_stride, lda, shifts, l, info, batch, static_cast<int>(d)};
  if (d <= o.small_max) {
    if (d <= 32) {
      launch_small<T, 32>(fa, stream);
    } else if (d <= 64) {
      launch_small<T, 64>(fa, stream);
    } else {
      launch_small<T, 128>(fa, stream);
    }
    return;
  }
  if constexpr (std::is_same<T, double>::value) {
    if (o.mma) {
      const bool vec = d % 2 == 0 && reinterpret_cast<std::uintptr_t>(l) % 16 == 0;
      if (vec) {
        factor_blocked<T, true, true>(fa, o, workspace, workspace_bytes, stream);
      } else {
        factor_blocked<T, true, false>(fa, o, workspace, workspace_bytes, stream);
      }
      return;
    }
  }
  factor_blocked<T, false, false>(fa, o, workspace, workspace_bytes, stream);
}

template <typename T>
void cho_solve_batched(const T* l, int64_t l_batch_stride, const T* b, int64_t b_batch_stride,
                       int64_t ldb, T* x, int64_t batch, int64_t d, int64_t m,
                       cudaStream_t stream) {
  DPFC_EXPECTS(batch >= 1 && batch <= 0x7fffffff, "batch must be in [1, 2^31)");
  DPFC_EXPECTS(d >= 1 && d <= 32768, "d must be in [1, 32768]");
  DPFC_EXPECTS(m >= 1 && m <= 0x7fffffff / 2, "m must be >= 1");
  DPFC_EXPECTS(d * m <= 0x7fffffffLL * 4, "d * m too large");
  DPFC_EXPECTS(ldb >= m, "ldb must be >= m");
  DPFC_EXPECTS(l_batch_stride >= 0 && b_batch_stride >= 0, "batch strides must be >= 0");
  DPFC_EXPECTS(l != nullptr && b != nullptr && x != nullptr, "null pointer");
  const size_t smem = sizeof(SolveSmem<T>);
  DPFC_CUDA_CHECK(cudaFuncSetAttribute(
      cho_solve_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  SolveArgs<T> args{l,
                    l_batch_stride,
                    b,
                    b_batch_stride,
                    ldb,
                    x,
                    batch,
                    static_cast<int>(d),
                    static_cast<int>(m)};
  const unsigned gx = static_cast<unsigned>((m + kSolveNC - 1) / kSolveNC);
  cho_solve_kernel<T><<<dim3(gx, grid_y(batch)), kSolveThreads, smem, stream>>>(args);
  DPFC_CUDA_CHECK_LAUNCH();
}

std::string cholesky_plan(int64_t batch, int64_t d, int dtype_bytes, const CholeskyOptions& o) {
  check_options(o);
  if (d <= o.small_max) {
    const int tier = d <= 32 ? 32 : d <= 64 ? 64 : 128;
    return "small tier=" + std::to_string(tier) + " threads=" +
           std::to_string(tier == 32   ? RegChol<double, 32>::kThreads
                          : tier == 64 ? RegChol<double, 64>::kThreads
                                       : RegChol<double, 128>::kThreads);
  }
  const bool left = use_left_looking(o, batch, d);
  const bool mma = dtype_bytes == 8 && o.mma;
  return std::string("blocked nb=64 schedule=") + (left ? "left" : "right") +
         " gemm=" + (mma ? "mma_f64_m8n8k4" : "simt");
}

template void cholesky_batched<float>(const float*, int64_t, int64_t, const float*, float*,
                                      int32_t*, int64_t, int64_t, void*, size_t,
                                      const CholeskyOptions&, cudaStream_t);
template void cholesky_batched<double>(const double*, int64_t, int64_t, const double*, double*,
                                       int32_t*, int64_t, int64_t, void*, size_t,
                                       const CholeskyOptions&, cudaStream_t);
template void cho_solve_batched<float>(const float*, int64_t, const float*, int64_t, int64_t,
                                       float*, int64_t, int64_t, int64_t, cudaStream_t);
template void cho_solve_batched<double>(const double*, int64_t, const double*, int64_t, int64_t,
                                        double*, int64_t, int64_t, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace dpfc
