"""`perl.toy`: the one place where the verl glue meets the embedded default's task (perl.toy).

With `perl.toy` set, the run trains the toy's cold start (or the pretrained model it names) on the
toy's train set and evaluates on its held-out set; those paths are PeRL's to set (`TOY_KEYS`), and
what of the toy block defines the run is the toy's own list (`ToyTask.IDENTITY`).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from perl.toy.task import ToyTask

from .errors import ConfigError

# What perl.toy sets; a recipe with perl.toy must leave them alone.
TOY_KEYS = ("actor_rollout_ref.model.path", "data.train_files", "data.val_files", "perl.heldout.data")


def enabled(cfg: DictConfig) -> bool:
    return cfg.perl.get("toy") is not None


def toy_task(cfg: DictConfig) -> ToyTask:
    block = cfg.perl.toy
    try:
        return ToyTask.from_block(OmegaConf.to_container(block, resolve=True) if isinstance(block, DictConfig) else {})
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e) if str(e).startswith("perl.toy") else f"perl.toy: {e}") from None


def toy_paths(cfg: DictConfig, run_dir: str) -> None:
    """Point the run at the toy's model and data (written by `materialize_toy` before the run)."""
    task = toy_task(cfg)
    paths = task.data_paths(run_dir)
    with open_dict(cfg):
        cfg.actor_rollout_ref.model.path = task.model_dir()
        cfg.data.train_files = paths["train"]
        cfg.data.val_files = paths["heldout"]
        if cfg.perl.heldout is not None:  # perl.heldout=null: no held-out evaluation
            cfg.perl.heldout.data = paths["heldout"]


def materialize_toy(cfg: DictConfig, run_dir: str, progress: bool = True) -> None:
    """Build (once, cached) the toy's cold start and write its data sets, where perl.toy is set."""
    if enabled(cfg):
        toy_task(cfg).materialize(run_dir, progress=progress)


def identity(cfg: DictConfig) -> dict:
    """What of the toy defines the run (`ToyTask.IDENTITY`, with the task's defaults filled in), for
    the run identity (perl.verl_glue.run_dir); empty without a toy."""
    if not enabled(cfg):
        return {}
    task = toy_task(cfg)
    fields = {**vars(task.model), **vars(task)}
    return {f"perl.toy.{key}": list(v) if isinstance(v := fields[key], tuple) else v for key in ToyTask.IDENTITY}


def model_label(cfg: DictConfig) -> str | None:
    """How the first screen names the toy's model (None: not a toy run)."""
    if not enabled(cfg):
        return None
    task = toy_task(cfg)
    return "the toy's pretrained model" if task.pretrained else "the toy's cold start: a tiny Llama, cached"
