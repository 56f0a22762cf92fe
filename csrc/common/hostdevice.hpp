// Portable qualifiers so the same math compiles into host and device code.
#pragma once

#if defined(__CUDACC__)
#define DPFC_HD __host__ __device__ __forceinline__
#else
#define DPFC_HD inline
#endif
