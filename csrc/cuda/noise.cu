// Gaussian noise kernels (see noise.cuh). This file is compiled with --fmad=false
// (CMakeLists.txt): no a*b+c contraction beyond the explicit fma_rn calls of the shared
// Box-Muller transform, so the normals are bit-identical to the CPU path's.
#include "cuda/noise.cuh"

#include <cuda_runtime.h>

#include <cmath>

#include "common/errors.hpp"
#include "common/philox.hpp"
#include "cuda/device.cuh"
#include "cuda/runtime.cuh"

namespace dpfc::cuda {
namespace {

constexpr int kNoiseTile = 64;
constexpr int kNoiseThreads = 256;

// Block (b, t): tile (ti, tj), ti <= tj, of matrix b.
// Row r of the tile (i = i0 + r) needs the normals of columns [jb, je) with
// jb = max(j0, i) (upper triangle only), a contiguous run of stream indices starting at
// k0 = b d(d+1)/2 + sym_index(d, i, jb); those lie in Philox blocks k0/2 .. (k0+cnt-1)/2.
// The (row, block) pairs of all rows form one flattened index space shared by the threads.
template <typename T>
__global__ void __launch_bounds__(kNoiseThreads)
    sym_noise_kernel(T* __restrict__ out, int64_t d, int64_t tiles_per_matrix, double std_diag,
                     double std_off, NoiseKey key, uint64_t block0) {
  __shared__ T tile[kNoiseTile][kNoiseTile + 1];
  __shared__ int64_t pre[kNoiseTile + 1];
  __shared__ int64_t nblk[kNoiseTile];
  __shared__ uint64_t row_k0[kNoiseTile];
  __shared__ int row_cb[kNoiseTile];
  __shared__ int row_cnt[kNoiseTile];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x / tiles_per_matrix;
  const int64_t t = blockIdx.x - b * tiles_per_matrix;
  int64_t ti, tj;
  tri_decode(t, &ti, &tj);
  const int64_t i0 = ti * kNoiseTile, j0 = tj * kNoiseTile;
  const uint64_t ud = static_cast<uint64_t>(d);
  const uint64_t base = static_cast<uint64_t>(b) * (ud * (ud + 1) / 2);
  if (tid < kNoiseTile) {
    const int64_t i = i0 + tid;
    int cb = 0, cnt = 0;
    uint64_t k0 = 0;
    int64_t nb = 0;
    if (i < d) {
      const int64_t jb = i > j0 ? i : j0;
      const int64_t je = (j0 + kNoiseTile) < d ? (j0 + kNoiseTile) : d;
      if (jb < je) {
        cnt = static_cast<int>(je - jb);
        cb = static_cast<int>(jb - j0);
        k0 = base + sym_index(ud, static_cast<uint64_t>(i), static_cast<uint64_t>(jb));
        nb = static_cast<int64_t>(((k0 + static_cast<uint64_t>(cnt) - 1) >> 1) - (k0 >> 1)) + 1;
      }
    }
    row_cb[tid] = cb;
    row_cnt[tid] = cnt;
    row_k0[tid] = k0;
    nblk[tid] = nb;
  }
  __syncthreads();
  if (tid == 0) {
    int64_t run = 0;
    for (int r = 0; r < kNoiseTile; ++r) {
      pre[r] = run;
      run += nblk[r];
    }
    pre[kNoiseTile] = run;
  }
  __syncthreads();
  const int64_t total = pre[kNoiseTile];
  for (int64_t q = tid; q < total; q += kNoiseThreads) {
    int lo = 0, hi = kNoiseTile;  // largest r with pre[r] <= q (rows with no blocks are skipped)
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (pre[mid] <= q) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    const int r = lo;
    const uint64_t k0 = row_k0[r];
    const uint64_t m = (k0 >> 1) + static_cast<uint64_t>(q - pre[r]);
    double z[2];
    gaussian_pair(philox_block(key, block0 + m), &z[0], &z[1]);
    const int64_t i = i0 + r;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t off = static_cast<int64_t>(2 * m + static_cast<uint64_t>(h) - k0);
      if (off >= 0 && off < row_cnt[r]) {
        const int c = row_cb[r] + static_cast<int>(off);
        const double sc = (j0 + c == i) ? std_diag : std_off;
        tile[r][c] = static_cast<T>(z[h] * sc);
      }
    }
  }
  __syncthreads();
  T* M = out + static_cast<int64_t>(b) * d * d;
  const bool diag = ti == tj;
  for (int e = tid; e < kNoiseTile * kNoiseTile; e += kNoiseThreads) {
    const int r = e / kNoiseTile, c = e % kNoiseTile;
    const int64_t i = i0 + r, j = j0 + c;
    if (i < d && j < d) M[i * d + j] = (!diag || c >= r) ? tile[r][c] : tile[c][r];
  }
  if (!diag) {
    for (int e = tid; e < kNoiseTile * kNoiseTile; e += kNoiseThreads) {
      const int r = e / kNoiseTile, c = e % kNoiseTile;
      const int64_t j = j0 + r, i = i0 + c;  // output row j, column i: the mirror
      if (i < d && j < d) M[j * d + i] = tile[c][r];
    }
  }
}

template <typename T>
struct Vec2;
template <>
struct Vec2<float> {
  using type = float2;
};
template <>
struct Vec2<double> {
  using type = double2;
};

template <typename T>
__global__ void __launch_bounds__(256)
    gaussian_noise_kernel(T* __restrict__ out, int64_t count, double std, NoiseKey key,
                          uint64_t block0, int vec) {
  const int64_t pairs = (count + 1) / 2;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double z0, z1;
    gaussian_pair(philox_block(key, block0 + static_cast<uint64_t>(p)), &z0, &z1);
    const T v0 = static_cast<T>(z0 * std);
    const T v1 = static_cast<T>(z1 * std);
    if (vec && 2 * p + 1 < count) {
      typename Vec2<T>::type v;
      v.x = v0;
      v.y = v1;
      *reinterpret_cast<typename Vec2<T>::type*>(out + 2 * p) = v;
    } else {
      out[2 * p] = v0;
      if (2 * p + 1 < count) out[2 * p + 1] = v1;
    }
  }
}

}  // namespace

