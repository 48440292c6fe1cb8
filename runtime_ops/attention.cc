// baseq.Attention and baseq.AttentionKV4: grouped-query attention with the KV cache append, in
// float64 and rounded once to float32: what the exporter's emit_attention (float64 MatMul, scale,
// additive mask, MaskedSoftmax, MatMul) plus the Concat of past and new rows computes, i.e.
// models.base.attend(exact=True), reading the float32 (or packed 4-bit) cache directly.
//
//   Attention(Q [B, H, T, hd], K [B, kvH, T, hd], V [B, kvH, T, hd], past_K [B, kvH, P, hd],
//             past_V [B, kvH, P, hd], attention_mask int64 [B, P + T])
//     -> out [B, T, H * hd], present_K [B, kvH, P + T, hd], present_V [B, kvH, P + T, hd]
//   AttentionKV4(Q, K, V, past_K uint8 [B, kvH, P, hd/2 + 8], past_V uint8 [...], attention_mask,
//                k_clip [1 or kvH], v_clip [1 or kvH])
//     -> out, present_K uint8 [B, kvH, P + T, hd/2 + 8], present_V uint8 [...]
//     the new rows are quantized and packed as KVQuantPack does (kv_rows.h); every cache row is
//     read as KVUnpack's float32 values, which equal QuantDequant's: same results as Attention on
//     the fake-quantized float cache.
//   attribute window (int, 0 = none): sliding window, key j visible to position p iff j > p - window.
//
// Query t of batch b sits at position P + t; key j is visible iff j <= P + t, attention_mask[b, j]
// != 0 and (window) j > P + t - window. Head h reads KV head h / (H / kvH). Per query row:
//   s_j = (sum_d double(q_d) * double(k_jd)) * (1 / sqrt(hd)) + (visible ? 0 : -1e9)
//   p = MaskedSoftmaxRow(s) (float64, softmax_row.h);  out_d = float(sum_j p_j * double(v_jd))
// The dot products sum four interleaved partial sums (d mod 4), then ((s0 + s1) + (s2 + s3));
// out_d sums over keys in increasing j (attention_rows.h: one source, compiled for SSE2, AVX2 and
// AVX-512 and picked at run time; every copy gives the same bits). Rows with at least one visible key skip the invisible
// ones (their probability is exactly 0): a NaN or Inf held only by invisible keys or values does
// not reach the output, where the op chain would propagate it. A row with no visible key (a
// padding query) is computed over all keys, as the chain does.
#include "attention_kernels.h"
#include "common.h"
#include "kv_rows.h"
#include "ops.h"
#include "softmax_row.h"

#include <cmath>
#include <cstring>

