"""Round a whole model's linears block by block: RTN, or GPTQ with Hessians from the quantized stream; and the
tensors outside the blocks (embedding, head, norms), the 4-bit head GPTQ'd on the head's inputs.

Methods: ``rtn`` (no rotation, round to nearest), ``gptq`` (no rotation, GPTQ), ``quarot-rtn`` (rotations + RTN)
and ``quarot-gptq`` (rotations + GPTQ with Hessians from the calibration windows, one block at a time, each block
fed by the already-quantized blocks before it).
"""

from __future__ import annotations

import time
from collections import ChainMap
from pathlib import Path

import torch

from .kv_clips import fit_kv_clips, with_clips
from .blocks import Block, TapHooks, dequantized_linears, run_block, walk_blocks
from .learn_rotation import block_weights
from .memory import row_slices
from .models import LoadedModel, source_info
from .models.base import ACT_SITES, IDENTITY, SITE_LINEARS, ModelConfig, rms_norm, site_width
from .artifact import Artifact
from .artifact_tensors import linear_tensors
from .tensor_files import TensorStore
from .quant import HessianAccumulator, QuantizedWeight, gptq_factor, gptq_quantize, rtn_quantize
from .quant.ggml_mix import choose_more_bits, fits, linear_type, mix
from .quant.ggml_weights import GgmlWeight, ggml_gptq, ggml_rtn, weight_error
from .rotate import RotationHooks, head_mix
from .settings import BASEQ, BITS_PRESETS, HEAD_GROUP_SIZE, QuantSettings


def round_layer(w: dict[str, torch.Tensor], s: QuantSettings, hessians: dict | None,
                release: bool = False, layer: int = 0, n_layers: int = 1,
                chosen: dict[str, set[int]] | None = None) -> dict[str, QuantizedWeight | GgmlWeight]:
    """Quantize one layer's linears on s.weight_grid (or in the ggml types of s.ggml_mix for block `layer` of
    n_layers, more-bits layers `chosen` or llama.cpp's): GPTQ for the sites `hessians` holds (only those), else
    RTN for all seven. release: drop each site's Hessian from `hessians` once its linears are done (a 7B
    down_proj's is 1 GB), and let the site's last linear factor it in place."""
    out = {}
    mse = s.weight_clip == "mse"
    for site, names in SITE_LINEARS.items():
        if hessians is not None and site not in hessians:
            continue
        for name in names:
            weight = w[f"{name}.weight"].to(torch.float32)
            if s.ggml_mix:
                qtype = linear_type(s.ggml_mix, name, layer, n_layers, weight.shape[1], chosen)
                out[name] = (ggml_rtn(weight, qtype) if hessians is None else
                             ggml_gptq(weight, hessians[site].hessian, qtype, s.damp, s.act_order,
                                       scratch=release and name == names[-1]))
            elif hessians is None:
                out[name] = rtn_quantize(weight, 4, s.group_size, s.symmetric, mse_clip_search=mse, grid=s.weight_grid)
            else:
                out[name] = gptq_quantize(weight, hessians[site].hessian, 4, s.group_size, s.symmetric, s.damp, s.act_order,
                                          mse_clip_search=mse, grid=s.weight_grid, scratch=release and name == names[-1])
        if release and hessians is not None:
            del hessians[site]
    return out


HESSIAN_PASSES = (("attn_in", "o_in", "mlp_in"), ("down_in",))  # down_in's Hessian (ffn^2) is as big as the rest
SPLIT_HESSIANS_BYTES = 2**28  # above this a down_proj Hessian is gathered in a pass of its own


