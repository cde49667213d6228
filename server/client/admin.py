"""`loraserve adapters ...`: the operator's client for the Adapters service.

People get a table (list, get) or one line (register, load, unload, delete); `-o json` prints the
server's record as proto3 JSON for scripts. Errors go to stderr with the gRPC status, exit code 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import grpc
from google.protobuf.message import Message

from server.api.gen.loraserve.v1 import adapters_pb2 as pb
from server.api.gen.loraserve.v1 import adapters_pb2_grpc as pb_grpc
from server.client import adapter_views as views
from server.client.channel import ClientTls, add_tls_flags, open_channel
from server.client.render import add_output_flags, print_json
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
    add_tls_flags(p)


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
        if not path.is_dir():
            raise SystemExit(f"error: {path} {'is not a directory' if path.exists() else 'does not exist'}; "
                             "expected a PEFT adapter directory")
        for f in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / f).is_file():
                raise SystemExit(f"error: {path} has no {f}; expected a PEFT adapter directory "
                                 "(a .bin adapter must be converted to safetensors first)")
        reqs = upload_requests(name, path, meta, tenant)
    return stub.RegisterAdapter(reqs, metadata=md, timeout=timeout)


def _show(output: str, record: Message, human: Callable[[bool], str]) -> None:
    """The record as JSON (`-o json`), else what `human(wide)` makes of it for a person."""
    if output == "json":
        print_json(record)
    else:
        print(human(output == "wide"))


def build_parser(prog: str = "loraserve adapters") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Manage adapters on a running loraserve server.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        add_connection_flags(sp)
        sp.add_argument("--tenant", default="", help="admin only: act for this tenant")
        add_output_flags(sp)
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
    with open_channel(args.target, ClientTls.from_args(args)) as channel:
        stub = pb_grpc.AdaptersStub(channel)
        try:
            if args.cmd == "register":
                meta = {}
                for kv in args.meta:
                    k, sep, v = kv.partition("=")
                    if not sep:
                        raise SystemExit(f"error: --meta {kv!r}: expected KEY=VALUE")
                    meta[k] = v
                resp = register(stub, args.name, args.path, meta, args.server_path, args.tenant, md, args.timeout)
                _show(args.output, resp, lambda wide: views.registered_line(resp))
            elif args.cmd == "list":
                listed = stub.ListAdapters(pb.ListAdaptersRequest(tenant=args.tenant), metadata=md,
                                           timeout=args.timeout)
                _show(args.output, listed, lambda wide: views.adapters_table(listed, wide, args.tenant))
            elif args.cmd == "get":
                info = stub.GetAdapter(pb.GetAdapterRequest(adapter_id=args.adapter_id, tenant=args.tenant),
                                       metadata=md, timeout=args.timeout)
                _show(args.output, info, lambda wide: views.versions_table(info, wide))
            elif args.cmd == "load":
                loaded = stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id=args.adapter_id, pin=args.pin,
                                                                tenant=args.tenant), metadata=md, timeout=args.timeout)
                _show(args.output, loaded, lambda wide: views.loaded_line(loaded))
            elif args.cmd == "unload":
                unloaded = stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=args.adapter_id, tenant=args.tenant),
                                              metadata=md, timeout=args.timeout)
                _show(args.output, unloaded, lambda wide: views.unloaded_line(unloaded))
            elif args.cmd == "delete":
                deleted = stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id=args.adapter_id, tenant=args.tenant),
                                             metadata=md, timeout=args.timeout)
                _show(args.output, deleted, lambda wide: views.deleted_line(args.adapter_id, deleted))
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0
