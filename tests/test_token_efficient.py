"""S-GRPO and T-SPMO (perl.algos.token_efficient, perl.verl_glue.token_subset): hand-computed advantages,
the subset rule and its weights, the verl losses, and the shortened forward PeRL's engine runs."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from perl.algos.token_efficient import (
    SGRPOConfig,
    sgrpo_ht_weights,
    sgrpo_inclusion_prob,
    sgrpo_policy_loss,
    sgrpo_select,
    tspmo_advantages,
    tspmo_group_pairs,
    tspmo_outcome_advantage,
    tspmo_policy_loss,
    verl_overrides,
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
    """verl's seq-mean-token-mean over T_i, with the engine's per-token weights, against the same
    aggregation over every token: the unbiased weighting's mean matches, the paper's does not."""
    from verl.trainer.ppo.core_algos import agg_loss

    torch.manual_seed(0)
    lengths = torch.tensor([3, 8, 16, 16])
    mask = (torch.arange(16) < lengths[:, None]).float()
    loss = torch.rand(4, 16) * torch.linspace(0, 3, 16)  # larger on later tokens, where S-GRPO samples less
    full = float(agg_loss(loss, mask, "seq-mean-token-mean"))
    gen = torch.Generator().manual_seed(2)
    est = {w: [] for w in ("unbiased", "paper")}
    for _ in range(3000):
        for w in est:
            cfg = SGRPOConfig(alpha=2, k=5, p=0.4, weighting=w)
            sel = sgrpo_select(mask, cfg, gen)
            weights = torch.stack([sgrpo_ht_weights(sel[i], int(lengths[i]), cfg) for i in range(4)])
            est[w].append(float(agg_loss(loss * weights, sel.float(), "seq-mean-token-mean")))
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


# ---------------------------------------------------------------- the verl losses


def test_verl_sgrpo_and_tspmo_losses_put_the_gradient_only_on_their_tokens():
    torch.manual_seed(1)
    subset = torch.tensor([[1, 1, 0, 1, 0, 0, 0, 0], [1, 0, 1, 1, 1, 0, 0, 0]])  # T_i, as the engine hands it over
    logp = (torch.randn(2, 8) - 1).requires_grad_()
    adv = torch.tensor([[1.0], [-0.5]]).expand(2, 8)
    loss, _ = sgrpo_policy_loss(logp.detach(), logp, adv, subset, "seq-mean-token-mean", ACTOR)
    loss.backward()
    assert torch.equal(logp.grad != 0, subset.bool())
    # on-policy (ratio 1): d loss / d logp = -A / (G |T_i|), the paper's 1/G sum 1/|T_i| form
    assert torch.allclose(logp.grad, -adv * subset / (2 * subset.sum(-1, keepdim=True)))
    logp.grad = None
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    adv = torch.zeros(2, 8)
    adv[0, 3], adv[1, 1] = 0.5, -0.5
    loss, metrics = tspmo_policy_loss(logp.detach(), logp, adv, mask, "seq-mean-token-sum", ACTOR)
    loss.backward()
    assert torch.equal(logp.grad != 0, adv != 0) and metrics["actor/tspmo_pair_frac"] == pytest.approx(2 / 13)


def test_verl_registration_and_overrides():
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, get_policy_loss_fn

    from perl.algos import register_with_verl

    assert register_with_verl()
    assert get_policy_loss_fn("sgrpo") is sgrpo_policy_loss and get_policy_loss_fn("tspmo") is tspmo_policy_loss
    assert ADV_ESTIMATOR_REGISTRY["tspmo"] is tspmo_outcome_advantage
    assert verl_overrides("token") == []
    s = verl_overrides("sgrpo")
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=sgrpo" in s and "algorithm.adv_estimator=grpo" in s
    assert not any("VERL_USE_EXTERNAL_MODULES" in o or "PERL_SGRPO" in o for o in s)  # the engine gets the knobs
    assert "algorithm.adv_estimator=tspmo" in verl_overrides("tspmo")
    with pytest.raises(ValueError, match="loss_mode"):
        verl_overrides("ppo")


# ---------------------------------------------------------------- the shortened forward (PeRL's engine)


def _nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def _minibatch(seed=0, n=4, vocab=256):
    """A mini-batch in the layout verl's trainer hands the engine (jagged per-sequence tensors)."""
    from verl.utils import tensordict_utils as tu

    from support.engine_harness import sequence_rows

    g = torch.Generator().manual_seed(seed)
    prompts, responses, old_log_probs = [], [], []
    for i in range(n):
        p, r = 3 + i % 3, 9 + 3 * i
        prompts.append(torch.randint(0, vocab, (p,), generator=g))
        responses.append(torch.randint(0, vocab, (r,), generator=g))
        old_log_probs.append(-torch.rand(r, generator=g))
    rows = sequence_rows(prompts, responses, [float(i) - 1.5 for i in range(n)])
    rows["old_log_probs"] = old_log_probs
    data = tu.get_tensordict(tensor_dict={k: _nested(v) for k, v in rows.items()}, non_tensor_dict={})
    return data, rows


