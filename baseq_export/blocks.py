"""The resumable block loop every method runs, and the per-block helpers it is made of.

A method quantizes a model one transformer block at a time. `walk_blocks` reads each block's (rotated) float
weights from BlockWeights, runs the full-precision block on the FP stream for its targets, asks the method's step
for the block's artifact tensors and log entry (or rereads a finished block from a resumable run's work
directory), stores them, and advances the quantized stream through the block as the artifact holds it. Memory
holds one block's weights and the calibration activations, never the whole model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .memory import map_big_allocations, release_free_memory
from .models import LoadedModel, weights_digest
from .models.base import SITE_LINEARS, ModelConfig, WrappedHooks, block_forward, rope_tables, site_width
from .artifact_tensors import linear_from_tensors
from .rotate import (random_signs, rotate_input_side, rotate_layer, rotate_layer_dense, rotate_outside_layers,
                     rotate_table_residual)
from .tensor_files import TensorStore, load_tensors, save_tensors, write_text_atomically


class TapHooks(WrappedHooks):
    """Wraps hooks and calls on_act(site, x) with each activation site's output (statistics collection)."""

    def __init__(self, inner, on_act):
        super().__init__(inner)
        self.on_act = on_act

    def act(self, layer, site, x):
        x = self.inner.act(layer, site, x)
        self.on_act(site, x)
        return x


def block_bytes(cfg: ModelConfig) -> int:
    """Bytes of one block's linear weights in float32 (attention q/k/v/o and the gated MLP)."""
    d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    return 4 * (d * (cfg.num_heads * cfg.head_dim) * 2 + 2 * d * kv + 3 * d * cfg.intermediate_size)


class BlockWeights:
    """A model's weights as a method sees them, rotated (or not) and in float32, one block at a time: only the
    tensors outside the blocks are held; `layer(i)` reads and rotates block i when asked (the same numbers as
    rotating the whole model first), so with lazily loaded weights a block is all that is in memory."""

    def __init__(self, model: LoadedModel, rotated: bool, seed: int = 0, r4: bool = True, device: torch.device | None = None,
                 residual: torch.Tensor | None = None):
        """residual: an orthogonal [d, d] applied to the residual stream after R1 (learn_rotation.py), or None."""
        self.model, self.rotated, self.seed, self.r4 = model, rotated, seed, r4
        self.residual = None if residual is None else residual.detach().to("cpu", torch.float64)
        self._r1_residual = None  # R1 times residual, multiplied out when a block first needs it
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
            if self.residual is None:
                rotated = rotate_layer(self.model.config, part, self.seed, self.r4)
            else:
                rotated = rotate_layer_dense(self.model.config, part, self.r1_residual(), self.r4)
            out.update({k: v.to(self.device, torch.float32) for k, v in rotated.items()})
        rest = set(names) - set(out) - {"attn_norm", "mlp_norm"}
        out.update({k: w[prefix + k].to(self.device, torch.float32) for k in sorted(rest)})
        return out

    def r1_residual(self) -> torch.Tensor:
        """R1 @ residual (float64 [d, d]): the blocks' whole residual rotation as one matrix."""
        if self._r1_residual is None:
            r1 = rotate_input_side(torch.eye(self.model.config.hidden_size, dtype=torch.float64),
                                   random_signs(self.model.config.hidden_size, self.seed))  # I R1
            self._r1_residual = r1 @ self.residual
        return self._r1_residual

    def outside_and_norms(self) -> dict[str, torch.Tensor]:
        """The tensors float_tensors stores: outside the blocks (embedding and head made now), plus each block's
        norm gains where they were not folded (an unrotated model)."""
        w = self.model.weights
        norms = {k: w[k].to(torch.float32) for k in w if not self.rotated and k.endswith(("attn_norm", "mlp_norm"))}
        tables = {k: self._outside_tensor(k) for k in ("embed", "lm_head") if k in self._names}
        return {**self.outside, **tables, **norms}


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


def dequantized_linears(tensors: dict[str, torch.Tensor], cfg: ModelConfig, layer: int,
                        group_size: int | None) -> dict[str, torch.Tensor]:
    """The float32 weights (`<linear>.weight`) of block `layer`'s seven linears as its artifact tensors hold them."""
    out = {}
    for site, names in SITE_LINEARS.items():
        for name in names:
            qw = linear_from_tensors(f"layers.{layer}.{name}", tensors, site_width(cfg, site), group_size)
            out[f"{name}.weight"] = qw.dequantize()
    return out


def open_workdir(workdir: str | Path | None, model: LoadedModel, calib: torch.Tensor, *settings) -> Path | None:
    """A resumable run's work directory, made if new; refused when it holds a partial run of other settings (the
    dataclasses `settings`), data or weights: a digest of all of them is kept in its state.json."""
    if not workdir:
        return None
    work = Path(workdir)
    key = hashlib.sha256(json.dumps([model.source, *(dataclasses.asdict(s) for s in settings)], sort_keys=True).encode())
    key.update(calib.numpy().tobytes())
    key.update(weights_digest(model).encode())  # reads every weight once: only for a resumable run
    work.mkdir(parents=True, exist_ok=True)
    state = work / "state.json"
    if state.is_file() and json.loads(state.read_text()).get("key") != key.hexdigest():
        raise ValueError(f"{work} holds a partial run with other settings, data or model weights; remove it to "
                         "start over, or choose another --out")
    state.write_text(json.dumps({"key": key.hexdigest()}))
    return work


