"""Cost of the merged sync per method, as a ratio to one plain `state_dict()` clone of the same model.

Qwen2-0.5B shape, random fp32 weights, CPU. Each method runs in its own process (clean memory
accounting): build, adapt, make adapters non-zero, then alternately time a full state_dict clone
and a full consumption of `merged_weights(policy, fp32)` (each tensor dropped as it arrives, as a
rollout loader does), best of N. Peak extra memory is the resident-set peak above the level before
the export, sampled every millisecond by a thread. Writes bench/results/sync_export.json and the
table in docs/benchmarks.md.

    python bench/sync_export.py [--model qwen2-0.5b] [--repeats 3] [--methods lora dora ...]
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
sys.path.insert(0, HERE)
from _docs import write_section  # noqa: E402

ROOT = os.path.dirname(HERE)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = _rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def run_one(model_name: str, method: str, repeats: int) -> dict:
    import torch

    sys.path.insert(0, ROOT)
    from perl.methods import adapt
    from perl.models import build_model
    from perl.sync import hf_model, merged_weights

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = build_model(model_name)
    t0 = time.perf_counter()
    policy = adapt(model, {"name": method}, total_steps=100)
    adapt_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in policy.trainable_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    hf = hf_model(policy.model)
    largest = max(m.weight.numel() * m.weight.element_size() for m in hf.modules()
                  if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2)

    clone_times, export_times, peaks = [], [], []
    n_tensors = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        sd = {k: v.clone() for k, v in hf.state_dict().items()}
        clone_times.append(time.perf_counter() - t0)
        del sd
        with PeakRss() as mem:
            t0 = time.perf_counter()
            n_tensors = 0
            for _, tensor in merged_weights(policy, torch.float32):
                n_tensors += 1
                del tensor
            export_times.append(time.perf_counter() - t0)
        peaks.append(mem.peak - mem.start)
    clone, export = min(clone_times), min(export_times)
    return {
        "method": method,
        "clone_s": clone,
        "export_s": export,
        "ratio": export / clone,
        "peak_extra_mb": max(peaks) / 1e6,
        "largest_module_mb": largest / 1e6,
        "peak_in_largest_modules": max(peaks) / largest,
        "tensors": n_tensors,
        "adapt_s": adapt_s,
    }


def write_markdown(results: list[dict], model: str, repeats: int) -> None:
    lines = [
        f"### Merged sync export cost (`bench/sync_export.py`, {model}, fp32, CPU, best of {repeats})",
        "",
        "Export = consuming `merged_weights(policy, fp32)` end to end; ratio = export time / one plain",
        "`state_dict()` clone of the same model in the same process. Peak extra = resident-memory peak",
        "above the level before the export; largest module = the largest single weight (the embedding).",
        "Targets: ratio < 2 and peak < 2 modules. The machine is shared and noisy: methods doing identical",
        "work (lora, lora_plus, rslora) differ by up to ~1.7x between rows, so read the ratios as bounds.",
        "",
        "| method | clone (s) | export (s) | ratio | peak extra (MB) | largest module (MB) | peak / largest |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['clone_s']:.2f} | {r['export_s']:.2f} | {r['ratio']:.2f} | {r['peak_extra_mb']:.0f} "
            f"| {r['largest_module_mb']:.0f} | {r['peak_in_largest_modules']:.2f} |"
        )
    write_section("sync_export", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2-0.5b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.model, args.one, args.repeats)))
        return
    sys.path.insert(0, ROOT)
    from perl.methods import METHODS

    methods = args.methods or list(METHODS)
    results = []
    for i, method in enumerate(methods, 1):
        print(f"[{i}/{len(methods)}] {method} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--repeats", str(args.repeats),
                               "--one", method], capture_output=True, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if proc.returncode != 0:
            raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"    export {r['export_s']:.2f}s = {r['ratio']:.2f}x clone, peak extra {r['peak_extra_mb']:.0f} MB", flush=True)
        results.append(r)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "sync_export.json"), "w") as f:
        json.dump({"model": args.model, "repeats": args.repeats, "results": results}, f, indent=2)
    write_markdown(results, args.model, args.repeats)


if __name__ == "__main__":
    main()
