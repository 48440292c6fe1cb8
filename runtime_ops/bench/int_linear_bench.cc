// Single-thread timing of each baseq.IntLinear kernel this CPU runs (the tile kernels alone: no
// quantizer, no onnxruntime), medians of repeats, in microseconds and GMAC/s.
//   build/int_linear_bench [MxKxN ...]     default: 1x576x576 1x576x1536 1x1536x576 512x576x576 512x576x1536
// On a shared machine the figures are indicative only.
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "int_linear_pack.h"

using namespace baseq::intlin;

int main(int argc, char** argv) {
  std::vector<std::string> shapes(argv + 1, argv + argc);
  if (shapes.empty()) shapes = {"1x576x576", "1x576x1536", "1x1536x576", "512x576x576", "512x576x1536"};
  std::mt19937_64 rng(0);
  for (const std::string& s : shapes) {
    int64_t m = 0, k = 0, n = 0;
    if (std::sscanf(s.c_str(), "%" SCNd64 "x%" SCNd64 "x%" SCNd64, &m, &k, &n) != 3) {
      std::fprintf(stderr, "bad shape %s (want MxKxN)\n", s.c_str());
      return 2;
    }
    std::vector<uint8_t> b((k + 1) / 2 * n), zeros(n), q(m * k);
    std::vector<float> scales(n, 0.01f), zx(m, 3.0f), sx(m, 0.02f), y(m * n);
    for (auto& v : b) v = static_cast<uint8_t>(rng());
    for (auto& v : zeros) v = static_cast<uint8_t>(rng() % 16);
    for (auto& v : q) v = static_cast<uint8_t>(rng() % 16);
    PackedWeights w;
    PackWeights(b.data(), zeros.data(), scales.data(), n, k, 0, 1, &w);
    const int64_t stride = w.view.chunks_per_group * kChunk;
    std::vector<uint8_t> rows(m * stride);
    std::vector<int32_t> qsum(m);
    for (int64_t r = 0; r < m; ++r) PackRow(w.view, q.data() + r * k, rows.data() + r * stride, qsum.data() + r);
    const Rows x{rows.data(), stride, qsum.data(), zx.data(), sx.data()};
    const Out o{y.data(), nullptr};
    for (Isa isa : kAllIsas) {
      TileFn tiles = TileKernel(isa);
      if (!tiles) continue;
      const int reps = static_cast<int>(std::clamp<int64_t>(int64_t{2000000000} / std::max<int64_t>(1, m * k * n), 3, 2000));
      std::vector<double> us;
      for (int i = 0; i < reps + 2; ++i) {
        auto t0 = std::chrono::steady_clock::now();
        for (int64_t b0 = 0; b0 < w.view.blocks; ++b0)  // one block x 64 rows: a prefill task of the op
          for (int64_t r = 0; r < m; r += 64) tiles(w.view, x, o, r, std::min<int64_t>(m, r + 64), b0, b0 + 1);
        auto t1 = std::chrono::steady_clock::now();
        if (i >= 2) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      }
      std::nth_element(us.begin(), us.begin() + us.size() / 2, us.end());
      const double med = us[us.size() / 2];
      std::printf("M=%4" PRId64 " K=%5" PRId64 " N=%5" PRId64 "  %-10s %10.1f us  %7.1f GMAC/s\n", m, k, n, IsaName(isa), med,
                  static_cast<double>(m * k * n) / med * 1e-3);
    }
  }
  return 0;
}
