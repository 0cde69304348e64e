"""PeRL's V1 trainer and task runner: verl's sync trainer, plus PeRL's run log and T-SPMO's advantage step.

Every PeRL run on verl's sync V1 trainer uses `PerlSyncTrainer` (perl.verl_glue.config derives
`trainer.v1.trainer_mode=perl_sync` from verl's `sync`). It changes these things and nothing else:

- the run log (perl.verl_glue.run_dir): after verl has computed a step's metrics, one line of
  `metrics.jsonl` and one progress line; tensorboard events go to `<run dir>/tensorboard` unless
  TENSORBOARD_DIR says otherwise;
- a manifest after each checkpoint (perl.verl_glue.checkpoints), verified before a resume;
- the advantage step for adv_estimator=tspmo (below);
- a collapse (dynamic sampling exhausted) ends the run with its last weights saved (`_record_collapse`);
- with a single rollout server, the LLM client skips verl's load balancer (`get_llm_client`), whose
  actor is then never started, and the agent-loop workers start with the rollout servers
  (`use_perl_server_manager`);
- the step's batch carries the prompts PeRL's dynamic sampling over-dispatches (`_next_train_batch`);
- the actor (and the reference policy) fetches a batch's tensor fields and the one non-tensor field
  it reads, not the trajectories' bookkeeping (`actor_fields`; a toy step's old log-probs
  0.27 -> 0.19 s, its update 0.42 -> 0.34 s).

T-SPMO (perl.algos.token_efficient) credits each (prefix, next token) pair of a group, so its
advantage step needs the response token ids. verl 0.9.1's `PPOTrainer._compute_advantage` reads
only uid, masks, scores and log-probs from the TransferQueue, and hands a registered estimator
rewards, mask and uid; no estimator hook can see the tokens. `PerlSyncTrainer` reads them for
adv_estimator=tspmo and leaves every other estimator to verl.

How it is selected: verl's task runner looks the trainer up by that name with
`get_trainer_cls`, in its own Ray process. `PerlTaskRunner` (which perl.verl_glue.entry hands to
verl's `run_ppo`) is verl's `TaskRunnerV1` defined in this module, so Ray imports this module, and
with it the registration, in the task runner's process before `run` looks the name up.
"""

from __future__ import annotations

import io
import json
import os
from contextlib import contextmanager

import numpy as np
import ray
import transfer_queue as tq
from tensordict import TensorDict
from verl.trainer.main_ppo import TaskRunnerV1
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from perl.algos.token_efficient import register_with_verl, tspmo_outcome_advantage
from perl.verl_glue.config import PERL_TRAINER_MODE
from perl.verl_glue.run_dir import ALL_GROUPS, RunLog
from perl.verl_glue.sampler import DynamicSamplingExhausted

# verl's replay buffer reports the groups dynamic sampling dropped as {shared metric value: count}
# under this key, in the metrics of the step (PeRL adds them to the step's accuracy).
from verl.trainer.ppo.v1.replay_buffer import DAPO_FILTERED_REWARD_COUNTS_KEY  # noqa: E402

TSPMO_FIELDS = ["uid", "responses", "response_mask", "rm_scores"]


def use_perl_server_manager() -> None:
    """verl's trainer builds its LLM server manager as `trainer_base.LLMServerManager.create(...)`;
    PeRL's subclass starts the load-balancer actor only when something asks for it (never with one
    server: `get_llm_client` below) and the agent-loop workers' processes with the servers. Done when
    this module is imported, in the task runner's process, before the trainer is built
    (patches/README.md #8, #9)."""
    import verl.trainer.ppo.v1.trainer_base as trainer_base

    from perl.verl_glue.agent_loop import PerlLLMServerManager

    trainer_base.LLMServerManager = PerlLLMServerManager


use_perl_server_manager()


