// The outer-product engines, the X W^T GEMM and the split reductions (see outer.cuh).
#include "cuda/outer.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/errors.hpp"
#include "cuda/device.cuh"
#include "cuda/ptx.cuh"
#include "cuda/runtime.cuh"

namespace dpfc::cuda {
namespace {

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
  DPFC_DISPATCH_DTYPE(p.dtype, T,
                      (load_rows_tile<T, AccT, BM, BK, NT>(p, job, rbase, tid, ra, rb)));
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
__global__ void __launch_bounds__((BM / TM) * (BM / TM), 2) outer_simt_kernel(const OuterArgs p) {
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
    if (more)
      store_rows_tile<AccT, BM, BK, NT, BM>(&As[cur ^ 1][0][0], &Bs[cur ^ 1][0][0], tid, ra, rb);
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

// The m16n8k8 operand fragments of a warp's 64 x 32 tile for k-step row r0 (= 8 ks + lane % 4)
// from shared stages stored [k][column] with row stride LDS; as and bs already point at the
// warp's columns plus lane / 4. a[q]: rows 16 q and 16 q + 8 at k rows r0 and r0 + 4; b[nt]:
// column 8 nt at the same k rows. One layout for the f64 DMMA (PTX .f64 = the .tf32 layout)
// and the tf32 / bf16 words of the float engine (bf16: one word = two k values).
template <int LDS, typename T>
__device__ __forceinline__ void load_frags_m16n8k8(const T* as, const T* bs, int r0, T (&a)[4][4],
                                                   T (&b)[4][2]) {
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
// 8 warps as 2 (rows) x 4 (columns); warp tile 64 x 32 = 8 x 4 m8n8k4 tiles (M16 = false) or
// 4 x 4 m16n8k8 tiles (M16 = true, sm_90 only). Both hold 64 accumulators per thread.
template <bool M16>
__global__ void __launch_bounds__(kMmaThreads, 1) outer_mma_kernel(const OuterArgs p) {
  extern __shared__ __align__(16) double mma_smem[];
  double* As = mma_smem;                                // [2][kMmaBK][kMmaLDS]
  double* Bs = mma_smem + 2 * kMmaBK * kMmaLDS;         // [2][kMmaBK][kMmaLDS]
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
constexpr int kTcBK = 32;    // rows of X per stage
constexpr int kTcLDW = 136;  // words per shared row: (8 t + g) mod 32 distinct (conflict-free)
constexpr int kTcThreads = 256;

template <bool BF16>
struct TcCfg {
  static constexpr int kRows = BF16 ? kTcBK / 2 : kTcBK;  // word rows per stage and operand
  static constexpr int kSteps = kRows / 8;                // mma k-steps per stage
  static constexpr int kSmemBytes = 2 * 2 * kRows * kTcLDW * 4;
};

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
  uint32_t* As = tc_smem;                            // [2][kRows][kTcLDW]
  uint32_t* Bs = tc_smem + 2 * Cfg::kRows * kTcLDW;  // [2][kRows][kTcLDW]
  constexpr int STAGE = Cfg::kRows * kTcLDW;
  constexpr int EPT = kTcBK * kTcTile / kTcThreads;  // 16
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
      load_rows_tile_any<float, kTcTile, kTcBK, kTcThreads>(p, job, job.rb + (st + 1) * kTcBK, tid,
                                                            ra, rb);
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
__global__ void __launch_bounds__(256)
    sym_reduce_kernel(const double* part, int64_t S, int64_t plstride, int64_t psstride, int64_t d,
                      int64_t T32, double* G) {
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
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, kMmaSmemBytes));
  DPFC_CUDA_CHECK(cudaFuncSetAttribute(outer_mma_kernel<true>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, kMmaSmemBytes));
}

void ensure_tc_smem() {
  DPFC_CUDA_CHECK(cudaFuncSetAttribute(outer_tc_kernel<false>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       TcCfg<false>::kSmemBytes));
  DPFC_CUDA_CHECK(cudaFuncSetAttribute(
      outer_tc_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, TcCfg<true>::kSmemBytes));
}

}  // namespace

int64_t outer_tile_size(OuterEngine engine) { return engine == OuterEngine::kSimtF64 ? 64 : 128; }

int outer_blocks_per_sm(OuterEngine engine) {
  int nb = 0;
  switch (engine) {
    case OuterEngine::kMmaF64:
    case OuterEngine::kMma884F64:
      ensure_mma_smem();
      DPFC_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, outer_mma_kernel<false>,
                                                                    kMmaThreads, kMmaSmemBytes));
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
    smax = std::min<int64_t>(smax,
                             std::max<int64_t>(1, static_cast<int64_t>(max_bytes / split_bytes)));
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
    default: outer_simt_kernel<float, 128, 8, 8><<<grid, 256, 0, stream>>>(a); break;
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
  sum_splits_kernel<<<capped_grid(count, 256, 16), 256, 0, stream>>>(part, S, sstride, count, out,
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

}  // namespace dpfc::cuda
