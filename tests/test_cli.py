import re
import subprocess
import sys

import pytest
import torch

from baseq_export.cli import build_parser, main
from baseq_export.evaluate import perplexity
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


def tiny_checkpoint(tmp_path):
    """A tiny random Llama with a real (word-level) tokenizer, saved as a HF checkpoint dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import tiny_hf_model

    words = "the a of to and in is it that for on with as was by be this are or from".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    tiny_hf_model("llama", dtype=torch.float32, vocab_size=len(vocab)).save_pretrained(tmp_path)
    text = tmp_path / "eval.txt"
    gen = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (200,), generator=gen)))
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
    from baseq_export.qmodel import load_artifact, reference_model

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


def test_main_job_calibrates_baseq_and_reuses_the_artifact(tmp_path, capsys):
    from baseq_export.qmodel import load_artifact

    ckpt, text = tiny_checkpoint(tmp_path)
    args = ["--model", str(ckpt), "--eval-text", str(text), "--calib-text", str(text), "--ctx", "16",
            "--nsamples", "4", "--calib-ctx", "16", "--out", str(tmp_path / "export")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    fp, q = map(float, re.search(r"FP perplexity ([\d.]+), quantized ([\d.]+)", out).groups())
    art = load_artifact(tmp_path / "export.baseq")
    assert art.quant["method"] == "baseq" and art.quant["baseq"]["name"] == "quick"
    assert len(art.calibration["blocks"]) == 2 and q != fp
    assert not (tmp_path / "export.baseq.partial").exists()  # the resume state is removed once saved
    assert main(args) == 0
    assert "reusing the finished artifact" in capsys.readouterr().err
    assert main(args + ["--bits", "w4a8kv8"]) == 1
    assert "holds another quantization" in capsys.readouterr().err


def test_eval_of_a_damaged_artifact_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.baseq").mkdir()
    assert main(["eval", str(tmp_path / "x.baseq")]) == 1
    assert "not a baseq artifact" in capsys.readouterr().err


def test_not_built_subcommands_say_so(capsys):
    assert main(["report", "x.baseq", "--out", "plots"]) == 2
    assert "not built yet" in capsys.readouterr().err
