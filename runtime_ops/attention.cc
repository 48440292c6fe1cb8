// baseq.Attention and baseq.AttentionKV4: grouped-query attention with the KV cache append, in
// float64 and rounded once to float32: what the exporter's emit_attention (float64 MatMul, scale,
// additive mask, MaskedSoftmax, MatMul) plus the Concat of past and new rows computes, i.e.
// models.base.attend(exact=True), reading the float32 (or packed 4-bit) cache directly.
//
//   Attention(Q [B, H, T, hd], K [B, kvH, T, hd], V [B, kvH, T, hd], past_K [B, kvH, C, hd],
//             past_V [B, kvH, C, hd], attention_mask int64 [B, P + T])
//     -> out [B, T, H * hd], present_K [B, kvH, C', hd], present_V [B, kvH, C', hd]
//   The past length P is the mask's length minus T. A growing cache has C = P and C' = P + T. A
//   cache buffer (onnxruntime-genai's shared past/present buffer) has C > P: present has the
//   past's shape, C' = C >= P + T, and the new rows are written at rows P .. P + T - 1; when
//   present is bound to the past's own memory nothing else is copied.
//   AttentionKV4(Q, K, V, past_K uint8 [B, kvH, C, hd/2 + 8], past_V uint8 [...], attention_mask,
//                k_clip [1 or kvH], v_clip [1 or kvH])
//     -> out, present_K uint8 [B, kvH, C', hd/2 + 8], present_V uint8 [...]
//     the new rows are quantized and packed as KVQuantPack does (kv_rows.h); every cache row is
//     read as KVUnpack's float32 values, which equal QuantDequant's: same results as Attention on
//     the fake-quantized float cache.
//   attribute window (int, 0 = none): sliding window, key j visible to position p iff j > p - window.
//
// Query t of batch b sits at position P + t; key j is visible iff j <= P + t, attention_mask[b, j]
// != 0 and (window) j > P + t - window. Head h reads KV head h / (H / kvH). Per query row:
//   s_j = (sum_d double(q_d) * double(k_jd)) * (1 / sqrt(hd)) + (visible ? 0 : -1e9)
//   p = softmax(s) (float64);  out_d = float(sum_j p_j * double(v_jd))
// with the dot products, softmax and sums of attention_rows.h (one source, compiled for the
// baseline, AVX2+FMA and AVX-512 and picked at run time; every copy gives the same bits; float64
// rounding differs from another float64 implementation's in the last bits, which the final
// float32 rounding almost always hides). Rows with at least one visible key skip the invisible
// ones (their probability is exactly 0): a NaN or Inf held only by invisible keys or values does
// not reach the output, where the op chain would propagate it. A row with no visible key (a
// padding query) is computed over all keys, as the chain does.
#include "attention_kernels.h"
#include "common.h"
#include "kv_rows.h"
#include "ops.h"

#include <cmath>
#include <cstring>

