"""BASE-Q blockwise calibration: GPTQ weights, then learned bias correction, scaling and clipping.

One transformer block at a time, on top of the QuaRot rotations:
  stage A  (when stage_a_epochs > 0) learned function-preserving v/o and up/down transforms of the float
           weights, trained through RTN fake-quantized weights (stage_a.py), folded in before GPTQ;
  stage B  GPTQ asymmetric INT4 weights, Hessians from this block's quantized-stream inputs;
  stage C  weights frozen, learn per site (attn_in, o_in, mlp_in, down_in) a per-channel gain
           (asymmetric scaling), a per-channel shift (bias correction) and a clip (LAC,
           clip = sigmoid(beta)); K and V get a clip per head. Loss: MSE between the block's
           output on the quantized stream and the FP block's output on the FP stream.
Then (when e2e_epochs > 0) the end-to-end pass (end_to_end.py) tunes every block's gains, shifts and clips
together on the whole quantized model's KL to the FP model over the same windows.
Stage A is stage_a.py, stage C stage_c.py; this module runs them block by block (blocks.walk_blocks).
Resumable: each finished block is written to `<out>.partial/block_<i>.safetensors` (and the end-to-end
pass's result to end_to_end.*); a rerun with the same settings replays the finished work (deterministic)
and continues.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .blocks import Block, dequantized_linears, open_workdir, run_block, walk_blocks
from .end_to_end import EndToEndFit, end_to_end_bytes, tune_end_to_end
from .gptq_model import float_tensors, gptq_layer
from .learn_rotation import block_weights, learned_residual
from .memory import available_memory, memory_now, release_free_memory
from .models import LoadedModel, source_info
from .models.base import ModelConfig
from .artifact import Artifact
from .reference import QuantHooks
from .quant import rescale_rows
from .rotate import RotationHooks
from .settings import W4A4KV4, W4A8KV8, BaseqSettings, QuantSettings
from .stage_a import train_stage_a
from .stage_c import (LOSSES, block_from_tensors, block_loss, block_tensors, fold_block, init_params, output_loss,
                      site_means, train_block)
from .tensor_files import TensorStore, load_tensors, save_tensors, write_text_atomically


RESIDUAL_FILE = "r1_residual.safetensors"
"""A resumable run's learned residual rotation (learn_rotation.py), fitted once and reused on a rerun."""


def _saved_residual(work: Path | None, model: LoadedModel, q: QuantSettings, calib: torch.Tensor,
                    device: torch.device | None) -> torch.Tensor | None:
    """The learned residual rotation of this run (None when q.r1_steps is 0): read from a resumable run's work
    directory when an earlier try saved it, else fitted now (and saved there)."""
    if not q.r1_steps:
        return None
    path = work / RESIDUAL_FILE if work else None
    if path is not None and path.is_file():
        return load_tensors(path)["residual"]
    residual = learned_residual(model, q, calib, device)
    if path is not None:
        save_tensors({"residual": residual}, path.with_suffix(".tmp"))  # then renamed: never half written
        os.replace(path.with_suffix(".tmp"), path)
    return residual


def baseq_quant_config(q: QuantSettings, b: BaseqSettings) -> dict:
    """The quant config a BASE-Q artifact records (what the main job compares before reusing one)."""
    return dict(q.quant_config(), method="baseq", baseq=dataclasses.asdict(b))


