"""What the tool never does with a file it is given, each shown with a payload that would leave a marker file if it
ran: it never runs a checkpoint's own Python code (trust_remote_code), never lets a chat template out of jinja's
sandbox, never unpickles (test_checkpoint_checks.py) and never follows a path out of an export (test_reliability.py:
manifest and genai_config names)."""

from __future__ import annotations

import json
import shutil

import pytest

from baseq_export.generate import chat_ids
from baseq_export.models import load_model
from test_cli import tiny_checkpoint
from test_generate import chat_tokenizer
from test_reliability import eval_args, refused


def test_a_checkpoints_own_python_code_is_never_run(tmp_path, capsys):
    """config.json's auto_map points at modelling code shipped in the checkpoint; transformers would import it with
    trust_remote_code. The model is loaded with the library's own Llama code and the payload never runs."""
    model, text = tiny_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "remote-code-ran"
    (model / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                   "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                   "class EvilConfig(LlamaConfig):\n    pass\n"
                                   "class EvilModel(LlamaForCausalLM):\n    pass\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    for lazy in (False, True):
        loaded = load_model(str(model), lazy=lazy)
        assert type(loaded.weights).__name__ in ("dict", "LazyWeights")
    from baseq_export.cli import main

    assert main(eval_args(model, text)) == 0
    capsys.readouterr()
    assert not marker.exists()


ESCAPE = ("{{ ''.__class__.__mro__[1].__subclasses__() }}"
          "{% for m in messages %}{{ m['content'] }}{% endfor %}")


def test_a_chat_template_that_reaches_out_of_the_sandbox_is_refused(tmp_path, capsys):
    """A template reaching for Python's object graph meets jinja's sandbox: a clear refusal naming --raw."""
    tok = chat_tokenizer()
    tok.chat_template = ESCAPE
    with pytest.raises(ValueError, match="chat template cannot be rendered .*SecurityError.*--raw"):
        chat_ids(tok, [{"role": "user", "content": "hi"}])
    model, text = tiny_checkpoint(tmp_path / "ckpt")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ESCAPE
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    shutil.rmtree(model / "chat_template.jinja", ignore_errors=True)
    refused(capsys, ["run", "--model", str(model), "--prompt", "the a", "--max-new-tokens", "2"],
            "chat template cannot be rendered", "--raw", keep=(model,))
