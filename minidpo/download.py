"""
Resumable, verified HTTP downloads with nothing but the standard library (urllib).

References: RFC 9110 sec. 14 (range requests: `Range: bytes=N-`, answers `206 Partial Content` with
`Content-Range: bytes N-M/TOTAL`, or `416` when N is past the end) and the resume scheme of
openai/gpt-2's download_model.py / wget -c: data goes to `<dest>.part`, a later call continues from
the bytes already there, and only a complete, size- (and optionally sha256-) checked file is renamed
to `<dest>` in one atomic `os.replace`. A failure therefore never destroys a finished file, and never
leaves a half-written file under the final name.

Where files live: `cache_dir()` is `$MINIDPO_CACHE` if that variable is set, else `~/.cache/minidpo`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHUNK = 1 << 20          # bytes per read; large enough that Python overhead is negligible
TIMEOUT_S = 30.0         # per socket operation (connect, each read), not for the whole transfer
USER_AGENT = "minidpo-download/1.0 (+urllib)"


class DownloadError(RuntimeError):
    """A download that could not be completed; the message names the URL and the destination."""


def cache_dir() -> Path:
    """Where downloads live: `$MINIDPO_CACHE` if set (and non-empty), else `~/.cache/minidpo`."""
    return Path(os.environ.get("MINIDPO_CACHE") or Path.home() / ".cache" / "minidpo").expanduser()


def part_path(dest: Path) -> Path:
    """Where the bytes of an unfinished download of `dest` are kept between attempts."""
    return dest.with_name(dest.name + ".part")


class Progress:
    """A plain-text progress line on stderr, redrawn at most every `interval` seconds."""

    def __init__(self, desc: str, total: int | None, done: int, interval: float | None = None):
        self.desc, self.total, self.done, self.start_done = desc, total, done, done
        self.tty = sys.stderr.isatty()
        # on a terminal redraw in place often; in a log file print a line every few seconds
        self.interval = interval if interval is not None else (0.25 if self.tty else 5.0)
        self.t0 = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._draw(final=False)

    def close(self) -> None:
        self._draw(final=True)

    def _draw(self, final: bool) -> None:
        rate = (self.done - self.start_done) / max(time.monotonic() - self.t0, 1e-9)
        if self.total:
            text = (f"{self.desc}: {100 * self.done / self.total:5.1f}% "
                    f"{self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB {rate / 1e6:.1f} MB/s")
        else:
            text = f"{self.desc}: {self.done / 1e6:.1f} MB {rate / 1e6:.1f} MB/s"
        end = "\n" if final or not self.tty else ""
        sys.stderr.write(("\r" if self.tty else "") + text + end)
        sys.stderr.flush()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """`bytes 100-199/1000` -> (100, 1000); `bytes */1000` -> (None, 1000); unknown parts are None."""
    if not value or not value.strip().startswith("bytes"):
        return None, None
    spec, _, total = value.strip()[5:].strip().partition("/")
    start = int(spec.split("-")[0]) if spec[:1].isdigit() else None
    return start, int(total) if total.strip().isdigit() else None


def offline_hint(url: str, dest: Path) -> str:
    return (f"could not reach {url} (the network is unreachable or the host is down). "
            f"If this machine is offline, download the file on another machine and place it by hand at {dest} "
            f"(a partial copy at {part_path(dest)} is resumed automatically)")


def _open(url: str, offset: int, timeout: float):
    """urlopen with `Range: bytes=offset-` when resuming; returns the response or raises HTTPError/URLError."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _attempt(url: str, dest: Path, part: Path, expected_size: int | None, desc: str, timeout: float) -> None:
    """One HTTP request that appends to `part` until the server's stream ends; raises on any failure."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()  # longer than the real file: not a prefix of it, start over
        offset = 0
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset > 0:
            # the server says our offset is at/after the end: complete if the sizes agree, else start over
            _, total = parse_content_range(e.headers.get("Content-Range"))
            if total is not None and total == offset and expected_size in (None, total):
                return
            part.unlink()
            raise ConnectionResetError("server rejected the resume offset; restarting from zero") from None
        raise DownloadError(f"downloading {url} to {dest}: the server answered HTTP {e.code} {e.reason}") from None
    with resp:
        total = None
        if resp.status == 206:
            start, total = parse_content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise ConnectionResetError(f"server resumed at byte {start}, not {offset}; restarting from zero")
        else:
            if offset > 0:  # the server ignored Range and sends the whole file: start over from zero
                offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if total is not None and expected_size is not None and total != expected_size:
            raise DownloadError(f"downloading {url} to {dest}: the server reports {total:,} bytes but "
                                f"{expected_size:,} were expected (wrong URL or a changed file); nothing was written")
        progress = Progress(desc, total, offset)
        with open(part, "ab" if offset > 0 else "wb") as f:
            try:
                while block := resp.read(CHUNK):
                    f.write(block)
                    progress.update(len(block))
            finally:
                progress.close()
    got = part.stat().st_size
    if total is not None and got < total:
        raise http.client.IncompleteRead(b"", total - got)  # retried: the next attempt resumes
    if total is not None and got > total:
        part.unlink()
        raise DownloadError(f"downloading {url} to {dest}: received {got:,} bytes, more than the "
                            f"{total:,} announced; the partial file was discarded")


def download_file(url: str, dest: str | os.PathLike, expected_size: int | None = None, sha256: str | None = None,
                  desc: str | None = None, retries: int = 3, timeout: float = TIMEOUT_S) -> Path:
    """Download `url` to `dest` and return `dest`; a no-op if `dest` already exists with the expected size.

    Bytes land in `<dest>.part` first. An interrupted transfer is resumed with an HTTP Range request, in this
    call (up to `retries` more attempts, each continuing where the last stopped) or in a later one; a server
    that ignores Range (200 instead of 206) makes it restart from zero. The size is checked against the
    server's Content-Length / Content-Range total and `expected_size`, then `sha256` if given, and only then is
    the file renamed to `dest` atomically. Raises DownloadError with the URL and `dest` in its message.
    """
    dest = Path(dest).expanduser()
    part = part_path(dest)
    desc = desc or dest.name
    if dest.is_file() and (expected_size is None or dest.stat().st_size == expected_size):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the directory {dest.parent} for {url}: {e}") from None
    for attempt in range(retries + 1):
        before = part.stat().st_size if part.exists() else 0
        try:
            _attempt(url, dest, part, expected_size, desc, timeout)
            break
        except DownloadError:
            raise
        except urllib.error.URLError as e:  # DNS failure, connection refused, no route: nothing was received
            if isinstance(e.reason, OSError):  # refused, unreachable, DNS (gaierror), connect timeout
                raise DownloadError(f"downloading {url} to {dest} failed: {offline_hint(url, dest)}; "
                                    f"cause: {e.reason}") from None
            raise DownloadError(f"downloading {url} to {dest} failed: {e.reason}") from None
        except (http.client.HTTPException, OSError) as e:  # cut off mid-transfer: resume
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise DownloadError(
                    f"downloading {url} to {dest}: the transfer was interrupted ({type(e).__name__}: {e}) "
                    f"after {have:,} bytes; run again to resume from {part}") from None
            if have <= before:
                time.sleep(min(2.0 ** attempt, 10.0))  # no progress: back off before asking again
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        raise DownloadError(f"downloading {url} to {dest}: got {size:,} bytes, expected {expected_size:,}; "
                            f"the partial file is kept at {part}, run again to resume")
    if sha256 is not None:
        digest = sha256_of(part)
        if digest != sha256.lower():
            part.unlink()
            raise DownloadError(f"downloading {url} to {dest}: sha256 {digest} does not match the expected "
                                f"{sha256}; the corrupt download was deleted")
    os.replace(part, dest)
    return dest
