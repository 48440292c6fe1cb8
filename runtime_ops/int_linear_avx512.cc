// baseq.IntLinear on AVX-512 VNNI (EVEX vpdpbusd on 512-bit registers; Cascade Lake / Ice Lake
// servers and later, Zen 4): built with -mavx512f -mavx512bw -mavx512vnni, run only where the
// CPU has all three. One 64-byte chunk = 16 columns x 4 k in each nibble half.
#include <immintrin.h>

#include "int_linear_tile.h"
#include "quant_code.h"

namespace baseq {
namespace intlin {
namespace {

struct Avx512VnniKernel {
  static constexpr int kRows = 8;

  // Independent accumulators per row: the low and high nibble halves, and for one or two rows
  // also even and odd chunks, so that vpdpbusd's latency (about 5 cycles) overlaps.
  template <int R>
  static void Dot(const uint8_t* codes, const uint8_t* q, int64_t q_stride, int64_t chunks, int32_t* acc) {
    constexpr int U = R <= 2 ? 2 : 1;  // chunks per step
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512i a[R][2 * U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < 2 * U; ++u) a[r][u] = _mm512_setzero_si512();
    int64_t t = 0;
    for (; t + U <= chunks; t += U) {
      for (int u = 0; u < U; ++u) {
        const __m512i v = _mm512_loadu_si512(codes + (t + u) * kChunkBytes);
        const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        for (int r = 0; r < R; ++r) {
          const uint8_t* qr = q + r * q_stride + (t + u) * kChunk;
          int32_t first, second;
          __builtin_memcpy(&first, qr, 4);
          __builtin_memcpy(&second, qr + 4, 4);
          a[r][2 * u] = _mm512_dpbusd_epi32(a[r][2 * u], _mm512_set1_epi32(first), lo);
          a[r][2 * u + 1] = _mm512_dpbusd_epi32(a[r][2 * u + 1], _mm512_set1_epi32(second), hi);
        }
      }
    }
    for (; t < chunks; ++t) {  // the odd chunk left when U = 2
      const __m512i v = _mm512_loadu_si512(codes + t * kChunkBytes);
      const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      for (int r = 0; r < R; ++r) {
        const uint8_t* qr = q + r * q_stride + t * kChunk;
        int32_t first, second;
        __builtin_memcpy(&first, qr, 4);
        __builtin_memcpy(&second, qr + 4, 4);
        a[r][0] = _mm512_dpbusd_epi32(a[r][0], _mm512_set1_epi32(first), lo);
        a[r][1] = _mm512_dpbusd_epi32(a[r][1], _mm512_set1_epi32(second), hi);
      }
    }
    for (int r = 0; r < R; ++r) {
      __m512i sum = a[r][0];
      for (int u = 1; u < 2 * U; ++u) sum = _mm512_add_epi32(sum, a[r][u]);
      _mm512_storeu_si512(acc + r * kCols, sum);
    }
  }
};

}  // namespace

void TilesAvx512Vnni(const Weights& w, const Rows& x, const Out& o, int64_t r0, int64_t r1, int64_t b0, int64_t b1) {
  RunTiles<Avx512VnniKernel>(w, x, o, r0, r1, b0, b1);
}

void CodesAvx512Vnni(const float* v, int64_t n, float scale, float zero, float qmax, uint8_t* out) {
  QuantCodesU8(v, n, scale, zero, qmax, out);
}

}  // namespace intlin
}  // namespace baseq
