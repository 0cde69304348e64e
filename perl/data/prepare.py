"""`perl prepare`: raw problems -> verl parquet (`data_source`, `prompt` chat list, `ability`,
`reward_model: {style: rule, ground_truth}`, `extra_info`).

Sources: the hub datasets of the paper (when the hub is reachable, or from a local
json/jsonl/parquet/csv file or directory the user gives), CHAMP from the `champ-dataset` package,
and synthetic k-digit arithmetic. Rows without a usable answer are counted, shown and skipped.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

# The paper's format: reasoning in <think>...</think>, final answer in \boxed{}.
DEFAULT_TEMPLATE = (
    "{question}\n\nPlease reason step by step inside <think> </think> tags, "
    "then put your final answer within \\boxed{{}}."
)

QUESTION_FIELDS = ("problem", "question", "prompt", "Problem", "Question", "query")
# "solution" last: in MATH-style sets it is the worked solution; in DAPO-Math-17k-Processed it is the answer.
ANSWER_FIELDS = ("answer", "final_answer", "Answer", "ground_truth", "reward_model.ground_truth", "solution")


class DataSourceError(RuntimeError):
    """A dataset that cannot be read (hub offline, package missing): the user must supply it."""


@dataclass(frozen=True)
class Source:
    name: str
    hub_id: str | None
    split: str
    role: str  # "train" or "test"
    hub_config: str | None = None


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("dapo-math-17k", "open-r1/DAPO-Math-17k-Processed", "train", "train", "en"),
        Source("aime24", "HuggingFaceH4/aime_2024", "train", "test"),
        Source("aime25", "math-ai/aime25", "test", "test"),
        Source("amc23", "math-ai/amc23", "test", "test"),
        Source("hmmt25", "MathArena/hmmt_feb_2025", "train", "test"),
        Source("math500", "HuggingFaceH4/MATH-500", "test", "test"),
        Source("minerva", "math-ai/minervamath", "test", "test"),
        Source("champ", None, "all", "test"),
        Source("arith", None, "generated", "train"),
        Source("local", None, "file", "train"),
    ]
}


@dataclass
class PreparedSet:
    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"index", "reason", "row"}

    def report(self, name: str, show: int = 3) -> str:
        lines = [f"{name}: {len(self.rows)} rows kept, {len(self.skipped)} skipped"]
        for s in self.skipped[:show]:
            preview = json.dumps(s["row"], ensure_ascii=False, default=str)[:160]
            lines.append(f"  skipped #{s['index']}: {s['reason']}: {preview}")
        return "\n".join(lines)


def _get(row: dict[str, Any], dotted: str) -> Any:
    cur: Any = row
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _first(row: dict[str, Any], fields: tuple[str, ...], override: str | None) -> tuple[str | None, Any]:
    for f in (override,) if override else fields:
        value = _get(row, f)
        if value is not None and not (isinstance(value, float) and pd.isna(value)):
            return f, value
    return None, None


def _question_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (list, tuple)) and value and isinstance(value[-1], dict):  # chat list: last user turn
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1].strip() if users and isinstance(users[-1], str) else None
    return None


_MATH_WORDS = re.compile(r"\\[A-Za-z]+|\b(?:sqrt|sin|cos|tan|cot|sec|csc|arcsin|arccos|arctan|log|ln|exp|pi|sum|prod|"
                         r"binom|inf|infty|max|min|floor|ceil|mod|gcd|lcm|frac|text|mathrm)\b")
_PROSE = re.compile(r"[A-Za-z]{3,}")


def usable_answer(answer: Any) -> str | None:
    """The ground truth as a string the reward can verify, or None (reported and skipped)."""
    from perl.reward.verify import as_plain_number

    if answer is None:
        return None
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        if isinstance(answer, float) and (pd.isna(answer)):
            return None
        answer = f"{answer:g}" if isinstance(answer, float) else str(answer)
    if not isinstance(answer, str):
        return None
    a = answer.strip().strip("$").strip()
    if not a or len(a) > 300:
        return None
    if as_plain_number(a) is not None:
        return a
    if re.fullmatch(r"(?i)yes|no|true|false|[A-E]|\([A-E]\)", a):
        return f"\\text{{{a}}}"
    if _PROSE.search(_MATH_WORDS.sub(" ", a)):  # "No integer solutions": sympy would read it as a product
        return None
    from math_verify import parse

    parsed = parse(f"${a}$", parsing_timeout=2)
    if parsed and not isinstance(parsed[0], str):
        return a
    return None


def to_verl_rows(raw: list[dict[str, Any]], data_source: str, split: str, template: str = DEFAULT_TEMPLATE,
                 question_field: str | None = None, answer_field: str | None = None,
                 ability: str = "math") -> PreparedSet:
    if "{question}" not in template:
        raise ValueError("template must contain {question}")
    out = PreparedSet([])
    for i, row in enumerate(raw):
        qf, qv = _first(row, QUESTION_FIELDS, question_field)
        question = _question_text(qv)
        if question is None:
            out.skipped.append({"index": i, "reason": f"no question (looked for {question_field or QUESTION_FIELDS})", "row": row})
            continue
        af, av = _first(row, ANSWER_FIELDS, answer_field)
        answer = usable_answer(av)
        if answer is None:
            reason = "no answer" if av is None else f"answer not verifiable: {str(av)[:80]!r}"
            out.skipped.append({"index": i, "reason": reason, "row": row})
            continue
        out.rows.append({
            "data_source": data_source,
            "prompt": [{"role": "user", "content": template.format(question=question)}],
            "ability": ability,
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": split, "index": len(out.rows), "source_index": i, "question": question,
                           "answer": answer},
        })
    return out


def _read_file(path: str) -> list[dict[str, Any]]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        return pd.read_parquet(path).to_dict("records")
    if ext == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if ext == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):  # {"data": [...]} or {id: row}
            data = data.get("data") or data.get("rows") or list(data.values())
        return list(data)
    if ext == ".csv":
        return pd.read_csv(path).to_dict("records")
    raise ValueError(f"--input: unsupported file type {ext!r} (json, jsonl, parquet, csv)")


def load_rows(path: str) -> list[dict[str, Any]]:
    """Rows from a file or every json/jsonl/parquet/csv file in a directory (sorted)."""
    if os.path.isdir(path):
        files = sorted(f for ext in ("json", "jsonl", "parquet", "csv") for f in glob.glob(os.path.join(path, f"*.{ext}")))
        if not files:
            raise FileNotFoundError(f"--input: no json/jsonl/parquet/csv files in {path}")
        return [r for f in files for r in _read_file(f)]
    if not os.path.exists(path):
        raise FileNotFoundError(f"--input: {path} does not exist")
    return _read_file(path)


def _normalise_champ_answer(a: str) -> str:
    for sep in (", or equivalently ", ", or an equivalent form such as "):
        if sep in a:
            a = a.split(sep, 1)[1]
    a = a.split(", or approximately")[0]
    a = re.sub(r"\s*\(i\.e\.,[^)]*\)", "", a)
    return a.strip()


def champ_rows() -> list[dict[str, Any]]:
    """CHAMP's 270 competition problems (MIT), shipped by the `champ-dataset` package: offline."""
    try:
        import champ_dataset
    except ImportError as e:
        raise DataSourceError("source champ needs the champ-dataset package: pip install champ-dataset") from e
    problems = champ_dataset.load("v0").problems
    return [{"problem": p.text, "answer": _normalise_champ_answer(p.answer), "raw_answer": p.answer,
             "id": pid, "category": p.category} for pid, p in problems.items()]


