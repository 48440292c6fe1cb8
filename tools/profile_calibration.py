"""Where BASE-Q calibration's time goes, by stage: one calibration run with a wall clock around each stage's
function (a stage's own time: the stages it calls are counted in their own rows, so the rows add up to the whole).

    python tools/profile_calibration.py --json tools/results/profile-calibration.json [--model default]
                                        [--preset quick] [--e2e-epochs N] [--r1-steps N] [--seed 0] [--threads N]
                                        [--nsamples N --calib-ctx N]
    python tools/profile_calibration.py --table A.json B.json ...   # earlier runs side by side, measures nothing

The settings are the main job's (`baseq-export --format onnx`: BASE-Q quick with the learned R1, W4A4KV4, 4-bit
head on int8 inputs) unless changed. Work done for the head (its Hessian, GPTQ) is shown apart, marked (head).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchutil import machine, require_idle, write_json

import baseq_export as bq
from baseq_export import api
from baseq_export import blocks, calibrate, gptq_model
from baseq_export.quant import gptq, qparams

HEAD = "head and outside tensors"
# (module, attribute, stage): each patched where its caller looks it up
STAGES = [
    (calibrate, "learned_residual", "learned R1 rotation (fit)"),
    (blocks.BlockWeights, "layer", "rotations folded into a block's weights"),
    (blocks, "checked_block", "FP and quantized streams (block forwards)"),
    (gptq_model, "gptq_hessians", "GPTQ: Hessians"),
    (gptq_model, "head_hessian", "GPTQ: Hessians"),
    (gptq, "gptq_factor", "GPTQ: factorization"),
    (gptq_model, "gptq_factor", "GPTQ: factorization"),
    (qparams, "search_weight_qparams", "GPTQ: clip search (group scales)"),
    (gptq, "error_feedback", "GPTQ: error feedback"),
    (gptq, "_gptq_run", "GPTQ: column rounding"),
    (calibrate, "site_means", "stage C: site means"),
    (calibrate, "train_block", "stage C: training (forward, backward, fake quantizers)"),
    (calibrate, "block_loss", "stage C: block loss before training"),
    (calibrate, "run_block", "stage C: block output after training (the next quantized stream)"),
    (blocks, "save_block", "blocks saved"),
    (calibrate, "float_tensors", HEAD),
    (calibrate, "tune_end_to_end", "end-to-end pass"),
]


ONCE_A_MODEL = (HEAD, "learned R1 rotation (fit)", "end-to-end pass")
"""The stages run once a model; every other stage of STAGES (not marked (head)) runs once a block."""


def per_block_seconds(run: dict) -> float:
    """Seconds a block of a profile run (the JSON main() writes): its once-a-block stages over its layers."""
    per_block = {stage for _, _, stage in STAGES} - set(ONCE_A_MODEL)
    return sum(s for stage, s in run["stages"].items() if stage in per_block) / run["settings"]["layers"]


class StageClock:
    """Wall seconds per stage, each stage's own (a nested stage's time is taken out of the stage around it)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []

    def timed(self, f, stage: str):
        def run(*args, **kwargs):
            name = f"{stage} (head)" if self.stack and self.stack[0] == HEAD and stage != HEAD else stage
            self.stack.append(name)
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.stack.pop()
                self.seconds[name] += dt
                if self.stack:
                    self.seconds[self.stack[-1]] -= dt
        return run


@contextlib.contextmanager
def clocked(clock: StageClock):
    """STAGES' functions wrapped by clock while inside, restored after (those an older commit lacks are skipped:
    run with PYTHONPATH=<a checkout of it> to profile that commit)."""
    present = [(owner, attr, stage) for owner, attr, stage in STAGES if attr in owner.__dict__]
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in present]
    try:
        for owner, attr, stage in present:
            setattr(owner, attr, clock.timed(owner.__dict__[attr], stage))
        yield clock
    finally:
        for owner, attr, f in saved:
            setattr(owner, attr, f)


def markdown_table(runs: dict[str, dict]) -> str:
    """Earlier runs' stage seconds side by side (runs: column label -> the JSON a run wrote), a row per stage."""
    stages = list(dict.fromkeys(s for r in runs.values() for s in r["stages"]))
    lines = ["| stage | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for s in stages:
        lines.append(f"| {s} | " + " | ".join(f"{r['stages'][s]:.1f}" if s in r["stages"] else "" for r in runs.values())
                     + " |")
    lines.append("| **total** | " + " | ".join(f"**{r['total']:.1f}**" for r in runs.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="where this run's figures go")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print earlier runs' stages side by side and stop")
    ap.add_argument("--model", default="default", help="'default' or a checkpoint dir (e.g. bench_scale's 7B-shaped ones)")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--e2e-epochs", type=int, default=None, help="end-to-end epochs (default: the preset's)")
    ap.add_argument("--r1-steps", type=int, default=None, help="learned R1 steps (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: the preset's)")
    ap.add_argument("--calib-ctx", type=int, default=None, help="tokens per window (default: the preset's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.table:
        print(markdown_table({Path(p).stem: json.loads(Path(p).read_text()) for p in args.table}))
        return
    if not args.json:
        ap.error("--json is needed to measure (or --table to print earlier runs)")
    if args.threads:
        torch.set_num_threads(args.threads)
    busy = require_idle()
    model = bq.load(args.model)
    p = bq.plan("baseq", "w4a4kv4", args.preset, head_bits=4, head_act_bits=8, e2e_epochs=args.e2e_epochs,
                r1_steps=args.r1_steps, seed=args.seed, max_positions=model.max_positions,
                nsamples=args.nsamples, calib_ctx=args.calib_ctx)
    calib = api.calibration_windows(model.tokenizer, p.nsamples, p.calib_ctx, args.seed)
    t0 = time.perf_counter()
    with clocked(StageClock()) as clock:
        art = calibrate.calibrate_baseq(model, p.settings, p.baseq, calib)
    total = time.perf_counter() - t0
    stages = dict(sorted(clock.seconds.items(), key=lambda kv: -kv[1]))
    stages["other (embedding, loops, bookkeeping)"] = total - sum(stages.values())
    width = max(map(len, stages))
    print(f"{'stage':<{width}}  seconds  share")
    for stage, s in stages.items():
        print(f"{stage:<{width}}  {s:7.1f}  {s / total:5.1%}")
    print(f"{'total':<{width}}  {total:7.1f}")
    write_json(args.json, dict(machine=machine(), busy_before=busy, threads=torch.get_num_threads(),
                               settings=dict(preset=args.preset, nsamples=p.nsamples, calib_ctx=p.calib_ctx,
                                             e2e_epochs=p.baseq.e2e_epochs, r1_steps=p.settings.r1_steps,
                                             seed=args.seed, model=args.model, layers=model.config.num_layers),
                               stages={k: round(v, 2) for k, v in stages.items()}, total=round(total, 2),
                               peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                               end_to_end=art.calibration.get("end_to_end")))


if __name__ == "__main__":
    main()
