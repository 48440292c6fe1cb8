// baseq-export's onnxruntime custom ops (domain "baseq"), built by baseq_export/runtime_ops/__init__.py.
//
//   Hadamard(X[..., n], S[m, m]?) -> Y            attributes blocks (default 1), size (n; 0 = any)
//       Y = X @ H along the last axis, H = block_diag(blocks x kron(S, Sylvester(p) / sqrt(p))),
//       n = blocks * m * p, p a power of two; S is float64. Computed in float64 and rounded once to
//       float32, in the order of baseq_export.hadamard.apply_hadamard on float64 (scale,
//       butterflies, then S^T times the [m, p] block): the reference's exact mode.
//   QuantDequant(X[..., n], clip, shift[n]?, gain[n]?) -> Y     attribute bits (1..8)
//       per-row asymmetric fake quant of x' = x * gain - shift, exactly the float32 recipe of
//       baseq_export.quant.fake_quant_per_token (shift is not added back: the next linear's bias
//       holds it). clip holds one value, or one per head (axis 1) for a rank-4 KV tensor.
//   QuantLevels(X[..., n], clip, shift[n]?, gain[n]?) -> L[..., n], S[..., 1]   attribute bits
//       the same quantizer with its integer levels L = q - zero (as float32) and scale S kept
//       apart (baseq_export.quant.quantize_per_token), for an integer matmul: L * S = QuantDequant.
//   ScaleSums(Y[..., n], S[..., 1], C[n], B[n]?) -> float(Y * S * C in float64) + B
//       the end of an integer linear (models.base.linear on an IntActivation): integer sums Y times
//       the activation's and the weight's scales in float64, rounded once, then the bias in float32.
//   RmsNorm(X[..., n], eps (float64 scalar), W[n]?) -> float(X / sqrt(mean(X^2) + eps) in float64) * W
//   SwiGLU(G, U) -> float(silu(G) * U in float64)
//   MaskedSoftmax(X[..., s] float64) -> float64 softmax over the last axis; entries below -1e8 (the
//       exporter's additive mask is -1e9) are taken as exactly 0 without computing exp, as exp(-1e9)
//       is; a row with no other entry is computed in full, as the standard-op graph does.
//   All four round where the reference's exact mode (models.base.forward) rounds.
//   KVQuantPack(X[B, H, T, hd], clip) -> uint8 [B, H, T, hd/2 + 8]   attribute bits (4)
//       the 4-bit KV quantizer, stored packed: hd/2 bytes of codes, then float32 scale and zero.
//   KVUnpack(P[B, H, S, hd/2 + 8]) -> float [B, H, S, hd]             attribute head_dim
//       (code - zero) * scale: bit for bit the values QuantDequant gives.
//
// Bad shapes or attributes return an onnxruntime error; nothing here aborts the process.
// Build flags keep float semantics exact: -ffp-contract=off, no -ffast-math.

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

using Ort::Custom::Tensor;

constexpr float kScaleFloor = 1e-8f;     // quant.ACT_SCALE_EPS
constexpr int64_t kParallelGrain = 1 << 15;  // elements per parallel task

Ort::Status Error(const std::string& msg) { return Ort::Status(msg.c_str(), ORT_INVALID_ARGUMENT); }

std::string ShapeStr(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Runs body(first_row, end_row) over `rows` rows of `width` elements, on onnxruntime's intra-op
// threads when the work is large enough to pay for it.
template <typename Body>
void ForRows(OrtKernelContext* ctx, int64_t rows, int64_t width, Body body) {
  int64_t per_task = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, width));
  int64_t tasks = (rows + per_task - 1) / per_task;
  if (tasks <= 1) {
    body(0, rows);
    return;
  }
  struct Job {
    Body* body;
    int64_t rows, per_task;
  } job{&body, rows, per_task};
  auto run = [](void* data, size_t t) {
    auto* j = static_cast<Job*>(data);
    int64_t first = static_cast<int64_t>(t) * j->per_task;
    (*j->body)(first, std::min(j->rows, first + j->per_task));
  };
  Ort::KernelContext(ctx).ParallelFor(run, static_cast<size_t>(tasks), 0, &job);
}

