"""Shared by the verl engine scripts (run under `torchrun --nproc_per_node=2`, gloo, VERL_PLATFORM=cpu)."""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist

VOCAB = 256


def save_tiny_model(arch: str, path: str) -> str:
    """A seeded tiny HF model directory with a tokenizer (what `actor_rollout_ref.model.path` points at)."""
    from perl.generation.tokenizer import char_tokenizer
    from perl.models import build_model

    if not os.path.exists(os.path.join(path, "config.json")):
        model = build_model(arch, seed=0)
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(path)
        char_tokenizer().save_pretrained(path)
    return path


def model_dirs() -> dict[str, str]:
    """arch -> directory, from PERL_VERL_MODELS=arch=dir,... (created by the pytest launcher)."""
    return dict(item.split("=", 1) for item in os.environ["PERL_VERL_MODELS"].split(","))


def base_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def full_state(engine) -> dict[str, torch.Tensor]:
    """The engine's whole (unsharded) state, through torch's DCP API rather than PeRL code."""
    from verl.utils.fsdp_utils import get_fsdp_full_state_dict

    sd = get_fsdp_full_state_dict(engine.module, offload_to_cpu=False, rank0_only=False)
    return {k: v.detach().clone() for k, v in sd.items()}


def unsharded_policy(engine, path: str):
    """PeRL's unsharded policy (fresh base, same method) holding the engine's current weights."""
    from perl.methods import adapt

    policy = adapt(base_model(path), engine.spec, total_steps=engine.policy.total_steps)
    missing, unexpected = policy.model.load_state_dict(full_state(engine), strict=False)
    assert not missing and not unexpected, (missing[:3], unexpected[:3])
    if engine.policy.name == "adalora":
        policy.model.peft_config["default"].rank_pattern = engine.policy.model.peft_config["default"].rank_pattern
    return policy


def base_log_probs(path: str, rows) -> list[torch.Tensor]:
    """Response-token log-probs of the plain base model (the reference the ref policy must equal)."""
    return model_log_probs(base_model(path), rows)


def model_log_probs(model, rows) -> list[torch.Tensor]:
    """Response-token log-probs of a plain (unsharded) HF model, fp32 forward."""
    out = []
    with torch.no_grad():
        for prompt, response in zip(rows["prompts"], rows["responses"]):
            ids = torch.cat([prompt, response]).unsqueeze(0)
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            p, r = len(prompt), len(response)
            out.append(logp[p - 1 : p - 1 + r].gather(-1, response.unsqueeze(-1)).squeeze(-1))
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def init() -> int:
    """In the torchrun workers: CPU platform for verl, PeRL's engine registered, gloo."""
    os.environ.setdefault("VERL_PLATFORM", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import perl.verl_glue.engine  # noqa: F401  (registers the CPU platform before verl resolves it)

    dist.init_process_group("gloo")
    return dist.get_rank()


def done(marker: str) -> None:
    dist.barrier()
    if dist.get_rank() == 0:
        print(marker, flush=True)
    dist.destroy_process_group()
    exit_now()


def exit_now() -> None:
    """Leave without the interpreter's teardown, once the checks are done and reported: there, torch's
    gloo/FSDP2 objects are destroyed in arbitrary order and now and then abort the process
    ("terminate called without an active exception", seen after a passing run), which torchrun
    would report as a failure of a check that passed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
