"""PiSSA/MiLoRA start-up: the SVD init of every target projection at the paper's 1.5B and 7B shapes.

verl loads the model on rank 0's CPU (the other ranks hold meta tensors and wait in the broadcast), so
without an accelerator-side init this is what rank 0 spends before training starts. Random fp32
weights of DeepSeek-R1-Distill-Qwen-1.5B / 7B's projection shapes (`perl.models.build_config`: q, k,
v, o, gate, up, down per decoder layer, 28 layers), rank 32 / alpha 64 (the paper's). Per layer it
times, one after the other on the same matrices:

- `torch.linalg.svd(W, full_matrices=False)` alone (the exact decomposition);
- PeRL's init, `perl.methods.catalog.svd_init_layer` on a peft LoRA layer (exact SVD, the factors,
  the residual W - s B A): what `peft.name=pissa` (and milora, the same work) runs per projection;
- the same with `peft.options.niter=4` (peft's randomized SVD, PiSSA only).

Each distinct projection shape of a decoder layer is timed once and counted per projection with that
shape (q/o, k/v, gate/up); all decoder layers have the same shapes, so the whole model's time is
`--layers` timed layers' mean x 28 (an extrapolation, said so in the table). Both wall clock and
this process's CPU time are kept: with one thread (`--threads`, default 1: a Ray actor without
`num_cpus` runs with OMP_NUM_THREADS=1) CPU time is what an idle core would take, while the wall
clock on this shared machine also counts the other users' load.
Writes bench/results/svd_init.json and a section of docs/benchmarks.md.

    python bench/svd_init.py [--layers 1] [--threads 1] [--models 1.5b 7b]
    (the defaults: 4 min 46 s of CPU, 9 min 49 s wall at load ~4 on the shared 2-core machine)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from _docs import write_section

MODELS = {"1.5b": "deepseek-r1-distill-qwen-1.5b", "7b": "deepseek-r1-distill-qwen-7b"}
RANK, ALPHA = 32, 64.0


def projection_shapes(name: str) -> tuple[list[tuple[str, tuple[int, int]]], int]:
    """(projection, (out, in)) of one decoder layer, and the number of layers."""
    from perl.models import build_config

    c = build_config(name)
    h, i = c.hidden_size, c.intermediate_size
    head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    shapes = [("q_proj", (c.num_attention_heads * head_dim, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)),
              ("o_proj", (h, c.num_attention_heads * head_dim)), ("gate_proj", (i, h)), ("up_proj", (i, h)),
              ("down_proj", (h, i))]
    return shapes, int(c.num_hidden_layers)


def lora_layer(shape: tuple[int, int], seed: int):
    """A peft LoRA layer around a random fp32 nn.Linear of `shape` (no init draws: A, B get overwritten)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(shape[1], shape[0], bias=False)
    with torch.no_grad():
        holder.proj.weight.normal_(0.0, 0.02)
    model = get_peft_model(holder, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"],
                                              init_lora_weights=False))
    return model.base_model.model.proj


def distinct(shapes) -> list[tuple[list[str], tuple[int, int]]]:
    """The layer's projections grouped by shape (q/o, k/v, gate/up share theirs): each shape is timed
    once and counted once per projection that has it."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, shape in shapes:
        groups.setdefault(shape, []).append(name)
    return [(names, shape) for shape, names in groups.items()]


def time_layer(shapes, seed: int) -> dict[str, float]:
    """Seconds for one decoder layer (each distinct shape timed once, times its count): wall clock and
    this process's CPU time (with one thread, what an idle core would take; the machine is shared)."""
    import torch

    from perl.methods.catalog import svd_init_layer

    out = {f"{k}_{c}": 0.0 for k in ("svd", "perl_init", "niter4") for c in ("s", "cpu_s")}

    def timed(key: str, count: int, fn) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        out[f"{key}_s"] += count * (time.perf_counter() - wall)
        out[f"{key}_cpu_s"] += count * (time.process_time() - cpu)

    for k, (names, shape) in enumerate(distinct(shapes)):
        layer = lora_layer(shape, seed * 100 + k)
        w = layer.get_base_layer().weight.detach().clone()
        timed("svd", len(names), lambda: torch.linalg.svd(w, full_matrices=False))
        timed("perl_init", len(names), lambda: svd_init_layer(layer, "default", "top"))
        with torch.no_grad():
            residual = layer.get_base_layer().weight
            delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            err = float((residual + delta - w).abs().max())
        assert err < 1e-4, (shape, err)  # the init is still exact: W_res + s B A == W
        layer.get_base_layer().weight.data = w.clone()
        timed("niter4", len(names), lambda: svd_init_layer(layer, "default", "top", niter=4))
    return out


