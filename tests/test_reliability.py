"""Bad input is refused before work starts, with a message naming the problem and the fix; faults during a
run (overflow, signals, a full disk) keep what was finished and leave the user's files as they were; damaged
exports are named at load. Every case feeds the real CLI a real bad input (no mocks)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from baseq_export.cli import main
from test_cli import bpe_checkpoint, tiny_checkpoint


def tree_state(*roots: Path) -> dict[str, str]:
    """Every file under the roots (files or directories) with its SHA-256: what 'unchanged' is checked against."""
    state = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for f in files:
            state[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return state


def refused(capsys, argv: list[str], *needles: str, keep: tuple[Path, ...] = ()) -> str:
    """Run the CLI; assert a non-zero status, no traceback, every needle in the message, and `keep` unchanged."""
    before = tree_state(*keep)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals (status 2)
        rc = e.code
    err = capsys.readouterr().err
    assert rc not in (0, None), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert tree_state(*keep) == before
    return err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(checkpoint dir, text file) of a tiny Llama with a word-level tokenizer (max_position_embeddings 128)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def variant(base: Path, dest: Path, config: dict | None = None, edit=None) -> Path:
    """A copy of a checkpoint with config.json keys changed and/or its weights edited in place."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, dest)
    if config is not None:
        c = json.loads((dest / "config.json").read_text())
        c.update(config)
        (dest / "config.json").write_text(json.dumps(c))
    if edit is not None:
        w = load_file(dest / "model.safetensors")
        edit(w)
        save_file(w, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def eval_args(model: Path, text: Path) -> list[str]:
    return ["eval", "--model", str(model), "--eval-text", str(text), "--ctx", "16"]


# ---------------------------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("arch", ["gpt2", "mixtral", "t5"])
def test_unsupported_architectures_name_what_is_supported(arch, tmp_path, capsys, ckpt):
    from transformers import GPT2Config, MixtralConfig, T5Config

    configs = {"gpt2": GPT2Config(n_layer=1, n_embd=32, n_head=2),
               "mixtral": MixtralConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=2, num_key_value_heads=1),
               "t5": T5Config(num_layers=1, d_model=32)}
    configs[arch].save_pretrained(tmp_path)
    refused(capsys, eval_args(tmp_path, ckpt[1]), f"architecture '{arch}' is not supported",
            "supported: llama, mistral, qwen2", keep=(tmp_path,))


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                                  {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                   "long_factor": [2.0] * 4, "original_max_position_embeddings": 64}])
def test_rope_types_whose_frequencies_vary_are_refused(rope, tmp_path, capsys, ckpt):
    d = variant(ckpt[0], tmp_path / "m", {"rope_parameters": rope})
    refused(capsys, eval_args(d, ckpt[1]), f"RoPE type '{rope['rope_type']}' is not supported",
            "supported: default, linear, llama3, yarn", keep=(d,))


def _other_head(w):
    w["lm_head.weight"] = torch.randn_like(w["model.embed_tokens.weight"])


@pytest.mark.parametrize("case", ["untied-without-head", "tied-with-own-head", "attention-bias-missing", "bad-json"])
def test_config_and_checkpoint_that_disagree_are_refused(case, tmp_path, capsys, ckpt):
    """Each would otherwise run silently wrong: transformers makes up a random head or zero biases, or uses a
    head the config says is the embedding."""
    d = tmp_path / "m"
    if case == "untied-without-head":
        variant(ckpt[0], d, {"tie_word_embeddings": False})
        needles = ("lacks lm_head.weight", "set it to true")
    elif case == "tied-with-own-head":
        variant(ckpt[0], d, edit=_other_head)
        needles = ("own, different lm_head.weight", "set tie_word_embeddings false")
    elif case == "attention-bias-missing":
        variant(ckpt[0], d, {"attention_bias": True})
        needles = ("lacks model.layers.0.self_attn", "attention_bias")
    else:
        variant(ckpt[0], d)
        (d / "config.json").write_text('{"model_type": "llama",')
        needles = ("config.json is not valid JSON", "restore it")
    refused(capsys, eval_args(d, ckpt[1]), *needles, keep=(d,))


