"""`perl table`: Table 3 layout (markdown + CSV) and Figure 1 left from evaluation results."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from perl.analysis.tables import load_run, table3, to_markdown, write_tables


def _run(tmp_path, name, method, pct, benches):
    d = tmp_path / name
    d.mkdir()
    b = {k: {"avg": a, "pass": p, "problems": 30.0, "k": k_} for k, (a, p, k_) in benches.items()}
    res = {"run": {"label": name, "method": method, "trainable_percent": pct}, "benchmarks": b,
           "overall_avg": sum(v["avg"] for v in b.values()) / len(b)}
    (d / "results.json").write_text(json.dumps(res))
    return str(d)


@pytest.fixture
def runs(tmp_path):
    return [
        _run(tmp_path, "DoRA", "dora", 2.11, {"aime24": (0.39, 0.80, 32), "math500": (0.758, 0.90, 4)}),
        _run(tmp_path, "Base", None, None, {"aime24": (0.324, 0.767, 32), "math500": (0.72, 0.868, 4)}),
        _run(tmp_path, "LoRA", "lora", 2.08, {"aime24": (0.332, 0.60, 32), "math500": (0.721, 0.874, 4)}),
        _run(tmp_path, "VeRA", "vera", 0.0367, {"aime24": (0.291, 0.60, 32), "math500": (0.697, 0.856, 4)}),
    ]


def test_table3_layout_and_values(runs, tmp_path):
    paths = write_tables(runs, str(tmp_path / "out"))
    df = pd.read_csv(paths["csv"])
    assert list(df["Method"]) == ["Base", "LoRA", "DoRA", "VeRA"]  # Baseline (base first), Structural, Efficient
    assert list(df["Category"]) == ["Baseline", "Baseline", "Structural", "Efficient"]
    dora = df[df["Method"] == "DoRA"].iloc[0]
    assert dora["AIME24 Avg"] == pytest.approx(39.0) and dora["MATH500 Pass"] == pytest.approx(90.0)
    assert dora["Avg."] == pytest.approx(100 * (0.39 + 0.758) / 2)
    md = open(paths["markdown"]).read()
    assert md.splitlines()[0] == "| Method | Avg. | AIME24@32 Avg | AIME24@32 Pass | MATH500@4 Avg | MATH500@4 Pass |"
    assert "| **Structural** |" in md and "| DoRA | 57.4 | 39.0 | 80.0 | 75.8 | 90.0 |" in md
    assert open(paths["plot"], "rb").read(4) == b"\x89PNG"


def test_missing_benchmark_and_missing_results(runs, tmp_path):
    partial = _run(tmp_path, "MiSS", "miss", 1.16, {"aime24": (0.275, 0.5, 32)})
    df = table3([load_run(p) for p in [*runs, partial]])
    assert pd.isna(df[df["Method"] == "MiSS"].iloc[0]["MATH500 Avg"])
    assert "| MiSS | 27.5 | 27.5 | 50.0 | – | – |" in to_markdown(df)
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_run(str(tmp_path))


def test_table_cli(runs, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "perl.cli", "table", *runs, "--out", str(tmp_path / "t")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| **Baseline** |" in proc.stdout and os.path.exists(tmp_path / "t" / "table3.csv")
