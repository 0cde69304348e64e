"""A GPU run against its node, before Ray (perl/verl_glue/config/gpu.py, gpu_checks.py), the platform
that cannot pick CPU on a GPU node (perl/verl_glue/cpu_platform.py), and `perl check`.

Each refusal names the field and the fix, and happens in the config check, so `--dry-run` (exit 2)
shows it too. This machine has no GPU and no flash-attn: the GPU side is exercised by patching
exactly what verl and torch report (the CUDA probe, torch.cuda, flash-attn's import).
"""

from __future__ import annotations

import argparse
import os

import pytest

from conftest import ready
from perl.models import build_config
from perl.verl_glue import config as vc
from perl.verl_glue.config import gpu, gpu_checks
from perl.verl_glue.entry import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R1_15B = os.path.join(ROOT, "tests", "fixtures", "models", "DeepSeek-R1-Distill-Qwen-1.5B")


def refused(paths, capsys, *overrides) -> str:
    """The dry run refuses before Ray (exit 2); returns its error line."""
    import sys

    capsys.readouterr()
    assert main(["--dry-run", *ready(paths, *overrides)]) == 2
    err = capsys.readouterr().err
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()
    return err


# ------------------------------------------------------------------------------------------------
# parallel sizes, token budgets, the sync backend
# ------------------------------------------------------------------------------------------------


def test_rollout_tp_2_on_one_gpu_is_refused_naming_the_field(paths, capsys):
    err = refused(paths, capsys, "trainer.n_gpus_per_node=1")  # verl's default rollout TP is 2
    assert "actor_rollout_ref.rollout.tensor_model_parallel_size=2" in err
    assert "trainer.n_gpus_per_node x trainer.nnodes = 1 x 1 = 1 GPU(s)" in err and "one of [1]" in err
    vc.check(vc.compose({}, ready(paths, "trainer.n_gpus_per_node=1",
                                  "actor_rollout_ref.rollout.tensor_model_parallel_size=1")), require_vllm=False)


@pytest.mark.parametrize("overrides,text", [
    # 3 GPUs per replica on 8 GPUs
    (["actor_rollout_ref.rollout.data_parallel_size=3", "actor_rollout_ref.rollout.tensor_model_parallel_size=1"],
     "= 3 GPUs per vLLM replica does not divide"),
    # a replica of 6 GPUs over nodes of 4 (12 GPUs in all; batches that divide over 12)
    (["trainer.n_gpus_per_node=4", "trainer.nnodes=3", "actor_rollout_ref.rollout.tensor_model_parallel_size=2",
      "actor_rollout_ref.rollout.data_parallel_size=3", "data.train_batch_size=24",
      "actor_rollout_ref.actor.ppo_mini_batch_size=24"], "a vLLM replica of 6 GPUs spans nodes of 4 GPUs unevenly"),
    # the tiny model has 4 heads, 2 key/value heads
    (["actor_rollout_ref.rollout.tensor_model_parallel_size=8"], "does not divide them"),
    (["actor_rollout_ref.actor.ulysses_sequence_parallel_size=3", "actor_rollout_ref.model.use_remove_padding=true"],
     "actor_rollout_ref.actor.ulysses_sequence_parallel_size=3 does not divide"),
    (["actor_rollout_ref.ref.ulysses_sequence_parallel_size=8", "actor_rollout_ref.model.use_remove_padding=true"],
     "actor_rollout_ref.ref.ulysses_sequence_parallel_size=8: Ulysses splits the 4 attention heads"),
])
def test_parallel_layouts_verl_would_assert_on(paths, capsys, overrides, text):
    assert text in refused(paths, capsys, *overrides)


