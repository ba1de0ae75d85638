"""
OpenAI's GPT-2 release files: which files, what each must be (pinned size and sha256), where they are cached, and
fetching them.

Reference: openai/gpt-2 download_model.py (the seven files per model, from
`https://openaipublic.blob.core.windows.net/gpt-2/models/<size>/<file>`). The pins come from public sources, never
from a guess: for 124M, a public download script's sizes and sha256 values (the checkpoint and hparams.json hashes
reproduce from the files' known contents, encoder.json and vocab.bpe equal tiktoken's pins); for 124M and 355M
sizes, rasbt/LLMs-from-scratch's tests. No sha256 was found for 355M, nor anything for 774M and 1558M. A file
without a pinned sha256 is still guarded at load: the data shard by the CRC32C of every tensor
(minidpo.formats.tf_bundle), the index by its block CRCs, hparams.json by minidpo.model.weights' checks.

Pins apply only to OpenAI's own URL (and so to the cache filled from it); with $MINIDPO_GPT2_URL pointing at a mirror
or a test server, files are checked by the server's length alone.
"""

import os
from pathlib import Path

from minidpo.formats.download import DownloadError, cache_dir, download_file, file_problem
from minidpo.progress import Log, quiet

OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
OPENAI_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
                "model.ckpt.meta", "vocab.bpe")  # the list in openai/gpt-2 download_model.py
NEEDED = ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001")  # what load_gpt2 reads
SIZE_OF = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
SIZE_OF.update({v: v for v in list(SIZE_OF.values())})

# (model size, file) -> (bytes, sha256 or None). 774M and 1558M: no public source found for any of their files.
PINS: dict[tuple[str, str], tuple[int, str | None]] = {
    ("124M", "checkpoint"): (77, "dd1b025d2e155283f5e300ce95bf6d5b6bc0f7fe010db73daa6975eb896ab9cb"),
    ("124M", "encoder.json"): (1_042_301, "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    ("124M", "hparams.json"): (90, "d9d56e4121c427164e0c55c6f03c08e1daf9002b9b672825112d19097b680318"),
    ("124M", "model.ckpt.data-00000-of-00001"):
        (497_759_232, "2060c885360cc0cf41d7a6dbc4d24b5127aae20260c8b5ae521b5a6578407118"),
    ("124M", "model.ckpt.index"): (5_215, "71916f763f9746f9b2a06b12d91996cf1084ae008d0424543d39391c5f2dc687"),
    ("124M", "model.ckpt.meta"): (471_155, "4668c448fa11531fd6700460487f73e82d3272960cea942252f8744bf225c77b"),
    ("124M", "vocab.bpe"): (456_318, "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    ("355M", "checkpoint"): (77, None),
    ("355M", "encoder.json"): (1_042_301, None),
    ("355M", "hparams.json"): (91, None),
    ("355M", "model.ckpt.data-00000-of-00001"): (1_419_292_672, None),
    ("355M", "model.ckpt.index"): (10_399, None),
    ("355M", "model.ckpt.meta"): (926_519, None),
    ("355M", "vocab.bpe"): (456_318, None),
}


def gpt2_cache_dir(name: str) -> Path:
    """`<cache_dir()>/gpt2/<124M|355M|774M|1558M>/`, where load_gpt2(name) looks for OpenAI's release files."""
    return cache_dir() / "gpt2" / SIZE_OF[name]


def release_url(override: str | None = None) -> str:
    """Where the release files come from: `override`, else $MINIDPO_GPT2_URL, else OpenAI's public storage."""
    return (override or os.environ.get("MINIDPO_GPT2_URL") or OPENAI_URL).rstrip("/")


def pins(size: str, fname: str, base: str) -> tuple[int | None, str | None]:
    """(size, sha256) a file must have: the pins for OpenAI's URL, nothing for any other server."""
    return PINS.get((size, fname), (None, None)) if base == OPENAI_URL else (None, None)


def cache_problems(name: str, directory: Path, base: str) -> dict[str, str]:
    """{file: what is wrong} for the files load_gpt2 needs in `directory` (missing, or failing its pins)."""
    size, out = SIZE_OF[name], {}
    for fname in NEEDED:
        path = directory / fname
        problem = file_problem(path, *pins(size, fname, base)) if path.is_file() else "it is missing"
        if problem is not None:
            out[fname] = problem
    return out


def download_gpt2(name: str = "124M", dest_dir: str | os.PathLike | None = None, base_url: str | None = None,
                  log: Log = quiet) -> Path:
    """Fetch OpenAI's release files of GPT-2 `name` from `<release_url()>/<size>/<file>` into `dest_dir` (default
    gpt2_cache_dir(name)) with minidpo.formats.download.download_file; returns it."""
    if name not in SIZE_OF:
        raise ValueError(f"unknown GPT-2 model {name!r}; expected one of {', '.join(SIZE_OF)}")
    size = SIZE_OF[name]
    dest = Path(dest_dir).expanduser() if dest_dir is not None else gpt2_cache_dir(name)
    base = release_url(base_url)
    for fname in OPENAI_FILES:
        url = f"{base}/{size}/{fname}"
        expected_size, sha256 = pins(size, fname, base)
        try:
            download_file(url, dest / fname, expected_size=expected_size, sha256=sha256, desc=f"GPT-2 {size} {fname}",
                          log=log)
        except DownloadError as e:
            raise DownloadError(
                f"could not fetch GPT-2 {size}: {e}.\nTo install it by hand, put OpenAI's release files "
                f"({', '.join(NEEDED)}; from {base}/{size}/ or `python download_model.py {size}` in openai/gpt-2) "
                f"into {dest}/ (set MINIDPO_CACHE to move the cache), or point --model (or load_gpt2) at a directory "
                "with config.json + model.safetensors / pytorch_model.bin") from None
    return dest


def ensure_gpt2(name: str, log: Log = quiet) -> Path:
    """The cache directory of GPT-2 `name` once every needed file is there and passes its pins; a missing or bad
    file is fetched (again) first. The error when that fails says what was wrong with the cached copy."""
    d, base = gpt2_cache_dir(name), release_url()
    problems = cache_problems(name, d, base)
    if not problems:
        return d
    bad = {f: p for f, p in problems.items() if p != "it is missing"}
    for fname, problem in bad.items():
        log(f"GPT-2 {SIZE_OF[name]}: the cached {d / fname} is bad ({problem}); fetching it again")
    try:
        return download_gpt2(name, d, log=log)
    except DownloadError as e:
        if not bad:
            raise
        told = "; ".join(f"{d / f}: {p}" for f, p in bad.items())
        raise DownloadError(f"the cached GPT-2 {SIZE_OF[name]} is damaged ({told}) and fetching it again "
                            f"failed: {e}") from None
