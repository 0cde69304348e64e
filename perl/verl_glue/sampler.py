"""DAPO dynamic sampling with a cap and over-dispatch, as a custom sampler of verl's V1 trainer.

verl 0.9.1 does DAPO's dynamic sampling in its V1 `ReplayBuffer` (TransferQueue-backed): finished
groups whose `algorithm.filter_groups.metric` is equal across all G rollouts are evicted and more
prompts are generated until the batch is full. `PerlReplayBuffer` is verl's buffer plus:

- **the cap**: verl's sync buffer has no upper bound (it ignores `max_num_gen_batches` and only
  bounds concurrency), so a dataset where almost every group is all-correct or all-wrong would
  generate forever. PeRL counts the prompts dispatched for one batch and raises once the step has
  generated `max_num_gen_batches` batches' worth (DAPO's original rule).
- **over-dispatch** (`perl.over_dispatch`, on by default): verl dispatches exactly one batch and
  learns only when its groups finish which ones carry no signal; each refill is then another full
  round of generation (a decode's latency, whatever its size: 0.25-0.5 s a round on the CPU toy,
  minutes on a GPU node). DAPO's own recipe over-generates instead (`gen_batch_size` = 3 x the
  train batch) and keeps the first `train_batch_size` groups with signal. PeRL sizes the surplus
  from the drop rate of the last steps (`over_dispatch_count`), so most steps need no refill
  round, and refills only what the groups still in flight cannot fill (`_counted_refill`).
  Training semantics are DAPO's: every trained group has signal, the surplus is discarded;
  only which prompts a step draws from the dataloader changes (docs/verl.md).
- **surplus kept in dispatch order**: verl's `_select_prompt_uids` orders the groups by step and
  then by set order (a uid hash, different in every process); PeRL keeps the earliest dispatched,
  so a seeded run trains the same groups on a rerun.

The entry point selects it through `trainer.v1.sampler.custom_sampler` and passes the filter
settings in `sampler_kwargs` (verl hands a custom sampler only those), with how often to look for
finished groups (`poll_interval`: verl's 2 s on a GPU node, where a generation round takes minutes;
0.05 s on CPU, where it takes a fraction of a second) and the run's metrics file (where a resumed
run reads the drop rate of the steps before it, so that it dispatches what the uninterrupted run
would have).
"""

from __future__ import annotations

import math
from typing import Any

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

from perl.verl_glue.run_dir import DISPATCHED, DROPPED, OVER_DISPATCHED, REFILLED, read_metrics

DROP_RATE_WINDOW = 3  # steps whose drop rate sizes the next step's over-dispatch
MAX_OVER_DISPATCH = 2  # at most this many extra batches at a step's start (DAPO's recipe: gen batch = 3x)


class DynamicSamplingExhausted(RuntimeError):
    """Too many generation batches for one training batch: the groups almost never differ in reward."""


def drop_rate(counts: list[tuple[int, int]]) -> float:
    """The share of dispatched groups that carry no signal, (dropped + 1) / (dispatched + 2) over
    (dropped, dispatched) pairs: never 0 or 1, so a step that dropped none still expects a few."""
    return (sum(d for d, _ in counts) + 1) / (sum(n for _, n in counts) + 2)


def over_dispatch_count(batch: int, history: list[tuple[int, int]], cap_batches: int = 0) -> int:
    """Extra prompts to dispatch with a step's batch so that, at the recent drop rate, the groups
    with signal fill the batch in one round: N = (batch + sqrt(batch p)) / (1 - p), a standard
    deviation above the expected need, with p = (dropped + 1) / (dispatched + 2) over the last
    DROP_RATE_WINDOW steps (`history`: (dropped, dispatched) per step; none: no over-dispatch).
    At most MAX_OVER_DISPATCH batches, and never past the cap of max_num_gen_batches."""
    recent = history[-DROP_RATE_WINDOW:]
    if not recent:
        return 0
    p = drop_rate(recent)
    extra = math.ceil((batch + math.sqrt(batch * p)) / (1 - p)) - batch
    limit = MAX_OVER_DISPATCH * batch
    if cap_batches > 0:
        limit = min(limit, (cap_batches - 1) * batch)
    return max(0, min(extra, limit))


def drop_history(run_dir: str | None, before_step: int) -> list[tuple[int, int]]:
    """(dropped, dispatched) of the steps before `before_step` from a run's metrics.jsonl (the last
    row of each step), for a resumed run; [] when there is none."""
    rows = {r["step"]: r for r in (read_metrics(run_dir) if run_dir else [])
            if isinstance(r.get("step"), int) and r["step"] < before_step}
    return [(int(r.get(DROPPED, 0)), int(r[DISPATCHED])) for _, r in sorted(rows.items()) if DISPATCHED in r]


