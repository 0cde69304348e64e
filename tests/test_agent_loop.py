"""PeRL's agent-loop worker (perl/verl_glue/agent_loop.py): one agent loop per worker for the
stateless single-turn loop, a fresh one per completion for any other, and scoring in-process with
verl's own reward worker when reward.num_workers=0. No Ray cluster: the worker's methods run on an
instance built without its actor constructor; the end-to-end tests (tests/test_trainer_e2e.py) run
it inside verl's trainer."""

import asyncio

import numpy as np
import pytest
import torch

from conftest import ready

import perl.verl_glue.config as vc


@pytest.fixture(scope="module")
def cfg(paths):
    return vc.resolved(vc.compose({}, ready(paths, "trainer.device=cpu", "trainer.n_gpus_per_node=1")))


def test_the_cpu_profile_selects_perls_manager_and_in_process_scoring(paths, cfg):
    from perl.verl_glue.agent_loop import in_process_reward
    from perl.verl_glue.config.derive import AGENT_LOOP_MANAGER

    assert cfg.actor_rollout_ref.rollout.agent.agent_loop_manager_class == AGENT_LOOP_MANAGER
    assert cfg.reward.num_workers == 0 and in_process_reward(cfg)
    # a GPU node keeps verl's reward workers; a recipe naming its own manager keeps it
    gpu = vc.resolved(vc.compose({}, ready(paths)))
    assert gpu.reward.num_workers > 0 and not in_process_reward(gpu)
    assert gpu.actor_rollout_ref.rollout.agent.agent_loop_manager_class == AGENT_LOOP_MANAGER
    own = vc.resolved(vc.compose({}, ready(paths, "+actor_rollout_ref.rollout.agent.agent_loop_manager_class=my.Manager")))
    assert own.actor_rollout_ref.rollout.agent.agent_loop_manager_class == "my.Manager"


def test_the_cpu_profile_starts_one_agent_loop_worker_for_a_small_step_and_two_for_a_larger_one(paths, cfg):
    """Each worker is a process that imports verl and vLLM before the first step (~9 s of CPU on the
    2 cores everything else starts on); a second one pays only with enough completions a step."""
    from perl.verl_glue.config.cpu import ONE_AGENT_WORKER_UP_TO

    def workers(*extra):
        return vc.compose({}, ready(paths, "trainer.device=cpu", "trainer.n_gpus_per_node=1",
                                    *extra)).actor_rollout_ref.rollout.agent.num_workers

    assert ONE_AGENT_WORKER_UP_TO == 32
    assert cfg.actor_rollout_ref.rollout.agent.num_workers == 2  # the paper's batch
    assert workers("data.train_batch_size=4", "actor_rollout_ref.rollout.n=4") == 1  # the e2e tests' 16
    assert workers("data.train_batch_size=4", "actor_rollout_ref.rollout.n=8") == 1  # 32
    assert workers("data.train_batch_size=4", "actor_rollout_ref.rollout.n=9") == 2  # 36
    assert workers("data.train_batch_size=8", "actor_rollout_ref.rollout.n=8") == 2  # SmolLM2's 64
    assert workers("data.train_batch_size=4", "actor_rollout_ref.rollout.n=4",
                   "actor_rollout_ref.rollout.agent.num_workers=3") == 3  # the recipe's own number stands
    gpu = vc.compose({}, ready(paths, "data.train_batch_size=4", "actor_rollout_ref.rollout.n=4"))
    assert gpu.actor_rollout_ref.rollout.agent.num_workers == 8  # a GPU node: verl's default


def _bare_worker(cfg):
    """The worker's state that `_agent_loop` reads, without Ray, vLLM or TransferQueue."""
    from verl.utils import hf_tokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from perl.verl_glue.agent_loop import _PerlAgentLoopWorker

    worker = object.__new__(_PerlAgentLoopWorker)
    worker.config, worker.llm_client, worker.processor, worker.tools = cfg, None, None, []
    worker.tokenizer = hf_tokenizer(cfg.actor_rollout_ref.model.path)
    worker.hf_model_type, worker.dataset_cls, worker._loops = None, RLHFDataset, {}
    return worker


