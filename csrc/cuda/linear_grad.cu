// Clipped linear-layer gradient sum (see linear_grad.cuh): orchestration and the row epilogue.
// The two GEMM-shaped passes are the kernels of outer.cu (launch_rows_matmul_nt, launch_outer).
#include "cuda/linear_grad.cuh"

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
namespace {

template <typename T>
__device__ __forceinline__ T sigmoid_t(T z) {
  return T(1) / (T(1) + exp(-z));
}

// The epilogue evaluates r_l several times per row (norm, rescue, the stored u_i); each time
// it must get the same bits, or ||u_i|| != 1 and the clip bound slips (by ~1e-5 with logits
// near 1e3: seen on the H100). So the roundings are pinned: no FMA contraction may differ
// between the inlined copies.
__device__ __forceinline__ float lg_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double lg_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float lg_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double lg_add(double a, double b) { return __dadd_rn(a, b); }

// Residual r_l for logit zl of class l (y the label): sigmoid (p_l - [l = y]) / K, or softmax
// exp(zl - mx) / se - [l = y] (mx the row max, inv_se = 1 / sum exp(z - mx)).
template <typename T>
__device__ __forceinline__ double lg_residual(T zl, int64_t l, int64_t y, int loss, T mx,
                                              double inv_se, double inv_k) {
  const double ind = l == y ? 1.0 : 0.0;
  if (loss == 0) return __dmul_rn(__dsub_rn(static_cast<double>(sigmoid_t(zl)), ind), inv_k);
  return __dsub_rn(__dmul_rn(static_cast<double>(exp(zl - mx)), inv_se), ind);
}

// Logit l of a row as stored (zs = 1, no bias: the native GEMM applied both) or finished here
// (the cuBLAS path: zs = the row's feature-clip scale, bias added in T).
template <typename T>
__device__ __forceinline__ T lg_logit(const T* z, int64_t l, T zs, const double* bias) {
  const T v = lg_mul(z[l], zs);
  return bias != nullptr ? lg_add(v, static_cast<T>(bias[l])) : v;
}

// Below this sum of squares of a residual, its terms may have underflowed: ||r|| is recomputed
// as m ||r / m||, m = max |r_l| (a row with a huge ||x|| must not look unclipped).
constexpr double kLgTinySumSq = 1e-280;

// One warp per row of the chunk: Z[i, :] (logits) <- u_i = r_i / ||r_i|| and
// bscale[i] <- s_i c_i ||r_i|| (s_i the feature-clip scale, 1 without), so that pass 2 forms
// u_i (bscale_i x_i)^T = c_i r_i xbar_i^T with both factors in range: c_i r_i alone would be
// subnormal in float (precision far coarser than the 2^-20 clip margin) for rows with a large
// ||x_i||. A row with r_i = 0 or non-finite residuals gets u_i = 0 and bscale_i = 0.
// Probabilities in T (float math for float32 input), sums of squares in float64.
template <typename T>
__global__ void __launch_bounds__(256, 2)
    residual_clip_kernel(T* __restrict__ Z, int64_t rows, int64_t K,
                         const int32_t* __restrict__ labels, const double* __restrict__ norms,
                         const double* __restrict__ fscale, double clip_norm, int loss,
                         double* __restrict__ bscale, unsigned long long* __restrict__ n_clipped,
                         const double* __restrict__ zscale, const double* __restrict__ zbias) {
  __shared__ unsigned int block_clipped;
  if (threadIdx.x == 0) block_clipped = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  unsigned int mine = 0;
  const double inv_k = 1.0 / static_cast<double>(K);
  for (int64_t i = warp; i < rows; i += nwarps) {
    T* z = Z + i * K;
    const int64_t y = labels[i];
    const double fs = fscale != nullptr ? fscale[i] : 1.0;
    // Norm of the row as used: 0 when the feature clip zeroed it (an overflowing norm, inf,
    // has scale 0, and inf * 0 would be NaN).
    const double xnorm = fs > 0.0 ? norms[i] * fs : 0.0;
    const T zs = zscale != nullptr ? static_cast<T>(zscale[i]) : T(1);
    // Finish the logits in place first (cuBLAS path), so every later pass reads the same
    // stored values, as on the native path (each lane rereads only its own l).
    if (zscale != nullptr || zbias != nullptr) {
      for (int64_t l = lane; l < K; l += 32) z[l] = lg_logit(z, l, zs, zbias);
    }
    T mx = T(0);
    double inv_se = 0.0;
    if (loss != 0) {
      mx = -INFINITY;
      for (int64_t l = lane; l < K; l += 32) mx = max(mx, z[l]);
      mx = warp_max(mx);
      double se = 0.0;
      for (int64_t l = lane; l < K; l += 32) se += static_cast<double>(exp(z[l] - mx));
      se = warp_sum(se);
      inv_se = 1.0 / se;
    }
    double ss = 0.0;
    for (int64_t l = lane; l < K; l += 32) {
      const double r = lg_residual(z[l], l, y, loss, mx, inv_se, inv_k);
      ss += r * r;
    }
    ss = warp_sum(ss);
    // Overflowing logits (inf - inf) give NaN residuals: such a row contributes nothing
    // and is not counted as clipped (as on the CPU path).
    const bool bad = !isfinite(ss);
    double rn = bad ? 0.0 : sqrt(ss);
    double gnorm = rn > 0.0 ? rn * xnorm : 0.0;
    if (!bad && ss < kLgTinySumSq) {
      double m = 0.0;
      for (int64_t l = lane; l < K; l += 32) {
        m = fmax(m, fabs(lg_residual(z[l], l, y, loss, mx, inv_se, inv_k)));
      }
      m = warp_max(m);
      if (m > 0.0) {
        double t = 0.0;
        for (int64_t l = lane; l < K; l += 32) {
          const double a = lg_residual(z[l], l, y, loss, mx, inv_se, inv_k) / m;
          t += a * a;
        }
        t = sqrt(warp_sum(t));
        rn = m * t;
        gnorm = (m * xnorm) * t;
      }
    }
    const double c = clip_scale(gnorm, clip_norm);
    const bool zero = !(rn > 0.0);
    for (int64_t l = lane; l < K; l += 32) {
      z[l] = zero ? T(0) : static_cast<T>(lg_residual(z[l], l, y, loss, mx, inv_se, inv_k) / rn);
    }
    if (lane == 0) {
      bscale[i] = zero ? 0.0 : fs * c * rn;
      if (c < 1.0) ++mine;
    }
  }
  if (lane == 0 && mine > 0) atomicAdd(&block_clipped, mine);
  __syncthreads();
  if (threadIdx.x == 0 && block_clipped > 0) {
    atomicAdd(n_clipped, static_cast<unsigned long long>(block_clipped));
  }
}

OuterEngine pass2_engine(int dtype, LinearGradEngine e) {
  if (dtype == kFloat32 && (e == LinearGradEngine::kAuto || e == LinearGradEngine::kSimt32)) {
    return OuterEngine::kSimtF32;
  }
  if (e == LinearGradEngine::kSimt) return OuterEngine::kSimtF64;
  if (e == LinearGradEngine::kMma884) return OuterEngine::kMma884F64;
  return current_cc() >= 80 ? OuterEngine::kMmaF64 : OuterEngine::kSimtF64;  // DMMA from sm_80
}

}  // namespace

