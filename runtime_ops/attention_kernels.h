// The float64 inner loops of baseq.Attention (and baseq.MaskedSoftmax, baseq.SwiGLU) per instruction set
// (attention_rows.h is the one source; attention_<isa>.cc compile it with their flags), and the
// run-time choice among them. Every set gives the same bits: they run the same operations in the
// same order on 8 float64 lanes, with fused multiply-adds everywhere a product is accumulated.
#pragma once

#include <cstdint>

namespace baseq {
namespace attn {

constexpr double kMaskedBelow = -1e8;  // scores below this are masked keys (the exporter's additive mask is -1e9)

// q: `heads` query vectors of hd float64 values that share one KV head; scores, p: [heads][stride];
// acc: [heads][hd]. See attention_rows.h for the exact operations.
using ScoresFn = void (*)(const double* q, int64_t heads, const float* k_rows, int64_t hd, int64_t j0, int64_t j1,
                          const uint8_t* visible, double scale, double add, double* scores, int64_t stride);
using WeightedFn = void (*)(const double* p, int64_t heads, const float* v_rows, int64_t hd, int64_t j0, int64_t j1,
                            const uint8_t* visible, double* acc, int64_t stride);
// Prefill: nq query vectors (q [nq][hd]) against the key blocks [b0, b1) of kt, 8 keys a block stored
// transposed (float32 [hd][8], the layout TransposeKeyBlocks makes): scores[i * stride + j] for every key of them.
using BlockScoresFn = void (*)(const double* q, int64_t nq, const float* kt, int64_t hd, int64_t b0, int64_t b1,
                               double scale, double* scores, int64_t stride);
using SoftmaxFn = void (*)(const double* src, double* dst, int64_t n);
// dst = softmax's numerators exp(src - max) (its masking), returning their sum.
using ExpSumFn = double (*)(const double* src, double* dst, int64_t n);
// out[i] = float(silu(double(g[i])) * double(u[i])) for i < n (baseq.SwiGLU's row).
using SwiGLUFn = void (*)(const float* g, const float* u, float* out, int64_t n);
// The butterfly of p = 2^k float64 values, in place (baseq.Hadamard and R3; attention_rows.h).
using ButterflyFn = void (*)(double* y, int64_t p);
// mixed[i * p + j] = sum_k s[k * m + i] * work[k * p + j], plain products and sums in k order (baseq.Hadamard's
// small dense factor S [m, m] across m butterflied blocks of p values).
using MixFactorFn = void (*)(const double* s, int64_t m, const double* work, int64_t p, double* mixed);

struct Kernels {
  const char* name;
  ScoresFn scores;
  WeightedFn weighted;
  WeightedFn weighted_add;  // weighted, the sums going on from acc's values
  BlockScoresFn block_scores;
  SoftmaxFn softmax;
  ExpSumFn exp_sum;
  SwiGLUFn swiglu;
  ButterflyFn butterfly;
  MixFactorFn mix_factor;
};

// Every set this build has and this CPU runs, the portable one first; the last is the widest.
int AvailableKernels(Kernels* out, int capacity);
Kernels WidestKernels();

#define BASEQ_ATTENTION_DECLARE(Suffix)                                                                           \
  void Scores##Suffix(const double*, int64_t, const float*, int64_t, int64_t, int64_t, const uint8_t*, double,     \
                      double, double*, int64_t);                                                                  \
  void Weighted##Suffix(const double*, int64_t, const float*, int64_t, int64_t, int64_t, const uint8_t*, double*,  \
                        int64_t);                                                                                 \
  void WeightedAdd##Suffix(const double*, int64_t, const float*, int64_t, int64_t, int64_t, const uint8_t*,       \
                           double*, int64_t);                                                                     \
  void BlockScores##Suffix(const double*, int64_t, const float*, int64_t, int64_t, int64_t, double, double*,      \
                           int64_t);                                                                              \
  void Softmax##Suffix(const double*, double*, int64_t);                                                         \
  double ExpSum##Suffix(const double*, double*, int64_t);                                                        \
  void SwiGLU##Suffix(const float*, const float*, float*, int64_t);                                              \
  void Butterfly##Suffix(double*, int64_t);                                                                     \
  void MixFactor##Suffix(const double*, int64_t, const double*, int64_t, double*);
BASEQ_ATTENTION_DECLARE(Scalar)
BASEQ_ATTENTION_DECLARE(Avx2)
BASEQ_ATTENTION_DECLARE(Avx512)
#undef BASEQ_ATTENTION_DECLARE

}  // namespace attn
}  // namespace baseq
