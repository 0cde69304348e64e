"""The embedded default: a synthetic arithmetic task and a tiny cold-start model made on first use.

The paper starts RL from SFT-distilled models; the toy does the same at toy scale: a small Qwen2
(char tokenizer built in code) gets a short supervised warm start on the format
`<think>a+b=c</think>\\boxed{c}` until it is partly right, then RL has room to improve it.
The result is cached (config, weights, tokenizer) under `~/.cache/perl/` keyed by its settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from perl.engine.tokenizer import char_tokenizer, prompt_ids

TOY_TEMPLATE = "{question}"  # the format is taught by the warm start; keeps prompts short on CPU


@dataclass(frozen=True)
class ToyConfig:
    digits: int = 2
    ops: tuple[str, ...] = ("add",)
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    sft_steps: int = 300
    sft_batch: int = 64
    sft_lr: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def solution_text(question: str, answer: str) -> str:
    expr = question.removeprefix("What is ").rstrip("?").replace(" ", "")
    return f"<think>{expr}={answer}</think>\\boxed{{{answer}}}"


def _problems(n: int, cfg: ToyConfig, seed: int) -> list[dict]:
    from perl.data import arithmetic_rows

    return arithmetic_rows(n, cfg.digits, cfg.ops, seed)


def build_cold_start(cfg: ToyConfig, progress: bool = True):
    """Train the tiny model on the format from scratch (deterministic for a given config)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(cfg.seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 3,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    model = Qwen2ForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * max(0.05, 1 - s / cfg.sft_steps))
    rng = random.Random(cfg.seed + 1)
    model.train()
    for step in tqdm(range(cfg.sft_steps), desc="toy warm start", disable=not progress):
        rows = _problems(cfg.sft_batch, cfg, rng.randrange(1 << 30))
        prompts = [prompt_ids(tok, [{"role": "user", "content": r["problem"]}]) for r in rows]
        targets = [tok.encode(solution_text(r["problem"], r["answer"]), add_special_tokens=False) + [tok.eos_token_id]
                   for r in rows]
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
    model.eval()
    return model, tok


def cache_root() -> str:
    """Where PeRL caches what it builds once (the toy cold start, converted GGUF models): $PERL_CACHE."""
    return os.environ.get("PERL_CACHE", os.path.expanduser("~/.cache/perl"))


def cold_start(cfg: ToyConfig = ToyConfig(), cache_dir: str | None = None, progress: bool = True):
    """(model, tokenizer, path): loaded from the cache, or built and cached atomically."""
    from transformers import AutoModelForCausalLM

    from perl.engine.tokenizer import load_tokenizer

    cache_dir = cache_dir or cache_root()
    path = os.path.join(cache_dir, f"toy-{cfg.key()}")
    if not os.path.exists(os.path.join(path, "config.json")):
        model, tok = build_cold_start(cfg, progress)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "toy_config.json"), "w") as f:
            json.dump(asdict(cfg), f)
        if os.path.exists(path):  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, load_tokenizer(path), path
