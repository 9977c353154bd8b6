"""Logging helpers shared by the agent's parts."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Logs a repeating problem once, then at most every `every` seconds (the rest at debug)."""

    def __init__(self, logger: logging.Logger, every: float = 300.0):
        self.logger = logger
        self.every = every
        self.last: dict[str, float] = {}

    def warning(self, key: str, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self.last.get(key, -1e9) >= self.every:
            self.last[key] = now
            self.logger.warning(msg, *args)
        else:
            self.logger.debug(msg, *args)

    def reset(self, key: str) -> None:
        self.last.pop(key, None)