def test_a_token_budget_below_one_sequence_is_refused(paths, capsys):
    # the paper's lengths: 512 + 16384 = 16896 > verl's default budget 16384
    err = refused(paths, capsys, "actor_rollout_ref.actor.use_dynamic_bsz=true")
    assert "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384" in err and "= 16896" in err
    assert "ppo_max_token_len_per_gpu >= 16896" in err
    # the log-prob budget follows the actor's unless set: set alone, it is named
    err = refused(paths, capsys, "actor_rollout_ref.actor.use_dynamic_bsz=true",
                  "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16896",
                  "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=8192")
    assert "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=8192" in err
    # Ulysses splits a sequence: half the budget per GPU holds it with sp=2
    vc.check(vc.compose({}, ready(paths, "actor_rollout_ref.actor.use_dynamic_bsz=true",
                                  "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=8448",
                                  "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",
                                  "actor_rollout_ref.model.use_remove_padding=true")), require_vllm=False)
    # without dynamic batching the budget is not read
    vc.check(vc.compose({}, ready(paths, "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=100")), require_vllm=False)


@pytest.mark.parametrize("backend,text", [
    ("delta_sharded", "shards of the unmerged parameters (the engine's get_per_tensor_param_shard)"),
    ("nccl", "disaggregated-rollout backend"),
    ("naïve", "not a backend verl 0.9.1 registers (naive, nccl, nixl"),
])
def test_checkpoint_engine_backends_other_than_naive_are_refused(paths, capsys, backend, text):
    err = refused(paths, capsys, f"actor_rollout_ref.rollout.checkpoint_engine.backend={backend}")
    assert f"actor_rollout_ref.rollout.checkpoint_engine.backend={backend}: " in err and text in err
    assert "PeRL supports naive" in err


# ------------------------------------------------------------------------------------------------
# flash-attn: optional, with sdpa chosen by the config
# ------------------------------------------------------------------------------------------------


def test_without_flash_attn_the_config_picks_sdpa_and_says_so(paths, capsys, monkeypatch):
    assert not gpu.flash_attn_available()  # this machine
    cfg = vc.compose({}, ready(paths))
    assert cfg.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"
    assert cfg.actor_rollout_ref.model.use_remove_padding is False
    notes = vc.check(cfg, require_vllm=False)["gpu_notes"]
    assert any("flash-attn does not import here: attention runs through sdpa" in n for n in notes)
    gpu.check_flash_attn(cfg)  # nothing needs it
    capsys.readouterr()
    assert main(ready(paths, "--dry-run")) == 0
    assert "gpu note:   flash-attn does not import here" in capsys.readouterr().out

    # asked for by the recipe or the command line: kept, and refused on the node
    cfg = vc.compose({}, ready(paths, "actor_rollout_ref.model.use_remove_padding=true"))
    assert cfg.actor_rollout_ref.model.use_remove_padding is True
    assert cfg.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"  # not asked: chosen
    notes = vc.check(cfg, require_vllm=False)["gpu_notes"]  # a dry run elsewhere: a note, not an error
    assert any("use_remove_padding=true: the GPU node needs flash-attn" in n for n in notes)
    with pytest.raises(vc.ConfigError, match="actor_rollout_ref.model.use_remove_padding=true need flash-attn"):
        gpu.check_flash_attn(cfg)
    cfg = vc.compose({}, ready(paths, "+actor_rollout_ref.model.override_config.attn_implementation=flash_attention_2"))
    with pytest.raises(vc.ConfigError, match="attn_implementation=flash_attention_2 need flash-attn"):
        gpu.check_flash_attn(cfg)

    # where flash-attn imports, verl's defaults stand (flash_attention_2, remove-padding) and nothing is said
    monkeypatch.setattr(gpu, "flash_attn_available", lambda: True)
    cfg = vc.compose({}, ready(paths))
    assert cfg.actor_rollout_ref.model.use_remove_padding is True
    assert "attn_implementation" not in cfg.actor_rollout_ref.model.override_config
    assert not any("flash-attn" in n for n in vc.check(cfg, require_vllm=False)["gpu_notes"])
    # the CPU path never asks for it
    assert vc.compose({}, ready(paths, "trainer.device=cpu")).actor_rollout_ref.model.use_remove_padding is False


