"""Our onnxruntime custom ops (domain ``baseq``): locate, and on first use build, the shared library.

The C++ sources sit next to this file. onnxruntime's PyPI wheels ship no C/C++ headers, so the
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
from pathlib import Path

DOMAIN = "baseq"
SOURCES = ["ops.cc"]
LIB_NAME = "libbaseq_ops.so"
HEADERS_PACKAGE = "libonnxruntime-dev"
HEADERS_SUITE = "trixie"
REQUIRED_HEADERS = ["onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_lite_custom_op.h"]
CXXFLAGS = ["-std=c++17", "-O3", "-fPIC", "-shared", "-fvisibility=hidden", "-ffp-contract=off", "-fno-math-errno"]


class BuildError(RuntimeError):
    """The custom-op library could not be built; the message says why and what to do."""


def cache_dir() -> Path:
    """Where headers and built libraries are kept ($BASEQ_CACHE_DIR, else ~/.cache/baseq-export)."""
    root = os.environ.get("BASEQ_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "baseq-export")
    return Path(root)


def source_dir() -> Path:
    return Path(__file__).resolve().parent


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
    for name in SOURCES:
        h.update((source_dir() / name).read_bytes())
    h.update((include / "onnxruntime_c_api.h").read_bytes())
    h.update(" ".join([cxx, *flags]).encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    """Path of the built custom-op library, building it first if needed (cached per sources, headers, flags)."""
    include = include_dir()
    cxx = _compiler()
    flags = CXXFLAGS + _arch_flags()
    out_dir = cache_dir() / "runtime_ops" / _build_key(cxx, include, flags)
    lib = out_dir / LIB_NAME
    if lib.is_file():
        return lib
    with _locked(out_dir.with_suffix(".lock")):
        if lib.is_file():
            return lib
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{LIB_NAME}.{os.getpid()}.tmp"
        cmd = [cxx, *flags, f"-I{include}", *[str(source_dir() / s) for s in SOURCES], "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise BuildError(f"building the custom ops failed:\n$ {' '.join(cmd)}\n{proc.stderr[-3000:]}")
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
