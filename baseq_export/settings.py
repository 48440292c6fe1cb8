"""Settings as values: the quantization settings, their named profiles and presets, and the bit-width presets.

Everything that decides an artifact's numbers is a field here; the CLI, the public API and the tools pass these
values around and never compare a preset's spelling as a literal elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .quant import GGML_BLOCK, WEIGHT_GRIDS

if TYPE_CHECKING:
    from .models.base import ModelConfig

W4A16, W4A16KV4, W4A8KV8, W4A4KV4 = "w4a16", "w4a16kv4", "w4a8kv8", "w4a4kv4"
BITS_PRESETS = {W4A16: (4, None, None), W4A16KV4: (4, None, 4), W4A8KV8: (4, 8, 8), W4A4KV4: (4, 4, 4)}
"""Bit-width presets: (weight, activation, KV-cache) bits; None = float."""

BASEQ = "baseq"
METHODS = (BASEQ, "rtn", "gptq", "quarot-rtn", "quarot-gptq")
"""Quantization methods; baseq is rotated with GPTQ weights, then calibrated by calibrate.calibrate_baseq."""


GGML_CHOICES = ("llama.cpp", "sensitivity")
KV_CLIP_FITS = ("fixed", "mse")
HEAD_GROUP_SIZE = 32
"""Group size of a 4-bit embedding / lm_head: onnxruntime's GatherBlockQuantized and MatMulNBits blocks."""


