"""`perl train --config recipe.yaml [--dry-run] key=value ...` (also `python -m perl.verl_glue`): a PeRL run.

A run is verl's own V1 PPO trainer (`verl.trainer.main_ppo.run_ppo`, with PeRL's task runner so
that its Ray process knows PeRL's trainer), on a GPU node or, with `trainer.device=cpu`, on a CPU
with vLLM's CPU build. Around it, in the run directory (`trainer.default_local_dir`):

1. compose verl's hydra config with PeRL's blocks (perl.verl_glue.config), build the toy's cold
   start and data where `perl.toy` is set, and check everything that can fail before Ray starts;
2. refuse to resume a directory that trained other settings (`perl_run.json`); write
   `resolved_config.yaml`;
3. held-out evaluation of the base model (`perl.heldout`; `eval_before/`);
4. verify the checkpoint a resume starts from (perl.verl_glue.checkpoints; a damaged one is
   skipped); verl's trainer: it resumes from the newest complete checkpoint
   (`trainer.resume_mode=auto`), PeRL's trainer logs `metrics.jsonl`;
5. held-out evaluation of the last checkpoint merged into `final_model/`; `reward_curve.png` and
   `summary.json` (before, after, gain, steps, wall time).

The terminal (perl.verl_glue.console): a first screen, a line per step, the result; each phase's
library output goes to `logs/<phase>.log`.

`--dry-run` prints the resolved configuration and the adapted model's trainable-parameter summary
and stops: no Ray, no vLLM, no GPU, no cold start needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from typing import Any

USAGE_EPILOG = (
    "overrides are hydra-style key=value on verl's ppo_trainer config or PeRL's peft:/perl: blocks, "
    "e.g. peft.name=dora perl.algorithm=grpo trainer.total_training_steps=60; "
    "+key=value adds a key verl's schema does not list"
)


LOSS_LABELS = {"sgrpo": "S-GRPO", "tspmo": "T-SPMO"}


def run_label(method: str, loss_mode: str) -> str:
    """A run's row name in `perl table`: the method, and the token-efficient loss if one is used."""
    return method if loss_mode == "token" else f"{method} ({LOSS_LABELS.get(loss_mode, loss_mode)})"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of a run: the one definition behind `perl train` and `python -m perl.verl_glue`."""
    p.add_argument("--config", default=None,
                   help="recipe YAML (verl keys + peft:/perl: blocks); default: the paper's DAPO base alone. "
                        "The CPU toy run: --config examples/toy.yaml")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the adapted model's trainable parameters; start nothing")
    p.add_argument("--no-path-checks", action="store_true",
                   help="with --dry-run: do not require the data files to exist (the model config is still read)")
    p.add_argument("--format", choices=("yaml", "json"), default="yaml", help="--dry-run output format")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="perl train", description="PeRL: DAPO/GRPO/Dr.GRPO with any PEFT method on verl 0.9.1",
        epilog=USAGE_EPILOG))


def format_summary(summary: dict[str, Any]) -> str:
    from perl.methods import format_percent

    pct_s = format_percent(summary["percent"])
    targets = ", ".join(summary["target_modules"]) if summary["target_modules"] else "all parameters"
    lines = [
        f"method:     {summary['method']} ({summary['category']})",
        f"trainable:  {summary['trainable']:,} of {summary['total']:,} parameters ({pct_s})",
        f"targets:    {targets}",
    ]
    if summary.get("options"):
        lines.append(f"options:    {json.dumps(summary['options'], default=str)}")
    return "\n".join(lines)


def prepare(argv: list[str] | argparse.Namespace):
    """Parse, compose, build the toy's inputs (not for a dry run) and check; returns (args, config,
    adapter summary). Raises ConfigError."""
    from omegaconf import open_dict

    from perl.verl_glue.config import (check, compose, materialize_toy, request_cpu_platform, run_arithmetic,
                                       run_dir)

    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # verl prints progress; stdout carries the config only
        cfg = compose(args.config, args.overrides)
        request_cpu_platform(cfg)  # trainer.device=cpu: verl's CPU platform, whatever torch is
        toy = cfg.perl.get("toy") is not None
        if not args.dry_run and cfg.perl.get("toy") is not None:
            materialize_toy(cfg, run_dir(cfg))
            with open_dict(cfg):  # the toy's data files exist now: the arithmetic counts their rows
                cfg.perl.derived = run_arithmetic(cfg)
        summary = check(cfg, paths=not (args.dry_run and (args.no_path_checks or toy)), require_vllm=not args.dry_run)
    return args, cfg, summary


def train(cfg) -> None:
    """verl's trainer on a composed, checked config (what verl.trainer.main_ppo.main does)."""
    import ray
    from verl.trainer.main_ppo import run_ppo
    from verl.utils.device import auto_set_device

    import perl.verl_glue.engine  # noqa: F401  (engine registration in the driver too)
    from perl.verl_glue.trainer import PerlTaskRunner

    auto_set_device(cfg)
    if not cfg.trainer.use_v1:
        from perl.verl_glue.config import ConfigError

        raise ConfigError("trainer.use_v1=false: PeRL runs on verl's V1 trainer (dynamic sampling lives there)")
    started_ray = not ray.is_initialized()
    stop = threading.Event()
    early_queue = start_transfer_queue_early(cfg, stop)
    try:
        run_ppo(cfg, task_runner_class=PerlTaskRunner)
    finally:
        stop.set()
        early_queue.join()
        if ray.is_initialized():
            import transfer_queue as tq

            with contextlib.suppress(Exception):  # the storage units this process started
                tq.close()
        if started_ray and ray.is_initialized():
            ray.shutdown()  # frees the trainer's processes before the evaluation starts its own vLLM


