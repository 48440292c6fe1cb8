"""ONNX exports side by side in one run: onnxruntime-genai's own builder exports and ours.

    pip install -e ".[bench]"
    python tools/bench_onnx.py --json OUT [--model default|DIR] [--artifact LABEL=X.baseq ...] [--repeats 5]

Makes a local Hugging Face checkpoint of --model (the default model's GGUF saved as safetensors,
embeddings still tied), builds onnxruntime-genai's fp32 and int4 exports of it with
`python -m onnxruntime_genai.models.builder -i DIR -o OUT -p fp32|int4 -e cpu` (offline), exports each
--artifact with our custom ops (and the W4A4KV4 one with standard ops too), then measures every
export with 2 threads, CPU idle-checked, medians of --repeats rounds (each on fresh sessions):
  decode tokens/s after a short prompt and after 1024 tokens of context (128 new tokens, greedy;
  in onnxruntime-genai, and for ours also in plain onnxruntime through our runner, OnnxModel, as
  `baseq-export run` decodes: the C++ loop on the export's last-position graph with the KV buffer bound
  in place), prefill tokens/s of a
  512-token prompt, file size, KV-cache bytes per token, perplexity on the evaluation split (plain
  onnxruntime, full windows), and for ours the share of a decode step spent in our baseq ops
  (onnxruntime's profiler) and the graph's node count. Our exports run the graph their manifest names
  (model.kv4.onnx, the packed KV cache, where the export has it), in our runner and in genai alike.
--accuracy-only skips the timing (the off-grid copy's accuracy table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


from benchutil import machine, require_idle, write_json

SHORT_PROMPT = "def fibonacci(n):\n    "
NEW_TOKENS = 128
LONG_CONTEXT = 1024
PREFILL = 512


# ------------------------------------------------------------------ the exports


def save_checkpoint(spec: str, out: Path) -> Path:
    """--model as a local transformers checkpoint (what genai's builder reads); tied embeddings stay tied."""
    if (out / "config.json").is_file():
        return out
    if Path(spec).is_dir():
        return Path(spec)
    from offgrid_copy import load_hf
    from transformers import AutoModelForCausalLM

    model, tokenizer, _ = load_hf(spec)
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    fresh.load_state_dict(model.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
    return out


def genai_build(checkpoint: Path, out: Path, precision: str) -> Path:
    """onnxruntime-genai's builder export of the checkpoint (made once, reused)."""
    if (out / "genai_config.json").is_file():
        return out
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache")]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)
    return out


def our_export(artifact: Path, out: Path, ops: str) -> Path:
    from baseq_export.targets.onnx import is_export, write

    if is_export(out):
        return out
    return write(artifact, out, ops=ops)


def model_bytes(path: Path) -> int:
    """Bytes of the model files an app ships: the graph, its weights and our op library (no tokenizer)."""
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".onnx", ".data", ".so"))


# ------------------------------------------------------------------ onnxruntime sessions


def graph_file(path: Path) -> str:
    """The graph our runner (and genai) runs in an export of ours: the manifest's (model.kv4.onnx when the export
    has the packed KV cache), else model.onnx."""
    manifest = path / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("onnxruntime", {}).get("model", "model.onnx")
    return "model.onnx"


