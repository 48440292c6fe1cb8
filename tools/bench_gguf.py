"""GGUF files of one model side by side, every figure measured in llama.cpp, all rows on the same windows.

    python tools/bench_gguf.py --json bench-gguf.json [--model M] [--windows N] [--rows KEY,KEY]

Rows: the model as F32 GGUF; llama.cpp's own Q4_0 / Q4_1 / Q4_K_M of that F32 file (its quantize
API, `llama_cpp.llama_model_quantize`), without and with an importance matrix (mean squared
input activation per column of every block linear, collected here with the FP model on the
calibration windows and handed to the same API); ours: RTN on the Q4_0 / Q4_1 grids (min/max,
and with searched d/m), GPTQ on Q4_1 without rotation, rotated (R1/R2 offline, no R4) GPTQ on
Q4_1 and Q4_0, and the blockwise-tuned profile on both grids where tune.py has it.
Our files get the embedding / output types of llama.cpp's own file of the same grid (read from
it), so sizes compare like for like.

Columns: perplexity (llama.cpp logits, --ctx windows of the embedded evaluation split), file size
in bytes, bits per weight (file bits / parameters), decode tokens/s (greedy, --decode new tokens
after a short prompt, --threads threads, median of --repeats, CPU idle-checked before each row),
quantize time (llama.cpp's quantize call; ours: calibration and quantization, artifact write).

With --workdir, our artifacts and their quantize times stay there and a rerun reuses them (a row
whose settings changed is made again). `--decode-only PASS1.json` measures the decode speed of the
files a finished run wrote (its workdir) again and keeps everything else from PASS1.json: calibrate
once, however busy the machine, then time every row on an idle CPU.

The default model's weights lie on a Q4_1 grid (llama.cpp's Q4_1 of it is lossless); pass
`--model DIR` with the copy of tools/offgrid_copy.py for the table that counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchutil import busy_fraction, machine, require_idle, write_json

from baseq_export import data
from baseq_export.gguf_file import read_header
from baseq_export.targets.gguf.runtime import llama_quantize
from baseq_export.perplexity import perplexity
from baseq_export.models import load_model
from baseq_export.models.base import SITE_LINEARS, IdentityHooks, forward
from baseq_export.gptq_model import quantize_model
from baseq_export.settings import QuantSettings, profile_settings
from baseq_export.artifact import load_artifact, save_artifact
from baseq_export.reference import reference_model

PROMPT = "def fibonacci(n):\n    "
GGUF_LINEAR = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
               "down": "ffn_down"}


# ---------------------------------------------------------------------------------------------
# The only calls into the GGUF writer and the llama.cpp backend (baseq_export.targets.gguf).


def gguf_write_artifact(artifact_dir: Path, out: Path, head: str, embed: str) -> Path:
    from baseq_export.targets import gguf as G

    return G.write(artifact_dir, out, force=True, head=head, embed=embed)


def gguf_write_float(model, out: Path) -> Path:
    from baseq_export.targets import gguf as G

    return G.write_model(model, out, force=True, weights="f32", head="f32")


def gguf_open(path: Path, threads: int):
    from baseq_export.targets import gguf as G

    return G.open(path, n_threads=threads)


# ---------------------------------------------------------------------------------------------
# llama.cpp's own quantizer


def importance_matrix(model, calib: torch.Tensor, chunk: int = 4) -> dict[str, np.ndarray]:
    """llama.cpp-style importance matrix of the FP model: per block linear (GGUF tensor name), the mean of the
    squared input activation per input column over every calibration token."""
    sums: dict[tuple[int, str], torch.Tensor] = {}

    class Tap(IdentityHooks):
        def act(self, layer, site, x):
            v = x.reshape(-1, x.shape[-1]).to(torch.float64).pow(2).sum(0)
            sums[(layer, site)] = sums.get((layer, site), 0) + v
            return x

    with torch.inference_mode():
        for i in range(0, calib.shape[0], chunk):
            forward(model.config, model.weights, calib[i : i + chunk], Tap())
    n = calib.numel()
    out = {}
    for (layer, site), s in sums.items():
        for lin in SITE_LINEARS[site]:
            out[f"blk.{layer}.{GGUF_LINEAR[lin]}.weight"] = (s / n).to(torch.float32).numpy()
    return out


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> type name in lower case (q4_0, q6_k, f32, ...)."""
    import gguf

    return {t.name: gguf.GGMLQuantizationType(t.qtype).name.lower() for t in read_header(path).tensors}


