// A greedy decoder over onnxruntime's C API, for an export's graph with the shared past/present KV buffer
// (baseq_export.export.onnx_native drives it through ctypes). Each step is one RunWithBinding plus the argmax
// in C++: the id, the mask and the logits live in buffers bound once, the KV cache in one buffer per layer that
// the attention ops write in place (as onnxruntime-genai's shared past/present buffer), so a decoded token
// costs the graph and a few microseconds, with no Python between the runs.
//
// It runs on whichever onnxruntime the caller passes (OrtGetApiBase of the wheel's libonnxruntime.so, the
// library onnxruntime-genai runs on), holds its API pointer itself and registers this library's ops into its own
// session. The graph's inputs describe it: input_ids [1, T] int64, attention_mask [1, P + T] int64,
// past_key_values.{i}.{key,value} [1, kv_heads, P, width] (float32 or packed uint8), outputs logits [1, T, V]
// (or [1, 1, V]: the last position's only, as the export's *.last.onnx graph gives) and present.* (bound to the
// past buffers).
//
//   void* baseq_runner_open(const OrtApiBase*, const char* model, int threads, int64_t capacity, char* err, size_t)
//   int64_t baseq_runner_step(void*, const int64_t* ids, int64_t n, float* logits_out, char* err, size_t)
//       -> the greedy token after the n ids (the first of equal maxima; a NaN counts as the maximum, as
//          numpy's and torch's argmax), -1 on error (err says why); logits_out (nullable) gets the last
//          position's logits
//   void baseq_runner_reset(void*): start a new sequence in the same session and buffers
//   int64_t baseq_runner_vocab(void*), int64_t baseq_runner_capacity(void*), void baseq_runner_close(void*)
//   int64_t baseq_greedy_argmax(const float* v, int64_t n): the step's greedy rule on its own

#include "onnxruntime_c_api.h"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base);

