#include "cpu/preprocess_cpu.hpp"

#include <cmath>
#include <limits>

#include "common/clip.hpp"

namespace dpfc::cpu {

namespace {

// Below this sum of squares its terms may have underflowed (2^-900): such rows are
// rescaled before the norm, as are rows whose sum overflows. The build compiles this file
// without FMA contraction (CMakeLists.txt), so the fixed summation order fixes the bits.
constexpr double kTinySumsq = 0x1p-900;
constexpr double kMaxDouble = std::numeric_limits<double>::max();

// Sum of (v_j / a)^2 in a fixed order: four interleaved partial sums, combined pairwise.
// kDivide false: of v_j^2 (a unused). Two instances, so the plain one is a straight loop.
template <bool kDivide>
double sum_of_squares(const double* v, int64_t d, double a) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t j = 0;
  for (; j + 4 <= d; j += 4) {
    const double t0 = kDivide ? v[j] / a : v[j];
    const double t1 = kDivide ? v[j + 1] / a : v[j + 1];
    const double t2 = kDivide ? v[j + 2] / a : v[j + 2];
    const double t3 = kDivide ? v[j + 3] / a : v[j + 3];
    s0 += t0 * t0;
    s1 += t1 * t1;
    s2 += t2 * t2;
    s3 += t3 * t3;
  }
  for (; j < d; ++j) {
    const double t = kDivide ? v[j] / a : v[j];
    s0 += t * t;
  }
  return (s0 + s1) + (s2 + s3);
}

double max_abs(const double* v, int64_t d) {
  double a0 = 0.0, a1 = 0.0;
  int64_t j = 0;
  for (; j + 2 <= d; j += 2) {  // the rows are finite here: max is order-free
    const double t0 = std::fabs(v[j]), t1 = std::fabs(v[j + 1]);
    a0 = t0 > a0 ? t0 : a0;
    a1 = t1 > a1 ? t1 : a1;
  }
  if (j < d) {
    const double t = std::fabs(v[j]);
    a0 = t > a0 ? t : a0;
  }
  return a0 > a1 ? a0 : a1;
}

void scale_row(double* v, int64_t d, double s) {
  for (int64_t j = 0; j < d; ++j) v[j] *= s;
}

// v /= a (a > 0) as v *= 1 / a: at most one more rounding per element and several times
// faster than dividing; a division where 1 / a overflows (a subnormal a).
void divide_row(double* v, int64_t d, double a) {
  const double r = 1.0 / a;
  if (r <= kMaxDouble) {
    scale_row(v, d, r);
  } else {
    for (int64_t j = 0; j < d; ++j) v[j] /= a;
  }
}

// The row's norm: the plain sum of squares, or (overflow, underflow) max |v| times the
// norm of v / max |v|. A row of zeros has norm 0.
double row_norm(const double* v, int64_t d) {
  const double sq = sum_of_squares<false>(v, d, 1.0);
  const double norm = std::sqrt(sq);
  if (std::isfinite(norm) && !(sq < kTinySumsq)) return norm;
  const double a = max_abs(v, d);
  return a > 0.0 ? a * std::sqrt(sum_of_squares<true>(v, d, a)) : 0.0;
}

// v = x_i - center (center may be null: no subtraction), widened to float64; returns
// whether every entry is finite (|t| <= DBL_MAX: NaN fails the comparison too). Counted,
// not branched on, so the loop stays a straight pass.
template <class T>
bool widen_row(const T* xi, const double* center, int64_t d, double* v) {
  int64_t not_finite = 0;
  for (int64_t j = 0; j < d; ++j) {
    const double t =
        center != nullptr ? static_cast<double>(xi[j]) - center[j] : static_cast<double>(xi[j]);
    not_finite += !(std::fabs(t) <= kMaxDouble);
    v[j] = t;
  }
  return not_finite == 0;
}

// v *= clip_scale(||v||, clip); returns the factor.
double clip_row(double* v, int64_t d, double clip) {
  const double s = clip_scale(row_norm(v, d), clip);
  if (s != 1.0) scale_row(v, d, s);
  return s;
}

}  // namespace

template <class T>
int64_t preprocess_rows(const T* x, int64_t m, int64_t d, const double* center, bool normalize,
                        double clip, double* out) {
  for (int64_t i = 0; i < m; ++i) {
    double* v = out + i * d;
    if (!widen_row(x + i * d, center, d, v)) return i;
    if (normalize) {
      const double a = max_abs(v, d);
      if (a > 0.0) divide_row(v, d, a);
      const double nrm = std::sqrt(sum_of_squares<false>(v, d, 1.0));
      if (nrm > 0.0) divide_row(v, d, nrm);
    }
    clip_row(v, d, clip);
  }
  return -1;
}

template <class T>
void clip_rows(const T* x, int64_t m, int64_t d, double clip, double* out, double* scales) {
  for (int64_t i = 0; i < m; ++i) {
    double* v = out + i * d;
    // A row with NaN or Inf has no norm: it keeps scale 1 (as the NumPy path's clip
    // factor, whose comparison with the target fails for a NaN norm).
    scales[i] = widen_row(x + i * d, nullptr, d, v) ? clip_row(v, d, clip) : 1.0;
  }
}

template void clip_rows<float>(const float*, int64_t, int64_t, double, double*, double*);
template void clip_rows<double>(const double*, int64_t, int64_t, double, double*, double*);

template int64_t preprocess_rows<float>(const float*, int64_t, int64_t, const double*, bool, double,
                                        double*);
template int64_t preprocess_rows<double>(const double*, int64_t, int64_t, const double*, bool,
                                         double, double*);

}  // namespace dpfc::cpu