void launch_residual_clip(void* z, int dtype, int64_t rows, int64_t K, const int32_t* labels,
                          const double* norms, const double* fscale, const double* zscale,
                          const double* zbias, double clip_norm, LinearLoss loss, double* bscale,
                          int64_t* n_clipped, cudaStream_t stream) {
  DPFC_EXPECTS(dtype == kFloat32 || dtype == kFloat64, "logits must be float32 or float64");
  DPFC_EXPECTS(rows >= 0 && K >= 1 && K < (int64_t{1} << 31), "bad logits shape");
  DPFC_EXPECTS(clip_norm > 0.0 && std::isfinite(clip_norm), "clip_norm must be finite and > 0");
  if (rows == 0) return;
  DPFC_EXPECTS(z != nullptr && labels != nullptr && norms != nullptr && bscale != nullptr &&
                   n_clipped != nullptr,
               "residual_clip: null device pointer");
  const unsigned blocks = capped_grid(rows, 8, 16);
  auto* count = reinterpret_cast<unsigned long long*>(n_clipped);
  if (dtype == kFloat32) {
    residual_clip_kernel<float><<<blocks, 256, 0, stream>>>(
        static_cast<float*>(z), rows, K, labels, norms, fscale, clip_norm, static_cast<int>(loss),
        bscale, count, zscale, zbias);
  } else {
    residual_clip_kernel<double><<<blocks, 256, 0, stream>>>(
        static_cast<double*>(z), rows, K, labels, norms, fscale, clip_norm, static_cast<int>(loss),
        bscale, count, zscale, zbias);
  }
  DPFC_CUDA_CHECK_LAUNCH();
}

