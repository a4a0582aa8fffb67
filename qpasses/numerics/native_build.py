"""Building and loading the small C kernels of :mod:`qpasses.numerics` (no torch headers).

:func:`build_library` compiles a self-contained C source once per machine with the system C
compiler (``$CC``, else ``cc``) into a shared library cached under ``$QPASSES_KERNEL_CACHE`` (else
``~/.cache/qpasses``, else the temporary directory) and loads it with :mod:`ctypes`. The cached
file is named after the kernel and a hash of the source, the compiler, the flags and the CPU
(``-march=native`` depends on it), so a cache shared by several machines or source versions keeps
one build of each; a build is written to a temporary file and renamed into place (atomic:
concurrent builders agree). Callers declare their functions' signatures (:func:`declare`), run
their own self-test (:func:`checked_library`), and fall back to their numpy/torch paths when
there is no library.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["BASE_FLAGS", "build_library", "checked_library", "cpu_id", "declare",
           "native_flags"]

# IEEE float semantics (no contraction, no errno/trap assumptions), position-independent shared
BASE_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC",
              "-shared")


def cpu_id() -> str:
    """What ``-march=native`` depends on (a cache shared by machines keeps one build each)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def native_flags() -> list[str]:
    """:data:`BASE_FLAGS` plus tuning for this machine's CPU (x86-64: ``-march=native``)."""
    march = ["-march=native", "-mprefer-vector-width=512"] \
        if platform.machine() in ("x86_64", "AMD64") else []
    return list(BASE_FLAGS) + march


def _cache_root() -> str:
    root = os.environ.get("QPASSES_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "qpasses")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError:
        root = tempfile.gettempdir()
    return root


def build_library(name: str, source: str, flags: Sequence[str] | None = None,
                  libs: Sequence[str] = ("-lm",)) -> ctypes.CDLL | None:
    """The shared library compiled from ``source`` (cached as ``<name>_<hash>.so``), loaded; None
    when the compiler fails. ``flags`` defaults to :func:`native_flags`. Raises what ``ctypes`` or
    ``subprocess`` raise (a missing compiler, a load error): callers treat any of it as "no
    library"."""
    cc = os.environ.get("CC", "cc")
    flags = native_flags() if flags is None else list(flags)
    tag = hashlib.sha256("\0".join([source, cc, *flags, cpu_id()]).encode()).hexdigest()[:16]
    root = _cache_root()
    lib = os.path.join(root, f"{name}_{tag}.so")
    if not os.path.exists(lib):
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            src, so = os.path.join(tmp, "k.c"), os.path.join(tmp, "k.so")
            with open(src, "w", encoding="utf-8") as f:
                f.write(source)
            res = subprocess.run([cc, *flags, src, "-o", so, *libs], capture_output=True,
                                 timeout=120, check=False)
            if res.returncode != 0:
                return None
            os.replace(so, lib)              # atomic: concurrent builders agree
    return ctypes.CDLL(lib)


def checked_library(build: Callable[[], ctypes.CDLL | None],
                    self_test: Callable[[ctypes.CDLL], bool]) -> ctypes.CDLL | None:
    """``build()``'s library if it builds, loads and passes ``self_test``; None otherwise (a
    missing compiler, a build or load error, a failed self-test): the caller then runs its tensor
    paths. Callers cache the answer once per process."""
    try:
        dll = build()
    except (OSError, subprocess.SubprocessError, AttributeError):
        return None
    if dll is None or not self_test(dll):
        return None
    return dll


def declare(dll: ctypes.CDLL, names: Iterable[str], restype: Any,
            argtypes: Sequence[Any]) -> None:
    """Give every function ``names`` of ``dll`` the C signature ``restype(argtypes)`` (ctypes then
    converts each call's arguments to those types)."""
    for name in names:
        fn = getattr(dll, name)
        fn.restype, fn.argtypes = restype, list(argtypes)
