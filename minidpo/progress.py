"""
The one way library code reports progress: a `Log` callable that the program passes in.

Library functions never print; they take `log: Log = quiet` and call `log("...")`. train.py and sample.py pass a
function that prints on rank 0 (and tests pass `quiet` or a list's append). `ProgressLine` turns many updates into
one line: on a terminal it rewrites the line in place, elsewhere (logs, CI) it prints the first and last update only.
"""

import sys
import time
from typing import Callable

Log = Callable[[str], None]


def quiet(msg: str) -> None:
    """A Log that drops everything."""


class ProgressLine:
    """`update(done, total)` reports "<what> done/total (Ns)" at most every `interval` seconds on a terminal,
    and only at the start and end elsewhere; `log` is used for those lines."""

    def __init__(self, what: str, log: Log = quiet, interval: float = 1.0, tty: bool | None = None):
        self.what, self.log, self.interval = what, log, interval
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.t0 = time.perf_counter()
        self.last = -float("inf")

    def update(self, done: int, total: int) -> None:
        now = time.perf_counter()
        final = done >= total
        if self.tty and (final or now - self.last >= self.interval):
            end = "\n" if final else ""
            print(f"\r{self.what} {done:,}/{total:,} ({now - self.t0:.0f}s)", end=end, file=sys.stderr, flush=True)
            self.last = now
        elif not self.tty and final:
            self.log(f"{self.what} {done:,}/{total:,} ({now - self.t0:.0f}s)")