def test_one_single_turn_loop_serves_every_completion_and_other_loops_are_built_each_time(cfg):
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

    worker = _bare_worker(cfg)
    first = worker._agent_loop("single_turn_agent")
    assert isinstance(first, SingleTurnAgentLoop) and worker._agent_loop("single_turn_agent") is first
    _agent_loop_registry["perl_test_loop"] = OmegaConf.create(
        {"_target_": "verl.experimental.agent_loop.single_turn_agent_loop.SingleTurnAgentLoop"})
    try:
        a, b = worker._agent_loop("perl_test_loop"), worker._agent_loop("perl_test_loop")
        assert a is not b and a is not first  # not known to be stateless: one per completion, as in verl
    finally:
        del _agent_loop_registry["perl_test_loop"]
    with pytest.raises(AssertionError, match="not registered"):
        worker._agent_loop("no_such_loop")


def _completion(tok, prompt: str, answer: str, truth: str):
    """A scored completion in the layout verl's agent loop hands a reward worker (`_compute_score`)."""
    from tensordict import TensorDict
    from verl import DataProto

    prompts = torch.tensor(tok.encode(prompt))
    responses = torch.tensor(tok.encode(answer))
    ids = torch.cat([prompts, responses])
    batch = TensorDict({"prompts": prompts[None], "responses": responses[None], "input_ids": ids[None],
                        "attention_mask": torch.ones_like(ids)[None],
                        "position_ids": torch.arange(len(ids))[None]}, batch_size=1)
    non_tensor = {"data_source": np.array(["arith"], dtype=object),
                  "reward_model": np.array([{"style": "rule", "ground_truth": truth}], dtype=object),
                  "extra_info": np.array([{}], dtype=object)}
    return DataProto(batch=batch, non_tensor_batch=non_tensor)


def test_in_process_scoring_runs_verls_reward_worker_with_perls_reward(cfg):
    from verl.utils import hf_tokenizer

    from perl.verl_glue.agent_loop import _InProcessReward

    tok = hf_tokenizer(cfg.actor_rollout_ref.model.path)
    handle = _InProcessReward(cfg)

    async def score_both():  # one event loop, as in the worker (verl's reward manager binds it)
        return [await handle.compute_score.remote(_completion(tok, "1+2=", answer, "3"))
                for answer in ("<think>ok</think> \\boxed{3}", "<think>ok</think> \\boxed{4}")]

    right, wrong = asyncio.run(score_both())
    assert right["reward_score"] == 1.0 and wrong["reward_score"] == 0.0
    assert right["reward_extra_info"]["acc"] == 1.0 and wrong["reward_extra_info"]["acc"] == 0.0




def test_each_completion_gets_a_seed_of_its_own_reproducible_across_runs():
    """perl.seeded_rollouts: one seed per (rollout.seed, step, validate, prompt index, place in the
    group); verl's full_determinism would give a whole group one seed (identical completions)."""
    from perl.verl_glue.agent_loop import completion_seed

    traj = {"step": 3, "validate": False, "sample_index": 17, "rollout_n": 0}
    group = [completion_seed(0, traj, i) for i in range(8)]
    assert len(set(group)) == 8 and all(0 <= s < 2**31 for s in group)
    assert group == [completion_seed(0, dict(traj), i) for i in range(8)]  # a rerun draws the same
    others = {completion_seed(1, traj, 0), completion_seed(0, {**traj, "step": 4}, 0),
              completion_seed(0, {**traj, "sample_index": 18}, 0), completion_seed(0, {**traj, "validate": True}, 0),
              completion_seed(0, {**traj, "rollout_n": 1}, 0)}
    assert len(others) == 5 and group[0] not in others


def test_vllm_requests_ask_for_tokens_only_unless_stop_strings_need_the_text():
    """verl's server reads token ids and log-probs only; vLLM would decode both (tests/test_vllm_cpu.py
    checks the same tokens and log-probs come back without it)."""
    from perl.verl_glue.agent_loop import token_only

    assert token_only({"temperature": 1.0, "logprobs": True}, "vllm") == {"temperature": 1.0, "logprobs": True,
                                                                         "detokenize": False}
    assert "detokenize" not in token_only({"stop": ["</answer>"]}, "vllm")  # stop strings match on text
    assert token_only({"detokenize": True}, "vllm")["detokenize"] is True  # a caller's choice stands
    assert "detokenize" not in token_only({"temperature": 1.0}, "sglang")  # another engine's params


