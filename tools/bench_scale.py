"""Memory and time of quantizing and exporting models too big to hold: Llama-2-7B-shaped checkpoints of 2, 4 and
8 layers (synthetic, seeded), each stage run as its own `baseq-export` process, its peak RSS read from the
kernel's accounting of that child (ru_maxrss).

    python tools/bench_scale.py --json tools/results/bench-scale.json [--layers 2,4,8] [--dir /work/bench/scale]

The checkpoints are sharded float16 safetensors (one shard per layer) with random weights, a few large-magnitude
channels in the embedding and the norm gains (the outliers that make rotation matter), and a byte-level
BPE tokenizer trained on the embedded texts. A checkpoint of n layers holds the first n layers of the bigger ones (same seeds).
Targets (issue 20): the peak RSS of each stage grows by less than 10% from 2 to 8 layers and stays below the
8-layer checkpoint's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchutil import machine, require_idle, write_json

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)
LLAMA3_8B = dict(LLAMA_7B, intermediate_size=14336, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0)
SHAPES = {"llama2-7b": LLAMA_7B, "llama3-8b": LLAMA3_8B}
TARGETS = {  # models the measured per-block figures are extrapolated to: dims and depth
    "Llama-3-8B": dict(LLAMA3_8B, layers=32),
    "Llama-3-70B": dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_attention_heads=64, layers=80),
}
OUTLIER_CHANNELS = 8  # residual channels with large embedding values and norm gains
OUTLIER_GAIN = 20.0


def tensor_seed(name: str) -> int:
    """A seed per tensor name, so a checkpoint of n layers holds the first n layers of a bigger one."""
    import zlib

    return zlib.crc32(name.encode())


def block_shapes(dims: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of one Llama block's seven linears, by HF name within the layer."""
    d, f = dims["hidden_size"], dims["intermediate_size"]
    kv = d // dims["num_attention_heads"] * dims["num_key_value_heads"]
    return {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, d), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}


def layer_tensors(i: int, dims: dict, outliers) -> dict:
    """The float16 tensors of one Llama block (HF names), random normal at a 1/sqrt(fan-in) scale."""
    import torch

    d = dims["hidden_size"]
    out = {}
    for name, shape in block_shapes(dims).items():
        key = f"model.layers.{i}.{name}.weight"
        gen = torch.Generator().manual_seed(tensor_seed(key))
        out[key] = (torch.randn(shape, generator=gen) / shape[1] ** 0.5).half()
    for norm in ("input_layernorm", "post_attention_layernorm"):
        gain = torch.ones(d)
        gain[outliers] = OUTLIER_GAIN
        out[f"model.layers.{i}.{norm}.weight"] = gain.half()
    return out


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A GPT-2-style byte-level BPE trained on the embedded texts (what the GGUF export can carry), with at most
    vocab_size entries; the model's ids beyond it are never produced (the GGUF export pads them as unused)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from baseq_export.data import embedded_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([embedded_text("calib"), embedded_text("eval")], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(path))


