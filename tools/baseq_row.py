"""One row of tools/bench_baseq.py on its own: quantize the default model (or --model) one way, with one seed,
and print its perplexity on the embedded evaluation split and, with --eval-text, a second text; appended to
--json. For trying a setting in minutes before a seeded bench run.

    python tools/baseq_row.py NAME --json rows.json [--method baseq|quarot-gptq|quarot-rtn|fp] [--preset quick]
                              [--seed 0] [--quant '{"weight_clip": "minmax"}'] [--baseq '{"stage_a_epochs": 1}']
                              [--eval-text /usr/share/common-licenses/GPL-3]

The same calibration set as the bench (128 x 512 windows of the calibration split drawn with --seed; BASE-Q takes
its preset's first nsamples windows cut to calib_ctx), the torch reference forward, float embedding and head.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


from bench_baseq import evaluation_windows
from benchutil import machine, write_json

import baseq_export as bq
from baseq_export import data
from baseq_export.settings import PRESETS, QuantSettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="the row's name in --json")
    ap.add_argument("--json", required=True, type=Path)
    ap.add_argument("--model", default="default")
    ap.add_argument("--method", default="baseq", choices=("baseq", "quarot-gptq", "quarot-rtn", "fp"))
    ap.add_argument("--preset", default="quick", choices=tuple(PRESETS))
    ap.add_argument("--bits", default="w4a4kv4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quant", default="{}", help="QuantSettings fields as JSON, e.g. '{\"weight_clip\": \"minmax\"}'")
    ap.add_argument("--baseq", default="{}", help="BaseqSettings fields as JSON, e.g. '{\"stage_a_epochs\": 1}'")
    ap.add_argument("--eval-text", default=None)
    args = ap.parse_args()

    m = bq.load(args.model, lazy=False)
    windows = evaluation_windows(m.tokenizer, args.eval_text)
    t0 = time.time()
    if args.method == "fp":
        model, row = m, {}
    else:
        q = QuantSettings(method=args.method, bits=args.bits,
                          seed=args.seed, **json.loads(args.quant))
        calib = data.calibration_windows(data.tokenize(m.tokenizer, data.embedded_text("calib")), 128, 512, args.seed)
        b = dataclasses.replace(PRESETS[args.preset], **json.loads(args.baseq)) if args.method == "baseq" else None
        model = bq.quantize(m, plan=bq.plan_of(q, b), calib=calib[: b.nsamples, : b.calib_ctx] if b else calib)
        row = {"quant": model.quant}
    row["quantize_s"] = round(time.time() - t0, 1)
    row["ppl"] = {k: round(bq.evaluate(model, windows=w).ppl, 4) for k, w in windows.items()}
    res = json.loads(args.json.read_text()) if args.json.is_file() else {"machine": machine(), "rows": {}}
    res["rows"][args.name] = {**row, "args": {k: v for k, v in vars(args).items() if k != "json"}}
    write_json(args.json, res, indent=1)
    print(args.name, row["ppl"], f"quantize {row['quantize_s']} s", flush=True)


if __name__ == "__main__":
    main()
