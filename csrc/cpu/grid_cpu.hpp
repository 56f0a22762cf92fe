// Host helpers of the leaf statistics: exact fixed-grid accumulation of float64 values
// (dpfc_native.reduction) and the in-place mirror of a symmetric matrix's upper triangle.
#pragma once

#include <cstdint>

namespace dpfc::cpu {

// Outcome of grid_accumulate; the accumulators are untouched unless it is kOk.
enum class GridStatus : int { kOk = 0, kNotFinite = 1, kOutOfRange = 2 };

// For k < n: q_k = nearbyint(v[k] * scale) (round half to even; scale is a power of two, so
// the product is exact unless it overflows), required finite with |q_k| <= limit (limit
// <= 2^62); then hi[k] += floor(q_k / 2^32) and lo[k] += q_k mod 2^32 (in [0, 2^32)), in one
// pass over v: the integer additions are exact and associative (and undone exactly when a
// later value fails the check).
GridStatus grid_accumulate(const double* v, int64_t n, double scale, double limit, int64_t* hi,
                           int64_t* lo);

// a is a d x d column-major matrix whose upper triangle (i <= j) holds a symmetric
// matrix: copies it to the lower one in place (a[j + i d] = a[i + j d] for i < j), so the
// buffer is the full symmetric matrix in either storage order. Copies only, no rounding.
void mirror_upper(double* a, int64_t d);

}  // namespace dpfc::cpu
