// baseq.Hadamard: the online Hadamard transform in float64, rounded once to float32.
#include "common.h"
#include "attention_kernels.h"
#include "ops.h"

#include <cmath>
#include <vector>

namespace baseq {
namespace {

struct Hadamard {
  int64_t blocks = 1;
  int64_t size = 0;  // expected last dimension; 0 = any
  attn::Kernels kernels = attn::WidestKernels();  // the butterfly and the dense factor in float64 lanes

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
    const attn::Kernels& kern = kernels;
    ForRows(ctx, rows, n, [&](int64_t first, int64_t end) {
      thread_local std::vector<double> scratch;  // per thread, grown as needed: no allocation per call
      if (scratch.size() < static_cast<size_t>(2 * m * p)) scratch.resize(static_cast<size_t>(2 * m * p));
      double *work = scratch.data(), *mixed = work + m * p;
      for (int64_t r = first; r < end; ++r) {
        for (int64_t b = 0; b < blocks; ++b) {
          const float* src = in + r * n + b * m * p;
          float* dst = out + r * n + b * m * p;
          for (int64_t i = 0; i < m * p; ++i) work[i] = static_cast<double>(src[i]) * norm;
          for (int64_t i = 0; i < m; ++i) kern.butterfly(work + i * p, p);
          const double* res = work;
          if (s) {  // mixed[i, :] = sum_k S[k, i] * work[k, :]
            kern.mix_factor(s, m, work, p, mixed);
            res = mixed;
          }
          for (int64_t i = 0; i < m * p; ++i) dst[i] = static_cast<float>(res[i]);
        }
      }
    });
    return Ort::Status{nullptr};
  }
};

}  // namespace

const OrtCustomOp* HadamardOp() {
  static const OrtCustomOp* op = Ort::Custom::CreateLiteCustomOp<Hadamard>("Hadamard", "CPUExecutionProvider");
  return op;
}

}  // namespace baseq