def head_types(path: Path) -> tuple[str, str]:
    """(head, embed) writer options that give our file the output / token_embd types of llama.cpp's file."""
    types = tensor_types(path)
    embed = types["token_embd.weight"]
    return types.get("output.weight", embed), embed


def parameters(path: Path) -> int:
    return sum(t.n_elements for t in read_header(path).tensors)


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row:
    key: str
    name: str
    kind: str  # f32 | llama | ours
    ftype: str | None = None  # llama rows; ours: the llama.cpp file whose head types to copy
    imatrix: bool = False
    settings: QuantSettings | None = None
    tune: dict = field(default_factory=dict)  # blockwise tuning: {'enabled': True, **TuneSettings fields}; empty = none


def rows() -> list[Row]:
    grid = dict(bits="w4a16", group_size=32)
    out = [Row("f32", "F32", "f32")]
    for imat in (False, True):
        for ft, label in (("q4_0", "Q4_0"), ("q4_1", "Q4_1"), ("q4_k_m", "Q4_K_M")):
            out.append(Row(f"llama-{ft}" + ("-imatrix" if imat else ""), f"llama.cpp {label}" + (" + imatrix" if imat else ""),
                           "llama", ft, imat))
    for g, label in (("q4_0", "Q4_0"), ("q4_1", "Q4_1")):
        out.append(Row(f"rtn-{g}", f"ours RTN {label} (min/max)", "ours", g,
                       settings=QuantSettings(method="rtn", weight_grid=g, **grid)))
        out.append(Row(f"rtn-{g}-search", f"ours RTN {label} (searched d" + (", m)" if g == "q4_1" else ")"), "ours", g,
                       settings=QuantSettings(method="rtn", weight_grid=g, weight_clip="mse", **grid)))
    out.append(Row("gptq-q4_1", "ours GPTQ Q4_1, no rotation", "ours", "q4_1", settings=profile_settings("gguf", method="gptq")))
    for g, label in (("q4_1", "Q4_1"), ("q4_0", "Q4_0")):
        out.append(Row(f"rot-gptq-{g}", f"ours rotated GPTQ {label}", "ours", g, settings=profile_settings("gguf", weight_grid=g)))
    for g, label in (("q4_1", "Q4_1"), ("q4_0", "Q4_0")):
        out.append(Row(f"tuned-{g}", f"ours rotated GPTQ {label} + blockwise tuning", "ours", g,
                       settings=profile_settings("gguf", weight_grid=g), tune={"enabled": True}))
    return out


def quantize_ours(model, row: Row, calib: torch.Tensor, work: Path):
    """Our artifact of a row; a tuned row keeps its finished blocks in work/<key>.partial (a rerun resumes)."""
    if row.tune:
        from baseq_export.tune import TuneSettings, tune_blocks

        tune = TuneSettings(**{k: v for k, v in row.tune.items() if k != "enabled"})
        return tune_blocks(model, row.settings, calib, tune, workdir=str(work / f"{row.key}.partial"))
    return quantize_model(model, row.settings, calib if row.settings.method.endswith("gptq") else None)


def reuse_artifact(row: Row, work: Path):
    """(artifact, quantize seconds) of a row made by an earlier run in this workdir with the same settings, else None."""
    adir, timing = work / f"{row.key}.baseq", work / f"{row.key}.quantize.json"
    if not (adir.is_dir() and timing.is_file()):
        return None
    saved = json.loads(timing.read_text())
    if saved.get("settings") != repr(row.settings) or saved.get("tune") != row.tune:
        return None
    return load_artifact(adir), saved["quantize_s"]