// ------------------------------------------------------------------------------------ Hadamard

// In-place unnormalised Sylvester transform of p = 2^k values: log2(p) add/sub passes, pairing
// index j with j + h inside chunks of 2h (the pairing of hadamard._butterfly).
void Butterfly(double* y, int64_t p) {
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

// An optional int attribute, or `fallback` when the node does not set it.
int64_t IntAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t fallback) {
  int64_t value = fallback;
  OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &value);
  if (st != nullptr) {
    api->ReleaseStatus(st);
    return fallback;
  }
  return value;
}

struct Hadamard {
  int64_t blocks = 1;
  int64_t size = 0;  // expected last dimension; 0 = any

  Hadamard(const OrtApi* api, const OrtKernelInfo* info)
      : blocks(IntAttribute(api, info, "blocks", 1)), size(IntAttribute(api, info, "size", 0)) {
    if (blocks < 1) ORT_CXX_API_THROW("baseq.Hadamard: attribute blocks must be >= 1", ORT_INVALID_ARGUMENT);
    if (size < 0) ORT_CXX_API_THROW("baseq.Hadamard: attribute size must be >= 0", ORT_INVALID_ARGUMENT);
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& x, std::optional<const Tensor<double>*> small,
                      Tensor<float>& y) {
    const auto& shape = x.Shape();
    if (shape.empty()) return Error("baseq.Hadamard: input X must have rank >= 1, got a scalar");
    int64_t n = shape.back();
    if (size && n != size)
      return Error("baseq.Hadamard: X " + ShapeStr(shape) + " has last dimension " + std::to_string(n) +
                   ", the node transforms size " + std::to_string(size));
    int64_t m = 1;
    const double* s = nullptr;
    if (small.has_value() && *small != nullptr) {
      const auto& ss = (*small)->Shape();
      if (ss.size() != 2 || ss[0] != ss[1] || ss[0] < 1)
        return Error("baseq.Hadamard: input S must be a square [m, m] matrix, got " + ShapeStr(ss));
      m = ss[0];
      s = (*small)->Data();
    }
    if (n % (blocks * m) != 0)
      return Error("baseq.Hadamard: last dimension " + std::to_string(n) + " of X " + ShapeStr(shape) +
                   " is not blocks (" + std::to_string(blocks) + ") x m (" + std::to_string(m) + ") x a power of two");
    int64_t p = n / (blocks * m);
    if ((p & (p - 1)) != 0)
      return Error("baseq.Hadamard: last dimension " + std::to_string(n) + " / (blocks x m) = " + std::to_string(p) +
                   " is not a power of two");
    float* out = y.Allocate(shape);
    int64_t total = x.NumberOfElement();
    if (total == 0) return Ort::Status{nullptr};
    const float* in = x.Data();
    const double norm = 1.0 / std::sqrt(static_cast<double>(p));
    int64_t rows = total / n;
    ForRows(ctx, rows, n, [&](int64_t first, int64_t end) {
      std::vector<double> work(m * p), mixed(s ? m * p : 0);
      for (int64_t r = first; r < end; ++r) {
        for (int64_t b = 0; b < blocks; ++b) {
          const float* src = in + r * n + b * m * p;
          float* dst = out + r * n + b * m * p;
          for (int64_t i = 0; i < m * p; ++i) work[i] = static_cast<double>(src[i]) * norm;
          for (int64_t i = 0; i < m; ++i) Butterfly(work.data() + i * p, p);
          const double* res = work.data();
          if (s) {  // mixed[i, :] = sum_k S[k, i] * work[k, :]
            for (int64_t i = 0; i < m; ++i) {
              double* d = mixed.data() + i * p;
              for (int64_t j = 0; j < p; ++j) d[j] = 0.0;
              for (int64_t k = 0; k < m; ++k) {
                const double c = s[k * m + i];
                const double* w = work.data() + k * p;
                for (int64_t j = 0; j < p; ++j) d[j] += c * w[j];
              }
            }
            res = mixed.data();
          }
          for (int64_t i = 0; i < m * p; ++i) dst[i] = static_cast<float>(res[i]);
        }
      }
    });
    return Ort::Status{nullptr};
  }
};

