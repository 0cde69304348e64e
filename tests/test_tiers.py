"""How the suite splits over the cores: which `-m` selections run in two pytest-xdist workers
(tests/conftest.py, pytest_xdist_auto_num_workers) and which in one process."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import BOTH_CORES_MARKERS, pytest_xdist_auto_num_workers


def workers(markexpr: str | None) -> int:
    return pytest_xdist_auto_num_workers(SimpleNamespace(option=SimpleNamespace(markexpr=markexpr)))


@pytest.mark.parametrize("markexpr", ["not slow", "not slow and not network",
                                      "not network and not (ray or vllm or dist)", "contract and not vllm"])
def test_selections_without_a_test_that_keeps_both_cores_busy_run_in_two_workers(markexpr, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert workers(markexpr) == 2
    monkeypatch.setattr("os.cpu_count", lambda: 1)  # one core: one worker
    assert workers(markexpr) == 1


@pytest.mark.parametrize("markexpr", [None, "", "slow", "vllm", "not network",
                                      "not network and (ray or vllm or dist)", "slow and not contract"])
def test_selections_that_may_hold_a_trainer_launch_run_in_one_process(markexpr, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert workers(markexpr) == 0


def test_the_markers_that_keep_both_cores_busy_are_declared():
    """The rule keys on these names: a renamed marker would silently put trainer launches side by side."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--markers", "-p", "no:cacheprovider"],
                         capture_output=True, text=True, check=True).stdout
    for marker in (*BOTH_CORES_MARKERS, "slow", "network"):
        assert f"@pytest.mark.{marker}:" in out, marker
