"""Progress of the long stages (export, quantize, their checks): a tqdm bar on a terminal, a line per ~10% in a log.

In: a label, a total count (layers), the stage's log function, optionally a byte counter. Out: nothing but the
progress shown; `update(done)` takes the count done so far.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class Progress:
    def __init__(
        self,
        label: str,
        total: int,
        log: Callable[[str], None],
        written: Callable[[], int] | None = None,
        min_interval: float = 5.0,
    ):
        self.label, self.total, self.log, self.written = label, max(total, 1), log, written
        self.start = self._last = time.monotonic()
        self._step = -1
        self.min_interval = min_interval
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=label, unit="layer", leave=False)

    def _bytes(self) -> str:
        return f", {self.written() / 1e9:.2f} GB written" if self.written is not None else ""

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.n = done
            if self.written is not None:
                self.bar.set_postfix_str(self._bytes().lstrip(", "), refresh=False)
            self.bar.refresh()
            return
        step = done * 10 // self.total  # a line per tenth, and not more often than every few seconds
        now = time.monotonic()
        if step > self._step and (now - self._last >= self.min_interval or done == self.total):
            self._step, self._last = step, now
            self.log(f"{self.label} {done}/{self.total}{self._bytes()} ({now - self.start:.0f} s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