@dataclass(frozen=True)
class QuantSettings:
    """Everything that decides the numbers of a quantized model (stored in the artifact)."""

    method: str = "quarot-gptq"
    bits: str = W4A4KV4
    group_size: int | None = None  # None = per output channel
    symmetric: bool = False
    a_clip: float = 0.9  # activation clip ratio (QuaRot's default for 4-bit)
    kv_clip: float = 0.95  # the KV quantizers' clip ratio, or with kv_clip_fit its starting point
    kv_clip_fit: str = "fixed"  # "fixed": kv_clip everywhere; "mse": per layer and KV head, the clip of least squared
    # K / V error on the calibration windows (kv_clips.fit_kv_clips; for methods without learned clips)
    seed: int = 0
    damp: float = 0.01
    act_order: bool = True
    head_bits: int = 16  # embedding and lm_head: 16 = float, 4 = 4-bit groups of HEAD_GROUP_SIZE (MSE clip; the table
    # the head reads by GPTQ on the head's calibration inputs where the method has calibration windows, else RTN)
    head_act_bits: int = 16  # lm_head input: 16 = float, 8 = int8 per group (a 4-bit head on onnxruntime's int8 kernels)
    linear_act_bits: int = 16  # w4a16 linears' input: 16 = float, 8 = int8 per weight group (onnxruntime's int8 kernels)
    weight_grid: str = "int"  # quant.WEIGHT_GRIDS: "int" (integer zero points), "q4_0" / "q4_1" (llama.cpp's blocks)
    weight_clip: str = "mse"  # group params: "mse" (quant.search_weight_qparams, QuaRot's recipe) or "minmax" (full range)
    r4: bool = True  # online Hadamard before down_proj (False: every rotation offline, as llama.cpp needs)
    r1_steps: int = 0  # learned residual rotation on top of R1 (learn_rotation.py): steps of its fit; 0 = R1 alone
    ggml_mix: str | None = None  # weight-only GGUF in llama.cpp's block types (quant.ggml_mix.MIXES): ggml picks the
    # scales, GPTQ (or ggml itself for rtn) the codes; None = the artifact's own 4-bit grid (weight_grid)
    ggml_choice: str = "llama.cpp"  # which layers' attn_v / ffn_down get a mix's more-bits type: llama.cpp's list,
    # or "sensitivity": as many layers, those whose output error falls most (measured on calibration windows)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.bits not in BITS_PRESETS:
            raise ValueError(f"unknown bits {self.bits!r}; choose one of {', '.join(BITS_PRESETS)}")
        if self.group_size not in (None, 32, 64, 128):
            raise ValueError(f"group size must be per-channel (none) or 32, 64, 128; got {self.group_size}")
        if self.head_bits not in (4, 16):
            raise ValueError(f"head bits must be 4 or 16 (float), got {self.head_bits}")
        if self.head_act_bits not in (8, 16):
            raise ValueError(f"head activation bits must be 8 or 16 (float), got {self.head_act_bits}")
        if self.head_act_bits == 8 and self.head_bits != 4:
            raise ValueError("8-bit head activations need a 4-bit head (they run onnxruntime's int4 x int8 kernels): "
                             "add --head-bits 4 or drop --head-act-bits")
        if self.linear_act_bits not in (8, 16):
            raise ValueError(f"linear activation bits must be 8 or 16 (float), got {self.linear_act_bits}")
        if self.linear_act_bits == 8 and (BITS_PRESETS[self.bits][1] or self.group_size is None):
            raise ValueError("8-bit linear activations are for weight-only linears with grouped weights (onnxruntime's "
                             "int8 kernels round per weight group): use --bits w4a16 (or w4a16kv4) --group-size "
                             "32|64|128")
        if self.kv_clip_fit not in KV_CLIP_FITS:
            raise ValueError(f"unknown KV clip fit {self.kv_clip_fit!r}; choose one of {', '.join(KV_CLIP_FITS)}")
        if self.kv_clip_fit != "fixed" and (not BITS_PRESETS[self.bits][2] or self.method == BASEQ):
            raise ValueError("fitting the KV clips needs a quantized KV cache (--bits w4a16kv4, w4a8kv8 or w4a4kv4) and "
                             "a method other than baseq (whose calibration learns them)")
        if self.weight_grid not in WEIGHT_GRIDS:
            raise ValueError(f"unknown weight grid {self.weight_grid!r}; choose one of {', '.join(WEIGHT_GRIDS)}")
        if self.weight_grid != "int" and self.group_size != GGML_BLOCK:
            raise ValueError(f"the {self.weight_grid} grid is llama.cpp's blocks of {GGML_BLOCK}: use group size {GGML_BLOCK}")
        if self.weight_grid != "int" and self.symmetric:
            raise ValueError("symmetric applies to the int grid only (q4_0 is llama.cpp's symmetric grid)")
        if self.weight_clip not in ("minmax", "mse"):
            raise ValueError(f"weight clip must be 'minmax' or 'mse', got {self.weight_clip!r}")

        if self.ggml_mix is not None:
            from .quant.ggml_mix import mix

            mix(self.ggml_mix)
            if self.ggml_choice not in GGML_CHOICES:
                raise ValueError(f"unknown choice of more-bits layers {self.ggml_choice!r}; choose one of "
                                 f"{', '.join(GGML_CHOICES)}")
            if self.bits != W4A16 or (self.rotated and self.r4) or self.head_bits != 16 or self.method == BASEQ:
                raise ValueError(f"--gguf-mix {self.ggml_mix} is a weight-only llama.cpp format: it takes --bits w4a16, "
                                 "no online rotation (R4 off), float heads (--head-bits 16) and a method among rtn, "
                                 "gptq, quarot-rtn, quarot-gptq (--profile gguf sets all of these)")
        if self.seed < 0:
            raise ValueError(f"seed must be 0 or more, got {self.seed}")
        if self.r1_steps < 0:
            raise ValueError(f"the learned rotation's steps must be 0 (off) or more, got {self.r1_steps}")
        if self.r1_steps and not (self.rotated and BITS_PRESETS[self.bits][1]):
            raise ValueError("a learned R1 rotation lowers activation rounding error: it needs a rotated method "
                             "(quarot-*, baseq) and quantized activations (--bits w4a4kv4 or w4a8kv8)")

    def check_model(self, cfg: ModelConfig) -> None:
        """Refuse settings this model's dimensions cannot take, before any calibration work."""
        from .models.base import LINEARS, linear_in_features

        if self.group_size:
            widths = {linear_in_features(cfg, n) for n in LINEARS}
            bad = sorted(k for k in widths if k % self.group_size)
            if bad:
                fits = [g for g in (32, 64, 128) if all(k % g == 0 for k in widths)]
                raise ValueError(f"--group-size {self.group_size} does not divide the input width(s) {bad} of this "
                                 f"model's linears; use {' or '.join(map(str, fits)) if fits else 'per-channel weights (no --group-size)'}")

    @property
    def rotated(self) -> bool:
        """True for the methods that rotate the model (QuaRot's R1-R4): quarot-* and baseq."""
        return self.method.startswith("quarot") or self.method == BASEQ

    @property
    def gptq(self) -> bool:
        """True for the methods whose weights GPTQ rounds (with calibration windows): gptq, quarot-gptq, baseq."""
        return self.method.endswith("gptq") or self.method == BASEQ

    def quant_config(self) -> dict:
        w_bits, a_bits, kv_bits = BITS_PRESETS[self.bits]
        rotation = {"r1_seed": self.seed, "r1": True, "r2": True, "r3": bool(kv_bits), "r4": self.r4,
                    **({"r1_learned_steps": self.r1_steps} if self.r1_steps else {})} if self.rotated else None
        return {
            "method": self.method, "bits": self.bits, "w_bits": w_bits, "a_bits": a_bits, "kv_bits": kv_bits,
            "group_size": self.group_size, "symmetric": self.symmetric, "rotation": rotation,
            "weight_grid": self.weight_grid, "weight_clip": self.weight_clip,
            "lm_head": "float" if self.head_bits == 16 else "int4", "embed": "float" if self.head_bits == 16 else "int4",
            **({"head_group_size": HEAD_GROUP_SIZE, "head_quant": "gptq" if self.gptq else "rtn"}
               if self.head_bits == 4 else {}),
            **({"head_act_bits": 8} if self.head_act_bits == 8 else {}),
            **({"linear_act_bits": 8} if self.linear_act_bits == 8 else {}),
            **({"ggml_mix": self.ggml_mix, "ggml_choice": self.ggml_choice} if self.ggml_mix else {}),
            **({"kv_clip_fit": self.kv_clip_fit} if self.kv_clip_fit != "fixed" else {}),
        }


