"""One writer per output (locks.py), with real processes: a second run aimed at the --out of a running one is refused
naming it; the first, killed with SIGKILL, does not block the next one, which resumes and finishes whole; two exports
started together leave one whole export and one clear refusal; readers of one export work at the same time."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

from baseq_export.artifact import load_artifact
from baseq_export.cli import main
from baseq_export.locks import lock_path
from test_cli import tiny_checkpoint
from test_reliability import _cli


def wait_for(path: Path, proc, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert path.exists(), proc.stderr.read() if proc.poll() is not None else f"{path} did not appear"


def test_a_second_run_on_the_same_out_is_refused_and_a_killed_run_does_not_block(tmp_path):
    model, text = tiny_checkpoint(tmp_path / "ckpt", num_hidden_layers=4)
    out = tmp_path / "o.baseq"
    args = ["quantize", "--model", str(model), "--calib-text", str(text), "--nsamples", "16", "--calib-ctx", "16",
            "--out", str(out)]
    first = _cli(args)
    wait_for(Path(f"{out}.partial") / "block_0.safetensors", first)  # calibrating: it holds the lock
    first.send_signal(signal.SIGSTOP)  # and keeps holding it, however fast this machine calibrates
    second = _cli(args)
    assert second.wait(300) == 1
    err = second.stderr.read()
    assert f"{out} is being written by another baseq-export run (pid {first.pid}" in err, err
    assert "Traceback" not in err and "choose another --out" in err
    assert first.poll() is None and not out.exists()  # the refusal did not disturb the first run

    first.send_signal(signal.SIGKILL)
    first.wait(60)
    assert lock_path(out).exists() and not out.exists()  # the killed run's lock file is left, its lock is not
    resumed = _cli(args)
    assert resumed.wait(600) == 0, resumed.stderr.read()
    assert "resuming the partial run" in resumed.stderr.read()
    load_artifact(out)  # whole: checksums and index verified
    assert not lock_path(out).exists()


def test_two_exports_started_together_leave_one_whole_export_and_one_refusal(tmp_path):
    model, text = tiny_checkpoint(tmp_path / "ckpt")
    art = tmp_path / "t.baseq"
    assert main(["quantize", "--model", str(model), "--method", "rtn", "--bits", "w4a16", "--out", str(art)]) == 0
    out = tmp_path / "t.onnx"
    runs = [_cli(["export", str(art), "--out", str(out)]) for _ in range(2)]
    codes = [r.wait(300) for r in runs]
    errs = [r.stderr.read() for r in runs]
    assert sorted(codes) == [0, 1], errs
    refusal = errs[codes.index(1)]
    assert "Traceback" not in refusal
    assert re.search(r"is being written by another baseq-export run|already exists", refusal), refusal
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".t.onnx")]  # no temporary or lock left

    readers = [_cli(["eval", str(out), "--eval-text", str(text), "--ctx", "16"]) for _ in range(2)]
    outputs = [(r.wait(300), r.stdout.read(), r.stderr.read()) for r in readers]
    assert all(rc == 0 for rc, _, _ in outputs), outputs
    figures = {re.search(r"perplexity\D*([\d.]+)", o).group(1) for _, o, _ in outputs}
    assert len(figures) == 1, outputs
    assert json.loads((out / "manifest.json").read_text())