def test_cut_to_subset_cuts_every_per_token_field_after_the_last_selected_token():
    from perl.verl_glue.token_subset import SELECTED, cut_to_subset

    data, rows = _minibatch()
    cfg = SGRPOConfig(alpha=2, k=4, p=0.5)
    out, stats = cut_to_subset(data, cfg, torch.Generator().manual_seed(0))
    for i, sel in enumerate(out[SELECTED].unbind()):
        c, p, r = len(sel), len(rows["prompts"][i]), len(rows["responses"][i])
        assert sel[-1] and sel[:2].all() and 2 <= int(sel.sum()) <= 4 and c < r  # ends on its last selected token
        assert torch.equal(out["responses"][i], rows["responses"][i][:c])
        assert torch.equal(out["input_ids"][i], rows["input_ids"][i][: p + c])
        assert torch.equal(out["position_ids"][i], rows["position_ids"][i][: p + c])
        assert torch.equal(out["old_log_probs"][i], rows["old_log_probs"][i][:c])
        assert torch.equal(out["prompts"][i], rows["prompts"][i])
        assert torch.equal(out["response_mask"][i].bool(), sel) and torch.equal(out["loss_mask"][i].bool(), sel)
    assert "rollout_is_weights" not in out.keys()  # the paper's weighting needs none
    assert 0 < stats["perl/sgrpo_token_frac"] < stats["perl/sgrpo_forward_token_frac"] < 1
    unbiased, _ = cut_to_subset(data, SGRPOConfig(alpha=2, k=4, p=0.5, weighting="unbiased"),
                                torch.Generator().manual_seed(0))
    ht = SGRPOConfig(alpha=2, k=4, p=0.5, weighting="unbiased")
    for i, (w, sel) in enumerate(zip(unbiased["rollout_is_weights"].unbind(), unbiased[SELECTED].unbind())):
        assert torch.allclose(w, sgrpo_ht_weights(sel, len(rows["responses"][i]), ht)) and (w[~sel] == 0).all()


@pytest.mark.parametrize("remove_padding", [True, False])
def test_lm_head_only_at_the_subset_gives_the_full_forwards_log_probs(remove_padding):
    """PeRL's engine path (logits_to_keep + subset_log_probs) against a full forward of the same
    cut sequences: equal log-probs on T_i, and gradients that equal the full forward's masked ones."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from perl.methods import adapt
    from perl.models import build_model
    from perl.verl_glue.token_subset import SELECTED, cut_to_subset, loss_positions, subset_log_probs
    from verl.utils import tensordict_utils as tu

    policy = adapt(build_model("tiny-llama", seed=0), {"name": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0})
    model = policy.model
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.05)
    data, _ = _minibatch(seed=3)
    cut, _ = cut_to_subset(data, SGRPOConfig(alpha=2, k=4, p=0.5), torch.Generator().manual_seed(1))
    tu.assign_non_tensor(cut, use_remove_padding=remove_padding, temperature=1.0, pad_token_id=0)
    engine = FSDPEngineWithLMHead.__new__(FSDPEngineWithLMHead)  # only its input/output layout code runs here
    engine.pad_to_length, engine.use_ulysses_sp = False, False
    engine._get_packed_pad_size = lambda n: 0
    inputs, output_args = engine.prepare_model_inputs(cut)
    keep = loss_positions(cut, use_remove_padding=remove_padding)
    inputs["logits_to_keep"] = keep
    out = subset_log_probs(model(**inputs, use_cache=False).logits, keep, output_args, cut, remove_padding, True)

    def reference():  # every sequence on its own, the whole LM head
        lps = []
        for ids, p, sel in zip(cut["input_ids"].unbind(), cut["prompts"].offsets().diff(), cut[SELECTED].unbind()):
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
            at = int(p) - 1 + torch.arange(len(sel))
            lps.append((logp[at].gather(-1, ids[int(p):, None]).squeeze(-1), sel))
        return lps

    got = out["log_probs"].unbind()
    total = 0
    for row, ((ref, sel), full) in enumerate(zip(reference(), got)):
        p = int(cut["prompts"].offsets().diff()[row])
        mine = full[p - 1 : p - 1 + len(sel)]
        assert torch.allclose(mine[sel], ref[sel], atol=1e-5), row
        assert (mine[~sel] == 0).all()  # outside T_i nothing was computed
        total = total + mine[sel].sum()
    model.zero_grad()
    total.backward()
    subset_grads = [q.grad.clone() for q in model.parameters() if q.requires_grad]
    model.zero_grad()
    sum(ref[sel].sum() for ref, sel in reference()).backward()
    for a, b in zip(subset_grads, (q.grad for q in model.parameters() if q.requires_grad)):
        assert torch.allclose(a, b, atol=1e-5)