namespace baseq {
namespace {

constexpr double kMaskValue = -1e9;  // the exporter's additive mask (onnx_model.MASKED)
constexpr int64_t kQueryChunk = 16;  // query rows per parallel task at prefill
constexpr int64_t kUnpackRows = 256; // packed cache rows per parallel unpack task
constexpr int64_t kSerialWork = 1 << 16;  // below this many multiply-adds (or values) one thread does it all

struct Dims {
  int64_t batch, heads, kv_heads, groups, new_len, past_len, total_len, head_dim;
  int64_t past_rows;     // rows of past_K (P, or the buffer's capacity C)
  int64_t present_rows;  // rows of present_K (P + T, or C)
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
  const int64_t past = mask.size() == 2 ? mask[1] - q[2] : -1;
  if (mask.size() != 2 || mask[0] != q[0] || past < 0 || mask[1] > std::max(pk[2], pk[2] + q[2]) ||
      (past < pk[2] && mask[1] > pk[2]))
    return Error(op + ": attention_mask must be [batch, past + seq] = [" + std::to_string(q[0]) + ", " +
                 std::to_string(pk[2] + q[2]) + "] (a growing cache) or at most [" + std::to_string(q[0]) + ", " +
                 std::to_string(pk[2]) + "] (past_K a KV buffer of " + std::to_string(pk[2]) + " rows), got " +
                 ShapeStr(mask));
  const bool buffer = pk[2] > past;
  *d = Dims{q[0], q[1], k[1], q[1] / k[1], q[2], past, past + q[2], hd, pk[2], buffer ? pk[2] : past + q[2]};
  return Ort::Status{nullptr};
}

// Grows v to at least n elements (never shrinks: the values are scratch, overwritten before use).
template <typename T>
void Reserve(std::vector<T>* v, int64_t n) {
  if (static_cast<int64_t>(v->size()) < n) v->resize(static_cast<size_t>(n));
}

// One KV head's cache rows as float32 [rows][hd] for AttendChunk: float rows read in place (one chunk),
// or packed rows unpacked kPackedChunk at a time into the calling thread's scratch (KVUnpack's values)
// right before they are read, so decoding streams the packed cache once and writes no unpacked copy.
struct FloatRows {
  const float *k, *v;
  int64_t chunk;  // the whole cache: one pass
  const float* Keys(int64_t c0, int64_t, int64_t hd) const { return k + c0 * hd; }
  const float* Values(int64_t c0, int64_t, int64_t hd) const { return v + c0 * hd; }
};

constexpr int64_t kPackedChunk = 256;  // packed rows unpacked at a time (64 KB of float32 at head_dim 64)

struct PackedRows {
  const uint8_t *k, *v;
  int64_t row;  // bytes per packed row
  int64_t chunk = kPackedChunk;
  const float* Keys(int64_t c0, int64_t c1, int64_t hd) const { return Unpack(k, c0, c1, hd); }
  const float* Values(int64_t c0, int64_t c1, int64_t hd) const { return Unpack(v, c0, c1, hd); }
  const float* Unpack(const uint8_t* src, int64_t c0, int64_t c1, int64_t hd) const {
    thread_local std::vector<float> buf;
    Reserve(&buf, kPackedChunk * hd);
    for (int64_t j = c0; j < c1; ++j) UnpackKvRow(src + j * row, hd, buf.data() + (j - c0) * hd);
    return buf.data();
  }
};

// Query rows [t0, t1) of every head of KV head kvh of batch b (head kvh * G + g), against the
// KV head's cache rows (`rows`, [total_len][hd] as FloatRows or PackedRows), a chunk of keys at a
// time: each score is its own dot product and the weighted sums go on across chunks in key order,
// so chunking changes no bit. Writes out rows of [B, T, H * hd].
template <typename Rows>
void AttendChunk(const attn::Kernels& kern, const Dims& d, int64_t window, const float* q_all, const Rows& rows,
                 const int64_t* mask_b, int64_t b, int64_t kvh, int64_t t0, int64_t t1, float* out_all) {
  const int64_t S = d.total_len, hd = d.head_dim, G = d.groups;
  thread_local std::vector<double> work;  // per thread, grown as needed: no allocation or zeroing per call
  thread_local std::vector<uint8_t> visible;
  Reserve(&work, 2 * G * S + 2 * G * hd);
  Reserve(&visible, S);
  double* scores = work.data();   // [G][S]
  double* probs = scores + G * S;  // [G][S]
  double* q64 = probs + G * S;     // [G][hd]
  double* acc = q64 + G * hd;      // [G][hd]
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  // scores, then weighted sums, over keys [j0, j1) a chunk at a time (vis: visibility by key, or null)
  auto attend = [&](int64_t j0, int64_t j1, const uint8_t* vis, double add) {
    for (int64_t c0 = j0; c0 < j1; c0 += rows.chunk) {
      const int64_t c1 = std::min(j1, c0 + rows.chunk);
      kern.scores(q64, G, rows.Keys(c0, c1, hd), hd, 0, c1 - c0, vis ? vis + c0 : nullptr, scale, add, scores + c0, S);
    }
    for (int64_t g = 0; g < G; ++g) kern.softmax(scores + g * S + j0, probs + g * S + j0, j1 - j0);
    for (int64_t c0 = j0; c0 < j1; c0 += rows.chunk) {
      const int64_t c1 = std::min(j1, c0 + rows.chunk);
      (c0 == j0 ? kern.weighted : kern.weighted_add)(probs + c0, G, rows.Values(c0, c1, hd), hd, 0, c1 - c0,
                                                     vis ? vis + c0 : nullptr, acc, S);
    }
  };
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
      const float* qr = q_all + ((b * d.heads + kvh * d.groups + g) * d.new_len + t) * hd;
      for (int64_t i = 0; i < hd; ++i) q64[g * hd + i] = static_cast<double>(qr[i]);
    }
    if (any) {  // invisible keys: probability exactly 0, never computed
      // The softmax over [j0, j1) only: outside it every entry is invisible and adds an exact 0.
      for (int64_t g = 0; g < G; ++g)
        for (int64_t j = j0; j < j1; ++j) scores[g * S + j] = -INFINITY;
      attend(j0, j1, visible.data(), 0.0);
    } else {  // no visible key (a padding query): every key, masked, as the chain computes it
      attend(0, S, nullptr, kMaskValue);
    }
    for (int64_t g = 0; g < G; ++g) {
      float* o = out_all + (b * d.new_len + t) * (d.heads * hd) + (kvh * d.groups + g) * hd;
      for (int64_t i = 0; i < hd; ++i) o[i] = static_cast<float>(acc[g * hd + i]);
    }
  }
}

