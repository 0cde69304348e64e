"""Run under `torchrun --nproc_per_node=2`: the engine checks, then the checkpoint checks, in one
launch (verl's import costs ~10 s per process on a 2-core box)."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import verl_checkpoint  # noqa: E402
import verl_engine  # noqa: E402
from verl_common import done, init, model_dirs  # noqa: E402


def main() -> None:
    rank = init()
    dirs = model_dirs()
    for arch, method in verl_engine.RUNS:
        verl_engine.check(arch, method, dirs[arch])
        if rank == 0:
            print(f"ok engine {arch}/{method}", flush=True)
    verl_engine.check_sgrpo(dirs["tiny-qwen2"])
    if rank == 0:
        print("ok engine sgrpo", flush=True)
    verl_engine.check_old_log_probs_from_update(dirs["tiny-qwen2"])
    verl_engine.check_old_log_probs_from_update(dirs["tiny-qwen2"], remove_padding=True)
    if rank == 0:
        print("ok engine old log-probs from the update (padded and packed)", flush=True)
    verl_engine.check_tied_gradient(dirs["tiny-qwen2"])
    if rank == 0:
        print("ok engine tinylora tied gradient", flush=True)
        print(f"VERL_ENGINE_OK {len(verl_engine.RUNS)}", flush=True)
    start = time.perf_counter()
    for method in verl_engine.METHODS:  # verl's GPU defaults: gradient checkpointing, bf16 mixed precision
        measured = verl_engine.check_gpu_defaults("tiny-qwen2", method, dirs["tiny-qwen2"])
        if rank == 0:
            print(f"ok gpu-defaults tiny-qwen2/{method} " + " ".join(f"{k}={v:.3g}" for k, v in measured.items()),
                  flush=True)
    verl_engine.check_adalora_loss_scaling(dirs["tiny-qwen2"])
    if rank == 0:
        print("ok adalora loss scaling", flush=True)
        print(f"VERL_GPU_DEFAULTS_OK {len(verl_engine.METHODS)} in {time.perf_counter() - start:.1f} s", flush=True)
    root = os.path.join(os.environ["PERL_VERL_TMP"], "ckpt")
    for method in verl_checkpoint.METHODS:
        verl_checkpoint.check(method, dirs["tiny-qwen2"], root)
        if rank == 0:
            print(f"ok checkpoint {method}", flush=True)
    for method in verl_checkpoint.NODE_LOCAL:  # per-rank directories: no shared filesystem
        verl_checkpoint.check(method, dirs["tiny-qwen2"], root, node_local=True)
        if rank == 0:
            print(f"ok node-local checkpoint {method}", flush=True)
    done(f"VERL_CHECKPOINT_OK {len(verl_checkpoint.METHODS)}")


if __name__ == "__main__":
    main()