def save_block(work: Path, layer: int, tensors: dict[str, torch.Tensor], entry: dict) -> None:
    """One finished block of a resumable run: its log entry, then its tensors (the tensors file marks it done),
    each written to a temp file and renamed, so an interrupted write never leaves a block that looks finished."""
    write_text_atomically(work / f"block_{layer}.json", json.dumps(entry))
    done = work / f"block_{layer}.safetensors"
    save_tensors(tensors, done.with_suffix(".tmp"))
    os.replace(done.with_suffix(".tmp"), done)


@dataclass
class Block:
    """What a method's step gets for one block: its float weights, its inputs on both streams, the FP targets."""

    layer: int
    weights: dict[str, torch.Tensor]  # the FP (rotated) block's float32 weights
    h_q: torch.Tensor | None  # inputs on the quantized stream (the blocks before it as the artifact holds them)
    h_fp: torch.Tensor | None  # inputs on the FP stream (None without an FP stream)
    y: torch.Tensor | None  # the FP block's outputs on h_fp: the targets (None without an FP stream)
    rope: tuple[torch.Tensor, torch.Tensor] | None
    started: float  # time.time() when the loop reached the block (its log entry's seconds count from here)
    bar: object  # the loop's progress bar, for a step that shows its training loss
    next_h_q: torch.Tensor | None = None  # a step that ran the finished block on h_q exactly as `advance` would
    # (the artifact's weights and hooks) may leave its output here: the loop then takes it instead of a rerun


Step = Callable[[Block], tuple[dict[str, torch.Tensor], dict]]
"""A method's work on one new block: (its artifact tensors, its log entry)."""

Advance = Callable[[int, dict, dict], tuple]
"""(layer, the block's artifact tensors, its FP weights) -> (weights, hooks) of the block as the artifact computes it."""


@dataclass
class Walk:
    """What the loop leaves: the blocks' log entries and both streams after the last block."""

    log: list[dict]
    h_q: torch.Tensor | None  # the quantized model's final stream (the head's calibration inputs)
    h_fp: torch.Tensor | None  # the FP model's final stream


def walk_blocks(src: BlockWeights, calib: torch.Tensor | None, step: Step, advance: Advance, tensors: TensorStore,
                work: Path | None = None, fp_hooks=None, desc: str = "", postfix: Callable[[int, dict], dict] | None = None,
                chunk: int = 8) -> Walk:
    """Run `step` on every block in order and put each block's tensors into `tensors`.

    calib: token windows [n, T] that feed the streams (None: no stream, the step sees weights only). fp_hooks: the
    FP model's online rotations; with them the FP stream runs alongside and each step gets its targets y. work: a
    resumable run's directory (open_workdir): a finished block there is reread instead of computed again (its file
    becomes the artifact's), a new one is saved. advance gives the block as the artifact computes it, which moves
    the quantized stream on. postfix(layer, entry): what the progress bar shows after a block."""
    cfg = src.config
    h_q = h_fp = rope = None
    if calib is not None:
        h = torch.nn.functional.embedding(calib.to(src.device), src.embed())
        h_q, h_fp = (h.clone(), h) if fp_hooks is not None else (h, None)
        rope = calib_rope(cfg, src.outside, h)
        del h
    log = []
    bar = tqdm(range(cfg.num_layers), desc=desc, unit="block")
    for i in bar:
        started, reused = time.time(), None
        fp_lw = src.layer(i)
        y = None if fp_hooks is None else checked_block(cfg, fp_lw, i, h_fp, fp_hooks, rope, "full-precision", chunk)
        done = work / f"block_{i}.safetensors" if work else None
        if done is not None and done.is_file():
            bt = load_tensors(done, device=str(src.device))
            entry = json.loads((work / f"block_{i}.json").read_text())
        else:
            blk = Block(i, fp_lw, h_q, h_fp, y, rope, started, bar)
            bt, entry = step(blk)
            reused, blk = blk.next_h_q, None
            if done is not None:
                save_block(work, i, bt, entry)
        log.append(entry)
        if done is not None:
            tensors.attach(done)
        else:
            tensors.put(bt, f"block_{i}.safetensors")
        if reused is not None and bool(torch.isfinite(reused).all()):
            h_q = reused  # (a non-finite one is rerun below, so that the refusal names the site)
        elif h_q is not None:
            lw, hooks = advance(i, bt, fp_lw)
            h_q = checked_block(cfg, lw, i, h_q, hooks, rope, "quantized", chunk)
            del lw, hooks
        h_fp = y
        del fp_lw, bt, y  # a 7B block's float weights are 0.8 GB a copy: none is held into the next block
        release_free_memory()
        if postfix is not None:
            bar.set_postfix(**postfix(i, entry))
    return Walk(log, h_q, h_fp)
