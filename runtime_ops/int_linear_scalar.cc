// baseq.IntLinear's portable kernel (no intrinsics): the reference the other kernels are tested
// against, and the path on CPUs without a faster one.
#include "int_linear_tile.h"
#include "quant_code.h"

namespace baseq {
namespace intlin {
namespace {

struct ScalarKernel {
  static constexpr int kRows = 4;

  template <int R>
  static void Dot(const uint8_t* codes, const uint8_t* q, int64_t q_stride, int64_t chunks, int32_t* acc) {
    for (int i = 0; i < R * kCols; ++i) acc[i] = 0;
    for (int64_t t = 0; t < chunks; ++t) {
      const uint8_t* c = codes + t * kChunkBytes;
      for (int r = 0; r < R; ++r) {
        const uint8_t* qr = q + r * q_stride + t * kChunk;
        int32_t* a = acc + r * kCols;
        for (int j = 0; j < kCols; ++j) {
          int32_t s = 0;
          for (int i = 0; i < 4; ++i) {
            const int32_t byte = c[4 * j + i];
            s += qr[i] * (byte & 15) + qr[4 + i] * (byte >> 4);
          }
          a[j] += s;
        }
      }
    }
  }
};

}  // namespace

void TilesScalar(const Weights& w, const Rows& x, const Out& o, int64_t r0, int64_t r1, int64_t b0, int64_t b1) {
  RunTiles<ScalarKernel>(w, x, o, r0, r1, b0, b1);
}

void CodesScalar(const float* v, int64_t n, float scale, float zero, float qmax, uint8_t* out) {
  QuantCodesU8(v, n, scale, zero, qmax, out);
}

}  // namespace intlin
}  // namespace baseq
