"""The toy step through verl against the same work done directly, back to back on one machine.

1. **Through verl**: `python -m perl.verl_glue --config examples/toy.yaml` (= `perl train`, the
   embedded default) for `--steps` steps, no held-out evaluation, no checkpoints. Per step, verl's
   own timings from `metrics.jsonl` (median over steps 2..N: step 1 also starts the agent-loop
   workers); "ready after" = wall time from the launch until step 1 ended, less one median step,
   i.e. when the loop first runs at its steady pace.
2. **Directly**, each in a fresh process, on the run's own model and prompts (read from its
   `resolved_config.yaml`): vLLM's offline `LLM` generating the same requests (the step's prompts
   x G, the same sampling, length and log-prob settings and the same in-process executor), then
   PeRL's FSDP engine without Ray (tests/support/engine_harness.py) computing the old log-probs of
   those completions and running the actor update (the same mini-batches and micro-batches).
3. **vLLM's serving engine** (diagnostic rows, not in the ratio): `AsyncLLM`, the engine behind
   verl's rollout server, one request per completion all at once, on the first batch and on as many
   prompts as dynamic sampling dispatched: generation through verl against vLLM's own serving path.

Writes a table into docs/benchmarks.md (section "toy_step") and prints, as its last line:
`toy step: verl X.XX s, direct Y.YY s, ratio R.RR; ready after S s`.

    python bench/toy_step.py [--steps 8] [--repeats 3] [-- key=value ...]   (overrides for the verl run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # support.engine_harness
from _docs import write_section  # noqa: E402

TOY = os.path.join(ROOT, "examples", "toy.yaml")
PHASES = ["gen", "old_log_prob", "update_actor", "update_weights", "adv"]


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")


def verl_run(run_dir: str, steps: int, overrides: list[str]) -> dict:
    """Launch the toy through verl; the wall time at which each step's metrics line appeared."""
    cmd = [sys.executable, "-m", "perl.verl_glue", "--config", TOY, f"trainer.default_local_dir={run_dir}",
           "perl.heldout=null", "trainer.save_freq=-1", f"trainer.total_training_steps={steps}", *overrides]
    metrics = os.path.join(run_dir, "metrics.jsonl")
    seen: dict[int, float] = {}
    t0 = time.monotonic()
    with open(run_dir + ".log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
        while proc.poll() is None:
            if os.path.exists(metrics):
                with open(metrics) as f:
                    for line in f:
                        try:
                            step = json.loads(line)["step"]
                        except (json.JSONDecodeError, KeyError):
                            continue
                        if step not in seen:
                            seen[step] = time.monotonic() - t0
                            print(f"  verl: step {step}/{steps} at {seen[step]:.1f} s", flush=True)
            time.sleep(0.05)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the verl run failed (rc {proc.returncode}); its output: {run_dir}.log")
    rows = [json.loads(line) for line in open(metrics)]
    steady = [r for r in rows if r["step"] >= 2]
    med = lambda key: statistics.median(r[key] for r in steady)  # noqa: E731
    step_s = med("timing_s/step")
    return {"step": step_s, **{p: med(f"timing_s/{p}") for p in PHASES if f"timing_s/{p}" in steady[0]},
            "batch": _train_batch_size(run_dir),
            "first_step": rows[0]["timing_s/step"], "ready": seen[1] - step_s, "wall": wall, "steps": len(rows),
            "refilled": statistics.mean(r.get("training/filter_groups/refilled_prompts", 0) for r in steady),
            "over": statistics.mean(r.get("training/filter_groups/over_dispatched_prompts", 0) for r in steady)}


def _train_batch_size(run_dir: str) -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(os.path.join(run_dir, "resolved_config.yaml")).data.train_batch_size)


def direct_generation(config_path: str, out: str, repeats: int) -> None:
    """vLLM offline: the step's first batch of prompts x G, as verl's rollout asks for them (in a
    process started with the rollout server's environment: `rollout_env`)."""
    import torch
    from vllm import LLM, SamplingParams

    cfg, prompts = run_prompts(config_path)
    arr, data = cfg.actor_rollout_ref, cfg.data
    llm = LLM(model=arr.model.path, dtype="float32", enforce_eager=True, seed=0,
              max_model_len=int(data.max_prompt_length) + int(data.max_response_length),
              distributed_executor_backend="uni", enable_prefix_caching=True)
    params = SamplingParams(n=int(arr.rollout.n), temperature=float(arr.rollout.temperature), top_p=1.0,
                            max_tokens=int(data.max_response_length), logprobs=0)
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(requests, params, use_tqdm=False)  # warm-up
    times, outputs = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
    pairs = [(torch.tensor(o.prompt_token_ids), torch.tensor(c.token_ids)) for o in outputs for c in o.outputs]
    torch.save({"times": times, "pairs": pairs}, out)


