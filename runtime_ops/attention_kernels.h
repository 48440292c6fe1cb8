// The float64 inner loops of baseq.Attention per instruction set (attention_rows.h is the one
// source; attention_<isa>.cc compile it with their flags), and the run-time choice among them.
#pragma once

#include <cstdint>

namespace baseq {
namespace attn {

// q: `heads` query vectors of hd float64 values that share one KV head; scores, p: [heads][stride];
// acc: [heads][hd]. See attention_rows.h for the exact operations.
using ScoresFn = void (*)(const double* q, int64_t heads, const float* k_rows, int64_t hd, int64_t j0, int64_t j1,
                          const uint8_t* visible, double scale, double add, double* scores, int64_t stride);
using WeightedFn = void (*)(const double* p, int64_t heads, const float* v_rows, int64_t hd, int64_t j0, int64_t j1,
                            const uint8_t* visible, double* acc, int64_t stride);

struct Kernels {
  const char* name;
  ScoresFn scores;
  WeightedFn weighted;
};

// Every set this build has and this CPU runs, the portable one first; the last is the widest.
int AvailableKernels(Kernels* out, int capacity);

void ScoresScalar(const double*, int64_t, const float*, int64_t, int64_t, int64_t, const uint8_t*, double, double, double*, int64_t);
void WeightedScalar(const double*, int64_t, const float*, int64_t, int64_t, int64_t, const uint8_t*, double*, int64_t);
void ScoresAvx2(const double*, int64_t, const float*, int64_t, int64_t, int64_t, const uint8_t*, double, double, double*, int64_t);
void WeightedAvx2(const double*, int64_t, const float*, int64_t, int64_t, int64_t, const uint8_t*, double*, int64_t);
void ScoresAvx512(const double*, int64_t, const float*, int64_t, int64_t, int64_t, const uint8_t*, double, double, double*, int64_t);
void WeightedAvx512(const double*, int64_t, const float*, int64_t, int64_t, int64_t, const uint8_t*, double*, int64_t);

}  // namespace attn
}  // namespace baseq
