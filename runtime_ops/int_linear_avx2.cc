// baseq.IntLinear on AVX2 (built with -mavx2, run only where the CPU has AVX2): per chunk,
// codes x activation codes as u8 x s8 pair sums (vpmaddubsw; at most 2 * 255 * 15 per pair, and
// the chunk's two halves added in int16 stay below 2^15), widened to int32 by vpmaddwd.
#include <immintrin.h>

#include "int_linear_tile.h"
#include "quant_code.h"

namespace baseq {
namespace intlin {
namespace {

struct Avx2Kernel {
  static constexpr int kRows = 4;

  template <int R>
  static void Dot(const uint8_t* codes, const uint8_t* q, int64_t q_stride, int64_t chunks, int32_t* acc) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_si256();
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
        const __m256i s0 = _mm256_add_epi16(_mm256_maddubs_epi16(x0, lo0), _mm256_maddubs_epi16(x1, hi0));
        const __m256i s1 = _mm256_add_epi16(_mm256_maddubs_epi16(x0, lo1), _mm256_maddubs_epi16(x1, hi1));
        a0[r] = _mm256_add_epi32(a0[r], _mm256_madd_epi16(s0, ones));
        a1[r] = _mm256_add_epi32(a1[r], _mm256_madd_epi16(s1, ones));
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kCols), a0[r]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kCols + 8), a1[r]);
    }
  }
};

}  // namespace

void TilesAvx2(const Weights& w, const Rows& x, const Out& o, int64_t r0, int64_t r1, int64_t b0, int64_t b1) {
  RunTiles<Avx2Kernel>(w, x, o, r0, r1, b0, b1);
}

void CodesAvx2(const float* v, int64_t n, float scale, float zero, float qmax, uint8_t* out) {
  QuantCodesU8(v, n, scale, zero, qmax, out);
}

}  // namespace intlin
}  // namespace baseq
