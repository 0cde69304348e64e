"""Peak memory of one update step: S-GRPO (token subset) vs full-token GRPO at the same batch.

One group of G responses (prompt P tokens, response R tokens, random ids) through one optimizer
step of a LoRA policy: forward, policy loss, backward, AdamW step. Variants, each in a fresh
process so that peaks do not mix:

  token        the CPU engine's full-token path (`_log_probs_and_entropy`: full logits, every token)
  sgrpo_mask   S-GRPO's subset used only as a loss mask over the full forward (what a policy-loss
               hook in verl can do: same algorithm, no memory saving expected)
  sgrpo        S-GRPO as the CPU engine runs it (`selected_token_log_probs`: forward truncated after
               the last selected position, LM head / log-softmax only at the selected positions)

Measured (CPU has no allocator peak counter like torch.cuda.max_memory_allocated):
  saved MB     bytes of the distinct tensor storages autograd saves for backward during the step's
               forward (torch.autograd.graph.saved_tensors_hooks; parameters excluded) - the
               activation memory held when backward starts, the dominant term of the peak
  peak RSS MB  process peak resident memory during the step minus resident memory just before it
               (getrusage ru_maxrss; includes the transient logits/softmax buffers and gradients)
On a CUDA machine (--device cuda) torch.cuda.max_memory_allocated is reported as well.

    python bench/token_efficient_memory.py [--arch qwen2-0.5b --layers 2 --group 8 --prompt 64 --response 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from _docs import write_section  # noqa: E402

VARIANTS = ("token", "sgrpo_mask", "sgrpo")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    from perl.algos.token_efficient import (SGRPOConfig, selected_token_log_probs, sgrpo_select, sgrpo_weights,
                                            weighted_policy_loss)
    from perl.local.engine import RLConfig, _actor_config, _log_probs_and_entropy
    from perl.methods import adapt
    from perl.models import build_config

    torch.manual_seed(0)
    dev = torch.device(args.device)
    config = build_config(args.arch)
    if args.layers:
        config.num_hidden_layers = args.layers
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    policy = adapt(model, {"name": "lora", "rank": args.rank, "alpha": 2.0 * args.rank, "dropout": 0.0})
    policy.model.to(dev).train()
    opt = torch.optim.AdamW(policy.param_groups(1e-5), lr=1e-5)
    vocab = policy.model.get_base_model().config.vocab_size
    g, p_len, r_len = args.group, args.prompt, args.response
    gen = torch.Generator().manual_seed(1)
    seqs = torch.randint(2, vocab, (g, p_len + r_len), generator=gen).to(dev)
    attn = torch.ones_like(seqs)
    mask = torch.ones(g, r_len, device=dev)
    adv = torch.linspace(-1, 1, g, device=dev)[:, None].expand(g, r_len).contiguous()
    cfg = SGRPOConfig(alpha=args.alpha, k=args.k, p=args.p)
    selected = sgrpo_select(mask.cpu(), cfg, torch.Generator().manual_seed(2)).to(dev)
    actor = _actor_config(RLConfig())
    params = {p.untyped_storage().data_ptr() for p in policy.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    def step():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if args.variant == "sgrpo":
                w = sgrpo_weights(selected, mask, cfg)
                rows, pos = w.nonzero(as_tuple=True)
                with torch.no_grad():
                    old, _ = selected_token_log_probs(policy.model, seqs, attn, p_len, rows, pos)
                logp, _ = selected_token_log_probs(policy.model, seqs, attn, p_len, rows, pos)
                loss, _ = weighted_policy_loss(old, logp, adv[rows, pos], w[rows, pos], actor)
            else:
                with torch.no_grad():
                    old, _ = _log_probs_and_entropy(policy.model, seqs, attn, p_len)
                logp, _ = _log_probs_and_entropy(policy.model, seqs, attn, p_len)
                if args.variant == "token":
                    loss, _ = compute_policy_loss_vanilla(old, logp, adv, mask, "token-mean", actor)
                else:
                    loss, _ = weighted_policy_loss(old, logp, adv, sgrpo_weights(selected, mask, cfg), actor)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    rss0 = _rss_mb()
    max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    max1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"variant": args.variant, "saved_mb": sum(saved.values()) / 2**20, "step_s": seconds,
           "peak_rss_mb": max1 - rss0, "rss_before_mb": rss0, "maxrss_before_mb": max0,
           "peak_valid": max1 > max0, "loss_tokens": int(selected.sum()) if args.variant != "token" else g * r_len,
           "forward_len": (p_len + int(selected.nonzero()[:, 1].max()) + 1) if args.variant == "sgrpo" else p_len + r_len}
    if dev.type == "cuda":
        out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="qwen2-0.5b")
    ap.add_argument("--layers", type=int, default=2, help="fewer layers than the named shape (0 = as named)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--alpha", type=int, default=25)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", choices=VARIANTS, help="(internal) run one variant in this process")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the docs section from bench/results/token_efficient_memory.json (no new runs)")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = os.path.join(HERE, "results", "token_efficient_memory.json")
    if args.report_only:
        with open(results) as f:
            write_report(json.load(f))
        return
    passthrough = [a for a in sys.argv[1:] if a not in ("--no-doc", "--report-only")]
    rows = []
    for v in VARIANTS:
        res = subprocess.run([sys.executable, __file__, *passthrough, "--variant", v], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(res.stderr[-3000:])
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    ref = rows[0]
    for r in rows:
        r["saved_ratio"] = r["saved_mb"] / ref["saved_mb"]
        r["peak_rss_ratio"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
        if "cuda_peak_mb" in r:
            r["cuda_peak_ratio"] = r["cuda_peak_mb"] / ref["cuda_peak_mb"]
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("variant", "no_doc", "report_only")},
              "rows": rows}
    os.makedirs(os.path.dirname(results), exist_ok=True)
    with open(results, "w") as f:
        json.dump(report, f, indent=2)
    if not args.no_doc:
        write_report(report)


def write_report(report: dict) -> None:
    rows = report["rows"]
    ref = rows[0]
    c = report["config"]
    cuda = "cuda_peak_mb" in ref
    lines = [
        f"### Update-step memory, S-GRPO vs full-token GRPO (`bench/token_efficient_memory.py`, {c['device']})",
        "",
        f"One optimizer step on one group: G={c['group']} responses, prompt {c['prompt']} + response "
        f"{c['response']} tokens, {c['arch']} shape with {c['layers'] or 'all'} layers (vocab kept), LoRA "
        f"r={c['rank']}, fp32. S-GRPO: alpha={c['alpha']}, k={c['k']}, P={c['p']} (the recipes' values). "
        "saved = distinct tensor storages autograd keeps for backward (saved_tensors_hooks, parameters "
        "excluded); peak RSS = process peak resident memory during the step above the level before it"
        + (" ; CUDA peak = torch.cuda.max_memory_allocated above the level before it." if cuda else "."),
        "`sgrpo_mask` = the same subset used only as a loss mask over the full forward (what the verl "
        "policy-loss hook does).",
        "",
        "| variant | loss tokens | forward length | saved (MB) | ratio | peak RSS (MB) | ratio |"
        + (" CUDA peak (MB) | ratio |" if cuda else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else ""),
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['loss_tokens']} | {r['forward_len']} | {r['saved_mb']:.0f} | "
                     f"{r['saved_ratio']:.2f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_ratio']:.2f} |"
                     + (f" {r['cuda_peak_mb']:.0f} | {r['cuda_peak_ratio']:.2f} |" if cuda else ""))
    lines += ["", "Step times stay in `bench/results/token_efficient_memory.json`: the variants ran one after another "
              "on a shared 2-core machine, so they are not comparable."]
    write_section("token_efficient_memory", lines)


if __name__ == "__main__":
    main()
