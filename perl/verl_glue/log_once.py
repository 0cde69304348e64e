"""verl logs some warnings once per request: each distinct message of those loggers passes once per process.

verl 0.9.1's agent loop resolves the tokenizer's "Continuous Token builder" for every completion
and warns each time that none is registered for the model type (128+ times a step on the toy:
`utils/tokenizer/continuous_token_wiring.py`), burying the log around it. Loaded in every verl
process through the `verl.plugins` entry point (setup.py), like the CPU platform; a logging
filter, so nothing of verl changes and the first occurrence of each message stays in the log.
"""

from __future__ import annotations

import logging

# verl loggers that repeat one message per request (pinned by tests/test_upgrade_contract.py)
REPEATED_PER_REQUEST = ("verl.utils.tokenizer.continuous_token_wiring",)


class OncePerMessage(logging.Filter):
    """Passes the first record of each distinct (logger, level, message) and drops its repeats."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def install() -> None:
    for name in REPEATED_PER_REQUEST:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OncePerMessage) for f in logger.filters):
            logger.addFilter(OncePerMessage())


install()
