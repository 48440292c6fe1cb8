"""Where a quantized artifact's perplexity goes: the artifact evaluated with one kind of quantizer left out at a time.

    python tools/error_budget.py ARTIFACT.baseq [--max-windows 16] [--json OUT]

Rows: everything quantized (the artifact as it runs); the KV cache in float; each activation site's quantizer left
out (attn_in, o_in, mlp_in, down_in: its learned gain and shift still applied, so only the rounding goes); every
activation site left out; activations and KV cache left out (the 4-bit weights alone); and the float model. Each
row's share is the part of the artifact's gap to the float model that leaving that quantizer out removes; the
shares need not add up (the quantizers' errors interact, and learned parameters of one site may compensate
another's error). Float32 forward of the reference (exact=False), the embedded evaluation split in 512-token
windows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench_baseq import evaluation_windows
from benchutil import machine, write_json

from baseq_export.perplexity import perplexity
from baseq_export.models import load_model
from baseq_export.models.base import ACT_SITES, forward
from baseq_export.artifact import load_artifact
from baseq_export.reference import QuantHooks, reference_model


class PartialHooks(QuantHooks):
    """An artifact's online hooks with the rounding of some activation sites and/or of the KV cache left out."""

    def __init__(self, hooks: QuantHooks, float_sites: tuple[str, ...] = (), float_kv: bool = False):
        self.__dict__.update(hooks.__dict__)
        self.float_sites, self.float_kv = float_sites, float_kv

    def act(self, layer, site, x):
        return self.prequant(layer, site, x) if site in self.float_sites else super().act(layer, site, x)

    def kv(self, layer, k, v):
        return (k, v) if self.float_kv else super().kv(layer, k, v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--model", default="default", help="the float model the artifact was made from")
    ap.add_argument("--max-windows", type=int, default=16, help="512-token windows of the evaluation split")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    art = load_artifact(args.artifact)
    if not art.quant.get("a_bits"):
        raise SystemExit(f"{args.artifact} has no activation quantization (bits {art.quant.get('bits')}): nothing to split")
    m = load_model(args.model)
    windows = evaluation_windows(m.tokenizer, None, args.max_windows)["embedded"]
    ref = reference_model(art, exact=False)
    quantized = ref.hooks
    rows = {
        "all quantized": quantized,
        "KV cache float": PartialHooks(quantized, float_kv=True),
        **{f"{site} float": PartialHooks(quantized, (site,)) for site in ACT_SITES},
        "activations float": PartialHooks(quantized, ACT_SITES),
        "activations and KV float (4-bit weights only)": PartialHooks(quantized, ACT_SITES, float_kv=True),
    }
    ppl = {}
    with torch.inference_mode():
        ppl["float model"] = perplexity(lambda ids: forward(m.config, m.weights, ids), windows, desc="float").ppl
        for name, hooks in rows.items():
            ref.hooks = hooks
            ppl[name] = perplexity(ref.logits, windows, desc=name[:24]).ppl
    gap = ppl["all quantized"] - ppl["float model"]
    out = {name: {"ppl": round(p, 4), "share_of_gap": round((ppl["all quantized"] - p) / gap, 3)} for name, p in ppl.items()}
    for name, r in out.items():
        print(f"{name:48s} ppl {r['ppl']:8.3f}   share of the gap {r['share_of_gap']:6.3f}")
    if args.json:
        write_json(args.json, {"machine": machine(), "artifact": str(args.artifact), "quant": art.quant,
                               "windows": int(windows.shape[0]), "rows": out}, indent=1)


if __name__ == "__main__":
    main()
