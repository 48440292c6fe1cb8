// The float64 inner loops of baseq.Attention, shared by its per-instruction-set translation units
// (attention_<isa>.cc): every copy performs the same operations in the same order, so all give the
// same bits; the compiler only packs independent lanes into wider registers. Internal linkage
// (anonymous namespace) and no standard-library code: no copy compiled with -m flags is shared.
#pragma once

#include "attention_kernels.h"

namespace baseq {
namespace attn {
namespace {

// sum_d q[d] * k[d] in float64: four interleaved partial sums (lane u takes d = u mod 4), then
// ((s0 + s1) + (s2 + s3)), then the tail in increasing d.
inline double Dot(const double* q, const float* k, int64_t n) {
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t d = 0;
  for (; d + 4 <= n; d += 4)
    for (int u = 0; u < 4; ++u) s[u] += q[d + u] * static_cast<double>(k[d + u]);
  double r = (s[0] + s[1]) + (s[2] + s[3]);
  for (; d < n; ++d) r += q[d] * static_cast<double>(k[d]);
  return r;
}

// Dot for four keys at once (k, k + hd, k + 2 hd, k + 3 hd), each in exactly Dot's order: the
// four independent sums keep the adder busy.
inline void Dot4(const double* q, const float* k, int64_t hd, double* out) {
  double s[4][4] = {};
  const int64_t whole = hd - hd % 4;
  for (int64_t d = 0; d < whole; d += 4)
    for (int key = 0; key < 4; ++key)
      for (int u = 0; u < 4; ++u) s[key][u] += q[d + u] * static_cast<double>(k[key * hd + d + u]);
  for (int key = 0; key < 4; ++key) {
    double r = (s[key][0] + s[key][1]) + (s[key][2] + s[key][3]);
    for (int64_t d = whole; d < hd; ++d) r += q[d] * static_cast<double>(k[key * hd + d]);
    out[key] = r;
  }
}

// Dot of `NG` query vectors (q, q + hd, ...) with one key row, each in exactly Dot's order: the
// key is loaded once for the heads that share it (grouped-query attention).
template <int NG>
inline void DotHeads(const double* q, const float* k, int64_t hd, double* out) {
  double s[NG][4] = {};
  const int64_t whole = hd - hd % 4;
  for (int64_t d = 0; d < whole; d += 4) {
    double kd[4];
    for (int u = 0; u < 4; ++u) kd[u] = static_cast<double>(k[d + u]);
    for (int g = 0; g < NG; ++g)
      for (int u = 0; u < 4; ++u) s[g][u] += q[g * hd + d + u] * kd[u];
  }
  for (int g = 0; g < NG; ++g) {
    double r = (s[g][0] + s[g][1]) + (s[g][2] + s[g][3]);
    for (int64_t d = whole; d < hd; ++d) r += q[g * hd + d] * static_cast<double>(k[d]);
    out[g] = r;
  }
}

// For each of `heads` query vectors q[g * hd ..] and keys j in [j0, j1) with visible[j] (all if
// visible is null): scores[g * stride + j] = Dot(q_g, key j) * scale + add.
inline void ScoresRows(const double* q, int64_t heads, const float* k_rows, int64_t hd, int64_t j0, int64_t j1,
                       const uint8_t* visible, double scale, double add, double* scores, int64_t stride) {
  if (heads == 1) {  // one head: four keys per step instead
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
      double dots[4];
      Dot4(q, k_rows + j * hd, hd, dots);
      for (int key = 0; key < 4; ++key)
        if (!visible || visible[j + key]) scores[j + key] = dots[key] * scale + add;
    }
    for (; j < j1; ++j)
      if (!visible || visible[j]) scores[j] = Dot(q, k_rows + j * hd, hd) * scale + add;
    return;
  }
  for (int64_t j = j0; j < j1; ++j) {
    if (visible && !visible[j]) continue;
    const float* k = k_rows + j * hd;
    for (int64_t g0 = 0; g0 < heads; g0 += 4) {
      const int64_t ng = heads - g0 < 4 ? heads - g0 : 4;
      double dots[4];
      const double* qg = q + g0 * hd;
      switch (ng) {
        case 4: DotHeads<4>(qg, k, hd, dots); break;
        case 3: DotHeads<3>(qg, k, hd, dots); break;
        case 2: DotHeads<2>(qg, k, hd, dots); break;
        default: DotHeads<1>(qg, k, hd, dots); break;
      }
      for (int64_t g = 0; g < ng; ++g) scores[(g0 + g) * stride + j] = dots[g] * scale + add;
    }
  }
}

// For each head g: acc[g * hd + i] = sum over keys j in [j0, j1) with visible[j] (all if null),
// increasing j, of p[g * stride + j] * v_j[i]; each value row is read once for all heads.
inline void WeightedRows(const double* p, int64_t heads, const float* v_rows, int64_t hd, int64_t j0, int64_t j1,
                         const uint8_t* visible, double* acc, int64_t stride) {
  for (int64_t i = 0; i < heads * hd; ++i) acc[i] = 0.0;
  for (int64_t j = j0; j < j1; ++j) {
    if (visible && !visible[j]) continue;
    const float* vr = v_rows + j * hd;
    for (int64_t g = 0; g < heads; ++g) {
      const double pj = p[g * stride + j];
      double* a = acc + g * hd;
      for (int64_t i = 0; i < hd; ++i) a[i] += pj * static_cast<double>(vr[i]);
    }
  }
}

}  // namespace
}  // namespace attn
}  // namespace baseq

// Defines the two entry points of one instruction set's attention kernels.
#define BASEQ_ATTENTION_KERNELS(Suffix)                                                                          \
  namespace baseq {                                                                                             \
  namespace attn {                                                                                              \
  void Scores##Suffix(const double* q, int64_t heads, const float* k_rows, int64_t hd, int64_t j0, int64_t j1,  \
                      const uint8_t* visible, double scale, double add, double* scores, int64_t stride) {       \
    ScoresRows(q, heads, k_rows, hd, j0, j1, visible, scale, add, scores, stride);                              \
  }                                                                                                             \
  void Weighted##Suffix(const double* p, int64_t heads, const float* v_rows, int64_t hd, int64_t j0, int64_t j1, \
                        const uint8_t* visible, double* acc, int64_t stride) {                                  \
    WeightedRows(p, heads, v_rows, hd, j0, j1, visible, acc, stride);                                           \
  }                                                                                                             \
  }                                                                                                             \
  }