def gptq_layer(cfg, lw: dict, layer: int, h: torch.Tensor, hooks, rope, s: QuantSettings, chunk: int = 8,
               chosen: dict[str, set[int]] | None = None) -> dict[str, QuantizedWeight]:
    """GPTQ of one block's linears from its inputs h. Where down_proj's Hessian is big (8 * ffn^2 bytes over
    SPLIT_HESSIANS_BYTES: 1 GB at 7B) the other sites' are gathered, used and dropped before it is gathered in a
    second forward pass, so one pass's Hessians are held; the same numbers either way (every site's Hessian
    comes from the unquantized block's activations), one forward pass fewer for small models."""
    split = 8 * site_width(cfg, "down_in") ** 2 > SPLIT_HESSIANS_BYTES
    out = {}
    for sites in HESSIAN_PASSES if split else (ACT_SITES,):
        out.update(round_layer(lw, s, gptq_hessians(cfg, lw, layer, h, hooks, rope, chunk, sites), release=True,
                               layer=layer, n_layers=cfg.num_layers, chosen=chosen))
    return out


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
    spool: Path | None = None, device: torch.device | None = None, kv_windows: torch.Tensor | None = None,
) -> Artifact:
    """Quantize `model` into an artifact. `calib` [n, T] token windows are needed for GPTQ. With `spool` (a
    directory) each finished block's tensors go to a file there instead of staying in memory; `device`: where
    the blocks are calibrated (default CPU). kv_windows: the windows the KV clips are fitted on when
    settings.kv_clip_fit asks for it (default: calib)."""
    t0 = time.time()
    if settings.method == BASEQ:
        raise ValueError("baseq is calibrated by calibrate.calibrate_baseq, not quantize_model")
    gptq = settings.gptq
    if gptq and calib is None:
        raise ValueError("GPTQ needs calibration windows")
    src = block_weights(model, settings, calib, device)
    cfg = src.config
    hooks = RotationHooks(r3=False, r4=settings.r4) if settings.rotated else IDENTITY
    chosen = (more_bits_by_sensitivity(src, calib, settings, hooks, chunk)
              if settings.ggml_mix and settings.ggml_choice == "sensitivity" and mix(settings.ggml_mix).more_bits
              else None)

    def step(b: Block) -> tuple[dict, dict]:
        lw = b.weights
        qlayer = (gptq_layer(cfg, lw, b.layer, b.h_q, hooks, b.rope, settings, chunk, chosen) if gptq
                  else round_layer(lw, settings, None, layer=b.layer, n_layers=cfg.num_layers, chosen=chosen))
        return {k: v for name, qw in qlayer.items()
                for k, v in linear_tensors(f"layers.{b.layer}.{name}", qw, lw.get(f"{name}.bias")).items()}, {}

    def advance(layer: int, bt: dict, fp_lw: dict) -> tuple[dict, object]:
        return {**fp_lw, **dequantized_linears(bt, cfg, layer, settings.group_size)}, hooks

    tensors = TensorStore(spool)
    walk = walk_blocks(src, calib if gptq else None, step, advance, tensors, desc=f"{settings.method} {settings.bits}",
                       chunk=chunk)
    outside = float_tensors(cfg, src.outside_and_norms(), settings, head_inputs=walk.h_q)
    quant = dict(settings.quant_config(), **({"ggml_more_bits": {k: sorted(v) for k, v in chosen.items()}}
                                             if chosen else {}))
    calibration = {"windows": 0 if calib is None else list(calib.shape)}
    if settings.kv_clip_fit == "mse":
        kv_windows = calib if kv_windows is None else kv_windows
        if kv_windows is None:
            raise ValueError("fitting the KV clips needs calibration windows")
        draft = Artifact(model=cfg.to_dict(), quant=quant, tensors=ChainMap(outside, tensors))
        outside = with_clips(outside, fit_kv_clips(draft, kv_windows))
        calibration["kv_clip_windows"] = list(kv_windows.shape)
    tensors.put(outside, "outside.safetensors")
    return Artifact(model=cfg.to_dict(), quant=quant, tensors=tensors, source=source_info(model),
                    calibration={"seconds": round(time.time() - t0, 1), **calibration})


SENSITIVITY_WINDOWS = 16  # calibration windows the choice of more-bits layers is measured on


def more_bits_by_sensitivity(src, calib: torch.Tensor | None, s: QuantSettings, hooks,
                             chunk: int = 8) -> dict[str, set[int]]:
    """Which layers' attn_v / ffn_down get the mix's more-bits type, from measured sensitivity: on the float
    model's inputs (SENSITIVITY_WINDOWS windows), the fall in each tensor's output error tr(dW H dW^T) when ggml
    rounds it (with its importance, diag H) in the more-bits type instead of the base type; the layers of
    largest fall, as many as llama.cpp's rule picks (the same file size)."""
    if calib is None:
        raise ValueError("choosing the more-bits layers by sensitivity needs calibration windows (a GPTQ method)")
    cfg, m = src.config, mix(s.ggml_mix)
    sites = {"v": "attn_in", "down": "down_in"}

    def step(b: Block) -> tuple[dict, dict]:
        hs = gptq_hessians(cfg, b.weights, b.layer, b.h_q, hooks, b.rope, chunk, tuple(sites.values()))
        entry = {}
        for lin, site in sites.items():
            w, h = b.weights[f"{lin}.weight"].to(torch.float32), hs[site].hessian
            errors = [weight_error(w, ggml_rtn(w, fits(t, w.shape[1]), torch.diagonal(h)).dequantize(), h)
                      for t in (m.base, m.more_bits)]
            entry[lin] = errors[0] - errors[1]
        return {}, entry

    walk = walk_blocks(src, calib[:SENSITIVITY_WINDOWS], step, lambda i, bt, fp_lw: (fp_lw, hooks), TensorStore(None),
                       desc="sensitivity", chunk=chunk)
    return {lin: choose_more_bits([e[lin] for e in walk.log], cfg.num_layers) for lin in sites}


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
