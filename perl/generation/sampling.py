"""Batched sampling with one random generator per sequence (KV-cached, left-padded).

HF `generate` draws every row from the global RNG, so a sample depends on what else is in the
batch and k samples of one problem cannot each have their own seed. This loop draws row i from
`torch.Generator().manual_seed(seeds[i])` only: a sample is reproducible from its seed alone,
whatever batch it runs in. Written here because neither transformers nor torch offer per-row
generators; logits, cache and attention are the model's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.6  # the paper's evaluation setting; 0 = greedy
    top_p: float = 0.95

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest prefix reaching top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


@torch.no_grad()
def sample(model, prompts: Sequence[Sequence[int]], seeds: Sequence[int], config: SamplingConfig,
           eos_token_ids: Sequence[int], pad_token_id: int) -> list[list[int]]:
    """Completion token ids for each prompt (EOS included when produced)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        return []
    device = next(model.parameters()).device
    n = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    eos = torch.tensor(list(eos_token_ids), device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(n)]
    was_training = model.training
    model.eval()
    past = None
    step_ids = ids
    try:
        for _ in range(config.max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            result = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                           use_cache=True)
            past = result.past_key_values
            logits = result.logits[:, -1, :].float()
            if config.temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(_top_p_filter(logits / config.temperature, config.top_p), dim=-1)
                nxt = torch.stack([torch.multinomial(probs[i], 1, generator=generators[i])[0] for i in range(n)])
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            for i in range(n):
                if not done[i]:
                    out[i].append(int(nxt[i]))
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
            step_ids = nxt.unsqueeze(-1)
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=-1)  # finished rows: ignored
    finally:
        model.train(was_training)
    return out
