"""PeRL on verl 0.9.1: the PEFT engine, its registration, and the DAPO entry point.

- `engine.py`   `PerlFSDPEngine`, verl's FSDP engine with the actor adapted by PeRL's registry;
                importing it registers it in verl's `EngineRegistry` (verl's workers import it
                through `actor_rollout_ref.model.external_lib=perl.verl_glue.engine`), registers a
                CPU platform for tests (`VERL_PLATFORM=cpu`) and PeRL's policy losses if present;
- `config/`    verl's hydra `ppo_trainer` + the `peft:` / `perl:` blocks + the paper's DAPO defaults
                (`config/perl_dapo.yaml`), and every check that can run before Ray starts, one
                module per concern (config/__init__.py lists them);
- `console.py`  the terminal of a run: a first screen and a line per step; libraries log to `logs/`;
- `log_once.py` a verl warning repeated per request, shown once (a `verl.plugins` entry point);
- `sampler.py`  DAPO dynamic sampling with a cap (a custom sampler of verl's V1 trainer);
- `trainer.py`  `PerlSyncTrainer`, verl's sync V1 trainer whose advantage step also reads the
                response ids (T-SPMO), and `PerlTaskRunner`, which registers it in Ray;
- `entry.py`    `python -m perl.verl_glue --config X [--dry-run] key=value ...` / `perl train`;
- `node_check.py` `perl check --config X`: this node against a run (versions, GPUs, memory, the checks);
- `run_dir.py`  the run directory: verl's checkpoints, `perl_adapter/`, metrics, summary, resume identity;
- `checkpoints.py`  a manifest after each save, verified before a resume (a damaged checkpoint is skipped);
- `heldout.py`  held-out Avg@k before and after a run (vLLM or HF backend);
- `cpu_platform.py`, `vllm_cpu_plugin.py`  the CPU platform (verl plugin) and vLLM CPU weight loading;
- `token_subset.py`  S-GRPO's shortened forward inside the engine;
- the engine harness of the tests and benches (no Ray, no vLLM) is test scaffolding: tests/support/.

Importing this package itself is light (no verl engine imports).
"""