constexpr int64_t kBlockKeys = 8;  // keys per transposed block of the prefill tiles (the kernels' lanes)

int64_t KeyBlockCount(int64_t keys) { return (keys + kBlockKeys - 1) / kBlockKeys; }

// Blocks [b0, b1) of kt = the key rows [S][hd] as blocks of 8 keys, each transposed:
// kt[(j / 8) * hd * 8 + d * 8 + j % 8] = rows[j * hd + d]; a last block's missing keys are zeros.
void TransposeKeyBlocks(const float* rows, int64_t S, int64_t hd, int64_t b0, int64_t b1, float* kt) {
  for (int64_t blk = b0; blk < b1; ++blk) {
    float* dst = kt + blk * hd * kBlockKeys;
    for (int64_t kk = 0; kk < kBlockKeys; ++kk) {
      const int64_t j = blk * kBlockKeys + kk;
      for (int64_t i = 0; i < hd; ++i) dst[i * kBlockKeys + kk] = j < S ? rows[j * hd + i] : 0.0f;
    }
  }
}

// A chunk of query rows [t0, t1) of every head of KV head kvh in register tiles (BlockScores over
// kt, the KV head's transposed key blocks, and the weighted sums of every row's heads at once over the
// keys all rows see, then each row's own last keys). Returns false, computing nothing, where the
// rows do not share their first visible key (a sliding window that cuts in, a padding query).
bool AttendChunkTiled(const attn::Kernels& kern, const Dims& d, int64_t window, const float* q_all, const float* kt,
                      const float* v_rows, const int64_t* mask_b, int64_t b, int64_t kvh, int64_t t0, int64_t t1,
                      float* out_all) {
  const int64_t hd = d.head_dim, G = d.groups, R = t1 - t0, nq = R * G;
  const int64_t first = d.past_len + t0;  // the position of the chunk's first query
  const int64_t common = first + 1, keys = d.past_len + t1;  // keys every row sees; keys any row sees
  if (window > 0 && keys > window) return false;  // a row's window would start past key 0
  thread_local std::vector<uint8_t> visible;
  Reserve(&visible, keys);
  bool any = false, all = true;
  for (int64_t j = 0; j < keys; ++j) {
    visible[j] = mask_b[j] != 0;
    any |= j < common && visible[j];
    all &= visible[j] != 0;
  }
  if (!any) return false;
  const uint8_t* vis = all ? nullptr : visible.data();
  const int64_t stride = KeyBlockCount(keys) * kBlockKeys;
  thread_local std::vector<double> work;
  Reserve(&work, nq * stride + 2 * nq * hd);
  double* probs = work.data();        // [nq][stride]: the scores, then softmax's numerators in place
  double* q64 = probs + nq * stride;  // [nq][hd], query i = row r's head g at i = r * G + g
  double* acc = q64 + nq * hd;        // [nq][hd]
  for (int64_t r = 0; r < R; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float* qr = q_all + ((b * d.heads + kvh * d.groups + g) * d.new_len + t0 + r) * hd;
      for (int64_t i = 0; i < hd; ++i) q64[(r * G + g) * hd + i] = static_cast<double>(qr[i]);
    }
  kern.block_scores(q64, nq, kt, hd, 0, KeyBlockCount(keys), 1.0 / std::sqrt(static_cast<double>(hd)), probs, stride);
  thread_local std::vector<double> inv_sums;
  Reserve(&inv_sums, nq);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t g = 0; g < G; ++g) {
      double* row = probs + (r * G + g) * stride;
      const int64_t n = common + r;  // causal: keys [0, first + r]
      if (vis)
        for (int64_t j = 0; j < n; ++j)
          if (!vis[j]) row[j] = -INFINITY;
      inv_sums[r * G + g] = 1.0 / kern.exp_sum(row, row, n);  // softmax's numerators: divided at the end
    }
  kern.weighted(probs, nq, v_rows, hd, 0, common, vis, acc, stride);
  for (int64_t r = 1; r < R; ++r)  // each row's keys past the common ones, continuing its sums in order
    kern.weighted_add(probs + r * G * stride, G, v_rows, hd, common, common + r, vis, acc + r * G * hd, stride);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t g = 0; g < G; ++g) {
      float* o = out_all + (b * d.new_len + t0 + r) * (d.heads * hd) + (kvh * d.groups + g) * hd;
      const double inv = inv_sums[r * G + g];
      for (int64_t i = 0; i < hd; ++i) o[i] = static_cast<float>(acc[(r * G + g) * hd + i] * inv);
    }
  return true;
}

