"""S-GRPO's shortened forward inside verl's FSDP engine: the update computes only what the loss uses.

S-GRPO (perl.algos.token_efficient, arXiv 2504.20834) puts the loss of response i on a small
token subset T_i: the first `alpha` tokens and Bernoulli(p) later ones, at most `k`. Masking the
loss alone (what verl's policy-loss hook can do) still runs the whole forward, the LM head over
every position, and keeps every activation for the backward. PerlFSDPEngine instead, before each
optimizer step's forward/backward (`cut_to_subset`, on the mini-batch):

1. draws T_i for every response (seeded by the optimizer step and the rank);
2. cuts every sequence after its last selected token: prompt + response[: last + 1], and every
   per-token field (advantages, old/rollout/ref log-probs, masks) with it; the response mask
   and loss mask become T_i. Transformer memory and time now scale with prompt + ~k tokens
   instead of prompt + response;
3. marks T_i (`SELECTED`), so that the LM head runs only at the positions that predict a token
   of T_i (`logits_to_keep`, which HF causal LMs take as an index tensor): logits are
   [|T|, vocab] instead of [tokens, vocab] (`subset_log_probs` scatters the log-probs back).

With `weighting="unbiased"` each kept token also carries its Horvitz-Thompson weight
|T_i| / (pi_t |y_i|) (through verl's `rollout_is_weights`, which the vanilla loss multiplies in), so
the seq-mean-token-mean loss over T_i estimates the full-token loss without bias.

Not combined with Ulysses sequence parallelism, fused LM-head kernels or static padding (the
config check refuses them with loss_mode=sgrpo). The forward-only passes (old and reference
log-probs) stay full-length: they keep no activations.
"""

from __future__ import annotations

from typing import Any

import torch

from perl.algos.token_efficient import SGRPOConfig, sgrpo_ht_weights, sgrpo_select

SELECTED = "perl_selected"  # nested bool field, per response token: in T_i


