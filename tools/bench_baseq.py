"""BASE-Q against the QuaRot baselines on the default model, W4A4KV4, one run, shared windows.

    python tools/bench_baseq.py --json bench-baseq.json [--skip-standard]

All rows use the same evaluation windows (embedded evaluation split, ctx 512) and the same
calibration windows (128 x 512 from the calibration split, seed 0): QuaRot-GPTQ uses all of
them, each BASE-Q row the first `nsamples` cut to `calib_ctx` tokens of its preset (quick: 32 x
256, standard: 64 x 512; the CLI draws its own windows of those sizes). Rows: FP,
QuaRot-RTN, QuaRot-GPTQ, BASE-Q quick, BASE-Q standard, and ablations at the quick budget
(bias correction only, asymmetric scaling only, both without LAC), plus the gap closure
(PPL_QuaRot-GPTQ - PPL_BASE-Q) / (PPL_QuaRot-GPTQ - PPL_FP).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import machine, require_idle  # noqa: E402

from baseq_export import data  # noqa: E402
from baseq_export.calibrate import PRESETS, calibrate_baseq  # noqa: E402
from baseq_export.evaluate import perplexity  # noqa: E402
from baseq_export.models import load_model  # noqa: E402
from baseq_export.models.base import forward  # noqa: E402
from baseq_export.pipeline import QuantSettings, quantize_model  # noqa: E402
from baseq_export.qmodel import reference_model  # noqa: E402

QUICK = PRESETS["quick"]
ABLATIONS = [
    ("BASE-Q quick, bias correction only", dataclasses.replace(QUICK, name="bias-only", learn_gain=False, learn_clip=False)),
    ("BASE-Q quick, asymmetric scaling only", dataclasses.replace(QUICK, name="scale-only", learn_shift=False, learn_clip=False)),
    ("BASE-Q quick, bias + scaling, no LAC", dataclasses.replace(QUICK, name="no-lac", learn_clip=False)),
]


def gap_closure(baseline: float, ours: float, fp: float) -> float:
    return (baseline - ours) / (baseline - fp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--max-windows", type=int, default=None, help="fewer evaluation windows (smoke runs)")
    ap.add_argument("--skip-standard", action="store_true", help="leave out the (long) standard preset row")
    ap.add_argument("--skip-ablations", action="store_true")
    args = ap.parse_args()

    busy = require_idle()
    m = load_model("default")
    windows = data.token_windows(data.tokenize(m.tokenizer, data.embedded_text("eval")), 512, args.max_windows)
    calib = data.calibration_windows(data.tokenize(m.tokenizer, data.embedded_text("calib")), 128, 512, 0)
    q = QuantSettings(method="quarot-gptq", bits="w4a4kv4")
    res = {"machine": machine(), "cpu_busy_before": round(busy, 3), "eval_windows": windows.shape[0],
           "calib": list(calib.shape), "rows": {}}

    def row(name: str, logits_fn, seconds: float | None, extra: dict | None = None) -> float:
        t0 = time.time()
        with torch.inference_mode():
            ppl = perplexity(logits_fn, windows, desc=name[:30]).ppl
        res["rows"][name] = {"ppl": round(ppl, 4), "quantize_s": seconds, "eval_s": round(time.time() - t0, 1),
                             "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), **(extra or {})}
        print(f"{name:45s} ppl {ppl:9.4f}   quantize {seconds or 0:7.1f} s", flush=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")  # partial results survive an interruption
        return ppl

    def timed(fn):
        t0 = time.time()
        art = fn()
        return art, round(time.time() - t0, 1)

    fp = row("FP32", lambda ids: forward(m.config, m.weights, ids), None)
    art, s = timed(lambda: quantize_model(m, QuantSettings(method="quarot-rtn", bits="w4a4kv4")))
    row("QuaRot-RTN", reference_model(art).logits, s)
    art, s = timed(lambda: quantize_model(m, q, calib))
    gptq = row("QuaRot-GPTQ", reference_model(art).logits, s)
    runs = [("BASE-Q quick", QUICK)]
    if not args.skip_standard:
        runs.append(("BASE-Q standard", PRESETS["standard"]))
    if not args.skip_ablations:
        runs += ABLATIONS
    for name, b in runs:
        art, s = timed(lambda: calibrate_baseq(m, q, b, calib[: b.nsamples, : b.calib_ctx]))
        ppl = row(name, reference_model(art).logits, s, {"blocks_kept_trained": sum(x["kept"] == "trained" for x in art.calibration["blocks"])})
        res["rows"][name]["gap_closure_vs_quarot_gptq"] = round(gap_closure(gptq, ppl, fp), 4)
    res["cpu_busy_after"] = round(require_idle(), 3)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
