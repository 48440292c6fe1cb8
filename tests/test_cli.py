import json
import re
import subprocess
import sys

import pytest
import torch

from baseq_export import cli
from baseq_export.cli import build_parser, main
from baseq_export.perplexity import perplexity
from baseq_export.models import load_model
from baseq_export.models.base import forward


def test_help_lists_subcommands_and_options():
    text = build_parser().format_help()
    for word in ("quantize", "export", "eval", "run", "report", "--format", "--model", "--out", "--preset"):
        assert word in text


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "baseq_export.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "subcommands" in out.stdout


@pytest.mark.parametrize("spec", ["no/such-model", "/definitely/missing"])
def test_bad_model_is_a_clear_error(spec, capsys):
    assert main(["eval", "--model", spec]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "--model default" in err


def test_model_option_before_or_after_subcommand(tmp_path):
    p = build_parser()
    assert p.parse_args(["--model", "x", "eval"]).model == "x"
    assert p.parse_args(["eval", "--model", "y"]).model == "y"
    assert p.parse_args(["eval"]).ctx == 512


WORDS = "the a of to and in is it that for on with as was by be this are or from".split()


def word_tokenizer():
    """A real (word-level) tokenizer of WORDS and [UNK] (id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def tiny_checkpoint(tmp_path, **overrides):
    """A tiny random Llama with a real (word-level) tokenizer, saved as a HF checkpoint dir (overrides: config)."""
    from conftest import tiny_hf_model

    tok = word_tokenizer()
    tok.save_pretrained(tmp_path)
    tiny_hf_model("llama", dtype=torch.float32, vocab_size=len(tok), **overrides).save_pretrained(tmp_path)
    text = tmp_path / "eval.txt"
    gen = torch.Generator().manual_seed(0)
    text.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (200,), generator=gen)))
    return tmp_path, text


def test_eval_prints_perplexity_of_the_model(tmp_path, capsys):
    ckpt, text = tiny_checkpoint(tmp_path)
    assert main(["eval", "--model", str(ckpt), "--eval-text", str(text), "--ctx", "16"]) == 0
    out = capsys.readouterr().out
    ppl, tokens = re.search(r"FP perplexity ([\d.]+) on (\d+) scored tokens", out).groups()
    m = load_model(str(ckpt))
    ids = torch.tensor(m.tokenizer(text.read_text(), add_special_tokens=False)["input_ids"])
    windows = ids[: ids.numel() // 16 * 16].view(-1, 16)
    expected = perplexity(lambda x: forward(m.config, m.weights, x), windows)
    assert int(tokens) == expected.tokens == windows.shape[0] * 15
    assert abs(float(ppl) - expected.ppl) < 1e-3


def test_quantize_then_eval_artifact(tmp_path, capsys):
    from baseq_export.artifact import load_artifact
    from baseq_export.reference import reference_model

    ckpt, text = tiny_checkpoint(tmp_path)
    out = tmp_path / "tiny.baseq"
    args = ["quantize", "--model", str(ckpt), "--method", "quarot-gptq", "--bits", "w4a4kv4",
            "--calib-text", str(text), "--nsamples", "4", "--calib-ctx", "16", "--out", str(out)]
    assert main(args) == 0
    assert main(args) == 1  # exists: refuses without --force
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--eval-text", str(text), "--ctx", "16"]) == 0
    ppl = float(re.search(r"perplexity ([\d.]+) on", capsys.readouterr().out).group(1))
    art = load_artifact(out)
    assert art.quant["method"] == "quarot-gptq" and art.quant["a_bits"] == 4
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor(tok(text.read_text(), add_special_tokens=False)["input_ids"])
    windows = ids[: ids.numel() // 16 * 16].view(-1, 16)
    assert abs(ppl - perplexity(reference_model(art).logits, windows).ppl) < 1e-3


def summary_rows(out: str) -> list[dict]:
    """The main job's closing table (rows FP, torch reference, export) as numbers; '-' is None."""
    rows = []
    for line in out.splitlines():
        if line.startswith(("FP (float32)", "torch reference", "export, ")):
            cells = re.split(r"\s{2,}", line.strip())
            num = lambda c: None if c == "-" else float(c.rstrip("%").removesuffix(" MB"))  # noqa: E731
            rows.append(dict(zip(("name", "ppl", "kld", "top1", "mb", "tok_s"), [cells[0]] + [num(c) for c in cells[1:]])))
    assert [r["name"].split(",")[0] for r in rows] == ["FP (float32)", "torch reference", "export"], out
    return rows


def test_main_job_calibrates_baseq_and_reuses_the_artifact(tmp_path, capsys):
    from baseq_export.artifact import load_artifact

    ckpt, text = tiny_checkpoint(tmp_path)
    args = ["--model", str(ckpt), "--eval-text", str(text), "--calib-text", str(text), "--ctx", "16",
            "--nsamples", "4", "--calib-ctx", "16", "--out", str(tmp_path / "export")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    fp, q, o = (r["ppl"] for r in summary_rows(out))
    art = load_artifact(tmp_path / "export.baseq")
    assert art.quant["method"] == "baseq" and art.quant["baseq"]["name"] == "quick"
    assert art.quant["lm_head"] == "int4" and art.quant["head_act_bits"] == 8  # the head on the int8 kernels
    assert len(art.calibration["blocks"]) == 2 and q != fp and abs(o / q - 1) < 0.005
    fp_row, q_row, o_row = summary_rows(out)
    assert fp_row["kld"] is None and 0 < q_row["kld"] and abs(o_row["kld"] / q_row["kld"] - 1) < 0.05
    assert 0 < o_row["top1"] <= 100 and o_row["tok_s"] > 0 and q_row["tok_s"] is None
    assert o_row["mb"] == pytest.approx(sum(f.stat().st_size for f in (tmp_path / "export").rglob("*") if f.is_file()) / 1e6, abs=0.06)
    assert "asked: " in out and "FP model" in out and "export (onnxruntime" in out
    assert f"ONNX export: {tmp_path / 'export'}/model.onnx" in out and "baseq-export run" in out
    assert not (tmp_path / "export.baseq.partial").exists()  # the resume state is removed once saved
    assert main(args) == 0
    assert "reusing the finished artifact" in capsys.readouterr().err
    assert main(args + ["--bits", "w4a8kv8"]) == 1
    assert "holds another quantization" in capsys.readouterr().err
    for changed in (["--seed", "1"], ["--group-size", "32"], ["--preset", "standard"], ["--r1-steps", "3"],
                    ["--e2e-epochs", "3"]):  # any setting
        assert main(args + changed) == 1
        assert "holds another quantization" in capsys.readouterr().err


def test_quantize_with_a_learned_rotation(tmp_path, capsys):
    """--r1-steps fits the residual rotation (on calibration windows, even for RTN) and the artifact records it;
    with quantized activations only."""
    from baseq_export.artifact import load_artifact

    ckpt, text = tiny_checkpoint(tmp_path)
    out = tmp_path / "r1.baseq"
    args = ["quantize", "--model", str(ckpt), "--method", "quarot-rtn", "--calib-text", str(text), "--nsamples", "4",
            "--calib-ctx", "16", "--out", str(out)]
    assert main(args + ["--r1-steps", "4"]) == 0
    assert load_artifact(out).quant["rotation"]["r1_learned_steps"] == 4
    capsys.readouterr()
    assert main(args + ["--r1-steps", "4", "--bits", "w4a16", "--force"]) == 1
    assert "quantized activations" in capsys.readouterr().err


def test_quantize_with_and_without_the_end_to_end_pass(tmp_path, capsys):
    """--e2e-epochs N runs the end-to-end pass after the blocks (recorded in the calibration log); 0 leaves it out."""
    from baseq_export.artifact import load_artifact

    ckpt, text = tiny_checkpoint(tmp_path)
    args = ["quantize", "--model", str(ckpt), "--calib-text", str(text), "--nsamples", "4", "--calib-ctx", "16",
            "--r1-steps", "0"]
    assert main(args + ["--e2e-epochs", "2", "--out", str(tmp_path / "e2e.baseq")]) == 0
    art = load_artifact(tmp_path / "e2e.baseq")
    assert art.quant["baseq"]["e2e_epochs"] == 2 and art.calibration["end_to_end"]["epochs"] == 2
    assert main(args + ["--e2e-epochs", "0", "--out", str(tmp_path / "plain.baseq")]) == 0
    plain = load_artifact(tmp_path / "plain.baseq")
    assert plain.quant["baseq"]["e2e_epochs"] == 0 and "end_to_end" not in plain.calibration


def test_main_job_with_the_fast_w4a16_onnx_profile(tmp_path, capsys):
    """--profile onnx-w4a16: rotated GPTQ in groups of 64 with every rotation offline, a 4-bit head, and the
    linears and head on MatMulNBits' int8 kernels; onnxruntime's perplexity equals the torch reference's."""
    import onnx

    from baseq_export.artifact import load_artifact

    ckpt, text = tiny_checkpoint(tmp_path)
    args = ["--profile", "onnx-w4a16", "--model", str(ckpt), "--eval-text", str(text), "--calib-text", str(text),
            "--ctx", "16", "--nsamples", "4", "--calib-ctx", "16", "--out", str(tmp_path / "export")]
    assert main(args) == 0
    out = capsys.readouterr().out
    fp, q, o = (r["ppl"] for r in summary_rows(out))
    quant = load_artifact(tmp_path / "export.baseq").quant
    assert (quant["method"], quant["bits"], quant["group_size"], quant["rotation"]["r4"]) == ("quarot-gptq", "w4a16", 64, False)
    assert (quant["head_act_bits"], quant["linear_act_bits"], quant["weight_clip"]) == (8, 8, "mse")
    graph = onnx.load(str(tmp_path / "export" / "model.onnx"), load_external_data=False).graph
    levels = [a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"]
    assert levels and set(levels) == {4} and "Hadamard" not in {n.op_type for n in graph.node}
    assert q != fp and abs(o / q - 1) < 1e-4


def test_quantize_with_a_profile_uses_the_profiles_method(tmp_path, capsys):
    """`quantize --profile onnx-w4a16` (the README's W4A16 command) quantizes with the profile's method and
    bits, not BASE-Q's defaults (which refused weight-only bits)."""
    from baseq_export.artifact import load_artifact

    ckpt, text = tiny_checkpoint(tmp_path)
    out = tmp_path / "w.baseq"
    assert main(["quantize", "--profile", "onnx-w4a16", "--model", str(ckpt), "--calib-text", str(text),
                 "--nsamples", "4", "--calib-ctx", "16", "--out", str(out)]) == 0
    assert "(quarot-gptq w4a16)" in capsys.readouterr().err
    quant = load_artifact(out).quant
    assert (quant["method"], quant["bits"], quant["group_size"], quant["head_act_bits"]) == ("quarot-gptq", "w4a16", 64, 8)


def test_eval_of_a_damaged_artifact_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.baseq").mkdir()
    assert main(["eval", str(tmp_path / "x.baseq")]) == 1
    assert "not a baseq artifact" in capsys.readouterr().err


def test_report_writes_plots(tmp_path, capsys):
    import json

    from PIL import Image

    ckpt, text = tiny_checkpoint(tmp_path)
    art = tmp_path / "t.baseq"
    assert main(["quantize", "--model", str(ckpt), "--calib-text", str(text), "--nsamples", "4",
                 "--calib-ctx", "16", "--out", str(art)]) == 0
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": {"FP32": {"ppl": 10.0}, "BASE-Q": {"ppl": 12.5}}}))
    assert main(["report", str(art), "--out", str(tmp_path / "plots"), "--layer", "1", "--site", "mlp_in", "--bench", str(bench)]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert names == ["activations_layer1_mlp_in.png", "block_losses.png", "perplexity.png"]
    for n in names:
        assert Image.open(tmp_path / "plots" / n).size[0] > 500
    assert main(["report", str(art), "--out", str(tmp_path / "p2"), "--site", "nowhere"]) == 1
    assert "--site must be one of" in capsys.readouterr().err


def test_site_activations_match_the_reference_forward():
    """The report's 'quantizer input' stage is what fake quantization actually receives."""
    from baseq_export.calibrate import calibrate_baseq
    from baseq_export.settings import BaseqSettings
    from baseq_export.models import from_hf_model
    from baseq_export.settings import QuantSettings
    from baseq_export.quant import fake_quant_per_token
    from baseq_export.report import site_activations
    from conftest import tiny_hf_model

    m = from_hf_model(tiny_hf_model("llama", dtype=torch.float32))
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    art = calibrate_baseq(m, QuantSettings(bits="w4a4kv4"), BaseqSettings(nsamples=4, calib_ctx=16, epochs=1), ids)
    stages = site_activations(m, art, ids[:2], 1, "o_in")
    assert list(stages) == ["original", "rotated", "baseq (quantizer input)"]
    x_orig, x_rot, x_q = stages.values()
    # R2 is orthogonal per head: the rotation keeps each token's norm; BASE-Q's shift moves the channel means
    torch.testing.assert_close(x_rot.norm(dim=-1), x_orig.norm(dim=-1), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(x_q.mean(0), x_rot.mean(0), atol=1e-3)
    assert torch.isfinite(fake_quant_per_token(x_q, 4, 0.9)).all()


def test_export_eval_and_run_onnx(tmp_path, capsys):
    from baseq_export.targets.onnx import OnnxModel
    from baseq_export.generate import greedy_tokens, onnx_stepper, torch_stepper
    from baseq_export.artifact import load_artifact
    from baseq_export.reference import reference_model

    ckpt, text = tiny_checkpoint(tmp_path)
    art = tmp_path / "t.baseq"
    assert main(["quantize", "--model", str(ckpt), "--calib-text", str(text), "--nsamples", "4",
                 "--calib-ctx", "16", "--out", str(art)]) == 0
    assert main(["export", str(art), "--out", str(tmp_path / "onnx")]) == 0
    assert main(["export", str(art), "--out", str(tmp_path / "onnx-std"), "--ops", "standard"]) == 0
    out = capsys.readouterr().out
    assert "or with onnxruntime-genai: baseq-export run" in out and "(after pip install" not in out
    from baseq_export import targets

    with pytest.MonkeyPatch.context() as mp:  # where genai is not installed, the suggested line says how to get it
        mp.setitem(targets.OPTIONAL_BACKENDS, "onnxruntime-genai", ("no_such_module_here", "onnxruntime-genai"))
        cli.print_run_commands(tmp_path / "onnx")
    assert "or with onnxruntime-genai (after pip install onnxruntime-genai): baseq-export run" in capsys.readouterr().out
    for path, ops in ((tmp_path / "onnx", "custom"), (tmp_path / "onnx-std", "standard")):
        assert json.loads((path / "manifest.json").read_text())["ops"] == ops
    ppl = {}
    for path in (art, tmp_path / "onnx", tmp_path / "onnx-std"):
        assert main(["eval", str(path), "--eval-text", str(text), "--ctx", "16"]) == 0
        ppl[path] = float(re.search(r"perplexity ([\d.]+) on", capsys.readouterr().out).group(1))
    assert abs(ppl[art] / ppl[tmp_path / "onnx"] - 1) < 0.005
    assert abs(ppl[art] / ppl[tmp_path / "onnx-std"] - 1) < 0.005
    # greedy decoding: torch reference and onnxruntime give the same tokens
    prompt = [3, 5, 7, 2, 9]
    ref = greedy_tokens(torch_stepper(reference_model(load_artifact(art))), prompt, 12)
    assert greedy_tokens(onnx_stepper(OnnxModel(tmp_path / "onnx")), prompt, 12) == ref
    assert main(["run", str(tmp_path / "onnx"), "--prompt", "the a of", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the a of")
    for backend, path in (("torch", art), ("onnxruntime-genai", tmp_path / "onnx")):
        assert main(["run", str(path), "--backend", backend, "--prompt", "the a of", "--max-new-tokens", "5"]) == 0
        assert capsys.readouterr().out == text  # same greedy text from every backend
    assert main(["run", str(art), "--backend", "onnxruntime", "--prompt", "x"]) == 1
    assert "is a .baseq artifact, which runs in the torch reference" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "onnx"), "--backend", "torch", "--prompt", "x"]) == 1
    assert "is a onnx export: use --backend onnxruntime or onnxruntime-genai" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing-here")]) == 1
    assert "does not exist: pass a .baseq artifact or an export of ours" in capsys.readouterr().err


def bpe_checkpoint(tmp_path):
    """A tiny random Llama with a byte-level BPE tokenizer (what llama.cpp's GGUF vocab can hold), and a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import tiny_hf_model

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("t", "h"), ("Ġ", "th"), ("e", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=alphabet[1], eos_token=alphabet[2]).save_pretrained(tmp_path)
    tiny_hf_model("llama", dtype=torch.float32, vocab_size=len(vocab)).save_pretrained(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("the other brother of the weather then went there. " * 30)
    return tmp_path, text


def test_main_job_for_gguf_runs_the_profile_and_llama_cpp(tmp_path, capsys):
    """--format gguf: the gguf profile (W4A16 rotated GPTQ, no R4) in llama.cpp's Q4_K_M mix, the file written
    with exactly that mix's tensor types, its perplexity measured in llama.cpp next to the torch reference of the
    same artifact."""
    pytest.importorskip("llama_cpp")
    import gguf
    from baseq_export.artifact import load_artifact
    from baseq_export.gguf_file import GGUF_TENSORS, read_header, tensor_name
    from baseq_export.models.base import LINEARS, ModelConfig, linear_in_features
    from baseq_export.quant.ggml_mix import head_types, linear_type

    ckpt, text = bpe_checkpoint(tmp_path)
    out = tmp_path / "m.gguf"
    args = ["--format", "gguf", "--model", str(ckpt), "--eval-text", str(text), "--calib-text", str(text), "--ctx", "32",
            "--nsamples", "4", "--calib-ctx", "32", "--out", str(out)]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    fp, q, cpp = (r["ppl"] for r in summary_rows(stdout))
    art = load_artifact(tmp_path / "m.gguf.baseq")
    quant = art.quant
    assert (quant["method"], quant["bits"], quant["ggml_mix"]) == ("quarot-gptq", "w4a16", "q4_k_m")
    assert quant["rotation"]["r4"] is False and out.is_file() and f"GGUF export: {out} (MOSTLY_Q4_K_M," in stdout
    cfg = ModelConfig.from_dict(art.model)
    want = {tensor_name(GGUF_TENSORS[lin], bid=i): linear_type("q4_k_m", lin, i, cfg.num_layers,
                                                              linear_in_features(cfg, lin))
            for i in range(cfg.num_layers) for lin in LINEARS}
    got = {t.name: gguf.GGMLQuantizationType(t.qtype).name for t in read_header(out, set()).tensors if t.name in want}
    assert got == want and len(set(got.values())) > 1  # a mix: more bits for some tensors
    output, embed = head_types("q4_k_m", cfg.hidden_size)  # the output and token embedding as llama.cpp's mix has them
    heads = {t.name: gguf.GGMLQuantizationType(t.qtype).name for t in read_header(out, set()).tensors}
    assert heads["token_embd.weight"] == (output if cfg.tied_embeddings else embed)
    assert heads.get("output.weight", output) == output
    assert abs(cpp / q - 1) < 0.01 and q != fp  # llama.cpp's 8-bit block activations: close, not equal


def test_device_option(tmp_path, capsys):
    """--device: auto is the CPU where PyTorch sees no GPU and gives the CPU's artifact bit for bit; cuda there is
    refused up front, naming the fix, before anything is written; `python -m baseq_export` is the CLI."""
    from baseq_export.device import resolve_device
    from baseq_export.artifact import load_artifact

    out = subprocess.run([sys.executable, "-m", "baseq_export", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("baseq-export ")
    with pytest.raises(ValueError, match="--device must be one of"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the refusal cannot be shown")
    assert resolve_device("auto") == torch.device("cpu")
    ckpt, text = tiny_checkpoint(tmp_path)
    base = ["quantize", "--model", str(ckpt), "--method", "quarot-gptq", "--calib-text", str(text), "--nsamples", "4",
            "--calib-ctx", "16"]
    assert main(base + ["--device", "cuda", "--out", str(tmp_path / "gpu.baseq")]) == 1
    err = capsys.readouterr().err
    assert "--device cuda" in err and "--device cpu" in err and not (tmp_path / "gpu.baseq").exists()
    for device in ("cpu", "auto"):
        assert main(base + ["--device", device, "--out", str(tmp_path / f"{device}.baseq")]) == 0
    a, b = (load_artifact(tmp_path / f"{d}.baseq") for d in ("cpu", "auto"))
    assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert main(["eval", str(tmp_path / "cpu.baseq"), "--eval-text", str(text), "--ctx", "16", "--device", "cuda"]) == 1
    assert "--device cuda" in capsys.readouterr().err