def test_non_finite_weights_name_the_tensor(tmp_path, capsys, ckpt):
    def poison(w):
        w["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")

    d = variant(ckpt[0], tmp_path / "m", edit=poison)
    refused(capsys, eval_args(d, ckpt[1]), "weight layers.1.up.weight holds 1 NaN/Inf", keep=(d,))


def test_missing_and_truncated_weight_files_name_the_file(tmp_path, capsys, ckpt):
    from conftest import tiny_hf_model

    sharded = tmp_path / "sharded"
    tiny_hf_model("llama", dtype=torch.float32, vocab_size=21).save_pretrained(sharded, max_shard_size="20KB")
    for f in ckpt[0].glob("tok*"):
        shutil.copy(f, sharded)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    refused(capsys, eval_args(sharded, ckpt[1]), f"lacks the weight file(s) {shards[1].name}",
            "download the complete checkpoint", keep=(sharded,))

    cut = variant(ckpt[0], tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    refused(capsys, eval_args(cut, ckpt[1]), f"{cut / 'model.safetensors'} is truncated or damaged", "download it again",
            keep=(cut,))


def test_a_truncated_gguf_model_names_the_file(tmp_path, capsys):
    from baseq_export.targets.gguf import write_model
    from baseq_export.models import load_model

    bpe, text = bpe_checkpoint(tmp_path / "bpe")
    path = write_model(load_model(str(bpe)), tmp_path / "f32.gguf")
    data = path.read_bytes()
    for keep in (len(data) * 2 // 3, 300):
        cut = tmp_path / f"cut-{keep}.gguf"
        cut.write_bytes(data[:keep])
        refused(capsys, eval_args(cut, text), f"{cut} is truncated", "export it again", keep=(cut,))


# ---------------------------------------------------------------------------------------------
# Text and numbers: refused before a model is loaded or any calibration runs


BAD_TEXTS = {
    "empty.txt": (b"", "is empty"),
    "binary.bin": (bytes(range(256)) * 8, "is not UTF-8 text"),
    "latin1.txt": ("caf\xe9 au lait ".encode("latin-1") * 50, "is not UTF-8 text"),
    "nul.txt": (b"the a of\x00\x00 " * 100, "holds NUL bytes"),
}


@pytest.mark.parametrize("name", sorted(BAD_TEXTS))
@pytest.mark.parametrize("option", ["--eval-text", "--calib-text"])
def test_bad_text_files_are_refused_before_loading_the_model(name, option, tmp_path, capsys, ckpt):
    content, needle = BAD_TEXTS[name]
    f = tmp_path / name
    f.write_bytes(content)
    out = tmp_path / "out.baseq"
    cmd = "eval" if option == "--eval-text" else "quantize"
    argv = [cmd, "--model", str(tmp_path / "no-model-needed"), option, str(f)] + (["--out", str(out)] if cmd == "quantize" else [])
    # the --model path does not exist: had the text not been refused first, the error would be about the model
    refused(capsys, argv, f"{f} {needle}", keep=(f, tmp_path))
    assert not out.exists()


NUMBER_CASES = [
    (["eval", "--ctx", "1"], "argument --ctx: must be at least 2, got 1"),
    (["eval", "--max-windows", "0"], "argument --max-windows: must be at least 1, got 0"),
    (["eval", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["quantize", "--method", "gptq", "--nsamples", "0"], "argument --nsamples: must be at least 1, got 0"),
    (["quantize", "--calib-ctx", "1"], "argument --calib-ctx: must be at least 2, got 1"),
    (["quantize", "--seed", "-3"], "argument --seed: must be at least 0, got -3"),
    (["quantize", "--group-size", "48"], "argument --group-size: invalid choice: 48"),
    (["quantize", "--bits", "w3a3kv3"], "argument --bits: invalid choice: 'w3a3kv3'"),
    (["run", "x", "--prompt", "a", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
]


@pytest.mark.parametrize("argv,needle", NUMBER_CASES, ids=[" ".join(a) for a, _ in NUMBER_CASES])
def test_numbers_out_of_range_are_refused_by_the_parser(argv, needle, capsys):
    refused(capsys, argv, needle)


def test_numbers_the_model_cannot_take_are_refused_before_calibration(tmp_path, capsys, ckpt):
    model, text = ckpt
    out = tmp_path / "o.baseq"
    base = ["quantize", "--model", str(model), "--calib-text", str(text), "--out", str(out)]
    refused(capsys, eval_args(model, text)[:-1] + ["129"], "--ctx 129 is longer than the model's context of 128",
            "pass --ctx 128 or less")
    refused(capsys, base + ["--method", "gptq", "--bits", "w4a16", "--calib-ctx", "1000"],
            "--calib-ctx 1000 is longer than the model's context of 128")
    refused(capsys, base + ["--method", "rtn", "--bits", "w4a16", "--group-size", "128"],
            "--group-size 128 does not divide the input width(s) [64]", "use 32 or 64")
    refused(capsys, base + ["--nsamples", "2", "--calib-ctx", "16", "--calib-text", str(tmp_path / "nope.txt")],
            "nope.txt does not exist")
    short = tmp_path / "short.txt"
    short.write_text("the a of")
    refused(capsys, base + ["--nsamples", "2", "--calib-ctx", "16", "--calib-text", str(short)],
            "calibration text has 3 tokens, fewer than one window of 16", "smaller --calib-ctx")
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_an_artifact_the_format_cannot_hold_is_refused(tmp_path, capsys, ckpt):
    model, text = ckpt
    art = tmp_path / "w4a4.baseq"
    assert main(["quantize", "--model", str(model), "--method", "rtn", "--bits", "w4a4kv4", "--out", str(art)]) == 0
    capsys.readouterr()
    refused(capsys, ["export", str(art), "--format", "gguf", "--out", str(tmp_path / "x.gguf")],
            "weight-only", keep=(art,))
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------------------------------------
# During calibration


def _overflow_block_1(w):
    """Finite but huge gate and up weights in block 1: their product overflows float32 in the SwiGLU."""
    for name in ("gate_proj", "up_proj"):
        w[f"model.layers.1.mlp.{name}.weight"] *= 1e25


def test_overflow_in_a_block_stops_there_naming_block_and_site_and_the_rerun_resumes(tmp_path, capsys, ckpt):
    d = variant(ckpt[0], tmp_path / "m", edit=_overflow_block_1)
    out = tmp_path / "o.baseq"
    argv = ["quantize", "--model", str(d), "--calib-text", str(ckpt[1]), "--nsamples", "4", "--calib-ctx", "16",
            "--out", str(out)]
    refused(capsys, argv, "block 1 of the full-precision model produced NaN/Inf first in the down_in activations",
            "finished blocks are kept")
    partial = Path(f"{out}.partial")
    done = partial / "block_0.safetensors"
    assert done.is_file() and not (partial / "block_1.safetensors").exists() and not out.exists()
    kept = tree_state(partial)
    err = refused(capsys, argv, "block 1 of the full-precision model")
    assert "resuming the partial run" in err
    assert tree_state(partial) == kept  # block 0 replayed, not recomputed or rewritten
    shutil.copy(ckpt[0] / "model.safetensors", d / "model.safetensors")  # the checkpoint fixed in place
    refused(capsys, argv, "holds a partial run with other settings, data or model weights", "remove it to start over",
            keep=(partial,))


def _cli(args: list[str], preexec_fn=None, **kw) -> subprocess.Popen:
    """The CLI as a child process with Ctrl-C at its default: a shell's background job (`cmd &`) inherits SIGINT
    ignored, and Python then keeps it ignored, so the SIGINT tests would test nothing."""
    def setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec_fn is not None:
            preexec_fn()

    return subprocess.Popen([sys.executable, "-m", "baseq_export.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=setup, **kw)


def _artifact_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from baseq_export.artifact import TENSORS

    return load_file(path / TENSORS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[list[str], Path]:
    """(quantize arguments, the artifact they give when nothing interrupts them), made once for both signals."""
    root = tmp_path_factory.mktemp("uninterrupted")
    model, text = tiny_checkpoint(root / "ckpt", num_hidden_layers=8)
    args = ["quantize", "--model", str(model), "--calib-text", str(text), "--nsamples", "16", "--calib-ctx", "16"]
    p = _cli(args + ["--out", str(root / "ref.baseq")])
    assert p.wait(600) == 0, p.stderr.read()
    return args, root / "ref.baseq"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_killed_calibration_keeps_its_blocks_and_resumes_bit_identically(sig, tmp_path, uninterrupted):
    args, ref = uninterrupted
    out = tmp_path / "o.baseq"
    partial = Path(f"{out}.partial")
    p = _cli(args + ["--out", str(out)])
    deadline = time.time() + 300
    while not (partial / "block_0.safetensors").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(sig)
    rc = p.wait(120)
    err = p.stderr.read()
    assert rc == (130 if sig == signal.SIGINT else 143), err
    assert "Traceback" not in err and "run the same command again to resume" in err
    finished = sorted(partial.glob("block_*.safetensors"))
    assert 1 <= len(finished) < 8 and not out.exists()
    assert not list(tmp_path.glob(".o.baseq.tmp-*")) and not list(partial.glob("*.tmp"))

    if sig == signal.SIGTERM:  # other settings: the partial run is not mixed in (once: the signal changes nothing)
        other = _cli(args + ["--out", str(out), "--seed", "1"])
        assert other.wait(300) == 1
        assert "holds a partial run with other settings" in other.stderr.read()

    p = _cli(args + ["--out", str(out)])
    assert p.wait(600) == 0
    assert "resuming the partial run" in p.stderr.read()
    got, want = _artifact_tensors(out), _artifact_tensors(ref)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------
# Outputs


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ckpt):
    """(artifact, ONNX export with custom ops) of the tiny model."""
    root = tmp_path_factory.mktemp("exported")
    art, onnx_dir = root / "t.baseq", root / "t.onnx"
    model, _ = ckpt
    assert main(["quantize", "--model", str(model), "--method", "rtn", "--bits", "w4a16", "--out", str(art)]) == 0
    assert main(["export", str(art), "--out", str(onnx_dir), "--ops", "custom"]) == 0
    return art, onnx_dir


def test_user_files_at_out_are_never_replaced(tmp_path, capsys, ckpt, exported):
    art, onnx_dir = exported
    user_dir, user_file = tmp_path / "mine", tmp_path / "notes.txt"
    user_dir.mkdir()
    (user_dir / "keep.txt").write_text("mine")
    user_file.write_text("mine")
    bpe, _ = bpe_checkpoint(tmp_path / "bpe")
    gguf_art = tmp_path / "g.baseq"
    assert main(["quantize", "--model", str(bpe), "--profile", "gguf", "--method", "rtn", "--out", str(gguf_art)]) == 0
    capsys.readouterr()
    quantize = ["quantize", "--model", str(ckpt[0]), "--method", "rtn", "--bits", "w4a16", "--out"]
    for out in (user_dir, user_file):
        refused(capsys, quantize + [str(out)], "already exists", "--force", keep=(user_dir, user_file))
        refused(capsys, quantize + [str(out), "--force"], "is not a baseq artifact", keep=(user_dir, user_file))
        for fmt, source in (("onnx", art), ("gguf", gguf_art)):
            if fmt == "gguf" and out.is_dir():
                continue  # a GGUF export into a directory adds DIR/model.gguf: nothing of the user's is replaced
            refused(capsys, ["export", str(source), "--format", fmt, "--out", str(out)], "already exists",
                    keep=(user_dir, user_file))
            refused(capsys, ["export", str(source), "--format", fmt, "--out", str(out), "--force"],
                    "is not a baseq", keep=(user_dir, user_file))
    # an artifact is not an export, and an export is not an artifact: --force replaces neither with the other
    refused(capsys, ["export", str(art), "--out", str(art), "--force"], "is not a baseq ONNX export", keep=(art,))
    refused(capsys, quantize + [str(onnx_dir), "--force"], "is not a baseq artifact", keep=(onnx_dir,))


def _limited(limit: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.parametrize("what", ["export", "artifact"])
def test_a_full_disk_leaves_the_previous_output_intact(what, tmp_path, ckpt, exported):
    """RLIMIT_FSIZE makes every write past the limit fail (EFBIG), as a full disk does (ENOSPC)."""
    art, onnx_dir = exported
    prev = tmp_path / ("prev.onnx" if what == "export" else "prev.baseq")
    shutil.copytree(onnx_dir if what == "export" else art, prev)
    before = tree_state(tmp_path)
    if what == "export":
        args = ["export", str(art), "--out", str(prev), "--ops", "custom", "--force"]
    else:
        args = ["quantize", "--model", str(ckpt[0]), "--method", "rtn", "--bits", "w4a16", "--out", str(prev), "--force"]
    p = _cli(args, preexec_fn=_limited(20_000))
    rc, err = p.wait(300), p.stderr.read()
    assert rc == 1, err
    assert "Traceback" not in err and "the disk is full or a file size limit was hit" in err
    assert tree_state(tmp_path) == before  # previous output intact, no temporary files left beside it
    assert sorted(os.listdir(tmp_path)) == [prev.name]


def _edit_manifest(d: Path, change) -> None:
    m = json.loads((d / "manifest.json").read_text())
    change(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _edit_genai(d: Path, change) -> None:
    m = json.loads((d / "genai_config.json").read_text())
    change(m)
    (d / "genai_config.json").write_text(json.dumps(m))


def _flip_last_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


DAMAGE = {
    "data-missing": (lambda d: (d / "model.onnx.data").unlink(), "lacks model.onnx.data"),
    "data-truncated": (lambda d: (d / "model.onnx.data").write_bytes((d / "model.onnx.data").read_bytes()[:100]),
                       "model.onnx.data has 100 bytes"),
    "data-changed": (lambda d: _flip_last_byte(d / "model.onnx.data"), "model.onnx.data does not match"),
    "foreign-op-library": (lambda d: _flip_last_byte(d / "libbaseq_ops.so"), "an op library from another build"),
    "graph-missing": (lambda d: (d / "model.onnx").unlink(), "lacks model.onnx"),
    "manifest-missing": (lambda d: (d / "manifest.json").unlink(), "holds model.onnx but no manifest.json"),
    "manifest-names-a-file-outside": (lambda d: _edit_manifest(d, lambda m: m["files"].append("../../outside.so")),
                                      "'../../outside.so' lies outside the export directory"),
    "manifest-absolute-graph": (lambda d: _edit_manifest(d, lambda m: m.update(onnxruntime={
                                    "model": "/tmp/model.onnx", "kv_cache": "float"})),
                                "'/tmp/model.onnx' lies outside the export directory"),
    "manifest-bad-model": (lambda d: _edit_manifest(d, lambda m: m["model"].update(hidden_size="64")),
                           '"model" is not a model config'),
    "manifest-not-an-object": (lambda d: (d / "manifest.json").write_text("[1, 2]"), "is not a JSON object"),
    "manifest-of-another-format": (lambda d: _edit_manifest(d, lambda m: m.update(format=None, model={})),
                                   "format None is not 'baseq-onnx'"),
}
GENAI_DAMAGE = {
    "genai-library-outside": (lambda d: _edit_genai(d, lambda m: m["model"]["decoder"]["session_options"].update(
        custom_ops_library="/usr/lib/evil.so")), "custom_ops_library\" ('/usr/lib/evil.so') is not a file name inside"),
    "genai-graph-outside": (lambda d: _edit_genai(d, lambda m: m["model"]["decoder"].update(filename="../m.onnx")),
                            "filename\" ('../m.onnx') is not a file name inside"),
    "genai-context": (lambda d: _edit_genai(d, lambda m: m["model"].update(context_length=-5)),
                      "context_length\" is not a positive whole number"),
}


@pytest.mark.parametrize("damage", sorted(GENAI_DAMAGE))
def test_a_genai_config_that_names_files_outside_or_bad_numbers_is_refused(damage, tmp_path, capsys, exported):
    d = tmp_path / "x.onnx"
    shutil.copytree(exported[1], d)
    edit, needle = GENAI_DAMAGE[damage]
    edit(d)
    refused(capsys, ["run", str(d), "--prompt", "the a", "--max-new-tokens", "2", "--backend", "onnxruntime-genai"],
            needle, "re-export it", keep=(d,))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("command", ["eval", "run-onnxruntime", "run-genai"])
def test_a_damaged_onnx_export_is_named_at_load(damage, command, tmp_path, capsys, ckpt, exported):
    d = tmp_path / "x.onnx"
    shutil.copytree(exported[1], d)
    edit, needle = DAMAGE[damage]
    edit(d)
    argv = (["eval", str(d), "--eval-text", str(ckpt[1]), "--ctx", "16"] if command == "eval" else
            ["run", str(d), "--prompt", "the a", "--max-new-tokens", "2",
             "--backend", "onnxruntime" if command == "run-onnxruntime" else "onnxruntime-genai"])
    refused(capsys, argv, needle, keep=(d,))


def test_exports_are_validated_before_they_replace_anything(tmp_path, exported):
    """The checks that run on the staged files before the rename catch a file that is not what was built."""
    from baseq_export.targets import onnx as onnx_target
    from baseq_export.targets.onnx.runtime import file_digests, read_manifest

    art, onnx_dir = exported
    d = tmp_path / "staged"
    shutil.copytree(onnx_dir, d)
    manifest = read_manifest(d)
    assert manifest["digests"] == file_digests(d, manifest["files"])  # recomputed independently here
    import onnx

    built = onnx.load(str(d / "model.onnx"), load_external_data=False)
    onnx_target.validate_written(d, manifest, built)  # the export as written passes
    extra = onnx.helper.make_tensor("extra", onnx.TensorProto.FLOAT, [1], [0.0])
    built.graph.initializer.append(extra)
    with pytest.raises(ValueError, match="other initializers than the graph built"):
        onnx_target.validate_written(d, manifest, built)
    (d / "model.onnx.data").write_bytes(b"")
    with pytest.raises(ValueError, match="model.onnx.data has 0 bytes"):
        onnx_target.validate_written(d, manifest, built)


def test_a_gguf_export_is_validated_and_a_damaged_one_named(tmp_path, capsys):
    from baseq_export.targets import gguf as gguf_target
    from baseq_export.targets.gguf.tensors import GGUFExportError

    bpe, text = bpe_checkpoint(tmp_path / "bpe")
    art, out = tmp_path / "g.baseq", tmp_path / "g.gguf"
    assert main(["quantize", "--model", str(bpe), "--profile", "gguf", "--method", "rtn", "--out", str(art)]) == 0
    assert main(["export", str(art), "--format", "gguf", "--out", str(out)]) == 0
    capsys.readouterr()
    plan = gguf_target.plan_tensors(*_plan_args(art))
    gguf_target.validate_written(out, plan)
    plan.tensors.pop()
    with pytest.raises(GGUFExportError, match="other tensors than planned"):
        gguf_target.validate_written(out, plan)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size - 1000])
    refused(capsys, ["eval", str(cut), "--eval-text", str(text), "--ctx", "16"], "is truncated", keep=(cut,))
    refused(capsys, ["run", str(cut), "--prompt", "the", "--max-new-tokens", "2"], "is truncated", keep=(cut,))


def _plan_args(art: Path):
    """plan_tensors' arguments for an artifact as `export --format gguf` plans it by default."""
    from baseq_export.targets.gguf.meta import rope_factors
    from baseq_export.artifact import load_artifact

    a = load_artifact(art)
    return a, "auto", "auto", None, rope_factors(a)
