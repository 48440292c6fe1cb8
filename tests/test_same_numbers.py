"""The redesign changed where code lives, not what it computes: the same settings and seed give byte-identical
artifacts and exports with the code before the redesign (git commit BEFORE_REDESIGN) and with this checkout.

Both versions run the same CLI commands on the same tiny checkpoint, each in its own process, in the same
folder, and every file they write is compared by digest (calibration.json holds timings and is left out, as is the op library: the
digest of a compiled binary says nothing about the model)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


BEFORE_REDESIGN = "df8be50256c07e994694c4c6530257c0dfa28d68"
REPO = Path(__file__).resolve().parents[1]
SKIPPED_FILES = ("calibration.json", ".so")

DRIVER = r"""
import hashlib, json, sys
from pathlib import Path
from baseq_export.cli import main

ckpt, text, out = sys.argv[1:4]
out = Path(out)
calib = ["--model", ckpt, "--calib-text", text, "--nsamples", "6", "--calib-ctx", "16"]
try:  # since 2026-12-07 the GGUF names the pre-tokenizer that reproduces the tokenizer's ids (test_gguf_pretok.py);
    import baseq_export.targets.gguf.pretok  # noqa: F401  the old code wrote "default": asked for, the rest compares
    same_pre = ["--gguf-pre", "default"]
except ImportError:
    same_pre = []
try:  # since 2026-12-07 an ONNX export's context defaults to the source model's: 2048 before, asked for here
    from baseq_export.targets.onnx import export_length  # noqa: F401
    same_len = ["--max-length", "2048"]
except ImportError:
    same_len = []
# --r1-steps 0: since 2026-12-07 the learned R1's samples come from the unrotated model and its rotation is folded
# as one product (float rounding differs by design; test_learn_rotation checks both against the rotated model)
runs = [
    ["quantize", "--method", "rtn", "--bits", "w4a16", "--group-size", "32", "--out", str(out / "rtn.baseq"), *calib],
    ["quantize", "--method", "quarot-gptq", "--bits", "w4a4kv4", "--head-bits", "4", "--out", str(out / "gptq.baseq"), *calib],
    ["quantize", "--method", "baseq", "--r1-steps", "0", "--e2e-epochs", "1", "--out", str(out / "baseq.baseq"), *calib],
    ["quantize", "--profile", "gguf", "--out", str(out / "gguf.baseq"), *calib],
    ["quantize", "--profile", "onnx-w4a16", "--out", str(out / "w4a16.baseq"), *calib],
    ["export", str(out / "baseq.baseq"), "--out", str(out / "baseq-onnx"), *same_len],
    ["export", str(out / "baseq.baseq"), "--out", str(out / "baseq-onnx-std"), "--ops", "standard", *same_len],
    ["export", str(out / "w4a16.baseq"), "--out", str(out / "w4a16-onnx"), *same_len],
    ["export", str(out / "gguf.baseq"), "--format", "gguf", "--out", str(out / "gguf.gguf"), *same_pre],
]
for args in runs:
    if main(args) != 0:
        sys.exit(f"failed: {args}")
def gguf_digest(p):
    # a GGUF by content: its tensor bytes and its keys; baseq.quant is provenance JSON, written compactly without
    # unset values since 2026-12-07, so it compares as those values
    import gguf
    r = gguf.GGUFReader(p)
    keys = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    keys["baseq.quant"] = {k: v for k, v in json.loads(keys["baseq.quant"]).items() if v is not None}
    data = p.read_bytes()[r.tensors[0].data_offset:]
    infos = [(t.name, int(t.tensor_type), [int(x) for x in t.shape]) for t in r.tensors]
    return hashlib.sha256(json.dumps([keys, infos], sort_keys=True).encode() + data).hexdigest()

digests = {}
for p in sorted(out.rglob("*")):
    if p.is_file() and not p.name.endswith(tuple(sys.argv[4].split(","))):
        if p.suffix == ".gguf":
            digest = gguf_digest(p)
        elif p.name == "manifest.json":  # the artifact is named, no longer by its absolute path (2026-12-07)
            m = json.loads(p.read_text())
            m["artifact"] = Path(m["artifact"]).name
            digest = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()
        else:
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
        digests[str(p.relative_to(out))] = digest
print("DIGESTS " + json.dumps(digests))
"""


def _digests(code_root: Path, ckpt: Path, text: Path, out: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(ckpt), str(text), str(out), ",".join(SKIPPED_FILES)],
                          cwd=out.parent, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("DIGESTS ")][-1]
    return json.loads(line[len("DIGESTS "):])


def _checkout_before(dest: Path) -> Path:
    """The package and op sources as they were before the redesign (git archive of BEFORE_REDESIGN)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the project's git history (a clone, not an unpacked archive)")
    known = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{BEFORE_REDESIGN}^{{commit}}"], capture_output=True)
    if known.returncode != 0:
        pytest.skip(f"commit {BEFORE_REDESIGN[:7]} is not in this clone's history (a shallow clone?)")
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_REDESIGN, "baseq_export", "runtime_ops"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _checkpoint(path: Path) -> tuple[Path, Path]:
    """A tiny random Llama with a byte-level BPE tokenizer (GGUF takes that kind), saved as a HF checkpoint dir,
    and a text file of the tokenizer's words."""
    from conftest import tiny_hf_model
    from test_gguf import bpe_tokenizer

    tok = bpe_tokenizer()
    tok.save_pretrained(path)
    tiny_hf_model("llama", dtype=torch.float32, vocab_size=len(tok)).save_pretrained(path)
    words = "the quick brown fox jumps over the lazy dog hello world a tiny tokenizer for tests".split()
    gen = torch.Generator().manual_seed(0)
    text = path / "text.txt"
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (400,), generator=gen)))
    return path, text


def test_artifacts_and_exports_are_byte_identical_to_before_the_redesign(tmp_path):
    before = _checkout_before(tmp_path / "before")
    ckpt, text = _checkpoint(tmp_path / "ckpt")
    run = tmp_path / "run"  # both write to the same place: an export's manifest names its artifact's path
    old = _digests(before, ckpt, text, run)
    shutil.rmtree(run)
    new = _digests(REPO, ckpt, text, run)
    assert any(k.endswith("quant.safetensors") for k in old) and any(k.endswith(".gguf") for k in old)
    assert any(k.endswith(".onnx") for k in old)
    assert sorted(new) == sorted(old)
    differ = sorted(k for k in old if old[k] != new[k])
    assert not differ, f"files that changed: {differ}"
