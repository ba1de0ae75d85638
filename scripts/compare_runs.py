"""
Are two train.py output folders the same run? Every file under either folder is compared with its namesake:

- .json, .jsonl, .csv: equal after parsing, with the fields that hold wall-clock measurements removed (seconds,
  *_seconds, *_per_s such as tokens_per_s and pairs_per_s, ms_per_step, eta) and each folder's own path replaced
  by one placeholder (config.json records --out-dir), as is the checkout each ran from when given (summary.json
  records the path of the bundled data);
- .safetensors (adapters, merged models, cached reference log-probs, the reward model): byte-identical, or else
  the same tensor bytes and header, with each JSON-valued metadata entry compared parsed and without its timing
  fields (reward_model.safetensors records its training summary, wall-clock times included);
- .pt (checkpoints: optimizer state, RNG states, the loop's totals): byte-identical, or else equal after loading,
  the checksummed payload unpacked (its sha256 covers the timing fields, its file list the names of temporary
  files), the same timing fields removed, and the global Python and numpy RNG states left out: minidpo neither
  seeds nor draws from them (its random streams are its own), so they hold each process's start-up entropy and
  differ between two runs of the same commit (torch's RNG states are compared);
- .png (plots) and .lock (the lock holds its writer's process id and time): skipped; everything else:
  byte-identical.

A file present on one side only is a difference. Prints each difference and a count of files compared; the exit
status is 1 when anything differs.

    python scripts/compare_runs.py out/before out/after [checkout/before checkout/after]
"""

import csv
import io
import json
import re
import sys
from pathlib import Path

TIMING = re.compile(r"^(seconds|.*_seconds|.*_per_s|ms_per_step|eta)$")


def drop_timing(value):
    """value with every dict key that holds a wall-clock measurement removed, recursively."""
    if isinstance(value, dict):
        return {k: drop_timing(v) for k, v in value.items() if not (isinstance(k, str) and TIMING.match(k))}
    if isinstance(value, (list, tuple)):
        return [drop_timing(v) for v in value]
    return value


def parsed(path: Path, root: Path, source: Path | None = None):
    text = path.read_text().replace(str(root.resolve()), "<root>").replace(str(root), "<root>")
    if source is not None:
        text = text.replace(str(source.resolve()), "<source>")
    if path.suffix == ".json":
        return drop_timing(json.loads(text))
    if path.suffix == ".jsonl":
        return [drop_timing(json.loads(line)) for line in text.splitlines() if line.strip()]
    return drop_timing(list(csv.DictReader(io.StringIO(text))))


def same_checkpoint(a: Path, b: Path) -> bool:
    import torch

    def equal(x, y) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and len(x) == len(y) and all(map(equal, x, y))
        return x == y
    def body(path: Path):
        state = torch.load(path, weights_only=False)
        if isinstance(state, dict) and isinstance(state.get("payload"), torch.Tensor):  # checkpoint.py's envelope
            payload = torch.load(io.BytesIO(state["payload"].numpy().tobytes()), weights_only=False)
            payload.pop("files", None)  # sha256 of the files beside it, compared themselves
            payload.get("rng", {}).pop("python", None)
            payload.get("rng", {}).pop("numpy", None)
            state = {**{k: v for k, v in state.items() if k not in ("payload", "sha256")}, "payload": payload}
        return drop_timing(state)
    return equal(body(a), body(b))


def same_safetensors(a: Path, b: Path) -> bool:
    def split(path: Path):
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        meta = header.pop("__metadata__", {})
        for k, v in meta.items():
            try:
                meta[k] = drop_timing(json.loads(v))
            except ValueError:
                pass  # a plain string
        return header, meta, raw[8 + n:]
    return split(a) == split(b)


def differences(before: Path, after: Path, sources: tuple[Path | None, Path | None] = (None, None)
                ) -> tuple[list[str], int]:
    names = {p.relative_to(before) for p in before.rglob("*") if p.is_file()}
    names |= {p.relative_to(after) for p in after.rglob("*") if p.is_file()}
    found, compared = [], 0
    for name in sorted(names):
        a, b = before / name, after / name
        if not (a.is_file() and b.is_file()):
            found.append(f"{name}: only in {before if a.is_file() else after}")
            continue
        if name.suffix in (".png", ".lock") or name.name == ".lock":
            continue
        compared += 1
        if name.suffix in (".json", ".jsonl", ".csv"):
            same = parsed(a, before, sources[0]) == parsed(b, after, sources[1])
        elif name.suffix == ".pt":
            same = a.read_bytes() == b.read_bytes() or same_checkpoint(a, b)
        elif name.suffix == ".safetensors":
            same = a.read_bytes() == b.read_bytes() or same_safetensors(a, b)
        else:
            same = a.read_bytes() == b.read_bytes()
        if not same:
            found.append(f"{name}: differs")
    return found, compared


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 4) or any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip().splitlines()[-1].strip())
        return 0 if any(a in ("-h", "--help") for a in argv) else 2
    before, after = Path(argv[0]), Path(argv[1])
    sources = (Path(argv[2]), Path(argv[3])) if len(argv) == 4 else (None, None)
    found, compared = differences(before, after, sources)
    for line in found:
        print(line)
    print(f"{compared} files compared (png and lock skipped): "
          f"{'identical' if not found else f'{len(found)} differ'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
