// The per-element step of the per-token activation quantizer (quant.fake_quant_per_token's
// float32 recipe). In a header with internal linkage so that the plain ops and every
// instruction-set kernel compile this one source with their own flags (with SSE4.1 / AVX / NEON
// the rounding becomes one vector instruction instead of a libm call) and no copy is shared.
#pragma once

#include <cstdint>

namespace baseq {

// clamp(round(v / scale) + zero, 0, qmax), round = nearbyint (half to even in the default
// rounding mode, as torch.round); NaN passes through, as torch.clamp.
static inline float QuantCode(float v, float scale, float zero, float qmax) {
  const float q = __builtin_nearbyintf(v / scale) + zero;
  return q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
}

// The codes of n values as bytes (qmax <= 255); NaN, whose row is all NaN anyway, is stored as 0.
static inline void QuantCodesU8(const float* v, int64_t n, float scale, float zero, float qmax, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float c = QuantCode(v[i], scale, zero, qmax);
    out[i] = static_cast<uint8_t>(static_cast<int32_t>(c >= 0.0f ? c : 0.0f));
  }
}

}  // namespace baseq
