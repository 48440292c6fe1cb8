// baseq.Attention's inner loops for any CPU (8 float64 lanes as plain arrays), and the run-time
// choice of the widest available set.
#include <cstring>

namespace baseq {
namespace attn {
namespace {

// Register tiles (attention_rows.h): modest, the compiler keeps what it can.
constexpr int kTileQueries = 4, kTileKeyBlocks = 1, kWeightHeads = 2;

struct V {
  double x[8];
  static V Zero() { return Set(0.0); }
  static V Set(double a) {
    V v;
    for (double& e : v.x) e = a;
    return v;
  }
  static V Load(const double* p) {
    V v;
    for (int l = 0; l < 8; ++l) v.x[l] = p[l];
    return v;
  }
  static V LoadF(const float* p) {
    V v;
    for (int l = 0; l < 8; ++l) v.x[l] = static_cast<double>(p[l]);
    return v;
  }
};

inline void Store(double* p, V v) {
  for (int l = 0; l < 8; ++l) p[l] = v.x[l];
}
inline void StoreF(float* p, V v) {
  for (int l = 0; l < 8; ++l) p[l] = static_cast<float>(v.x[l]);
}
#define BASEQ_LANEWISE(Name, expr)      \
  inline V Name(V a, V b) {             \
    V r;                                \
    for (int l = 0; l < 8; ++l) {       \
      const double x = a.x[l], y = b.x[l]; \
      r.x[l] = (expr);                  \
    }                                   \
    return r;                           \
  }
BASEQ_LANEWISE(Add, x + y)
BASEQ_LANEWISE(Sub, x - y)
BASEQ_LANEWISE(Mul, x * y)
BASEQ_LANEWISE(Div, x / y)
#undef BASEQ_LANEWISE
inline V Fma(V a, V b, V c) {
  V r;
  for (int l = 0; l < 8; ++l) r.x[l] = __builtin_fma(a.x[l], b.x[l], c.x[l]);
  return r;
}
inline V Round(V a) {
  V r;
  for (int l = 0; l < 8; ++l) r.x[l] = __builtin_nearbyint(a.x[l]);
  return r;
}
inline V Pow2(V n) {
  V r;
  for (int l = 0; l < 8; ++l) {
    const double t = n.x[l] + 4503599627371519.0;  // 2^52 + 1023
    unsigned long long bits;
    std::memcpy(&bits, &t, sizeof bits);
    bits <<= 52;
    std::memcpy(&r.x[l], &bits, sizeof bits);
  }
  return r;
}
inline V Tree8(const V* acc) {
  V r;
  for (int k = 0; k < 8; ++k) {
    const double* l = acc[k].x;
    r.x[k] = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
  }
  return r;
}
inline V LessSelect(V x, V t, V a, V b) {
  V r;
  for (int l = 0; l < 8; ++l) r.x[l] = x.x[l] < t.x[l] ? a.x[l] : b.x[l];
  return r;
}

}  // namespace
}  // namespace attn
}  // namespace baseq

#include "attention_rows.h"

BASEQ_ATTENTION_KERNELS(Scalar)

namespace baseq {
namespace attn {

int AvailableKernels(Kernels* out, int capacity) {
  int n = 0;
#define BASEQ_ADD_KERNELS(name, Suffix)                                                                        \
  if (n < capacity)                                                                                            \
    out[n++] = Kernels{name, Scores##Suffix, Weighted##Suffix, WeightedAdd##Suffix, BlockScores##Suffix,        \
                       Softmax##Suffix, ExpSum##Suffix, SwiGLU##Suffix, Butterfly##Suffix,        \
                       MixFactor##Suffix};
  BASEQ_ADD_KERNELS("scalar", Scalar)
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) BASEQ_ADD_KERNELS("avx2", Avx2)
  if (__builtin_cpu_supports("avx512f")) BASEQ_ADD_KERNELS("avx512", Avx512)
#endif
#undef BASEQ_ADD_KERNELS
  return n;
}

Kernels WidestKernels() {
  Kernels all[4];
  const int n = AvailableKernels(all, 4);
  return all[n - 1];
}

}  // namespace attn
}  // namespace baseq
