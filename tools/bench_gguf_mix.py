"""Our GGUF mixes against llama.cpp's own files of the same type, on text that llama.cpp tokenizes itself.

    python tools/bench_gguf_mix.py --model smollm2-offgrid --json tools/results/gguf-mix.json \
        [--mixes q4_0,q4_1,q4_k_m,iq4_xs] [--workdir DIR] [--calib-text FILE ...] [--windows N] [--main-job]

For each mix, side by side in one run:
- llama.cpp: its quantizer (llama_model_quantize) of the model's F32 GGUF to the file type of that name, with an
  importance matrix (mean squared input of every block linear) from the same calibration windows as ours;
- ours: `--profile gguf --gguf-mix MIX` (rotation R1/R2 folded, ggml picks each block's scales for the layer's
  Hessian, GPTQ the codes), output / embedding in the types of llama.cpp's file.
Columns: perplexity in llama.cpp on the embedded evaluation split and on the GPL-3 text Debian ships (never used
for calibration), each text tokenized by llama.cpp with the file's own vocabulary into windows of --ctx tokens;
file size; decode tokens/s (greedy, after a short prompt, every file timed in interleaved rounds, median of
--repeats, CPU idle-checked) and the decode ratio to llama.cpp's file of the type as the median of per-round
ratios, each pair timed back to back, in alternating order. With --main-job, the main job itself
(`baseq-export --format gguf`, run as a user runs it) is one more row, against llama.cpp's file of its type.
Pass the off-grid copy (tools/offgrid_copy.py): the default model's weights lie on
a 4-bit grid. With --workdir, files are kept and reused by a rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_gguf import head_types, importance_matrix
from benchutil import busy_fraction, machine, require_idle, write_json

from baseq_export import api, data
from baseq_export.models import load_model
from baseq_export.quant.ggml_mix import MIXES
from baseq_export.targets import gguf as G
from baseq_export.targets.gguf import pretok
from baseq_export.targets.gguf.runtime import llama_quantize

GPL3 = Path("/usr/share/common-licenses/GPL-3")
PROMPT = "The license says that"


def llama_perplexity(path: Path, text: str, ctx: int, windows: int | None, threads: int) -> dict:
    """Perplexity of a GGUF in llama.cpp on text tokenized by llama.cpp itself (no BOS), in windows of ctx
    tokens, every position after the first scored."""
    ids = torch.tensor(pretok.llama_ids(path, [text])[0])
    n = ids.numel() // ctx if windows is None else min(windows, ids.numel() // ctx)
    backend = G.open(path, n_threads=threads, n_ctx=ctx)
    nll, count = 0.0, 0
    for w in ids[: n * ctx].view(n, ctx):
        logits = backend.logits(w[None])[0].to(torch.float64)
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum"))
        count += ctx - 1
    return {"ppl": round(math.exp(nll / count), 4), "tokens": int(ids.numel()), "windows": n}


def decode_speeds(paths: dict[str, Path], threads: int, repeats: int, new_tokens: int,
                  pairs: dict[str, str]) -> dict[str, dict]:
    """Median greedy tokens/s of every file, timed in interleaved rounds (file 1, file 2, ..., then again; every
    other round in reverse order), and for each file in `pairs` (ours -> llama.cpp's) the median of its per-round
    speed ratios: a pair is timed back to back, so drifts of a shared VM's speed cancel in the ratio."""
    backends = {k: G.open(p, n_threads=threads) for k, p in paths.items()}
    prompts = {k: pretok.llama_ids(p, [PROMPT])[0] for k, p in paths.items()}
    runs: dict[str, list[float]] = {k: [] for k in paths}
    ratios: dict[str, list[float]] = {k: [] for k in pairs}
    busy = []

    def speed(key: str) -> float:
        busy.append(busy_fraction(0.3))
        stamps = [time.perf_counter() for _tok in backends[key].greedy(prompts[key], new_tokens)]
        runs[key].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        return runs[key][-1]

    for r in range(repeats):
        for key in (k for k in paths if k not in pairs and k not in pairs.values()):
            speed(key)
        for ours, theirs in pairs.items():
            if r % 2 == 0:
                b = speed(theirs)
                ratios[ours].append(speed(ours) / b)
            else:
                a = speed(ours)
                ratios[ours].append(a / speed(theirs))
    out = {k: {"decode_tok_s": round(statistics.median(v), 2), "runs": [round(x, 2) for x in v],
               "max_cpu_busy_before": round(max(busy), 3)} for k, v in runs.items()}
    for ours, v in ratios.items():
        out[ours].update(decode_ratio_paired=round(statistics.median(v), 4), decode_ratios=[round(x, 4) for x in v])
    return out


def run_main_job(model: str, out: Path, calib_text: list[str] | None) -> float:
    """The main job as a user runs it (`baseq-export --format gguf`), in its own process; returns its seconds."""
    cmd = [sys.executable, "-m", "baseq_export", "--format", "gguf", "--model", model, "--out", str(out), "--force"]
    if calib_text:
        cmd += ["--calib-text", *calib_text]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t0


def mix_of(key: str, mixes: list[str]) -> str:
    """The mix a row's key names (ours-q4_k_m-sensitivity -> q4_k_m; main-job -> the main job's mix)."""
    if key == "main-job":
        return G.MAIN_JOB_MIX
    return next(m for m in mixes if key == f"ours-{m}" or key.startswith(f"ours-{m}-"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the off-grid copy (tools/offgrid_copy.py) or another checkpoint")
    ap.add_argument("--json", required=True)
    ap.add_argument("--mixes", default="q4_0,q4_1,q4_k_m,iq4_xs")
    ap.add_argument("--workdir", default="bench-gguf-mix")
    ap.add_argument("--choices", default="llama.cpp", help="more-bits layer choices of the _m mixes to run "
                    "(llama.cpp,sensitivity: both; a sensitivity row is keyed ours-MIX-sensitivity)")
    ap.add_argument("--calib-text", nargs="*", default=None, help="calibration text files (default: the embedded split)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-ctx", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=None, help="at most this many windows per text (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", type=int, default=128, help="new tokens per decode run")
    ap.add_argument("--main-job", action="store_true", help="add the main job (`baseq-export --format gguf`) as a row")
    ap.add_argument("--decode-only", metavar="PASS1.json", default=None,
                    help="keep everything of a finished run's JSON and measure the decode speed of its files (in "
                    "--workdir) again: calibrate once, then time every file on an idle CPU")
    args = ap.parse_args()
    mixes = args.mixes.split(",")
    if args.main_job and G.MAIN_JOB_MIX not in mixes:
        mixes.append(G.MAIN_JOB_MIX)
    if args.decode_only:
        results = json.loads(Path(args.decode_only).read_text())
        files = {r["key"]: Path(args.workdir) / f"{r['key']}.gguf" for r in results["rows"]}
        results.update(cpu_busy_at_decode=require_idle(), decode_remeasured_from=args.decode_only,
                       decode_repeats=args.repeats, decode_new_tokens=args.decode)
        pairs = {k: f"llama-{mix_of(k, mixes)}" for k in files if not k.startswith(("llama-", "f32"))}
        speeds = decode_speeds(files, args.threads, args.repeats, args.decode, pairs)
        for row in results["rows"]:
            row.update(speeds[row["key"]])
        write_json(args.json, results)
        print(json.dumps({k: v["decode_tok_s"] for k, v in speeds.items()}))
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    texts = {"eval": data.embedded_text("eval"), **({"GPL-3": GPL3.read_text()} if GPL3.is_file() else {})}
    calib = api.calibration_windows(model.tokenizer, args.nsamples, args.calib_ctx, 0, args.calib_text)
    f32 = work / "f32.gguf"
    if not f32.is_file():
        G.write_model(model, f32, force=True, weights="f32", head="f32")
    imatrix = importance_matrix(model, calib)
    results: dict = {"machine": machine(), "model": args.model, "calib_text": args.calib_text or "embedded calib split",
                     "nsamples": args.nsamples, "calib_ctx": args.calib_ctx, "ctx": args.ctx, "rows": []}
    files: dict[str, Path] = {"f32": f32}
    for mix in mixes:
        theirs = work / f"llama-{mix}.gguf"
        seconds = {}
        if not theirs.is_file():
            seconds[f"llama-{mix}"] = llama_quantize(f32, theirs, mix, args.threads, imatrix)
        head, embed = head_types(theirs)
        files[f"llama-{mix}"] = theirs
        for choice in args.choices.split(",") if MIXES[mix].more_bits else ["llama.cpp"]:
            key = f"ours-{mix}" + ("" if choice == "llama.cpp" else f"-{choice}")
            ours = work / f"{key}.gguf"
            if not ours.is_file():
                t0 = time.time()
                art = api.quantize(model, work / f"{key}.baseq", profile="gguf", ggml_mix=mix, ggml_choice=choice,
                                   calib=calib, force=True)
                G.write(art, ours, force=True, head=head, embed=embed)
                seconds[key] = time.time() - t0
            files[key] = ours
        results.setdefault("quantize_s", {}).update({k: round(v, 1) for k, v in seconds.items()})
    if args.main_job:
        results["main_job_mix"] = G.MAIN_JOB_MIX
        files["main-job"] = work / "main-job.gguf"
        if not files["main-job"].is_file():
            results["main_job_s"] = round(run_main_job(args.model, files["main-job"], args.calib_text), 1)
    for key, path in files.items():
        row = {"key": key, "bytes": path.stat().st_size, "pre": pretok.name_of(path)}
        for name, text in texts.items():
            row[name] = llama_perplexity(path, text, args.ctx, args.windows, args.threads)
        results["rows"].append(row)
        print(key, json.dumps(row), flush=True)
        write_json(args.json, results)
    results.update(cpu_busy_at_decode=require_idle(), decode_repeats=args.repeats, decode_new_tokens=args.decode)
    pairs = {k: f"llama-{mix_of(k, mixes)}" for k in files if not k.startswith(("llama-", "f32"))}
    speeds = decode_speeds(files, args.threads, args.repeats, args.decode, pairs)
    for row in results["rows"]:
        row.update(speeds[row["key"]])
    write_json(args.json, results)
    by = {r["key"]: r for r in results["rows"]}
    print(f"\n{'file':24} {'text':6} {'llama.cpp ppl':>13} {'ours ppl':>9} {'ppl ratio':>9} {'bytes - theirs':>14} "
          f"{'decode ratio':>12}")
    for key, theirs in pairs.items():
        a, b = by[theirs], by[key]
        for name in texts:
            print(f"{key:24} {name:6} {a[name]['ppl']:13.3f} {b[name]['ppl']:9.3f} {b[name]['ppl'] / a[name]['ppl']:9.4f} "
                  f"{b['bytes'] - a['bytes']:14d} {b['decode_ratio_paired']:12.4f}")


if __name__ == "__main__":
    main()
