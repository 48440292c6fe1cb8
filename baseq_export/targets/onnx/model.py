"""The ONNX graph of a .baseq artifact (standard ONNX ops + com.microsoft MatMulNBits [+ our baseq ops]).

The graph is the artifact's reference forward (reference.reference_model, exact mode) written out:
4-bit linears as MatMulNBits with packed zero points; on 4-bit activations (per-channel weights)
an integer matmul (MatMulNBits with unit scales on the activation's integer levels) rescaled in
float64, else per-block scales with the folded bias as its bias input; norms, attention, SwiGLU
and online Hadamards in float64 rounded once; per-token activation and KV quantizers as our
baseq ops or from Reduce/Round/Clip; the KV cache as past/present tensors so decoding is
incremental. onnxruntime so computes the reference's float32 values, not merely close ones.
Inputs: ``input_ids`` [batch, seq], ``attention_mask`` [batch, past + seq] and
``past_key_values.{i}.key|value`` [batch, kv_heads, past, row]; outputs: ``logits`` and
``present.{i}.key|value``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ...artifact import Artifact
from ...artifact_tensors import head_from_tensors, linear_from_tensors
from ...models.base import ModelConfig, linear_in_features, rope_tables, site_width
from ...quant import QuantizedWeight, pack_int4, packed_kv_row_width
from .graph import (MS_DOMAIN, OPS_DOMAIN, ExternalData, Graph, emit_fake_quant, emit_hadamard, emit_hadamard_op,
                         emit_quant_dequant_op, emit_quant_levels, emit_quant_levels_op, emit_rms_norm,
                         emit_swiglu, matmul_nbits_inputs, to_double, to_float)

OPSET = 18
OPS_CHOICES = ("custom", "standard")
KV_CACHE_CHOICES = ("float", "int4")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class _Ctx:
    """What the per-layer emitters need: the graph, config, artifact tensors and quant settings."""

    def __init__(self, g: Graph, cfg: ModelConfig, art: Artifact, ops: str, kv_cache: str):
        self.g, self.cfg, self.art, self.t, self.custom = g, cfg, art, art.tensors, ops == "custom"
        self.kv_packed = kv_cache == "int4"
        rot = art.quant.get("rotation") or {}
        self.r3, self.r4 = bool(rot.get("r3")), bool(rot.get("r4"))
        self.a_bits, self.kv_bits = art.quant.get("a_bits"), art.quant.get("kv_bits")
        self.made: set[str] = set()  # artifact tensors already in the graph
        self.nbits: dict[tuple[str, bool], tuple[list[str], int]] = {}  # matmul_nbits_weights, made once per weight

    def tensor(self, name: str) -> str | None:
        """Initializer for an artifact tensor (float32, made once), or None if the artifact has no such tensor."""
        if name not in self.t:
            return None
        if name not in self.made:
            self.made.add(self.g.init(name, _np(self.t[name].to(torch.float32))))
        return name


def hadamard(c: _Ctx, x: str, n: int) -> str:
    return emit_hadamard_op(c.g, x, n) if c.custom else emit_hadamard(c.g, x, n)


def rms_norm(c: _Ctx, x: str, weight: str | None) -> str:
    """models.base.rms_norm in exact mode: one baseq.RmsNorm node, or the standard-op version."""
    if not c.custom:
        return emit_rms_norm(c.g, x, weight, c.cfg.rms_eps)
    inputs = [x, c.g.const(c.cfg.rms_eps, np.float64)] + ([weight] if weight else [])
    return c.g.op("RmsNorm", inputs, domain=OPS_DOMAIN)


@dataclass(frozen=True)
class QuantSite:
    """An activation site's input and its quantizer (clip, shift, gain initializers), not yet quantized: with
    custom ops the next linear is one baseq.IntLinear node that quantizes and multiplies."""

    x: str
    bits: int
    clip: str
    shift: str | None
    gain: str | None
    width: int


def emit_site(c: _Ctx, layer: int, site: str, x: str) -> "str | tuple[str, str] | QuantSite":
    """reference.QuantHooks.act: [R4] -> * gain -> - shift -> per-token quantizer. With quantized activations
    the result is (levels, scale), the IntActivation the next linear multiplies as integers, or with
    custom ops the QuantSite the next linear fuses."""
    g = c.g
    prefix = f"layers.{layer}.{site}"
    if c.r4 and site == "down_in":
        x = hadamard(c, x, c.cfg.intermediate_size)
    if c.custom and c.a_bits:
        return QuantSite(x, c.a_bits, c.tensor(f"{prefix}.clip"), c.tensor(f"{prefix}.shift"),
                         c.tensor(f"{prefix}.gain"), site_width(c.cfg, site))
    if (gain := c.tensor(f"{prefix}.gain")) is not None:
        x = g.op("Mul", [x, gain])
    if (shift := c.tensor(f"{prefix}.shift")) is not None:
        x = g.op("Sub", [x, shift])
    if c.a_bits:
        return emit_quant_levels(g, x, c.a_bits, c.tensor(f"{prefix}.clip"))
    return x


def matmul_nbits_weights(c: _Ctx, prefix: str, qw, unit_scales: bool = False) -> tuple[list[str], int]:
    """Initializer names (B, scales, zero_points) and block size of MatMulNBits for a 4-bit weight; made once per
    prefix, so a tied embedding and lm_head share them. unit_scales: all-ones scales (shared between same-shape
    linears), for the integer sums x @ (codes - zero).T."""
    key = (prefix, unit_scales)
    if key not in c.nbits:
        scale = np.ones_like(_np(qw.scale)) if unit_scales else _np(qw.scale)
        arrays, block = matmul_nbits_inputs(_np(qw.codes), scale, _np(qw.zero), qw.group_size)
        names = [c.g.const(arr) if k == "scales" and unit_scales else c.g.init(f"{prefix}.{k}", arr) for k, arr in arrays.items()]
        c.nbits[key] = names, block
    return c.nbits[key]


def emit_matmul_nbits(c: _Ctx, x: str, prefix: str, qw, bias: str | None = None, unit_scales: bool = False,
                      int8_input: bool = False) -> str:
    """x @ dequant(qw).T [+ bias] as com.microsoft.MatMulNBits (4-bit, exact per-block mapping of our format);
    unit_scales: x @ (codes - zero).T, the integer sums. int8_input: accuracy level 4, onnxruntime's int8
    kernels, which round x per block as quant.fake_quant_int8_blocks (the reference forward does the same);
    else level 0 (float x)."""
    inputs, block = matmul_nbits_weights(c, prefix, qw, unit_scales)
    if int8_input and block != qw.group_size:
        raise ValueError(f"{prefix}: int8 input blocks need MatMulNBits blocks of the weight group ({qw.group_size}), got {block}")
    inputs = [x] + inputs + (["", bias] if bias is not None else [])  # g_idx unused
    n, k = qw.codes.shape
    return c.g.op("MatMulNBits", inputs, hint=f"{prefix}.out", domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=block,
                  accuracy_level=4 if int8_input else 0)


def stacked_linear(c: _Ctx, layer: int, names: tuple[str, ...]) -> tuple[str, "QuantizedWeight", str | None]:
    """(prefix, weight, bias initializer) of a layer's projections that share one input, stacked along the
    output rows (q/k/v, gate/up): one matmul instead of several, each output row computed as on its own."""
    prefixes = [f"layers.{layer}.{n}" for n in names]
    qws = [linear_from_tensors(p, c.t, linear_in_features(c.cfg, n), c.art.quant.get("group_size"))
           for p, n in zip(prefixes, names)]
    if len(names) == 1:
        return prefixes[0], qws[0], c.tensor(f"{prefixes[0]}.bias")
    prefix = f"layers.{layer}.{'_'.join(names)}"
    qw = QuantizedWeight(torch.cat([q.codes for q in qws]), torch.cat([q.scale for q in qws]),
                         torch.cat([q.zero for q in qws]), qws[0].group_size, 4)
    biases = [c.t.get(f"{p}.bias") for p in prefixes]
    bias = None
    if any(b is not None for b in biases):
        rows = [b.to(torch.float32) if b is not None else torch.zeros(q.shape[0]) for b, q in zip(biases, qws)]
        bias = c.g.init(f"{prefix}.bias", _np(torch.cat(rows)))
    return prefix, qw, bias


def emit_int_linear(c: _Ctx, prefix: str, qw: "QuantizedWeight", bias: str | None, site: QuantSite,
                    residual: str | None = None) -> str:
    """The site's quantizer and the integer linear on per-channel weights as one baseq.IntLinear node: bit for
    bit QuantLevels -> MatMulNBits (unit scales) -> ScaleSums, reading the artifact's packed codes as they are;
    with `residual`, the block's residual Add too (residual + y in float32)."""
    g = c.g
    shift = site.shift
    if site.gain is not None and shift is None:  # the op takes the gain after the shift: zeros stand in for it
        shift = g.const(np.zeros(site.width, np.float32))
    inputs = [site.x, site.clip, shift or "", site.gain or "", g.init(f"{prefix}.qweight", _np(pack_int4(qw.codes))),
              g.init(f"{prefix}.zeros", _np(qw.zero)), g.init(f"{prefix}.scales", _np(qw.scale)), bias or "",
              residual or ""]
    while inputs[-1] == "":
        inputs.pop()
    return g.op("IntLinear", inputs, hint=f"{prefix}.out", domain=OPS_DOMAIN, bits=site.bits, group_size=0)


