"""How an artifact names and stores its tensors: a quantized linear as packed codes, scales, zero points (or
Q4_1 minimums) and bias; 4-bit heads; the online parameters of activation and KV-cache sites."""

from __future__ import annotations

import gguf
import torch

from .models.base import ACT_SITES, ModelConfig
from .quant import QuantizedWeight, pack_int4, unpack_int4
from .quant.ggml_weights import GgmlWeight

QT = gguf.GGMLQuantizationType

KV_SITES = ("k_cache", "v_cache")
HEAD_TENSORS = ("embed", "lm_head")  # stored as float, or as 4-bit codes (quant["head_group_size"])
QUANTIZED_SUFFIXES = (".qweight", ".ggml")  # the tensor that marks a linear as quantized, in each storage form
GGML_TENSORS = (".ggml", ".ggml_type")  # a linear in a ggml type: its block bytes, the GGMLQuantizationType number


def quantized_prefixes(tensors) -> set[str]:
    """The names (without suffix) of every quantized linear / head an artifact stores."""
    return {n.rsplit(".", 1)[0] for n in tensors if n.endswith(QUANTIZED_SUFFIXES)}


def stored_ggml_type(tensors, prefix: str) -> str | None:
    """The ggml type name a linear is stored in (reads one int32), or None when it is not stored in one."""
    key = prefix + GGML_TENSORS[1]
    return QT(int(tensors[key][0])).name if key in tensors else None


def is_online_param(name: str) -> bool:
    """True for ``layers.i.<site>.<param>`` tensors of an activation or KV-cache quantization site."""
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "layers" and parts[2] in ACT_SITES + KV_SITES


def linear_tensors(prefix: str, qw: QuantizedWeight | GgmlWeight, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The artifact tensors of one quantized linear: packed codes, scales, zero points, bias (a weight in a ggml
    type: its block bytes and the type's number, GGML_TENSORS)."""
    if isinstance(qw, GgmlWeight):
        raw_name, type_name = (prefix + suffix for suffix in GGML_TENSORS)
        out = {raw_name: qw.raw, type_name: torch.tensor([int(QT[qw.qtype])], dtype=torch.int32)}
        return {**out, **({f"{prefix}.bias": bias.to(torch.float32)} if bias is not None else {})}
    if qw.bits != 4:
        raise ValueError(f"{prefix}: the artifact stores 4-bit weights, got {qw.bits}")
    out = {f"{prefix}.qweight": pack_int4(qw.codes), f"{prefix}.scales": qw.scale}
    if qw.grid == "q4_1":  # w = codes * scales + mins (quant.py conventions), no zero points
        out[f"{prefix}.mins"] = qw.minimum
    else:
        out[f"{prefix}.zeros"] = qw.zero
    if bias is not None:
        out[f"{prefix}.bias"] = bias.to(torch.float32)
    return out


def linear_from_tensors(
    prefix: str, tensors: dict[str, torch.Tensor], in_features: int, group_size: int | None, grid: str | None = None
) -> QuantizedWeight:
    """QuantizedWeight of one linear read back from artifact tensors. grid: the quant config's "weight_grid"
    (None: "q4_1" when `{prefix}.mins` is stored, else "int"). A linear stored in a ggml type is a GgmlWeight."""
    qtype = stored_ggml_type(tensors, prefix)
    if qtype is not None:
        return GgmlWeight(tensors[prefix + GGML_TENSORS[0]], qtype, in_features)
    codes = unpack_int4(tensors[f"{prefix}.qweight"], in_features)
    mins = tensors.get(f"{prefix}.mins")
    grid = grid or ("q4_1" if mins is not None else "int")
    return QuantizedWeight(codes, tensors[f"{prefix}.scales"], tensors.get(f"{prefix}.zeros"), group_size or in_features, 4,
                           minimum=mins, grid=grid)


def head_from_tensors(name: str, tensors: dict[str, torch.Tensor], cfg: ModelConfig, quant: dict) -> QuantizedWeight | None:
    """A 4-bit embedding / lm_head ([vocab, hidden] in groups of quant["head_group_size"] along hidden), or
    None when the artifact keeps it in float."""
    if f"{name}.qweight" not in tensors:
        return None
    return linear_from_tensors(name, tensors, cfg.hidden_size, quant["head_group_size"])
