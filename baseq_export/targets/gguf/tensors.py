"""The tensors of a GGUF file: an artifact's weights in llama.cpp's names, row order and block types.

4-bit linears become Q4_0 / Q4_1 blocks from the artifact's own codes (quant.ggml_q4_blocks, no
re-rounding); float tensors are cast or quantized with ggml's reference rounding. Nothing is
computed until the writer asks for a tensor, so only one converted copy is in memory at a time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

import gguf
import numpy as np
import torch

from ...artifact import Artifact
from ...artifact_tensors import (GGML_TENSORS, HEAD_TENSORS, QUANTIZED_SUFFIXES, head_from_tensors, linear_from_tensors,
                                 stored_ggml_type)
from ...gguf_file import GGUF_TENSORS, rope_permutation, tensor_name
from ...memory import row_slices
from ...models.base import LINEARS, ModelConfig, linear_in_features
from ...quant import GGML_BLOCK, Q4_0_ZERO, QuantizedWeight, fp16_round, ggml_q4_blocks
from ...quant.ggml_codecs import CODEC_TYPES, ggml_quantize
from ...quant.ggml_mix import head_types
from ...quant.ggml_weights import GgmlWeight
from ...tensor_files import tensor_meta

QT = gguf.GGMLQuantizationType
TYPES = {"f32": QT.F32, "f16": QT.F16, **{t.name.lower(): t for t in CODEC_TYPES}}
WEIGHT_TYPES = ("auto", "q4_0", "q4_1", "f16", "f32")
HEAD_TYPES = ("auto", "f32", "f16", "q8_0", "q6_k", "q5_k", "q5_0", "q5_1", "q4_k", "q4_0", "q4_1", "iq4_nl", "iq4_xs")
GGUF_PY_QUANTIZES = (QT.Q8_0, QT.Q5_0, QT.Q5_1, QT.Q4_0, QT.Q4_1)  # ggml's reference rounding in numpy (gguf-py)
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
QWEN2_BIASES = ("q", "k", "v")  # the only projection biases llama.cpp's qwen2 graph loads
assert all(gguf.GGML_QUANT_SIZES[t][0] == GGML_BLOCK for t in (QT.Q4_0, QT.Q4_1))  # quant.layout and ggml agree


class GGUFExportError(ValueError):
    """An artifact or option that the writer cannot turn into a GGUF file; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# 4-bit weights on llama.cpp's blocks


@dataclass
class RoundingLog:
    """Q4_1 blocks whose m = -zero * scale (integer-zero artifacts) had to be rounded to fp16."""

    blocks: int = 0
    rounded: int = 0
    max_rel: float = 0.0
    max_abs: float = 0.0

    def add(self, m: torch.Tensor, m16: torch.Tensor) -> None:
        diff = (m16.to(torch.float64) - m.to(torch.float64)).abs()
        self.blocks += m.numel()
        self.rounded += int(torch.count_nonzero(diff))
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.max()))
            nz = m != 0
            if bool(nz.any()):
                self.max_rel = max(self.max_rel, float((diff[nz] / m[nz].abs().to(torch.float64)).max()))

    def warn(self) -> None:
        if self.rounded:
            warnings.warn(
                f"Q4_1: m = -zero*scale is not an fp16 value in {self.rounded} of {self.blocks} blocks and was rounded "
                f"(max relative error of m {self.max_rel:.2e}, weights off by at most {self.max_abs:.2e}); the GGUF is "
                "exact for artifacts quantized on the q4_1 grid (the gguf profile)", stacklevel=3)


def is_symmetric(qw: QuantizedWeight) -> bool:
    """True when Q4_0 holds qw exactly: zero point 8 in every group."""
    return qw.grid != "q4_1" and bool((qw.zero == Q4_0_ZERO).all())


