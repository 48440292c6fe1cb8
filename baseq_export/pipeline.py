"""From a loaded FP model to a quantized artifact: rotate, collect statistics block by block, round.

Methods: ``rtn`` (no rotation, round to nearest), ``gptq`` (no rotation, GPTQ), ``quarot-rtn``
(rotations + RTN) and ``quarot-gptq`` (rotations + GPTQ with Hessians from the calibration
windows, one block at a time, each block fed by the already-quantized blocks before it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .models import LoadedModel, source_info, weights_digest
from .memory import map_big_allocations, release_free_memory, row_slices
from .models.base import ACT_SITES, IDENTITY, SITE_LINEARS, ModelConfig, block_forward, rms_norm, rope_tables, site_width
from .artifact import Artifact
from .artifact_tensors import linear_tensors
from .settings import BITS_PRESETS, HEAD_GROUP_SIZE, W4A16, QuantSettings
from .tensor_files import TensorStore, load_tensors, save_tensors, write_text_atomically
from .quant import HessianAccumulator, QuantizedWeight, gptq_factor, gptq_quantize, rtn_quantize
from .learn_rotation import (RESIDUAL_SITES, RotationFit, SiteSample, learn_residual_rotation, sampled_sites, site_gram,
                             token_sample)
from .rotate import RotationHooks, head_mix, rotate_layer, rotate_layer_residual, rotate_outside_layers, rotate_table_residual

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

    def head_in(self, x):
        return self.inner.head_in(x)


def round_layer(w: dict[str, torch.Tensor], s: QuantSettings, hessians: dict | None,
                release: bool = False) -> dict[str, QuantizedWeight]:
    """Quantize one layer's linears on s.weight_grid: GPTQ for the sites `hessians` holds (only those), else RTN
    for all seven. release: drop each site's Hessian from `hessians` once its linears are done (a 7B down_proj's
    is 1 GB), and let the site's last linear factor it in place."""
    out = {}
    mse = s.weight_clip == "mse"
    for site, names in SITE_LINEARS.items():
        if hessians is not None and site not in hessians:
            continue
        for name in names:
            weight = w[f"{name}.weight"].to(torch.float32)
            if hessians is None:
                out[name] = rtn_quantize(weight, 4, s.group_size, s.symmetric, mse_clip_search=mse, grid=s.weight_grid)
            else:
                out[name] = gptq_quantize(weight, hessians[site].hessian, 4, s.group_size, s.symmetric, s.damp, s.act_order,
                                          mse_clip_search=mse, grid=s.weight_grid, scratch=release and name == names[-1])
        if release and hessians is not None:
            del hessians[site]
    return out


HESSIAN_PASSES = (("attn_in", "o_in", "mlp_in"), ("down_in",))  # down_in's Hessian (ffn^2) is as big as the rest
SPLIT_HESSIANS_BYTES = 2**28  # above this a down_proj Hessian is gathered in a pass of its own


def gptq_layer(cfg, lw: dict, layer: int, h: torch.Tensor, hooks, rope, s: QuantSettings, chunk: int = 8) -> dict[str, QuantizedWeight]:
    """GPTQ of one block's linears from its inputs h. Where down_proj's Hessian is big (8 * ffn^2 bytes over
    SPLIT_HESSIANS_BYTES: 1 GB at 7B) the other sites' are gathered, used and dropped before it is gathered in a
    second forward pass, so one pass's Hessians are held; the same numbers either way (every site's Hessian
    comes from the unquantized block's activations), one forward pass fewer for small models."""
    split = 8 * site_width(cfg, "down_in") ** 2 > SPLIT_HESSIANS_BYTES
    out = {}
    for sites in HESSIAN_PASSES if split else (ACT_SITES,):
        out.update(round_layer(lw, s, gptq_hessians(cfg, lw, layer, h, hooks, rope, chunk, sites), release=True))
    return out