def start_transfer_queue_early(cfg, stop: threading.Event) -> threading.Thread:
    """Start TransferQueue (verl's V1 data store: a controller and its storage units, each a Ray
    actor) from this process as soon as `run_ppo` has started Ray, in a thread, instead of letting
    verl's task runner start it once it has imported its modules (~5 s of CPU). TransferQueue's own
    `init` supports this: a later `init` in another process (the task runner's, with the same
    `transfer_queue` config) finds the controller and only connects. On 2 cores the two starts, ~6 s
    one after the other in the task runner, now overlap its imports. Returns the thread, which gives
    up when `stop` is set before Ray has started; a failure is printed and leaves the start to verl's
    task runner, as before."""
    import ray
    from omegaconf import OmegaConf

    conf = OmegaConf.create(OmegaConf.to_container(cfg.transfer_queue, resolve=True))
    conf.enable = True  # as verl's task runner sets it before its own `init`
    env_vars = OmegaConf.to_container(OmegaConf.select(cfg, "ray_kwargs.ray_init.runtime_env.env_vars") or {})

    def start() -> None:
        import transfer_queue as tq

        while not ray.is_initialized():  # run_ppo's ray.init, in the main thread
            if stop.wait(0.02):
                return
        try:
            transfer_queue_settings(env_vars)
            tq.init(conf)
            print("[perl] TransferQueue started beside verl's task runner", flush=True)
        except Exception as e:  # noqa: BLE001 - verl's task runner then starts it, as it always did
            print(f"[perl] TransferQueue not started ahead of verl's task runner ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)

    thread = threading.Thread(target=start, name="perl-transfer-queue", daemon=True)
    thread.start()
    return thread


def transfer_queue_settings(env_vars: dict) -> None:
    """TransferQueue reads its `TQ_*` settings from the environment into module globals when its
    modules are imported, and its actor classes are decorated with `ray.remote` in place, so Ray's
    cloudpickle sends them by value, with those globals as the creating process found them. Created
    from the driver, the controller and storage units would take the driver's values where verl's
    task runner would have given them the run's Ray environment (e.g. the CPU profile's
    `TQ_NUM_THREADS`; without it the storage unit warns at every put and get). So the run's `TQ_*`
    values are set here, in the environment and in the imported modules' globals (patches/README.md
    #10; contract test)."""
    for key, value in env_vars.items():
        if not key.startswith("TQ_"):
            continue
        os.environ[key] = str(value)
        for name, module in list(sys.modules.items()):
            if (name == "transfer_queue" or name.startswith("transfer_queue.")) and key in vars(module):
                current = getattr(module, key)
                setattr(module, key, str(value) if current is None else type(current)(value))


def train_or_collapse(cfg, out: str) -> dict[str, Any] | None:
    """train(cfg); None when it ran its steps, the trainer's collapse record (perl.verl_glue.trainer,
    `_record_collapse`) when it stopped because dynamic sampling found nothing left to learn from."""
    from perl.verl_glue.run_dir import COLLAPSED

    marker = os.path.join(out, COLLAPSED)
    if os.path.exists(marker):
        os.remove(marker)  # an earlier call's: this one decides afresh
    try:
        train(cfg)
    except Exception:
        if os.path.exists(marker):
            with open(marker) as f:
                return json.load(f)
        raise
    return None


def checkpoint_on_driver(full, out: str, step: int, *, fresh: bool, say=print) -> float | None:
    """What the held-out evaluation after training reads of checkpoint `step`, checked on this (the
    driver's) node before it starts: the marker's step and, when `final_model/` must be merged from
    it, the adapter; refused with perl.verl_glue.checkpoints.NotOnThisNode (on several nodes a
    node-local run directory is the likely cause, see there). Returns the adapter's trainable
    percent for summary.json, None (said in one line) when its metadata is not here: only a label."""
    from perl.methods.base import METADATA_FILE
    from perl.verl_glue import heldout as ho
    from perl.verl_glue.checkpoints import not_on_this_node
    from perl.verl_glue.run_dir import LATEST, adapter_dir

    nnodes = int(full.trainer.nnodes)
    if step == 0:
        later = ho.eval_command(full, adapter_dir(out, "N"), os.path.join(out, "eval_after"))
        raise not_on_this_node(os.path.join(out, LATEST), "the held-out evaluation after training", nnodes,
                               otherwise=f"no checkpoint was saved (trainer.save_freq={full.trainer.save_freq})",
                               later=f"{later} (N: the step that node's {LATEST} names)")
    adapter = adapter_dir(out, step)
    meta = os.path.join(adapter, METADATA_FILE)
    if ho.needs_export(out, step, fresh=fresh) and not os.path.exists(meta):
        raise not_on_this_node(meta, f"the held-out evaluation after training (merging step {step}'s adapter)",
                               nnodes, otherwise=f"checkpoint {step} is incomplete (moved or deleted?)",
                               later=ho.eval_command(full, adapter, os.path.join(out, "eval_after")))
    if not os.path.exists(meta):
        say(f"[perl] {meta} is not on this node: summary.json has no trainable_percent "
            f"(the evaluation reuses {os.path.join(out, ho.FINAL_MODEL)}, merged from step {step})")
        return None
    with open(meta) as f:
        return json.load(f).get("trainable_percent")


def run(cfg, console=None) -> dict[str, Any]:
    """One whole run (see the module docstring); returns summary.json's content. `console`
    (perl.verl_glue.console.Console): where the libraries' output goes; by default the run's own,
    as `perl.console` says."""
    from omegaconf import OmegaConf

    from perl.io import atomic_file
    from perl.verl_glue import heldout as ho
    from perl.verl_glue.config import resolved, run_dir
    from perl.verl_glue.checkpoints import resume_plan
    from perl.verl_glue.console import Console
    from perl.verl_glue.run_dir import (METRICS_FILE, RESOLVED_CONFIG, SUMMARY, adapter_dir, claim,
                                        keep_metrics_up_to, latest_step, plot_reward_curve, progress_line,
                                        resuming_line)

    started = time.perf_counter()
    full = resolved(cfg)
    out = run_dir(full)
    claim(out, full)
    with atomic_file(os.path.join(out, RESOLVED_CONFIG)) as tmp, open(tmp, "w") as f:
        f.write(OmegaConf.to_yaml(full))
    console = console or Console(out, verbose=full.perl.console == "verbose")
    spec = full.actor_rollout_ref.model.lora.perl
    method = str(full.peft.name)
    with_heldout = full.perl.heldout is not None and full.perl.heldout.data is not None
    before = None
    if with_heldout:
        with console.phase("eval_before"):
            before = ho.evaluate_before(full, out)
        console.say(f"[perl] held-out Avg@{int(full.perl.heldout.k)} before training: {before['overall_avg']:.3f}")
    plan = resume_plan(out)  # the checkpoint verl resumes from, verified; a damaged one is skipped
    for message in plan.messages:
        console.say(message)
    start_step = plan.step
    total = int(full.trainer.total_training_steps)
    if start_step:
        console.say(resuming_line(start_step, total, out))
    keep_metrics_up_to(out, start_step)  # as the trainer will: the console follows this run's steps only
    with console.phase("train") as log:
        console.say(f"[perl] verl's trainer: starting Ray, the workers and vLLM (log: {log})")
        line = lambda row: progress_line(row, total, int(full.data.train_batch_size),  # noqa: E731
                                         bool(full.algorithm.filter_groups.enable))
        with console.follow(os.path.join(out, METRICS_FILE), line, after_step=start_step):
            collapse = train_or_collapse(cfg, out)
    step = latest_step(out)
    curve = plot_reward_curve(out)
    summary: dict[str, Any] = {"method": method, "algorithm": str(full.perl.algorithm),
                               "loss_mode": str(full.perl.loss_mode), "steps": step, "resumed_from": start_step,
                               "total_training_steps": total,
                               "lr": float(full.actor_rollout_ref.actor.optim.lr),
                               "run_dir": out, "reward_curve": curve}
    if collapse is not None:
        summary["collapsed_at_step"] = collapse["failed_step"]
        console.say(f"[perl] training collapsed at step {collapse['failed_step']}/{total}: {collapse['reason']}")
        console.say(f"[perl] the weights after step {step} (checkpoint {step}) are its result")
    if with_heldout:
        trainable = checkpoint_on_driver(full, out, step, fresh=step != start_step, say=console.say)
        info = {"label": full.perl.get("label") or run_label(method, str(full.perl.loss_mode)), "method": method,
                "trainable_percent": trainable,
                "checkpoint": adapter_dir(out, step), "metrics": os.path.join(out, "metrics.jsonl")}
        with console.phase("eval_after"):
            after = ho.evaluate_after(full, out, step, info, fresh=step != start_step)
        summary.update({"eval_before": before["overall_avg"], "eval_after": after["overall_avg"],
                        "gain": after["overall_avg"] - before["overall_avg"], "eval_k": int(full.perl.heldout.k),
                        "eval_problems": int(after["benchmarks"][ho.HELDOUT]["problems"]),
                        "trainable_percent": trainable, "final_model": os.path.join(out, ho.FINAL_MODEL)})
    summary["wall_s"] = time.perf_counter() - started  # this call: evaluations + the steps it trained
    summary["adapter_sync"] = str(spec.adapter_sync)
    with atomic_file(os.path.join(out, SUMMARY)) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def report(summary: dict[str, Any]) -> str:
    lines = [f"[perl] {summary['method']}: {summary['steps']} steps in {summary['run_dir']} "
             f"({summary['wall_s']:.0f} s)" + (f"; training collapsed at step {summary['collapsed_at_step']}"
                                               if "collapsed_at_step" in summary else "")]
    if "eval_after" in summary:
        lines.append(f"[perl] held-out Avg@{summary['eval_k']} ({summary['eval_problems']} problems): "
                     f"{summary['eval_before']:.3f} -> {summary['eval_after']:.3f} ({summary['gain']:+.3f}); "
                     "summary.json, metrics.jsonl, reward_curve.png, results.json, final_model/ there")
    return "\n".join(lines)


def first_screen(full, summary: dict[str, Any]) -> str:
    """What runs, in a dozen lines: method, model, data, batch arithmetic, where everything goes."""
    from perl.verl_glue.config import format_arithmetic, run_dir
    from perl.verl_glue.config.toy import model_label
    from perl.verl_glue.on_policy import describe
    from perl.verl_glue.console import LOGS_DIR
    from perl.verl_glue.run_dir import RESOLVED_CONFIG

    out = run_dir(full)
    model = str(full.actor_rollout_ref.model.path)
    label = model_label(full)
    heldout = full.perl.heldout
    lines = [f"[perl] {full.perl.algorithm.upper()} + {full.peft.name} on verl's trainer "
             f"({'CPU, vLLM CPU' if full.trainer.device == 'cpu' else str(full.trainer.device)}), "
             f"{int(full.trainer.total_training_steps)} steps",
             format_summary(summary),
             f"model:      {model}" + (f" ({label})" if label else ""),
             f"data:       {full.data.train_files}",
             f"lr:         {float(full.actor_rollout_ref.actor.optim.lr):g}, G = {int(full.actor_rollout_ref.rollout.n)}, "
             f"loss {full.perl.loss_mode}"]
    if heldout is not None and heldout.data is not None:
        lines.append(f"held-out:   {heldout.data} (Avg@{int(heldout.k)} before and after)")
    lines += [f"data note:  {note}" for note in summary.get("data_notes", [])]
    lines += [f"gpu note:   {note}" for note in summary.get("gpu_notes", [])]
    lines += [format_arithmetic(full.perl.derived),
              f"old logp:   {describe(full)}",
              f"run dir:    {out}",
              f"            resolved config: {os.path.join(out, RESOLVED_CONFIG)}; verl/Ray/vLLM logs: "
              f"{os.path.join(out, LOGS_DIR)}/"]
    return "\n".join(lines)


# `perl train`'s exit status when training collapsed (its result is written, as for a full run)
EXIT_COLLAPSED = 3


def main(argv: list[str] | argparse.Namespace | None = None) -> int:
    from omegaconf import OmegaConf

    from perl.verl_glue.config import ConfigError, format_arithmetic, resolved
    from perl.verl_glue.on_policy import describe

    argv = list(sys.argv[1:]) if argv is None else argv
    try:
        args, cfg, summary = prepare(argv)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    full = resolved(cfg)
    if args.dry_run:
        from perl.verl_glue.config import vllm_available

        if args.format == "json":
            print(json.dumps({"config": OmegaConf.to_container(full), "adapter": summary}, indent=2, default=str))
        else:
            print(OmegaConf.to_yaml(full))
            print("# run (perl.derived)")
            print(format_arithmetic(full.perl.derived))
            print(f"old logp:   {describe(full)}")
            print("# adapted model")
            print(format_summary(summary))
            for note in summary.get("gpu_notes", []):
                print(f"gpu note:   {note}")
            if full.actor_rollout_ref.rollout.name == "vllm" and not vllm_available():
                print("note:       vLLM is not installed here; a real run needs it (pip install 'perl-rlvr[gpu]')")
        return 0
    print(first_screen(full, summary), flush=True)
    try:
        summary = run(cfg)
        print(report(summary), flush=True)
    except ValueError as e:  # a run directory holding other settings, a damaged checkpoint, one not on this node
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # inside verl / Ray / vLLM: the console printed the log's path and its tail
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {cause}", file=sys.stderr)
        return 1
    return EXIT_COLLAPSED if "collapsed_at_step" in summary else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
