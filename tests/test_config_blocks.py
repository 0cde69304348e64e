"""PeRL's typed config blocks, the run identity of the toy, and the rules that had two versions.

Each test here failed on the code before the config became a package (issue 25): the toy's
template was missing from the run identity; S-GRPO's token subsets ignored `data.seed`; full
fine-tuning trained at the toy's adapter lr through `perl train` and at 0.1x through `perl bench
toy`; `perl train` and `python -m perl.verl_glue` had different options; `perl methods --methods`
documented METHOD@LOSS and refused it.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
from omegaconf import OmegaConf

from conftest import ready
from perl.verl_glue import config as vc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "examples", "toy.yaml")


# ---- typed blocks ------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,yaml_key", [(vc.PeftBlock, "peft"), (vc.PerlBlock, "perl"),
                                          (vc.HeldoutBlock, "perl.heldout")])
def test_blocks_and_the_base_yaml_list_the_same_keys(cls, yaml_key):
    base = OmegaConf.load(os.path.join(ROOT, "perl", "verl_glue", "config", "perl_dapo.yaml"))
    fields = dataclasses.fields(cls)
    assert sorted(OmegaConf.select(base, yaml_key)) == sorted(f.name for f in fields)
    assert all(f.metadata.get("help") for f in fields), "every field has a help line"


@pytest.mark.parametrize("overrides,text", [
    (["peft.rank=abc"], "peft.rank: 'abc' is not a int"),
    (["peft.alpha=true"], "peft.alpha: True is not a float"),
    (["peft.rnk=4"], "peft: unknown key(s) ['rnk']; allowed: name, rank"),
    (["perl.dump_rollout_tokens=3"], "perl.dump_rollout_tokens: 3 is not a bool"),
    (["perl.heldout.k=four"], "perl.heldout.k: 'four' is not a int"),
    (["perl.heldout.k=0"], "perl.heldout.k must be >= 1"),
    (["perl.console=loud"], "perl.console: 'loud' is not one of quiet, verbose"),
    (["perl.algo=grpo"], "perl: unknown key(s) ['algo']"),
])
def test_a_block_value_of_the_wrong_type_or_name_is_refused_naming_the_field(paths, overrides, text):
    with pytest.raises(vc.ConfigError) as err:
        vc.compose({}, ready(paths, *overrides))
    assert text in str(err.value)


def test_the_cpu_profile_is_one_yaml_layer_with_the_required_settings_in_code():
    from perl.verl_glue.config.cpu import CPU_REQUIRED, cpu_defaults

    defaults = cpu_defaults()
    assert defaults["actor_rollout_ref.rollout.dtype"] == "float32"
    assert defaults["actor_rollout_ref.actor.fsdp_config.mixed_precision"]["param_dtype"] == "fp32"
    assert not set(defaults) & set(CPU_REQUIRED)  # what a CPU run cannot do without is not a default


# ---- the run identity ----------------------------------------------------------------------------

def test_the_toy_template_is_part_of_the_run_identity(tmp_path):
    """A rerun under another template writes other data: it must be refused, not resumed."""
    from perl.verl_glue.run_dir import LATEST, claim, run_identity

    run = tmp_path / "run"
    first = vc.resolved(vc.compose(TOY, [f"trainer.default_local_dir={run}"]))
    other = vc.resolved(vc.compose(TOY, [f"trainer.default_local_dir={run}", "perl.toy.template=Q. {question}"]))
    assert run_identity(first)["perl.toy.template"] == "{question}"
    claim(str(run), first)
    (run / LATEST).write_text("2")  # the run has a checkpoint
    with pytest.raises(ValueError, match=r"perl.toy.template: \{question\} -> Q. \{question\}"):
        claim(str(run), other)


# ---- S-GRPO's seed ---------------------------------------------------------------------------------

def test_sgrpo_token_subsets_follow_the_runs_seed(paths):
    """The engine draws S-GRPO's subsets from `model.lora.perl.seed`, which is `data.seed`."""
    a = vc.compose({}, ready(paths, "perl.loss_mode=sgrpo", "data.seed=3"))
    b = vc.compose({}, ready(paths, "perl.loss_mode=sgrpo"))
    assert a.actor_rollout_ref.model.lora.perl.seed == 3 and b.actor_rollout_ref.model.lora.perl.seed == 0
    from perl.verl_glue.token_subset import subset_generator

    import torch

    draw = lambda seed: torch.rand(8, generator=subset_generator(seed, optimizer_step=5, rank=1))  # noqa: E731

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(0))


