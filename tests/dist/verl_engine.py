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
`check_gpu_defaults` repeats the step and the sync checks under verl's GPU defaults (gradient
checkpointing, bf16 mixed precision) with stated tolerances; `check_adalora_loss_scaling` checks the
regulariser under fp16's loss scaling.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: support.*
from verl_common import (  # noqa: E402
    VOCAB, base_log_probs, base_model, done, full_state, init, max_diff, model_dirs, model_log_probs,
    unsharded_policy,
)

import math  # noqa: E402

import numpy as np  # noqa: E402

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


# verl's GPU defaults: gradient checkpointing (on in the base config) and FSDP2 mixed precision with
# bf16 parameters and fp32 gradient reduction (transformer_impl.py `_build_fsdp_module`'s default);
# the masters stay fp32 (verl loads a training model in fp32), the forward runs under bf16 autocast.
GPU_DEFAULTS = ["actor_rollout_ref.model.enable_gradient_checkpointing=true",
                ("+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype: bf16, reduce_dtype: fp32, "
                 "buffer_dtype: fp32}")]
# Tolerances of the bf16 pass (measured: the largest over the 14 methods in 4 launches):
# - sync vs PeRL's unsharded merged export of the same fp32 masters: FSDP2 unshards in param_dtype, so
#   the engine merges bf16-rounded weights (in fp32) and rounds again: at most SYNC_ULPS bf16 spacings
#   at the tensor's largest entry (measured: 1);
# - response log-probs of a plain model holding the synced weights (fp32 forward) vs PeRL's unsharded
#   adapted policy: MERGED_TOL (measured 4.4e-3: the bf16 rounding of the weights, growing with them),
#   and the step moved the policy from the base by more than MOVED_FACTOR x that error (measured >= 17x;
#   a sync without the adapter would err by as much as the step moved);
# - the engine's own forward (bf16 autocast, gradient checkpointing) vs that adapted policy: ENGINE_TOL
#   (measured 3.2e-2: bf16 arithmetic in every matmul of the tiny model).
SYNC_ULPS = 2
MERGED_TOL = 1e-2
MOVED_FACTOR = 4
ENGINE_TOL = 6e-2
# lr of this pass: 5x the first pass's, so that every method moves clearly; full fine-tuning at 1e-2, and
# LoRA+ at 5e-2 / 16, its B group's lr ratio (at 16 x 5e-2 its B grows until bf16's errors pass ENGINE_TOL)
GPU_PASS_LR = {None: 5e-2, "full": 1e-2, "lora_plus": 5e-2 / 16}


def bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| in units of bf16's spacing at the tensor's largest |want| (2^(exponent - 7)):
    the merge's double rounding errs by the spacing of its inputs (W, B A), not of each small result."""
    want32, got32 = want.float(), got.float()
    scale = float(want32.abs().max())
    if scale == 0.0:
        return 0.0 if torch.equal(got32, want32) else float("inf")
    spacing = 2.0 ** (math.floor(math.log2(scale)) - 7)
    return float((got32 - want32).abs().max()) / spacing


