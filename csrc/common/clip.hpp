// The clip factor, shared by the CPU path and the CUDA kernels.
//
// Clipping must hold on the stored floats, rounding included: a row whose norm
// we computed as `norm` may really be longer by the rounding of that computation, and
// scaling it rounds each stored element again. So rows are clipped to
// C (1 - 2^-20) instead of C. The margin (about 1e-6 relative) dominates the float64
// norm error (below 1e-11 even for d = 10^5) plus one float32 rounding of the output
// (2^-24), so every clipped row has exact norm < C, while costing no measurable utility.
#pragma once

#include "hostdevice.hpp"

namespace dpfc {

constexpr double kClipMargin = 1.0 - 9.5367431640625e-07;  // 1 - 2^-20

constexpr double kMinNormal = 2.2250738585072014e-308;  // 2^-1022
constexpr double kDenormMin = 4.9406564584124654e-324;  // 2^-1074, the subnormal spacing
// Scale s = min(1, C' / norm) with C' = C (1 - 2^-20). norm = +inf gives 0 (the caller
// recomputes overflowing norms with scaling first); norm = 0 gives 1.
// A subnormal s (norm > 2^1022 C') has fewer than 53 significant bits: rounding the
// quotient to nearest can add up to half a unit of 2^-1074, which for norm / C beyond
// ~1e300 exceeds the margin (rows came out up to 2x C). Such an s is stepped down one unit
// (exact for subnormals): never above C' / norm.
DPFC_HD double clip_scale(double norm, double clip_norm) {
  const double target = clip_norm * kClipMargin;
  if (norm <= target) return 1.0;
  const double s = target / norm;
  if (s >= kMinNormal) return s;
  return s > kDenormMin ? s - kDenormMin : 0.0;
}

}  // namespace dpfc
