"""Peak memory of one update step through PeRL's verl engine: S-GRPO vs full-token GRPO, same batch.

One group of G responses (prompt P tokens, response R tokens, random ids) through one optimizer
step of `PerlFSDPEngine` (verl's FSDP2 engine, a LoRA policy, verl's `ppo_loss`, `train_batch`:
forward, loss, backward, optimizer step), in a one-process gloo group on the CPU platform. Variants,
each in a fresh process so that peaks do not mix:

  token        verl's full-token update (perl.loss_mode=token): every response token in the loss
  sgrpo_mask   the same token subset S-GRPO draws, used only as a loss mask over the full forward
               (what a policy-loss hook alone can do: the algorithm, no saving expected)
  sgrpo        perl.loss_mode=sgrpo: the engine cuts the sequences after their last selected token
               and runs the LM head only at the selected positions (perl/verl_glue/token_subset.py)

Measured (CPU has no allocator peak counter like torch.cuda.max_memory_allocated):
  saved MB     bytes of the distinct tensor storages autograd saves for backward during the update's
               forward (torch.autograd.graph.saved_tensors_hooks; parameters excluded) - the
               activation memory held when backward starts, the dominant term of the peak
  peak RSS MB  the process's resident memory, sampled every 2 ms during the update, peak minus the
               level just before it (includes the transient logits/softmax buffers and gradients)

    python bench/token_efficient_memory.py [--arch qwen2-0.5b --layers 2 --group 8 --prompt 64 --response 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the engine harness (test scaffolding)
from _docs import write_section  # noqa: E402

VARIANTS = ("token", "sgrpo_mask", "sgrpo")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Samples this process's resident memory in a thread while the block runs."""

    def __enter__(self):
        self.base = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def save_model(args, path: str) -> str:
    """A randomly initialised model of the named shape (fewer layers) with a tokenizer, as a HF dir."""
    import torch
    from transformers import AutoModelForCausalLM

    from perl.generation.tokenizer import char_tokenizer
    from perl.models import build_config

    config = build_config(args.arch)
    if args.layers:
        config.num_hidden_layers = args.layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: args.layers]
    config.architectures = [config.architectures[0] if config.architectures else "Qwen2ForCausalLM"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)  # the engine loads one; ids here are random anyway
    return path


