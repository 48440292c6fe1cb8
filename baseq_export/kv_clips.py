"""Fitted clips of the KV-cache quantizers: per layer and KV head, the clip ratio whose 4-bit K (after RoPE and R3)
and V rows are closest to the float rows on calibration windows.

The KV quantizer rounds each cached row of head_dim values on its own (quant.fake_quant_kv), shrinking the row's
range by a clip that the artifact stores per layer and KV head. Methods without learned clips (quarot-*, gptq)
otherwise use one constant (QuantSettings.kv_clip). A row's error does not depend on how long the context is, but
its values do (RoPE turns keys with their position), so the windows should be as long as the prompts served.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from .artifact import Artifact
from .quant import fake_quant_kv
from .reference import QuantHooks, reference_model

FIT_WINDOWS, FIT_CTX = 8, 4096
"""The default fit: 8 windows of 4096 tokens of the calibration text (fewer tokens if the model's context is
shorter): long enough that keys at far positions are seen, 32k rows per head, about a minute on 2 cores."""

CLIP_GRID = tuple(round(0.60 + 0.02 * i, 2) for i in range(21))
"""Candidate clip ratios, 0.60 to 1.00 (1.00: the row's full range)."""


def kv_tensor_names(layer: int) -> tuple[str, str]:
    """Artifact names of a layer's K and V quantizer clips (one value per KV head, shape [kv_heads, 1, 1])."""
    return f"layers.{layer}.k_cache.clip", f"layers.{layer}.v_cache.clip"


def row_errors(x: torch.Tensor, bits: int, grid: tuple[float, ...] = CLIP_GRID) -> torch.Tensor:
    """Squared error of the KV quantizer on x [B, kv_heads, T, head_dim], summed per head, for each clip of grid:
    [kv_heads, len(grid)] in float64."""
    x = x.to(torch.float32)
    return torch.stack([(fake_quant_kv(x, bits, float(c)) - x).double().pow(2).sum(dim=(0, 2, 3)) for c in grid], -1)


class _Recorder:
    """An artifact's hooks, summing each layer's K / V errors per clip before its cache quantizer runs as set."""

    def __init__(self, hooks: QuantHooks, errors: dict[str, torch.Tensor]):
        self.hooks, self.errors = hooks, errors

    def __getattr__(self, name: str):
        return getattr(self.hooks, name)

    def kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for name, x in zip(kv_tensor_names(layer), (k, v)):
            e = row_errors(x, self.hooks.kv_bits)
            self.errors[name] = self.errors[name] + e if name in self.errors else e
        return self.hooks.kv(layer, k, v)


@torch.no_grad()
def fit_kv_clips(art: Artifact, windows: torch.Tensor, batch: int = 1) -> dict[str, torch.Tensor]:
    """Per layer and KV head, the clip of CLIP_GRID with the least squared K (V) error over windows [n, T], measured
    on the artifact's own forward (its quantized weights, and the KV cache quantized with the clips it holds):
    {clip tensor name: [kv_heads, 1, 1] float32}. The artifact is not changed."""
    bits = art.quant.get("kv_bits")
    if not bits:
        raise ValueError("fitting KV clips needs an artifact with a quantized KV cache (kv_bits)")
    qm = reference_model(art, exact=False)
    errors: dict[str, torch.Tensor] = {}
    qm.hooks = _Recorder(qm.hooks, errors)
    for i in tqdm(range(0, windows.shape[0], batch), desc=f"KV clips on {windows.shape[0]} x {windows.shape[1]} tokens",
                  unit="window", leave=False):
        qm.logits(windows[i:i + batch])
    grid = torch.tensor(CLIP_GRID, dtype=torch.float32)
    return {name: grid[e.argmin(-1)].reshape(-1, 1, 1) for name, e in errors.items()}


def with_clips(tensors: Mapping[str, torch.Tensor], clips: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tensors with the named clips replaced (shapes must match: the same model's clips)."""
    for name, c in clips.items():
        if tuple(tensors[name].shape) != tuple(c.shape):
            raise ValueError(f"{name}: fitted clip shape {tuple(c.shape)} does not match {tuple(tensors[name].shape)}")
    return {**tensors, **clips}