def write_checkpoint(path: Path, layers: int, dims: dict = LLAMA_7B) -> int:
    """A sharded float16 Llama checkpoint (one shard per layer, one for the embedding, norm and head), written a
    shard at a time; returns its size on disk in bytes. Kept when already complete."""
    import torch
    from safetensors.torch import save_file

    done = path / "model.safetensors.index.json"
    if done.is_file():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    d, v = dims["hidden_size"], dims["vocab_size"]
    outliers = torch.randperm(d, generator=torch.Generator().manual_seed(7))[:OUTLIER_CHANNELS]
    shards = {f"model-layer-{i:05d}.safetensors": (lambda i=i: layer_tensors(i, dims, outliers)) for i in range(layers)}

    def outside() -> dict:
        gen = torch.Generator().manual_seed(tensor_seed("embed"))
        embed = torch.randn(v, d, generator=gen) * 0.02
        embed[:, outliers] *= OUTLIER_GAIN
        head = torch.randn(v, d, generator=torch.Generator().manual_seed(tensor_seed("head"))) / d ** 0.5
        return {"model.embed_tokens.weight": embed.half(), "model.norm.weight": torch.ones(d).half(), "lm_head.weight": head.half()}

    shards["model-outside.safetensors"] = outside
    weight_map, total = {}, 0
    for file, make in shards.items():
        tensors = make()
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: file for k in tensors})
        del tensors
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
              "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 1,
              "eos_token_id": 2, "attention_bias": False, "mlp_bias": False, "head_dim": d // dims["num_attention_heads"],
              **dims}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(tmp, v)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def write_checkpoint_in_child(path: Path, layers: int, shape: str) -> int:
    """write_checkpoint in a child process. A child's ru_maxrss counts the memory of the process it was started
    from (Linux records the old address space's high-water mark at exec, and Python starts children by vfork), so
    this process never makes big tensors itself: otherwise every stage after writing a checkpoint would read at
    least this process's peak (an earlier version of this bench reported 1728 MiB for exports that peak at 753)."""
    code = ("import sys; from pathlib import Path; import bench_scale as b; "  # `python -c` imports from its cwd
            "print(b.write_checkpoint(Path(sys.argv[1]), int(sys.argv[2]), b.SHAPES[sys.argv[3]]))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(path).resolve()), str(layers), shape],
                         cwd=Path(__file__).resolve().parent, check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def run_stage(cmd: list[str], log: Path) -> dict:
    """Run one baseq-export command as a child process; its wall time and peak RSS (ru_maxrss of that child)."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit status {code}; see {log}")
    return {"seconds": round(time.time() - t0, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def block_work(dims: dict, kind: str) -> float:
    """A block's work in the model that scales its time: GPTQ's column updates and Hessian factorisations
    (sum of N K^2 + K^3) for GPTQ-based stages, the weights' size (sum of N K) for RTN and exports."""
    if kind == "gptq":
        return float(sum(n * k * k + k**3 for n, k in block_shapes(dims).values()))
    return float(sum(n * k for n, k in block_shapes(dims).values()))


def extrapolate(results: dict) -> dict:
    """Per stage: the measured time per block (slope from the smallest to the largest depth) and the rest, scaled
    to TARGETS by block_work (per block) and vocab x hidden (the rest: embedding and head). Wall-time estimates at
    the bench's calibration size on this machine, not measurements."""
    dims, out = results["dims"], {}
    for stage, by_n in results["stages"].items():
        seconds = {int(n): r["seconds"] for n, r in by_n.items()}  # (JSON keys are strings)
        if len(seconds) < 2:
            continue
        lo, hi = min(seconds), max(seconds)
        t_lo, per_block = seconds[lo], (seconds[hi] - seconds[lo]) / (hi - lo)
        rest = max(0.0, t_lo - lo * per_block)
        kind = "gptq" if stage.startswith("quantize") and ("gptq" in stage or "baseq" in stage) else "size"
        row = {"seconds_per_block": round(per_block, 1), "seconds_rest": round(rest, 1)}
        for name, t in TARGETS.items():
            block = per_block * block_work(t, kind) / block_work(dims, kind)
            table = rest * (t["vocab_size"] * t["hidden_size"]) / (dims["vocab_size"] * dims["hidden_size"])
            row[name] = {"seconds_per_block": round(block, 1), "hours": round((t["layers"] * block + table) / 3600, 2)}
        out[stage] = row
    return out


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


CALIB = ["--nsamples", "8", "--calib-ctx", "128"]
STAGES = {
    # name: (kind, arguments, input artifact stage for exports)
    "quantize quarot-gptq w4a4kv4": ("quantize", ["--method", "quarot-gptq", "--bits", "w4a4kv4", *CALIB], None),
    "quantize baseq quick w4a4kv4": ("quantize", ["--method", "baseq", "--preset", "quick", "--bits", "w4a4kv4", *CALIB], None),
    "quantize gguf profile (w4a16 q4_1)": ("quantize", ["--profile", "gguf", *CALIB], None),
    "quantize rtn w4a16 g32 float head": ("quantize", ["--method", "rtn", "--bits", "w4a16", "--group-size", "32"], None),
    "quantize gguf profile rtn (w4a16 q4_1)": ("quantize", ["--profile", "gguf", "--method", "rtn"], None),
    "export onnx (baseq quick)": ("export", ["--format", "onnx"], "quantize baseq quick w4a4kv4"),
    "export onnx (quarot-gptq)": ("export", ["--format", "onnx"], "quantize quarot-gptq w4a4kv4"),
    "export gguf (gguf profile)": ("export", ["--format", "gguf"], "quantize gguf profile (w4a16 q4_1)"),
    "export gguf (gguf profile rtn)": ("export", ["--format", "gguf"], "quantize gguf profile rtn (w4a16 q4_1)"),
    "export onnx (rtn w4a16 g32 float head)": ("export", ["--format", "onnx"], "quantize rtn w4a16 g32 float head"),
    "export gguf (rtn w4a16 g32 float head)": ("export", ["--format", "gguf"], "quantize rtn w4a16 g32 float head"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--layers", default="2,4,8", help="checkpoint depths (default 2,4,8)")
    ap.add_argument("--dir", default="/work/bench/scale", help="checkpoints, artifacts and exports (several GB)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated stage names (default: all)")
    ap.add_argument("--shape", choices=list(SHAPES), default="llama2-7b", help="dimensions of the checkpoints (default llama2-7b)")
    ap.add_argument("--keep", action="store_true", help="keep artifacts and exports (default: removed after each depth)")
    args = ap.parse_args()
    layers = [int(n) for n in args.layers.split(",")]
    stages = [s.strip() for s in args.stages.split(",")]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "baseq_export"]
    dims = SHAPES[args.shape]
    results = {"machine": machine(), "cpu_busy_before": require_idle(), "shape": args.shape, "dims": dims, "checkpoints": {}, "stages": {}}
    for n in layers:
        ckpt = root / (f"llama7b-{n}L" if args.shape == "llama2-7b" else f"{args.shape}-{n}L")
        t0 = time.time()
        size = write_checkpoint_in_child(ckpt, n, args.shape)
        results["checkpoints"][n] = {"bytes": size, "seconds": round(time.time() - t0, 1)}
        print(f"{n} layers: checkpoint {size / 2**30:.2f} GiB", flush=True)
        made = {}
        for stage in stages:
            kind, extra, source = STAGES[stage]
            slug = "".join(ch if ch.isalnum() else "-" for ch in stage).strip("-")
            if kind == "quantize":
                out = root / f"{n}L-{slug}.baseq"
                cmd = exe + ["quantize", "--model", str(ckpt), "--out", str(out), "--force", *extra]
            else:
                if source not in made:
                    print(f"  skip {stage}: needs {source}", flush=True)
                    continue
                fmt = extra[1]
                out = root / f"{n}L-{slug}" / ("model.gguf" if fmt == "gguf" else "")
                shutil.rmtree(out if fmt == "onnx" else out.parent, ignore_errors=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                cmd = exe + ["export", str(made[source]), "--out", str(out), *extra]
            r = run_stage(cmd, root / f"{n}L-{slug}.log")
            r["output_bytes"] = dir_size(out) if out.is_dir() else out.stat().st_size
            results["stages"].setdefault(stage, {})[n] = r
            made[stage] = out
            print(f"  {stage}: {r['seconds']} s, peak RSS {r['peak_rss_mib']:.0f} MiB, output {r['output_bytes'] / 2**30:.2f} GiB", flush=True)
            write_json(Path(args.json), results, indent=2)
        if n == max(layers):  # the big export must load in onnxruntime (external data past protobuf's 2 GB)
            big = made.get("export onnx (rtn w4a16 g32 float head)")
            if big is not None:
                r = run_stage([sys.executable, "-c", LOAD_CHECK, str(big)], root / f"{n}L-load-check.log")
                r["data_bytes"] = (big / "model.onnx.data").stat().st_size
                results["onnx_load_check"] = r
                print(f"  onnxruntime loaded {big} ({r['data_bytes'] / 2**30:.2f} GiB of weights) in {r['seconds']} s", flush=True)
        if not args.keep:  # only what this depth wrote: an artifact or ONNX directory, a GGUF file and its directory
            for p in made.values():
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.is_file():
                    p.unlink()
                    p.parent.rmdir()
    growth = {}
    lo, hi = min(layers), max(layers)
    for stage, by_n in results["stages"].items():
        if lo in by_n and hi in by_n:
            g = by_n[hi]["peak_rss_mib"] / by_n[lo]["peak_rss_mib"] - 1
            below = by_n[hi]["peak_rss_mib"] * 2**20 < results["checkpoints"][hi]["bytes"]
            growth[stage] = {"growth": round(g, 3), "below_checkpoint": below}
            print(f"{stage}: peak RSS {by_n[lo]['peak_rss_mib']:.0f} -> {by_n[hi]['peak_rss_mib']:.0f} MiB "
                  f"({g:+.1%} from {lo} to {hi} layers), {'below' if below else 'ABOVE'} the {hi}-layer checkpoint "
                  f"({results['checkpoints'][hi]['bytes'] / 2**30:.2f} GiB)")
    results["growth"] = growth
    results["extrapolation"] = extrapolate(results)
    results["bench_process_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # every stage's floor
    for stage, row in results["extrapolation"].items():
        print(f"{stage}: {row['seconds_per_block']} s a block here; estimated "
              + ", ".join(f"{name} {row[name]['hours']} h" for name in TARGETS))
    write_json(Path(args.json), results, indent=2)
    return 0


LOAD_CHECK = """
import sys, numpy as np
from baseq_export.targets.onnx.runtime import OnnxModel
m = OnnxModel(sys.argv[1], threads=2)
import torch
logits = m.logits(torch.tensor([[1, 5, 9, 12]]))
assert np.isfinite(logits.numpy()).all(), "non-finite logits"
print("logits", tuple(logits.shape))
"""

if __name__ == "__main__":
    sys.exit(main())
