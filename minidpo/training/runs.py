"""
Run folders that never mislabel results: a folder's outputs belong to the settings recorded in it (its config.json).
A new run with other settings is refused with one message naming the differing options and the ways on (--resume,
a new --out-dir, --overwrite, which removes only the files minidpo writes); a finished run says so in its
summary.json; `OutDirLock` lets one run at a time use a folder (an advisory flock, released by the kernel even when
the holder is killed); paths stored in outputs are relative to the run folder when inside it, so a folder can move.
The model is nanoGPT's out_dir + ckpt.pt config, made strict.
"""

import fcntl
import json
import math
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from minidpo.fileio import atomic_write_json


def subrun_folder(name: str) -> bool:
    """Whether `name` is a sub-run's folder: `<method>_<setting>` of a sweep or --compare, or `seed_<s>`."""
    # imported here: the registry imports every method, which import the checkpoint code, which imports this module
    from minidpo.registry import SUBRUN
    return bool(SUBRUN.match(name))


# options that do not change results (the one list): a run into a folder may differ in these from the run that made
# it, and a resumed run takes them from the command line
NOT_SETTINGS = frozenset({"preset", "out_dir", "resume", "overwrite", "log_every", "checkpoint_every", "export_merged",
                          "device"})
# options that change results which a resumed run may still take from the command line (more steps)
RESUME_SAFE = frozenset({"steps", "rloo_steps", "export_merged"})
# what minidpo writes into a run folder (and nothing else is ever removed by --overwrite)
RUN_OUTPUTS = frozenset({
    "config.json", "summary.json", "log.jsonl", "pairs.jsonl", "points.jsonl", "frontier.csv", "frontier.png",
    "run.json", "result.json", "reference_logps.safetensors", "adapter", "adapter_peft", "checkpoint",
    "sft_checkpoint", "sft_model", "base_model", "reward_model", "reward_model.safetensors", "frontier_mean.csv",
    "curves.png"})
TEMP = re.compile(r"^.+\.\d+\.[0-9a-f]+\.tmp$")        # minidpo.fileio's temporary names
LOCK_NAME = ".lock"


class RunConflict(ValueError):
    """The folder holds a run that the new one must not be mixed with; the message says what differs and the ways
    on."""


class RunLocked(RuntimeError):
    """Another live process is running in the folder."""


@dataclass
class RunState:
    """What a run folder holds: "empty" (no run), "unfinished" or "finished"; `stored` is its recorded settings."""
    status: str
    stored: dict | None = None
    cleared: list[str] = field(default_factory=list)  # what --overwrite removed, relative to the folder

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def empty(self) -> bool:
        return self.status == "empty"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _canonical(value: Any) -> Any:
    """Values as they read back from JSON (tuples become lists), so a stored setting compares equal to a new one."""
    return json.loads(json.dumps(value, allow_nan=True))