@register_trainer(PERL_TRAINER_MODE)
class PerlSyncTrainer(PPOTrainerSync):
    """verl's sync trainer whose advantage step also reads the response token ids (T-SPMO)."""

    # verl's base class takes its sync behaviour (replay buffer, exact refill, weight updates,
    # trainer.v1.sync settings) from `self.trainer_mode == "sync"`; registry names must be unique,
    # so this trainer is registered as perl_sync and answers "sync" to the base class.
    @property
    def trainer_mode(self) -> str:
        return "sync"

    @trainer_mode.setter
    def trainer_mode(self, _registered_name: str) -> None:
        pass

    def get_llm_client(self):
        """verl's client, or with a single rollout server one that skips the load balancer
        (perl.verl_glue.agent_loop.OneServerClient: two Ray calls fewer per completion)."""
        manager = self.llm_server_manager
        if len(manager.server_handles) != 1:
            return super().get_llm_client()
        from perl.verl_glue.agent_loop import OneServerClient

        print(f"[perl] one rollout server ({manager.server_addresses[0]}): requests go to it without verl's load balancer")
        return manager.get_client(client_cls=OneServerClient,
                                  server=(manager.server_addresses[0], manager.server_handles[0]))

    def fit(self, agent_loop_manager):
        run_dir = os.path.abspath(str(self.config.trainer.default_local_dir))
        os.environ.setdefault("TENSORBOARD_DIR", os.path.join(run_dir, "tensorboard"))
        # global_steps holds the step of the checkpoint verl resumed from (0 for a fresh run)
        self.run_log = RunLog(run_dir, self.total_training_steps, resumed_from=self.global_steps,
                              batch_groups=int(self.config.data.train_batch_size),
                              dynamic_sampling=bool(self.config.algorithm.filter_groups.enable))
        try:
            return super().fit(agent_loop_manager)
        except DynamicSamplingExhausted as e:
            self._record_collapse(run_dir, e)
            raise

    def _next_train_batch(self, num_prompts: int | None = None):
        """The step's batch (verl asks with no count, from `prepare_step`) with the prompts PeRL's
        dynamic sampling over-dispatches at this step (`PerlReplayBuffer.plan_over_dispatch`): one
        dispatch, the same prompts in the same order as sending them after it. Any other count is
        verl's, and so is the batch of a sampler of the user's own (`trainer.v1.sampler.custom_sampler`),
        which has no plan."""
        if num_prompts is None:
            plan = getattr(self.replay_buffer, "plan_over_dispatch", None)
            extra = plan(self.global_steps) if plan is not None else 0
            if extra:
                num_prompts = int(self.config.data.train_batch_size) + extra
        return super()._next_train_batch(num_prompts)

    @property
    def old_log_probs_from_update(self) -> bool:
        """Whether the update's own forward gives the old log-probs (perl.verl_glue.on_policy), decided
        once from the config and said on the console."""
        decided = getattr(self, "_old_log_probs_source", None)
        if decided is None:
            from perl.verl_glue.on_policy import describe, old_log_probs_source

            decided = self._old_log_probs_source = old_log_probs_source(self.config)
            print(f"[perl] old log-probs: {describe(self.config)}", flush=True)
        return decided[0] == "update"

    def _compute_old_log_prob(self, batch, metrics: dict):
        """verl's, with the actor fetching only what it reads (`actor_fields`); nothing where the
        update's own forward gives the old log-probs (perl.verl_glue.on_policy)."""
        if self.old_log_probs_from_update:
            return batch
        with actor_fields(batch, multimodal=self.processor is not None):
            return super()._compute_old_log_prob(batch, metrics)

    def _compute_ref_log_prob(self, batch, metrics: dict):
        """verl's, with the reference policy fetching only what it reads (`actor_fields`)."""
        with actor_fields(batch, multimodal=self.processor is not None):
            return super()._compute_ref_log_prob(batch, metrics)

    def _update_actor(self, batch, metrics: dict):
        """verl's, with the actor fetching only what it reads (`actor_fields`); where the update's
        forward gives the old log-probs, it is asked to (PeRL's engine reads the flag) and the metrics
        verl's pass would have given come from it (perl.verl_glue.on_policy)."""
        from_update = self.old_log_probs_from_update
        if from_update:
            from perl.verl_glue.on_policy import FROM_UPDATE

            batch.extra_info[FROM_UPDATE] = True
        with actor_fields(batch, multimodal=self.processor is not None):
            batch = super()._update_actor(batch, metrics)
        if from_update:
            from perl.verl_glue.on_policy import update_metrics

            actor = self.config.actor_rollout_ref.actor
            update_metrics(metrics, entropy_in_loss=bool(actor.calculate_entropy or actor.entropy_coeff != 0.0),
                           offpolicy=self.config.algorithm.get("rollout_correction") is not None)
        return batch

    def _record_collapse(self, run_dir: str, error: Exception) -> None:
        """Training collapsed: step `global_steps` found (almost) no group whose rollouts differ in
        reward, so RL has nothing left to learn from (e.g. PiSSA at a high lr, every answer wrong).
        That is a result, not a crash: the weights after the last completed step are saved as its
        checkpoint (unless save_freq already did) and `collapsed.json` says where it stopped, so the
        entry point evaluates them and a study records the run as collapsed. In the first step of a
        run nothing was trained: that stays an error (the data or the reward)."""
        from perl.io import atomic_file
        from perl.verl_glue.run_dir import COLLAPSED, latest_step

        failed = int(self.global_steps)
        trained = failed - 1
        if trained < 1:  # nothing trained yet: the data or the reward, not a collapse (the error says so)
            return
        if latest_step(run_dir) != trained:
            self.global_steps = trained  # verl names the checkpoint after global_steps
            self._save_checkpoint()
            self.global_steps = failed
        record = {"failed_step": failed, "last_step": trained, "reason": str(error)}
        with atomic_file(os.path.join(run_dir, COLLAPSED)) as tmp, open(tmp, "w") as f:
            json.dump(record, f, indent=2)

    def _save_checkpoint(self):
        """verl's save, then PeRL's manifest of it (perl.verl_glue.checkpoints), which the entry point
        verifies before a resume. With async_save verl finishes later: no manifest (unverifiable)."""
        super()._save_checkpoint()
        if not self.config.actor_rollout_ref.actor.get("checkpoint", {}).get("async_save", False):
            from perl.verl_glue.checkpoints import write_manifest

            write_manifest(os.path.abspath(str(self.config.trainer.default_local_dir)), self.global_steps)

    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        super()._compute_metrics(batch, metrics, timing_raw, global_steps, epoch)
        if self.config.perl.get("dump_rollout_tokens"):
            self._dump_rollout_tokens(batch, global_steps)
        n = int(self.config.actor_rollout_ref.rollout.n)
        acc = all_groups_accuracy(metrics, int(self.config.data.train_batch_size) * n, n)
        if acc is not None:
            metrics[ALL_GROUPS] = acc
        self.run_log.log(global_steps, metrics)

    def _dump_rollout_tokens(self, batch, step: int) -> None:
        """`<run dir>/rollouts/step_N.pt`: the step's training batch as token ids with the rollout
        engine's and (where verl's pass computed them) the actor's log-probs (verl's `rollout_data_dir`
        keeps decoded text only), so a
        rollout can be checked offline against any model, e.g. PeRL's merged export of the
        checkpoint whose weights vLLM generated it with (step N-1)."""
        import torch

        from perl.io import atomic_file

        fields = ["prompts", "responses", "response_mask", "rollout_log_probs", "rm_scores"]
        if not self.old_log_probs_from_update:  # else the actor's log-probs are the update's, not stored
            fields.append("old_log_probs")
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        record = {"step": int(step), "keys": list(batch.keys),  # verl's "{prompt}_{rollout}_{output}" keys
                  **{k: [t.detach().clone() for t in data[k].unbind()] for k in fields}}
        path = os.path.join(os.path.abspath(str(self.config.trainer.default_local_dir)), "rollouts", f"step_{step}.pt")
        buffer = io.BytesIO()  # torch's zip writer refuses the dot-prefixed name of atomic_file's temp file
        torch.save(record, buffer)
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            f.write(buffer.getvalue())

    def _compute_advantage(self, batch, metrics: dict):
        if self.config.algorithm.adv_estimator != "tspmo":
            if not self.old_log_probs_from_update:
                return super()._compute_advantage(batch, metrics)
            # verl's step also reports its rollout_correction block's diagnostics of the rollout's log-probs
            # against the old ones, which do not exist yet: the update reports them (perl.verl_glue.on_policy;
            # the block weighs nothing here: old_log_probs_source keeps the pass for IS/RS and bypass)
            with without_rollout_correction(self.config):
                return super()._compute_advantage(batch, metrics)
        # verl's step also applies the KL-in-reward penalty and rollout correction; the config
        # check refuses both with T-SPMO (perl.verl_glue.config.check_algorithm).
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=TSPMO_FIELDS)
        response_mask = data["response_mask"]
        padded = data.to_padded_tensor()
        uid = np.array(padded.pop("uid").tolist(), dtype=object)
        advantages, _ = tspmo_outcome_advantage(padded["rm_scores"], padded["response_mask"], index=uid,
                                                responses=padded["responses"])
        live = (advantages != 0).sum()
        metrics["perl/tspmo_live_pair_frac"] = float(live / padded["response_mask"].sum().clamp(min=1))
        nested = response_to_nested(advantages, response_mask)  # returns = advantages (outcome only, as GRPO)
        output = TensorDict({"advantages": nested, "returns": nested}, batch_size=len(batch))
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=output)


