"""Tests for minidpo/dataset/imdb.py and scripts/make_imdb_sample.py (reads only the sample and synthetic tarballs)."""

import gzip
import hashlib
import http.server
import importlib.util
import io
import json
import shutil
import tarfile
import threading
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.dataset.imdb import (
    IMDB_FILENAME,
    IMDB_SAMPLE_PATH,
    IMDB_SIZE,
    RATINGS,
    ImdbError,
    download_imdb,
    load_imdb,
    manifest_path,
    parse_member,
)
from minidpo.formats.download import DownloadError

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_imdb_sample", ROOT / "scripts" / "make_imdb_sample.py")
make_imdb_sample = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_imdb_sample)


def write_tarball(path: Path, files: dict[str, bytes]) -> Path:
    """A gzip tarball holding exactly `files` (name -> bytes), in the given order."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def tiny_imdb(n: int = 2) -> dict[str, bytes]:
    """n reviews in each of train/pos, train/neg, train/unsup, test/pos, test/neg, plus non-review files."""
    files = {"aclImdb/README": b"readme", "aclImdb/imdb.vocab": b"the\n", "aclImdb/train/labeledBow.feat": b"0:1"}
    for split, label, rating in [("train", "pos", 8), ("train", "neg", 2), ("train", "unsup", 0),
                                 ("test", "pos", 10), ("test", "neg", 1)]:
        files[f"aclImdb/{split}/urls_{label}.txt"] = b"http://example.com\n"
        for i in range(n):
            files[f"aclImdb/{split}/{label}/{i}_{rating}.txt"] = f"{split} {label} {i}<br />second line".encode()
    return files


# -----------------------------------------------------------------------------
# the shipped sample


def test_sample_has_the_documented_count_per_split_and_label():
    train = load_imdb(IMDB_SAMPLE_PATH, "train", ("pos", "neg", "unsup"))
    test = load_imdb(IMDB_SAMPLE_PATH, "test")
    got = Counter((r.split, r.label) for r in train + test)
    assert got == Counter(make_imdb_sample.SAMPLE_COUNTS)


def test_sample_manifest_describes_the_sample_exactly():
    manifest = json.loads(manifest_path(IMDB_SAMPLE_PATH).read_text())
    data = IMDB_SAMPLE_PATH.read_bytes()
    assert manifest_path(IMDB_SAMPLE_PATH).name == "imdb_sample.manifest.json"
    assert (manifest["size"], manifest["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert manifest["reviews"] == {f"{s}/{lab}": n for (s, lab), n in make_imdb_sample.SAMPLE_COUNTS.items()}


def test_sample_is_at_most_1_5_mb():
    assert IMDB_SAMPLE_PATH.stat().st_size <= 1_500_000


def test_sample_ratings_follow_the_label_rule_and_text_has_no_br_tags():
    for review in load_imdb(IMDB_SAMPLE_PATH, "train", ("pos", "neg", "unsup")) + load_imdb(IMDB_SAMPLE_PATH, "test"):
        assert review.rating in RATINGS[review.label]
        assert "<br" not in review.text.lower()
        assert review.text.strip()


def test_reviews_are_sorted_by_label_order_then_id():
    for labels in [("pos", "neg"), ("neg", "pos"), ("unsup", "pos")]:
        reviews = load_imdb(IMDB_SAMPLE_PATH, "train", labels)
        keys = [(labels.index(r.label), r.id) for r in reviews]
        assert keys == sorted(keys)
        assert [r.label for r in reviews][0] == labels[0]


def test_tarball_aclimdb_dir_and_its_parent_give_identical_reviews(tmp_path):
    with tarfile.open(IMDB_SAMPLE_PATH) as tf:
        tf.extractall(tmp_path, filter="data")
    for split in ("train", "test"):
        from_tar = load_imdb(IMDB_SAMPLE_PATH, split)
        assert load_imdb(tmp_path / "aclImdb", split) == from_tar
        assert load_imdb(tmp_path, split) == from_tar
        assert load_imdb(str(tmp_path), split) == from_tar


def test_review_is_immutable():
    review = load_imdb(IMDB_SAMPLE_PATH, "test")[0]
    with pytest.raises(AttributeError):
        review.text = "changed"


# -----------------------------------------------------------------------------
# synthetic tarballs: text cleaning, ignored members and clear errors


def test_br_tags_become_newlines_and_other_files_are_ignored(tmp_path):
    src = write_tarball(tmp_path / "t.tar.gz", tiny_imdb())
    reviews = load_imdb(src, "train", ("pos", "neg", "unsup"))
    assert [r.text for r in reviews if r.label == "pos"] == ["train pos 0\nsecond line", "train pos 1\nsecond line"]
    assert Counter(r.rating for r in reviews) == Counter({8: 2, 2: 2, 0: 2})


@pytest.mark.parametrize("bad_name", ["aclImdb/train/pos/notes.txt", "aclImdb/train/neg/12.txt",
                                      "aclImdb/train/pos/sub/1_8.txt", "aclImdb/test/unsup/1_0.txt"])
def test_file_breaking_the_layout_is_an_error_naming_the_member(tmp_path, bad_name):
    files = tiny_imdb()
    files[bad_name] = b"x"
    src = write_tarball(tmp_path / "t.tar.gz", files)
    split = bad_name.split("/")[1]
    with pytest.raises(ValueError, match=bad_name):
        load_imdb(src, split, ("pos", "neg", "unsup") if split == "train" else ("pos", "neg"))


@pytest.mark.parametrize("label, rating", [("pos", 4), ("pos", 11), ("neg", 5), ("neg", 0), ("unsup", 3)])
def test_rating_outside_the_label_rule_is_an_error_naming_the_member(tmp_path, label, rating):
    files = tiny_imdb()
    files[f"aclImdb/train/{label}/99_{rating}.txt"] = b"x"
    with pytest.raises(ValueError, match=f"99_{rating}.txt.*rating {rating}"):
        load_imdb(write_tarball(tmp_path / "t.tar.gz", files), "train", (label,))


def test_bad_file_in_a_directory_source_is_an_error_naming_its_path(tmp_path):
    folder = tmp_path / "aclImdb" / "train" / "pos"
    folder.mkdir(parents=True)
    (folder / "1_9.txt").write_text("fine")
    (folder / "1_3.txt").write_text("wrong rating")
    with pytest.raises(ValueError, match=str(folder / "1_3.txt")):
        load_imdb(tmp_path, "train", ("pos",))


def test_duplicate_id_in_one_folder_is_an_error(tmp_path):
    files = tiny_imdb()
    files["aclImdb/train/pos/0_9.txt"] = b"same id as 0_8.txt"
    with pytest.raises(ValueError, match="duplicate id 0"):
        load_imdb(write_tarball(tmp_path / "t.tar.gz", files), "train")


def test_missing_label_folder_is_an_error(tmp_path):
    files = {k: v for k, v in tiny_imdb().items() if "/test/neg/" not in k}
    with pytest.raises(ValueError, match="test/neg"):
        load_imdb(write_tarball(tmp_path / "t.tar.gz", files), "test")


def test_truncated_tarball_is_a_clear_error(tmp_path):
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(IMDB_SAMPLE_PATH.read_bytes()[: IMDB_SAMPLE_PATH.stat().st_size // 2])
    with pytest.raises(ValueError, match="unreadable or truncated"):
        load_imdb(cut, "test")


def test_tarball_cut_where_tarfile_sees_an_end_of_archive_is_an_error(tmp_path):
    """At this cut tarfile alone returns 422 of the 600 train reviews without a word; the gzip trailer is missing."""
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(IMDB_SAMPLE_PATH.read_bytes()[:440_182])
    with pytest.raises(ImdbError, match="truncated") as e:
        load_imdb(cut, "train")
    assert str(cut) in str(e.value)


def test_gzip_crc_mismatch_is_an_error(tmp_path):
    data = bytearray(IMDB_SAMPLE_PATH.read_bytes())
    data[-8] ^= 0x01  # the trailer: CRC32 of the uncompressed stream, then its length
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ImdbError, match="(?i)crc") as e:
        load_imdb(bad, "test")
    assert str(bad) in str(e.value)


def test_truncated_copy_beside_its_manifest_fails_the_manifest_check(tmp_path):
    cut = tmp_path / "imdb_sample.tar.gz"
    cut.write_bytes(IMDB_SAMPLE_PATH.read_bytes()[:440_182])
    shutil.copy(manifest_path(IMDB_SAMPLE_PATH), manifest_path(cut))
    with pytest.raises(ImdbError, match="602,293") as e:
        load_imdb(cut, "train")
    assert str(cut) in str(e.value) and "manifest" in str(e.value)


def test_fewer_reviews_than_the_manifest_promises_is_an_error_naming_the_folder(tmp_path):
    src = write_tarball(tmp_path / "s.tar.gz", tiny_imdb(n=2))
    data = src.read_bytes()
    manifest = {"file": src.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "reviews": {"train/pos": 3, "train/neg": 2, "train/unsup": 2, "test/pos": 2, "test/neg": 2}}
    manifest_path(src).write_text(json.dumps(manifest))
    assert len(load_imdb(src, "test")) == 4  # the folders that keep their promise load
    with pytest.raises(ImdbError, match="train/pos/ holds 2 reviews but its manifest .* promises 3"):
        load_imdb(src, "train")


def test_archive_with_stanfords_readme_must_hold_stanfords_counts(tmp_path):
    files = tiny_imdb(n=2)
    files["aclImdb/README"] = b"Large Movie Review Dataset v1.0\n\nOverview\n"
    src = write_tarball(tmp_path / "trimmed.tar.gz", files)
    with pytest.raises(ImdbError, match="test/neg/ holds 2 reviews but Stanford's README .* promises 12,500"):
        load_imdb(src, "test")


def test_cached_download_must_be_stanfords_exact_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path))
    cached = tmp_path / IMDB_FILENAME
    shutil.copy(IMDB_SAMPLE_PATH, cached)  # a valid tarball, but not the file download_imdb installs there
    with pytest.raises(ImdbError, match=f"{IMDB_SIZE:,}") as e:
        load_imdb(cached, "test")
    assert str(cached) in str(e.value) and "download_imdb" in str(e.value)
    assert len(load_imdb(shutil.copy(cached, tmp_path / "mine.tar.gz"), "test")) == 300  # elsewhere: CRC + counts


def test_empty_tarball_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty.tar.gz"
    empty.write_bytes(b"")
    with pytest.raises(ImdbError, match="empty") as e:
        load_imdb(empty, "test")
    assert str(empty) in str(e.value)


def test_non_utf8_review_is_an_error_naming_the_member(tmp_path):
    files = tiny_imdb()
    files["aclImdb/test/pos/7_7.txt"] = b"caf\xe9"
    with pytest.raises(ValueError, match="7_7.txt.*UTF-8"):
        load_imdb(write_tarball(tmp_path / "t.tar.gz", files), "test")


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "valid"}, "split='valid'"),
    ({"labels": ("pos", "neutral")}, "labels="),
    ({"labels": ("pos", "pos")}, "labels="),
    ({"labels": ()}, "labels="),
    ({"split": "test", "labels": ("pos", "unsup")}, "unsup"),
])
def test_bad_split_or_labels_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_imdb(IMDB_SAMPLE_PATH, **kwargs)


def test_missing_source_and_foreign_directory_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_imdb(tmp_path / "nope.tar.gz")
    with pytest.raises(ValueError, match="expected the aclImdb directory"):
        load_imdb(tmp_path)


@settings(max_examples=50, deadline=None)
@given(split=st.sampled_from(["train", "test"]), label=st.sampled_from(["pos", "neg", "unsup"]),
       review_id=st.integers(0, 10**6), rating=st.integers(0, 12),
       prefix=st.sampled_from(["aclImdb/", "./aclImdb/", ""]))
def test_parse_member_accepts_exactly_the_layout_and_rating_rule(split, label, review_id, rating, prefix):
    name = f"{prefix}{split}/{label}/{review_id}_{rating}.txt"
    if rating in RATINGS[label] and not (split == "test" and label == "unsup"):
        assert parse_member(name) == (split, label, review_id, rating)
    else:
        with pytest.raises(ValueError, match=name):
            parse_member(name)


def test_parse_member_ignores_files_outside_review_folders():
    for name in ["aclImdb/README", "aclImdb/train/urls_pos.txt", "aclImdb/train/unsupBow.feat", "aclImdb/", "x/y/z"]:
        assert parse_member(name) is None


# -----------------------------------------------------------------------------
# default source, sample script, download


def test_default_source_is_the_sample_without_a_cached_full_set(tmp_path, monkeypatch):
    from minidpo.experiment.resolve import imdb_source
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path))
    path, note = imdb_source("auto")
    assert path == IMDB_SAMPLE_PATH and "sample" in note


def test_default_source_is_the_cached_full_set_when_present(tmp_path, monkeypatch):
    from minidpo.experiment.resolve import imdb_source
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path))
    (tmp_path / IMDB_FILENAME).write_bytes(b"")
    path, note = imdb_source("auto")
    assert path == tmp_path / IMDB_FILENAME
    assert "full IMDB set" in note


def test_make_sample_is_byte_identical_across_runs_and_loadable(tmp_path):
    src = write_tarball(tmp_path / "full.tar.gz", tiny_imdb(n=8))
    counts = {("train", "pos"): 3, ("train", "neg"): 3, ("train", "unsup"): 2, ("test", "pos"): 2, ("test", "neg"): 1}
    a = make_imdb_sample.make_sample(src, tmp_path / "a.tar.gz", counts, seed=1).read_bytes()
    b = make_imdb_sample.make_sample(src, tmp_path / "b.tar.gz", counts, seed=1).read_bytes()
    assert a == b
    assert gzip.decompress(a)  # a valid gzip stream
    assert a[4:8] == b"\0\0\0\0"  # gzip header mtime fixed
    def everything(source):
        return load_imdb(source, "train", ("pos", "neg", "unsup")) + load_imdb(source, "test")

    reviews = everything(tmp_path / "a.tar.gz")  # checked against the manifest written beside it
    assert json.loads(manifest_path(tmp_path / "a.tar.gz").read_text())["sha256"] == hashlib.sha256(a).hexdigest()
    assert Counter((r.split, r.label) for r in reviews) == Counter(counts)
    full = {(r.split, r.label, r.id): r for r in everything(src)}
    assert all(full[r.split, r.label, r.id] == r for r in reviews)  # cut, not altered


def test_make_sample_fails_clearly_when_a_folder_is_too_small(tmp_path):
    src = write_tarball(tmp_path / "full.tar.gz", tiny_imdb(n=2))
    with pytest.raises(ValueError, match="test/neg/ has 2 reviews, sample needs 5"):
        make_imdb_sample.make_sample(src, tmp_path / "s.tar.gz", {("test", "neg"): 5})


@pytest.fixture
def sample_url(tmp_path):
    """The shipped sample served as aclImdb_v1.tar.gz by a local HTTP server."""
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(IMDB_SAMPLE_PATH, served / IMDB_FILENAME)

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{IMDB_FILENAME}"
    server.shutdown()
    thread.join()


def test_download_imdb_fetches_from_a_local_server(tmp_path, sample_url):
    (tmp_path / "cache").mkdir()
    got = download_imdb(tmp_path / "cache", url=sample_url)
    assert Path(got) == tmp_path / "cache" / IMDB_FILENAME
    assert Path(got).read_bytes() == IMDB_SAMPLE_PATH.read_bytes()
    assert load_imdb(got, "test") == load_imdb(IMDB_SAMPLE_PATH, "test")


def test_download_imdb_into_the_cache_accepts_only_stanfords_file(tmp_path, monkeypatch, sample_url):
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DownloadError, match=f"{IMDB_SIZE:,}"):  # from a mirror too: load_imdb expects that file
        download_imdb(url=sample_url)
    assert not (tmp_path / "cache" / IMDB_FILENAME).exists()
