// baseq.IntLinear on ARMv8-A NEON without the dot-product extension (every aarch64 CPU): per
// chunk, u8 x u8 products widened to u16 (vmull/vmlal: at most 2 * 255 * 15), pairwise added
// into u32 (vpadal); the two u32 partial sums of each column are folded at the end.
#include <arm_neon.h>

#include "int_linear_tile.h"
#include "quant_code.h"

namespace baseq {
namespace intlin {
namespace {

struct NeonKernel {
  static constexpr int kRows = 2;

  template <int R>
  static void Dot(const uint8_t* codes, const uint8_t* q, int64_t q_stride, int64_t chunks, int32_t* acc) {
    const uint8x16_t low4 = vdupq_n_u8(0x0F);
    uint32x4_t lo_acc[R][4], hi_acc[R][4];  // per row and group of 4 columns: columns (0,1) and (2,3)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) lo_acc[r][c] = hi_acc[r][c] = vdupq_n_u32(0);
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
        for (int c = 0; c < 4; ++c) {
          uint16x8_t pl = vmull_u8(vget_low_u8(lo[c]), vget_low_u8(x0));
          pl = vmlal_u8(pl, vget_low_u8(hi[c]), vget_low_u8(x1));
          uint16x8_t ph = vmull_high_u8(lo[c], x0);
          ph = vmlal_high_u8(ph, hi[c], x1);
          lo_acc[r][c] = vpadalq_u16(lo_acc[r][c], pl);
          hi_acc[r][c] = vpadalq_u16(hi_acc[r][c], ph);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c)
        vst1q_s32(acc + r * kCols + 4 * c, vreinterpretq_s32_u32(vpaddq_u32(lo_acc[r][c], hi_acc[r][c])));
  }
};

}  // namespace

void TilesNeon(const Weights& w, const Rows& x, const Out& o, int64_t r0, int64_t r1, int64_t b0, int64_t b1) {
  RunTiles<NeonKernel>(w, x, o, r0, r1, b0, b1);
}

void CodesNeon(const float* v, int64_t n, float scale, float zero, float qmax, uint8_t* out) {
  QuantCodesU8(v, n, scale, zero, qmax, out);
}

}  // namespace intlin
}  // namespace baseq
