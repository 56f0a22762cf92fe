#include "cpu/noise_cpu.hpp"

#include <algorithm>
#include <thread>
#include <vector>

namespace dpfc::cpu {
namespace {

// Runs body(begin, end) over [0, n) on up to hardware_concurrency threads.
template <typename F>
void parallel_for(int64_t n, int64_t grain, F body) {
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t workers = std::min<int64_t>(hw, (n + grain - 1) / grain);
  if (workers <= 1) {
    body(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> threads;
  const int64_t chunk = (n + workers - 1) / workers;
  for (int64_t w = 0; w < workers; ++w) {
    const int64_t begin = w * chunk;
    const int64_t end = std::min(n, begin + chunk);
    if (begin < end) threads.emplace_back(body, begin, end);
  }
  for (auto& t : threads) t.join();
}

}  // namespace

template <typename T>
void sym_gaussian_noise(T* out, int64_t batch, int64_t d, double std, const NoiseKey& key,
                        uint64_t block0) {
  const uint64_t per_matrix = static_cast<uint64_t>(d) * static_cast<uint64_t>(d + 1) / 2;
  const double diag_std = sym_noise_scale(std, true);
  const double off_std = sym_noise_scale(std, false);
  // Parallel over (matrix, row) pairs; each row i writes (i, j >= i) and its mirror.
  parallel_for(batch * d, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / d;
      const int64_t i = r % d;
      T* m = out + b * d * d;
      // Row i's entries (i, i..d-1) are the stream indices k0 .. k0 + d - i - 1; walk
      // the Philox blocks covering them so each block is generated once.
      const uint64_t k0 =
          static_cast<uint64_t>(b) * per_matrix +
          sym_index(static_cast<uint64_t>(d), static_cast<uint64_t>(i), static_cast<uint64_t>(i));
      const uint64_t k_end = k0 + static_cast<uint64_t>(d - i);
      for (uint64_t blk = k0 >> 1; 2 * blk < k_end; ++blk) {
        double z[2];
        gaussian_pair(philox_block(key, block0 + blk), &z[0], &z[1]);
        for (uint64_t h = 0; h < 2; ++h) {
          const uint64_t k = 2 * blk + h;
          if (k < k0 || k >= k_end) continue;
          const int64_t j = i + static_cast<int64_t>(k - k0);
          const T v = static_cast<T>(z[h] * (j == i ? diag_std : off_std));
          m[i * d + j] = v;
          m[j * d + i] = v;
        }
      }
    }
  });
}

template <typename T>
void gaussian_noise(T* out, int64_t count, double std, const NoiseKey& key, uint64_t block0) {
  // Work in whole blocks so each Philox call yields both of its normals.
  const int64_t blocks = static_cast<int64_t>(gaussian_blocks(static_cast<uint64_t>(count)));
  parallel_for(blocks, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      double z0, z1;
      gaussian_pair(philox_block(key, block0 + static_cast<uint64_t>(blk)), &z0, &z1);
      out[2 * blk] = static_cast<T>(z0 * std);
      if (2 * blk + 1 < count) out[2 * blk + 1] = static_cast<T>(z1 * std);
    }
  });
}

template void sym_gaussian_noise<float>(float*, int64_t, int64_t, double, const NoiseKey&,
                                        uint64_t);
template void sym_gaussian_noise<double>(double*, int64_t, int64_t, double, const NoiseKey&,
                                         uint64_t);
template void gaussian_noise<float>(float*, int64_t, double, const NoiseKey&, uint64_t);
template void gaussian_noise<double>(double*, int64_t, double, const NoiseKey&, uint64_t);

}  // namespace dpfc::cpu