# the non-tensor fields the actor reads, those of a multimodal model (verl's FSDP engine:
# `micro_batch.get("multi_modal_inputs")`; verl's agent loop leaves them empty without a processor);
# every other non-tensor field is the trajectory's bookkeeping (its dataset row: prompt, reward model,
# extra info, tool kwargs; the agent loop's records), which no actor computation reads
ACTOR_NON_TENSOR_FIELDS = frozenset({"multi_modal_inputs"})


@contextmanager
def without_rollout_correction(config):
    """`algorithm.rollout_correction` read as null for the duration (verl's advantage step reads it there)."""
    from omegaconf import open_dict

    block = config.algorithm.get("rollout_correction")
    with open_dict(config.algorithm):
        config.algorithm.rollout_correction = None
    try:
        yield
    finally:
        with open_dict(config.algorithm):
            config.algorithm.rollout_correction = block


@contextmanager
def actor_fields(batch, multimodal: bool):
    """Let the actor fetch the tensor fields of `batch` (and `ACTOR_NON_TENSOR_FIELDS` for a
    `multimodal` model, one with a processor), not the bookkeeping. verl's batch names no fields, or,
    once a step has written to TransferQueue, every field its keys hold (what `kv_batch_put` returns);
    either way the actor fetched them all and rebuilt per-sample Python objects it never reads
    (TransferQueue's unpacking, and `TensorDict.to` walking them on every micro-batch). The batch's own
    list comes back afterwards."""
    named = batch.fields
    schema = tq.get_client().kv_retrieve_meta(keys=batch.keys, partition_id=batch.partition_id).field_schema
    batch.fields = [name for name in (named if named is not None else schema)
                    if not schema.get(name, {}).get("is_non_tensor", True)
                    or (multimodal and name in ACTOR_NON_TENSOR_FIELDS)]
    try:
        yield
    finally:
        batch.fields = named