def run_prompts(config_path: str, count: int | None = None):
    """(the run's config, the token ids of its first `count` training prompts, train_batch_size by
    default) rendered with the chat template as verl's rollout renders them."""
    import pandas as pd
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    cfg = OmegaConf.load(config_path)
    data = cfg.data
    tok = AutoTokenizer.from_pretrained(cfg.actor_rollout_ref.model.path)
    files = data.train_files if isinstance(data.train_files, str) else list(data.train_files)[0]
    rows = pd.read_parquet(files).head(int(count or data.train_batch_size))
    prompts = [tok.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True) for p in rows["prompt"]]
    return cfg, [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]


def direct_async_generation(config_path: str, count: str, out: str, repeats: int) -> None:
    """vLLM's `AsyncLLM` (the engine behind verl's rollout server, its core in a process of its own)
    with one request per completion, all submitted at once, as the agent loop submits them; the
    run's first `count` prompts x G. Where generation through verl stands against vLLM's own
    serving path rather than its offline batch (a diagnostic row; the ratio uses `LLM`)."""
    import asyncio

    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    cfg, prompts = run_prompts(config_path, int(count))
    arr, data = cfg.actor_rollout_ref, cfg.data
    params = SamplingParams(n=1, temperature=float(arr.rollout.temperature), top_p=1.0,
                            max_tokens=int(data.max_response_length), logprobs=0)

    async def measure() -> list[float]:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=arr.model.path, dtype="float32", enforce_eager=True, seed=0, enable_prefix_caching=True,
            max_model_len=int(data.max_prompt_length) + int(data.max_response_length)))

        async def complete(request_id: str, prompt: list[int]) -> None:
            async for _ in engine.generate({"prompt_token_ids": prompt}, params, request_id=request_id):
                pass

        times = []
        try:
            for rep in range(repeats + 1):  # the first is a warm-up
                t = time.perf_counter()
                await asyncio.gather(*[complete(f"{rep}-{i}-{k}", p) for i, p in enumerate(prompts)
                                       for k in range(int(arr.rollout.n))])
                times.append(time.perf_counter() - t)
        finally:
            engine.shutdown()
        return times[1:]

    with open(out, "w") as f:
        json.dump({"times": asyncio.run(measure())}, f)


def direct_engine(config_path: str, pairs_path: str, out: str, repeats: int) -> None:
    """PeRL's FSDP engine without Ray: old log-probs and the actor update on the generated pairs."""
    os.environ.setdefault("VERL_PLATFORM", "cpu")
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    import perl.verl_glue.engine  # noqa: F401  (the CPU platform and PeRL's engine)
    from support.engine_harness import batch_meta, build_actor_engine, response_log_probs, sequence_rows, to_tensordict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo")
    cfg = OmegaConf.load(config_path)
    engine, loss_fn = build_actor_engine(cfg)
    pairs = torch.load(pairs_path)["pairs"]
    g = torch.Generator().manual_seed(0)
    rows = sequence_rows([p for p, _ in pairs], [r for _, r in pairs], torch.randn(len(pairs), generator=g).tolist())
    logp, update = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        t = time.perf_counter()
        rows["old_log_probs"] = response_log_probs(engine, cfg, rows)
        t1 = time.perf_counter()
        data = to_tensordict(rows, batch_meta(cfg, train=True))
        with engine.train_mode(disable_auto_offload=True):
            engine.train_batch(data, loss_function=loss_fn)
        t2 = time.perf_counter()
        logp.append(t1 - t)
        update.append(t2 - t1)
    with open(out, "w") as f:
        json.dump({"old_log_prob": logp[1:], "update_actor": update[1:]}, f)


def rollout_env() -> dict:
    """The environment of the CPU rollout server's processes, which vLLM reads when it is imported:
    the CPU platform's (KV cache, no torch.compile) and the in-process executor (cpu.yaml), with
    every core's thread: the direct generation has the machine to itself, where the verl run's
    rollout may keep a core for the Python around it (`cpu_platform.rollout_threads`)."""
    from perl.verl_glue.config.cpu import torch_threads
    from perl.verl_glue.cpu_platform import PlatformCPU

    return {**PlatformCPU().rollout_env_vars(), "OMP_NUM_THREADS": str(torch_threads()),
            "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")}


