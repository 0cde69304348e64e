"""`perl bench toy`: every method on the toy task with one budget -> Table 3 + Figure 1 (left, right).

Each variant is one ordinary toy run through verl's trainer (perl.verl_glue.entry.run) in
`<out>/<variant>`, so the table compares exactly what `bash scripts/run.sh peft.name=...` trains.
A finished run (its summary.json covers the requested steps and its perl_run.json the same
settings) is kept, so an interrupted benchmark resumes with the next variant; one with other
settings is refused. The tables and plots are `perl table`'s (`perl.analysis.tables.write_tables`)
over the runs plus the shared cold start's evaluation.
"""

from __future__ import annotations

import json
import os
from typing import Any

from perl.io import atomic_file


def parse_variant(name: str) -> tuple[str, str]:
    """`METHOD` (DAPO's token loss) or `METHOD@LOSS` (a token-efficient loss: lora@sgrpo, lora@tspmo)."""
    from perl.algos.token_efficient import LOSS_MODES
    from perl.methods import METHODS

    method, _, loss = name.partition("@")
    if method not in METHODS:
        raise ValueError(f"--methods: unknown method {method!r} in {name!r}; valid: {', '.join(METHODS)}")
    if loss and loss not in LOSS_MODES:
        raise ValueError(f"--methods: unknown loss {loss!r} in {name!r}; valid after '@': {', '.join(LOSS_MODES)}")
    return method, loss or "token"


def variant_overrides(variant: str, out_dir: str, overrides: list[str]) -> list[str]:
    """The `perl train` overrides of one variant's run."""
    method, loss = parse_variant(variant)
    extra = [f"peft.name={method}", f"trainer.default_local_dir={out_dir}", f"trainer.experiment_name=toy_{variant}"]
    if loss != "token":
        extra.append(f"perl.loss_mode={loss}")
    # a method's own lr (full fine-tuning: 0.1 x the recipe's) is compose's rule, as in `perl train`
    return [*overrides, *extra]


def finished(run_dir: str, cfg) -> dict[str, Any] | None:
    """The summary of a run of `cfg` that already finished in `run_dir`; None if there is none.
    A finished run with other settings is an error (delete it or use another --out)."""
    from perl.verl_glue.config import resolved
    from perl.verl_glue.run_dir import RUN_FILE, SUMMARY, identity_changes, run_identity

    summary_path, record = os.path.join(run_dir, SUMMARY), os.path.join(run_dir, RUN_FILE)
    if not (os.path.exists(summary_path) and os.path.exists(record)):
        return None
    summary = json.load(open(summary_path))
    changes = identity_changes(json.load(open(record))["identity"], run_identity(resolved(cfg)))
    if changes:
        raise ValueError(f"{run_dir} finished with other settings than requested ({'; '.join(changes)}); "
                         "use another --out, or delete that run to retrain it")
    if summary.get("steps") != int(cfg.trainer.total_training_steps) or "eval_after" not in summary:
        return None  # shorter, or not evaluated: the run resumes
    return summary


def bench_toy(config_path: str, variants: list[str], out: str, overrides: list[str] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Train every variant (METHOD or METHOD@LOSS; finished runs are reused), then write the table and plots."""
    from perl.analysis.tables import write_tables
    from perl.verl_glue.entry import prepare, run, run_label
    from perl.verl_glue.heldout import BEFORE_DIR

    overrides = list(overrides or [])
    plans = {v: variant_overrides(v, os.path.join(os.path.abspath(out), v), overrides)
             for v in variants}  # checks every name before anything trains
    rows = []
    for i, variant in enumerate(variants):
        _, cfg, _ = prepare(["--config", config_path, *plans[variant]])
        summary = finished(os.path.join(out, variant), cfg)
        if summary is None:
            if progress:
                print(f"[perl bench] [{i + 1}/{len(variants)}] {variant}", flush=True)
            summary = run(cfg)
        method, loss = parse_variant(variant)
        rows.append({"method": variant, "label": run_label(method, loss),
                     "before": summary["eval_before"], "after": summary["eval_after"], "gain": summary["gain"],
                     "trainable_percent": summary["trainable_percent"], "lr": summary["lr"],
                     "steps": summary["steps"], "wall_s": summary.get("wall_s")})
    run_dirs = [os.path.join(out, variants[0], BEFORE_DIR)] + [os.path.join(out, v) for v in variants]
    paths = write_tables(run_dirs, os.path.join(out, "tables"))
    report = {"runs": rows, "tables": paths, "config": config_path, "overrides": overrides}
    with atomic_file(os.path.join(out, "bench_toy.json")) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    return report
