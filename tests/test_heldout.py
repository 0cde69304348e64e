"""The run's held-out evaluation (perl/verl_glue/heldout.py) scores by the run's reward rules."""

import os
from pathlib import Path

from perl.verl_glue import config as vc
from perl.verl_glue import heldout as ho

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "examples", "toy.yaml")
NO_THINK = "The answer is \\boxed{7}."  # an instruct model's answer: a box, no think block


def _cfg(tmp_path, *overrides):
    return vc.resolved(vc.compose(TOY, [f"trainer.default_local_dir={tmp_path / 'run'}", *overrides]))


def test_the_heldout_set_is_scored_by_the_runs_reward_rules(tmp_path):
    toy = ho.heldout_reward(_cfg(tmp_path))
    assert toy.score(NO_THINK, "7")["status"] == "no_think" and toy.score(NO_THINK, "7")["acc"] == 0.0
    instruct = ho.heldout_reward(_cfg(tmp_path, "perl.reward.require_think=false"))  # as examples/smollm2_arith.yaml
    assert instruct.score(NO_THINK, "7")["acc"] == 1.0


def test_the_cached_before_score_is_keyed_by_the_reward_rules(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "heldout.parquet"
    data.write_bytes(b"rows")
    keys = {}
    for name, extra in (("default", []), ("no_think", ["perl.reward.require_think=false"])):
        cfg = _cfg(tmp_path, *extra)
        cfg.perl.heldout.data = str(data)
        keys[name] = ho.before_cache_dir(cfg, str(model))
    assert keys["default"] != keys["no_think"]  # another rule, another score: not the cached one


# ------------------------------------------------------------------------------------------------
# the driver's reads of the run directory after training (perl.verl_glue.entry.checkpoint_on_driver)
# ------------------------------------------------------------------------------------------------


def _node_local_checkpoint(cfg, step=2, *, adapter=False):
    """What the driver's node holds of a multi-node run with a node-local run directory: verl's
    trainer process wrote the marker and data.pt here, its actor ranks here their shards, and
    rank 0, on another node, `perl_adapter/` (present only with `adapter`)."""
    from perl.methods.base import METADATA_FILE
    from perl.verl_glue.run_dir import LATEST, actor_dir, adapter_dir

    out = vc.run_dir(cfg)
    os.makedirs(actor_dir(out, step))
    Path(actor_dir(out, step), "model_world_size_16_rank_8.pt").write_bytes(b"x")
    Path(out, f"global_step_{step}", "data.pt").write_bytes(b"x")
    Path(out, LATEST).write_text(str(step))
    if adapter:
        os.makedirs(adapter_dir(out, step))
        Path(adapter_dir(out, step), METADATA_FILE).write_text('{"trainable_percent": 1.25}')
    return out


def test_an_adapter_rank_0_wrote_on_another_node_is_refused_naming_the_path_and_the_fix(tmp_path):
    import shlex

    import pytest

    from perl.cli import build_parser
    from perl.verl_glue.checkpoints import NotOnThisNode
    from perl.verl_glue.entry import checkpoint_on_driver
    from perl.verl_glue.run_dir import adapter_dir

    cfg = _cfg(tmp_path, "trainer.nnodes=2", "perl.reward.require_think=false")  # the toy's held-out set
    data = str(cfg.perl.heldout.data)
    out = _node_local_checkpoint(cfg)
    with pytest.raises(NotOnThisNode) as e:
        checkpoint_on_driver(cfg, out, 2, fresh=True)
    msg = str(e.value)
    assert msg.startswith(f"{adapter_dir(out, 2)}/perl_method.json is missing on this node")
    assert "trainer.nnodes=2" in msg and "shared by all nodes" in msg and "perl.heldout.data=null" in msg
    assert isinstance(e.value, ValueError)  # perl train prints it as one error line (exit 2)
    # the command it gives scores the adapter as the run's own "after" evaluation would
    args = build_parser().parse_args(shlex.split(msg.split("afterwards: ", 1)[1])[1:])
    settings = ho.eval_settings(cfg)
    assert (args.model, args.adapter, args.data) == (str(cfg.actor_rollout_ref.model.path), adapter_dir(out, 2),
                                                     [f"heldout={data}"])
    assert (args.k, args.seed, args.temperature, args.top_p, args.max_new_tokens) == (
        settings.k[ho.HELDOUT], settings.seed, settings.sampling.temperature, settings.sampling.top_p,
        settings.sampling.max_new_tokens)
    assert args.reward == ["require_think=false"] and args.out == os.path.join(out, "eval_after")

    # one node: no multi-node advice, the checkpoint is incomplete
    one = _cfg(tmp_path)
    with pytest.raises(NotOnThisNode, match="checkpoint 2 is incomplete") as e:
        checkpoint_on_driver(one, out, 2, fresh=True)
    assert "nnodes" not in str(e.value)


def test_no_marker_on_the_driver_is_refused_and_a_reused_final_model_needs_no_adapter(tmp_path):
    import json

    import pytest

    from perl.verl_glue.checkpoints import NotOnThisNode
    from perl.verl_glue.entry import checkpoint_on_driver
    from perl.verl_glue.run_dir import LATEST

    cfg = _cfg(tmp_path, "trainer.nnodes=2")
    out = vc.run_dir(cfg)
    # verl's trainer process ran on another node: no marker here, latest_step says 0
    with pytest.raises(NotOnThisNode, match=f"{os.path.join(out, LATEST)} is missing on this node") as e:
        checkpoint_on_driver(cfg, out, 0, fresh=True)
    assert "global_step_N/actor/perl_adapter" in str(e.value)
    with pytest.raises(NotOnThisNode, match=r"no checkpoint was saved \(trainer.save_freq="):
        checkpoint_on_driver(_cfg(tmp_path), out, 0, fresh=True)

    # a rerun of a finished run: final_model/ was merged from step 2 before; the adapter is only a label
    _node_local_checkpoint(cfg)
    os.makedirs(os.path.join(out, ho.FINAL_MODEL))
    Path(out, ho.FINAL_MODEL, ho.STEP_STAMP).write_text(json.dumps({"step": 2}))
    said = []
    assert checkpoint_on_driver(cfg, out, 2, fresh=False, say=said.append) is None
    assert len(said) == 1 and "summary.json has no trainable_percent" in said[0]
    with pytest.raises(NotOnThisNode):  # trained since: it merges again, and needs the adapter
        checkpoint_on_driver(cfg, out, 2, fresh=True)


def test_with_the_adapter_on_the_driver_its_trainable_percent_is_read(tmp_path):
    from perl.verl_glue.entry import checkpoint_on_driver

    cfg = _cfg(tmp_path, "trainer.nnodes=2")
    out = _node_local_checkpoint(cfg, adapter=True)
    assert checkpoint_on_driver(cfg, out, 2, fresh=True) == 1.25


def test_a_run_refuses_before_the_after_evaluation_when_its_checkpoint_is_on_another_node(tmp_path, monkeypatch):
    """entry.run with verl's trainer replaced by what a node-local multi-node run leaves here."""
    import pytest

    from perl.verl_glue import entry
    from perl.verl_glue.checkpoints import NotOnThisNode
    from perl.verl_glue.console import Console

    cfg = vc.compose(TOY, [f"trainer.default_local_dir={tmp_path / 'run'}", "trainer.nnodes=2"])
    full = vc.resolved(cfg)
    monkeypatch.setattr(ho, "evaluate_before", lambda *a: {"overall_avg": 0.5})
    monkeypatch.setattr(entry, "train", lambda c: _node_local_checkpoint(full))
    monkeypatch.setattr(ho, "evaluate_after", lambda *a, **k: pytest.fail("evaluated without the adapter"))
    with pytest.raises(NotOnThisNode, match="perl_adapter/perl_method.json is missing on this node"):
        entry.run(cfg, Console(vc.run_dir(full), verbose=True))
