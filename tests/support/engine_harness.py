"""Test scaffolding: build and drive the actor engine the way verl's `ActorRolloutRefWorker` does,
without Ray or vLLM.

Not part of PeRL's product: the engine tests (CPU, gloo, `VERL_PLATFORM=cpu`), the S-GRPO memory
bench (`bench/token_efficient_memory.py`) and a GPU smoke script import it from here. From a
composed PeRL config it builds the worker's dataclass configs (`omega_conf_to_dataclass`, as
`init_model` does), asks verl's `EngineRegistry` for the engine (PeRL's, through its
registration), initialises it, and runs verl's own DAPO loss (`verl.workers.utils.losses.ppo_loss`)
on a synthetic batch in the nested-tensor layout verl's agent loop produces.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf


def cpu_overrides(model_path: str, *, method: str, rank: int = 4, alpha: float = 8.0, total_steps: int = 10,
                  lr: float = 1e-2, micro: int = 2, n: int = 2, prompts: int = 2) -> list[str]:
    """Overrides that make a composed config run on CPU with a tiny model: the CPU profile of a real
    CPU run (trainer.device=cpu: fp32, no torch.compile, the padded path; perl/verl_glue/config/cpu.yaml),
    with eager attention (the tests compare against HF's eager forward) and no gradient checkpointing."""
    return [
        f"peft.name={method}", f"peft.rank={rank}", f"peft.alpha={alpha}",
        f"actor_rollout_ref.model.path={model_path}",
        "trainer.device=cpu",
        "actor_rollout_ref.model.enable_gradient_checkpointing=false",
        "+actor_rollout_ref.model.override_config.attn_implementation=eager",
        f"actor_rollout_ref.actor.optim.lr={lr}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={prompts}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro}",
        f"actor_rollout_ref.rollout.n={n}",
        f"data.train_batch_size={prompts}",
        "data.max_response_length=8",
        f"trainer.total_training_steps={total_steps}",
        "trainer.n_gpus_per_node=1",
    ]


def build_actor_engine(cfg: DictConfig, *, initialize: bool = True):
    """(engine, loss_fn) for the actor of `cfg`, built like `ActorRolloutRefWorker.init_model` (actor part)."""
    import perl.verl_glue.engine  # noqa: F401  (the worker imports it through model.external_lib)
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.engine import EngineRegistry
    from verl.workers.utils.losses import ppo_loss

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    arr = cfg.actor_rollout_ref
    model_config = omega_conf_to_dataclass(arr.model)
    actor_config = omega_conf_to_dataclass(arr.actor)
    actor_config.model_config = model_config
    engine_config = actor_config.engine
    engine_config.use_dynamic_bsz = arr.actor.use_dynamic_bsz
    engine_config.infer_max_token_len_per_gpu = arr.rollout.log_prob_max_token_len_per_gpu
    engine_config.infer_micro_batch_size_per_gpu = arr.rollout.log_prob_micro_batch_size_per_gpu
    engine_config.max_token_len_per_gpu = arr.actor.ppo_max_token_len_per_gpu
    engine_config.micro_batch_size_per_gpu = arr.actor.ppo_micro_batch_size_per_gpu
    engine_config.use_remove_padding = model_config.get("use_remove_padding", False)
    optimizer_config = actor_config.optim
    optimizer_config.total_training_steps = int(cfg.trainer.total_training_steps)  # what the trainer writes
    engine = EngineRegistry.new(
        model_type="language_model",
        backend=engine_config.strategy,
        model_config=model_config,
        engine_config=engine_config,
        optimizer_config=optimizer_config,
        checkpoint_config=actor_config.checkpoint,
    )
    if initialize:
        engine.initialize()
    return engine, partial(ppo_loss, config=actor_config)


def sequence_rows(prompts: list[torch.Tensor], responses: list[torch.Tensor],
                  advantages: list[float]) -> dict[str, list]:
    """Per-sequence tensors as verl's agent loop writes them (prompts, responses, masks, ids,
    positions, one advantage per sequence) for the given token ids."""
    rows: dict[str, list] = {k: [] for k in ("prompts", "responses", "response_mask", "loss_mask", "input_ids",
                                             "position_ids", "advantages")}
    for prompt, response, advantage in zip(prompts, responses, advantages):
        r = len(response)
        rows["prompts"].append(prompt)
        rows["responses"].append(response)
        rows["response_mask"].append(torch.ones(r, dtype=torch.int64))
        rows["loss_mask"].append(torch.ones(r, dtype=torch.int64))
        rows["input_ids"].append(torch.cat([prompt, response]))
        rows["position_ids"].append(torch.arange(len(prompt) + r))
        rows["advantages"].append(torch.full((r,), float(advantage)))
    return rows


def synthetic_batch(n_seqs: int, *, vocab: int, seed: int, prompt_len: tuple[int, int] = (3, 6),
                    response_len: tuple[int, int] = (2, 8)) -> dict[str, list]:
    """`sequence_rows` of random prompts, responses and advantages."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses, advantages = [], [], []
    for _ in range(n_seqs):
        p = int(torch.randint(prompt_len[0], prompt_len[1] + 1, (1,), generator=g))
        r = int(torch.randint(response_len[0], response_len[1] + 1, (1,), generator=g))
        prompts.append(torch.randint(0, vocab, (p,), generator=g))
        responses.append(torch.randint(0, vocab, (r,), generator=g))
        advantages.append(float(torch.randn(1, generator=g)))
    return sequence_rows(prompts, responses, advantages)


def to_tensordict(rows: dict[str, list], meta: dict[str, Any]):
    from verl.utils import tensordict_utils as tu

    nested = {k: torch.nested.as_nested_tensor(v, layout=torch.jagged) for k, v in rows.items()}
    return tu.get_tensordict(tensor_dict=nested, non_tensor_dict=dict(meta))


def batch_meta(cfg: DictConfig, *, train: bool) -> dict[str, Any]:
    """The non-tensor keys the worker/trainer attach before `infer_batch` / `train_batch`."""
    arr = cfg.actor_rollout_ref
    meta = {
        "use_remove_padding": bool(arr.model.use_remove_padding),
        "use_dynamic_bsz": bool(arr.actor.use_dynamic_bsz),
        "use_fused_kernels": False,
        "temperature": float(arr.rollout.temperature),
        "calculate_entropy": False,
    }
    if train:
        meta["micro_batch_size_per_gpu"] = int(arr.actor.ppo_micro_batch_size_per_gpu)
        meta["global_batch_size"] = int(arr.actor.ppo_mini_batch_size) * int(arr.rollout.n)
    else:
        meta["micro_batch_size_per_gpu"] = int(arr.rollout.log_prob_micro_batch_size_per_gpu)
    return meta


def response_log_probs(engine, cfg: DictConfig, rows: dict[str, list], *, no_adapter: bool = False) -> list[torch.Tensor]:
    """Per-sequence log-probs of the response tokens, through the engine's `infer_batch` (what
    `compute_log_prob` / `compute_ref_log_prob` run); `no_adapter`: the reference policy path."""
    from contextlib import nullcontext

    data = to_tensordict(rows, batch_meta(cfg, train=False))
    with engine.eval_mode(disable_auto_offload=True):
        ctx = engine.disable_adapter() if no_adapter else nullcontext()
        with ctx:
            out = engine.infer_batch(data, loss_function=None)
    log_probs = out["model_output"]["log_probs"]
    result = []
    for lp, prompt, response in zip(log_probs.unbind(), rows["prompts"], rows["responses"]):
        p, r = len(prompt), len(response)
        result.append(lp[p - 1 : p - 1 + r].detach().clone())  # position t predicts token t+1
    return result


def train_step(engine, loss_fn, cfg: DictConfig, rows: dict[str, list]) -> dict[str, Any]:
    """One DAPO update (verl's ppo_loss) on `rows`: old log-probs from the engine, then train_batch."""
    rows = dict(rows)
    rows["old_log_probs"] = response_log_probs(engine, cfg, rows)
    data = to_tensordict(rows, batch_meta(cfg, train=True))
    with engine.train_mode(disable_auto_offload=True):
        out = engine.train_batch(data, loss_function=loss_fn)
    engine.lr_scheduler_step()
    return out


def cfg_for(model_path: str, method: str, extra: list[str] | None = None, **kw) -> DictConfig:
    from perl.verl_glue.config import compose

    return compose({}, cpu_overrides(model_path, method=method, **kw) + list(extra or []))
