"""TLS and mutual TLS for the server's listeners, with certificates re-read on SIGHUP.

`--tls-cert` / `--tls-key` are the server's PEM certificate chain and private key; `--tls-client-ca`
turns on mutual TLS: a client must present a certificate that CA signed, or the handshake fails.

Rotation without dropping connections: `reload()` re-reads the three files, checks them (the key
must match the certificate) and, only if they are good, makes them the material for *new*
handshakes; established connections keep the session they negotiated. A bad file is refused with
a message and the old material stays in use. Turning mutual TLS on or off needs a restart;
rotating the client CA does not.

- gRPC: `grpc_credentials()` builds dynamic SSL credentials whose certificate-config fetcher gRPC
  calls at each new handshake; it hands over the material reloaded since the last call.
- HTTP listeners (the OpenAI-compatible API under uvicorn, /metrics): `ssl_context()` is one
  `ssl.SSLContext` per listener whose SNI callback (called for every ClientHello, SNI or not)
  switches the handshake to a context built from the current material.
"""
from __future__ import annotations

import hashlib
import logging
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import grpc

from server.core.errors import InvalidRequestError

log = logging.getLogger("loraserve.tls")


@dataclass(frozen=True)
class TlsMaterial:
    """One consistent read of the certificate files (the bytes every listener is built from)."""

    cert_chain: bytes
    key: bytes
    client_ca: Optional[bytes]
    fingerprint: str  # sha256 of the leaf certificate (DER), as `openssl x509 -fingerprint -sha256` prints it

    def ssl_context(self, alpn_protocols: Sequence[str] = ()) -> ssl.SSLContext:
        """A server-side context from these bytes (TLS 1.2+; client certificates required for mutual TLS)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # load_cert_chain reads files only: the bytes go through a private directory that lives for this call.
        with tempfile.TemporaryDirectory(prefix="loraserve-tls-") as d:
            cert, key = Path(d) / "cert.pem", Path(d) / "key.pem"
            cert.write_bytes(self.cert_chain)
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self.key)
            ctx.load_cert_chain(cert, key)
        if self.client_ca is not None:
            ctx.load_verify_locations(cadata=self.client_ca.decode("ascii", "replace"))
            ctx.verify_mode = ssl.CERT_REQUIRED
        if alpn_protocols:
            ctx.set_alpn_protocols(list(alpn_protocols))
        return ctx

    def grpc_config(self) -> Any:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert_chain)],
                                                         root_certificates=self.client_ca)


def _read(path: str, what: str, flag: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise InvalidRequestError(flag, f"cannot read the {what} {path!r}: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise InvalidRequestError(flag, f"{path!r} is not PEM (no '-----BEGIN' line); expected the {what}")
    return data


def read_material(cert_path: str, key_path: str, client_ca_path: str = "") -> TlsMaterial:
    """Read and check the files: PEM, the key matches the certificate, the CA bundle parses."""
    chain = _read(cert_path, "certificate chain", "tls_cert")
    key = _read(key_path, "private key", "tls_key")
    ca = _read(client_ca_path, "client CA bundle", "tls_client_ca") if client_ca_path else None
    try:
        leaf = ssl.PEM_cert_to_DER_cert(chain.decode("ascii").split("-----END CERTIFICATE-----")[0]
                                        + "-----END CERTIFICATE-----\n")
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("tls_cert", f"{cert_path!r} holds no PEM certificate") from None
    material = TlsMaterial(chain, key, ca, hashlib.sha256(leaf).hexdigest())
    try:
        material.ssl_context()
    except ssl.SSLError as e:
        reason = getattr(e, "reason", None) or str(e)
        hint = " (the key does not belong to the certificate)" if "MISMATCH" in str(reason).upper() else ""
        raise InvalidRequestError("tls", f"{cert_path!r} / {key_path!r}"
                                  f"{' / ' + repr(client_ca_path) if client_ca_path else ''}: {reason}{hint}") from None
    return material


class ServerTls:
    """The server's TLS material, shared by every listener, reloadable in place."""

    def __init__(self, cert_path: str, key_path: str, client_ca_path: str = ""):
        self.cert_path, self.key_path, self.client_ca_path = cert_path, key_path, client_ca_path
        self.mutual = bool(client_ca_path)
        self._lock = threading.Lock()
        self._material = read_material(cert_path, key_path, client_ca_path)
        self._pending_grpc: Optional[Any] = None       # handed to gRPC at its next handshake
        self._contexts: dict[tuple[str, ...], ssl.SSLContext] = {}  # current context per ALPN list
        self.reloads = 0

    @classmethod
    def from_config(cls, server_cfg: Any) -> Optional["ServerTls"]:
        """None when --tls-cert is not set (plaintext listeners)."""
        if not server_cfg.tls_cert:
            return None
        return cls(server_cfg.tls_cert, server_cfg.tls_key, server_cfg.tls_client_ca)

    @property
    def fingerprint(self) -> str:
        return self._material.fingerprint

    # ---- gRPC ------------------------------------------------------------------------------------
    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._material.grpc_config(), self._fetch_grpc_config,
                                                   require_client_authentication=self.mutual)

    def _fetch_grpc_config(self) -> Optional[Any]:
        """gRPC's fetcher, called at each new handshake: new material once after a reload, else None (unchanged)."""
        with self._lock:
            config, self._pending_grpc = self._pending_grpc, None
        return config

    # ---- HTTP listeners --------------------------------------------------------------------------
    def ssl_context(self, alpn_protocols: Sequence[str] = ()) -> ssl.SSLContext:
        """The context to hand an HTTPS listener; every handshake switches to the current material."""
        alpn = tuple(alpn_protocols)
        front = self._material.ssl_context(alpn)
        with self._lock:
            self._contexts.setdefault(alpn, self._material.ssl_context(alpn))

        def use_current(sslobj: ssl.SSLObject, server_name: Optional[str], _ctx: ssl.SSLContext) -> None:
            with self._lock:
                sslobj.context = self._contexts[alpn]

        front.sni_callback = use_current
        return front

    # ---- rotation --------------------------------------------------------------------------------
    def reload(self) -> TlsMaterial:
        """Re-read the files (SIGHUP). Raises InvalidRequestError and keeps the old material if they are bad."""
        material = read_material(self.cert_path, self.key_path, self.client_ca_path)
        with self._lock:
            alpns = list(self._contexts)
        contexts = {alpn: material.ssl_context(alpn) for alpn in alpns}
        with self._lock:
            self._material = material
            self._pending_grpc = material.grpc_config()
            self._contexts.update(contexts)
            self.reloads += 1
        return material

    def describe(self) -> dict[str, Any]:
        return {"cert": self.cert_path, "client_ca": self.client_ca_path or None, "mutual_tls": self.mutual,
                "fingerprint_sha256": self.fingerprint}
