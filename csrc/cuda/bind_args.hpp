// Argument conversions shared by the CUDA entry points (cuda/*_bind.cpp): device pointers and
// streams arrive as Python ints (CuPy's .data.ptr and stream .ptr).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/runtime.cuh"

namespace dpfc::cuda {

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <typename T>
T* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// The validated view of n device rows of d elements (row stride ld) at ptr, named "x".
inline RowsView make_rows(std::uintptr_t ptr, int dtype, int64_t n, int64_t d, int64_t ld) {
  RowsView v;
  v.data = as_ptr<const void>(ptr);
  v.dtype = dtype;
  v.n = n;
  v.d = d;
  v.ld = ld;
  check_rows_view(v, "x");
  return v;
}

}  // namespace dpfc::cuda
