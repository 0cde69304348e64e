"""Run under `torchrun --nproc_per_node=2` (gloo, CPU): PeRL's verl engine for every method.

For each method the actor engine is built from the composed PeRL config exactly as verl's worker
builds it (EngineRegistry -> PerlFSDPEngine.initialize: HF load, PeRL adapt, FSDP2 wrap + rank-0
broadcast, optimizer from the method's groups), takes one DAPO step with verl's own ppo_loss, and then:
- the optimizer holds exactly the method's trainable parameters (LoRA+: lr ratio, LoRA-FA: B only);
- the step changed trainable tensors and nothing frozen (LoRA-FA's A included);
- AdaLoRA: the regulariser verl's update added equals PeRL's unsharded one, and the rank allocation
  ran inside the update (lora_E pruned to the scheduled budget, rank pattern recorded);
- the engine's rollout sync (`get_per_tensor_param`) equals PeRL's unsharded merged export of the same
  weights, bit for bit; for the LoRA family the adapter-only sync equals PeRL's `lora_adapter`;
- the reference policy (adapter disabled, as verl's ref-in-actor path calls it) gives the base
  model's log-probs, and re-enabling restores the policy's.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: support.*
from verl_common import (  # noqa: E402
    VOCAB, base_log_probs, base_model, done, full_state, init, max_diff, model_dirs, unsharded_policy,
)

import torch  # noqa: E402

from perl.methods import METHODS, adapt, get_method  # noqa: E402
from perl.sync import base_weights, merged_state_dict  # noqa: E402
from perl.sync.lora import lora_adapter  # noqa: E402
from perl.verl_glue.engine import PerlFSDPEngine  # noqa: E402
from support.engine_harness import build_actor_engine, cfg_for, response_log_probs, synthetic_batch, train_step  # noqa: E402

RUNS = [("tiny-qwen2", m) for m in METHODS] + [("tiny-llama", "lora")]  # llama: tied embeddings, no meta init
EXTRA = {"adalora": ["peft.options.tinit=0", "peft.options.tfinal=2"]}  # prune at the first step


def check(arch: str, method: str, path: str) -> None:
    from torch.distributed.fsdp import FSDPModule

    where = f"{arch}/{method}"
    # the sync in bf16, what a GPU rollout holds (a CPU run's rollout is fp32)
    cfg = cfg_for(path, method, [*EXTRA.get(method, []), "peft.sync_dtype=bfloat16"])
    eng, loss_fn = build_actor_engine(cfg)
    assert type(eng) is PerlFSDPEngine and isinstance(eng.module, FSDPModule), where
    assert eng.policy.name == method and eng.policy.model is eng.module, where

    # --- optimizer = the method's parameter groups --------------------------------------------
    trainable = {id(p) for _, p in eng.policy.trainable_parameters()}
    in_opt = [p for g in eng.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in in_opt} == trainable and len(in_opt) == len(trainable), where
    fresh = adapt(base_model(path), eng.spec, total_steps=eng.policy.total_steps)
    assert eng.policy.num_trainable() == fresh.num_trainable(), where
    lr = float(cfg.actor_rollout_ref.actor.optim.lr)
    groups = {g["name"]: g for g in eng.optimizer.param_groups}
    if method == "lora_plus":
        assert groups["lora_A"]["lr"] == lr and groups["lora_B"]["lr"] == lr * 16.0, where
    if method == "lora_fa":
        names = {n for n, p in eng.module.named_parameters() if id(p) in {id(q) for q in in_opt}}
        assert names and all(".lora_B." in n for n in names), where

    # --- one DAPO step through verl's update -----------------------------------------------------
    rows = synthetic_batch(4, vocab=VOCAB, seed=3)
    before = full_state(eng)
    reg_before = unsharded_policy(eng, path).extra_loss() if method == "adalora" else None
    out = train_step(eng, loss_fn, cfg, rows)
    after = full_state(eng)
    assert eng.policy.optimizer_steps == 1, where
    train_names = {n for n, p in unsharded_policy(eng, path).model.named_parameters() if p.requires_grad}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= train_names, (where, sorted(changed - train_names)[:3])
    if method == "lora_fa":
        assert not any(".lora_A." in k for k in changed), where
    if method == "adalora":
        (value,) = out["metrics"]["actor/perl_extra_loss"]  # a per-micro-batch list, like verl's own metrics
        assert abs(value - float(reg_before)) < 1e-5, (where, value, float(reg_before))
        alloc = eng.policy.model.base_model.rankallocator
        budget, mask = alloc.budget_schedule(1)
        alive = sum(int((v != 0).sum()) for k, v in after.items() if ".lora_E." in k)
        assert mask and budget < alloc.init_bgt and alive == budget, (where, alive, budget, alloc.init_bgt)
        assert eng.policy.model.peft_config["default"].rank_pattern, where

    # --- rollout sync == PeRL's unsharded export -----------------------------------------------
    reference = unsharded_policy(eng, path)
    pairs, peft_config = eng.get_per_tensor_param()
    got = {k: v.clone() for k, v in pairs}
    want = merged_state_dict(reference, dtype=torch.bfloat16)
    assert peft_config is None and list(got) == list(want), (where, list(got)[:3], list(want)[:3])
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, (where, bad[:3])
    plain = {k: v.to(torch.bfloat16) for k, v in base_model(path).state_dict().items()}
    assert any(not torch.equal(got[k], plain[k]) for k in got if k in plain), (where, "sync shows no training")
    if get_method(method).vllm_lora:
        eng.adapter_sync = "adapter"
        tensors, config = eng.get_per_tensor_param(base_sync_done=True)
        tensors = dict(tensors)
        want_config, want_tensors = lora_adapter(reference, dtype=torch.bfloat16)
        assert config["r"] == want_config["r"] and str(config["peft_type"].value) == want_config["peft_type"], where
        assert list(tensors) == list(want_tensors), where
        assert all(torch.equal(tensors[k], want_tensors[k]) for k in tensors), where
        base_pairs, config = eng.get_per_tensor_param(base_sync_done=False)
        got_base, want_base = dict(base_pairs), dict(base_weights(reference, torch.bfloat16))
        assert config is not None and list(got_base) == list(want_base), where
        assert all(torch.equal(got_base[k], want_base[k]) for k in want_base), where
        eng.adapter_sync = "merged"

    # --- reference policy: adapter disabled == base model ------------------------------------------
    if method != "full":
        policy_lp = response_log_probs(eng, cfg, rows)
        ref_lp = response_log_probs(eng, cfg, rows, no_adapter=True)
        base_lp = base_log_probs(path, rows)
        err, moved = max_diff(ref_lp, base_lp), max_diff(policy_lp, base_lp)
        assert err < 2e-5 and moved > 10 * err, (where, err, moved)
        assert max_diff(response_log_probs(eng, cfg, rows), policy_lp) == 0.0, (where, "adapter not restored")


def check_sgrpo(path: str) -> None:
    """S-GRPO's shortened forward (perl.verl_glue.token_subset) inside verl's update is exact: one
    step with the sequences cut after T_i and the LM head only at T_i gives the same weights as one
    step of the plain token loss on the full sequences with the loss masked to the same T_i."""
    from support.engine_harness import batch_meta, to_tensordict
    from perl.verl_glue.token_subset import SELECTED

    # no LoRA dropout: its masks are drawn per forward, and the two forwards have different shapes.
    # SGD, not AdamW: the two forwards round differently (~1e-7), and Adam's first step, lr * g / |g|,
    # turns that noise on near-zero gradients into lr-sized differences; SGD keeps it at lr * 1e-7.
    same = ["peft.dropout=0.0", "actor_rollout_ref.actor.optim.optimizer=SGD"]
    cfg_a = cfg_for(path, "lora", ["perl.loss_mode=sgrpo", "perl.sgrpo.alpha=2", "perl.sgrpo.k=3", *same])
    cfg_b = cfg_for(path, "lora", ["actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean", *same])
    eng_a, loss_a = build_actor_engine(cfg_a)
    eng_b, loss_b = build_actor_engine(cfg_b)
    with torch.no_grad():  # the same starting weights (each rank's shards)
        for pa, pb in zip(eng_a.module.parameters(), eng_b.module.parameters()):
            pb.to_local().copy_(pa.to_local()) if hasattr(pb, "to_local") else pb.copy_(pa)
    rows = synthetic_batch(4, vocab=VOCAB, seed=5, response_len=(7, 12))
    # the subset engine A will draw for its first optimizer step on this rank
    cut, _ = eng_a.cut_to_sgrpo_subset(to_tensordict(rows, batch_meta(cfg_a, train=True)))
    masks = [torch.cat([sel.long(), torch.zeros(len(r) - len(sel), dtype=torch.long)])
             for sel, r in zip(cut[SELECTED].unbind(), rows["responses"])]
    assert any(len(sel) < len(r) for sel, r in zip(cut[SELECTED].unbind(), rows["responses"]))  # really cut
    out = train_step(eng_a, loss_a, cfg_a, rows)
    assert 0 < out["metrics"]["perl/sgrpo_forward_token_frac"][0] < 1, out["metrics"]
    train_step(eng_b, loss_b, cfg_b, dict(rows, response_mask=masks, loss_mask=masks))
    a, b = full_state(eng_a), full_state(eng_b)
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert max(diffs.values()) < 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    moved = max(float(a[k].abs().max()) for k in a if "lora_B" in k)  # lora_B starts at zero
    assert moved > 1000 * max(diffs.values()), ("the S-GRPO step did not train", moved)


def check_tied_gradient(path: str) -> None:
    """TinyLoRA's one vector is used by every adapted module of every decoder layer, and verl wraps each
    decoder layer as its own FSDP2 unit. Built by PerlFSDPEngine on 2 ranks, each rank with its own
    batch: the vector's gradient equals a single-process reference (the mean loss over both ranks'
    batches, every module's contribution summed by autograd), the engine's clip norm counts it once,
    and one optimizer step moves it by exactly -lr x that gradient (once). The reference differs
    clearly from what a per-rank gradient or one unit's modules alone would give, so a missing sum
    over ranks or over units fails here."""
    import torch.distributed as dist

    lr = 0.1
    cfg = cfg_for(path, "tinylora", ["peft.dropout=0.0", "actor_rollout_ref.actor.optim.optimizer=SGD",
                                     f"actor_rollout_ref.actor.optim.lr={lr}", "actor_rollout_ref.actor.optim.clip_grad=1e6"])
    eng, _ = build_actor_engine(cfg)
    (name, v), = eng.policy.trainable_parameters()
    assert name == "base_model.tinylora_v.default.0" and type(v).__name__ == "DTensor", name
    assert [p for g in eng.optimizer.param_groups for p in g["params"]] == [v]
    assert torch.count_nonzero(v.full_tensor()) == 0  # v starts at zero: the policy is the base

    def ids_of(rank: int) -> torch.Tensor:
        return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(100 + rank))

    def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids).logits.float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    # the single-process reference: an unsharded policy holding the engine's weights
    reference = unsharded_policy(eng, path)
    (_, ref_v), = reference.trainable_parameters()

    def reference_grad(*ranks: int) -> torch.Tensor:
        reference.model.zero_grad(set_to_none=True)
        (sum(loss_of(reference.model, ids_of(r)) for r in ranks) / len(ranks)).backward()
        return ref_v.grad.detach().clone()

    want = reference_grad(0, 1)
    local = reference_grad(dist.get_rank())  # what a rank would step on without the reduction over ranks
    # v = 0, so zeroing a module's projections leaves the forward as it is and removes exactly that
    # module's share of the gradient: what the modules of one unit (decoder layer 0) alone give
    for lname, layer in reference.model.named_modules():
        if hasattr(layer, "tinylora_P") and ".layers.0." not in lname:
            layer.tinylora_P["default"].zero_()
    one_unit = reference_grad(0, 1)
    tol = 1e-6 + 1e-5 * float(want.abs().max())
    assert float(want.abs().max()) > 0
    assert float((local - want).abs().max()) > 100 * tol and float((one_unit - want).abs().max()) > 100 * tol

    # the engine: FSDP2 forward/backward of this rank's batch, then verl's optimizer step
    eng.optimizer.zero_grad(set_to_none=True)
    loss_of(eng.module, ids_of(dist.get_rank())).backward()
    got = v.grad.full_tensor()
    assert float((got - want).abs().max()) < tol, ("tied gradient", got, want)
    assert eng.optimizer.param_groups[0]["lr"] == lr
    grad_norm = float(eng.optimizer_step())
    assert abs(grad_norm - float(want.norm())) < tol, (grad_norm, float(want.norm()))
    stepped = v.full_tensor()
    assert float((stepped + lr * want).abs().max()) < lr * tol, ("one step of -lr x gradient", stepped, want)


def main() -> None:
    rank = init()
    dirs = model_dirs()
    for arch, method in RUNS:
        check(arch, method, dirs[arch])
        if rank == 0:
            print(f"ok {arch}/{method}", flush=True)
    check_tied_gradient(dirs["tiny-qwen2"])
    done(f"VERL_ENGINE_OK {len(RUNS)}")


if __name__ == "__main__":
    main()