class BlockWeights:
    """A model's weights as a method sees them, rotated (or not) and in float32, one block at a time: only the
    tensors outside the blocks are held; `layer(i)` reads and rotates block i when asked (the same numbers as
    rotating the whole model first), so with lazily loaded weights a block is all that is in memory."""

    def __init__(self, model: LoadedModel, rotated: bool, seed: int = 0, r4: bool = True, device: torch.device | None = None,
                 residual: torch.Tensor | None = None):
        """residual: an orthogonal [d, d] applied to the residual stream after R1 (learn_rotation.py), or None."""
        self.model, self.rotated, self.seed, self.r4 = model, rotated, seed, r4
        self.residual = None if residual is None else residual.detach().to("cpu", torch.float64)
        if self.residual is not None and not rotated:
            raise ValueError("a residual rotation applies to a rotated model only")
        map_big_allocations(block_bytes(model.config))  # a 7B model's blocks: resident memory flat over them (memory.py)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.config = dataclasses.replace(model.config, tied_embeddings=False) if rotated else model.config
        self._names = [k for k in model.weights if not k.startswith("layers.")]
        self.outside = {k: self._outside_tensor(k).to(self.device) for k in self._names if k not in ("embed", "lm_head")
                        and not (k == "norm" and rotated)}  # the small ones (norm, rope); "norm" folds into lm_head

    def _outside_tensor(self, k: str) -> torch.Tensor:
        """A tensor outside the blocks in float32, rotated in float64 a slice of rows at a time (every step acts
        on rows separately), so a 7B embedding never has a whole float64 copy."""
        from .rotate import by_row_slices

        t = self.model.weights[k]
        if not self.rotated:
            return t.to(torch.float32)
        norm = {"norm": self.model.weights["norm"].to(torch.float64)} if k == "lm_head" and "norm" in self._names else {}

        def rotated(x: torch.Tensor) -> torch.Tensor:
            x = rotate_outside_layers(self.model.config, {k: x.to(torch.float64), **norm}, self.seed)[1][k]
            if self.residual is not None and k in ("embed", "lm_head"):
                x = rotate_table_residual(x, self.residual)
            return x.to(torch.float32)

        if t.dim() < 2:
            return rotated(t)
        return by_row_slices(rotated, t, out=torch.empty(t.shape, dtype=torch.float32))

    def embed(self) -> torch.Tensor:
        """The (rotated) float32 embedding table, made when asked and not kept: the model's biggest tensors are
        not held while the blocks are calibrated."""
        return self._outside_tensor("embed").to(self.device)

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Block i's weights (names as layer_weights gives them) on the device, rotated on the CPU one linear at
        a time in float64 so that only one tensor's float64 copy is in memory."""
        from .models.base import LINEARS
        from .rotate import IN_ATTN, IN_MLP

        w, prefix = self.model.weights, f"layers.{i}."
        names = [k[len(prefix):] for k in w if k.startswith(prefix)]
        if not self.rotated:
            return {k: w[prefix + k].to(self.device, torch.float32) for k in names}
        out = {}
        for name in LINEARS:  # each linear with what its rotation needs: its bias, the norm gain folded into it
            norm = "attn_norm" if name in IN_ATTN else "mlp_norm" if name in IN_MLP else None
            part = {k: w[prefix + k].to(torch.float64) for k in (f"{name}.weight", f"{name}.bias", norm) if k in names}
            rotated = rotate_layer(self.model.config, part, self.seed, self.r4)
            if self.residual is not None:
                rotated = rotate_layer_residual(rotated, self.residual)
            out.update({k: v.to(self.device, torch.float32) for k, v in rotated.items()})
        rest = set(names) - set(out) - {"attn_norm", "mlp_norm"}
        out.update({k: w[prefix + k].to(self.device, torch.float32) for k in sorted(rest)})
        return out

    def outside_and_norms(self) -> dict[str, torch.Tensor]:
        """The tensors float_tensors stores: outside the blocks (embedding and head made now), plus each block's
        norm gains where they were not folded (an unrotated model)."""
        w = self.model.weights
        norms = {k: w[k].to(torch.float32) for k in w if not self.rotated and k.endswith(("attn_norm", "mlp_norm"))}
        tables = {k: self._outside_tensor(k) for k in ("embed", "lm_head") if k in self._names}
        return {**self.outside, **tables, **norms}


