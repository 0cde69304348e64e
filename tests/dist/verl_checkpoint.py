"""Run under `torchrun --nproc_per_node=2` (gloo, CPU): checkpoint save -> resume of PeRL's verl engine.

Engine A takes a DAPO step, saves a verl checkpoint (`save_checkpoint`, what the trainer calls) and
takes another step. Engine B is built fresh, loads the checkpoint and must hold exactly A's state at
save time (every parameter, the optimizer state on each rank, the lr schedule, PeRL's step counter),
then take exactly A's second step (bit-identical weights: RNG, AdaLoRA's allocator state and rank
pattern included; dropout is on). The peft-format adapter in the checkpoint (`perl_adapter/`,
written by the method's own `save`) loads with `load_adapted` onto the original base and reproduces
A's merged weights at save time.
"""

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: support.*
from verl_common import VOCAB, base_model, done, full_state, init  # noqa: E402

import torch  # noqa: E402

from perl.methods import load_adapted  # noqa: E402
from perl.sync import merged_state_dict  # noqa: E402
from perl.verl_glue.engine import ADAPTER_DIR, STATE_FILE  # noqa: E402
from support.engine_harness import build_actor_engine, cfg_for, synthetic_batch, train_step  # noqa: E402

METHODS = ("lora", "adalora", "pissa", "vera", "ln_tuning", "full", "tinylora")  # tinylora: a vector at the root unit
NODE_LOCAL = ("adalora",)  # also resumed from per-rank directories (its allocator state is in perl_state.pt)
EXTRA = {"adalora": ["peft.options.tinit=0", "peft.options.tfinal=2"]}


def local_optimizer_state(engine) -> dict:
    out = {}
    for pid, state in engine.optimizer.state_dict()["state"].items():
        for key, value in state.items():
            value = value.to_local() if hasattr(value, "to_local") else value
            out[(pid, key)] = value.detach().clone() if torch.is_tensor(value) else value
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def check(method: str, path: str, root: str, node_local: bool = False) -> None:
    """`node_local`: every rank saves to and resumes from its own directory, as nodes without a
    shared filesystem do (only rank 0's holds what rank 0 writes: perl_state.pt, perl_adapter/)."""
    cfg = cfg_for(path, method, EXTRA.get(method))
    rank = torch.distributed.get_rank()
    ckpt = os.path.join(root, f"node{rank}" if node_local else "shared", method, "global_step_1")
    eng, loss_fn = build_actor_engine(cfg)
    train_step(eng, loss_fn, cfg, synthetic_batch(4, vocab=VOCAB, seed=3))
    eng.save_checkpoint(ckpt, global_step=1)
    saved = full_state(eng)
    saved_opt = local_optimizer_state(eng)
    saved_sched = eng.lr_scheduler.state_dict()
    saved_steps = eng.policy.optimizer_steps
    saved_pattern = copy.deepcopy(getattr(eng.policy.model, "peft_config", {}).get("default"))
    saved_pattern = getattr(saved_pattern, "rank_pattern", None)
    merged_at_save = merged_state_dict(eng.policy)
    batch2 = synthetic_batch(4, vocab=VOCAB, seed=5)
    train_step(eng, loss_fn, cfg, batch2)
    after_a = full_state(eng)

    resumed, loss_fn_b = build_actor_engine(cfg)
    assert not same(saved, full_state(resumed)), (method, "fresh engine already equals the checkpoint")
    resumed.load_checkpoint(ckpt)
    assert same(saved, full_state(resumed)), (method, "parameters")
    assert same(saved_opt, local_optimizer_state(resumed)), (method, "optimizer state")
    assert resumed.lr_scheduler.state_dict() == saved_sched, (method, "lr schedule")
    assert resumed.policy.optimizer_steps == saved_steps == 1, (method, resumed.policy.optimizer_steps)
    if method == "adalora":
        assert saved_pattern and resumed.policy.model.peft_config["default"].rank_pattern == saved_pattern, method
    train_step(resumed, loss_fn_b, cfg, batch2)
    after_b = full_state(resumed)
    diff = [k for k in after_a if not torch.equal(after_a[k], after_b[k])]
    assert not diff, (method, "second step after resume differs", diff[:3])

    if node_local and rank > 0:
        assert not os.path.exists(os.path.join(ckpt, STATE_FILE)), "a node-local directory of rank > 0"
        return
    assert os.path.exists(os.path.join(ckpt, STATE_FILE)), method
    exported = load_adapted(base_model(path), os.path.join(ckpt, ADAPTER_DIR))
    got = merged_state_dict(exported)
    assert list(got) == list(merged_at_save), method
    worst = max(float((got[k] - merged_at_save[k]).abs().max()) for k in got)
    assert worst < 1e-6, (method, "exported adapter", worst)  # PiSSA/MiLoRA: peft's [A|A0],[B|-B0] rounding


def main() -> None:
    from verl_common import model_dirs

    rank = init()
    path = model_dirs()["tiny-qwen2"]
    root = os.path.join(os.environ["PERL_VERL_TMP"], "ckpt")
    for method in METHODS:
        check(method, path, root)
        if rank == 0:
            print(f"ok {method}", flush=True)
    for method in NODE_LOCAL:
        check(method, path, root, node_local=True)
    done("VERL_CHECKPOINT_OK")


if __name__ == "__main__":
    main()
