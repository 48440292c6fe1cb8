// baseq-export's onnxruntime custom ops (domain "baseq"): the catalogue and RegisterCustomOps, the
// library's one exported symbol. Built by CMakeLists.txt here or by baseq_export/runtime_ops on first use.
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
//   SwiGLU(G, U) -> float(silu(G) * U in float64); SwiGLU(GU): G and U the two halves of GU's last axis
//   MaskedSoftmax(X[..., s] float64) -> float64 softmax over the last axis; entries below -1e8 (the
//       exporter's additive mask is -1e9) are taken as exactly 0 without computing exp, as exp(-1e9)
//       is; a row with no other entry is computed in full, as the standard-op graph does.
//   All four round where the reference's exact mode (models.base.forward) rounds.
//   KVQuantPack(X[B, H, T, hd], clip) -> uint8 [B, H, T, hd/2 + 8]   attribute bits (4)
//       the 4-bit KV quantizer, stored packed: hd/2 bytes of codes, then float32 scale and zero.
//   KVUnpack(P[B, H, S, hd/2 + 8]) -> float [B, H, S, hd]             attribute head_dim
//       (code - zero) * scale: bit for bit the values QuantDequant gives.
//   IntLinear(X[..., K], clip[1], shift[K]?, gain[K]?, B uint8 [N, ceil(K/2)], zeros uint8 [N, G],
//             W_scales [N, G], bias[N]?, residual[..., N]?) -> Y[..., N]   attributes bits (1..8), group_size (0 = K)
//       QuantLevels' quantizer fused with the exact integer matmul on 4-bit weights and ScaleSums'
//       epilogue (G = 1: bit for bit that chain); int_linear.h states the arithmetic.
//   Attention(Q[B, H, T, hd], K, V [B, kvH, T, hd], past_K, past_V [B, kvH, P, hd], attention_mask int64
//             [B, P + T]) -> out [B, T, H * hd], present_K, present_V [B, kvH, P + T, hd]   attribute window
//   AttentionKV4(..., past_K/past_V uint8 packed rows, attention_mask, k_clip, v_clip) -> out, present
//       packed: grouped-query attention with the cache append, float64 inside, rounded once
//       (models.base.attend(exact=True)); attention.cc states the arithmetic. The past may be a
//       buffer longer than the mask says (onnxruntime-genai's shared past/present): written in place.
//   RopeAttention(qkv [B, T, (H + 2 kvH) hd], cos, sin [T, hd], past_K, past_V, attention_mask,
//                 k_clip?, v_clip?) / RopeAttentionKV4(..., k_clip, v_clip): the stacked projection
//       split into heads, rotary embedding, optional Hadamard of q and k (rotate) and KV quantizer,
//       then Attention / AttentionKV4.   attributes heads, kv_heads, rotate, window, bits
//
// Bad shapes or attributes return an onnxruntime error; nothing here aborts the process.
// Build flags keep float semantics exact: -ffp-contract=off, no -ffast-math.

#include "common.h"
#include "ops.h"

#include <mutex>

namespace {

std::once_flag g_once;
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
      for (const OrtCustomOp* op : {baseq::HadamardOp(), baseq::QuantDequantOp(), baseq::QuantLevelsOp(),
                                    baseq::ScaleSumsOp(), baseq::RmsNormOp(), baseq::SwiGLUOp(),
                                    baseq::MaskedSoftmaxOp(), baseq::KVQuantPackOp(), baseq::KVUnpackOp(),
                                    baseq::IntLinearOp(), baseq::AttentionOp(), baseq::AttentionKV4Op(),
                                    baseq::RopeAttentionOp(), baseq::RopeAttentionKV4Op()})
        g_domain->Add(op);
    });
    Ort::UnownedSessionOptions(options).Add(*g_domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
