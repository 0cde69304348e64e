"""The single-machine RL engine on the toy task: real cold start, real rollouts, verl's losses."""

import copy

import pytest
import torch

from perl.data import arithmetic_rows, to_verl_rows
from perl.local import TOY_TEMPLATE, LocalRL, RLConfig, ToyConfig, cold_start
from perl.methods import adapt
from perl.sync import merged_state_dict


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("perl-cache"))


def _rows(n, seed):
    return to_verl_rows(arithmetic_rows(n, 2, ("add",), seed=seed), "arith", "train", TOY_TEMPLATE).rows


def test_cold_start_is_cached_and_deterministic(cache):
    cfg = ToyConfig(sft_steps=5)
    m1, tok, path = cold_start(cfg, cache, progress=False)
    m2, _, path2 = cold_start(cfg, cache, progress=False)
    assert path == path2
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert len(tok) == m1.config.vocab_size


def test_dynamic_sampling_drops_groups_without_signal(cache):
    model, tok, _ = cold_start(ToyConfig(sft_steps=5), cache, progress=False)  # untrained: every reward is 0
    cfg = dict(steps=1, prompts_per_step=2, group_size=2, max_gen_batches=2, max_new_tokens=6)
    for algorithm, expect_kept in (("dapo", 0), ("grpo", 2)):
        policy = adapt(copy.deepcopy(model), {"name": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0})
        engine = LocalRL(policy, copy.deepcopy(model), tok, _rows(50, 1), RLConfig(algorithm=algorithm, **cfg))
        m = engine.step()
        assert m["reward"] == 0.0 and m["kept_groups"] == expect_kept
        if algorithm == "dapo":  # it kept drawing prompts (cap: max_gen_batches rounds)
            assert m["groups_drawn"] == 2 + 4


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_update_trains_adapter_syncs_rollout_and_keeps_base(cache, method):
    model, tok, _ = cold_start(ToyConfig(), cache, progress=False)  # the partly-right cold start
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    rollout = copy.deepcopy(model)
    policy = adapt(model, {"name": method, "rank": 4, "alpha": 8.0, "dropout": 0.0})
    engine = LocalRL(policy, rollout, tok, _rows(200, 2), RLConfig(steps=2, prompts_per_step=4, lr=1e-3))
    adapter_before = {n: p.detach().clone() for n, p in policy.trainable_parameters()}
    metrics = [engine.step() for _ in range(2)]
    assert all(m["kept_groups"] > 0 for m in metrics), metrics  # mixed rewards: there is signal
    for m in metrics:
        assert 0 < m["reward"] < 1 and m["entropy"] > 0 and 0 <= m["pg_clipfrac"] <= 1
        assert {"sync_s", "rollout_reward_s", "update_s", "response_len"} <= set(m)
    assert any(not torch.equal(p, adapter_before[n]) for n, p in policy.trainable_parameters())
    base_now = policy.model.get_base_model().state_dict()
    for k, v in base_before.items():  # frozen base, bit for bit (LoRA keys live under base_layer)
        mod, leaf = k.rsplit(".", 1)
        key = k if k in base_now else f"{mod}.base_layer.{leaf}"
        assert torch.equal(base_now[key], v), k
    engine.sync()
    merged = merged_state_dict(policy, include_tied=True)
    assert all(torch.equal(rollout.state_dict()[k], v) for k, v in merged.items())


def test_config_is_checked():
    with pytest.raises(ValueError, match="algorithm"):
        RLConfig(algorithm="ppo")
    with pytest.raises(ValueError, match="group_size"):
        RLConfig(group_size=1)
