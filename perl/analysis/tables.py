"""`perl table`: the paper's Table 3 layout and Figure 1 from evaluation run directories.

Each run directory holds a `results.json` written by `perl eval` or a `perl train` run
(per-benchmark Avg@k / Pass@k, and the run's method, label and trainable share). Rows are grouped
by the paper's categories. Figure 1 left: accuracy vs trainable share; right: training reward
curves, from each run's `metrics.jsonl` (found next to results.json or named in it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pandas as pd

from perl.methods import CATEGORIES, METHODS

BENCH_ORDER = ["aime24", "aime25", "amc23", "hmmt25", "math500", "minerva"]
BENCH_TITLES = {"aime24": "AIME24", "aime25": "AIME25", "amc23": "AMC", "hmmt25": "HMMT", "math500": "MATH500",
                "minerva": "Minerva"}


@dataclass
class Run:
    path: str
    label: str
    method: str | None
    category: str
    trainable_percent: float | None
    overall: float
    benchmarks: dict[str, dict[str, float]]
    metrics: str | None = None  # the training run's metrics.jsonl, if any


def load_run(path: str) -> Run:
    results_path = os.path.join(path, "results.json")
    if not os.path.exists(results_path):
        raise FileNotFoundError(f"{path}: no results.json (run `perl eval --out {path}` first)")
    with open(results_path) as f:
        res = json.load(f)
    info: dict[str, Any] = res.get("run", {})
    method = info.get("method")
    known = METHODS.get(method)
    category = known.category if known is not None else "Baseline"
    trainable = info.get("trainable_percent")
    if known is not None and known.trains_every_parameter:
        trainable = 100.0
    metrics = info.get("metrics")
    if not (metrics and os.path.exists(metrics)):
        local = os.path.join(path, "metrics.jsonl")
        metrics = local if os.path.exists(local) else None
    return Run(path, info.get("label") or method or os.path.basename(os.path.normpath(path)), method, category,
               trainable, float(res["overall_avg"]), res["benchmarks"], metrics)


def table3(runs: list[Run]) -> pd.DataFrame:
    """One row per run, categories in the paper's order; values in percent."""
    benches = [b for b in BENCH_ORDER if any(b in r.benchmarks for r in runs)]
    benches += sorted({b for r in runs for b in r.benchmarks} - set(benches))
    order = {c: i for i, c in enumerate(CATEGORIES)}
    rows = []
    for r in sorted(runs, key=lambda r: (order.get(r.category, 99), r.method is not None, r.label)):
        row: dict[str, Any] = {"Category": r.category, "Method": r.label, "Avg.": 100 * r.overall}
        for b in benches:
            m = r.benchmarks.get(b)
            k = int(m["k"]) if m else None
            title = BENCH_TITLES.get(b, b)
            row[f"{title} Avg"] = 100 * m["avg"] if m else float("nan")
            row[f"{title} Pass"] = 100 * m["pass"] if m else float("nan")
            row[f"{title} k"] = k
        row["Train Param. %"] = r.trainable_percent
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame) -> str:
    """Table 3 layout: category header rows, then Avg. and Avg/Pass per benchmark."""
    bench_titles = [c[: -len(" Avg")] for c in df.columns if c.endswith(" Avg") and c != "Avg."]
    head = ["Method", "Avg."]
    for t in bench_titles:
        ks = df[f"{t} k"].dropna().unique()
        suffix = f"@{int(ks[0])}" if len(ks) == 1 else ""
        head += [f"{t}{suffix} Avg", f"{t}{suffix} Pass"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for category, group in df.groupby("Category", sort=False):
        lines.append(f"| **{category}** |" + " |" * (len(head) - 1))
        for _, r in group.iterrows():
            cells = [str(r["Method"]), f"{r['Avg.']:.1f}"]
            for t in bench_titles:
                cells += [_fmt(r[f"{t} Avg"]), _fmt(r[f"{t} Pass"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return "–" if pd.isna(x) else f"{x:.1f}"


def plot_accuracy_vs_params(runs: list[Run], path: str) -> str | None:
    """Figure 1 (left): overall accuracy vs trainable-parameter share (log x) with the frontier."""
    from .plotting import finish, new_figure

    pts = sorted((r.trainable_percent, 100 * r.overall, r.label) for r in runs if r.trainable_percent)
    if not pts:
        return None
    fig, (ax,) = new_figure()
    for x, y, label in pts:
        ax.scatter(x, y)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    frontier, best = [], float("-inf")
    for x, y, _ in pts:  # best accuracy reachable with at most x% trainable
        if y > best:
            best = y
            frontier.append((x, y))
    frontier.append((pts[-1][0], best))  # carry the frontier to the largest share shown
    ax.step([p[0] for p in frontier], [p[1] for p in frontier], where="post", linestyle="--", color="gray",
            label="frontier")
    for r in runs:
        if r.method is None:  # the base model: a horizontal reference
            ax.axhline(100 * r.overall, color="black", linewidth=0.8, linestyle=":", label=f"{r.label}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel("overall accuracy (Avg., %)")
    return finish(fig, [ax], path)


# What a run's metrics.jsonl (perl.verl_glue.run_dir) holds as its training reward, best first: the
# accuracy over every generated group (dynamic sampling's dropped ones included), verl's batch score.
REWARD_COLUMNS = ("perl/acc_all_groups", "critic/score/mean")


def plot_reward_curves(runs: list[Run], path: str, smooth: int = 10) -> str | None:
    """Figure 1 (right): training reward per step, a trailing mean over `smooth` steps."""
    from .plotting import finish, new_figure

    curves = []
    for r in runs:
        if r.metrics is None:
            continue
        rows = pd.read_json(r.metrics, lines=True)
        column = next((c for c in REWARD_COLUMNS if c in rows), None)
        if len(rows) and column:
            curves.append((r.label, rows["step"], rows[column].rolling(smooth, min_periods=1).mean()))
    if not curves:
        return None
    fig, (ax,) = new_figure(figsize=(7, 4.5))
    for label, steps, reward in curves:
        ax.plot(steps, reward, label=label, linewidth=1.2)
    ax.set_xlabel("RL step")
    ax.set_ylabel(f"training reward (mean of last {smooth} steps)")
    return finish(fig, [ax], path)


def write_tables(run_dirs: list[str], out_dir: str) -> dict[str, str]:
    runs = [load_run(p) for p in run_dirs]
    if not runs:
        raise ValueError("perl table: give at least one run directory")
    os.makedirs(out_dir, exist_ok=True)
    df = table3(runs)
    paths = {"csv": os.path.join(out_dir, "table3.csv"), "markdown": os.path.join(out_dir, "table3.md")}
    df.to_csv(paths["csv"], index=False)
    with open(paths["markdown"], "w") as f:
        f.write(to_markdown(df) + "\n")
    png = plot_accuracy_vs_params(runs, os.path.join(out_dir, "accuracy_vs_params.png"))
    if png:
        paths["plot"] = png
    curves = plot_reward_curves(runs, os.path.join(out_dir, "reward_curves.png"))
    if curves:
        paths["reward_curves"] = curves
    return paths
