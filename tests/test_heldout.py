"""The run's held-out evaluation (perl/verl_glue/heldout.py) scores by the run's reward rules."""

import os

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