# ------------------------------------------------------------------------------------------------
# the memory estimate
# ------------------------------------------------------------------------------------------------


def test_memory_estimate_at_the_papers_lengths_is_the_documented_formula(paths):
    """1.5B, 4 sequences x (512 + 16384) tokens per GPU micro-batch, bf16, gradient checkpointing on,
    sdpa (no flash-attn here): logits 3 x T x vocab x 2 bytes; activations: every layer's input plus
    one layer of 8h + 4kv + 4I elements a token; fp32 parameter shards over 8 GPUs."""
    cfg = vc.compose({}, ready(paths, f"actor_rollout_ref.model.path={R1_15B}"))
    hf = build_config(R1_15B)
    total, trainable = 1_777_088_000, 36_929_536  # LoRA r32 on the 1.5B (the dry run's count)
    est = gpu_checks.estimate_memory(cfg, hf, total, trainable)
    t, v, h, layers, kv, inter = 4 * 16896, 151936, 1536, 28, 256, 8960
    assert (est.phase, est.tokens) == ("update", t)
    assert est.logits == pytest.approx(3 * t * v * 2 / 1e9)  # 61.6 GB
    assert est.activations == pytest.approx(t * (layers * h + 8 * h + 4 * kv + 4 * inter) * 2 / 1e9)
    assert est.states == pytest.approx((4 * total + 12 * trainable) / 8 / 1e9)
    assert 74 < est.total < 76
    # the knobs move it: one sequence per micro-batch is a quarter of the tokens
    small = gpu_checks.estimate_memory(
        vc.compose({}, ready(paths, f"actor_rollout_ref.model.path={R1_15B}",
                             "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
                             "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1")), hf, total, trainable)
    assert small.tokens == t // 4 and small.total < est.total / 3
    # with remove-padding flash-attn's cross-entropy keeps two copies in the update; with verl's
    # separate old-log-prob pass (logits, the entropy's softmax and product) that pass is the peak ...
    rmpad = ready(paths, f"actor_rollout_ref.model.path={R1_15B}", "actor_rollout_ref.model.use_remove_padding=true")
    recompute = gpu_checks.estimate_memory(vc.compose({}, rmpad + ["perl.old_log_probs=recompute"]), hf, total, trainable)
    assert recompute.phase == "log-probs" and recompute.logits == pytest.approx(3 * t * v * 2 / 1e9)
    # ... which does not run where the update gives the old log-probs (the default at one optimizer step
    # per trainer step: perl.verl_glue.on_policy; its entropy in row chunks, without a gradient)
    auto = gpu_checks.estimate_memory(vc.compose({}, rmpad), hf, total, trainable)
    assert auto.phase == "update" and auto.logits == pytest.approx(2 * t * v * 2 / 1e9) and auto.total < recompute.total
    # a reference policy (KL loss) still needs its log-prob pass
    kl = gpu_checks.estimate_memory(vc.compose({}, rmpad + ["actor_rollout_ref.actor.use_kl_loss=true"]), hf, total,
                                    trainable)
    assert kl.phase == "log-probs"


