"""`perl bench toy` as a study (issue 30): cells over variants x lr multiples x seeds, their overrides,
and the aggregation over seeds (best lr, mean +- std, lr sensitivity, the error-bar figure)."""

from __future__ import annotations

import os

import pytest

from perl.toy.bench import cell_overrides
from perl.toy.study import Cell, best_lr, by_lr, cells, eta_line, frame, write_study
from perl.verl_glue import config as vc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "examples", "toy.yaml")


def test_cells_cover_the_grid_with_seeds_innermost():
    got = cells(["lora", "dora"], [0.25, 1], [0, 1])
    assert len(got) == 8 and got[:2] == [Cell("lora", 0.25, 0), Cell("lora", 0.25, 1)]
    assert got[0].name == "lora/x0.25_seed0"


def test_a_cell_sets_its_seed_everywhere_and_scales_the_methods_own_lr(tmp_path):
    lora = vc.compose(TOY, cell_overrides(TOY, Cell("lora", 4.0, 2), str(tmp_path), []))
    assert lora.actor_rollout_ref.actor.optim.lr == pytest.approx(4e-3)  # 4 x the toy's 1e-3
    assert lora.data.seed == 2 and lora.actor_rollout_ref.rollout.seed == 2
    assert lora.actor_rollout_ref.model.lora.perl.seed == 2  # the engine's: adapter init, S-GRPO subsets
    assert lora.trainer.default_local_dir == str(tmp_path / "lora" / "x4_seed2")
    full = vc.compose(TOY, cell_overrides(TOY, Cell("full", 0.25, 0), str(tmp_path), []))
    assert full.actor_rollout_ref.actor.optim.lr == pytest.approx(0.25 * 1e-4)  # of full's own default (0.1x)
    default = vc.compose(TOY, cell_overrides(TOY, Cell("full", 1.0, 0), str(tmp_path), []))
    assert default.actor_rollout_ref.actor.optim.lr == pytest.approx(1e-4)


def test_the_studys_variants_include_rank_1_lora_and_the_token_efficient_losses(tmp_path):
    from perl.methods import METHODS
    from perl.toy.bench import parse_variant, study_variants

    assert study_variants() == [*METHODS, "lora:r1", "lora@sgrpo", "lora@tspmo"]
    r1 = vc.compose(TOY, cell_overrides(TOY, Cell("lora:r1", 4.0, 1), str(tmp_path), []))
    assert (r1.peft.rank, r1.peft.alpha) == (1, 2) and r1.peft.name == "lora"  # alpha = 2r, as the toy's 8/16
    assert r1.actor_rollout_ref.actor.optim.lr == pytest.approx(4e-3) and r1.perl.label == "lora r=1"
    assert r1.trainer.default_local_dir == str(tmp_path / "lora:r1" / "x4_seed1")
    sgrpo = vc.compose(TOY, cell_overrides(TOY, Cell("lora@sgrpo", 1.0, 0), str(tmp_path), []))
    assert sgrpo.perl.loss_mode == "sgrpo" and sgrpo.perl.label == "lora (S-GRPO)" and sgrpo.peft.rank == 8
    for bad, why in [("lora:1", "':r' and a positive number"), ("lora:r0", "positive"),
                     ("full:r1", "no adapter rank"), ("lora@dpo", "unknown loss"), ("qlora", "unknown method")]:
        with pytest.raises(ValueError, match=why):
            parse_variant(bad)


def rows():
    out = []
    for variant, mult, seed, after in [("lora", 1, 0, 0.80), ("lora", 1, 1, 0.84), ("lora", 4, 0, 0.70),
                                       ("lora", 4, 1, 0.74), ("vera", 1, 0, 0.60), ("vera", 4, 0, 0.66),
                                       ("vera", 4, 1, 0.62)]:
        out.append({"variant": variant, "lr_mult": float(mult), "seed": seed, "label": variant, "lr": 1e-3 * mult,
                    "before": 0.58, "after": after, "gain": after - 0.58,
                    "trainable_percent": 9.45 if variant == "lora" else 0.1, "wall_s": 300.0})
    return out


