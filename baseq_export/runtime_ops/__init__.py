"""Our onnxruntime custom ops (domain ``baseq``): locate, and on first use build, the shared library.

The C++ sources live in the repository's top-level ``runtime_ops/`` (with its CMake build); an
installed package carries them as ``baseq_export/runtime_ops/src/`` (pyproject.toml maps the
folder there). ``runtime_ops/sources.txt`` lists the files, the CPUs each is built for and its
per-file flags (instruction-set kernels), so this build and CMake's compile the same library.
``$BASEQ_OPS_LIBRARY`` names a library built elsewhere (e.g. by CMake) to use instead.
onnxruntime's PyPI wheels ship no C/C++ headers, so the
build takes them from ``ORT_INCLUDE_DIR`` if set, else downloads Debian's libonnxruntime-dev
package into a private cache with apt (touching no system apt state) and unpacks it there.
A library built with those headers loads in newer onnxruntime releases (the C API is versioned).
The build is cached under ``$BASEQ_CACHE_DIR`` (default ``~/.cache/baseq-export``), keyed by
the sources, compiler flags and headers, so it happens once per machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DOMAIN = "baseq"
LIB_NAME = "libbaseq_ops.so"
HEADERS_PACKAGE = "libonnxruntime-dev"
HEADERS_SUITE = "trixie"
REQUIRED_HEADERS = ["onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_lite_custom_op.h"]
# Exact float semantics (no FMA contraction, no fast-math) are part of the ops' contract; CMakeLists.txt
# uses the same flags.
CXXFLAGS = ["-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-ffp-contract=off",
            "-fno-math-errno"]
MANIFEST = "sources.txt"
# BASEQ_SANITIZE=1 builds (and caches apart) the library with AddressSanitizer and UndefinedBehaviorSanitizer;
# undefined behaviour aborts. Load it with the sanitizer runtimes preloaded: tools/sanitize_ops.py does.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]


class BuildError(RuntimeError):
    """The custom-op library could not be built; the message says why and what to do."""


def cache_dir() -> Path:
    """Where headers and built libraries are kept ($BASEQ_CACHE_DIR, else ~/.cache/baseq-export)."""
    root = os.environ.get("BASEQ_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "baseq-export")
    return Path(root)


def source_dir() -> Path:
    """The folder of the C++ sources: the installed package's copy (src/), else the checkout's runtime_ops/."""
    here = Path(__file__).resolve().parent
    for d in (here / "src", here.parents[1] / "runtime_ops"):
        if (d / MANIFEST).is_file():
            return d
    raise BuildError(f"the custom-op sources are missing: neither {here / 'src'} nor {here.parents[1] / 'runtime_ops'} "
                     f"holds {MANIFEST}; reinstall baseq-export, or export with --ops standard")


def _machine() -> str:
    """This CPU family in sources.txt's words (x86_64, aarch64 or other)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "x86_64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(m, "other")


def manifest(machine: str | None = None) -> list[tuple[str, str, list[str]]]:
    """(file, role, per-file flags) of every source sources.txt builds for `machine` (default: this one)."""
    machine = machine or _machine()
    out = []
    for line in (source_dir() / MANIFEST).read_text().splitlines():
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) < 3:
            raise BuildError(f"{source_dir() / MANIFEST}: malformed line {line!r} (file arch role [flags...])")
        name, arch, role, flags = parts[0], parts[1], parts[2], parts[3:]
        if arch in ("all", machine):
            out.append((name, role, flags))
    return out


def sources(machine: str | None = None) -> list[str]:
    """The source files of the library for `machine`; every header next to them is part of the build key too."""
    return [name for name, _, _ in manifest(machine)]


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock file, so two processes never build into the same place at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _has_headers(d: Path) -> bool:
    return all((d / h).is_file() for h in REQUIRED_HEADERS)


def _debian_mirror() -> str:
    """The Debian mirror this machine's apt already uses (first deb.debian.org-like URI), or the default."""
    for f in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            m = re.match(r"\s*(?:URIs:|deb(?:\s+\[[^\]]*\])?)\s+(\S+)", line)
            if m and "://" in m.group(1) and "security" not in m.group(1):
                return m.group(1)
    return "http://deb.debian.org/debian"


