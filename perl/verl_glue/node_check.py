"""`perl check --config RECIPE [key=value ...]`: this node against a run, before the run.

What a first run on a new GPU node needs to know before it waits minutes for Ray and vLLM: the
installed versions against the pins (constraints/gpu.txt, or cpu.txt for trainer.device=cpu), the
GPUs torch sees and their memory, the memory estimate of the run against each of them, and every
config check the entry point runs (on this node: vLLM, flash-attn and the platform included). One
report; exit status 1 when anything fails (a memory estimate near or over a GPU's memory is a
warning, not a failure: it is an estimate).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONSTRAINTS = os.path.join(ROOT, "constraints")
# Pins a run can go without: flash-attn is optional (the config picks sdpa without it).
OPTIONAL = {"flash-attn": "optional: without it the config picks sdpa, no remove-padding"}


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failures: int = 0

    def section(self, title: str) -> None:
        self.lines += ["", title]

    def ok(self, text: str) -> None:
        self.lines.append(f"  ok    {text}")

    def fail(self, text: str) -> None:
        self.lines.append(f"  FAIL  {text}")
        self.failures += 1

    def note(self, text: str) -> None:
        self.lines.append(f"  note  {text}")


def read_pins(path: str) -> dict[str, str]:
    """name -> version of every `name==version` line of a constraints file."""
    pins = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def check_versions(report: Report, path: str) -> None:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import InvalidVersion, Version

    report.section(f"installed versions against {os.path.relpath(path, ROOT)}")
    if not os.path.exists(path):
        report.fail(f"{path} does not exist (run perl check from a PeRL checkout)")
        return
    for name, pinned in read_pins(path).items():
        try:
            got = version(name)
        except PackageNotFoundError:
            (report.note if name in OPTIONAL else report.fail)(f"{name} not installed (pinned {pinned})"
                                                               + (f"; {OPTIONAL[name]}" if name in OPTIONAL else ""))
            continue
        try:  # a local label (+cpu, +cu130) is the build of the same release
            same = Version(got).public == Version(pinned).public
        except InvalidVersion:
            same = got == pinned
        (report.ok if same else report.fail)(f"{name} {got}" + ("" if same else f", pinned {pinned}"))


def check_gpus(report: Report, cfg) -> list[tuple[int, str, float]]:
    import torch

    from perl.verl_glue.config import CPU_DEVICE, visible_gpus

    gpus = visible_gpus()
    report.section("GPUs torch sees")
    build = f"torch {torch.__version__}, " + (f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build")
    for i, name, gb in gpus:
        report.ok(f"GPU {i}: {name}, {gb:.1f} GB ({build})")
    if not gpus:
        if cfg.trainer.device == CPU_DEVICE:
            report.ok(f"none, and trainer.device=cpu ({build})")
        else:
            report.fail(f"none ({build}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}), "
                        f"but trainer.device={cfg.trainer.device}")
    elif len(gpus) < int(cfg.trainer.n_gpus_per_node):
        report.fail(f"{len(gpus)} GPU(s) here, trainer.n_gpus_per_node={cfg.trainer.n_gpus_per_node}")
    return gpus


def check_memory(report: Report, cfg, summary: dict, gpus) -> None:
    from perl.models import build_config
    from perl.verl_glue.config import estimate_memory, gpu_memory_gb, model_source
    from perl.verl_glue.config.gpu_checks import available_gb, memory_line

    report.section("memory estimate per GPU (config/gpu_checks.py: a floor, worst-case lengths)")
    est = estimate_memory(cfg, build_config(model_source(cfg)), int(summary["total"]), int(summary["trainable"]))
    targets = [(gb, f"GPU {i}, {name}") for i, name, gb in gpus] or [gpu_memory_gb(cfg)]
    for gb, source in targets:
        line = memory_line(est, gb, source, available_gb(cfg, gb))
        (report.note if line.startswith("warning") else report.ok)(line)


def run_checks(report: Report, args: argparse.Namespace, cfg):
    """The entry point's checks: those of any machine (the dry run's), then those of this node
    (the platform, vLLM's build, flash-attn), each reported on its own."""
    from perl.verl_glue.config import CPU_DEVICE, ConfigError, check, check_device, check_vllm
    from perl.verl_glue.config.gpu import check_flash_attn

    report.section("config checks (those `perl train` runs before Ray)")
    on_cpu = cfg.trainer.device == CPU_DEVICE
    toy = cfg.perl.get("toy") is not None  # the toy's data and model are built by the run itself
    summary = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            summary = check(cfg, paths=not (args.no_path_checks or toy), require_vllm=False)
        report.ok(f"{summary['method']}: {summary['trainable']:,} of {summary['total']:,} parameters trained; "
                  "parallel sizes, token budgets, sync backend, batches, verl's validate_config"
                  + ("" if args.no_path_checks or toy else ", data files"))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        report.fail(str(e))
    for what, fn in (("platform", check_device), ("vLLM", check_vllm), ("flash-attn", check_flash_attn)):
        if (what == "vLLM" and cfg.actor_rollout_ref.rollout.name != "vllm") or (what == "flash-attn" and on_cpu):
            continue
        try:
            with contextlib.redirect_stdout(sys.stderr):
                fn(cfg)
            report.ok(f"{what} on this node")
        except (ConfigError, ValueError, FileNotFoundError) as e:
            report.fail(str(e))
    if summary is not None:
        gpu_notes = [n for n in summary.get("gpu_notes", []) if "memory estimate:" not in n]  # its own section
        for note in summary.get("data_notes", []) + gpu_notes:
            report.note(note)
    return summary


def check_node(args: argparse.Namespace) -> tuple[str, int]:
    """The report and its failure count."""
    from perl.verl_glue.config import CPU_DEVICE, ConfigError, compose, request_cpu_platform

    report = Report([f"perl check: {args.config or 'the DAPO base'} {' '.join(args.overrides)}".rstrip()])
    try:
        with contextlib.redirect_stdout(sys.stderr):
            cfg = compose(args.config, args.overrides)
    except (ConfigError, ValueError) as e:
        report.fail(f"config: {e}")
        return "\n".join(report.lines), report.failures
    request_cpu_platform(cfg)
    on_cpu = cfg.trainer.device == CPU_DEVICE
    report.lines.append(f"trainer.device={cfg.trainer.device}, {cfg.trainer.n_gpus_per_node} "
                        f"{'worker(s)' if on_cpu else 'GPU(s)'} x {cfg.trainer.nnodes} node(s), "
                        f"model {cfg.actor_rollout_ref.model.path}")
    check_versions(report, os.path.join(CONSTRAINTS, "cpu.txt" if on_cpu else "gpu.txt"))
    gpus = check_gpus(report, cfg)
    summary = run_checks(report, args, cfg)
    if summary is not None and not on_cpu:
        check_memory(report, cfg, summary, gpus)
    report.lines += ["", f"result: {'FAIL, ' + str(report.failures) + ' problem(s)' if report.failures else 'ok'}"]
    return "\n".join(report.lines), report.failures


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", default=None, help="recipe YAML, as `perl train --config`")
    p.add_argument("--no-path-checks", action="store_true", help="do not require the data files to exist")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as `perl train`")
    return p


def main(args: argparse.Namespace) -> int:
    text, failures = check_node(args)
    print(text, flush=True)
    return 1 if failures else 0
