"""PeRL's V1 trainer (perl.verl_glue.trainer) against a real Ray + TransferQueue on CPU.

T-SPMO on verl needs the response token ids in the advantage step, which verl's own trainer never
reads. What is checked here, without vLLM or a GPU:
- the T-SPMO advantages PerlSyncTrainer writes back to the TransferQueue for rollouts stored the
  way verl's agent loop stores them (one key per trajectory, jagged tensors), against a
  hand-computed group;
- every other estimator is verl's own step, unchanged (compared with verl's PPOTrainerSync);
- the trainer is registered inside the task runner's own Ray process, where verl looks it up;
- the sync behaviour verl's base class keys on `trainer_mode == "sync"`.
"""

from __future__ import annotations

import os

import pytest
import ray
import torch
import transfer_queue as tq  # started by the `transfer_queue` fixture (conftest)
from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

from conftest import ready
from perl.verl_glue import config as vc
from perl.verl_glue.trainer import PerlSyncTrainer, PerlTaskRunner

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a local Ray cluster: ~10 s to start

# Two prompts, G=3 each, rows interleaved (grouping is by uid, not by position). Prompt "a":
# responses 5 6 7 (reward 1), 5 6 8 (0), 5 9 (0). Hand-computed T-SPMO advantages, pair by pair:
#   ()->5     all three: 1/3 - 1/3            = 0        (row 0, t 0)
#   (5)->6    rows 0,1: 1/2 - mean(1,0,0)     = +1/6     (row 0, t 1)
#   (5)->9    row 2:    0   - 1/3             = -1/3     (row 2, t 1)
#   (5,6)->7  row 0:    1   - mean(1,0)       = +1/2     (row 0, t 2)
#   (5,6)->8  row 1:    0   - 1/2             = -1/2     (row 1, t 2)
# A pair is credited once, at the first row that contains it. Prompt "b": equal rewards, all zero.
ROWS = [  # (uid, session, response ids, reward)
    ("a", 0, [5, 6, 7], 1.0),
    ("b", 0, [3, 4], 1.0),
    ("a", 1, [5, 6, 8], 0.0),
    ("b", 1, [3, 4, 4, 2], 1.0),
    ("a", 2, [5, 9], 0.0),
    ("b", 2, [3], 1.0),
]
TSPMO_WANT = [[0.0, 1 / 6, 0.5], [0.0, 0.0], [0.0, 0.0, -0.5], [0.0] * 4, [0.0, -1 / 3], [0.0]]


def put_rollouts(partition: str):
    """Store ROWS as verl's AgentLoopWorkerTQ does: key {uid}_{session}_{index}, one put per trajectory."""
    keys = []
    for uid, session, ids, reward in ROWS:
        n = len(ids)
        scores = torch.zeros(n)
        scores[-1] = reward  # verl puts the outcome reward on the last response token
        field = {"prompts": torch.tensor([1, 2]), "responses": torch.tensor(ids), "response_mask": torch.ones(n, dtype=torch.int64),
                 "rm_scores": scores, "old_log_probs": torch.full((n,), -1.0), "uid": uid}
        key = f"{uid}_{session}_0"
        tq.kv_batch_put(keys=[key], partition_id=partition, fields=list_of_dict_to_tensordict([field]))
        keys.append(key)
    return tq.KVBatchMeta(keys=keys, tags=[{"status": "success"} for _ in keys], partition_id=partition)


def trainer(cls, overrides):
    """A trainer with only what the advantage step reads (its __init__ builds GPU worker groups)."""
    t = object.__new__(cls)
    t.config = vc.compose(None, overrides)
    return t


def advantages(batch) -> list[list[float]]:
    got = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["advantages", "returns"])
    adv = [row.tolist() for row in got["advantages"].unbind()]
    assert [row.tolist() for row in got["returns"].unbind()] == adv
    return adv


def test_tspmo_advantages_through_the_transfer_queue(empty_queue):
    t = trainer(PerlSyncTrainer, ["perl.loss_mode=tspmo", "actor_rollout_ref.rollout.n=3"])
    assert t.config.algorithm.adv_estimator == "tspmo"
    metrics: dict = {}
    batch = t._compute_advantage(put_rollouts("tspmo"), metrics)
    got = advantages(batch)
    assert [len(r) for r in got] == [len(ids) for _, _, ids, _ in ROWS]
    for g, w in zip(got, TSPMO_WANT):
        assert g == pytest.approx(w, abs=1e-6)
    assert metrics["perl/tspmo_live_pair_frac"] == pytest.approx(4 / 15)  # 4 live pairs over 15 response tokens


def test_other_estimators_are_verls_own_step(empty_queue):
    overrides = ["actor_rollout_ref.rollout.n=3"]
    ours = advantages(trainer(PerlSyncTrainer, overrides)._compute_advantage(put_rollouts("grpo_perl"), {}))
    verls = advantages(trainer(PPOTrainerSync, overrides)._compute_advantage(put_rollouts("grpo_verl"), {}))
    assert ours == verls
    # GRPO: (r - mean) / std over the group, on every token; not the T-SPMO values
    assert ours[0] == pytest.approx([(1 - 1 / 3) / (1 / 3) ** 0.5] * 3, abs=1e-4) and ours[1] == [0.0, 0.0]


