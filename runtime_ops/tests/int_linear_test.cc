// Checks every baseq.IntLinear kernel this build has and this CPU runs against the portable
// scalar kernel, bit for bit, on random data (ragged shapes, groups, 4- and 8-bit activation
// codes, far-off zero points), and the scalar kernel against a direct int64 computation of the
// definition (int_linear.h). Kernels the CPU lacks are skipped and named. Exit status 0 = pass.
//   build/int_linear_test [--seed S]
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "int_linear_pack.h"

using namespace baseq::intlin;

namespace {

struct Case {
  int64_t rows, k, n, group_size;  // group_size 0 = one group
  int bits;
};

struct Data {
  std::vector<uint8_t> codes, packed_b, zeros;  // codes [n][k]
  std::vector<float> scales, bias;
  std::vector<uint8_t> q;        // [rows][k]
  std::vector<float> zx, sx;     // per row
  PackedWeights w;
  std::vector<uint8_t> qrows;    // packed rows
  std::vector<int32_t> qsum;
  int64_t groups = 1, group_size = 0;
};

Data MakeData(const Case& c, std::mt19937_64& rng) {
  Data d;
  d.group_size = (c.group_size <= 0 || c.group_size > c.k) ? c.k : c.group_size;
  d.groups = c.k == 0 ? 1 : (c.k + d.group_size - 1) / d.group_size;
  std::uniform_int_distribution<int> code(0, 15), qcode(0, (1 << c.bits) - 1), zero(-300, 300);
  std::uniform_real_distribution<float> unit(0.001f, 2.0f);
  d.codes.resize(c.n * c.k);
  for (auto& v : d.codes) v = static_cast<uint8_t>(code(rng));
  const int64_t row_bytes = (c.k + 1) / 2;
  d.packed_b.assign(c.n * row_bytes, 0);
  for (int64_t i = 0; i < c.n; ++i)
    for (int64_t j = 0; j < c.k; ++j) d.packed_b[i * row_bytes + j / 2] |= d.codes[i * c.k + j] << (4 * (j % 2));
  d.zeros.resize(c.n * d.groups);
  for (auto& v : d.zeros) v = static_cast<uint8_t>(code(rng));
  d.scales.resize(c.n * d.groups);
  for (auto& v : d.scales) v = unit(rng);
  d.bias.resize(c.n);
  for (auto& v : d.bias) v = unit(rng) - 1.0f;
  d.q.resize(c.rows * c.k);
  for (auto& v : d.q) v = static_cast<uint8_t>(qcode(rng));
  d.zx.resize(c.rows);
  d.sx.resize(c.rows);
  for (int64_t r = 0; r < c.rows; ++r) {
    d.zx[r] = static_cast<float>(r % 5 == 4 ? zero(rng) * 50000 : zero(rng));  // some far-off zero points
    d.sx[r] = unit(rng) * 1e-2f;
  }
  std::string err = PackWeights(d.packed_b.data(), d.zeros.data(), d.scales.data(), c.n, c.k, c.group_size, d.groups, &d.w);
  if (!err.empty()) {
    std::fprintf(stderr, "PackWeights: %s\n", err.c_str());
    std::exit(2);
  }
  const int64_t stride = d.groups * d.w.view.chunks_per_group * kChunk;
  d.qrows.assign(c.rows * stride, 0xAB);  // PackRow must overwrite the padding with zeros
  d.qsum.assign(c.rows * d.groups, 0);
  for (int64_t r = 0; r < c.rows; ++r)
    PackRow(d.w.view, d.q.data() + r * c.k, d.qrows.data() + r * stride, d.qsum.data() + r * d.groups);
  return d;
}

Rows RowsOf(const Data& d) {
  return Rows{d.qrows.data(), d.groups * d.w.view.chunks_per_group * kChunk, d.qsum.data(), d.zx.data(), d.sx.data()};
}

// The definition, from the unpacked codes: P_g in int64, then int_linear.h's float64 formulas.
std::vector<float> Reference(const Case& c, const Data& d, bool with_bias) {
  std::vector<float> y(c.rows * c.n);
  for (int64_t r = 0; r < c.rows; ++r) {
    const int64_t zx = static_cast<int64_t>(d.zx[r]);
    for (int64_t n = 0; n < c.n; ++n) {
      double total = 0.0, only = 0.0;
      for (int64_t g = 0; g < d.groups; ++g) {
        int64_t p = 0;
        const int64_t zw = d.zeros[n * d.groups + g];
        for (int64_t k = g * d.group_size; k < std::min(c.k, (g + 1) * d.group_size); ++k)
          p += (static_cast<int64_t>(d.q[r * c.k + k]) - zx) * (static_cast<int64_t>(d.codes[n * c.k + k]) - zw);
        only = static_cast<double>(p);
        total += static_cast<double>(p) * static_cast<double>(d.scales[n * d.groups + g]);
      }
      const double s = d.sx[r];
      float v = d.groups == 1 ? static_cast<float>((only * s) * static_cast<double>(d.scales[n])) : static_cast<float>(total * s);
      y[r * c.n + n] = with_bias ? v + d.bias[n] : v;
    }
  }
  return y;
}

int64_t Mismatches(const std::vector<float>& a, const std::vector<float>& b) {
  int64_t bad = 0;
  for (size_t i = 0; i < a.size(); ++i) bad += std::memcmp(&a[i], &b[i], sizeof(float)) != 0;
  return bad;
}

// The activation codes of every kernel against libm's nearbyint on awkward values: exact ties
// (k + 0.5) * scale, NaN, +-Inf, huge and tiny values, zero points far off.
int64_t CheckCodes(Isa isa, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> wide(-50.0f, 50.0f);
  std::vector<float> v(1003);
  int64_t bad = 0;
  for (int trial = 0; trial < 20; ++trial) {
    const float scale = trial % 4 == 3 ? 1e-8f : 0.01f + 0.1f * trial;
    const float zero = static_cast<float>(trial * 37 % 300) - 100.0f;
    const float qmax = trial % 2 ? 255.0f : 15.0f;
    for (size_t i = 0; i < v.size(); ++i) {
      switch (i % 7) {
        case 0: v[i] = (std::floor(wide(rng)) + 0.5f) * scale; break;  // ties
        case 1: v[i] = i % 3 ? NAN : (i % 2 ? INFINITY : -INFINITY); break;
        case 2: v[i] = wide(rng) * 1e30f; break;
        default: v[i] = wide(rng) * scale * 3.0f;
      }
    }
    std::vector<uint8_t> got(v.size(), 0xEE);
    CodesKernel(isa)(v.data(), static_cast<int64_t>(v.size()), scale, zero, qmax, got.data());
    for (size_t i = 0; i < v.size(); ++i) {
      float q = std::nearbyint(v[i] / scale) + zero;
      q = q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
      const uint8_t want = std::isnan(q) ? 0 : static_cast<uint8_t>(q);
      bad += got[i] != want;
    }
  }
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t seed = 1;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--seed") == 0) seed = std::strtoull(argv[i + 1], nullptr, 10);
  std::mt19937_64 rng(seed);
  const Case cases[] = {
      {1, 576, 576, 0, 4},   {3, 100, 33, 0, 8},   {13, 96, 17, 32, 4},  {9, 77, 40, 20, 4},   {70, 1536, 50, 128, 8},
      {1, 1, 1, 0, 4},       {5, 8, 16, 0, 8},     {17, 200, 31, 64, 4}, {2, 1536, 1536, 0, 4}, {130, 64, 48, 16, 8},
      {4, 0, 5, 0, 4},       {0, 64, 16, 0, 4},
  };
  int failures = 0;
  for (Isa isa : kAllIsas) {
    if (!IsaCompiled(isa)) continue;
    if (!IsaAvailable(isa)) {
      std::printf("skip %-10s  this CPU lacks it\n", IsaName(isa));
      continue;
    }
    int64_t checked = 0, bad = 0;
    for (const Case& c : cases) {
      for (int with_bias = 0; with_bias < 2; ++with_bias) {
        Data d = MakeData(c, rng);
        const Rows x = RowsOf(d);
        std::vector<float> got(c.rows * c.n, NAN), want = Reference(c, d, with_bias);
        const Out o{got.data(), with_bias ? d.bias.data() : nullptr};
        // In uneven pieces, as the op's tasks call it: rows and column blocks split at odd points.
        const int64_t rsplit = c.rows / 3, bsplit = (d.w.view.blocks + 1) / 2;
        TileFn tiles = TileKernel(isa);
        tiles(d.w.view, x, o, 0, rsplit, 0, bsplit);
        tiles(d.w.view, x, o, rsplit, c.rows, 0, bsplit);
        tiles(d.w.view, x, o, 0, c.rows, bsplit, d.w.view.blocks);
        const int64_t m = Mismatches(got, want);
        if (m) {
          std::printf("FAIL %-10s rows=%" PRId64 " k=%" PRId64 " n=%" PRId64 " group=%" PRId64 " bits=%d bias=%d: %" PRId64
                      " of %zu outputs differ\n", IsaName(isa), c.rows, c.k, c.n, c.group_size, c.bits, with_bias, m, got.size());
        }
        bad += m;
        checked += static_cast<int64_t>(got.size());
        // The float64 definition (SlowRow) agrees with the integer path wherever both apply.
        std::vector<float> slow(c.rows * c.n, NAN);
        const Out so{slow.data(), o.bias};
        for (int64_t r = 0; r < c.rows; ++r) SlowRow(d.w.view, x, so, r);
        const int64_t ms = Mismatches(slow, want);
        if (ms) std::printf("FAIL SlowRow k=%" PRId64 " n=%" PRId64 ": %" PRId64 " outputs differ\n", c.k, c.n, ms);
        bad += ms;
      }
    }
    const int64_t bad_codes = CheckCodes(isa, rng);
    if (bad_codes) std::printf("FAIL %-10s activation codes: %" PRId64 " differ from nearbyint\n", IsaName(isa), bad_codes);
    bad += bad_codes;
    std::printf("%s %-10s  %" PRId64 " outputs checked against the definition\n", bad ? "FAIL" : "ok  ", IsaName(isa), checked);
    failures += bad != 0;
  }
  std::printf("best kernel here: %s\n", IsaName(BestIsa()));
  return failures ? 1 : 0;
}