def all_groups_accuracy(metrics: dict, n_kept: int, group_size: int) -> float | None:
    """Mean score over every group the step generated, the ones dynamic sampling dropped (all
    rollouts equal on the filter metric, whose shared value verl reports) included: DAPO's training
    batch alone over-represents groups near 0.5. (PeRL's reward: score = acc, 0 or 1.)"""
    kept = metrics.get("critic/score/mean")
    dropped = metrics.get(DAPO_FILTERED_REWARD_COUNTS_KEY) or {}
    if kept is None:
        return None
    total = float(kept) * n_kept + sum(float(value) * count * group_size for value, count in dropped.items())
    return total / (n_kept + sum(count * group_size for count in dropped.values()))


register_with_verl()  # the T-SPMO estimator, in the task runner's process too


def start_rollout_server_early(config) -> None:
    """The rollout server's process started now (on the CPU profile), so that its imports run while
    verl builds the trainer and starts the actor (perl.verl_glue.rollout_server)."""
    from perl.verl_glue.rollout_server import early_server_options

    options = early_server_options(config)
    if options is None:  # not the CPU profile's one server: vLLM's classes are not even imported
        return
    from perl.verl_glue.rollout_server_vllm import start_server_early

    if start_server_early(options):
        print("[perl] rollout server's process started beside the actor's", flush=True)


class _PerlTaskRunner(TaskRunnerV1.__ray_actor_class__):
    """verl's V1 task runner; defined here so that its Ray process registers `PerlSyncTrainer`."""

    def run(self, config):
        """verl's, with the rollout server's process started first: before verl's trainer builds
        its tokenizer, data sets and worker pools (~3-4 s of the task runner's CPU on the 2-core
        box, while the other core idles), not after them (docs/benchmarks.md, "The rollout server's
        process from the task runner's start")."""
        start_rollout_server_early(config)
        return super().run(config)


PerlTaskRunner = ray.remote(_PerlTaskRunner)
