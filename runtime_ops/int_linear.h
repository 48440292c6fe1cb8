// The exact integer matmul behind baseq.IntLinear, without onnxruntime: packed weights, quantized
// activation rows, and the per-instruction-set tile kernels chosen at run time.
//
// What is computed, for activation row r (codes q[k] in [0, 2^bits - 1], zero point zx and scale s
// of the per-token quantizer, levels L = q - zx) and output column n (4-bit codes c[n, k], zero
// points zw[n, g], float scales W[n, g] per group g of k):
//   P_g = sum_{k in g} L[k] * (c[n, k] - zw[n, g])      an integer, exact in any order
//   G = 1: y = float((double(P) * double(s)) * double(W[n]))           (ScaleSums' order)
//   G > 1: y = float((sum_g double(P_g) * double(W[n, g])) * double(s))  (g increasing)
//   then y + bias[n] in float32.
// The kernels sum codes times codes, sum_k q[k] * c[n, k], with integer dot-product instructions
// (all operands are small non-negative integers: u8 x u8 <= 255 * 15) and recover P_g as
//   P_g = sum q*c - zw * sum(q) - zx * sum(c - zw),
// where sum(q) is per row and group and sum(c - zw) per column and group (both precomputed).
// Exact in int32/float64 while |zx| <= 2^24 - 256 (then every level is an exact float32 integer
// too); rows beyond that (a constant row whose scale sits at the 1e-8 floor, or NaN) take SlowRow.
//
// This header holds plain data only: it is included by the per-ISA translation units, which are
// compiled with different -m flags and must not share any inline code with the rest.
#pragma once

#include <cstdint>

namespace baseq {
namespace intlin {

constexpr int kCols = 16;                         // output columns per packed block
constexpr int kChunk = 8;                         // k values per packed chunk
constexpr int kChunkBytes = kCols * kChunk / 2;   // 64: one byte holds two 4-bit codes
constexpr float kExactZeroLimit = 16776960.0f;    // 2^24 - 256: |zx| up to this takes the integer path

// The weights as the kernels read them. Codes of block b (columns 16b .. 16b + 15), chunk t
// (k = 8t .. 8t + 7 inside its group, each group starting on a chunk boundary): 64 bytes, byte
// 4j + i holding column 16b + j's code for k = 8t + i in the low nibble and k = 8t + 4 + i in the
// high nibble (i = 0..3). Missing columns and k (padding) hold code 0.
struct Weights {
  int64_t n = 0, k = 0;           // output columns, input features
  int64_t groups = 1;             // G
  int64_t group_size = 0;         // k per group (the last group may be shorter)
  int64_t chunks_per_group = 0;   // ceil(group_size / 8)
  int64_t blocks = 0;             // ceil(n / 16)
  const uint8_t* codes = nullptr; // [blocks][groups * chunks_per_group][64]
  const int32_t* zero = nullptr;  // [blocks][groups][16]  zw
  const int32_t* wsum = nullptr;  // [blocks][groups][16]  sum over the group's k of (c - zw)
  const double* scale = nullptr;  // [blocks][groups][16]  W as float64 (0 in padding columns)
};

// Quantized activation rows in the weights' k layout (groups padded to whole chunks with q = 0).
struct Rows {
  const uint8_t* q = nullptr;      // [rows][stride], stride = groups * chunks_per_group * 8
  int64_t stride = 0;
  const int32_t* qsum = nullptr;   // [rows][groups]  sum of q over the group
  const float* zero = nullptr;     // [rows]  zx (an integer-valued float, NaN for a NaN row)
  const float* scale = nullptr;    // [rows]  s
};

struct Out {
  float* y = nullptr;              // [rows][n]
  const float* bias = nullptr;     // [n] or nullptr
};

// Computes y for rows [r0, r1) and column blocks [b0, b1) (rows needing SlowRow get garbage, no UB).
using TileFn = void (*)(const Weights& w, const Rows& x, const Out& o, int64_t r0, int64_t r1, int64_t b0,
                        int64_t b1);

// The activation codes of one row (quant_code.h's QuantCodesU8), compiled per instruction set.
using CodesFn = void (*)(const float* v, int64_t n, float scale, float zero, float qmax, uint8_t* out);

enum class Isa { kScalar, kAvx2, kAvxVnni, kAvx512Vnni, kNeon, kNeonDot };
constexpr Isa kAllIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvxVnni, Isa::kAvx512Vnni, Isa::kNeon, Isa::kNeonDot};

const char* IsaName(Isa isa);               // "scalar", "avx2", "avxvnni", "avx512vnni", "neon", "neondot"
bool IsaFromName(const char* name, Isa* isa);
bool IsaCompiled(Isa isa);                   // this build has the kernel
bool IsaAvailable(Isa isa);                  // compiled and this CPU (and OS) runs it
TileFn TileKernel(Isa isa);                  // nullptr unless IsaAvailable
CodesFn CodesKernel(Isa isa);                // nullptr unless IsaAvailable
Isa BestIsa();                               // the fastest available one

// The per-ISA entry points (int_linear_<isa>.cc); only those of this CPU family are linked in.
void TilesScalar(const Weights&, const Rows&, const Out&, int64_t, int64_t, int64_t, int64_t);
void TilesAvx2(const Weights&, const Rows&, const Out&, int64_t, int64_t, int64_t, int64_t);
void TilesAvxVnni(const Weights&, const Rows&, const Out&, int64_t, int64_t, int64_t, int64_t);
void TilesAvx512Vnni(const Weights&, const Rows&, const Out&, int64_t, int64_t, int64_t, int64_t);
void TilesNeon(const Weights&, const Rows&, const Out&, int64_t, int64_t, int64_t, int64_t);
void TilesNeonDot(const Weights&, const Rows&, const Out&, int64_t, int64_t, int64_t, int64_t);
void CodesScalar(const float*, int64_t, float, float, float, uint8_t*);
void CodesAvx2(const float*, int64_t, float, float, float, uint8_t*);
void CodesAvxVnni(const float*, int64_t, float, float, float, uint8_t*);
void CodesAvx512Vnni(const float*, int64_t, float, float, float, uint8_t*);
void CodesNeon(const float*, int64_t, float, float, float, uint8_t*);
void CodesNeonDot(const float*, int64_t, float, float, float, uint8_t*);

// Row r by the definition, for any zx (large, or NaN: then the row is all NaN): levels
// L = float(q - zx) as QuantLevels stores them, P_g summed in float64 in increasing k.
void SlowRow(const Weights& w, const Rows& x, const Out& o, int64_t r);

// True when row r's zero point keeps every level exact and the integer path applies (static: no
// out-of-line copy may be shared with the -m-flagged translation units).
static inline bool RowIsExact(const Rows& x, int64_t r) {
  const float z = x.zero[r];
  return z <= kExactZeroLimit && z >= -kExactZeroLimit;  // false for NaN
}

}  // namespace intlin
}  // namespace baseq
