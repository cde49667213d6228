"""llama.cpp as built by `make llama-server`: where it lives, its commit, GGUF conversion, a llama-server process.

The build (Makefile `llama-server`) unpacks the llama-cpp-python sdist into build/llama.cpp/ and compiles its
vendored llama.cpp's `llama-server` there; this module only finds and runs what that produced. Conversion uses
the vendored `convert_hf_to_gguf.py` and `convert_lora_to_gguf.py` with the vendored gguf-py; the one package
those scripts import that the project's venv lacks (sentencepiece, imported even for BPE tokenizers) is
installed by the build into build/llama.cpp/pydeps, never into the venv. Converted files are cached under
build/llama.cpp/gguf/, keyed by what they were made from.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from server.client.local_server import stop_process

REPO = Path(__file__).resolve().parents[1]
LLAMA_DIR = REPO / "build" / "llama.cpp"
SDIST_VERSION = "0.3.36"  # the Makefile's LLAMA_CPP_PYTHON
MODEL_OUTTYPE = "q8_0"     # the GGUF quantization comparable to loraserve's int8 base
LORA_OUTTYPE = "f16"       # 16-bit adapter weights, as loraserve's bf16 LoRA copies on CPU

BUILD_HINT = "build it with `nice -n 19 make llama-server` (docs/benchmarks.md)"


class NotBuilt(RuntimeError):
    """llama-server (or the llama.cpp source it came from) is not where `make llama-server` puts it."""


@dataclass(frozen=True)
class LlamaCpp:
    """One `make llama-server` build: the unpacked source and the binary."""

    root: Path = LLAMA_DIR
    version: str = SDIST_VERSION

    @property
    def src(self) -> Path:
        return self.root / f"llama_cpp_python-{self.version}" / "vendor" / "llama.cpp"

    @property
    def server_bin(self) -> Path:
        return self.root / "build" / "bin" / "llama-server"

    @property
    def pydeps(self) -> Path:
        return self.root / "pydeps"

    @property
    def cache(self) -> Path:
        return self.root / "gguf"

    def check(self) -> None:
        missing = [p for p in (self.server_bin, self.src / "convert_hf_to_gguf.py",
                               self.src / "convert_lora_to_gguf.py", self.pydeps / ".installed") if not p.exists()]
        if missing:
            shown = [str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in missing]
            raise NotBuilt(f"llama-server is not built ({', '.join(shown)} missing); {BUILD_HINT}")

    def commit(self) -> str:
        """The vendored llama.cpp's commit, as the sdist's git metadata records it."""
        head = self.root / f"llama_cpp_python-{self.version}" / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
        return head.read_text().strip()

    def version_line(self) -> str:
        """What `llama-server --version` says (build, commit, compiler)."""
        done = subprocess.run([str(self.server_bin), "--version"], capture_output=True, text=True, timeout=60)
        return " ".join((done.stdout + done.stderr).split())

    def build_settings(self) -> dict[str, str]:
        """The cmake cache entries that decide speed (what `make llama-server` configured)."""
        keep = ("CMAKE_BUILD_TYPE", "GGML_NATIVE", "BUILD_SHARED_LIBS", "GGML_OPENMP", "GGML_AVX2",
                "GGML_LLAMAFILE", "CMAKE_C_COMPILER", "CMAKE_CXX_COMPILER")
        out: dict[str, str] = {}
        cache = self.root / "build" / "CMakeCache.txt"
        if cache.is_file():
            for line in cache.read_text(errors="replace").splitlines():
                key, _, value = line.partition("=")
                name = key.split(":")[0]
                if name in keep:
                    out[name] = value
        return out

    def _convert(self, script: str, args: Sequence[str], out: Path) -> Path:
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.src / "gguf-py"), str(self.pydeps)]),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        done = subprocess.run([sys.executable, str(self.src / script), *args, "--outfile", str(tmp)], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0 or not tmp.is_file():
            raise RuntimeError(f"{script} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        tmp.rename(out)
        return out

    def convert_model(self, model_dir: Path) -> Path:
        """The HF model directory as a Q8_0 GGUF (cached by the weights' digest)."""
        key = _digest(model_dir / "model.safetensors", model_dir / "config.json")
        return self._convert("convert_hf_to_gguf.py", ["--outtype", MODEL_OUTTYPE, str(model_dir)],
                             self.cache / f"{model_dir.name}-{key}.{MODEL_OUTTYPE}.gguf")

    def convert_adapter(self, adapter_dir: Path, model_dir: Path) -> Path:
        """A PEFT adapter directory as a GGUF LoRA for the model (cached by the adapter's weights' digest)."""
        key = _digest(adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_config.json")
        return self._convert("convert_lora_to_gguf.py",
                             ["--outtype", LORA_OUTTYPE, "--base", str(model_dir), str(adapter_dir)],
                             self.cache / "lora" / f"{adapter_dir.name}-{key}.{LORA_OUTTYPE}.gguf")


def _digest(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


class LlamaServer:
    """A `llama-server` child process on a free loopback port; its log kept in `<workdir>/llama-server.log`."""

    def __init__(self, build: LlamaCpp, args: Sequence[str], workdir: Path, port: int):
        self.args = [str(build.server_bin), "--host", "127.0.0.1", "--port", str(port), *args]
        self.port = port
        self.log_path = Path(workdir) / "llama-server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Until /health answers 200 (it answers 503 while the model loads)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}); see {self.log_path}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"llama-server not ready after {timeout:.0f} s; see {self.log_path}")

    def lora_adapters(self) -> list[dict]:
        """What llama-server says it loaded: [{id, path, scale}, ...]."""
        with urllib.request.urlopen(f"{self.base_url}/lora-adapters", timeout=30) as r:
            return json.loads(r.read())

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        code = stop_process(self.proc, timeout)
        self._log.close()
        return code


__all__ = ["LlamaCpp", "LlamaServer", "NotBuilt"]
