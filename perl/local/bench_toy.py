"""`perl bench toy`: every method on the toy task with one budget -> Table 3 + Figure 1 (left, right).

Each method is one ordinary toy run (`recipe.train`) in `<out>/<method>`; finished runs are kept,
so an interrupted benchmark resumes with the next method. The tables and plots are `perl table`'s
(`perl.analysis.tables.write_tables`) over the runs plus the shared cold start.
"""

from __future__ import annotations

import json
import os
from typing import Any

from omegaconf import OmegaConf

from perl.io import atomic_file

FULL_LR_RATIO = 0.1  # the paper trains full fine-tuning at 1e-6 against 1e-5 for the adapters
LOSS_LABELS = {"sgrpo": "S-GRPO", "tspmo": "T-SPMO"}


def parse_variant(name: str) -> tuple[str, str]:
    """`METHOD` (DAPO's token loss) or `METHOD@LOSS` (a token-efficient loss: lora@sgrpo, lora@tspmo)."""
    from perl.methods import METHODS

    from perl.algos.token_efficient import LOSS_MODES

    method, _, loss = name.partition("@")
    if method not in METHODS:
        raise ValueError(f"--methods: unknown method {method!r} in {name!r}; valid: {', '.join(METHODS)}")
    if loss and loss not in LOSS_MODES:
        raise ValueError(f"--methods: unknown loss {loss!r} in {name!r}; valid after '@': {', '.join(LOSS_MODES)}")
    return method, loss or "token"


def toy_config(config_path: str, variant: str, out_dir: str, overrides: list[str]) -> dict[str, Any]:
    method, loss = parse_variant(variant)
    from .recipe import load_config

    cfg = load_config(config_path, overrides)
    cfg.method.name = method
    cfg.out_dir = out_dir
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if method == "full":
        resolved["rl"]["lr"] = resolved["rl"]["lr"] * FULL_LR_RATIO
    if loss != "token":
        resolved["rl"]["loss_mode"] = loss
        resolved["label"] = f"{method} ({LOSS_LABELS.get(loss, loss)})"
    return resolved


def bench_toy(config_path: str, methods: list[str], out: str, overrides: list[str] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Train every variant in `methods` (METHOD or METHOD@LOSS; finished runs are reused), then write
    the table and plots."""
    from perl.analysis.tables import write_tables

    from .engine import SUMMARY
    from .recipe import run_config_changes, train

    overrides = list(overrides or [])
    configs = {m: toy_config(config_path, m, os.path.join(out, m), overrides) for m in methods}  # checks names
    rows = []
    for i, method in enumerate(methods):
        run_dir = os.path.join(out, method)
        done = os.path.join(run_dir, SUMMARY)
        if os.path.exists(done) and os.path.exists(os.path.join(run_dir, "results.json")):
            changes = run_config_changes(run_dir, configs[method])
            if changes != []:  # None: no record of what it trained with
                what = "; ".join(changes) if changes else "no record of its settings (config.json)"
                raise ValueError(f"{run_dir} finished with other settings than requested ({what}); "
                                 "use another --out, or delete that run to retrain it")
            summary = json.load(open(done))
        else:
            if progress:
                print(f"[{i + 1}/{len(methods)}] {method}", flush=True)
            summary = train(configs[method], progress=progress)
        rows.append({"method": method, "label": configs[method].get("label", method), "before": summary["eval_before"], "after": summary["eval_after"],
                     "gain": summary["gain"], "trainable_percent": summary["trainable_percent"],
                     "lr": summary["config"]["lr"], "wall_s": summary.get("wall_s")})
    run_dirs = [os.path.join(out, methods[0], "eval_before")] + [os.path.join(out, m) for m in methods]
    paths = write_tables(run_dirs, os.path.join(out, "tables"))
    report = {"runs": rows, "tables": paths, "config": config_path, "overrides": overrides}
    with atomic_file(os.path.join(out, "bench_toy.json")) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    return report
