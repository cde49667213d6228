"""A throwaway PostgreSQL cluster from Debian's binaries: `initdb` + `pg_ctl` under a temp dir.

For tests, `make fleet` and the fleet benchmark; never a production database. `initdb`
refuses to run as root, so as root every server command runs as the `postgres` system
user (`runuser`), in a directory it owns under /tmp (pytest's own temp dirs are 0700 root).
It listens on 127.0.0.1 and a free port, trusts local connections, and is removed on `destroy`.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from server.fleet.ports import free_port

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
INSTALL_HINT = ("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's `postgresql` package "
                "(`apt-get install postgresql`; `make install` and .ci/run do it where missing)")


def find_pg_bin() -> Path:
    """The directory holding initdb/pg_ctl: $LORASERVE_PG_BIN, PATH, or the newest /usr/lib/postgresql/N/bin."""
    env = os.environ.get("LORASERVE_PG_BIN")
    if env and (Path(env) / "initdb").exists():
        return Path(env)
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    dirs = sorted(glob.glob(PG_BIN_GLOB), key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit()
                  else 0)
    for d in reversed(dirs):
        if (Path(d) / "initdb").exists():
            return Path(d)
    raise RuntimeError(INSTALL_HINT)


class PostgresCluster:
    """One PostgreSQL server process on loopback, in its own temp dir (see the module docstring)."""

    def __init__(self, port: int = 0, durable: bool = False, parent: Optional[Path] = None):
        self.bin = find_pg_bin()
        self.port = port or free_port()
        self.durable = durable  # fsync on (make fleet) or off (tests: faster, a crash loses the temp dir anyway)
        self.as_root = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="loraserve-pg-", dir=parent))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        if self.as_root:
            os.chmod(self.dir, 0o700)
            shutil.chown(self.dir, "postgres", "postgres")
        self._initdb()

    # ---- commands ----------------------------------------------------------------------------
    def _cmd(self, *args: str) -> list[str]:
        return (["runuser", "-u", "postgres", "--"] if self.as_root else []) + list(args)

    def _run(self, *args: str, timeout: float = 120) -> str:
        r = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=self.dir)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({r.returncode}): {r.stderr.strip()[-2000:]}\n"
                               f"{self.log_tail()}")
        return r.stdout

    def _initdb(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-instructions", *([] if self.durable else ["--no-sync"]))
        conf = [f"port = {self.port}", "listen_addresses = '127.0.0.1'", f"unix_socket_directories = '{self.dir}'",
                "max_connections = 200", "shared_buffers = 32MB", "logging_collector = off"]
        if not self.durable:
            conf += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# loraserve throwaway cluster\n" + "\n".join(conf) + "\n")

    def start(self, timeout: float = 60) -> "PostgresCluster":
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(int(timeout)),
                  "start", timeout=timeout + 10)
        return self

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stop the server: `fast` (clients disconnected, clean) or `immediate` (like a crash)."""
        if self.running():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", str(int(timeout)),
                      "stop", timeout=timeout + 10)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        if down_s:
            time.sleep(down_s)
        self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- databases ---------------------------------------------------------------------------
    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name` (a plain identifier) and return its URL."""
        import psycopg

        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a plain database name: {name!r}")
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> "PostgresCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
