"""Fixtures that start the real `loraserve serve` process on loopback and talk gRPC to it.

`start_server(...)` is the one way tests launch a server (the registry tests reuse it):
port 0 for gRPC, HTTP and /metrics, the ports read back from the server's JSON "listening"
log line, readiness from its "serving" line, stderr kept for assertions and failures.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import grpc
import pytest

from server.core.paths import KERNEL_CACHE_ENV, resolve_kernel_cache
from server.fleet.replica import metric_value

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = float(os.environ.get("LORASERVE_TEST_START_TIMEOUT", "300"))


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    registry_dir: Path
    lines: list[dict] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    port: int = 0
    metrics_port: int = 0
    http_port: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API's root (`/v1` appended for clients)."""
        return f"http://127.0.0.1:{self.http_port}"

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.raw.append(line.rstrip("\n"))
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = None
                if isinstance(rec, dict):
                    self.lines.append(rec)
                    if rec.get("event") == "listening":
                        self.port = int(rec["grpc_port"])
                        self.metrics_port = int(rec.get("metrics_port") or 0)
                        self.http_port = int(rec.get("http_port") or 0)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[dict], bool], timeout: float = START_TIMEOUT_S, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for rec in self.lines[seen:]:
                    if pred(rec):
                        return rec
                seen = len(self.lines)
                if self.proc.poll() is not None and seen == len(self.lines):
                    raise AssertionError(f"server exited ({self.proc.returncode}) before {what}:\n" + self.log_tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}:\n" + self.log_tail())
                self._cond.wait(min(left, 0.5))

    def wait_event(self, event: str, timeout: float = START_TIMEOUT_S) -> dict:
        return self.wait_for(lambda r: r.get("event") == event, timeout, f"event {event!r}")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.raw[-n:])

    def request_lines(self) -> list[dict]:
        with self._cond:
            return [r for r in self.lines if r.get("event") == "request"]

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, labels: Optional[dict[str, str]] = None) -> float:
        """The value of one sample in /metrics (0 when absent, as an unmoved counter would be)."""
        return parse_metric(self.metrics_text(), name, labels)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def parse_metric(text: str, name: str, labels: Optional[dict[str, str]] = None) -> float:
    """The sum of the samples of `name` whose labels include `labels` (what the fleet's router reads)."""
    return metric_value(text, name, labels)


def server_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2")})
    for k in [k for k in env if k.startswith("LORASERVE_") and k != "LORASERVE_HOME"]:
        del env[k]  # a developer's shell must not change what the tests start
    # Every server of the run finds the kernels this process's tests build: a fresh home compiles none.
    env[KERNEL_CACHE_ENV] = str(resolve_kernel_cache())
    env.update(extra or {})
    return env


def start_server(tmp_dir: Path, *args: str, env: Optional[dict[str, str]] = None, wait_serving: bool = True,
                 timeout: float = START_TIMEOUT_S) -> ServerProcess:
    """Start `python -m server.cli serve` on free loopback ports with its own registry dir."""
    registry = Path(tmp_dir) / "registry"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--http-port", "0", "--metrics-port", "0", "--registry", str(registry), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=server_env(env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    sp = ServerProcess(proc, registry)
    threading.Thread(target=sp._pump, daemon=True).start()
    try:
        sp.wait_event("listening", timeout)
        if wait_serving:
            sp.wait_event("serving", timeout)
    except BaseException:
        sp.stop(10)
        raise
    return sp


def start_refused(*args: str) -> str:
    """Run `python -m server.cli serve ARGS` to its end, which must be a refused start-up: exit code 2, a
    `start_failed` line, no traceback. Returns the log from that line on (the error says what to fix)."""
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", *args], cwd=REPO, env=server_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "start_failed" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr.split("start_failed", 1)[1]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from server.core.paths import resolve_home
    from server.model.loader import resolve_model

    return resolve_model("default", resolve_home())


def make_peft_adapter(model_dir: Path, out: Path, r: int, targets: list[str], alpha: int, seed: int,
                      b_scale: float = 0.15, use_rslora: bool = False) -> Path:
    """A random PEFT LoRA adapter for the model, saved by PEFT itself.

    B is scaled down so the adapter changes the output without pushing it into
    near-ties that fp32 summation order could flip.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                     use_rslora=use_rslora, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def peft_adapters(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small random adapters for SmolLM2 with different ranks, targets and scaling."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_peft_adapter(default_model_dir, root / "alpha", 8, ["q_proj", "v_proj", "down_proj"], 16, 1),
        "beta": make_peft_adapter(default_model_dir, root / "beta", 4, ["k_proj", "o_proj", "gate_proj", "up_proj"],
                                  8, 2, use_rslora=True),
    }


def peft_greedy(model_dir: Path, adapters: dict[str, Path], prompts: list[list[int]], max_new_tokens: int,
                eos_ids: set[int]) -> dict[str, list[list[int]]]:
    """Hugging Face PEFT greedy continuation of each prompt alone, per adapter ('' = base), EOS stripped."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = list(adapters)
    model: Any = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    out: dict[str, list[list[int]]] = {}
    with torch.no_grad():
        for name in ["", *names]:
            out[name] = []
            for ids in prompts:
                x = torch.tensor([ids])
                kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=next(iter(eos_ids)))
                if name:
                    model.set_adapter(name)
                    y = model.generate(input_ids=x, **kw)
                else:
                    with model.disable_adapter():
                        y = model.generate(input_ids=x, **kw)
                gen = y[0, len(ids):].tolist()
                while gen and gen[-1] in eos_ids:
                    gen.pop()
                out[name].append(gen)
    return out