def emit_stacked(c: _Ctx, layer: int, names: tuple[str, ...], x: "str | tuple[str, str] | QuantSite",
                 residual: str | None = None) -> str:
    """The named projections of a layer on one input (bias folded in), as models.base.linear each: one
    stacked 4-bit matmul whose output holds the projections' outputs side by side; plus `residual` if given."""
    prefix, qw, bias = stacked_linear(c, layer, names)
    if isinstance(x, QuantSite) and qw.scale.shape[1] == 1:
        return emit_int_linear(c, prefix, qw, bias, x, residual)
    if isinstance(x, QuantSite):  # grouped weight scales have no exact integer form: quantize, dequantize
        x = emit_quant_levels_op(c.g, x.x, x.bits, x.clip, x.shift, x.gain, x.width)
    y = emit_linear(c, prefix, qw, bias, x)
    return y if residual is None else c.g.op("Add", [residual, y])


def emit_linears(c: _Ctx, layer: int, names: tuple[str, ...], x: "str | tuple[str, str] | QuantSite") -> list[str]:
    """emit_stacked, split into the projections' outputs."""
    y = emit_stacked(c, layer, names, x)
    if len(names) == 1:
        return [y]
    sizes = [c.t[f"layers.{layer}.{n}.qweight"].shape[0] for n in names]  # output rows of each projection
    return c.g.op("Split", [y, c.g.const(sizes, np.int64)], axis=-1, n_out=len(names))


