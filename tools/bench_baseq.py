"""BASE-Q against the QuaRot baselines, one run, shared windows, over seeds and over two texts.

    python tools/bench_baseq.py --json bench-baseq.json [--seeds 3] [--eval-text /usr/share/common-licenses/GPL-3]
                                [--model default|DIR] [--bits w4a4kv4,w4a8kv8] [--skip-standard] [--skip-ablations]

For each seed s (0 .. N-1) the calibration windows (128 x 512 of the calibration split, drawn with seed
s), the random R1 rotation and the training order all change; every quantized row of that seed uses
them: QuaRot-RTN, QuaRot-GPTQ (all 128 windows), BASE-Q quick and standard (the first `nsamples` windows
cut to `calib_ctx` tokens of the preset: quick 32 x 256, standard 64 x 512) and the ablations at the quick
budget (bias correction only, asymmetric scaling only, no LAC, with one epoch of stage A, and with each weight
group's full min-max range instead of the MSE clip, with QuaRot-GPTQ's min-max row beside it), then both budgets
with the learned R1 rotation and, on top, with one epoch of the end-to-end pass (standard's preset as it is; the
plain "quick" / "standard" rows are stage C alone: the presets without their end-to-end pass). Every row is
evaluated on the embedded evaluation split (ctx 512) and, with --eval-text, on a second text that calibration never saw (a
license text on every Debian system is a good one: /usr/share/common-licenses/GPL-3). Gap closure
(PPL_QuaRot-GPTQ - PPL_BASE-Q) / (PPL_QuaRot-GPTQ - PPL_FP) is taken against the QuaRot-GPTQ row of the
same seed and bits, per text; the summary gives its mean, standard deviation, min and max over seeds, and
perplexity_summary the same for every row's perplexity.
--bits adds rows at other bit widths (w4a8kv8: 8-bit per-token activations and KV cache).
Results are written after every row; --resume skips the rows a previous run already wrote; --table prints an
earlier run's rows as a markdown table (mean +- std over seeds) and measures nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from benchutil import machine, require_idle, write_json

import baseq_export as bq
from baseq_export import data
from baseq_export.settings import PRESET_R1_STEPS, PRESETS, QuantSettings
from baseq_export.targets.onnx import main_job_settings

# Stage C's budgets alone (the presets without their end-to-end pass): the "BASE-Q quick / standard" rows and the ablations
QUICK = dataclasses.replace(PRESETS["quick"], e2e_epochs=0)
STANDARD = dataclasses.replace(PRESETS["standard"], e2e_epochs=0)
# (row, BASE-Q budget and switches, QuantSettings fields that differ from the seed's defaults)
ABLATIONS = [
    ("BASE-Q quick, bias correction only", dataclasses.replace(QUICK, name="bias-only", learn_gain=False, learn_clip=False), {}),
    ("BASE-Q quick, asymmetric scaling only", dataclasses.replace(QUICK, name="scale-only", learn_shift=False, learn_clip=False), {}),
    ("BASE-Q quick, bias + scaling, no LAC", dataclasses.replace(QUICK, name="no-lac", learn_clip=False), {}),
    ("BASE-Q quick + stage A (1 epoch)", dataclasses.replace(QUICK, name="quick-stage-a", stage_a_epochs=1), {}),
    ("BASE-Q quick, min-max weight range", QUICK, {"weight_clip": "minmax"}),
]
LEARNED_R1 = [  # a learned rotation on top of R1 (learn_rotation.py) with the preset's steps, fitted before the blocks
    ("BASE-Q quick + learned R1", QUICK, {"r1_steps": PRESET_R1_STEPS["quick"]}),
    ("BASE-Q standard + learned R1", STANDARD, {"r1_steps": PRESET_R1_STEPS["standard"]}),
]
MAIN_JOB = [  # `baseq-export --format onnx`'s calibration: the quick preset as shipped, its learned R1, the ONNX main
    # job's 4-bit head on int8 inputs (targets/onnx.main_job_settings)
    ("BASE-Q main job (quick preset as shipped, 4-bit head)", PRESETS["quick"],
     {"r1_steps": PRESET_R1_STEPS["quick"], **main_job_settings(argparse.Namespace())}),
]
END_TO_END = [  # learned R1, stage C, then one epoch of the end-to-end pass (end_to_end.py): standard's preset as it is
    ("BASE-Q quick + learned R1 + end-to-end", dataclasses.replace(QUICK, e2e_epochs=1), {"r1_steps": PRESET_R1_STEPS["quick"]}),
    ("BASE-Q standard + learned R1 + end-to-end", dataclasses.replace(STANDARD, e2e_epochs=1),
     {"r1_steps": PRESET_R1_STEPS["standard"]}),
]


def evaluation_windows(tokenizer, eval_text: str | None = None, max_windows: int | None = None) -> dict[str, torch.Tensor]:
    """512-token windows of the embedded evaluation split and, with eval_text, of that file (keyed by its name)."""
    texts = {"embedded": data.embedded_text("eval")}
    if eval_text:
        texts[Path(eval_text).name] = data.read_text_file(eval_text)
    return {k: data.token_windows(data.tokenize(tokenizer, t), 512, max_windows) for k, t in texts.items()}


def gap_closure(baseline: float, ours: float, fp: float) -> float:
    return (baseline - ours) / (baseline - fp)


def spread(values: list[float]) -> dict:
    """Mean, standard deviation (0 for one value), min and max."""
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4), "n": len(values)}


def seed_groups(rows: dict[str, dict]) -> dict[str, list[dict]]:
    """Rows named "NAME BITS, seed S" grouped as "NAME BITS" (in the order they were measured)."""
    groups: dict[str, list[dict]] = {}
    for key, row in rows.items():
        groups.setdefault(key.rsplit(", seed ", 1)[0], []).append(row)
    return groups


def perplexity_spread(rows: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Each row's perplexity per text over its seeds."""
    return {g: {t: spread([r["ppl"][t] for r in rs]) for t in rs[0]["ppl"]} for g, rs in seed_groups(rows).items()}