def check_gpu_defaults(arch: str, method: str, path: str) -> dict[str, float]:
    """One method under verl's GPU defaults (gradient checkpointing, bf16 mixed precision): a DAPO step
    runs and changes trainable parameters only; the merged sync after it equals PeRL's unsharded merged
    export of the same fp32 weights, a plain model holding the synced weights computes the adapted
    policy's log-probs, and so does the engine's bf16 forward, each within the tolerances above.
    Returns the measured errors for the report."""
    from torch.distributed.fsdp import FSDPModule

    where = f"{arch}/{method} (bf16, gradient checkpointing)"
    cfg = cfg_for(path, method, [*EXTRA.get(method, []), *GPU_DEFAULTS, "peft.sync_dtype=bfloat16"],
                  lr=GPU_PASS_LR.get(method, GPU_PASS_LR[None]))
    eng, loss_fn = build_actor_engine(cfg)
    hf = eng.module.get_base_model() if hasattr(eng.module, "get_base_model") else eng.module
    assert hf.is_gradient_checkpointing, (where, "gradient checkpointing is off")
    assert eng._autocast_dtype == torch.bfloat16 and eng.scaler is None, where
    groups = [m._get_fsdp_state()._fsdp_param_group for m in eng.module.modules() if isinstance(m, FSDPModule)]
    policies = {(g.mp_policy.param_dtype, g.mp_policy.reduce_dtype) for g in groups if g is not None}
    assert policies == {(torch.bfloat16, torch.float32)}, (where, policies)
    assert all(p.dtype == torch.float32 for p in eng.module.parameters()), (where, "masters are not fp32")

    rows = synthetic_batch(4, vocab=VOCAB, seed=3)
    before = full_state(eng)
    out = train_step(eng, loss_fn, cfg, rows)
    after = full_state(eng)
    assert eng.policy.optimizer_steps == 1, where
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point()), (where, "non-finite")
    reference = unsharded_policy(eng, path)
    train_names = {n for n, p in reference.model.named_parameters() if p.requires_grad}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= train_names, (where, sorted(changed - train_names)[:3])
    if method == "adalora":
        assert out["metrics"]["actor/perl_extra_loss"][0] > 0, where

    pairs, _ = eng.get_per_tensor_param()
    got = {k: v.clone() for k, v in pairs}
    want = merged_state_dict(reference, dtype=torch.bfloat16)
    assert list(got) == list(want) and all(got[k].dtype == torch.bfloat16 for k in got), where
    ulps = max(bf16_ulps(got[k], want[k]) for k in want)
    assert ulps <= SYNC_ULPS, (where, "sync vs unsharded merged export, bf16 ulps", ulps)

    # the rollout's view: a plain model holding the synced weights computes the adapted policy
    merged = base_model(path)
    merged.load_state_dict({k: v.float() for k, v in got.items()}, strict=False)
    merged_lp, adapted_lp = model_log_probs(merged, rows), model_log_probs(reference.model.eval(), rows)
    err = max_diff(merged_lp, adapted_lp)
    moved = max_diff(adapted_lp, base_log_probs(path, rows))
    engine_err = max_diff(response_log_probs(eng, cfg, rows), adapted_lp)  # the engine's bf16 forward
    assert err < MERGED_TOL, (where, "merged model vs adapted policy log-probs", err)
    assert moved > MOVED_FACTOR * err, (where, "the step moved the policy less than the sync errs", moved, err)
    assert engine_err < ENGINE_TOL, (where, "engine bf16 forward vs adapted policy log-probs", engine_err)
    if method == "lora":  # verl's shard export (checkpoint_engine.backend=delta_sharded) is refused, naming the key
        try:
            eng.get_per_tensor_param_shard()
        except NotImplementedError as e:
            assert "actor_rollout_ref.rollout.checkpoint_engine.backend=delta_sharded" in str(e), str(e)
        else:
            raise AssertionError("get_per_tensor_param_shard did not refuse a PeRL method")
    return {"sync_ulps": ulps, "merged_err": err, "moved": moved, "engine_err": engine_err}