def residual_site_samples(src: BlockWeights, calib: torch.Tensor, fit: RotationFit, seed: int) -> list[SiteSample]:
    """The blocks' attn_in / mlp_in inputs in the full-precision (rotated) model on the calibration windows, the
    same seeded sample of token rows at each, with the Gram matrix of the linears reading them (every site, or
    as many as fit.max_sample_bytes holds, spread over the depth)."""
    cfg = src.config
    hooks = RotationHooks(r3=False, r4=src.r4)
    h = torch.nn.functional.embedding(calib.to(src.device), src.embed())
    rope = calib_rope(cfg, src.outside, h)
    rows = token_sample(h.shape[0] * h.shape[1], fit.sample_tokens, seed, src.device)
    keep = set(sampled_sites(len(RESIDUAL_SITES) * cfg.num_layers, cfg.hidden_size, rows.numel(), fit.max_sample_bytes))
    samples = []
    for i in tqdm(range(cfg.num_layers), desc="R1 samples", unit="block", leave=False):
        lw = src.layer(i)
        sites = [s for j, s in enumerate(RESIDUAL_SITES) if i * len(RESIDUAL_SITES) + j in keep]
        taps: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
        tap = TapHooks(hooks, lambda site, x: taps[site].append(x.reshape(-1, x.shape[-1])) if site in taps else None)
        h = run_block(cfg, lw, i, h, tap, rope)
        for site in sites:
            x = torch.cat(taps[site])
            samples.append(SiteSample(x[rows], site_gram(lw, site), x.mean(0)))
    return samples


def learned_residual(model: LoadedModel, settings: QuantSettings, calib: torch.Tensor | None,
                     device: torch.device | None = None) -> torch.Tensor | None:
    """The learned rotation on top of the settings' R1 (learn_rotation.py), or None when settings.r1_steps is 0."""
    if not settings.r1_steps:
        return None
    if calib is None:
        raise ValueError("a learned R1 rotation needs calibration windows")
    fit = RotationFit(settings.r1_steps)
    samples = residual_site_samples(BlockWeights(model, True, settings.seed, settings.r4, device), calib, fit, settings.seed)
    a_bits = BITS_PRESETS[settings.bits][1]
    return learn_residual_rotation(samples, fit, a_bits, settings.a_clip, settings.seed).cpu()


def block_weights(model: LoadedModel, settings: QuantSettings, calib: torch.Tensor | None,
                  device: torch.device | None = None, r4: bool | None = None,
                  residual: torch.Tensor | None = None) -> BlockWeights:
    """BlockWeights as the settings rotate the model (R1 times the learned rotation when settings.r1_steps; a
    residual given is used as it is, e.g. one a resumed run saved)."""
    if residual is None:
        residual = learned_residual(model, settings, calib, device)
    return BlockWeights(model, settings.rotated, settings.seed, settings.r4 if r4 is None else r4, device, residual)


def block_bytes(cfg: ModelConfig) -> int:
    """Bytes of one block's linear weights in float32 (attention q/k/v/o and the gated MLP)."""
    d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    return 4 * (d * (cfg.num_heads * cfg.head_dim) * 2 + 2 * d * kv + 3 * d * cfg.intermediate_size)