def closure_spread(rows: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Each BASE-Q row's gap closure per text over its seeds (the rows that carry one)."""
    key = "gap_closure_vs_quarot_gptq"
    return {g: {t: spread([r[key][t] for r in rs]) for t in rs[0][key]}
            for g, rs in seed_groups(rows).items() if key in rs[0]}


def format_spread(sp: dict, digits: int, bounds: bool = True) -> str:
    """"mean +- std [min, max]" (bounds) or "mean +- std"; the mean alone for a single value."""
    if sp["n"] == 1:
        return f"{sp['mean']:.{digits}f}"
    out = f"{sp['mean']:.{digits}f} +- {sp['std']:.{digits}f}"
    return out + (f" [{sp['min']:.{digits}f}, {sp['max']:.{digits}f}]" if bounds else "")


def markdown_table(rows: dict[str, dict]) -> str:
    """The README's table: per row group, perplexity and gap closure per text as mean +- std over seeds (closure with
    its min and max), and the median quantize time."""
    texts = list(next(iter(rows.values()))["ppl"])
    ppl, closure = perplexity_spread(rows), closure_spread(rows)
    head = (["configuration", "seeds"] + [f"perplexity, {t}" for t in texts] + [f"gap closure, {t}" for t in texts]
            + ["quantize s (median)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, rs in seed_groups(rows).items():
        cells = [group, str(len(rs))]
        cells += [format_spread(ppl[group][t], 2, bounds=False) for t in texts]
        cells += [format_spread(closure[group][t], 3) if group in closure else "" for t in texts]
        times = [r["quantize_s"] for r in rs if r.get("quantize_s") is not None]
        cells.append(f"{statistics.median(times):.0f}" if times else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--model", default="default", help="default, or a local checkpoint (e.g. tools/offgrid_copy.py's)")
    ap.add_argument("--seeds", type=int, default=1, help="calibrate every quantized row with seeds 0 .. N-1")
    ap.add_argument("--eval-text", default=None, help="a second UTF-8 evaluation text (e.g. /usr/share/common-licenses/GPL-3)")
    ap.add_argument("--bits", default="w4a4kv4", help="comma-separated bit widths (w4a4kv4, w4a8kv8)")
    ap.add_argument("--max-windows", type=int, default=None, help="fewer evaluation windows (smoke runs)")
    ap.add_argument("--calib-windows", type=int, default=128, help="calibration windows of 512 tokens per seed (default 128)")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="scale every preset's calibration windows and epochs down (smoke runs; 1 = the presets)")
    ap.add_argument("--skip-standard", action="store_true", help="leave out the (long) standard preset row")
    ap.add_argument("--skip-ablations", action="store_true")
    ap.add_argument("--resume", action="store_true", help="keep the rows an earlier run wrote to --json")
    ap.add_argument("--only", default=None, help="measure only the BASE-Q rows whose name contains this (with --resume: "
                    "add rows to an earlier run)")
    ap.add_argument("--table", action="store_true", help="only print --json's rows as the README's markdown table")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.json).read_text())["rows"]))
        return

    busy = require_idle()
    m = bq.load(args.model, lazy=False)
    windows = evaluation_windows(m.tokenizer, args.eval_text, args.max_windows)
    calib_tokens = data.tokenize(m.tokenizer, data.embedded_text("calib"))
    out = Path(args.json)
    res = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    res.update({"machine": machine(), "model": args.model, "cpu_busy_before": round(busy, 3),
                "eval_windows": {k: int(w.shape[0]) for k, w in windows.items()}, "calib": [args.calib_windows, 512],
                "seeds": args.seeds, "budget_scale": args.budget_scale})
    rows = res.setdefault("rows", {})

    def save() -> None:
        write_json(out, res, indent=2)  # partial results survive an interruption

    def measure(key: str, make) -> dict:
        """One row: make() -> (what bq.evaluate scores, quantize seconds, extra); perplexity on every text."""
        if key in rows:
            print(f"{key:60s} (kept from the earlier run)", flush=True)
            return rows[key]
        model, seconds, extra = make()
        entry = {"quantize_s": seconds, "ppl": {}, **extra}
        t0 = time.time()
        for name, w in windows.items():
            entry["ppl"][name] = round(bq.evaluate(model, windows=w).ppl, 4)
        entry.update(eval_s=round(time.time() - t0, 1), peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        rows[key] = entry
        save()
        print(f"{key:60s} ppl {entry['ppl']}   quantize {seconds or 0:7.1f} s", flush=True)
        return entry

    def budget(b):
        if args.budget_scale == 1.0:
            return b
        return dataclasses.replace(b, nsamples=max(2, int(b.nsamples * args.budget_scale)),
                                   epochs=max(1, int(b.epochs * args.budget_scale)))

    def artifact_row(fn):
        t0 = time.time()
        art = fn()
        extra = {}
        if "blocks" in art.calibration:
            extra["blocks_kept_trained"] = sum(x["kept"] == "trained" for x in art.calibration["blocks"])
        return art, round(time.time() - t0, 1), extra

    fp = measure("FP32", lambda: (m, None, {}))
    baseq_runs = [("BASE-Q quick", QUICK, {})]
    if not args.skip_standard:
        baseq_runs.append(("BASE-Q standard", STANDARD, {}))
    if not args.skip_ablations:
        baseq_runs += ABLATIONS
    baseq_runs += LEARNED_R1 + END_TO_END + MAIN_JOB
    if args.only:
        baseq_runs = [run for run in baseq_runs if args.only in run[0]]
    for bits in args.bits.split(","):
        for seed in range(args.seeds):
            calib = data.calibration_windows(calib_tokens, args.calib_windows, 512, seed)
            q = QuantSettings(method="quarot-gptq", bits=bits, seed=seed)
            tag = f"{bits}, seed {seed}"
            measure(f"QuaRot-RTN {tag}", lambda: artifact_row(
                lambda: bq.quantize(m, plan=bq.plan_of(dataclasses.replace(q, method="quarot-rtn")))))
            gptq = measure(f"QuaRot-GPTQ {tag}", lambda: artifact_row(lambda: bq.quantize(m, plan=bq.plan_of(q), calib=calib)))
            if not args.skip_ablations:
                measure(f"QuaRot-GPTQ, min-max weight range {tag}", lambda: artifact_row(
                    lambda: bq.quantize(m, plan=bq.plan_of(dataclasses.replace(q, weight_clip="minmax")), calib=calib)))
            for name, b, q_fields in baseq_runs:
                b, qb = budget(b), dataclasses.replace(q, **q_fields)
                e = measure(f"{name} {tag}", lambda: artifact_row(
                    lambda: bq.quantize(m, plan=bq.plan_of(qb, b), calib=calib[: b.nsamples, : b.calib_ctx])))
                e["gap_closure_vs_quarot_gptq"] = {t: round(gap_closure(gptq["ppl"][t], e["ppl"][t], fp["ppl"][t]), 4)
                                                   for t in windows}
                save()
    res["summary"] = closure_spread(rows)
    res["perplexity_summary"] = perplexity_spread(rows)
    res["cpu_busy_after"] = round(require_idle(), 3)
    save()
    for label, summary in (("perplexity ", res["perplexity_summary"]), ("gap closure", res["summary"])):
        for row, per_text in summary.items():
            print(f"{row:50s} {label} " + ", ".join(f"{t}: {format_spread(sp, 3)}" for t, sp in per_text.items()))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
