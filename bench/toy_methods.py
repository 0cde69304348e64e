"""The study of every method on the CPU toy task (`perl bench toy`), written into docs/benchmarks.md.

Usage: python bench/toy_methods.py [--out runs/bench-toy] [--methods ...] [--seeds 0 1 2]
                                   [--lr-grid 0.25 1 4] [--lr-grid-for VARIANT=M,M ...]
                                   [--lr-search-seeds 1] [--lr-extend-up 1] [--lr-extend-down 1]
                                   [--no-train] [key=value ...]
Cells (variant x lr x seed) finished in --out are reused, so a study stopped part-way resumes
with the next cell and can be spread over several sittings; the section is rewritten from every
finished cell each time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _docs import DOC, write_section  # noqa: E402

from perl.cli import add_study_arguments  # noqa: E402
from perl.toy.bench import study_from_args  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def grid_text(grids: dict[str, list[float]]) -> str:
    """'0.25/1/4' when every variant has the same grid, else the common one and the exceptions."""
    text = {v: "/".join(f"{m:g}" for m in g) for v, g in grids.items()}
    common = max(set(text.values()), key=list(text.values()).count)
    others = [f"{v}: {t}" for v, t in text.items() if t != common]
    return common + (f" ({'; '.join(others)})" if others else "")


def extended_text(report: dict) -> str:
    """', extended where ... (--lr-extend-up/-down): adalora up to x16; lora_plus down to x0.25' from
    the cells that ran beyond a variant's grid."""
    extra: dict[str, set] = {}
    for r in report["runs"]:
        if r["lr_mult"] not in report["lr_grids"][r["variant"]]:
            extra.setdefault(r["variant"], set()).add(r["lr_mult"])
    if not extra:
        return ""
    parts = []
    for v, mults in extra.items():
        direction = "up" if min(mults) > max(report["lr_grids"][v]) else "down"
        parts.append(f"{v} {direction} to x{'/x'.join(f'{m:g}' for m in sorted(mults))}")
    return (", extended where the top of the grid won or even its best ended below the base "
            "(`--lr-extend-up`/`--lr-extend-down`): " + "; ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "examples", "toy.yaml"))
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-toy"))
    add_study_arguments(ap)
    args, overrides = ap.parse_known_args()
    report = study_from_args(args, args.config, args.out, overrides)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "toy_methods.json"), "w") as f:
        json.dump(report, f, indent=2)
    img = os.path.join(os.path.dirname(DOC), "img")
    os.makedirs(img, exist_ok=True)
    for key, name in (("plot_seeds", "toy_accuracy_vs_params.png"), ("reward_curves", "toy_reward_curves.png")):
        if key in report["tables"]:
            shutil.copyfile(report["tables"][key], os.path.join(img, name))
    lines = [
        "### The study on the CPU toy task (`perl bench toy` / `bench/toy_methods.py`)",
        "",
        f"Config `examples/toy.yaml` (DAPO, the same steps and batch for every cell; overrides: "
        f"{' '.join(overrides) or 'none'}). lr search on seed(s) {report['search_seeds']} over multiples "
        f"{grid_text(report['lr_grids'])} of each method's default (adapters at the toy's lr, full fine-tuning at "
        f"0.1x){extended_text(report)}; seeds {args.seeds} at each method's best lr. Held-out: Avg@4 on 200 unseen problems, "
        f"the same sample seeds before and after. Machine time of the cells: {report['machine_s'] / 3600:.2f} h. "
        "How the study is run and what it cannot say: [docs/study.md](study.md).",
        *(["", f"**A study under way**: {len(report['runs'])} "
           f"cells finished; {len(report['unfinished'])} planned ones have not (and a variant's other seeds are "
           f"planned only once its lr search has finished) "
           f"({', '.join(report['unfinished'][:8])}{', ...' if len(report['unfinished']) > 8 else ''}); the "
           "tables below hold the finished ones, and a variant whose lr search is incomplete has its lr chosen "
           "among the finished cells."] if report.get("unfinished") else []),
        "",
        open(report["tables"]["study_markdown"]).read().strip(),
        "",
        "![accuracy vs trainable share, mean +- std over seeds](img/toy_accuracy_vs_params.png)",
        "![training reward](img/toy_reward_curves.png)",
    ]
    write_section("toy_methods", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
