"""Compiled CPU kernels: one cache a process, named by the engine's configuration, and a build that still
succeeds where that cache cannot be written."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.core import native
from server.core.engine_config import EngineConfig
from server.core.paths import resolve_kernel_cache

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ("context_attention", "cpu_glue", "decode_attention", "fused_decode", "int8_dynamic", "lora_cpu")
SOURCE = "int answer(void) { return 42; }\n"


def test_kernel_cache_resolution(tmp_path: Path) -> None:
    env = {"LORASERVE_HOME": str(tmp_path / "env-home")}
    assert resolve_kernel_cache(env=env) == tmp_path / "env-home" / "kernels"
    assert resolve_kernel_cache(home=tmp_path / "h", env=env) == tmp_path / "h" / "kernels"
    env["LORASERVE_KERNEL_CACHE"] = str(tmp_path / "shared")
    assert resolve_kernel_cache(home=tmp_path / "h", env=env) == tmp_path / "shared"  # machine-wide, over any home
    assert resolve_kernel_cache(tmp_path / "flag", tmp_path / "h", env) == tmp_path / "flag"
    assert EngineConfig(home=str(tmp_path / "h"), kernel_cache=str(tmp_path / "k")).resolve_kernel_cache() == \
        tmp_path / "k"


def test_an_engine_builds_every_kernel_in_its_own_homes_cache(tiny_dir, tmp_path):
    """`--home` alone (no LORASERVE_HOME) used to send the LoRA kernel there and the others to ~/.cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
    env["HOME"] = str(tmp_path / "user")
    home = tmp_path / "home"
    code = ("from server.core.engine_config import EngineConfig\nfrom server.engine.engine import Engine\n"
            "from server.engine.types import SamplingParams\n"
            f"e = Engine.from_config(EngineConfig(model={str(tiny_dir)!r}, quantize='int8', device='cpu', "
            f"home={str(home)!r}))\n"
            "e.start()\nprint(e.generate([1, 2, 3, 4], SamplingParams(max_new_tokens=3, ignore_eos=True)))\n"
            "e.shutdown()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    built = sorted(p.name.rsplit("_", 1)[0] for p in (home / "kernels").glob("*.so"))
    assert built == sorted(KERNELS)
    assert not list((tmp_path / "user").rglob("*.so")), "a kernel was built outside the engine's home"


def test_a_read_only_cache_builds_into_a_private_directory(tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    caplog.set_level(logging.WARNING, logger="server.core.native")
    lib = native.build_and_load(f"probe_{tmp_path.name}", SOURCE, ("-O1", "-shared", "-fPIC"),
                                directory=blocked / "kernels")
    assert lib.answer() == 42
    assert "cannot be written" in caplog.text and "--kernel-cache" in caplog.text
    private = list(native._private_fallback().glob(f"probe_{tmp_path.name}_*.so"))
    assert len(private) == 1 and (private[0].parent.stat().st_mode & 0o077) == 0
    for p in private:
        p.unlink()


def test_a_fallback_someone_else_may_write_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path))
    shared = tmp_path / f"loraserve-kernels-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant a library here
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with pytest.raises(native.NativeBuildError, match="not a private directory"):
        native.build_and_load("probe", SOURCE, ("-O1", "-shared", "-fPIC"), directory=blocked / "kernels")
