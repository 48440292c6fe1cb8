"""Quantizer primitives: one source of truth for every integer number format in the project.

layout (byte layouts), floats (fp16 arithmetic), weights (the weight format and its rounding),
qparams (choosing a grid's parameters, RTN), gptq, activations (activation and KV quantizers), ggml_codecs
(llama.cpp's block types as grid + codes; import it as quant.ggml_codecs, its ggml_quantize loads llama_cpp).
"""

from .activations import (ACT_SCALE_EPS, INT8_BLOCK_QMAX, IntActivation, fake_quant_int8_blocks, fake_quant_kv,
                          fake_quant_per_token, per_token_qparams, quantize_per_token)
from .floats import FP16_MAX, FP16_TINY, fp16_ceil, fp16_floor, fp16_round
from .gptq import GptqFactor, HessianAccumulator, gptq_factor, gptq_quantize
from .layout import (GGML_BLOCK, KV_ROW_TAIL, dequantize_kv_rows, ggml_q4_blocks, matmul_nbits_bytes, pack_int4,
                     pack_kv_rows, packed_kv_row_width, unpack_int4, unpack_kv_rows)
from .qparams import (choose_qparams, choose_qparams_q4_0, choose_qparams_q4_1, choose_weight_qparams, fit_q4_0,
                      fit_q4_1, mse_clip_search, rtn_quantize, search_weight_qparams)
from .weights import (Q4_0_ZERO, WEIGHT_GRIDS, QuantizedWeight, dequant_values, dequantize, dequantize_weight,
                      quant_values, quantize, rescale_rows)

__all__ = [
    "ACT_SCALE_EPS", "FP16_MAX", "FP16_TINY", "GGML_BLOCK", "INT8_BLOCK_QMAX", "KV_ROW_TAIL", "Q4_0_ZERO",
    "WEIGHT_GRIDS", "GptqFactor", "HessianAccumulator", "IntActivation", "QuantizedWeight", "choose_qparams",
    "choose_qparams_q4_0", "choose_qparams_q4_1", "choose_weight_qparams", "dequant_values", "dequantize",
    "dequantize_kv_rows", "dequantize_weight", "fake_quant_int8_blocks", "fake_quant_kv", "fake_quant_per_token",
    "fit_q4_0", "fit_q4_1", "fp16_ceil", "fp16_floor", "fp16_round", "ggml_q4_blocks", "gptq_factor",
    "gptq_quantize", "matmul_nbits_bytes", "mse_clip_search", "pack_int4", "pack_kv_rows", "packed_kv_row_width",
    "per_token_qparams", "quant_values", "quantize", "quantize_per_token", "rescale_rows", "rtn_quantize",
    "search_weight_qparams", "unpack_int4", "unpack_kv_rows",
]
