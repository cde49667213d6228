"""Where loraserve keeps its files: one answer for the server, the trainer, the benchmarks and the tests.

The home holds `models/` (converted base models, file digests), `kernels/` (the
compiled CPU LoRA kernel) and, unless `--registry` says otherwise, `registry/`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union

HOME_ENV = "LORASERVE_HOME"
DEFAULT_HOME = "~/.cache/loraserve"


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
