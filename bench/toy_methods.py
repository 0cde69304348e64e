"""The study of every method on the CPU toy task (`perl bench toy`), written into docs/benchmarks.md.

Usage: python bench/toy_methods.py [--out runs/bench-toy] [--methods ...] [--seeds 0 1 2]
                                   [--lr-grid 0.25 1 4] [key=value ...]
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

from perl.toy.bench import bench_toy, study_variants  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "examples", "toy.yaml"))
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-toy"))
    ap.add_argument("--methods", nargs="+", default=study_variants(),
                    help="METHOD, METHOD@LOSS or METHOD:rN (default: the study's variants, perl.toy.bench)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--lr-grid", nargs="+", type=float, default=[1.0])
    args, overrides = ap.parse_known_args()
    report = bench_toy(args.config, args.methods, args.out, overrides, seeds=args.seeds, lr_grid=args.lr_grid)
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
        f"{' '.join(overrides) or 'none'}); seeds {args.seeds}, lr multiples {args.lr_grid} of each method's "
        "default (adapters at the toy's lr, full fine-tuning at 0.1x). Held-out: Avg@4 on 200 unseen problems, "
        f"the same sample seeds before and after. Machine time of the cells: {report['machine_s'] / 3600:.2f} h.",
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
