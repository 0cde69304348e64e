"""A run against its GPU node, before Ray: what verl would otherwise assert minutes into the run.

- parallel sizes: a vLLM replica (rollout TP x DP x PP) and Ulysses sequence parallelism must divide
  the GPUs (trainer.n_gpus_per_node x trainer.nnodes) and the model's attention heads;
- dynamic batching: each token budget must hold one whole sequence (max_prompt_length +
  max_response_length), or verl's `rearrange_micro_batches` asserts mid-run;
- the weight-sync backend: PeRL's merged sync goes through verl's colocated `naive` engine;
  `delta_sharded` sends shards of the unmerged parameters (`get_per_tensor_param_shard`);
- flash-attn where the config needs it (gpu.py), on this node;
- an estimate of the per-GPU peak memory of logits and activations at the configured lengths,
  against the GPU's memory: a warning naming the knobs, not an error (`estimate_memory`);
- several nodes with a held-out evaluation: a note that the run directory must be shared
  (`shared_run_dir_note`; whether it is cannot be seen from one node).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from .cpu import CPU_DEVICE
from .errors import ConfigError
from . import gpu
from .gpu import GB, attention_note, check_flash_attn, gpu_memory_gb, needs_flash_attn

BACKEND_KEY = "actor_rollout_ref.rollout.checkpoint_engine.backend"
SYNC_BACKENDS = ("naive",)
# verl 0.9.1's other registered backends (checkpoint_engine/*.py; tests/test_upgrade_contract.py)
VERL_BACKENDS = ("nccl", "nixl", "kimi_ckpt_engine", "mooncake", "delta_sharded")  # (HCCL registers as "nccl")
WARN_AT = 0.9  # share of the GPU's memory above which the estimate warns


def n_gpus(cfg: DictConfig) -> int:
    return int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)


def ulysses(cfg: DictConfig, role: str) -> int:
    """A role's Ulysses size as verl's engine reads it (the role's key, else its fsdp_config's)."""
    node = cfg.actor_rollout_ref[role]
    size = int(node.get("ulysses_sequence_parallel_size", 1) or 1)
    return size if size > 1 else int(OmegaConf.select(node, "fsdp_config.ulysses_sequence_parallel_size",
                                                      default=1) or 1)


def _text(hf):
    """A multimodal config's language model (its text_config), else the config itself."""
    return getattr(hf, "text_config", None) or hf


def _heads(hf) -> tuple[int, int]:
    hf = _text(hf)
    return int(hf.num_attention_heads), int(getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads)


def check_parallel(cfg: DictConfig, hf) -> None:
    """Rollout TP x DP x PP and Ulysses SP against the GPUs and the attention heads."""
    r = cfg.actor_rollout_ref.rollout
    tp, dp, pp = (int(r.get(k, 1) or 1) for k in ("tensor_model_parallel_size", "data_parallel_size",
                                                   "pipeline_model_parallel_size"))
    per_node, gpus = int(cfg.trainer.n_gpus_per_node), n_gpus(cfg)
    heads, kv = _heads(hf)
    here = f"trainer.n_gpus_per_node x trainer.nnodes = {per_node} x {cfg.trainer.nnodes} = {gpus} GPU(s)"
    replica = tp * dp * pp
    ok_tp = [t for t in range(1, gpus + 1) if gpus % (t * dp * pp) == 0 and heads % t == 0
             and (kv % t == 0 or t % kv == 0)]
    fix = f"set actor_rollout_ref.rollout.tensor_model_parallel_size to one of {ok_tp}" if ok_tp else \
        "lower data_parallel_size / pipeline_model_parallel_size"
    if gpus % replica:
        raise ConfigError(f"actor_rollout_ref.rollout.tensor_model_parallel_size={tp} x data_parallel_size={dp} x "
                          f"pipeline_model_parallel_size={pp} = {replica} GPUs per vLLM replica does not divide {here} "
                          f"(verl asserts when the workers start): {fix}")
    if replica > per_node and replica % per_node:
        raise ConfigError(f"actor_rollout_ref.rollout: a vLLM replica of {replica} GPUs spans nodes of {per_node} "
                          f"GPUs unevenly (verl asserts): {fix}")
    if heads % tp or (kv % tp and tp % kv):
        raise ConfigError(f"actor_rollout_ref.rollout.tensor_model_parallel_size={tp}: vLLM splits the model's "
                          f"{heads} attention heads ({kv} key/value heads) across TP ranks, and {tp} does not divide "
                          f"them: {fix}")
    for role in ("actor", "ref"):
        sp = ulysses(cfg, role)
        key = f"actor_rollout_ref.{role}.ulysses_sequence_parallel_size"
        if gpus % sp:
            raise ConfigError(f"{key}={sp} does not divide {here}: FSDP's mesh is (GPUs / sp, sp); use a divisor "
                              f"of {gpus}")
        if sp > 1 and (heads % sp or (kv % sp and sp % kv)):
            raise ConfigError(f"{key}={sp}: Ulysses splits the {heads} attention heads ({kv} key/value heads) across "
                              f"the sequence-parallel group, and {sp} does not divide them (verl asserts)")