namespace baseq {
namespace {

constexpr double kMaskValue = -1e9;  // the exporter's additive mask (onnx_model.MASKED)
constexpr int64_t kQueryChunk = 16;  // query rows per parallel task at prefill

struct Dims {
  int64_t batch, heads, kv_heads, groups, new_len, past_len, total_len, head_dim;
};

Ort::Status CheckDims(const std::string& op, const std::vector<int64_t>& q, const std::vector<int64_t>& k,
                      const std::vector<int64_t>& v, const std::vector<int64_t>& pk, const std::vector<int64_t>& pv,
                      const std::vector<int64_t>& mask, bool packed, Dims* d) {
  if (q.size() != 4) return Error(op + ": Q must be [batch, heads, seq, head_dim], got " + ShapeStr(q));
  if (k.size() != 4 || k[0] != q[0] || k[2] != q[2] || k[3] != q[3] || k[1] < 1 || q[1] % k[1] != 0)
    return Error(op + ": K must be [batch, kv_heads, seq, head_dim] matching Q " + ShapeStr(q) +
                 " with heads a multiple of kv_heads, got " + ShapeStr(k));
  if (v != k) return Error(op + ": V must have K's shape " + ShapeStr(k) + ", got " + ShapeStr(v));
  const int64_t hd = q[3];
  if (packed && (hd % 2 != 0 || hd == 0)) return Error(op + ": head_dim must be even and > 0, got " + std::to_string(hd));
  const int64_t row = packed ? PackedRowWidth(hd) : hd;
  if (pk.size() != 4 || pk[0] != k[0] || pk[1] != k[1] || pk[3] != row)
    return Error(op + ": past_K must be [" + std::to_string(k[0]) + ", " + std::to_string(k[1]) + ", past, " +
                 std::to_string(row) + "]" + (packed ? " (packed rows: head_dim/2 codes + scale + zero)" : "") +
                 ", got " + ShapeStr(pk));
  if (pv != pk) return Error(op + ": past_V must have past_K's shape " + ShapeStr(pk) + ", got " + ShapeStr(pv));
  if (mask.size() != 2 || mask[0] != q[0] || mask[1] != pk[2] + q[2])
    return Error(op + ": attention_mask must be [batch, past + seq] = [" + std::to_string(q[0]) + ", " +
                 std::to_string(pk[2] + q[2]) + "], got " + ShapeStr(mask));
  *d = Dims{q[0], q[1], k[1], q[1] / k[1], q[2], pk[2], pk[2] + q[2], hd};
  return Ort::Status{nullptr};
}

// Query rows [t0, t1) of every head reading KV head kvh of batch b, against its cache rows
// k_rows, v_rows (float32 [total_len][hd]); writes out rows of [B, T, H * hd].
void AttendChunk(const attn::Kernels& kern, const Dims& d, int64_t window, const float* q_all, const float* k_rows,
                 const float* v_rows, const int64_t* mask_b, int64_t b, int64_t kvh, int64_t t0, int64_t t1,
                 float* out_all) {
  const int64_t S = d.total_len, hd = d.head_dim, G = d.groups;
  std::vector<double> work(static_cast<size_t>(2 * G * S + 2 * G * hd));
  std::vector<uint8_t> visible(static_cast<size_t>(S));
  double* scores = work.data();   // [G][S]
  double* probs = scores + G * S;  // [G][S]
  double* q64 = probs + G * S;     // [G][hd]
  double* acc = q64 + G * hd;      // [G][hd]
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t pos = d.past_len + t;
    // Visible keys lie in [j0, j1): causal, and inside the window. The heads of this KV head share them.
    const int64_t j0 = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0, j1 = std::min(S, pos + 1);
    bool any = false;
    for (int64_t j = j0; j < j1; ++j) {
      visible[j] = mask_b[j] != 0;
      any |= visible[j] != 0;
    }
    for (int64_t g = 0; g < G; ++g) {
      const float* qr = q_all + ((b * d.heads + kvh * G + g) * d.new_len + t) * hd;
      for (int64_t i = 0; i < hd; ++i) q64[g * hd + i] = static_cast<double>(qr[i]);
    }
    if (any) {  // invisible keys: probability exactly 0, never computed
      // The softmax over [j0, j1) only: outside it every entry is invisible and adds an exact 0.
      for (int64_t g = 0; g < G; ++g)
        for (int64_t j = j0; j < j1; ++j) scores[g * S + j] = -INFINITY;
      kern.scores(q64, G, k_rows, hd, j0, j1, visible.data(), scale, 0.0, scores, S);
      for (int64_t g = 0; g < G; ++g) MaskedSoftmaxRow(scores + g * S + j0, probs + g * S + j0, j1 - j0);
      kern.weighted(probs, G, v_rows, hd, j0, j1, visible.data(), acc, S);
    } else {  // no visible key (a padding query): every key, masked, as the chain computes it
      kern.scores(q64, G, k_rows, hd, 0, S, nullptr, scale, kMaskValue, scores, S);
      for (int64_t g = 0; g < G; ++g) MaskedSoftmaxRow(scores + g * S, probs + g * S, S);
      kern.weighted(probs, G, v_rows, hd, 0, S, nullptr, acc, S);
    }
    for (int64_t g = 0; g < G; ++g) {
      float* o = out_all + (b * d.new_len + t) * (d.heads * hd) + (kvh * G + g) * hd;
      for (int64_t i = 0; i < hd; ++i) o[i] = static_cast<float>(acc[g * hd + i]);
    }
  }
}

// Runs body(b, kvh, t0, t1) over batch x KV heads x query chunks on onnxruntime's threads.
template <typename Body>
void ForChunks(OrtKernelContext* ctx, const Dims& d, Body body) {
  const int64_t chunk = d.new_len <= kQueryChunk ? std::max<int64_t>(d.new_len, 1) : kQueryChunk;
  const int64_t chunks = (d.new_len + chunk - 1) / chunk;
  const int64_t units = d.batch * d.kv_heads * chunks;
  struct Job {
    Body* body;
    int64_t kv_heads, chunks, chunk, new_len;
  } job{&body, d.kv_heads, chunks, chunk, d.new_len};
  auto run = [](void* data, size_t u) {
    auto* j = static_cast<Job*>(data);
    const int64_t i = static_cast<int64_t>(u);
    const int64_t c = i % j->chunks, kvh = (i / j->chunks) % j->kv_heads, b = i / (j->chunks * j->kv_heads);
    (*j->body)(b, kvh, c * j->chunk, std::min(j->new_len, (c + 1) * j->chunk));
  };
  if (units == 1) {
    run(&job, 0);
  } else if (units > 1) {
    Ort::KernelContext(ctx).ParallelFor(run, static_cast<size_t>(units), 0, &job);
  }
}

// present = concat(past, new) along the sequence axis, row by row (`row` elements per token).
template <typename T>
void Append(const T* past, const T* fresh, T* present, const Dims& d, int64_t row) {
  for (int64_t bh = 0; bh < d.batch * d.kv_heads; ++bh) {
    std::memcpy(present + bh * d.total_len * row, past + bh * d.past_len * row, sizeof(T) * d.past_len * row);
    std::memcpy(present + (bh * d.total_len + d.past_len) * row, fresh + bh * d.new_len * row, sizeof(T) * d.new_len * row);
  }
}

// The widest float64 loop set this CPU runs (all give the same bits).
attn::Kernels WidestKernels() {
  attn::Kernels all[4];
  const int n = attn::AvailableKernels(all, 4);
  return all[n - 1];
}

struct Attention {
  int64_t window = 0;
  attn::Kernels kernels = WidestKernels();

