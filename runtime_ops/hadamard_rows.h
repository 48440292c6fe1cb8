// The butterfly of baseq.Hadamard, shared with the attention op's rotation of q and k (R3).
#pragma once

#include <cstdint>

namespace baseq {

// In-place unnormalised Sylvester transform of p = 2^k values: log2(p) add/sub passes, pairing
// index j with j + h inside chunks of 2h (the pairing of hadamard._butterfly).
inline void Butterfly(double* y, int64_t p) {
  for (int64_t h = 1; h < p; h *= 2) {
    for (int64_t base = 0; base < p; base += 2 * h) {
      double* a = y + base;
      double* b = a + h;
      for (int64_t t = 0; t < h; ++t) {
        double u = a[t], v = b[t];
        a[t] = u + v;
        b[t] = u - v;
      }
    }
  }
}

}  // namespace baseq
