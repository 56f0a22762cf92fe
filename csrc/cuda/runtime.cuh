// The device runtime shared by every CUDA kernel family: element type codes, row views,
// the stream-ordered workspace pool and device queries. Host code only (the bindings,
// compiled by the host compiler, include it too).
//
// Conventions: launchers take raw device pointers, extents and strides in elements plus a
// stream, validate with DPFC_EXPECTS, launch, check the launch, and never synchronise.
// Workspace comes from a per-device stream-ordered memory pool (DeviceBuffer below), so
// nothing waits on the host. A failed CUDA call is reported (dpfc::CudaError), never guessed
// around.
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

// The current device, its number of multiprocessors and its compute capability
// (major*10+minor). Each throws dpfc::CudaError when the runtime cannot answer.
int current_device();
int current_sm_count();
int current_cc();

// Blocks for `work` items at `per_block` items per block, capped at `blocks_per_sm` blocks per
// multiprocessor of the current device (grid-stride kernels), at least 1.
unsigned capped_grid(int64_t work, int64_t per_block, int blocks_per_sm);

}  // namespace dpfc::cuda
