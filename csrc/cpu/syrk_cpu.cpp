#include "cpu/syrk_cpu.hpp"

#include <algorithm>

namespace dpfc::cpu {

template <class T>
void syrk_upper(SyrkFn<T> fn, int64_t d, int64_t m, T alpha, const T* a, T beta, T* c) {
  char uplo = 'U';
  char trans = 'N';
  int n = static_cast<int>(d);
  int k = static_cast<int>(m);
  int lda = static_cast<int>(std::max<int64_t>(d, 1));
  int ldc = lda;
  // BLAS does not write a; the Fortran interface just has no const.
  fn(&uplo, &trans, &n, &k, &alpha, const_cast<T*>(a), &lda, &beta, c, &ldc);
}

template void syrk_upper<double>(SyrkFn<double>, int64_t, int64_t, double, const double*, double,
                                 double*);
template void syrk_upper<float>(SyrkFn<float>, int64_t, int64_t, float, const float*, float,
                                float*);

}  // namespace dpfc::cpu
