"""What a `perl bench toy` study amounts to: cells (variant x lr x seed) aggregated over seeds.

A cell is one ordinary verl run; its summary.json holds the held-out Avg@k before and after. Per
variant and lr the seeds give a mean and a standard deviation (pandas); a variant's best lr is the
one with the highest mean after. Tables: the paper's Table 3 layout at each variant's best lr (mean
+- std over seeds, the gain over the base, trainable %), and the lr sensitivity (every lr's mean);
Figure 1 with error bars (matplotlib).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pandas as pd

from perl.methods import CATEGORIES, METHODS
from perl.methods.claims import CLAIMS, REFERENCE


@dataclass(frozen=True)
class Cell:
    """One run of the study: a variant (METHOD[@LOSS][:rN]) at a multiple of its default lr, one seed."""

    variant: str
    lr_mult: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}/x{self.lr_mult:g}_seed{self.seed}"


def cells(variants: list[str], lr_grid: list[float], seeds: list[int]) -> list[Cell]:
    """Every cell, seeds innermost (a variant's first lr gets all its seeds before the next lr)."""
    return [Cell(v, float(m), int(s)) for v in variants for m in lr_grid for s in seeds]


def frame(rows: list[dict]) -> pd.DataFrame:
    """rows: {**asdict(cell), before, after, gain, trainable_percent, lr, label, wall_s,
    collapsed_at_step (None: ran every step)} per finished cell."""
    df = pd.DataFrame(rows)
    if "collapsed_at_step" not in df:
        df["collapsed_at_step"] = None
    return df


def by_lr(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of each (variant, lr multiple)."""
    g = df.groupby(["variant", "lr_mult"], sort=False)
    out = g.agg(label=("label", "first"), lr=("lr", "first"), trainable_percent=("trainable_percent", "first"),
                seeds=("seed", "nunique"), before=("before", "mean"), after=("after", "mean"),
                after_std=("after", "std"), gain=("gain", "mean"), gain_std=("gain", "std"),
                collapsed=("collapsed_at_step", lambda x: int(x.notna().sum()))).reset_index()
    return out.fillna({"after_std": 0.0, "gain_std": 0.0})


def best_lr(df: pd.DataFrame, search_seeds: list[int] | None = None) -> pd.DataFrame:
    """Each variant at the lr multiple with the highest mean held-out accuracy after training, with
    its mean and std over every seed run there. `search_seeds`: the lr is chosen on these seeds'
    cells alone (the lr search), so seeds added at the chosen lr later cannot move the choice to an
    lr that ran on fewer seeds."""
    agg = by_lr(df)
    chooser = by_lr(df[df.seed.isin(search_seeds)]) if search_seeds is not None else agg
    chosen = chooser.loc[chooser.groupby("variant", sort=False)["after"].idxmax(), ["variant", "lr_mult"]]
    return agg.merge(chosen, on=["variant", "lr_mult"]).reset_index(drop=True)


def plan_size(grids: dict[str, list[float]], seeds: list[int], search_seeds: int) -> int:
    """How many cells a study has: each variant's lr grid on the first `search_seeds` seeds, then the
    remaining seeds at its best lr."""
    return sum(len(g) * len(seeds[:search_seeds]) + len(seeds[search_seeds:]) for g in grids.values())


def split_variant(name: str) -> tuple[str, str, int | None]:
    """`METHOD[@LOSS][:rN]` -> (method, loss ("token" when absent), rank (None: the config's)),
    e.g. lora, lora@sgrpo, lora:r1 (rank-1 LoRA). Names are checked by perl.toy.bench.parse_variant."""
    head, _, rank = name.partition(":")
    method, _, loss = head.partition("@")
    if rank and not (rank.startswith("r") and rank[1:].isdigit() and int(rank[1:]) > 0):
        raise ValueError(f"--methods: {name!r}: a rank is written ':r' and a positive number, e.g. lora:r1")
    return method, loss or "token", int(rank[1:]) if rank else None


def _category(variant: str) -> str:
    return METHODS[split_variant(variant)[0]].category


def _collapsed(r) -> str:
    """' (collapsed: k of n seeds)' for a row of by_lr whose runs stopped early (perl.verl_glue.trainer)."""
    return f" (collapsed: {r.collapsed} of {r.seeds})" if r.collapsed else ""


def table3_markdown(best: pd.DataFrame, base: float) -> str:
    lines = ["| method | category | trainable % | best lr (x default) | seeds | Avg@k after (mean +- std) | gain over base |",
             "|---|---|---:|---:|---:|---:|---:|"]
    order = {c: i for i, c in enumerate(CATEGORIES)}
    rows = sorted(best.itertuples(), key=lambda r: (order[_category(r.variant)], -r.after))
    for r in rows:
        lines.append(f"| {r.label} | {_category(r.variant)} | {r.trainable_percent:.3g} | {r.lr:g} (x{r.lr_mult:g}) "
                     f"| {r.seeds} | {r.after:.3f} +- {r.after_std:.3f}{_collapsed(r)} | {r.after - base:+.3f} +- "
                     f"{r.gain_std:.3f} |")
    lines.append(f"| base (cold start) | | | | | {base:.3f} | |")
    return "\n".join(lines)


def lr_sensitivity_markdown(df: pd.DataFrame) -> str:
    agg = by_lr(df)
    mults = sorted(agg.lr_mult.unique())
    lines = ["| method | " + " | ".join(f"x{m:g}" for m in mults) + " |", "|---|" + "---:|" * len(mults)]
    for variant, rows in agg.groupby("variant", sort=False):
        cell = {r.lr_mult: f"{r.after:.3f} ({r.seeds}){_collapsed(r)}" for r in rows.itertuples()}
        lines.append(f"| {rows.label.iloc[0]} | " + " | ".join(cell.get(m, "–") for m in mults) + " |")
    return "\n".join(lines)


def plot_with_error_bars(best: pd.DataFrame, base: float, path: str) -> str | None:
    """Figure 1 (left) over seeds: accuracy after training vs trainable share, +- one std."""
    from perl.analysis.plotting import finish, new_figure

    pts = best[best.trainable_percent.notna() & (best.trainable_percent > 0)]
    if pts.empty:
        return None
    fig, (ax,) = new_figure()
    for r in pts.itertuples():
        ax.errorbar(r.trainable_percent, 100 * r.after, yerr=100 * r.after_std, fmt="o", capsize=3)
        ax.annotate(r.label, (r.trainable_percent, 100 * r.after), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.axhline(100 * base, color="black", linewidth=0.8, linestyle=":", label="base")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel("held-out Avg@k after RL (%, mean +- std over seeds)")
    return finish(fig, [ax], path)


def write_study(rows: list[dict], base: float, out_dir: str, search_seeds: list[int] | None = None) -> dict[str, str]:
    """The study's tables (markdown + CSV) and figure in `out_dir` (`search_seeds`: see best_lr)."""
    os.makedirs(out_dir, exist_ok=True)
    df = frame(rows)
    best = best_lr(df, search_seeds)
    paths = {"cells_csv": os.path.join(out_dir, "study_cells.csv"), "best_csv": os.path.join(out_dir, "study_best.csv"),
             "study_markdown": os.path.join(out_dir, "study.md")}
    df.to_csv(paths["cells_csv"], index=False)
    best.to_csv(paths["best_csv"], index=False)
    with open(paths["study_markdown"], "w") as f:
        f.write("## At each method's best lr\n\n" + table3_markdown(best, base) + "\n\n## lr sensitivity "
                "(mean Avg@k after, seeds in brackets)\n\n" + lr_sensitivity_markdown(df) + "\n\n## The claims, "
                "checked\n\n" + findings_markdown(df, base, search_seeds) + "\n")
    png = plot_with_error_bars(best, base, os.path.join(out_dir, "accuracy_vs_params_seeds.png"))
    if png:
        paths["plot_seeds"] = png
    return paths


def eta_line(done_s: list[float], remaining: int) -> str:
    """'~M min a cell, ~H h left' from the cells trained in this sitting."""
    if not done_s or remaining <= 0:
        return ""
    per = sum(done_s) / len(done_s)
    left = per * remaining
    return f"; ~{per / 60:.1f} min a cell, ~{left / 3600:.1f} h left" if left >= 3600 else \
        f"; ~{per / 60:.1f} min a cell, ~{math.ceil(left / 60)} min left"


def _verdict(test: str, after: float, std: float, lora: float, lora_std: float, base: float,
             collapsed: int = 0, spread_known: bool = True) -> str:
    """One comparison, read against the seed spread: a difference within one combined std of the two
    (sqrt(std_a^2 + std_b^2)) is a tie, not a finding. A collapse: training stopped early (dynamic
    sampling found no group left to learn from) or the result ended below the base.
    `spread_known=False` (one seed on a side): the verdict says it has no spread to read against."""
    spread = math.hypot(std, lora_std)
    caveat = "" if spread_known else " (one seed: no spread yet)"
    if test == "vs_lora":
        d = after - lora
        word = "above" if d > spread else "below" if d < -spread else "tie (within spread)"
        return f"{d:+.3f} vs LoRA: {word}{caveat}"
    if test == "collapse":
        stopped = f", training stopped early in {collapsed}" if collapsed else ""
        word = "collapsed" if collapsed or after < base - std else "no collapse"
        return f"{after - base:+.3f} vs base{stopped}: {word}{caveat if not collapsed else ''}"
    share = (after - base) / (lora - base) if lora > base else float("nan")
    floor = after < lora - spread and share < 0.5
    return f"{share:.0%} of LoRA's gain: {'floor' if floor else 'no floor'}{caveat}"


def findings_markdown(df: pd.DataFrame, base: float, search_seeds: list[int] | None = None,
                      shared_mult: float = 1.0) -> str:
    """The claims checked twice: at the shared lr (x`shared_mult`, the paper's one-lr design) on the
    lr search's seeds, the same for every method, and at each method's own best lr (mean +- std over
    its seeds). The shared-lr comparison is read against the seed spread measured at the best lrs
    (where the shared lr ran on one seed, it has no spread of its own)."""
    shared = by_lr(df[df.seed.isin(search_seeds)] if search_seeds is not None else df).set_index(["variant", "lr_mult"])
    best = best_lr(df, search_seeds).set_index("variant")
    if REFERENCE not in best.index:
        return "(LoRA, the reference of every claim, has no finished cell yet)"
    lines = ["| claim | method | shared lr: Avg@k (seeds) | verdict | best lr: Avg@k mean +- std (seeds) | verdict |",
             "|---|---|---:|---|---:|---|"]
    lora = best.loc[REFERENCE]
    lora_shared = shared.loc[(REFERENCE, shared_mult)] if (REFERENCE, shared_mult) in shared.index else None
    for claim, variants, test in CLAIMS:
        for v in variants:
            if v not in best.index:
                continue
            b = best.loc[v]
            known = b.seeds > 1 and lora.seeds > 1  # a spread to read the differences against
            best_text = (f"{b.after:.3f} +- {b.after_std:.3f} at x{b.lr_mult:g} ({b.seeds})",
                         _verdict(test, b.after, b.after_std, lora.after, lora.after_std, base, b.collapsed, known))
            shared_text = ("–", "–")
            if (v, shared_mult) in shared.index and lora_shared is not None:
                s = shared.loc[(v, shared_mult)]
                shared_text = (f"{s.after:.3f} ({s.seeds})",
                               _verdict(test, s.after, b.after_std, lora_shared.after, lora.after_std, base,
                                        s.collapsed, known))
            lines.append(f"| {claim} | {b.label} | {shared_text[0]} | {shared_text[1]} | {best_text[0]} | {best_text[1]} |")
    return "\n".join(lines)
