"""The custom ops under AddressSanitizer and UndefinedBehaviorSanitizer: build, op tests, fuzz.

    python tools/sanitize_ops.py [--cases 5000] [--seed 0]

Builds libbaseq_ops.so with BASEQ_SANITIZE=1 (-fsanitize=address,undefined, undefined behaviour
aborts; cached apart from the normal build), then runs the op tests (tests/test_runtime_ops.py,
tests/test_kernels.py) and the fuzzer (tests/fuzz_ops.py) in processes that preload the sanitizer
runtimes, since python itself is not built with them. Leak checking is off: the interpreter's own
allocations at exit are not ours. Passes (exit 0) only when every step exits 0 and no sanitizer
report appears in any output. Needs g++ (or $CXX) with libasan and libubsan, as Debian's g++ has.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORT = re.compile(r"ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer")
# tests that build a library of their own in a fresh cache, or a native binary: not the ops under test here
DESELECT = "not installed_package and not library_is_cached and not falls_back and not cpp_kernel_test and not aarch64"


def runtime(cxx: str, name: str) -> str:
    """Path of a sanitizer runtime shared library of the compiler (e.g. libasan.so)."""
    path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(path) or not Path(path).is_file():
        raise SystemExit(f"{cxx} has no {name}: install the compiler's sanitizer runtimes (Debian: they come with g++)")
    return str(Path(path).resolve())


def step(name: str, cmd: list[str], env: dict) -> bool:
    """Run one step; True when it exited 0 with no sanitizer report in its output."""
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    reports = [line for line in out.splitlines() if REPORT.search(line)]
    tail = "\n".join(out.strip().splitlines()[-4:])
    print(f"--- {name}: exit {proc.returncode}, {len(reports)} sanitizer report lines, {time.time() - t0:.0f} s\n{tail}",
          flush=True)
    if reports:
        print("\n".join(out.splitlines()[-80:]), flush=True)
    return proc.returncode == 0 and not reports


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=5000, help="fuzz cases (default 5000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cxx = os.environ.get("CXX") or shutil.which("g++") or "c++"
    env = {**os.environ, "BASEQ_SANITIZE": "1"}
    env.pop("BASEQ_OPS_LIBRARY", None)
    t0 = time.time()
    lib = subprocess.run([sys.executable, "-c", "from baseq_export import runtime_ops; print(runtime_ops.library_path())"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    if lib.returncode != 0:
        print(lib.stderr[-3000:])
        return 1
    path = lib.stdout.strip()
    symbols = subprocess.run(["nm", "-D", path], capture_output=True, text=True).stdout
    hooks = {kind: symbols.count(kind) for kind in ("__asan_report", "__ubsan_handle")}
    print(f"sanitized library: {path} ({time.time() - t0:.0f} s; instrumented: {hooks})", flush=True)
    if not all(hooks.values()):
        print("sanitize_ops: FAIL: the library carries no sanitizer instrumentation")
        return 1
    env.update(LD_PRELOAD=" ".join([runtime(cxx, "libasan.so"), runtime(cxx, "libubsan.so")]),
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    ok = step("op tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_runtime_ops.py",
                           "tests/test_kernels.py", "-k", DESELECT], env)
    ok &= step("fuzz", [sys.executable, "tests/fuzz_ops.py", "--cases", str(args.cases), "--seed", str(args.seed)], env)
    print("sanitize_ops: PASS (no sanitizer reports)" if ok else "sanitize_ops: FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
