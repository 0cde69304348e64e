"""Time-limited math-verify calls from any thread, in any process (Ray workers included).

Why not math-verify's own timeouts: they use `signal.alarm`, which refuses to run outside the main
thread. Why not multiprocessing: spawn/forkserver children re-import the caller's `__main__`
(verl's wrapper silently scores 0.0 when the caller has no main guard). So: a small pool of
`python -m perl.reward.worker` subprocesses speaking JSON lines; a call that overruns its limit has
its worker killed and replaced, and is reported as a timeout.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STARTUP_TIMEOUT_S = 120.0


class _Worker:
    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "perl.reward.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace", env=env,
        )
        if self._read(STARTUP_TIMEOUT_S) is None:
            self.kill()
            raise RuntimeError("reward worker did not start (python -m perl.reward.worker)")

    def _read(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def ask(self, task: dict, timeout: float) -> dict | None:
        """The reply, or None if the worker overran `timeout` or died."""
        try:
            self.proc.stdin.write(json.dumps(task) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        return self._read(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class VerifierPool:
    """`size` worker processes; every call is limited to `timeout_s` seconds (hard kill after a grace)."""

    def __init__(self, size: int | None = None, timeout_s: float = 5.0, grace_s: float = 1.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {timeout_s}")
        self.size = max(1, size or os.cpu_count() or 1)
        self.timeout_s = float(timeout_s)
        self.grace_s = float(grace_s)
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        self._created = 0
        self._lock = threading.Lock()
        self._closed = False
        self.stats: Counter[str] = Counter()
        atexit.register(self.close)

    def _borrow(self) -> _Worker:
        """An idle worker, or a new one while fewer than `size` exist; otherwise wait for one.

        The queue holds idle workers and `None` tokens for slots freed by a killed worker, so a
        waiting caller is always woken, whether a worker comes back or one had to be killed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("VerifierPool is closed")
            new_slot = self._idle.empty() and self._created < self.size
            if new_slot:
                self._created += 1
        item = None if new_slot else self._idle.get()
        if item is not None:
            return item
        try:
            return _Worker()
        except BaseException:
            self._idle.put(None)  # give the slot back
            raise

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def verify(self, pred: str, gold: str) -> tuple[bool, str]:
        """(correct, status) with status ok / timeout / error."""
        worker = self._borrow()
        reply = worker.ask({"pred": pred, "gold": gold, "timeout": max(1, int(self.timeout_s))},
                           self.timeout_s + self.grace_s)
        if reply is None:  # overran or died: kill it; its slot goes back as a token
            worker.kill()
            self._idle.put(None)
            self._count("timeout")
            return False, "timeout"
        self._idle.put(worker)
        if reply.get("timeout"):
            self._count("timeout")
            return False, "timeout"
        if reply.get("error"):
            self._count("error")
            return False, "error"
        self._count("ok")
        return bool(reply["correct"]), "ok"

    def verify_many(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[bool, str]]:
        if not pairs:
            return []
        with ThreadPoolExecutor(max_workers=min(self.size, len(pairs))) as ex:
            return list(ex.map(lambda p: self.verify(*p), pairs))

    def close(self) -> None:
        with self._lock:
            self._closed = True
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                break
            if worker is not None:
                worker.kill()
