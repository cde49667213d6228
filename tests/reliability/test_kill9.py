"""kill -9 of the server at random moments of registration, hot-swap and streaming; 30 kills, a restart each.

After every restart: every registration the client saw acknowledged is there with the digest it was told;
every version the registry lists loads (its files are whole: nothing half-visible), an upload cut by the
kill is either wholly there or wholly absent, and the server serves again.
"""
from __future__ import annotations

import random
import re
import statistics
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest

from server.api.gen.loraserve.v1 import adapters_pb2 as apb
from tests.e2e.conftest import start_server
from tests.registry.client import Client
from tests.reliability.conftest import TINY_SERVER_ARGS, adapter_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.long]  # `make reliability`

KILLS = 30
LANES = 2  # independent servers (own registry each) killed side by side: restarts dominate, and they overlap
PHASES = ("registration", "hot-swap", "streaming")
SWEPT = re.compile(r"removed (\d+) unfinished publishes and (\d+) orphan objects")


@dataclass
class Ledger:
    """What clients were told, across every life of one lane's server."""

    acked: dict[str, str] = field(default_factory=dict)      # "name@N" -> digest
    in_flight: dict[str, str] = field(default_factory=dict)  # name -> digest of an upload the kill cut off
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class LaneStats:
    kills: dict[str, int] = field(default_factory=dict)
    restarts: list[float] = field(default_factory=list)
    swept: list[int] = field(default_factory=lambda: [0, 0])
    cut_present: int = 0
    cut_absent: int = 0
    streams_cut: int = 0
    acked: int = 0


def _uploads(config) -> list[tuple[bytes, bytes]]:
    """A few adapters of different sizes (8 KiB to ~300 KiB), so kills land inside longer writes too."""
    shapes = [(4, ("q", "v")), (16, ("q", "k", "v", "o")), (64, ("q", "k", "v", "o", "gate", "up", "down"))]
    return [adapter_bytes(config, 1000 + i, rank=r, targets=t) for i, (r, t) in enumerate(shapes * 2)]


def _digest_of(cfg: bytes, weights: bytes) -> str:
    from adapter_registry.store import content_digest

    return content_digest(cfg, weights)