def test_with_one_server_every_request_goes_to_it_without_the_load_balancer(cfg):
    """OneServerClient: verl's `generate` (its request id, sampling params and step bookkeeping)
    against the one server it was given; no load-balancer handle exists to ask (None: asking it would
    raise), so there were no acquire/release calls."""
    from verl.workers.rollout.replica import TokenOutput

    from perl.verl_glue.agent_loop import OneServerClient

    calls = []

    class _Generate:  # a Ray actor handle's `generate.remote(...)` -> awaitable, in-process
        def remote(self, **kwargs):
            calls.append(kwargs)

            async def done():
                return TokenOutput(token_ids=[7, 8], log_probs=None, extra_fields={"global_steps": 3})
            return done()

    class _Server:
        generate = _Generate()

    client = OneServerClient(cfg, None, server=("10.0.0.1:8000", _Server()))
    out = asyncio.run(client.generate("req-1", prompt_ids=[1, 2, 3], sampling_params={"temperature": 1.0}))
    out2 = asyncio.run(client.generate("req-2", prompt_ids=[4], sampling_params={"temperature": 1.0}))
    assert out.token_ids == [7, 8] and out.extra_fields["min_global_steps"] == 3 == out2.extra_fields["max_global_steps"]
    assert [c["prompt_ids"] for c in calls] == [[1, 2, 3], [4]]
    assert calls[0]["request_id"] != "req-1"  # verl's fresh vLLM request id per turn, unchanged


def test_the_load_balancer_actor_starts_only_when_something_asks_for_it(cfg, monkeypatch):
    """PerlLLMServerManager: verl's manager minus the balancer actor at start-up. PeRL's
    one-server client gets no handle and starts nothing; anything that asks for the balancer
    (verl's own client, `global_load_balancer`) starts it once, with the arguments verl's own
    `_init_global_load_balancer` passes (both run here against a recorder of `get_router_handle`)."""
    import verl.workers.rollout.router as router
    from verl.workers.rollout.llm_server import LLMServerClient, LLMServerManager

    import perl.verl_glue.trainer  # noqa: F401  (makes verl's trainer build the lazy manager)
    from perl.verl_glue.agent_loop import PerlLLMServerManager, OneServerClient
    from verl.trainer.ppo.v1 import trainer_base

    assert trainer_base.LLMServerManager is PerlLLMServerManager

    started = []
    monkeypatch.setattr(router, "get_router_handle", lambda **kw: started.append(kw) or f"balancer-{len(started)}")

    def manager(cls):
        m = cls.__new__(cls)  # the attributes verl's constructor and server start-up leave
        m.config, m.rollout_config, m._load_balancer_cls = cfg, cfg.actor_rollout_ref.rollout, None
        m.server_addresses, m.server_handles = ["10.0.0.1:8000"], ["handle"]
        asyncio.run(m._init_global_load_balancer())
        return m

    verls = manager(LLMServerManager)
    assert len(started) == 1 and verls.global_load_balancer == "balancer-1"  # verl: at start-up
    lazy = manager(PerlLLMServerManager)
    assert len(started) == 1  # PeRL: not yet
    client = lazy.get_client(client_cls=OneServerClient, server=("10.0.0.1:8000", "handle"))
    assert isinstance(client, OneServerClient) and client._load_balancer is None and len(started) == 1
    default = lazy.get_client()  # verl's client needs the balancer: started now, with verl's arguments
    assert type(default) is LLMServerClient and default._load_balancer == "balancer-2"
    assert started[1] == started[0] and lazy.global_load_balancer == "balancer-2" and len(started) == 2