// Runs body(task) for task in [0, count): on onnxruntime's threads, or on this one when `work` (the
// multiply-adds or values involved) is below kSerialWork and not worth waking the others. One batch
// per task, so the threads claim tasks as they finish: causal prefill chunks differ in cost (the last
// query chunk sees every key), and onnxruntime's default batches are equal contiguous ranges.
template <typename Body>
void ParallelTasks(OrtKernelContext* ctx, int64_t count, int64_t work, Body body) {
  if (count == 1 || work < kSerialWork) {
    for (int64_t i = 0; i < count; ++i) body(i);
  } else if (count > 1) {
    auto run = [](void* data, size_t u) { (*static_cast<Body*>(data))(static_cast<int64_t>(u)); };
    Ort::KernelContext(ctx).ParallelFor(run, static_cast<size_t>(count), static_cast<size_t>(count), &body);
  }
}

// Runs body(b, kvh, t0, t1) over batch x KV heads x query chunks on onnxruntime's threads, all
// heads of a KV head in one task (they share each key and value row's load and conversion). Decoding
// was split by query head (9 tasks for 3 KV heads) to balance 2 threads; whole KV heads (3 tasks) are
// faster all the same: 0.20 -> 0.17 ms for a step at 1024 tokens (runtime_ops/bench/bench_attention.py).
template <typename Body>
void ForChunks(OrtKernelContext* ctx, const Dims& d, Body body) {
  const int64_t chunk = d.new_len <= kQueryChunk ? std::max<int64_t>(d.new_len, 1) : kQueryChunk;
  const int64_t chunks = (d.new_len + chunk - 1) / chunk;
  auto task = [&](int64_t i) {
    const int64_t c = i % chunks, kvh = (i / chunks) % d.kv_heads, b = i / (chunks * d.kv_heads);
    body(b, kvh, c * chunk, std::min(d.new_len, (c + 1) * chunk));
  };
  ParallelTasks(ctx, d.batch * d.kv_heads * chunks, d.batch * d.heads * d.new_len * d.total_len * d.head_dim, task);
}

// The key rows of every (batch, KV head) bh (rows_of(bh): [total_len][hd] float32) as transposed blocks
// for the prefill tiles, [B * kvH][blocks][hd][8] in the calling thread's scratch; null when every
// chunk is a single query row (decoding), which the row kernels serve.
template <typename RowsOf>
const float* KeyBlocks(OrtKernelContext* ctx, const Dims& d, RowsOf rows_of) {
  if (d.new_len < 2) return nullptr;
  const int64_t hd = d.head_dim, blocks = KeyBlockCount(d.total_len), per_head = blocks * hd * kBlockKeys;
  const int64_t per_task = kUnpackRows / kBlockKeys;  // blocks a task transposes
  const int64_t heads = d.batch * d.kv_heads, tasks = (blocks + per_task - 1) / per_task;
  thread_local std::vector<float> scratch;  // the calling thread's; the tasks reach it through `kt` only
  Reserve(&scratch, heads * per_head);
  float* const kt = scratch.data();
  ParallelTasks(ctx, heads * tasks, heads * per_head, [&](int64_t i) {
    const int64_t bh = i / tasks, b0 = (i % tasks) * per_task;
    TransposeKeyBlocks(rows_of(bh), d.total_len, hd, b0, std::min(blocks, b0 + per_task), kt + bh * per_head);
  });
  return kt;
}

// One chunk of query rows: in register tiles where there are several rows and kt, else row by row.
void AttendRows(const attn::Kernels& kern, const Dims& d, int64_t window, const float* q_all, const float* kt,
                const float* k_rows, const float* v_rows, const int64_t* mask_b, int64_t b, int64_t kvh, int64_t t0,
                int64_t t1, float* out_all) {
  const float* kt_head = kt ? kt + (b * d.kv_heads + kvh) * KeyBlockCount(d.total_len) * d.head_dim * kBlockKeys : nullptr;
  if (kt_head && t1 - t0 >= 2 &&
      AttendChunkTiled(kern, d, window, q_all, kt_head, v_rows, mask_b, b, kvh, t0, t1, out_all))
    return;
  AttendChunk(kern, d, window, q_all, FloatRows{k_rows, v_rows, d.total_len}, mask_b, b, kvh, t0, t1, out_all);
}

