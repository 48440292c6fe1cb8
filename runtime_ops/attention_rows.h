// The float64 inner loops of baseq.Attention, shared by its per-instruction-set translation units
// (attention_<isa>.cc). Each of them defines `V`, 8 float64 lanes, before including this header:
//   V::Zero(), V::Set(double), V::Load(const double*), V::LoadF(const float*) (8 floats widened),
//   Store(double*, V), StoreF(float*, V) (8 doubles rounded to float), Add, Sub, Mul, Div, Fma(a, b, c) = a * b + c rounded once,
//   Round(v) (to nearest, ties to even), Pow2(n) = 2^n for integral n in [-1022, 1023],
//   LessSelect(x, t, a, b) = x < t ? a : b per lane (false for NaN),
//   Tree8(const V acc[8]): lane k = Tree(the lanes of acc[k]), in exactly Tree's order;
// and the register tiles its registers hold: kTileQueries x kTileKeyBlocks accumulators for the prefill
// scores, kWeightHeads x 4 for the weighted sums (no order depends on them).
// Every copy then runs the same operations in the same order, so all give the same bits:
//   dot(q, k)   lane l accumulates q[d] * k[d] for d = l (mod 8), increasing d, by fused multiply-add;
//               then Tree(lanes) = ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
//   softmax     e_i = Exp(s_i - max) (0 for a masked key when the row has an unmasked one), summed
//               in 8 lanes (i mod 8) then Tree, p_i = e_i / sum (the prefill tiles instead divide the
//               weighted sums of the e_i: out_d = (sum_j e_j v_jd) * (1 / sum)).
//   block dot   (prefill, BlockScores) one chain of fused multiply-adds over d, increasing: another
//               float64 order than dot's, each rounded once to float32 at the end all the same.
//   weighted    acc[d] = sum over visible keys j, increasing j, of p_j * v_jd by fused multiply-add.
//   swiglu      out = float(g / (1 + Exp(-g)) * u) in float64, Exp's argument capped at 709 (where e^x
//               is still finite; past it g / (1 + e) rounds to a float32 zero either way) and +inf kept.
//   Exp(x)      n = round(x log2 e), r = x - n ln2 (two-part ln2, fused), the degree-13 Taylor
//               polynomial of e^r by Horner (fused), times 2^n; 0 below -708 (under the smallest
//               normal double), NaN for NaN. Within about an ulp of exp.
// Internal linkage (anonymous namespace), builtins rather than standard-library functions: no copy compiled with
// -m flags can be merged with another translation unit's.
#pragma once

#include <cmath>

#include "attention_kernels.h"

namespace baseq {
namespace attn {
namespace {

constexpr int kLanes = 8;

inline double Tree(const double* l) { return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7])); }

constexpr double Factorial(int k) { return k <= 1 ? 1.0 : k * Factorial(k - 1); }
constexpr int kExpDegree = 13;
// 1 / k! for k = 0 .. kExpDegree, folded at compile time (a loop calling Factorial ran it per call).
struct ExpCoefficients {
  double inv[kExpDegree + 1];
  constexpr ExpCoefficients() : inv() {
    for (int k = 0; k <= kExpDegree; ++k) inv[k] = 1.0 / Factorial(k);
  }
};
constexpr ExpCoefficients kExpCoef{};
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2Hi = 6.93147180369123816490e-01;  // ln 2 with its low bits zero: n * kLn2Hi is exact
constexpr double kLn2Lo = 1.90821492927058770002e-10;  // ln 2 - kLn2Hi
constexpr double kExpLow = -708.0;
constexpr double kTwo52Plus1023 = 4503599627371519.0;  // 2^52 + 1023: n + this holds n + 1023 in the low bits

inline V Exp(V x) {
  const V low = V::Set(kExpLow);
  const V xc = LessSelect(x, low, low, x);
  const V n = Round(Mul(xc, V::Set(kLog2e)));
  V r = Fma(n, V::Set(-kLn2Hi), xc);
  r = Fma(n, V::Set(-kLn2Lo), r);
  V p = V::Set(kExpCoef.inv[kExpDegree]);
  for (int k = kExpDegree - 1; k >= 0; --k) p = Fma(p, r, V::Set(kExpCoef.inv[k]));
  const V y = Mul(p, Pow2(n));
  return LessSelect(x, low, V::Zero(), y);
}

