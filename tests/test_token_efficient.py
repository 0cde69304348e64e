"""S-GRPO and T-SPMO (perl.algos.token_efficient): hand-computed advantages, the subset rule, gradients."""

import copy
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from perl.algos.token_efficient import (
    SGRPOConfig,
    selected_token_log_probs,
    sgrpo_inclusion_prob,
    sgrpo_policy_loss,
    sgrpo_select,
    sgrpo_weights,
    tspmo_advantages,
    tspmo_group_pairs,
    tspmo_outcome_advantage,
    tspmo_policy_loss,
    tspmo_weights,
    verl_overrides,
    weighted_policy_loss,
)

ACTOR = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0,
                          "global_batch_info": {}})


def _pairs(out):
    return {(row, t): pytest.approx(a) for row, t, a in out}


# ---------------------------------------------------------------- T-SPMO


def test_tspmo_pair_advantages_hand_computed():
    # prefix tree:  () -1-> (1) -2-> (1,2) -3-> R=1 (row 0)
    #                               \-4-> R=0 (row 1)
    #                        \-5-> R=1 (row 2, ends)
    #               () -6-> R=0 (row 3, ends)
    responses = [[1, 2, 3], [1, 2, 4], [1, 5], [6]]
    rewards = [1.0, 0.0, 1.0, 0.0]
    got = tspmo_group_pairs(responses, rewards)
    assert len(got) == 6  # unique (prefix, token) pairs; (),1 is shared by rows 0-2 but counted once
    assert {(r, t): a for r, t, a in got} == _pairs([
        (0, 0, 2 / 3 - 1 / 2),  # ((), 1): mean(1, 0, 1) - mean(all four)
        (3, 0, 0 - 1 / 2),      # ((), 6)
        (0, 1, 1 / 2 - 2 / 3),  # ((1), 2): mean(1, 0) - mean(1, 0, 1)
        (2, 1, 1 - 2 / 3),      # ((1), 5)
        (0, 2, 1 - 1 / 2),      # ((1, 2), 3)
        (1, 2, 0 - 1 / 2),      # ((1, 2), 4)
    ])


def test_tspmo_baseline_counts_responses_ending_at_the_prefix_and_dedups_pairs():
    responses = [[7], [7, 8], [7, 8]]  # row 0 stops after the shared first token
    got = tspmo_group_pairs(responses, [1.0, 0.0, 0.0])
    assert {(r, t): a for r, t, a in got} == _pairs([(0, 0, 0.0), (1, 1, 0.0 - 1 / 3)])  # row 2: no pair of its own


def test_tspmo_batch_advantages_per_group_and_mask():
    responses = [[1, 2], [1, 3], [1, 2], [1, 2]]  # two groups (index), same token ids in both
    adv, pairs = tspmo_advantages(responses, [1.0, 0.0, 0.0, 0.0], index=["a", "a", "b", "b"], width=3)
    assert adv.tolist() == [[0.0, 0.5, 0.0], [0.0, -0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert pairs.tolist() == [[True, True, False], [False, True, False], [True, True, False], [False] * 3]
    w = tspmo_weights(pairs, adv, "pairs")
    assert w.sum() == pytest.approx(1.0) and (w > 0).sum() == 2  # only the two non-zero pairs
    assert tspmo_weights(pairs, adv, "all_pairs")[0, 1] == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="tspmo_norm"):
        tspmo_weights(pairs, adv, "tokens")


def test_tspmo_verl_estimator_needs_the_response_ids_and_matches_direct():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="response token ids.*trainer_mode=perl_sync"):
        tspmo_outcome_advantage(rewards, mask, index=np.array(["u", "u"], dtype=object))
    responses = torch.tensor([[4, 5, 0], [4, 6, 9]])
    adv, ret = tspmo_outcome_advantage(rewards, mask, index=np.array(["u", "u"], dtype=object), responses=responses)
    assert adv.tolist() == [[0.0, 0.5, 0.0], [0.0, -0.5, 0.0]] and torch.equal(adv, ret)


# ---------------------------------------------------------------- S-GRPO


def test_sgrpo_subset_sizes_follow_the_rule():
    cfg = SGRPOConfig(alpha=3, k=6, p=0.5)
    lengths = torch.tensor([0, 2, 3, 5, 10, 40])
    mask = (torch.arange(40) < lengths[:, None]).float()
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for _ in range(200):
        sel = sgrpo_select(mask, cfg, gen)
        assert not (sel & (mask == 0)).any()  # never past the end
        assert (sel[:, :3] == (mask[:, :3] > 0)).all()  # the first alpha tokens always
        size = sel.sum(-1)
        assert (size <= 6).all() and (size >= torch.clamp(lengths, max=3)).all()
        sizes.append(size)
    sizes = torch.stack(sizes).float()
    assert sizes[:, :3].tolist() == [[0.0, 2.0, 3.0]] * 200  # too short for any later token
    assert sizes[:, 5].mean() > 5.5  # 37 later tokens at p=0.5: the cap k=6 is reached almost always
    assert sgrpo_select(mask, SGRPOConfig(alpha=2, k=4, p=1.0)).sum(-1).tolist() == [0, 2, 3, 4, 4, 4]  # first-k


