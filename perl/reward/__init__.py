"""The verifiable math reward: 1 when the final answer is mathematically equivalent to the ground
truth, else 0 (the paper's binary reward), safe on any input.

Three ways to use it:
- verl custom reward: `reward.custom_reward_function.path=<this file's package>/verl_reward.py`,
  `name=compute_score` (returns `{"score", "acc", "pred", "timed_out"}`; DAPO's dynamic sampling
  filters on `acc`);
- batches (CPU engine, evaluation): `MathReward().score_batch(completions, ground_truths)`;
- one call: `compute_score(data_source, solution_str, ground_truth)`.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .extract import FormatConfig, extract_answer
from .pool import VerifierPool
from .verify import fast_verdict


@dataclass
class RewardConfig:
    format: FormatConfig = field(default_factory=FormatConfig)
    correct_score: float = 1.0
    incorrect_score: float = 0.0
    timeout_s: float = 5.0  # per verification, enforced in threads and Ray workers alike
    workers: int | None = None  # verifier processes; default: all cores


class MathReward:
    def __init__(self, config: RewardConfig | None = None, pool: VerifierPool | None = None) -> None:
        self.config = config or RewardConfig()
        self.pool = pool or VerifierPool(self.config.workers, self.config.timeout_s)
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _result(self, correct: bool, pred: str | None, status: str) -> dict[str, Any]:
        with self._lock:
            self.stats[status] += 1
        score = self.config.correct_score if correct else self.config.incorrect_score
        return {"score": float(score), "acc": float(correct), "pred": pred or "", "status": status,
                "timed_out": float(status == "timeout")}

    def score_batch(self, completions: Sequence[Any], ground_truths: Sequence[Any]) -> list[dict[str, Any]]:
        if len(completions) != len(ground_truths):
            raise ValueError(f"{len(completions)} completions but {len(ground_truths)} ground truths")
        results: list[dict[str, Any] | None] = [None] * len(completions)
        slow: list[tuple[int, str, str]] = []
        for i, (text, gold) in enumerate(zip(completions, ground_truths)):
            pred, status = extract_answer(text, self.config.format)
            gold = "" if gold is None else str(gold).strip()
            if pred is None or not gold:
                results[i] = self._result(False, pred, status if pred is None else "no_ground_truth")
                continue
            verdict = fast_verdict(pred, gold)
            if verdict is not None:
                results[i] = self._result(verdict, pred, "ok")
            else:
                slow.append((i, pred, gold))
        for (i, pred, _), (correct, status) in zip(slow, self.pool.verify_many([(p, g) for _, p, g in slow])):
            results[i] = self._result(correct, pred, status)
        return results  # type: ignore[return-value]

    def score(self, completion: Any, ground_truth: Any) -> dict[str, Any]:
        return self.score_batch([completion], [ground_truth])[0]


def overlong_penalty(response_length: int, max_response_length: int, buffer_length: int,
                     penalty_factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment, the formula of verl's DAPO reward manager
    (`reward_model.overlong_buffer`): 0 up to `max - buffer` tokens, then linearly down to
    `-penalty_factor` at `max`. Exposed for the CPU engine; on verl use its config."""
    if buffer_length <= 0:
        raise ValueError(f"overlong_buffer.len must be > 0, got {buffer_length}")
    if max_response_length < buffer_length:
        raise ValueError(f"max_response_length ({max_response_length}) must be >= overlong_buffer.len ({buffer_length})")
    exceed = response_length - (max_response_length - buffer_length)
    return min(-exceed / buffer_length * penalty_factor, 0.0)


_DEFAULT: MathReward | None = None
_DEFAULT_LOCK = threading.Lock()


def default_reward() -> MathReward:
    """One reward (and verifier pool) per process, created on first use."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = MathReward()
        return _DEFAULT


_BY_KWARGS: dict[tuple, MathReward] = {}
_FORMAT_FIELDS = ("require_think", "boxed", "answer_line_fallback", "last_number_fallback")
_REWARD_FIELDS = ("correct_score", "incorrect_score", "timeout_s", "workers")


def reward_config(kwargs: dict[str, Any], field: str = "reward_kwargs") -> RewardConfig:
    """A flat mapping of format and reward fields (verl's `reward_kwargs`, a `perl train` config's
    `reward:` block) as a RewardConfig; an unknown key is an error naming `field`."""
    unknown = sorted(set(kwargs) - set(_FORMAT_FIELDS) - set(_REWARD_FIELDS))
    if unknown:
        raise ValueError(f"{field}: unknown {unknown}; allowed: {sorted(_FORMAT_FIELDS + _REWARD_FIELDS)}")
    fmt = FormatConfig(**{k: v for k, v in kwargs.items() if k in _FORMAT_FIELDS})
    return RewardConfig(format=fmt, **{k: v for k, v in kwargs.items() if k in _REWARD_FIELDS})


def reward_from_kwargs(kwargs: dict[str, Any]) -> MathReward:
    """The process-wide reward for a set of `reward_kwargs` (verl passes them on every call)."""
    if not kwargs:
        return default_reward()
    cfg = reward_config(kwargs)
    key = tuple(sorted(kwargs.items()))
    with _DEFAULT_LOCK:
        if key not in _BY_KWARGS:
            _BY_KWARGS[key] = MathReward(cfg)
        return _BY_KWARGS[key]


def compute_score(data_source: Any = None, solution_str: Any = None, ground_truth: Any = None,
                  extra_info: Any = None, **kwargs: Any) -> dict[str, Any]:
    """verl's custom reward function signature; `kwargs` are verl's `reward_kwargs`."""
    result = reward_from_kwargs(kwargs).score(solution_str, ground_truth)
    result.pop("status")  # verl turns every key into a metric column; keep them numeric
    return result


__all__ = ["FormatConfig", "MathReward", "RewardConfig", "VerifierPool", "compute_score", "default_reward", "reward_config",
           "extract_answer", "overlong_penalty"]