  Attention(const OrtApi* api, const OrtKernelInfo* info) : window(IntAttribute(api, info, "window", 0)) {
    if (window < 0) ORT_CXX_API_THROW("baseq.Attention: attribute window must be >= 0 (0 = none)", ORT_INVALID_ARGUMENT);
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& q, const Tensor<float>& k, const Tensor<float>& v,
                      const Tensor<float>& past_k, const Tensor<float>& past_v, const Tensor<int64_t>& mask,
                      Tensor<float>& out, Tensor<float>& present_k, Tensor<float>& present_v) {
    Dims d;
    if (auto st = CheckDims("baseq.Attention", q.Shape(), k.Shape(), v.Shape(), past_k.Shape(), past_v.Shape(),
                            mask.Shape(), false, &d);
        !st.IsOK())
      return st;
    const int64_t hd = d.head_dim;
    float* o = out.Allocate({d.batch, d.new_len, d.heads * hd});
    float* pk = present_k.Allocate({d.batch, d.kv_heads, d.total_len, hd});
    float* pv = present_v.Allocate({d.batch, d.kv_heads, d.total_len, hd});
    if (d.batch == 0 || d.kv_heads == 0 || hd == 0) return Ort::Status{nullptr};
    Append(past_k.Data(), k.Data(), pk, d, hd);
    Append(past_v.Data(), v.Data(), pv, d, hd);
    if (d.new_len == 0) return Ort::Status{nullptr};
    const float* qd = q.Data();
    const int64_t* md = mask.Data();
    ForChunks(ctx, d, [&](int64_t b, int64_t kvh, int64_t t0, int64_t t1) {
      const int64_t at = (b * d.kv_heads + kvh) * d.total_len * hd;
      AttendChunk(kernels, d, window, qd, pk + at, pv + at, md + b * d.total_len, b, kvh, t0, t1, o);
    });
    return Ort::Status{nullptr};
  }
};

struct AttentionKV4 {
  int64_t window = 0;
  attn::Kernels kernels = WidestKernels();