def test_sgrpo_inclusion_probability_hand_computed_and_empirical():
    cfg = SGRPOConfig(alpha=1, k=2, p=0.5)  # pi_t = 1, p, p(1-p), p(1-p)^2, ...
    assert sgrpo_inclusion_prob(4, cfg).tolist() == [1.0, 0.5, 0.25, 0.125]
    cfg = SGRPOConfig(alpha=2, k=5, p=0.3)
    mask = torch.ones(20000, 12)
    emp = sgrpo_select(mask, cfg, torch.Generator().manual_seed(1)).float().mean(0).double()
    pi = sgrpo_inclusion_prob(12, cfg)
    assert torch.allclose(emp, pi, atol=0.015), (emp, pi)
    assert pi[2] == pytest.approx(0.3) and pi[3] == pytest.approx(0.3 * 0.7 + 0.3 * 0.3)  # P(Bin(1,.3) <= 2) = 1


def test_sgrpo_unbiased_weighting_is_unbiased_and_paper_weighting_is_not():
    torch.manual_seed(0)
    lengths = torch.tensor([3, 8, 16, 16])
    mask = (torch.arange(16) < lengths[:, None]).float()
    loss = torch.rand(4, 16) * torch.linspace(0, 3, 16)  # larger on later tokens, where S-GRPO samples less
    full = float(((loss * mask).sum(-1) / lengths).mean())  # seq-mean-token-mean over every token
    gen = torch.Generator().manual_seed(2)
    est = {w: [] for w in ("unbiased", "paper")}
    for _ in range(4000):
        for w in est:
            cfg = SGRPOConfig(alpha=2, k=5, p=0.4, weighting=w)
            sel = sgrpo_select(mask, cfg, gen)
            est[w].append(float((sgrpo_weights(sel, mask, cfg) * loss).sum()))
    unbiased = np.array(est["unbiased"])
    assert abs(unbiased.mean() - full) < 4 * unbiased.std() / math.sqrt(len(unbiased)) + 1e-3
    assert abs(np.mean(est["paper"]) - full) > 0.1  # the paper's estimator favours early tokens


def test_sgrpo_config_is_checked():
    with pytest.raises(ValueError, match="sgrpo_k"):
        SGRPOConfig(alpha=5, k=4)
    with pytest.raises(ValueError, match="sgrpo_p"):
        SGRPOConfig(p=0.0)
    with pytest.raises(ValueError, match="sgrpo_weighting"):
        SGRPOConfig(weighting="ht")


# ---------------------------------------------------------------- gradients and the subset forward


def test_gradient_only_through_selected_tokens():
    torch.manual_seed(0)
    mask = torch.ones(3, 10)
    logp = (torch.randn(3, 10) - 2).requires_grad_()
    adv = torch.tensor([[1.0], [-0.5], [2.0]]).expand(3, 10)
    cfg = SGRPOConfig(alpha=2, k=4, p=0.5)
    sel = sgrpo_select(mask, cfg, torch.Generator().manual_seed(3))
    w = sgrpo_weights(sel, mask, cfg)
    loss, _ = weighted_policy_loss(logp.detach(), logp, adv, w, ACTOR)
    loss.backward()
    assert torch.equal(logp.grad != 0, sel)
    # on-policy (ratio 1): d loss / d logp = -A w, the paper's 1/G sum 1/|T_i| form
    assert torch.allclose(logp.grad, -adv * w)


def test_verl_sgrpo_and_tspmo_losses_mask_the_gradient():
    torch.manual_seed(1)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    logp = (torch.randn(2, 8) - 1).requires_grad_()
    loss, metrics = sgrpo_policy_loss(logp.detach(), logp, torch.ones(2, 8), mask, "seq-mean-token-mean", ACTOR)
    loss.backward()
    nz = (logp.grad != 0).sum(-1)
    assert (nz <= 8).all() and (logp.grad[1, 5:] == 0).all() and 0 < metrics["actor/sgrpo_token_frac"] <= 1
    assert (logp.grad[:, :4] != 0).all()  # alpha=4 (default): the first four always
    logp.grad = None
    adv = torch.zeros(2, 8)
    adv[0, 3], adv[1, 1] = 0.5, -0.5
    loss, _ = tspmo_policy_loss(logp.detach(), logp, adv, mask, "seq-mean-token-sum", ACTOR)
    loss.backward()
    assert torch.equal(logp.grad != 0, adv != 0)


