"""From a loaded FP model to a quantized artifact: rotate, collect statistics block by block, round.

Methods: ``rtn`` (no rotation, round to nearest), ``gptq`` (no rotation, GPTQ), ``quarot-rtn``
(rotations + RTN) and ``quarot-gptq`` (rotations + GPTQ with Hessians from the calibration
windows, one block at a time, each block fed by the already-quantized blocks before it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .models import LoadedModel, source_info
from .models.base import ACT_SITES, IDENTITY, SITE_LINEARS, ModelConfig, block_forward, layer_weights, rope_tables, site_width
from .qmodel import BITS_PRESETS, Artifact, linear_tensors
from .quant import GGML_BLOCK, WEIGHT_GRIDS, HessianAccumulator, QuantizedWeight, gptq_quantize, rtn_quantize
from .rotate import RotationHooks, rotate_model

METHODS = ("rtn", "gptq", "quarot-rtn", "quarot-gptq")


HEAD_GROUP_SIZE = 32
"""Group size of a 4-bit embedding / lm_head: onnxruntime's GatherBlockQuantized and MatMulNBits blocks."""


@dataclass(frozen=True)
class QuantSettings:
    """Everything that decides the numbers of a quantized model (stored in the artifact)."""

    method: str = "quarot-gptq"
    bits: str = "w4a4kv4"
    group_size: int | None = None  # None = per output channel
    symmetric: bool = False
    a_clip: float = 0.9  # activation clip ratio (QuaRot's default for 4-bit)
    kv_clip: float = 0.95
    seed: int = 0
    damp: float = 0.01
    act_order: bool = True
    head_bits: int = 16  # embedding and lm_head: 16 = float, 4 = 4-bit groups of HEAD_GROUP_SIZE (RTN, MSE clip)
    weight_grid: str = "int"  # quant.WEIGHT_GRIDS: "int" (integer zero points), "q4_0" / "q4_1" (llama.cpp's blocks)
    weight_clip: str = "minmax"  # group params: "minmax" (full range) or "mse" (quant.search_weight_qparams)
    r4: bool = True  # online Hadamard before down_proj (False: every rotation offline, as llama.cpp needs)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.bits not in BITS_PRESETS:
            raise ValueError(f"unknown bits {self.bits!r}; choose one of {', '.join(BITS_PRESETS)}")
        if self.group_size not in (None, 32, 64, 128):
            raise ValueError(f"group size must be per-channel (none) or 32, 64, 128; got {self.group_size}")
        if self.head_bits not in (4, 16):
            raise ValueError(f"head bits must be 4 or 16 (float), got {self.head_bits}")
        if self.weight_grid not in WEIGHT_GRIDS:
            raise ValueError(f"unknown weight grid {self.weight_grid!r}; choose one of {', '.join(WEIGHT_GRIDS)}")
        if self.weight_grid != "int" and self.group_size != GGML_BLOCK:
            raise ValueError(f"the {self.weight_grid} grid is llama.cpp's blocks of {GGML_BLOCK}: use group size {GGML_BLOCK}")
        if self.weight_grid != "int" and self.symmetric:
            raise ValueError("symmetric applies to the int grid only (q4_0 is llama.cpp's symmetric grid)")
        if self.weight_clip not in ("minmax", "mse"):
            raise ValueError(f"weight clip must be 'minmax' or 'mse', got {self.weight_clip!r}")

    @property
    def rotated(self) -> bool:
        return self.method.startswith("quarot")

    def quant_config(self) -> dict:
        w_bits, a_bits, kv_bits = BITS_PRESETS[self.bits]
        rotation = {"r1_seed": self.seed, "r1": True, "r2": True, "r3": bool(kv_bits), "r4": self.r4} if self.rotated else None
        return {
            "method": self.method, "bits": self.bits, "w_bits": w_bits, "a_bits": a_bits, "kv_bits": kv_bits,
            "group_size": self.group_size, "symmetric": self.symmetric, "rotation": rotation,
            "weight_grid": self.weight_grid, "weight_clip": self.weight_clip,
            "lm_head": "float" if self.head_bits == 16 else "int4", "embed": "float" if self.head_bits == 16 else "int4",
            **({"head_group_size": HEAD_GROUP_SIZE} if self.head_bits == 4 else {}),
        }


PROFILES = {
    # llama.cpp (GGUF): weight-only W4A16, R1/R2 folded offline and no online rotation (llama.cpp has no
    # Hadamard before ffn_down), GPTQ on llama.cpp's Q4_1 blocks of 32 with searched fp16 d and m.
    "gguf": dict(method="quarot-gptq", bits="w4a16", group_size=GGML_BLOCK, weight_grid="q4_1", weight_clip="mse", r4=False),
}


def profile_settings(profile: str, **overrides) -> "QuantSettings":
    """QuantSettings of a named profile (PROFILES), with fields overridden (e.g. weight_grid="q4_0", method="rtn")."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return QuantSettings(**{**PROFILES[profile], **overrides})


def is_weight_only_offline(quant: dict) -> bool:
    """True when an artifact's quant config needs no online op: float activations and KV cache, no R3/R4
    (what a GGUF file for llama.cpp can hold)."""
    rot = quant.get("rotation") or {}
    return not quant.get("a_bits") and not quant.get("kv_bits") and not rot.get("r3") and not rot.get("r4")


class TapHooks:
    """Wraps hooks and calls on_act(site, x) with each activation site's output (statistics collection)."""

    def __init__(self, inner, on_act):
        self.inner, self.on_act = inner, on_act

    def act(self, layer, site, x):
        x = self.inner.act(layer, site, x)
        self.on_act(site, x)
        return x

    def qk(self, layer, q, k):
        return self.inner.qk(layer, q, k)

    def kv(self, layer, k, v):
        return self.inner.kv(layer, k, v)


