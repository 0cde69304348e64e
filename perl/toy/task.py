"""The embedded default's task and model: 2-digit addition and a tiny cold-start Llama, made in code.

The paper starts RL from SFT-distilled models; the toy does the same at toy scale: a small Llama
(a character tokenizer built in code) gets a short supervised warm start on the format
`<think>a+b=c</think>\\boxed{c}` until half its sampled answers are right, so RL has room to
improve it: 20% of the warm-start answers leave out the box (`ToyConfig.sft_boxed`), and the
arithmetic is not learnt yet when the warm start stops. The
result is an ordinary HF model directory (config, weights, tokenizer) that verl's workers and
vLLM load like any other; it is cached under `~/.cache/perl/` ($PERL_CACHE) keyed by its settings.

The shape suits vLLM's CPU attention (head size 32). The architecture is Llama rather than Qwen2:
transformers 5 loads a Qwen2 directory's tokenizer as Qwen2's byte-level BPE, which drops the
spaces this character tokenizer encodes, while a Llama directory keeps the saved tokenizer.

`ToyTask` (the config's `perl.toy` block) also writes the task's train and held-out parquet
files in verl's schema; perl.verl_glue.config points the run at all three.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field, fields

import torch
from tqdm import tqdm

from perl.generation.tokenizer import char_tokenizer, prompt_ids
from perl.io import cache_root

TOY_TEMPLATE = "{question}"  # the format is taught by the warm start; keeps prompts short on CPU
# problem streams of the train, held-out and warm-start check sets (disjoint seeds)
TRAIN_SEED, HELDOUT_SEED, CHECK_SEED = 1, 10_001, 20_001


@dataclass(frozen=True)
class ToyConfig:
    """The cold-start model: its shape and its supervised warm start."""

    digits: int = 2
    ops: tuple[str, ...] = ("add",)
    architecture: str = "llama"  # part of the cache key (the toy was a Qwen2 before; see the module docstring)
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    sft_steps: int = 1200  # at most; the warm start stops once it reaches `sft_target_acc`
    sft_batch: int = 64
    sft_lr: float = 3e-3
    # Stop the warm start once the sampled accuracy (temperature 1, as the RL rollouts sample) on
    # `sft_check_problems` validation problems reaches this, checked every `sft_check_every` steps.
    # When a tiny model "gets" addition varies with the seed and the machine's arithmetic (measured:
    # 8% to 55% after 300 steps, 12% to 72% after 600), so a fixed step count would start RL from
    # anywhere; a measured stop starts it near the target on any machine.
    sft_target_acc: float = 0.5
    sft_check_every: int = 25
    sft_check_problems: int = 128
    # Share of warm-start answers that close with \boxed{answer}; the others end with the bare number
    # after </think>, which the paper's reward scores 0 (no boxed answer). So the cold start's failures
    # are of two kinds, as a distilled model's are: the answer format (quick to learn from the
    # reward) and the arithmetic (slow): RL has both to improve.
    sft_boxed: float = 0.8
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def model_config(self, vocab_size: int, pad_token_id: int, eos_token_id: int):
        from transformers import LlamaConfig

        if self.architecture != "llama":
            raise ValueError(f"perl.toy.architecture: {self.architecture!r}; the toy is a 'llama' (see perl.toy.task)")

        config = LlamaConfig(vocab_size=vocab_size, hidden_size=self.hidden_size,
                             intermediate_size=self.hidden_size * 3, num_hidden_layers=self.layers,
                             num_attention_heads=self.heads, num_key_value_heads=self.heads,
                             max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=pad_token_id,
                             eos_token_id=eos_token_id, bos_token_id=eos_token_id)
        config.architectures = ["LlamaForCausalLM"]
        return config


@dataclass(frozen=True)
class ToyTask:
    """`perl.toy`: the cold start (ToyConfig's fields) plus the generated data sets. With
    `pretrained` ({package|path, gguf_file}, perl.toy.pretrained) the same task trains a real
    pretrained model instead of the cold start (examples/smollm2_arith.yaml)."""

    model: ToyConfig = field(default_factory=ToyConfig)
    train_size: int = 2000
    heldout_size: int = 200
    template: str = TOY_TEMPLATE  # the prompt: {question} is "What is a + b?"
    pretrained: dict | None = None

    # The block's keys that change what a run trains (its data; the model is in the run identity
    # through its path, which the cold start's settings and `pretrained` determine).
    IDENTITY = ("train_size", "digits", "ops", "template")

    @classmethod
    def from_block(cls, block: dict) -> "ToyTask":
        """From the config's `perl.toy` mapping; an unknown key is an error naming the allowed ones."""
        block = dict(block or {})
        model_keys = {f.name for f in fields(ToyConfig)}
        task_keys = {"train_size", "heldout_size", "template", "pretrained"}
        unknown = sorted(set(block) - model_keys - task_keys)
        if unknown:
            raise ValueError(f"perl.toy: unknown key(s) {unknown}; allowed: {', '.join(sorted(model_keys | task_keys))}")
        model = {k: v for k, v in block.items() if k in model_keys}
        if "ops" in model:
            model["ops"] = tuple(model["ops"])
        for key in ("train_size", "heldout_size", "digits", "sft_steps"):
            value = block.get(key, 1)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"perl.toy.{key} must be an integer >= 1, got {value!r}")
        if "{question}" not in str(block.get("template", "{question}")):
            raise ValueError(f"perl.toy.template must contain {{question}}, got {block['template']!r}")
        return cls(model=ToyConfig(**model), **{k: v for k, v in block.items() if k in task_keys})

    def model_dir(self) -> str:
        """The model the run trains: the cold start's cache directory, or the pretrained model's
        (a GGUF is converted on first use; see `materialize`)."""
        if self.pretrained:
            from perl.toy.pretrained import converted_dir, resolve_source_dir

            source = resolve_source_dir(self.pretrained)
            gguf = self.pretrained.get("gguf_file")
            return converted_dir(os.path.join(source, gguf)) if gguf else source
        return os.path.join(cache_root(), f"toy-{self.model.key()}")

    def model_shape(self):
        """The model's config before it is built (a dry run): the cold start's HF config, or the
        pretrained model's directory (a GGUF is converted once)."""
        if self.pretrained:
            from perl.toy.pretrained import pretrained_model_dir

            return pretrained_model_dir(self.pretrained)
        tok = char_tokenizer()
        return self.model.model_config(len(tok), tok.pad_token_id, tok.eos_token_id)

    def data_paths(self, run_dir: str) -> dict[str, str]:
        data = os.path.join(run_dir, "data")
        return {"train": os.path.join(data, "train.parquet"), "heldout": os.path.join(data, "heldout.parquet")}

    def materialize(self, run_dir: str, progress: bool = True) -> dict[str, str]:
        """Build (or reuse) the cold start and write the data sets; returns their paths."""
        from perl.data import write_parquet

        if self.pretrained:
            from perl.toy.pretrained import pretrained_model_dir

            model = pretrained_model_dir(self.pretrained)
        else:
            model = cold_start_dir(self.model, progress=progress)
        paths = {"model": model, **self.data_paths(run_dir)}
        for which, n, seed in (("train", self.train_size, TRAIN_SEED), ("heldout", self.heldout_size, HELDOUT_SEED)):
            stamp = f"{paths[which]}.json"  # what the file holds; another size or task rewrites it
            settings = {"n": n, "seed": seed, "digits": self.model.digits, "ops": list(self.model.ops),
                        "template": self.template}
            if not os.path.exists(paths[which]) or not os.path.exists(stamp) or json.load(open(stamp)) != settings:
                write_parquet(toy_rows(n, self.model, which, seed, self.template), paths[which])
                with open(stamp, "w") as f:
                    json.dump(settings, f)
        return paths


