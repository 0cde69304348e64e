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
