"""Progress where users wait (manifest hashing, tokenizer corpus, embedding export): a log line per unit
of work with the rate and the time left. Lines, not a terminal bar: they survive in SLURM and pipeline
logs, and each rank's lines say which rank they are from."""

from __future__ import annotations

import logging
import time


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``step()`` after each unit of ``total`` logs "what: i/total unit (detail), rate/s, ETA h:mm:ss", at
    most every ``interval`` seconds (and always for the last unit)."""

    def __init__(
        self,
        total: int,
        what: str,
        unit: str = "shards",
        log: logging.Logger | None = None,
        interval: float = 0.0,
    ) -> None:
        self.total, self.what, self.unit, self.interval = total, what, unit, interval
        self.log = log or logging.getLogger(__name__)
        self.done = 0
        self.start = self._last = time.monotonic()

    def step(self, n: int = 1, detail: str = "") -> str | None:
        self.done += n
        now = time.monotonic()
        if now - self._last < self.interval and self.done < self.total:
            return None
        self._last = now
        rate = self.done / max(now - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        line = (
            f"{self.what}: {self.done}/{self.total} {self.unit}{f' ({detail})' if detail else ''}, "
            f"{rate:.3g} {self.unit}/s, ETA {_clock(left) if left != float('inf') else '?'}"
        )
        self.log.info(line)
        return line