PROFILES = {
    # llama.cpp (GGUF): weight-only W4A16, R1/R2 folded offline and no online rotation (llama.cpp has no
    # Hadamard before ffn_down), GPTQ on llama.cpp's Q4_1 blocks of 32 with searched fp16 d and m.
    "gguf": dict(method="quarot-gptq", bits=W4A16, group_size=GGML_BLOCK, weight_grid="q4_1", weight_clip="mse", r4=False),
    # onnxruntime, weight-only: rotated GPTQ in groups of 64 (searched clip), every rotation offline, 4-bit tied head;
    # head and linears on MatMulNBits' int8 kernels (inputs rounded to int8 per group, as the reference does).
    "onnx-w4a16": dict(method="quarot-gptq", bits=W4A16, group_size=64, weight_clip="mse", r4=False, head_bits=4,
                       head_act_bits=8, linear_act_bits=8),
    # onnxruntime for long prompts: onnx-w4a16's weights and kernels plus the rotated (R3) 4-bit KV cache (read packed
    # by the fused attention op). Its clips stay the fixed kv_clip: fitted per head by K/V error (kv_clip_fit="mse")
    # they came out 0.96 everywhere on the default model and no better at 4096-token windows (docs/results.md).
    "onnx-w4a16kv4": dict(method="quarot-gptq", bits=W4A16KV4, group_size=64, weight_clip="mse", r4=False, head_bits=4,
                          head_act_bits=8, linear_act_bits=8),
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


@dataclass(frozen=True)
class BaseqSettings:
    """Budget and switches of stage C (what the ablations turn off)."""

    name: str = "custom"
    nsamples: int = 32
    calib_ctx: int = 256
    epochs: int = 2
    batch_size: int = 4
    lr_clip: float = 3e-2
    lr_gain: float = 3e-3
    lr_shift: float = 2e-3
    clip_init: float = 0.88  # sigmoid(2): the LAC starting point
    learn_shift: bool = True
    learn_gain: bool = True
    learn_clip: bool = True
    shift_init: str = "mean"  # per-channel token mean of the site's input, or "zero"
    input_stream: str = "quant"  # block inputs for GPTQ and training: "quant" (previous quantized blocks) or "fp"
    stage_a_epochs: int = 0  # stage A (stage_a.py) before GPTQ: 0 = off
    lr_stage_a_scale: float = 2e-2  # the log-scales of the v/o and up/down pairs
    lr_stage_a_rotation: float = 5e-3  # the skew generators of the per-KV-head v/o rotations
    stage_a_scales: bool = True
    stage_a_rotation: bool = True
    learn_weight_scale: bool = False  # stage C also learns a multiplier of each linear's per-row weight scales
    lr_weight_scale: float = 2e-3  # ... on their logs (the codes and zero points stay GPTQ's)
    e2e_epochs: int = 0  # after the blocks, epochs of end-to-end tuning of every block's gains, shifts and clips on
    # the whole model's KL to the FP model (end_to_end.py): 0 = off
    loss: str = "mse"  # block-output loss (output_loss): "mse", or "token": relative to each token's target (the
    # blocks' mse_gptq / mse_baseq entries in calibration.json then hold this loss)


PRESETS = {
    # Chosen on the default model (evaluation split, 12 windows): a mean shift start beats zero
    # (20.6 vs 23.6), the quantized input stream beats the FP one (20.6 vs 21.9), and 5x the
    # paper's gain/shift learning rates help the short quick schedule (20.3 vs 20.6).
    # Both end with one epoch of the end-to-end pass (end_to_end.py): it is what generalizes to text calibration never
    # saw; quick fits it in the time the faster clip search and the reused block outputs saved (docs/results.md).
    "quick": BaseqSettings(name="quick", nsamples=32, calib_ctx=256, epochs=2, batch_size=4, lr_gain=1.5e-2, lr_shift=1e-2,
                           e2e_epochs=1),
    "standard": BaseqSettings(name="standard", nsamples=64, calib_ctx=512, epochs=4, batch_size=4, lr_gain=7.5e-3,
                              lr_shift=5e-3, e2e_epochs=1),
}

PRESET_R1_STEPS = {"quick": 100, "standard": 100}
"""Steps of the learned residual rotation (QuantSettings.r1_steps, learn_rotation.py) a preset asks for by default."""
