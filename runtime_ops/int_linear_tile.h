// The tile loop and the exact epilogue of baseq.IntLinear, shared by every instruction-set kernel.
//
// Each int_linear_<isa>.cc defines a micro-kernel K with
//   static constexpr int kRows;                 rows per register tile
//   template <int R> static void Dot(const uint8_t* codes, const uint8_t* q, int64_t q_stride,
//                                    int64_t chunks, int32_t* acc);
// computing acc[i * 16 + j] = sum over `chunks` chunks of q_i[k] * c_j[k] for R rows and the 16
// columns of one packed block, then includes this header and calls RunTiles<K>. Everything here
// has internal linkage (anonymous namespace): each translation unit gets its own copy compiled
// with its own -m flags, and no copy can be merged with another TU's (which would run AVX-512
// code on a CPU without it). Hence no standard-library templates here either.
#pragma once

#include "int_linear.h"

namespace baseq {
namespace intlin {
namespace {

// K::Dot<R> for the largest R <= rows (rows in 1..kRows).
template <class K, int R>
inline void DotRows(int rows, const uint8_t* codes, const uint8_t* q, int64_t q_stride, int64_t chunks,
                    int32_t* acc) {
  if constexpr (R > 1) {
    if (rows < R) {
      DotRows<K, R - 1>(rows, codes, q, q_stride, chunks, acc);
      return;
    }
  }
  K::template Dot<R>(codes, q, q_stride, chunks, acc);
}

// y for rows [r0, r1) x column blocks [b0, b1). Per row i, column j and group g:
//   P = (acc - zw * qsum) - zx * wsum        int32, then exact in float64 (|zx| <= 2^24 - 256)
//   G = 1: y = float((P * s) * W)    G > 1: y = float((0 + sum_g P_g * W_g) * s)    then + bias
template <class K>
void RunTiles(const Weights& w, const Rows& x, const Out& o, int64_t r0, int64_t r1, int64_t b0, int64_t b1) {
  constexpr int MR = K::kRows;
  const int64_t G = w.groups, cpg = w.chunks_per_group;
  alignas(64) int32_t acc[MR * kCols];
  alignas(64) double total[MR * kCols];
  alignas(64) float out[kCols];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * kCols;
    const int cols = w.n - n0 < kCols ? static_cast<int>(w.n - n0) : kCols;
    const float* bias = o.bias ? o.bias + n0 : nullptr;
    for (int64_t r = r0; r < r1; r += MR) {
      const int rows = r1 - r < MR ? static_cast<int>(r1 - r) : MR;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t wg = (b * G + g) * kCols;  // this block and group's per-column values
        DotRows<K, MR>(rows, w.codes + (b * G + g) * cpg * kChunkBytes, x.q + r * x.stride + g * cpg * kChunk,
                       x.stride, cpg, acc);
        const int32_t* zw = w.zero + wg;
        const int32_t* ws = w.wsum + wg;
        const double* sc = w.scale + wg;
        for (int i = 0; i < rows; ++i) {
          const int32_t qs = x.qsum[(r + i) * G + g];
          const double zx = static_cast<double>(x.zero[r + i]);
          int32_t* a = acc + i * kCols;
          double* t = total + i * kCols;
          for (int j = 0; j < kCols; ++j) {
            const double p = static_cast<double>(a[j] - zw[j] * qs) - zx * static_cast<double>(ws[j]);
            if (G == 1)
              t[j] = p;
            else
              t[j] = (g == 0 ? 0.0 : t[j]) + p * sc[j];
          }
        }
      }
      const double* sc0 = w.scale + b * G * kCols;
      for (int i = 0; i < rows; ++i) {
        const double s = static_cast<double>(x.scale[r + i]);
        const double* t = total + i * kCols;
        if (G == 1) {
          for (int j = 0; j < kCols; ++j) out[j] = static_cast<float>((t[j] * s) * sc0[j]);
        } else {
          for (int j = 0; j < kCols; ++j) out[j] = static_cast<float>(t[j] * s);
        }
        float* y = o.y + (r + i) * w.n + n0;
        if (bias) {
          for (int j = 0; j < cols; ++j) y[j] = out[j] + bias[j];
        } else {
          for (int j = 0; j < cols; ++j) y[j] = out[j];
        }
      }
    }
  }
}

}  // namespace
}  // namespace intlin
}  // namespace baseq
