"""k-sample evaluation over benchmarks, resumable, with every sample's prediction kept.

Per benchmark: `<out>/<name>.samples.jsonl` gets one line per (problem, sample) as soon as its
batch is scored (flushed and fsynced), so a killed evaluation resumes where it stopped; because
each sample's randomness comes only from its own seed (`sample_seed`), a resumed evaluation
produces exactly the samples an uninterrupted one would. `<out>/results.json` (atomic) holds
Avg@k / Pass@k per benchmark and the overall average, recomputable from the sample files alone.
Generation: a backend from `backends.py` (vLLM, or PeRL's per-row-seeded sampler); a plain model
is sampled in-process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
from tqdm import tqdm

from perl.generation import SamplingConfig
from perl.reward import MathReward
from perl.generation.tokenizer import prompt_ids

from .backends import HFBackend, VLLMBackend
from .metrics import benchmark_metrics, sample_seed

# The paper's Table 2: k per benchmark.
PAPER_K = {"aime24": 32, "aime25": 32, "amc23": 32, "hmmt25": 32, "math500": 4, "minerva": 4}


@dataclass
class EvalConfig:
    k: dict[str, int] = field(default_factory=dict)  # per benchmark; missing: PAPER_K, else default_k
    default_k: int = 4
    seed: int = 42
    batch_size: int = 16
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=32768))

    def k_for(self, name: str) -> int:
        k = self.k.get(name, PAPER_K.get(name, self.default_k))
        if k < 1:
            raise ValueError(f"k for {name} must be >= 1, got {k}")
        return k


def _read_samples(path: str) -> dict[tuple[int, int], dict[str, Any]]:
    """Records already written; a last line cut by a kill is truncated away (its sample is redone)."""
    done: dict[tuple[int, int], dict[str, Any]] = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: that sample is simply redone
                continue
            done[(rec["problem"], rec["sample"])] = rec
    return done


def _write_json_atomic(obj: Any, path: str) -> None:
    from perl.io import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def metrics_from_samples(samples: dict[tuple[int, int], dict[str, Any]]) -> dict[str, float]:
    per_problem: dict[int, list[float]] = {}
    for (problem, _), rec in sorted(samples.items()):
        per_problem.setdefault(problem, []).append(rec["acc"])
    return benchmark_metrics(per_problem)


def evaluate(model, tokenizer, benchmarks: dict[str, str], out_dir: str, config: EvalConfig | None = None,
             reward: MathReward | None = None, progress: bool = True,
             on_batch: Callable[[str, int], None] | None = None, run_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate `model` (a HF model, or a backend such as `VLLMBackend`) on parquet benchmarks
    ({name: path}, verl schema); returns results.json's content.

    `run_info` (label, method, trainable_percent, paths) is stored with the results for `perl table`.
    """
    config = config or EvalConfig()
    reward = reward or MathReward()
    backend = model if isinstance(model, (HFBackend, VLLMBackend)) else HFBackend(model)
    os.makedirs(out_dir, exist_ok=True)
    eos = [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: dict[str, Any] = {"run": {**(run_info or {}), "backend": backend.name}, "benchmarks": {},
                               "config": {**asdict(config), "sampling": asdict(config.sampling),
                                          "reward": asdict(reward.config)}}
    for name, path in benchmarks.items():
        rows = pd.read_parquet(path).to_dict("records")
        if not rows:
            raise ValueError(f"benchmark {name}: {path} has no rows")
        k = config.k_for(name)
        samples_path = os.path.join(out_dir, f"{name}.samples.jsonl")
        done = _read_samples(samples_path)
        todo = [(i, j) for i in range(len(rows)) for j in range(k) if (i, j) not in done]
        prompts = {}
        bar = tqdm(total=len(rows) * k, initial=len(rows) * k - len(todo), desc=f"eval {name}", unit="sample",
                   disable=not progress)
        with open(samples_path, "a", encoding="utf-8") as f:
            for b, start in enumerate(range(0, len(todo), config.batch_size)):
                batch = todo[start : start + config.batch_size]
                ids = []
                for i, _ in batch:
                    if i not in prompts:
                        prompts[i] = prompt_ids(tokenizer, rows[i]["prompt"])
                    ids.append(prompts[i])
                seeds = [sample_seed(config.seed, f"{name}:{i}", j) for i, j in batch]
                outs = backend.generate(ids, seeds, config.sampling, eos, pad)
                texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
                truths = [rows[i]["reward_model"]["ground_truth"] for i, _ in batch]
                for (i, j), seed, text, out, scored in zip(batch, seeds, texts, outs, reward.score_batch(texts, truths)):
                    rec = {"problem": i, "sample": j, "seed": seed, "completion": text, "tokens": len(out),
                           "pred": scored["pred"], "score": scored["score"], "acc": scored["acc"],
                           "status": scored["status"], "ground_truth": rows[i]["reward_model"]["ground_truth"]}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    done[(i, j)] = rec
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(batch))
                if on_batch is not None:
                    on_batch(name, b)
        bar.close()
        results["benchmarks"][name] = {**metrics_from_samples(done), "k": k}
    avgs = [m["avg"] for m in results["benchmarks"].values()]
    results["overall_avg"] = sum(avgs) / len(avgs)
    _write_json_atomic(results, os.path.join(out_dir, "results.json"))
    return results