// present = the past rows, then the new ones (`row` elements per token, `fresh` rows made by
// write_new(bh, t, dst)). A growing cache is copied; in a buffer the new rows go to rows P ..,
// and the past rows are copied (and the rest zeroed) only when present is not the past's memory.
template <typename T, typename WriteNew>
void Append(const T* past, T* present, const Dims& d, int64_t row, WriteNew write_new) {
  const bool same = static_cast<const void*>(past) == static_cast<const void*>(present);
  for (int64_t bh = 0; bh < d.batch * d.kv_heads; ++bh) {
    T* dst = present + bh * d.present_rows * row;
    if (!same) {
      std::memcpy(dst, past + bh * d.past_rows * row, sizeof(T) * d.past_len * row);
      std::memset(dst + d.total_len * row, 0, sizeof(T) * (d.present_rows - d.total_len) * row);
    }
    for (int64_t t = 0; t < d.new_len; ++t) write_new(bh, t, dst + (d.past_len + t) * row);
  }
}

// The float-cache attention on q [B, H, T, hd], k, v [B, kvH, T, hd] (already checked as d): the
// cache append into present, then every query row.
void RunFloatCache(OrtKernelContext* ctx, const attn::Kernels& kern, int64_t window, const Dims& d, const float* qd,
                   const float* kd, const float* vd, const float* past_k, const float* past_v, const int64_t* md,
                   float* o, float* pk, float* pv) {
  const int64_t hd = d.head_dim;
  if (d.batch == 0 || d.kv_heads == 0 || hd == 0) return;
  const size_t bytes = sizeof(float) * hd;
  Append(past_k, pk, d, hd, [&](int64_t bh, int64_t t, float* dst) { std::memcpy(dst, kd + (bh * d.new_len + t) * hd, bytes); });
  Append(past_v, pv, d, hd, [&](int64_t bh, int64_t t, float* dst) { std::memcpy(dst, vd + (bh * d.new_len + t) * hd, bytes); });
  if (d.new_len == 0) return;
  const float* kt = KeyBlocks(ctx, d, [&](int64_t bh) { return pk + bh * d.present_rows * hd; });
  ForChunks(ctx, d, [&](int64_t b, int64_t kvh, int64_t t0, int64_t t1) {
    const int64_t bh = b * d.kv_heads + kvh, at = bh * d.present_rows * hd;
    AttendRows(kern, d, window, qd, kt, pk + at, pv + at, md + b * d.total_len, b, kvh, t0, t1, o);
  });
}

// The packed-cache attention: the new rows quantized and packed (KVQuantPack) after the past ones,
// every cache row unpacked once (KVUnpack's floats, the same as QuantDequant's), then every query row.
void RunPackedCache(OrtKernelContext* ctx, const attn::Kernels& kern, int64_t window, const Dims& d, const float* qd,
                    const float* kd, const float* vd, const uint8_t* past_k, const uint8_t* past_v, const int64_t* md,
                    const float* kc, bool k_per_head, const float* vc, bool v_per_head, float* o, uint8_t* pk,
                    uint8_t* pv) {
  const int64_t hd = d.head_dim, row = PackedRowWidth(hd);
  if (d.batch == 0 || d.kv_heads == 0) return;
  Append(past_k, pk, d, row, [&](int64_t bh, int64_t t, uint8_t* dst) {
    PackKvRow(kd + (bh * d.new_len + t) * hd, hd, kc[k_per_head ? bh % d.kv_heads : 0], dst);
  });
  Append(past_v, pv, d, row, [&](int64_t bh, int64_t t, uint8_t* dst) {
    PackKvRow(vd + (bh * d.new_len + t) * hd, hd, vc[v_per_head ? bh % d.kv_heads : 0], dst);
  });
  if (d.new_len == 0) return;
  if (d.new_len == 1) {  // decoding: each task unpacks its KV head's rows as it reads them
    ForChunks(ctx, d, [&](int64_t b, int64_t kvh, int64_t t0, int64_t t1) {
      const int64_t at = (b * d.kv_heads + kvh) * d.present_rows * row;
      AttendChunk(kern, d, window, qd, PackedRows{pk + at, pv + at, row}, md + b * d.total_len, b, kvh, t0, t1, o);
    });
    return;
  }
  const int64_t S = d.total_len, heads = d.batch * d.kv_heads;
  const int64_t blocks = (S + kUnpackRows - 1) / kUnpackRows;
  thread_local std::vector<float> scratch;  // the calling thread's; the tasks below reach it through `rows` only
  Reserve(&scratch, 2 * heads * S * hd);    // (a thread_local named inside them would be the worker's own)
  float* const rows = scratch.data();
  auto unpack = [&](int64_t i) {
    const int64_t bh = i / blocks, j0 = (i % blocks) * kUnpackRows, j1 = std::min(S, j0 + kUnpackRows);
    const uint8_t *sk = pk + bh * d.present_rows * row, *sv = pv + bh * d.present_rows * row;
    float *dk = rows + 2 * bh * S * hd, *dv = dk + S * hd;
    for (int64_t j = j0; j < j1; ++j) {
      UnpackKvRow(sk + j * row, hd, dk + j * hd);
      UnpackKvRow(sv + j * row, hd, dv + j * hd);
    }
  };
  ParallelTasks(ctx, heads * blocks, heads * S * hd, unpack);
  const float* kt = KeyBlocks(ctx, d, [&](int64_t bh) { return rows + 2 * bh * S * hd; });
  ForChunks(ctx, d, [&](int64_t b, int64_t kvh, int64_t t0, int64_t t1) {
    const float* kr = rows + 2 * (b * d.kv_heads + kvh) * S * hd;
    AttendRows(kern, d, window, qd, kt, kr, kr + S * hd, md + b * d.total_len, b, kvh, t0, t1, o);
  });
}