def run_variant(args) -> dict:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("VERL_PLATFORM", "cpu")
    import perl.verl_glue.engine  # noqa: F401  (the CPU platform and PeRL's engine)
    from support.engine_harness import (batch_meta, build_actor_engine, cfg_for, response_log_probs, sequence_rows,
                                      to_tensordict)
    from perl.verl_glue.token_subset import SELECTED

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo")
    g, p_len, r_len = args.group, args.prompt, args.response
    extra = [f"data.max_response_length={r_len}", "perl.sgrpo.alpha=%d" % args.alpha, "perl.sgrpo.k=%d" % args.k,
             "perl.sgrpo.p=%s" % args.p] if args.variant == "sgrpo" else []
    cfg = cfg_for(args.model_dir, "lora", ["perl.loss_mode=sgrpo", *extra] if args.variant == "sgrpo"
                  else ["actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean", f"data.max_response_length={r_len}"],
                  rank=args.rank, alpha=2.0 * args.rank, micro=g, n=g, prompts=1)
    engine, loss_fn = build_actor_engine(cfg)
    vocab = engine.policy.model.get_base_model().config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts, responses = [], []
    for _ in range(g):
        prompts.append(torch.randint(2, vocab, (p_len,), generator=gen))
        responses.append(torch.randint(2, vocab, (r_len,), generator=gen))
    rows = sequence_rows(prompts, responses, [-1.0 + 2.0 * i / (g - 1) for i in range(g)])
    if args.variant == "sgrpo_mask":  # the subset engine S-GRPO would draw, as a plain loss mask
        from perl.algos.token_efficient import SGRPOConfig
        from perl.verl_glue.token_subset import cut_to_subset

        cut, _ = cut_to_subset(to_tensordict(rows, batch_meta(cfg, train=True)),
                               SGRPOConfig(alpha=args.alpha, k=args.k, p=args.p), torch.Generator().manual_seed(2))
        masks = [torch.cat([s.long(), torch.zeros(r_len - len(s), dtype=torch.long)]) for s in cut[SELECTED].unbind()]
        rows["response_mask"], rows["loss_mask"] = masks, masks
    rows["old_log_probs"] = response_log_probs(engine, cfg, rows)
    data = to_tensordict(rows, batch_meta(cfg, train=True))
    params = {p.to_local().untyped_storage().data_ptr() if hasattr(p, "to_local") else p.untyped_storage().data_ptr()
              for p in engine.module.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        # a nested (jagged) tensor has no storage of its own: count its packed values
        s = (t.values() if t.is_nested else t).untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    t0 = time.perf_counter()
    with PeakRSS() as rss, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with engine.train_mode(disable_auto_offload=True):
            out = engine.train_batch(data, loss_function=loss_fn)
    seconds = time.perf_counter() - t0
    metrics = out["metrics"]
    token_frac = metrics.get("perl/sgrpo_token_frac", [None])[0]
    forward_frac = metrics.get("perl/sgrpo_forward_token_frac", [1.0])[0]
    loss_tokens = int(sum(int(m.sum()) for m in rows["loss_mask"])) if token_frac is None else \
        round(token_frac * g * r_len)
    dist.destroy_process_group()
    return {"variant": args.variant, "saved_mb": sum(saved.values()) / 2**20, "step_s": seconds,
            "peak_rss_mb": rss.peak - rss.base, "rss_before_mb": rss.base, "loss_tokens": loss_tokens,
            "forward_tokens": round(forward_frac * g * (p_len + r_len))}


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
    ap.add_argument("--variant", choices=VARIANTS, help="(internal) run one variant in this process")
    ap.add_argument("--model-dir", help="(internal) the model directory the variants share")
    ap.add_argument("--port", type=int, default=29533, help="(internal) the gloo group's port")
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
    import socket
    import tempfile

    passthrough = [a for a in sys.argv[1:] if a not in ("--no-doc", "--report-only")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(args, os.path.join(tmp, "model"))
        for v in VARIANTS:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            env = dict(os.environ, HF_HUB_OFFLINE="1", VERL_PLATFORM="cpu")
            res = subprocess.run([sys.executable, __file__, *passthrough, "--variant", v, "--model-dir", model_dir,
                                  "--port", str(port)], capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise SystemExit(res.stderr[-3000:])
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    ref = rows[0]
    for r in rows:
        r["saved_ratio"] = r["saved_mb"] / ref["saved_mb"]
        r["peak_rss_ratio"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
    report = {"config": {k: v for k, v in vars(args).items()
                         if k not in ("variant", "no_doc", "report_only", "model_dir", "port")}, "rows": rows}
    os.makedirs(os.path.dirname(results), exist_ok=True)
    with open(results, "w") as f:
        json.dump(report, f, indent=2)
    if not args.no_doc:
        write_report(report)


def write_report(report: dict) -> None:
    rows = report["rows"]
    c = report["config"]
    lines = [
        "### Update-step memory through PerlFSDPEngine, S-GRPO vs full-token GRPO (`bench/token_efficient_memory.py`, CPU)",
        "",
        f"One optimizer step of verl's `train_batch` on one group: G={c['group']} responses, prompt {c['prompt']} + "
        f"response {c['response']} tokens, {c['arch']} shape with {c['layers'] or 'all'} layers (vocab kept), LoRA "
        f"r={c['rank']}, fp32, FSDP2 on one gloo rank. S-GRPO: alpha={c['alpha']}, k={c['k']}, P={c['p']} (the "
        "recipes' values). saved = distinct tensor storages autograd keeps for backward (saved_tensors_hooks, "
        "parameters excluded); peak RSS = resident memory sampled every 2 ms during the step, above the level "
        "before it. `sgrpo_mask` = the same subset used only as a loss mask over the full forward (what verl's "
        "policy-loss hook alone can do).",
        "",
        "| variant | loss tokens | forward tokens | saved (MB) | ratio | peak RSS (MB) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['loss_tokens']} | {r['forward_tokens']} | {r['saved_mb']:.0f} | "
                     f"{r['saved_ratio']:.2f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_ratio']:.2f} |")
    lines += ["", "Step times stay in `bench/results/token_efficient_memory.json`: the variants ran one after another "
              "on a shared 2-core machine, so they are not comparable."]
    write_section("token_efficient_memory", lines)


if __name__ == "__main__":
    main()
