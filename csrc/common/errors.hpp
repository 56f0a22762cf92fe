// Typed errors for the native layer. pybind11 maps std::invalid_argument to ValueError;
// dpfc::CudaError is registered in the bindings as dpfc_native.CudaError (a RuntimeError).
// Nothing here aborts the process.
#pragma once

#include <stdexcept>
#include <string>

namespace dpfc {

class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace dpfc

#define DPFC_STRINGIFY_(x) #x
#define DPFC_STRINGIFY(x) DPFC_STRINGIFY_(x)

// Precondition at a public native entry point: throws ValueError on the Python side,
// naming the failed condition and the caller's message.
#define DPFC_EXPECTS(cond, msg)                                               \
  do {                                                                        \
    if (!(cond)) {                                                            \
      throw std::invalid_argument(std::string(msg) + " (failed: " #cond ")"); \
    }                                                                         \
  } while (0)

#if defined(__CUDACC__) || defined(DPFC_WITH_CUDA)
#include <cuda_runtime_api.h>

// Turns a CUDA runtime error into dpfc::CudaError with the call, file and line.
#define DPFC_CUDA_CHECK(expr)                                                                   \
  do {                                                                                          \
    cudaError_t dpfc_err_ = (expr);                                                             \
    if (dpfc_err_ != cudaSuccess) {                                                             \
      throw ::dpfc::CudaError(std::string("CUDA error ") + cudaGetErrorName(dpfc_err_) + ": " + \
                              cudaGetErrorString(dpfc_err_) +                                   \
                              " in " #expr " at " __FILE__ ":" DPFC_STRINGIFY(__LINE__));       \
    }                                                                                           \
  } while (0)

// After a kernel launch: reports launch-configuration errors without synchronising.
#define DPFC_CUDA_CHECK_LAUNCH() DPFC_CUDA_CHECK(cudaGetLastError())
#endif