def on_blocks(qw: QuantizedWeight, kind: str, log: RoundingLog | None = None) -> QuantizedWeight:
    """qw as a q4_0 / q4_1 grid weight on llama.cpp's 32-weight blocks (groups of any multiple of 32 repeat
    per block; integer zeros become Q4_0's zero 8, or Q4_1's m = -zero * scale rounded to fp16)."""
    n, k = qw.shape
    if qw.bits != 4 or qw.group_size % GGML_BLOCK:
        raise GGUFExportError(f"{qw.bits}-bit weights in groups of {qw.group_size} (K={k}) do not split into "
                              f"llama.cpp's {GGML_BLOCK}-weight Q4 blocks; quantize with --group-size {GGML_BLOCK}")
    rep = qw.group_size // GGML_BLOCK
    scale = qw.scale.repeat_interleave(rep, dim=1)
    if kind == "q4_0":
        if not is_symmetric(qw):
            raise GGUFExportError("Q4_0 holds symmetric weights only (zero point 8); this weight is asymmetric: "
                                  "write it as q4_1, or quantize on the q4_0 grid")
        return QuantizedWeight(qw.codes, scale, qw.zero.repeat_interleave(rep, dim=1), GGML_BLOCK, 4, grid="q4_0")
    if kind != "q4_1":
        raise ValueError(f"on_blocks: {kind!r} is not a 4-bit block type")
    if qw.grid == "q4_1":
        minimum = qw.minimum.repeat_interleave(rep, dim=1)
    else:
        m = -qw.zero.repeat_interleave(rep, dim=1).to(torch.float32) * scale  # exact: 4-bit integer x fp16
        minimum = fp16_round(m)
        if log is not None:
            log.add(m, minimum)
    return QuantizedWeight(qw.codes, scale, None, GGML_BLOCK, 4, minimum=minimum, grid="q4_1")


def permute_rows(qw: QuantizedWeight, perm: np.ndarray) -> QuantizedWeight:
    """The same weight with its output rows reordered (exact: rows are independent)."""
    p = torch.from_numpy(perm)
    pick = lambda t: None if t is None else t[p]  # noqa: E731
    return replace(qw, codes=qw.codes[p], scale=qw.scale[p], zero=pick(qw.zero), minimum=pick(qw.minimum))


def q4_bytes(qw: QuantizedWeight) -> np.ndarray:
    """The [N, K/32 * type_size] uint8 rows of a q4_0 / q4_1 block weight, as the GGUF stores them."""
    return np.ascontiguousarray(ggml_q4_blocks(qw).reshape(qw.shape[0], -1).numpy())


# ---------------------------------------------------------------------------------------------
# Float tensors -> GGUF types


def convert(w: np.ndarray, qtype: "gguf.GGMLQuantizationType") -> np.ndarray:
    """A float [N, K] tensor in a GGUF type: F32/F16 cast; Q8_0/Q5_x/Q4_x by gguf-py (ggml's reference rounding);
    K-quants and IQ4 by ggml's own quantizer (quant.ggml_codecs.ggml_quantize; gguf-py has no numpy form)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype == QT.F32:
        return w
    if qtype == QT.F16:
        return w.astype(np.float16)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block:
        raise GGUFExportError(f"rows of {w.shape[-1]} values do not split into {qtype.name} blocks of {block}; "
                              "choose another type (q8_0 takes rows of any multiple of 32)")
    if qtype in GGUF_PY_QUANTIZES:
        return np.ascontiguousarray(gguf.quants.quantize(w, qtype))
    return ggml_quantize(w, qtype)


CONVERT_ELEMENTS = 2**22
"""convert_rows converts this many values at a time: a float embedding or head (vocab x hidden, 2 GiB in float32
for Llama-3-8B) is never held in float32 whole, nor are gguf-py's temporaries of a whole matrix."""


def convert_rows(t: torch.Tensor, qtype: "gguf.GGMLQuantizationType", perm: np.ndarray | None = None) -> np.ndarray:
    """convert() of a float [N, K] tensor (rows reordered by perm) a slice of rows at a time: every GGUF type
    quantizes rows independently, so the bytes equal one whole-matrix convert()."""
    out = None
    for rows in row_slices(*t.shape, CONVERT_ELEMENTS):
        src = t[torch.from_numpy(perm[rows])] if perm is not None else t[rows]
        piece = convert(_f32(src), qtype)
        if out is None:
            out = np.empty((t.shape[0], *piece.shape[1:]), piece.dtype)
        out[rows] = piece
    return out


def nbytes(shape: tuple[int, ...], qtype: "gguf.GGMLQuantizationType") -> int:
    """Bytes of a tensor of logical shape in a GGUF type."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * type_size


# ---------------------------------------------------------------------------------------------
# The plan: every tensor of the file, in order


@dataclass
class Planned:
    """One tensor of the file: its name, ggml type, logical numpy shape and how to make its data."""

    name: str
    qtype: "gguf.GGMLQuantizationType"
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


@dataclass
class Plan:
    """Every tensor in file order, the architecture, the linears' type and the Q4_1 rounding record."""

    arch: str
    weight_type: str
    tensors: list[Planned] = field(default_factory=list)
    log: RoundingLog = field(default_factory=RoundingLog)

    def add(self, name: str, qtype, shape, make) -> None:
        self.tensors.append(Planned(name, qtype, tuple(int(s) for s in shape), make))


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())


