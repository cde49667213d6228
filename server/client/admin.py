"""`loraserve adapters ...`: the operator's client for the Adapters service."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import grpc
from google.protobuf import json_format

from server.api.gen.loraserve.v1 import adapters_pb2 as pb
from server.api.gen.loraserve.v1 import adapters_pb2_grpc as pb_grpc
from server.client.routing import routing_metadata

CHUNK_BYTES = 1 << 20  # well under the server's per-message limit
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("LORASERVE_TARGET", "127.0.0.1:50051"),
                   help="server HOST:PORT [env LORASERVE_TARGET, default 127.0.0.1:50051]")
    p.add_argument("--api-key", default=os.environ.get("LORASERVE_API_KEY", ""),
                   help="API key sent as 'authorization: Bearer KEY' [env LORASERVE_API_KEY]")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the call is abandoned")


def metadata(api_key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {api_key}")] if api_key else []


def upload_requests(name: str, adapter_dir: Path, meta: dict[str, str], tenant: str = "",
                    chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.RegisterAdapterRequest]:
    """Header with the config, then the safetensors file in chunks (never read whole into memory)."""
    weights = adapter_dir / WEIGHTS_NAME
    header = pb.RegisterAdapterHeader(name=name, adapter_config_json=(adapter_dir / CONFIG_NAME).read_text(),
                                      metadata=meta, total_size=weights.stat().st_size, tenant=tenant)
    yield pb.RegisterAdapterRequest(header=header)
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            yield pb.RegisterAdapterRequest(chunk=block)


def register(stub: pb_grpc.AdaptersStub, name: str, path: Path, meta: dict[str, str], server_path: bool,
             tenant: str = "", md: Optional[list] = None, timeout: Optional[float] = None) -> pb.RegisterAdapterResponse:
    if server_path:
        reqs: Any = iter([pb.RegisterAdapterRequest(header=pb.RegisterAdapterHeader(
            name=name, server_path=str(path), metadata=meta, tenant=tenant))])
    else:
        for f in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / f).is_file():
                raise SystemExit(f"error: {path} has no {f}; expected a PEFT adapter directory "
                                 "(a .bin adapter must be converted to safetensors first)")
        reqs = upload_requests(name, path, meta, tenant)
    return stub.RegisterAdapter(reqs, metadata=md, timeout=timeout)


def _print(msg: Any) -> None:
    print(json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), indent=2))


def build_parser(prog: str = "loraserve adapters") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Manage adapters on a running loraserve server.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        add_connection_flags(sp)
        sp.add_argument("--tenant", default="", help="admin only: act for this tenant")
        return sp

    r = cmd("register", "register a PEFT adapter directory as a new version of NAME")
    r.add_argument("name")
    r.add_argument("path", type=Path, help="PEFT directory (adapter_config.json + adapter_model.safetensors)")
    r.add_argument("--server-path", action="store_true",
                   help="PATH is on the server (inside an --import-dir); do not upload")
    r.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="provenance metadata")
    cmd("list", "list adapters and their versions")
    g = cmd("get", "show one adapter (name) or one version (name@N)")
    g.add_argument("adapter_id")
    ld = cmd("load", "bring a version onto the device now")
    ld.add_argument("adapter_id")
    ld.add_argument("--pin", action="store_true", help="keep it on the device until unloaded")
    u = cmd("unload", "unpin and drop a version from the device (it stays registered)")
    u.add_argument("adapter_id")
    d = cmd("delete", "delete one version (name@N) or all versions (name); refused while pinned")
    d.add_argument("adapter_id")
    return p


def main(argv: Optional[list[str]] = None, prog: str = "loraserve adapters") -> int:
    args = build_parser(prog).parse_args(argv)
    # Through a fleet's proxy, admin calls about one adapter reach the replica that serves it.
    md = metadata(args.api_key) + routing_metadata(getattr(args, "adapter_id", "") or getattr(args, "name", ""))
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.AdaptersStub(channel)
        try:
            if args.cmd == "register":
                meta = {}
                for kv in args.meta:
                    k, sep, v = kv.partition("=")
                    if not sep:
                        raise SystemExit(f"error: --meta {kv!r}: expected KEY=VALUE")
                    meta[k] = v
                _print(register(stub, args.name, args.path, meta, args.server_path, args.tenant, md, args.timeout))
            elif args.cmd == "list":
                _print(stub.ListAdapters(pb.ListAdaptersRequest(tenant=args.tenant), metadata=md,
                                         timeout=args.timeout))
            elif args.cmd == "get":
                _print(stub.GetAdapter(pb.GetAdapterRequest(adapter_id=args.adapter_id, tenant=args.tenant),
                                       metadata=md, timeout=args.timeout))
            elif args.cmd == "load":
                _print(stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id=args.adapter_id, pin=args.pin,
                                                              tenant=args.tenant), metadata=md, timeout=args.timeout))
            elif args.cmd == "unload":
                _print(stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=args.adapter_id, tenant=args.tenant),
                                          metadata=md, timeout=args.timeout))
            elif args.cmd == "delete":
                _print(stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id=args.adapter_id, tenant=args.tenant),
                                          metadata=md, timeout=args.timeout))
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0
