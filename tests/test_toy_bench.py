"""`perl bench toy` and `perl table` on real toy runs of the single-machine engine."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _perl(args, cache, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PERL_CACHE=cache)
    proc = subprocess.run([sys.executable, "-m", "perl.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _png_size(path):
    import matplotlib.image

    return matplotlib.image.imread(path).shape


VARIANTS = ("lora", "vera", "lora@tspmo")
SMALL = ("rl.steps=4", "rl.prompts_per_step=4", "data.eval_size=30", "data.eval_k=2")


@pytest.fixture(scope="module")
def bench(toy_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "toy"
    stdout = _perl(["bench", "toy", "--methods", *VARIANTS, "--out", str(out), *SMALL], toy_cache)
    return out, stdout


def test_bench_toy_trains_each_method_and_tabulates_it(bench):
    out, stdout = bench
    report = json.loads((out / "bench_toy.json").read_text())
    assert [r["method"] for r in report["runs"]] == list(VARIANTS)
    df = pd.read_csv(out / "tables" / "table3.csv")
    # Baseline (cold start, LoRA and LoRA with T-SPMO's loss), then Efficient
    assert list(df["Method"]) == ["cold start", "lora", "lora (T-SPMO)", "vera"]
    assert list(df["Category"]) == ["Baseline", "Baseline", "Baseline", "Efficient"]
    for r in report["runs"]:
        summary = json.loads((out / r["method"] / "summary.json").read_text())
        assert summary["config"]["loss_mode"] == ("tspmo" if r["method"] == "lora@tspmo" else "token")
        row = df[df["Method"] == r["label"]].iloc[0]
        assert row["Avg."] == pytest.approx(100 * summary["eval_after"])
        assert row["Train Param. %"] == pytest.approx(summary["trainable_percent"])
        assert df.iloc[0]["Avg."] == pytest.approx(100 * summary["eval_before"])  # one shared cold start
        samples = [json.loads(x) for x in open(out / r["method"] / "heldout.samples.jsonl")]
        assert len(samples) == 30 * 2  # every sample kept: the table is recomputable
        assert sum(s["acc"] for s in samples) / len(samples) == pytest.approx(summary["eval_after"])
    vera = df[df["Method"] == "vera"].iloc[0]["Train Param. %"]
    lora = df[df["Method"] == "lora"].iloc[0]["Train Param. %"]
    assert vera < lora / 10  # VeRA trains a small fraction of LoRA's parameters
    md = (out / "tables" / "table3.md").read_text()
    assert "| **Efficient** |" in md and "| vera |" in md and "heldout@2 Avg" in md
    assert "lora:" in stdout and "vera:" in stdout


def test_bench_toy_plots_and_resumes(bench, toy_cache):
    out, _ = bench
    for name in ("accuracy_vs_params.png", "reward_curves.png"):
        h, w, _ = _png_size(out / "tables" / name)
        assert h > 100 and w > 100
    mtimes = {m: (out / m / "summary.json").stat().st_mtime for m in VARIANTS}
    stdout = _perl(["bench", "toy", "--methods", *VARIANTS, "--out", str(out), *SMALL], toy_cache)
    assert {m: (out / m / "summary.json").stat().st_mtime for m in mtimes} == mtimes  # finished runs reused
    assert "[1/3]" not in stdout
    # other settings must not silently reuse a finished run: RL settings, and the data or the method's
    # (once only rl: was compared, so another evaluation set reused the old numbers)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PERL_CACHE=toy_cache)
    for change, named in (("rl.lr=1e-3", "rl.lr: 0.0005 -> 0.001"), ("data.eval_size=31", "data.eval_size: 30 -> 31"),
                          ("method.rank=4", "method.rank: 8 -> 4")):
        proc = subprocess.run([sys.executable, "-m", "perl.cli", "bench", "toy", "--methods", "lora", "--out",
                               str(out), *SMALL, change], capture_output=True, text=True, env=env, cwd=ROOT)
        assert proc.returncode == 2 and f"other settings than requested ({named})" in proc.stderr, proc.stderr[-2000:]
    assert (out / "lora" / "summary.json").stat().st_mtime == mtimes["lora"]


def test_reward_curves_come_from_each_runs_metrics(bench, tmp_path):
    from perl.analysis.tables import load_run

    out, _ = bench
    for m in VARIANTS:
        run = load_run(str(out / m))
        assert run.metrics == str(out / m / "metrics.jsonl")
        assert len(pd.read_json(run.metrics, lines=True)) == 4
    assert load_run(str(out / "lora" / "eval_before")).metrics is None  # the cold start never trained


def test_unknown_method_is_refused(toy_cache):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PERL_CACHE=toy_cache)
    proc = subprocess.run([sys.executable, "-m", "perl.cli", "bench", "toy", "--methods", "lorra"], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2 and "lorra" in proc.stderr and "dora" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "perl.cli", "bench", "toy", "--methods", "lora@ppo"], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2 and "'ppo'" in proc.stderr and "sgrpo" in proc.stderr
