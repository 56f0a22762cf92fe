// Inline-PTX wrappers shared by the kernel families: the FP64 (DMMA) and tf32 / bf16 tensor-core
// mma.sync shapes, the tf32 conversion, cp.async copies and a named barrier. Device code only;
// internal linkage (each translation unit inlines its own copy).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m8n8k4 with .f64 floating point type",
// "... for mma.m16n8k8" and "... for mma.m16n8k16 with floating point type"), g = lane / 4,
// t = lane % 4:
//   m8n8k4 f64 (CUTLASS SM80_8x8x4_F64F64F64F64_TN):
//     A (8x4, row): a0 = A[g][t];  B (4x8, col): b0 = B[t][g];  C/D (8x8): c_i = C[g][2t + i]
//   m16n8k8 f64 (= the .tf32 layout; CUTLASS SM90_16x8x8_F64F64F64F64_TN) and tf32:
//     A: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4);  B: b0 (t, g), b1 (t+4, g)
//     C: c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
//   m16n8k16 bf16: A a0 (g, k=2t..2t+1), a1 (g+8, ..), a2 (g, 2t+8..), a3 (g+8, 2t+8..);
//     B b0 (2t..2t+1, g), b1 (2t+8.., g); C as above.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dpfc::cuda {
namespace {

// D = A B + C on one 8x8x4 double tile (sm_80+).
__device__ __forceinline__ void dmma_8x8x4(double& c0, double& c1, double a, double b) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
               : "+d"(c0), "+d"(c1)
               : "d"(a), "d"(b));
#else
  (void)c0;
  (void)c1;
  (void)a;
  (void)b;
  __trap();
#endif
}

// D = A B + C on one 16x8x8 double tile (sm_90).
__device__ __forceinline__ void dmma_16x8x8(double (&c)[4], const double (&a)[4],
                                            const double (&b)[2]) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f64.f64.f64.f64 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+d"(c[0]), "+d"(c[1]), "+d"(c[2]), "+d"(c[3])
      : "d"(a[0]), "d"(a[1]), "d"(a[2]), "d"(a[3]), "d"(b[0]), "d"(b[1]));
#else
  (void)c;
  (void)a;
  (void)b;
  __trap();
#endif
}

// x rounded to tf32 (round to nearest, ties away), as a 32-bit word.
__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
#else
  r = __float_as_uint(v);
#endif
  return r;
}

// D = A B + C on one 16x8x8 tf32 (BF16 = false) or 16x8x16 bf16 (BF16 = true) tile, float
// accumulators; operands are 32-bit words (tf32, or two bf16 with the even k in the low half).
template <bool BF16>
__device__ __forceinline__ void tc_mma(float (&c)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  (void)c;
  (void)a;
  (void)b;
  __trap();
#endif
}

// Asynchronous global -> shared copy of kBytes (4, 8 or 16); zero-fills when !valid.
template <int kBytes>
__device__ __forceinline__ void cp_async_zfill(void* smem_ptr, const void* gptr, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_ptr));
  const int src_bytes = valid ? kBytes : 0;
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gptr),
                 "r"(src_bytes)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(s), "l"(gptr), "n"(kBytes),
                 "r"(src_bytes)
                 : "memory");
  }
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Barrier 1 over `nthreads` threads (a multiple of 32), reachable from different code
// locations; orders shared-memory accesses like __syncthreads.
__device__ __forceinline__ void named_barrier(unsigned nthreads) {
  asm volatile("bar.sync 1, %0;\n" ::"r"(nthreads) : "memory");
}

}  // namespace
}  // namespace dpfc::cuda