// -------------------------------------------------------------------------------- QuantDequant

// Per-row scale and zero point of quant.fake_quant_per_token, in its float32 operation order.
struct RowQParams {
  float scale, zero;
};

RowQParams RowQParamsOf(const float* v, int64_t n, float clip, float qmax) {
  float lo_v = INFINITY, hi_v = -INFINITY;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    nan |= std::isnan(v[i]);
    lo_v = v[i] < lo_v ? v[i] : lo_v;
    hi_v = v[i] > hi_v ? v[i] : hi_v;
  }
  if (nan) lo_v = hi_v = NAN;  // torch.amin/amax propagate NaN
  const float rng = hi_v - lo_v;
  float scale = (rng * clip) / qmax;
  scale = scale < kScaleFloor ? kScaleFloor : scale;  // NaN stays NaN, as torch.clamp
  const float lo = (hi_v + lo_v) * 0.5f - (rng * 0.5f) * clip;
  return {scale, std::nearbyint(-lo / scale)};  // nearbyint: half to even in the default rounding mode
}

// clamp(round(v / scale) + zero, 0, qmax); NaN passes through, as torch.clamp.
inline float Code(float v, const RowQParams& p, float qmax) {
  float q = std::nearbyint(v / p.scale) + p.zero;
  return q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
}

// Checks that a per-channel vector (optional) holds n values.
Ort::Status CheckVector(const char* op, const char* what, std::optional<const Tensor<float>*> v, int64_t n,
                        const float** data) {
  *data = nullptr;
  if (!v.has_value() || *v == nullptr) return Ort::Status{nullptr};
  const auto& vs = (*v)->Shape();
  if ((*v)->NumberOfElement() != n || vs.empty() || vs.back() != n)
    return Error(std::string(op) + ": " + what + " must have " + std::to_string(n) +
                 " values (the last dimension of X), got " + ShapeStr(vs));
  *data = (*v)->Data();
  return Ort::Status{nullptr};
}

// The per-row quantizer of QuantDequant and QuantLevels: checks the inputs, then calls
// emit(row, buf, params) with each row's x' = x * gain - shift and its scale and zero point.
class RowQuantizer {
 public:
  RowQuantizer(const OrtApi* api, const OrtKernelInfo* info, const char* op) : op_(op) {
    bits_ = IntAttribute(api, info, "bits", 0);
    if (bits_ < 1 || bits_ > 8)
      ORT_CXX_API_THROW(std::string(op) + ": attribute bits must be in 1..8, got " + std::to_string(bits_),
                        ORT_INVALID_ARGUMENT);
  }