// The greedy token of one position: the first of equal maxima; a NaN is the maximum (its first occurrence), as
// numpy.argmax and torch.argmax. A scalar loop with a branch per value cost 30-60 us on 49,152 logits (1% of a
// decode step), so this takes two passes over 16 values at a time in GCC/Clang vector types (SSE2 on any
// x86-64, NEON on aarch64): the maximum and whether any value is NaN, then the first index holding it.
namespace {

typedef float F4 __attribute__((vector_size(16)));
typedef int32_t I4 __attribute__((vector_size(16)));

inline F4 Load(const float* p) {
  F4 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

inline bool Any(I4 m) { return (m[0] | m[1] | m[2] | m[3]) != 0; }

// The first index whose value satisfies `match` (elementwise on F4 and on float; there is one).
template <typename VecMatch, typename Match>
int64_t FirstIndex(const float* v, int64_t n, VecMatch vec_match, Match match) {
  int64_t b = 0;
  for (; b + 16 <= n; b += 16)
    if (Any(vec_match(Load(v + b)) | vec_match(Load(v + b + 4)) | vec_match(Load(v + b + 8)) |
            vec_match(Load(v + b + 12))))
      break;
  for (int64_t k = b; k < n; ++k)
    if (match(v[k])) return k;
  return 0;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int64_t baseq_greedy_argmax(const float* v, int64_t n) {
  float top = v[0];
  bool nan = false;
  int64_t i = 0;
  if (n >= 16) {
    F4 m[4] = {Load(v), Load(v + 4), Load(v + 8), Load(v + 12)};
    I4 unordered = {0, 0, 0, 0};
    for (; i + 16 <= n; i += 16)
      for (int j = 0; j < 4; ++j) {
        const F4 x = Load(v + i + 4 * j);
        m[j] = x > m[j] ? x : m[j];
        unordered |= x != x;
      }
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 4; ++l) top = m[j][l] > top ? m[j][l] : top;
    nan = Any(unordered);
  }
  for (; i < n; ++i) {
    top = v[i] > top ? v[i] : top;
    nan = nan || v[i] != v[i];
  }
  if (nan) return FirstIndex(v, n, [](F4 x) { return x != x; }, [](float x) { return x != x; });
  const F4 t = {top, top, top, top};
  return FirstIndex(v, n, [t](F4 x) { return x == t; }, [top](float x) { return x == top; });
}

namespace {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An OrtValue released when it goes out of scope (a binding keeps its own reference).
struct Value {
  explicit Value(const OrtApi* api) : api(api) {}
  ~Value() {
    if (value) api->ReleaseValue(value);
  }
  Value(const Value&) = delete;
  Value& operator=(const Value&) = delete;
  const OrtApi* api;
  OrtValue* value = nullptr;
};

class Runner {
 public:
  Runner(const OrtApiBase* base, const char* model, int threads, int64_t capacity) : capacity_(capacity) {
    api_ = base->GetApi(ORT_API_VERSION);
    try {
      Open(base, model, threads);
    } catch (...) {
      Release();  // a constructor that throws runs no destructor
      throw;
    }
  }

  ~Runner() { Release(); }

  int64_t vocab() const { return vocab_; }
  int64_t capacity() const { return capacity_; }
  void Reset() { seen_ = 0; }  // rows past the mask are never read, so the old ones need no clearing

 private:
  void Open(const OrtApiBase* base, const char* model, int threads) {
    if (api_ == nullptr) throw Failure("this onnxruntime is older than the headers the op library was built with");
    if (capacity_ < 1) throw Failure("the KV buffer needs room for at least one token");
    Check(api_->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "baseq-runner", &env_));
    OrtSessionOptions* options = nullptr;
    Check(api_->CreateSessionOptions(&options));
    std::unique_ptr<OrtSessionOptions, void (*)(OrtSessionOptions*)> hold(options, api_->ReleaseSessionOptions);
    if (threads > 0) Check(api_->SetIntraOpNumThreads(options, threads));
    Check(api_->SetInterOpNumThreads(options, 1));
    Check(RegisterCustomOps(options, base));
    Check(api_->CreateSession(env_, model, options, &session_));
    Check(api_->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpu_));
    Check(api_->CreateIoBinding(session_, &binding_));
    BindCache();
    ones_.assign(capacity_, 1);
    logits_.resize(vocab_);
    Check(api_->CreateTensorWithDataAsOrtValue(cpu_, one_id_, sizeof(one_id_), kOneShape, 2,
                                               ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &one_id_value_));
    const int64_t logits_shape[3] = {1, 1, vocab_};
    Check(api_->CreateTensorWithDataAsOrtValue(cpu_, logits_.data(), logits_.size() * sizeof(float), logits_shape, 3,
                                               ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &logits_one_));
  }

  void Release() {
    if (api_ == nullptr) return;
    for (OrtValue* v : values_) api_->ReleaseValue(v);
    if (one_id_value_) api_->ReleaseValue(one_id_value_);
    if (logits_one_) api_->ReleaseValue(logits_one_);
    if (binding_) api_->ReleaseIoBinding(binding_);
    if (cpu_) api_->ReleaseMemoryInfo(cpu_);
    if (session_) api_->ReleaseSession(session_);
    if (env_) api_->ReleaseEnv(env_);
  }

 public:
  int64_t Step(const int64_t* ids, int64_t n, float* logits_out) {
    if (n < 1) throw Failure("a step needs at least one token id");
    if (seen_ + n > capacity_)
      throw Failure("the KV buffer holds " + std::to_string(capacity_) + " tokens and this step would make " +
                    std::to_string(seen_ + n) + "; generate fewer tokens or export with a larger --max-length");
    for (int64_t i = 0; i < n; ++i)
      if (ids[i] < 0 || ids[i] >= vocab_)
        throw Failure("token id " + std::to_string(ids[i]) + " is outside the vocabulary [0, " + std::to_string(vocab_) + ")");
    const int64_t mask_shape[2] = {1, seen_ + n};
    Value mask(api_);
    Check(api_->CreateTensorWithDataAsOrtValue(cpu_, ones_.data(), (seen_ + n) * sizeof(int64_t), mask_shape, 2,
                                               ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &mask.value));
    Check(api_->BindInput(binding_, "attention_mask", mask.value));
    const float* last = nullptr;
    if (n == 1) {
      one_id_[0] = ids[0];
      if (!decoding_) {  // bound once for all one-token steps
        Check(api_->BindInput(binding_, "input_ids", one_id_value_));
        Check(api_->BindOutput(binding_, "logits", logits_one_));
        decoding_ = true;
      }
      Check(api_->RunWithBinding(session_, nullptr, binding_));
      last = logits_.data();
    } else {
      // A prompt. Its ids, and the logits of every position where the graph gives them all, live in buffers kept
      // between prompts (a later prompt of that length touches no new pages) and bound only for this run; a
      // last-position graph writes into the one-token logits buffer.
      prompt_ids_.assign(ids, ids + n);
      const int64_t ids_shape[2] = {1, n};
      Value ids_value(api_), all_logits(api_);
      Check(api_->CreateTensorWithDataAsOrtValue(cpu_, prompt_ids_.data(), n * sizeof(int64_t), ids_shape, 2,
                                                 ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &ids_value.value));
      if (!last_only_) {
        const size_t count = static_cast<size_t>(n) * vocab_;
        if (prompt_logits_.size() < count) prompt_logits_.resize(count);
        const int64_t logits_shape[3] = {1, n, vocab_};
        Check(api_->CreateTensorWithDataAsOrtValue(cpu_, prompt_logits_.data(), count * sizeof(float), logits_shape, 3,
                                                   ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &all_logits.value));
      }
      decoding_ = false;  // input_ids (and logits) are bound to this prompt's tensors until the run is done
      Check(api_->BindInput(binding_, "input_ids", ids_value.value));
      Check(api_->BindOutput(binding_, "logits", last_only_ ? logits_one_ : all_logits.value));
      OrtStatus* run = api_->RunWithBinding(session_, nullptr, binding_);
      // back to the one-token tensors: the binding holds the prompt's buffers only while they are its
      OrtStatus* rebind = api_->BindInput(binding_, "input_ids", one_id_value_);
      if (rebind == nullptr) rebind = api_->BindOutput(binding_, "logits", logits_one_);
      decoding_ = rebind == nullptr;
      if (run != nullptr && rebind != nullptr) api_->ReleaseStatus(rebind);  // report the run's error
      Check(run);
      Check(rebind);
      last = last_only_ ? logits_.data() : prompt_logits_.data() + static_cast<size_t>(n - 1) * vocab_;
    }
    seen_ += n;
    if (logits_out) std::memcpy(logits_out, last, vocab_ * sizeof(float));
    return baseq_greedy_argmax(last, vocab_);
  }

 private:
  static constexpr int64_t kOneShape[2] = {1, 1};

  void Check(OrtStatus* status) {
    if (status == nullptr) return;
    std::string msg = api_->GetErrorMessage(status);
    api_->ReleaseStatus(status);
    throw Failure(msg);
  }

  std::string Name(size_t i, bool input) {
    OrtAllocator* alloc = nullptr;
    Check(api_->GetAllocatorWithDefaultOptions(&alloc));
    char* raw = nullptr;
    Check(input ? api_->SessionGetInputName(session_, i, alloc, &raw) : api_->SessionGetOutputName(session_, i, alloc, &raw));
    std::string name(raw);
    Check(api_->AllocatorFree(alloc, raw));
    return name;
  }

  // Element type and shape of input or output i.
  std::pair<ONNXTensorElementDataType, std::vector<int64_t>> Info(size_t i, bool input) {
    OrtTypeInfo* type = nullptr;
    Check(input ? api_->SessionGetInputTypeInfo(session_, i, &type) : api_->SessionGetOutputTypeInfo(session_, i, &type));
    std::unique_ptr<OrtTypeInfo, void (*)(OrtTypeInfo*)> hold(type, api_->ReleaseTypeInfo);
    const OrtTensorTypeAndShapeInfo* tensor = nullptr;
    Check(api_->CastTypeInfoToTensorInfo(type, &tensor));
    if (tensor == nullptr) throw Failure("input or output " + Name(i, input) + " is not a tensor");
    ONNXTensorElementDataType elem;
    size_t rank = 0;
    Check(api_->GetTensorElementType(tensor, &elem));
    Check(api_->GetDimensionsCount(tensor, &rank));
    std::vector<int64_t> dims(rank);
    Check(api_->GetDimensions(tensor, dims.data(), rank));
    return {elem, dims};
  }

  // One zeroed buffer of `capacity` rows per past_key_values input, bound as that past and as its present.
  void BindCache() {
    size_t inputs = 0, outputs = 0;
    Check(api_->SessionGetInputCount(session_, &inputs));
    Check(api_->SessionGetOutputCount(session_, &outputs));
    const std::string past = "past_key_values.";
    for (size_t i = 0; i < inputs; ++i) {
      std::string name = Name(i, true);
      if (name.compare(0, past.size(), past) != 0) continue;
      auto [elem, dims] = Info(i, true);
      if (dims.size() != 4 || dims[1] <= 0 || dims[3] <= 0)
        throw Failure(name + " is not a [batch, kv_heads, past, width] cache with fixed kv_heads and width");
      size_t item = elem == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? 4 : elem == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 ? 1 : 0;
      if (item == 0) throw Failure(name + " is neither a float32 nor a packed uint8 cache");
      const int64_t shape[4] = {1, dims[1], capacity_, dims[3]};
      buffers_.emplace_back(static_cast<size_t>(dims[1] * capacity_ * dims[3]) * item, 0);
      OrtValue* value = nullptr;
      Check(api_->CreateTensorWithDataAsOrtValue(cpu_, buffers_.back().data(), buffers_.back().size(), shape, 4, elem, &value));
      values_.push_back(value);
      Check(api_->BindInput(binding_, name.c_str(), value));
      Check(api_->BindOutput(binding_, ("present." + name.substr(past.size())).c_str(), value));
    }
    if (buffers_.empty()) throw Failure("the graph has no past_key_values inputs: it is not a decoder with a KV cache");
    for (size_t i = 0; i < outputs; ++i)
      if (Name(i, false) == "logits") {
        auto [elem, dims] = Info(i, false);
        if (elem != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || dims.size() != 3 || dims[2] <= 0)
          throw Failure("the graph's logits are not float32 [batch, tokens, vocab] with a fixed vocab");
        vocab_ = dims[2];
        last_only_ = dims[1] == 1;  // [batch, 1, vocab]: the last position's logits only, for any prompt
      }
    if (vocab_ == 0) throw Failure("the graph has no logits output");
  }

  const OrtApi* api_ = nullptr;
  OrtEnv* env_ = nullptr;
  OrtSession* session_ = nullptr;
  OrtMemoryInfo* cpu_ = nullptr;
  OrtIoBinding* binding_ = nullptr;
  OrtValue* one_id_value_ = nullptr;
  OrtValue* logits_one_ = nullptr;
  std::vector<std::vector<uint8_t>> buffers_;  // one per past input; never resized after binding
  std::vector<OrtValue*> values_;
  std::vector<int64_t> ones_, prompt_ids_;
  std::vector<float> logits_, prompt_logits_;
  int64_t one_id_[1] = {0};
  int64_t capacity_ = 0, seen_ = 0, vocab_ = 0;
  bool decoding_ = false, last_only_ = false;
};

void Report(const std::exception& e, char* err, size_t len) {
  if (err && len) std::snprintf(err, len, "%s", e.what());
}

}  // namespace

