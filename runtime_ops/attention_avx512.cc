// baseq.Attention's inner loops built with -mavx512f (run only where the CPU has AVX-512 F): 8
// float64 lanes in one 512-bit register.
#include <immintrin.h>

namespace baseq {
namespace attn {
namespace {

// Register tiles (attention_rows.h) for 32 zmm registers: 12 x 2 score accumulators and two key blocks;
// 6 heads x 4 blocks of weighted sums and four value blocks.
constexpr int kTileQueries = 12, kTileKeyBlocks = 2, kWeightHeads = 6;

struct V {
  __m512d v;
  static V Zero() { return {_mm512_setzero_pd()}; }
  static V Set(double a) { return {_mm512_set1_pd(a)}; }
  static V Load(const double* p) { return {_mm512_loadu_pd(p)}; }
  static V LoadF(const float* p) { return {_mm512_cvtps_pd(_mm256_loadu_ps(p))}; }
};

inline void Store(double* p, V a) { _mm512_storeu_pd(p, a.v); }
inline void StoreF(float* p, V a) { _mm256_storeu_ps(p, _mm512_cvtpd_ps(a.v)); }
inline V Add(V a, V b) { return {_mm512_add_pd(a.v, b.v)}; }
inline V Sub(V a, V b) { return {_mm512_sub_pd(a.v, b.v)}; }
inline V Mul(V a, V b) { return {_mm512_mul_pd(a.v, b.v)}; }
inline V Div(V a, V b) { return {_mm512_div_pd(a.v, b.v)}; }
inline V Fma(V a, V b, V c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
inline V Round(V a) { return {_mm512_roundscale_pd(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline V Pow2(V n) {
  const __m512d t = _mm512_add_pd(n.v, _mm512_set1_pd(4503599627371519.0));  // 2^52 + 1023
  return {_mm512_castsi512_pd(_mm512_slli_epi64(_mm512_castpd_si512(t), 52))};
}
// Pairs of keys: [l0..3 | l0'..3'] + [l4..7 | l4'..7'] = the m_i = l_i + l_(i+4) of two keys; pairs of
// those: 128-bit lanes (m0 m1) + (m2 m3); then unpack lo + hi: (m0 + m2) + (m1 + m3), reordered.
inline V Tree8(const V* acc) {
  __m512d m[4], n[2];
  for (int p = 0; p < 4; ++p)
    m[p] = _mm512_add_pd(_mm512_shuffle_f64x2(acc[2 * p].v, acc[2 * p + 1].v, 0x44),
                         _mm512_shuffle_f64x2(acc[2 * p].v, acc[2 * p + 1].v, 0xEE));
  for (int p = 0; p < 2; ++p)
    n[p] = _mm512_add_pd(_mm512_shuffle_f64x2(m[2 * p], m[2 * p + 1], 0x88), _mm512_shuffle_f64x2(m[2 * p], m[2 * p + 1], 0xDD));
  const __m512d s = _mm512_add_pd(_mm512_unpacklo_pd(n[0], n[1]), _mm512_unpackhi_pd(n[0], n[1]));
  return {_mm512_permutexvar_pd(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), s)};
}
inline V LessSelect(V x, V t, V a, V b) { return {_mm512_mask_blend_pd(_mm512_cmp_pd_mask(x.v, t.v, _CMP_LT_OQ), b.v, a.v)}; }

}  // namespace
}  // namespace attn
}  // namespace baseq

#include "attention_rows.h"

BASEQ_ATTENTION_KERNELS(Avx512)
