// One row (one token of one head) of the packed 4-bit KV cache, shared by KVQuantPack/KVUnpack
// and the attention op: head_dim / 2 bytes of 4-bit codes (low nibble = even element), then the
// float32 scale and the float32 zero point (raw bytes). Unpacked values are (code - zero) * scale:
// the same floats as QuantDequant, so a packed cache changes memory, never results.
#pragma once

#include "quantizers.h"

#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

// The hd float32 values of a packed row (32 at a time with SSE2, the x86-64 baseline: the same
// float32 subtract and multiply per value, so the same bits).
inline void UnpackKvRow(const uint8_t* src, int64_t hd, float* dst) {
  float scale, zero;
  std::memcpy(&scale, src + hd / 2, sizeof(float));
  std::memcpy(&zero, src + hd / 2 + sizeof(float), sizeof(float));
  int64_t start = 0;
#if defined(__SSE2__)
  const __m128i low4 = _mm_set1_epi8(0x0F), none = _mm_setzero_si128();
  const __m128 vs = _mm_set1_ps(scale), vz = _mm_set1_ps(zero);
  for (; start + 32 <= hd; start += 32) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + start / 2));
    const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
    const __m128i codes[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};  // elements in order
    for (int h = 0; h < 2; ++h) {
      const __m128i w[2] = {_mm_unpacklo_epi8(codes[h], none), _mm_unpackhi_epi8(codes[h], none)};
      for (int q = 0; q < 2; ++q) {
        const __m128i d[2] = {_mm_unpacklo_epi16(w[q], none), _mm_unpackhi_epi16(w[q], none)};
        for (int e = 0; e < 2; ++e)
          _mm_storeu_ps(dst + start + h * 16 + q * 8 + e * 4, _mm_mul_ps(_mm_sub_ps(_mm_cvtepi32_ps(d[e]), vz), vs));
      }
    }
  }
#endif
  for (int64_t i = start; i < hd; i += 2) {
    dst[i] = (static_cast<float>(src[i / 2] & 15) - zero) * scale;
    dst[i + 1] = (static_cast<float>(src[i / 2] >> 4) - zero) * scale;
  }
}

}  // namespace baseq
