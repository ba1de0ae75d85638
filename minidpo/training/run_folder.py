"""
A run's folder, entered the same way by every rank: one context for the bookkeeping around a run.

On entry rank 0 takes the folder's lock (runs.OutDirLock), checks it against the run's settings (runs.check_out_dir:
refuse a mismatch, clear it for --overwrite, see a finished run) and records the settings; the outcome is shared with
every rank (distributed.share_from_main), so under torchrun all ranks go on together, all return together for a
finished run, or all stop with the same error, instead of rank 0 returning alone while the others wait in a
collective that never comes (a gloo traceback). On a clean exit rank 0 marks the run finished.

The pattern is nanoGPT's `master_process` guarding out_dir writes, with the decision broadcast as DDP scripts do.
"""

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from minidpo.training.distributed import is_main, share_from_main
from minidpo.training.runs import OutDirLock, RunConflict, check_out_dir, mark_finished


@dataclass(frozen=True)
class RunFolder:
    path: Path
    finished: bool   # the folder already holds this run, finished: nothing to do
    repairing: bool = False  # it holds this run, finished, but lacks some of its outputs: make them (trains nothing)


@contextmanager
def run_folder(out: str | os.PathLike, settings: dict, resume: bool, overwrite: bool,
               record: Callable[[Path], None],
               missing: Callable[[Path], list[str]] = lambda out: []) -> Iterator[RunFolder]:
    """Enter `out` for a run with `settings` on every rank; `record(out)` writes its config (rank 0, after the
    check). Yields RunFolder(finished=True) when there is nothing to do, RunFolder(repairing=True) for a finished
    run that lacks some of what `missing(out)` lists. Marks the run finished on a clean exit, last."""
    out = Path(out)
    with OutDirLock(out) if is_main() else nullcontext():
        outcome: tuple[str, str] = ("go", "")
        if is_main():
            try:
                state = check_out_dir(out, settings, resume=resume, overwrite=overwrite)
                done = state.status == "finished"
                outcome = ("finished", "") if done and not missing(out) else ("repair" if done else "go", "")
                if outcome[0] != "finished":
                    record(out)
            except Exception as e:  # the other ranks stop with the same message
                share_from_main(("refused", str(e)))
                raise
        status, message = share_from_main(outcome)
        if status == "refused":
            raise RunConflict(message)
        folder = RunFolder(out, finished=status == "finished", repairing=status == "repair")
        yield folder
        if is_main() and not folder.finished:
            mark_finished(out)
