"""
The IMDb movie-review corpus, read straight from Stanford's tarball or its extracted directory.

Reference: Maas et al. 2011, "Learning Word Vectors for Sentiment Analysis" (ACL), which released the
Large Movie Review Dataset v1.0 (https://ai.stanford.edu/~amaas/data/sentiment/). The DPO paper
(Rafailov et al. 2023, sec. 6.1) uses its reviews as prompts for controlled sentiment generation.

Stanford's layout, inside `aclImdb_v1.tar.gz`:

    aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt    rating 7-10 for pos, 1-4 for neg
    aclImdb/train/unsup/<id>_0.txt                      unlabelled, rating 0
    aclImdb/README, aclImdb/imdb.vocab, aclImdb/{train,test}/urls_*.txt, ...  (ignored here)

The tarball is read in ONE sequential pass (a gzip stream cannot be seeked); nothing is extracted to disk.

Nothing corrupt gets in silently. The pass reads on to the gzip trailer, where the CRC32 and length of the whole
stream are checked (RFC 1952), since `tarfile` alone takes a cut stream for the end of the archive. Then the number
of reviews per wanted folder is compared with what the source promises: the shipped sample's manifest, or
Stanford's counts for an archive that carries Stanford's README. The cached download must also be Stanford's exact
file (size and sha256). A review that is not valid UTF-8 is an error naming the member: replacing bytes would feed
invented text to the tokenizer.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from minidpo.formats.download import cache_dir, download_file, file_problem  # one shared downloader and cache location
from minidpo.progress import Log, quiet

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
# published size and sha256 of Stanford's archive (the same values tfds and torchtext pin)
IMDB_SIZE = 84_125_825
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
IMDB_FILENAME = "aclImdb_v1.tar.gz"
# ~1,000 reviews cut from the full set by scripts/make_imdb_sample.py; see data/README.md
IMDB_SAMPLE_PATH = Path(__file__).resolve().parents[2] / "data" / "imdb_sample.tar.gz"

# what Stanford's archive holds per (split, label); its README opens with STANFORD_README_START
STANFORD_COUNTS = {("train", "pos"): 12_500, ("train", "neg"): 12_500, ("train", "unsup"): 50_000,
                   ("test", "pos"): 12_500, ("test", "neg"): 12_500}
STANFORD_README_START = b"Large Movie Review Dataset v1.0"
CHUNK = 1 << 20

SPLITS = ("train", "test")
LABELS = ("pos", "neg", "unsup")
RATINGS = {"pos": range(7, 11), "neg": range(1, 5), "unsup": range(0, 1)}
_NAME_RE = re.compile(r"(\d+)_(\d+)\.txt")
_BR_RE = re.compile(r"<br\s*/?>", re.IGNORECASE)


class ImdbError(ValueError):
    """A bad IMDB source: the message names the file (or member) and what was expected."""


@dataclass(frozen=True)
class Review:
    id: int  # unique within (split, label), not across them
    rating: int  # 1-10 stars; 0 for unsup
    label: str  # "pos" | "neg" | "unsup"
    split: str  # "train" | "test"
    text: str  # `<br />` already turned into "\n"


def parse_member(name: str) -> tuple[str, str, int, int] | None:
    """Map a path like 'aclImdb/train/pos/12_8.txt' to ("train", "pos", 12, 8).

    Returns None for members outside {train,test}/{pos,neg,unsup}/ (README, vocab, urls, .feat files).
    Raises ValueError naming the member when a review path breaks the layout or the rating rule.
    """
    parts = name.replace("\\", "/").strip("/").split("/")
    if parts and parts[0] == ".":
        parts = parts[1:]
    if parts and parts[0] == "aclImdb":
        parts = parts[1:]
    if len(parts) < 3 or parts[0] not in SPLITS or parts[1] not in LABELS:
        return None
    filename = parts[2] if len(parts) == 3 else "/".join(parts[2:])
    return check_review_name(parts[0], parts[1], filename, name)


def check_review_name(split: str, label: str, filename: str, name: str) -> tuple[str, str, int, int]:
    """Validate `<id>_<rating>.txt` in split/label/ against the layout and rating rule; errors name `name`."""
    m = _NAME_RE.fullmatch(filename)
    if m is None:
        raise ImdbError(f"IMDB member {name!r}: expected {split}/{label}/<id>_<rating>.txt")
    if split == "test" and label == "unsup":
        raise ImdbError(f"IMDB member {name!r}: Stanford's layout has unsup reviews only in train/")
    review_id, rating = int(m.group(1)), int(m.group(2))
    if rating not in RATINGS[label]:
        allowed = RATINGS[label]
        raise ImdbError(
            f"IMDB member {name!r}: rating {rating} breaks the rule for {label!r} "
            f"(expected {allowed.start}-{allowed.stop - 1})"
        )
    return split, label, review_id, rating


def clean_text(raw: bytes, name: str) -> str:
    """Decode a review file and turn its HTML line breaks into newlines.

    Naive equivalent: raw.decode("utf-8").replace("<br />", "\\n") (also catches '<br>' and '<br/>').
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ImdbError(f"IMDB member {name!r}: not valid UTF-8 ({e})") from None
    return _BR_RE.sub("\n", text)


