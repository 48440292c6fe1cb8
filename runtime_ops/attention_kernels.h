// The float64 inner loops of baseq.Attention per instruction set (attention_rows.h is the one
// source; attention_<isa>.cc compile it with their flags), and the run-time choice among them.
#pragma once

#include <cstdint>

namespace baseq {
namespace attn {

using ScoresFn = void (*)(const double* q, const float* k_rows, int64_t hd, int64_t j0, int64_t j1,
                          const uint8_t* visible, double scale, double add, double* scores);
using WeightedFn = void (*)(const double* p, const float* v_rows, int64_t hd, int64_t j0, int64_t j1,
                            const uint8_t* visible, double* acc);

struct Kernels {
  const char* name;
  ScoresFn scores;
  WeightedFn weighted;
};

// Every set this build has and this CPU runs, the portable one first; the last is the widest.
int AvailableKernels(Kernels* out, int capacity);

void ScoresScalar(const double*, const float*, int64_t, int64_t, int64_t, const uint8_t*, double, double, double*);
void WeightedScalar(const double*, const float*, int64_t, int64_t, int64_t, const uint8_t*, double*);
void ScoresAvx2(const double*, const float*, int64_t, int64_t, int64_t, const uint8_t*, double, double, double*);
void WeightedAvx2(const double*, const float*, int64_t, int64_t, int64_t, const uint8_t*, double*);
void ScoresAvx512(const double*, const float*, int64_t, int64_t, int64_t, const uint8_t*, double, double, double*);
void WeightedAvx512(const double*, const float*, int64_t, int64_t, int64_t, const uint8_t*, double*);

}  // namespace attn
}  // namespace baseq
