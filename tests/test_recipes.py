"""recipes/: every recipe dry-runs on CPU and resolves to its method, scale and the paper's values.

Table-driven: `RECIPES` says, for every recipe script, what it must train (method, model, batch
sizes, steps, lr, rank, algorithm, ...); everything not named there must be the paper's value
(section 2.4). The scripts' command lines come from the real bash driver (`recipes/_run.sh`, with a
stand-in interpreter that records its arguments), then compose and check in-process exactly as
`python -m perl.verl_glue --dry-run` does; one recipe also runs end to end through bash + python.
No two recipes may resolve to the same configuration (a renamed copy training another method is a
known failure of a public PEFT-RL repo). Models: config.json-only fixtures of the paper's models
(`tests/fixtures/models`); the dry run adapts a meta-device copy, no weights, no hub.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from perl.methods import METHODS
from perl.models import KNOWN_CONFIGS
from perl.verl_glue import config as vc
from perl.verl_glue.entry import prepare

# One pytest-xdist worker runs this whole file (pytest.ini: --dist loadgroup): its tests share each
# recipe's dry run (`resolve`, ~1.5 s each), which two workers would each compute again.
pytestmark = pytest.mark.xdist_group("recipes")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE_DIR = os.path.join(ROOT, "recipes")
DRIVER = os.path.join(RECIPE_DIR, "_run.sh")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "models")
R1_15B, R1_7B, QWEN2_15B = "DeepSeek-R1-Distill-Qwen-1.5B", "DeepSeek-R1-Distill-Qwen-7B", "Qwen2-1.5B"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DATA_FILES = ("dapo-math-17k", "aime24", "aime25", "amc23", "svamp_train", "svamp_test")

# ---------------------------------------------------------------------------------------------
# the table: what each recipe must resolve to
# ---------------------------------------------------------------------------------------------

# The paper's settings (section 2.4) at 1.5B: DAPO, G=8, lr 1e-5 constant without warmup, clip
# 0.2/0.28, no KL, prompt 512 / completion 16384, rank 32, alpha 64, dropout 0.05, all linear
# modules, global batch 128 completions (16 prompts x 8), 4 per device, 1024 steps; 7B: batch 32
# completions (4 prompts), 1 per device, 8192 steps. verl counts prompts: batch=16 / 4 below.
PAPER = dict(
    model=R1_15B, algorithm="dapo", loss_mode="token", policy_loss="vanilla", adv_estimator="grpo",
    lr=1e-5, warmup=0, scheduler="constant", weight_decay=0.0, clip=(0.2, 0.28), loss_agg="token-mean",
    norm_adv_by_std=True, dynamic_sampling=True, kl=False, n=8, prompt=512, response=16384,
    rank=32, alpha=64, dropout=0.05, targets=ALL_LINEAR, batch=16, mini=16, micro=4, log_prob_micro=4,
    steps=1024, n_gpus=8, nnodes=1, train_files=["dapo-math-17k.parquet"], val_files=["aime24.parquet"],
    save_freq=128, keep=2, resume="auto", test_freq=-1, val_before_train=False, trainer_mode="perl_sync",
)
SCALE_7B = dict(model=R1_7B, batch=4, mini=4, micro=1, log_prob_micro=1, steps=8192, save_freq=512)
OWN_TARGETS = {"full": [], "ia3": ["k_proj", "v_proj", "down_proj"],
               "ln_tuning": ["input_layernorm", "post_attention_layernorm", "norm"]}
FULL_LR = 1e-6  # the paper's full fine-tuning run


def expect(method: str, **changes) -> dict:
    row = dict(PAPER, method=method, targets=OWN_TARGETS.get(method, ALL_LINEAR))
    if method == "full":
        row["lr"] = FULL_LR
    row.update(changes)
    return row


GRPO_PRESET = dict(clip=(0.2, 0.2), loss_agg="seq-mean-token-mean", dynamic_sampling=False)
SVAMP = dict(model=QWEN2_15B, algorithm="grpo", rank=16, alpha=32, batch=32, mini=32, steps=200, prompt=256,
             response=256, n_gpus=1, save_freq=50, train_files=["svamp_train.parquet"],
             val_files=["svamp_test.parquet"], **GRPO_PRESET)

RECIPES: dict[str, dict] = {
    # paper Table 3 (1.5B) and Table 6 (7B; plus the methods the paper did not run at 7B)
    **{f"dapo_{m}_1.5b": expect(m) for m in METHODS},
    **{f"dapo_{m}_7b": expect(m, **SCALE_7B) for m in METHODS},
    # paper Table 5 / Figure 4 ablations, LoRA at 1.5B (the 128 / DAPO / 1e-5 / rank-32 cells are dapo_lora_1.5b)
    "grpo_lora_1.5b": expect("lora", algorithm="grpo", **GRPO_PRESET),
    "drgrpo_lora_1.5b": expect("lora", algorithm="drgrpo", clip=(0.2, 0.2), loss_agg="seq-mean-token-sum-norm",
                               norm_adv_by_std=False, dynamic_sampling=False),
    "dapo_lora_bsz32_1.5b": expect("lora", batch=4, mini=4),
    "dapo_lora_lr5e-6_1.5b": expect("lora", lr=5e-6),
    "dapo_lora_lr1e-6_1.5b": expect("lora", lr=1e-6),
    "dapo_lora_r1_1.5b": expect("lora", rank=1),
    "dapo_lora_r8_1.5b": expect("lora", rank=8),
    "dapo_lora_r16_1.5b": expect("lora", rank=16),
    # beyond the paper: rank 1 at "LoRA Without Regret"'s alpha 32 and lr = 10 x the full-FT lr (1e-6)
    "dapo_lora_r1_lwr_1.5b": expect("lora", rank=1, alpha=32, lr=1e-5),
    # long-horizon scaling: resumable, periodic evaluation, checkpoint retention
    "dapo_dora_scaling_1.5b": expect("dora", steps=4096, test_freq=64, save_freq=64, keep=4, val_before_train=True,
                                     val_files=["aime24.parquet", "aime25.parquet", "amc23.parquet"]),
    # arXiv 2504.20834 (token-efficient RL) on Qwen2-1.5B / SVAMP
    "sgrpo_lora_qwen2_1.5b": expect("lora", loss_mode="sgrpo", policy_loss="sgrpo", **SVAMP),
    "tspmo_lora_qwen2_1.5b": expect("lora", **dict(SVAMP, loss_mode="tspmo", policy_loss="tspmo", adv_estimator="tspmo",
                                                   loss_agg="seq-mean-token-sum")),
}


def observed(cfg, summary: dict) -> dict:
    """The same fields as the table, read back from a composed config and its adapter summary."""
    r = vc.resolved(cfg)
    arr, actor, rollout, algo, trainer = r.actor_rollout_ref, r.actor_rollout_ref.actor, \
        r.actor_rollout_ref.rollout, r.algorithm, r.trainer
    files = (lambda f: [os.path.basename(x) for x in (f if OmegaConf.is_list(f) else [f])])
    return dict(
        method=r.peft.name, model=os.path.basename(arr.model.path), algorithm=r.perl.algorithm,
        loss_mode=r.perl.loss_mode, policy_loss=actor.policy_loss.loss_mode, adv_estimator=algo.adv_estimator,
        lr=actor.optim.lr, warmup=actor.optim.lr_warmup_steps, scheduler=actor.optim.lr_scheduler_type,
        weight_decay=actor.optim.weight_decay, clip=(actor.clip_ratio_low, actor.clip_ratio_high),
        loss_agg=actor.loss_agg_mode, norm_adv_by_std=algo.norm_adv_by_std_in_grpo,
        dynamic_sampling=algo.filter_groups.enable, kl=actor.use_kl_loss or algo.use_kl_in_reward,
        n=rollout.n, prompt=r.data.max_prompt_length, response=r.data.max_response_length,
        rank=r.peft.rank, alpha=r.peft.alpha, dropout=r.peft.dropout, targets=list(summary["target_modules"]),
        batch=r.data.train_batch_size, mini=actor.ppo_mini_batch_size, micro=actor.ppo_micro_batch_size_per_gpu,
        log_prob_micro=rollout.log_prob_micro_batch_size_per_gpu, steps=trainer.total_training_steps,
        n_gpus=trainer.n_gpus_per_node, nnodes=trainer.nnodes,
        train_files=files(r.data.train_files), val_files=files(r.data.val_files),
        save_freq=trainer.save_freq, keep=trainer.max_actor_ckpt_to_keep, resume=trainer.resume_mode,
        test_freq=trainer.test_freq, val_before_train=trainer.val_before_train, trainer_mode=trainer.v1.trainer_mode,
    )


# ---------------------------------------------------------------------------------------------
# running the driver
# ---------------------------------------------------------------------------------------------


def scripts() -> list[str]:
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(RECIPE_DIR, "*.sh"))
                  if not os.path.basename(p).startswith("_"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """DATA_DIR with a small file of every name the recipes use, OUTPUT_DIR, and a stand-in
    interpreter that records the driver's command line (NUL-separated) instead of running it."""
    from perl.data import arithmetic_rows, to_verl_rows, write_parquet

    root = tmp_path_factory.mktemp("recipes")
    data = root / "data"
    data.mkdir()
    rows = to_verl_rows(arithmetic_rows(4, 1, ("add",), seed=0), "arith", "train").rows
    for name in DATA_FILES:  # the config check reads the data files; the training set at DAPO-Math-17k's size
        write_parquet(rows * (DAPO_17K_ROWS // len(rows)) if name == "dapo-math-17k" else rows,
                      str(data / f"{name}.parquet"))
    argv_file = root / "argv"
    stub = root / "record-argv"
    stub.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > '{argv_file}'\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return {"root": root, "data": str(data), "out": str(root / "out"), "stub": str(stub), "argv": argv_file}


def driver_argv(env, recipe: str, *args: str, **knobs: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`bash recipes/<recipe>.sh args` with PYTHON=the recorder: (process, the interpreter's argv)."""
    if env["argv"].exists():
        env["argv"].unlink()
    base = {k: v for k, v in os.environ.items()
            if k not in ("MODEL_PATH", "DATA_DIR", "OUTPUT_DIR", "N_GPUS", "N_NODES", "LOGGER", "DRY_RUN",
                         "TENSORBOARD_DIR", "RAY_ADDRESS")}
    proc = subprocess.run(["bash", os.path.join(RECIPE_DIR, f"{recipe}.sh"), *args], capture_output=True, text=True,
                          env={**base, "PYTHON": env["stub"], **knobs}, cwd=str(env["root"]), timeout=60)
    argv = env["argv"].read_text().split("\0")[:-1] if env["argv"].exists() else []
    return proc, argv


def knobs_for(env, recipe: str) -> dict[str, str]:
    model = RECIPES[recipe]["model"]
    return {"MODEL_PATH": os.path.join(FIXTURES, model), "DATA_DIR": env["data"], "OUTPUT_DIR": env["out"],
            "DRY_RUN": "1"}


_RESOLVED: dict[str, tuple] = {}


def resolve(env, recipe: str):
    """(driver argv, composed config, adapter summary) of a recipe's dry run, computed once."""
    if recipe not in _RESOLVED:
        proc, argv = driver_argv(env, recipe, **knobs_for(env, recipe))
        assert proc.returncode == 0, proc.stderr
        assert argv[:2] == ["-m", "perl.verl_glue"], argv
        args = [a for a in argv[2:] if a != "--no-path-checks"]  # in-process, data paths are checked too
        _, cfg, summary = prepare(args)
        _RESOLVED[recipe] = (argv, cfg, summary)
    return _RESOLVED[recipe]


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def test_every_recipe_is_in_the_table_and_has_one_yaml():
    yamls = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(RECIPE_DIR, "yaml", "*.yaml")))
    assert scripts() == sorted(RECIPES), "a recipe script without a row in RECIPES (or a row without a script)"
    assert sorted(set(yamls) - {"common"}) == sorted(RECIPES)
    assert len([r for r in RECIPES if r.startswith("dapo_") and r.endswith(("_1.5b", "_7b"))
                and r.split("_", 1)[1].rsplit("_", 1)[0] in METHODS]) == 2 * len(METHODS) == 28


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_script_is_the_one_line_driver_call(recipe):
    """Every script is the same call (the recipe is its own file name), so no script carries logic
    or can point at another recipe's YAML."""
    lines = [ln for ln in open(os.path.join(RECIPE_DIR, f"{recipe}.sh")).read().splitlines()
             if ln and not ln.startswith("#")]
    assert lines == ['exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"']
    assert os.access(os.path.join(RECIPE_DIR, f"{recipe}.sh"), os.X_OK)


# 1.5B recipes that change one knob of another recipe (LoRA's rank, lr or batch; DoRA's scaling run)
VARIANTS = {"dapo_lora_bsz32_1.5b", "dapo_lora_lr1e-6_1.5b", "dapo_lora_lr5e-6_1.5b", "dapo_lora_r16_1.5b",
            "dapo_lora_r1_1.5b", "dapo_lora_r1_lwr_1.5b", "dapo_lora_r8_1.5b", "dapo_dora_scaling_1.5b"}


def by_scale(recipes):
    """The slow tier holds the 7B rows and the 1.5B variants: the fast loop checks one 1.5B recipe
    per method and algorithm, CI all of them."""
    assert VARIANTS <= set(RECIPES)
    return [pytest.param(r, marks=pytest.mark.slow) if RECIPES[r]["model"] == R1_7B or r in VARIANTS else r
            for r in sorted(recipes)]


@pytest.mark.parametrize("recipe", by_scale(RECIPES))
def test_recipe_resolves_to_its_method_scale_and_the_paper_values(env, recipe):
    argv, cfg, summary = resolve(env, recipe)
    want = RECIPES[recipe]
    got = observed(cfg, summary)
    assert got == want, {k: (got[k], want[k]) for k in want if got.get(k) != want[k]}
    # the method really is the one built (PeRL's spec for the workers, verl's ref-in-actor switch)
    model = cfg.actor_rollout_ref.model
    assert summary["method"] == model.lora.perl.spec.name == want["method"]
    assert model.lora_rank == (0 if want["method"] == "full" else want["rank"])
    assert model.external_lib == "perl.verl_glue.engine"
    assert 0 < summary["trainable"] <= summary["total"]
    if want["method"] == "full":
        assert summary["trainable"] == summary["total"]
    else:
        assert summary["trainable"] < 0.05 * summary["total"]
    # AdaLoRA's budget schedule is over the recipe's optimizer steps
    assert model.lora.perl.total_steps == want["steps"] * vc.updates_per_step(cfg)
    # the knobs: the experiment is the recipe, checkpoints under OUTPUT_DIR/<recipe>, data under DATA_DIR
    assert cfg.trainer.experiment_name == recipe
    assert cfg.trainer.default_local_dir == os.path.join(env["out"], recipe)
    assert os.path.dirname(vc.resolved(cfg).data.train_files) == env["data"]
    assert list(cfg.trainer.logger) == ["console"]
    assert "--dry-run" in argv


# Each recipe's GPU node: (GPUs per node, nodes, GB per GPU). The paper's runs: 8 x 80 GB (the
# default N_GPUS; A100/H100); the token-efficient-RL recipes: the paper's one 40 GB GPU.
NODES = {**{r: (8, 1, 80.0) for r in RECIPES}, "sgrpo_lora_qwen2_1.5b": (1, 1, 40.0),
         "tspmo_lora_qwen2_1.5b": (1, 1, 40.0)}


@pytest.mark.parametrize("recipe", by_scale(RECIPES))
def test_recipe_passes_the_gpu_checks_of_its_own_node(env, recipe):
    """The dry run (resolve) already ran every config check; here the GPU checks again, by name:
    the rollout's layout fits the node's GPUs, dynamic batching (if on) holds a sequence, the sync
    backend is PeRL's, and the memory estimate is below the node's GPU memory."""
    from perl.models import build_config

    argv, cfg, summary = resolve(env, recipe)
    gpus, nodes, gpu_gb = NODES[recipe]
    assert (cfg.trainer.n_gpus_per_node, cfg.trainer.nnodes) == (gpus, nodes)
    r = cfg.actor_rollout_ref.rollout
    assert gpus * nodes % (r.tensor_model_parallel_size * r.data_parallel_size * r.pipeline_model_parallel_size) == 0
    hf = build_config(cfg.actor_rollout_ref.model.path)
    notes = vc.gpu_run_checks(cfg, hf, summary, on_node=False)
    assert notes == summary["gpu_notes"]
    est = vc.estimate_memory(cfg, hf, summary["total"], summary["trainable"])
    memory = next(n for n in notes if "memory estimate" in n)
    assert est.total < gpu_gb and f"{est.total:.1f} GB per GPU" in memory and f"of {gpu_gb:.1f} GB" in memory
    assert "over the GPU's memory" not in memory
    if gpus == 1:  # the SVAMP recipes ran verl's default rollout TP 2 on their one GPU: refused, naming it
        with pytest.raises(vc.ConfigError, match="tensor_model_parallel_size=2 x .* = 1 x 1 = 1 GPU"):
            prepare([a for a in argv[2:] if a != "--no-path-checks"] +
                    ["actor_rollout_ref.rollout.tensor_model_parallel_size=2"])


@pytest.mark.parametrize("recipe", by_scale(["dapo_tinylora_1.5b", "dapo_tinylora_7b"]))
def test_tinylora_recipes_train_the_papers_13_parameters(env, recipe):
    """TinyLoRA's recipes (arXiv 2602.04118): SVD rank 2, u=13, one vector tied across every
    projection of every layer: 13 trained parameters whatever the model's size."""
    _, cfg, summary = resolve(env, recipe)
    assert dict(cfg.peft.options) == {"r": 2, "u": 13, "weight_tying": 1.0}
    assert summary["options"] == {"r": 2, "u": 13, "weight_tying": 1.0, "projection_seed": 42, "save_projection": True}
    assert summary["trainable"] == 13 and summary["category"] == "Efficient"


def test_the_fixture_models_are_the_paper_models():
    for name, known in ((R1_15B, "deepseek-r1-distill-qwen-1.5b"), (R1_7B, "deepseek-r1-distill-qwen-7b")):
        cfg = json.load(open(os.path.join(FIXTURES, name, "config.json")))
        assert cfg["architectures"] == ["Qwen2ForCausalLM"]
        for key, value in KNOWN_CONFIGS[known].items():
            assert cfg[key] == value, (name, key)


@pytest.mark.slow  # CLI subprocesses: a few seconds of imports each
def test_no_two_recipes_resolve_to_the_same_configuration(env):
    """Resolved configs, with the run's name and output location blanked out, must all differ."""
    seen: dict[str, str] = {}
    for recipe in sorted(RECIPES):
        _, cfg, _ = resolve(env, recipe)
        # the run's name and output directory also reach interpolated keys (rollout.trace.experiment_name)
        key = json.dumps(OmegaConf.to_container(vc.resolved(cfg)), sort_keys=True, default=str)
        key = key.replace(cfg.trainer.default_local_dir, "<OUTPUT_DIR>").replace(f'"{recipe}"', '"<RECIPE>"')
        assert recipe not in key
        if key in seen:
            pytest.fail(f"{recipe} resolves to the same configuration as {seen[key]}")
        seen[key] = recipe
    assert len(seen) == len(RECIPES)


def test_recipe_defaults_chain_and_data_dir(tmp_path):
    """The two entry-point features recipes/ relies on: `defaults:` (YAML includes, relative to the
    including file, in order, recipe last) and perl.data_dir (relative data files live under it)."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.yaml").write_text("peft: {name: dora, rank: 4}\ndata: {train_batch_size: 64}\n")
    (tmp_path / "b.yaml").write_text("defaults: [sub/a.yaml]\npeft: {rank: 8}\n")
    (tmp_path / "r.yaml").write_text("defaults: [b.yaml]\npeft: {alpha: 3}\nperl: {data_dir: d}\n"
                                     "data: {train_files: t.parquet, val_files: [v.parquet, /abs/w.parquet, hdfs://x/y]}\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg = vc.compose(str(tmp_path / "r.yaml"))
    finally:
        os.chdir(cwd)
    assert (cfg.peft.name, cfg.peft.rank, cfg.peft.alpha, cfg.data.train_batch_size) == ("dora", 8, 3, 64)
    assert cfg.perl.data_dir == str(tmp_path / "d") and cfg.data.train_files == str(tmp_path / "d" / "t.parquet")
    assert list(cfg.data.val_files) == [str(tmp_path / "d" / "v.parquet"), "/abs/w.parquet", "hdfs://x/y"]
    assert "defaults" not in cfg
    (tmp_path / "loop.yaml").write_text("defaults: [loop2.yaml]\n")
    (tmp_path / "loop2.yaml").write_text("defaults: [loop.yaml]\n")
    for recipe, text in (("loop.yaml", "includes itself"), ("missing.yaml", "does not exist")):
        with pytest.raises(vc.ConfigError, match=text):
            vc.compose(str(tmp_path / recipe))
    (tmp_path / "bad.yaml").write_text("defaults: [nope.yaml]\n")
    with pytest.raises(vc.ConfigError, match="nope.yaml does not exist .in the defaults of"):
        vc.compose(str(tmp_path / "bad.yaml"))


def test_driver_knobs(env):
    recipe = "dapo_dora_7b"
    knobs = dict(knobs_for(env, recipe), N_GPUS="4", N_NODES="2", LOGGER="console,wandb , tensorboard")
    proc, argv = driver_argv(env, recipe, "--format", "json", "trainer.save_freq=7", "+trainer.extra=1", **knobs)
    assert proc.returncode == 0, proc.stderr
    assert argv[:4] == ["-m", "perl.verl_glue", "--config", os.path.join(RECIPE_DIR, "yaml", f"{recipe}.yaml")]
    assert "--dry-run" in argv and "--no-path-checks" in argv and argv[argv.index("--format") + 1] == "json"
    out = os.path.join(env["out"], recipe)
    for item in ("trainer.n_gpus_per_node=4", "trainer.nnodes=2", "trainer.logger=[console,wandb,tensorboard]",
                 f"actor_rollout_ref.model.path={FIXTURES}/{R1_7B}", f"perl.data_dir={env['data']}",
                 f"trainer.default_local_dir={out}", f"trainer.experiment_name={recipe}",
                 f"+ray_kwargs.ray_init.runtime_env.env_vars.TENSORBOARD_DIR={out}/tensorboard"):
        assert item in argv, item
    assert argv[-2:] == ["trainer.save_freq=7", "+trainer.extra=1"]  # user overrides last: they win
    assert f"+ {env['stub']} -m perl.verl_glue --config" in proc.stderr  # the command is echoed
    assert not os.path.exists(out)  # a dry run creates nothing

    # --dry-run as an argument; relative paths become absolute (Ray workers need not share the cwd)
    proc, argv = driver_argv(env, recipe, "--dry-run", MODEL_PATH=os.path.relpath(os.path.join(FIXTURES, R1_7B),
                                                                                     str(env["root"])),
                             DATA_DIR="data", OUTPUT_DIR="runs")
    assert proc.returncode == 0, proc.stderr
    assert "--dry-run" in argv and f"perl.data_dir={env['data']}" in argv
    assert f"actor_rollout_ref.model.path={FIXTURES}/{R1_7B}" in argv
    assert f"trainer.default_local_dir={env['root']}/runs/{recipe}" in argv
    assert not any(a.startswith(("trainer.n_gpus_per_node", "trainer.nnodes", "+ray_kwargs")) for a in argv)

    # not a dry run: no --dry-run, the output directory and its launch log are created
    proc, argv = driver_argv(env, recipe, OUTPUT_DIR=env["out"], MODEL_PATH="hdfs://models/r1-7b")
    assert proc.returncode == 0, proc.stderr
    assert "--dry-run" not in argv and "actor_rollout_ref.model.path=hdfs://models/r1-7b" in argv
    assert "perl.verl_glue" in open(os.path.join(env["out"], recipe, "launches.log")).read()


@pytest.mark.parametrize("args,knobs,text", [
    ((), {"LOGGER": "console,neptune"}, "unknown logger 'neptune'"),
    ((), {"N_GPUS": "eight"}, "N_GPUS=eight: expected a positive integer"),
    ((), {"N_NODES": "0"}, "N_NODES=0: expected a positive integer"),
    (("--dryrun",), {}, "unknown option --dryrun"),
    (("--format",), {}, "--format needs a value"),
    ((), {"N_NODES": "2", "DRY_RUN": "0"}, "needs a running Ray cluster"),
])
def test_driver_errors(env, args, knobs, text, tmp_path):
    # Ray records a running cluster under its temp dir (RAY_TMPDIR): an empty one means none
    proc, argv = driver_argv(env, "dapo_lora_1.5b", *args, RAY_TMPDIR=str(tmp_path), **knobs)
    assert proc.returncode == 2 and text in proc.stderr and argv == []


def test_driver_names_a_missing_recipe_and_takes_a_yaml_path(env, tmp_path):
    proc = subprocess.run(["bash", DRIVER, "dapo_lora_3b"], capture_output=True, text=True)
    assert proc.returncode == 2 and "recipe dapo_lora_3b" in proc.stderr and "does not exist" in proc.stderr
    custom = tmp_path / "my_dora.yaml"
    custom.write_text(f"defaults: [{RECIPE_DIR}/yaml/dapo_dora_1.5b.yaml]\npeft:\n  rank: 8\n")
    base = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "OUTPUT_DIR")}
    proc = subprocess.run(["bash", DRIVER, str(custom), "--dry-run"], capture_output=True, text=True,
                          env={**base, "PYTHON": env["stub"]}, cwd=str(env["root"]))
    assert proc.returncode == 0, proc.stderr
    argv = env["argv"].read_text().split("\0")[:-1]
    assert argv[3] == str(custom) and "trainer.experiment_name=my_dora" in argv
    _, cfg, summary = prepare([*argv[2:], f"actor_rollout_ref.model.path={FIXTURES}/{R1_15B}"])
    assert summary["method"] == "dora" and cfg.peft.rank == 8 and cfg.data.train_batch_size == 16


def test_help():
    proc = subprocess.run(["bash", DRIVER, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for knob in ("MODEL_PATH", "DATA_DIR", "OUTPUT_DIR", "N_GPUS", "N_NODES", "LOGGER", "DRY_RUN"):
        assert knob in proc.stdout


@pytest.mark.slow
def test_a_recipe_end_to_end_through_bash_and_python(env):
    """The real path: bash recipes/<x>.sh with DRY_RUN=1 runs the entry point, which prints the
    resolved config (stdout) and the adapted model; it equals the in-process resolution."""
    recipe = "dapo_dora_7b"
    base = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    proc = subprocess.run(["bash", os.path.join(RECIPE_DIR, f"{recipe}.sh")], capture_output=True, text=True,
                          env={**base, **knobs_for(env, recipe), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                               "HF_HUB_OFFLINE": "1"}, cwd=str(env["root"]), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text, rest = proc.stdout.split("# run (perl.derived)")
    arithmetic, adapted = rest.split("# adapted model")
    printed = OmegaConf.create(text)
    assert "completions per trainer step" in arithmetic and "epochs of 17,400 rows (the data files)" in arithmetic
    assert "method:     dora (Structural)" in adapted and "of 7,615,616,512 parameters" in adapted
    _, cfg, _ = resolve(env, recipe)
    assert OmegaConf.to_container(printed) == OmegaConf.to_container(vc.resolved(cfg))


def test_bash_syntax():
    for path in [DRIVER, *(os.path.join(RECIPE_DIR, f"{r}.sh") for r in scripts())]:
        proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert proc.returncode == 0, (path, proc.stderr)


def _required(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no")


def test_shellcheck():
    """Every bash script of the repository passes shellcheck (installed by scripts/setup_env.sh with
    PERL_WITH_SHELLCHECK=1; scripts/test.sh sets it and PERL_REQUIRE_SHELLCHECK=1)."""
    paths = sorted(glob.glob(os.path.join(RECIPE_DIR, "*.sh")) + glob.glob(os.path.join(ROOT, "scripts", "*.sh")))
    assert len(paths) > len(RECIPES)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        message = ("shellcheck is not installed (Debian: apt-get install shellcheck; "
                   "PERL_WITH_SHELLCHECK=1 bash scripts/setup_env.sh does it)")
        if _required("CI") or _required("PERL_REQUIRE_SHELLCHECK"):
            pytest.fail(message)
        pytest.skip(message)
    proc = subprocess.run([shellcheck, "--severity=style", *paths], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-5000:]


# ---------------------------------------------------------------------------------------------
# the paper's batch: completions per optimizer step, and the run length in epochs (issue: TRL counts completions)
# ---------------------------------------------------------------------------------------------

DAPO_17K_ROWS = 17400  # recipes/yaml/common.yaml: the size the arithmetic uses without the data at hand


def expected_run(recipe: str) -> tuple[int, float]:
    """(completions per optimizer step, epochs of DAPO-Math-17k) the paper's numbers give."""
    if recipe.endswith("_7b"):
        return 32, 8192 * 4 / DAPO_17K_ROWS  # 4 prompts x 8, 8192 steps: ~1.9 epochs
    if "bsz32" in recipe:
        return 32, 1024 * 4 / DAPO_17K_ROWS
    if "scaling" in recipe:
        return 128, 4096 * 16 / DAPO_17K_ROWS
    return 128, 1024 * 16 / DAPO_17K_ROWS  # 16 prompts x 8, 1024 steps: ~0.94 epochs


PAPER_RECIPES = sorted(r for r in RECIPES if RECIPES[r]["train_files"] == ["dapo-math-17k.parquet"])


@pytest.mark.parametrize("recipe", by_scale(PAPER_RECIPES))
def test_paper_recipes_count_the_batch_in_completions_as_the_paper(env, recipe):
    _, cfg, _ = resolve(env, recipe)
    d = vc.resolved(cfg).perl.derived
    completions, epochs = expected_run(recipe)
    assert d.completions_per_optimizer_step == completions == d.completions_per_step
    assert d.optimizer_steps_per_step == 1 and d.prompts_per_step * 8 == completions
    assert d.dataset_rows == DAPO_17K_ROWS and d.dataset_rows_from == "the data files"
    assert d.epochs == pytest.approx(epochs, abs=1e-3)
    # gradient accumulation follows from the GPUs: the recipes' 8 GPUs at per-device 4 (1 at 7B)
    assert d.grad_accumulation_per_gpu == completions // 8 // (1 if recipe.endswith("_7b") else 4)
    if recipe == "dapo_lora_1.5b":
        assert round(d.epochs, 2) == 0.94
    if recipe == "dapo_lora_7b":
        assert round(d.epochs, 1) == 1.9


def test_dry_run_shows_the_batch_arithmetic(env, capsys):
    """DRY_RUN=1 bash recipes/dapo_dora_1.5b.sh: the numbers a reader checks against the paper."""
    from perl.verl_glue.entry import main

    argv, _, _ = resolve(env, "dapo_dora_1.5b")
    capsys.readouterr()
    assert main([a for a in argv[2:] if a != "--no-path-checks"]) == 0
    out = capsys.readouterr().out
    assert "# run (perl.derived)" in out
    assert "16 prompts x G = 128 completions per trainer step; 1 optimizer step(s) of 128 completions" in out
    assert "8 GPUs, gradient accumulation 4 micro-batches per optimizer step" in out
    assert "16,384 prompts = 0.942 epochs of 17,400 rows (the data files)" in out
    # without the files at hand, the recipe's declared size (recipes/yaml/common.yaml) is used
    _, far, _ = prepare([a for a in argv[2:] if not a.startswith("perl.data_dir=")] + ["perl.data_dir=/nonexistent",
                                                                                      "--dry-run", "--no-path-checks"])
    assert (far.perl.derived.dataset_rows, far.perl.derived.dataset_rows_from) == (DAPO_17K_ROWS, "perl.dataset_rows")
    # the other reading is one explicit override away
    _, cfg, _ = prepare([a for a in argv[2:] if a != "--no-path-checks"] +
                        ["data.train_batch_size=128", "actor_rollout_ref.actor.ppo_mini_batch_size=128"])
    assert vc.resolved(cfg).perl.derived.completions_per_optimizer_step == 1024