def test_each_variant_is_taken_at_its_best_lr_with_mean_and_std_over_seeds():
    best = best_lr(frame(rows())).set_index("variant")
    assert best.loc["lora", "lr_mult"] == 1 and best.loc["lora", "after"] == pytest.approx(0.82)
    assert best.loc["lora", "after_std"] == pytest.approx(0.028284, abs=1e-5) and best.loc["lora", "seeds"] == 2
    assert best.loc["vera", "lr_mult"] == 4 and best.loc["vera", "after"] == pytest.approx(0.64)
    single = by_lr(frame(rows())).set_index(["variant", "lr_mult"])
    assert single.loc[("vera", 1.0), "after_std"] == 0.0 and single.loc[("vera", 1.0), "seeds"] == 1


def test_the_study_writes_its_tables_and_figure(tmp_path):
    paths = write_study(rows(), 0.58, str(tmp_path))
    text = open(paths["study_markdown"]).read()
    assert "| lora | Baseline | 9.45 | 0.001 (x1) | 2 | 0.820 +- 0.028 | +0.240 +- 0.028 |" in text
    assert "| vera | Efficient | 0.1 | 0.004 (x4) | 2 | 0.640 +- 0.028 | +0.060 +- 0.028 |" in text
    assert "| lora | 0.820 (2) | 0.720 (2) |" in text and "| vera | 0.600 (1) | 0.640 (2) |" in text
    assert os.path.getsize(paths["plot_seeds"]) > 1000 and os.path.exists(paths["cells_csv"])


def test_the_eta_line_counts_what_is_left():
    assert eta_line([], 5) == "" and eta_line([120.0, 180.0], 0) == ""
    assert eta_line([120.0, 180.0], 4) == "; ~2.5 min a cell, ~10 min left"
    assert eta_line([600.0], 30) == "; ~10.0 min a cell, ~5.0 h left"


def test_lr_grids_per_variant_and_their_errors():
    from perl.toy.bench import lr_grids

    grids = lr_grids(["lora", "adalora"], [1.0, 4.0], ["adalora=1,4,16"])
    assert grids == {"lora": [1.0, 4.0], "adalora": [1.0, 4.0, 16.0]}
    for entry, why in [("vera=1,4", "one of --methods"), ("adalora", "VARIANT=M"), ("adalora=1,x", "numbers"),
                       ("adalora=0,1", "must be > 0")]:
        with pytest.raises(ValueError, match=why):
            lr_grids(["lora", "adalora"], [1.0], [entry])


def test_the_lr_search_runs_on_the_first_seeds_and_the_rest_at_the_best_lr():
    """`--lr-search-seeds 1`: each variant's grid on seed 0, then seeds 1 and 2 at the lr that won
    on seed 0 (read from the results as they come in)."""
    from perl.toy.bench import study_plan
    from perl.toy.study import plan_size

    after = {("lora", 1.0, 0): 0.80, ("lora", 4.0, 0): 0.70, ("vera", 1.0, 0): 0.60, ("vera", 4.0, 0): 0.66,
             ("vera", 16.0, 0): 0.62}
    grids, seeds, got, results = {"lora": [1.0, 4.0], "vera": [1.0, 4.0, 16.0]}, [0, 1, 2], [], []
    for cell in study_plan(grids, seeds, 1, results):
        got.append(cell)
        results.append({"variant": cell.variant, "lr_mult": cell.lr_mult, "seed": cell.seed, "label": cell.variant,
                        "lr": cell.lr_mult, "after": after.get((cell.variant, cell.lr_mult, cell.seed), 0.5),
                        "before": 0.5, "gain": 0.0, "trainable_percent": 1.0, "wall_s": 1.0})
    assert [c.name for c in got] == [
        "lora/x1_seed0", "lora/x4_seed0", "lora/x1_seed1", "lora/x1_seed2",
        "vera/x1_seed0", "vera/x4_seed0", "vera/x16_seed0", "vera/x4_seed1", "vera/x4_seed2"]
    assert plan_size(grids, seeds, 1) == len(got) and plan_size(grids, seeds, 3) == 15
    # seeds 1-2 at x4 came out low (0.5): the table still takes the lr chosen on seed 0, with 3 seeds
    best = best_lr(frame(results), [0]).set_index("variant")
    assert best.loc["vera", "lr_mult"] == 4 and best.loc["vera", "seeds"] == 3
    assert best.loc["vera", "after"] == pytest.approx((0.66 + 0.5 + 0.5) / 3)
    assert best_lr(frame(results)).set_index("variant").loc["vera", "lr_mult"] == 16  # chosen over all seeds


