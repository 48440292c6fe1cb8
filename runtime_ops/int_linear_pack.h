// Repacking baseq.IntLinear's weights (MatMulNBits-style inputs) into the kernels' layout
// (int_linear.h, Weights), done once per node for constant weights.
#pragma once

#include "int_linear.h"

#include <string>
#include <vector>

namespace baseq {
namespace intlin {

struct PackedWeights {
  Weights view;  // points into the vectors below
  std::vector<uint8_t> codes;
  std::vector<int32_t> zero, wsum;
  std::vector<double> scale;
};

// b: uint8 [n, ceil(k / 2)] two codes per byte, low nibble = even k (quant.pack_int4);
// zeros: uint8 [n, groups] weight zero points (4-bit codes); scales: float [n, groups];
// group_size: k per group (groups = ceil(k / group_size), the last group may be shorter), or any
// value >= k for one group. Returns "" or what is wrong with the inputs.
std::string PackWeights(const uint8_t* b, const uint8_t* zeros, const float* scales, int64_t n, int64_t k,
                        int64_t group_size, int64_t groups, PackedWeights* out);

// Packs row r's codes q[0..k) (values 0..255) into the kernels' row layout: dst[stride] gets the
// groups' codes on chunk boundaries, zeros between; qsum[groups] the per-group sums.
void PackRow(const Weights& w, const uint8_t* q, uint8_t* dst, int32_t* qsum);

}  // namespace intlin
}  // namespace baseq
