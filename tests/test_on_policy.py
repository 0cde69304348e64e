"""perl.verl_glue.on_policy: where the update's own forward gives PPO's old log-probs, the loss
wrapper PeRL's engine puts around verl's, and the pass's metrics rebuilt from the update's sums,
against verl's own `calculate_debug_metrics` under verl's own micro-batch and data-parallel
aggregation. The engine (2 gloo ranks, one step against verl's pass) is tests/dist/verl_engine.py's
`check_old_log_probs_from_update`; a trainer run, tests/test_trainer_e2e.py's full fine-tuning."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from perl.verl_glue.config import ConfigError, compose
from perl.verl_glue.on_policy import FROM_UPDATE, old_log_probs_source, on_policy_loss, update_metrics

ON_POLICY = ["data.train_batch_size=16", "actor_rollout_ref.actor.ppo_mini_batch_size=16"]


@pytest.fixture(scope="module")
def on_policy_cfg():
    return compose("examples/toy.yaml", ON_POLICY)


def _with(cfg, **dotted):
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    for key, value in dotted.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    return cfg


def test_the_update_gives_the_old_log_probs_only_where_it_runs_with_pi_old(on_policy_cfg):
    source, why = old_log_probs_source(on_policy_cfg)
    assert source == "update", why
    # the toy's own batch: 2 optimizer steps per trainer step (clipping bites on the second)
    assert old_log_probs_source(compose("examples/toy.yaml"))[0] == "pass"
    cfg = on_policy_cfg
    refused = {
        "perl__old_log_probs": "recompute",
        "actor_rollout_ref__actor__ppo_epochs": 2,
        "actor_rollout_ref__actor__ppo_mini_batch_size": 8,
        "algorithm__use_kl_in_reward": True,
        "algorithm__adv_estimator": "optimal_token_baseline",
        "perl__loss_mode": "sgrpo",
    }
    for key, value in refused.items():
        source, why = old_log_probs_source(_with(cfg, **{key: value}))
        assert source == "pass" and why, (key, source, why)
    assert old_log_probs_source(_with(cfg, algorithm__rollout_correction={"rollout_is": "token"}))[0] == "pass"
    assert old_log_probs_source(_with(cfg, algorithm__rollout_correction={"bypass_mode": True}))[0] == "pass"
    assert old_log_probs_source(_with(cfg, algorithm__rollout_correction={"rollout_is": None}))[0] == "update"
    assert old_log_probs_source(_with(cfg, perl__dump_rollout_tokens=True))[0] == "update"  # dumps vLLM's only


def test_an_unknown_old_log_probs_mode_is_refused_naming_the_field_and_its_values():
    with pytest.raises(ConfigError, match=r"perl\.old_log_probs: 'sometimes' is not one of auto, recompute"):
        compose("examples/toy.yaml", ["perl.old_log_probs=sometimes"])


def _micro_batch(rows, dp_size: int):
    """A micro-batch as verl's engine hands it to the loss: nested per-sequence tensors (prompts,
    responses, masks, the rollout's log-probs) and the non-tensor flags."""
    from verl.utils import tensordict_utils as tu

    nested = {k: torch.nested.as_nested_tensor(v, layout=torch.jagged) for k, v in rows.items()}
    return tu.get_tensordict(tensor_dict=nested, non_tensor_dict={"dp_size": dp_size})


