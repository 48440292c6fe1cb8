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
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_baseq import evaluation_windows  # noqa: E402
from benchutil import machine, write_json  # noqa: E402

from baseq_export import data  # noqa: E402
from baseq_export.calibrate import calibrate_baseq  # noqa: E402
from baseq_export.settings import PRESETS  # noqa: E402
from baseq_export.evaluate import perplexity  # noqa: E402
from baseq_export.models import load_model  # noqa: E402
from baseq_export.models.base import forward  # noqa: E402
from baseq_export.gptq_model import quantize_model  # noqa: E402
from baseq_export.settings import QuantSettings  # noqa: E402
from baseq_export.reference import reference_model  # noqa: E402


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

    m = load_model(args.model)
    windows = evaluation_windows(m.tokenizer, args.eval_text)
    t0 = time.time()
    if args.method == "fp":
        logits, row = (lambda ids: forward(m.config, m.weights, ids)), {}
    else:
        q = QuantSettings(method=args.method, bits=args.bits,
                          seed=args.seed, **json.loads(args.quant))
        calib = data.calibration_windows(data.tokenize(m.tokenizer, data.embedded_text("calib")), 128, 512, args.seed)
        if args.method == "baseq":
            b = dataclasses.replace(PRESETS[args.preset], **json.loads(args.baseq))
            art = calibrate_baseq(m, q, b, calib[: b.nsamples, : b.calib_ctx])
        else:
            art = quantize_model(m, q, calib)
        logits, row = reference_model(art).logits, {"quant": art.quant}
    row["quantize_s"] = round(time.time() - t0, 1)
    with torch.inference_mode():
        row["ppl"] = {k: round(perplexity(logits, w, desc=k).ppl, 4) for k, w in windows.items()}
    res = json.loads(args.json.read_text()) if args.json.is_file() else {"machine": machine(), "rows": {}}
    res["rows"][args.name] = {**row, "args": {k: v for k, v in vars(args).items() if k != "json"}}
    write_json(args.json, res, indent=1)
    print(args.name, row["ppl"], f"quantize {row['quantize_s']} s", flush=True)


if __name__ == "__main__":
    main()