def test_agent_loop_workers_start_with_the_servers_once_and_only_for_perls_manager(cfg, monkeypatch):
    """start_workers_early creates the manager's workers, empty, named and placed as verl's
    `_init_agent_loop_workers` does (contract test); `PerlAgentLoopManager` initialises exactly those
    with verl's four arguments, and falls back to verl's own start when none (or another number)
    were started. Ray is replaced by recorders here; the end-to-end tests run it for real."""
    import ray
    from omegaconf import OmegaConf

    from perl.verl_glue import agent_loop as al

    node = "ab" * 28  # a node id as Ray writes them
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": node, "Alive": True, "Resources": {"CPU": 32.0}},
                                               {"NodeID": "gpu-only", "Alive": True, "Resources": {}}])
    created, killed = [], []

    class Handle:
        def __init__(self, options):
            self.options, self.calls = options, []
            self.start = self

        def remote(self, *args):
            self.calls.append(args)
            future = asyncio.get_event_loop().create_future()
            future.set_result(None)
            return future

    class Factory:
        def options(self, **options):
            return self

        def remote(self, *args):
            assert not args  # empty: the manager initialises them
            created.append(Handle(self._options))
            return created[-1]

    factory = Factory()
    monkeypatch.setattr(al.PerlAgentLoopWorker, "options",
                        lambda **options: setattr(factory, "_options", options) or factory)
    monkeypatch.setattr(ray, "kill", killed.append)
    monkeypatch.setattr(al, "_EARLY", {})

    other = OmegaConf.merge(cfg, {"actor_rollout_ref": {"rollout": {"agent": {
        "agent_loop_manager_class": "verl.trainer.ppo.v1.agent_loop_tq.AgentLoopManagerTQ"}}}})
    assert al.start_workers_early(other) is False and not created  # verl's manager would not take them
    assert al.start_workers_early(cfg) is True and len(created) == cfg.actor_rollout_ref.rollout.agent.num_workers == 2
    assert al.start_workers_early(cfg) is False and len(created) == 2  # once per process
    assert [h.options["name"].rsplit("_", 1)[0] for h in created] == ["agent_loop_worker_0", "agent_loop_worker_1"]
    assert all(h.options["scheduling_strategy"].node_id == node and h.options["scheduling_strategy"].soft
               for h in created)

    manager = object.__new__(al.PerlAgentLoopManager)
    manager.config, manager.rollout_config = cfg, cfg.actor_rollout_ref.rollout
    manager.llm_client, manager.teacher_client, manager.reward_loop_worker_handles = "client", None, ["rw"]
    asyncio.run(manager._init_agent_loop_workers())
    assert manager.agent_loop_workers == created
    assert all(h.calls == [(cfg, "client", None, ["rw"])] for h in created)  # verl's four arguments

    # a second manager finds none left and starts its own, as verl does; a count that differs from
    # what was started (another config) gets verl's start too, and the early ones are stopped
    verls = []

    async def verl_start(self):
        verls.append(self)

    monkeypatch.setattr(al.AgentLoopManagerTQ, "_init_agent_loop_workers", verl_start)
    asyncio.run(manager._init_agent_loop_workers())
    assert verls == [manager]
    al._EARLY["workers"] = ["w0", "w1", "w2"]
    asyncio.run(manager._init_agent_loop_workers())
    assert verls == [manager, manager] and killed == ["w0", "w1", "w2"] and "workers" not in al._EARLY


class _TQRecorder:
    """Stands in for TransferQueue's two async put calls; records them in order."""

    def __init__(self, monkeypatch):
        import transfer_queue as tq

        self.calls = []
        monkeypatch.setattr(tq, "async_kv_put", self.kv_put)
        monkeypatch.setattr(tq, "async_kv_batch_put", self.kv_batch_put)

    async def kv_put(self, key, partition_id, tag):
        self.calls.append(("status", key, tag["status"]))

    async def kv_batch_put(self, keys, fields, tags, partition_id):
        self.calls.append(("trajectories", list(keys), fields, tags))