def emit_linear(c: _Ctx, prefix: str, qw: "QuantizedWeight", bias: str | None, x: "str | tuple[str, str]") -> str:
    """x @ dequant(qw).T + bias, as models.base.linear.

    On (levels, scale) with per-channel weights: MatMulNBits with unit scales gives the integer
    sums levels @ (codes - zero)^T exactly; they are scaled by the activation's and the weight's
    scales in float64 and rounded once, then the bias is added in float32.
    """
    if isinstance(x, str):
        return emit_matmul_nbits(c, x, prefix, qw, bias, int8_input=c.art.quant.get("linear_act_bits") == 8)
    levels, scale = x
    g = c.g
    if qw.scale.shape[1] != 1:  # grouped scales have no exact integer form: dequantize (as models.base.linear)
        return emit_matmul_nbits(c, g.op("Mul", [levels, scale]), prefix, qw, bias)
    sums = emit_matmul_nbits(c, levels, prefix, qw, unit_scales=True)
    w_scale = _np(qw.scale[:, 0])
    if c.custom:
        return g.op("ScaleSums", [sums, scale, g.init(f"{prefix}.channel_scales", w_scale)] + ([bias] if bias else []),
                    domain=OPS_DOMAIN)
    w_scale = g.init(f"{prefix}.channel_scales", w_scale.astype(np.float64))
    y = to_float(g, g.op("Mul", [g.op("Mul", [to_double(g, sums), to_double(g, scale)]), w_scale]))
    return y if bias is None else g.op("Add", [y, bias])


