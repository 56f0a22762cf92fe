// The estimators' per-example preprocessing on the host, fused into one pass per row: a
// public centre subtracted, optional normalisation to unit norm, then the shared clip.
#pragma once

#include <cstdint>

namespace dpfc::cpu {

// For each of the m rows of the row-major m x d matrix x (T = float or double), writes to
// the row-major float64 matrix out (which may be x itself when T is double):
//   v = x - center (center may be null: no subtraction);
//   normalize: v /= max_j |v_j| (when > 0), then v /= ||v|| (when > 0), each as a product
//   with the reciprocal where that is finite;
//   v *= clip_scale(||v||, clip) (csrc/common/clip.hpp), the norm computed with a
//   rescaling by max |v_j| where the plain sum of squares overflows or underflows.
// Sums of squares run in a fixed order (four interleaved partial sums, combined pairwise),
// so the bits do not depend on the build. Returns the first row holding a non-finite value
// after the centre is subtracted (that row and later ones are left partly written), or -1.
template <class T>
int64_t preprocess_rows(const T* x, int64_t m, int64_t d, const double* center, bool normalize,
                        double clip, double* out);

// The ops' clipping: out = x s, s_i = clip_scale(||x_i||, clip) written to scales, with
// the same norm as preprocess_rows; a row holding NaN or Inf is copied with s_i = 1.
template <class T>
void clip_rows(const T* x, int64_t m, int64_t d, double clip, double* out, double* scales);

}  // namespace dpfc::cpu
