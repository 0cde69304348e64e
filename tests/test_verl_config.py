"""The verl entry point's configuration: verl's hydra ppo_trainer + the PeRL peft: block + DAPO.

Every method's composed config passes verl's own `validate_config` (vLLM's LoRA-rank check, which
imports vLLM, is skipped where vLLM is absent and only in adapter-sync mode); the resolved config
holds the paper's DAPO settings; GRPO / Dr. GRPO presets; errors name the field before anything
starts; `--dry-run` prints the config and the adapted model's summary without Ray or vLLM.
"""

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import ready
from perl.methods import METHODS, get_method
from perl.verl_glue import config as vc
from perl.verl_glue.entry import main

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_composes_and_passes_verl_validation(paths, method):
    cfg = vc.compose({"peft": {"name": method}}, ready(paths))
    summary = vc.check(cfg, require_vllm=False)  # verl's validate_config, batch/path checks, method fits model
    assert summary["method"] == method and summary["trainable"] > 0
    model = cfg.actor_rollout_ref.model
    assert model.lora_rank == (0 if method == "full" else 32)  # verl's ref-in-actor switch
    assert model.lora.merge is True and model.lora.perl.spec.name == method
    assert model.external_lib == "perl.verl_glue.engine"
    assert vc.verl_validate(cfg) is False  # merged sync: nothing of verl's validation skipped
    if get_method(method).vllm_lora:
        cfg = vc.compose({"peft": {"name": method, "adapter_sync": "adapter"}}, ready(paths))
        assert cfg.actor_rollout_ref.model.lora.merge is False
        vc.check(cfg, require_vllm=False)
        assert vc.verl_validate(cfg) is (not vc.vllm_available())  # only the vLLM LoRA-rank import


def test_resolved_config_holds_the_paper_dapo_settings(paths):
    r = vc.resolved(vc.compose({"peft": {"name": "dora"}}, ready(paths)))
    actor, rollout, algo = r.actor_rollout_ref.actor, r.actor_rollout_ref.rollout, r.algorithm
    assert (actor.clip_ratio_low, actor.clip_ratio_high) == (0.2, 0.28)
    assert actor.loss_agg_mode == "token-mean"
    assert algo.filter_groups.enable is True and algo.filter_groups.metric == "acc"
    assert algo.filter_groups.max_num_gen_batches == 10  # the cap PeRL's sampler enforces
    sampler = r.trainer.v1.sampler
    assert sampler.custom_sampler.path == "pkg://perl.verl_glue.sampler"
    assert sampler.sampler_kwargs.filter_groups_metric == "acc" and sampler.sampler_kwargs.train_batch_size == 16
    assert actor.use_kl_loss is False and algo.use_kl_in_reward is False  # no KL
    assert algo.adv_estimator == "grpo" and algo.norm_adv_by_std_in_grpo is True
    assert rollout.n == 8 and rollout.name == "vllm"  # G = 8, vLLM rollout
    assert actor.optim.lr == 1e-5 and actor.optim.lr_scheduler_type == "constant"
    assert actor.optim.lr_warmup_steps == 0 and actor.optim.lr_warmup_steps_ratio == 0.0
    assert r.data.max_prompt_length == 512 and r.data.max_response_length == 16384
    assert rollout.prompt_length == 512 and rollout.response_length == 16384
    assert r.data.train_batch_size == 16 and actor.ppo_mini_batch_size == 16 and actor.ppo_micro_batch_size_per_gpu == 4
    assert r.trainer.total_training_steps == 1024
    assert actor.strategy == "fsdp2" and r.actor_rollout_ref.ref.strategy == "fsdp2"
    assert r.peft.rank == 32 and r.peft.alpha == 64 and r.peft.dropout == 0.05 and r.peft.target_modules is None
    assert r.reward.custom_reward_function.path == "pkg://perl.reward.verl_reward"
    assert r.reward.reward_manager.name == "dapo"
    assert r.reward.reward_kwargs.overlong_buffer_cfg.enable is False  # optional shaping, off by default
    assert r.reward.reward_kwargs.max_resp_len == 16384
    assert r.actor_rollout_ref.model.lora.perl.total_steps == 1024  # AdaLoRA's schedule: optimizer steps
    # overlong shaping is one switch away, with the DAPO reward manager's keys
    r = vc.resolved(vc.compose({}, ready(paths, "perl.overlong_buffer.enable=true", "perl.overlong_buffer.len=1024")))
    assert r.reward.reward_kwargs.overlong_buffer_cfg.enable is True
    assert r.reward.reward_kwargs.overlong_buffer_cfg.len == 1024