  AttentionKV4(const OrtApi* api, const OrtKernelInfo* info) : window(IntAttribute(api, info, "window", 0)) {
    if (window < 0) ORT_CXX_API_THROW("baseq.AttentionKV4: attribute window must be >= 0 (0 = none)", ORT_INVALID_ARGUMENT);
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& q, const Tensor<float>& k, const Tensor<float>& v,
                      const Tensor<uint8_t>& past_k, const Tensor<uint8_t>& past_v, const Tensor<int64_t>& mask,
                      const Tensor<float>& k_clip, const Tensor<float>& v_clip, Tensor<float>& out,
                      Tensor<uint8_t>& present_k, Tensor<uint8_t>& present_v) {
    const std::string op = "baseq.AttentionKV4";
    Dims d;
    if (auto st = CheckDims(op, q.Shape(), k.Shape(), v.Shape(), past_k.Shape(), past_v.Shape(), mask.Shape(), true, &d);
        !st.IsOK())
      return st;
    for (const Tensor<float>* clip : {&k_clip, &v_clip})
      if (clip->NumberOfElement() != 1 && clip->NumberOfElement() != d.kv_heads)
        return Error(op + ": k_clip and v_clip must hold 1 value or one per KV head (" + std::to_string(d.kv_heads) +
                     "), got " + ShapeStr(clip->Shape()));
    const int64_t hd = d.head_dim, row = PackedRowWidth(hd);
    float* o = out.Allocate({d.batch, d.new_len, d.heads * hd});
    uint8_t* pk = present_k.Allocate({d.batch, d.kv_heads, d.total_len, row});
    uint8_t* pv = present_v.Allocate({d.batch, d.kv_heads, d.total_len, row});
    if (d.batch == 0 || d.kv_heads == 0) return Ort::Status{nullptr};
    // The new rows, quantized and packed (KVQuantPack), after the past ones.
    const float *kd = k.Data(), *vd = v.Data(), *kc = k_clip.Data(), *vc = v_clip.Data();
    const bool k_per_head = k_clip.NumberOfElement() != 1, v_per_head = v_clip.NumberOfElement() != 1;
    for (int64_t bh = 0; bh < d.batch * d.kv_heads; ++bh) {
      const int64_t h = bh % d.kv_heads;
      std::memcpy(pk + bh * d.total_len * row, past_k.Data() + bh * d.past_len * row, d.past_len * row);
      std::memcpy(pv + bh * d.total_len * row, past_v.Data() + bh * d.past_len * row, d.past_len * row);
      for (int64_t t = 0; t < d.new_len; ++t) {
        const int64_t src = (bh * d.new_len + t) * hd, dst = (bh * d.total_len + d.past_len + t) * row;
        PackKvRow(kd + src, hd, kc[k_per_head ? h : 0], pk + dst);
        PackKvRow(vd + src, hd, vc[v_per_head ? h : 0], pv + dst);
      }
    }
    if (d.new_len == 0) return Ort::Status{nullptr};
    const float* qd = q.Data();
    const int64_t* md = mask.Data();
    ForChunks(ctx, d, [&](int64_t b, int64_t kvh, int64_t t0, int64_t t1) {
      // This KV head's rows as KVUnpack's float32 values (the same floats as QuantDequant's).
      // Only the rows some query of the chunk can see: [lo, hi), or all when a query sees none.
      const int64_t* mb = md + b * d.total_len;
      int64_t lo = window > 0 ? std::max<int64_t>(0, d.past_len + t0 - window + 1) : 0;
      int64_t hi = std::min(d.total_len, d.past_len + t1);
      for (int64_t t = t0; t < t1 && hi - lo < d.total_len; ++t) {
        const int64_t pos = d.past_len + t, j0 = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
        bool any = false;
        for (int64_t j = j0; j <= pos && !any; ++j) any = mb[j] != 0;
        if (!any) lo = 0, hi = d.total_len;
      }
      std::vector<float> rows(static_cast<size_t>(2 * d.total_len * hd));
      const int64_t at = (b * d.kv_heads + kvh) * d.total_len * row;
      for (int64_t j = lo; j < hi; ++j) {
        UnpackKvRow(pk + at + j * row, hd, rows.data() + j * hd);
        UnpackKvRow(pv + at + j * row, hd, rows.data() + (d.total_len + j) * hd);
      }
      AttendChunk(kernels, d, window, qd, rows.data(), rows.data() + d.total_len * hd, md + b * d.total_len, b, kvh, t0,
                  t1, o);
    });
    return Ort::Status{nullptr};
  }
};

}  // namespace

const OrtCustomOp* AttentionOp() {
  static const OrtCustomOp* op = Ort::Custom::CreateLiteCustomOp<Attention>("Attention", "CPUExecutionProvider");
  return op;
}

const OrtCustomOp* AttentionKV4Op() {
  static const OrtCustomOp* op = Ort::Custom::CreateLiteCustomOp<AttentionKV4>("AttentionKV4", "CPUExecutionProvider");
  return op;
}

}  // namespace baseq