 protected:
  template <typename Emit>
  Ort::Status ForEachRow(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<float>& clip,
                         std::optional<const Tensor<float>*> shift, std::optional<const Tensor<float>*> gain,
                         const std::function<void()>& allocate, Emit emit) const {
    const auto& shape = x.Shape();
    if (shape.empty()) return Error(op_ + ": input X must have rank >= 1, got a scalar");
    const int64_t n = shape.back();
    const int64_t clips = clip.NumberOfElement();
    int64_t heads = 0, per_head_rows = 1;
    if (clips != 1) {
      if (shape.size() != 4 || clips != shape[1])
        return Error(op_ + ": clip must hold 1 value, or one per head (axis 1) of a rank-4 X; got " +
                     std::to_string(clips) + " values for X " + ShapeStr(shape));
      heads = shape[1];
      per_head_rows = shape[2];
    }
    const float* sh = nullptr;
    const float* gn = nullptr;
    if (auto st = CheckVector(op_.c_str(), "shift", shift, n, &sh); !st.IsOK()) return st;
    if (auto st = CheckVector(op_.c_str(), "gain", gain, n, &gn); !st.IsOK()) return st;
    allocate();
    const int64_t total = x.NumberOfElement();
    if (total == 0 || n == 0) return Ort::Status{nullptr};
    const float* in = x.Data();
    const float* cl = clip.Data();
    const float qmax = static_cast<float>((1 << bits_) - 1);
    ForRows(ctx, total / n, n, [&](int64_t first, int64_t end) {
      std::vector<float> buf(n);
      for (int64_t r = first; r < end; ++r) {
        const float* src = in + r * n;
        for (int64_t i = 0; i < n; ++i) {
          float v = src[i];
          if (gn) v = v * gn[i];
          if (sh) v = v - sh[i];
          buf[i] = v;
        }
        const float c = heads ? cl[(r / per_head_rows) % heads] : cl[0];
        emit(r, buf.data(), RowQParamsOf(buf.data(), n, c, qmax), qmax);
      }
    });
    return Ort::Status{nullptr};
  }

 private:
  std::string op_;
  int64_t bits_ = 0;
};

struct QuantDequant : RowQuantizer {
  QuantDequant(const OrtApi* api, const OrtKernelInfo* info) : RowQuantizer(api, info, "baseq.QuantDequant") {}

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<float>& clip,
                      std::optional<const Tensor<float>*> shift, std::optional<const Tensor<float>*> gain,
                      Tensor<float>& y) {
    const auto& shape = x.Shape();
    const int64_t n = shape.empty() ? 0 : shape.back();
    float* out = nullptr;
    return ForEachRow(ctx, x, clip, shift, gain, [&] { out = y.Allocate(shape); },
                      [&](int64_t r, const float* buf, const RowQParams& p, float qmax) {
                        float* dst = out + r * n;
                        for (int64_t i = 0; i < n; ++i) dst[i] = (Code(buf[i], p, qmax) - p.zero) * p.scale;
                      });
  }
};

struct QuantLevels : RowQuantizer {
  QuantLevels(const OrtApi* api, const OrtKernelInfo* info) : RowQuantizer(api, info, "baseq.QuantLevels") {}

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<float>& clip,
                      std::optional<const Tensor<float>*> shift, std::optional<const Tensor<float>*> gain,
                      Tensor<float>& levels, Tensor<float>& scale) {
    const auto& shape = x.Shape();
    const int64_t n = shape.empty() ? 0 : shape.back();
    float* out = nullptr;
    float* sc = nullptr;
    auto allocate = [&] {
      std::vector<int64_t> scale_shape(shape);
      scale_shape.back() = 1;
      out = levels.Allocate(shape);
      sc = scale.Allocate(scale_shape);
      int64_t rows = 1;
      for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
      std::fill(sc, sc + rows, 1.0f);  // rows of width 0 (no values to quantize) keep scale 1
    };
    return ForEachRow(ctx, x, clip, shift, gain, allocate,
                      [&](int64_t r, const float* buf, const RowQParams& p, float qmax) {
                        float* dst = out + r * n;
                        for (int64_t i = 0; i < n; ++i) dst[i] = Code(buf[i], p, qmax) - p.zero;
                        sc[r] = p.scale;
                      });
  }
};

// ------------------------------------------------------------------- float64 steps of exact mode