def ort_session(path: Path, threads: int, profile: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    lib = next(iter(path.glob("*.so")), None)
    if lib is not None:
        opts.register_custom_ops_library(str(lib.resolve()))
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(str(path / graph_file(path)), opts, providers=["CPUExecutionProvider"])


class GraphRunner:
    """Any decoder ONNX graph with input_ids / attention_mask [/ position_ids] / past_key_values.* inputs
    (ours and genai's builder's): prompt and decode steps in plain onnxruntime."""

    def __init__(self, session, head_dim: int):
        self.s, self.head_dim = session, head_dim
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.outputs = [o.name for o in session.get_outputs()]

    def empty(self) -> dict:
        """A cache of length 0: batch 1, past 0; a symbolic row width (genai's 'kv_cache_dim') is the head size."""
        cache = {}
        for name in self.past:
            i = self.inputs[name]
            shape = [d if isinstance(d, int) else {0: 1, 2: 0}.get(n, self.head_dim) for n, d in enumerate(i.shape)]
            cache[name] = np.zeros(shape, np.uint8 if "uint8" in i.type else np.float32)
        return cache

    def kv_bytes_per_token(self) -> int:
        total = 0
        for name in self.past:
            i = self.inputs[name]
            item = 1 if "uint8" in i.type else (2 if "float16" in i.type else 4)
            row = i.shape[3] if isinstance(i.shape[3], int) else self.head_dim
            total += item * i.shape[1] * row
        return total

    def step(self, ids: np.ndarray, past: dict) -> tuple[np.ndarray, dict]:
        past_len = next(iter(past.values())).shape[2]
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, past_len + ids.shape[1]), np.int64), **past}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(past_len, past_len + ids.shape[1], dtype=np.int64)[None]
        out = dict(zip(self.outputs, self.s.run(None, feed)))
        present = {n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")}
        return out["logits"], present


def our_runner_generation(model, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, median seconds per decoded token) in our runner (baseq_export's OnnxModel) as
    `baseq-export run` decodes (OnnxModel.greedy's choice of path): the C++ decoder (targets/onnx/native.py)
    where the export's attention ops write the KV buffer in place, Python steps on that buffer where the
    decoder cannot load, else Python steps on the growing cache. A decode step is timed with its greedy
    choice, as genai's generate_next_token is."""
    from baseq_export.targets.onnx.runtime import buffer_stepper
    from baseq_export.generate import argmax_token, onnx_stepper

    # one C++ session per model for every generation (as genai's one model), its buffer for the longest
    capacity = LONG_CONTEXT + NEW_TOKENS
    decoder = model.native_decoder(capacity) if model.shares_buffer else None
    if decoder is not None:
        step = decoder.step
    else:
        python_step = buffer_stepper(model, capacity) if model.shares_buffer else onnx_stepper(model)

        def step(ids):
            return argmax_token(python_step(ids))
    t0 = time.perf_counter()
    token = step(prompt[0].tolist())
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        token = step([token])
        steps.append(time.perf_counter() - t0)
    return prefill, statistics.median(steps) if steps else float("nan")


def genai_model(path: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(path))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                          "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def genai_generation(model, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, median seconds per decoded token) in onnxruntime-genai; eos is held off (min_length)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = prompt.shape[1] + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt.astype(np.int32))
    prefill = time.perf_counter() - t0
    steps = []
    while not gen.is_done():
        t0 = time.perf_counter()
        gen.generate_next_token()
        steps.append(time.perf_counter() - t0)
    return prefill, statistics.median(steps)


def perplexity_of(runner: GraphRunner, windows) -> float:
    import torch

    from baseq_export.perplexity import perplexity

    def logits(ids):
        return torch.from_numpy(runner.step(ids.numpy(), runner.empty())[0])

    return perplexity(logits, windows, desc="perplexity").ppl


def op_share(path: Path, threads: int, head_dim: int, prompt: np.ndarray, steps: int = 16, warmup: int = 4) -> dict:
    """Share of decode-step kernel time per op type (onnxruntime's profiler) and the part in our baseq ops.
    The prompt runs in an unprofiled session; its cache feeds the profiled decode steps, of which the first
    `warmup` are not counted (a session's first runs pack weights and grow its buffers)."""
    import onnx

    graph = onnx.load(str(path / graph_file(path)), load_external_data=False).graph
    ours = {n.op_type for n in graph.node if n.domain == "baseq"}
    plain = GraphRunner(ort_session(path, threads), head_dim)
    logits, past = plain.step(prompt, plain.empty())
    with tempfile.TemporaryDirectory() as tmp:
        s = ort_session(path, threads, profile=str(Path(tmp) / "prof"))
        runner = GraphRunner(s, head_dim)
        for _ in range(warmup + steps):
            logits, past = runner.step(np.array([[int(logits[0, -1].argmax())]]), past)
        events = json.loads(Path(s.end_profiling()).read_text())
    runs = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    counted_from = runs[warmup - 1] if warmup and len(runs) >= warmup else 0
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= counted_from:
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
    total = sum(by_op.values()) or 1.0
    share = {op: round(d / total, 4) for op, d in sorted(by_op.items(), key=lambda kv: -kv[1])}
    return {"graph_nodes": len(graph.node), "baseq_ops_share": round(sum(d for op, d in by_op.items() if op in ours) / total, 4),
            "decode_kernel_ms": round(total / steps / 1e3, 3), "by_op": share}


# ------------------------------------------------------------------ the run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--artifact", action="append", default=[], metavar="LABEL=PATH",
                    help="one of our artifacts to export and measure (repeatable); a label containing 'w4a4' also "
                    "gets a standard-ops export")
    ap.add_argument("--work", type=Path, default=Path("bench-onnx-work"), help="where exports are made and kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="rounds, each on fresh sessions")
    ap.add_argument("--windows", type=int, default=None, help="evaluation windows (default: the whole split)")
    ap.add_argument("--accuracy-only", action="store_true", help="sizes, KV bytes and perplexity only (no timing)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from baseq_export import data

    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = save_checkpoint(args.model, args.work / "checkpoint")
    rows = [{"label": "genai builder fp32", "path": genai_build(checkpoint, args.work / "genai-fp32", "fp32"), "ours": False},
            {"label": "genai builder int4", "path": genai_build(checkpoint, args.work / "genai-int4", "int4"), "ours": False}]
    for spec in args.artifact:
        label, _, path = spec.partition("=")
        rows.append({"label": f"ours {label}", "path": our_export(Path(path), args.work / f"ours-{label}", "custom"), "ours": True})
        if "w4a4" in label.lower():
            rows.append({"label": f"ours {label}, standard ops",
                         "path": our_export(Path(path), args.work / f"ours-{label}-standard", "standard"), "ours": True})

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    hf = json.loads((checkpoint / "config.json").read_text())
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    eval_tokens = data.tokenize(tokenizer, data.embedded_text("eval"))
    windows = data.token_windows(eval_tokens, 512, args.windows)
    short = np.array([tokenizer(SHORT_PROMPT, add_special_tokens=False)["input_ids"]])
    long = eval_tokens[:LONG_CONTEXT].numpy()[None]
    prefill = eval_tokens[LONG_CONTEXT:LONG_CONTEXT + PREFILL].numpy()[None]

    for r in rows:  # sizes, accuracy: no timing
        runner = GraphRunner(ort_session(r["path"], args.threads), head_dim)
        r["bytes"] = model_bytes(r["path"])
        r["kv_bytes_per_token"] = runner.kv_bytes_per_token()
        r["ppl"] = perplexity_of(runner, windows)
        print(f"{r['label']}: {r['bytes'] / 1e6:.1f} MB, KV {r['kv_bytes_per_token']} B/token, perplexity {r['ppl']:.4f}", flush=True)

    if args.accuracy_only:
        for r in rows:
            r["path"] = str(r["path"])
        write_json(args.json, {"machine": machine(), "model": args.model, "windows": int(windows.shape[0]),
                               "rows": rows}, indent=1)
        return
    busy_before = require_idle()
    from baseq_export.targets.onnx.runtime import OnnxModel

    def fresh_runners(r):
        """New sessions for a round, warmed up by a few tokens (first-run weight packing). A session's speed
        depends a few percent on where its weights land in memory, so each round opens its own and the medians
        run over placements, not over one lucky or unlucky one."""
        genai = genai_model(r["path"], args.threads) if (r["path"] / "genai_config.json").is_file() else None
        runner = OnnxModel(r["path"], threads=args.threads) if r["ours"] else None
        if genai is not None:
            genai_generation(genai, short, 8)
        if runner is not None:
            our_runner_generation(runner, short, 8)
        return genai, runner

    timings: dict[str, dict[str, list[float]]] = {r["label"]: {} for r in rows}
    for rep in range(args.repeats):
        for r in rows:
            genai, runner = fresh_runners(r)
            runs = {}
            if genai is not None:
                runs["genai_decode_short"] = genai_generation(genai, short, NEW_TOKENS)[1]
                runs["genai_decode_1024"] = genai_generation(genai, long, NEW_TOKENS)[1]
                runs["genai_prefill_512"] = genai_generation(genai, prefill, 1)[0]
            if r["ours"]:
                runs["ort_decode_short"] = our_runner_generation(runner, short, NEW_TOKENS)[1]
                runs["ort_decode_1024"] = our_runner_generation(runner, long, NEW_TOKENS)[1]
                runs["ort_prefill_512"] = our_runner_generation(runner, prefill, 0)[0]
            for k, v in runs.items():
                timings[r["label"]].setdefault(k, []).append(v)
            del genai, runner
        print(f"round {rep} done (CPU busy {require_idle(seconds=0.5):.0%})", flush=True)
    busy_after = require_idle()

    base = None
    for r in rows:
        t = {k: statistics.median(v) for k, v in timings[r["label"]].items()}
        for k, v in t.items():
            r[k.replace("decode", "decode_tok_s").replace("prefill", "prefill_tok_s")] = (PREFILL if "prefill" in k else 1) / v
        if r["label"] == "genai builder int4":
            base = r
        if r["ours"]:
            r.update(op_share(r["path"], args.threads, head_dim, short))
    for r in rows:
        for k in [k for k in r if k.endswith(("_short", "_1024", "_512")) and "tok_s" in k and base and k in base]:
            r[k + "_vs_genai_int4"] = round(r[k] / base[k], 3)
        r["path"] = str(r["path"])
        cols = ", ".join(f"{k} {r[k]:.1f}" for k in r if "tok_s" in k and not k.endswith("int4"))
        print(f"{r['label']}: {r['bytes'] / 1e6:.1f} MB, ppl {r['ppl']:.4f}, {cols}")
    write_json(args.json, {"machine": machine(), "model": args.model, "threads": args.threads, "repeats": args.repeats,
                           "busy_before": busy_before, "busy_after": busy_after, "windows": int(windows.shape[0]),
                           "new_tokens": NEW_TOKENS, "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
