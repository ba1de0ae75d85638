"""
The pairs file (pairs.jsonl): a cache of build_pairs's output, keyed by a fingerprint of every input.

Format: JSON Lines (https://jsonlines.org), UTF-8. Line 1 is a header {"format", "fingerprint", "n_pairs",
"sha256"}: sha256 (FIPS 180-4) is the hex digest of every byte after the header line, so a file cut short or edited
by hand is detected before any pair is used. Then one Pair per line. The fingerprint is the sha256 of a canonical
JSON of every input (config, prompt ids, model, classifier and data identities).
"""

import hashlib
import json
import math
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from minidpo.dataset.pairs import Pair, PairsConfig
from minidpo.dataset.prompts import Prompt, review_name
from minidpo.fileio import atomic_path
from minidpo.progress import Log, quiet

# /2: header carries the body's sha256, and pairs with identical completions are no longer written
FORMAT = "minidpo-pairs/2"
_TEXT = ("prompt", "chosen", "rejected", "split")
_IDS = ("prompt_ids", "chosen_ids", "rejected_ids")
_SCORES = ("chosen_score", "rejected_score")
_NAMES = {f.name for f in fields(Pair)}


def fingerprint(inputs: dict) -> str:
    """sha256 of the canonical JSON of `inputs` (sorted keys, no spaces, no NaN)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def module_fingerprint(module: nn.Module, samples: int = 256) -> str:
    """A cheap identity of a model: names, shapes, dtypes and a strided sample of ~`samples` entries per tensor
    (any training step moves sampled entries; an edit to one unsampled entry would go unnoticed)."""
    h = hashlib.sha256(type(module).__name__.encode())
    for name, t in sorted(module.state_dict().items()):
        flat = t.detach().reshape(-1)  # (numel,)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[::max(1, flat.numel() // samples)].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def reviews_fingerprint(reviews: Sequence[Any]) -> str:
    """Identity of a list of reviews: names, ratings and the sha256 of each text, in order."""
    return fingerprint({"reviews": [[review_name(r), r.rating, hashlib.sha256(r.text.encode()).hexdigest()]
                                    for r in reviews]})


def pairs_fingerprint(cfg: PairsConfig, prompts: Sequence[Prompt], model_id: str = "", scorer_id: str = "",
                      data_id: str = "") -> str:
    """Identity of a pairs file's inputs. The prompt ids stand for the data, prompt seed and prompt lengths."""
    return fingerprint({"format": FORMAT, "config": asdict(cfg), "prompts": [[p.split, p.ids] for p in prompts],
                        "model": model_id, "scorer": scorer_id, "data": data_id})


class PairsFileError(ValueError):
    """A pairs file that does not read back as written; str() names the file (and line), the problem and the
    remedy (the file is a cache: cached_pairs rebuilds it by itself)."""

    def __init__(self, path: Path, problem: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}; delete it (or rerun, which rebuilds it) to make it again from its "
                         f"inputs")
        self.path, self.problem, self.line = path, problem, line