def check_token_budgets(cfg: DictConfig) -> None:
    """With dynamic batching, every token budget holds one whole sequence (times Ulysses' split)."""
    from verl.trainer.ppo.utils import need_reference_policy

    arr, data = cfg.actor_rollout_ref, cfg.data
    seq = int(data.max_prompt_length) + int(data.max_response_length)
    budgets = [("actor", "use_dynamic_bsz", "ppo_max_token_len_per_gpu", "actor"),
               ("rollout", "log_prob_use_dynamic_bsz", "log_prob_max_token_len_per_gpu", "actor")]
    if need_reference_policy(cfg):
        budgets.append(("ref", "log_prob_use_dynamic_bsz", "log_prob_max_token_len_per_gpu", "ref"))
    for role, flag, key, sp_role in budgets:
        if not arr[role].get(flag, False):
            continue
        budget, sp = int(arr[role][key]), ulysses(cfg, sp_role)
        if budget * sp < seq:
            raise ConfigError(
                f"actor_rollout_ref.{role}.{key}={budget}: with dynamic batching (actor_rollout_ref.{role}.{flag}=true) "
                f"a micro-batch holds {budget} tokens per GPU x Ulysses {sp}, less than one whole sequence "
                f"(data.max_prompt_length + data.max_response_length = {data.max_prompt_length} + "
                f"{data.max_response_length} = {seq}); verl asserts when the first long response arrives. Set "
                f"actor_rollout_ref.{role}.{key} >= {math.ceil(seq / sp)}, or a shorter data.max_response_length")


def check_sync_backend(cfg: DictConfig) -> None:
    backend = str(OmegaConf.select(cfg, BACKEND_KEY))
    if backend in SYNC_BACKENDS:
        return
    if backend == "delta_sharded":
        why = ("verl's delta engine sends each rank's shards of the unmerged parameters (the engine's "
               "get_per_tensor_param_shard), not PeRL's merged weights (get_per_tensor_param): the rollout "
               "would get the adapter's peft-named parameters, or run without the adapter")
    elif backend in VERL_BACKENDS:
        why = ("a disaggregated-rollout backend (verl's separate-async trainer, rollout on other GPUs); PeRL runs "
               "verl's sync trainer with the rollout colocated on the actor's GPUs and has run only naive")
    else:
        why = "not a backend verl 0.9.1 registers (" + ", ".join(("naive",) + VERL_BACKENDS) + ")"
    raise ConfigError(f"{BACKEND_KEY}={backend}: {why}. PeRL supports {', '.join(SYNC_BACKENDS)}")


@dataclass
class MemoryEstimate:
    """The per-GPU peak of one phase, in GB (1e9 bytes)."""

    phase: str  # "update" (with gradients) or "log-probs" (old log-probs + entropy, no gradients)
    tokens: int  # tokens of one micro-batch on one GPU
    logits: float
    activations: float
    states: float  # parameter shards, gradients and Adam state of the trained ones

    @property
    def total(self) -> float:
        return self.logits + self.activations + self.states


