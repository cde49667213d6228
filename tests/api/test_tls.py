"""ServerTls without a server process: file checks, the gRPC fetcher's hand-over, and HTTPS contexts that
follow a reload for new handshakes only."""
from __future__ import annotations

import hashlib
import socket
import ssl
import threading

import pytest

from server.api.tls import ServerTls, read_material
from server.core.errors import InvalidRequestError
from tests.certs import issue, make_ca


@pytest.fixture
def pki(tmp_path):
    ca = make_ca()
    server = issue(ca, "loraserve")
    cert, key = server.write(tmp_path, "server")
    client_ca = make_ca("client CA")
    (tmp_path / "client_ca.pem").write_bytes(client_ca.cert_pem)
    return ca, server, cert, key, tmp_path


def test_bad_files_are_refused_by_name(pki):
    ca, _, cert, key, d = pki
    (d / "junk.pem").write_text("not a certificate")
    other_key = issue(ca, "other").write(d, "other")[1]
    cases = [((d / "nope.pem", key), "cannot read the certificate chain"),
             ((d / "junk.pem", key), "is not PEM"),
             ((cert, d / "junk.pem"), "is not PEM"),
             ((cert, other_key), "does not belong to the certificate")]
    for (c, k), says in cases:
        with pytest.raises(InvalidRequestError, match=says):
            read_material(str(c), str(k))
    with pytest.raises(InvalidRequestError, match="client CA bundle"):
        read_material(str(cert), str(key), str(d / "missing-ca.pem"))
    m = read_material(str(cert), str(key), str(d / "client_ca.pem"))
    assert m.client_ca is not None and len(m.fingerprint) == 64


def test_reload_hands_grpc_the_new_material_once_and_keeps_the_old_on_a_bad_file(pki):
    ca, server, cert, key, d = pki
    tls = ServerTls(str(cert), str(key))
    assert tls.fingerprint == server.fingerprint and not tls.mutual
    assert tls.grpc_credentials() is not None
    assert tls._fetch_grpc_config() is None  # nothing new: gRPC keeps what it has
    renewed = issue(ca, "renewed")
    renewed.write(d, "server")
    assert tls.reload().fingerprint == renewed.fingerprint == tls.fingerprint
    assert tls._fetch_grpc_config() is not None and tls._fetch_grpc_config() is None
    key.write_bytes(issue(ca, "stray").key_pem)
    with pytest.raises(InvalidRequestError):
        tls.reload()
    assert tls.fingerprint == renewed.fingerprint and tls._fetch_grpc_config() is None and tls.reloads == 1


def test_an_https_listener_shows_the_reloaded_certificate_to_new_handshakes(pki):
    ca, server, cert, key, d = pki
    tls = ServerTls(str(cert), str(key))
    front = tls.ssl_context()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with front.wrap_socket(conn, server_side=True) as s:
                    s.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    threading.Thread(target=serve, daemon=True).start()

    def shown() -> str:
        ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                             server_hostname="127.0.0.1") as s:
            assert s.recv(2) == b"ok"
            return hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest()

    try:
        assert shown() == server.fingerprint
        renewed = issue(ca, "renewed")
        renewed.write(d, "server")
        tls.reload()
        assert shown() == renewed.fingerprint
    finally:
        listener.close()
