"""
Training checkpoints that survive a kill at any moment and refuse to resume from a damaged or foreign file.

A checkpoint directory holds, for its latest step N:

    trainable-N.safetensors   the trainable tensors
    optimizer-N.pt            the optimizer's state (torch.save; read back with weights_only=True)
    state.pt                  written last: {"step", "trainable", "sha256", "payload"}, where payload is the
                              torch.save bytes of the step, scheduler, every RNG state, the caller's `extra`
                              dict, the run's settings, and the sha256 of the two files above

Every file is written to a uniquely named temporary file, fsynced and renamed (minidpo.fileio), state.pt last, so a
kill leaves either the previous complete checkpoint or the new one. torch.load does not check the CRC-32s of its zip
format, so every byte is covered by our own sha256. References: nanoGPT's ckpt.pt and llm.c's train_gpt2 state files.
"""

import hashlib
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from minidpo.fileio import atomic_path, atomic_write_bytes
from minidpo.formats.safetensors import load_file, save_file
from minidpo.training.runs import RunConflict, differing

FORMAT = 2


class CheckpointCorrupt(ValueError):
    """A checkpoint file is missing, truncated, unreadable or fails its checksum; `path` names it."""

    def __init__(self, path: Path, what: str, directory: Path):
        super().__init__(f"checkpoint file {path} {what}; delete {directory} to restart the run from step 0, or "
                         "restore the file")
        self.path = path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array as a tensor: weights_only loading accepts tensors and plain Python values, not ndarrays
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def flatten(settings: dict, prefix: str = "") -> dict:
    """{"lora": {"alpha": 16}} -> {"lora.alpha": 16}: nested settings as one level, so a difference names its
    setting (never a whole dict)."""
    flat = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def check_settings(directory: Path, stored: dict, settings: dict) -> None:
    """RunConflict, one line naming each differing setting, when a checkpoint was made with other settings."""
    old, new = flatten(stored), flatten(settings)
    diff = differing(old, new) + [k for k in old if k not in new]
    if diff:
        show = lambda d: ", ".join(f"{k}={json.dumps(d.get(k))}" for k in diff)  # noqa: E731
        raise RunConflict(f"checkpoint {directory} was made with {show(old)} (now {show(new)}); resume with its "
                          f"settings, or delete {directory} to start again")


