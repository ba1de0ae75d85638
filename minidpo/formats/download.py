"""
Resumable, verified HTTP downloads with nothing but the standard library (urllib).

References: RFC 9110 sec. 14 (range requests: `Range: bytes=N-`, answers `206 Partial Content` with
`Content-Range: bytes N-M/TOTAL`, or `416` when N is past the end) and the resume scheme of openai/gpt-2's
download_model.py / wget -c: data goes to `<dest>.part`, a later call continues from the bytes already there, and
only a complete, checked file is renamed to `<dest>` in one atomic `os.replace`.

Checked: the length the server announces (a body whose end the server does not mark is refused unless the caller
pins a size or sha256), the caller's pinned size and sha256 (a sha256 failure discards the bytes and downloads once
more from zero), that the body is not an HTML page, and a file already at `<dest>`, re-checked against the pins on
every call. `cache_dir()` is `$MINIDPO_CACHE` if that variable is set, else `~/.cache/minidpo`.
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

from minidpo.progress import Log, quiet

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


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 already checked in this process


def file_problem(path: str | os.PathLike, size: int | None = None, sha256: str | None = None) -> str | None:
    """None if `path` has the expected size and sha256 (each checked only when given), else what is wrong.

    Naive equivalent: compare path.stat().st_size and sha256_of(path) with the pins. A file already hashed in
    this process is not hashed again while its size and mtime stay the same (any rewrite changes the mtime).
    """
    st = Path(path).stat()
    if size is not None and st.st_size != size:
        return f"it has {st.st_size:,} bytes, expected {size:,}"
    if sha256 is not None:
        key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
        if _VERIFIED.get(key) != sha256.lower():
            digest = sha256_of(Path(path))
            if digest != sha256.lower():
                return f"its sha256 is {digest}, expected {sha256.lower()}"
            _VERIFIED[key] = digest
    return None


def already_verified(path: str | os.PathLike) -> bool:
    """Whether file_problem already matched `path` against a pinned sha256 in this process, unchanged since."""
    try:
        st = Path(path).stat()
    except OSError:
        return False
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns) in _VERIFIED


def looks_like_html(head: bytes) -> bool:
    """Whether a body starts like an HTML page (`<!DOCTYPE html`, `<html`), after a BOM and whitespace."""
    start = head[:512].removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    return start.startswith((b"<!doctype html", b"<html"))


def parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """`bytes 100-199/1000` -> (100, 1000); `bytes */1000` -> (None, 1000); unknown parts are None."""
    if not value or not value.strip().startswith("bytes"):
        return None, None
    spec, _, total = value.strip()[5:].strip().partition("/")
    start = int(spec.split("-")[0]) if spec[:1].isdigit() else None
    return start, int(total) if total.strip().isdigit() else None


def _open(url: str, offset: int, timeout: float):
    """urlopen with `Range: bytes=offset-` when resuming; returns the response or raises HTTPError/URLError."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _attempt(url: str, dest: Path, part: Path, expected_size: int | None, desc: str, timeout: float,
             allow_html: bool) -> bool:
    """One HTTP request that appends to `part` until the server's stream ends; raises on any failure.

    Returns whether the server marked where the body ends (a length, or chunked framing), i.e. whether a cut
    connection can be told apart from the end of the file.
    """
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
                return True
            part.unlink()
            raise ConnectionResetError("server rejected the resume offset; restarting from zero") from None
        raise DownloadError(f"downloading {url} to {dest}: the server answered HTTP {e.code} {e.reason}") from None
    with resp:
        if not allow_html and resp.headers.get_content_type() == "text/html":
            raise DownloadError(f"downloading {url} to {dest}: the server sent an HTML page (Content-Type "
                                f"{resp.headers.get('Content-Type')}), not the file; nothing was written. The URL "
                                "is wrong or the host serves an error or login page")
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
        framed = total is not None or "chunked" in resp.headers.get("Transfer-Encoding", "").lower()
        if total is not None and expected_size is not None and total != expected_size:
            raise DownloadError(f"downloading {url} to {dest}: the server reports {total:,} bytes but "
                                f"{expected_size:,} were expected (wrong URL or a changed file); nothing was written")
        progress = Progress(desc, total or expected_size, offset)
        with open(part, "ab" if offset > 0 else "wb") as f:
            try:
                first = True
                while block := resp.read(CHUNK):
                    if first and offset == 0 and not allow_html and looks_like_html(block):
                        f.close()
                        part.unlink()
                        raise DownloadError(f"downloading {url} to {dest}: the server sent an HTML page, not the "
                                            "file; nothing was written. The URL is wrong or the host serves an "
                                            "error or login page")
                    first = False
                    f.write(block)
                    progress.update(len(block))
            finally:
                progress.close()
    got = part.stat().st_size
    end = total if total is not None else expected_size  # without a length from the server, the pinned size
    if end is not None and got < end:
        raise http.client.IncompleteRead(b"", end - got)  # retried: the next attempt resumes
    if end is not None and got > end:
        part.unlink()
        raise DownloadError(f"downloading {url} to {dest}: received {got:,} bytes, more than the "
                            f"{end:,} expected; the partial file was discarded")
    return framed