def toy_rows(n: int, cfg: ToyConfig, split: str, seed: int, template: str = TOY_TEMPLATE) -> list[dict]:
    """`n` problems of the toy task in verl's parquet schema."""
    from perl.data import arithmetic_rows, to_verl_rows

    return to_verl_rows(arithmetic_rows(n, cfg.digits, cfg.ops, seed=seed), "arith", split, template).rows


def solution_text(question: str, answer: str, boxed: bool = True) -> str:
    expr = question.removeprefix("What is ").rstrip("?").replace(" ", "")
    return f"<think>{expr}={answer}</think>" + (f"\\boxed{{{answer}}}" if boxed else answer)



def _problems(n: int, cfg: ToyConfig, seed: int) -> list[dict]:
    from perl.data import arithmetic_rows

    return arithmetic_rows(n, cfg.digits, cfg.ops, seed)


def build_cold_start(cfg: ToyConfig, progress: bool = True):
    """Train the tiny model on the format from scratch (deterministic for a given config)."""
    from transformers import AutoModelForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(cfg.model_config(len(tok), tok.pad_token_id, tok.eos_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * max(0.05, 1 - s / cfg.sft_steps))
    rng = random.Random(cfg.seed + 1)
    boxed = random.Random(cfg.seed + 2)  # which answers close with \boxed{} (sft_boxed)
    from perl.reward import default_reward

    check = toy_rows(cfg.sft_check_problems, cfg, "check", CHECK_SEED)
    model.train()
    bar = tqdm(range(cfg.sft_steps), desc="toy warm start", disable=not progress)
    for step in bar:
        if step and step % cfg.sft_check_every == 0:
            acc = sampled_accuracy(model, tok, check, seed=cfg.seed, reward=default_reward())
            bar.set_postfix(acc=f"{acc:.2f}")
            if acc >= cfg.sft_target_acc:
                break
        rows = _problems(cfg.sft_batch, cfg, rng.randrange(1 << 30))
        prompts = [prompt_ids(tok, [{"role": "user", "content": r["problem"]}]) for r in rows]
        targets = [tok.encode(solution_text(r["problem"], r["answer"], boxed.random() < cfg.sft_boxed),
                              add_special_tokens=False) + [tok.eos_token_id] for r in rows]
        width = max(len(p) + len(t) for p, t in zip(prompts, targets))
        ids = torch.full((len(rows), width), tok.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        for i, (p, t) in enumerate(zip(prompts, targets)):
            ids[i, : len(p) + len(t)] = torch.tensor(p + t)
            labels[i, len(p) : len(p) + len(t)] = torch.tensor(t)
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != tok.pad_token_id), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    bar.close()
    model.eval()
    return model, tok


@torch.no_grad()
def sampled_accuracy(model, tok, rows: list[dict], seed: int, reward) -> float:
    """One sample per problem at temperature 1 (PeRL's per-row-seeded sampler), scored by `reward`."""
    from perl.generation import SamplingConfig, sample

    was_training = model.training
    model.eval()
    ids = [prompt_ids(tok, r["prompt"]) for r in rows]
    outs = sample(model, ids, [seed * 100_003 + i for i in range(len(ids))], SamplingConfig(24, 1.0, 1.0),
                  [tok.eos_token_id], tok.pad_token_id)
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    scores = reward.score_batch(texts, [r["reward_model"]["ground_truth"] for r in rows])
    model.train(was_training)
    return sum(s["acc"] for s in scores) / max(len(scores), 1)


def cold_start_dir(cfg: ToyConfig = ToyConfig(), cache_dir: str | None = None, progress: bool = True) -> str:
    """The cold start's HF model directory: from the cache, or built and cached atomically."""
    from perl.io import atomic_dir

    path = os.path.join(cache_dir or cache_root(), f"toy-{cfg.key()}")
    if not os.path.exists(os.path.join(path, "config.json")):
        model, tok = build_cold_start(cfg, progress)
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            with open(os.path.join(tmp, "toy_config.json"), "w") as f:
                json.dump(asdict(cfg), f)
    return path


def cold_start(cfg: ToyConfig = ToyConfig(), cache_dir: str | None = None, progress: bool = True):
    """(model, tokenizer, path) of the cold start, loaded in fp32."""
    from transformers import AutoModelForCausalLM

    from perl.generation.tokenizer import load_tokenizer

    path = cold_start_dir(cfg, cache_dir, progress)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, load_tokenizer(path), path