def arithmetic_rows(n: int, digits: int = 2, ops: tuple[str, ...] = ("add", "mul"), seed: int = 0) -> list[dict[str, Any]]:
    """Synthetic k-digit addition / multiplication problems (the CPU toy task)."""
    if n < 1 or digits < 1:
        raise ValueError(f"arith: need n >= 1 and digits >= 1, got n={n}, digits={digits}")
    bad = [o for o in ops if o not in ("add", "mul")]
    if bad:
        raise ValueError(f"arith: unknown ops {bad}; allowed: add, mul")
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    rows = []
    for i in range(n):
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), ops[i % len(ops)]
        sym, val = ("+", a + b) if op == "add" else ("*", a * b)
        rows.append({"problem": f"What is {a} {sym} {b}?", "answer": str(val), "op": op})
    return rows


def _hub_rows(src: Source, split: str | None) -> list[dict[str, Any]]:
    from datasets import load_dataset

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataSourceError(f"{src.name}: the hub is offline (HF_HUB_OFFLINE=1); download {src.hub_id} and pass --input")
    try:
        ds = load_dataset(src.hub_id, src.hub_config, split=split or src.split)
    except Exception as e:
        raise DataSourceError(f"{src.name}: could not load {src.hub_id} from the hub ({type(e).__name__}: {e}); "
                           "pass a local copy with --input") from e
    return [dict(r) for r in ds]


def prepare(source: str, *, input_path: str | None = None, split: str | None = None, template: str = DEFAULT_TEMPLATE,
            limit: int | None = None, question_field: str | None = None, answer_field: str | None = None,
            n: int = 1000, digits: int = 2, ops: tuple[str, ...] = ("add", "mul"), seed: int = 0) -> PreparedSet:
    if source not in SOURCES:
        raise ValueError(f"source: unknown {source!r}; valid: {', '.join(SOURCES)}")
    src = SOURCES[source]
    if input_path:
        raw = load_rows(input_path)
    elif source == "champ":
        raw = champ_rows()
    elif source == "arith":
        raw = arithmetic_rows(n, digits, ops, seed)
    elif source == "local":
        raise ValueError("source local needs --input PATH")
    else:
        raw = _hub_rows(src, split)
    if limit is not None:
        raw = raw[:limit]
    data_source = source if source != "local" else os.path.splitext(os.path.basename(input_path.rstrip("/")))[0]
    return to_verl_rows(raw, data_source, split or src.role, template, question_field, answer_field)


def write_parquet(rows: list[dict[str, Any]], path: str) -> str:
    """Atomic: written next to `path`, then renamed."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    from perl.io import atomic_file

    with atomic_file(path, suffix=".parquet") as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
    return os.path.abspath(path)
