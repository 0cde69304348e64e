"""Bad input refused before Ray (issue 27): data files that verl would fail on minutes later, and
config values of the wrong type or range, each named in the error (file, column, row or key)."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import ready
from perl.data import arithmetic_rows, to_verl_rows, write_parquet
from perl.verl_glue import config as vc
from perl.verl_glue.entry import main


def rows(n: int = 4) -> list[dict]:
    return to_verl_rows(arithmetic_rows(n, 1, ("add",), seed=0), "arith", "train").rows


def check(paths, *overrides):
    return vc.check(vc.compose({}, ready(paths, *overrides)), require_vllm=False)


def bad_file(tmp_path, name: str, frame: pd.DataFrame) -> str:
    path = str(tmp_path / name)
    frame.to_parquet(path, index=False)
    return path


def test_a_good_file_passes_and_its_prompts_are_measured(paths):
    reports = vc.check_data(vc.compose({}, ready(paths)))
    assert [r.rows for r in reports] == [4, 4]
    assert all(r.longest and r.longest > 10 and r.overlong == 0 for r in reports)  # the tiny model's tokenizer


@pytest.mark.parametrize("mutate,text", [
    (lambda f: f.drop(columns=["reward_model"]), "column 'reward_model' is missing"),
    (lambda f: f.drop(columns=["prompt"]), "column 'prompt' is missing"),
    (lambda f: f.assign(prompt=["What is 1+1?"] * len(f)), "column 'prompt' is large_string, not a chat list"),
    (lambda f: f.assign(reward_model=[{"style": "rule", "ground_truth": "2"}, {"style": "rule", "ground_truth": None},
                                      *f.reward_model[2:]]), "row 1: reward_model.ground_truth is null"),
    (lambda f: f.iloc[:0], "the file has no rows"),
])
def test_a_bad_training_file_is_refused_naming_the_file_and_column(paths, tmp_path, mutate, text):
    path = bad_file(tmp_path, "train.parquet", mutate(pd.DataFrame(rows())))
    with pytest.raises(vc.ConfigError) as err:
        check(paths, f"data.train_files={path}")
    assert f"data.train_files: {path}" in str(err.value) and text in str(err.value)


def test_a_csv_named_parquet_is_refused(paths, tmp_path):
    path = tmp_path / "train.parquet"
    pd.DataFrame(rows()).to_csv(path)
    with pytest.raises(vc.ConfigError, match="data.train_files: .*train.parquet is not a readable parquet file"):
        check(paths, f"data.train_files={path}")


def test_the_heldout_and_val_files_are_checked_too(paths, tmp_path):
    path = bad_file(tmp_path, "heldout.parquet", pd.DataFrame(rows()).drop(columns=["reward_model"]))
    with pytest.raises(vc.ConfigError, match="perl.heldout.data: .*column 'reward_model' is missing"):
        check(paths, f"perl.heldout.data={path}", "trainer.save_freq=1")
    with pytest.raises(vc.ConfigError, match="data.val_files: .*column 'reward_model' is missing"):
        check(paths, f"data.val_files={path}")


def test_overlong_prompts_are_refused_or_reported_as_verl_would_treat_them(paths, tmp_path):
    long = rows()
    long[2]["prompt"] = [{"role": "user", "content": "What is 1 + 1? " * 20}]
    path = str(tmp_path / "long.parquet")
    write_parquet(long, path)
    with pytest.raises(vc.ConfigError, match=r"data.train_files: .*long.parquet: row 2 has a \d+-token prompt, over "
                                             r"data.max_prompt_length=100 \(1 of 4 prompts are\)"):
        check(paths, f"data.train_files={path}", "data.max_prompt_length=100", "data.filter_overlong_prompts=false")
    summary = check(paths, f"data.train_files={path}", "data.max_prompt_length=100")  # verl filters: a note
    assert any("1 of 4 prompts exceed data.max_prompt_length=100" in n for n in summary["data_notes"])
    with pytest.raises(vc.ConfigError, match="every prompt is longer than data.max_prompt_length=5"):
        check(paths, f"data.train_files={path}", "data.max_prompt_length=5")


@pytest.mark.parametrize("override,text", [
    ("actor_rollout_ref.actor.optim.lr=abc", "actor_rollout_ref.actor.optim.lr='abc': verl expects a number"),
    ("actor_rollout_ref.actor.use_kl_loss=maybe", "actor_rollout_ref.actor.use_kl_loss='maybe': verl expects a bool"),
    ("actor_rollout_ref.rollout.n=-2", "actor_rollout_ref.rollout.n=-2: must be >= 1"),
    ("actor_rollout_ref.actor.optim.lr=-0.1", "actor_rollout_ref.actor.optim.lr=-0.1: must be >= 0"),
])
def test_a_value_of_the_wrong_type_or_range_is_refused_in_the_dry_run_too(paths, capsys, override, text):
    with pytest.raises(vc.ConfigError) as err:
        check(paths, override)
    assert text in str(err.value)
    assert main(["--dry-run", *ready(paths, override)]) == 2
    assert text in capsys.readouterr().err