Ort::Status CheckClips(const std::string& op, const Tensor<float>& k_clip, const Tensor<float>& v_clip, int64_t kv_heads) {
  for (const Tensor<float>* clip : {&k_clip, &v_clip})
    if (clip->NumberOfElement() != 1 && clip->NumberOfElement() != kv_heads)
      return Error(op + ": k_clip and v_clip must hold 1 value or one per KV head (" + std::to_string(kv_heads) +
                   "), got " + ShapeStr(clip->Shape()));
  return Ort::Status{nullptr};
}

// The outputs allocated (present with the cache's row count) and the float-cache attention run.
void AttendFloat(OrtKernelContext* ctx, const attn::Kernels& kern, int64_t window, const Dims& d, const float* q,
                 const float* k, const float* v, const Tensor<float>& past_k, const Tensor<float>& past_v,
                 const Tensor<int64_t>& mask, Tensor<float>& out, Tensor<float>& present_k, Tensor<float>& present_v) {
  const int64_t hd = d.head_dim;
  float* o = out.Allocate({d.batch, d.new_len, d.heads * hd});
  float* pk = present_k.Allocate({d.batch, d.kv_heads, d.present_rows, hd});
  float* pv = present_v.Allocate({d.batch, d.kv_heads, d.present_rows, hd});
  RunFloatCache(ctx, kern, window, d, q, k, v, past_k.Data(), past_v.Data(), mask.Data(), o, pk, pv);
}

// The clips checked, the outputs allocated and the packed-cache attention run.
Ort::Status AttendPacked(OrtKernelContext* ctx, const attn::Kernels& kern, int64_t window, const std::string& op,
                         const Dims& d, const float* q, const float* k, const float* v, const Tensor<uint8_t>& past_k,
                         const Tensor<uint8_t>& past_v, const Tensor<int64_t>& mask, const Tensor<float>& k_clip,
                         const Tensor<float>& v_clip, Tensor<float>& out, Tensor<uint8_t>& present_k,
                         Tensor<uint8_t>& present_v) {
  if (auto st = CheckClips(op, k_clip, v_clip, d.kv_heads); !st.IsOK()) return st;
  const int64_t hd = d.head_dim, row = PackedRowWidth(hd);
  float* o = out.Allocate({d.batch, d.new_len, d.heads * hd});
  uint8_t* pk = present_k.Allocate({d.batch, d.kv_heads, d.present_rows, row});
  uint8_t* pv = present_v.Allocate({d.batch, d.kv_heads, d.present_rows, row});
  RunPackedCache(ctx, kern, window, d, q, k, v, past_k.Data(), past_v.Data(), mask.Data(), k_clip.Data(),
                 k_clip.NumberOfElement() != 1, v_clip.Data(), v_clip.NumberOfElement() != 1, o, pk, pv);
  return Ort::Status{nullptr};
}

struct Attention {
  int64_t window = 0;
  attn::Kernels kernels = attn::WidestKernels();

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
    AttendFloat(ctx, kernels, window, d, q.Data(), k.Data(), v.Data(), past_k, past_v, mask, out, present_k, present_v);
    return Ort::Status{nullptr};
  }
};

struct AttentionKV4 {
  int64_t window = 0;
  attn::Kernels kernels = attn::WidestKernels();

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
    return AttendPacked(ctx, kernels, window, op, d, q.Data(), k.Data(), v.Data(), past_k, past_v, mask, k_clip, v_clip, out,
                        present_k, present_v);
  }
};

// RopeAttention / RopeAttentionKV4: what the exporter's chain before the attention op computes,
// fused: the stacked projection qkv [B, T, (H + 2 kvH) hd] split into heads, rotary embedding on q
// and k in float32 (x * cos + rotate_half(x) * sin, each product and the sum rounded), with
// rotate = 1 the online Hadamard of each q and k head (baseq.Hadamard: float64, rounded once;
// head_dim a power of two), and for the float cache with bits > 0 the per-token fake quantizer of
// the new k and v rows (baseq.QuantDequant, clip per KV head or one); then Attention / AttentionKV4.
//   RopeAttention(qkv, cos [T, hd], sin [T, hd], past_K, past_V, attention_mask, k_clip?, v_clip?)
//   RopeAttentionKV4(qkv, cos, sin, past_K uint8, past_V uint8, attention_mask, k_clip, v_clip)
//   attributes: heads, kv_heads, rotate (0/1), window, bits (RopeAttention: KV fake-quant bits, 0 = none)
struct RopeSplit {
  int64_t heads = 0, kv_heads = 0, rotate = 0, window = 0;
  attn::Kernels kernels = attn::WidestKernels();  // R3's butterfly here, the attention loops in the ops below