def emit_embedding(c: _Ctx, ids: str) -> str:
    """Token embeddings: Gather on the float table, or com.microsoft.GatherBlockQuantized on the 4-bit codes.
    GatherBlockQuantized reads MatMulNBits' own B (reshaped to [vocab, hidden/2]: the same bytes), scales and
    packed zero points, so a tied table is stored once for the embedding and the lm_head."""
    qw = head_from_tensors("embed", c.t, c.cfg, c.art.quant)
    if qw is None:
        return c.g.op("Gather", [c.tensor("embed"), ids], axis=0)
    (b, scales, zeros), _ = matmul_nbits_weights(c, "embed", qw)
    vocab, hidden = qw.shape
    table = c.g.op("Reshape", [b, c.g.const([vocab, (hidden + 1) // 2], np.int64)])
    return c.g.op("GatherBlockQuantized", [table, ids, scales, zeros], domain=MS_DOMAIN, gather_axis=0,
                  quantize_axis=1, block_size=qw.group_size, bits=4)


def emit_lm_head(c: _Ctx, h: str) -> str:
    """Logits: Gemm by the float head (transB: a tied table is not stored transposed a second time), or
    MatMulNBits on the 4-bit codes (a tied embedding's own initializers)."""
    mix = c.t.get("head_mix")
    name = "embed" if c.cfg.tied_embeddings or mix is not None else "lm_head"
    if mix is not None:  # the head is the embedding table times head_mix (rotate.head_mix): h -> h M^T first
        h = c.g.op("MatMul", [h, c.g.init("head_mix.T", _np(mix.T.contiguous()))])
    qw = head_from_tensors(name, c.t, c.cfg, c.art.quant)
    if qw is not None:
        return emit_matmul_nbits(c, h, name, qw, int8_input=c.art.quant.get("head_act_bits") == 8)
    g = c.g
    table = c.tensor(name)  # when tied: the embedding's initializer, made once
    rows = g.op("Reshape", [h, g.const([-1, c.cfg.hidden_size], np.int64)])
    logits = g.op("Gemm", [rows, table], transB=1)
    lead = g.op("Slice", [g.op("Shape", [h]), g.const([0], np.int64), g.const([-1], np.int64)])
    return g.op("Reshape", [logits, g.op("Concat", [lead, g.const([c.cfg.vocab_size], np.int64)], axis=0)])


def emit_rope(g: Graph, x: str, cos: str, sin: str, head_dim: int) -> str:
    half = head_dim // 2
    x1 = g.op("Slice", [x, g.const([0], np.int64), g.const([half], np.int64), g.const([-1], np.int64)])
    x2 = g.op("Slice", [x, g.const([half], np.int64), g.const([head_dim], np.int64), g.const([-1], np.int64)])
    rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])


def emit_heads(g: Graph, x: str, heads: int, head_dim: int) -> str:
    """[B, T, heads*hd] -> [B, heads, T, hd]."""
    y = g.op("Reshape", [x, g.const([0, 0, heads, head_dim], np.int64)])
    return g.op("Transpose", [y], perm=[0, 2, 1, 3])


def fuses_rope(c: _Ctx) -> bool:
    """The custom-op graph hands the stacked q/k/v projection to one RopeAttention node (heads, rotary
    embedding, R3, KV quantizer, attention); R3 there needs a power-of-two head_dim (else the op chain)."""
    hd = c.cfg.head_dim
    return c.custom and (not c.r3 or hd & (hd - 1) == 0)


def emit_block(c: _Ctx, i: int, h: str, cos: str, sin: str, mask: str | None, past: tuple[str, str],
               present: tuple[str, str]) -> tuple[str, str, str]:
    """One decoder block (models.base.block_forward); returns (h, present key, present value). The fused
    attention node writes the graph outputs `present` itself."""
    g, cfg = c.g, c.cfg
    x = emit_site(c, i, "attn_in", rms_norm(c, h, c.tensor(f"layers.{i}.attn_norm")))
    k_clip, v_clip = c.tensor(f"layers.{i}.k_cache.clip"), c.tensor(f"layers.{i}.v_cache.clip")
    if fuses_rope(c):
        qkv = emit_stacked(c, i, ("q", "k", "v"), x)
        a, present_k, present_v = emit_rope_attention(c, i, qkv, cos, sin, past, k_clip, v_clip, present)
    else:
        q, k, v = emit_linears(c, i, ("q", "k", "v"), x)
        q = emit_heads(g, q, cfg.num_heads, cfg.head_dim)
        k, v = emit_heads(g, k, cfg.num_kv_heads, cfg.head_dim), emit_heads(g, v, cfg.num_kv_heads, cfg.head_dim)
        q, k = emit_rope(g, q, cos, sin, cfg.head_dim), emit_rope(g, k, cos, sin, cfg.head_dim)
        if c.r3:
            q, k = hadamard(c, q, cfg.head_dim), hadamard(c, k, cfg.head_dim)
        if c.custom:
            a, present_k, present_v = emit_attention_op(c, i, q, k, v, past, k_clip, v_clip)
        else:
            a, present_k, present_v = emit_attention_standard(c, i, q, k, v, past, k_clip, v_clip, mask)
    h = emit_stacked(c, i, ("o",), emit_site(c, i, "o_in", a), residual=h)
    x = emit_site(c, i, "mlp_in", rms_norm(c, h, c.tensor(f"layers.{i}.mlp_norm")))
    h = emit_stacked(c, i, ("down",), emit_site(c, i, "down_in", emit_swiglu_mlp(c, i, x)), residual=h)
    return h, present_k, present_v


def emit_swiglu_mlp(c: _Ctx, i: int, x: "str | tuple[str, str] | QuantSite") -> str:
    """silu(gate) * up of layer i's gate/up projections (models.base.swiglu in exact mode): one baseq.SwiGLU node on
    the stacked gate/up output (its two halves, no Split), or the standard-op version on the split outputs."""
    if c.custom:
        return c.g.op("SwiGLU", [emit_stacked(c, i, ("gate", "up"), x)], domain=OPS_DOMAIN)
    return emit_swiglu(c.g, *emit_linears(c, i, ("gate", "up"), x))


def emit_rope_attention(c: _Ctx, i: int, qkv: str, cos: str, sin: str, past: tuple[str, str], k_clip: str | None,
                        v_clip: str | None, present: tuple[str, str]) -> tuple[str, str, str]:
    """baseq.RopeAttention[KV4] on the stacked q/k/v projection: bit for bit the Reshape/Transpose, rotary
    embedding, R3 Hadamard, KV quantizer and attention op chain of the unfused graph, as one node."""
    cfg, kv = c.cfg, c.kv_bits or 0
    attrs = dict(heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, rotate=int(c.r3), window=cfg.sliding_window or 0)
    inputs = [qkv, cos, sin, past[0], past[1], "attention_mask"]
    outputs = [c.g.name(f"layer{i}.attention"), *present]
    if c.kv_packed:
        c.g.op("RopeAttentionKV4", inputs + [k_clip, v_clip], domain=OPS_DOMAIN, outputs=outputs, **attrs)
    else:
        c.g.op("RopeAttention", inputs + ([k_clip, v_clip] if kv else []), domain=OPS_DOMAIN, outputs=outputs, bits=kv,
               **attrs)
    return outputs[0], outputs[1], outputs[2]


def emit_attention_op(c: _Ctx, i: int, q: str, k: str, v: str, past: tuple[str, str], k_clip: str | None,
                      v_clip: str | None) -> tuple[str, str, str]:
    """KV quantizer, cache append and grouped-query attention as baseq ops: Attention on the float cache (new
    rows fake-quantized first), or AttentionKV4, which packs the new rows and reads the packed cache directly.
    Returns (attention output [B, T, H*hd], present key, present value)."""
    g, cfg = c.g, c.cfg
    window = cfg.sliding_window or 0
    if c.kv_packed:
        return g.op("AttentionKV4", [q, k, v, past[0], past[1], "attention_mask", k_clip, v_clip], domain=OPS_DOMAIN,
                    n_out=3, window=window, hint=f"layer{i}.attention")
    if c.kv_bits:
        k, v = emit_quant_dequant_op(g, k, c.kv_bits, k_clip), emit_quant_dequant_op(g, v, c.kv_bits, v_clip)
    return g.op("Attention", [q, k, v, past[0], past[1], "attention_mask"], domain=OPS_DOMAIN, n_out=3,
                window=window, hint=f"layer{i}.attention")


def emit_attention_standard(c: _Ctx, i: int, q: str, k: str, v: str, past: tuple[str, str], k_clip: str | None,
                            v_clip: str | None, mask: str) -> tuple[str, str, str]:
    """The same with standard ops (float cache only): fake-quantized new rows, Concat onto the past, float64
    attention."""
    g, cfg = c.g, c.cfg
    if c.kv_bits:
        k, v = emit_fake_quant(g, k, c.kv_bits, k_clip), emit_fake_quant(g, v, c.kv_bits, v_clip)
    present_k = g.op("Concat", [past[0], k], axis=2, hint=f"present.{i}.key")
    present_v = g.op("Concat", [past[1], v], axis=2, hint=f"present.{i}.value")
    groups = cfg.num_heads // cfg.num_kv_heads
    a = emit_attention(g, to_double(g, q), to_double(g, present_k), to_double(g, present_v), mask, cfg, groups)
    a = g.op("Reshape", [g.op("Transpose", [a], perm=[0, 2, 1, 3]), g.const([0, 0, cfg.num_heads * cfg.head_dim], np.int64)])
    return a, present_k, present_v


def emit_attention(g: Graph, q: str, k: str, v: str, mask: str, cfg: ModelConfig, groups: int) -> str:
    """softmax(q k^T / sqrt(hd) + mask) v on float64 q [B, H, T, hd] and k, v [B, kvH, S, hd], rounded
    once to float32 (models.base.attend in exact mode). Grouped heads without copying K/V: q is viewed
    as [B, kvH, groups, T, hd] against k, v [B, kvH, 1, S, hd] (head h uses KV head h // groups).
    The softmax is spelled out: onnxruntime's float64 Softmax kernel is ~15x slower than Exp and two reductions."""
    five = g.const([0, cfg.num_kv_heads, groups, -1, cfg.head_dim], np.int64)
    axis2 = g.const([2], np.int64)
    q5 = g.op("Reshape", [q, five])
    k5, v5 = g.op("Unsqueeze", [k, axis2]), g.op("Unsqueeze", [v, axis2])
    scores = g.op("MatMul", [q5, g.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])])
    mask5 = g.op("Unsqueeze", [mask, axis2])  # [B, 1, 1, T, S]
    scores = g.op("Add", [g.op("Mul", [scores, g.const(1.0 / np.sqrt(cfg.head_dim), np.float64)]), mask5])
    axes = g.const([-1], np.int64)
    e = g.op("Exp", [g.op("Sub", [scores, g.op("ReduceMax", [scores, axes], keepdims=1)])])
    probs = g.op("Div", [e, g.op("ReduceSum", [e, axes], keepdims=1)])
    a = g.op("MatMul", [probs, v5])  # [B, kvH, groups, T, hd]
    return to_float(g, g.op("Reshape", [a, g.const([0, cfg.num_heads, -1, cfg.head_dim], np.int64)]))


