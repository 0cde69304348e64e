"""PeRL's verl engine on CPU: 2 gloo processes, FSDP2, verl's own engine code (VERL_PLATFORM=cpu).

verl cannot train on CPU (its rollout needs vLLM/SGLang), but everything the engine owns runs here:
model and optimizer building for all 14 methods, one DAPO update through verl's forward/backward
and optimizer step, the rollout weight sync, the reference policy, and checkpoint save/resume; and
a second pass of the methods under verl's GPU defaults (gradient checkpointing, bf16 mixed precision).
"""

import os
import socket
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dist]

HERE = os.path.dirname(__file__)
ARCHS = ("tiny-qwen2", "tiny-llama")


def _free_port() -> int:  # same helper as tests/test_distributed.py
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    sys.path.insert(0, os.path.join(HERE, "dist"))
    from verl_common import save_tiny_model

    root = tmp_path_factory.mktemp("verl-models")
    return ",".join(f"{arch}={save_tiny_model(arch, str(root / arch))}" for arch in ARCHS)


@pytest.fixture(scope="module")
def dist_run(model_dirs, tmp_path_factory):
    """One torchrun launch (2 gloo processes) running tests/dist/verl_all.py; the tests read its report."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           os.path.join(HERE, "dist", "verl_all.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", VERL_PLATFORM="cpu", TOKENIZERS_PARALLELISM="false",
               PERL_VERL_MODELS=model_dirs, PERL_VERL_TMP=str(tmp_path_factory.mktemp("verl-run")))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def _report(dist_run, marker: str) -> str:
    rc, out, err = dist_run
    if marker not in out:
        pytest.fail(f"verl_all.py: {marker!r} missing (rc={rc}):\n{out[-4000:]}\n{err[-8000:]}")
    return out


def test_engine_builds_steps_syncs_and_refs_every_method_under_fsdp2(dist_run):
    """tests/dist/verl_engine.py: all 14 methods (+ tied-embedding Llama) on 2 ranks, and S-GRPO's
    shortened forward against the full forward with the same token subset."""
    out = _report(dist_run, "VERL_ENGINE_OK 15")
    assert out.count("ok engine tiny-") == 15 and "ok engine sgrpo" in out


def test_old_log_probs_from_the_updates_own_forward_train_like_verls_separate_pass(dist_run):
    """tests/dist/verl_engine.py `check_old_log_probs_from_update` (perl.verl_glue.on_policy): with one
    optimizer step per trainer step, the update flagged by PeRL's trainer, with no old log-probs in its
    batch, gives the weights of verl's way (a separate log-prob pass first) within 1e-6, a ratio of
    exactly 1, and the pass's metrics (entropy, rollout-vs-actor) equal to verl's own over both ranks;
    on verl's padded path (the CPU profile's) and its packed one (remove-padding, the GPU recipes'),
    whose entropy PeRL computes without a gradient."""
    out = _report(dist_run, "VERL_ENGINE_OK 15")
    assert "ok engine old log-probs from the update (padded and packed)" in out


def test_tinylora_tied_vector_is_summed_over_units_and_ranks_and_stepped_once(dist_run):
    """tests/dist/verl_engine.py `check_tied_gradient`: TinyLoRA's one vector, used in every decoder
    layer's FSDP2 unit, under PerlFSDPEngine on 2 ranks with different batches: its gradient equals
    the single-process reference (summed over every module, averaged over the ranks' batches), and
    verl's optimizer step moves it once."""
    out = _report(dist_run, "VERL_ENGINE_OK 15")
    assert "ok engine tinylora tied gradient" in out


def test_every_method_under_verl_gpu_defaults_gradient_checkpointing_and_bf16(dist_run):
    """tests/dist/verl_engine.py `check_gpu_defaults`: every method with gradient checkpointing on and
    FSDP2 bf16 parameters / fp32 reduce (verl's GPU defaults): a DAPO step changes trainable parameters
    only; the merged sync equals PeRL's unsharded merged export within 2 bf16 spacings, a model holding
    it gives the adapted policy's log-probs within 1e-2, the engine's bf16 forward within 6e-2; the
    delta_sharded shard export is refused naming its config key."""
    from perl.methods import METHODS

    out = _report(dist_run, "VERL_GPU_DEFAULTS_OK")
    assert f"VERL_GPU_DEFAULTS_OK {len(METHODS)} " in out
    assert all(f"ok gpu-defaults tiny-qwen2/{m} " in out for m in METHODS)


def test_adalora_regulariser_is_loss_scaled_like_verls_fp16_loss(dist_run):
    """tests/dist/verl_engine.py `check_adalora_loss_scaling`: with a grad scaler (verl's fp16 path)
    one AdaLoRA step equals the unscaled step bit for bit, regulariser included."""
    out = _report(dist_run, "VERL_GPU_DEFAULTS_OK")
    assert "ok adalora loss scaling" in out


def test_checkpoint_save_resume_is_exact_and_exports_peft_adapters(dist_run):
    """tests/dist/verl_checkpoint.py: exact resume and peft-format adapter export."""
    out = _report(dist_run, "VERL_CHECKPOINT_OK 7")
    assert dist_run[0] == 0 and out.count("ok checkpoint ") == 7
    assert "ok node-local checkpoint adalora" in out  # perl_state.pt read by rank 0 and broadcast
