"""Rollout throughput of PeRL's per-row-seeded sampler vs plain HF `generate` on the toy model.

Same model (the toy cold start), same prompts (128 addition problems), same budget (24 new
tokens, temperature 1.0, top-p 1.0, KV cache on), batched; generated tokens per second, best of
N, as a ratio within one run. HF draws every row from one global RNG; PeRL gives each row its own
generator (what makes k-sample evaluation and resume exact), which is the cost measured here.

    python bench/toy_rollout.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from _docs import write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=128)
    args = parser.parse_args()
    import torch

    from perl.data import arithmetic_rows
    from perl.generation import SamplingConfig, sample
    from perl.generation.tokenizer import prompt_ids
    from perl.toy import ToyConfig, cold_start

    model, tok, _ = cold_start(ToyConfig())
    rows = arithmetic_rows(args.prompts, 2, ("add",), seed=5)
    prompts = [prompt_ids(tok, [{"role": "user", "content": r["problem"]}]) for r in rows]
    cfg = SamplingConfig(max_new_tokens=24, temperature=1.0, top_p=1.0)
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    ours, hf = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        outs = sample(model, prompts, list(range(len(prompts))), cfg, [tok.eos_token_id], tok.pad_token_id)
        ours.append(sum(map(len, outs)) / (time.perf_counter() - t))
        t = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = gen[:, width:]
        produced = int(((new != tok.pad_token_id) & (new != -1)).sum())
        hf.append(produced / (time.perf_counter() - t))
    best_ours, best_hf = max(ours), max(hf)
    print(f"PeRL sampler {best_ours:.0f} tok/s, HF generate {best_hf:.0f} tok/s, ratio {best_ours / best_hf:.2f}")
    write_section("toy_rollout", [
        f"### Toy rollout throughput (`bench/toy_rollout.py`, {args.prompts} prompts x 24 tokens, best of {args.repeats})",
        "",
        "| sampler | generated tokens / s | ratio |",
        "|---|---:|---:|",
        f"| HF `generate` (one global RNG) | {best_hf:.0f} | 1.00 |",
        f"| PeRL `sample` (one generator per row) | {best_ours:.0f} | {best_ours / best_hf:.2f} |",
    ])


if __name__ == "__main__":
    main()