def test_grpo_and_drgrpo_presets(paths):
    g = vc.resolved(vc.compose({"perl": {"algorithm": "grpo"}}, ready(paths)))
    assert g.actor_rollout_ref.actor.clip_ratio_high == 0.2
    assert g.actor_rollout_ref.actor.loss_agg_mode == "seq-mean-token-mean"
    assert g.algorithm.filter_groups.enable is False
    assert g.trainer.v1.sampler.sampler_kwargs.filter_groups_metric is None  # PeRL's buffer, no filtering
    d = vc.resolved(vc.compose({}, ready(paths, "perl.algorithm=drgrpo")))
    assert d.actor_rollout_ref.actor.loss_agg_mode == "seq-mean-token-sum-norm"
    assert d.actor_rollout_ref.actor.loss_scale_factor == 16384  # constant normaliser
    assert d.algorithm.norm_adv_by_std_in_grpo is False and d.algorithm.filter_groups.enable is False
    for cfg in (g, d):
        assert cfg.actor_rollout_ref.actor.use_kl_loss is False
        vc.verl_validate(cfg)
    # a recipe still wins over its preset
    g2 = vc.compose({"perl": {"algorithm": "grpo"}, "actor_rollout_ref": {"actor": {"clip_ratio_high": 0.25}}})
    assert g2.actor_rollout_ref.actor.clip_ratio_high == 0.25


def test_full_fine_tuning_defaults_and_recipe_lr(paths):
    cfg = vc.compose({"peft": {"name": "full"}}, ready(paths))
    assert cfg.actor_rollout_ref.actor.optim.lr == 1e-6 and cfg.actor_rollout_ref.model.lora_rank == 0
    cfg = vc.compose({"peft": {"name": "full"}}, ready(paths, "actor_rollout_ref.actor.optim.lr=3e-6"))
    assert cfg.actor_rollout_ref.actor.optim.lr == 3e-6


