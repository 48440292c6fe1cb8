"""The 4-bit KV cache at long windows: one artifact's weights with its fitted KV clips (the onnx-w4a16kv4 profile,
kv_clips.py), with the fixed clip every other quarot-* artifact uses, and with a float cache, side by side.

    python tools/bench_kv_clips.py --artifact kv4.baseq --ctx 4096 [--max-windows N] [--json F]

Perplexity of each variant in the torch reference (float32, exact=False: float64 attention over 4096 positions is
slow and these are quality figures) on non-overlapping windows of the embedded evaluation split and of the GPL-3
text Debian ships, which no calibration sees; the variants differ only in the KV cache, so any gap is the cache's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from benchutil import machine, write_json

from baseq_export import data
from baseq_export.artifact import Artifact, load_artifact
from baseq_export.kv_clips import kv_tensor_names
from baseq_export.perplexity import perplexity
from baseq_export.reference import reference_model
from baseq_export.settings import QuantSettings

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def variants(art: Artifact) -> dict[str, Artifact]:
    """The artifact as it is, with every KV clip set to QuantSettings().kv_clip, and with its KV cache in float."""
    tensors = {k: art.tensors[k] for k in art.tensors}
    layers = art.model["num_layers"]
    fixed = {**tensors, **{n: torch.full_like(tensors[n], QuantSettings().kv_clip)
                           for i in range(layers) for n in kv_tensor_names(i)}}
    return {"fitted clips (as stored)": dataclasses.replace(art, tensors=tensors),
            f"fixed clip {QuantSettings().kv_clip}": dataclasses.replace(art, tensors=fixed),
            "float cache (same weights)": dataclasses.replace(art, tensors=tensors, quant={**art.quant, "kv_bits": None})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="a .baseq with a 4-bit KV cache (e.g. --profile onnx-w4a16kv4)")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    art = load_artifact(args.artifact, lazy=True)
    if art.quant.get("kv_bits") != 4:
        sys.exit(f"{args.artifact} has no 4-bit KV cache (kv_bits {art.quant.get('kv_bits')}): quantize with "
                 "--profile onnx-w4a16kv4 or --bits w4a4kv4")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.artifact)
    texts = {"eval": data.embedded_text("eval"), **({"GPL-3": GPL3.read_text()} if GPL3.is_file() else {})}
    results = {"machine": machine(), "artifact": Path(args.artifact).name, "quant": art.quant, "ctx": args.ctx,
               "rows": {}}
    for label, variant in variants(art).items():
        qm = reference_model(variant, exact=False)
        results["rows"][label] = {}
        for name, text in texts.items():
            windows = data.token_windows(data.tokenize(tok, text), args.ctx, args.max_windows)
            t0 = time.time()
            with torch.no_grad():
                r = perplexity(qm.logits, windows, desc=f"{label}, {name}")
            results["rows"][label][name] = {"ppl": round(r.ppl, 4), "windows": windows.shape[0],
                                            "seconds": round(time.time() - t0, 1)}
            print(f"{label:28} {name:6} {windows.shape[0]} x {args.ctx}: perplexity {r.ppl:.4f}", flush=True)
        if args.json:
            write_json(args.json, results)


if __name__ == "__main__":
    main()
