// The per-token asymmetric activation quantizer shared by QuantDequant, QuantLevels, KVQuantPack
// and IntLinear: the float32 recipe of baseq_export.quant.fake_quant_per_token, in its order.
#pragma once

#include "common.h"
#include "quant_code.h"

#include <cmath>
#include <functional>

namespace baseq {

constexpr float kScaleFloor = 1e-8f;  // quant.ACT_SCALE_EPS

// Per-row scale and zero point of quant.fake_quant_per_token, in its float32 operation order.
struct RowQParams {
  float scale, zero;
};

inline RowQParams RowQParamsOf(const float* v, int64_t n, float clip, float qmax) {
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

// clamp(round(v / scale) + zero, 0, qmax); NaN passes through, as torch.clamp (quant_code.h).
inline float Code(float v, const RowQParams& p, float qmax) { return QuantCode(v, p.scale, p.zero, qmax); }

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

}  // namespace baseq