def save_pairs(pairs: Sequence[Pair], path: str | os.PathLike, fingerprint: str) -> None:
    """Write the header line then one JSON object per pair, atomically: a failure leaves any old file untouched."""
    path = Path(path)
    body = [json.dumps(asdict(p), ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n" for p in pairs]
    digest = hashlib.sha256()
    for line in body:
        digest.update(line)
    header = {"format": FORMAT, "fingerprint": fingerprint, "n_pairs": len(pairs), "sha256": digest.hexdigest()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(json.dumps(header).encode("utf-8") + b"\n")
        f.writelines(body)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _parse_header(path: Path, line: bytes) -> dict:
    if not line.endswith(b"\n"):
        raise PairsFileError(path, "no complete header line (empty or truncated file)", 1)
    try:
        header = json.loads(line, parse_constant=_reject_constant)
    except ValueError as e:
        raise PairsFileError(path, f"header is not JSON ({e})", 1) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise PairsFileError(path, f"header must have format {FORMAT!r}, found {found!r} (not a pairs file of this "
                                   f"version)", 1)
    ok = (isinstance(header.get("fingerprint"), str) and isinstance(header.get("sha256"), str)
          and type(header.get("n_pairs")) is int and header["n_pairs"] >= 0)
    if not ok:
        raise PairsFileError(path, f"header needs fingerprint (str), n_pairs (int >= 0) and sha256 (str), "
                                   f"got {str(header)[:200]}", 1)
    return header


def read_header(path: str | os.PathLike) -> dict:
    """A pairs file's header, reading its first line only; PairsFileError if it is not one."""
    path = Path(path)
    with open(path, "rb") as f:
        return _parse_header(path, f.readline())


def read_fingerprint(path: str | os.PathLike) -> str | None:
    """The fingerprint in a pairs file's header; None if the file is missing or not a pairs file."""
    try:
        return read_header(path)["fingerprint"]
    except (OSError, PairsFileError):
        return None


def _pair_from_json(path: Path, lineno: int, text: str) -> Pair:
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise PairsFileError(path, f"not a JSON line ({e})", lineno) from None
    if not isinstance(obj, dict) or set(obj) != _NAMES:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise PairsFileError(path, f"expected an object with keys {sorted(_NAMES)}, got {got}", lineno)
    ok = (all(isinstance(obj[k], str) for k in _TEXT)
          and all(isinstance(obj[k], list) and all(type(i) is int and i >= 0 for i in obj[k]) for k in _IDS)
          and all(type(obj[k]) in (int, float) and math.isfinite(obj[k]) for k in _SCORES))
    if not ok:
        raise PairsFileError(path, f"expected strings {_TEXT}, lists of token ids {_IDS} and finite numbers "
                                   f"{_SCORES}", lineno)
    return Pair(**obj)


def load_pairs(path: str | os.PathLike) -> list[Pair]:
    """Every pair in a pairs file, after checking the header, the body's sha256 and the count."""
    path = Path(path)
    data = path.read_bytes()
    newline = data.find(b"\n")
    header = _parse_header(path, data[:newline + 1] if newline >= 0 else data)
    body = data[newline + 1:]
    if hashlib.sha256(body).hexdigest() != header["sha256"]:
        raise PairsFileError(path, "content does not match the sha256 in its header (truncated or edited)")
    try:
        lines = body.decode("utf-8").split("\n")  # json.dumps escapes newlines inside strings
    except UnicodeDecodeError as e:
        raise PairsFileError(path, f"not UTF-8 ({e})") from None
    if lines[-1]:
        raise PairsFileError(path, "last line has no newline (truncated?)", len(lines) + 1)
    pairs = [_pair_from_json(path, lineno, text) for lineno, text in enumerate(lines[:-1], start=2)]
    if len(pairs) != header["n_pairs"]:
        raise PairsFileError(path, f"header says {header['n_pairs']} pairs, file has {len(pairs)} (truncated?)")
    return pairs


def cached_pairs(path: str | os.PathLike, fingerprint: str, build_fn: Callable[[], list[Pair]],
                 log: Log = quiet) -> list[Pair]:
    """Load `path` if its fingerprint matches and it reads back whole; else build_fn(), save and return it (a
    damaged file is a cache to rebuild, said in one line through `log`)."""
    path = Path(path)
    why = "not found"
    if path.exists():
        try:
            if read_header(path)["fingerprint"] == fingerprint:
                pairs = load_pairs(path)
                log(f"pairs: reusing {path} (inputs unchanged)")
                return pairs
            why = "inputs changed"
        except PairsFileError as e:
            why = f"cannot use it: {e.problem}" + (f" at line {e.line}" if e.line is not None else "")
    log(f"pairs: building {path} ({why})")
    pairs = build_fn()
    save_pairs(pairs, path, fingerprint)
    return pairs