struct ScaleSums {
  ScaleSums(const OrtApi*, const OrtKernelInfo*) {}

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& y, const Tensor<float>& s, const Tensor<float>& c,
                      std::optional<const Tensor<float>*> bias, Tensor<float>& out) {
    const auto& shape = y.Shape();
    if (shape.empty()) return Error("baseq.ScaleSums: input Y must have rank >= 1, got a scalar");
    const int64_t n = shape.back();
    const int64_t rows = n ? y.NumberOfElement() / n : 0;
    if (c.NumberOfElement() != n)
      return Error("baseq.ScaleSums: C must have " + std::to_string(n) + " values (the last dimension of Y), got " +
                   ShapeStr(c.Shape()));
    if (n && s.NumberOfElement() != rows)
      return Error("baseq.ScaleSums: S must hold one scale per row of Y " + ShapeStr(shape) + ", got " +
                   ShapeStr(s.Shape()));
    const float* b = nullptr;
    if (auto st = CheckVector("baseq.ScaleSums", "B", bias, n, &b); !st.IsOK()) return st;
    float* o = out.Allocate(shape);
    if (rows == 0) return Ort::Status{nullptr};
    const float* yv = y.Data();
    const float* sv = s.Data();
    const float* cv = c.Data();
    ForRows(ctx, rows, n, [&](int64_t first, int64_t end) {
      for (int64_t r = first; r < end; ++r) {
        const double a = static_cast<double>(sv[r]);
        for (int64_t i = 0; i < n; ++i) {
          float v = static_cast<float>((static_cast<double>(yv[r * n + i]) * a) * static_cast<double>(cv[i]));
          o[r * n + i] = b ? v + b[i] : v;
        }
      }
    });
    return Ort::Status{nullptr};
  }
};

struct RmsNorm {
  RmsNorm(const OrtApi*, const OrtKernelInfo*) {}

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<double>& eps,
                      std::optional<const Tensor<float>*> weight, Tensor<float>& out) {
    const auto& shape = x.Shape();
    if (shape.empty()) return Error("baseq.RmsNorm: input X must have rank >= 1, got a scalar");
    if (eps.NumberOfElement() != 1) return Error("baseq.RmsNorm: eps must be one float64 value");
    const int64_t n = shape.back();
    const float* w = nullptr;
    if (auto st = CheckVector("baseq.RmsNorm", "W", weight, n, &w); !st.IsOK()) return st;
    float* o = out.Allocate(shape);
    if (n == 0 || x.NumberOfElement() == 0) return Ort::Status{nullptr};
    const float* in = x.Data();
    const double e = eps.Data()[0];
    ForRows(ctx, x.NumberOfElement() / n, n, [&](int64_t first, int64_t end) {
      for (int64_t r = first; r < end; ++r) {
        const float* src = in + r * n;
        double sum = 0.0;
        for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(src[i]) * static_cast<double>(src[i]);
        const double inv = 1.0 / std::sqrt(sum / static_cast<double>(n) + e);
        for (int64_t i = 0; i < n; ++i) {
          float v = static_cast<float>(static_cast<double>(src[i]) * inv);
          o[r * n + i] = w ? v * w[i] : v;
        }
      }
    });
    return Ort::Status{nullptr};
  }
};

struct SwiGLU {
  SwiGLU(const OrtApi*, const OrtKernelInfo*) {}

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& gate, const Tensor<float>& up, Tensor<float>& out) {
    const auto& shape = gate.Shape();
    if (shape != up.Shape())
      return Error("baseq.SwiGLU: G " + ShapeStr(shape) + " and U " + ShapeStr(up.Shape()) + " must have one shape");
    float* o = out.Allocate(shape);
    const int64_t total = gate.NumberOfElement();
    if (total == 0) return Ort::Status{nullptr};
    const float* g = gate.Data();
    const float* u = up.Data();
    const int64_t width = shape.empty() ? 1 : std::max<int64_t>(1, shape.back());
    ForRows(ctx, total / width, width, [&](int64_t first, int64_t end) {
      for (int64_t i = first * width; i < end * width; ++i) {
        const double gv = static_cast<double>(g[i]);
        o[i] = static_cast<float>(gv / (1.0 + std::exp(-gv)) * static_cast<double>(u[i]));
      }
    });
    return Ort::Status{nullptr};
  }
};

constexpr double kMaskedBelow = -1e8;

