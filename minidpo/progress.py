"""
The one way library code reports progress: a `Log` callable that the program passes in.

Library functions never print; they take `log: Log = quiet` and call `log("...")`. train.py and sample.py pass a
function that prints on rank 0 (and tests pass `quiet` or a list's append). `ProgressLine` turns many updates into
few lines: on a terminal it rewrites one line in place; elsewhere (a log file, CI) it logs a line every ten seconds
and the last one, so a long phase is never silent and a short one is one line.
"""

import sys
import time
from typing import Callable

Log = Callable[[str], None]


def quiet(msg: str) -> None:
    """A Log that drops everything."""


class ProgressLine:
    """`update(done, total)` reports "<what> done/total (Ns)": on a terminal rewritten in place at most every
    `interval` seconds; elsewhere through `log`, a line every `every` seconds and at the end. `clock` is the time
    source (seconds)."""

    def __init__(self, what: str, log: Log = quiet, interval: float = 1.0, tty: bool | None = None,
                 every: float = 10.0, clock: Callable[[], float] = time.perf_counter):
        self.what, self.log, self.interval, self.every, self.clock = what, log, interval, every, clock
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.t0 = clock()
        self.last = -float("inf") if self.tty else self.t0  # elsewhere the first line comes after `every` seconds

    def update(self, done: int, total: int) -> None:
        now = self.clock()
        final = done >= total
        if self.tty and (final or now - self.last >= self.interval):
            end = "\n" if final else ""
            print(f"\r{self.what} {done:,}/{total:,} ({now - self.t0:.0f}s)", end=end, file=sys.stderr, flush=True)
            self.last = now
        elif not self.tty and (final or now - self.last >= self.every):
            self.log(f"{self.what} {done:,}/{total:,} ({now - self.t0:.0f}s)")
            self.last = now