def calib_rope(cfg: ModelConfig, w: dict[str, torch.Tensor], h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for calibration windows h [n, T, d]."""
    return rope_tables(w["rope.inv_freq"], torch.arange(h.shape[1], device=h.device), cfg.rope_attention_scaling, h.dtype)


def run_block(cfg, lw: dict, layer: int, h: torch.Tensor, hooks, rope, chunk: int = 8) -> torch.Tensor:
    """Block `layer` (weights lw) on every calibration window, a chunk of windows at a time."""
    return torch.cat([block_forward(cfg, lw, layer, h[i : i + chunk], *rope, hooks) for i in range(0, h.shape[0], chunk)])


class NonFiniteError(ValueError):
    """A calibration stream holds NaN/Inf: the message names the block, the stream and the site."""


def checked_block(cfg, lw: dict, layer: int, h: torch.Tensor, hooks, rope, stream: str, chunk: int = 8) -> torch.Tensor:
    """run_block, refusing an output with NaN/Inf; the error names the block and the first site that held them."""
    out = run_block(cfg, lw, layer, h, hooks, rope, chunk)
    if torch.isfinite(out).all():
        return out
    sites: list[str] = []
    run_block(cfg, lw, layer, h, TapHooks(hooks, lambda site, x: sites.append(site) if not torch.isfinite(x).all() else None),
              rope, chunk)
    where = f"first in the {sites[0]} activations" if sites else "in its output (after the MLP)"
    raise NonFiniteError(f"block {layer} of the {stream} model produced NaN/Inf {where}: an overflow, e.g. a float16 "
                         "checkpoint or huge weights; use a float32 or bfloat16 copy of the model. The finished blocks "
                         "are kept (a rerun on the same model resumes from them)")


def save_block(work: Path, layer: int, tensors: dict[str, torch.Tensor], entry: dict) -> None:
    """One finished block of a resumable run: its log entry, then its tensors (the tensors file marks it done),
    each written to a temp file and renamed, so an interrupted write never leaves a block that looks finished."""
    import json

    write_text_atomically(work / f"block_{layer}.json", json.dumps(entry))
    done = work / f"block_{layer}.safetensors"
    save_tensors(tensors, done.with_suffix(".tmp"))
    os.replace(done.with_suffix(".tmp"), done)


def gptq_hessians(cfg, lw: dict, layer: int, h: torch.Tensor, hooks, rope, chunk: int = 8,
                  sites: tuple[str, ...] = ACT_SITES) -> dict[str, HessianAccumulator]:
    """Hessians of the activation sites `sites` (default all four) of one block, from its inputs h."""
    hessians = {site: HessianAccumulator(site_width(cfg, site), h.device) for site in sites}
    run_block(cfg, lw, layer, h, TapHooks(hooks, lambda site, x: hessians[site].add(x) if site in hessians else None),
              rope, chunk)
    return hessians


@torch.no_grad()
def quantize_model(
    model: LoadedModel, settings: QuantSettings, calib: torch.Tensor | None = None, chunk: int = 8,
    spool: Path | None = None, device: torch.device | None = None,
) -> Artifact:
    """Quantize `model` into an artifact. `calib` [n, T] token windows are needed for GPTQ. With `spool` (a
    directory) each finished block's tensors go to a file there instead of staying in memory; `device`: where
    the blocks are calibrated (default CPU)."""
    t0 = time.time()
    gptq = settings.method.endswith("gptq")
    if gptq and calib is None:
        raise ValueError("GPTQ needs calibration windows")
    src = block_weights(model, settings, calib, device)
    cfg = src.config
    hooks = RotationHooks(r3=False, r4=settings.r4) if settings.rotated else IDENTITY
    h = torch.nn.functional.embedding(calib.to(src.device), src.embed()) if gptq else None
    rope = calib_rope(cfg, src.outside, h) if gptq else None
    tensors = TensorStore(spool)
    bar = tqdm(range(cfg.num_layers), desc=f"{settings.method} {settings.bits}", unit="block")
    for i in bar:
        lw = src.layer(i)
        qlayer = gptq_layer(cfg, lw, i, h, hooks, rope, settings, chunk) if gptq else round_layer(lw, settings, None)
        block = {}
        for name, qw in qlayer.items():
            block.update(linear_tensors(f"layers.{i}.{name}", qw, lw.get(f"{name}.bias")))
            if gptq:
                lw[f"{name}.weight"] = qw.dequantize()
        tensors.put(block, f"block_{i}.safetensors")
        del qlayer, block
        if gptq:
            h = checked_block(cfg, lw, i, h, hooks, rope, "quantized", chunk)
        del lw
        release_free_memory()
    tensors.put(float_tensors(cfg, src.outside_and_norms(), settings, head_inputs=h), "outside.safetensors")
    return Artifact(
        model=cfg.to_dict(),
        quant=settings.quant_config(),
        tensors=tensors,
        source=source_info(model),
        calibration={"seconds": round(time.time() - t0, 1), "windows": 0 if calib is None else list(calib.shape)},
    )


HEAD_GPTQ_ELEMENTS = 2**24  # GPTQ of a head table works on slices of rows of about this many entries


def head_hessian(cfg: ModelConfig, w: dict[str, torch.Tensor], h: torch.Tensor, s: QuantSettings,
                 mix: torch.Tensor | None, chunk: int = 8) -> torch.Tensor:
    """The lm_head's input Hessian on the calibration windows: the quantized model's final stream h [n, T, d]
    normed as the forward does (with the gain where it was not folded into the head), times head_mix, rounded
    to int8 blocks where the head runs onnxruntime's int8 kernels: what the 4-bit head multiplies (a chunk of
    windows at a time, as the blocks run)."""
    from .quant import fake_quant_int8_blocks

    acc = HessianAccumulator(cfg.hidden_size, h.device)
    for part in h.split(chunk):
        x = rms_norm(part, w.get("norm"), cfg.rms_eps)
        if mix is not None:
            x = torch.nn.functional.linear(x, mix)
        acc.add(fake_quant_int8_blocks(x, HEAD_GROUP_SIZE) if s.head_act_bits == 8 else x)
    return acc.hessian


def gptq_head(table: torch.Tensor, hessian: torch.Tensor) -> QuantizedWeight:
    """GPTQ of a 4-bit head table [vocab, d] (groups of HEAD_GROUP_SIZE, MSE clip) for the head's inputs: the
    logits' error, not each row's, is what it lowers. Rows are independent, so it works a slice of rows at a
    time (the same numbers as the whole table, from one factorisation of the Hessian) and a large vocabulary
    never has a whole working copy."""
    factor = gptq_factor(hessian, device=table.device)
    parts = [gptq_quantize(table[p].to(torch.float32), None, 4, HEAD_GROUP_SIZE, mse_clip_search=True, factor=factor)
             for p in row_slices(*table.shape, HEAD_GPTQ_ELEMENTS)]
    return QuantizedWeight(codes=torch.cat([q.codes for q in parts]), scale=torch.cat([q.scale for q in parts]),
                           zero=torch.cat([q.zero for q in parts]), group_size=parts[0].group_size, bits=4)


def float_tensors(cfg: ModelConfig, w: dict[str, torch.Tensor], s: QuantSettings, online: bool = True,
                  head_inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Tensors outside the blocks (embeddings, head, norms, rope; embedding and head as 4-bit codes when
    s.head_bits == 4) and, if `online`, the fixed clip values. head_inputs: the quantized model's final stream
    on the calibration windows; with it the 4-bit table the head reads is GPTQ'd for the head (a tied table
    serves the embedding too: measured on the main job, perplexity 22.46 with RTN, 20.70 with GPTQ), else RTN."""
    out = {}
    mix = head_mix(w["embed"], w["lm_head"]) if s.head_bits == 4 and "lm_head" in w and not cfg.tied_embeddings else None
    if mix is not None:  # a tied head untied by norm folding: one 4-bit table for both (rotate.head_mix)
        w = {k: v for k, v in w.items() if k != "lm_head"}
        out["head_mix"] = mix
    hessian = head_hessian(cfg, w, head_inputs, s, mix) if s.head_bits == 4 and head_inputs is not None else None
    head_table = "lm_head" if "lm_head" in w and not cfg.tied_embeddings else "embed"  # the table the head reads
    for name, t in w.items():
        if name.startswith("layers."):
            if name.rsplit(".", 1)[-1] in ("attn_norm", "mlp_norm"):
                out[name] = t
            continue
        if name == "lm_head" and cfg.tied_embeddings:
            continue
        if name in ("embed", "lm_head") and s.head_bits == 4:
            qw = (gptq_head(t, hessian) if hessian is not None and name == head_table
                  else rtn_quantize(t.to(torch.float32), 4, HEAD_GROUP_SIZE, mse_clip_search=True))
            out.update(linear_tensors(name, qw, None))
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


