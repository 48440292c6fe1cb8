"""A function-preserving copy of a model whose weights lie on no 4-bit grid: the fair benchmark model.

    python tools/offgrid_copy.py --model default --out smollm2-offgrid [--seed 0] [--force]

The default model's weights are llama.cpp's Q4_1 of some float model, so any group-32 rounding
of them (llama.cpp's Q4_1 included) finds the grid again and says nothing about a method. This
tool folds every RMSNorm gain into the linears that read it (norm weights become 1) and rotates
the residual stream by a seeded random orthogonal matrix Q (dense, Haar-distributed; not a
Hadamard, so it has nothing in common with our R1): embeddings and every linear reading the
stream become W Q, o_proj / down_proj become Q^T W. The logits are unchanged up to float rounding;
the weights are mixed across rows / columns and leave the grid.

Folding the final norm into the lm_head makes it differ from the embedding (E diag(g) Q vs E Q),
so a tied model comes out untied (tie_word_embeddings false): its head is one more matrix.

The result is a local Hugging Face checkpoint directory (config.json, model.safetensors, the
tokenizer files) that `baseq-export --model DIR` and `python -m onnxruntime_genai.models.builder
-i DIR` read. transformers 5 refuses save_pretrained on a GGUF-loaded model, so the weights go into
a fresh model built from the config without its quantization_config.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from baseq_export.gguf_file import load_tokenizer as gguf_tokenizer
from baseq_export.models import _resolve, adapter_for, from_hf_model
from baseq_export.models.base import LINEARS, ModelConfig
from baseq_export.rotate import fold_norms, random_orthogonal, rotate_residual

MARKER = "offgrid_copy"  # key in the written config.json: what made it and with which seed


def offgrid_weights(cfg: ModelConfig, w: dict[str, torch.Tensor], seed: int) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Canonical weights of the copy (float64 math, back in each tensor's dtype): norms folded, stream rotated."""
    dtypes = {k: v.dtype for k, v in w.items()}
    cfg, w = fold_norms(cfg, {k: v.to(torch.float64) for k, v in w.items()})
    w = rotate_residual(cfg, w, random_orthogonal(cfg.hidden_size, seed))
    return cfg, {k: v.to(dtypes.get(k, torch.float32)) for k, v in w.items()}


def hf_state_dict(cfg: ModelConfig, w: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """transformers parameter names of canonical weights (norm weights all ones: their gains are folded)."""
    adapter = adapter_for(arch)
    paths = getattr(adapter, "LINEAR_PATHS", None) or adapter_for("llama").LINEAR_PATHS
    norms = getattr(adapter, "NORM_PATHS", None) or adapter_for("llama").NORM_PATHS
    ones = torch.ones(cfg.hidden_size, dtype=w["embed"].dtype)
    sd = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": ones, "lm_head.weight": w["lm_head"]}
    for i in range(cfg.num_layers):
        for path in norms.values():
            sd[f"model.layers.{i}.{path}.weight"] = ones
        for name in LINEARS:
            for suffix in ("weight", "bias"):
                key = f"layers.{i}.{name}.{suffix}"
                if key in w:
                    sd[f"model.layers.{i}.{paths[name]}.{suffix}"] = w[key]
    return sd


def fresh_model(hf_config, dtype: torch.dtype):
    """An untied, unquantized transformers model of the same architecture (random weights, to be overwritten)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(hf_config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.tie_word_embeddings = False
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def make_copy(hf_model, tokenizer, out: str | Path, seed: int = 0, force: bool = False, source: str = "") -> Path:
    """Write the off-grid copy of a loaded transformers model as a checkpoint directory at out (atomically)."""
    out = Path(out).expanduser()
    if out.exists():
        ours = (out / "config.json").is_file() and MARKER in json.loads((out / "config.json").read_text())
        if not force or not ours:
            raise FileExistsError(f"{out} exists" + ("; pass --force to replace it" if ours else
                                                     " and is not an off-grid copy; choose another --out"))
    m = from_hf_model(hf_model, tokenizer)
    cfg, w = offgrid_weights(m.config, m.weights, seed)
    dtype = next(hf_model.parameters()).dtype
    model = fresh_model(hf_model.config, dtype)
    missing, unexpected = model.load_state_dict(hf_state_dict(cfg, w, m.config.arch), strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"offgrid_copy: weights do not fit the fresh model (missing {missing[:4]}, unexpected {unexpected[:4]})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        conf = json.loads((tmp / "config.json").read_text())
        conf[MARKER] = {"seed": seed, "source": source}
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_hf(spec: str, dtype: torch.dtype = torch.float32):
    """(transformers model, tokenizer, source path) of a --model value: default, a checkpoint dir or a .gguf."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = _resolve(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True, **kwargs).eval()
    tokenizer = gguf_tokenizer(directory / gguf) if gguf else AutoTokenizer.from_pretrained(directory,
                                                                                           local_files_only=True)
    return model, tokenizer, str(directory / gguf) if gguf else str(directory)


def grid_error(w: torch.Tensor) -> float:
    """Relative RMS error of llama.cpp-style Q4_1 RTN (blocks of 32) of a [N, K] weight: ~0 on the grid."""
    from baseq_export.quant import rtn_quantize

    w = w.to(torch.float32)
    return float((rtn_quantize(w, grid="q4_1").dequantize() - w).norm() / w.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random orthogonal rotation")
    ap.add_argument("--force", action="store_true", help="replace an existing off-grid copy at --out")
    args = ap.parse_args()
    model, tokenizer, source = load_hf(args.model)
    out = make_copy(model, tokenizer, args.out, args.seed, args.force, source)
    from transformers import AutoModelForCausalLM

    copy_ = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    ids = torch.tensor([tokenizer("def fibonacci(n):\n    return", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a, b = model(ids).logits, copy_(ids).logits
    name = "model.layers.0.mlp.down_proj.weight"
    print(f"wrote {out}: max |logit difference| {float((a - b).abs().max()):.2e} (logits up to {float(a.abs().max()):.1f}); "
          f"Q4_1 RTN relative error of {name}: original {grid_error(model.state_dict()[name]):.2e}, "
          f"copy {grid_error(copy_.state_dict()[name]):.2e}")


if __name__ == "__main__":
    main()