def _same(a: Any, b: Any) -> bool:
    a, b = _canonical(a), _canonical(b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


MISSING = object()


def differing(stored: dict, given: dict, exclude: Iterable[str] = ()) -> list[str]:
    """The keys of `given` (in its order, minus `exclude`) whose value differs from `stored`'s (or is not there).

    Naive equivalent: `[k for k in given if stored.get(k) != given[k]]`, which calls (1, 2) and [1, 2] different.
    """
    skip = set(exclude)
    return [k for k, v in given.items() if k not in skip and (k not in stored or not _same(stored[k], v))]


def format_value(value: Any) -> str:
    if value is MISSING:
        return "(not recorded)"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return shlex.quote(",".join(str(v) for v in value))
    return shlex.quote(str(value))


def describe(keys: list[str], values: dict) -> str:
    """`--beta 0.5 --lr 0.005`: the options as they would be typed."""
    return " ".join(f"{flag(k)} {format_value(values.get(k, MISSING))}" for k in keys)


def read_settings(out_dir: str | os.PathLike) -> dict | None:
    """The settings recorded in out_dir/config.json; None when there is none. RunConflict when it is unreadable."""
    path = Path(out_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunConflict(f"{path} is unreadable ({e}); pass --overwrite to start the run again, or choose a new "
                          "--out-dir") from None
    if not isinstance(stored, dict):
        raise RunConflict(f"{path} is not a run's settings (a JSON object); choose a new --out-dir")
    return stored


def run_state(out_dir: str | os.PathLike) -> RunState:
    out = Path(out_dir)
    stored = read_settings(out)
    if stored is None:  # unfinished when it holds anything minidpo writes (besides the lock)
        ours = out.is_dir() and any(p.name in RUN_OUTPUTS or (subrun_folder(p.name) and p.is_dir())
                                    for p in out.iterdir())
        return RunState("unfinished" if ours else "empty")
    return RunState("finished" if is_finished(out) else "unfinished", stored)


def check_out_dir(out_dir: str | os.PathLike, settings: dict, resume: bool = False, overwrite: bool = False,
                  exclude: Iterable[str] = NOT_SETTINGS, safe: Iterable[str] = RESUME_SAFE) -> RunState:
    """Check that a run with `settings` may write into out_dir, before anything is written there: a folder made with
    other settings (those in `exclude` aside; with `resume`, those in `safe` too) is refused with one RunConflict;
    `overwrite` first removes the earlier run's outputs. Returns what the folder holds.
    """
    out = Path(out_dir)
    if resume and overwrite:
        raise RunConflict(f"--resume {out} continues the run there and --overwrite would delete it; pass one of them")
    if overwrite:
        return RunState("empty", None, clear_run_outputs(out))
    state = run_state(out)
    if resume and state.stored is None:
        raise RunConflict(f"{out} holds no run to resume (no config.json); start it without --resume")
    if state.stored is None:
        if state.status != "empty":
            raise RunConflict(f"{out} holds outputs of an earlier run but no config.json, so its settings are "
                              "unknown; choose a new --out-dir, or pass --overwrite to replace them")
        return state
    skip = set(exclude) | (set(safe) if resume else set())
    if not any(k in state.stored for k in settings if k not in skip):
        raise RunConflict(f"{out}/config.json is not a minidpo run's settings; choose a new --out-dir")
    diff = differing(state.stored, settings, skip)
    if diff:
        raise RunConflict(f"{out} holds a run made with {describe(diff, state.stored)} (now {describe(diff, settings)})"
                          f"; continue it with --resume {out}, or choose a new --out-dir, or pass --overwrite")
    return state


def clear_run_outputs(out_dir: str | os.PathLike) -> list[str]:
    """Remove what minidpo wrote into out_dir (and into the sweep folders inside it), leaving every other file and
    the lock. Returns the removed names, relative to out_dir. Naive equivalent: `shutil.rmtree(out_dir)`."""
    out = Path(out_dir)
    removed: list[str] = []
    if not out.is_dir():
        return removed
    for p in sorted(out.iterdir()):
        if p.name in RUN_OUTPUTS or TEMP.match(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p.name)
        elif subrun_folder(p.name) and p.is_dir() and not p.is_symlink():
            removed += [f"{p.name}/{name}" for name in clear_run_outputs(p)]
            if not any(p.iterdir()):
                p.rmdir()
    return removed


def mark_finished(out_dir: str | os.PathLike) -> None:
    """Record in out_dir/summary.json (written by the run just before) that the run finished."""
    path = Path(out_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: write the run's summary before marking it finished") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path} is not a JSON object; cannot mark the run finished")
    atomic_write_json(path, {**summary, "finished": True})


def is_finished(out_dir: str | os.PathLike) -> bool:
    """Whether out_dir holds a finished run (its summary.json says "finished": true)."""
    try:
        summary = json.loads((Path(out_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(summary, dict) and summary.get("finished") is True


def resume_overrides(stored: dict, given: dict, safe: Iterable[str] = RESUME_SAFE) -> tuple[dict, list[str]]:
    """(the resumed run's settings, the given options that were ignored): of the options given on the command line
    only those in `safe` (such as more steps) replace the recorded ones."""
    safe = set(safe)
    merged = dict(stored)
    ignored = []
    for k, v in given.items():
        if k in safe:
            merged[k] = v
        elif k not in stored or not _same(stored[k], v):
            ignored.append(k)
    return merged, ignored


class OutDirLock:
    """`with OutDirLock(out_dir):` holds an exclusive, non-blocking flock on out_dir/.lock; a second holder gets
    RunLocked naming the folder and the first holder's pid. The kernel drops the lock when its process dies, so a
    killed run never leaves the folder locked. The lock file stays (removing it would let two runs lock two files).
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        self.path = self.dir / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> "OutDirLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"{self.dir} is in use by another run (pid {holder}); wait for it to end, or choose "
                            "another --out-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def to_portable(path: str | os.PathLike, run_dir: str | os.PathLike, within: str | os.PathLike | None = None) -> str:
    """How to store `path` in run_dir's outputs: relative to run_dir when it lies inside `within` (default run_dir;
    pass the top output folder to let a sweep folder refer to its parent's files as ../x), else absolute."""
    path, run_dir = Path(path).resolve(), Path(run_dir).resolve()
    root = Path(within).resolve() if within is not None else run_dir
    if path == root or root in path.parents:
        return Path(os.path.relpath(path, run_dir)).as_posix()
    return str(path)


def from_portable(value: str, run_dir: str | os.PathLike) -> Path:
    """The path a stored value refers to, wherever run_dir now is and whatever the current directory."""
    p = Path(value)
    return p if p.is_absolute() else Path(run_dir).resolve() / p
