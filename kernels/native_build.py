"""Builds one of our C kernels with the machine's C compiler, once per machine, and loads it.

A C kernel is compiled at run time rather than shipped as a wheel so that `-march=native` fits the
CPU it runs on and the package stays pure Python. The shared library is cached under
``$TANDEM_CACHE_DIR`` (default ``~/.cache/tandem``) keyed by the source, the flags, the compiler and
the CPU, and written under a temporary name then renamed, so concurrent workers on one machine
neither rebuild it twice in a row nor load a half-written file. Where no compiler works the caller
gets None and the reason in the log, and keeps its plain torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "TANDEM_CACHE_DIR"
# -ffp-contract=fast: a multiply then add becomes one FMA, as the kernels' inner loops want.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-shared", "-fPIC", "-std=gnu11")
BUILD_TIMEOUT_S = 120.0


# A C function's ctypes signature: (return type, argument types).
Signature = tuple[object, list[object]]


def load_native(
    source: Path, signatures: dict[str, Signature], extra_flags: tuple[str, ...] = ()
) -> ctypes.CDLL | None:
    """The compiled ``source`` with ``signatures`` declared, built now (with FLAGS, then
    ``extra_flags``) if this machine has not built it yet; None (and one warning in the log) if it
    cannot be built or loaded."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler (cc, gcc or $CC): %s is not built, its torch fallback runs", source.name)
        return None
    try:
        flags = (*FLAGS, *extra_flags)
        library = _cache_dir() / f"{source.stem}-{_build_key(source, compiler, flags)}.so"
        if not library.exists():
            _compile(source, compiler, flags, library)
        loaded = ctypes.CDLL(str(library))
        for name, (restype, argtypes) in signatures.items():
            function = getattr(loaded, name)
            function.restype, function.argtypes = restype, argtypes
        return loaded
    except (OSError, AttributeError, subprocess.SubprocessError) as e:
        logger.warning("could not build %s with %s, its torch fallback runs: %s", source.name, compiler, e)
        return None


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tandem"
    )
    path = Path(root) / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_key(source: Path, compiler: str, flags: tuple[str, ...]) -> str:
    """Changes with anything that changes the binary: source, the headers beside it, flags,
    compiler version, CPU."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=True
    ).stdout
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]
    digest = hashlib.sha256()
    for part in (source.read_bytes(), *headers, " ".join(flags).encode(), version.encode(), _cpu_identity().encode()):
        digest.update(part)
    return digest.hexdigest()[:16]


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags where Linux lists them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return platform.machine() + "".join(sorted({line for line in lines if line.startswith(wanted)}))


def _compile(source: Path, compiler: str, flags: tuple[str, ...], library: Path) -> None:
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        partial = Path(scratch) / library.name
        result = subprocess.run(
            [compiler, *flags, str(source), "-o", str(partial), "-lm"],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise OSError(f"exit {result.returncode}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    logger.info("built %s into %s", source.name, library)