// out[g][kk] = dot(q_g, k_kk) for NG query vectors (q + g * hd) and 8 key rows key(0) .. key(7): 8 x NG
// chains of fused multiply-adds, then Tree8 (the lane tree of 8 keys at once, in registers). HD > 0 fixes
// the head size at compile time (then hd == HD): with consecutive rows every address is a constant
// offset and the accumulators stay in registers.
template <int NG, int HD, typename KeyRow>
inline void DotKeys8(const double* q, int64_t hd_given, KeyRow key, double (*out)[kLanes]) {
  const int64_t hd = HD > 0 ? HD : hd_given;
  V acc[kLanes][NG];
  for (int kk = 0; kk < kLanes; ++kk)
    for (int g = 0; g < NG; ++g) acc[kk][g] = V::Zero();
  const int64_t whole = hd - hd % kLanes;
  for (int64_t d = 0; d < whole; d += kLanes) {
    V qd[NG];
    for (int g = 0; g < NG; ++g) qd[g] = V::Load(q + g * hd + d);
    for (int kk = 0; kk < kLanes; ++kk) {
      const V kv = V::LoadF(key(kk) + d);
      for (int g = 0; g < NG; ++g) acc[kk][g] = Fma(qd[g], kv, acc[kk][g]);
    }
  }
  for (int g = 0; g < NG; ++g) {
    if (whole == hd) {
      V per_key[kLanes];
      for (int kk = 0; kk < kLanes; ++kk) per_key[kk] = acc[kk][g];
      Store(out[g], Tree8(per_key));
      continue;
    }
    for (int kk = 0; kk < kLanes; ++kk) {  // dimensions past the last whole block go into their lanes first
      double l[kLanes];
      Store(l, acc[kk][g]);
      for (int64_t d = whole; d < hd; ++d)
        l[d % kLanes] = __builtin_fma(q[g * hd + d], static_cast<double>(key(kk)[d]), l[d % kLanes]);
      out[g][kk] = Tree(l);
    }
  }
}

// Scores of NG heads for the visible keys of [j0, j1), eight keys at a time: eight consecutive
// visible keys straight from the rows when the head size is HD (> 0), any others gathered (a
// last partial group reads the first key again in its unused lanes; those scores are not stored).
// The grouping does not change a score: each is its own dot product.
template <int NG, int HD>
inline void ScoresHeads(const double* q, const float* k_rows, int64_t hd, int64_t j0, int64_t j1,
                        const uint8_t* visible, double scale, double add, double* scores, int64_t stride) {
  int64_t keys[kLanes];
  const float* rows[kLanes];
  double dots[NG][kLanes];
  int have = 0;
  auto flush = [&](int count) {
    for (int kk = count; kk < kLanes; ++kk) rows[kk] = rows[0];
    DotKeys8<NG, 0>(q, hd, [&](int kk) { return rows[kk]; }, dots);
    for (int g = 0; g < NG; ++g)
      for (int kk = 0; kk < count; ++kk) scores[g * stride + keys[kk]] = dots[g][kk] * scale + add;
  };
  auto all_visible = [&](int64_t j) {
    if (!visible) return true;
    for (int kk = 0; kk < kLanes; ++kk)
      if (!visible[j + kk]) return false;
    return true;
  };
  for (int64_t j = j0; j < j1;) {
    if (HD > 0 && have == 0 && j + kLanes <= j1 && all_visible(j)) {
      const float* k = k_rows + j * hd;
      DotKeys8<NG, HD>(q, hd, [k](int kk) { return k + kk * HD; }, dots);
      for (int g = 0; g < NG; ++g)
        for (int kk = 0; kk < kLanes; ++kk) scores[g * stride + j + kk] = dots[g][kk] * scale + add;
      j += kLanes;
      continue;
    }
    if (!visible || visible[j]) {
      keys[have] = j;
      rows[have] = k_rows + j * hd;
      if (++have == kLanes) {
        flush(kLanes);
        have = 0;
      }
    }
    ++j;
  }
  if (have) flush(have);
}