def _scoring_worker(cfg, answers: dict[int, str]):
    """A bare worker (no Ray, no vLLM) whose agent loop answers session i with `answers[i]`
    (a missing i raises, as a failed generation would); scoring and the puts are PeRL's and verl's."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    from perl.verl_glue.agent_loop import _InProcessReward

    worker = _bare_worker(cfg)
    worker.reward_loop_worker_handles = [_InProcessReward(cfg)]
    worker.distillation_enabled, worker._seed_base, worker.mm_processor_kwargs = False, None, {}
    tok = worker.tokenizer

    class Loop:
        async def run(self, sampling_params, **kwargs):
            await asyncio.sleep(0.001 * (7 - kwargs["session_id"]))  # sessions end out of order
            prompt = tok.encode("1+2=")
            response = tok.encode(answers[kwargs["session_id"]])
            return AgentLoopOutput(prompt_ids=prompt, response_ids=response, response_mask=[1] * len(response),
                                   num_turns=2, metrics=AgentLoopMetrics())

    worker._agent_loop = lambda name: Loop()
    return worker


def _prompt(uid="u1", n=8):
    return {"uid": uid, "index": 5, "global_steps": 3, "agent_name": "single_turn_agent", "data_source": "arith",
            "reward_model": {"style": "rule", "ground_truth": "3"}, "extra_info": {"index": 5},
            "raw_prompt": [{"role": "user", "content": "1+2="}], "__rollout_n__": n}


def test_a_groups_trajectories_go_into_transfer_queue_in_one_put_before_its_status(cfg, monkeypatch):
    """`_run_prompt`: 'running', then the G trajectories in one put (verl: one put each, as each
    ends), then 'finished'; each scored and keyed as verl keys it ({uid}_{session}_{output})."""
    recorder = _TQRecorder(monkeypatch)
    answers = {i: "<think>ok</think> \\boxed{3}" if i % 2 else "<think>ok</think> \\boxed{4}" for i in range(8)}
    worker = _scoring_worker(cfg, answers)
    traj = {"step": 3, "sample_index": 5, "rollout_n": 0, "validate": False}
    asyncio.run(worker._run_prompt(_prompt(), {"temperature": 1.0}, trajectory=traj))

    assert [c[0] for c in recorder.calls] == ["status", "trajectories", "status"]
    assert recorder.calls[0][1:] == ("u1", "running") and recorder.calls[2][1:] == ("u1", "finished")
    _, keys, fields, tags = recorder.calls[1]
    assert sorted(keys) == [f"u1_{i}_0" for i in range(8)] and keys != sorted(keys)  # in completion order
    assert fields.batch_size[0] == 8 and all(t["status"] == "success" and t["global_steps"] == 3 for t in tags)
    scores = {key: float(fields["rm_scores"][i].sum()) for i, key in enumerate(keys)}  # at the last token
    assert scores == {f"u1_{i}_0": 1.0 if i % 2 else 0.0 for i in range(8)}
    for i, key in enumerate(keys):  # each row is verl's record of that trajectory
        response = torch.tensor(worker.tokenizer.encode(answers[int(key.split("_")[1])]))
        assert torch.equal(fields["responses"][i], response) and tags[i]["response_len"] == len(response)
        assert torch.equal(fields["input_ids"][i][-len(response):], response)
        assert torch.equal(fields["position_ids"][i], torch.arange(tags[i]["seq_len"]))
        assert fields["extra_fields"][i]["reward_extra_info"]["acc"] == scores[key]


def test_a_group_with_a_failed_session_puts_what_finished_then_failure(cfg, monkeypatch):
    """As in verl: the sessions that finished are stored, the group's status is 'failure' (verl's
    replay buffer then clears the whole group)."""
    recorder = _TQRecorder(monkeypatch)
    worker = _scoring_worker(cfg, {i: "<think>ok</think> \\boxed{3}" for i in range(8) if i != 2})
    traj = {"step": 3, "sample_index": 5, "rollout_n": 0, "validate": False}
    asyncio.run(worker._run_prompt(_prompt(), {"temperature": 1.0}, trajectory=traj))
    assert [c[0] for c in recorder.calls] == ["status", "trajectories", "status"]
    assert sorted(recorder.calls[1][1]) == [f"u1_{i}_0" for i in range(8) if i != 2]
    assert recorder.calls[2][1:] == ("u1", "failure")


def test_a_trajectory_outside_a_group_is_put_at_once(cfg, monkeypatch):
    """`_agent_loop_postprocess` called other than from `_run_prompt` (no group running) puts its
    trajectory itself, as verl's does."""
    recorder = _TQRecorder(monkeypatch)
    worker = _scoring_worker(cfg, {0: "<think>ok</think> \\boxed{3}"})
    prompt = _prompt()
    prompt.pop("__rollout_n__")

    async def one():
        output = await worker._agent_loop("single_turn_agent").run({}, session_id=0)
        await worker._agent_loop_postprocess(output, False, session_id=0, **prompt)

    asyncio.run(one())
    assert [c[0] for c in recorder.calls] == ["trajectories"] and recorder.calls[0][1] == ["u1_0_0"]