def test_memory_estimate_warns_naming_the_knobs(paths):
    model = f"actor_rollout_ref.model.path={R1_15B}"
    summary = {"total": 1_777_088_000, "trainable": 36_929_536}  # LoRA r32 on the 1.5B (the dry run's count)

    def memory_note(*overrides: str) -> str:
        notes = vc.gpu_run_checks(vc.compose({}, ready(paths, model, *overrides)), build_config(R1_15B), summary,
                                  on_node=False)
        return next(n for n in notes if "memory estimate" in n)

    line = memory_note("perl.gpu_memory_gb=40")
    assert line.startswith("warning: memory estimate: 75.0 GB per GPU") and "of 40.0 GB (perl.gpu_memory_gb)" in line
    assert "over the GPU's memory" in line and "ppo_micro_batch_size_per_gpu" in line
    assert "entropy_from_logits_with_chunking" in line and "use_dynamic_bsz" in line
    assert memory_note("perl.gpu_memory_gb=141").startswith("memory estimate: 75.0 GB per GPU")
    assert "within 10% of the GPU's memory" in memory_note()  # the assumed 80 GB
    # vLLM awake during training keeps its share of the GPU
    line = memory_note("perl.gpu_memory_gb=141", "actor_rollout_ref.rollout.free_cache_engine=false")
    assert "the 70.5 GB vLLM leaves of 141.0 GB" in line
    with pytest.raises(vc.ConfigError, match="perl.gpu_memory_gb must be > 0"):
        memory_note("perl.gpu_memory_gb=0")
    # the dry run shows it
    notes = vc.check(vc.compose({}, ready(paths, model, "perl.gpu_memory_gb=40")), require_vllm=False)["gpu_notes"]
    assert any(n.startswith("warning: memory estimate: 75.0 GB") for n in notes)


def test_gpu_memory_comes_from_torch_when_a_gpu_is_visible(paths, monkeypatch):
    cfg = vc.compose({}, ready(paths))
    assert gpu.gpu_memory_gb(cfg) == (80.0, "assumed: no GPU visible here; set perl.gpu_memory_gb for another size")
    monkeypatch.setattr(gpu, "visible_gpus", lambda: [(0, "NVIDIA H100 80GB HBM3", 85.0), (1, "NVIDIA A100-SXM4-40GB", 42.4)])
    assert gpu.gpu_memory_gb(cfg) == (42.4, "GPU 1, NVIDIA A100-SXM4-40GB")  # the smallest one bounds the run


# ------------------------------------------------------------------------------------------------
# the platform: never CPU on a GPU node
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def cuda_node(monkeypatch):
    """A GPU node whose container lacks nvidia-smi (the NVIDIA "utility" capability not mounted):
    torch is a CUDA build and sees a GPU, verl's CUDA probe finds no nvidia-smi on its fixed paths."""
    import shutil

    import torch

    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    real_isfile = os.path.isfile
    monkeypatch.setattr(os.path, "isfile", lambda p: False if str(p).endswith("nvidia-smi") else real_isfile(p))


def test_the_cpu_platform_is_not_picked_on_a_gpu_node_without_nvidia_smi(cuda_node):
    from verl.plugin.platform.platform_cuda import PlatformCUDA
    from verl.plugin.platform.platform_manager import _create_platform, _detect_platform_name

    from perl.verl_glue import cpu_platform

    assert PlatformCUDA().is_platform_available(use_smi_check=True) is False  # verl's probe misses it
    assert cpu_platform.PlatformCPU().is_platform_available(use_smi_check=True) is False
    name = _detect_platform_name()
    assert name == "nvidia" and _create_platform(name).device_name == "cuda"


def test_the_cpu_platform_is_picked_for_a_cpu_torch_or_when_asked(monkeypatch, cuda_node):
    import torch
    from verl.plugin.platform.platform_manager import _detect_platform_name

    monkeypatch.setenv("VERL_PLATFORM", "cpu")  # asked: whatever torch is
    assert _detect_platform_name() == "cpu"
    monkeypatch.delenv("VERL_PLATFORM")
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build of torch: no other platform claims it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _detect_platform_name() == "cpu"


def test_the_cpu_rollout_server_runs_vllms_sampler_without_torch_compile(monkeypatch):
    """verl hands the platform's rollout_env_vars to the server actor (contract test): on CPU the
    server gets TORCHDYNAMO_DISABLE=1 (vLLM's sampler would build its compiled helpers with a C++
    compiler at the first request) unless the environment sets it."""
    from perl.verl_glue.cpu_platform import PlatformCPU

    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    assert PlatformCPU().rollout_env_vars()["TORCHDYNAMO_DISABLE"] == "1"
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")
    assert PlatformCPU().rollout_env_vars()["TORCHDYNAMO_DISABLE"] == "0"


