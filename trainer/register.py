"""Upload a trained adapter to a running loraserve server (Adapters.RegisterAdapter).

The call is client-streamed: a header with the adapter config and provenance, then
the safetensors bytes in chunks, so a large adapter is never held in memory whole.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from server.core.errors import LoraServeError
from trainer.export import CONFIG_NAME, WEIGHTS_NAME, read_provenance

CHUNK_BYTES = 1 << 20
# Provenance fields copied into the registry's metadata map (values must be strings there).
_META_FIELDS = ("base_model", "base_model_fingerprint", "train_data_sha256", "eval_data_sha256",
                "loraserve_version", "created_unix")


class RegistrationError(LoraServeError):
    """The server refused the adapter or could not be reached; the message carries its reason."""


@dataclass
class Registered:
    adapter_id: str  # "name@version"
    name: str
    version: int
    digest: str


def registry_metadata(provenance: Mapping[str, Any]) -> dict[str, str]:
    meta = {k: str(provenance[k]) for k in _META_FIELDS if provenance.get(k) is not None}
    metrics = provenance.get("metrics") or {}
    for k in ("eval_loss", "eval_ppl", "train_loss_last10", "steps"):
        if metrics.get(k) is not None:
            meta[f"metrics.{k}"] = f"{metrics[k]:.6g}" if isinstance(metrics[k], float) else str(metrics[k])
    hyper = provenance.get("hyperparameters") or {}
    if hyper:
        meta["hyperparameters"] = json.dumps(hyper, sort_keys=True)
    return meta


def _requests(pb, name: str, adapter_dir: Path, meta: dict[str, str]) -> Iterator[Any]:
    weights = adapter_dir / WEIGHTS_NAME
    header = pb.RegisterAdapterHeader(name=name, adapter_config_json=(adapter_dir / CONFIG_NAME).read_text(),
                                      metadata=meta, total_size=weights.stat().st_size)
    yield pb.RegisterAdapterRequest(header=header)
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            yield pb.RegisterAdapterRequest(chunk=block)


def register_adapter(adapter_dir: Path, target: str, name: str, api_key: str = "",
                     timeout: Optional[float] = 300.0, tls: Optional[Any] = None) -> Registered:
    """Register `adapter_dir` as a new version of `name` on the server at `target` (HOST:PORT).

    `tls`: a `server.client.channel.ClientTls` for a TLS or mutual-TLS server (None: plaintext).
    """
    import grpc

    from server.api.gen.loraserve.v1 import adapters_pb2 as pb
    from server.api.gen.loraserve.v1 import adapters_pb2_grpc as pb_grpc
    from server.client.channel import open_channel

    adapter_dir = Path(adapter_dir)
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        if not (adapter_dir / f).is_file():
            raise RegistrationError(f"{adapter_dir} has no {f}: not a trained adapter directory")
    meta = registry_metadata(read_provenance(adapter_dir))
    from server.client.routing import routing_metadata

    # Through a fleet's proxy, the upload lands on the replica that will serve `name` (its host cache is warmed).
    md = ([("authorization", f"Bearer {api_key}")] if api_key else []) + routing_metadata(name)
    with open_channel(target, tls) as channel:
        stub = pb_grpc.AdaptersStub(channel)
        try:
            resp = stub.RegisterAdapter(_requests(pb, name, adapter_dir, meta), metadata=md, timeout=timeout)
        except grpc.RpcError as e:
            raise RegistrationError(f"registering {name!r} at {target} failed: "
                                    f"{e.code().name}: {e.details()}") from e
    return Registered(resp.adapter_id, resp.name, resp.version.version, resp.version.digest)
