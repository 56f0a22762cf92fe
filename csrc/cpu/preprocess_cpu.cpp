#include "cpu/preprocess_cpu.hpp"

#include <cmath>

#include "common/clip.hpp"

namespace dpfc::cpu {

namespace {

// Below this sum of squares its terms may have underflowed (2^-900): such rows are
// rescaled before the norm, as are rows whose sum overflows (the CPU ops do the same).
constexpr double kTinySumsq = 0x1p-900;

// Sum of (v_j / a)^2 (a = 1: of v_j^2) in a fixed order: four interleaved partial sums.
double sum_of_squares(const double* v, int64_t d, double a) {
  const auto term = [a](double t) {
    const double u = a == 1.0 ? t : t / a;
    return u * u;
  };
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t j = 0;
  for (; j + 4 <= d; j += 4) {
    s0 += term(v[j]);
    s1 += term(v[j + 1]);
    s2 += term(v[j + 2]);
    s3 += term(v[j + 3]);
  }
  for (; j < d; ++j) s0 += term(v[j]);
  return (s0 + s1) + (s2 + s3);
}

double max_abs(const double* v, int64_t d) {
  double a = 0.0;
  for (int64_t j = 0; j < d; ++j) a = std::fmax(a, std::fabs(v[j]));
  return a;
}

// The row's norm: the plain sum of squares, or (overflow, underflow) max |v| times the
// norm of v / max |v|. A row of zeros has norm 0.
double row_norm(const double* v, int64_t d) {
  const double sq = sum_of_squares(v, d, 1.0);
  const double norm = std::sqrt(sq);
  if (std::isfinite(norm) && !(sq < kTinySumsq)) return norm;
  const double a = max_abs(v, d);
  return a > 0.0 ? a * std::sqrt(sum_of_squares(v, d, a)) : 0.0;
}

}  // namespace

template <class T>
int64_t preprocess_rows(const T* x, int64_t m, int64_t d, const double* center, bool normalize,
                        double clip, double* out) {
  for (int64_t i = 0; i < m; ++i) {
    const T* xi = x + i * d;
    double* v = out + i * d;
    bool finite = true;
    for (int64_t j = 0; j < d; ++j) {
      const double t =
          center != nullptr ? static_cast<double>(xi[j]) - center[j] : static_cast<double>(xi[j]);
      finite = finite && std::isfinite(t);
      v[j] = t;
    }
    if (!finite) return i;
    if (normalize) {
      const double a = max_abs(v, d);
      if (a > 0.0) {
        for (int64_t j = 0; j < d; ++j) v[j] /= a;
      }
      const double nrm = std::sqrt(sum_of_squares(v, d, 1.0));
      if (nrm > 0.0) {
        for (int64_t j = 0; j < d; ++j) v[j] /= nrm;
      }
    }
    const double s = clip_scale(row_norm(v, d), clip);
    if (s != 1.0) {
      for (int64_t j = 0; j < d; ++j) v[j] *= s;
    }
  }
  return -1;
}

template int64_t preprocess_rows<float>(const float*, int64_t, int64_t, const double*, bool, double,
                                        double*);
template int64_t preprocess_rows<double>(const double*, int64_t, int64_t, const double*, bool,
                                         double, double*);

}  // namespace dpfc::cpu