@pytest.mark.parametrize("arch", ["tiny-qwen2", "tiny-llama"])
def test_subset_forward_matches_full_forward_and_ignores_later_tokens(arch):
    from perl.methods import adapt
    from perl.models import build_model

    policy = adapt(build_model(arch, seed=0), {"name": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0})
    model = policy.model
    with torch.no_grad():  # non-zero LoRA B so the adapter is in the path
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(1, 256, (3, 14), generator=g)
    attn = torch.ones_like(seqs)
    attn[1, :2] = 0  # a left-padded prompt
    start = 5
    rows, pos = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 3, 2, 1])
    lp, ent = selected_token_log_probs(model, seqs, attn, start, rows, pos)
    full = torch.log_softmax(model(input_ids=seqs, attention_mask=attn).logits.float(), -1)
    ref = full[rows, start - 1 + pos].gather(-1, seqs[rows, start + pos, None]).squeeze(-1)
    assert torch.allclose(lp, ref, atol=1e-5)
    lp2, _ = selected_token_log_probs(model, seqs, attn, start, rows, pos, subset_forward=False)
    assert torch.allclose(lp, lp2, atol=1e-5) and (ent > 0).all()

    def grads(s):
        model.zero_grad()
        selected_token_log_probs(model, s, attn, start, rows, pos)[0].sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    later = seqs.clone()
    later[:, start + 4:] = torch.randint(1, 256, (3, 14 - start - 4), generator=g)  # after the last selected token
    assert all(torch.equal(a, b) for a, b in zip(grads(seqs), grads(later)))
    changed = seqs.clone()
    changed[0, start + 3] = (changed[0, start + 3] % 255) + 1  # a selected token
    assert not all(torch.equal(a, b) for a, b in zip(grads(seqs), grads(changed)))


# ---------------------------------------------------------------- the CPU engine and verl wiring


def test_engine_config_validates_loss_mode_and_knobs():
    from perl.local import RLConfig

    with pytest.raises(ValueError, match="loss_mode.*'token', 'sgrpo', 'tspmo'"):
        RLConfig(loss_mode="spmo")
    with pytest.raises(ValueError, match="sgrpo_k"):
        RLConfig(loss_mode="sgrpo", sgrpo_alpha=9, sgrpo_k=8)
    with pytest.raises(ValueError, match="tspmo_norm"):
        RLConfig(tspmo_norm="x")


@pytest.mark.parametrize("mode", ["sgrpo", "tspmo"])
def test_engine_update_trains_only_on_the_subset(mode):
    from perl.local import LocalRL, RLConfig
    from perl.methods import adapt
    from perl.models import build_model

    class Tok:
        pad_token_id, eos_token_id = 0, 1

    base = build_model("tiny-qwen2", seed=0)
    policy = adapt(copy.deepcopy(base), {"name": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0})
    cfg = RLConfig(loss_mode=mode, group_size=4, prompts_per_step=2, mini_batches=2, sgrpo_alpha=2, sgrpo_k=3)
    engine = LocalRL(policy, copy.deepcopy(base), Tok(), [{"prompt": []}], cfg)
    g = torch.Generator().manual_seed(0)
    kept = []
    for prompt in ([5, 6, 7], [8, 9]):
        stem = torch.randint(2, 256, (3,), generator=g).tolist()
        for j in range(4):  # shared 3-token stem, then branches; mixed rewards
            kept.append((prompt, stem + torch.randint(2, 256, (6 + j,), generator=g).tolist(), float(j % 2)))
    before = {n: p.detach().clone() for n, p in policy.trainable_parameters()}
    m = engine._update(kept)
    assert m["optimizer_steps"] == 2 and 0 < m["loss_token_frac"] < 0.5 and m["forward_token_frac"] < 1
    if mode == "tspmo":  # only the branch after the shared stem carries an advantage: 4 pairs (A = +-0.5) a group
        assert m["loss_tokens"] == 8
    assert any(not torch.equal(p, before[n]) for n, p in policy.trainable_parameters())


def test_verl_registration_and_overrides():
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, get_policy_loss_fn

    assert get_policy_loss_fn("sgrpo") is sgrpo_policy_loss and get_policy_loss_fn("tspmo") is tspmo_policy_loss
    assert ADV_ESTIMATOR_REGISTRY["tspmo"] is tspmo_outcome_advantage
    assert verl_overrides("token") == []
    s = verl_overrides("sgrpo", SGRPOConfig(alpha=25, k=50, p=0.5))
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=sgrpo" in s and "algorithm.adv_estimator=grpo" in s
    assert any(o.endswith("PERL_SGRPO_K=50") for o in s)
    assert "algorithm.adv_estimator=tspmo" in verl_overrides("tspmo")
    with pytest.raises(ValueError, match="loss_mode"):
        verl_overrides("ppo")
