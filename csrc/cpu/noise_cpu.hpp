// CPU fill of Gaussian noise streams from the shared Philox header.
#pragma once

#include <cstdint>

#include "common/philox.hpp"

namespace dpfc::cpu {

// out[b, i, j] for b < batch, a d x d symmetric matrix per b (row-major, contiguous),
// diagonal N(0, std^2), off-diagonal N(0, std^2 / 2), mirrored. Matrix b draws the
// normals with stream indices b d(d+1)/2 + sym_index(d, i, j) starting at block0.
template <typename T>
void sym_gaussian_noise(T* out, int64_t batch, int64_t d, double std, const NoiseKey& key,
                        uint64_t block0);

// out[k] = std * z_k for k < count (z_k the normal with stream index k from block0).
template <typename T>
void gaussian_noise(T* out, int64_t count, double std, const NoiseKey& key, uint64_t block0);

}  // namespace dpfc::cpu
