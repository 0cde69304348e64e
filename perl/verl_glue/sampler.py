"""DAPO dynamic sampling with a cap, as a custom sampler of verl's V1 trainer.

verl 0.9.1 does DAPO's dynamic sampling in its V1 `ReplayBuffer` (TransferQueue-backed): finished
groups whose `algorithm.filter_groups.metric` is equal across all G rollouts are evicted and more
prompts are generated until the batch is full. Its sync buffer has no upper bound (it ignores
`max_num_gen_batches` and only bounds concurrency), so a dataset where almost every group is
all-correct or all-wrong generates forever. `PerlReplayBuffer` is verl's buffer plus that bound:
it counts the prompts dispatched to refill one batch and raises once the step has generated
`max_num_gen_batches` batches' worth (DAPO's original rule). The entry point selects it through
`trainer.v1.sampler.custom_sampler` and passes the filter settings in `sampler_kwargs` (verl hands a
custom sampler only those), with how often to look for finished groups (`poll_interval`: verl's
2 s on a GPU node, where a generation round takes minutes; 0.2 s on CPU, where it takes one).
"""

from __future__ import annotations

from typing import Any

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

from perl.verl_glue.run_dir import REFILLED


class DynamicSamplingExhausted(RuntimeError):
    """Too many generation batches for one training batch: the groups almost never differ in reward."""


class PerlReplayBuffer(ReplayBuffer):
    def __init__(self, trainer_mode: str, trainer_config: Any, max_off_policy_threshold: int | None,
                 max_off_policy_strategy: str, sampler_kwargs: Any, refill_fn=None, poll_interval: float = 2.0,
                 **_: Any) -> None:
        kwargs = dict(sampler_kwargs or {})
        metric = kwargs.get("filter_groups_metric")
        poll_interval = float(kwargs.get("poll_interval", poll_interval))
        self.train_batch_size = int(kwargs["train_batch_size"])
        self.max_num_gen_batches = int(kwargs.get("max_num_gen_batches", 0) or 0)
        self.refilled_prompts = 0  # prompts generated to refill the batch being sampled
        self._refill = refill_fn
        refill_failed = bool(kwargs.get("sync_refill_failed_groups", False))
        super().__init__(
            trainer_mode=trainer_mode,
            trainer_config=trainer_config,
            max_off_policy_threshold=max_off_policy_threshold,
            max_off_policy_strategy=max_off_policy_strategy,
            sampler_kwargs=kwargs,
            poll_interval=poll_interval,
            refill_fn=self._counted_refill if refill_fn is not None else None,
            filter_groups_metric=metric,
            train_batch_size=self.train_batch_size,
            gen_batch_size=1 if metric is not None or refill_failed else self.train_batch_size,
            max_inflight_gen_batches=int(kwargs.get("max_inflight_gen_batches", 1) or 1),
            sync_refill_failed_groups=refill_failed,
        )

    def _counted_refill(self, num_prompts: int):
        cap = self.max_num_gen_batches
        if cap > 0 and self.refilled_prompts + num_prompts > (cap - 1) * self.train_batch_size:
            raise DynamicSamplingExhausted(
                f"dynamic sampling: {cap} batches' worth of prompts generated ({self.train_batch_size} + "
                f"{self.refilled_prompts} refilled) and the batch is still not full of groups with differing "
                f"{self.filter_groups_metric!r}; check the data and the reward, or raise "
                "algorithm.filter_groups.max_num_gen_batches (0: no cap)"
            )
        self.refilled_prompts += num_prompts
        return self._refill(num_prompts)

    def sample(self, global_steps: int, partition_id: str, batch_size: int):
        self.refilled_prompts = 0
        batch, metrics = super().sample(global_steps, partition_id, batch_size)
        if partition_id != "val" and self.filter_groups_metric is not None:
            metrics = dict(metrics)
            metrics[REFILLED] = self.refilled_prompts
        return batch, metrics
