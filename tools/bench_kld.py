"""Quality against the FP model, side by side in one run: per-token KL divergence and top-1 agreement (as
llama.cpp's `llama-perplexity --kl-divergence` reports them) of our exports and the runtimes' own 4-bit files.

    python tools/bench_kld.py --model smollm2-offgrid --workdir bench-kld --json tools/results/bench-kld.json \
        [--max-windows N] [--targets onnx,gguf]

Rows (every file made once in --workdir and reused by a rerun):
- our main job's ONNX export (`baseq-export --format onnx`, run as a user runs it), scored in onnxruntime and in
  onnxruntime-genai (the same export: the two figures must agree);
- our `--profile onnx-w4a16` export (onnxruntime);
- onnxruntime-genai's builder int4 export (`python -m onnxruntime_genai.models.builder -p int4`, genai);
- our main job's GGUF (`baseq-export --format gguf`) and llama.cpp's own Q4_0 and Q4_K_M with an importance matrix
  from the calibration windows (its quantizer on the F32 GGUF, as tools/bench_gguf_mix.py makes them), in llama.cpp.
A rerun with the same --json keeps the rows scored before (so --targets onnx and --targets gguf can run apart).
Every row is scored on the same windows of two texts, each against one FP reference (api.fp_reference): the
embedded evaluation split and the GPL-3 text Debian ships (calibration never sees either). Each runtime's
tokenizer gives the same ids here (the GGUF files' pre-tokenizer is checked to reproduce them on both texts).
Pass the off-grid copy (tools/offgrid_copy.py): the default model's weights lie on a 4-bit grid.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_gguf import importance_matrix
from bench_onnx import genai_build
from benchutil import machine, write_json

from baseq_export import api, data
from baseq_export.compare import compare
from baseq_export.models import load_model
from baseq_export.targets import gguf as G
from baseq_export.targets.gguf.runtime import llama_quantize
from baseq_export.targets.onnx.genai import genai_logits

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def main_job(fmt: str, model: str, out: Path) -> Path:
    """The main job's export for a format, as a user runs it (made once)."""
    if not out.exists():
        subprocess.run([sys.executable, "-m", "baseq_export", "--format", fmt, "--model", model, "--out", str(out)],
                       check=True)
    return out


def llama_files(model, work: Path, threads: int) -> dict[str, Path]:
    """llama.cpp's own Q4_0 and Q4_K_M of the model (its quantizer on the F32 GGUF, with an importance matrix from
    the calibration windows bench_gguf_mix.py uses), made once in work."""
    wanted = {mix: work / f"llama-{mix}.gguf" for mix in ("q4_0", "q4_k_m")}
    missing = [m for m, p in wanted.items() if not p.is_file()]
    if missing:
        f32 = work / "f32.gguf"
        if not f32.is_file():
            G.write_model(model, f32, force=True, weights="f32", head="f32")
        imatrix = importance_matrix(model, api.calibration_windows(model.tokenizer, 128, 512, 0, None))
        for mix in missing:
            llama_quantize(f32, wanted[mix], mix, threads, imatrix)
    return wanted


def files_bytes(path: Path) -> int:
    """Bytes a runtime loads: the GGUF, or an export folder's graphs, weights and custom-op library."""
    return sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir())
               if f.is_file() and f.suffix in (".onnx", ".data", ".so", ".gguf"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the off-grid copy (tools/offgrid_copy.py): a checkpoint directory")
    ap.add_argument("--workdir", default="bench-kld")
    ap.add_argument("--json", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None, help="at most this many windows per text")
    ap.add_argument("--targets", default="onnx,gguf", help="which rows to make and score: onnx, gguf or both")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    targets = set(args.targets.split(","))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    texts = {"eval": data.embedded_text("eval"), **({"GPL-3": GPL3.read_text()} if GPL3.is_file() else {})}
    results = {"machine": machine(), "model": args.model, "ctx": args.ctx, "texts": {}, "rows": []}
    before = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
    if (before.get("model"), before.get("ctx")) == (args.model, args.ctx):  # a rerun keeps the rows scored before
        results["rows"] = before["rows"]
    done = {r["label"] for r in results["rows"]}
    refs = {}
    for name, text in texts.items():
        t0 = time.time()
        windows = data.token_windows(data.tokenize(model.tokenizer, text), args.ctx, args.max_windows)
        refs[name] = api.fp_reference(model, windows)
        results["texts"][name] = {"windows": len(windows), "fp_ppl": round(refs[name].ppl, 4),
                                  "fp_s": round(time.time() - t0, 1)}

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
    if "gguf" in targets:
        theirs = llama_files(model, work, args.threads)
        rows += [("ours, main job GGUF (Q4_K_M), llama.cpp", main_job("gguf", args.model, work / "main-job.gguf"), None),
                 ("llama.cpp Q4_0 + imatrix, llama.cpp", theirs["q4_0"], None),
                 ("llama.cpp Q4_K_M + imatrix, llama.cpp", theirs["q4_k_m"], None)]
    for label, path, backend in rows:
        if label in done:
            continue
        row = {"label": label, "path": str(path), "bytes": files_bytes(path)}
        for name, fp in refs.items():
            t0 = time.time()
            if backend == "builder":  # not an export of ours: genai scores it directly, on the same windows
                r = compare(lambda ids, p=path: genai_logits(p, ids), fp, desc=label)
            else:
                r = api.compare(path, fp, backend=backend)
            row[name] = {"ppl": round(r.ppl, 4), "kld_mean": round(r.kld_mean, 5), "kld_median": round(r.kld_median, 5),
                         "kld_p99": round(r.kld_p99, 5), "kld_max": round(r.kld_max, 4), "top1": round(r.top1, 4),
                         "seconds": round(time.time() - t0, 1)}
            print(f"{label:46} {name:6} ppl {r.ppl:8.4f}  KLD mean {r.kld_mean:.5f} median {r.kld_median:.5f} "
                  f"p99 {r.kld_p99:.4f} max {r.kld_max:.3f}  top-1 {100 * r.top1:.2f}%  {row['bytes'] / 1e6:.1f} MB",
                  flush=True)
        results["rows"].append(row)
        write_json(args.json, results)


if __name__ == "__main__":
    main()