  RopeSplit(const OrtApi* api, const OrtKernelInfo* info, const char* op)
      : heads(IntAttribute(api, info, "heads", 0)), kv_heads(IntAttribute(api, info, "kv_heads", 0)),
        rotate(IntAttribute(api, info, "rotate", 0)), window(IntAttribute(api, info, "window", 0)) {
    if (heads < 1 || kv_heads < 1 || heads % kv_heads != 0)
      ORT_CXX_API_THROW(std::string(op) + ": attributes heads and kv_heads must be >= 1 with heads a multiple of kv_heads",
                        ORT_INVALID_ARGUMENT);
    if (window < 0) ORT_CXX_API_THROW(std::string(op) + ": attribute window must be >= 0 (0 = none)", ORT_INVALID_ARGUMENT);
  }

  // q [B, H, T, hd], k, v [B, kvH, T, hd] from qkv, rotated (and rotated by R3); shapes for CheckDims.
  Ort::Status Split(OrtKernelContext* ctx, const std::string& op, const Tensor<float>& qkv, const Tensor<float>& cos,
                    const Tensor<float>& sin, std::vector<float>* q, std::vector<float>* k, std::vector<float>* v,
                    std::vector<int64_t>* qs, std::vector<int64_t>* ks) const {
    const auto& s = qkv.Shape();
    const int64_t units = heads + 2 * kv_heads;
    if (s.size() != 3 || s[2] % units != 0 || (s[2] / units) % 2 != 0)
      return Error(op + ": qkv must be [batch, seq, (heads + 2 kv_heads) x head_dim] with an even head_dim, got " +
                   ShapeStr(s) + " for " + std::to_string(heads) + " heads and " + std::to_string(kv_heads) + " KV heads");
    const int64_t B = s[0], T = s[1], hd = s[2] / units, half = hd / 2;
    if (rotate && (hd & (hd - 1)) != 0)
      return Error(op + ": rotate = 1 needs a power-of-two head_dim, got " + std::to_string(hd));
    const std::vector<int64_t> want{T, hd};
    if (cos.Shape() != want || sin.Shape() != want)
      return Error(op + ": cos and sin must be [seq, head_dim] = " + ShapeStr(want) + ", got " + ShapeStr(cos.Shape()) +
                   " and " + ShapeStr(sin.Shape()));
    *qs = {B, heads, T, hd};
    *ks = {B, kv_heads, T, hd};
    q->resize(static_cast<size_t>(B * heads * T * hd));
    k->resize(static_cast<size_t>(B * kv_heads * T * hd));
    v->resize(k->size());
    const float *in = qkv.Data(), *cs = cos.Data(), *sn = sin.Data();
    const double norm = 1.0 / std::sqrt(static_cast<double>(hd));
    const attn::ButterflyFn butterfly = kernels.butterfly;
    ForRows(ctx, B * T, s[2] * 8, [&](int64_t first, int64_t end) {
      std::vector<double> work(static_cast<size_t>(hd));
      for (int64_t r = first; r < end; ++r) {
        const int64_t b = r / T, t = r % T;
        const float* src = in + r * s[2];
        const float *c = cs + t * hd, *sv = sn + t * hd;
        for (int64_t u = 0; u < units; ++u) {
          const float* x = src + u * hd;
          const bool is_q = u < heads, is_v = u >= heads + kv_heads;
          const int64_t h = is_q ? u : (is_v ? u - heads - kv_heads : u - heads);
          float* dst = (is_q ? q->data() + (b * heads + h) * T * hd : (is_v ? v->data() : k->data()) + (b * kv_heads + h) * T * hd) + t * hd;
          if (is_v) {
            std::memcpy(dst, x, sizeof(float) * hd);
            continue;
          }
          for (int64_t i = 0; i < hd; ++i) {
            const float rotated = i < half ? -x[i + half] : x[i - half];
            dst[i] = x[i] * c[i] + rotated * sv[i];
          }
          if (rotate) {
            for (int64_t i = 0; i < hd; ++i) work[i] = static_cast<double>(dst[i]) * norm;
            butterfly(work.data(), hd);
            for (int64_t i = 0; i < hd; ++i) dst[i] = static_cast<float>(work[i]);
          }
        }
      }
    });
    return Ort::Status{nullptr};
  }
};

