"""Pull the final answer out of a completion: `<think>...</think>` then the last `\\boxed{}`.

Hand-written because the format rules are the paper's (think block, last box after it, optional
`Answer:` line) and must be linear-time and total on any input: math-verify's own extraction
searches the whole text and has no notion of the think block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_CLOSE = "</think>"
BOX_COMMANDS = ("\\boxed", "\\fbox")
MAX_ANSWER_CHARS = 1000  # longer "answers" are not answers; verifying them only costs time
_ANSWER_LINE = re.compile(r"(?im)^\s*(?:final\s+)?answer\s*[:：]\s*(.+?)\s*$")
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*(?:/\d+)?")


@dataclass(frozen=True)
class FormatConfig:
    """How strict the format check is. Defaults follow the paper: reasoning closed by `</think>`
    (chat templates of R1-style models open the block themselves, so only the close is required),
    answer = the last `\\boxed{}` after it, no fallback."""

    require_think: bool = True
    boxed: str = "last"  # "last" or "first" box after the think block
    answer_line_fallback: bool = False  # accept a final "Answer: ..." line when there is no box
    # accept the last number of the completion when there is no box (nor answer line): the
    # "flexible" extraction of GSM8K-style evaluations, for small instruct models that answer
    # "5 + 2 = 7" and rarely box (examples/smollm2_arith.yaml)
    last_number_fallback: bool = False

    def __post_init__(self) -> None:
        if self.boxed not in ("last", "first"):
            raise ValueError(f"reward.boxed must be 'last' or 'first', got {self.boxed!r}")


def _box_content(text: str, start: int) -> str | None:
    """Content of the box command at `start` (`\\boxed{...}` or `\\boxed x`); None if unbalanced."""
    i = start
    for cmd in BOX_COMMANDS:
        if text.startswith(cmd, start):
            i = start + len(cmd)
            break
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # "\boxed 5": one token up to whitespace or "$"
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{" and text[j - 1] != "\\":
            depth += 1
        elif c == "}" and text[j - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def _box_starts(text: str) -> list[int]:
    starts = []
    for cmd in BOX_COMMANDS:
        pos = text.find(cmd)
        while pos != -1:
            nxt = text[pos + len(cmd) : pos + len(cmd) + 1]
            if not nxt.isalpha():  # not \boxedfoo
                starts.append(pos)
            pos = text.find(cmd, pos + len(cmd))
    return sorted(starts)


def extract_answer(text, config: FormatConfig = FormatConfig()) -> tuple[str | None, str]:
    """(answer or None, status). Status is one of: ok, empty, no_think, no_answer, unbalanced, too_long."""
    if text is None:
        return None, "empty"
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        text = str(text)
    if not text.strip():
        return None, "empty"
    if config.require_think:
        cut = text.rfind(THINK_CLOSE)
        if cut == -1:
            return None, "no_think"
        text = text[cut + len(THINK_CLOSE) :]
    starts = _box_starts(text)
    answer = None
    if starts:
        ordered = starts if config.boxed == "first" else list(reversed(starts))
        for s in ordered:  # nested boxes: the outermost box at that position wins
            answer = _box_content(text, s)
            if answer is not None:
                break
        if answer is None:
            return None, "unbalanced"
    else:
        if config.answer_line_fallback:
            lines = _ANSWER_LINE.findall(text)
            if lines:
                answer = lines[-1].strip().rstrip(".").strip().strip("$")
        if answer is None and config.last_number_fallback:
            numbers = _NUMBER.findall(text)
            if numbers:
                answer = numbers[-1].replace(",", "")
    if answer is None:
        return None, "no_answer"
    answer = answer.strip()
    if not answer:
        return None, "no_answer"
    if len(answer) > MAX_ANSWER_CHARS:
        return None, "too_long"
    return answer, "ok"
