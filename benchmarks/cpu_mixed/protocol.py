"""The line protocol between the benchmark and its long-lived child processes, parent side and wire format.

A child writes protocol messages to its stdout, one line each: PROTOCOL_PREFIX, then
JSON. Anything else that reaches that stdout (a stray print) is shown like a log line
and otherwise ignored; a child's logs go to stderr (`protocol_channel` arranges both).
The parent sends JSON command lines to the child's stdin. `run_workers` drives one
child per group of systems, the timed rounds interleaved across them; the child side
of the conversation is `benchmarks.cpu_mixed.groups.worker_main`.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any, Optional, Sequence, TextIO

log = logging.getLogger("benchmarks.cpu_mixed")

PROTOCOL_PREFIX = "@cpu_mixed-worker "


def protocol_channel() -> TextIO:
    """Child side: a private copy of our stdout for protocol messages; fd 1 itself (print, C libraries)
    goes to stderr from now on."""
    sys.stdout.flush()
    chan = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    return chan


def send_answer(chan: TextIO, msg: dict[str, Any]) -> None:
    """Child side: one protocol message to the parent."""
    chan.write(PROTOCOL_PREFIX + json.dumps(msg, default=str) + "\n")
    chan.flush()


def _pump(stream, tail: deque) -> None:
    """Echo a child's output to our stderr as it comes (progress of a long run), keeping its tail."""
    for line in stream:
        tail.append(line)
        sys.stderr.write(line)
        sys.stderr.flush()


class Worker:
    """The parent's handle on one group's child process (the child side: `groups.worker_main`).

    Commands go to the child's stdin; a thread reads its answers from stdout, another
    echoes its stderr to ours and keeps the tail. Every wait has a limit: a child that
    dies, errors or hangs past it (it is killed then) raises RuntimeError with that tail.
    """

    def __init__(self, label: str, cmd: Sequence[str], env: Optional[dict[str, str]] = None, tail_lines: int = 40):
        self.label = label
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self._answers: queue.Queue[Optional[str]] = queue.Queue()
        self.proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, errors="replace")
        self._threads = [threading.Thread(target=_pump, args=(self.proc.stderr, self.tail),
                                          name=f"cpu_mixed-stderr-{label}", daemon=True),
                         threading.Thread(target=self._read, name=f"cpu_mixed-stdout-{label}", daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:
                if line.startswith(PROTOCOL_PREFIX):
                    self._answers.put(line[len(PROTOCOL_PREFIX):])
                else:
                    self.tail.append(line)
                    sys.stderr.write(line)
                    sys.stderr.flush()
        finally:
            self._answers.put(None)  # end of its stdout: the child has exited (or is exiting)

    def _failure(self, what: str) -> RuntimeError:
        return RuntimeError(f"{self.label} {what}; its last output:\n" + "".join(self.tail))

    def send(self, cmd: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it has died: the next expect() reports how

    def expect(self, event: str, timeout_s: float, waiting_for: str) -> dict[str, Any]:
        """The child's next answer, which must be `event`."""
        try:
            raw = self._answers.get(timeout=timeout_s)
        except queue.Empty:
            self.kill()
            raise self._failure(f"ran past {timeout_s:g} s and was killed (waiting for {waiting_for})") from None
        if raw is None:
            rc = self._reap(timeout_s)
            raise self._failure(f"failed with exit status {rc} (waiting for {waiting_for})")
        try:
            msg = json.loads(raw)
        except ValueError:
            msg = None
        if not isinstance(msg, dict) or msg.get("event") != event:
            self.kill()
            raise self._failure(f"answered {raw.strip()[:200]!r} while we waited for {waiting_for}")
        return msg

    def ask(self, cmd: dict[str, Any], event: str, timeout_s: float, waiting_for: str) -> dict[str, Any]:
        self.send(cmd)
        return self.expect(event, timeout_s, waiting_for)

    def _reap(self, timeout_s: float) -> int:
        """Exit status of a child that closed its stdout (killed if it does not exit in time)."""
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._close_pipes()
        return rc

    def finish(self, timeout_s: float) -> None:
        """Wait for a child that has handed back its results to exit; it must exit with status 0."""
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._failure(f"ran past {timeout_s:g} s and was killed (waiting for it to exit)") from None
        self._close_pipes()
        if rc != 0:
            raise self._failure(f"failed with exit status {rc} (after handing back its results)")

    def kill(self) -> None:
        """End the child now if it still runs (no orphans when the run fails); harmless once it has exited."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for t in self._threads:
            t.join(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


def run_workers(commands: dict[str, Sequence[str]], repeats: int, timeout_s: float,
                env: Optional[dict[str, str]] = None) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Drive one persistent child per group (`groups.worker_main`), interleaving the timed rounds across them.

    The children start and set up one after another, each waited for until it is ready
    (so load times and warm-ups are as undisturbed as before). Then round r goes to each
    child in turn, each waited for before the next is told: only one child measures at
    any moment, the others sit idle, and round r of every group comes before round r+1 of
    any, so drift in the machine's speed hits every group alike. Last, each child hands
    back its results and exits. timeout_s bounds each step (a set-up, a round, a finish).

    Returns each group's results message and the timeline of rounds in the order run
    (group, round, and the wall-clock start and end the child measured). On any failure
    every child still running is killed.
    """
    workers: dict[str, Worker] = {}
    timeline: list[dict[str, Any]] = []
    try:
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            w = workers[name] = Worker(f"cpu_mixed worker {name}", cmd, env)
            w.expect("ready", timeout_s, "its set-up")
            log.info("group %s set up in child process %d in %.0f s", name, w.proc.pid, time.perf_counter() - t0)
        for r in range(1, repeats + 1):
            for name, w in workers.items():
                msg = w.ask({"cmd": "round", "round": r}, "round", timeout_s, f"round {r}")
                if msg.get("round") != r:
                    raise w._failure(f"answered round {msg.get('round')} to round {r}")
                timeline.append({"group": name, "round": r, "start": msg["start"], "end": msg["end"]})
            log.info("round %d/%d: %s", r, repeats,
                     ", ".join(f"{t['group']} {t['end'] - t['start']:.1f} s" for t in timeline[-len(workers):]))
        outs: dict[str, dict[str, Any]] = {}
        for name, w in workers.items():
            outs[name] = w.ask({"cmd": "finish"}, "results", timeout_s, "its results")
            w.finish(timeout_s)
        return outs, timeline
    finally:
        for w in workers.values():
            w.kill()

