// baseq.Attention's inner loops for any CPU, and the run-time choice of the widest available set.
#include "attention_rows.h"

BASEQ_ATTENTION_KERNELS(Scalar)

namespace baseq {
namespace attn {

int AvailableKernels(Kernels* out, int capacity) {
  int n = 0;
  auto add = [&](const char* name, ScoresFn s, WeightedFn w) {
    if (n < capacity) out[n++] = Kernels{name, s, w};
  };
  add("scalar", ScoresScalar, WeightedScalar);
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) add("avx2", ScoresAvx2, WeightedAvx2);
  if (__builtin_cpu_supports("avx512f")) add("avx512", ScoresAvx512, WeightedAvx512);
#endif
  return n;
}

}  // namespace attn
}  // namespace baseq