RawReview = tuple[str, str, str, int, int, bytes]  # (member name, split, label, id, rating, bytes)


def _iter_tarball(path: Path, wanted: set[tuple[str, str]], notes: dict) -> Iterator[RawReview]:
    # one sequential pass over the gzip stream; members we do not want are skipped without reading
    if path.stat().st_size == 0:
        raise ImdbError(f"IMDB tarball {str(path)!r} is empty (0 bytes); expected a gzip-compressed tar in "
                        "Stanford's layout (aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt)")
    try:
        with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            with tarfile.open(fileobj=gz, mode="r|") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    if member.name.replace("\\", "/").strip("/").removeprefix("./") in ("aclImdb/README", "README"):
                        notes["readme"] = tf.extractfile(member).read(len(STANFORD_README_START))
                        continue
                    parsed = parse_member(member.name)
                    if parsed is None or (parsed[0], parsed[1]) not in wanted:
                        continue
                    f = tf.extractfile(member)
                    assert f is not None  # isfile() members always have a payload
                    yield (member.name, *parsed, f.read())
            # tarfile stops at the end-of-archive blocks (or at a cut it mistakes for them): read on to the
            # gzip trailer, where GzipFile checks the CRC32 and length of everything it decompressed
            while gz.read(CHUNK):
                pass
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ImdbError(f"IMDB tarball {str(path)!r} is unreadable or truncated ({type(e).__name__}: {e}); "
                        "expected a complete gzip-compressed tar (download or copy it again)") from None


def _iter_directory(root: Path, wanted: set[tuple[str, str]], notes: dict) -> Iterator[RawReview]:
    # root is the extracted `aclImdb` directory
    if (root / "README").is_file():
        with open(root / "README", "rb") as f:
            notes["readme"] = f.read(len(STANFORD_README_START))
    for split, label in sorted(wanted):
        folder = root / split / label
        if not folder.is_dir():
            raise ImdbError(f"IMDB directory {str(root)!r}: missing {split}/{label}/ (Stanford's layout)")
        for path in sorted(folder.iterdir()):
            parsed = check_review_name(split, label, path.name, str(path))
            yield (str(path), *parsed, path.read_bytes())


def resolve_source(source: str | os.PathLike) -> tuple[str, Path]:
    """Classify `source` as ("tarball", file) or ("dir", the aclImdb directory)."""
    path = Path(source).expanduser()
    if path.is_file():
        return "tarball", path
    if path.is_dir():
        if any((path / s).is_dir() for s in SPLITS):
            return "dir", path
        if (path / "aclImdb").is_dir():
            return "dir", path / "aclImdb"
        raise ImdbError(f"IMDB source {str(path)!r}: expected the aclImdb directory (with train/ and test/) or "
                        "its parent")
    raise FileNotFoundError(f"IMDB source {str(path)!r} does not exist; expected {IMDB_FILENAME}, an extracted "
                            "aclImdb dir, or its parent (download it with minidpo.dataset.imdb.download_imdb)")


def manifest_path(tarball: str | os.PathLike) -> Path:
    """Where a tarball's manifest lives: data/imdb_sample.tar.gz -> data/imdb_sample.manifest.json."""
    p = Path(tarball)
    stem = p.name.removesuffix(".gz").removesuffix(".tar").removesuffix(".tgz")
    return p.with_name(stem + ".manifest.json")


