// baseq.Attention's inner loops built with -mavx2 -mfma (run only where the CPU has both): 8
// float64 lanes as two 256-bit registers.
#include <immintrin.h>

namespace baseq {
namespace attn {
namespace {

// Register tiles (attention_rows.h) for 16 ymm registers, two per V: 6 score accumulators (12), the key block (2).
constexpr int kTileQueries = 6, kTileKeyBlocks = 1, kWeightHeads = 2;

struct V {
  __m256d lo, hi;
  static V Zero() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
  static V Set(double a) { return {_mm256_set1_pd(a), _mm256_set1_pd(a)}; }
  static V Load(const double* p) { return {_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4)}; }
  static V LoadF(const float* p) { return {_mm256_cvtps_pd(_mm_loadu_ps(p)), _mm256_cvtps_pd(_mm_loadu_ps(p + 4))}; }
};

inline void Store(double* p, V v) {
  _mm256_storeu_pd(p, v.lo);
  _mm256_storeu_pd(p + 4, v.hi);
}
inline void StoreF(float* p, V v) {
  _mm_storeu_ps(p, _mm256_cvtpd_ps(v.lo));
  _mm_storeu_ps(p + 4, _mm256_cvtpd_ps(v.hi));
}
inline V Add(V a, V b) { return {_mm256_add_pd(a.lo, b.lo), _mm256_add_pd(a.hi, b.hi)}; }
inline V Sub(V a, V b) { return {_mm256_sub_pd(a.lo, b.lo), _mm256_sub_pd(a.hi, b.hi)}; }
inline V Mul(V a, V b) { return {_mm256_mul_pd(a.lo, b.lo), _mm256_mul_pd(a.hi, b.hi)}; }
inline V Div(V a, V b) { return {_mm256_div_pd(a.lo, b.lo), _mm256_div_pd(a.hi, b.hi)}; }
inline V Fma(V a, V b, V c) { return {_mm256_fmadd_pd(a.lo, b.lo, c.lo), _mm256_fmadd_pd(a.hi, b.hi, c.hi)}; }
inline V Round(V a) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_pd(a.lo, mode), _mm256_round_pd(a.hi, mode)};
}
inline __m256d Pow2Half(__m256d n) {
  const __m256d t = _mm256_add_pd(n, _mm256_set1_pd(4503599627371519.0));  // 2^52 + 1023
  return _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_castpd_si256(t), 52));
}
inline V Pow2(V n) { return {Pow2Half(n.lo), Pow2Half(n.hi)}; }
// m = lo + hi per key ([l0+l4, l1+l5, l2+l6, l3+l7]); pairs of keys: [m0 m1 | m0' m1'] + [m2 m3 | m2' m3'];
// then hadd: (m0 + m2) + (m1 + m3) per key, reordered.
inline V Tree8(const V* acc) {
  __m256d n[4];
  for (int p = 0; p < 4; ++p) {
    const __m256d a = _mm256_add_pd(acc[2 * p].lo, acc[2 * p].hi), b = _mm256_add_pd(acc[2 * p + 1].lo, acc[2 * p + 1].hi);
    n[p] = _mm256_add_pd(_mm256_permute2f128_pd(a, b, 0x20), _mm256_permute2f128_pd(a, b, 0x31));
  }
  const __m256d first = _mm256_permute4x64_pd(_mm256_hadd_pd(n[0], n[1]), 0xD8);
  const __m256d second = _mm256_permute4x64_pd(_mm256_hadd_pd(n[2], n[3]), 0xD8);
  return {first, second};
}
inline V LessSelect(V x, V t, V a, V b) {
  return {_mm256_blendv_pd(b.lo, a.lo, _mm256_cmp_pd(x.lo, t.lo, _CMP_LT_OQ)),
          _mm256_blendv_pd(b.hi, a.hi, _mm256_cmp_pd(x.hi, t.hi, _CMP_LT_OQ))};
}

}  // namespace
}  // namespace attn
}  // namespace baseq

#include "attention_rows.h"

BASEQ_ATTENTION_KERNELS(Avx2)