extern "C" __attribute__((visibility("default"))) void* baseq_runner_open(const OrtApiBase* base, const char* model,
                                                                        int threads, int64_t capacity, char* err,
                                                                        size_t err_len) {
  try {
    return new Runner(base, model, threads, capacity);
  } catch (const std::exception& e) {
    Report(e, err, err_len);
    return nullptr;
  }
}

extern "C" __attribute__((visibility("default"))) int64_t baseq_runner_step(void* runner, const int64_t* ids, int64_t n,
                                                                          float* logits_out, char* err, size_t err_len) {
  try {
    return static_cast<Runner*>(runner)->Step(ids, n, logits_out);
  } catch (const std::exception& e) {
    Report(e, err, err_len);
    return -1;
  }
}

extern "C" __attribute__((visibility("default"))) int64_t baseq_runner_vocab(void* runner) {
  return static_cast<Runner*>(runner)->vocab();
}

extern "C" __attribute__((visibility("default"))) int64_t baseq_runner_capacity(void* runner) {
  return static_cast<Runner*>(runner)->capacity();
}

extern "C" __attribute__((visibility("default"))) void baseq_runner_reset(void* runner) {
  static_cast<Runner*>(runner)->Reset();
}

extern "C" __attribute__((visibility("default"))) void baseq_runner_close(void* runner) {
  delete static_cast<Runner*>(runner);
}