def round_layer(w: dict[str, torch.Tensor], s: QuantSettings, hessians: dict | None) -> dict[str, QuantizedWeight]:
    """Quantize the seven linears of one layer on s.weight_grid (GPTQ when Hessians are given, else RTN)."""
    out = {}
    mse = s.weight_clip == "mse"
    for site, names in SITE_LINEARS.items():
        for name in names:
            weight = w[f"{name}.weight"].to(torch.float32)
            if hessians is None:
                out[name] = rtn_quantize(weight, 4, s.group_size, s.symmetric, mse_clip_search=mse, grid=s.weight_grid)
            else:
                out[name] = gptq_quantize(weight, hessians[site].hessian, 4, s.group_size, s.symmetric, s.damp, s.act_order,
                                          mse_clip_search=mse, grid=s.weight_grid)
    return out


def calib_rope(cfg: ModelConfig, w: dict[str, torch.Tensor], h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for calibration windows h [n, T, d]."""
    return rope_tables(w["rope.inv_freq"], torch.arange(h.shape[1]), cfg.rope_attention_scaling, h.dtype)


def run_block(cfg, lw: dict, layer: int, h: torch.Tensor, hooks, rope, chunk: int = 8) -> torch.Tensor:
    """Block `layer` (weights lw) on every calibration window, a chunk of windows at a time."""
    return torch.cat([block_forward(cfg, lw, layer, h[i : i + chunk], *rope, hooks) for i in range(0, h.shape[0], chunk)])


def gptq_hessians(cfg, lw: dict, layer: int, h: torch.Tensor, hooks, rope, chunk: int = 8) -> dict[str, HessianAccumulator]:
    """Hessians of the four activation sites of one block, from its inputs h."""
    hessians = {site: HessianAccumulator(site_width(cfg, site)) for site in ACT_SITES}
    run_block(cfg, lw, layer, h, TapHooks(hooks, lambda site, x: hessians[site].add(x)), rope, chunk)
    return hessians


@torch.no_grad()
def quantize_model(
    model: LoadedModel, settings: QuantSettings, calib: torch.Tensor | None = None, chunk: int = 8
) -> Artifact:
    """Quantize `model` into an artifact. `calib` [n, T] token windows are needed for GPTQ."""
    t0 = time.time()
    cfg, w = model.config, {k: v.to(torch.float64) for k, v in model.weights.items()}
    if settings.rotated:
        cfg, w = rotate_model(cfg, w, settings.seed, r4=settings.r4)
    w = {k: v.to(torch.float32) for k, v in w.items()}
    gptq = settings.method.endswith("gptq")
    if gptq and calib is None:
        raise ValueError("GPTQ needs calibration windows")
    hooks = RotationHooks(r3=False, r4=settings.r4) if settings.rotated else IDENTITY
    h = torch.nn.functional.embedding(calib, w["embed"]) if gptq else None
    rope = calib_rope(cfg, w, h) if gptq else None
    tensors: dict[str, torch.Tensor] = {}
    bar = tqdm(range(cfg.num_layers), desc=f"{settings.method} {settings.bits}", unit="block")
    for i in bar:
        hessians = gptq_hessians(cfg, layer_weights(w, i), i, h, hooks, rope, chunk) if gptq else None
        qlayer = round_layer(layer_weights(w, i), settings, hessians)
        for name, qw in qlayer.items():
            tensors.update(linear_tensors(f"layers.{i}.{name}", qw, w.get(f"layers.{i}.{name}.bias")))
            if gptq:
                w[f"layers.{i}.{name}.weight"] = qw.dequantize()
        if gptq:
            h = run_block(cfg, layer_weights(w, i), i, h, hooks, rope, chunk)
    tensors.update(float_tensors(cfg, w, settings))
    return Artifact(
        model=cfg.to_dict(),
        quant=settings.quant_config(),
        tensors=tensors,
        source=source_info(model),
        calibration={"seconds": round(time.time() - t0, 1), "windows": 0 if calib is None else list(calib.shape)},
    )


def float_tensors(cfg: ModelConfig, w: dict[str, torch.Tensor], s: QuantSettings, online: bool = True) -> dict[str, torch.Tensor]:
    """Tensors outside the blocks (embeddings, head, norms, rope; embedding and head as 4-bit codes when
    s.head_bits == 4) and, if `online`, the fixed clip values."""
    out = {}
    for name, t in w.items():
        if name.startswith("layers."):
            if name.rsplit(".", 1)[-1] in ("attn_norm", "mlp_norm"):
                out[name] = t
            continue
        if name == "lm_head" and cfg.tied_embeddings:
            continue
        if name in ("embed", "lm_head") and s.head_bits == 4:
            out.update(linear_tensors(name, rtn_quantize(t.to(torch.float32), 4, HEAD_GROUP_SIZE, mse_clip_search=True), None))
            continue
        out[name] = t
    if not online:
        return out
    _, a_bits, kv_bits = BITS_PRESETS[s.bits]
    for i in range(cfg.num_layers):
        if a_bits:
            for site in ACT_SITES:
                out[f"layers.{i}.{site}.clip"] = torch.tensor([s.a_clip], dtype=torch.float32)
        if kv_bits:
            for site in ("k_cache", "v_cache"):
                out[f"layers.{i}.{site}.clip"] = torch.full((cfg.num_kv_heads, 1, 1), s.kv_clip, dtype=torch.float32)
    return out
