"""`perl bench toy`: a study of every method on the toy task -> Table 3, lr sensitivity, Figure 1.

The study is variants x learning rates x seeds (perl.toy.study.Cell). A seed sets the data order
(`data.seed`, which also seeds S-GRPO's token subsets and the adapter's init in PeRL's engine) and
vLLM's sampling (`actor_rollout_ref.rollout.seed`); an lr is a multiple of the variant's default
(the recipe's lr, full fine-tuning's 0.1x included). Each cell is one ordinary toy run through
verl's trainer (perl.verl_glue.entry.run) in `<out>/<variant>/x<lr>_seed<seed>`, so a cell is
exactly what `bash scripts/run.sh peft.name=... ` trains with those overrides. A finished cell (its
summary.json covers the requested steps and its perl_run.json the same settings) is reused, so a
stopped study resumes where it stopped and can be spread over several sittings; a cell with other
settings is refused. Outputs: `perl table`'s Table 3 and reward curves over the best-lr runs of
seed 0, and the study's own tables and error-bar figure (perl.toy.study) in `<out>/tables/`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from perl.io import atomic_file
from perl.toy.study import Cell, best_lr, cells, eta_line, frame, plan_size, split_variant, write_study


# The study's variants (issue 30): every method of the registry with DAPO's token loss, rank-1 LoRA
# (the paper's expressivity floor, which "LoRA Without Regret" and TinyLoRA dispute) and LoRA with
# the two token-efficient losses.
EXTRA_VARIANTS = ("lora:r1", "lora@sgrpo", "lora@tspmo")


def study_variants() -> list[str]:
    from perl.methods import METHODS

    return [*METHODS, *EXTRA_VARIANTS]


def parse_variant(name: str) -> tuple[str, str, int | None]:
    """`METHOD` (DAPO's token loss), `METHOD@LOSS` (a token-efficient loss: lora@sgrpo, lora@tspmo),
    either with `:rN` for another adapter rank (lora:r1): (method, loss, rank or None)."""
    from perl.algos.token_efficient import LOSS_MODES
    from perl.methods import METHODS

    method, loss, rank = split_variant(name)
    if method not in METHODS:
        raise ValueError(f"--methods: unknown method {method!r} in {name!r}; valid: {', '.join(METHODS)}")
    if loss not in LOSS_MODES:
        raise ValueError(f"--methods: unknown loss {loss!r} in {name!r}; valid after '@': {', '.join(LOSS_MODES)}")
    if rank is not None and METHODS[method].trains_every_parameter:
        raise ValueError(f"--methods: {name!r}: {method} has no adapter rank")
    return method, loss, rank


def variant_label(name: str) -> str:
    from perl.verl_glue.entry import run_label

    method, loss, rank = parse_variant(name)
    return run_label(method, loss) + (f" r={rank}" if rank is not None else "")


def variant_overrides(variant: str, out_dir: str, overrides: list[str]) -> list[str]:
    """The `perl train` overrides of one variant's run (its default lr and seed)."""
    method, loss, rank = parse_variant(variant)
    extra = [f"peft.name={method}", f"trainer.default_local_dir={out_dir}", f"trainer.experiment_name=toy_{variant}",
             f"perl.label={variant_label(variant)}"]
    if loss != "token":
        extra.append(f"perl.loss_mode={loss}")
    if rank is not None:  # alpha = 2r, the paper's ratio (r 32, alpha 64) and the toy's (8, 16)
        extra += [f"peft.rank={rank}", f"peft.alpha={2 * rank}"]
    # a method's own lr (full fine-tuning: 0.1 x the recipe's) is compose's rule, as in `perl train`
    return [*overrides, *extra]


def study_from_args(args, config_path: str, out: str, overrides: list[str]) -> dict[str, Any]:
    return bench_toy(config_path, args.methods or study_variants(), out, overrides, seeds=args.seeds,
                     lr_grid=args.lr_grid, lr_grid_for=args.lr_grid_for, search_seeds=args.lr_search_seeds,
                     extend_up=args.lr_extend_up, train=not args.no_train, extend_down=args.lr_extend_down)


def cell_overrides(config_path: str, cell: Cell, out: str, overrides: list[str]) -> list[str]:
    """The overrides of one cell: the variant's, its seed, and its lr when not the default."""
    from perl.verl_glue.config import compose

    plan = variant_overrides(cell.variant, os.path.join(os.path.abspath(out), cell.name), overrides)
    plan += [f"data.seed={cell.seed}", f"actor_rollout_ref.rollout.seed={cell.seed}"]
    if cell.lr_mult != 1.0:
        default = float(compose(config_path, plan).actor_rollout_ref.actor.optim.lr)
        plan.append(f"actor_rollout_ref.actor.optim.lr={float(f'{default * cell.lr_mult:.6g}'):g}")
    return plan


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
    if "eval_after" not in summary:
        return None  # not evaluated: the run resumes
    if summary.get("steps") != int(cfg.trainer.total_training_steps) and "collapsed_at_step" not in summary:
        return None  # shorter: the run resumes (a collapsed run is finished: its result is where it stopped)
    return summary


def lr_grids(variants: list[str], lr_grid: list[float], per_variant: list[str] | None = None) -> dict[str, list[float]]:
    """Each variant's lr multiples: `lr_grid`, or its own from `VARIANT=M,M,...` entries (--lr-grid-for)."""
    grids = {v: list(lr_grid) for v in variants}
    for entry in per_variant or []:
        variant, sep, mults = entry.partition("=")
        if not sep or variant not in grids:
            raise ValueError(f"--lr-grid-for: {entry!r}: expected VARIANT=M,M,... with VARIANT one of --methods "
                             f"({', '.join(variants)})")
        try:
            grids[variant] = [float(m) for m in mults.split(",")]
        except ValueError:
            raise ValueError(f"--lr-grid-for: {entry!r}: the multiples must be numbers, e.g. {variant}=1,4,16") from None
    for variant, grid in grids.items():
        if not grid or any(m <= 0 for m in grid):
            raise ValueError(f"--lr-grid/--lr-grid-for: {variant}: multiples of a method's default lr must be > 0, "
                             f"got {grid}")
    return grids


def study_plan(grids: dict[str, list[float]], seeds: list[int], search_seeds: int, rows: list[dict],
               progress: bool = False, extend_up: int = 0,
               on_extend: Callable[[int], None] | None = None, extend_down: int = 0) -> Iterator[Cell]:
    """The cells in order, variant by variant: its lr grid on the first `search_seeds` seeds, then
    the other seeds at the lr whose mean was best there. `rows`: the results, appended by the caller
    after each cell (the choice reads them). `extend_up`: while the best lr is the grid's largest, up
    to this many more points above it, each its top times the grid's last ratio (x4 for 1/4), so a
    search cut off below a method's optimum (low-parameter methods at a shared lr) continues;
    `extend_down`: while even the best lr ends below the base model (every lr of the grid too high:
    the run collapsed or unlearned), up to this many points below the grid's bottom.
    `on_extend(n)` hears of the n cells each extension adds."""
    search, rest = seeds[:search_seeds], seeds[search_seeds:]

    def best(variant: str):
        done = [r for r in rows if r["variant"] == variant and r["seed"] in search]
        return best_lr(frame(done)).iloc[0] if done else None  # None: none finished (no training)

    def best_mult(variant: str) -> float | None:
        b = best(variant)
        return None if b is None else float(b.lr_mult)

    def extend(variant: str, mult: float, why: str) -> Iterator[Cell]:
        if progress:
            print(f"[perl bench] {variant}: {why}; extending its lr grid to x{mult:g}", flush=True)
        if on_extend is not None:
            on_extend(len(search))
        yield from cells([variant], [mult], search)

    for variant, grid in grids.items():
        grid = sorted(grid)
        yield from cells([variant], grid, search)
        for _ in range(extend_up):
            if len(grid) < 2 or best_mult(variant) != grid[-1]:
                break
            grid.append(float(f"{grid[-1] * grid[-1] / grid[-2]:.6g}"))
            yield from extend(variant, grid[-1], "best at the top of its lr grid")
        for _ in range(extend_down):
            b = best(variant)
            if len(grid) < 2 or b is None or b.after >= b.before:
                break
            grid.insert(0, float(f"{grid[0] * grid[0] / grid[1]:.6g}"))
            yield from extend(variant, grid[0], f"even its best lr ends below the base ({b.after:.3f} < {b.before:.3f})")
        chosen = best_mult(variant) if rest else None
        if chosen is not None:
            if progress and len(grid) > 1:
                print(f"[perl bench] {variant}: best lr x{chosen:g} on seed(s) {search}; seeds {rest} there", flush=True)
            yield from cells([variant], [chosen], rest)


def bench_toy(config_path: str, variants: list[str], out: str, overrides: list[str] | None = None,
              progress: bool = True, seeds: list[int] | None = None, lr_grid: list[float] | None = None,
              lr_grid_for: list[str] | None = None, search_seeds: int | None = None,
              extend_up: int = 0, train: bool = True, extend_down: int = 0) -> dict[str, Any]:
    """Train every cell (finished ones are reused), then write the tables and plots.

    Per variant: its lr grid on the first `search_seeds` seeds (default: every seed, the full
    grid; `extend_up`, `extend_down`: see study_plan), then the remaining seeds at the lr that did best there.
    `train=False`: the tables of the cells finished so far (a study under way), nothing trained."""
    from perl.analysis.tables import write_tables
    from perl.verl_glue.entry import prepare, run
    from perl.verl_glue.heldout import BEFORE_DIR

    overrides = list(overrides or [])
    seeds = list(seeds or [0])
    for v in variants:
        parse_variant(v)  # every name checked before anything trains
    grids = lr_grids(variants, list(lr_grid or [1.0]), lr_grid_for)
    search_seeds = len(seeds) if search_seeds is None else search_seeds
    if not 1 <= search_seeds <= len(seeds):
        raise ValueError(f"--lr-search-seeds: between 1 and the number of --seeds ({len(seeds)}), got {search_seeds}")
    search = seeds[:search_seeds]
    total = [plan_size(grids, seeds, search_seeds)]  # grows when a grid is extended
    rows, trained_s, skipped, started = [], [], [], time.perf_counter()

    def train_or_reuse(cell: Cell) -> None:
        _, cfg, _ = prepare(["--config", config_path, *cell_overrides(config_path, cell, out, overrides)])
        summary = finished(os.path.join(out, cell.name), cfg)
        if summary is None and not train:
            skipped.append(cell.name)
            return
        if summary is None:
            if progress:
                print(f"[perl bench] [{len(rows) + 1}/{total[0]}] {cell.name}: training"
                      + eta_line(trained_s, total[0] - len(rows)), flush=True)
            t = time.perf_counter()
            summary = run(cfg)
            trained_s.append(time.perf_counter() - t)
        elif progress:
            print(f"[perl bench] [{len(rows) + 1}/{total[0]}] {cell.name}: finished before, reused", flush=True)
        rows.append({**asdict(cell), "label": variant_label(cell.variant), "run_dir": os.path.join(out, cell.name),
                     "before": summary["eval_before"], "after": summary["eval_after"], "gain": summary["gain"],
                     "trainable_percent": summary["trainable_percent"], "lr": summary["lr"],
                     "steps": summary["steps"], "collapsed_at_step": summary.get("collapsed_at_step"),
                     "wall_s": summary.get("wall_s")})

    def extended(n: int) -> None:
        total[0] += n

    for cell in study_plan(grids, seeds, search_seeds, rows, progress, extend_up, extended, extend_down):
        train_or_reuse(cell)
    if skipped and progress:
        print(f"[perl bench] not finished, left out: {len(skipped)} cells ({', '.join(skipped[:6])}"
              + (", ..." if len(skipped) > 6 else "") + ")", flush=True)
    if not rows:
        raise ValueError(f"{out}: no finished cell of this study yet")
    tables = os.path.join(out, "tables")
    base = rows[0]["before"]  # the same cold start and held-out set for every cell
    best = best_lr(frame(rows), search)
    best_runs = [r["run_dir"] for r in rows for b in best.itertuples()
                 if r["variant"] == b.variant and r["lr_mult"] == b.lr_mult and r["seed"] == min(seeds)]
    paths = write_tables([os.path.join(rows[0]["run_dir"], BEFORE_DIR), *best_runs], tables)
    paths.update(write_study(rows, base, tables, search))
    report = {"runs": rows, "tables": paths, "config": config_path, "overrides": overrides, "seeds": seeds,
              "lr_grids": grids, "search_seeds": search, "machine_s": sum(r["wall_s"] or 0 for r in rows),
              "unfinished": skipped,
              "this_sitting_s": time.perf_counter() - started}
    with atomic_file(os.path.join(out, "bench_toy.json")) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    return report
