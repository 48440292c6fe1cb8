// The float64 steps of the exact mode, each rounded once to float32 where the reference's exact mode
// (baseq_export.models.base.forward(exact=True)) rounds: ScaleSums, RmsNorm, SwiGLU, MaskedSoftmax.
#include "common.h"
#include "ops.h"
#include "attention_kernels.h"

#include <cmath>

namespace baseq {
namespace {

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

// SwiGLU(G, U) -> float(silu(double(G)) * double(U)) of one shape; SwiGLU(GU) with one input takes G and U
// as the two halves of GU's last axis (the stacked gate/up projection, no Split).
struct SwiGLU {
  attn::SwiGLUFn row = attn::WidestKernels().swiglu;  // float64 exp in 8 lanes (attention_rows.h)

  SwiGLU(const OrtApi*, const OrtKernelInfo*) {}

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& gate, std::optional<const Tensor<float>*> up,
                      Tensor<float>& out) {
    std::vector<int64_t> shape = gate.Shape();
    const bool stacked = !up.has_value() || *up == nullptr;
    if (stacked) {
      if (shape.empty() || shape.back() % 2 != 0)
        return Error("baseq.SwiGLU: with one input, GU must have an even last dimension (gate and up halves), got " +
                     ShapeStr(shape));
      shape.back() /= 2;
    } else if (shape != (*up)->Shape()) {
      return Error("baseq.SwiGLU: G " + ShapeStr(shape) + " and U " + ShapeStr((*up)->Shape()) + " must have one shape");
    }
    float* o = out.Allocate(shape);
    const int64_t width = shape.empty() ? 1 : shape.back();
    const int64_t total = gate.NumberOfElement() / (stacked ? 2 : 1);
    if (total == 0 || width == 0) return Ort::Status{nullptr};
    const float* g = gate.Data();
    const float* u = stacked ? g + width : (*up)->Data();
    const int64_t stride = stacked ? 2 * width : width;  // input row stride
    ForRows(ctx, total / width, width, [&](int64_t first, int64_t end) {
      for (int64_t r = first; r < end; ++r) row(g + r * stride, u + r * stride, o + r * width, width);
    });
    return Ort::Status{nullptr};
  }
};

struct MaskedSoftmax {
  attn::SoftmaxFn softmax = attn::WidestKernels().softmax;  // baseq.Attention's softmax (attention_rows.h)

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
        softmax(src, dst, n);
      }
    });
    return Ort::Status{nullptr};
  }
};

}  // namespace

const OrtCustomOp* ScaleSumsOp() {
  static const OrtCustomOp* op = Ort::Custom::CreateLiteCustomOp<ScaleSums>("ScaleSums", "CPUExecutionProvider");
  return op;
}

const OrtCustomOp* RmsNormOp() {
  static const OrtCustomOp* op = Ort::Custom::CreateLiteCustomOp<RmsNorm>("RmsNorm", "CPUExecutionProvider");
  return op;
}

const OrtCustomOp* SwiGLUOp() {
  static const OrtCustomOp* op = Ort::Custom::CreateLiteCustomOp<SwiGLU>("SwiGLU", "CPUExecutionProvider");
  return op;
}

const OrtCustomOp* MaskedSoftmaxOp() {
  static const OrtCustomOp* op = Ort::Custom::CreateLiteCustomOp<MaskedSoftmax>("MaskedSoftmax", "CPUExecutionProvider");
  return op;
}

}  // namespace baseq