def test_task_runner_registers_the_trainer_in_its_own_process(transfer_queue):
    def lookup(_runner):
        from verl.trainer.ppo.v1 import get_trainer_cls

        return os.getpid(), get_trainer_cls(vc.PERL_TRAINER_MODE).__qualname__

    runner = PerlTaskRunner.remote()
    pid, name = ray.get(runner.__ray_call__.remote(lookup), timeout=240)
    assert pid != os.getpid() and name == "PerlSyncTrainer"
    ray.kill(runner)


def test_the_trainer_is_verls_sync_trainer_to_the_base_class():
    assert get_trainer_cls(vc.PERL_TRAINER_MODE) is PerlSyncTrainer and issubclass(PerlSyncTrainer, PPOTrainerSync)
    t = object.__new__(PerlSyncTrainer)
    t.trainer_mode = vc.PERL_TRAINER_MODE  # what verl's __init__ assigns from the config
    assert t.trainer_mode == "sync"


def test_the_steps_batch_goes_out_with_its_over_dispatched_prompts(monkeypatch):
    """`prepare_step` asks verl's `_next_train_batch` for the step's batch (no count): PeRL's trainer
    asks for the batch plus the buffer's over-dispatch, in one dispatch; a count stays verl's."""
    asked = []
    monkeypatch.setattr(PPOTrainerSync, "_next_train_batch", lambda self, num_prompts=None: asked.append(num_prompts))

    class Buffer:
        def plan_over_dispatch(self, step):
            return {3: 5, 4: 0}[step]

    t = trainer(PerlSyncTrainer, ["data.train_batch_size=16"])
    t.replay_buffer, t.global_steps = Buffer(), 3
    t._next_train_batch()
    t.global_steps = 4  # nothing to over-dispatch: verl's own call
    t._next_train_batch()
    t._next_train_batch(7)  # a refill
    assert asked == [21, None, 7]


def test_transfer_queue_starts_beside_the_task_runner_once_ray_is_up(monkeypatch, paths, capsys):
    """perl.verl_glue.entry.start_transfer_queue_early: once `run_ppo` has started Ray, the driver
    starts TransferQueue with the run's `transfer_queue` config (enabled, as verl's task runner sets
    it; the task runner's own `init` then connects to it: contract test); stopped before Ray is up,
    it starts nothing; a failure is printed and leaves the start to verl."""
    import threading

    from perl.verl_glue.entry import start_transfer_queue_early

    cfg = vc.compose({}, ready(paths, "trainer.device=cpu", "trainer.n_gpus_per_node=1"))
    calls = []
    monkeypatch.setattr(tq, "init", lambda conf: calls.append(conf))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    stop = threading.Event()
    thread = start_transfer_queue_early(cfg, stop)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive() and calls == []

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    start_transfer_queue_early(cfg, threading.Event()).join(timeout=5)
    (conf,) = calls
    assert conf.enable is True and cfg.transfer_queue.enable is False  # the run's config is not changed
    assert conf.backend.SimpleStorage.num_data_storage_units == 1  # the CPU profile's, from the run's config
    assert "TransferQueue started beside verl's task runner" in capsys.readouterr().out

    def refuse(conf):
        raise RuntimeError("no controller")

    monkeypatch.setattr(tq, "init", refuse)
    start_transfer_queue_early(cfg, threading.Event()).join(timeout=5)
    assert "TransferQueue not started ahead of verl's task runner (RuntimeError: no controller)" in capsys.readouterr().err


def test_transfer_queue_started_from_the_driver_takes_the_runs_settings(monkeypatch):
    """entry.transfer_queue_settings: the run's TQ_* values (the CPU profile's TQ_NUM_THREADS) reach
    the module globals TransferQueue's actor classes are shipped with from the driver; other
    variables are left alone."""
    import transfer_queue.client as tq_client
    import transfer_queue.storage.simple_storage as tq_storage

    from perl.verl_glue.entry import transfer_queue_settings

    for module in (tq_client, tq_storage):
        monkeypatch.setattr(module, "TQ_NUM_THREADS", 8)
    monkeypatch.setattr(tq_client, "TQ_CLIENT_ZMQ_MAX_SOCKETS", None)
    for key in ("TQ_NUM_THREADS", "TQ_CLIENT_ZMQ_MAX_SOCKETS", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, "x")  # restored after the test
    transfer_queue_settings({"TQ_NUM_THREADS": "2", "TQ_CLIENT_ZMQ_MAX_SOCKETS": "64", "OMP_NUM_THREADS": "2"})
    assert tq_client.TQ_NUM_THREADS == 2 == tq_storage.TQ_NUM_THREADS
    assert tq_client.TQ_CLIENT_ZMQ_MAX_SOCKETS == "64"
    assert os.environ["TQ_NUM_THREADS"] == "2" and os.environ["OMP_NUM_THREADS"] == "x"
