// baseq.KVQuantPack and baseq.KVUnpack: the packed 4-bit KV cache rows.
#include "ops.h"
#include "kv_rows.h"

namespace baseq {
namespace {

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
    const int64_t width = PackedRowWidth(hd);
    uint8_t* out = y.Allocate({shape[0], heads, seq, width});
    const int64_t rows = x.NumberOfElement() / hd;
    if (rows == 0) return Ort::Status{nullptr};
    const float* in = x.Data();
    const float* cl = clip.Data();
    ForRows(ctx, rows, hd, [&](int64_t first, int64_t end) {
      for (int64_t r = first; r < end; ++r) {
        const float* src = in + r * hd;
        const float c = clips == 1 ? cl[0] : cl[(r / std::max<int64_t>(seq, 1)) % heads];
        PackKvRow(src, hd, c, out + r * width);
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
    const int64_t width = PackedRowWidth(head_dim);
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
        UnpackKvRow(in + r * width, hd, out + r * hd);
      }
    });
    return Ort::Status{nullptr};
  }
};

}  // namespace

const OrtCustomOp* KVQuantPackOp() {
  static const OrtCustomOp* op = Ort::Custom::CreateLiteCustomOp<KVQuantPack>("KVQuantPack", "CPUExecutionProvider");
  return op;
}

const OrtCustomOp* KVUnpackOp() {
  static const OrtCustomOp* op = Ort::Custom::CreateLiteCustomOp<KVUnpack>("KVUnpack", "CPUExecutionProvider");
  return op;
}

}  // namespace baseq