void launch_clipped_linear_grad(const RowsView& x, const int32_t* labels, const void* w,
                                int64_t ldw, const double* bias, int64_t K, double clip_norm,
                                LinearLoss loss, double feature_clip, double* grad,
                                int64_t* n_clipped, LinearGradEngine engine_choice,
                                int64_t chunk_rows, cudaStream_t stream) {
  check_rows_view(x, "x");
  DPFC_EXPECTS(x.dtype == kFloat32 || x.dtype == kFloat64, "x must be float32 or float64");
  DPFC_EXPECTS(labels != nullptr, "labels: null device pointer");
  DPFC_EXPECTS(w != nullptr, "w: null device pointer");
  DPFC_EXPECTS(K >= 1 && K < (int64_t{1} << 31), "num_classes must be in [1, 2^31)");
  DPFC_EXPECTS(K == 1 || ldw >= x.d, "w: row stride must be >= d");
  DPFC_EXPECTS(clip_norm > 0.0 && std::isfinite(clip_norm), "clip_norm must be finite and > 0");
  DPFC_EXPECTS(!(feature_clip > 0.0) || std::isfinite(feature_clip), "feature_clip must be finite");
  DPFC_EXPECTS(grad != nullptr && n_clipped != nullptr, "out: null device pointer");
  DPFC_EXPECTS(chunk_rows >= 1, "chunk_rows must be >= 1");
  const int64_t n = x.n, d = x.d;
  const int elem = dtype_size(x.dtype);
  const bool fclip = feature_clip > 0.0;

  DeviceBuffer norms(static_cast<std::size_t>(n) * sizeof(double), stream);
  DeviceBuffer fscale(fclip ? static_cast<std::size_t>(n) * sizeof(double) : 0, stream);
  const double* fs = fclip ? fscale.as<double>() : nullptr;
  launch_row_norms(x, fclip ? feature_clip : 0.0, norms.as<double>(),
                   fclip ? fscale.as<double>() : nullptr, stream);
  DPFC_CUDA_CHECK(cudaMemsetAsync(n_clipped, 0, sizeof(int64_t), stream));

  const OuterEngine engine = pass2_engine(x.dtype, engine_choice);
  const int64_t nc = std::min(chunk_rows, n);
  DeviceBuffer zbuf(static_cast<std::size_t>(nc * K) * elem, stream);
  DeviceBuffer bscale(static_cast<std::size_t>(nc) * sizeof(double), stream);

  const int64_t tile = outer_tile_size(engine);
  const int64_t tiles2 = ((K + tile - 1) / tile) * ((d + tile - 1) / tile);
  const int slots = current_sm_count() * outer_blocks_per_sm(engine);
  const std::size_t split_bytes = static_cast<std::size_t>(K * d) * sizeof(double);
  const int64_t S2 = choose_splits(tiles2, nc, 2048, slots, split_bytes, std::size_t{512} << 20);
  DeviceBuffer part(S2 > 1 ? static_cast<std::size_t>(S2) * split_bytes : 0, stream);

  const char* xbytes = static_cast<const char*>(x.data);
  for (int64_t c0 = 0; c0 < n; c0 += nc) {
    const int64_t rows = std::min(nc, n - c0);
    RowsView xc;
    xc.data = xbytes + c0 * x.ld * elem;
    xc.dtype = x.dtype;
    xc.n = rows;
    xc.d = d;
    xc.ld = x.ld;
    const double* fsc = fs != nullptr ? fs + c0 : nullptr;
    launch_rows_matmul_nt(xc, fsc, w, ldw, K, bias, zbuf.as<void>(), K, stream);
    // The logits are finished (scale and bias applied by the GEMM): no zscale, no bias here.
    launch_residual_clip(zbuf.as<void>(), x.dtype, rows, K, labels + c0, norms.as<double>() + c0,
                         fsc, nullptr, nullptr, clip_norm, loss, bscale.as<double>(), n_clipped,
                         stream);
    OuterProblem p;
    p.a = zbuf.as<void>();
    p.a_dtype = x.dtype;
    p.lda = K;
    p.b = xc.data;
    p.b_dtype = x.dtype;
    p.ldb = x.ld;
    p.M = K;
    p.N = d;
    p.sym = false;
    p.b_scale = bscale.as<double>();  // s_i c_i ||r_i|| (Z holds r_i / ||r_i||)
    p.n = rows;
    p.L = 1;
    p.S = S2;
    p.out = S2 > 1 ? part.as<double>() : grad;
    p.out_ld = d;
    p.out_lstride = 0;
    p.out_sstride = K * d;
    p.beta = c0 > 0;
    launch_outer(p, engine, stream);
  }
  if (S2 > 1) launch_sum_splits(part.as<double>(), S2, K * d, K * d, grad, false, stream);
}

}  // namespace dpfc::cuda