def estimate_memory(cfg: DictConfig, hf, total_params: int, trainable_params: int) -> MemoryEstimate:
    """The larger of the update's and the log-prob pass's per-GPU peak, worst case (every sequence at
    max_prompt_length + max_response_length). A floor, not a bound: CUDA context, allocator
    fragmentation, adapters' own activations and vLLM (asleep during training when free_cache_engine)
    are not counted.

    T tokens per GPU micro-batch: ppo_max_token_len_per_gpu with dynamic batching, else micro-batch x
    sequence / Ulysses. Logits, at the compute dtype's b bytes: T x vocab x b, three live copies (the
    update: logits, the log-softmax kept for backward, the gradient, two where flash-attn's
    cross-entropy runs, i.e. with remove-padding; +1 for entropy in the loss. The log-prob pass: logits
    and the entropy's softmax and product, one with entropy_from_logits_with_chunking; it does not run
    where the update gives the old log-probs (perl.old_log_probs, perl.verl_glue.on_policy: the step's
    entropy then comes from the update in row chunks, without a gradient), unless a reference policy
    needs one). Activations of a
    decoder layer: 8h + 4 kv + 4 I elements a token (norms, q/k/v/o, rotary, SwiGLU); with gradient
    checkpointing every layer keeps its input (h) and one layer is recomputed. States: fp32 parameter
    shards over all GPUs, + gradients and Adam moments (12 bytes) of the trained parameters."""
    from perl.verl_glue.on_policy import old_log_probs_source

    arr, data = cfg.actor_rollout_ref, cfg.data
    actor, rollout = arr.actor, arr.rollout
    seq, gpus, sp = int(data.max_prompt_length) + int(data.max_response_length), n_gpus(cfg), ulysses(cfg, "actor")
    dtype = str(OmegaConf.select(actor, "fsdp_config.mixed_precision.param_dtype", default="bf16") or "bf16")
    b = 4 if dtype in ("fp32", "float32") else 2
    hf = _text(hf)
    vocab, h, layers = int(hf.vocab_size), int(hf.hidden_size), int(hf.num_hidden_layers)
    heads, kv_heads = _heads(hf)
    kv = kv_heads * int(getattr(hf, "head_dim", None) or h // heads)
    per_token = (8 * h + 4 * kv + 4 * int(hf.intermediate_size)) * b
    fsdp = actor.fsdp_config
    states = (0 if fsdp.get("param_offload") else 4 * total_params / gpus) \
        + (0 if fsdp.get("optimizer_offload") else 12 * trainable_params / gpus)

    def tokens(dynamic: bool, budget, micro) -> int:
        return int(budget) if dynamic else math.ceil(int(micro or 1) * seq / sp)

    t_up = tokens(actor.use_dynamic_bsz, actor.ppo_max_token_len_per_gpu, actor.ppo_micro_batch_size_per_gpu)
    copies = 2 if arr.model.get("use_remove_padding") else 3
    # +1: the entropy's softmax when it is in the loss (where the update gives the old log-probs it
    # computes the step's entropy for the metric in row chunks without a gradient: perl.verl_glue.engine)
    copies += 1 if (actor.get("calculate_entropy") or float(actor.entropy_coeff or 0) != 0) else 0
    checkpointing = bool(arr.model.get("enable_gradient_checkpointing"))
    acts = t_up * (layers * h * b + per_token) if checkpointing else t_up * layers * per_token
    update = MemoryEstimate("update", t_up, copies * t_up * vocab * b / GB, acts / GB, states / GB)
    t_lp = tokens(rollout.log_prob_use_dynamic_bsz, rollout.log_prob_max_token_len_per_gpu,
                  rollout.log_prob_micro_batch_size_per_gpu)
    lp_copies = 1 if actor.get("entropy_from_logits_with_chunking") else 3
    logprobs = MemoryEstimate("log-probs", t_lp, lp_copies * t_lp * vocab * b / GB, t_lp * per_token / GB,
                              4 * total_params / gpus / GB)
    if old_log_probs_source(cfg)[0] == "update" and not actor.get("use_kl_loss"):
        return update  # no log-prob pass runs (nor a reference policy's)
    return max(update, logprobs, key=lambda e: e.total)


KNOBS = ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu / rollout.log_prob_micro_batch_size_per_gpu (or "
         "actor.use_dynamic_bsz=true with ppo_max_token_len_per_gpu / log_prob_max_token_len_per_gpu of one "
         "sequence), actor.ulysses_sequence_parallel_size, actor.entropy_from_logits_with_chunking=true, "
         "model.enable_gradient_checkpointing=true, data.max_response_length")


def memory_line(est: MemoryEstimate, gpu_gb: float, source: str, available: float) -> str:
    """The estimate against one GPU, one line; a warning naming the knobs when it is close or over."""
    of = (f"{gpu_gb:.1f} GB ({source})" if available == gpu_gb else
          f"the {available:.1f} GB vLLM leaves of {gpu_gb:.1f} GB ({source}; rollout.free_cache_engine=false)")
    line = (f"memory estimate: {est.total:.1f} GB per GPU at the {est.phase} peak (micro-batch of {est.tokens:,} "
            f"tokens: logits {est.logits:.1f}, activations {est.activations:.1f}, weights/optimizer {est.states:.1f}) "
            f"of {of}")
    if est.total > WARN_AT * available:
        line = (f"warning: {line}: {'over' if est.total > available else 'within 10% of'} the GPU's memory; "
                f"lower it with {KNOBS}")
    return line


def available_gb(cfg: DictConfig, gpu_gb: float) -> float:
    """What training may use: vLLM keeps gpu_memory_utilization of the GPU unless it sleeps."""
    rollout = cfg.actor_rollout_ref.rollout
    asleep = rollout.get("free_cache_engine", True) and rollout.get("enable_sleep_mode", True) is not False
    return gpu_gb if asleep else gpu_gb * (1 - float(rollout.gpu_memory_utilization))


def shared_run_dir_note(cfg: DictConfig) -> str | None:
    """With trainer.nnodes > 1 the held-out evaluation after training, on the driver's node, reads
    the adapter verl's rank 0 wrote on its own node (perl.verl_glue.checkpoints): a note before the
    run, since a node-local directory is only found out after training."""
    heldout = cfg.perl.get("heldout")
    if int(cfg.trainer.nnodes) <= 1 or heldout is None or heldout.get("data") is None:
        return None
    return (f"trainer.nnodes={cfg.trainer.nnodes} with a held-out evaluation (perl.heldout.data): the driver "
            f"reads the last checkpoint's adapter, which verl's rank 0 writes on its node, so "
            f"trainer.default_local_dir ({cfg.trainer.default_local_dir}) must be on a filesystem every node "
            "shares (NFS); otherwise set perl.heldout.data=null and run `perl eval` on that node afterwards")


def gpu_run_checks(cfg: DictConfig, hf, summary: dict, *, on_node: bool) -> list[str]:
    """Every check above (ConfigError on the first failure); returns the notes to show: the memory
    estimate (GPU runs), the attention choice and the shared run directory of a multi-node run.
    `on_node`: this machine runs it (not a dry run)."""
    check_parallel(cfg, hf)
    check_token_budgets(cfg)
    check_sync_backend(cfg)
    shared = shared_run_dir_note(cfg)
    notes = [shared] if shared else []
    if cfg.trainer.device == CPU_DEVICE:
        return notes
    if on_node:
        check_flash_attn(cfg)
    elif needs_flash_attn(cfg) and not gpu.flash_attn_available():
        notes.append(f"{' and '.join(needs_flash_attn(cfg))}: the GPU node needs flash-attn (it does not import here)")
    note = attention_note(cfg)
    if note:
        notes.append(note)
    gpu_gb, source = gpu_memory_gb(cfg)
    est = estimate_memory(cfg, hf, int(summary["total"]), int(summary["trainable"]))
    notes.append(memory_line(est, gpu_gb, source, available_gb(cfg, gpu_gb)))
    return notes
