// Checks that every float64 loop set of baseq.Attention this CPU runs (attention_rows.h compiled
// for the baseline, AVX2+FMA, AVX-512) gives the plain formula's bits (8 lanes of fused
// multiply-adds, the lane tree; keys in order) on random data with ragged head sizes and key
// ranges, and that the softmax, with its own exp, is within 2e-14 relative of exp(x - max) / sum (summed in another order) and equal
// across sets. Exit status 0 = pass.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "attention_kernels.h"

using namespace baseq::attn;

int main() {
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal(0.0, 1.0);
  Kernels sets[4];
  const int n = AvailableKernels(sets, 4);
  int failures = 0;
  for (int64_t hd : {64, 128, 30, 7, 1}) {
    const int64_t S = 37;
    std::vector<double> q(hd), p(S);
    std::vector<float> k(S * hd), v(S * hd);
    std::vector<uint8_t> visible(S);
    for (auto& x : q) x = static_cast<double>(static_cast<float>(normal(rng)));
    for (auto& x : k) x = static_cast<float>(normal(rng));
    for (auto& x : v) x = static_cast<float>(normal(rng));
    for (auto& x : p) x = std::fabs(normal(rng)) / S;
    for (auto& x : visible) x = rng() % 4 != 0;
    std::vector<double> ref_s(S, -1.0), ref_a(hd);
    // The plain formula: lane l sums q[d] k[d] for d = l (mod 8) by fma, then ((l0+l4)+(l2+l6))+((l1+l5)+(l3+l7)).
    for (int64_t j = 3; j < S - 2; ++j) {
      if (!visible[j]) continue;
      double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t d = 0; d < hd; ++d) l[d % 8] = std::fma(q[d], static_cast<double>(k[j * hd + d]), l[d % 8]);
      const double r = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
      ref_s[j] = r * 0.125 + 0.5;
    }
    for (int64_t i = 0; i < hd; ++i) {
      double a = 0.0;
      for (int64_t j = 3; j < S - 2; ++j)
        if (visible[j]) a = std::fma(p[j], static_cast<double>(v[j * hd + i]), a);
      ref_a[i] = a;
    }
    for (int s = 0; s < n; ++s) {
      std::vector<double> got_s(S, -1.0), got_a(hd, NAN);
      sets[s].scores(q.data(), 1, k.data(), hd, 3, S - 2, visible.data(), 0.125, 0.5, got_s.data(), S);
      sets[s].weighted(p.data(), 1, v.data(), hd, 3, S - 2, visible.data(), got_a.data(), S);
      // Several heads sharing the keys: head g's results must equal those of the same query alone.
      for (int64_t heads : {2, 3, 5}) {
        std::vector<double> qh(heads * hd), ph(heads * S), sh(heads * S, -1.0), ah(heads * hd, NAN);
        for (int64_t g = 0; g < heads; ++g) {
          for (int64_t i = 0; i < hd; ++i) qh[g * hd + i] = g == heads - 1 ? q[i] : q[i] * (g + 2);
          for (int64_t j = 0; j < S; ++j) ph[g * S + j] = g == heads - 1 ? p[j] : p[j] / (g + 2);
        }
        sets[s].scores(qh.data(), heads, k.data(), hd, 3, S - 2, visible.data(), 0.125, 0.5, sh.data(), S);
        sets[s].weighted(ph.data(), heads, v.data(), hd, 3, S - 2, visible.data(), ah.data(), S);
        const int64_t g = heads - 1;
        if (std::memcmp(sh.data() + g * S, ref_s.data(), S * sizeof(double)) != 0 ||
            std::memcmp(ah.data() + g * hd, ref_a.data(), hd * sizeof(double)) != 0) {
          std::printf("FAIL %-7s head_dim %lld, %lld heads\n", sets[s].name, static_cast<long long>(hd),
                      static_cast<long long>(heads));
          ++failures;
        }
      }
      const bool ok = std::memcmp(got_s.data(), ref_s.data(), S * sizeof(double)) == 0 &&
                      std::memcmp(got_a.data(), ref_a.data(), hd * sizeof(double)) == 0;
      if (!ok) {
        std::printf("FAIL %-7s head_dim %lld\n", sets[s].name, static_cast<long long>(hd));
        ++failures;
      }
    }
  }
  // The prefill tiles: BlockScores over transposed 8-key blocks equals one fma chain over d per score (any
  // number of query vectors, ragged head sizes, a last partial block), and WeightedAdd continues Weighted's
  // sums exactly: Weighted over [3, 20) then WeightedAdd over [20, 35) equals Weighted over [3, 35).
  for (int64_t hd : {64, 30, 7}) {
    const int64_t S = 37, blocks = (S + 7) / 8, stride = blocks * 8;
    for (int64_t nq : {1, 5, 12, 13, 48}) {
      std::vector<double> q(nq * hd), p(nq * S), want(nq * stride, -1.0);
      std::vector<float> kt(blocks * hd * 8, 0.0f), k(S * hd), v(S * hd);
      for (auto& x : q) x = static_cast<double>(static_cast<float>(normal(rng)));
      for (auto& x : k) x = static_cast<float>(normal(rng));
      for (auto& x : v) x = static_cast<float>(normal(rng));
      for (auto& x : p) x = std::fabs(normal(rng));
      for (int64_t j = 0; j < S; ++j)
        for (int64_t d = 0; d < hd; ++d) kt[(j / 8) * hd * 8 + d * 8 + j % 8] = k[j * hd + d];
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t j = 0; j < S; ++j) {
          double a = 0.0;
          for (int64_t d = 0; d < hd; ++d) a = std::fma(q[i * hd + d], static_cast<double>(k[j * hd + d]), a);
          want[i * stride + j] = a * 0.125;
        }
      for (int s = 0; s < n; ++s) {
        std::vector<double> got(nq * stride, -1.0), whole(nq * hd), split(nq * hd);
        sets[s].block_scores(q.data(), nq, kt.data(), hd, 0, blocks, 0.125, got.data(), stride);
        bool ok = true;
        for (int64_t i = 0; i < nq; ++i) ok = ok && std::memcmp(&got[i * stride], &want[i * stride], S * sizeof(double)) == 0;
        sets[s].weighted(p.data(), nq, v.data(), hd, 3, 35, nullptr, whole.data(), S);
        sets[s].weighted(p.data(), nq, v.data(), hd, 3, 20, nullptr, split.data(), S);
        sets[s].weighted_add(p.data(), nq, v.data(), hd, 20, 35, nullptr, split.data(), S);
        ok = ok && std::memcmp(whole.data(), split.data(), whole.size() * sizeof(double)) == 0;
        if (!ok) {
          std::printf("FAIL %-7s prefill tiles, head_dim %lld, %lld queries\n", sets[s].name, static_cast<long long>(hd),
                      static_cast<long long>(nq));
          ++failures;
        }
      }
    }
  }
  // Softmax: rows of ragged lengths with masked entries, NaN-free; every set equals the portable one
  // bit for bit and exp(x - max) / sum within 2e-14 relative (the masked entries exactly 0).
  for (int64_t len : {1, 7, 8, 9, 37, 1000}) {
    std::vector<double> x(len);
    for (auto& e : x) e = normal(rng) * 8.0 - (rng() % 5 == 0 ? 1e9 : 0.0);
    x[0] = normal(rng);  // at least one unmasked entry
    double mx = -INFINITY, sum = 0.0;
    for (double e : x) mx = e > mx ? e : mx;
    for (double e : x) sum += e < -1e8 ? 0.0 : std::exp(e - mx);
    std::vector<double> first(len);
    for (int s = 0; s < n; ++s) {
      std::vector<double> got(len), e(len);
      sets[s].softmax(x.data(), got.data(), len);
      if (s == 0) first = got;
      bool ok = std::memcmp(got.data(), first.data(), len * sizeof(double)) == 0;
      const double total = sets[s].exp_sum(x.data(), e.data(), len);  // softmax = the numerators / their sum
      for (int64_t i = 0; i < len; ++i) ok = ok && e[i] / total == got[i];
      for (int64_t i = 0; i < len; ++i) {
        const double want = x[i] < -1e8 ? 0.0 : std::exp(x[i] - mx) / sum;
        ok = ok && (x[i] < -1e8 ? got[i] == 0.0 : std::fabs(got[i] - want) <= 2e-14 * want);
      }
      if (!ok) {
        std::printf("FAIL %-7s softmax of %lld\n", sets[s].name, static_cast<long long>(len));
        ++failures;
      }
    }
  }
  // NaN anywhere makes the maximum NaN: every numerator not masked is NaN, masked ones 0, and so every
  // probability NaN (0 / NaN); a row of masked entries only is computed in full.
  for (int64_t len : {3, 8, 19}) {
    for (int64_t at : {int64_t{0}, len / 2, len - 1}) {
      std::vector<double> x(len), got(len);
      for (int64_t i = 0; i < len; ++i) x[i] = i % 3 == 1 ? -1e9 : normal(rng);
      x[at] = NAN;
      for (int s = 0; s < n; ++s) {
        std::vector<double> e(len);
        sets[s].softmax(x.data(), got.data(), len);
        const double total = sets[s].exp_sum(x.data(), e.data(), len);
        bool ok = std::isnan(total);
        for (int64_t i = 0; i < len; ++i) ok = ok && std::isnan(got[i]) && (x[i] < -1e8 ? e[i] == 0.0 : std::isnan(e[i]));
        if (!ok) {
          std::printf("FAIL %-7s softmax of %lld with NaN at %lld\n", sets[s].name, static_cast<long long>(len),
                      static_cast<long long>(at));
          ++failures;
        }
      }
    }
  }
  {
    std::vector<double> x = {-1e9, -2e9, -1e9 - 3.0}, got(3);
    for (int s = 0; s < n; ++s) {
      sets[s].softmax(x.data(), got.data(), 3);
      const double tail = std::exp(-3.0) / (1.0 + std::exp(-3.0));
      if (!(std::fabs(got[0] - (1.0 - tail)) < 1e-15 && got[1] == 0.0 && std::fabs(got[2] - tail) < 1e-15)) {
        std::printf("FAIL %-7s softmax of a fully masked row\n", sets[s].name);
        ++failures;
      }
    }
  }
  // SwiGLU rows (ragged lengths; large, infinite and NaN gates): every set equals the portable one bit for bit
  // and float(g / (1 + exp(-g)) * u) with the C library's exp (the same float32 for these inputs).
  for (int64_t len : {1, 7, 8, 9, 37, 1000}) {
    std::vector<float> g(len), u(len), first(len);
    for (int64_t i = 0; i < len; ++i) g[i] = static_cast<float>(normal(rng) * 6.0), u[i] = static_cast<float>(normal(rng));
    const float specials[] = {800.0f, -800.0f, 709.5f, -709.5f, INFINITY, -INFINITY, NAN, 0.0f, -0.0f, -30.0f};
    for (int64_t i = 0; i < len && i < 10; ++i) g[(i * 7) % len] = specials[i];
    for (int s = 0; s < n; ++s) {
      std::vector<float> got(len);
      sets[s].swiglu(g.data(), u.data(), got.data(), len);
      if (s == 0) first = got;
      bool ok = std::memcmp(got.data(), first.data(), len * sizeof(float)) == 0;
      for (int64_t i = 0; i < len; ++i) {
        const double gv = g[i];
        const float want = static_cast<float>(gv / (1.0 + std::exp(-gv)) * static_cast<double>(u[i]));
        ok = ok && (std::isnan(want) ? std::isnan(got[i]) : std::memcmp(&want, &got[i], sizeof(float)) == 0);
      }
      if (!ok) {
        std::printf("FAIL %-7s swiglu of %lld\n", sets[s].name, static_cast<long long>(len));
        ++failures;
      }
    }
  }
  // Butterfly: every set equals the plain pairing loop bit for bit (exact adds and subtracts in one order).
  for (int64_t p : {1, 2, 4, 8, 16, 64, 512}) {
    std::vector<double> x(p), want(p);
    for (auto& e : x) e = normal(rng);
    want = x;
    for (int64_t h = 1; h < p; h *= 2)
      for (int64_t base = 0; base < p; base += 2 * h)
        for (int64_t t = 0; t < h; ++t) {
          const double a = want[base + t], b = want[base + h + t];
          want[base + t] = a + b, want[base + h + t] = a - b;
        }
    for (int s = 0; s < n; ++s) {
      std::vector<double> got = x;
      sets[s].butterfly(got.data(), p);
      if (std::memcmp(got.data(), want.data(), p * sizeof(double)) != 0) {
        std::printf("FAIL %-7s butterfly of %lld\n", sets[s].name, static_cast<long long>(p));
        ++failures;
      }
    }
  }
  // The dense factor of baseq.Hadamard: every set equals the plain loop (products and sums rounded, k in order).
  for (int64_t m : {1, 3, 12, 20}) {
    for (int64_t p : {1, 4, 8, 128}) {
      std::vector<double> sm(m * m), work(m * p), want(m * p);
      for (auto& e : sm) e = normal(rng);
      for (auto& e : work) e = normal(rng);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < p; ++j) {
          double acc = 0.0;
          for (int64_t k = 0; k < m; ++k) {
            const double prod = sm[k * m + i] * work[k * p + j];
            acc = acc + prod;
          }
          want[i * p + j] = acc;
        }
      for (int s = 0; s < n; ++s) {
        std::vector<double> got(m * p, NAN);
        sets[s].mix_factor(sm.data(), m, work.data(), p, got.data());
        if (std::memcmp(got.data(), want.data(), got.size() * sizeof(double)) != 0) {
          std::printf("FAIL %-7s dense factor m %lld, p %lld\n", sets[s].name, static_cast<long long>(m),
                      static_cast<long long>(p));
          ++failures;
        }
      }
    }
  }
  for (int s = 0; s < n; ++s) std::printf("%s %s\n", failures ? "FAIL" : "ok  ", sets[s].name);
  return failures ? 1 : 0;
}