# ---- full fine-tuning's lr: one rule --------------------------------------------------------------

def test_full_fine_tuning_lr_is_one_rule_for_perl_train_and_perl_bench(tmp_path):
    from perl.toy.bench import variant_overrides

    lora = vc.compose(TOY, []).actor_rollout_ref.actor.optim.lr
    full = vc.compose(TOY, ["peft.name=full"]).actor_rollout_ref.actor.optim.lr
    assert full == pytest.approx(0.1 * lora)  # bash scripts/run.sh peft.name=full
    bench = vc.compose(TOY, variant_overrides("full", str(tmp_path / "full"), []))
    assert bench.actor_rollout_ref.actor.optim.lr == full  # perl bench toy: the same run
    # an lr given on the command line is the run's lr, for every method
    assert vc.compose(TOY, ["peft.name=full", "actor_rollout_ref.actor.optim.lr=0.02"]).actor_rollout_ref.actor.optim.lr == 0.02


# ---- the command line -------------------------------------------------------------------------------

def test_perl_train_and_the_module_entry_point_share_one_parser():
    import argparse

    from perl.cli import build_parser as cli_parser
    from perl.verl_glue.entry import build_parser

    def options(p: argparse.ArgumentParser) -> dict[str, object]:
        return {a.dest: a.default for a in p._actions if a.dest != "help"}

    train = next(a for a in cli_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    assert options(train) == options(build_parser())


def test_perl_train_accepts_the_entry_points_options(paths, capsys):
    from perl.cli import main

    rc = main(["train", "--dry-run", "--no-path-checks", "--format", "json", *ready(paths)])
    assert rc == 0 and '"adapter"' in capsys.readouterr().out


def test_perl_methods_takes_method_at_loss_names(capsys):
    from perl.cli import main

    assert main(["methods", "--model", "tiny-llama", "--methods", "lora@sgrpo", "dora", "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert '"method": "lora"' in out and '"method": "dora"' in out
    assert main(["methods", "--methods", "lora@ppo"]) == 2


# ---- checkpoints and run directories (issue 27) -----------------------------------------------------

def fake_checkpoint(run, step: int, payload: bytes = b"x" * 1000) -> None:
    """A checkpoint as verl lays it out (shards, then the marker), with PeRL's manifest."""
    from perl.verl_glue.checkpoints import step_dir, write_manifest
    from perl.verl_glue.run_dir import LATEST

    actor = os.path.join(step_dir(str(run), step), "actor")
    os.makedirs(os.path.join(actor, "perl_adapter"), exist_ok=True)
    open(os.path.join(actor, "model_world_size_1_rank_0.pt"), "wb").write(payload)
    open(os.path.join(actor, "perl_adapter", "adapter_config.json"), "w").write("{}")
    (run / LATEST).write_text(str(step))
    write_manifest(str(run), step)


def test_a_truncated_shard_is_found_and_the_run_resumes_from_the_newest_intact_checkpoint(tmp_path):
    from perl.verl_glue.checkpoints import resume_plan, verify
    from perl.verl_glue.run_dir import latest_step

    run = tmp_path / "run"
    for step in (2, 4, 6):
        fake_checkpoint(run, step)
    assert verify(str(run), 6) == [] and resume_plan(str(run)).step == 6
    shard = run / "global_step_6" / "actor" / "model_world_size_1_rank_0.pt"
    shard.write_bytes(b"x" * 10)  # truncated after it was written
    (run / "global_step_4" / "actor" / "perl_adapter" / "adapter_config.json").write_text('[]')  # edited, same size
    assert verify(str(run), 6) == ["actor/model_world_size_1_rank_0.pt has 10 bytes, 1,000 when saved"]
    assert "SHA-256 differs" in verify(str(run), 4)[0]
    plan = resume_plan(str(run))
    assert plan.step == 2 and latest_step(str(run)) == 2  # verl resumes from the marker
    assert "checkpoint 6" in plan.messages[0] and "model_world_size_1_rank_0.pt has 10 bytes" in plan.messages[0]
    aside = [p for p in os.listdir(run) if p.startswith("global_step_6.damaged-")]
    assert len(aside) == 1 and not (run / "global_step_6").exists()  # moved, not deleted
    # nothing intact left: refused, naming the damaged file
    (run / "global_step_2" / "actor" / "model_world_size_1_rank_0.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="checkpoint 2 .* is damaged: actor/model_world_size_1_rank_0.pt has 0 bytes"):
        resume_plan(str(run))


def test_a_marker_naming_a_missing_checkpoint_resumes_from_the_newest_intact_one(tmp_path):
    """A checkpoint directory gone from under its marker (deleted by hand): nothing to move aside."""
    import shutil

    from perl.verl_glue.checkpoints import resume_plan
    from perl.verl_glue.run_dir import latest_step

    run = tmp_path / "run"
    for step in (2, 4):
        fake_checkpoint(run, step)
    shutil.rmtree(run / "global_step_4")
    plan = resume_plan(str(run))
    assert plan.step == 2 and latest_step(str(run)) == 2
    assert "global_step_4 is missing" in plan.messages[0] and "moved" not in plan.messages[1]
    assert sorted(os.listdir(run)) == ["global_step_2", "latest_checkpointed_iteration.txt"]


def test_a_save_cut_by_a_kill_or_a_full_disk_leaves_the_previous_checkpoint_resumable(tmp_path, monkeypatch):
    from perl.verl_glue import checkpoints
    from perl.verl_glue.run_dir import latest_step

    run = tmp_path / "run"
    fake_checkpoint(run, 2)
    # killed while verl wrote the shards of step 4: a partial directory, no marker, no manifest
    os.makedirs(run / "global_step_4" / "actor")
    (run / "global_step_4" / "actor" / "model_world_size_1_rank_0.pt").write_bytes(b"x" * 3)
    assert checkpoints.resume_plan(str(run)).step == 2
    # the disk fills while PeRL writes step 4's manifest: the manifest's temp file is removed, the
    # marker (verl's) still names the step before, which stays intact
    real_dump = checkpoints.json.dump

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.json, "dump", full_disk)
    with pytest.raises(OSError):
        checkpoints.write_manifest(str(run), 4)
    monkeypatch.setattr(checkpoints.json, "dump", real_dump)
    assert not [p for p in os.listdir(run / "global_step_4") if p.startswith(".tmp")]
    assert latest_step(str(run)) == 2 and checkpoints.resume_plan(str(run)).step == 2


def test_a_copied_run_directory_resumes_and_other_settings_are_still_refused(tmp_path):
    import shutil

    from perl.verl_glue.run_dir import LATEST, claim

    first = tmp_path / "a" / "run"
    cfg = vc.resolved(vc.compose(TOY, [f"trainer.default_local_dir={first}"]))
    claim(str(first), cfg)
    (first / LATEST).write_text("2")
    copy = tmp_path / "b" / "run"
    shutil.copytree(first, copy)
    claim(str(copy), vc.resolved(vc.compose(TOY, [f"trainer.default_local_dir={copy}"])))  # its data moved with it
    with pytest.raises(ValueError, match="peft.name: lora -> dora"):
        claim(str(copy), vc.resolved(vc.compose(TOY, [f"trainer.default_local_dir={copy}", "peft.name=dora"])))