def run_model(key: str, layers: int) -> dict:
    shapes, n_layers = projection_shapes(MODELS[key])
    per_layer = []
    for j in range(layers):
        r = time_layer(shapes, seed=j)
        per_layer.append(r)
        print(f"  {key} layer {j + 1}/{layers}: svd {r['svd_s']:.1f} s (cpu {r['svd_cpu_s']:.1f}), PeRL init "
              f"{r['perl_init_s']:.1f} s (cpu {r['perl_init_cpu_s']:.1f}), niter=4 {r['niter4_s']:.2f} s", flush=True)
    mean = {k: sum(r[k] for r in per_layer) / layers for k in per_layer[0]}
    return {"model": MODELS[key], "layers_timed": layers, "layers": n_layers, "matrices": 7 * n_layers,
            "shapes": {n: list(s) for n, s in shapes}, "per_layer_s": per_layer, "mean_layer_s": mean,
            "model_s": {k: v * n_layers for k, v in mean.items()}}


def write_markdown(results: list[dict], threads: int, load: float) -> None:
    lines = [
        f"### PiSSA/MiLoRA SVD init at the paper's shapes (`bench/svd_init.py`, CPU, {threads} thread"
        f"{'s' if threads > 1 else ''}, {time.strftime('%Y-%m-%d')})",
        "",
        f"Random fp32 weights of each model's 7 projections per decoder layer, rank {RANK}, alpha {int(ALPHA)}. "
        "exact SVD = `torch.linalg.svd(W, full_matrices=False)` alone; PeRL init = `svd_init_layer` (the same "
        "exact SVD, the factors, the residual W - s B A: what pissa and milora run per projection); niter=4 = "
        "`peft.options.niter=4` (randomized SVD, PiSSA only). Timed: each distinct shape of one decoder layer "
        "once (q/o, k/v and gate/up share theirs), counted per projection; the whole model = that layer x the "
        "number of layers (all have the same shapes), an extrapolation, not a measured model. cpu = this "
        "process's CPU time (one thread: what an idle core takes), wall = elapsed on the shared 2-core machine "
        f"(load average {load:.1f} at the start). This is what verl's rank 0 spent on its CPU before this "
        "change, single-threaded in a Ray actor without `num_cpus` (OMP_NUM_THREADS=1), while the other ranks "
        "wait in the broadcast; with CUDA visible the init now runs on the GPU, matrix by matrix (never timed "
        "here: no GPU).",
        "",
        "| model | matrices | exact SVD per layer, cpu (s) | PeRL init per layer, cpu / wall (s) "
        "| niter=4 per layer, cpu (s) | whole model, PeRL init, cpu / wall (min) | whole model, niter=4, cpu (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m, t = r["mean_layer_s"], r["model_s"]
        lines.append(f"| {r['model']} | {r['matrices']} | {m['svd_cpu_s']:.1f} | {m['perl_init_cpu_s']:.1f} / "
                     f"{m['perl_init_s']:.1f} | {m['niter4_cpu_s']:.2f} | {t['perl_init_cpu_s'] / 60:.1f} / "
                     f"{t['perl_init_s'] / 60:.1f} | {t['niter4_cpu_s']:.0f} |")
    from torch.distributed.constants import default_pg_timeout

    limit = default_pg_timeout.total_seconds() / 60
    over = [r["model"] for r in results if r["model_s"]["perl_init_cpu_s"] / 60 > limit]
    lines += ["", f"torch's default process-group timeout here is {limit:.0f} min (`torch.distributed.constants."
                  "default_pg_timeout`; NCCL's own default is compiled into CUDA builds and cannot be read on "
                  "this CPU build; verl's engine workers set none), and ranks > 0 wait for rank 0 in a collective "
                  "meanwhile: on the CPU the init exceeds it at "
                  f"{', '.join(over) if over else 'neither shape'} in CPU time alone."]
    for r in results:
        shapes = ", ".join(f"{n} {s[0]}x{s[1]}" for n, s in r["shapes"].items())
        lines.append("")
        lines.append(f"{r['model']} ({r['layers']} layers): {shapes}.")
    write_section("svd_init", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="decoder layers timed per model (then x 28)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    results = []
    for key in args.models:
        print(f"{MODELS[key]}: timing {args.layers} layer(s) ...", flush=True)
        results.append(run_model(key, args.layers))
        t = results[-1]["model_s"]
        print(f"  whole model: PeRL init {t['perl_init_cpu_s'] / 60:.1f} min cpu ({t['perl_init_s'] / 60:.1f} wall), "
              f"exact SVD alone {t['svd_cpu_s'] / 60:.1f} min cpu, niter=4 {t['niter4_cpu_s']:.0f} s cpu", flush=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "svd_init.json"), "w") as f:
        json.dump({"threads": args.threads, "rank": RANK, "alpha": ALPHA, "load_average": load, "results": results},
                  f, indent=2)
    write_markdown(results, args.threads, load)


if __name__ == "__main__":
    main()
