"""PeRL's agent-loop manager: verl's TransferQueue agent loop, cheaper per completion and seedable.

verl 0.9.1's `AgentLoopWorkerTQ` runs one coroutine per completion. For each one it builds a fresh
agent loop through hydra (`hydra.utils.instantiate`: an OmegaConf merge of the whole trainer config,
and a new Continuous Token builder that logs a warning), and scores it with a Ray call to a
separate reward worker carrying a fresh `DataProto`. For the toy's 128+ completions a step this is
~14 ms of CPU per completion in the one agent-loop process, more than vLLM spends generating them
(docs/benchmarks.md, "The toy step"). `PerlAgentLoopManager` changes three things, through verl's
`actor_rollout_ref.rollout.agent.agent_loop_manager_class` hook, and nothing of what a completion
is (a seeded one is drawn from the same distribution):

- **one agent loop per worker** for `single_turn_agent` (the only loop PeRL's data asks for): its
  state is the config, the tokenizer and the token builder, all fixed for the run; `run()` keeps
  nothing between calls (verl 0.9.1 `single_turn_agent_loop.py`). Other agent loops, which may
  keep per-trajectory state (tools), are still built per completion, as verl does;
- **a seed per completion** with `perl.seeded_rollouts` (`completion_seed`), so rollouts are
  reproducible (verl's sampling draws from vLLM's shared generator in request order);
- **in-process scoring when `reward.num_workers=0`** (the CPU profile): verl's own
  `RewardLoopWorker` (the same reward manager, custom reward function and overlong buffer) runs
  inside the agent-loop worker, called directly instead of through Ray; with reward workers
  configured (verl's default, every GPU recipe) scoring goes to them as in verl;
- **no load-balancer round trips with one rollout server** (`OneServerClient`, which
  `PerlSyncTrainer.get_llm_client` hands out through verl's `get_client(client_cls=...)`): verl asks
  its load-balancer actor which server to use before every completion and tells it when done (two
  Ray calls per completion to one more process on the same cores); with a single server the answer
  is always that server. Several servers (a GPU node with more than one replica) keep verl's client.
  With one server the balancer's actor is not even started (`PerlLLMServerManager`: verl
  starts it with the servers; PeRL on first use, which then never comes).

The manager is verl's `AgentLoopManagerTQ` with this worker class; the contract test
(tests/test_upgrade_contract.py) pins the internals it relies on.
"""

from __future__ import annotations

import hashlib
from typing import Any

import ray
from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ, AgentLoopWorkerTQ
from verl.workers.rollout.llm_server import LLMServerClient, LLMServerManager

# agent loops whose instance holds no per-trajectory state, so one serves every completion
STATELESS_LOOPS = frozenset({"single_turn_agent"})


class _InProcessReward:
    """Stands in for a reward worker's Ray handle (`handle.compute_score.remote(data)` -> awaitable):
    verl's `RewardLoopWorker`, built on first use inside the worker's running event loop (its
    reward manager binds the loop it is built in), called directly."""

    def __init__(self, config: Any) -> None:
        self._config = config
        self._worker = None
        self.compute_score = self  # handle.compute_score.remote(...)

    def remote(self, data):
        if self._worker is None:
            from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

            self._worker = RewardLoopWorker(self._config, None)
        return self._worker.compute_score(data)


