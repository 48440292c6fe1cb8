"""ONNX parity of artifacts: torch reference against onnxruntime (custom ops and standard ops) and
onnxruntime-genai, on the embedded evaluation split.

For each artifact: perplexity with the PyTorch reference forward and with onnxruntime running the
export made with --ops custom and with --ops standard (relative difference to torch), and 32
greedy tokens from a fixed prompt with torch, both exports in onnxruntime and in onnxruntime-genai.

    python tools/onnx_parity.py ART.baseq [ART2.baseq ...] [--windows N] [--json OUT]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


from benchutil import machine, write_json

PROMPT = "def fibonacci(n):\n    "


def parity(artifact: Path, windows: int | None, tokens: int, work: Path) -> dict:
    from transformers import AutoTokenizer

    from baseq_export import data
    from baseq_export.perplexity import perplexity
    from baseq_export.targets.onnx import OnnxModel, write as export_onnx
    from baseq_export.targets.onnx.genai import genai_stream
    from baseq_export.generate import greedy_tokens, onnx_stepper, torch_stepper
    from baseq_export.artifact import load_artifact
    from baseq_export.reference import reference_model

    art = load_artifact(artifact)
    tok = AutoTokenizer.from_pretrained(str(artifact))
    ids = data.token_windows(data.tokenize(tok, data.embedded_text("eval")), 512, windows)
    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    ref = reference_model(art)
    t0 = time.time()
    row = {"artifact": str(artifact), "method": art.quant.get("method"), "bits": art.quant.get("bits"),
           "windows": int(ids.shape[0]), "torch": {"ppl": perplexity(ref.logits, ids).ppl,
                                                   "tokens": greedy_tokens(torch_stepper(ref), prompt, tokens)}}
    for ops in ("custom", "standard"):
        out = export_onnx(artifact, work / f"{artifact.stem}-{ops}", force=True, ops=ops)
        om = OnnxModel(out)
        r = {"ppl": perplexity(om.logits, ids).ppl, "tokens": greedy_tokens(onnx_stepper(om), prompt, tokens)}
        r["rel_diff"] = r["ppl"] / row["torch"]["ppl"] - 1
        r["tokens_equal_torch"] = r["tokens"] == row["torch"]["tokens"]
        r["genai_tokens_equal"] = list(genai_stream(out, prompt, tokens)) == r["tokens"]
        row[ops] = r
    row["seconds"] = round(time.time() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--windows", type=int, default=None, help="evaluation windows of 512 tokens (default: all)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for a in args.artifacts:
            row = parity(a, args.windows, args.tokens, Path(tmp))
            rows.append(row)
            t = row["torch"]
            print(f"{row['method']} {row['bits']} ({row['windows']} windows): torch {t['ppl']:.4f}")
            for ops in ("custom", "standard"):
                r = row[ops]
                print(f"  onnxruntime {ops:8s} {r['ppl']:.4f} ({r['rel_diff']:+.3%}); {args.tokens} greedy tokens "
                      f"== torch: {r['tokens_equal_torch']} (first {next((i for i, (a, b) in enumerate(zip(r['tokens'], t['tokens'])) if a != b), len(t['tokens']))} equal); "
                      f"genai == onnxruntime: {r['genai_tokens_equal']}")
    if args.json:
        write_json(args.json, {"machine": machine(), "prompt": PROMPT, "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