// ScoresHeads with the head size fixed at compile time where it is a common one.
template <int NG>
inline void ScoresHeadsAnySize(const double* q, const float* k_rows, int64_t hd, int64_t j0, int64_t j1,
                               const uint8_t* visible, double scale, double add, double* scores, int64_t stride) {
  switch (hd) {
    case 64: ScoresHeads<NG, 64>(q, k_rows, hd, j0, j1, visible, scale, add, scores, stride); break;
    case 128: ScoresHeads<NG, 128>(q, k_rows, hd, j0, j1, visible, scale, add, scores, stride); break;
    default: ScoresHeads<NG, 0>(q, k_rows, hd, j0, j1, visible, scale, add, scores, stride); break;
  }
}

// scores[g * stride + j] = dot(q_g, key j) * scale + add for each of `heads` query vectors and the
// keys j in [j0, j1) with visible[j] (all if visible is null).
inline void ScoresRows(const double* q, int64_t heads, const float* k_rows, int64_t hd, int64_t j0, int64_t j1,
                       const uint8_t* visible, double scale, double add, double* scores, int64_t stride) {
  for (int64_t g0 = 0; g0 < heads; g0 += 3) {  // three heads x eight keys: 24 accumulators (AVX-512 has 32 registers)
    const int64_t ng = heads - g0 < 3 ? heads - g0 : 3;
    const double* qg = q + g0 * hd;
    double* sg = scores + g0 * stride;
    switch (ng) {
      case 3: ScoresHeadsAnySize<3>(qg, k_rows, hd, j0, j1, visible, scale, add, sg, stride); break;
      case 2: ScoresHeadsAnySize<2>(qg, k_rows, hd, j0, j1, visible, scale, add, sg, stride); break;
      default: ScoresHeadsAnySize<1>(qg, k_rows, hd, j0, j1, visible, scale, add, sg, stride); break;
    }
  }
}

// The prefill tile: NQ query vectors x NB blocks of 8 keys with the lanes over keys, from kt, the keys
// of each block transposed (float32 [hd][8], block after block). Each score is one chain of fused
// multiply-adds over d in increasing order, times scale: no lane tree, so no shuffles.
template <int NQ, int NB>
inline void ScoresTile(const double* q, int64_t hd, const float* kt, double scale, double* scores, int64_t stride) {
  V acc[NQ][NB];
  for (int i = 0; i < NQ; ++i)
    for (int b = 0; b < NB; ++b) acc[i][b] = V::Zero();
  for (int64_t d = 0; d < hd; ++d) {
    V kv[NB];
    for (int b = 0; b < NB; ++b) kv[b] = V::LoadF(kt + (b * hd + d) * kLanes);
    for (int i = 0; i < NQ; ++i) {
      const V qd = V::Set(q[i * hd + d]);
      for (int b = 0; b < NB; ++b) acc[i][b] = Fma(qd, kv[b], acc[i][b]);
    }
  }
  const V s = V::Set(scale);
  for (int i = 0; i < NQ; ++i)
    for (int b = 0; b < NB; ++b) Store(scores + i * stride + b * kLanes, Mul(acc[i][b], s));
}

// ScoresTile over the key blocks [b0, b1) for NQ (or, for the last ones, fewer) query vectors.
template <int NQ>
inline void ScoresTileRow(const double* q, int64_t nq, int64_t hd, const float* kt, int64_t b0, int64_t b1,
                          double scale, double* scores, int64_t stride) {
  if constexpr (NQ > 1) {
    if (nq < NQ) return ScoresTileRow<NQ - 1>(q, nq, hd, kt, b0, b1, scale, scores, stride);
  }
  int64_t b = b0;
  for (; b + kTileKeyBlocks <= b1; b += kTileKeyBlocks)
    ScoresTile<NQ, kTileKeyBlocks>(q, hd, kt + b * hd * kLanes, scale, scores + b * kLanes, stride);
  for (; b < b1; ++b) ScoresTile<NQ, 1>(q, hd, kt + b * hd * kLanes, scale, scores + b * kLanes, stride);
}