class _PerlAgentLoopWorker(AgentLoopWorkerTQ.__ray_actor_class__):
    def __init__(self, *args, **kwargs):
        """With verl's arguments, verl's worker. Without any (`start_workers_early`): a process that
        has only imported the agent loop's modules, until `start` runs the same initialisation."""
        if args or kwargs:
            self.start(*args, **kwargs)

    def start(self, config, llm_client, teacher_client=None, reward_loop_worker_handles=None) -> None:
        if in_process_reward(config):
            reward_loop_worker_handles = [_InProcessReward(config)]
        super().__init__(config, llm_client, teacher_client, reward_loop_worker_handles)
        self._loops: dict[str, Any] = {}
        # perl.seeded_rollouts: the run's rollout seed, read once (not per completion); None: off
        self._seed_base = int(config.actor_rollout_ref.rollout.seed) if config.perl.get("seeded_rollouts") else None

    def _agent_loop(self, agent_name: str):
        if agent_name in self._loops:  # per completion: nothing else on this path
            return self._loops[agent_name]
        import hydra
        from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap, _agent_loop_registry

        assert agent_name in _agent_loop_registry, (
            f"Agent loop {agent_name} not registered, registered agent loops: {_agent_loop_registry.keys()}"
        )
        loop = hydra.utils.instantiate(
            config=_agent_loop_registry[agent_name], trainer_config=DictConfigWrap(config=self.config),
            server_manager=self.llm_client, tokenizer=self.tokenizer, processor=self.processor,
            hf_model_type=self.hf_model_type, dataset_cls=self.dataset_cls,
            data_config=DictConfigWrap(self.config.data), tools=ToolListWrap(self.tools),
        )
        if agent_name in STATELESS_LOOPS:
            self._loops[agent_name] = loop
        return loop

    async def _run_agent_loop(self, sampling_params: dict[str, Any], trajectory: dict[str, Any], *,
                              agent_name: str, trace: bool = True, **kwargs):
        """verl's `AgentLoopWorker._run_agent_loop` (verl 0.9.1, agent_loop.py), the agent loop
        taken from `_agent_loop` instead of built each time; with `perl.seeded_rollouts`, the
        completion's own seed in its sampling params."""
        from verl.utils.rollout_trace import rollout_trace_attr

        if self._seed_base is not None:
            sampling_params = {**sampling_params,
                               "seed": completion_seed(self._seed_base, trajectory, kwargs.get("session_id", 0))}
        with rollout_trace_attr(step=trajectory["step"], sample_index=trajectory["sample_index"],
                                rollout_n=trajectory["rollout_n"], validate=trajectory["validate"],
                                name="agent_loop", trace=trace):
            output = await self._agent_loop(agent_name).run(sampling_params, **kwargs)
            return await self._agent_loop_postprocess(output, trajectory["validate"], **kwargs)


PerlAgentLoopWorker = ray.remote(_PerlAgentLoopWorker)


