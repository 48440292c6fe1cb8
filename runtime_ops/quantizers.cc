// baseq.QuantDequant and baseq.QuantLevels: the per-token activation quantizer (quantizers.h) as
// fake quant, or as integer levels and a scale for an integer matmul.
#include "ops.h"
#include "quantizers.h"

namespace baseq {
namespace {

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

}  // namespace

const OrtCustomOp* QuantDequantOp() {
  static const OrtCustomOp* op = Ort::Custom::CreateLiteCustomOp<QuantDequant>("QuantDequant", "CPUExecutionProvider");
  return op;
}

const OrtCustomOp* QuantLevelsOp() {
  static const OrtCustomOp* op = Ort::Custom::CreateLiteCustomOp<QuantLevels>("QuantLevels", "CPUExecutionProvider");
  return op;
}

}  // namespace baseq
