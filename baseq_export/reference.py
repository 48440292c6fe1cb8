"""The PyTorch reference forward of an artifact: the oracle that every exporter is compared to.

reference_model turns the artifact's tensors into float weights (int4 dequantized once, or integer levels
and scales in exact mode) and QuantHooks, the online part (R3/R4 Hadamards, activation and KV fake
quantization), which models.base.forward calls at each site.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .artifact import Artifact
from .artifact_tensors import (GGML_TENSORS, HEAD_TENSORS, head_from_tensors, is_online_param, linear_from_tensors,
                               quantized_prefixes)
from .hadamard import apply_hadamard
from .models.base import ModelConfig, forward, linear_in_features
from .models.lazy import LazyWeights
from .quant import (IntActivation, fake_quant_int8_blocks, fake_quant_kv, fake_quant_per_token,
                    quantize_per_token)


class QuantHooks:
    """Online part of a quantized model: R4/R3 Hadamards, per-token activation and KV fake quantization.

    `params` holds the online tensors by artifact name ``layers.i.<site>.<param>``:
      clip   activation sites (one value) and k_cache / v_cache (one per KV head): range shrink
      gain   o_in / down_in only: per-channel multiplier before quantization (BASE-Q scaling;
             for attn_in / mlp_in the gain is the RMSNorm weight instead)
      shift  per-channel shift subtracted before quantization (BASE-Q bias correction); the
             matching `+ shift` is folded into the next linear's bias, so it is not added back
    A site computes, in order: [R4 Hadamard if down_in] -> x * gain -> fq(x - shift).
    exact=True (the reference forward): Hadamards in float64 rounded once, and quantized activation
    sites return an IntActivation (levels and scale) so the next linear is an integer matmul.
    """

    def __init__(self, quant: dict, params: dict[str, torch.Tensor], exact: bool = False):
        rot = quant.get("rotation") or {}
        self.r3, self.r4 = bool(rot.get("r3")), bool(rot.get("r4"))
        self.a_bits, self.kv_bits = quant.get("a_bits"), quant.get("kv_bits")
        self.head_act_bits, self.head_group_size = quant.get("head_act_bits"), quant.get("head_group_size")
        self.linear_act_bits, self.group_size = quant.get("linear_act_bits"), quant.get("group_size")
        self.params = params
        self.exact = exact

    def hadamard(self, x: torch.Tensor) -> torch.Tensor:
        """An online Hadamard; in exact mode computed in float64 and rounded once (models.base.forward)."""
        return apply_hadamard(x.to(torch.float64)).to(x.dtype) if self.exact else apply_hadamard(x)

    def prequant(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
        """A site's input as its quantizer sees it: [R4 if down_in] -> x * gain -> x - shift."""
        if self.r4 and site == "down_in":
            x = self.hadamard(x)
        prefix = f"layers.{layer}.{site}"
        gain = self.params.get(f"{prefix}.gain")
        if gain is not None:
            x = x * gain
        shift = self.params.get(f"{prefix}.shift")
        if shift is not None:
            x = x - shift
        return x

    def act(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor | IntActivation:
        """A quantized activation site's output: prequant, then per-token quantization (or int8 blocks)."""
        x = self.prequant(layer, site, x)
        if self.a_bits:
            clip = self.params[f"layers.{layer}.{site}.clip"]
            x = quantize_per_token(x, self.a_bits, clip) if self.exact else fake_quant_per_token(x, self.a_bits, clip)
        elif self.linear_act_bits == 8:  # weight-only linears on onnxruntime's int8 kernels
            x = fake_quant_int8_blocks(x, self.group_size)
        return x

    def qk(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys after RoPE: R3-rotated when the artifact has R3."""
        return (self.hadamard(q), self.hadamard(k)) if self.r3 else (q, k)

    def kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as the quantized KV cache holds them (unchanged without kv_bits)."""
        if not self.kv_bits:
            return k, v
        p = self.params
        return (
            fake_quant_kv(k, self.kv_bits, p[f"layers.{layer}.k_cache.clip"]),
            fake_quant_kv(v, self.kv_bits, p[f"layers.{layer}.v_cache.clip"]),
        )

    def head_in(self, x: torch.Tensor) -> torch.Tensor:
        """The lm_head's input: rounded to int8 blocks when the artifact says the head runs onnxruntime's
        int8 kernels (quant["head_act_bits"] == 8), else unchanged."""
        return fake_quant_int8_blocks(x, self.head_group_size) if self.head_act_bits == 8 else x


@dataclass
class QuantizedModel:
    """A loaded artifact ready to run: float weights (int4 dequantized once) and its online hooks."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    hooks: QuantHooks
    artifact: Artifact

    @property
    def device(self) -> torch.device:
        return self.weights["embed"].device

    def logits(self, ids: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        return forward(self.config, self.weights, ids, self.hooks, cache, exact=self.hooks.exact)


def reference_model(artifact: Artifact, dtype: torch.dtype = torch.float32, exact: bool = True,
                    device: torch.device | None = None, lazy: bool = False) -> QuantizedModel:
    """The PyTorch reference forward of an artifact: exactly what the exporters must compute.

    exact (default): the order-independent forward of models.base.forward(exact=True); with 4-bit
    activations and per-channel weights every linear holds integer levels (codes - zero) and its
    per-channel scales instead of a dequantized weight. exact=False: the float32 forward that
    calibration trains (same values up to rounding). device: where it runs (default CPU). lazy (with
    exact=False): the blocks' linears are dequantized each time they are read (models.lazy.LazyWeights), so a
    forward a block at a time holds one block's float weights, not the model's.
    """
    if lazy and exact:
        raise ValueError("reference_model: lazy weights are the float forward's (exact=False)")
    cfg = ModelConfig.from_dict(artifact.model)
    t = artifact.tensors
    group_size = artifact.quant.get("group_size")
    integer_linears = exact and bool(artifact.quant.get("a_bits")) and group_size is None
    weights: dict[str, torch.Tensor] = {}
    online: dict[str, torch.Tensor] = {}
    quantized = quantized_prefixes(t)
    for name, tensor in t.items():
        base = name.rsplit(".", 1)[0]
        if base in quantized and name.endswith((".qweight", ".scales", ".zeros", ".mins", *GGML_TENSORS)):
            continue
        if is_online_param(name):
            online[name] = tensor
        else:
            weights[name] = tensor.to(dtype)
    readers = {}  # lazy: name -> its dequantization, run on every read
    for prefix in quantized:
        if prefix in HEAD_TENSORS:
            weights[prefix] = head_from_tensors(prefix, t, cfg, artifact.quant).dequantize().to(dtype)
            continue
        in_features = linear_in_features(cfg, prefix.rsplit(".", 1)[-1])
        if lazy:
            readers[f"{prefix}.weight"] = lambda p=prefix, k=in_features: linear_from_tensors(
                p, t, k, group_size, artifact.quant.get("weight_grid", "int")).dequantize().to(device=device, dtype=dtype)
            continue
        qw = linear_from_tensors(prefix, t, in_features, group_size, artifact.quant.get("weight_grid", "int"))
        if integer_linears:
            weights[f"{prefix}.levels"] = qw.codes.to(torch.float32) - qw.zero.to(torch.float32)
            weights[f"{prefix}.scales"] = qw.scale[:, 0]
        else:
            weights[f"{prefix}.weight"] = qw.dequantize().to(dtype)
    if device is not None and torch.device(device).type != "cpu":
        weights = {k: v.to(device) for k, v in weights.items()}
        online = {k: v.to(device) for k, v in online.items()}
    if cfg.tied_embeddings or "head_mix" in t:  # the embedding table serves the head (after head_mix)
        weights["lm_head"] = weights["embed"]
    if lazy:
        weights = LazyWeights({**{k: (lambda v=v: v) for k, v in weights.items()}, **readers})
    return QuantizedModel(cfg, weights, QuantHooks(artifact.quant, online, exact), artifact)