class Checkpointer:
    """Save and load the checkpoint in `directory` for the tensors in `named_params`. `settings` (plain JSON values)
    records what the run was made with; when given, `load` refuses a checkpoint recorded with other settings."""

    def __init__(self, directory: str | Path, named_params: dict[str, Tensor], settings: dict | None = None):
        self.dir = Path(directory)
        self.params = named_params
        self.settings = settings

    @property
    def state_path(self) -> Path:
        return self.dir / "state.pt"

    def exists(self) -> bool:
        return self.state_path.is_file()

    def save(self, step: int, optimizer, scheduler, extra: dict | None = None, settings: dict | None = None) -> None:
        """Write the checkpoint of `step`; `settings` defaults to the ones given to the constructor."""
        settings = self.settings if settings is None else settings
        self.dir.mkdir(parents=True, exist_ok=True)
        names = {"trainable": f"trainable-{step}.safetensors", "optimizer": f"optimizer-{step}.pt"}
        files = {}
        with atomic_path(self.dir / names["trainable"]) as tmp:
            save_file({k: p.detach() for k, p in self.params.items()}, tmp)
            files[names["trainable"]] = sha256_file(tmp)  # the bytes that get renamed, not whatever is there later
        with atomic_path(self.dir / names["optimizer"]) as tmp:
            torch.save(optimizer.state_dict(), tmp)
            files[names["optimizer"]] = sha256_file(tmp)
        body = {"format": FORMAT, "step": step, "trainable": names["trainable"], "optimizer": names["optimizer"],
                "files": files, "scheduler": scheduler.state_dict(), "rng": rng_state(), "extra": extra or {},
                "settings": json.dumps(settings, sort_keys=True, allow_nan=False) if settings is not None else None}
        payload = to_bytes(body)
        envelope = {"format": FORMAT, "step": step, "trainable": names["trainable"],
                    "sha256": hashlib.sha256(payload).hexdigest(),
                    "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
        atomic_write_bytes(self.state_path, to_bytes(envelope))  # the commit point
        self._remove_stale(set(files))

    def _remove_stale(self, keep: set[str]) -> None:
        """Files of earlier steps, and temporary files that a killed writer left (its pid no longer runs)."""
        for old in [*self.dir.glob("trainable-*.safetensors"), *self.dir.glob("optimizer-*.pt")]:
            if old.name not in keep:
                old.unlink(missing_ok=True)
        for tmp in self.dir.glob("*.tmp"):
            if not _pid_alive(tmp.name):
                tmp.unlink(missing_ok=True)

    def read_state(self) -> dict:
        """The checked contents of state.pt (step, files, scheduler, rng, extra, settings); CheckpointCorrupt when
        it is truncated, unreadable or fails its checksum."""
        path = self.state_path
        try:
            envelope = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise CheckpointCorrupt(path, "is missing", self.dir) from None
        except Exception as e:  # truncated zip, bad pickle opcode, ...: torch raises many types
            raise CheckpointCorrupt(path, f"is truncated or unreadable ({type(e).__name__})", self.dir) from None
        if not isinstance(envelope, dict) or "step" not in envelope:
            raise CheckpointCorrupt(path, "is not a minidpo checkpoint", self.dir)
        if "payload" not in envelope:  # format 1: everything inline, nothing checksummed
            if "sha256" in envelope:  # a checksummed envelope whose payload key a damaged byte renamed
                raise CheckpointCorrupt(path, "is inconsistent (damaged)", self.dir)
            return {**envelope, "files": {}, "settings": None}
        payload = envelope["payload"].numpy().tobytes() if isinstance(envelope["payload"], Tensor) else b""
        if hashlib.sha256(payload).hexdigest() != envelope.get("sha256"):
            raise CheckpointCorrupt(path, "fails its sha256 check (damaged)", self.dir)
        body = torch.load(io.BytesIO(payload), weights_only=True)
        # .get: a damaged byte can rename a key of the envelope, which must read as damage, not a KeyError
        if body["step"] != envelope["step"] or body.get("trainable") != envelope.get("trainable", object()):
            raise CheckpointCorrupt(path, "is inconsistent (damaged)", self.dir)
        return body

    def stored_settings(self) -> dict | None:
        """The settings the checkpoint was made with (None when it recorded none)."""
        raw = self.read_state()["settings"]
        return json.loads(raw) if raw is not None else None

    def load(self, optimizer, scheduler) -> tuple[int, dict]:
        """Restore the trainable tensors, optimizer, scheduler and RNG states; returns (step, extra).

        Everything is read and checked before anything is changed, so a failed load leaves the model as it was.
        """
        state = self.read_state()
        for name, digest in state["files"].items():
            path = self.dir / name
            if not path.is_file():
                raise CheckpointCorrupt(path, "is missing", self.dir)
            if sha256_file(path) != digest:
                raise CheckpointCorrupt(path, "fails its sha256 check (damaged or replaced)", self.dir)
        if self.settings is not None and state["settings"] is not None:
            check_settings(self.dir, json.loads(state["settings"]), self.settings)
        tensors = self._read(self.dir / state["trainable"], load_file)
        optim_state = state["optimizer"]  # format 1 kept it inline; format 2 names its file
        if isinstance(optim_state, str):
            optim_state = self._read(self.dir / optim_state, lambda p: torch.load(p, weights_only=True))
        self._check_tensors(tensors)
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(tensors[k])
        optimizer.load_state_dict(optim_state)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return state["step"], state["extra"]

    def _read(self, path: Path, reader):
        try:
            return reader(path)
        except FileNotFoundError:
            raise CheckpointCorrupt(path, "is missing", self.dir) from None
        except Exception as e:
            raise CheckpointCorrupt(path, f"is unreadable ({type(e).__name__}: {e})", self.dir) from None

    def _check_tensors(self, tensors: dict[str, Tensor]) -> None:
        missing = sorted(set(self.params) - set(tensors))
        if missing:
            raise ValueError(f"checkpoint {self.dir} lacks trainable tensors {missing[:5]} (made for another model "
                             "or adapter?)")
        for k, p in self.params.items():
            if tensors[k].shape != p.shape:
                raise ValueError(f"checkpoint {self.dir}: tensor {k} has shape {tuple(tensors[k].shape)}, the model "
                                 f"{tuple(p.shape)} (made for another model or adapter?)")

    def saved_step(self) -> int | None:
        """The step of the checkpoint on disk, or None when there is none (no checks beyond reading state.pt)."""
        if not self.exists():
            return None
        try:
            return int(torch.load(self.state_path, weights_only=True)["step"])
        except Exception:
            return None


def _pid_alive(temp_name: str) -> bool:
    """Whether the process that owns a fileio temporary name (`<name>.<pid>.<hex>.tmp`) still runs."""
    try:
        pid = int(temp_name.rsplit(".", 3)[-3])
    except (ValueError, IndexError):
        return True  # not ours to judge: keep it
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