def _fetch(url: str, dest: Path, part: Path, expected_size: int | None, desc: str, retries: int,
           timeout: float, allow_html: bool) -> bool:
    """Fill `part` with the whole file, resuming after cuts (up to `retries` more requests); returns `framed`."""
    for attempt in range(retries + 1):
        before = part.stat().st_size if part.exists() else 0
        try:
            return _attempt(url, dest, part, expected_size, desc, timeout, allow_html)
        except DownloadError:
            raise
        except urllib.error.URLError as e:  # DNS failure, connection refused, no route: nothing was received
            if isinstance(e.reason, OSError):  # refused, unreachable, DNS (gaierror), connect timeout
                raise DownloadError(f"downloading {url} to {dest} failed: could not reach {url} (the network is "
                                    "unreachable or the host is down). If this machine is offline, download the file "
                                    f"on another machine and place it by hand at {dest} (a partial copy at "
                                    f"{part_path(dest)} is resumed automatically); cause: {e.reason}") from None
            raise DownloadError(f"downloading {url} to {dest} failed: {e.reason}") from None
        except (http.client.HTTPException, OSError) as e:  # cut off mid-transfer: resume
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise DownloadError(
                    f"downloading {url} to {dest}: the transfer was interrupted ({type(e).__name__}: {e}) "
                    f"after {have:,} bytes; run again to resume from {part}") from None
            if have <= before:
                time.sleep(min(2.0 ** attempt, 10.0))  # no progress: back off before asking again
    raise AssertionError("unreachable")


# params: the url and dest, then optional keywords only (pins, retries, timeout), as urllib and requests take them
def download_file(url: str, dest: str | os.PathLike, expected_size: int | None = None, sha256: str | None = None,
                  desc: str | None = None, retries: int = 3, timeout: float = TIMEOUT_S, allow_html: bool = False,
                  log: Log = quiet) -> Path:
    """Download `url` to `dest` and return `dest`; a no-op if `dest` already exists and passes the pins (see the
    module docstring). An interrupted transfer is resumed with an HTTP Range request, in this call (up to `retries`
    more attempts) or in a later one; a server that ignores Range makes it restart from zero. An existing `dest`
    that fails the pins stays in place until a good copy replaces it. An HTML body is refused unless `allow_html`.
    Raises DownloadError with the URL and `dest` in its message.
    """
    dest = Path(dest).expanduser()
    part = part_path(dest)
    desc = desc or dest.name
    if dest.is_file():
        problem = file_problem(dest, expected_size, sha256)
        if problem is None:
            return dest
        log(f"{dest}: {problem}; downloading it again from {url}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the directory {dest.parent} for {url}: {e}") from None
    for fresh in (False, True):
        resumed = part.exists() and part.stat().st_size > 0
        framed = _fetch(url, dest, part, expected_size, desc, retries, timeout, allow_html)
        if not framed and expected_size is None and sha256 is None:
            part.unlink(missing_ok=True)
            raise DownloadError(f"downloading {url} to {dest}: the server marked neither the length nor the end "
                                "of the body (no Content-Length), so a cut connection cannot be told from the end "
                                "of the file and nothing was installed; pass expected_size or sha256")
        size = part.stat().st_size
        if expected_size is not None and size != expected_size:
            raise DownloadError(f"downloading {url} to {dest}: got {size:,} bytes, expected {expected_size:,}; "
                                f"the partial file is kept at {part}, run again to resume")
        digest = sha256_of(part) if sha256 is not None else None
        if digest is None or digest == sha256.lower():
            os.replace(part, dest)
            return dest
        part.unlink()
        how = "resumed from an earlier partial file" if resumed else "downloaded"
        if fresh:
            raise DownloadError(f"downloading {url} to {dest}: sha256 {digest} does not match the expected "
                                f"{sha256} twice (the second time downloaded from zero); the corrupt download "
                                "was deleted. The file at the URL is not the one expected")
        log(f"{dest}: the {how} file has sha256 {digest}, expected {sha256}; downloading it again from zero")
    raise AssertionError("unreachable")