// scores[i * stride + j] = (sum over d, increasing, of q_i[d] * k_jd) * scale for the nq query vectors
// q [nq][hd] and the keys j of blocks [b0, b1) of kt (8 keys each, transposed; see ScoresTile).
inline void BlockScoresRows(const double* q, int64_t nq, const float* kt, int64_t hd, int64_t b0, int64_t b1,
                            double scale, double* scores, int64_t stride) {
  for (int64_t i = 0; i < nq; i += kTileQueries) {
    const int64_t n = nq - i < kTileQueries ? nq - i : kTileQueries;
    ScoresTileRow<kTileQueries>(q + i * hd, n, hd, kt, b0, b1, scale, scores + i * stride, stride);
  }
}

// acc[g * hd + d0 ..] for NG heads and NB blocks of 8 dimensions from d0 (Add: continuing the sums in acc).
template <int NG, int NB, bool Add>
inline void WeightedBlock(const double* p, const float* v_rows, int64_t hd, int64_t d0, int64_t j0, int64_t j1,
                          const uint8_t* visible, double* acc, int64_t stride) {
  V a[NG][NB];
  for (int g = 0; g < NG; ++g)
    for (int b = 0; b < NB; ++b) a[g][b] = Add ? V::Load(acc + g * hd + d0 + b * kLanes) : V::Zero();
  for (int64_t j = j0; j < j1; ++j) {
    if (visible && !visible[j]) continue;
    V vv[NB];
    for (int b = 0; b < NB; ++b) vv[b] = V::LoadF(v_rows + j * hd + d0 + b * kLanes);
    for (int g = 0; g < NG; ++g) {
      const V pj = V::Set(p[g * stride + j]);
      for (int b = 0; b < NB; ++b) a[g][b] = Fma(pj, vv[b], a[g][b]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int b = 0; b < NB; ++b) Store(acc + g * hd + d0 + b * kLanes, a[g][b]);
}

template <int NG, bool Add>
inline void WeightedHeads(const double* p, const float* v_rows, int64_t hd, int64_t j0, int64_t j1,
                          const uint8_t* visible, double* acc, int64_t stride) {
  const int64_t whole = hd - hd % kLanes;
  int64_t d0 = 0;
  for (; d0 + 4 * kLanes <= whole; d0 += 4 * kLanes)
    WeightedBlock<NG, 4, Add>(p, v_rows, hd, d0, j0, j1, visible, acc, stride);
  for (; d0 < whole; d0 += kLanes) WeightedBlock<NG, 1, Add>(p, v_rows, hd, d0, j0, j1, visible, acc, stride);
  for (int64_t d = whole; d < hd; ++d)  // dimensions past the last whole block, in the same order
    for (int g = 0; g < NG; ++g) {
      double s = Add ? acc[g * hd + d] : 0.0;
      for (int64_t j = j0; j < j1; ++j)
        if (!visible || visible[j]) s = __builtin_fma(p[g * stride + j], static_cast<double>(v_rows[j * hd + d]), s);
      acc[g * hd + d] = s;
    }
}

// For each head g: acc[g * hd + d] = sum over keys j in [j0, j1) with visible[j] (all if null),
// increasing j, of p[g * stride + j] * v_jd; with Add the sums go on from acc's values (the same
// chains as one call over both key ranges). Heads go kWeightHeads at a time (each V row load shared).
template <bool Add>
inline void WeightedRows(const double* p, int64_t heads, const float* v_rows, int64_t hd, int64_t j0, int64_t j1,
                         const uint8_t* visible, double* acc, int64_t stride) {
  int64_t g0 = 0;
  for (; g0 + kWeightHeads <= heads; g0 += kWeightHeads)
    WeightedHeads<kWeightHeads, Add>(p + g0 * stride, v_rows, hd, j0, j1, visible, acc + g0 * hd, stride);
  for (; g0 < heads; g0 += 2) {
    if (heads - g0 >= 2)
      WeightedHeads<2, Add>(p + g0 * stride, v_rows, hd, j0, j1, visible, acc + g0 * hd, stride);
    else
      WeightedHeads<1, Add>(p + g0 * stride, v_rows, hd, j0, j1, visible, acc + g0 * hd, stride);
  }
}

// dst = e, the numerators of softmax(src) over n entries, and returns their sum: e_i = Exp(src_i - max);
// entries below kMaskedBelow are exactly 0 without computing exp (as exp(-1e9) is) unless no entry
// is above, in which case the row is computed in full, as the standard-op graph does. The maximum
// propagates NaN (then every e_i of an entry not masked is NaN). The maximum is taken in lanes (exact
// in any order); the sum in 8 lanes (i mod 8), then Tree.
inline double ExpSumRow(const double* src, double* dst, int64_t n) {
  const V inf = V::Set(INFINITY), zero = V::Zero(), one = V::Set(1.0);
  V lane_max = V::Set(-INFINITY), nans = zero;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const V s = V::Load(src + i);
    lane_max = LessSelect(lane_max, s, s, lane_max);  // NaN never wins here; counted apart
    nans = Add(nans, LessSelect(s, inf, zero, LessSelect(Sub(zero, s), inf, zero, one)));  // 1 where s is NaN
  }
  double lanes[kLanes], mx = -INFINITY;
  bool nan = false;
  Store(lanes, lane_max);
  for (double l : lanes) mx = l > mx ? l : mx;
  Store(lanes, nans);
  for (double l : lanes) nan |= l != 0.0;
  for (; i < n; ++i) {
    mx = src[i] > mx ? src[i] : mx;
    nan |= __builtin_isnan(src[i]);
  }
  const bool any = mx >= kMaskedBelow;  // an entry not masked (NaN entries aside, as >= is false for them)
  if (nan) mx = NAN;
  const V vmx = V::Set(mx), below = V::Set(any ? kMaskedBelow : -INFINITY);
  V sum = zero;
  i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const V s = V::Load(src + i);
    const V e = LessSelect(s, below, zero, Exp(Sub(s, vmx)));
    Store(dst + i, e);
    sum = Add(sum, e);
  }
  if (i < n) {  // the tail as one more block padded with -inf (e = 0, adding exact zeros)
    double pad[kLanes], e[kLanes];
    for (int l = 0; l < kLanes; ++l) pad[l] = i + l < n ? src[i + l] : -INFINITY;
    const V s = V::Load(pad);
    const V ev = LessSelect(s, below, zero, Exp(Sub(s, vmx)));
    Store(e, ev);
    sum = Add(sum, ev);
    for (int64_t l = 0; i + l < n; ++l) dst[i + l] = e[l];
  }
  Store(lanes, sum);
  return Tree(lanes);
}