struct MaskedSoftmax {
  MaskedSoftmax(const OrtApi*, const OrtKernelInfo*) {}

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<double>& x, Tensor<double>& out) {
    const auto& shape = x.Shape();
    if (shape.empty()) return Error("baseq.MaskedSoftmax: input X must have rank >= 1, got a scalar");
    const int64_t n = shape.back();
    double* o = out.Allocate(shape);
    if (n == 0 || x.NumberOfElement() == 0) return Ort::Status{nullptr};
    const double* in = x.Data();
    ForRows(ctx, x.NumberOfElement() / n, n, [&](int64_t first, int64_t end) {
      for (int64_t r = first; r < end; ++r) {
        const double* src = in + r * n;
        double* dst = o + r * n;
        double mx = -INFINITY;
        bool any = false;
        for (int64_t i = 0; i < n; ++i) {
          any |= src[i] >= kMaskedBelow;
          mx = src[i] > mx || std::isnan(src[i]) ? src[i] : mx;
        }
        double sum = 0.0;
        for (int64_t i = 0; i < n; ++i) {
          dst[i] = (any && src[i] < kMaskedBelow) ? 0.0 : std::exp(src[i] - mx);
          sum += dst[i];
        }
        for (int64_t i = 0; i < n; ++i) dst[i] /= sum;
      }
    });
    return Ort::Status{nullptr};
  }
};

// ------------------------------------------------------------------------- packed 4-bit KV cache

// A cache row (one token of one head) of head_dim values as stored by KVQuantPack:
// head_dim / 2 bytes of 4-bit codes (low nibble = even element), then the float32 scale and
// the float32 zero point (raw bytes). KVUnpack returns (code - zero) * scale: the same floats
// as QuantDequant, so a packed cache changes memory, never results.
constexpr int64_t kRowTail = 2 * sizeof(float);

struct KVQuantPack {
  KVQuantPack(const OrtApi* api, const OrtKernelInfo* info) {
    int64_t bits = IntAttribute(api, info, "bits", 4);
    if (bits != 4) ORT_CXX_API_THROW("baseq.KVQuantPack: only bits = 4 is supported", ORT_INVALID_ARGUMENT);
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<float>& clip, Tensor<uint8_t>& y) {
    const auto& shape = x.Shape();
    if (shape.size() != 4) return Error("baseq.KVQuantPack: X must be [batch, heads, seq, head_dim], got " + ShapeStr(shape));
    const int64_t hd = shape[3], heads = shape[1], seq = shape[2];
    if (hd % 2 != 0 || hd == 0) return Error("baseq.KVQuantPack: head_dim must be even and > 0, got " + std::to_string(hd));
    const int64_t clips = clip.NumberOfElement();
    if (clips != 1 && clips != heads)
      return Error("baseq.KVQuantPack: clip must hold 1 value or one per head (" + std::to_string(heads) + "), got " +
                   std::to_string(clips));
    const int64_t width = hd / 2 + kRowTail;
    uint8_t* out = y.Allocate({shape[0], heads, seq, width});
    const int64_t rows = x.NumberOfElement() / hd;
    if (rows == 0) return Ort::Status{nullptr};
    const float* in = x.Data();
    const float* cl = clip.Data();
    const float qmax = 15.0f;
    ForRows(ctx, rows, hd, [&](int64_t first, int64_t end) {
      for (int64_t r = first; r < end; ++r) {
        const float* src = in + r * hd;
        const float c = clips == 1 ? cl[0] : cl[(r / std::max<int64_t>(seq, 1)) % heads];
        const RowQParams p = RowQParamsOf(src, hd, c, qmax);
        uint8_t* dst = out + r * width;
        for (int64_t i = 0; i < hd; i += 2) {
          float lo = Code(src[i], p, qmax), hi = Code(src[i + 1], p, qmax);
          auto nib = [](float q) { return static_cast<uint8_t>(std::isnan(q) ? 0 : static_cast<int>(q)); };
          dst[i / 2] = static_cast<uint8_t>(nib(lo) | (nib(hi) << 4));  // a NaN row keeps a NaN scale
        }
        std::memcpy(dst + hd / 2, &p.scale, sizeof(float));
        std::memcpy(dst + hd / 2 + sizeof(float), &p.zero, sizeof(float));
      }
    });
    return Ort::Status{nullptr};
  }
};

