"""Single-process RLVR engine (one CPU or GPU): rollout -> reward -> DAPO/GRPO update -> sync.

The same pieces as the verl path: PeRL's method registry and merged sync (into a separate rollout
model, as vLLM would get them), PeRL's reward, and verl's own advantage and policy-loss functions
(`verl.trainer.ppo.core_algos`). DAPO = clip-higher (0.2/0.28) + token-mean loss + dynamic
sampling (groups whose rewards are all equal are dropped and more prompts are drawn, up to a cap).
GRPO and Dr. GRPO are selectable (`algorithm`).
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from perl.engine import SamplingConfig, sample
from perl.eval.metrics import sample_seed
from perl.methods import AdaptedPolicy
from perl.reward import MathReward
from perl.sync import merged_weights
from perl.engine.tokenizer import prompt_ids

ALGORITHMS = ("dapo", "grpo", "drgrpo")


@dataclass
class RLConfig:
    algorithm: str = "dapo"
    steps: int = 30
    prompts_per_step: int = 16  # groups kept per update (after dynamic sampling)
    group_size: int = 8  # G
    lr: float = 1e-3
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO clip-higher; grpo/drgrpo use clip_low on both sides
    max_gen_batches: int = 3  # dynamic sampling: at most this many generation rounds per step
    mini_batches: int = 4  # optimizer steps per rollout batch (verl's ppo_mini_batch_size); >1 makes clipping bite
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    # Which tokens carry the policy loss (perl.algos.token_efficient, arXiv 2504.20834):
    # token = every response token (verl's GRPO/DAPO loss); sgrpo = S-GRPO's sampled subset;
    # tspmo = T-SPMO's unique (prefix, next token) pairs. `algorithm` still sets the clip range,
    # dynamic sampling and (sgrpo) the advantage's std normalisation.
    loss_mode: str = "token"
    sgrpo_alpha: int = 4  # the first alpha response tokens are always in the loss
    sgrpo_k: int = 8  # at most k tokens per response
    sgrpo_p: float = 0.5  # later tokens join with probability p while fewer than k are in
    sgrpo_weighting: str = "paper"  # paper (1/|T_i| mean) | unbiased (1/inclusion-probability weights)
    tspmo_norm: str = "pairs"  # pairs (non-zero-advantage pairs) | all_pairs | sequences
    subset_forward: bool = True  # sgrpo/tspmo: LM head only at the loss positions (False: full logits, gathered)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: {self.algorithm!r} is not one of {ALGORITHMS}")
        from perl.algos.token_efficient import LOSS_MODES, TSPMO_NORMS

        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"loss_mode: {self.loss_mode!r} is not one of {LOSS_MODES}")
        if self.tspmo_norm not in TSPMO_NORMS:
            raise ValueError(f"tspmo_norm: {self.tspmo_norm!r} is not one of {TSPMO_NORMS}")
        self.sgrpo_config()  # checks sgrpo_alpha / sgrpo_k / sgrpo_p / sgrpo_weighting
        for name in ("steps", "prompts_per_step", "group_size", "max_gen_batches", "max_new_tokens", "mini_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (group-relative advantages)")

    def sgrpo_config(self):
        from perl.algos.token_efficient import SGRPOConfig

        return SGRPOConfig(self.sgrpo_alpha, self.sgrpo_k, self.sgrpo_p, self.sgrpo_weighting)


def _actor_config(cfg: RLConfig):
    from omegaconf import OmegaConf

    high = cfg.clip_high if cfg.algorithm == "dapo" else cfg.clip_low
    return OmegaConf.create({"clip_ratio": cfg.clip_low, "clip_ratio_low": cfg.clip_low, "clip_ratio_high": high,
                             "clip_ratio_c": 3.0, "global_batch_info": {}})


def _loss_agg_mode(cfg: RLConfig) -> str:
    return "seq-mean-token-sum-norm" if cfg.algorithm == "drgrpo" else "token-mean"


def _log_probs_and_entropy(model, seqs: torch.Tensor, attn: torch.Tensor, resp_start: int):
    logits = model(input_ids=seqs, attention_mask=attn).logits[:, resp_start - 1 : -1].float()
    logp = torch.log_softmax(logits, -1)
    tokens = seqs[:, resp_start:]
    token_logp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token_logp, entropy


class LocalRL:
    """One policy, one rollout model, one reward; `step()` does one DAPO/GRPO update."""

    def __init__(self, policy: AdaptedPolicy, rollout_model, tokenizer, train_rows: list[dict], cfg: RLConfig,
                 reward: MathReward | None = None) -> None:
        self.policy, self.rollout, self.tok, self.rows, self.cfg = policy, rollout_model, tokenizer, train_rows, cfg
        self.reward = reward or MathReward()
        self.opt = torch.optim.AdamW(policy.param_groups(cfg.lr), lr=cfg.lr, weight_decay=0.0)
        self.step_idx = 0
        self.rng = random.Random(cfg.seed)
        self.actor_cfg = _actor_config(cfg)
        self.sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
        self._prompt_cache: dict[int, list[int]] = {}
        self._timing = {"rollout_s": 0.0, "reward_s": 0.0}

    def cached_prompt(self, i: int) -> list[int]:
        if i not in self._prompt_cache:
            self._prompt_cache[i] = prompt_ids(self.tok, self.rows[i]["prompt"])
        return self._prompt_cache[i]

    def sync(self) -> float:
        t = time.perf_counter()
        self.rollout.load_state_dict(dict(merged_weights(self.policy, torch.float32, include_tied=True)), strict=True)
        return time.perf_counter() - t

    def _generate_groups(self, prompt_idx: list[int], round_: int):
        g = self.cfg.group_size
        ids = [self.cached_prompt(i) for i in prompt_idx for _ in range(g)]
        seeds = [sample_seed(self.cfg.seed, f"train:{self.step_idx}:{round_}:{i}", j) for i in prompt_idx for j in range(g)]
        t0 = time.perf_counter()
        outs = sample(self.rollout, ids, seeds, self.sampling, [self.tok.eos_token_id], self.tok.pad_token_id)
        t1 = time.perf_counter()
        texts = [self.tok.decode(o, skip_special_tokens=True) for o in outs]
        truths = [self.rows[i]["reward_model"]["ground_truth"] for i in prompt_idx for _ in range(g)]
        scores = self.reward.score_batch(texts, truths)
        self._timing["rollout_s"] += t1 - t0
        self._timing["reward_s"] += time.perf_counter() - t1
        return ids, outs, scores

    def step(self) -> dict[str, float]:
        cfg, g = self.cfg, self.cfg.group_size
        self._timing = {"rollout_s": 0.0, "reward_s": 0.0}
        timings = {"sync_s": self.sync()}
        kept: list[tuple[list[int], list[int], float]] = []  # (prompt ids, response ids, reward)
        drawn = groups_seen = 0
        all_scores: list[dict] = []
        for round_ in range(cfg.max_gen_batches):
            need = cfg.prompts_per_step - len(kept) // g
            if need <= 0:
                break
            batch = [self.rng.randrange(len(self.rows)) for _ in range(need if round_ == 0 else need * 2)]
            ids, outs, scores = self._generate_groups(batch, round_)
            all_scores += scores
            drawn += len(batch)
            for k in range(len(batch)):
                group = list(range(k * g, (k + 1) * g))
                rewards = [scores[j]["score"] for j in group]
                groups_seen += 1
                if cfg.algorithm == "dapo" and max(rewards) == min(rewards):
                    continue  # dynamic sampling: no signal in a group whose rewards are all equal
                if len(kept) // g < cfg.prompts_per_step:
                    kept += [(ids[j], outs[j], rewards[j - k * g]) for j in group]
        timings.update(self._timing)
        metrics = {
            "step": self.step_idx + 1,
            "reward": float(np.mean([s["score"] for s in all_scores])),
            "acc": float(np.mean([s["acc"] for s in all_scores])),
            "kept_groups": len(kept) // g,
            "groups_drawn": groups_seen,
            "response_len": float(np.mean([len(o) for _, o, _ in kept])) if kept else 0.0,
        }
        t0 = time.perf_counter()
        if kept:
            metrics.update(self._update(kept))
        else:
            metrics.update({"pg_loss": 0.0, "entropy": float("nan"), "pg_clipfrac": 0.0})
        timings["update_s"] = time.perf_counter() - t0
        self.step_idx += 1
        metrics.update(timings)
        return metrics

    def _pack(self, kept):
        """(token ids, attention mask, response mask, prompt width) of (prompt, response, reward) rows:
        prompts left-padded and responses right-padded, so every response starts at `p_width`."""
        n = len(kept)
        p_width = max(len(p) for p, _, _ in kept)
        r_width = max(max(len(r) for _, r, _ in kept), 1)
        seqs = torch.full((n, p_width + r_width), self.tok.pad_token_id)
        attn = torch.zeros_like(seqs)
        mask = torch.zeros((n, r_width))
        for i, (p, r, _) in enumerate(kept):  # prompt left-padded, response right-padded
            seqs[i, p_width - len(p) : p_width] = torch.tensor(p)
            seqs[i, p_width : p_width + len(r)] = torch.tensor(r, dtype=torch.long)
            attn[i, p_width - len(p) : p_width + len(r)] = 1
            mask[i, : len(r)] = 1
        return seqs, attn, mask, p_width

    def _outcome_advantages(self, kept, mask):
        """verl's GRPO (or Dr. GRPO: no std division) advantage of each row's reward, over its group."""
        from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

        n = len(kept)
        token_rewards = torch.zeros_like(mask)
        last = (mask.sum(-1) - 1).clamp(min=0).long()
        token_rewards[torch.arange(n), last] = torch.tensor([rw for _, _, rw in kept])
        index = np.array([i // self.cfg.group_size for i in range(n)], dtype=object)
        adv, _ = compute_grpo_outcome_advantage(token_rewards, mask, index,
                                                norm_adv_by_std_in_grpo=self.cfg.algorithm != "drgrpo")
        return adv

    def _minibatch_rows(self, n: int) -> list[torch.Tensor]:
        """Row indices of each mini-batch: whole groups, shuffled by the engine's rng, `mini_batches` chunks."""
        g = self.cfg.group_size
        groups = list(range(n // g))
        self.rng.shuffle(groups)
        return [torch.tensor([i * g + j for i in c for j in range(g)])
                for c in np.array_split(np.array(groups), min(self.cfg.mini_batches, len(groups))) if len(c)]

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.opt.step()
        self.policy.after_optimizer_step()  # the method's per-step hook (AdaLoRA's rank allocation)
        self.opt.zero_grad(set_to_none=True)

    def _update(self, kept) -> dict[str, float]:
        from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

        if self.cfg.loss_mode != "token":
            return self._update_subset(kept)
        cfg = self.cfg
        n = len(kept)
        seqs, attn, mask, p_width = self._pack(kept)
        adv = self._outcome_advantages(kept, mask)
        model = self.policy.model
        model.train()
        with torch.no_grad():  # the rollout policy's log-probs, fixed for all mini-batches of this step
            old_logp, _ = _log_probs_and_entropy(model, seqs, attn, p_width)
        chunks = self._minibatch_rows(n)
        losses, entropies, clipfracs = [], [], []
        for rows in chunks:  # each mini-batch: whole groups, one optimizer step
            logp, entropy = _log_probs_and_entropy(model, seqs[rows], attn[rows], p_width)
            pg_loss, pg_metrics = compute_policy_loss_vanilla(old_logp[rows], logp, adv[rows], mask[rows],
                                                              _loss_agg_mode(cfg), self.actor_cfg)
            loss = pg_loss
            extra = self.policy.extra_loss()
            if extra is not None:
                loss = loss + extra
            self._optimizer_step(loss)
            losses.append(float(pg_loss.detach()))
            entropies.append(float((entropy.detach() * mask[rows]).sum() / mask[rows].sum()))
            clipfracs.append(float(pg_metrics["actor/pg_clipfrac"]))
        model.eval()
        return {"pg_loss": float(np.mean(losses)), "entropy": float(np.mean(entropies)),
                "pg_clipfrac": float(np.mean(clipfracs)), "optimizer_steps": len(chunks)}

    def _update_subset(self, kept) -> dict[str, float]:
        """S-GRPO / T-SPMO update (`loss_mode`): the loss covers only the selected tokens, and so do the
        forward (rows without one are skipped; the sequence ends at the mini-batch's last selected
        position) and the LM head (`selected_token_log_probs`). Mini-batches are whole groups, as in
        `_update`; a mini-batch with nothing to learn from (and no extra loss) takes no optimizer step."""
        from perl.algos.token_efficient import (selected_token_log_probs, sgrpo_select, sgrpo_weights,
                                                tspmo_advantages, tspmo_weights, weighted_policy_loss)

        cfg, g = self.cfg, self.cfg.group_size
        n = len(kept)
        seqs, attn, mask, p_width = self._pack(kept)
        r_width = mask.shape[1]
        index = [i // g for i in range(n)]
        if cfg.loss_mode == "sgrpo":
            adv = self._outcome_advantages(kept, mask)
            gen = torch.Generator().manual_seed(sample_seed(cfg.seed, f"sgrpo:{self.step_idx}", 0))
            sgrpo_cfg = cfg.sgrpo_config()
            selected = sgrpo_select(mask, sgrpo_cfg, gen)
        else:
            adv, selected = tspmo_advantages([r for _, r, _ in kept], [rw for _, _, rw in kept], index, r_width)
        chunks = self._minibatch_rows(n)
        weights = torch.zeros((n, r_width))
        for rows in chunks:  # normalised within each mini-batch (one optimizer step each)
            if cfg.loss_mode == "sgrpo":
                weights[rows] = sgrpo_weights(selected[rows], mask[rows], sgrpo_cfg, n_seqs=len(rows))
            else:
                weights[rows] = tspmo_weights(selected[rows], adv[rows], cfg.tspmo_norm, n_seqs=len(rows))
        active = (weights > 0) & (adv != 0) & (mask > 0)  # zero weight or zero advantage: no gradient

        def plan(rows):
            rows = rows[active[rows].any(-1)]
            local, pos = active[rows].nonzero(as_tuple=True)
            return rows, local, pos

        model = self.policy.model
        model.train()
        plans = [plan(rows) for rows in chunks]
        with torch.no_grad():  # the rollout policy's log-probs, fixed for all mini-batches of this step
            old = [selected_token_log_probs(model, seqs[r], attn[r], p_width, lo, po, cfg.subset_forward)[0]
                   for r, lo, po in plans]
        losses, entropies, clipfracs, steps = [], [], [], 0
        fwd_tokens = full_tokens = 0
        for (rows, local, pos), old_logp, all_rows in zip(plans, old, chunks):
            full_tokens += len(all_rows) * (p_width + r_width)
            extra = self.policy.extra_loss()
            if len(rows) == 0 and extra is None:
                continue
            loss = extra if extra is not None else 0.0
            if len(rows):
                fwd_tokens += len(rows) * (p_width + int(pos.max()) + 1)
                logp, entropy = selected_token_log_probs(model, seqs[rows], attn[rows], p_width, local, pos,
                                                         cfg.subset_forward)
                pg_loss, pg_metrics = weighted_policy_loss(old_logp, logp, adv[rows][local, pos],
                                                           weights[rows][local, pos], self.actor_cfg)
                loss = pg_loss + loss
                losses.append(float(pg_loss.detach()))
                entropies.append(float(entropy.detach().mean()))
                clipfracs.append(float(pg_metrics["actor/pg_clipfrac"]))
            self._optimizer_step(loss)
            steps += 1
        model.eval()
        mean = lambda xs, empty: float(np.mean(xs)) if xs else empty  # noqa: E731
        return {"pg_loss": mean(losses, 0.0), "entropy": mean(entropies, float("nan")),
                "pg_clipfrac": mean(clipfracs, 0.0), "optimizer_steps": steps,
                "loss_tokens": int(active.sum()), "loss_token_frac": float(active.sum() / mask.sum().clamp(min=1)),
                "forward_token_frac": fwd_tokens / max(full_tokens, 1)}


CHECKPOINT = "checkpoint"
SUMMARY = "summary.json"  # a finished run's numbers (written last, atomically)


def save_checkpoint(engine: LocalRL, out_dir: str) -> None:
    """Adapter (peft format) + optimizer + engine state, written atomically as one directory."""
    from perl.io import atomic_dir

    with atomic_dir(os.path.join(out_dir, CHECKPOINT)) as tmp:
        engine.policy.save(os.path.join(tmp, "adapter"))
        torch.save({"optimizer": engine.opt.state_dict(), "step": engine.step_idx, "rng": engine.rng.getstate(),
                    "optimizer_steps": engine.policy.optimizer_steps,
                    "torch_rng": torch.get_rng_state()}, os.path.join(tmp, "trainer_state.pt"))


def load_checkpoint(engine: LocalRL, out_dir: str) -> bool:
    """Restore the engine from `out_dir/checkpoint` if there is one; True when resumed."""
    from perl.methods import load_adapted

    path = os.path.join(out_dir, CHECKPOINT)
    if not os.path.exists(os.path.join(path, "trainer_state.pt")):
        return False
    trained = load_adapted(copy.deepcopy(engine.rollout_base), os.path.join(path, "adapter"), is_trainable=True)
    live = dict(engine.policy.model.named_parameters())
    with torch.no_grad():
        for name, p in trained.model.named_parameters():
            live[name].copy_(p)
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    missing = sorted({"optimizer", "step", "rng", "optimizer_steps", "torch_rng"} - set(state))
    if missing:
        raise ValueError(f"{path}: a checkpoint of an older PeRL (no {', '.join(missing)}); it cannot be resumed "
                         "exactly. Delete it to start the run over, or use another out_dir")
    engine.opt.load_state_dict(state["optimizer"])
    engine.step_idx = state["step"]
    engine.policy.optimizer_steps = state["optimizer_steps"]
    engine.rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    return True


def plot_curve(metrics_path: str, png_path: str) -> str:
    from perl.analysis.plotting import finish, new_figure

    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    fig, (ax,) = new_figure(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], label="train reward (all rollouts)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    return finish(fig, [ax], png_path)


HELDOUT = "heldout"  # the held-out benchmark's name in results.json


def _evaluate_to(engine: LocalRL, rows: list[dict], k: int, out_dir: str, data: str, run_info: dict[str, Any],
                 progress: bool, cold_start: bool = False) -> float:
    """Held-out Avg@k through `perl eval`'s runner: every sample kept, results.json for `perl table`.

    The sample seeds depend only on (seed, problem, index), so the before and after evaluations
    score the same random streams (a paired comparison) and a killed evaluation resumes."""
    from perl.data import write_parquet
    from perl.eval import EvalConfig, evaluate

    if cold_start:  # the untouched starting model, whatever a resumed checkpoint holds
        engine.rollout.load_state_dict(engine.rollout_base.state_dict())
    else:
        engine.sync()
    if not os.path.exists(data):
        write_parquet(rows, data)
    config = EvalConfig(k={HELDOUT: k}, seed=engine.cfg.seed + 1234, batch_size=256, sampling=engine.sampling)
    results = evaluate(engine.rollout, engine.tok, {HELDOUT: data}, out_dir, config, reward=engine.reward,
                       progress=progress, run_info=run_info)
    return float(results["overall_avg"])


def run(policy, rollout_model, tokenizer, train_rows, eval_rows, cfg: RLConfig, out_dir: str,
        eval_k: int = 4, progress: bool = True, save_every: int = 10,
        on_step: Callable[[int], None] | None = None, reward: MathReward | None = None,
        label: str | None = None) -> dict[str, Any]:
    """Train with per-step metrics (metrics.jsonl), held-out Avg@k before/after, a reward-curve PNG,
    checkpoints every `save_every` steps; a killed run resumes from its last checkpoint.

    `out_dir/results.json` (after) and `out_dir/eval_before/results.json` (the cold start) are
    `perl eval` results, so `perl table` reads toy runs like any evaluation."""
    started = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    engine = LocalRL(policy, rollout_model, tokenizer, train_rows, cfg, reward=reward)
    engine.rollout_base = copy.deepcopy(rollout_model)  # pristine base for reloading checkpoints
    log_path = os.path.join(out_dir, "metrics.jsonl")
    summary_path = os.path.join(out_dir, SUMMARY)
    data_path = os.path.join(out_dir, f"{HELDOUT}.parquet")
    before_info = {"label": "cold start", "method": None, "trainable_percent": None}
    after_info = {"label": label or policy.name, "method": policy.name,
                  "trainable_percent": policy.trainable_percent(), "metrics": os.path.abspath(log_path)}
    resumed = load_checkpoint(engine, out_dir)
    if resumed:
        lines = [line for line in open(log_path) if line.strip()][: engine.step_idx]  # drop steps after the checkpoint
        with open(log_path, "w") as f:
            f.writelines(lines)
    else:
        open(log_path, "w").close()
    if engine.step_idx == 0 or not os.path.exists(os.path.join(out_dir, "eval_before", "results.json")):
        before = _evaluate_to(engine, eval_rows, eval_k, os.path.join(out_dir, "eval_before"), data_path,
                              before_info, progress, cold_start=True)
    else:
        before = json.load(open(os.path.join(out_dir, "eval_before", "results.json")))["overall_avg"]
    trained_now = engine.step_idx < cfg.steps
    with open(log_path, "a") as log, tqdm(range(engine.step_idx, cfg.steps), initial=engine.step_idx, total=cfg.steps,
                                          desc=f"RL {policy.name}", disable=not progress) as bar:
        for _ in bar:
            m = engine.step()
            log.write(json.dumps(m) + "\n")
            log.flush()
            bar.set_postfix(reward=f"{m['reward']:.2f}", kept=m["kept_groups"], ent=f"{m['entropy']:.2f}",
                            clip=f"{m['pg_clipfrac']:.3f}")
            if engine.step_idx % save_every == 0 or engine.step_idx == cfg.steps:
                save_checkpoint(engine, out_dir)
            if on_step is not None:
                on_step(engine.step_idx)
    if trained_now:  # samples of an earlier final evaluation belong to another policy
        for stale in (f"{HELDOUT}.samples.jsonl", "results.json"):
            if os.path.exists(os.path.join(out_dir, stale)):
                os.remove(os.path.join(out_dir, stale))
    after = _evaluate_to(engine, eval_rows, eval_k, out_dir, data_path, after_info, progress)
    policy.save(os.path.join(out_dir, "adapter"))
    plot_curve(log_path, os.path.join(out_dir, "reward_curve.png"))
    summary = {"method": policy.name, "eval_before": before, "eval_after": after, "gain": after - before,
               "eval_k": eval_k, "eval_problems": len(eval_rows), "trainable_percent": policy.trainable_percent(),
               "resumed": resumed, "config": asdict(cfg),
               "wall_s": time.perf_counter() - started}  # this call: evaluations + the steps it trained
    from perl.io import atomic_file

    with atomic_file(summary_path) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    return summary