def fetch_headers(dest: Path) -> Path:
    """Download and unpack Debian's libonnxruntime-dev into `dest`; return its include directory."""
    include = dest / "usr" / "include" / "onnxruntime"
    if _has_headers(include):
        return include
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise BuildError("onnxruntime's C/C++ headers are needed to build the custom ops and apt-get/dpkg are not "
                         "available to fetch them: set ORT_INCLUDE_DIR to a directory holding onnxruntime_cxx_api.h "
                         "(e.g. from an onnxruntime release archive), or export with --ops standard")
    with tempfile.TemporaryDirectory(prefix="ort-headers-") as tmp:
        t = Path(tmp)
        for d in ("sources", "lists/partial", "cache/archives/partial"):
            (t / d).mkdir(parents=True)
        (t / "sources" / "trixie.sources").write_text(
            f"Types: deb\nURIs: {_debian_mirror()}\nSuites: {HEADERS_SUITE}\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        opts = ["-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={t / 'sources'}",
                "-o", f"Dir::State::Lists={t / 'lists'}", "-o", f"Dir::Cache={t / 'cache'}", "-o", "Debug::NoLocking=1"]
        try:
            subprocess.run(["apt-get", *opts, "-qq", "update"], check=True, capture_output=True, text=True)
            subprocess.run(["apt-get", *opts, "-qq", "download", HEADERS_PACKAGE], check=True, capture_output=True,
                           text=True, cwd=t)
            debs = sorted(t.glob(f"{HEADERS_PACKAGE}_*.deb"))
            if not debs:
                raise BuildError(f"apt-get download {HEADERS_PACKAGE} produced no .deb")
            staging = dest.with_name(dest.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            subprocess.run(["dpkg", "-x", str(debs[0]), str(staging)], check=True, capture_output=True, text=True)
        except (subprocess.CalledProcessError, OSError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            raise BuildError(f"could not fetch onnxruntime headers ({HEADERS_PACKAGE} from Debian {HEADERS_SUITE}): "
                             f"{detail.strip()[-500:]}\nSet ORT_INCLUDE_DIR to a directory holding onnxruntime_cxx_api.h, "
                             "or export with --ops standard") from e
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    if not _has_headers(include):
        raise BuildError(f"{HEADERS_PACKAGE} unpacked into {dest} but {include} lacks {REQUIRED_HEADERS}")
    return include


def include_dir() -> Path:
    """onnxruntime's header directory: $ORT_INCLUDE_DIR, else the cached Debian package (fetched once)."""
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        d = Path(env).expanduser()
        if not _has_headers(d):
            raise BuildError(f"ORT_INCLUDE_DIR={env} does not contain {', '.join(REQUIRED_HEADERS)}")
        return d
    dest = cache_dir() / "onnxruntime-headers"
    with _locked(cache_dir() / "headers.lock"):
        return fetch_headers(dest)


def _compiler() -> str:
    env = os.environ.get("CXX")
    if env:
        if not shutil.which(env):
            raise BuildError(f"CXX={env} is not an executable C++ compiler; point CXX at one (e.g. g++) or unset it, "
                             "or export with --ops standard")
        return env
    cxx = next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if not cxx:
        raise BuildError("no C++ compiler found (tried $CXX, g++, c++, clang++): install one (Debian: apt install g++) "
                         "or export with --ops standard")
    return cxx


def _arch_flags() -> list[str]:
    """No -march: the compiler's baseline instruction set, so an export's copy of the library also runs on
    another PC (-mtune only schedules for common CPUs)."""
    return ["-mtune=generic"] if platform.machine() in ("x86_64", "AMD64") else []


def _build_key(cxx: str, include: Path, flags: list[str]) -> str:
    h = hashlib.sha256()
    src = source_dir()
    for path in sorted([src / MANIFEST, *src.glob("*.cc"), *src.glob("*.h")]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update((include / "onnxruntime_c_api.h").read_bytes())
    h.update(" ".join([cxx, *flags]).encode())
    return h.hexdigest()[:16]


def _compile_and_link(cxx: str, flags: list[str], include: Path, out: Path) -> None:
    """Compile each source with its per-file flags (in parallel), then link the shared library `out`."""
    src = source_dir()
    objs = out.parent / f".obj.{os.getpid()}"
    objs.mkdir(parents=True, exist_ok=True)
    try:
        def compile_one(entry):
            name, _, extra = entry
            cmd = [cxx, *flags, *extra, f"-I{include}", f"-I{src}", "-c", str(src / name), "-o", str(objs / (name + ".o"))]
            return cmd, subprocess.run(cmd, capture_output=True, text=True)

        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            results = list(pool.map(compile_one, manifest()))
        for cmd, proc in results:
            if proc.returncode != 0:
                raise BuildError(f"building the custom ops failed:\n$ {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        cmd = [cxx, "-shared", *flags, *[str(objs / (name + ".o")) for name in sources()], "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"linking the custom ops failed:\n$ {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    finally:
        shutil.rmtree(objs, ignore_errors=True)


def library_path() -> Path:
    """Path of the custom-op library: $BASEQ_OPS_LIBRARY if set, else our build (made first if needed,
    cached per sources, headers and flags)."""
    env = os.environ.get("BASEQ_OPS_LIBRARY")
    if env:
        lib = Path(env).expanduser().resolve()
        if not lib.is_file():
            raise BuildError(f"BASEQ_OPS_LIBRARY={env} is not a file; point it at a built libbaseq_ops.so "
                             "(cmake -S runtime_ops -B build ...) or unset it")
        return lib
    include = include_dir()
    cxx = _compiler()
    flags = CXXFLAGS + _arch_flags() + (SANITIZE_FLAGS if os.environ.get("BASEQ_SANITIZE") == "1" else [])
    out_dir = cache_dir() / "runtime_ops" / _build_key(cxx, include, flags)
    lib = out_dir / LIB_NAME
    if lib.is_file():
        return lib
    with _locked(out_dir.with_suffix(".lock")):
        if lib.is_file():
            return lib
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{LIB_NAME}.{os.getpid()}.tmp"
        try:
            _compile_and_link(cxx, flags, include, tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, lib)
    return lib


def session_options(threads: int | None = None):
    """onnxruntime SessionOptions with our custom-op library registered."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.register_custom_ops_library(str(library_path()))
    return opts
