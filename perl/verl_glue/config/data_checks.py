"""The data files, checked before Ray: train, val and held-out parquet files alike.

verl reads the files inside its workers, minutes after the start, and a file without the
`reward_model` column fails there as "Sync replay buffer selected terminal groups with no
materializable trajectories". Here each file is opened with pyarrow (the columns the trainer and
PeRL's reward read, with only the prompt column decoded) and refused naming the file, the column
and the first bad row: not a parquet file, no rows, a missing or mistyped column, a null ground
truth. Prompt lengths are measured in tokens as verl's `filter_overlong_prompts` measures them (the
chat template with the generation prompt) when the model's tokenizer is at hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

SCHEMA_HINT = ("verl's RL schema: data_source, prompt (a chat list of {role, content}), reward_model "
               "{style, ground_truth}, ability, extra_info; `perl prepare` writes it")


@dataclass
class DataReport:
    """What a data file holds, as the run will read it."""

    path: str
    rows: int
    overlong: int = 0  # prompts longer than data.max_prompt_length tokens (None: not measured)
    first_overlong: int | None = None
    longest: int | None = None
    notes: list[str] = field(default_factory=list)


def _bad(key: str, path: str, what: str) -> ConfigError:
    return ConfigError(f"{key}: {path}: {what} ({SCHEMA_HINT})")


def read_checked(path: str, key: str, prompt_key: str = "prompt", reward_key: str = "data_source",
                 ground_truth: bool = True):
    """The file's prompt column (as Python lists) and row count, after the schema checks."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # not parquet (a CSV named .parquet), truncated, unreadable
        raise ConfigError(f"{key}: {path} is not a readable parquet file ({type(e).__name__}: {e}); "
                          "write it with `perl prepare` or pandas' to_parquet") from None
    schema = pf.schema_arrow
    rows = pf.metadata.num_rows
    if rows == 0:
        raise _bad(key, path, "the file has no rows")
    for column in (prompt_key, reward_key, "reward_model") if ground_truth else (prompt_key,):
        if column not in schema.names:
            raise _bad(key, path, f"column {column!r} is missing (it has {', '.join(schema.names)})")
    prompt_type = schema.field(prompt_key).type
    if not (pa.types.is_list(prompt_type) or pa.types.is_large_list(prompt_type)) or not (
            pa.types.is_struct(prompt_type.value_type)
            and {"role", "content"} <= {f.name for f in prompt_type.value_type}):
        raise _bad(key, path, f"column {prompt_key!r} is {prompt_type}, not a chat list of {{role, content}}")
    table = pf.read(columns=[prompt_key] + (["reward_model"] if ground_truth else []))
    prompts = table.column(prompt_key)
    null_prompt = pc.is_null(prompts)
    if pc.any(null_prompt).as_py() or pc.any(pc.equal(pc.list_value_length(prompts), 0)).as_py():
        row = next(i for i, p in enumerate(prompts.to_pylist()) if not p)
        raise _bad(key, path, f"row {row}: column {prompt_key!r} is empty")
    if ground_truth:
        rm_type = schema.field("reward_model").type
        if not pa.types.is_struct(rm_type) or "ground_truth" not in {f.name for f in rm_type}:
            raise _bad(key, path, f"column 'reward_model' is {rm_type}, not a struct with a ground_truth")
        truths = pc.struct_field(table.column("reward_model"), "ground_truth")
        nulls = pc.is_null(truths)
        if pc.any(nulls).as_py():
            row = pc.index(nulls, True).as_py()
            raise _bad(key, path, f"row {row}: reward_model.ground_truth is null (PeRL's reward scores against it)")
    return prompts.to_pylist(), rows


def prompt_lengths(prompts: list[list[dict[str, Any]]], tokenizer, chat_kwargs: dict | None = None) -> list[int]:
    """Tokens of each prompt as verl counts them: the chat template with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"actor_rollout_ref.model: the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no "
                          "chat template; verl applies one to every prompt. Use an instruct/chat model's tokenizer "
                          "(actor_rollout_ref.model.tokenizer_path)")
    texts = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False, **(chat_kwargs or {}))
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def check_file(path: str, key: str, *, tokenizer=None, max_prompt_length: int | None = None,
               filter_overlong: bool = True, truncation: str = "error", prompt_key: str = "prompt",
               reward_key: str = "data_source", ground_truth: bool = True, chat_kwargs: dict | None = None) -> DataReport:
    """One data file: schema, rows, and its prompts against `max_prompt_length` (refused where verl
    would fail on them: no filtering and truncation=error, or nothing left after filtering)."""
    prompts, rows = read_checked(path, key, prompt_key, reward_key, ground_truth)
    report = DataReport(path=path, rows=rows)
    if tokenizer is None or not max_prompt_length:
        report.notes.append("prompt lengths not measured (no tokenizer at hand)")
        return report
    lengths = prompt_lengths(prompts, tokenizer, chat_kwargs)
    over = [i for i, n in enumerate(lengths) if n > max_prompt_length]
    report.overlong, report.longest = len(over), max(lengths)
    report.first_overlong = over[0] if over else None
    if over and not filter_overlong and truncation == "error":
        raise ConfigError(f"{key}: {path}: row {over[0]} has a {lengths[over[0]]}-token prompt, over "
                          f"data.max_prompt_length={max_prompt_length} ({len(over)} of {rows} prompts are); "
                          "raise data.max_prompt_length, set data.filter_overlong_prompts=true to drop them, "
                          "or data.truncation=left|right")
    if over and len(over) == rows and filter_overlong:
        raise ConfigError(f"{key}: {path}: every prompt is longer than data.max_prompt_length={max_prompt_length} "
                          f"tokens (the shortest has {min(lengths)}); verl's filter_overlong_prompts would leave nothing")
    if over:
        report.notes.append(f"{len(over)} of {rows} prompts exceed data.max_prompt_length={max_prompt_length} "
                            "tokens; verl drops them (data.filter_overlong_prompts)" if filter_overlong else
                            f"{len(over)} of {rows} prompts exceed data.max_prompt_length={max_prompt_length}; "
                            f"verl truncates them ({truncation})")
    return report


def local_files(value: Any) -> list[str]:
    files = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig" else [value]
    return [os.path.expanduser(str(f)) for f in files if f is not None and "://" not in str(f)]