def test_the_cpu_rollout_engine_takes_every_core_unless_vllms_reserve_keeps_some(monkeypatch):
    """The server's OMP_NUM_THREADS (the engine core inherits it): the physical cores less vLLM's own
    VLLM_CPU_NUM_OF_RESERVED_CPU (0 unless set; the toy sets 1), never below one thread."""
    from perl.verl_glue import cpu_platform
    from perl.verl_glue.config import cpu

    monkeypatch.setattr(cpu, "torch_threads", lambda: 4)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    assert cpu_platform.PlatformCPU().rollout_env_vars()["OMP_NUM_THREADS"] == "4"
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    assert cpu_platform.PlatformCPU().rollout_env_vars()["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "9")
    assert cpu_platform.rollout_threads() == 1


def test_trainer_device_cpu_asks_for_the_cpu_platform_in_every_process(paths, monkeypatch):
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    gpu_cfg = vc.compose({}, ready(paths))
    vc.request_cpu_platform(gpu_cfg)
    assert "VERL_PLATFORM" not in os.environ
    assert "env_vars" not in (gpu_cfg.ray_kwargs.ray_init.runtime_env or {})
    cfg = vc.compose({}, ready(paths, "trainer.device=cpu"))
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM == "cpu"  # the Ray workers
    vc.request_cpu_platform(cfg)
    assert os.environ["VERL_PLATFORM"] == "cpu"  # the driver (and a local Ray it starts)
    monkeypatch.setenv("VERL_PLATFORM", "nvidia")
    vc.request_cpu_platform(cfg)
    assert os.environ["VERL_PLATFORM"] == "nvidia"  # an explicit choice stands; check_device names it


def test_check_device_on_a_cuda_platform(paths, monkeypatch):
    import torch
    import verl.plugin.platform as platform
    from verl.plugin.platform.platform_cuda import PlatformCUDA

    monkeypatch.setattr(platform, "get_platform", lambda: PlatformCUDA())
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = vc.compose({}, ready(paths))
    with pytest.raises(vc.ConfigError, match=r"verl's platform is CUDA .* torch sees no CUDA device"):
        vc.check_device(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    vc.check_device(cfg)
    with pytest.raises(vc.ConfigError, match="trainer.device=cpu, but verl's platform here is cuda"):
        vc.check_device(vc.compose({}, ready(paths, "trainer.device=cpu")))


def test_vllm_cpu_build_is_refused_for_a_gpu_run(paths):
    from importlib.metadata import version

    assert "cpu" in version("vllm")  # this machine: vllm-cpu behind the `vllm` alias
    with pytest.raises(vc.ConfigError, match=r"trainer.device=cuda but the installed vLLM \(.*cpu\) is its CPU build"):
        vc.check_vllm(vc.compose({}, ready(paths)))


# ------------------------------------------------------------------------------------------------
# perl check
# ------------------------------------------------------------------------------------------------


def node_check(*argv: str) -> tuple[str, int]:
    from perl.verl_glue import node_check as nc

    p = nc.add_arguments(argparse.ArgumentParser())
    return nc.check_node(p.parse_args(list(argv)))


def test_perl_check_on_this_machine_fails_a_gpu_recipe_and_says_why():
    text, failures = node_check("--config", os.path.join(ROOT, "recipes", "yaml", "dapo_dora_1.5b.yaml"),
                                "--no-path-checks", f"actor_rollout_ref.model.path={R1_15B}")
    assert failures >= 4, text
    assert "installed versions against constraints/gpu.txt" in text
    assert "FAIL  torch 2.13.0+cpu, pinned 2.11.0" in text and "FAIL  vllm 0.27.1+cpu, pinned 0.24.0" in text
    assert "note  flash-attn not installed (pinned 2.8.3); optional" in text
    assert "FAIL  none (torch 2.13.0+cpu, a CPU build" in text and "but trainer.device=cuda" in text
    assert "ok    dora: 37,574,656 of 1,777,088,000 parameters trained" in text  # the machine-free checks pass
    assert "FAIL  trainer.device=cuda, but this machine has no accelerator" in text
    assert "memory estimate: 75.0 GB per GPU at the update peak" in text and "of 80.0 GB (assumed" in text
    assert text.rstrip().endswith(f"result: FAIL, {failures} problem(s)")


def test_perl_check_passes_a_cpu_run_here(paths, tmp_path):
    """trainer.device=cpu on this machine: constraints/cpu.txt is what setup_env.sh installed."""
    from transformers import Qwen2Config

    from perl.generation.tokenizer import char_tokenizer

    model = tmp_path / "qwen2-head32"  # vLLM's CPU attention serves head size 32
    Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=256, architectures=["Qwen2ForCausalLM"]).save_pretrained(model)
    char_tokenizer().save_pretrained(model)
    text, failures = node_check(*ready(paths, "trainer.device=cpu", f"actor_rollout_ref.model.path={model}"))
    assert failures == 0, text
    for line in ("installed versions against constraints/cpu.txt", "ok    torch 2.13.0", "ok    vllm-cpu 0.27.1",
                 "ok    none, and trainer.device=cpu", "ok    platform on this node", "ok    vLLM on this node",
                 "result: ok"):
        assert line in text, line
    # a check failing makes it fail
    text, failures = node_check(*ready(paths, "trainer.device=cpu", f"actor_rollout_ref.model.path={model}",
                                       "actor_rollout_ref.rollout.checkpoint_engine.backend=delta_sharded"))
    assert failures == 1 and "FAIL  actor_rollout_ref.rollout.checkpoint_engine.backend=delta_sharded" in text


def test_perl_check_command_exit_status(paths, tmp_path, capsys):
    from perl.cli import main as perl_main

    assert perl_main(["check", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "FAIL  config: --config:" in capsys.readouterr().out
    assert perl_main(["check", *ready(paths, "trainer.n_gpus_per_node=1")]) == 1
    out = capsys.readouterr().out
    assert "FAIL  actor_rollout_ref.rollout.tensor_model_parallel_size=2" in out and "perl check:" in out


def test_read_pins():
    from perl.verl_glue.node_check import read_pins

    pins = read_pins(os.path.join(ROOT, "constraints", "gpu.txt"))
    assert pins["torch"] == "2.11.0" and pins["vllm"] == "0.24.0" and pins["transformers"] == "5.9.0"
    assert pins["ray"] == "2.55.1" and pins["tensordict"] == "0.10.0" and pins["flash-attn"] == "2.8.3"


# ------------------------------------------------------------------------------------------------
# several nodes: the run directory the driver reads after training
# ------------------------------------------------------------------------------------------------


def test_several_nodes_with_a_heldout_evaluation_note_that_the_run_dir_must_be_shared(paths, capsys):
    two = ready(paths, "trainer.nnodes=2", f"perl.heldout.data={paths['val']}", "trainer.save_freq=1")
    notes = vc.check(vc.compose({}, two), require_vllm=False)["gpu_notes"]
    shared = [n for n in notes if n.startswith("trainer.nnodes=2 with a held-out evaluation")]
    assert len(shared) == 1 and "must be on a filesystem every node shares" in shared[0]
    assert "perl.heldout.data=null" in shared[0]
    capsys.readouterr()
    assert main(["--dry-run", *two]) == 0  # a note, not an error
    assert "gpu note:   trainer.nnodes=2 with a held-out evaluation" in capsys.readouterr().out
    # one node, or no held-out evaluation: nothing to say
    one = ready(paths, f"perl.heldout.data={paths['val']}", "trainer.save_freq=1")
    assert gpu_checks.shared_run_dir_note(vc.compose({}, one)) is None
    assert gpu_checks.shared_run_dir_note(vc.compose({}, ready(paths, "trainer.nnodes=2"))) is None