def test_the_claims_are_checked_against_lora_and_the_seed_spread():
    base = 0.58
    cells_ = [("lora", 1, 0, 0.80), ("lora", 1, 1, 0.84), ("lora", 1, 2, 0.82),
              ("dora", 1, 0, 0.86), ("dora", 1, 1, 0.88), ("dora", 1, 2, 0.87),  # above LoRA beyond the spread
              ("miss", 1, 0, 0.83), ("miss", 4, 0, 0.81), ("miss", 1, 1, 0.79), ("miss", 1, 2, 0.81),  # a tie
              ("pissa", 1, 0, 0.40), ("pissa", 0.25, 0, 0.62), ("pissa", 0.25, 1, 0.64), ("pissa", 0.25, 2, 0.60),
              ("vera", 1, 0, 0.60), ("vera", 4, 0, 0.64), ("vera", 4, 1, 0.62), ("vera", 4, 2, 0.63)]
    df = frame([{"variant": v, "lr_mult": float(m), "seed": s, "label": v, "lr": m, "before": base, "after": a,
                 "gain": a - base, "trainable_percent": 1.0, "wall_s": 1.0} for v, m, s, a in cells_])
    from perl.toy.study import findings_markdown

    text = findings_markdown(df, base, [0])
    row = {line.split(" | ")[1]: line for line in text.splitlines()[2:]}
    assert "| 0.860 (1) | +0.060 vs LoRA: above | 0.870 +- 0.010 at x1 (3) | +0.050 vs LoRA: above |" in row["dora"]
    assert "at x1 (3) | -0.010 vs LoRA: tie (within spread) |" in row["miss"]
    # PiSSA collapses at the shared lr and not at its own (lower) one
    assert "| 0.400 (1) | -0.180 vs base: collapsed |" in row["pissa"] and "at x0.25 (3) | +0.040 vs base: no collapse |" in row["pissa"]
    assert "| 0.600 (1) | 9% of LoRA's gain: floor |" in row["vera"] and "21% of LoRA's gain: floor" in row["vera"]
    assert "adalora" not in row and "tinylora" not in row  # no cells: no rows


def test_a_grid_whose_best_is_its_top_is_extended_upwards():
    """`--lr-extend-up 2`: AdaLoRA's best at x4 (the top of 1, 4) adds x16, best again adds x64, then
    the limit; LoRA's best at x1 adds nothing. The other seeds run at the final best."""
    from perl.toy.bench import study_plan

    after = {("lora", 1.0): 0.8, ("lora", 4.0): 0.7, ("adalora", 1.0): 0.6, ("adalora", 4.0): 0.7,
             ("adalora", 16.0): 0.8, ("adalora", 64.0): 0.85}
    got, results, added = [], [], []
    for cell in study_plan({"lora": [1.0, 4.0], "adalora": [4.0, 1.0]}, [0, 1], 1, results, extend_up=2,
                           on_extend=added.append):
        got.append(cell.name)
        results.append({"variant": cell.variant, "lr_mult": cell.lr_mult, "seed": cell.seed, "label": cell.variant,
                        "lr": cell.lr_mult, "after": after[(cell.variant, cell.lr_mult)] - 0.01 * cell.seed,
                        "before": 0.5, "gain": 0.0, "trainable_percent": 1.0, "wall_s": 1.0})
    assert got == ["lora/x1_seed0", "lora/x4_seed0", "lora/x1_seed1", "adalora/x1_seed0", "adalora/x4_seed0",
                   "adalora/x16_seed0", "adalora/x64_seed0", "adalora/x64_seed1"]
    assert added == [1, 1]


