// Reads and writes the byte layouts with the custom ops' own C++ (kv_rows.h, int_linear_pack.h), so that
// tests/test_layout.py can compare them with baseq_export/quant/layout.py. Raw little-endian files in and out:
//   layout_probe width HD...                      prints PackedRowWidth(HD) per argument
//   layout_probe kv_unpack IN OUT HD ROWS         packed rows -> float32 [ROWS][HD] (UnpackKvRow)
//   layout_probe kv_pack IN OUT HD ROWS CLIP      float32 [ROWS][HD] -> packed rows (PackKvRow, 4-bit)
//   layout_probe int4 IN OUT N K                  IntLinear's B uint8 [N][ceil(K/2)] -> codes uint8 [N][K]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

#include "int_linear_pack.h"
#include "kv_rows.h"

namespace {

std::vector<uint8_t> ReadAll(const char* path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

void WriteAll(const char* path, const void* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
}

// Each code of B read back through IntLinear's repacking: one group, zero points 0, unit scales, and a
// one-hot activation row per k through SlowRow (the kernels' definition), so y[col] = code[col][k].
int DecodeInt4(const char* in, const char* out, int64_t n, int64_t k) {
  using namespace baseq::intlin;
  const std::vector<uint8_t> b = ReadAll(in);
  if (static_cast<int64_t>(b.size()) != n * ((k + 1) / 2)) return 2;
  const std::vector<uint8_t> zeros(n, 0);
  const std::vector<float> scales(n, 1.0f);
  PackedWeights w;
  if (!PackWeights(b.data(), zeros.data(), scales.data(), n, k, k, 1, &w).empty()) return 3;
  const int64_t stride = w.view.groups * w.view.chunks_per_group * kChunk;
  std::vector<uint8_t> codes(n * k), q(k), row(stride);
  std::vector<float> y(n);
  int32_t qsum = 0;
  const float zx = 0.0f, sx = 1.0f;
  for (int64_t kk = 0; kk < k; ++kk) {
    std::fill(q.begin(), q.end(), 0);
    q[kk] = 1;
    PackRow(w.view, q.data(), row.data(), &qsum);
    const Rows rows{row.data(), stride, &qsum, &zx, &sx};
    SlowRow(w.view, rows, Out{y.data(), nullptr}, 0);
    for (int64_t col = 0; col < n; ++col) codes[col * k + kk] = static_cast<uint8_t>(y[col]);
  }
  WriteAll(out, codes.data(), codes.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return 1;
  const std::string mode = argv[1];
  if (mode == "width") {
    for (int i = 2; i < argc; ++i) std::cout << baseq::PackedRowWidth(std::atoll(argv[i])) << "\n";
    return 0;
  }
  if (argc < 6) return 1;
  const int64_t a = std::atoll(argv[4]), rows = std::atoll(argv[5]);
  if (mode == "int4") return DecodeInt4(argv[2], argv[3], a, rows);
  const int64_t hd = a, width = baseq::PackedRowWidth(hd);
  const std::vector<uint8_t> in = ReadAll(argv[2]);
  if (mode == "kv_unpack") {
    if (static_cast<int64_t>(in.size()) != rows * width) return 2;
    std::vector<float> out(rows * hd);
    for (int64_t r = 0; r < rows; ++r) baseq::UnpackKvRow(in.data() + r * width, hd, out.data() + r * hd);
    WriteAll(argv[3], out.data(), out.size() * sizeof(float));
    return 0;
  }
  if (mode == "kv_pack" && argc >= 7) {
    if (static_cast<int64_t>(in.size()) != rows * hd * static_cast<int64_t>(sizeof(float))) return 2;
    std::vector<float> x(rows * hd);
    std::memcpy(x.data(), in.data(), in.size());
    const float clip = std::strtof(argv[6], nullptr);
    std::vector<uint8_t> out(rows * width);
    for (int64_t r = 0; r < rows; ++r) baseq::PackKvRow(x.data() + r * hd, hd, clip, out.data() + r * width);
    WriteAll(argv[3], out.data(), out.size());
    return 0;
  }
  return 1;
}
