"""`perl methods`: every method's trainable share on the paper's 1.5B shape (Table 4's regime)."""

import json
import subprocess
import sys

import pytest

from perl.cli import main


@pytest.fixture(scope="module")
def report_1p5b(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "methods.json"
    assert main(["methods", "--model", "deepseek-r1-distill-qwen-1.5b", "--format", "json", "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_all_methods_listed(report_1p5b):
    from perl.methods import METHODS

    rows = {r["method"]: r for r in report_1p5b["methods"]}
    assert set(rows) == set(METHODS)
    assert report_1p5b["total_parameters"] == 1_777_088_000  # R1-Distill-Qwen-1.5B, untied embeddings
    assert rows["full"]["percent"] == pytest.approx(100.0)


def test_percentages_in_the_papers_regime(report_1p5b):
    pct = {r["method"]: r["percent"] for r in report_1p5b["methods"]}
    # LoRA r=32 on all 7 projections: r * (d_in + d_out) summed = 36.9M (paper Table 4: 1.55%)
    assert 1.0 < pct["lora"] < 3.0 and pct["lora"] == pytest.approx(100 * 36_929_536 / 1_777_088_000)
    assert pct["rslora"] == pct["lora_plus"] == pct["pissa"] == pct["milora"] == pct["lora"]
    assert pct["lora"] < pct["dora"] < pct["lora"] * 1.05  # + one magnitude per output row
    assert pct["lora_fa"] < pct["lora"] and pct["miss"] < pct["lora"]  # (paper: MiSS 0.99%)
    assert 0.001 < pct["ln_tuning"] < 0.01  # paper: 0.0035%
    assert pct["vera"] < 0.05 and pct["ia3"] < 0.05
    assert max(pct[m] for m in ("vera", "ia3", "ln_tuning")) < pct["lora"] / 40


def test_tinylora_trains_13_parameters_of_the_15b(report_1p5b):
    """TinyLoRA's paper setting (u=13, one vector for all 7 x 28 projections): 13 of 1.78B, and the
    table prints the share instead of rounding it to 0."""
    from perl.cli import format_methods_table

    row = next(r for r in report_1p5b["methods"] if r["method"] == "tinylora")
    assert row["trainable"] == 13 and row["category"] == "Efficient" and len(row["target_modules"]) == 7
    assert row["percent"] == pytest.approx(100 * 13 / 1_777_088_000)
    assert "| tinylora | Efficient | 13 | 7.3e-07% |" in format_methods_table(report_1p5b)


def test_vera_on_q_v_matches_paper_count():
    """The paper's 0.0029% for VeRA is what peft's default targets (q, v only) give."""
    from perl.cli import methods_report

    report = methods_report("deepseek-r1-distill-qwen-1.5b", rank=32, alpha=64, targets=["q", "v"], methods=["vera"])
    row = report["methods"][0]
    assert row["trainable"] == 28 * ((32 + 1536) + (32 + 256))
    assert f"{row['percent']:.4f}" == "0.0029"


@pytest.mark.slow  # CLI subprocesses: a few seconds of imports each
def test_table_output_and_errors():
    proc = subprocess.run([sys.executable, "-m", "perl.cli", "methods", "--model", "tiny-llama", "--rank", "4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + 14 and "| lora | Baseline |" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "perl.cli", "methods", "--model", "no-such-model"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "known config name" in bad.stderr
