// The operators of the "baseq" domain, one getter per operator (defined next to its kernel).
// Each returns a process-lifetime object: sessions keep pointers to it until the process ends.
#pragma once

struct OrtCustomOp;

namespace baseq {

const OrtCustomOp* HadamardOp();       // hadamard.cc
const OrtCustomOp* QuantDequantOp();   // quantizers.cc
const OrtCustomOp* QuantLevelsOp();    // quantizers.cc
const OrtCustomOp* ScaleSumsOp();      // exact_ops.cc
const OrtCustomOp* RmsNormOp();        // exact_ops.cc
const OrtCustomOp* SwiGLUOp();         // exact_ops.cc
const OrtCustomOp* MaskedSoftmaxOp();  // exact_ops.cc
const OrtCustomOp* KVQuantPackOp();    // kv_cache.cc
const OrtCustomOp* KVUnpackOp();       // kv_cache.cc
const OrtCustomOp* IntLinearOp();      // int_linear_op.cc
const OrtCustomOp* AttentionOp();      // attention.cc
const OrtCustomOp* AttentionKV4Op();   // attention.cc
const OrtCustomOp* RopeAttentionOp();  // attention.cc
const OrtCustomOp* RopeAttentionKV4Op();  // attention.cc

}  // namespace baseq
