// Host helpers of the leaf statistics: exact fixed-grid accumulation of float64 values
// (dpfc_native.reduction) and the in-place mirror of a symmetric matrix's upper triangle.
#pragma once

#include <cstdint>

namespace dpfc::cpu {

// Outcome of grid_accumulate; the accumulators are untouched unless it is kOk.
enum class GridStatus : int { kOk = 0, kNotFinite = 1, kOutOfRange = 2 };

// Adds values of v to the limbs (hi, lo): q = nearbyint(v * scale) (round half to even;
// scale is a power of two, so the product is exact unless it overflows), required finite
// with |q| <= limit (limit <= 2^62); then (hi, lo) += q exactly, with lo kept in
// [0, 2^32) (the carry goes to hi), in one pass over v. Integer additions are exact and
// associative, and undone exactly when a later value fails the check.
// tri_d == 0: every element k < n. tri_d == d > 0: v, hi and lo are n / (d d) C-ordered
// d x d matrices of which only the lower triangles (column <= row) are read and updated
// (a symmetric statistic whose upper triangle is not needed; the rest stays untouched).
GridStatus grid_accumulate(const double* v, int64_t n, int64_t tri_d, double scale, double limit,
                           int64_t* hi, int64_t* lo);

// a is a d x d column-major matrix whose upper triangle (i <= j) holds a symmetric
// matrix: copies it to the lower one in place (a[j + i d] = a[i + j d] for i < j), so the
// buffer is the full symmetric matrix in either storage order. Copies only, no rounding.
void mirror_upper(double* a, int64_t d);

}  // namespace dpfc::cpu
