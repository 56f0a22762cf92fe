#include "cpu/grid_cpu.hpp"

#include <algorithm>
#include <cfenv>
#include <cmath>

namespace dpfc::cpu {

namespace {
constexpr int64_t kLimbBase = int64_t{1} << 32;
constexpr int64_t kLimbMask = kLimbBase - 1;
}  // namespace

GridStatus grid_accumulate(const double* v, int64_t n, double scale, double limit, int64_t* hi,
                           int64_t* lo) {
  // std::nearbyint rounds in the current mode; the grid is defined with round-half-to-even.
  const int mode = std::fegetround();
  if (mode != FE_TONEAREST) std::fesetround(FE_TONEAREST);
  // One pass: check and add each value. A bad value (rare: it fails the whole statistic)
  // stops the pass, and the additions made before it are subtracted again, exactly.
  GridStatus status = GridStatus::kOk;
  int64_t k = 0;
  for (; k < n; ++k) {
    const double q = std::nearbyint(v[k] * scale);
    if (!(std::fabs(q) <= limit)) {  // NaN fails this comparison too
      status = std::isfinite(q) ? GridStatus::kOutOfRange : GridStatus::kNotFinite;
      break;
    }
    const auto qi = static_cast<int64_t>(q);  // |q| <= limit <= 2^62
    const int64_t low = qi & kLimbMask;       // two's complement: q mod 2^32
    hi[k] += (qi - low) / kLimbBase;          // exact: qi - low is a multiple of 2^32
    lo[k] += low;
  }
  if (status != GridStatus::kOk) {
    for (int64_t j = k + 1; j < n && status == GridStatus::kOutOfRange; ++j) {
      if (!std::isfinite(std::nearbyint(v[j] * scale))) status = GridStatus::kNotFinite;
    }
    for (int64_t j = 0; j < k; ++j) {
      const auto qi = static_cast<int64_t>(std::nearbyint(v[j] * scale));
      const int64_t low = qi & kLimbMask;
      hi[j] -= (qi - low) / kLimbBase;
      lo[j] -= low;
    }
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
