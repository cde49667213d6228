"""Build a small C library once per machine and load it with ctypes, beside torch.

The build is `cc -O3 -march=native -fopenmp` into the kernel cache (`--kernel-cache`, else the
home's `kernels/`: `server.core.paths.resolve_kernel_cache`), under a name hashed from the
source, the flags, this CPU's flags and the torch version: `-march=native` code is valid only
on the CPU it was built for. The engine names the cache once (`set_cache_dir`) and every library
of the process is built there. Where it cannot be written (a read-only home), the build goes to
a private directory under the system's temporary one, with a warning. Loaded after torch, its
OpenMP calls bind to torch's own libgomp; a library that brings a second OpenMP runtime is
refused (two runtimes would fight over the cores).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from server.core.paths import resolve_kernel_cache, unwritable_reason

log = logging.getLogger(__name__)

NATIVE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def c_source(module_file: str, name: str) -> str:
    """The C text in `name`, a file beside the Python module `module_file` (the kernels' C lives in .c and .h
    files, so that editors and tools read it as C; a file holding @NAME@ markers is a template its module fills)."""
    return (Path(module_file).parent / name).read_text(encoding="utf-8")

# C for a buffer kept by one thread for its life and grown to the largest need (OpenMP's threads persist):
# `grow(&buf, &cap, n)` returns it with room for n floats, 64-byte aligned, or NULL when memory ran out.
C_GROW_BUFFER = c_source(__file__, "native_grow_buffer.h")


# C for AMX tiles, for sources to include where the compiler has them (inside their own `#if __AMX_TILE__`):
# `amx_request()` asks Linux for the tile state (once per process; asking again is harmless) and says whether it
# was granted; `amx_load_tiles(rows, colsb)` configures tiles 0-7 (palette 1) for the calling thread.
C_AMX_TILES = c_source(__file__, "native_amx_tiles.h")


class NativeBuildError(RuntimeError):
    """The library could not be built or loaded; the message says why (compiler output included)."""


_cache_dir: Optional[Path] = None  # set by the engine from its configuration; None: resolved from the environment
_warned_fallback: set[Path] = set()


def set_cache_dir(directory: Path) -> None:
    """Build and find this process's kernels in `directory` from now on (the engine calls it at start-up)."""
    global _cache_dir
    _cache_dir = Path(directory).expanduser()


def cache_dir() -> Path:
    """The kernel cache: what `set_cache_dir` named, else `resolve_kernel_cache()` (env, then the home's)."""
    return _cache_dir if _cache_dir is not None else resolve_kernel_cache()


def _private_fallback() -> Path:
    """A directory only this user can write, under the system's temporary one: where kernels go when the cache
    is read-only. Refused (NativeBuildError) if someone else owns it or may write to it."""
    directory = Path(tempfile.gettempdir()) / f"loraserve-kernels-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        st = directory.lstat()
    except OSError as e:
        raise NativeBuildError(f"no writable kernel directory: {e}") from e
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NativeBuildError(f"{directory} is not a private directory of this user: not building kernels into it")
    return directory


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, str]:
    """(model name, flags line) of this CPU from /proc/cpuinfo, ("unknown", "") where it cannot be read: the one
    reader of it (kernel cache keys, the bf16 default, the benchmarks' machine line)."""
    model, flags = "unknown", ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = line
                if model != "unknown" and flags:
                    break
    except OSError:
        pass
    return model, flags


def cpu_flags() -> str:
    """This CPU's feature-flags line (/proc/cpuinfo), part of every cache key."""
    return cpu_info()[1]


def cpu_flag_set() -> frozenset[str]:
    """This CPU's feature flags (avx2, avx512_bf16, amx_tile, ...); empty where /proc/cpuinfo cannot be read."""
    return frozenset(cpu_flags().partition(":")[2].split())


def _openmp_runtimes() -> set[str]:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="ignore") as f:
            return {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    except OSError:
        return set()


def _build(source: str, flags: Sequence[str], target: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise NativeBuildError("no C compiler (gcc or cc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / (target.stem + ".c")
        src.write_text(source)
        so = Path(tmp) / target.name
        try:
            subprocess.run([cc, *flags, "-o", str(so), str(src)], check=True, capture_output=True, timeout=300)
        except subprocess.CalledProcessError as e:
            raise NativeBuildError(f"{cc} failed: {e.stderr.decode(errors='replace')[-800:]}") from e
        except subprocess.SubprocessError as e:
            raise NativeBuildError(f"{cc} failed: {e}") from e
        os.replace(so, target)  # atomic: a concurrent builder sees the whole file or none


def build_and_load(name: str, source: str, flags: Sequence[str] = NATIVE_FLAGS,
                   directory: Optional[Path] = None) -> ctypes.CDLL:
    """The compiled `source` as a loaded library, built on first use (cached per machine) in `directory`
    (default `cache_dir()`, the one the engine named; the LoRA kernel's loader passes the engine's kernel cache)."""
    flags = tuple(flags)
    digest = hashlib.sha256("\0".join([source, *flags, cpu_flags(), torch.__version__]).encode()).hexdigest()
    directory = Path(directory).expanduser() if directory is not None else cache_dir()
    target = directory / f"{name}_{digest[:16]}.so"
    if not target.exists() and unwritable_reason(directory) is not None:
        target = _private_fallback() / target.name
        if directory not in _warned_fallback:
            _warned_fallback.add(directory)
            log.warning("kernel cache %s cannot be written: CPU kernels are built into %s instead (point "
                        "--kernel-cache or LORASERVE_KERNEL_CACHE at a writable directory to keep them)",
                        directory, target.parent)
    try:
        if not target.exists():
            _build(source, flags, target)
        before = _openmp_runtimes()
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        raise NativeBuildError(f"cannot load {target}: {e}") from e
    if before and _openmp_runtimes() - before:
        raise NativeBuildError(f"{target.name} loaded a second OpenMP runtime beside torch's "
                               f"({sorted(_openmp_runtimes())})")
    return lib
