// The device runtime (see runtime.cuh): dtype codes, row views, the workspace pool, device
// queries.
#include "cuda/runtime.cuh"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>

#include "common/errors.hpp"

namespace dpfc::cuda {

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

}  // namespace

int current_device() {
  int dev = 0;
  DPFC_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

DeviceBuffer::DeviceBuffer(std::size_t bytes, cudaStream_t stream)
    : bytes_(bytes), stream_(stream) {
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

unsigned capped_grid(int64_t work, int64_t per_block, int blocks_per_sm) {
  const int64_t want = (work + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(current_sm_count()) * blocks_per_sm;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(want, cap)));
}

}  // namespace dpfc::cuda