MASKED = -1e9  # additive mask value: exp() underflows to exactly 0, and a fully masked (padding) row stays finite


def emit_positions(g: Graph, ids: str, attention_mask: str) -> tuple[str, str]:
    """Absolute positions [T] (past_len + arange(T)) of the new tokens, and the total length past_len + T, from
    attention_mask [B, past + T]: the past may be a buffer longer than what it holds (genai's shared buffer)."""
    total = g.op("Gather", [g.op("Shape", [attention_mask]), g.const(1, np.int64)], axis=0)
    seq = g.op("Gather", [g.op("Shape", [ids]), g.const(1, np.int64)], axis=0)
    return g.op("Range", [g.op("Sub", [total, seq]), total, g.const(1, np.int64)]), total


def emit_mask(g: Graph, cfg: ModelConfig, positions: str, total: str, attention_mask: str) -> str:
    """The additive float64 mask [B, 1, T, past+T] of the standard-op attention: causal (and sliding window),
    and keys whose attention_mask [B, past+T] is 0 are hidden (baseq.Attention applies the same rule itself)."""
    k_pos = g.op("Range", [g.const(0, np.int64), total, g.const(1, np.int64)])
    q_col = g.op("Unsqueeze", [positions, g.const([1], np.int64)])
    allowed = g.op("LessOrEqual", [k_pos, q_col])
    if cfg.sliding_window is not None:
        lower = g.op("Sub", [q_col, g.const(cfg.sliding_window, np.int64)])
        allowed = g.op("And", [allowed, g.op("Greater", [k_pos, lower])])
    keep = g.op("Cast", [attention_mask], to=TensorProto.BOOL)
    keep = g.op("Unsqueeze", [keep, g.const([1, 2], np.int64)])  # [B, 1, 1, S]
    allowed = g.op("And", [allowed, keep])
    return g.op("Where", [allowed, g.const(0.0, np.float64), g.const(MASKED, np.float64)])


