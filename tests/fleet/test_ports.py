"""Ports for a local fleet's listeners: no two ever the same (HAProxy and gRPC bind with SO_REUSEPORT, so two
listeners given one port would both bind it and split its connections)."""
from __future__ import annotations

import socket
import threading

from server.fleet.ports import free_port


def test_no_port_is_handed_out_twice_even_when_the_kernel_offers_it_again(monkeypatch):
    offered = iter([41001, 41001, 41002, 41001, 41003])  # the kernel's bind-to-0 answers, repeats included

    class Probe:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, addr):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(socket, "socket", lambda *a, **k: Probe())
    from server.fleet import ports

    monkeypatch.setattr(ports, "_handed_out", set())
    assert [free_port(), free_port(), free_port()] == [41001, 41002, 41003]


def test_ports_taken_from_many_threads_at_once_are_distinct_and_bindable():
    got: list[int] = []
    lock = threading.Lock()

    def take():
        for _ in range(25):
            p = free_port()
            with lock:
                got.append(p)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(set(got)) == 100
    with socket.socket() as s:
        s.bind(("127.0.0.1", got[-1]))