struct KVUnpack {
  int64_t head_dim = 0;

  KVUnpack(const OrtApi* api, const OrtKernelInfo* info) : head_dim(IntAttribute(api, info, "head_dim", 0)) {
    if (head_dim <= 0 || head_dim % 2 != 0)
      ORT_CXX_API_THROW("baseq.KVUnpack: attribute head_dim (even, > 0) is required", ORT_INVALID_ARGUMENT);
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<uint8_t>& packed, Tensor<float>& y) {
    const auto& shape = packed.Shape();
    const int64_t width = head_dim / 2 + kRowTail;
    if (shape.size() != 4 || shape[3] != width)
      return Error("baseq.KVUnpack: packed cache must be [batch, heads, seq, " + std::to_string(width) +
                   "] for head_dim " + std::to_string(head_dim) + ", got " + ShapeStr(shape));
    float* out = y.Allocate({shape[0], shape[1], shape[2], head_dim});
    const int64_t rows = packed.NumberOfElement() / width;
    if (rows == 0) return Ort::Status{nullptr};
    const uint8_t* in = packed.Data();
    const int64_t hd = head_dim;
    ForRows(ctx, rows, hd, [&](int64_t first, int64_t end) {
      for (int64_t r = first; r < end; ++r) {
        const uint8_t* src = in + r * width;
        float scale, zero;
        std::memcpy(&scale, src + hd / 2, sizeof(float));
        std::memcpy(&zero, src + hd / 2 + sizeof(float), sizeof(float));
        float* dst = out + r * hd;
        for (int64_t i = 0; i < hd; i += 2) {
          dst[i] = (static_cast<float>(src[i / 2] & 15) - zero) * scale;
          dst[i + 1] = (static_cast<float>(src[i / 2] >> 4) - zero) * scale;
        }
      }
    });
    return Ort::Status{nullptr};
  }
};

std::once_flag g_once;
std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> g_ops;
Ort::CustomOpDomain* g_domain = nullptr;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)  // onnxruntime older than the headers we were built with: report it with the oldest API
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "baseq custom ops: this onnxruntime is older than the headers "
                                             "the library was built with; upgrade onnxruntime");
  Ort::InitApi(api);
  try {
    std::call_once(g_once, [] {
      g_domain = new Ort::CustomOpDomain("baseq");  // lives as long as the process: sessions keep pointers to it
      g_ops.emplace_back(Ort::Custom::CreateLiteCustomOp<Hadamard>("Hadamard", "CPUExecutionProvider"));
      g_ops.emplace_back(Ort::Custom::CreateLiteCustomOp<QuantDequant>("QuantDequant", "CPUExecutionProvider"));
      g_ops.emplace_back(Ort::Custom::CreateLiteCustomOp<QuantLevels>("QuantLevels", "CPUExecutionProvider"));
      g_ops.emplace_back(Ort::Custom::CreateLiteCustomOp<ScaleSums>("ScaleSums", "CPUExecutionProvider"));
      g_ops.emplace_back(Ort::Custom::CreateLiteCustomOp<RmsNorm>("RmsNorm", "CPUExecutionProvider"));
      g_ops.emplace_back(Ort::Custom::CreateLiteCustomOp<SwiGLU>("SwiGLU", "CPUExecutionProvider"));
      g_ops.emplace_back(Ort::Custom::CreateLiteCustomOp<MaskedSoftmax>("MaskedSoftmax", "CPUExecutionProvider"));
      g_ops.emplace_back(Ort::Custom::CreateLiteCustomOp<KVQuantPack>("KVQuantPack", "CPUExecutionProvider"));
      g_ops.emplace_back(Ort::Custom::CreateLiteCustomOp<KVUnpack>("KVUnpack", "CPUExecutionProvider"));
      for (auto& op : g_ops) g_domain->Add(op.get());
    });
    Ort::UnownedSessionOptions(options).Add(*g_domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
