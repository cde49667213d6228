"""Where loraserve keeps its files: one answer for the server, the trainer, the benchmarks and the tests.

The home holds `models/` (converted base models, file digests), `kernels/` (the compiled CPU
kernels, unless `--kernel-cache` puts them elsewhere) and, unless `--registry` says otherwise,
`registry/`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union

HOME_ENV = "LORASERVE_HOME"
DEFAULT_HOME = "~/.cache/loraserve"
KERNEL_CACHE_ENV = "LORASERVE_KERNEL_CACHE"


def resolve_home(home: Union[str, os.PathLike, None] = None, env: Optional[Mapping[str, str]] = None) -> Path:
    """`home` when given, else $LORASERVE_HOME, else ~/.cache/loraserve.

    The server's config loader already puts `--home` or LORASERVE_HOME into `EngineConfig.home`
    (flags > env > TOML); the environment fallback here serves callers that build their settings
    in code (the trainer, benchmarks, test fixtures), so every process agrees on one directory.
    """
    if home:
        return Path(home).expanduser()
    env = os.environ if env is None else env
    return Path(env.get(HOME_ENV) or DEFAULT_HOME).expanduser()


def resolve_kernel_cache(kernel_cache: Union[str, os.PathLike, None] = None,
                         home: Union[str, os.PathLike, None] = None,
                         env: Optional[Mapping[str, str]] = None) -> Path:
    """Where compiled CPU kernels live: `kernel_cache` when given, else $LORASERVE_KERNEL_CACHE, else the
    home's `kernels/`. Kernels depend on the CPU, not on the home, so homes on one machine may share one."""
    env = os.environ if env is None else env
    chosen = kernel_cache or env.get(KERNEL_CACHE_ENV)
    return Path(chosen).expanduser() if chosen else resolve_home(home, env) / "kernels"


def unwritable_reason(path: Union[str, os.PathLike]) -> Optional[str]:
    """Why `path` cannot be (or become) a directory this user writes into, or None. Its nearest existing
    ancestor decides; nothing is created."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a directory"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} cannot be written"
    return None
