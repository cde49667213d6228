"""Write a trained adapter as a standard PEFT directory, with provenance, a report and a loss curve.

The directory is what `PeftModel.from_pretrained` and loraserve both read:
adapter_config.json + adapter_model.safetensors. Provenance (base-model fingerprint,
data digests, hyperparameters, final metrics, loraserve version) travels inside the
safetensors header, so it survives copying the weights file alone; report.json holds
the same plus the full loss history for people and tools.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
REPORT_NAME = "report.json"
CURVE_NAME = "loss_curve.png"
PROVENANCE_KEY = "loraserve.provenance"


def loraserve_version() -> str:
    try:
        return importlib.metadata.version("loraserve")
    except importlib.metadata.PackageNotFoundError:
        pass
    # Running from a source tree that was never pip-installed: read the version it declares.
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_safe(x: Any) -> Any:
    """Floats that JSON cannot hold (NaN, inf) become null rather than invalid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(path: Path, data: Any) -> None:
    _atomic_write_bytes(Path(path), (json.dumps(_json_safe(data), indent=2, sort_keys=True) + "\n").encode())


def save_adapter(out_dir: Path, peft_config: Any, tensors: Mapping[str, torch.Tensor],
                 provenance: Mapping[str, Any]) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (with provenance metadata) into out_dir.

    `tensors` are PEFT state-dict names (`base_model.model....lora_A.weight`), as
    `peft.get_peft_model_state_dict` returns them.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prov = _json_safe(dict(provenance))
    metadata = {"format": "pt", PROVENANCE_KEY: json.dumps(prov, sort_keys=True)}
    # Flat copies of the most asked-for fields, readable without parsing JSON.
    for key in ("base_model_fingerprint", "loraserve_version", "train_data_sha256"):
        if prov.get(key) is not None:
            metadata[f"loraserve.{key}"] = str(prov[key])
    weights = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = out_dir / f".{WEIGHTS_NAME}.tmp"
    save_file(weights, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / WEIGHTS_NAME)
    cfg = peft_config.to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    write_json(out_dir / CONFIG_NAME, cfg)
    return out_dir


def read_provenance(adapter_dir: Path) -> dict[str, Any]:
    """The provenance dict stored in an adapter's safetensors header ({} if none)."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata() or {}
    raw = meta.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def plot_loss_curve(history: list[dict[str, Any]], path: Path, title: str = "") -> Optional[Path]:
    """Training loss per step (and eval loss where measured) as a PNG; None when nothing to plot."""
    train = [(h["step"], h["loss"]) for h in history if h.get("kind") == "train"]
    evals = [(h["step"], h["eval_loss"]) for h in history if h.get("kind") == "eval"]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if train:
            ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1)
        if evals:
            ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title or "loraserve trainer")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return Path(path)