# ---------------------------------------------------------------------------------------------
# Blockwise tuning of a weight-only model (BASE-Q's blockwise idea for what llama.cpp can hold)

BIAS_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
"""Linears that get a learned output bias: all seven, since llama.cpp's llama graph loads an optional bias on
each (attn_q/k/v/output, ffn_gate/up/down; checked with the llama-cpp-python 0.3.36 build: a GGUF with
ffn_gate/ffn_up biases loads and its logits follow them)."""


@dataclass(frozen=True)
class TuneSettings:
    """Budget and switches of the weight-only blockwise tuning (tune_blocks)."""

    nsamples: int = 64  # tuning windows: the first nsamples calibration windows ...
    ctx: int = 256  # ... cut to their first ctx tokens (causal: the same activations as the full windows)
    nval: int = 16  # the next nval windows (same cut) choose, per block, between GPTQ / mean bias / trained
    epochs: int = 3
    batch_size: int = 4
    lr_scale: float = 5e-4  # AdamW on the relative change of d, and on m in units of d
    lr_bias: float = 1e-2  # AdamW on the bias in units of the linear's RMS output error after GPTQ
    learn_scale: bool = True  # per-block d (and m on q4_1): learned weight clipping, codes fixed
    learn_bias: bool = True  # per-linear output bias on BIAS_LINEARS
    bias_init: str = "mean"  # "mean": (W - W_q) E[x], the mean output error the rounding leaves; "zero"

    def __post_init__(self):
        if self.bias_init not in ("mean", "zero"):
            raise ValueError(f"bias_init must be 'mean' or 'zero', got {self.bias_init!r}")


