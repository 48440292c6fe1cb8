// baseq.IntLinear: the per-token activation quantizer (QuantLevels' code, quantizers.h) fused with
// an exact integer matmul against 4-bit weights (int_linear.h says what is computed).
//
//   IntLinear(X float [..., K], clip float [1], shift float [K]?, gain float [K]?,
//             B uint8 [N, ceil(K/2)], zeros uint8 [N, G], W_scales float [N, G], bias float [N]?,
//             residual float [..., N]?)
//     -> Y float [..., N]      (+ residual in float32 after the bias: the block's residual Add fused)
//   attributes: bits (activation bits, 1..8), group_size (k per weight group; 0 or >= K: one
//   group, G = 1; else G = ceil(K / group_size)).
//
// Written with Ort::CustomOpBase rather than the lite API because shift and gain are optional
// inputs in the middle ("" in the node): the lite API cannot read an absent middle input.
// Constant weights (initializers) are repacked once per node and K and reused; weights fed as
// graph inputs are repacked on every call. The kernel for this CPU is picked when the session is
// made; BASEQ_INT_LINEAR_ISA=scalar|avx2|avxvnni|avx512vnni|neon|neondot forces one (tests).
#include <cstdlib>
#include <memory>
#include <mutex>

#include "int_linear_pack.h"
#include "ops.h"
#include "quantizers.h"

namespace baseq {
namespace {

using intlin::Isa;

constexpr const char* kOp = "baseq.IntLinear";
constexpr int64_t kMaxK = 1 << 19;            // int32 partial sums stay exact below this (255 * 15 * K < 2^31)
constexpr int64_t kRowChunk = 64;             // rows per task at prefill (a multiple of every kernel's tile)
constexpr int64_t kTaskMacs = int64_t{1} << 18;  // multiply-adds per parallel task, roughly
constexpr int64_t kMinTasks = 16;  // at least this many column tasks for a few rows (decoding), when there are blocks

enum Input { kX, kClip, kShift, kGain, kB, kZeros, kScales, kBias, kResidual, kInputs };

// Runs the tile kernel over rows x column blocks on onnxruntime's intra-op threads: tasks of up
// to 64 rows times enough column blocks for ~2^18 multiply-adds; a task's blocks stay in cache
// while its rows stream by. A few rows (decoding) get at least kMinTasks column tasks, and the
// threads claim tasks one by one: onnxruntime's default batches split the tasks into one
// contiguous range per thread, so 3 tasks on 2 threads left one thread with two thirds of the
// weights to stream.
void RunTiles(OrtKernelContext* ctx, intlin::TileFn tiles, const intlin::Weights& w, const intlin::Rows& x,
              const intlin::Out& o, int64_t rows) {
  const int64_t row_chunk = rows < kRowChunk ? rows : kRowChunk;
  const int64_t row_tasks = (rows + row_chunk - 1) / row_chunk;
  const int64_t per_block = row_chunk * intlin::kCols * std::max<int64_t>(w.k, 1);
  int64_t blocks_per_task = std::clamp<int64_t>((kTaskMacs + per_block - 1) / per_block, 1, std::max<int64_t>(w.blocks, 1));
  if (row_tasks == 1) blocks_per_task = std::min(blocks_per_task, std::max<int64_t>(1, w.blocks / kMinTasks));
  const int64_t block_tasks = (w.blocks + blocks_per_task - 1) / blocks_per_task;
  blocks_per_task = (w.blocks + block_tasks - 1) / block_tasks;  // even shares
  const int64_t tasks = row_tasks * block_tasks;
  struct Job {
    intlin::TileFn tiles;
    const intlin::Weights* w;
    const intlin::Rows* x;
    const intlin::Out* o;
    int64_t rows, row_chunk, row_tasks, blocks_per_task;
  } job{tiles, &w, &x, &o, rows, row_chunk, row_tasks, blocks_per_task};
  auto run = [](void* data, size_t t) {
    const auto* j = static_cast<const Job*>(data);
    const int64_t rt = static_cast<int64_t>(t) % j->row_tasks, bt = static_cast<int64_t>(t) / j->row_tasks;
    const int64_t r0 = rt * j->row_chunk, b0 = bt * j->blocks_per_task;
    j->tiles(*j->w, *j->x, *j->o, r0, std::min(j->rows, r0 + j->row_chunk), b0,
             std::min(j->w->blocks, b0 + j->blocks_per_task));
  };
  if (tasks <= 1) {
    if (tasks == 1) run(&job, 0);
    return;
  }
  Ort::KernelContext(ctx).ParallelFor(run, static_cast<size_t>(tasks), static_cast<size_t>(tasks), &job);
}

class IntLinearKernel : public RowQuantizer {
 public:
  IntLinearKernel(const OrtApi& api, const OrtKernelInfo* info) : RowQuantizer(&api, info, kOp) {
    group_size_ = IntAttribute(&api, info, "group_size", 0);
    if (group_size_ < 0)
      ORT_CXX_API_THROW(std::string(kOp) + ": attribute group_size must be >= 0 (0 = one group), got " +
                            std::to_string(group_size_),
                        ORT_INVALID_ARGUMENT);
    isa_ = intlin::BestIsa();
    if (const char* forced = std::getenv("BASEQ_INT_LINEAR_ISA"); forced && *forced) {
      if (!intlin::IsaFromName(forced, &isa_) || !intlin::IsaAvailable(isa_))
        ORT_CXX_API_THROW(std::string(kOp) + ": BASEQ_INT_LINEAR_ISA=" + forced +
                              " is not a kernel this build and CPU run (best here: " + intlin::IsaName(intlin::BestIsa()) + ")",
                          ORT_INVALID_ARGUMENT);
    }
    tiles_ = intlin::TileKernel(isa_);
    codes_ = intlin::CodesKernel(isa_);
    // Weights that are initializers never change: repack them once. Anything else is repacked per call.
    constant_weights_ = true;
    Ort::ConstKernelInfo ki(info);
    for (size_t i : {kB, kZeros, kScales}) {
      int is_constant = 0;
      try {
        ki.GetTensorConstantInput(i, &is_constant);
      } catch (const Ort::Exception&) {
        is_constant = 0;
      }
      constant_weights_ = constant_weights_ && is_constant != 0;
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    try {
      return Compute(ctx).release();
    } catch (const Ort::Exception& e) {
      return Ort::Status(e).release();
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_FAIL).release();
    }
  }

