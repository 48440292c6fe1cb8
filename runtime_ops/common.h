// Shared helpers of the baseq onnxruntime custom ops: error statuses, shape strings, attributes,
// optional-vector checks and a row-parallel loop on onnxruntime's intra-op thread pool.
// Every translation unit that talks to onnxruntime includes onnxruntime through this header, so
// all of them agree on ORT_API_MANUAL_INIT (the API pointer is set once in RegisterCustomOps).
#pragma once

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace baseq {

using Ort::Custom::Tensor;

constexpr int64_t kParallelGrain = 1 << 15;  // elements per parallel task of ForRows

inline Ort::Status Error(const std::string& msg) { return Ort::Status(msg.c_str(), ORT_INVALID_ARGUMENT); }

inline std::string ShapeStr(const std::vector<int64_t>& s) {
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

// An optional int attribute, or `fallback` when the node does not set it.
inline int64_t IntAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t fallback) {
  int64_t value = fallback;
  OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &value);
  if (st != nullptr) {
    api->ReleaseStatus(st);
    return fallback;
  }
  return value;
}

// Checks that a per-channel vector (optional) holds n values; *data = its values or nullptr.
inline Ort::Status CheckVector(const char* op, const char* what, std::optional<const Tensor<float>*> v, int64_t n,
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

}  // namespace baseq
