"""What a person sees on the terminal during a run, and where everything else goes.

verl, Ray and vLLM print a great deal: the resolved config again, every worker's start-up, a
warning per request. In the default `perl.console=quiet`, while a phase runs (the held-out
evaluations, the trainer) this process's stdout and stderr, and with them everything Ray forwards
from its workers, go to `<run dir>/logs/<phase>.log`; the terminal gets PeRL's own lines: the first
screen, one progress line per step (read from `metrics.jsonl` as the trainer appends it) and the
result. Nothing is lost: on a failure the log's path and its last lines are printed.
`perl.console=verbose` leaves every library's output on the terminal as well.

Written by hand: the redirection is at the file-descriptor level (os.dup2), which is what catches
the output of C extensions and of the child processes Ray and vLLM start; no logging library does.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import TextIO

LOGS_DIR = "logs"
TAIL_LINES = 40


def _is_fd(stream: TextIO, fd: int) -> bool:
    """Whether `stream` writes to file descriptor `fd` (which the phase points at its log)."""
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # io.StringIO, pytest's capture, a closed stream
        return False


def tail(path: str, n: int = TAIL_LINES) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        return f.read().splitlines()[-n:]


class Console:
    """The terminal of a run: `say` writes to it; `phase` sends the libraries' output to a log file."""

    def __init__(self, run_dir: str, verbose: bool = False, stream: TextIO | None = None) -> None:
        self.logs = os.path.join(run_dir, LOGS_DIR)
        self.verbose = verbose
        sys.stdout.flush()
        # a duplicate of the terminal as it is now: PeRL's lines keep going there while fd 1 is a log
        self.out = stream or os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def log_path(self, name: str) -> str:
        return os.path.join(self.logs, f"{name}.log")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[str]:
        """Run the block with stdout/stderr (fds 1 and 2, child processes included) appended to
        `logs/<name>.log`; on an exception, print where the log is and its last lines."""
        path = self.log_path(name)
        os.makedirs(self.logs, exist_ok=True)
        if self.verbose:
            yield path
            return
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        # Python's own streams too, but only where they are not fds 1/2 already (pytest's capture, a
        # notebook): a logging handler that a library creates inside the phase keeps the stream it
        # found, and a stream closed with the phase would lose every later record of that library
        # (vLLM's logger, set up in the "before" evaluation, in the trainer and the "after" one)
        text = os.fdopen(os.dup(log), "a", buffering=1)
        redirect_out = contextlib.redirect_stdout(text) if not _is_fd(sys.stdout, 1) else contextlib.nullcontext()
        redirect_err = contextlib.redirect_stderr(text) if not _is_fd(sys.stderr, 2) else contextlib.nullcontext()
        try:
            os.dup2(log, 1)
            os.dup2(log, 2)
            with redirect_out, redirect_err:
                try:
                    yield path
                except BaseException:
                    traceback.print_exc()  # into the log, where the libraries' own tracebacks are
                    raise
        except BaseException:
            text.close()
            self._restore(saved, log)
            lines = tail(path)
            self.say(f"[perl] {name} failed; its log: {path}" + (f" (last {len(lines)} lines):" if lines else ""))
            for line in lines:
                self.say(f"    {line}")
            raise
        else:
            text.close()
            self._restore(saved, log)

    @staticmethod
    def _restore(saved: tuple[int, int], log: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log):
            os.close(fd)

    @contextlib.contextmanager
    def follow(self, path: str, line_of: Callable[[dict], str], after_step: int, poll_s: float = 0.5) -> Iterator[None]:
        """Print `line_of(row)` for every row of the JSON-lines file `path` with a step past
        `after_step`, as it appears (the trainer's metrics.jsonl, written in another process).
        Quiet mode only: in verbose mode the trainer's own progress line reaches the terminal."""
        if self.verbose:
            yield
            return
        stop = threading.Event()
        printed = [int(after_step)]

        def drain() -> None:
            if not os.path.exists(path):
                return
            with open(path) as f:
                for text in f:
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError:  # a line being written
                        break
                    if int(row.get("step", 0)) > printed[0]:
                        self.say(line_of(row))
                        printed[0] = int(row["step"])

        def loop() -> None:
            while not stop.wait(poll_s):
                drain()

        thread = threading.Thread(target=loop, name="perl-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            drain()  # the last step's line