// dst = softmax(src) over n entries: ExpSumRow's numerators, each divided by their sum.
inline void SoftmaxRow(const double* src, double* dst, int64_t n) {
  const double total = ExpSumRow(src, dst, n);
  for (int64_t j = 0; j < n; ++j) dst[j] /= total;
}

// The butterfly of baseq.Hadamard and of R3: in-place unnormalised Sylvester transform of p = 2^k values,
// log2(p) add/sub passes pairing index j with j + h inside chunks of 2h (hadamard._butterfly's pairing);
// the passes of h >= 8 in V lanes (the same exact adds and subtracts).
inline void ButterflyLanes(double* y, int64_t p) {
  int64_t h = 1;
  for (; h < p && h < kLanes; h *= 2)
    for (int64_t base = 0; base < p; base += 2 * h)
      for (int64_t t = 0; t < h; ++t) {
        const double u = y[base + t], v = y[base + h + t];
        y[base + t] = u + v;
        y[base + h + t] = u - v;
      }
  for (; h < p; h *= 2)
    for (int64_t base = 0; base < p; base += 2 * h)
      for (int64_t t = 0; t < h; t += kLanes) {
        const V u = V::Load(y + base + t), v = V::Load(y + base + h + t);
        Store(y + base + t, Add(u, v));
        Store(y + base + h + t, Sub(u, v));
      }
}

