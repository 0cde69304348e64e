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
- **one TransferQueue put per group** (`_run_prompt`, `_agent_loop_postprocess`): verl puts each
  trajectory as its completion ends (a controller round trip for the metadata, the storage write, a
  notification: ~40% of the agent-loop workers' CPU on the toy, and most of TransferQueue's), then
  the group's status. Nothing reads a group's trajectories before that status says `finished`
  (verl's replay buffer samples finished groups only; a `failure` group is cleared), so PeRL puts
  them together, just before it: 3 puts a group instead of G + 2;
- **tokens only from vLLM** (`token_only`): verl's server returns token ids and log-probs, but vLLM
  detokenized every token and decoded each sampled token again for its log-probs; PeRL's requests
  carry `detokenize=False` (unless they have stop strings, which match on text).

The manager is verl's `AgentLoopManagerTQ` with this worker class; the contract test
(tests/test_upgrade_contract.py) pins the internals it relies on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from contextvars import ContextVar
from typing import Any

import ray
import torch
import transfer_queue as tq
from verl.trainer.ppo.v1.agent_loop_tq import (
    AgentLoopManagerTQ,
    AgentLoopWorkerTQ,
    _settle_session_tasks,
    apply_greedy_sampling_params,
)
from verl.utils.tensordict_utils import list_of_dict_to_tensordict
from verl.workers.rollout.llm_server import LLMServerClient, LLMServerManager

# agent loops whose instance holds no per-trajectory state, so one serves every completion
STATELESS_LOOPS = frozenset({"single_turn_agent"})

logger = logging.getLogger(__name__)

# The group whose sessions the current task runs: `_run_prompt` sets a list, `_agent_loop_postprocess`
# appends each trajectory's (key, fields, tag) to it. A context variable: each session is a task made
# inside `_run_prompt`, which copies the context, so every session of a group sees that group's list.
_GROUP_RECORDS: ContextVar[list | None] = ContextVar("perl_group_records", default=None)


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

    async def _run_prompt(self, prompt: dict, sampling_params: dict, trajectory: dict, trace: bool = False) -> None:
        """verl's `AgentLoopWorkerTQ._run_prompt` (verl 0.9.1, agent_loop_tq.py; the contract test pins
        its hash), the group's trajectories put in one put once every session has settled, right before
        the group's terminal status (verl: one put per trajectory as it ends)."""
        uid, partition_id = prompt["uid"], "train" if not trajectory["validate"] else "val"
        await tq.async_kv_put(key=uid, partition_id=partition_id, tag={"status": "running"})
        tasks = []
        records: list[tuple[str, dict, dict]] = []
        group = _GROUP_RECORDS.set(records)  # the session tasks below copy this context
        try:
            config = self.config.actor_rollout_ref.rollout
            n = prompt.pop("__rollout_n__", config.n if not trajectory["validate"] else config.val_kwargs.n)
            do_sample = prompt.pop("__do_sample__", True)

            run_sampling_params = token_only(dict(sampling_params), config.name)
            if not trajectory["validate"] and not do_sample:
                apply_greedy_sampling_params(run_sampling_params)

            tasks = [asyncio.create_task(self._run_agent_loop(run_sampling_params, trajectory=trajectory, trace=trace,
                                                              session_id=i, **prompt)) for i in range(n)]
            session_errors = await _settle_session_tasks(tasks)
            if session_errors:
                for error in session_errors:
                    logger.error(f"Error in _run_prompt for uid={uid}",
                                 exc_info=(type(error), error, error.__traceback__))
            await put_trajectories(records, partition_id)  # what verl would have put, session by session
            await tq.async_kv_put(key=uid, partition_id=partition_id,
                                  tag={"status": "failure" if session_errors else "finished"})
        except Exception as e:
            logger.exception(f"Error in _run_prompt: {e}")
            if tasks:
                await _settle_session_tasks(tasks)
            await tq.async_kv_put(key=uid, partition_id=partition_id, tag={"status": "failure"})
        finally:
            _GROUP_RECORDS.reset(group)

    async def _agent_loop_postprocess(self, output, validate, **kwargs) -> None:
        """verl's `AgentLoopWorkerTQ._agent_loop_postprocess` (verl 0.9.1; the contract test pins its
        hash): score, then the trajectory's TransferQueue record(s); these go to the group being run
        (`_run_prompt` puts them), or are put now when no group is (a caller other than `_run_prompt`)."""
        uid, session_id = kwargs["uid"], kwargs["session_id"]
        outputs = output if isinstance(output, list) else [output]
        if not outputs:
            logger.warning(f"Empty output for prompt {uid}_{session_id}")
            return

        await self._compute_score(outputs, kwargs=kwargs)

        final_output = outputs[-1]
        await self._compute_teacher_logprobs(final_output, prompt_ids=final_output.prompt_ids,
                                             response_ids=final_output.response_ids, validate=validate,
                                             sample_kwargs=kwargs)

        if final_output.reward_score is not None:
            for output in outputs[:-1]:
                output.reward_score = final_output.reward_score
                output.extra_fields["reward_extra_info"] = final_output.extra_fields["reward_extra_info"]

        records = []  # key format: {uid}_{session_id}_{index of the agent loop's output}
        for i, output in enumerate(outputs):
            prompts = torch.tensor(output.prompt_ids, dtype=torch.int64)
            responses = torch.tensor(output.response_ids, dtype=torch.int64)
            input_ids = torch.cat([prompts, responses], dim=0)
            attention_mask = torch.ones_like(input_ids, dtype=torch.int64)
            multi_modal_inputs = self._compute_multi_modal_inputs(output, input_ids)
            position_ids = self._compute_position_ids(
                input_ids.unsqueeze(0), attention_mask.unsqueeze(0), multi_modal_inputs
            ).squeeze(0)

            field = output.as_dict()
            field.update(kwargs)
            field.pop("multi_modal_data", None)  # do not store raw image/video
            field["loss_mask"] = field["response_mask"]
            field["input_ids"] = input_ids
            field["position_ids"] = position_ids
            field["multi_modal_inputs"] = multi_modal_inputs
            prompt_len, response_len = field["prompts"].size(0), field["responses"].size(0)
            tag = {"status": "success", "prompt_len": prompt_len, "response_len": response_len,
                   "seq_len": prompt_len + response_len, "global_steps": kwargs["global_steps"],
                   "min_global_steps": field["extra_fields"].get("min_global_steps"),
                   "max_global_steps": field["extra_fields"].get("max_global_steps")}
            records.append((f"{uid}_{session_id}_{i}", field, tag))

        group = _GROUP_RECORDS.get()
        if group is not None:
            group.extend(records)
        else:
            await put_trajectories(records, "train" if not validate else "val")


PerlAgentLoopWorker = ray.remote(_PerlAgentLoopWorker)


async def put_trajectories(records: list[tuple[str, dict, dict]], partition_id: str) -> None:
    """Trajectories' (key, fields, tag) into TransferQueue in one put, as verl's worker puts one
    (`list_of_dict_to_tensordict`: ragged fields become jagged tensors, one row per trajectory)."""
    if not records:
        return
    keys, fields, tags = zip(*records)
    await tq.async_kv_batch_put(keys=list(keys), fields=list_of_dict_to_tensordict(list(fields)), tags=list(tags),
                                partition_id=partition_id)


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
    - as the servers start, so do the agent-loop workers' processes (`start_workers_early`);
    - where PeRL started the rollout server's process before the actor (`rollout_server.py`), its
      replica class takes that process (verl reads `rollout_replica_class` "for recipe to change")."""

    def __init__(self, *args, **kwargs):
        from perl.verl_glue.rollout_server import early_server_started

        if early_server_started():
            from perl.verl_glue.rollout_server_vllm import PerlvLLMReplica

            self.rollout_replica_class = PerlvLLMReplica
        super().__init__(*args, **kwargs)

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


def token_only(sampling_params: dict[str, Any], rollout_name: str) -> dict[str, Any]:
    """vLLM's sampling params without detokenization (`detokenize=False`), unless stop strings need it.

    verl's vLLM server returns token ids and their log-probs only (`TokenOutput`; verl 0.9.1
    `vLLMHttpServer.generate`), yet vLLM detokenizes by default: per token of every request its front
    end decoded the text and, with `rollout.calculate_log_probs` (verl's default), decoded each sampled
    token to a string for the log-probs it returns (`LogprobsProcessor`, one `tokenizer.decode` per
    token). Nothing reads that text. Toy runs: the server's CPU 0.40-0.42 -> 0.32-0.34 s a step
    (docs/benchmarks.md). The tokens, their log-probs and the sampling are the same."""
    if rollout_name == "vllm" and not sampling_params.get("stop"):
        sampling_params.setdefault("detokenize", False)
    return sampling_params


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