void launch_sym_gaussian_noise(void* out, int dtype, int64_t batch, int64_t d, double std,
                               const NoiseKey& key, uint64_t block0, cudaStream_t stream) {
  DPFC_EXPECTS(out != nullptr, "out: null device pointer");
  DPFC_EXPECTS(dtype == kFloat32 || dtype == kFloat64, "dtype must be float32 or float64");
  DPFC_EXPECTS(batch >= 1 && d >= 1, "batch and d must be >= 1");
  DPFC_EXPECTS(d < (int64_t{1} << 31), "d too large");
  DPFC_EXPECTS(std >= 0.0 && std::isfinite(std), "std must be finite and non-negative");
  const int64_t nt = (d + kNoiseTile - 1) / kNoiseTile;
  const int64_t tiles = nt * (nt + 1) / 2;
  DPFC_EXPECTS(tiles * batch < (int64_t{1} << 31), "sym_gaussian_noise: too many tiles");
  const double std_diag = sym_noise_scale(std, true);
  const double std_off = sym_noise_scale(std, false);
  const unsigned grid = static_cast<unsigned>(tiles * batch);
  if (dtype == kFloat32) {
    sym_noise_kernel<float><<<grid, kNoiseThreads, 0, stream>>>(static_cast<float*>(out), d, tiles,
                                                                std_diag, std_off, key, block0);
  } else {
    sym_noise_kernel<double><<<grid, kNoiseThreads, 0, stream>>>(
        static_cast<double*>(out), d, tiles, std_diag, std_off, key, block0);
  }
  DPFC_CUDA_CHECK_LAUNCH();
}

void launch_gaussian_noise(void* out, int dtype, int64_t count, double std, const NoiseKey& key,
                           uint64_t block0, cudaStream_t stream) {
  DPFC_EXPECTS(out != nullptr, "out: null device pointer");
  DPFC_EXPECTS(dtype == kFloat32 || dtype == kFloat64, "dtype must be float32 or float64");
  DPFC_EXPECTS(count >= 1, "count must be >= 1");
  DPFC_EXPECTS(std >= 0.0 && std::isfinite(std), "std must be finite and non-negative");
  const int64_t pairs = (count + 1) / 2;
  const unsigned grid = capped_grid(pairs, 256, 32);
  const int elem = dtype == kFloat32 ? 4 : 8;
  const int vec = (reinterpret_cast<std::uintptr_t>(out) % (2 * elem)) == 0 ? 1 : 0;
  if (dtype == kFloat32) {
    gaussian_noise_kernel<float>
        <<<grid, 256, 0, stream>>>(static_cast<float*>(out), count, std, key, block0, vec);
  } else {
    gaussian_noise_kernel<double>
        <<<grid, 256, 0, stream>>>(static_cast<double*>(out), count, std, key, block0, vec);
  }
  DPFC_CUDA_CHECK_LAUNCH();
}

}  // namespace dpfc::cuda