def test_a_collapsed_cell_is_marked_and_counts_as_a_collapse():
    """A run whose training collapsed (perl.verl_glue.trainer: dynamic sampling found nothing left to
    learn from) is finished at the step it stopped: the tables say so and the SVD claim counts it."""
    from perl.toy.study import findings_markdown, lr_sensitivity_markdown

    base = 0.58
    cells_ = [("lora", 1, 0, 0.80, None), ("milora", 1, 0, 0.60, 4), ("milora", 4, 0, 0.50, 3),
              ("dora", 1, 0, 0.81, None)]
    df = frame([{"variant": v, "lr_mult": float(m), "seed": s, "label": v, "lr": m, "before": base, "after": a,
                 "gain": a - base, "trainable_percent": 1.0, "wall_s": 1.0, "collapsed_at_step": c}
                for v, m, s, a, c in cells_])
    assert "| milora | 0.600 (1) (collapsed: 1 of 1) | 0.500 (1) (collapsed: 1 of 1) |" in lr_sensitivity_markdown(df)
    row = [line for line in findings_markdown(df, base, [0]).splitlines() if "| milora |" in line][0]
    # above the base at its best lr, yet its training stopped early: a collapse all the same
    assert "| 0.600 (1) | +0.020 vs base, training stopped early in 1: collapsed |" in row
    assert by_lr(df).set_index("variant").loc["lora", "collapsed"] == 0
    dora = [line for line in findings_markdown(df, base, [0]).splitlines() if "| dora |" in line][0]
    assert "+0.010 vs LoRA: above (one seed: no spread yet)" in dora  # one seed each: no spread to read against


def test_a_study_under_way_plans_no_seed_cells_for_a_variant_without_finished_search_cells():
    """`--no-train` (the tables of a study under way) skips unfinished cells: a variant none of whose
    search cells has finished has no best lr yet, so neither its extension nor its other seeds."""
    from perl.toy.bench import study_plan

    rows = []  # nothing finished
    got = [c.name for c in study_plan({"lora": [1.0, 4.0]}, [0, 1], 1, rows, extend_up=1)]
    assert got == ["lora/x1_seed0", "lora/x4_seed0"]


def test_a_grid_whose_best_still_ends_below_the_base_is_extended_downwards():
    """`--lr-extend-down 1`: LoRA+ collapsed at x1 and x4 (below the base 0.5) gets x0.25 before its
    other seeds; LoRA, above the base, gets nothing."""
    from perl.toy.bench import study_plan

    after = {("lora", 1.0): 0.8, ("lora", 4.0): 0.7, ("lora_plus", 1.0): 0.1, ("lora_plus", 4.0): 0.0,
             ("lora_plus", 0.25): 0.8}
    got, results = [], []
    for cell in study_plan({"lora": [1.0, 4.0], "lora_plus": [1.0, 4.0]}, [0, 1], 1, results, extend_down=1):
        got.append(cell.name)
        results.append({"variant": cell.variant, "lr_mult": cell.lr_mult, "seed": cell.seed, "label": cell.variant,
                        "lr": cell.lr_mult, "after": after[(cell.variant, cell.lr_mult)], "before": 0.5, "gain": 0.0,
                        "trainable_percent": 1.0, "wall_s": 1.0})
    assert got == ["lora/x1_seed0", "lora/x4_seed0", "lora/x1_seed1", "lora_plus/x1_seed0", "lora_plus/x4_seed0",
                   "lora_plus/x0.25_seed0", "lora_plus/x0.25_seed1"]
