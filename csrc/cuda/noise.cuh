// Gaussian noise on the GPU from the shared Philox4x32-10 stream (csrc/common/philox.hpp),
// bit-identical to the CPU path (csrc/cpu/noise_cpu.cpp) for the same key and counter:
// the same Box-Muller transform built from correctly rounded operations (its fused
// multiply-adds are explicit calls), compiled with --fmad=false so nvcc contracts nothing
// else (CMakeLists.txt sets it for noise.cu), and the same final static_cast<T>(z * scale).
//
// Both kernels compute whole Philox blocks (two normals per block) per thread.
//   gaussian_noise: thread per block, both normals stored as one 8/16-byte vector.
//   sym_gaussian_noise: 64 x 64 output tiles on or above the diagonal; a tile's rows need
//     contiguous runs of normals (upper-triangle row-major indices), so each block generates
//     the Philox blocks covering its rows' runs (a flattened row/block index space, ~1/33 of
//     normals computed twice at run edges), places them in a shared-memory tile, then writes
//     the tile and its transpose with coalesced stores.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/philox.hpp"

namespace dpfc::cuda {

// out: (batch, d, d) contiguous, dtype code 0 = float32, 1 = float64 (runtime.cuh DType).
// Matrix b entry (i <= j) = z[b d(d+1)/2 + sym_index(d, i, j)] * sym_noise_scale(std, i == j),
// mirrored to (j, i); z[k] = gaussian_at(key, block0, k).
void launch_sym_gaussian_noise(void* out, int dtype, int64_t batch, int64_t d, double std,
                               const NoiseKey& key, uint64_t block0, cudaStream_t stream);

// out[k] = static_cast<T>(z[k] * std) for k < count, contiguous.
void launch_gaussian_noise(void* out, int dtype, int64_t count, double std, const NoiseKey& key,
                           uint64_t block0, cudaStream_t stream);

}  // namespace dpfc::cuda
