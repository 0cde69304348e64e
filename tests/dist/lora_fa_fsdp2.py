"""Run under `torchrun --nproc_per_node=2`: LoRA-FA trained under FSDP2 keeps A frozen and matches
the same training done unsharded (both ranks see the same batch, so averaged gradients equal the
single-process gradient)."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import fresh_base, train_steps  # noqa: E402
from verl_common import exit_now  # noqa: E402
from perl.methods import adapt  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    from torch.distributed.fsdp import fully_shard

    spec = {"name": "lora_fa", "rank": 4, "alpha": 8.0, "dropout": 0.0}
    reference = adapt(fresh_base("tiny-qwen2"), spec)
    train_steps(reference, steps=3)
    want = {n: p.detach() for n, p in reference.model.named_parameters()}

    policy = adapt(fresh_base("tiny-qwen2"), spec)
    initial_a = {n: p.detach().clone() for n, p in policy.model.named_parameters() if ".lora_A." in n}
    for layer in policy.model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(policy.model)
    groups = policy.param_groups(1e-2)
    names = {id(p): n for n, p in policy.model.named_parameters()}
    assert all(".lora_B." in names[id(p)] for g in groups for p in g["params"])
    assert all(type(p).__name__ == "DTensor" for g in groups for p in g["params"])
    train_steps(policy, steps=3)
    for n, p in policy.model.named_parameters():
        full = p.detach().full_tensor()
        if ".lora_A." in n:
            assert torch.equal(full, initial_a[n]), f"{n}: frozen A moved under FSDP2"
        if ".lora_B." in n:
            assert full.abs().max() > 0, f"{n}: B did not train"
        torch.testing.assert_close(full, want[n], atol=1e-6, rtol=1e-5)
    dist.barrier()
    if dist.get_rank() == 0:
        print("LORA_FA_FSDP2_OK")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now()