def _nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def subset_generator(seed: int, optimizer_step: int, rank: int) -> torch.Generator:
    """The generator T_i is drawn with: one stream per (run seed, optimizer step, rank), so a run's
    subsets follow its seed and a resumed run draws the same ones again."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(optimizer_step)) * 4099 + int(rank))


def cut_to_subset(data, cfg: SGRPOConfig, generator: torch.Generator) -> tuple[Any, dict[str, float]]:
    """(the mini-batch cut after each response's last selected token, stats). See the module docstring."""
    from verl.utils import tensordict_utils as tu

    responses = data["responses"]
    prompt_lens = data["prompts"].offsets().diff().tolist()
    resp_lens = responses.offsets().diff().tolist()
    masks = [m.bool() for m in data["response_mask"].unbind()]
    selected, cuts = [], []
    for mask in masks:
        sel = sgrpo_select(mask.unsqueeze(0).cpu(), cfg, generator)[0].to(mask.device) & mask
        last = int(sel.nonzero().max()) + 1 if sel.any() else 1  # an empty T_i keeps one masked token
        selected.append(sel[:last])
        cuts.append(last)
    out = data.clone(recurse=False)
    for key in list(data.keys()):
        value = data.get(key)
        if not (isinstance(value, torch.Tensor) and value.is_nested) or key in ("prompts",):
            continue
        rows = value.unbind()
        lengths = [r.shape[0] for r in rows]
        if lengths == resp_lens:
            out[key] = _nested([r[:c] for r, c in zip(rows, cuts)])
        elif lengths == [p + r for p, r in zip(prompt_lens, resp_lens)]:
            out[key] = _nested([r[: p + c] for r, p, c in zip(rows, prompt_lens, cuts)])
    for key in ("response_mask", "loss_mask"):
        if key in data.keys():
            dtype = data[key].values().dtype
            out[key] = _nested([s.to(dtype) for s in selected])
    if cfg.weighting == "unbiased":
        ht = [sgrpo_ht_weights(sel, length, cfg) for sel, length in zip(selected, resp_lens)]
        if "rollout_is_weights" in data.keys():
            ht = [w * r for w, r in zip(ht, out["rollout_is_weights"].unbind())]
        out["rollout_is_weights"] = _nested(ht)
    out[SELECTED] = _nested(selected)
    if tu.get_non_tensor_data(data=data, key="max_response_len", default=None) is not None:
        tu.assign_non_tensor_data(out, "max_response_len", max(cuts))
    n_tokens = sum(resp_lens)
    stats = {"perl/sgrpo_token_frac": sum(int(s.sum()) for s in selected) / max(n_tokens, 1),
             "perl/sgrpo_forward_token_frac": sum(p + c for p, c in zip(prompt_lens, cuts))
             / max(sum(p + r for p, r in zip(prompt_lens, resp_lens)), 1)}
    return out, stats


def loss_positions(micro_batch, use_remove_padding: bool) -> torch.Tensor:
    """The positions whose logits predict a token of T_i: flat indices into the packed sequence
    (remove-padding layout), or the union of column indices (padded layout, rows right-padded)."""
    prompt_lens = micro_batch["prompts"].offsets().diff()
    seq_offsets = micro_batch["input_ids"].offsets()[:-1]
    cols = []
    for p, start, sel in zip(prompt_lens.tolist(), seq_offsets.tolist(), micro_batch[SELECTED].unbind()):
        at = p - 1 + sel.nonzero().flatten()  # logit at p - 1 + s predicts response token s
        cols.append(at + start if use_remove_padding else at)
    positions = torch.cat(cols)
    return positions if use_remove_padding else torch.unique(positions)


def subset_log_probs(logits: torch.Tensor, keep: torch.Tensor, output_args: dict, micro_batch,
                     use_remove_padding: bool, calculate_entropy: bool) -> dict[str, torch.Tensor]:
    """verl's model output (`log_probs`, optionally `entropy`: nested over each whole sequence)
    from logits computed at `keep` only; every other position holds 0 (outside T_i, masked)."""
    import verl.utils.torch_functional as verl_F
    from verl.utils.torch_functional import logprobs_from_logits

    input_ids = micro_batch["input_ids"]
    cu_seqlens = input_ids.offsets()
    total = int(cu_seqlens[-1])
    if use_remove_padding:
        logits = logits.squeeze(0)  # (n_keep, vocab)
        logits = logits / output_args["temperature_rmpad"][keep].unsqueeze(-1).to(logits.dtype)
        labels = output_args["input_ids_rmpad_rolled"][keep]
        flat_index = keep
    else:  # (bsz, n_keep, vocab): the same kept columns for every row; use each row's own positions
        wanted = torch.zeros(len(cu_seqlens) - 1, int(cu_seqlens.diff().max()), dtype=torch.bool, device=keep.device)
        for i, (p, sel) in enumerate(zip(micro_batch["prompts"].offsets().diff().tolist(),
                                         micro_batch[SELECTED].unbind())):
            wanted[i, p - 1 + sel.nonzero().flatten().to(keep.device)] = True
        rows, cols = torch.nonzero(wanted[:, keep], as_tuple=True)
        logits = logits[rows, cols] / output_args["temperature"][rows].unsqueeze(-1).to(logits.dtype)
        flat_index = cu_seqlens[rows] + keep[cols]
        labels = output_args["input_ids_rmpad_rolled"][flat_index]
    log_probs = logprobs_from_logits(logits=logits, labels=labels, inplace_backward=False)
    out = {"log_probs": torch.zeros(total, dtype=log_probs.dtype, device=log_probs.device)
           .index_put((flat_index,), log_probs)}
    if calculate_entropy:
        entropy = verl_F.entropy_from_logits(logits)
        out["entropy"] = torch.zeros(total, dtype=entropy.dtype, device=entropy.device).index_put((flat_index,), entropy)
    return {k: torch.nested.nested_tensor_from_jagged(v, cu_seqlens) for k, v in out.items()}