def quantized_matrix(art: Artifact, prefix: str) -> QuantizedWeight | GgmlWeight | None:
    """The artifact's 4-bit weight `prefix` (a block linear, embed or lm_head; a GgmlWeight when stored in a ggml
    type), or None when it is float."""
    t = art.tensors
    if not any(f"{prefix}{suffix}" in t for suffix in QUANTIZED_SUFFIXES):
        return None
    cfg = ModelConfig.from_dict(art.model)
    if prefix in HEAD_TENSORS:
        return head_from_tensors(prefix, t, cfg, art.quant)
    k = linear_in_features(cfg, prefix.rsplit(".", 1)[-1])
    return linear_from_tensors(prefix, t, k, art.quant.get("group_size"), art.quant.get("weight_grid"))


def weight_type_of(art: Artifact, requested: str) -> str:
    """The GGUF type of the block linears: for auto the artifact's own grid (Q4_0 when symmetric), f16 for floats."""
    if requested not in WEIGHT_TYPES:
        raise GGUFExportError(f"weights must be one of {WEIGHT_TYPES}, got {requested!r}")
    if stored_ggml_type(art.tensors, "layers.0.q") is not None:  # written as quantized, in the mix's types
        if requested != "auto":
            raise GGUFExportError(f"this artifact holds its weights in llama.cpp's types already (mix "
                                  f"{art.quant.get('ggml_mix')}): they are written as they are; drop --gguf-weights")
        return str(art.quant.get("ggml_mix"))
    if requested != "auto":
        return requested
    qw = quantized_matrix(art, "layers.0.q")
    if qw is None:
        return "f16"
    return "q4_0" if is_symmetric(qw) else "q4_1"


def head_type_of(art: Artifact, name: str, requested: str | None) -> str:
    """The GGUF type of the embedding / output: for auto the artifact's 4-bit grid when it stores one, else q8_0."""
    if requested is not None and requested not in HEAD_TYPES:
        raise GGUFExportError(f"head types are {HEAD_TYPES}, got {requested!r}")
    if requested not in (None, "auto"):
        return requested
    qw = quantized_matrix(art, name)
    if qw is None and art.quant.get("ggml_mix"):
        cfg = ModelConfig.from_dict(art.model)
        output, embed = head_types(art.quant["ggml_mix"], cfg.hidden_size)
        return (output if name == "lm_head" or cfg.tied_embeddings else embed).lower()
    if qw is None:
        return "q8_0"
    return "q4_0" if is_symmetric(qw) else "q4_1"


def _add_matrix(plan: Plan, name: str, art: Artifact, prefix: str, kind: str, perm: np.ndarray | None) -> None:
    """Plan a [N, K] matrix (4-bit or float in the artifact) as GGUF type `kind`, rows reordered by perm.
    The plan keeps only names: each weight is read from the artifact when its data is made, so writing a model
    larger than memory holds one weight at a time (a plan holding them grew with the depth: +68% from 2 to 8
    7B-shaped layers)."""
    stored = stored_ggml_type(art.tensors, prefix)
    if stored is not None:  # the artifact's own ggml bytes (rows are independent: permuting them is exact)
        def make_raw() -> np.ndarray:
            raw = quantized_matrix(art, prefix).raw.numpy()
            return np.ascontiguousarray(raw if perm is None else raw[perm])

        rows = tensor_meta(art.tensors, prefix + GGML_TENSORS[0])[1][0]
        k = linear_in_features(ModelConfig.from_dict(art.model), prefix.rsplit(".", 1)[-1])
        plan.add(name, QT[stored], (rows, k), make_raw)
        return
    qtype = TYPES[kind]
    qw = quantized_matrix(art, prefix)
    if qw is not None:
        shape = qw.shape
        if kind in ("q4_0", "q4_1"):
            on_blocks(qw, kind)  # refuse now, not half-way through the file
            del qw

            def make() -> np.ndarray:
                bw = on_blocks(quantized_matrix(art, prefix), kind, plan.log)
                return q4_bytes(bw if perm is None else permute_rows(bw, perm))
        else:  # another type of the dequantized weight
            del qw

            def make() -> np.ndarray:
                return convert_rows(quantized_matrix(art, prefix).dequantize(), qtype, perm)

        plan.add(name, qtype, shape, make)
        return
    key = prefix if prefix in HEAD_TENSORS else f"{prefix}.weight"

    def make_float() -> np.ndarray:
        return convert_rows(art.tensors[key], qtype, perm)

    plan.add(name, qtype, tuple(tensor_meta(art.tensors, key)[1]), make_float)