def _ste_fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16 in the forward (what the artifact stores), identity gradient."""
    from .quant import fp16_round

    return x + (fp16_round(x) - x).detach()


def _tuned_params(qw: QuantizedWeight, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d, m) of one linear from its learnable relative changes: d = fp16(d0 (1 + a)), m = fp16(m0 + d0 b)."""
    from .quant import FP16_TINY

    d0 = qw.scale
    d = _ste_fp16(d0 * (1 + p["a"]).clamp(min=1e-2))
    if qw.grid == "q4_1":
        return d.clamp(min=FP16_TINY), _ste_fp16(qw.minimum + d0 * p["b"])
    return d, None


def _tuned_weight(qw: QuantizedWeight, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight of fixed codes with learnable (d, m): the grid's own dequantization, differentiable."""
    from .quant import dequant_values

    d, m = _tuned_params(qw, p)
    n, k = qw.shape
    cg = qw.codes.reshape(n, -1, qw.group_size).to(torch.float32)
    z = None if qw.zero is None else qw.zero.to(torch.float32).unsqueeze(-1)
    return dequant_values(cg, d.unsqueeze(-1), z, None if m is None else m.unsqueeze(-1)).reshape(n, k)


def _tuned_layer(qweights: dict[str, QuantizedWeight], params: dict, base_bias: dict) -> dict[str, torch.Tensor]:
    """Layer weights for block_forward from the learnable parameters (training and the saved artifact share it)."""
    lw = {}
    for name, qw in qweights.items():
        lw[f"{name}.weight"] = _tuned_weight(qw, params[name])
        bias = _bias(params[name]) if "bias0" in params[name] else base_bias.get(name)
        if bias is not None:
            lw[f"{name}.bias"] = bias
    return lw


def _frozen(qweights: dict[str, QuantizedWeight], params: dict, base_bias: dict) -> dict[str, tuple[QuantizedWeight, torch.Tensor | None]]:
    """(QuantizedWeight with the learned fp16 d / m, bias) per linear: exactly what _tuned_layer computed."""
    import dataclasses as dc

    out = {}
    with torch.no_grad():
        for name, qw in qweights.items():
            d, m = _tuned_params(qw, params[name])
            new = dc.replace(qw, scale=d.detach().clone(), minimum=None if m is None else m.detach().clone())
            new.validate()
            bias = _bias(params[name]) if "bias0" in params[name] else base_bias.get(name)
            out[name] = (new, None if bias is None else bias.detach().clone())
    return out


def _init_tune_params(cfg, qweights, fp_lw, layer, x, hooks, rope, t: TuneSettings, hessians: dict) -> dict:
    """Starting point: d, m as GPTQ left them (a = b = 0); biases of BIAS_LINEARS at the mean-error correction,
    learned in units of each output channel's RMS error after GPTQ (sqrt(diag(dW H dW^T) / 2), H = 2 E[x x^T])."""
    params = {name: {"a": torch.zeros_like(qw.scale), "b": torch.zeros_like(qw.scale)} for name, qw in qweights.items()}
    if not t.learn_bias and t.bias_init == "zero":
        return params
    means: dict[str, torch.Tensor] = {}
    if t.bias_init == "mean":
        qlw = {**{f"{n}.weight": qw.dequantize() for n, qw in qweights.items()},
               **{k: v for k, v in fp_lw.items() if k.endswith(".bias")}}

        def add(site: str, v: torch.Tensor) -> None:
            means[site] = means.get(site, 0) + v.reshape(-1, v.shape[-1]).to(torch.float64).sum(0)

        run_block(cfg, qlw, layer, x, TapHooks(hooks, add), rope)
    n_tok = x.shape[0] * x.shape[1]
    for site, names in SITE_LINEARS.items():
        for name in names:
            if name not in BIAS_LINEARS:
                continue
            base = fp_lw.get(f"{name}.bias")
            bias = torch.zeros(qweights[name].shape[0], device=x.device) if base is None else base.clone().to(torch.float32)
            err = fp_lw[f"{name}.weight"].to(torch.float64) - qweights[name].dequantize().to(torch.float64)
            if site in means:
                bias = bias + (err @ (means[site] / n_tok)).to(torch.float32)
            h = hessians[site].hessian.to(torch.float64)
            unit = (((err @ h) * err).sum(1) / 2).clamp(min=0).sqrt().to(torch.float32)
            params[name]["bias0"] = bias
            params[name]["c"] = torch.zeros_like(bias)
            params[name]["unit"] = unit.clamp(min=1e-12)
    return params


def _bias(p: dict) -> torch.Tensor | None:
    """The bias of one linear: its start plus the learnable c in units of the linear's RMS output error."""
    return None if "bias0" not in p else p["bias0"] + p["unit"] * p["c"]


def _train(cfg, qweights, params, base_bias, layer, x, y, hooks, rope, t: TuneSettings, seed: int) -> None:
    """AdamW (no weight decay) + cosine schedule on the block-output MSE; updates params in place."""
    groups = []
    if t.learn_scale:
        groups.append({"params": [p[k] for p in params.values() for k in ("a", "b")], "lr": t.lr_scale})
    if t.learn_bias:
        groups.append({"params": [p["c"] for p in params.values() if "c" in p], "lr": t.lr_bias})
    if not groups:
        return
    for g in groups:
        for v in g["params"]:
            v.requires_grad_(True)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = math.ceil(x.shape[0] / t.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, t.epochs * steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(t.epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for s in range(steps):
            idx = order[s * t.batch_size:(s + 1) * t.batch_size]
            out = run_block(cfg, _tuned_layer(qweights, params, base_bias), layer, x[idx], hooks, rope, chunk=t.batch_size)
            loss = torch.nn.functional.mse_loss(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    for p in params.values():
        for v in p.values():
            v.requires_grad_(False)


def _block_mse(cfg, lw, layer, x, y, hooks, rope) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(run_block(cfg, lw, layer, x, hooks, rope), y))


@torch.no_grad()
def tune_blocks(
    model: LoadedModel, settings: QuantSettings, calib: torch.Tensor, tune: TuneSettings | None = None,
    workdir: str | None = None, device: torch.device | None = None,
) -> Artifact:
    """Weight-only blockwise tuning: per block, GPTQ on settings.weight_grid, then with the codes fixed learn
    the per-block d (and m) and a per-linear output bias on BIAS_LINEARS (started at the mean output error
    GPTQ leaves) against the FP block's output (MSE), on the quantized stream. A block keeps the best of
    GPTQ, GPTQ + mean bias and the trained parameters by its MSE on the tuning windows.

    Resumable with `workdir`: each finished block is saved there and replayed on a rerun with the same settings.
    """
    import dataclasses as dc
    import hashlib
    import json


    from .artifact_tensors import linear_from_tensors

    if settings.bits != W4A16:
        raise ValueError("blockwise weight tuning is for the weight-only profile (bits w4a16)")
    t = tune or TuneSettings()
    t_start = time.time()
    torch.manual_seed(settings.seed)
    src = block_weights(model, settings, calib, device)
    cfg, w = src.config, src.outside
    hooks = RotationHooks(r3=False, r4=settings.r4) if settings.rotated else IDENTITY
    h_fp = torch.nn.functional.embedding(calib.to(src.device), src.embed())
    h_q = h_fp.clone()
    rope = calib_rope(cfg, w, h_fp)
    rope_t = tuple(r[: t.ctx] for r in rope)
    quant = dict(settings.quant_config(), tune=dc.asdict(t))
    work = Path(workdir) if workdir else None
    if work:
        key = hashlib.sha256(json.dumps([model.source, dc.asdict(settings), dc.asdict(t)], sort_keys=True).encode())
        key.update(calib.numpy().tobytes())
        key.update(weights_digest(model).encode())
        work.mkdir(parents=True, exist_ok=True)
        state = work / "state.json"
        if state.is_file() and json.loads(state.read_text()).get("key") != key.hexdigest():
            raise ValueError(f"{work} holds a partial run with other settings, data or model weights; remove it to "
                             "start over, or choose another --out")
        state.write_text(json.dumps({"key": key.hexdigest()}))
    tensors = TensorStore(work)
    log = []
    bar = tqdm(range(cfg.num_layers), desc=f"tune {settings.weight_grid}", unit="block")
    for i in bar:
        t0 = time.time()
        fp_lw = src.layer(i)
        y = checked_block(cfg, fp_lw, i, h_fp, hooks, rope, "full-precision")
        done = work / f"block_{i}.safetensors" if work else None
        if done is not None and done.is_file():
            bt = load_tensors(done, device=str(src.device))
            entry = json.loads((work / f"block_{i}.json").read_text())
        else:
            hessians = gptq_hessians(cfg, fp_lw, i, h_q, hooks, rope)
            qweights = round_layer(fp_lw, settings, hessians)
            base_bias = {n: fp_lw[f"{n}.bias"] for n in qweights if f"{n}.bias" in fp_lw}
            x, yt = h_q[: t.nsamples, : t.ctx], y[: t.nsamples, : t.ctx]
            xv, yv = h_q[t.nsamples : t.nsamples + t.nval, : t.ctx], y[t.nsamples : t.nsamples + t.nval, : t.ctx]
            zero = {n: {"a": torch.zeros_like(qw.scale), "b": torch.zeros_like(qw.scale)} for n, qw in qweights.items()}
            start = _init_tune_params(cfg, qweights, fp_lw, i, x, hooks, rope_t, t, hessians)
            del hessians
            cands = {"gptq": zero, "gptq+mean-bias": start}
            with torch.enable_grad():
                trained = {n: {k: v.clone() for k, v in p.items()} for n, p in start.items()}
                _train(cfg, qweights, trained, base_bias, i, x, yt, hooks, rope_t, t, settings.seed + i)
            cands["trained"] = trained
            fit = {k: _block_mse(cfg, _tuned_layer(qweights, p, base_bias), i, x, yt, hooks, rope_t) for k, p in cands.items()}
            val = fit if xv.shape[0] == 0 else {
                k: _block_mse(cfg, _tuned_layer(qweights, p, base_bias), i, xv, yv, hooks, rope_t) for k, p in cands.items()}
            kept = min(val, key=val.get)
            losses = {**{f"fit_{k}": v for k, v in fit.items()}, **{f"val_{k}": v for k, v in val.items()}}
            bt = {}
            for name, (qw, bias) in _frozen(qweights, cands[kept], base_bias).items():
                bt.update(linear_tensors(f"layers.{i}.{name}", qw, bias))
            entry = {"block": i, **{f"mse_{k}": v for k, v in losses.items()}, "kept": kept, "seconds": round(time.time() - t0, 2)}
            if done is not None:
                save_block(work, i, bt, entry)
        log.append(entry)
        if done is not None:
            tensors.attach(done)
        else:
            tensors.put(bt, f"block_{i}.safetensors")
        lw = {}
        for site, names in SITE_LINEARS.items():
            for name in names:
                p = f"layers.{i}.{name}"
                lw[f"{name}.weight"] = linear_from_tensors(p, bt, site_width(cfg, site), settings.group_size).dequantize()
                if f"{p}.bias" in bt:
                    lw[f"{name}.bias"] = bt[f"{p}.bias"]
        h_q = checked_block(cfg, lw, i, h_q, hooks, rope, "quantized")
        h_fp = y
        bar.set_postfix(block=i, kept=entry["kept"])
    tensors.put(float_tensors(cfg, src.outside_and_norms(), settings, online=False, head_inputs=h_q), "outside.safetensors")
    return Artifact(
        model=cfg.to_dict(), quant=quant, tensors=tensors, source=source_info(model),
        calibration={"seed": settings.seed, "windows": list(calib.shape), "blocks": log, "seconds": round(time.time() - t_start, 1)},
    )