def child(args: list[str], what: str, env: dict | None = None) -> None:
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env={**_env(), **(env or {})},
                            cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"the direct {what} measurement failed (rc {result.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each direct measurement")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--direct-generation", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--direct-engine", nargs=3, metavar=("CONFIG", "PAIRS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--direct-async", nargs=3, metavar=("CONFIG", "COUNT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the verl run")
    args = parser.parse_args()
    if args.direct_generation:
        return direct_generation(*args.direct_generation, args.repeats)
    if args.direct_engine:
        return direct_engine(*args.direct_engine, args.repeats)
    if args.direct_async:
        return direct_async_generation(*args.direct_async, args.repeats)

    work = tempfile.mkdtemp(prefix="perl-toy-step-")
    run_dir = os.path.join(work, "run")
    print(f"[toy_step] verl run: {args.steps} steps of the toy (log: {run_dir}.log)", flush=True)
    verl = verl_run(run_dir, args.steps, args.overrides)
    config = os.path.join(run_dir, "resolved_config.yaml")
    print("[toy_step] direct: vLLM offline generation of the same requests", flush=True)
    child(["--repeats", str(args.repeats), "--direct-generation", config, os.path.join(work, "gen.pt")], "generation",
          rollout_env())
    print("[toy_step] direct: PeRL's engine without Ray (old log-probs, update)", flush=True)
    child(["--repeats", str(args.repeats), "--direct-engine", config, os.path.join(work, "gen.pt"),
           os.path.join(work, "engine.json")], "engine")
    # diagnostics: vLLM's serving engine on the first batch, then on as many prompts as verl dispatched
    batch = int(verl["batch"])
    dispatched = round(batch + verl["over"] + verl["refilled"])
    served = {}
    for count in sorted({batch, dispatched}):
        print(f"[toy_step] direct: vLLM's AsyncLLM, {count} prompts x G, one request per completion", flush=True)
        out = os.path.join(work, f"async_{count}.json")
        child(["--repeats", str(args.repeats), "--direct-async", config, str(count), out], "serving", rollout_env())
        served[count] = statistics.median(json.load(open(out))["times"])
    import torch

    gen = statistics.median(torch.load(os.path.join(work, "gen.pt"))["times"])
    eng = json.load(open(os.path.join(work, "engine.json")))
    direct = {"gen": gen, "old_log_prob": statistics.median(eng["old_log_prob"]),
              "update_actor": statistics.median(eng["update_actor"])}
    direct["step"] = sum(direct.values())
    ratio = verl["step"] / direct["step"]
    table = ["| phase | through verl (median of steps 2-%d) | directly (median of %d) | ratio |" % (verl["steps"], args.repeats),
             "|---|---|---|---|"]
    for phase in ["gen", "old_log_prob", "update_actor"]:
        table.append(f"| {phase} | {verl[phase]:.2f} s | {direct[phase]:.2f} s | {verl[phase] / direct[phase]:.1f}x |")
    for count, seconds in served.items():
        which = "the same requests" if count == batch else "as many prompts as verl dispatched"
        table.append(f"| gen, vLLM's `AsyncLLM` ({which}: {count} x G) | - | {seconds:.2f} s | "
                     f"verl's gen {verl['gen'] / seconds:.1f}x |")
    other = verl["step"] - sum(verl[p] for p in ["gen", "old_log_prob", "update_actor"])
    table.append(f"| the rest (weight sync {verl.get('update_weights', 0):.2f} s, advantages, metrics) | {other:.2f} s | - | - |")
    table.append(f"| **step** | **{verl['step']:.2f} s** | **{direct['step']:.2f} s** | **{ratio:.2f}x** |")
    last = f"toy step: verl {verl['step']:.2f} s, direct {direct['step']:.2f} s, ratio {ratio:.2f}; ready after {verl['ready']:.0f} s"
    extra = f", overrides {' '.join(args.overrides)}" if args.overrides else ""
    lines = [f"### The toy step through verl vs directly (`python bench/toy_step.py`, {time.strftime('%Y-%m-%d')}{extra})",
             "", *table, "",
             f"Ready after {verl['ready']:.0f} s (launch to the end of step 1, less one steady step; step 1 took "
             f"{verl['first_step']:.1f} s), the whole {verl['steps']}-step run {verl['wall']:.0f} s; "
             f"dynamic sampling sent {verl['over']:.1f} prompts with each batch and refilled {verl['refilled']:.1f} "
             "per step on average (perl.over_dispatch). Generation "
             "directly: vLLM's offline `LLM`, the same prompts x G, sampling and lengths; the engine directly: "
             "PeRL's FSDP engine without Ray on those completions. The `AsyncLLM` rows (not in the ratio) are "
             "vLLM's serving engine, the one behind verl's rollout server, given one request per completion "
             "all at once: generation through verl against vLLM's own serving path, on the first batch and on "
             "as many prompts as dynamic sampling dispatched. One run on a shared 2-core machine.", "", last]
    print("\n".join(table))
    if not args.no_docs:
        write_section("toy_step", lines)
    print(last)


if __name__ == "__main__":
    main()