// The per-token fake quantizer (QuantDequant's arithmetic) on rows [B, kvH, T, hd] in place.
void FakeQuantRows(float* x, const Dims& d, const float* clip, bool per_head, int64_t bits) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  const int64_t hd = d.head_dim;
  for (int64_t r = 0; r < d.batch * d.kv_heads * d.new_len; ++r) {
    float* row = x + r * hd;
    const RowQParams p = RowQParamsOf(row, hd, clip[per_head ? (r / d.new_len) % d.kv_heads : 0], qmax);
    for (int64_t i = 0; i < hd; ++i) row[i] = (Code(row[i], p, qmax) - p.zero) * p.scale;
  }
}

struct RopeAttention : RopeSplit {
  int64_t bits = 0;

  RopeAttention(const OrtApi* api, const OrtKernelInfo* info)
      : RopeSplit(api, info, "baseq.RopeAttention"), bits(IntAttribute(api, info, "bits", 0)) {
    if (bits < 0 || bits > 8) ORT_CXX_API_THROW("baseq.RopeAttention: attribute bits must be in 0..8", ORT_INVALID_ARGUMENT);
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& qkv, const Tensor<float>& cos, const Tensor<float>& sin,
                      const Tensor<float>& past_k, const Tensor<float>& past_v, const Tensor<int64_t>& mask,
                      std::optional<const Tensor<float>*> k_clip, std::optional<const Tensor<float>*> v_clip,
                      Tensor<float>& out, Tensor<float>& present_k, Tensor<float>& present_v) {
    const std::string op = "baseq.RopeAttention";
    std::vector<float> q, k, v;
    std::vector<int64_t> qs, ks;
    if (auto st = Split(ctx, op, qkv, cos, sin, &q, &k, &v, &qs, &ks); !st.IsOK()) return st;
    Dims d;
    if (auto st = CheckDims(op, qs, ks, ks, past_k.Shape(), past_v.Shape(), mask.Shape(), false, &d); !st.IsOK()) return st;
    const bool clips = k_clip.has_value() && *k_clip && v_clip.has_value() && *v_clip;
    if (bits > 0 && !clips) return Error(op + ": bits = " + std::to_string(bits) + " needs the inputs k_clip and v_clip");
    if (bits > 0) {
      if (auto st = CheckClips(op, **k_clip, **v_clip, d.kv_heads); !st.IsOK()) return st;
      FakeQuantRows(k.data(), d, (*k_clip)->Data(), (*k_clip)->NumberOfElement() != 1, bits);
      FakeQuantRows(v.data(), d, (*v_clip)->Data(), (*v_clip)->NumberOfElement() != 1, bits);
    }
    AttendFloat(ctx, kernels, window, d, q.data(), k.data(), v.data(), past_k, past_v, mask, out, present_k, present_v);
    return Ort::Status{nullptr};
  }
};

struct RopeAttentionKV4 : RopeSplit {
  RopeAttentionKV4(const OrtApi* api, const OrtKernelInfo* info) : RopeSplit(api, info, "baseq.RopeAttentionKV4") {}

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& qkv, const Tensor<float>& cos, const Tensor<float>& sin,
                      const Tensor<uint8_t>& past_k, const Tensor<uint8_t>& past_v, const Tensor<int64_t>& mask,
                      const Tensor<float>& k_clip, const Tensor<float>& v_clip, Tensor<float>& out,
                      Tensor<uint8_t>& present_k, Tensor<uint8_t>& present_v) {
    const std::string op = "baseq.RopeAttentionKV4";
    std::vector<float> q, k, v;
    std::vector<int64_t> qs, ks;
    if (auto st = Split(ctx, op, qkv, cos, sin, &q, &k, &v, &qs, &ks); !st.IsOK()) return st;
    Dims d;
    if (auto st = CheckDims(op, qs, ks, ks, past_k.Shape(), past_v.Shape(), mask.Shape(), true, &d); !st.IsOK()) return st;
    return AttendPacked(ctx, kernels, window, op, d, q.data(), k.data(), v.data(), past_k, past_v, mask, k_clip, v_clip, out,
                        present_k, present_v);
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

const OrtCustomOp* RopeAttentionOp() {
  static const OrtCustomOp* op = Ort::Custom::CreateLiteCustomOp<RopeAttention>("RopeAttention", "CPUExecutionProvider");
  return op;
}

const OrtCustomOp* RopeAttentionKV4Op() {
  static const OrtCustomOp* op =
      Ort::Custom::CreateLiteCustomOp<RopeAttentionKV4>("RopeAttentionKV4", "CPUExecutionProvider");
  return op;
}

}  // namespace baseq
