"""The toy through verl's trainer on a two-node Ray cluster simulated on one machine (issue 26).

`ray.cluster_utils.Cluster` starts two raylets on this machine, each with one "GPU" placement token
(the CPU platform's), and the run asks for `trainer.nnodes=2 trainer.n_gpus_per_node=1`: verl places
one FSDP rank and one vLLM replica on each node. The script trains 3 steps, checks that the
checkpoint is sharded over two ranks and holds PeRL's adapter and state, then reruns to 4 steps and
checks that it resumed from step 3. Exits non-zero on any failed check. Both "nodes" share this
machine's filesystem, so a node-local run directory is not exercised here (tests/test_heldout.py
covers the driver's side of that, tests/dist/verl_checkpoint.py the ranks').

    python scripts/two_node_toy.py [RUN_DIR]      (~3 min on 2 cores; measured 74 s + 75 s for the two runs)

Not in CI (CI's 20-minute budget): run it by hand after touching the engine, the sync or the
checkpoint code.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["perl.heldout=null", "trainer.save_freq=2", "data.train_batch_size=4",
         "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
         "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
         "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8"]


def run_on_two_nodes(run_dir: str, steps: int) -> dict:
    """One `perl train` of the toy on a fresh two-node cluster; its summary."""
    import ray
    from omegaconf import OmegaConf
    from ray.cluster_utils import Cluster
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env

    from perl.verl_glue.entry import prepare, run

    _, cfg, _ = prepare(["--config", os.path.join(ROOT, "examples", "toy.yaml"), f"trainer.default_local_dir={run_dir}",
                         "trainer.nnodes=2", "trainer.n_gpus_per_node=1", f"trainer.total_training_steps={steps}", *SMALL])
    # what verl's run_ppo passes to ray.init, which it skips when Ray is already initialized
    env = get_ppo_ray_runtime_env(cfg)
    env.setdefault("env_vars", {})["TRANSFER_QUEUE_ENABLE"] = "1"
    env = OmegaConf.to_container(OmegaConf.merge(env, OmegaConf.to_container(cfg.ray_kwargs.ray_init.runtime_env)))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 16, "num_gpus": 1})
    cluster.add_node(num_cpus=16, num_gpus=1)
    try:
        ray.init(address=cluster.address, runtime_env=env)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2 and all(n["Resources"].get("GPU") == 1 for n in nodes), nodes
        return run(cfg)
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["VERL_PLATFORM"] = "cpu"  # as trainer.device=cpu sets it in the driver
    run_dir = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="perl-two-nodes-"))
    from perl.verl_glue.run_dir import ADAPTER_DIR, STATE_FILE

    first = run_on_two_nodes(run_dir, 3)
    actor = os.path.join(run_dir, "global_step_2", "actor")
    shards = sorted(f for f in os.listdir(actor) if f.startswith("model_world_size_"))
    assert shards == ["model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"], shards
    assert os.path.isdir(os.path.join(actor, ADAPTER_DIR)) and os.path.exists(os.path.join(actor, STATE_FILE))
    assert first["steps"] == 3 and first["resumed_from"] == 0, first
    import re

    servers = set(re.findall(r"\(vLLMHttpServer pid=(\d+)\)", open(os.path.join(run_dir, "logs", "train.log")).read()))
    assert len(servers) == 2, servers  # one vLLM replica per node (rollout TP 1)
    second = run_on_two_nodes(run_dir, 4)
    assert second["steps"] == 4 and second["resumed_from"] == 3, second
    steps = [json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4], steps
    print(f"two nodes OK: 2 ranks, 2 vLLM replicas, trained 3 steps ({first['wall_s']:.0f} s), "
          f"resumed from 3 to 4 ({second['wall_s']:.0f} s); {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
