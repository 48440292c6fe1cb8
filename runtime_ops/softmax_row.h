// The float64 softmax of MaskedSoftmax, one row, shared with the attention op.
#pragma once

#include <cmath>
#include <cstdint>

namespace baseq {

constexpr double kMaskedBelow = -1e8;  // the exporter's additive mask is -1e9

// dst = softmax(src) over n entries; entries below -1e8 are exactly 0 without computing exp (as
// exp(-1e9) is) unless no entry is above, in which case the row is computed in full, as the
// standard-op graph does. The maximum propagates NaN.
inline void MaskedSoftmaxRow(const double* src, double* dst, int64_t n) {
  double mx = -INFINITY;
  bool any = false;
  for (int64_t i = 0; i < n; ++i) {
    any |= src[i] >= kMaskedBelow;
    mx = src[i] > mx || std::isnan(src[i]) ? src[i] : mx;
  }
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = (any && src[i] < kMaskedBelow) ? 0.0 : std::exp(src[i] - mx);
    sum += dst[i];
  }
  for (int64_t i = 0; i < n; ++i) dst[i] /= sum;
}

}  // namespace baseq
