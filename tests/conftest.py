import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from perl.models import build_model

if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
    # Two workers on two cores: one torch thread each. With torch's default (a thread per core) in
    # both, OpenMP's spinning threads contend and the fast tier took as long as in one process.
    torch.set_num_threads(1)

ARCHS = ("tiny-qwen2", "tiny-llama")
VOCAB = 256


# Tests that keep both cores busy (a trainer launch, vLLM, torchrun workers): one at a time.
BOTH_CORES_MARKERS = ("ray", "vllm", "dist")


def pytest_xdist_auto_num_workers(config):
    """How many pytest-xdist workers `-n auto` (pytest.ini) starts: 2 (one per core) when the `-m`
    expression leaves out every test that keeps both cores busy, else none (one process).

    The rest are single-threaded (tests/conftest.py gives each worker one torch thread): the fast
    tier took 138 s in one process and 84 s in two. Trainer launches side by side were slower than one
    after the other (docs/benchmarks.md, "Start-up work per launch"). An explicit `-n N` overrides this.
    """
    from _pytest.mark.expression import Expression  # pytest's own evaluator of `-m`

    if not config.option.markexpr:
        return 0
    expression = Expression.compile(config.option.markexpr)
    if any(expression.evaluate(lambda name, **_: name in ("slow", marker)) for marker in BOTH_CORES_MARKERS):
        return 0
    return max(1, min(2, os.cpu_count() or 1))


def fresh_base(arch: str, seed: int = 0):
    """The same random base every call (seeded), fp32, eval mode."""
    return build_model(arch, seed=seed)


def batch(seed: int = 1, n: int = 2, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=g)


@torch.no_grad()
def logits_of(model, ids):
    was_training = model.training
    model.eval()
    out = model(input_ids=ids).logits.float()
    model.train(was_training)
    return out


def train_steps(policy, steps: int = 3, lr: float = 1e-2, seed: int = 2):
    """A few AdamW steps of next-token loss on random tokens, with the method's hook and extra loss."""
    opt = torch.optim.AdamW(policy.param_groups(lr), lr=lr)
    policy.model.train()
    for step in range(steps):
        ids = batch(seed + step, n=4, length=16)
        loss = torch.nn.functional.cross_entropy(
            policy.model(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)
        )
        extra = policy.extra_loss()
        if extra is not None:
            loss = loss + extra
        loss.backward()
        opt.step()
        policy.after_optimizer_step()
        opt.zero_grad(set_to_none=True)
    policy.model.eval()
    return opt


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A saved tiny Qwen2 and (empty) train/val parquet files: what a verl config needs to compose."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
    from verl_common import save_tiny_model

    root = tmp_path_factory.mktemp("verl-config")
    model = save_tiny_model("tiny-qwen2", str(root / "tiny-qwen2"))
    from perl.data import arithmetic_rows, to_verl_rows, write_parquet

    for name in ("train", "val"):  # a few rows in verl's schema: the config check reads them
        write_parquet(to_verl_rows(arithmetic_rows(4, 1, ("add",), seed=0), "arith", name).rows,
                      str(root / f"{name}.parquet"))
    return {"model": model, "train": str(root / "train.parquet"), "val": str(root / "val.parquet")}


def ready(paths, *extra):
    """Overrides pointing a composed config at `paths`."""
    return [f"actor_rollout_ref.model.path={paths['model']}", f"data.train_files={paths['train']}",
            f"data.val_files={paths['val']}", *extra]


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    """One cache directory for the toy cold start across the session (built once, ~45 s)."""
    return str(tmp_path_factory.mktemp("perl-cache"))


@pytest.fixture(scope="session")
def transfer_queue():
    """verl's V1 storage for real: a local Ray with TransferQueue's controller and two storage
    units (three 1-CPU actors, hence num_cpus=4 logical CPUs on a 2-core box). Each test leaves it
    empty (`empty_queue`)."""
    import ray  # both are PeRL dependencies (verl's V1 trainer needs them): a missing one is a failure, not a skip
    import transfer_queue as tq
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
    try:
        tq.init()
        yield tq
        tq.close()
    finally:
        ray.shutdown()


@pytest.fixture()
def empty_queue(transfer_queue):
    yield transfer_queue
    for partition, items in (transfer_queue.kv_list() or {}).items():
        if items:
            transfer_queue.kv_clear(keys=list(items), partition_id=partition)
