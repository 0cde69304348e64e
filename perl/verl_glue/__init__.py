"""PeRL on verl 0.9.1: the PEFT engine, its registration, and the DAPO entry point.

- `engine.py`   `PerlFSDPEngine`, verl's FSDP engine with the actor adapted by PeRL's registry;
                importing it registers it in verl's `EngineRegistry` (verl's workers import it
                through `actor_rollout_ref.model.external_lib=perl.verl_glue.engine`), registers a
                CPU platform for tests (`VERL_PLATFORM=cpu`) and PeRL's policy losses if present;
- `config.py`   verl's hydra `ppo_trainer` + the `peft:` block + the paper's DAPO defaults
                (`config/perl_dapo.yaml`), and every check that can run before Ray starts;
- `sampler.py`  DAPO dynamic sampling with a cap (a custom sampler of verl's V1 trainer);
- `trainer.py`  `PerlSyncTrainer`, verl's sync V1 trainer whose advantage step also reads the
                response ids (T-SPMO), and `PerlTaskRunner`, which registers it in Ray;
- `entry.py`    `python -m perl.verl_glue --config X [--dry-run] key=value ...` / `perl train`;
- `smoke.py`    builds and drives the actor engine like verl's worker does, without Ray or vLLM.

Importing this package itself is light (no verl engine imports).
"""
