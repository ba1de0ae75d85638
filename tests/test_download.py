"""minidpo.download against a local HTTP server (127.0.0.1, a thread) whose handler implements Range itself."""

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from minidpo.download import DownloadError, cache_dir, download_file, parse_content_range, part_path

PAYLOAD = bytes(range(256)) * 97 + b"tail"  # 24,836 bytes, every byte value, not a multiple of anything


class Handler(BaseHTTPRequestHandler):
    """Serves server.files; honours `Range: bytes=N-` unless server.ignore_range; while server.cut_budget > 0
    it cuts the connection after server.cut_after body bytes (decrementing the budget), only for the path
    server.cut_path if that is set."""

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
        self.send_header("Content-Length", str(len(body) - start))
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
