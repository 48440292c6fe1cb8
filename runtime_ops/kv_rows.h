// One row (one token of one head) of the packed 4-bit KV cache, shared by KVQuantPack/KVUnpack
// and the attention op: head_dim / 2 bytes of 4-bit codes (low nibble = even element), then the
// float32 scale and the float32 zero point (raw bytes). Unpacked values are (code - zero) * scale:
// the same floats as QuantDequant, so a packed cache changes memory, never results.
#pragma once

#include "quantizers.h"

#include <cstring>

namespace baseq {

constexpr int64_t kRowTail = 2 * sizeof(float);

inline int64_t PackedRowWidth(int64_t head_dim) { return head_dim / 2 + kRowTail; }

// Quantizes src[hd] with the per-token 4-bit quantizer (clip) and writes the packed row dst.
inline void PackKvRow(const float* src, int64_t hd, float clip, uint8_t* dst) {
  const float qmax = 15.0f;
  const RowQParams p = RowQParamsOf(src, hd, clip, qmax);
  for (int64_t i = 0; i < hd; i += 2) {
    const float lo = Code(src[i], p, qmax), hi = Code(src[i + 1], p, qmax);
    auto nib = [](float q) { return static_cast<uint8_t>(std::isnan(q) ? 0 : static_cast<int>(q)); };
    dst[i / 2] = static_cast<uint8_t>(nib(lo) | (nib(hi) << 4));  // a NaN row keeps a NaN scale
  }
  std::memcpy(dst + hd / 2, &p.scale, sizeof(float));
  std::memcpy(dst + hd / 2 + sizeof(float), &p.zero, sizeof(float));
}

// The hd float32 values of a packed row.
inline void UnpackKvRow(const uint8_t* src, int64_t hd, float* dst) {
  float scale, zero;
  std::memcpy(&scale, src + hd / 2, sizeof(float));
  std::memcpy(&zero, src + hd / 2 + sizeof(float), sizeof(float));
  for (int64_t i = 0; i < hd; i += 2) {
    dst[i] = (static_cast<float>(src[i / 2] & 15) - zero) * scale;
    dst[i + 1] = (static_cast<float>(src[i / 2] >> 4) - zero) * scale;
  }
}

}  // namespace baseq
