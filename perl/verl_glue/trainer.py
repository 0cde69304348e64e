"""PeRL's V1 trainer and task runner: verl's sync trainer, plus T-SPMO's advantage step.

T-SPMO (perl.algos.token_efficient) credits each (prefix, next token) pair of a group, so its
advantage step needs the response token ids. verl 0.9.1's `PPOTrainer._compute_advantage` reads
only uid, masks, scores and log-probs from the TransferQueue, and hands a registered estimator
rewards, mask and uid; no estimator hook can see the tokens. `PerlSyncTrainer` reads them for
adv_estimator=tspmo and leaves every other estimator to verl.

How it is selected: `perl.loss_mode=tspmo` makes perl.verl_glue.config set
`trainer.v1.trainer_mode=perl_sync`; verl's task runner looks the trainer up by that name with
`get_trainer_cls`, in its own Ray process. `PerlTaskRunner` (which perl.verl_glue.entry hands to
verl's `run_ppo`) is verl's `TaskRunnerV1` defined in this module, so Ray imports this module, and
with it the registration, in the task runner's process before `run` looks the name up.
"""

from __future__ import annotations

import numpy as np
import ray
import transfer_queue as tq
from tensordict import TensorDict
from verl.trainer.main_ppo import TaskRunnerV1
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from perl.algos.token_efficient import tspmo_outcome_advantage
from perl.verl_glue.config import PERL_TRAINER_MODE

TSPMO_FIELDS = ["uid", "responses", "response_mask", "rm_scores"]


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

    def _compute_advantage(self, batch, metrics: dict):
        if self.config.algorithm.adv_estimator != "tspmo":
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


class _PerlTaskRunner(TaskRunnerV1.__ray_actor_class__):
    """verl's V1 task runner; defined here so that its Ray process registers `PerlSyncTrainer`."""


PerlTaskRunner = ray.remote(_PerlTaskRunner)