 private:
  // The repacked weights for these inputs: the cached copy when the weights are constant and the
  // same tensors (data pointers and shapes) as when it was made, else a fresh one.
  Ort::Status Packed(const uint8_t* b, const uint8_t* zeros, const float* scales, int64_t n, int64_t k, int64_t groups,
                     std::shared_ptr<const intlin::PackedWeights>* out) {
    const Key key{b, zeros, scales, n, k, groups};
    if (constant_weights_) {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ && cached_key_ == key) {
        *out = cached_;
        return Ort::Status{nullptr};
      }
    }
    auto packed = std::make_shared<intlin::PackedWeights>();
    std::string err = intlin::PackWeights(b, zeros, scales, n, k, group_size_, groups, packed.get());
    if (!err.empty()) return Error(std::string(kOp) + ": " + err);
    if (constant_weights_) {
      std::lock_guard<std::mutex> lock(mu_);
      cached_ = packed;
      cached_key_ = key;
    }
    *out = std::move(packed);
    return Ort::Status{nullptr};
  }

  Ort::Status Compute(OrtKernelContext* ctx) {
    Ort::KernelContext kc(ctx);
    const size_t given = kc.GetInputCount();
    auto present = [&](size_t i) { return i < given && static_cast<const OrtValue*>(kc.GetInput(i)) != nullptr; };
    for (size_t i : {kX, kClip, kB, kZeros, kScales})
      if (!present(i)) return Error(std::string(kOp) + ": input " + std::to_string(i) + " is required");
    Tensor<float> x(ctx, kX, true), clip(ctx, kClip, true), scales(ctx, kScales, true);
    Tensor<uint8_t> b(ctx, kB, true), zeros(ctx, kZeros, true);
    std::optional<Tensor<float>> shift, gain, bias, residual;
    if (present(kShift)) shift.emplace(ctx, kShift, true);
    if (present(kGain)) gain.emplace(ctx, kGain, true);
    if (present(kBias)) bias.emplace(ctx, kBias, true);
    if (present(kResidual)) residual.emplace(ctx, kResidual, true);

    const std::vector<int64_t> xs = x.Shape();
    if (xs.empty()) return Error(std::string(kOp) + ": input X must have rank >= 1, got a scalar");
    const int64_t k = xs.back();
    if (k > kMaxK) return Error(std::string(kOp) + ": K = " + std::to_string(k) + " is above the supported " + std::to_string(kMaxK));
    const std::vector<int64_t> bs = b.Shape(), zs = zeros.Shape(), ss = scales.Shape();
    if (bs.size() != 2 || bs[1] != (k + 1) / 2)
      return Error(std::string(kOp) + ": B must be uint8 [N, ceil(K/2)] = [N, " + std::to_string((k + 1) / 2) +
                   "] for X " + ShapeStr(xs) + ", got " + ShapeStr(bs));
    const int64_t n = bs[0];
    if (zs.size() != 2 || zs[0] != n || zs[1] < 1)
      return Error(std::string(kOp) + ": zeros must be uint8 [N, G] = [" + std::to_string(n) + ", G >= 1], got " + ShapeStr(zs));
    if (ss != zs)
      return Error(std::string(kOp) + ": W_scales must have the shape of zeros " + ShapeStr(zs) + ", got " + ShapeStr(ss));
    const int64_t groups = zs[1];
    const float* bias_data = nullptr;
    if (bias) {
      if (bias->NumberOfElement() != n || bias->Shape().size() != 1)
        return Error(std::string(kOp) + ": bias must be float [N] = [" + std::to_string(n) + "], got " +
                     ShapeStr(bias->Shape()));
      bias_data = bias->Data();
    }
    std::shared_ptr<const intlin::PackedWeights> packed;
    if (auto st = Packed(b.Data(), zeros.Data(), scales.Data(), n, k, groups, &packed); !st.IsOK()) return st;
    const intlin::Weights& w = packed->view;

    int64_t rows = 1;
    for (size_t i = 0; i + 1 < xs.size(); ++i) rows *= xs[i];
    const int64_t stride = w.groups * w.chunks_per_group * intlin::kChunk;
    std::vector<uint8_t> q(static_cast<size_t>(rows * stride), 0);
    std::vector<int32_t> qsum(static_cast<size_t>(rows * w.groups), 0);
    std::vector<float> zero(static_cast<size_t>(rows), 0.0f), scale(static_cast<size_t>(rows), 1.0f);  // K = 0: QuantLevels' scale 1
    std::vector<int64_t> ys = xs;
    ys.back() = n;
    if (residual && residual->Shape() != ys)
      return Error(std::string(kOp) + ": residual must have the output's shape " + ShapeStr(ys) + ", got " +
                   ShapeStr(residual->Shape()));
    Tensor<float> y(ctx, 0, false);
    float* out = nullptr;
    auto to_opt = [](std::optional<Tensor<float>>& t) -> std::optional<const Tensor<float>*> {
      if (t) return &*t;
      return std::nullopt;
    };
    auto st = ForEachRow(ctx, x, clip, to_opt(shift), to_opt(gain), [&] { out = y.Allocate(ys); },
                         [&](int64_t r, const float* buf, const RowQParams& p, float qmax) {
                           thread_local std::vector<uint8_t> codes;
                           codes.resize(static_cast<size_t>(k));
                           codes_(buf, k, p.scale, p.zero, qmax, codes.data());  // Code() of each value
                           intlin::PackRow(w, codes.data(), q.data() + r * stride, qsum.data() + r * w.groups);
                           zero[r] = p.zero;
                           scale[r] = p.scale;
                         });
    if (!st.IsOK()) return st;
    if (rows == 0 || n == 0) return Ort::Status{nullptr};
    const intlin::Rows xr{q.data(), stride, qsum.data(), zero.data(), scale.data()};
    const intlin::Out o{out, bias_data};
    RunTiles(ctx, tiles_, w, xr, o, rows);
    for (int64_t r = 0; r < rows; ++r)
      if (!intlin::RowIsExact(xr, r)) intlin::SlowRow(w, xr, o, r);
    if (residual) {
      const float* res = residual->Data();
      for (int64_t i = 0; i < rows * n; ++i) out[i] = out[i] + res[i];
    }
    return Ort::Status{nullptr};
  }

  struct Key {
    const void *b = nullptr, *zeros = nullptr, *scales = nullptr;
    int64_t n = -1, k = -1, groups = -1;
    bool operator==(const Key& o) const {
      return b == o.b && zeros == o.zeros && scales == o.scales && n == o.n && k == o.k && groups == o.groups;
    }
  };

  int64_t group_size_ = 0;
  Isa isa_ = Isa::kScalar;
  intlin::TileFn tiles_ = nullptr;
  intlin::CodesFn codes_ = nullptr;
  bool constant_weights_ = false;
  std::mutex mu_;
  std::shared_ptr<const intlin::PackedWeights> cached_;
  Key cached_key_;
};

struct IntLinearOpDef : Ort::CustomOpBase<IntLinearOpDef, IntLinearKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new IntLinearKernel(api, info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, e.what());
    }
  }
  const char* GetName() const { return "IntLinear"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return (i == kB || i == kZeros) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return (i == kShift || i == kGain || i == kBias || i == kResidual) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* IntLinearOp() {
  static const IntLinearOpDef* op = new IntLinearOpDef();
  return op;
}

}  // namespace baseq
