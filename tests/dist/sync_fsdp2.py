"""Run under `torchrun --nproc_per_node=2`: the merged export of an FSDP2-sharded policy equals the
unsharded export, for every method, on both ranks."""

import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import fresh_base  # noqa: E402
from verl_common import exit_now  # noqa: E402
from perl.methods import METHODS, adapt  # noqa: E402
from perl.sync import merged_state_dict  # noqa: E402


def main() -> None:
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    from torch.distributed.fsdp import fully_shard

    checked = []
    for arch in ("tiny-qwen2", "tiny-llama"):
        for name in METHODS:
            policy = adapt(fresh_base(arch), {"name": name, "rank": 4, "alpha": 8.0}, total_steps=10)
            gen = torch.Generator().manual_seed(7)
            with torch.no_grad():  # make every trainable tensor non-trivial, identically on both ranks
                for _, p in policy.trainable_parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
            want = merged_state_dict(policy)
            hf = policy.model.get_base_model() if name != "full" else policy.model
            for layer in hf.model.layers:
                fully_shard(layer)
            fully_shard(policy.model)
            assert any(type(p).__name__ == "DTensor" for p in policy.model.parameters())
            got = merged_state_dict(policy)
            assert list(got) == list(want), f"{arch}/{name}: names differ"
            for key in want:
                assert torch.equal(got[key], want[key]), f"{arch}/{name}: {key} differs by {(got[key] - want[key]).abs().max()}"
            # the policy is left sharded, as the trainer needs it
            assert all(type(p).__name__ == "DTensor" for p in policy.model.parameters())
            checked.append(f"{arch}/{name}")
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"SYNC_FSDP2_OK {len(checked)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now()