def check_kv_cache(art: Artifact, ops: str, kv_cache: str) -> None:
    """A packed int4 cache needs our custom ops and a 4-bit KV quantizer in the artifact."""
    if kv_cache not in KV_CACHE_CHOICES:
        raise ValueError(f"--kv-cache must be one of {KV_CACHE_CHOICES}, got {kv_cache!r}")
    if kv_cache == "int4" and (ops != "custom" or art.quant.get("kv_bits") != 4):
        raise ValueError("--kv-cache int4 stores the artifact's 4-bit KV codes packed: it needs --ops custom and an "
                         f"artifact with a 4-bit KV cache (this one: kv_bits={art.quant.get('kv_bits')}, ops={ops})")


def kv_row_width(cfg: ModelConfig, kv_cache: str) -> int:
    """Last dimension of a past/present tensor: head_dim floats, or head_dim/2 code bytes + scale + zero."""
    return cfg.head_dim if kv_cache == "float" else packed_kv_row_width(cfg.head_dim)


def build_model(art: Artifact, max_length: int = 2048, ops: str = "standard", kv_cache: str = "float",
                external: ExternalData | None = None, last_logits: bool = False) -> onnx.ModelProto:
    """The ONNX model of an artifact: MatMulNBits linears; online parts as our baseq ops (`ops="custom"`)
    or as standard ONNX ops (`ops="standard"`); the KV cache as float32 or packed 4-bit (`kv_cache="int4"`).
    With `external` the weights are written to that data file while the graph is built (any model size).
    last_logits: logits of the last position only ([batch, 1, vocab]), for greedy decoding: a prompt then
    skips the head on every other position (the head is a fifth of the model's weights)."""
    if ops not in OPS_CHOICES:
        raise ValueError(f"ops must be one of {OPS_CHOICES}, got {ops!r}")
    check_kv_cache(art, ops, kv_cache)
    cfg = ModelConfig.from_dict(art.model)
    g = Graph(external)
    c = _Ctx(g, cfg, art, ops, kv_cache)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1 if last_logits else "seq", cfg.vocab_size])]
    width = kv_row_width(cfg, kv_cache)
    kv_type = TensorProto.FLOAT if kv_cache == "float" else TensorProto.UINT8
    kv_shape = ["batch", cfg.num_kv_heads, "past_seq", width]
    total_shape = ["batch", cfg.num_kv_heads, "total_seq", width]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", kv_type, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", kv_type, total_shape))

    cos_t, sin_t = rope_tables(art.tensors["rope.inv_freq"], torch.arange(max_length), cfg.rope_attention_scaling, torch.float32)
    positions, total = emit_positions(g, "input_ids", "attention_mask")
    mask = None if c.custom else emit_mask(g, cfg, positions, total, "attention_mask")
    cos = g.op("Gather", [g.init("rope.cos", _np(cos_t)), positions], axis=0)
    sin = g.op("Gather", [g.init("rope.sin", _np(sin_t)), positions], axis=0)
    h = emit_embedding(c, "input_ids")
    for i in range(cfg.num_layers):
        present = (f"present.{i}.key", f"present.{i}.value")
        h, k, v = emit_block(c, i, h, cos, sin, mask, (f"past_key_values.{i}.key", f"past_key_values.{i}.value"), present)
        for made, name in zip((k, v), present):
            if made != name:
                g.nodes.append(helper.make_node("Identity", [made], [name]))
    if last_logits:
        h = g.op("Slice", [h, g.const([-1], np.int64), g.const([np.iinfo(np.int64).max], np.int64), g.const([1], np.int64)])
    h = rms_norm(c, h, c.tensor("norm"))
    logits = emit_lm_head(c, h)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    graph = helper.make_graph(g.nodes, "baseq", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    if any(n.domain == OPS_DOMAIN for n in g.nodes):
        opsets.append(helper.make_opsetid(OPS_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="baseq-export")
    model.ir_version = 9
    return model
