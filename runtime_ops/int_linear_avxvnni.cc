// baseq.IntLinear on AVX-VNNI (VEX vpdpbusd on 256-bit registers; Alder Lake and later client
// CPUs, Sapphire Rapids): built with -mavx2 -mavxvnni, run only where the CPU has AVX-VNNI.
#include <immintrin.h>

#include "int_linear_tile.h"
#include "quant_code.h"

namespace baseq {
namespace intlin {
namespace {

struct AvxVnniKernel {
  static constexpr int kRows = 4;

  // Independent accumulators: per row the two column halves, and for one row also the low and
  // high nibble halves, so that vpdpbusd's latency (about 5 cycles) overlaps.
  template <int R>
  static void Dot(const uint8_t* codes, const uint8_t* q, int64_t q_stride, int64_t chunks, int32_t* acc) {
    constexpr int S = R == 1 ? 2 : 1;  // accumulator sets per column half
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256i a0[R][S], a1[R][S];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < S; ++u) a0[r][u] = a1[r][u] = _mm256_setzero_si256();
    for (int64_t t = 0; t < chunks; ++t) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + t * kChunkBytes));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + t * kChunkBytes + 32));
      const __m256i lo0 = _mm256_and_si256(v0, low4), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4);
      const __m256i lo1 = _mm256_and_si256(v1, low4), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4);
      for (int r = 0; r < R; ++r) {
        const uint8_t* qr = q + r * q_stride + t * kChunk;
        int32_t first, second;
        __builtin_memcpy(&first, qr, 4);
        __builtin_memcpy(&second, qr + 4, 4);
        const __m256i x0 = _mm256_set1_epi32(first), x1 = _mm256_set1_epi32(second);
        a0[r][0] = _mm256_dpbusd_avx_epi32(a0[r][0], x0, lo0);
        a0[r][S - 1] = _mm256_dpbusd_avx_epi32(a0[r][S - 1], x1, hi0);
        a1[r][0] = _mm256_dpbusd_avx_epi32(a1[r][0], x0, lo1);
        a1[r][S - 1] = _mm256_dpbusd_avx_epi32(a1[r][S - 1], x1, hi1);
      }
    }
    for (int r = 0; r < R; ++r) {
      __m256i s0 = a0[r][0], s1 = a1[r][0];
      if constexpr (S == 2) {
        s0 = _mm256_add_epi32(s0, a0[r][1]);
        s1 = _mm256_add_epi32(s1, a1[r][1]);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kCols), s0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kCols + 8), s1);
    }
  }
};

}  // namespace

void TilesAvxVnni(const Weights& w, const Rows& x, const Out& o, int64_t r0, int64_t r1, int64_t b0, int64_t b1) {
  RunTiles<AvxVnniKernel>(w, x, o, r0, r1, b0, b1);
}

void CodesAvxVnni(const float* v, int64_t n, float scale, float zero, float qmax, uint8_t* out) {
  QuantCodesU8(v, n, scale, zero, qmax, out);
}

}  // namespace intlin
}  // namespace baseq
