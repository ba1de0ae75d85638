"""minidpo.formats.download against a local HTTP server (127.0.0.1, a thread) whose handler implements Range itself."""

import hashlib
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from minidpo.formats.download import (
    DownloadError,
    cache_dir,
    download_file,
    file_problem,
    looks_like_html,
    parse_content_range,
    part_path,
)

PAYLOAD = bytes(range(256)) * 97 + b"tail"  # 24,836 bytes, every byte value, not a multiple of anything


class Handler(BaseHTTPRequestHandler):
    """Serves server.files; honours `Range: bytes=N-` unless server.ignore_range; while server.cut_budget > 0
    it cuts the connection after server.cut_after body bytes (decrementing the budget), only for the path
    server.cut_path if that is set. server.send_length=False leaves Content-Length out of 200 answers (the body
    then ends when the connection closes); server.content_type sets the Content-Type header."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if status == 206 or getattr(srv, "send_length", True):
            self.send_header("Content-Length", str(len(body) - start))
        else:
            self.close_connection = True  # without a length, closing the connection marks the end of the body
        self.send_header("Content-Type", getattr(srv, "content_type", "application/octet-stream"))
        self.end_headers()
        chunk = body[start:]
        if srv.cut_budget > 0 and getattr(srv, "cut_path", self.path) == self.path:
            srv.cut_budget -= 1
            chunk = chunk[:srv.cut_after]
            self.close_connection = True
        self.wfile.write(chunk)
        self.wfile.flush()


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files = {"/f.bin": PAYLOAD}
    srv.requests, srv.ignore_range, srv.cut_budget, srv.cut_after = [], False, 0, 0
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connecting is refused, like an unreachable network but fast
    return port


def test_download_writes_exact_bytes_and_leaves_no_part_file(server, tmp_path):
    dest = download_file(server.url + "/f.bin", tmp_path / "sub" / "f.bin", expected_size=len(PAYLOAD),
                         sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert dest.read_bytes() == PAYLOAD
    assert not part_path(dest).exists()


def test_complete_destination_returns_without_any_request(server, tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"already here")
    assert download_file(server.url + "/f.bin", dest) == dest
    assert server.requests == [] and dest.read_bytes() == b"already here"


def test_cut_off_transfer_is_resumed_with_a_range_request(server, tmp_path):
    server.cut_budget, server.cut_after = 1, 10_000
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="interrupted"):
        download_file(server.url + "/f.bin", dest, retries=0)
    assert part_path(dest).read_bytes() == PAYLOAD[:10_000] and not dest.exists()
    download_file(server.url + "/f.bin", dest, expected_size=len(PAYLOAD))
    assert server.requests[-1] == ("/f.bin", "bytes=10000-")
    assert dest.read_bytes() == PAYLOAD


def test_retries_resume_within_one_call(server, tmp_path):
    server.cut_budget, server.cut_after = 2, 7_000
    dest = download_file(server.url + "/f.bin", tmp_path / "f.bin", retries=3)
    assert [r for _, r in server.requests] == [None, "bytes=7000-", "bytes=14000-"]
    assert dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.ignore_range = True
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(PAYLOAD[:5000])
    download_file(server.url + "/f.bin", dest)
    assert server.requests[-1][1] == "bytes=5000-"  # asked to resume, got a 200 with the whole file
    assert dest.read_bytes() == PAYLOAD


def test_part_file_already_complete_is_finished_after_416(server, tmp_path):
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(PAYLOAD)
    download_file(server.url + "/f.bin", dest, expected_size=len(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD


def test_size_mismatch_is_an_error_and_keeps_the_existing_file(server, tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old version")  # wrong size, so a download is attempted; it must not be destroyed
    with pytest.raises(DownloadError) as e:
        download_file(server.url + "/f.bin", dest, expected_size=len(PAYLOAD) + 1)
    msg = str(e.value)
    assert f"{len(PAYLOAD):,}" in msg and f"{len(PAYLOAD) + 1:,}" in msg and str(dest) in msg
    assert dest.read_bytes() == b"old version"


def test_sha256_mismatch_deletes_the_download_and_keeps_the_existing_file(server, tmp_path):
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="sha256"):
        download_file(server.url + "/f.bin", dest, sha256="0" * 64)
    assert not dest.exists() and not part_path(dest).exists()


def test_offline_error_names_url_destination_and_manual_placement(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/models/124M/hparams.json"
    dest = tmp_path / "hparams.json"
    part_path(dest).write_bytes(b"partial")
    with pytest.raises(DownloadError) as e:
        download_file(url, dest, timeout=5)
    msg = str(e.value)
    assert url in msg and str(dest) in msg and "unreachable" in msg and "by hand" in msg
    assert part_path(dest).read_bytes() == b"partial"  # nothing on disk is lost


def test_http_404_names_the_url(server, tmp_path):
    with pytest.raises(DownloadError, match="404") as e:
        download_file(server.url + "/missing", tmp_path / "x")
    assert server.url + "/missing" in str(e.value)


def test_cache_dir_follows_minidpo_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("MINIDPO_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "minidpo"


def test_parse_content_range_reads_start_and_total():
    assert parse_content_range("bytes 100-199/1000") == (100, 1000)
    assert parse_content_range("bytes */1000") == (None, 1000)
    assert parse_content_range(None) == (None, None)


# --------------------------------------------------------------------------- nothing corrupt gets in silently

SHA = hashlib.sha256(PAYLOAD).hexdigest()
HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please sign in</body></html>\n"


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_body_without_length_cut_halfway_is_not_installed(server, tmp_path):
    server.send_length, server.cut_budget, server.cut_after = False, 1, len(PAYLOAD) // 2
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="no Content-Length") as e:
        download_file(server.url + "/f.bin", dest)
    assert str(dest) in str(e.value) and leftovers(tmp_path) == []  # no final file, no .part


def test_body_without_length_cut_halfway_is_resumed_up_to_the_pinned_size(server, tmp_path):
    server.send_length, server.cut_budget, server.cut_after = False, 1, len(PAYLOAD) // 2
    dest = download_file(server.url + "/f.bin", tmp_path / "f.bin", expected_size=len(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert [r for _, r in server.requests] == [None, f"bytes={len(PAYLOAD) // 2}-"]


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_html_page_is_refused_and_nothing_is_written(server, tmp_path, content_type):
    server.files["/f.bin"], server.content_type = HTML, content_type
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="HTML page") as e:
        download_file(server.url + "/f.bin", dest)  # no size or sha256 to catch it otherwise
    assert str(dest) in str(e.value) and leftovers(tmp_path) == []


def test_looks_like_html_needs_an_html_start():
    assert looks_like_html(b"\xef\xbb\xbf  <!doctype HTML><p>") and looks_like_html(b"\n<HTML lang=en>")
    assert not looks_like_html(b'{"n_vocab": 50257}') and not looks_like_html(PAYLOAD)


def test_part_that_is_not_a_prefix_is_discarded_and_downloaded_again_from_zero(server, tmp_path):
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(b"\x00" * 5000)  # left by another file or a broken transfer: not PAYLOAD[:5000]
    log = []
    download_file(server.url + "/f.bin", dest, expected_size=len(PAYLOAD), sha256=SHA, log=log.append)
    assert dest.read_bytes() == PAYLOAD and leftovers(tmp_path) == ["f.bin"]
    assert [r for _, r in server.requests] == ["bytes=5000-", None]  # resumed, failed the sha256, from zero
    assert "resumed" in log[0] and "from zero" in log[0]


def test_sha256_failing_twice_is_an_error_that_says_so(server, tmp_path):
    with pytest.raises(DownloadError, match="twice") as e:
        download_file(server.url + "/f.bin", tmp_path / "f.bin", sha256="0" * 64)
    assert str(tmp_path / "f.bin") in str(e.value) and leftovers(tmp_path) == []
    assert len(server.requests) == 2


def test_corrupt_file_in_the_cache_is_replaced_by_a_fresh_download(server, tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(PAYLOAD[:-1] + b"X")  # right size, wrong bytes: a size check alone would keep it
    log = []
    download_file(server.url + "/f.bin", dest, expected_size=len(PAYLOAD), sha256=SHA, log=log.append)
    assert dest.read_bytes() == PAYLOAD and len(server.requests) == 1
    assert "sha256" in log[0] and str(dest) in log[0]


def test_good_file_in_the_cache_is_checked_but_not_fetched(server, tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(PAYLOAD)
    assert download_file(server.url + "/f.bin", dest, expected_size=len(PAYLOAD), sha256=SHA) == dest
    assert server.requests == []


def test_file_problem_reports_size_then_sha256(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    assert file_problem(f, 3, hashlib.sha256(b"abc").hexdigest()) is None
    assert "3 bytes, expected 4" in file_problem(f, 4)
    assert "sha256" in file_problem(f, 3, "0" * 64)
    f.write_bytes(b"abd")  # rewritten: the in-process memo of the good hash must not vouch for it
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1))  # a coarse clock could repeat the mtime
    assert "sha256" in file_problem(f, 3, hashlib.sha256(b"abc").hexdigest())