def read_manifest(path: Path) -> dict:
    """{"file", "size", "sha256", "reviews": {"train/pos": n, ...}}, checked; errors name the manifest."""
    try:
        m = json.loads(path.read_bytes().decode("utf-8"))
        counts = {tuple(k.split("/")): v for k, v in m["reviews"].items()}
        ok = (isinstance(m["size"], int) and isinstance(m["sha256"], str)
              and all(k in STANFORD_COUNTS and type(v) is int and v >= 0 for k, v in counts.items()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ImdbError(f"IMDB manifest {str(path)!r} is unreadable ({type(e).__name__}: {e})") from None
    if not ok:
        raise ImdbError(f"IMDB manifest {str(path)!r}: expected an integer 'size', a 'sha256' string and "
                        "'reviews' mapping 'split/label' to a count")
    return dict(m, reviews=counts)


def check_identity(kind: str, path: Path) -> tuple[dict[tuple[str, str], int], str] | None:
    """Before reading: a manifest's or the cache's file must be the exact file. Returns the counts promised
    so far (manifest or cached download) and who promises them, else None."""
    if kind != "tarball":
        return None
    if path.resolve() == (cache_dir() / IMDB_FILENAME).resolve():  # the copy download_imdb installs
        problem = file_problem(path, IMDB_SIZE, IMDB_SHA256)
        if problem is not None:
            raise ImdbError(f"IMDB tarball {str(path)!r}: {problem} (Stanford's aclImdb_v1.tar.gz, which "
                            "download_imdb installs there); the copy is truncated or corrupt: run "
                            "`python -c 'import minidpo.dataset.imdb as m; m.download_imdb()'` to fetch it again")
        return STANFORD_COUNTS, "Stanford's archive"
    mpath = manifest_path(path)
    if not mpath.is_file():
        return None
    m = read_manifest(mpath)
    problem = file_problem(path, m["size"], m["sha256"])
    if problem is not None:
        raise ImdbError(f"IMDB tarball {str(path)!r}: {problem} according to its manifest {str(mpath)!r}; "
                        "the file is truncated or altered (restore it, or re-run scripts/make_imdb_sample.py)")
    return m["reviews"], f"its manifest {str(mpath)!r}"


def check_counts(path: Path, counts: dict[tuple[str, str], int], promise: tuple[dict, str] | None) -> None:
    """Each wanted folder must hold exactly the number of reviews the source promises (if it promises any)."""
    if promise is None:
        return
    expected, who = promise
    for (split, label), n in sorted(counts.items()):
        want = expected.get((split, label), 0)
        if n != want:
            raise ImdbError(f"IMDB source {str(path)!r}: {split}/{label}/ holds {n:,} reviews but {who} promises "
                            f"{want:,}; the copy is truncated, trimmed or altered")


def iter_raw_reviews(source: str | os.PathLike, wanted: Iterable[tuple[str, str]]) -> Iterator[RawReview]:
    """Yield every review file of the wanted (split, label) pairs as raw bytes, in storage order; after the last
    one, the counts per wanted folder are checked against the source's promise (see the module docstring)."""
    wanted = set(wanted)
    kind, path = resolve_source(source)
    promise = check_identity(kind, path)
    notes: dict = {}
    counts = dict.fromkeys(wanted, 0)
    reader = _iter_tarball if kind == "tarball" else _iter_directory
    for item in reader(path, wanted, notes):
        counts[item[1], item[2]] += 1
        yield item
    if promise is None and notes.get("readme", b"").startswith(STANFORD_README_START):
        promise = STANFORD_COUNTS, "Stanford's README in it (Large Movie Review Dataset v1.0)"
    check_counts(path, counts, promise)


def load_imdb(source: str | os.PathLike, split: str = "train", labels: Iterable[str] = ("pos", "neg")) -> list[Review]:
    """Read one split of IMDb as Reviews sorted by (position of label in `labels`, id).

    `source` is `aclImdb_v1.tar.gz` (or the shipped sample tarball), the extracted `aclImdb` directory,
    or its parent. `labels` is any subset of ("pos", "neg", "unsup"); "unsup" exists only in train.
    """
    labels = tuple(labels)
    if split not in SPLITS:
        raise ValueError(f"load_imdb: split={split!r}, expected one of {SPLITS}")
    bad = [lab for lab in labels if lab not in LABELS]
    if bad or not labels or len(set(labels)) != len(labels):
        raise ValueError(f"load_imdb: labels={labels!r}, expected distinct values from {LABELS}")
    if split == "test" and "unsup" in labels:
        raise ValueError("load_imdb: split='test' has no 'unsup' reviews (they are in train only)")

    order = {lab: i for i, lab in enumerate(labels)}
    seen: dict[tuple[str, int], str] = {}
    reviews = []
    for name, sp, label, review_id, rating, raw in iter_raw_reviews(source, [(split, lab) for lab in labels]):
        if (label, review_id) in seen:
            raise ImdbError(f"IMDB member {name!r}: duplicate id {review_id} (also in {seen[label, review_id]!r})")
        seen[label, review_id] = name
        reviews.append(Review(review_id, rating, label, sp, clean_text(raw, name)))

    found = {r.label for r in reviews}
    missing = [lab for lab in labels if lab not in found]
    if missing:
        raise ImdbError(f"IMDB source {str(source)!r}: no reviews found under {split}/{missing[0]}/")
    reviews.sort(key=lambda r: (order[r.label], r.id))
    return reviews


def download_imdb(dest: str | os.PathLike | None = None, url: str = IMDB_URL, log: Log = quiet) -> Path:
    """Download aclImdb_v1.tar.gz to `dest` (a file path or a directory; default: the cache dir) with
    minidpo.formats.download.download_file. The published size and sha256 are checked for Stanford's URL and for the
    cache, so only an explicit `dest` can take other bytes from a mirror or a test server.
    """
    pinned = url == IMDB_URL or dest is None
    dest = Path(dest).expanduser() if dest is not None else cache_dir()
    if dest.is_dir() or dest.suffix == "":
        dest = dest / IMDB_FILENAME
    return download_file(url, dest, expected_size=IMDB_SIZE if pinned else None,
                         sha256=IMDB_SHA256 if pinned else None, desc="IMDB", log=log)