def _sequences(seed: int, n: int):
    """n sequences: prompt ids, response ids, the actor's response log-probs (the forward's output
    over the whole sequence, nested) and the rollout's (the actor's plus noise)."""
    g = torch.Generator().manual_seed(seed)
    rows = {k: [] for k in ("prompts", "responses", "response_mask", "rollout_log_probs")}
    full, actor = [], []
    for _ in range(n):
        p, r = int(torch.randint(2, 5, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        lp = -torch.rand(r, generator=g, dtype=torch.float64).float() * 3
        rows["prompts"].append(torch.randint(0, 50, (p,), generator=g))
        rows["responses"].append(torch.randint(0, 50, (r,), generator=g))
        mask = torch.ones(r, dtype=torch.int64)
        mask[-1] = int(torch.rand(1, generator=g) < 0.7)  # some responses' last token outside the loss
        rows["response_mask"].append(mask)
        rows["rollout_log_probs"].append(lp + 0.05 * torch.randn(r, generator=g))
        seq = torch.zeros(p + r)
        seq[p - 1 : p - 1 + r] = lp  # position t predicts token t+1
        full.append(seq.requires_grad_())
        actor.append(lp)
    return rows, full, actor


def test_the_wrapped_loss_sees_the_forwards_own_log_probs_and_the_pass_metrics_equal_verls():
    """2 ranks x 2 micro-batches through the wrapper, reduced the way verl reduces loss metrics
    (per-micro-batch Metric lists, `Metric.aggregate_dp` over ranks), give the metrics verl's pass
    computes over the whole batch (`calculate_debug_metrics`) and the old log-probs the loss saw are
    the forward's, detached."""
    from verl.protocol import DataProto
    from verl.trainer.ppo.rollout_corr_helper import compute_offpolicy_metrics
    from verl.utils.debug.metrics import calculate_debug_metrics
    from verl.utils.metric.utils import Metric
    from verl.utils.py_functional import append_to_dict
    from verl.workers.utils.padding import no_padding_2_padding

    seen = []

    def verls_loss(model_output, data, dp_group=None):  # records what verl's ppo_loss would read
        seen.append((data["old_log_probs"], no_padding_2_padding(model_output["log_probs"], data),
                     model_output["entropy"]))
        return model_output["log_probs"].values().sum(), {"actor/pg_loss": Metric("sum", 1.0)}

    per_rank, everything = [], {"actor": [], "rollout": [], "mask": []}
    for rank in range(2):
        metrics = {}  # one rank's micro-batch metrics, collected as verl's postprocess_batch_func does
        for micro in range(2):
            rows, full, actor = _sequences(seed=10 * rank + micro, n=3 + micro)
            data = _micro_batch(rows, dp_size=2)
            entropy = torch.nested.as_nested_tensor([s * 0 + 1.5 for s in full], layout=torch.jagged)
            output = {"log_probs": torch.nested.as_nested_tensor(full, layout=torch.jagged), "entropy": entropy}
            _, m = on_policy_loss(verls_loss, entropy_in_loss=False)(model_output=output, data=data)
            old, log_prob, seen_entropy = seen[-1]
            assert not old.requires_grad and not seen_entropy.requires_grad
            padded_old = old.to_padded_tensor(0.0)
            for i, lp in enumerate(actor):
                assert torch.equal(padded_old[i, : len(lp)], lp) and torch.equal(log_prob[i, : len(lp)].detach(), lp)
            append_to_dict(metrics, m)
            everything["actor"] += actor
            everything["rollout"] += rows["rollout_log_probs"]
            everything["mask"] += rows["response_mask"]
        per_rank.append(metrics)
    reduced = {k: Metric.aggregate_dp([rank[k] for rank in per_rank]) for k in per_rank[0]}
    no_block = dict(reduced)
    update_metrics(reduced, entropy_in_loss=False, offpolicy=True)

    pad = lambda ts: torch.nn.utils.rnn.pad_sequence(ts, batch_first=True)  # noqa: E731
    responses, rollout, mask = pad(everything["actor"]), pad(everything["rollout"]), pad(everything["mask"])
    want = calculate_debug_metrics(DataProto.from_dict({
        "old_log_probs": responses, "rollout_log_probs": rollout, "response_mask": mask, "responses": responses}))
    offpolicy = compute_offpolicy_metrics(old_log_prob=responses, rollout_log_prob=rollout, response_mask=mask)
    assert len(offpolicy) == 13
    want.update({f"rollout_corr/{k}": v for k, v in offpolicy.items()})
    assert set(want) <= set(reduced), sorted(set(want) - set(reduced))
    for key, value in want.items():
        assert math.isclose(reduced[key], value, rel_tol=2e-5, abs_tol=1e-7), (key, reduced[key], value)
    assert not any(k.startswith("actor/perl_vs_rollout") for k in reduced)
    update_metrics(no_block, entropy_in_loss=False, offpolicy=False)  # no rollout_correction block: verl has none
    assert not any(k.startswith("rollout_corr/") for k in no_block) and "training/rollout_probs_diff_std" in no_block


def test_the_step_entropy_is_verls_entropy_loss_metric_and_stays_one_where_the_loss_has_it():
    metrics = {"actor/entropy_loss": 0.25}
    update_metrics(metrics, entropy_in_loss=False, offpolicy=True)
    assert metrics == {"actor/entropy": 0.25}
    metrics = {"actor/entropy_loss": 0.25}
    update_metrics(metrics, entropy_in_loss=True, offpolicy=True)  # entropy_coeff != 0: verl reports its loss term too
    assert metrics == {"actor/entropy": 0.25, "actor/entropy_loss": 0.25}


def test_without_rollout_log_probs_no_rollout_metrics_are_made_up():
    rows, full, _ = _sequences(seed=1, n=2)
    del rows["rollout_log_probs"]
    data = _micro_batch(rows, dp_size=1)
    output = {"log_probs": torch.nested.as_nested_tensor(full, layout=torch.jagged)}
    _, metrics = on_policy_loss(lambda model_output, data, dp_group=None: (torch.zeros(()), {}),
                                entropy_in_loss=False)(model_output=output, data=data)
    assert metrics == {} and FROM_UPDATE == "perl_old_log_probs_from_update"
    np.testing.assert_equal(data["old_log_probs"].to_padded_tensor(0.0).shape[0], 2)


def test_the_engine_wraps_verls_loss_only_when_the_trainer_asks_and_keeps_entropy_out_of_the_gradient():
    """PerlFSDPEngine._old_log_probs_from_this_forward: unflagged batches (verl's pass ran) and forward-only
    calls get verl's loss untouched; a flagged update gets the wrapper, entropy turned on for the metric,
    and the packed path's entropy function without a gradient unless the loss has entropy, restored after."""
    from verl.utils import tensordict_utils as tu

    from perl.verl_glue.engine import PerlFSDPEngine

    from types import SimpleNamespace

    engine = PerlFSDPEngine.__new__(PerlFSDPEngine)  # only this method's own logic runs here
    engine.engine_config = SimpleNamespace(entropy_from_logits_chunk_size=2)
    entropy_fn = lambda logits: (logits * logits).sum(-1)  # noqa: E731
    engine.compute_entropy_from_logits = entropy_fn
    verls = object()
    plain = tu.get_tensordict(tensor_dict={"x": torch.zeros(2, 1)},
                              non_tensor_dict={"calculate_entropy": False, "use_remove_padding": True})
    with engine._old_log_probs_from_this_forward(plain, verls, forward_only=False) as loss:
        assert loss is verls and engine.compute_entropy_from_logits is entropy_fn
    for entropy_in_loss in (False, True):
        flagged = tu.get_tensordict(tensor_dict={"x": torch.zeros(2, 1)},
                                    non_tensor_dict={"calculate_entropy": entropy_in_loss, FROM_UPDATE: True,
                                                     "use_remove_padding": True})
        with engine._old_log_probs_from_this_forward(flagged, verls, forward_only=True) as loss:
            assert loss is verls
        with engine._old_log_probs_from_this_forward(flagged, verls, forward_only=False) as loss:
            assert loss is not verls and tu.get_non_tensor_data(flagged, "calculate_entropy", None) is True
            logits = torch.randn(5, 3, requires_grad=True)
            entropy = engine.compute_entropy_from_logits(logits)
            assert entropy.requires_grad is entropy_in_loss
            if not entropy_in_loss:  # in row chunks of 2, the entropy of each row's softmax
                p = torch.softmax(logits.detach(), -1)
                assert torch.allclose(entropy, -(p * p.log()).sum(-1), atol=1e-6)
        assert engine.compute_entropy_from_logits is entropy_fn


def test_verls_advantage_step_reads_no_rollout_correction_block_only_for_the_duration(on_policy_cfg):
    """trainer.without_rollout_correction: verl's `_compute_advantage` would compute the block's
    diagnostics from old log-probs that do not exist yet (the update reports them); the block is back
    afterwards, also after an error, in a struct config."""
    from perl.verl_glue.trainer import without_rollout_correction

    cfg = _with(on_policy_cfg)
    OmegaConf.set_struct(cfg, True)
    block = OmegaConf.to_container(cfg.algorithm.rollout_correction)
    with pytest.raises(RuntimeError):
        with without_rollout_correction(cfg):
            assert cfg.algorithm.get("rollout_correction", "absent") is None
            raise RuntimeError("the advantage step failed")
    assert OmegaConf.to_container(cfg.algorithm.rollout_correction) == block and block