def test_recipe_file_and_token_efficient_loss(paths, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("peft:\n  name: lora_plus\n  options: {lr_ratio: 8}\nperl:\n  loss_mode: sgrpo\n"
                      "  sgrpo: {alpha: 2, k: 4}\n")
    r = vc.resolved(vc.compose(str(recipe), ready(paths)))
    assert r.actor_rollout_ref.model.lora.perl.spec.options == {"lr_ratio": 8}
    assert r.actor_rollout_ref.actor.policy_loss.loss_mode == "sgrpo"
    # the engine draws the token subset itself: the knobs travel in the engine's block, not the environment
    assert r.actor_rollout_ref.model.lora.perl.sgrpo == {"alpha": 2, "k": 4, "p": 0.5, "weighting": "paper"}
    assert "env_vars" not in r.ray_kwargs.ray_init.runtime_env
    assert vc.resolved(vc.compose({}, ready(paths))).actor_rollout_ref.model.lora.perl.sgrpo is None


def test_tspmo_runs_on_perls_sync_trainer_with_verls_dynamic_sampling(paths):
    cfg = vc.compose({}, ready(paths, "perl.loss_mode=tspmo"))
    r = vc.resolved(cfg)
    assert r.trainer.v1.trainer_mode == vc.PERL_TRAINER_MODE == "perl_sync"
    assert r.algorithm.adv_estimator == "tspmo" and r.actor_rollout_ref.actor.policy_loss.loss_mode == "tspmo"
    assert r.actor_rollout_ref.actor.loss_agg_mode == "seq-mean-token-sum"
    assert r.trainer.v1.sampler.custom_sampler.name == vc.SAMPLER_NAME  # DAPO's filter + cap, as for sync
    vc.check(cfg, require_vllm=False)
    # the corrections T-SPMO's step skips are fine where verl applies them in the actor instead
    vc.check(vc.compose({}, ready(paths, "perl.loss_mode=tspmo", "algorithm.rollout_correction.rollout_is=token",
                                  "algorithm.rollout_correction.bypass_mode=true")), require_vllm=False)
    # every sync run is on PeRL's trainer (verl's, plus the run log); async modes stay verl's
    assert vc.compose({}, ready(paths)).trainer.v1.trainer_mode == "perl_sync"
    assert vc.compose({}, ready(paths, "trainer.v1.trainer_mode=colocate_async")).trainer.v1.trainer_mode == \
        "colocate_async"


ERRORS = [
    # (overrides, the text the error must contain)
    (["actor_rollout_ref.actor.clip_ratio_hgh=0.3"], "actor_rollout_ref.actor.clip_ratio_hgh"),
    (["peft.name=lorax"], "valid methods: full, lora"),
    (["perl.algorithm=ppo"], "perl.algorithm: 'ppo' is not one of dapo, grpo, drgrpo"),
    (["peft.name=dora", "peft.adapter_sync=adapter"], "adapter_sync=merged, or a method among lora"),
    (["peft.adapter_sync=lazy"], "peft.adapter_sync: 'lazy' is not one of merged, adapter"),
    (["peft.name=dora", "peft.options.lr_ratio=4"], "belongs to lora_plus, not to dora"),
    (["peft.ranks=8"], "peft: unknown key(s) ['ranks']"),
    (["actor_rollout_ref.actor.strategy=fsdp"], "actor_rollout_ref.actor.strategy"),
    (["actor_rollout_ref.model.lora_rank=8"], "actor_rollout_ref.model.lora_rank is derived by PeRL"),
    (["+ray_kwargs.ray_init.num_gpus=4"], "ray_kwargs.ray_init.num_gpus is derived by PeRL"),
    # the CPU path: what vLLM's CPU build cannot do
    (["trainer.device=cpu", "actor_rollout_ref.rollout.free_cache_engine=true"],
     "actor_rollout_ref.rollout.free_cache_engine=True (in the override) cannot run with trainer.device=cpu"),
    (["trainer.device=cpu", "actor_rollout_ref.model.use_remove_padding=true"],
     "actor_rollout_ref.model.use_remove_padding=True (in the override) cannot run with trainer.device=cpu"),
    (["perl.heldout.kk=3"], "perl.heldout: unknown key(s) ['kk']"),
    (["perl.reward.think=false"], "perl.reward: unknown ['think']"),
    (["peft.rank=0"], "peft.rank must be an integer >= 1"),
    (["peft.name=vera", "+actor_rollout_ref.actor.checkpoint.save_lora_only=true"], "resume would lose it"),
    (["perl.loss_mode=ppo"], "perl.loss_mode: 'ppo' is not one of token, sgrpo, tspmo"),
    # only PeRL's sync trainer hands T-SPMO the response ids
    (["perl.loss_mode=tspmo", "trainer.v1.trainer_mode=colocate_async"],
     "trainer.v1.trainer_mode=colocate_async: T-SPMO (adv_estimator=tspmo) runs on PeRL's sync trainer only"),
]


@pytest.mark.parametrize("overrides,text", ERRORS)
def test_config_errors_name_the_field(paths, overrides, text):
    with pytest.raises(vc.ConfigError) as err:
        vc.compose({}, ready(paths, *overrides))
    assert text in str(err.value)


CHECK_ERRORS = [
    (["actor_rollout_ref.model.path=/nonexistent/model"], "actor_rollout_ref.model.path: /nonexistent/model"),
    (["data.train_files=/nonexistent/train.parquet"], "data.train_files: /nonexistent/train.parquet does not exist"),
    (["peft.name=vera", "peft.target_modules=[c_attn]"], "'c_attn' matches no module of Qwen2ForCausalLM"),
    (["peft.name=ln_tuning", "peft.target_modules=[q_proj]"], "but ln_tuning adapts norm modules"),
    (["data.train_batch_size=24"], "data.train_batch_size (24) must be a multiple of actor_rollout_ref.actor"),
    (["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3"],
     "ppo_micro_batch_size_per_gpu (3) must divide ppo_mini_batch_size x rollout.n / GPUs (16)"),
    (["trainer.n_gpus_per_node=3"], "must divide over the 3 GPUs"),
    (["peft.name=adalora", "trainer.total_training_steps=null"], "set trainer.total_training_steps"),
    (["peft.name=pissa", "peft.adapter_sync=adapter", "actor_rollout_ref.rollout.load_format=auto"],
     "needs a dummy load format"),
    (["peft.adapter_sync=adapter", "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl"], "needs the naive"),
    # what verl's advantage step does and PeRL's T-SPMO step does not
    (["perl.loss_mode=tspmo", "algorithm.use_kl_in_reward=true"], "algorithm.use_kl_in_reward=true: T-SPMO"),
    (["perl.loss_mode=tspmo", "algorithm.rollout_correction.rollout_is=token"],
     "algorithm.rollout_correction.rollout_is=token: the trainer-side rollout correction is not applied"),
    (["perl.loss_mode=sgrpo", "actor_rollout_ref.model.use_fused_kernels=true"],
     "actor_rollout_ref.model.use_fused_kernels=True: S-GRPO's shortened forward"),
]


@pytest.mark.parametrize("overrides,text", CHECK_ERRORS)
def test_checks_fail_before_anything_starts(paths, overrides, text):
    cfg = vc.compose({}, ready(paths, *overrides))
    with pytest.raises(vc.ConfigError) as err:
        vc.check(cfg, require_vllm=False)
    assert text in str(err.value)


def test_missing_vllm_is_an_error_for_a_run_but_not_for_a_dry_run(paths, capsys, monkeypatch):
    """As on a machine where vLLM is not installed (find_spec says so): the run stops before Ray and
    says what to install, on a GPU node and on CPU; a dry run checks the config without it."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert not vc.vllm_available()
    with pytest.raises(vc.ConfigError, match="pip install -e '.\\[gpu\\]' -c constraints/gpu.txt on a GPU node"):
        vc.check_vllm(vc.compose({}, ready(paths)))
    with pytest.raises(vc.ConfigError, match="bash scripts/setup_env.sh` installs its CPU build"):
        vc.check_vllm(vc.compose({}, ready(paths, "trainer.device=cpu")))
    assert main(ready(paths, "trainer.device=cpu")) == 2
    assert "rollout.name=vllm but vLLM is not installed" in capsys.readouterr().err
    assert main(ready(paths, "--dry-run")) == 0


def test_dry_run_prints_config_and_adapter_summary_without_ray(paths, capsys):
    assert main(ready(paths, "peft.name=dora", "--dry-run")) == 0
    out = capsys.readouterr().out
    printed = OmegaConf.create(out.split("# adapted model")[0])
    assert printed.peft.name == "dora" and printed.actor_rollout_ref.actor.clip_ratio_high == 0.28
    assert "method:     dora (Structural)" in out and "trainable:  66,560 of 107,072 parameters" in out
    # perl_dapo.yaml's batch is one optimizer step per trainer step: the update gives the old log-probs
    assert "old logp:   the update's own forward (one optimizer step per trainer step; " in out
    assert main(ready(paths, "peft.name=ia3", "--dry-run", "--format", "json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapter"]["method"] == "ia3" and report["adapter"]["target_modules"] == ["k_proj", "v_proj", "down_proj"]
    # a fresh process: the dry run neither starts Ray nor imports vLLM
    probe = ("import sys; from perl.verl_glue.entry import main; rc = main(sys.argv[1:]); "
             "ray = sys.modules.get('ray'); print('PROBE', rc, 'vllm' in sys.modules, bool(ray and ray.is_initialized()))")
    proc = subprocess.run([sys.executable, "-c", probe, *ready(paths, "--dry-run")], capture_output=True, text=True,
                          timeout=300)
    assert "PROBE 0 False False" in proc.stdout, proc.stderr[-2000:]
    # errors: exit code 2 and the field on stderr
    assert main(ready(paths, "peft.name=vera", "peft.target_modules=[c_attn]", "--dry-run")) == 2
    assert "peft.target_modules: 'c_attn' matches no module" in capsys.readouterr().err


def test_perl_train_routes_verl_recipes_here(paths, tmp_path, capsys):
    from perl.cli import main as perl_main

    recipe = tmp_path / "dapo_dora.yaml"
    recipe.write_text(f"peft:\n  name: dora\nactor_rollout_ref:\n  model:\n    path: {paths['model']}\n"
                      f"data:\n  train_files: {paths['train']}\n  val_files: {paths['val']}\n")
    assert perl_main(["train", "--config", str(recipe), "--dry-run", "peft.rank=8"]) == 0
    out = capsys.readouterr().out
    assert "method:     dora (Structural)" in out and OmegaConf.create(out.split("# adapted model")[0]).peft.rank == 8


def test_adapter_summary_on_the_paper_model_shape(paths):
    cfg = vc.compose({"peft": {"name": "dora"}}, ready(paths))
    summary = vc.adapted_summary(cfg, model_path="deepseek-r1-distill-qwen-1.5b")  # meta device, no weights
    assert summary["total"] > 1_700_000_000 and 0.5 < summary["percent"] < 3.0


TOY_ERRORS = [
    (["perl.toy={}", "actor_rollout_ref.model.path=/x"], "actor_rollout_ref.model.path is set by perl.toy"),
    (["perl.toy.digits=0"], "perl.toy.digits must be an integer >= 1"),
    (["perl.toy.width=3"], "perl.toy: unknown key(s) ['width']"),
    (["perl.toy.template=no question"], "perl.toy.template must contain {question}"),
]


@pytest.mark.parametrize("overrides,text", TOY_ERRORS)
def test_toy_block_errors_name_the_field(overrides, text):
    with pytest.raises(vc.ConfigError) as err:
        vc.compose({}, overrides)
    assert text in str(err.value)


def test_the_toy_sets_its_model_data_and_heldout_set(tmp_path):
    from perl.toy.task import ToyTask

    cfg = vc.resolved(vc.compose(os.path.join(ROOT, "examples", "toy.yaml"),
                                 [f"trainer.default_local_dir={tmp_path / 'run'}"]))
    task = ToyTask.from_block(OmegaConf.to_container(cfg.perl.toy))
    assert cfg.actor_rollout_ref.model.path == task.model_dir()
    assert cfg.data.train_files == str(tmp_path / "run" / "data" / "train.parquet")
    assert cfg.data.val_files == cfg.perl.heldout.data == str(tmp_path / "run" / "data" / "heldout.parquet")
    assert cfg.perl.heldout.k == 4 and cfg.trainer.save_freq > 0
    # perl.heldout=null: no evaluation, and nothing points at the held-out set
    cfg = vc.resolved(vc.compose(os.path.join(ROOT, "examples", "toy.yaml"), ["perl.heldout=null"]))
    assert cfg.perl.heldout is None
    # perl.toy=null on the command line drops the recipe's toy: the run trains the model and data given
    cfg = vc.resolved(vc.compose(os.path.join(ROOT, "examples", "toy.yaml"),
                                 ["perl.toy=null", "perl.heldout=null", "actor_rollout_ref.model.path=/models/x",
                                  "data.train_files=/data/t.parquet", "data.val_files=/data/t.parquet"]))
    assert cfg.perl.toy is None and cfg.actor_rollout_ref.model.path == "/models/x"
    assert cfg.data.train_files == "/data/t.parquet"


def test_cpu_settings_are_derived_for_trainer_device_cpu(paths, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # set in the driver, a local Ray inherits it
    monkeypatch.delenv("TQ_NUM_THREADS", raising=False)
    r = vc.resolved(vc.compose({}, ready(paths, "trainer.device=cpu", "trainer.n_gpus_per_node=2",
                                         "actor_rollout_ref.rollout.dtype=bfloat16")))
    rollout, model, actor = r.actor_rollout_ref.rollout, r.actor_rollout_ref.model, r.actor_rollout_ref.actor
    assert rollout.enable_sleep_mode is False and rollout.free_cache_engine is False and rollout.enforce_eager is True
    assert model.use_remove_padding is False and model.override_config.attn_implementation == "sdpa"
    assert actor.fsdp_config.mixed_precision.param_dtype == "fp32" and actor.use_torch_compile is False
    assert rollout.dtype == "bfloat16"  # a default: the recipe's own value wins
    assert model.lora.perl.sync_dtype == "bfloat16"  # the sync sends what the rollout holds
    assert r.ray_kwargs.ray_init.num_gpus == 2 and r.ray_kwargs.ray_init.num_cpus == 32  # placement tokens
    assert r.trainer.v1.sampler.sampler_kwargs.poll_interval == vc.CPU_POLL_S
    # torch on every core in every Ray process (Ray's default for an actor is one thread)
    from perl.verl_glue.config.cpu import torch_threads

    env = r.ray_kwargs.ray_init.runtime_env.env_vars
    assert env.OMP_NUM_THREADS == str(torch_threads()) and env.TQ_NUM_THREADS == str(min(8, torch_threads()))
    # a GPU run gets none of it
    g = vc.resolved(vc.compose({}, ready(paths)))
    assert g.actor_rollout_ref.rollout.free_cache_engine is True and "num_gpus" not in g.ray_kwargs.ray_init
    assert g.actor_rollout_ref.model.lora.perl.sync_dtype == "bfloat16" == g.actor_rollout_ref.rollout.dtype
    assert g.trainer.v1.sampler.sampler_kwargs.poll_interval == vc.GPU_POLL_S


def test_a_gpu_recipe_on_a_machine_without_an_accelerator_fails_before_ray(paths, capsys):
    """This machine has no accelerator (CI, the 2-core box): verl's platform detection says so."""
    from verl.plugin.platform import get_platform

    assert get_platform().device_name == "cpu"
    cfg = vc.compose({}, ready(paths))  # trainer.device=cuda: the paper's recipes
    with pytest.raises(vc.ConfigError, match="trainer.device=cuda, but this machine has no accelerator.*"
                                             "set trainer.device=cpu"):
        vc.check_device(cfg)
    vc.check_device(vc.compose({}, ready(paths, "trainer.device=cpu")))  # the CPU path is fine here
    assert main(ready(paths)) == 2 and "no accelerator" in capsys.readouterr().err  # before Ray: exit code 2
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_vllm_cpu_head_size_is_checked_before_ray(tmp_path):
    """vLLM's CPU attention serves head sizes 32, 64, 80, ...; the tiny test models have 16."""
    sys.path.insert(0, os.path.join(HERE, "dist"))
    from verl_common import save_tiny_model

    model = save_tiny_model("tiny-qwen2", str(tmp_path / "tiny"))  # hidden 64 / 4 heads = 16
    (tmp_path / "t.parquet").write_bytes(b"")
    cfg = vc.compose({}, [f"actor_rollout_ref.model.path={model}", f"data.train_files={tmp_path / 't.parquet'}",
                          f"data.val_files={tmp_path / 't.parquet'}", "trainer.device=cpu"])
    assert vc.model_head_dim(cfg) == 16
    with pytest.raises(vc.ConfigError, match="attention head size is 16; vLLM's CPU attention serves 32, 64"):
        vc.check_vllm(cfg)


def test_a_recipe_may_set_ray_environment_variables_and_the_toy_keeps_a_core_for_its_rollout(paths, tmp_path):
    """runtime_env is free-form in verl (it goes to ray.init): a recipe file may carry env_vars; the
    toy reserves one core of its rollout engine's threads (cpu_platform.rollout_threads)."""
    toy = vc.compose(os.path.join(ROOT, "examples", "toy.yaml"), [])
    assert toy.ray_kwargs.ray_init.runtime_env.env_vars.VLLM_CPU_NUM_OF_RESERVED_CPU == "1"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trainer: {device: cpu}\nray_kwargs: {ray_init: {runtime_env: {env_vars: {MY_FLAG: 'on'}}}}\n")
    env = vc.compose(str(recipe), ready(paths)).ray_kwargs.ray_init.runtime_env.env_vars
    assert env.MY_FLAG == "on" and env.VERL_PLATFORM == "cpu"
    recipe.write_text("ray_kwargs: {ray_init: {runtime_envs: {}}}\n")
    with pytest.raises(vc.ConfigError, match="unknown key 'ray_kwargs.ray_init.runtime_envs'"):
        vc.compose(str(recipe), ready(paths))


def test_ray_env_vars_given_as_numbers_become_strings_and_others_are_refused(paths):
    cfg = vc.compose({}, ready(paths, "trainer.device=cpu", "trainer.n_gpus_per_node=1",
                               "+ray_kwargs.ray_init.runtime_env.env_vars.VLLM_ENABLE_V1_MULTIPROCESSING=1",
                               "+ray_kwargs.ray_init.runtime_env.env_vars.MY_FLAG=true"))
    env = cfg.ray_kwargs.ray_init.runtime_env.env_vars
    assert env.VLLM_ENABLE_V1_MULTIPROCESSING == "1" and env.MY_FLAG == "true" and env.VERL_PLATFORM == "cpu"
    cfg = vc.compose({}, ready(paths, "trainer.device=cpu", "+ray_kwargs.ray_init.runtime_env.env_vars.OMP_NUM_THREADS=1"))
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.OMP_NUM_THREADS == "1"  # the user's value wins
    with pytest.raises(vc.ConfigError, match="env_vars.BAD: an environment variable is a string"):
        vc.compose({}, ready(paths, "+ray_kwargs.ray_init.runtime_env.env_vars.BAD=[1,2]"))
    # null: no such variable (Ray refuses a None value with a TypeError after the config check)
    cfg = vc.compose({}, ready(paths, "trainer.device=cpu", "trainer.n_gpus_per_node=1",
                               "+ray_kwargs.ray_init.runtime_env.env_vars.MY_FLAG=null"))
    env = cfg.ray_kwargs.ray_init.runtime_env.env_vars
    assert "MY_FLAG" not in env and env.VERL_PLATFORM == "cpu"
