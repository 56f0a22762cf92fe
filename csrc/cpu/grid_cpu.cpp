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
  GridStatus status = GridStatus::kOk;
  for (int64_t k = 0; k < n; ++k) {
    const double q = std::nearbyint(v[k] * scale);
    if (!std::isfinite(q)) {
      status = GridStatus::kNotFinite;
      break;
    }
    if (std::fabs(q) > limit) status = GridStatus::kOutOfRange;  // NaN/Inf later still wins
  }
  if (status == GridStatus::kOk) {
    for (int64_t k = 0; k < n; ++k) {
      const auto q = static_cast<int64_t>(std::nearbyint(v[k] * scale));  // |q| <= 2^62
      const int64_t low = q & kLimbMask;  // two's complement: q mod 2^32
      hi[k] += (q - low) / kLimbBase;     // exact: q - low is a multiple of 2^32
      lo[k] += low;
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
