"""Mathematical equivalence of an extracted answer and a ground truth.

Plain numbers (integers, decimals, simple fractions) are compared exactly in-process: most math
answers are numbers and need neither sympy nor a time limit. Everything else goes through
math-verify (latex2sympy + sympy), which can hang on pathological input, so it only ever runs in a
worker process with a hard time limit (`perl.reward.pool`).
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUM = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$|^[+-]?\.\d+$")
_FRAC = re.compile(r"^([+-]?)\\?d?frac\{([+-]?\d+)\}\{([+-]?\d+)\}$|^([+-]?\d+)\s*/\s*([+-]?\d+)$")
_STRIP = re.compile(r"^\$+|\$+$|^\\\(|\\\)$|^\\\[|\\\]$")


def _strip_delims(s: str) -> str:
    return _STRIP.sub("", s.strip()).strip()


def _clean(s: str) -> str:
    """Numeric-path normalisation (drops all spaces: only for plain-number detection)."""
    s = _strip_delims(s)
    s = s.replace("\\!", "").replace("\\,", "").replace("{,}", "").replace(" ", "")
    if s.startswith("\\text{") and s.endswith("}"):
        s = s[6:-1]
    return s


def as_plain_number(s: str) -> Fraction | None:
    """The exact value of a plain numeric answer, or None when it is anything else."""
    s = _clean(s)
    if not s or len(s) > 64:
        return None
    if _NUM.match(s):
        return Fraction(s.replace(",", ""))
    m = _FRAC.match(s)
    if m:
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) else ("", m.group(4), m.group(5))
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign == "-" else value
    return None


def fast_verdict(pred: str, gold: str) -> bool | None:
    """True/False when both sides are plain numbers, None when math-verify must decide."""
    a, b = as_plain_number(pred), as_plain_number(gold)
    if a is None or b is None:
        return None
    return a == b


def math_verify_equal(pred: str, gold: str, timeout_s: int = 5) -> bool:
    """math-verify on both sides as inline LaTeX. Uses signal-based timeouts: call it only
    from a process's main thread (the worker does). Raises math-verify's TimeoutException on a
    timeout and any parsing error, so that the caller can tell them from a wrong answer."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    # Inline math ($...$) rather than \boxed{}: math-verify's boxed extraction drops e.g. "50\%".
    gold_parsed = parse(f"${_strip_delims(gold)}$", extraction_config=configs, parsing_timeout=timeout_s, raise_on_error=True)
    pred_parsed = parse(f"${_strip_delims(pred)}$", extraction_config=configs, parsing_timeout=timeout_s, raise_on_error=True)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s, raise_on_error=True))
