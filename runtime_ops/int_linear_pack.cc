// baseq.IntLinear's data layout: the weights repacked once (int_linear.h, Weights), an activation
// row's codes in the same k layout, and the float64 definition for rows the integer path cannot take.
#include "int_linear_pack.h"

#include <algorithm>
#include <cmath>

namespace baseq {
namespace intlin {

std::string PackWeights(const uint8_t* b, const uint8_t* zeros, const float* scales, int64_t n, int64_t k,
                        int64_t group_size, int64_t groups, PackedWeights* out) {
  if (n < 0 || k < 0) return "negative dimensions";
  if (group_size <= 0 || group_size > k) group_size = k;  // one group (k = 0: an empty one)
  const int64_t want_groups = k == 0 ? 1 : (k + group_size - 1) / group_size;
  if (groups != want_groups)
    return std::to_string(groups) + " groups of weight zero points/scales, but k = " + std::to_string(k) +
           " in groups of " + std::to_string(group_size) + " needs " + std::to_string(want_groups);
  for (int64_t i = 0; i < n * groups; ++i)
    if (zeros[i] > 15)
      return "weight zero points must be 4-bit codes in [0, 15], got " + std::to_string(zeros[i]) + " at [" +
             std::to_string(i / groups) + ", " + std::to_string(i % groups) + "]";

  Weights& w = out->view;
  w.n = n;
  w.k = k;
  w.groups = groups;
  w.group_size = group_size;
  w.chunks_per_group = (group_size + kChunk - 1) / kChunk;
  w.blocks = (n + kCols - 1) / kCols;
  const int64_t chunks = groups * w.chunks_per_group;
  out->codes.assign(w.blocks * chunks * kChunkBytes, 0);
  out->zero.assign(w.blocks * groups * kCols, 0);
  out->wsum.assign(w.blocks * groups * kCols, 0);
  out->scale.assign(w.blocks * groups * kCols, 0.0);
  const int64_t row_bytes = (k + 1) / 2;
  for (int64_t col = 0; col < n; ++col) {
    const int64_t blk = col / kCols, j = col % kCols;
    const uint8_t* src = b + col * row_bytes;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * group_size, len = std::min(group_size, k - k0);
      const int32_t zw = zeros[col * groups + g];
      int32_t wsum = 0;
      for (int64_t kk = 0; kk < len; ++kk) {
        const int64_t kg = k0 + kk;
        const uint8_t code = (kg % 2 == 0) ? (src[kg / 2] & 15) : (src[kg / 2] >> 4);
        wsum += code - zw;
        const int64_t t = kk / kChunk, i = kk % kChunk;
        uint8_t& byte = out->codes[((blk * groups + g) * w.chunks_per_group + t) * kChunkBytes + 4 * j + (i & 3)];
        byte |= static_cast<uint8_t>(i < 4 ? code : code << 4);
      }
      const int64_t at = (blk * groups + g) * kCols + j;
      out->zero[at] = zw;
      out->wsum[at] = wsum;
      out->scale[at] = static_cast<double>(scales[col * groups + g]);
    }
  }
  w.codes = out->codes.data();
  w.zero = out->zero.data();
  w.wsum = out->wsum.data();
  w.scale = out->scale.data();
  return "";
}

void PackRow(const Weights& w, const uint8_t* q, uint8_t* dst, int32_t* qsum) {
  const int64_t padded = w.chunks_per_group * kChunk;
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t k0 = g * w.group_size, len = std::min(w.group_size, w.k - k0);
    uint8_t* d = dst + g * padded;
    int32_t sum = 0;
    for (int64_t kk = 0; kk < len; ++kk) {
      d[kk] = q[k0 + kk];
      sum += q[k0 + kk];
    }
    for (int64_t kk = len; kk < padded; ++kk) d[kk] = 0;
    qsum[g] = sum;
  }
}

// Weight code of column col, group g, k offset kk inside the group, read back from the packed layout.
static inline int32_t CodeAt(const Weights& w, int64_t col, int64_t g, int64_t kk) {
  const int64_t blk = col / kCols, j = col % kCols, t = kk / kChunk, i = kk % kChunk;
  const uint8_t byte = w.codes[((blk * w.groups + g) * w.chunks_per_group + t) * kChunkBytes + 4 * j + (i & 3)];
  return i < 4 ? (byte & 15) : (byte >> 4);
}

void SlowRow(const Weights& w, const Rows& x, const Out& o, int64_t r) {
  const float zx = x.zero[r];
  const double s = static_cast<double>(x.scale[r]);
  const uint8_t* q = x.q + r * x.stride;
  const int64_t padded = w.chunks_per_group * kChunk;
  float* y = o.y + r * w.n;
  for (int64_t col = 0; col < w.n; ++col) {
    const int64_t blk = col / kCols, j = col % kCols;
    double total = 0.0;
    double only = 0.0;
    for (int64_t g = 0; g < w.groups; ++g) {
      const int64_t len = std::min(w.group_size, w.k - g * w.group_size);
      const int64_t at = (blk * w.groups + g) * kCols + j;
      const int32_t zw = w.zero[at];
      double p = 0.0;
      for (int64_t kk = 0; kk < len; ++kk) {
        const float level = static_cast<float>(q[g * padded + kk]) - zx;  // QuantLevels' float32 level
        p += static_cast<double>(level) * static_cast<double>(CodeAt(w, col, g, kk) - zw);
      }
      only = p;
      total += p * w.scale[at];
    }
    const float v = w.groups == 1 ? static_cast<float>((only * s) * w.scale[blk * kCols + j])
                                  : static_cast<float>(total * s);
    y[col] = o.bias ? v + o.bias[col] : v;
  }
}

}  // namespace intlin
}  // namespace baseq