@pytest.mark.timeout(1800)  # 30 restarts; on a loaded machine one takes 15 s
def test_thirty_kills(tmp_path, tiny_dir, tiny_config):
    uploads = _uploads(tiny_config)
    stats = [LaneStats() for _ in range(LANES)]
    errors: list[BaseException] = []

    def lane(i: int) -> None:
        try:
            _lane(tmp_path / f"lane{i}", tiny_dir, uploads, KILLS // LANES, i, random.Random(9 + i), stats[i])
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(LANES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    kills = {p: sum(s.kills.get(p, 0) for s in stats) for p in PHASES}
    restarts = [r for s in stats for r in s.restarts]
    cut_present, cut_absent = sum(s.cut_present for s in stats), sum(s.cut_absent for s in stats)
    print(f"\nkill -9: {sum(kills.values())} kills ({', '.join(f'{n} during {p}' for p, n in kills.items())}) "
          f"over {LANES} servers; {sum(s.acked for s in stats)} versions acknowledged, none lost; uploads cut by a "
          f"kill: {cut_present} found whole after restart, {cut_absent} absent, none partial; streams cut: "
          f"{sum(s.streams_cut for s in stats)}; start-up sweeps removed {sum(s.swept[0] for s in stats)} "
          f"unfinished publishes and {sum(s.swept[1] for s in stats)} orphan objects; restart to SERVING median "
          f"{statistics.median(restarts):.1f}s (max {max(restarts):.1f}s)")
    assert sum(kills.values()) >= 30
    assert cut_present + cut_absent > 0  # some kills did land inside an upload


def _lane(tmp, tiny_dir, uploads, kills: int, lane: int, rng: random.Random, stats: LaneStats) -> None:
    """Start, check, load, kill -9, `kills` times over; a last start checks and stops cleanly."""
    ledger = Ledger()
    env = {"LORASERVE_HOME": str(tmp / "home")}
    args = ("--model", str(tiny_dir), *TINY_SERVER_ARGS, "--max-adapters-on-device", "4")
    checked: set[str] = set()
    for kill in range(kills + 1):
        t0 = time.monotonic()
        sp = start_server(tmp, *args, env=env)
        stats.restarts.append(time.monotonic() - t0)
        for line in sp.raw:
            m = SWEPT.search(line)
            if m:
                stats.swept[0] += int(m.group(1))
                stats.swept[1] += int(m.group(2))
        client = Client(sp.target)
        try:
            # Every acknowledged registration is there, with the digest the client was told.
            listed = client.adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=60)
            present = {f"{a.name}@{v.version}": v.digest for a in listed.adapters for v in a.versions}
            missing = {k: d for k, d in ledger.acked.items() if present.get(k) != d}
            assert not missing, f"lane {lane}, after kill {kill}: acknowledged registrations lost: {missing}"
            # A cut-off upload is wholly there or wholly absent; nothing else appeared.
            for name, digest in ledger.in_flight.items():
                versions = [k for k in present if k.split("@")[0] == name and k not in ledger.acked]
                assert all(present[k] == digest for k in versions), (name, versions)
                if versions:
                    stats.cut_present += 1
                    ledger.acked.update({k: present[k] for k in versions})
                else:
                    stats.cut_absent += 1
            ledger.in_flight.clear()
            assert set(present) == set(ledger.acked), set(present) ^ set(ledger.acked)
            # Whole files: every version not checked yet loads onto the device (digest and contents verified).
            for adapter_id in sorted(set(present) - checked):
                r = client.adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id=adapter_id), timeout=60)
                assert r.adapter_id == adapter_id
                checked.add(adapter_id)
            # And it serves again.
            assert len(client.generate("", "alive?", 4).token_ids) == 4
            if kill == kills:
                break
            phase = PHASES[(kill + lane) % len(PHASES)]
            stats.kills[phase] = stats.kills.get(phase, 0) + 1
            stats.streams_cut += _work_then_kill(sp, client, phase, kill, ledger, uploads, rng)
        finally:
            client.close()
            if kill == kills:
                assert sp.stop() == 0, sp.log_tail()
            elif sp.proc.poll() is None:
                sp.proc.kill()
                sp.proc.wait(30)
    stats.acked = len(ledger.acked)


def _work_then_kill(sp, client: Client, phase: str, kill: int, ledger: Ledger, uploads, rng: random.Random) -> int:
    """Run `phase` traffic, SIGKILL the server at a random moment of it; returns how many streams it cut."""
    stop = threading.Event()
    cut = [0]
    acked_names = sorted({k.split("@")[0] for k in ledger.acked})

    def register_loop(prefix: str) -> None:
        c = Client(sp.target)
        j = 0
        while not stop.is_set():
            name = prefix if prefix == "hot" else f"{prefix}-{j}"
            cfg, weights = uploads[rng.randrange(len(uploads))]
            digest = _digest_of(cfg, weights)
            with ledger.lock:
                ledger.in_flight[name] = digest
            try:
                r = c.register(name, cfg, weights)
            except grpc.RpcError:
                break  # the kill: this upload stays in flight
            with ledger.lock:
                ledger.in_flight.pop(name, None)
                ledger.acked[r.adapter_id] = r.version.digest
            assert r.version.digest == digest
            j += 1
        c.close()

    def stream_loop(adapter: str) -> None:
        c = Client(sp.target)
        while not stop.is_set():
            try:
                c.stream(adapter, "streaming until the kill", 64)
            except grpc.RpcError:
                cut[0] += 1
                break
        c.close()

    threads = []
    if phase == "registration":
        threads += [threading.Thread(target=register_loop, args=(f"k{kill}-r{i}",)) for i in range(3)]
    elif phase == "hot-swap":
        threads.append(threading.Thread(target=register_loop, args=("hot",)))
        threads += [threading.Thread(target=stream_loop, args=("hot" if "hot" in acked_names else "",))
                    for _ in range(4)]
    else:
        pick = acked_names or [""]
        threads += [threading.Thread(target=stream_loop, args=(rng.choice(pick),)) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0.05, 1.2))
    sp.proc.kill()  # SIGKILL
    sp.proc.wait(30)
    stop.set()
    for t in threads:
        t.join(60)
    return cut[0]
