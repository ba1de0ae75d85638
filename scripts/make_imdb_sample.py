"""
Cut data/imdb_sample.tar.gz (1,000 reviews in Stanford's layout) out of the full aclImdb_v1.tar.gz.

Reference: the Large Movie Review Dataset v1.0, Maas et al. 2011 (ACL),
https://ai.stanford.edu/~amaas/data/sentiment/. The sample lets tests and a first `train.py` run work
without the 84 MB download; data/README.md records its provenance.

Deterministic: reviews are picked with random.Random(seed) from each folder's id-sorted file list, the
tar members are sorted with fixed owner/mode/mtime, and the gzip header carries mtime=0 and no file
name, so re-running on the same input gives byte-identical output.

Beside the tarball it writes its manifest (`imdb_sample.manifest.json`: size, sha256 and the number of
reviews per folder), which minidpo.dataset.imdb checks on every read, so a truncated or altered copy is an error.

    python scripts/make_imdb_sample.py                       # ../shared/data/aclImdb_v1.tar.gz -> data/
    python scripts/make_imdb_sample.py --src ~/.cache/minidpo/aclImdb_v1.tar.gz --out /tmp/s.tar.gz
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import random
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from minidpo.dataset.imdb import iter_raw_reviews, manifest_path  # noqa: E402
from minidpo.fileio import atomic_write_bytes, atomic_write_json  # noqa: E402

# (split, label) -> how many reviews; 1,000 in all
SAMPLE_COUNTS: dict[tuple[str, str], int] = {
    ("train", "pos"): 300,
    ("train", "neg"): 300,
    ("train", "unsup"): 100,
    ("test", "pos"): 150,
    ("test", "neg"): 150,
}
SEED = 0
MTIME = 0  # every member and the gzip header get this timestamp, so the bytes do not depend on when we ran


def pick_reviews(
    src: str | os.PathLike, counts: dict[tuple[str, str], int], seed: int
) -> list[tuple[str, bytes]]:
    """One pass over `src`; returns sorted (archive name, raw bytes) of the chosen reviews."""
    by_folder: dict[tuple[str, str], list[tuple[int, str, bytes]]] = {key: [] for key in counts}
    for _, split, label, review_id, rating, raw in iter_raw_reviews(src, counts):
        by_folder[split, label].append((review_id, f"aclImdb/{split}/{label}/{review_id}_{rating}.txt", raw))

    rng = random.Random(seed)
    chosen = []
    for key in sorted(counts):  # fixed order, so each folder always sees the same rng state
        folder = sorted(by_folder[key])  # by id: independent of the order members had in `src`
        if len(folder) < counts[key]:
            raise ValueError(f"{src}: {key[0]}/{key[1]}/ has {len(folder)} reviews, sample needs {counts[key]}")
        chosen += [(arcname, raw) for _, arcname, raw in rng.sample(folder, counts[key])]
    return sorted(chosen)


def _tarinfo(name: str, size: int = 0, is_dir: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = 0o755 if is_dir else 0o644
    return info


def tarball_bytes(files: list[tuple[str, bytes]]) -> bytes:
    """A reproducible .tar.gz holding `files` plus their parent directories."""
    dirs = sorted({"/".join(name.split("/")[:i]) for name, _ in files for i in range(1, name.count("/") + 1)})
    buf = io.BytesIO()
    # filename="" and mtime=MTIME keep the gzip header free of the output path and the clock
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=MTIME, compresslevel=9) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for d in dirs:
                tf.addfile(_tarinfo(d + "/", is_dir=True))
            for name, raw in files:
                tf.addfile(_tarinfo(name, len(raw)), io.BytesIO(raw))
    return buf.getvalue()


def write_manifest(tarball: str | os.PathLike, counts: dict[tuple[str, str], int], seed: int) -> Path:
    """Write `<name>.manifest.json` beside the tarball: what minidpo.dataset.imdb checks the tarball against."""
    tarball = Path(tarball)
    data = tarball.read_bytes()
    manifest = {"file": tarball.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "reviews": {f"{s}/{lab}": n for (s, lab), n in sorted(counts.items())},
                "made_by": f"scripts/make_imdb_sample.py --seed {seed}",
                "source": "aclImdb_v1.tar.gz, Large Movie Review Dataset v1.0 (Maas et al. 2011)"}
    path = manifest_path(tarball)
    atomic_write_json(path, manifest)
    return path


def make_sample(
    src: str | os.PathLike,
    out: str | os.PathLike,
    counts: dict[tuple[str, str], int] = SAMPLE_COUNTS,
    seed: int = SEED,
) -> Path:
    """Write the sample tarball and its manifest atomically (each: temp file + rename); return the tarball."""
    data = tarball_bytes(pick_reviews(src, counts, seed))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    write_manifest(out, counts, seed)
    return out


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--src", default=str(root.parent / "shared" / "data" / "aclImdb_v1.tar.gz"),
                        help="full aclImdb_v1.tar.gz, or an extracted aclImdb dir")
    parser.add_argument("--out", default=str(root / "data" / "imdb_sample.tar.gz"))
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()

    out = make_sample(args.src, args.out, SAMPLE_COUNTS, args.seed)
    data = out.read_bytes()
    counts = ", ".join(f"{s}/{lab} {n}" for (s, lab), n in sorted(SAMPLE_COUNTS.items()))
    print(f"wrote {out}: {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()}, and {manifest_path(out)}")
    print(f"reviews: {counts} (seed {args.seed})")


if __name__ == "__main__":
    main()