def _add_vector(plan: Plan, name: str, art: Artifact, key: str, n: int, perm: np.ndarray | None = None) -> None:
    """Plan an F32 vector (a norm gain or a bias) read when written; a key the artifact lacks is a norm without
    gain (folded away), written as ones."""
    def make() -> np.ndarray:
        v = art.tensors.get(key)
        a = np.ones(n, np.float32) if v is None else _f32(v).reshape(-1)
        return a if perm is None else np.ascontiguousarray(a[perm])

    plan.add(name, QT.F32, (n,), make)


def gguf_arch(art: Artifact, rope_freqs: bool = False) -> str:
    """llama.cpp architecture: qwen2 for Qwen2 models that its qwen2 graph can hold, else llama.

    llama.cpp's llama graph loads optional biases on every projection and a rope_freqs tensor; its
    qwen2 graph only q/k/v biases, no rope_freqs, and attn_output as [n_embd, n_embd]. A Qwen2
    model beyond that (e.g. folded bias corrections on o/down) is written as llama, q/k rows permuted.
    """
    cfg = ModelConfig.from_dict(art.model)
    arch = ARCHS[cfg.arch]
    if arch == "qwen2":
        biases = {n.split(".")[2] for n in art.tensors if n.startswith("layers.") and n.endswith(".bias")}
        if biases - set(QWEN2_BIASES) or rope_freqs or cfg.num_heads * cfg.head_dim != cfg.hidden_size:
            arch = "llama"
    return arch


def plan_tensors(art: Artifact, weights: str = "auto", head: str = "auto", embed: str | None = None,
                 rope_freqs: np.ndarray | None = None) -> Plan:
    """Every tensor of the GGUF in file order with its type; data is made only when the writer asks."""
    cfg = ModelConfig.from_dict(art.model)
    t = art.tensors
    plan = Plan(gguf_arch(art, rope_freqs is not None), weight_type_of(art, weights))
    permute = plan.arch == "llama"  # llama.cpp's "normal" RoPE; qwen2 uses the NeoX (half-split) one
    perms = {"q": rope_permutation(cfg.num_heads, cfg.head_dim) if permute else None,
             "k": rope_permutation(cfg.num_kv_heads, cfg.head_dim) if permute else None}
    head_kind = head_type_of(art, "embed" if cfg.tied_embeddings else "lm_head", head)
    # the embedding follows the head's type unless a mix decides it (llama.cpp's Q4_K_M: output Q6_K, token_embd Q4_K)
    follow = head_kind if head not in (None, "auto") or not art.quant.get("ggml_mix") else "auto"
    embed_kind = head_type_of(art, "embed", embed if embed is not None else follow)
    _add_matrix(plan, tensor_name(gguf.MODEL_TENSOR.TOKEN_EMBD), art, "embed", embed_kind, None)
    for i in range(cfg.num_layers):
        _add_vector(plan, tensor_name(gguf.MODEL_TENSOR.ATTN_NORM, bid=i), art, f"layers.{i}.attn_norm",
                    cfg.hidden_size)
        for lin in LINEARS:
            if lin == "gate":
                _add_vector(plan, tensor_name(gguf.MODEL_TENSOR.FFN_NORM, bid=i), art, f"layers.{i}.mlp_norm",
                            cfg.hidden_size)
            prefix = f"layers.{i}.{lin}"
            _add_matrix(plan, tensor_name(GGUF_TENSORS[lin], bid=i), art, prefix, plan.weight_type, perms.get(lin))
            if f"{prefix}.bias" in t:
                n_bias = int(np.prod(tensor_meta(t, f"{prefix}.bias")[1]))
                _add_vector(plan, tensor_name(GGUF_TENSORS[lin], "bias", bid=i), art, f"{prefix}.bias", n_bias,
                            perms.get(lin))
    _add_vector(plan, tensor_name(gguf.MODEL_TENSOR.OUTPUT_NORM), art, "norm", cfg.hidden_size)
    if not cfg.tied_embeddings:
        _add_matrix(plan, tensor_name(gguf.MODEL_TENSOR.OUTPUT), art, "lm_head", head_kind, None)
    elif head_kind != embed_kind:  # the tied matrix once more, in the output's own type
        _add_matrix(plan, tensor_name(gguf.MODEL_TENSOR.OUTPUT), art, "embed", head_kind, None)
    if rope_freqs is not None:
        plan.add(tensor_name(gguf.MODEL_TENSOR.ROPE_FREQS), QT.F32, rope_freqs.shape, lambda: rope_freqs)
    return plan
