#include "cpu/grid_cpu.hpp"

#include <algorithm>
#include <cfenv>
#include <cmath>

namespace dpfc::cpu {

namespace {
constexpr int64_t kLimbBase = int64_t{1} << 32;
constexpr int64_t kLimbMask = kLimbBase - 1;

// Round to nearest, ties to even, in the default rounding mode (checked by the caller):
// for |x| < 2^52, adding and removing 2^52 (with x's sign) leaves the integer nearest x,
// as the addition rounds in that mode; from 2^52 on every double is an integer (and NaN
// or infinity is returned as it is, for the range check). Plain IEEE additions: the
// build never enables value-changing optimisations (no -ffast-math).
inline double round_half_even(double x) {
  constexpr double kTwo52 = 4503599627370496.0;
  if (!(std::fabs(x) < kTwo52)) return x;
  const double m = std::copysign(kTwo52, x);
  return (x + m) - m;
}

// The exact limb update of one value; sign +1 adds it, -1 takes it back out.
inline void limb_add(double q, int64_t sign, int64_t* hi, int64_t* lo) {
  const auto qi = sign * static_cast<int64_t>(q);  // |q| <= limit <= 2^62
  const int64_t low = qi & kLimbMask;              // two's complement: qi mod 2^32
  const int64_t sum = *lo + low;                   // < 2^33: *lo stays in [0, 2^32)
  *hi += (qi - low) / kLimbBase + (sum >> 32);     // exact: qi - low is a multiple of 2^32
  *lo = sum & kLimbMask;
}

// Adds v[0, len) to the limbs; returns len, or the index of the first value that fails
// the check (those before it are added, the rest untouched) with its status in *status.
int64_t accumulate_span(const double* v, int64_t len, double scale, double limit, int64_t* hi,
                        int64_t* lo, GridStatus* status) {
  for (int64_t k = 0; k < len; ++k) {
    const double q = round_half_even(v[k] * scale);
    if (!(std::fabs(q) <= limit)) {  // NaN fails this comparison too
      *status = std::isfinite(q) ? GridStatus::kOutOfRange : GridStatus::kNotFinite;
      return k;
    }
    limb_add(q, 1, hi + k, lo + k);
  }
  return len;
}

void take_back_span(const double* v, int64_t len, double scale, int64_t* hi, int64_t* lo) {
  for (int64_t k = 0; k < len; ++k) limb_add(round_half_even(v[k] * scale), -1, hi + k, lo + k);
}

// Calls f(offset, length) for the spans grid_accumulate visits, in order, while f returns
// true; returns whether every span was visited.
template <class F>
bool for_each_span(int64_t n, int64_t tri_d, F&& f) {
  if (tri_d == 0) return f(int64_t{0}, n);
  const int64_t dd = tri_d * tri_d;
  for (int64_t m = 0; m < n; m += dd) {
    for (int64_t row = 0; row < tri_d; ++row) {
      if (!f(m + row * tri_d, row + 1)) return false;
    }
  }
  return true;
}

}  // namespace

GridStatus grid_accumulate(const double* v, int64_t n, int64_t tri_d, double scale, double limit,
                           int64_t* hi, int64_t* lo) {
  const int mode = std::fegetround();
  if (mode != FE_TONEAREST) std::fesetround(FE_TONEAREST);
  // One pass: check and add each value. A bad value (rare: it fails the whole statistic)
  // stops the pass, and the additions made before it are taken back, exactly.
  GridStatus status = GridStatus::kOk;
  int64_t bad_at = -1;  // element index of the failing value
  for_each_span(n, tri_d, [&](int64_t off, int64_t len) {
    const int64_t k = accumulate_span(v + off, len, scale, limit, hi + off, lo + off, &status);
    if (k < len) bad_at = off + k;
    return k == len;
  });
  if (status != GridStatus::kOk) {
    // NaN anywhere wins over a range failure (the message names the worse problem).
    for_each_span(n, tri_d, [&](int64_t off, int64_t len) {
      for (int64_t k = 0; k < len && status == GridStatus::kOutOfRange; ++k) {
        if (off + k > bad_at && !std::isfinite(round_half_even(v[off + k] * scale))) {
          status = GridStatus::kNotFinite;
        }
      }
      return status == GridStatus::kOutOfRange;
    });
    for_each_span(n, tri_d, [&](int64_t off, int64_t len) {
      const int64_t stop = std::min(len, bad_at - off);
      if (stop > 0) take_back_span(v + off, stop, scale, hi + off, lo + off);
      return off + len < bad_at;
    });
  }
  if (mode != FE_TONEAREST) std::fesetround(mode);
  return status;
}

void mirror_upper(double* a, int64_t d) {
  constexpr int64_t kTile = 64;  // tiles keep both the read rows and written columns cached
  for (int64_t jb = 0; jb < d; jb += kTile) {
    const int64_t je = std::min(jb + kTile, d);
    for (int64_t ib = 0; ib <= jb; ib += kTile) {
      for (int64_t j = jb; j < je; ++j) {
        const int64_t ie = std::min(ib + kTile, j);
        for (int64_t i = ib; i < ie; ++i) a[j + i * d] = a[i + j * d];
      }
    }
  }
}

}  // namespace dpfc::cpu
