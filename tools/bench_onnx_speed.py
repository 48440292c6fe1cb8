"""Speed of ONNX exports in onnxruntime, side by side in one run: prefill and decode.

For each export: the time to run a prompt of --prompt tokens on an empty cache (prefill) and the
time per generated token over --decode greedy steps with the KV cache (decode). Every repeat runs
all exports in turn, so drift in the machine hits them alike; figures are medians over repeats,
with ratios to the first export.

    python tools/bench_onnx_speed.py EXPORT [EXPORT ...] [--prompt 128] [--decode 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


from benchutil import machine, require_idle, write_json


def run_once(model, prompt: np.ndarray, decode: int) -> tuple[float, float]:
    """(prefill seconds, median decode seconds per token) of one generation."""
    t0 = time.perf_counter()
    logits, past = model.step(prompt, model.empty_cache(1))
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(decode):
        token = np.array([[int(logits[0, -1].argmax())]])
        t0 = time.perf_counter()
        logits, past = model.step(token, past)
        steps.append(time.perf_counter() - t0)
    return prefill, statistics.median(steps)


def main() -> None:
    from baseq_export.targets.onnx import OnnxModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exports", nargs="+", type=Path)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens for the prefill (default 128)")
    ap.add_argument("--decode", type=int, default=64, help="greedy decode steps (default 64)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    busy = require_idle()
    models = {str(p): OnnxModel(p, threads=args.threads) for p in args.exports}
    vocab = next(iter(models.values())).config.vocab_size
    prompt = np.random.default_rng(0).integers(0, vocab, (1, args.prompt))
    for m in models.values():  # warm-up: first runs allocate and plan
        run_once(m, prompt, 4)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    for _ in range(args.repeats):
        for name, m in models.items():
            times[name].append(run_once(m, prompt, args.decode))
    rows = []
    first = None
    for name, runs in times.items():
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        first = first or (prefill, decode)
        rows.append({"export": name, "prefill_s": prefill, "prefill_tok_s": args.prompt / prefill,
                     "decode_ms": decode * 1e3, "decode_tok_s": 1.0 / decode,
                     "prefill_ratio": prefill / first[0], "decode_ratio": decode / first[1]})
        print(f"{name}: prefill {args.prompt} tokens {prefill * 1e3:.1f} ms ({args.prompt / prefill:.0f} tok/s, "
              f"x{prefill / first[0]:.2f}); decode {decode * 1e3:.2f} ms/token ({1 / decode:.1f} tok/s, x{decode / first[1]:.2f})")
    busy_after = require_idle()
    if args.json:
        write_json(args.json, {"machine": machine(), "busy_before": busy, "busy_after": busy_after,
                               "prompt": args.prompt, "decode": args.decode, "repeats": args.repeats,
                               "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
