"""Token log-probs from logits in row chunks instead of row by row (patches/README.md #11).

verl 0.9.1's `logprobs_from_logits` uses flash-attn's cross-entropy kernel where it is installed
and otherwise `logprobs_from_logits_v2`, which bounds memory by computing one row at a time: a
`logsumexp` (fp32) or `log_softmax` (bf16/fp16) per row, and its padded and packed paths hand it one
row per *token*. On the CPU toy that is ~1,600 small calls a micro-batch, ~30 ms with the backward
against ~1 ms for the same math over the whole micro-batch (bench in docs/benchmarks.md): ~10% of a
toy step. `chunked_logprobs` does the same per-row math over chunks of rows whose temporaries stay
under `MAX_CHUNK_ELEMENTS` (64 MiB of fp32), so memory stays bounded for a 150k vocabulary while a
small vocabulary takes the whole micro-batch at once. Same formula per dtype as verl's; the results
agree to float rounding (identical on the toy, ~1e-6 at a 49k vocabulary).

Installed by perl/verl_glue/engine.py (every process that builds PeRL's engine, the engine harness
included) by setting `verl.utils.torch_functional.logprobs_from_logits_v2`, the name verl's
`logprobs_from_logits` calls; the contract test pins both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_CHUNK_ELEMENTS = 1 << 24  # a chunk's rows x vocabulary: 64 MiB of fp32 per temporary


def chunked_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[labels] over the last dimension, as verl's `logprobs_from_logits_v2`
    computes it (x_label - logsumexp(x) in fp32/fp64; log_softmax then gather in lower precision),
    in chunks of rows instead of one row at a time."""
    vocab = logits.shape[-1]
    flat, flat_labels = logits.reshape(-1, vocab), labels.reshape(-1)
    rows = max(1, MAX_CHUNK_ELEMENTS // max(vocab, 1))
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(flat, -1, flat_labels.unsqueeze(-1)).squeeze(-1)
        lse = torch.cat([torch.logsumexp(flat[i:i + rows], dim=-1) for i in range(0, flat.shape[0], rows)])
        out = picked - lse
    else:  # verl: logsumexp is unstable in bf16, log_softmax per row instead
        out = torch.cat([F.log_softmax(flat[i:i + rows], dim=-1).gather(-1, flat_labels[i:i + rows].unsqueeze(-1))
                         .squeeze(-1) for i in range(0, flat.shape[0], rows)])
    return out.view(labels.shape)


def install() -> None:
    """Make verl's `logprobs_from_logits` use `chunked_logprobs` where it would loop row by row."""
    import verl.utils.torch_functional as verl_F

    verl_F.logprobs_from_logits_v2 = chunked_logprobs
