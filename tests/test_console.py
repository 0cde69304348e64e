"""The terminal of a run (perl.verl_glue.console): libraries' output into the phase's log, PeRL's
lines on the terminal, the log's tail on a failure, progress lines followed from metrics.jsonl."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from perl.verl_glue.console import Console


def test_a_phase_sends_everything_printed_below_it_to_its_log(tmp_path):
    term = io.StringIO()
    console = Console(str(tmp_path), stream=term)
    with console.phase("train") as log:
        print("from python")
        os.write(2, b"from fd 2\n")
        subprocess.run([sys.executable, "-c", "print('from a child process')"], check=True)
        console.say("[perl] a progress line")
    text = open(log).read()
    assert "from python" in text and "from fd 2" in text and "from a child process" in text
    assert term.getvalue() == "[perl] a progress line\n"
    assert log == str(tmp_path / "logs" / "train.log")


def test_a_failing_phase_names_its_log_and_shows_the_tail_and_the_traceback_stays_in_the_log(tmp_path):
    term = io.StringIO()
    console = Console(str(tmp_path), stream=term)
    with pytest.raises(RuntimeError):
        with console.phase("train"):
            for i in range(100):
                print(f"library line {i}")
            raise RuntimeError("dynamic sampling exhausted")
    out = term.getvalue().splitlines()
    assert out[0].startswith(f"[perl] train failed; its log: {tmp_path / 'logs' / 'train.log'} (last 40 lines)")
    assert len(out) == 41 and "library line 99" not in out[1]  # the tail ends with the traceback
    assert any("RuntimeError: dynamic sampling exhausted" in line for line in out)
    assert "Traceback" in open(tmp_path / "logs" / "train.log").read()
    print("after the phase")  # the process's stdout is back where it was


def test_a_library_logger_set_up_in_one_phase_logs_into_the_next_phases_log(tmp_path):
    """As `perl train` runs (a process whose stdout is fd 1): a library that builds its logging
    handler inside one phase (vLLM's, imported by the "before" evaluation) keeps logging in the
    phases after it, into their logs, without "Logging error" tracebacks in their place."""
    script = f"""
import io, logging, sys
from perl.verl_glue.console import Console
console = Console({str(tmp_path)!r}, stream=io.StringIO())
with console.phase("eval_before"):
    logger = logging.getLogger("a_library")
    logger.addHandler(logging.StreamHandler(sys.stdout))  # the stream as the library finds it
    logger.setLevel(logging.INFO)
    logger.info("set up before")
with console.phase("eval_after"):
    logger.info("logged after")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    after = open(tmp_path / "logs" / "eval_after.log").read()
    assert "logged after" in after and "Logging error" not in after, after
    assert "set up before" in open(tmp_path / "logs" / "eval_before.log").read()
    assert "logged after" not in open(tmp_path / "logs" / "eval_before.log").read()


def test_verbose_keeps_the_libraries_output_on_the_terminal(tmp_path, capfd):
    console = Console(str(tmp_path), verbose=True, stream=io.StringIO())
    with console.phase("train"):
        print("library output")
    assert "library output" in capfd.readouterr().out


def test_progress_lines_follow_the_metrics_file_from_the_resumed_step(tmp_path):
    term = io.StringIO()
    console = Console(str(tmp_path), stream=term)
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2)))  # before the resume at 2

    def trainer():
        for step in (3, 4):
            time.sleep(0.15)
            with open(path, "a") as f:
                f.write(json.dumps({"step": step}) + "\n")

    with console.follow(str(path), lambda row: f"step {row['step']}", after_step=2, poll_s=0.05):
        t = threading.Thread(target=trainer)
        t.start()
        t.join()
    assert term.getvalue() == "step 3\nstep 4\n"


def test_the_progress_line_counts_the_groups_dynamic_sampling_dropped_and_the_surplus_it_discarded():
    from perl.verl_glue.run_dir import DROPPED, SURPLUS, progress_line

    row = {"step": 3, "critic/score/mean": 0.5, DROPPED: 4, SURPLUS: 2, "timing_s/step": 2.0, "timing_s/gen": 1.0}
    assert "| groups 16 kept, 4 dropped, 2 surplus |" in progress_line(row, 10, 16, True)
    del row[SURPLUS]  # verl reports the surplus only on steps that had some
    assert "| groups 16 kept, 4 dropped |" in progress_line(row, 10, 16, True)
    assert "groups" not in progress_line(row, 10, 16, False)  # no dynamic sampling: nothing to count
