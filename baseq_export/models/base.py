"""The canonical decoder: a model-independent config, weight naming and plain-torch forward.

Every supported architecture (Llama, Mistral, Qwen2) is a pre-norm decoder with RMSNorm,
rotary attention with grouped KV heads and a SwiGLU MLP. Adapters translate a Hugging Face
model into `ModelConfig` + a flat weight dict with the names below; rotation, calibration,
the quantized reference forward and the exporters all read that one layout.

Weight names: ``embed``, ``norm``, ``lm_head``, ``rope.inv_freq`` and per layer ``i``:
``layers.i.attn_norm``, ``layers.i.{q,k,v,o,gate,up,down}.weight``, optional
``layers.i.{q,k,v,o,gate,up,down}.bias``, ``layers.i.mlp_norm``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ..quant import IntActivation

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def whole(x: object) -> bool:
    """A positive whole number a dimension or length read from a file can be (JSON true is not one)."""
    return type(x) is int and 0 < x < 2**31


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions and options of a Llama-family decoder, independent of transformers."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    tied_embeddings: bool
    rope_attention_scaling: float = 1.0
    sliding_window: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def problem(cls, d: object) -> str | None:
        """Why d (an artifact's or export's "model" record) is no config a forward can be built from, or None."""
        if not isinstance(d, dict):
            return "is not an object"
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if set(d) - {f.name for f in dataclasses.fields(cls)} or required - set(d):
            return f"does not have exactly the fields {sorted(required)} (and optional ones)"
        dims = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        bad = [k for k in dims if not whole(d[k])]
        if bad:
            return f"has {', '.join(bad)} that are not positive whole numbers"
        if d["num_heads"] % d["num_kv_heads"]:
            return "has num_heads not a multiple of num_kv_heads"
        numbers = [d["rms_eps"], d.get("rope_attention_scaling", 1.0)]
        if not all(type(x) in (int, float) and math.isfinite(x) and x > 0 for x in numbers):
            return "has rms_eps or rope_attention_scaling that are not positive numbers"
        window = d.get("sliding_window")
        if type(d["tied_embeddings"]) is not bool or not (window is None or type(window) is int and window > 0):
            return "has tied_embeddings that is not true/false or a sliding_window that is not a positive number"
        if type(d["arch"]) is not str:
            return "has an arch that is not a name"
        return None


class Hooks(Protocol):
    """Online transforms a quantized model inserts into the forward (identity for FP)."""

    def act(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor: ...

    def qk(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def head_in(self, x: torch.Tensor) -> torch.Tensor: ...


class IdentityHooks:
    """Hooks of the full-precision model: every site passes its input through."""

    def act(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def qk(self, layer, q, k):
        return q, k

    def kv(self, layer, k, v):
        return k, v

    def head_in(self, x):
        return x


IDENTITY = IdentityHooks()


class WrappedHooks:
    """Hooks that pass everything to `inner`; a subclass overrides act() to look at (or record) a site's values."""

    def __init__(self, inner):
        self.inner = inner

    def act(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
        return self.inner.act(layer, site, x)

    def qk(self, layer, q, k):
        return self.inner.qk(layer, q, k)

    def kv(self, layer, k, v):
        return self.inner.kv(layer, k, v)

    def head_in(self, x):
        return self.inner.head_in(x)

# The activation sites, in forward order: input of q/k/v, input of o, input of gate/up, input of down.
ACT_SITES = ("attn_in", "o_in", "mlp_in", "down_in")
SITE_LINEARS = {"attn_in": ("q", "k", "v"), "o_in": ("o",), "mlp_in": ("gate", "up"), "down_in": ("down",)}
NORM_OF_SITE = {"attn_in": "attn_norm", "mlp_in": "mlp_norm"}  # sites whose gain is the RMSNorm weight


def site_width(cfg: "ModelConfig", site: str) -> int:
    """Channels of an activation site (the in_features of the linears it feeds)."""
    return {"attn_in": cfg.hidden_size, "o_in": cfg.num_heads * cfg.head_dim, "mlp_in": cfg.hidden_size,
            "down_in": cfg.intermediate_size}[site]


def linear_in_features(cfg: "ModelConfig", linear: str) -> int:
    """in_features of a named projection."""
    return next(site_width(cfg, site) for site, names in SITE_LINEARS.items() if linear in names)


def linear_out_features(cfg: "ModelConfig", linear: str) -> int:
    """out_features of a named projection."""
    return {"q": cfg.num_heads * cfg.head_dim, "k": cfg.num_kv_heads * cfg.head_dim,
            "v": cfg.num_kv_heads * cfg.head_dim, "o": cfg.hidden_size, "gate": cfg.intermediate_size,
            "up": cfg.intermediate_size, "down": cfg.hidden_size}[linear]


def _wide(x: torch.Tensor, exact: bool) -> torch.Tensor:
    """The accumulation tensor: float64 in exact mode, else float32 for half types and x itself otherwise."""
    if exact:
        return x.to(torch.float64)
    return x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, exact: bool = False) -> torch.Tensor:
    """RMSNorm in the input's dtype with float32-or-better accumulation (float64 when exact, rounded once);
    weight None = no gain."""
    acc = _wide(x, exact)
    y = acc * torch.rsqrt(acc.pow(2).mean(-1, keepdim=True) + eps)
    y = y.to(x.dtype)
    return y if weight is None else y * weight


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float, dtype: torch.dtype):
    """cos/sin tables [T, head_dim] for the given positions (half-split rotary layout).

    Computed in float32 whatever the model dtype, as transformers and the ONNX export do.
    """
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by the position tables (first half paired with second half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def linear(x: "torch.Tensor | IntActivation", w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """x @ W^T + b for the named projection of a layer dict (bias optional).

    On an IntActivation with integer weights (``{name}.levels`` = codes - zero, ``{name}.scales``
    [N] per output channel) it is an integer matmul: levels_x @ levels_w^T is exact in float32 in
    any summation order while partial sums stay below 2**24 (always for 4-bit levels and
    K < 74,000), then scaled by both scales in float64 and rounded once.
    Every backend that does this gets the same float32 bits.
    """
    bias = w.get(f"{name}.bias")
    if isinstance(x, IntActivation):
        levels = w.get(f"{name}.levels")
        if levels is None:  # grouped weight scales: no exact integer form, use the dequantized weight
            return F.linear(x.dequantize(), w[f"{name}.weight"], bias)
        acc = F.linear(x.levels, levels).to(torch.float64)
        y = ((acc * x.scale.to(torch.float64)) * w[f"{name}.scales"].to(torch.float64)).to(torch.float32)
        return y if bias is None else y + bias
    return F.linear(x, w[f"{name}.weight"], bias)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v; in exact mode computed in float64 and rounded once."""
    if not exact:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    a = F.scaled_dot_product_attention(q.to(torch.float64), k.to(torch.float64), v.to(torch.float64), attn_mask=mask)
    return a.to(q.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """silu(gate) * up; in exact mode computed in float64 and rounded once."""
    if not exact:
        return F.silu(gate) * up
    return (F.silu(gate.to(torch.float64)) * up.to(torch.float64)).to(gate.dtype)


def layer_weights(weights: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """The weights of layer i with the ``layers.i.`` prefix stripped."""
    prefix = f"layers.{i}."
    return {k[len(prefix):]: weights[k] for k in weights if k.startswith(prefix)}  # reads only these (lazy weights)


def attention_mask(t_new: int, t_total: int, window: int | None, device) -> torch.Tensor:
    """Boolean mask [t_new, t_total]: True where a query may attend (causal, optional window)."""
    q_pos = torch.arange(t_total - t_new, t_total, device=device)[:, None]
    k_pos = torch.arange(t_total, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def block_forward(
    cfg: ModelConfig,
    w: dict[str, torch.Tensor],
    layer: int,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    hooks: Hooks = IDENTITY,
    cache: list | None = None,
    exact: bool = False,
) -> torch.Tensor:
    """One decoder block on h [B, T, d]; `cache` (a [k, v] list or None) holds past keys/values.

    exact=True: norms, attention and the SwiGLU product run in float64 and are rounded once, so
    the result does not depend on summation order (see `forward`).
    """
    b, t, _ = h.shape
    x = hooks.act(layer, "attn_in", rms_norm(h, w.get("attn_norm"), cfg.rms_eps, exact))
    q = linear(x, w, "q").view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
    k = linear(x, w, "k").view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    v = linear(x, w, "v").view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k = hooks.qk(layer, q, k)
    k, v = hooks.kv(layer, k, v)
    if cache is not None:
        if cache:
            k = torch.cat((cache[0], k), dim=2)
            v = torch.cat((cache[1], v), dim=2)
        cache[:] = [k, v]
    groups = cfg.num_heads // cfg.num_kv_heads
    k_full = k.repeat_interleave(groups, dim=1)
    v_full = v.repeat_interleave(groups, dim=1)
    mask = attention_mask(t, k.shape[2], cfg.sliding_window, h.device)
    a = attend(q, k_full, v_full, mask, exact)
    a = a.transpose(1, 2).reshape(b, t, cfg.num_heads * cfg.head_dim)
    h = h + linear(hooks.act(layer, "o_in", a), w, "o")
    x = hooks.act(layer, "mlp_in", rms_norm(h, w.get("mlp_norm"), cfg.rms_eps, exact))
    g = swiglu(linear(x, w, "gate"), linear(x, w, "up"), exact)
    return h + linear(hooks.act(layer, "down_in", g), w, "down")


def forward(
    cfg: ModelConfig,
    weights: dict[str, torch.Tensor],
    ids: torch.Tensor,
    hooks: Hooks = IDENTITY,
    cache: list[list] | None = None,
    exact: bool = False,
    block: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits [B, T, vocab] for token ids [B, T]; with `cache` (one list per layer) decoding is incremental.
    block: what runs each block, with block_forward's arguments (default block_forward; the end-to-end pass's
    runs a block it dequantizes itself under activation checkpointing).

    exact=True (the quantized reference): every norm, attention and SwiGLU product is computed in
    float64 and rounded once to float32, and linears on quantized activations are integer matmuls
    (`linear`). Such values do not depend on summation order, so another backend computing them
    the same way gets the same bits, and so the same codes at every 4-bit activation quantizer. A
    last-bit difference there could flip one code, and in a W4A4 model one flip spreads into
    different tokens.
    """
    h = F.embedding(ids, weights["embed"])
    past = cache[0][0].shape[2] if cache and cache[0] else 0
    positions = torch.arange(past, past + ids.shape[1], device=ids.device)
    cos, sin = rope_tables(weights["rope.inv_freq"], positions, cfg.rope_attention_scaling, h.dtype)
    for i in range(cfg.num_layers):
        h = (block or block_forward)(cfg, layer_weights(weights, i), i, h, cos, sin, hooks,
                                     None if cache is None else cache[i], exact)
    return head_logits(cfg, weights, h, hooks, exact)


def head_logits(cfg: ModelConfig, weights: dict[str, torch.Tensor], h: torch.Tensor, hooks: Hooks = IDENTITY,
                exact: bool = False) -> torch.Tensor:
    """Logits from the last block's output h: the final RMSNorm, then the head."""
    h = rms_norm(h, weights.get("norm"), cfg.rms_eps, exact)
    if "head_mix" in weights:  # a head stored as the embedding table times head_mix (rotate.head_mix)
        h = F.linear(h, weights["head_mix"])
    return F.linear(hooks.head_in(h), weights["lm_head"])


def new_cache(cfg: ModelConfig) -> list[list]:
    """An empty KV cache for `forward`: one [k, v] list per layer, filled as tokens arrive."""
    return [[] for _ in range(cfg.num_layers)]