def decode_speed(path: Path, prompt_ids: list[int], new_tokens: int, threads: int, repeats: int) -> dict:
    """Median greedy decode tokens/s (time from the first to the last new token, so prompt processing is excluded)."""
    runs = []
    backend = gguf_open(path, threads)
    busy = busy_fraction(1.0)
    for _ in range(repeats):
        stamps = []
        for _tok in backend.greedy(prompt_ids, new_tokens):
            stamps.append(time.perf_counter())
        runs.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"decode_tok_s": round(statistics.median(runs), 2), "decode_runs": [round(r, 2) for r in runs],
            "cpu_busy_before_decode": round(busy, 3)}


def decode_again(previous: Path, out: Path, threads: int, repeats: int, new_tokens: int) -> None:
    """Every row of a finished run with its decode speed measured again (same files, same prompt): all files
    open at once and timed in interleaved rounds (row 1, row 2, ..., then again), so that drift of the machine
    hits every row alike; medians over the rounds."""
    results = json.loads(previous.read_text())
    work = Path(results["workdir"])
    tokenizer = load_model(results["model"]).tokenizer
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    rows = [e for e in results["rows"] if "file" in e]
    backends = {e["key"]: gguf_open(work / e["file"], threads) for e in rows}
    results.update(decode_remeasured_from=str(previous), decode_rounds=repeats, cpu_busy_before=round(require_idle(), 3))
    runs: dict[str, list[float]] = {e["key"]: [] for e in rows}
    for rnd in range(repeats + 1):  # round 0 warms up
        for e in rows:
            stamps = [time.perf_counter() for _tok in backends[e["key"]].greedy(prompt_ids, new_tokens)]
            if rnd:
                runs[e["key"]].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        print(f"round {rnd} done (CPU busy {busy_fraction(0.5):.0%})", flush=True)
    for e in rows:
        e.update(decode_tok_s=round(statistics.median(runs[e["key"]]), 2), decode_runs=[round(r, 2) for r in runs[e["key"]]])
        e.pop("cpu_busy_before_decode", None)
        print(f"{e['name']}: {e['decode_tok_s']:.1f} tok/s", flush=True)
    results["cpu_busy_after"] = round(require_idle(), 3)
    write_json(out, results, indent=2)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--model", default="default", help="default, a local HF checkpoint dir (e.g. the off-grid copy) or .gguf")
    ap.add_argument("--windows", type=int, default=None, help="evaluation windows (default: all of the split)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows (GPTQ, tuning, imatrix)")
    ap.add_argument("--calib-ctx", type=int, default=512)
    ap.add_argument("--imatrix-samples", type=int, default=64, help="calibration windows for the importance matrix")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=128, help="new tokens per decode run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default=None, help="comma-separated row keys to run (default: all); F32 always runs")
    ap.add_argument("--torch-reference", action="store_true", help="also evaluate our artifacts in the PyTorch reference")
    ap.add_argument("--workdir", default=None, help="keep the GGUF files and artifacts here (default: a temp dir)")
    ap.add_argument("--decode-only", type=Path, default=None, metavar="PASS1.json",
                    help="only measure the decode speed of that run's files again (see above)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.decode_only:
        decode_again(args.decode_only, Path(args.json), args.threads, args.repeats, args.decode)
        return
    selected = rows()
    if args.rows:
        keys = set(args.rows.split(",")) | {"f32"}
        unknown = keys - {r.key for r in selected}
        if unknown:
            raise SystemExit(f"unknown rows {sorted(unknown)}; rows: {', '.join(r.key for r in selected)}")
        selected = [r for r in selected if r.key in keys]
    busy0 = require_idle()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = load_model(args.model)
    load_s = time.time() - t0
    windows = data.token_windows(data.tokenize(model.tokenizer, data.embedded_text("eval")), args.ctx, args.windows)
    calib = data.calibration_windows(data.tokenize(model.tokenizer, data.embedded_text("calib")), args.nsamples,
                                     args.calib_ctx, 0)
    prompt_ids = model.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    results = {"machine": machine(), "model": args.model, "cpu_busy_before": round(busy0, 3), "ctx": args.ctx,
               "eval_windows": int(windows.shape[0]), "calib_windows": list(calib.shape), "threads": args.threads,
               "decode_new_tokens": args.decode, "repeats": args.repeats, "model_load_s": round(load_s, 1),
               "imatrix": "mean squared input activation per column of every block linear (not output.weight), "
                          f"from the FP model on the first {args.imatrix_samples} calibration windows",
               "workdir": str(work), "rows": []}

    f32 = work / "f32.gguf"
    gguf_write_float(model, f32)
    llama_files: dict[tuple[str, bool], tuple[Path, float]] = {}
    imatrix = None

    def llama_file(ftype: str, imat: bool) -> tuple[Path, float]:
        nonlocal imatrix
        if (ftype, imat) not in llama_files:
            if imat and imatrix is None:
                t = time.time()
                imatrix = importance_matrix(model, calib[: args.imatrix_samples])
                results["imatrix_s"] = round(time.time() - t, 1)
            path = work / f"llama-{ftype}{'-imatrix' if imat else ''}.gguf"
            llama_files[(ftype, imat)] = (path, llama_quantize(f32, path, ftype, args.threads, imatrix if imat else None))
        return llama_files[(ftype, imat)]

    for row in selected:
        print(f"--- {row.name}", flush=True)
        entry = {"key": row.key, "name": row.name, "kind": row.kind}
        art = None
        try:
            if row.kind == "f32":
                path, qs = f32, None
            elif row.kind == "llama":
                path, qs = llama_file(row.ftype, row.imatrix)
            else:
                head, embed = head_types(llama_file(row.ftype, False)[0])
                reused = reuse_artifact(row, work)
                if reused is None:
                    t = time.time()
                    art = quantize_ours(model, row, calib, work)
                    save_artifact(work / f"{row.key}.baseq", art, overwrite=True,
                                  write_extra=lambda d: model.tokenizer.save_pretrained(str(d)))
                    qs = time.time() - t
                    (work / f"{row.key}.quantize.json").write_text(
                        json.dumps({"settings": repr(row.settings), "tune": row.tune, "quantize_s": qs}))
                else:
                    art, qs = reused
                    entry["reused_artifact"] = True
                path = gguf_write_artifact(work / f"{row.key}.baseq", work / f"{row.key}.gguf", head, embed)
                entry.update(settings=art.quant, head=head, embed=embed)
        except NotImplementedError as e:
            print(f"    skipped: {e}", flush=True)
            entry["skipped"] = str(e)
            results["rows"].append(entry)
            continue
        backend = gguf_open(path, args.threads)
        t = time.time()
        with torch.inference_mode():
            r = perplexity(backend.logits, windows, desc=row.key[:24])
        del backend
        size = path.stat().st_size
        entry.update(file=path.name, ppl=round(r.ppl, 4), tokens=r.tokens, eval_s=round(time.time() - t, 1),
                     bytes=size, bpw=round(8 * size / parameters(path), 4), quantize_s=None if qs is None else round(qs, 1),
                     types=sorted(set(tensor_types(path).values())))
        if art is not None and args.torch_reference:
            with torch.inference_mode():
                entry["ppl_torch_reference"] = round(perplexity(reference_model(art).logits, windows).ppl, 4)
        entry.update(decode_speed(path, prompt_ids, args.decode, args.threads, args.repeats))
        print(f"    ppl {entry['ppl']:.4f}  {size / 2**20:7.1f} MiB  {entry['bpw']:.3f} bpw  "
              f"{entry['decode_tok_s']:6.1f} tok/s  quantize {entry['quantize_s']} s", flush=True)
        results["rows"].append(entry)
        write_json(Path(args.json), results, indent=2)  # partial results survive a crash
    results["cpu_busy_after"] = round(require_idle(), 3)
    results["workdir"] = str(work)
    write_json(Path(args.json), results, indent=2)
    print(f"wrote {args.json} (files in {work})")


if __name__ == "__main__":
    main()
