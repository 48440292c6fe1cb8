"""The custom-op fuzzer (tests/fuzz_ops.py) in a child process: thousands of random, often invalid, cases
through real onnxruntime sessions; every one is a correct result or an onnxruntime error, and the
process lives to print its summary (a crash inside an op would end it without one)."""

import re
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parent / "fuzz_ops.py"


def test_fuzzed_ops_give_right_results_or_errors_and_never_crash():
    proc = subprocess.run([sys.executable, str(FUZZ), "--cases", "3000", "--seed", "7"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fuzz: 3000 cases ok" in proc.stdout
    counts = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"^(\S+): (\d+) ok, (\d+) refused$", proc.stdout, re.M)}
    assert len(counts) == 11  # every op family was drawn, each with valid and with refused cases
    assert all(ok > 50 and refused > 5 for ok, refused in counts.values()), counts


def test_the_fuzzer_catches_a_wrong_result():
    """The checks have teeth: a reference off by one quantization level makes the fuzzer fail."""
    code = ("import sys; sys.path.insert(0, %r); import fuzz_ops as f; import numpy as np\n"
            "good = f.np_fake_quant\n"
            "f.np_fake_quant = lambda x, bits, *a: good(x, bits, *a) + np.float32(1e-3)\n"
            "sys.argv = ['fuzz_ops', '--cases', '400']; sys.exit(f.main())") % str(FUZZ.parent)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "WRONG RESULT" in proc.stdout and "QuantDequant" in proc.stdout, proc.stdout[-2000:]