// mixed[i * p + j] = sum over k = 0 .. m-1, increasing, of s[k * m + i] * work[k * p + j], each product
// and each sum rounded (no fused multiply-add: the same bits as the plain loop), 8 values of j at a
// time: the small dense factor of baseq.Hadamard applied across m blocks of p values.
inline void MixFactorRows(const double* s, int64_t m, const double* work, int64_t p, double* mixed) {
  for (int64_t i = 0; i < m; ++i) {
    double* d = mixed + i * p;
    int64_t j = 0;
    for (; j + kLanes <= p; j += kLanes) {
      V acc = V::Zero();
      for (int64_t k = 0; k < m; ++k) acc = Add(acc, Mul(V::Set(s[k * m + i]), V::Load(work + k * p + j)));
      Store(d + j, acc);
    }
    for (; j < p; ++j) {
      double acc = 0.0;
      for (int64_t k = 0; k < m; ++k) acc += s[k * m + i] * work[k * p + j];
      d[j] = acc;
    }
  }
}

constexpr double kExpCap = 709.0;  // Exp's Pow2(n) needs n <= 1023

inline V SiluTimes(V g, V u) {
  const V x = Sub(V::Zero(), g);
  const V inf = V::Set(INFINITY), cap = V::Set(kExpCap);
  const V e = LessSelect(x, inf, Exp(LessSelect(x, cap, x, cap)), inf);  // NaN stays NaN through g
  return Mul(Div(g, Add(V::Set(1.0), e)), u);
}

// out[i] = float(silu(g[i]) * u[i]); a last partial block is padded with zeros (its lanes not stored).
inline void SwiGLURow(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) StoreF(out + i, SiluTimes(V::LoadF(g + i), V::LoadF(u + i)));
  if (i < n) {
    float gp[kLanes] = {}, up[kLanes] = {}, op[kLanes];
    for (int64_t l = 0; i + l < n; ++l) gp[l] = g[i + l], up[l] = u[i + l];
    StoreF(op, SiluTimes(V::LoadF(gp), V::LoadF(up)));
    for (int64_t l = 0; i + l < n; ++l) out[i + l] = op[l];
  }
}

}  // namespace
}  // namespace attn
}  // namespace baseq

// Defines the entry points of one instruction set's attention kernels.
#define BASEQ_ATTENTION_KERNELS(Suffix)                                                                          \
  namespace baseq {                                                                                             \
  namespace attn {                                                                                              \
  void Scores##Suffix(const double* q, int64_t heads, const float* k_rows, int64_t hd, int64_t j0, int64_t j1,  \
                      const uint8_t* visible, double scale, double add, double* scores, int64_t stride) {       \
    ScoresRows(q, heads, k_rows, hd, j0, j1, visible, scale, add, scores, stride);                              \
  }                                                                                                             \
  void Weighted##Suffix(const double* p, int64_t heads, const float* v_rows, int64_t hd, int64_t j0, int64_t j1, \
                        const uint8_t* visible, double* acc, int64_t stride) {                                  \
    WeightedRows<false>(p, heads, v_rows, hd, j0, j1, visible, acc, stride);                                    \
  }                                                                                                             \
  void WeightedAdd##Suffix(const double* p, int64_t heads, const float* v_rows, int64_t hd, int64_t j0, int64_t j1, \
                           const uint8_t* visible, double* acc, int64_t stride) {                               \
    WeightedRows<true>(p, heads, v_rows, hd, j0, j1, visible, acc, stride);                                     \
  }                                                                                                             \
  void BlockScores##Suffix(const double* q, int64_t nq, const float* kt, int64_t hd, int64_t b0, int64_t b1,     \
                           double scale, double* scores, int64_t stride) {                                      \
    BlockScoresRows(q, nq, kt, hd, b0, b1, scale, scores, stride);                                              \
  }                                                                                                             \
  void Softmax##Suffix(const double* src, double* dst, int64_t n) { SoftmaxRow(src, dst, n); }                  \
  double ExpSum##Suffix(const double* src, double* dst, int64_t n) { return ExpSumRow(src, dst, n); }           \
  void SwiGLU##Suffix(const float* g, const float* u, float* out, int64_t n) { SwiGLURow(g, u, out, n); }        \
  void Butterfly##Suffix(double* y, int64_t p) { ButterflyLanes(y, p); }                                          \
  void MixFactor##Suffix(const double* s, int64_t m, const double* work, int64_t p, double* mixed) {            \
    MixFactorRows(s, m, work, p, mixed);                                                                        \
  }                                                                                                             \
  }                                                                                                             \
  }
