"""Progress for long work: periodic log lines with count, rate and ETA (no terminal needed, so the
lines read the same in a pod's log, a KFP step log and a terminal)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("medisyn")


class Progress:
    """``p = Progress(total, "encode", unit="img"); p.update(n)`` logs every ``every_s`` seconds."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", every_s: float = 10.0, logger=None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.count = 0
        self.start = self._last = time.monotonic()
        self.log = logger or log

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.count / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        total = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and rate > 0:
            eta = f", ETA {max(0.0, (self.total - self.count) / rate):.0f}s"
        return f"{self.desc}: {self.count}{total} {self.unit} ({rate:.2f} {self.unit}/s{eta})"

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self._last >= self.every_s or (self.total and self.count >= self.total):
            self._last = now
            self.log.info(self.line())

    def close(self) -> None:
        self.log.info(self.line().replace(self.desc + ":", self.desc + " done:", 1))