class PerlReplayBuffer(ReplayBuffer):
    def __init__(self, trainer_mode: str, trainer_config: Any, max_off_policy_threshold: int | None,
                 max_off_policy_strategy: str, sampler_kwargs: Any, refill_fn=None, poll_interval: float = 2.0,
                 **_: Any) -> None:
        kwargs = dict(sampler_kwargs or {})
        metric = kwargs.get("filter_groups_metric")
        poll_interval = float(kwargs.get("poll_interval", poll_interval))
        self.train_batch_size = int(kwargs["train_batch_size"])
        self.max_num_gen_batches = int(kwargs.get("max_num_gen_batches", 0) or 0)
        self.over_dispatch = bool(kwargs.get("over_dispatch", False))
        self.run_dir = kwargs.get("run_dir")
        self.history: list[tuple[int, int]] | None = None  # (dropped, dispatched) per step; read lazily
        self._planned: tuple[int, int] | None = None  # (step, prompts) sent with that step's batch
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

    def _check_cap(self, num_prompts: int) -> None:
        cap = self.max_num_gen_batches
        if cap > 0 and self.refilled_prompts + num_prompts > (cap - 1) * self.train_batch_size:
            raise DynamicSamplingExhausted(
                f"dynamic sampling: {cap} batches' worth of prompts generated ({self.train_batch_size} + "
                f"{self.refilled_prompts} refilled) and the batch is still not full of groups with differing "
                f"{self.filter_groups_metric!r}; check the data and the reward, or raise "
                "algorithm.filter_groups.max_num_gen_batches (0: no cap)"
            )

    def _counted_refill(self, num_prompts: int):
        """verl asks for 2 prompts per dropped group while other groups are still generating. With
        over-dispatch PeRL sends only what the groups in flight cannot fill at the expected keep
        rate (the last steps' and this step's so far), and none while they still can: a
        speculative refill must be drained before the step goes on, i.e. it costs a whole round.
        (verl subtracts the request from its credit either way; each later drop brings new
        credit, so the batch still fills.)"""
        if self.over_dispatch:
            done = len(self.finished_keys["train"]) + len(self.failure_keys["train"])
            inflight = len(self.pending_keys["train"]) + len(self.running_keys["train"])
            # in sync sampling a dispatched group is done, in flight or dropped (surplus goes last)
            dropped_now = self.train_batch_size + self.refilled_prompts - done - inflight
            keep = 1 - drop_rate(self.history[-DROP_RATE_WINDOW:] + [(dropped_now, done + dropped_now)])
            deficit = self.train_batch_size - done - math.floor(inflight * keep)
            if deficit <= 0:
                return 0
            num_prompts = min(num_prompts, math.ceil(deficit / max(keep, 0.1)))
        self._check_cap(num_prompts)
        self.refilled_prompts += num_prompts
        return self._refill(num_prompts)

    def _select_prompt_uids(self, partition_id: str, sampleable_keys: set[str], batch_size: int):
        """verl's selection (oldest step first), ties broken by dispatch order (TransferQueue lists
        keys in the order they were put) instead of set order."""
        steps = dict(self.prompt_global_steps[partition_id])
        dispatch_order = {key: i for i, key in enumerate(steps)}
        ordered = sorted(sampleable_keys, key=lambda key: (steps.get(key, 0), dispatch_order.get(key, len(steps))))
        return ordered[:batch_size], dict(self.partitions[partition_id]), steps

    def plan_over_dispatch(self, global_steps: int) -> int:
        """The prompts to over-dispatch at step `global_steps`, for a trainer that sends them with the
        step's batch in one dispatch (`PerlSyncTrainer._next_train_batch`): `sample` then counts them
        instead of sending them. Sent after the batch, they waited for the agent-loop workers to take
        up the batch's completions first (0.07 s a toy step) and then trailed it."""
        if self.filter_groups_metric is None or not self.over_dispatch:
            return 0
        extra = self._over_dispatch_count(global_steps)
        self._planned = (global_steps, extra)
        return extra

    def _over_dispatch_count(self, global_steps: int) -> int:
        """`over_dispatch_count` from the drop history (read once; a resumed run's from its metrics),
        checked against the cap as the first prompts of the step."""
        if self.history is None:
            self.history = drop_history(self.run_dir, global_steps)
        extra = over_dispatch_count(self.train_batch_size, self.history, self.max_num_gen_batches)
        self.refilled_prompts = 0  # the count of the step this starts (a plan comes before `sample`)
        self._check_cap(extra)
        return extra

    def sample(self, global_steps: int, partition_id: str, batch_size: int):
        self.refilled_prompts = 0
        dapo = partition_id != "val" and self.filter_groups_metric is not None
        extra = 0
        if dapo and self.over_dispatch:
            planned, self._planned = self._planned, None
            if planned is not None and planned[0] == global_steps:  # sent with the batch
                extra = planned[1]
            else:
                extra = self._over_dispatch_count(global_steps)
                if extra:
                    self._refill(extra)
            self.refilled_prompts += extra
        batch, metrics = super().sample(global_steps, partition_id, batch_size)
        if dapo:
            metrics = dict(metrics)
            metrics[REFILLED] = self.refilled_prompts - extra
            dispatched = self.train_batch_size + self.refilled_prompts
            metrics[DISPATCHED] = dispatched
            if self.over_dispatch:
                metrics[OVER_DISPATCHED] = extra
                self.history.append((int(metrics.get(DROPPED, 0)), dispatched))
        return batch, metrics