class PerlAgentLoopManager(AgentLoopManagerTQ):
    """verl's TransferQueue agent-loop manager with `PerlAgentLoopWorker` as its workers, taking the
    worker processes `start_workers_early` started when there are."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.agent_loop_workers_class = PerlAgentLoopWorker

    async def _init_agent_loop_workers(self):
        import asyncio

        early = take_early_workers(int(self.rollout_config.agent.num_workers))
        if early is None:
            return await super()._init_agent_loop_workers()
        # verl creates its workers with these four arguments (and does not wait for them)
        await asyncio.gather(*[worker.start.remote(self.config, self.llm_client, self.teacher_client,
                                                   self.reward_loop_worker_handles) for worker in early])
        self.agent_loop_workers = early
        print(f"[perl] {len(early)} agent-loop worker(s), started with the rollout servers", flush=True)


# The agent-loop workers `start_workers_early` started, in the task runner's process, until the
# manager takes them: {"workers": [...]}; {"started": True} once it has run (it runs once).
_EARLY: dict[str, Any] = {}


def start_workers_early(config) -> bool:
    """Start the agent-loop worker processes now, empty, placed and named as verl's
    `AgentLoopManager._init_agent_loop_workers` places and names them (verl 0.9.1; contract test).

    verl starts them after the trainer is built, once TransferQueue, the actor and the vLLM server
    have each been started and waited for: the workers' own start (a process importing torch,
    transformers and verl's agent loop, ~4.5 s of CPU each) then comes on top, before the first
    step can generate (step 1 of the toy took ~11 s against ~2.3 s for the next). `PerlLLMServerManager`
    calls this as the rollout servers start: the workers' imports run while vLLM starts, which keeps
    about one core of two busy; `PerlAgentLoopManager` then initialises them with verl's arguments
    (`PerlAgentLoopWorker.start`). Only for PeRL's manager (the one that takes them) and once per
    process; returns whether it started them."""
    from uuid import uuid4

    from hydra.utils import get_class

    manager = config.actor_rollout_ref.rollout.agent.get("agent_loop_manager_class")
    if _EARLY.get("started") or not manager or not issubclass(get_class(str(manager)), PerlAgentLoopManager):
        return False
    _EARLY["started"] = True
    node_ids = [node["NodeID"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0]
    _EARLY["workers"] = [
        PerlAgentLoopWorker.options(
            name=f"agent_loop_worker_{i}" + f"_{uuid4().hex[:8]}",
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_ids[i % len(node_ids)], soft=True),
        ).remote()
        for i in range(int(config.actor_rollout_ref.rollout.agent.num_workers))
    ]
    return True


def take_early_workers(num_workers: int) -> list | None:
    """The workers `start_workers_early` started (once; None if it did not, or started another number)."""
    workers = _EARLY.pop("workers", None)
    if workers is not None and len(workers) != num_workers:
        for worker in workers:
            ray.kill(worker)
        return None
    return workers


class OneServerClient(LLMServerClient):
    """verl's LLM server client for a pool of exactly one server: every request goes to it without
    asking the load-balancer actor (verl 0.9.1 `LLMServerClient._acquire_server`/`_release_server`,
    the methods verl's own `FullyAsyncLLMServerClient` overrides). What the balancer would add with
    one server: sticky sessions (always this server anyway) and in-flight counts (read only to choose
    among several servers, and by the fully-async trainers' drain, which PeRL does not use)."""

    def __init__(self, config, load_balancer_handle=None, *, server: tuple[str, Any], **kwargs) -> None:
        super().__init__(config=config, load_balancer_handle=load_balancer_handle, **kwargs)
        self._server = server  # (address, actor handle)

    async def _acquire_server(self, request_id: str, **extra) -> tuple[str, Any]:
        return self._server

    def _release_server(self, server_id: str, request_id: str | None = None) -> None:
        pass


class PerlLLMServerManager(LLMServerManager):
    """verl's LLM server manager, which starts the processes of the rollout differently in two ways
    (perl/verl_glue/trainer.py makes verl's trainer build this class; patches/README.md #8, #9):

    - its load-balancer actor is started on first use instead of with the servers
      (`LLMServerManager.create` -> `_init_global_load_balancer`). With one server PeRL's trainer
      hands out `OneServerClient`, which never asks the balancer: the actor is then never started (a
      process, ~7 s of CPU at start-up on the 2-core box: Ray imports verl's vLLM server module in it
      to unpickle the server handles). Any other use (`global_load_balancer`, a `get_client` for
      verl's own client) starts it as verl would have, with the same arguments;
    - as the servers start, so do the agent-loop workers' processes (`start_workers_early`)."""

    async def _initialize_llm_servers(self, *args, **kwargs):
        start_workers_early(self.config)
        return await super()._initialize_llm_servers(*args, **kwargs)

    async def _init_global_load_balancer(self) -> None:
        self._load_balancer = None  # started by the property below when something asks for it

    @property
    def global_load_balancer(self):
        if getattr(self, "_load_balancer", None) is None:
            from verl.workers.rollout.router import get_router_handle

            self._load_balancer = get_router_handle(
                servers=dict(zip(self.server_addresses, self.server_handles, strict=True)),
                router_config_path=getattr(self.rollout_config, "router_config_path", None),
                full_determinism=getattr(self.rollout_config, "full_determinism", False),
                load_balancer_cls=self._load_balancer_cls,
            )
        return self._load_balancer

    @global_load_balancer.setter
    def global_load_balancer(self, handle) -> None:
        self._load_balancer = handle

    def get_client(self, client_cls=None, **kwargs):
        if client_cls is not None and issubclass(client_cls, OneServerClient):
            return client_cls(config=self.config, load_balancer_handle=None, **kwargs)
        return super().get_client(client_cls=client_cls, **kwargs)


def completion_seed(base: int, trajectory: dict[str, Any], session: int) -> int:
    """The vLLM sampling seed of one completion: a hash of the run's rollout seed, the step, whether
    it validates, the prompt's data index (verl's `extra_info.index`) and its place in the group
    (verl's `session_id`, 0..n-1, with the TransferQueue loop; `rollout_n` in verl's other one).
    Reproducible across reruns, distinct within a step. (verl's own `full_determinism` seeds every
    request with `rollout.seed + replica`: one seed for a whole group.)"""
    key = (f"{base}/{int(trajectory['step'])}/{bool(trajectory['validate'])}/{trajectory['sample_index']}/"
           f"{int(trajectory['rollout_n'])}/{int(session)}")
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


def in_process_reward(config) -> bool:
    """reward.num_workers=0 and a rule-based reward (no reward model): score inside the agent loop."""
    reward = config.reward
    return int(reward.num_workers) == 0 and not reward.reward_model.enable

