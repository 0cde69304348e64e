"""Verifications per second of PeRL's reward vs calling math-verify directly in one process.

A realistic mix of completions (think block + boxed answer): integers, LaTeX fractions, decimals,
radicals, expressions, intervals/sets/tuples, text answers, and malformed outputs, half of them
wrong. Baseline = math-verify's own `parse` on the completion and `verify` against the parsed
ground truth, in one process with its built-in (signal) timeouts. PeRL = `MathReward.score_batch`
on the same inputs, every call time-limited, with a warm worker pool (its start-up is reported
separately). Both see the same inputs in the same run; the ratio is what is reported.

    python bench/reward_throughput.py [--n 800] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _docs import write_section  # noqa: E402

ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def make_mix(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.choices(["int", "frac", "dec", "radical", "expr", "interval", "set", "tuple", "text", "bad"],
                           weights=[40, 15, 8, 7, 8, 5, 4, 4, 3, 6])[0]
        a, b = rng.randint(1, 999), rng.randint(2, 99)
        right = rng.random() < 0.5
        if kind == "int":
            gold, pred = str(a), str(a if right else a + 1)
        elif kind == "frac":
            gold, pred = f"\\frac{{{a}}}{{{b}}}", (f"\\frac{{{2 * a}}}{{{2 * b}}}" if right else f"\\frac{{{a + 1}}}{{{b}}}")
        elif kind == "dec":
            gold, pred = f"{a / 4:g}", (f"\\frac{{{a}}}{{4}}" if right else f"{a / 4 + 1:g}")
        elif kind == "radical":
            gold, pred = f"{b}\\sqrt{{2}}", (f"\\sqrt{{{2 * b * b}}}" if right else f"{b}\\sqrt{{3}}")
        elif kind == "expr":
            gold, pred = f"x^2+{2 * b}x+{b * b}", (f"(x+{b})^2" if right else f"(x+{b + 1})^2")
        elif kind == "interval":
            gold, pred = f"[{a}, {a + b})", (f"[{a},{a + b})" if right else f"({a},{a + b}]")
        elif kind == "set":
            gold, pred = f"\\{{{a},{b}\\}}", (f"\\{{{b},{a}\\}}" if right else f"\\{{{a},{b + 1}\\}}")
        elif kind == "tuple":
            gold, pred = f"({a},{b})", (f"({a}, {b})" if right else f"({b},{a})")
        elif kind == "text":
            gold, pred = "\\text{(C)}", ("\\text{(C)}" if right else "\\text{(D)}")
        else:
            gold, pred = str(a), None
        reasoning = " ".join(rng.choice(["so", "thus", "we get", "x", "=", str(a), "+", str(b)]) for _ in range(120))
        if pred is None:
            text = f"<think>{reasoning}</think> The answer is {a}" if rng.random() < 0.5 else f"<think>{reasoning}"
        else:
            text = f"<think>{reasoning}</think>\nSo the final answer is $\\boxed{{{pred}}}$."
        out.append((text, gold))
    return out


def baseline(mix: list[tuple[str, str]]) -> tuple[float, list[bool]]:
    from math_verify import parse, verify

    t0 = time.perf_counter()
    verdicts = []
    for text, gold in mix:
        verdicts.append(bool(verify(parse(f"${gold}$"), parse(text))))
    return time.perf_counter() - t0, verdicts


def ours(reward, mix: list[tuple[str, str]]) -> tuple[float, list[bool]]:
    t0 = time.perf_counter()
    results = reward.score_batch([t for t, _ in mix], [g for _, g in mix])
    return time.perf_counter() - t0, [r["acc"] == 1.0 for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from perl.reward import MathReward, RewardConfig

    mix = make_mix(args.n)
    t0 = time.perf_counter()
    reward = MathReward(RewardConfig(timeout_s=5.0))
    reward.score_batch([t for t, _ in mix[: reward.pool.size * 2]], [g for _, g in mix[: reward.pool.size * 2]])
    startup = time.perf_counter() - t0
    base_times, our_times = [], []
    for _ in range(args.repeats):  # interleaved, best of N each
        bt, bv = baseline(mix)
        ot, ov = ours(reward, mix)
        base_times.append(bt)
        our_times.append(ot)
    agree = sum(a == b for a, b in zip(bv, ov)) / len(mix)
    from perl.reward import extract_answer

    disagree = [(t, b, o) for (t, _), b, o in zip(mix, bv, ov) if b != o]
    unboxed = sum(1 for t, _, _ in disagree if extract_answer(t)[0] is None)
    res = {
        "n": args.n, "cores": os.cpu_count(), "workers": reward.pool.size,
        "baseline_per_s": args.n / min(base_times), "perl_per_s": args.n / min(our_times),
        "ratio": min(base_times) / min(our_times), "pool_startup_s": startup, "verdict_agreement": agree,
        "perl_correct": sum(ov), "baseline_correct": sum(bv), "timeouts": reward.stats["timeout"],
        "disagreements": len(disagree), "disagreements_without_boxed_answer": unboxed,
    }
    reward.pool.close()
    print(json.dumps(res, indent=2))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "reward_throughput.json"), "w") as f:
        json.dump(res, f, indent=2)
    lines = [
        f"### Reward throughput (`bench/reward_throughput.py`, {args.n} completions, {res['cores']} cores, best of {args.repeats})",
        "",
        "| | verifications / s | ratio |",
        "|---|---:|---:|",
        f"| math-verify directly, one process | {res['baseline_per_s']:.0f} | 1.00 |",
        f"| PeRL `score_batch` ({res['workers']} workers, every call time-limited) | {res['perl_per_s']:.0f} | {res['ratio']:.2f} |",
        "",
        f"Pool start-up (once per process): {startup:.1f} s. Verdicts agree with the baseline on "
        f"{100 * agree:.1f}% of the mix; {unboxed} of the {len(disagree)} disagreements are completions without a boxed "
        "answer after `</think>`, which math-verify (parsing the whole text) accepts and the paper's strict format scores 0.",
    ]
    write_section("reward_throughput", lines)


if __name__ == "__main__":
    main()