def check_adalora_loss_scaling(path: str) -> None:
    """AdaLoRA's regulariser under fp16 loss scaling. With param_dtype=fp16 verl multiplies each
    micro-batch loss by its ShardedGradScaler's scale and unscales every gradient before clipping and
    the step; PerlFSDPEngine's extra loss must be scaled too. verl builds that scaler for CUDA only (on
    CPU it disables itself), so the scaler is set here on the CPU, at 2^12: scaling by a power of two
    is exact, so one SGD step with it must give bit for bit the weights of the same step without it,
    while a regulariser gradient left unscaled (divided by 2^12 at the step) moves them far more."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    # a heavier regulariser (0.5 by default) makes its one-step move ~1e-3 at SGD's lr 1e-2
    same = ["peft.dropout=0.0", "actor_rollout_ref.actor.optim.optimizer=SGD", "+peft.options.orth_reg_weight=50"]
    cfg = cfg_for(path, "adalora", same)
    plain, loss_fn = build_actor_engine(cfg)
    scaled, _ = build_actor_engine(cfg)
    scaled.scaler = ShardedGradScaler(device="cpu", init_scale=2.0 ** 12)
    with torch.no_grad():
        for pa, pb in zip(plain.module.parameters(), scaled.module.parameters()):
            pb.to_local().copy_(pa.to_local()) if hasattr(pb, "to_local") else pb.copy_(pa)
    reference = unsharded_policy(plain, path)  # the regulariser's own gradient at the start
    params = [p for _, p in reference.trainable_parameters()]
    reg_grad = torch.autograd.grad(reference.extra_loss(), params, allow_unused=True)
    reg_move = float(cfg.actor_rollout_ref.actor.optim.lr) * max(float(g.abs().max()) for g in reg_grad if g is not None)
    rows = synthetic_batch(4, vocab=VOCAB, seed=7)
    out_plain = train_step(plain, loss_fn, cfg, rows)
    out_scaled = train_step(scaled, loss_fn, cfg, rows)
    assert float(scaled.scaler.get_scale()) == 2.0 ** 12, "the scaler skipped the step (non-finite gradients)"
    assert out_plain["metrics"]["actor/perl_extra_loss"] == out_scaled["metrics"]["actor/perl_extra_loss"]
    a, b = full_state(plain), full_state(scaled)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff == 0.0 and reg_move > 1e-4, ("loss-scaled step vs plain step", diff, reg_move)


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


def check_old_log_probs_from_update(path: str, remove_padding: bool = False) -> None:
    """One optimizer step per trainer step (perl.verl_glue.on_policy): the update with its old
    log-probs taken from its own forward (PeRL's trainer flag, no old log-probs in the batch) gives the
    same weights as verl's way (a separate pass for them first), and the metrics that pass gives come
    out of the update equal to verl's own `calculate_debug_metrics` and entropy mean over both ranks'
    batches (each rank has its own). `remove_padding`: verl's packed path, every GPU recipe's (the CPU
    profile refuses it for a run: flash-attn's varlen kernels; with sdpa, transformers masks packed
    sequences by their position ids, so the engine runs it here). On both the step's entropy is computed
    without a gradient (the packed path: through verl's `compute_entropy_from_logits`; the padded one:
    PeRL's `_outputs_with_metric_entropy`)."""
    import torch.distributed as dist
    from verl.protocol import DataProto
    from verl.trainer.ppo.rollout_corr_helper import compute_offpolicy_metrics
    from verl.utils.debug.metrics import calculate_debug_metrics
    from verl.utils.metric.utils import Metric
    from verl.utils.torch_functional import allgather_dict_into_dict

    from perl.verl_glue.on_policy import FROM_UPDATE, old_log_probs_source, update_metrics
    from support.engine_harness import batch_meta, to_tensordict

    same = ["peft.dropout=0.0", "actor_rollout_ref.actor.optim.optimizer=SGD",  # as check_sgrpo: no noise
            "actor_rollout_ref.rollout.temperature=0.7"]  # log-probs and entropy at the rollout's temperature
    if remove_padding:
        same.append("+actor_rollout_ref.model.override_config.attn_implementation=sdpa")
    cfg = cfg_for(path, "lora", same)
    assert old_log_probs_source(cfg)[0] == "update", old_log_probs_source(cfg)
    cfg.actor_rollout_ref.model.use_remove_padding = remove_padding  # past the CPU profile's check
    eng_a, loss_a = build_actor_engine(cfg)
    eng_b, loss_b = build_actor_engine(cfg)
    assert eng_b.engine_config.use_remove_padding is remove_padding
    seen = []  # the entropy each micro-batch's outputs carry to the loss: computed without a gradient
    outputs = eng_b.prepare_model_outputs
    eng_b.prepare_model_outputs = lambda *a, **k: seen.append(outputs(*a, **k)) or seen[-1]
    with torch.no_grad():  # lora_B away from zero, so that the log-probs depend on the adapter; then B = A
        for (name, pa), pb in zip(eng_a.module.named_parameters(), eng_b.module.parameters()):
            local = pa.to_local() if hasattr(pa, "to_local") else pa
            if "lora_B" in name:
                local.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 1000))
            (pb.to_local() if hasattr(pb, "to_local") else pb).copy_(local)
    rank = dist.get_rank()
    rows = synthetic_batch(4, vocab=VOCAB, seed=11 + rank, response_len=(3, 9))
    # verl's pass: old log-probs and entropy of every response token (the trainer's infer call)
    meta = dict(batch_meta(cfg, train=False), calculate_entropy=True)
    with eng_a.eval_mode(disable_auto_offload=True):
        out = eng_a.infer_batch(to_tensordict(rows, meta), loss_function=None)
    old, entropy = [], []
    for lp, ent, prompt, response in zip(out["model_output"]["log_probs"].unbind(), out["model_output"]["entropy"].unbind(),
                                         rows["prompts"], rows["responses"]):
        p, r = len(prompt), len(response)
        old.append(lp[p - 1 : p - 1 + r].detach().clone())
        entropy.append(ent[p - 1 : p - 1 + r].detach().clone())
    g = torch.Generator().manual_seed(100 + rank)
    rows["rollout_log_probs"] = [o + 0.02 * torch.randn(len(o), generator=g) for o in old]
    rows["response_mask"][0] = torch.cat([rows["response_mask"][0][:-1], torch.zeros(1, dtype=torch.int64)])
    rows["loss_mask"][0] = rows["response_mask"][0].clone()

    before = full_state(eng_a)
    out_a = train_step(eng_a, loss_a, cfg, rows)  # verl's way: the pass, then the update
    data = to_tensordict(rows, {**batch_meta(cfg, train=True), FROM_UPDATE: True})
    assert "old_log_probs" not in data.keys()
    with eng_b.train_mode(disable_auto_offload=True):
        out_b = eng_b.train_batch(data, loss_function=loss_b)
    eng_b.lr_scheduler_step()
    assert seen and all(o["log_probs"].requires_grad and not o["entropy"].requires_grad for o in seen), \
        [(o["log_probs"].requires_grad, o["entropy"].requires_grad) for o in seen]
    a, b = full_state(eng_a), full_state(eng_b)
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert max(diffs.values()) < 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    moved = max(float((a[k] - before[k]).abs().max()) for k in a)
    assert moved > 1000 * max(diffs.values()), ("the step did not train", moved)

    def reduced(output) -> dict:  # verl's worker: gather over ranks, Metric.aggregate_dp
        gathered = allgather_dict_into_dict(output["metrics"], group=None)
        return {k: Metric.aggregate_dp(v) if isinstance(v[0], Metric) else float(np.mean(v)) for k, v in gathered.items()}

    got, verls = reduced(out_b), reduced(out_a)
    assert abs(got["actor/pg_loss"] - verls["actor/pg_loss"]) < 1e-6, (got["actor/pg_loss"], verls["actor/pg_loss"])
    assert got["actor/pg_clipfrac"] == 0.0 and got["actor/ppo_kl"] == 0.0, got  # the ratio is exactly 1
    update_metrics(got, entropy_in_loss=False, offpolicy=True)
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, (old, entropy, rows["rollout_log_probs"], rows["response_mask"]))
    pad = lambda ts: torch.nn.utils.rnn.pad_sequence(ts, batch_first=True)  # noqa: E731
    old_all, ent_all, roll_all, mask_all = (pad([t for part in everything for t in part[i]]) for i in range(4))
    want = calculate_debug_metrics(DataProto.from_dict({"old_log_probs": old_all, "rollout_log_probs": roll_all,
                                                        "response_mask": mask_all, "responses": old_all}))
    want["actor/entropy"] = float((ent_all * mask_all).sum() / mask_all.sum())  # verl: token-mean over the batch
    offpolicy = compute_offpolicy_metrics(old_log_prob=old_all, rollout_log_prob=roll_all, response_mask=mask_all)
    want.update({f"rollout_corr/{k}": v for k, v in offpolicy.items()})
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-4, abs_tol=1e-6), (key, got[key], value)
    assert len(want) == 19, sorted(want)


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
