"""Perplexity of the default model under the QuaRot baselines, all rows on the same windows.

    python tools/bench_quarot.py --json bench-quarot.json

Rows: FP; W4A16 RTN per channel (no rotation); W4A4KV4 with per-channel weights: RTN without
rotation, QuaRot-RTN, QuaRot-GPTQ. Also a grid check (W4A16 RTN group 32 without rotation)
that is NOT a result: the default model's weights already lie on a group-32 Q4_1 grid.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path


from benchutil import machine, require_idle, write_json

import baseq_export as bq
from baseq_export import data
from baseq_export.settings import QuantSettings

ROWS = [
    ("W4A16 RTN per-channel, no rotation", QuantSettings(method="rtn", bits="w4a16")),
    ("W4A4KV4 RTN, no rotation", QuantSettings(method="rtn", bits="w4a4kv4")),
    ("W4A4KV4 QuaRot-RTN", QuantSettings(method="quarot-rtn", bits="w4a4kv4")),
    ("W4A4KV4 QuaRot-GPTQ", QuantSettings(method="quarot-gptq", bits="w4a4kv4")),
]
GRID_CHECK = ("grid check (not a result): W4A16 RTN group-32, no rotation", QuantSettings(method="rtn", bits="w4a16", group_size=32))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None, help="fewer evaluation windows (smoke runs)")
    ap.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows")
    ap.add_argument("--calib-ctx", type=int, default=512)
    args = ap.parse_args()

    busy = require_idle()
    m = bq.load("default", lazy=False)
    windows = data.token_windows(data.tokenize(m.tokenizer, data.embedded_text("eval")), args.ctx, args.max_windows)
    calib = data.calibration_windows(data.tokenize(m.tokenizer, data.embedded_text("calib")), args.nsamples, args.calib_ctx, 0)
    results = {"machine": machine(), "cpu_busy_before": round(busy, 3), "ctx": args.ctx,
               "eval_windows": windows.shape[0], "calib_windows": list(calib.shape), "rows": []}

    def record(name: str, model, quantize_s: float | None, settings: QuantSettings | None):
        t0 = time.time()
        r = bq.evaluate(model, windows=windows)
        row = {"name": name, "ppl": round(r.ppl, 4), "tokens": r.tokens, "eval_s": round(time.time() - t0, 1),
               "quantize_s": quantize_s, "settings": None if settings is None else settings.quant_config()}
        print(f"{name:62s} ppl {r.ppl:9.4f}   quantize {quantize_s or 0:6.1f} s", flush=True)
        return row

    results["rows"].append(record("FP32", m, None, None))
    for name, s in ROWS + [GRID_CHECK]:
        t0 = time.time()
        art = bq.quantize(m, plan=bq.plan_of(s), calib=calib if s.method.endswith("gptq") else None)
        row = record(name, art, round(time.time() - t0, 1), s)
        (results.setdefault("grid_check", row) if name is GRID_CHECK[0] else results["rows"].append(row))
    results["peak_rss_mib"] = round(peak_rss_mib())
    results["cpu_busy_after"] = round(require_idle(), 3)
    write_json(Path(args.json), results, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
