// The host Gram update through a caller-supplied BLAS ?syrk (the Fortran-ABI function SciPy
// exports in scipy.linalg.cython_blas), called without the Python GIL.
#pragma once

#include <cstdint>

namespace dpfc::cpu {

// The reference BLAS signature of dsyrk / ssyrk (LP64: 32-bit integers).
template <class T>
using SyrkFn = void (*)(char* uplo, char* trans, int* n, int* k, T* alpha, T* a, int* lda, T* beta,
                        T* c, int* ldc);

// c = alpha a a^T + beta c on the upper triangle of the column-major d x d matrix c (its
// strict lower triangle untouched), for the column-major d x m matrix a (lda = d): exactly
// the call SciPy's scipy.linalg.blas.?syrk(alpha, a, beta=beta, c=c, trans=0, lower=0)
// makes, so the bits are those of that function.
template <class T>
void syrk_upper(SyrkFn<T> fn, int64_t d, int64_t m, T alpha, const T* a, T beta, T* c);

}  // namespace dpfc::cpu
