"""The one way our clients open a channel to a server: plaintext, TLS, or mutual TLS.

`generate`, `adapters`, `bench` (over gRPC and, with `--protocol http`, HTTPS) and the trainer's `--register`
all take the same flags:

    --tls                 use TLS, trusting the system's CAs
    --tls-ca FILE         use TLS, trusting this CA (PEM) for the server's certificate
    --tls-cert / --tls-key FILE   a client certificate and key (PEM) for mutual TLS
    --tls-server-name NAME        check the server's certificate for NAME instead of the target's host

Each has an environment variable (LORASERVE_TLS_CA, LORASERVE_CLIENT_CERT, LORASERVE_CLIENT_KEY,
LORASERVE_TLS_SERVER_NAME; LORASERVE_TLS=1), so a shell set up once serves every command.
"""
from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import grpc


@dataclass(frozen=True)
class ClientTls:
    """How to reach the server; all empty = plaintext."""

    enabled: bool = False
    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ClientTls":
        ca, cert, key = getattr(args, "tls_ca", ""), getattr(args, "tls_cert", ""), getattr(args, "tls_key", "")
        enabled = bool(getattr(args, "tls", False) or ca or cert)
        return cls(enabled, ca or "", cert or "", key or "", getattr(args, "tls_server_name", "") or "")

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise SystemExit("error: --tls-cert and --tls-key go together (the client certificate and its key)")
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca, "--tls-ca"),
                                            private_key=_read(self.key, "--tls-key"),
                                            certificate_chain=_read(self.cert, "--tls-cert"))

    def ssl_context(self) -> ssl.SSLContext:
        """The same trust and client certificate for an HTTPS client (the HTTP API: `bench --protocol http`)."""
        if bool(self.cert) != bool(self.key):
            raise SystemExit("error: --tls-cert and --tls-key go together (the client certificate and its key)")
        try:
            ctx = ssl.create_default_context(cafile=str(Path(self.ca).expanduser()) if self.ca else None)
            if self.cert:
                ctx.load_cert_chain(Path(self.cert).expanduser(), Path(self.key).expanduser())
        except (OSError, ssl.SSLError) as e:
            raise SystemExit(f"error: --tls-ca/--tls-cert/--tls-key: {e}") from None
        return ctx

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.enabled and self.server_name else []


def _read(path: str, flag: str) -> Optional[bytes]:
    if not path:
        return None
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise SystemExit(f"error: {flag} {path}: {e.strerror}") from None


def add_tls_flags(p: Any) -> None:
    """Add the TLS flags to a parser or argument group."""
    env = os.environ.get
    p.add_argument("--tls", action="store_true", default=env("LORASERVE_TLS", "") not in ("", "0", "false"),
                   help="use TLS, trusting the system's CAs [env LORASERVE_TLS=1]")
    p.add_argument("--tls-ca", default=env("LORASERVE_TLS_CA", ""), metavar="FILE",
                   help="use TLS and trust this CA (PEM) for the server's certificate [env LORASERVE_TLS_CA]")
    p.add_argument("--tls-cert", default=env("LORASERVE_CLIENT_CERT", ""), metavar="FILE",
                   help="client certificate (PEM) for mutual TLS [env LORASERVE_CLIENT_CERT]")
    p.add_argument("--tls-key", default=env("LORASERVE_CLIENT_KEY", ""), metavar="FILE",
                   help="private key (PEM) of --tls-cert [env LORASERVE_CLIENT_KEY]")
    p.add_argument("--tls-server-name", default=env("LORASERVE_TLS_SERVER_NAME", ""), metavar="NAME",
                   help="name the server's certificate must carry (default: the target's host) "
                        "[env LORASERVE_TLS_SERVER_NAME]")


def open_channel(target: str, tls: Optional[ClientTls] = None,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A blocking-API channel to `target` (HOST:PORT)."""
    tls = tls or ClientTls()
    opts = list(options) + tls.options()
    if tls.enabled:
        return grpc.secure_channel(target, tls.credentials(), options=opts)
    return grpc.insecure_channel(target, options=opts)


def open_aio_channel(target: str, tls: Optional[ClientTls] = None,
                     options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """The asyncio flavour of `open_channel`."""
    tls = tls or ClientTls()
    opts = list(options) + tls.options()
    if tls.enabled:
        return grpc.aio.secure_channel(target, tls.credentials(), options=opts)
    return grpc.aio.insecure_channel(target, options=opts)
