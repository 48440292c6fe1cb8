// baseq.IntLinear on ARMv8.2-A NEON with the dot-product extension (udot; Cortex-A55/A76 and
// later, Apple M1+, Graviton 2+): built with -march=armv8.2-a+dotprod, run only where the
// kernel reports HWCAP_ASIMDDP.
#include <arm_neon.h>

#include "int_linear_tile.h"
#include "quant_code.h"

namespace baseq {
namespace intlin {
namespace {

struct NeonDotKernel {
  static constexpr int kRows = 4;

  template <int R>
  static void Dot(const uint8_t* codes, const uint8_t* q, int64_t q_stride, int64_t chunks, int32_t* acc) {
    const uint8x16_t low4 = vdupq_n_u8(0x0F);
    uint32x4_t a[R][4];  // per row, columns 4c .. 4c + 3
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) a[r][c] = vdupq_n_u32(0);
    for (int64_t t = 0; t < chunks; ++t) {
      uint8x16_t lo[4], hi[4];
      for (int c = 0; c < 4; ++c) {
        const uint8x16_t v = vld1q_u8(codes + t * kChunkBytes + 16 * c);
        lo[c] = vandq_u8(v, low4);
        hi[c] = vshrq_n_u8(v, 4);
      }
      for (int r = 0; r < R; ++r) {
        const uint8_t* qr = q + r * q_stride + t * kChunk;
        uint32_t first, second;
        __builtin_memcpy(&first, qr, 4);
        __builtin_memcpy(&second, qr + 4, 4);
        const uint8x16_t x0 = vreinterpretq_u8_u32(vdupq_n_u32(first));
        const uint8x16_t x1 = vreinterpretq_u8_u32(vdupq_n_u32(second));
        for (int c = 0; c < 4; ++c) a[r][c] = vdotq_u32(vdotq_u32(a[r][c], lo[c], x0), hi[c], x1);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) vst1q_s32(acc + r * kCols + 4 * c, vreinterpretq_s32_u32(a[r][c]));
  }
};

}  // namespace

void TilesNeonDot(const Weights& w, const Rows& x, const Out& o, int64_t r0, int64_t r1, int64_t b0, int64_t b1) {
  RunTiles<NeonDotKernel>(w, x, o, r0, r1, b0, b1);
}

void CodesNeonDot(const float* v, int64_t n, float scale, float zero, float qmax, uint8_t* out) {
  QuantCodesU8(v, n, scale, zero, qmax, out);
}

}  // namespace intlin
}  // namespace baseq
