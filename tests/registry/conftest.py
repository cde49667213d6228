import itertools
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adapter_registry import Registry  # noqa: E402

from .adapters import FINGERPRINT, TINY  # noqa: E402

BACKENDS = ("sqlite", "postgresql")
_databases = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster():
    """One throwaway PostgreSQL server for the session (Debian's binaries, run as `postgres`)."""
    from server.fleet.postgres import PostgresCluster

    cluster = PostgresCluster().start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster):
    """A fresh, empty database of the session's cluster."""
    return pg_cluster.create_database(f"reg{os.getpid()}_{next(_databases)}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def open_registry(backend, tmp_path, request):
    """Open a Registry on this test's backend: the SQLite directory or a fresh PostgreSQL database + objects folder.

    Every call opens another registry on the same index (a restart, or a second replica); all are closed after.
    """
    location = tmp_path / "reg" if backend == "sqlite" else request.getfixturevalue("pg_url")
    opened = []

    def make(fingerprint: str = FINGERPRINT, max_rank: int = 16, **kw) -> Registry:
        if backend == "postgresql":
            kw.setdefault("objects", tmp_path / "objects")
            kw.setdefault("object_grace_s", 0.0)  # as the embedded default: unused objects go at once
        reg = Registry(location, TINY, fingerprint, max_rank, **kw)
        opened.append(reg)
        return reg

    yield make
    for reg in opened:
        reg.close()


@pytest.fixture
def registry(open_registry, tmp_path):
    imports = tmp_path / "imports"
    imports.mkdir()
    return open_registry(import_dirs=[imports], host_cache_bytes=1 << 20)