@torch.no_grad()
def calibrate_baseq(
    model: LoadedModel, q: QuantSettings, b: BaseqSettings, calib: torch.Tensor, workdir: str | Path | None = None,
    device: torch.device | None = None,
) -> Artifact:
    """BASE-Q quantize `model` on the calibration windows; `workdir` makes the run resumable; `device`: where the
    blocks are calibrated (default CPU)."""
    if b.input_stream not in ("quant", "fp") or b.shift_init not in ("zero", "mean") or b.loss not in LOSSES:
        raise ValueError(f"input_stream must be 'quant' or 'fp', shift_init 'zero' or 'mean' and loss one of {LOSSES}")
    if q.bits not in (W4A4KV4, W4A8KV8):
        raise ValueError("BASE-Q learns activation-quantizer parameters: use --bits w4a4kv4 or w4a8kv8")
    t_start = time.time()
    torch.manual_seed(q.seed)
    work = open_workdir(workdir, model, calib, q, b)
    src = block_weights(model, q, calib, device, r4=True, residual=_saved_residual(work, model, q, calib, device))
    cfg = src.config
    quant_cfg = baseq_quant_config(q, b)
    fp_hooks = RotationHooks(r3=False, r4=True)

    def step(blk: Block) -> tuple[dict, dict]:
        i, fp_lw, y, rope, bar = blk.layer, blk.weights, blk.y, blk.rope, blk.bar
        x = blk.h_q if b.input_stream == "quant" else blk.h_fp
        a_entry = {}
        if b.stage_a_epochs:
            with torch.enable_grad():
                fp_lw, a_entry = train_stage_a(cfg, fp_lw, i, x, y, quant_cfg, q, b, rope, fp_hooks, q.seed + i, bar)
        qweights = gptq_layer(cfg, fp_lw, i, x, fp_hooks, rope, q)  # each Hessian dropped once used
        qlw = {**{f"{n}.weight": qw.dequantize() for n, qw in qweights.items()},
               **{k: v for k, v in fp_lw.items() if k.endswith(".bias")}}
        means = site_means(cfg, qlw, i, x, fp_hooks, rope) if b.shift_init == "mean" else None
        params = init_params(cfg, b, means, src.device)
        if b.learn_weight_scale:
            params.update({f"{n}.log_wscale": torch.zeros(qw.shape[0], device=src.device) for n, qw in qweights.items()})
        lw0, on0 = fold_block(qlw, params, i)
        loss0 = block_loss(cfg, lw0, i, x, y, QuantHooks(quant_cfg, on0), rope, b.loss)
        with torch.enable_grad():
            params = train_block(cfg, qlw, i, x, y, quant_cfg, b, rope, {k: v.clone() for k, v in params.items()}, q.seed + i, bar)
        gptq_weights = qweights
        if b.learn_weight_scale:  # into the stored (fp16) scales before the loss is taken: what the artifact holds
            qweights = {n: rescale_rows(qw, params.pop(f"{n}.log_wscale").exp()) for n, qw in qweights.items()}
            qlw = {**qlw, **{f"{n}.weight": qw.dequantize() for n, qw in qweights.items()}}
        lw1, on1 = fold_block(qlw, params, i)
        out1 = run_block(cfg, lw1, i, x, QuantHooks(quant_cfg, on1), rope)  # what the artifact's block computes on x
        loss1 = float(output_loss(out1, y, b.loss))
        kept = "trained"
        if not loss1 < loss0:  # never make a block worse than its GPTQ start
            lw1, on1, loss1, kept, qweights, out1 = lw0, on0, loss0, "untrained", gptq_weights, None
        if b.input_stream == "quant":  # x is the quantized stream: out1 is its next value (walk_blocks reuses it)
            blk.next_h_q = out1
        bt = block_tensors(qweights, lw1, on1, i)
        del qweights, gptq_weights, qlw, lw0, lw1, on0, on1, params, means, x, fp_lw, out1  # not kept into the next block
        release_free_memory()
        entry = {"block": i, **a_entry, "mse_gptq": loss0, "mse_baseq": loss1, "kept": kept,
                 "seconds": round(time.time() - blk.started, 2), **memory_now()}
        return bt, entry

    def advance(layer: int, bt: dict, fp_lw: dict) -> tuple[dict, QuantHooks]:
        lw, online = block_from_tensors(bt, dequantized_linears(bt, cfg, layer, q.group_size), layer)
        return lw, QuantHooks(quant_cfg, online)

    tensors = TensorStore(work)  # with a workdir the finished blocks' files are the artifact's tensors
    walk = walk_blocks(src, calib, step, advance, tensors, work, fp_hooks, "BASE-Q",
                       lambda i, e: dict(block=i, mse=f"{e['mse_baseq']:.3g}", gptq=f"{e['mse_gptq']:.3g}"))
    tensors.put(float_tensors(cfg, src.outside_and_norms(), q, online=False, head_inputs=walk.h_q), "outside.safetensors")
    art = Artifact(model=cfg.to_dict(), quant=quant_cfg, tensors=tensors, source=source_info(model),
                   calibration={"seed": q.seed, "windows": list(calib.shape), "blocks": walk.log})
    if b.e2e_epochs:
        art.calibration["end_to_end"] = _tuned_end_to_end(art, work, b, calib, walk.h_fp, q.seed, device)
    art.calibration["seconds"] = round(time.time() - t_start, 1)
    return art


E2E_FILE = "end_to_end"
"""A resumable run's end-to-end pass: <work>/end_to_end.json (its log entry) and .safetensors (its tensors)."""


def _tuned_end_to_end(art: Artifact, work: Path | None, b: BaseqSettings, calib: torch.Tensor, fp_last: torch.Tensor,
                      seed: int, device: torch.device | None) -> dict:
    """Run (or, on a resumed run, reread) the end-to-end pass and put its tensors into the artifact; its log entry.
    Skipped with a note when the dequantized model would not fit in the memory that is free."""
    entry_file, tensor_file = (work / f"{E2E_FILE}.json", work / f"{E2E_FILE}.safetensors") if work else (None, None)
    if entry_file is not None and entry_file.is_file():
        entry = json.loads(entry_file.read_text())
        if entry.get("kept"):
            art.tensors.attach(tensor_file)
        return entry
    need, free = end_to_end_bytes(ModelConfig.from_dict(art.model), held=False), available_memory()  # the least it needs
    if free is not None and need > free:
        tqdm.write(f"end-to-end tuning skipped: it needs about {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is free; "
                   "the artifact is complete without it (--e2e-epochs 0 leaves it out without this note; a machine "
                   "with more free memory runs it)")
        return {"skipped": "memory", "needed_gib": round(need / 2**30, 1), "free_gib": round(free / 2**30, 1)}
    tuned, entry = tune_end_to_end(art, calib, fp_last, EndToEndFit(b.e2e_epochs), seed, device)
    if tuned is not None:  # the tensors first, then the entry that marks the pass done (each written atomically)
        art.tensors.put(tuned, f"{E2E_FILE}.safetensors")
    if entry_file is not None:
        write_text_atomically(entry_file, json.dumps(entry))
    return entry