def test_the_rollout_server_starts_early_and_verl_takes_it_only_with_the_options_it_asks_for(cfg, monkeypatch, capsys):
    """perl.verl_glue.rollout_server: on the CPU profile, one node and one replica, the server's
    process starts empty with the options verl's `launch_servers` will ask for (contract test); verl's
    `.options(...).remote(...)` then gets that process, initialised with verl's keywords, or, when it
    asks for other options, its own server after the early one is killed. Ray is replaced by recorders
    here; the end-to-end tests run it for real and check the trainer's log."""
    import ray
    from omegaconf import OmegaConf
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from perl.verl_glue import rollout_server as rs

    node = "cd" * 28

    class Context:
        def get_node_id(self):
            return node

    monkeypatch.setattr(ray, "get_runtime_context", Context)
    for change in ({"trainer": {"device": "cuda"}}, {"trainer": {"nnodes": 2}},
                   {"actor_rollout_ref": {"rollout": {"name": "sglang"}}},
                   {"trainer": {"n_gpus_per_node": 2}}):  # two replicas
        assert rs.early_server_options(OmegaConf.merge(cfg, change)) is None, change
    options = rs.early_server_options(cfg)
    assert options["name"] == "vllm_server_0_0" and options["node_id"] == node
    assert options["max_concurrency"] == max(1000, int(cfg.actor_rollout_ref.rollout.max_num_seqs) + 16)
    assert options["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"]  # the CPU platform's environment

    created, started, killed, made_by_verl = [], [], [], []

    class Early:
        def __init__(self, ray_options):
            self.ray_options, self.start = ray_options, self

        def remote(self, **kwargs):
            started.append(kwargs)
            return "start-ref"

    class EarlyFactory:
        def __init__(self, ray_options):
            self.ray_options = ray_options

        def remote(self, *args, **kwargs):
            assert not args and not kwargs  # empty: verl's keywords come with `start`
            created.append(Early(self.ray_options))
            return created[-1]

    class VerlFactory:
        def options(self, **ray_options):
            self.ray_options = ray_options
            return self

        def remote(self, **kwargs):
            made_by_verl.append((self.ray_options, kwargs))
            return "verl's server"

    from perl.verl_glue.rollout_server_vllm import PerlvLLMHttpServer, start_server_early

    monkeypatch.setattr(PerlvLLMHttpServer, "options", lambda **o: EarlyFactory(o))
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    monkeypatch.setattr(ray, "kill", killed.append)

    def no_such_actor(name):
        raise ValueError(name)

    monkeypatch.setattr(ray, "get_actor", no_such_actor)
    monkeypatch.setattr(rs, "_EARLY", {})
    asked = {"name": "vllm_server_0_0", "runtime_env": options["runtime_env"],
             "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False),
             "max_concurrency": options["max_concurrency"]}  # what verl's launch_servers passes

    assert start_server_early(options) is True and rs.early_server_started() and len(created) == 1
    assert start_server_early(options) is False and len(created) == 1  # once per process
    assert created[0].ray_options["name"] == "vllm_server_0_0"
    assert rs._options_of(created[0].ray_options) == options  # started with what verl will ask for
    server = rs.EarlyServerClass(VerlFactory()).options(**asked).remote(config="c", replica_rank=0)
    assert server is created[0] and started == [{"config": "c", "replica_rank": 0}] and not made_by_verl
    assert not rs.early_server_started() and not killed

    # verl asks with another concurrency: the early process is killed and verl's own server starts
    monkeypatch.setattr(rs, "_EARLY", {})
    start_server_early(options)
    other = {**asked, "max_concurrency": asked["max_concurrency"] + 1}
    server = rs.EarlyServerClass(VerlFactory()).options(**other).remote(config="c")
    assert server == "verl's server" and made_by_verl == [(other, {"config": "c"})] and killed == [created[-1]]
    assert "verl's own server starts instead" in capsys.readouterr().out
    # and a soft placement is not the hard one PeRL started it with
    soft = {**asked, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=True)}
    assert rs._options_of(soft) is None
