"""`python -m perl.verl_glue --config recipe.yaml [--dry-run] key=value ...` (also `perl train` for verl recipes).

Composes verl's hydra config with the PeRL `peft:` block and the paper's DAPO defaults, checks it
(every check that can run before Ray starts), and hands it to verl's own PPO runner
(`verl.trainer.main_ppo.run_ppo` with verl's V1 task runner, as `python -m verl.trainer.main_ppo` does;
PeRL's subclass of it, perl.verl_glue.trainer.PerlTaskRunner, also registers the T-SPMO trainer).
`--dry-run` prints the resolved configuration and the adapted model's trainable-parameter summary
and stops: no Ray, no vLLM, no GPU needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

USAGE_EPILOG = (
    "overrides are hydra-style key=value on verl's ppo_trainer config or PeRL's peft:/perl: blocks, "
    "e.g. peft.name=dora perl.algorithm=grpo actor_rollout_ref.model.path=/models/r1-1.5b; "
    "+key=value adds a key verl's schema does not list"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perl.verl_glue",
                                description="PeRL: DAPO/GRPO/Dr.GRPO with any PEFT method on verl 0.9.1",
                                epilog=USAGE_EPILOG)
    p.add_argument("--config", help="recipe YAML (verl keys + peft:/perl: blocks); default: the paper's DAPO base")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the adapted model's trainable parameters; start nothing")
    p.add_argument("--no-path-checks", action="store_true",
                   help="with --dry-run: do not require the data files to exist (the model config is still read)")
    p.add_argument("--format", choices=("yaml", "json"), default="yaml", help="--dry-run output format")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p


def format_summary(summary: dict[str, Any]) -> str:
    from perl.cli import format_percent

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


def prepare(argv: list[str]):
    """Parse, compose and check; returns (args, config, adapter summary). Raises ConfigError."""
    from perl.verl_glue.config import check, compose

    args = build_parser().parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # verl prints progress; stdout carries the config only
        cfg = compose(args.config, args.overrides)
        summary = check(cfg, paths=not (args.dry_run and args.no_path_checks), require_vllm=not args.dry_run)
    return args, cfg, summary


def run(cfg) -> None:
    """Start verl's trainer on a composed, checked config (what verl.trainer.main_ppo.main does)."""
    from verl.trainer.main_ppo import run_ppo
    from verl.utils.device import auto_set_device

    import perl.verl_glue.engine  # noqa: F401  (engine registration in the driver too)
    from perl.verl_glue.trainer import PerlTaskRunner

    auto_set_device(cfg)
    if not cfg.trainer.use_v1:
        from perl.verl_glue.config import ConfigError

        raise ConfigError("trainer.use_v1=false: PeRL runs on verl's V1 trainer (dynamic sampling lives there)")
    run_ppo(cfg, task_runner_class=PerlTaskRunner)


def main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from perl.verl_glue.config import ConfigError, resolved

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, cfg, summary = prepare(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from perl.verl_glue.config import vllm_available

        full = resolved(cfg)
        if args.format == "json":
            print(json.dumps({"config": OmegaConf.to_container(full), "adapter": summary}, indent=2, default=str))
        else:
            print(OmegaConf.to_yaml(full))
            print("# adapted model")
            print(format_summary(summary))
            if full.actor_rollout_ref.rollout.name == "vllm" and not vllm_available():
                print("note:       vLLM is not installed here; a real run needs it (pip install 'perl-rlvr[gpu]')")
        return 0
    run(cfg)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
