"""Quality against the FP model, side by side in one run: per-token KL divergence and top-1 agreement (as
llama.cpp's `llama-perplexity --kl-divergence` reports them) of our exports and the runtimes' own 4-bit files.

    python tools/bench_kld.py --model smollm2-offgrid --workdir bench-kld --json tools/results/bench-kld.json \
        [--gguf-dir bench-mix] [--max-windows N] [--targets onnx,gguf]

Rows (every file made once in --workdir and reused by a rerun):
- our main job's ONNX export (`baseq-export --format onnx`, run as a user runs it), scored in onnxruntime and in
  onnxruntime-genai (the same export: the two figures must agree);
- our `--profile onnx-w4a16` export (onnxruntime);
- onnxruntime-genai's builder int4 export (`python -m onnxruntime_genai.models.builder -p int4`, genai);
- our main job's GGUF (`baseq-export --format gguf`) and llama.cpp's own Q4_0 and Q4_K_M with an importance matrix
  (from --gguf-dir, the work folder of tools/bench_gguf_mix.py, when it holds them), in llama.cpp.
Every row is scored on the same windows of the embedded evaluation split (each runtime's tokenizer gives the same
ids here: the GGUF files' pre-tokenizer is checked to reproduce them) against one FP reference (api.fp_reference).
Pass the off-grid copy (tools/offgrid_copy.py): the default model's weights lie on a 4-bit grid.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench_onnx import genai_build
from benchutil import machine, write_json

from baseq_export import api, data
from baseq_export.compare import compare
from baseq_export.models import load_model
from baseq_export.targets.onnx.genai import genai_logits


def main_job(fmt: str, model: str, out: Path) -> Path:
    """The main job's export for a format, as a user runs it (made once)."""
    if not out.exists():
        subprocess.run([sys.executable, "-m", "baseq_export", "--format", fmt, "--model", model, "--out", str(out)],
                       check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the off-grid copy (tools/offgrid_copy.py): a checkpoint directory")
    ap.add_argument("--workdir", default="bench-kld")
    ap.add_argument("--json", required=True)
    ap.add_argument("--gguf-dir", default=None, help="tools/bench_gguf_mix.py's --workdir (llama-q4_0.gguf, "
                    "llama-q4_k_m.gguf, main-job.gguf); files it lacks are left out")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--targets", default="onnx,gguf", help="which rows to make and score: onnx, gguf or both")
    args = ap.parse_args()
    targets = set(args.targets.split(","))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    windows = data.token_windows(data.tokenize(model.tokenizer, data.embedded_text("eval")), args.ctx, args.max_windows)
    t0 = time.time()
    fp = api.fp_reference(model, windows)
    results = {"machine": machine(), "model": args.model, "ctx": args.ctx, "windows": len(windows),
               "fp_ppl": round(fp.ppl, 4), "fp_s": round(time.time() - t0, 1), "rows": []}

    rows = []
    if "onnx" in targets:
        onnx_main = main_job("onnx", args.model, work / "main-job-onnx")
        w4a16 = work / "w4a16-onnx"
        if not w4a16.exists():
            art = api.quantize(model, work / "w4a16.baseq", profile="onnx-w4a16", force=True)
            api.export(art, "onnx", w4a16)
        genai_int4 = genai_build(Path(args.model), work / "genai-int4", "int4")
        rows += [("ours, main job (W4A4KV4), onnxruntime", onnx_main, None),
                 ("ours, main job (W4A4KV4), onnxruntime-genai", onnx_main, "onnxruntime-genai"),
                 ("ours, onnx-w4a16 profile, onnxruntime", w4a16, None),
                 ("onnxruntime-genai builder int4, genai", genai_int4, "builder")]
    gguf_dir = Path(args.gguf_dir) if args.gguf_dir and "gguf" in targets else None
    for name, label in (("main-job.gguf", "ours, main job GGUF (Q4_K_M), llama.cpp"),
                        ("llama-q4_0.gguf", "llama.cpp Q4_0 + imatrix, llama.cpp"),
                        ("llama-q4_k_m.gguf", "llama.cpp Q4_K_M + imatrix, llama.cpp")):
        if gguf_dir is not None and (gguf_dir / name).is_file():
            rows.append((label, gguf_dir / name, None))
    for label, path, backend in rows:
        t0 = time.time()
        if backend == "builder":  # not an export of ours: genai scores it directly, on the same windows
            r = compare(lambda ids, p=path: genai_logits(p, ids), fp, desc=label)
        else:
            r = api.compare(path, fp, backend=backend)
        size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir())
                   if f.is_file() and f.suffix in (".onnx", ".data", ".so", ".gguf"))
        row = {"label": label, "path": str(path), "bytes": size, "ppl": round(r.ppl, 4),
               "kld_mean": round(r.kld_mean, 5), "kld_median": round(r.kld_median, 5), "kld_p99": round(r.kld_p99, 5),
               "kld_max": round(r.kld_max, 4), "top1": round(r.top1, 4), "seconds": round(time.time() - t0, 1)}
        results["rows"].append(row)
        write_json(args.json, results)
        print(f"{label:48} ppl {r.ppl:8.4f}  KLD mean {r.kld_mean:.5f} median {r.kld_median:.5f} p99 {r.kld_p99:.4f} "
              f"max {r.kld_max:.3f}  top-1 {100 * r.top1:.2f}%  {size / 1e6:.1f} MB", flush=True)


if __name__ == "__main__":
    main()
