"""The CPU rollout server's process, started while the actor initialises instead of after it.

verl 0.9.1's `PPOTrainer._setup` runs the actor's `init_model` (its process: imports, model,
adapter) and only then `LLMServerManager.create`, which starts the vLLM server's Ray actor. That
process then spends ~12 s (on the 2-core box) importing verl's server module (vLLM, torch) on one
thread, while the other core idles: `vmstat` beside a toy run showed one core of two idle for
most of the actor's start (docs/benchmarks.md, "The resume test's race ..."). PeRL starts the
server's process first thing in the task runner (`_PerlTaskRunner.run`, before verl builds its
trainer: tokenizer, data sets, worker pools, the actor), with the options verl will give it, and no
arguments: it imports and waits. When verl's replica then creates "its" server (`self.server_class.options(...)
.remote(...)` in `vLLMReplica.launch_servers`), `EarlyServerClass` hands it that process and runs
verl's own `__init__` in it (`PerlvLLMHttpServer.start`); everything after is verl's.

Only where it is safe to predict the server's options: the CPU profile (`trainer.device=cpu`), one
node, one vLLM replica, no disaggregation. If verl asks for other options than those the early
process got (another name, environment, placement, concurrency), the early process is killed and
verl's server is created as verl would have (a start-up cost, not a behaviour change).
patches/README.md #12; the contract test pins the options' recipe. The server and replica classes and
`start_server_early`, which import vLLM, are in `rollout_server_vllm.py`, imported only where the
server starts early (a run with sglang or trtllm may have no vLLM installed).
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from verl.plugin.platform import get_platform
from verl.workers.rollout.replica import CONTROL_METHOD_CONCURRENCY

# the one early server process, until `EarlyServerClass` hands it out: {"handle", "options"}
_EARLY: dict[str, Any] = {}


def early_server_options(config) -> dict[str, Any] | None:
    """The Ray options `vLLMReplica.launch_servers` (verl 0.9.1) gives the server of replica 0 on
    node 0 (name, environment, node, concurrency), or None where PeRL does not start it early."""
    rollout = config.actor_rollout_ref.rollout
    if (str(config.trainer.device) != "cpu" or rollout.name != "vllm" or int(config.trainer.nnodes) != 1
            or rollout.get("disaggregation", {}).get("enabled", False)):
        return None
    world = (int(rollout.tensor_model_parallel_size) * int(rollout.data_parallel_size)
             * int(rollout.get("pipeline_model_parallel_size", 1)))
    if int(config.trainer.n_gpus_per_node) // world != 1:  # one replica
        return None
    platform = get_platform()
    env_vars = {**{var: "1" for var in platform.ray_noset_envvars()}, **platform.rollout_env_vars()}
    return {"name": "vllm_server_0_0", "runtime_env": {"env_vars": env_vars},
            "node_id": ray.get_runtime_context().get_node_id(),
            "max_concurrency": max(1000, int(rollout.max_num_seqs) + CONTROL_METHOD_CONCURRENCY)}


def early_server_started() -> bool:
    return "handle" in _EARLY


def _ray_options(options: dict[str, Any]) -> dict[str, Any]:
    return {"name": options["name"], "runtime_env": options["runtime_env"],
            "max_concurrency": options["max_concurrency"],
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=options["node_id"], soft=False)}


def _options_of(ray_options: dict[str, Any]) -> dict[str, Any] | None:
    """verl's `.options(...)` keywords in `early_server_options`' form (None: something else asked)."""
    strategy = ray_options.get("scheduling_strategy")
    if set(ray_options) != {"name", "runtime_env", "max_concurrency", "scheduling_strategy"} or not (
            isinstance(strategy, NodeAffinitySchedulingStrategy) and not strategy.soft):
        return None
    return {"name": ray_options["name"], "runtime_env": ray_options["runtime_env"],
            "node_id": strategy.node_id, "max_concurrency": ray_options["max_concurrency"]}


def take_early_server(ray_options: dict[str, Any]):
    """The early server's handle if it was started with the options verl now asks for; otherwise
    None, after killing it (and waiting for its name to be free, so verl can create its own)."""
    early = _EARLY.pop("handle", None)
    if early is None:
        return None
    if _options_of(ray_options) == _EARLY["options"]:
        return early
    print(f"[perl] verl asked for its rollout server with other options than PeRL started it with "
          f"({ray_options}); verl's own server starts instead", flush=True)
    ray.kill(early)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get_actor(_EARLY["options"]["name"])
        except ValueError:
            break
        time.sleep(0.1)
    return None


class EarlyServerClass:
    """Stands in for verl's `self.server_class` (`ray.remote(vLLMHttpServer)`): `.options(**o)
    .remote(**kwargs)` returns the early server, initialised with verl's arguments, when `o` are the
    options it was started with; verl's own creation otherwise."""

    def __init__(self, server_class) -> None:
        self._server_class = server_class

    def options(self, **ray_options):
        server_class = self._server_class

        class _Launch:
            @staticmethod
            def remote(*args, **kwargs):
                early = take_early_server(ray_options)
                if early is None or args:
                    return server_class.options(**ray_options).remote(*args, **kwargs)
                # waited for: the server is an async actor, whose calls may start before an earlier
                # one ends; verl's next call reads what `__init__` sets (a light method, no engine yet)
                ray.get(early.start.remote(**kwargs))
                return early

        return _Launch()
