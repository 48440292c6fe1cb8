"""How much a W4A4KV4 model's perplexity moves under float-rounding-sized noise, in torch alone.

    python tools/perturbation_spread.py [--method quarot-rtn] [--windows 2] [--seeds 3]
    python tools/perturbation_spread.py --artifact X.baseq [--windows 38] [--seeds 3]

Multiplies the embedding table by (1 + 1e-6 * noise) and re-measures: with 4-bit activations a
value near a rounding boundary flips one code and the flip spreads, so this spread is the
floor for comparing two backends (torch vs onnxruntime) or two close methods.
"""

from __future__ import annotations

import argparse

import torch

from baseq_export import data
from baseq_export.perplexity import perplexity
from baseq_export.models import load_model
from baseq_export.gptq_model import quantize_model
from baseq_export.settings import QuantSettings
from baseq_export.reference import reference_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="quarot-rtn", choices=("rtn", "quarot-rtn"))
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--noise", type=float, default=1e-6)
    ap.add_argument("--artifact", default=None, help="measure this .baseq artifact instead of quantizing --method")
    args = ap.parse_args()
    if args.artifact:
        from transformers import AutoTokenizer

        from baseq_export.artifact import load_artifact

        art = load_artifact(args.artifact)
        tokenizer = AutoTokenizer.from_pretrained(args.artifact)
        models = {f"{art.quant['method']} {art.quant['bits']}": lambda: reference_model(art)}
    else:
        m = load_model("default")
        tokenizer = m.tokenizer
        models = {f"{args.method} {bits}": (lambda b=bits: reference_model(quantize_model(m, QuantSettings(method=args.method, bits=b))))
                  for bits in ("w4a4kv4", "w4a16")}
    windows = data.token_windows(data.tokenize(tokenizer, data.embedded_text("eval")), 512, args.windows)
    for name, make in models.items():
        q = make()
        base = perplexity(q.logits, windows).ppl
        embed = q.weights["embed"]
        spread = []
        for seed in range(args.seeds):
            noise = torch.randn(embed.shape, generator=torch.Generator().manual_seed(seed))
            q.weights["embed"] = embed * (1 + args.noise * noise)
            spread.append(perplexity(q.logits, windows).ppl)
        q.weights["embed"] = embed
        print(f"{name}: perplexity {base:.4f}; with {args.noise:g} relative noise on the embeddings: "
              + ", ".join(f"{p:.4f}" for p in spread), flush=True)


if __name__ == "__main__":
    main()
