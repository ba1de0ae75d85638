"""minidpo.formats.tf_bundle: CRC32C, varints/protobuf, the SSTable reader and tensor-bundle loading.

A small writer of the same format lives here (tests only), so the reader can be checked on random tables; it is
itself checked by reproducing the index TensorFlow wrote for the committed fixture byte for byte.
"""

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.formats import tf_bundle as tb

FIXTURE = Path(__file__).parent / "fixtures" / "gpt2-tiny-openai"
SETTINGS = settings(max_examples=40, deadline=None)


# --------------------------------------------------------------------------- a reference writer (tests only)

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number: int, wire: int, payload: bytes) -> bytes:
    return varint(number << 3 | wire) + payload


def build_block(entries: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    body, restarts, prev = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(body))
        else:
            while shared < min(len(key), len(prev)) and key[shared] == prev[shared]:
                shared += 1
        body += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        prev = key
    restarts = restarts or [0]
    return bytes(body) + struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))


def with_trailer(block: bytes, kind: int = 0) -> bytes:
    return block + bytes([kind]) + struct.pack("<I", tb.mask_crc(tb.crc32c(block + bytes([kind]))))


def short_successor(key: bytes) -> bytes:
    """LevelDB's BytewiseComparator::FindShortSuccessor: the index key of the last data block."""
    for i, b in enumerate(key):
        if b != 0xFF:
            return key[:i] + bytes([b + 1])
    return key


def write_table(entries: list[tuple[bytes, bytes]], restart_interval: int = 16, block_size: int = 4096) -> bytes:
    """An SSTable as TensorFlow's TableBuilder writes it (uncompressed; index keys = short successors)."""
    out, index, pending = bytearray(), [], []

    def flush() -> None:
        block = build_block(pending, restart_interval)
        index.append((short_successor(pending[-1][0]), varint(len(out)) + varint(len(block))))
        out.extend(with_trailer(block))
        pending.clear()

    for key, value in entries:
        pending.append((key, value))
        if len(build_block(pending, restart_interval)) >= block_size:
            flush()
    if pending:
        flush()
    meta = build_block([], restart_interval)
    meta_handle = varint(len(out)) + varint(len(meta))
    out += with_trailer(meta)
    index_block = build_block(index, 1)
    index_handle = varint(len(out)) + varint(len(index_block))
    out += with_trailer(index_block)
    footer = meta_handle + index_handle
    return bytes(out) + footer + bytes(40 - len(footer)) + struct.pack("<Q", tb.TABLE_MAGIC)


TF_ENUM = {v: k for k, v in tb.TF_DTYPES.items()}


def write_bundle(prefix: Path, tensors: dict[str, torch.Tensor]) -> None:
    data, entries = bytearray(), [(b"", field(1, 0, varint(1)) + field(3, 2, varint(2) + field(1, 0, varint(1))))]
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        dims = b"".join(field(2, 2, varint(len(d)) + d) for d in (field(1, 0, varint(s)) for s in t.shape))
        proto = field(1, 0, varint(TF_ENUM[t.dtype])) + field(2, 2, varint(len(dims)) + dims)
        proto += (field(4, 0, varint(len(data))) if data else b"") + field(5, 0, varint(len(raw)))
        proto += field(6, 5, struct.pack("<I", tb.mask_crc(tb.crc32c(raw))))
        entries.append((name.encode(), proto))
        data += raw
    Path(f"{prefix}.index").write_bytes(write_table(entries))
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))


def bitwise_crc32c(data: bytes) -> int:
    """The CRC from its definition: reflected polynomial 0x82F63B78, one bit at a time."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# --------------------------------------------------------------------------- CRC32C

def test_crc32c_of_check_string_is_the_catalogued_value():
    assert tb.crc32c(b"123456789") == 0xE3069283 == bitwise_crc32c(b"123456789")  # RFC 3720 / CRC catalogue


@SETTINGS
@given(st.binary(max_size=300))
def test_table_crc32c_equals_bitwise_definition(data):
    assert tb.crc32c_bytewise(data) == bitwise_crc32c(data)


@SETTINGS
@given(st.binary(max_size=6000), st.integers(0, 7), st.sampled_from([16, 32, 64, 256]))
def test_lane_parallel_crc32c_equals_bytewise_at_any_alignment(data, skip, max_lanes):
    view = np.frombuffer(data, dtype=np.uint8)[skip:]  # odd offsets give unaligned uint32 views
    assert tb.crc32c(view, max_lanes=max_lanes) == tb.crc32c_bytewise(view.tobytes())


@SETTINGS
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_crc32c_continues_across_concatenation(a, b):
    assert tb.crc32c(b, crc=tb.crc32c(a, max_lanes=16), max_lanes=16) == tb.crc32c(a + b, max_lanes=16)


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_unmask_inverts_mask(crc):
    assert tb.unmask_crc(tb.mask_crc(crc)) == crc


# --------------------------------------------------------------------------- varints, protobuf, tables

@SETTINGS
@given(st.lists(st.integers(0, 2**64 - 1), max_size=8))
def test_varints_decode_what_was_encoded(values):
    buf, pos = b"".join(varint(v) for v in values), 0
    for v in values:
        got, pos = tb.read_varint(buf, pos)
        assert got == v
    assert pos == len(buf)


def test_parse_message_reads_every_wire_type_and_repeats():
    msg = field(1, 0, varint(300)) + field(2, 2, varint(3) + b"abc") + field(2, 2, varint(0))
    msg += field(6, 5, struct.pack("<I", 0xDEADBEEF)) + field(7, 1, struct.pack("<Q", 2**40))
    assert tb.parse_message(msg) == {1: [300], 2: [b"abc", b""], 6: [0xDEADBEEF], 7: [2**40]}


def test_negative_int64_dimension_decodes_as_negative():
    assert tb._int64(tb.read_varint(varint(2**64 - 1), 0)[0]) == -1


keys = st.lists(st.binary(min_size=0, max_size=12), unique=True, max_size=60).map(sorted)


@SETTINGS
@given(keys, st.integers(1, 20), st.sampled_from([64, 256, 4096]), st.data())
def test_table_reader_returns_what_the_writer_stored(tmp_path_factory, key_list, restart_interval, block_size, data):
    entries = [(k, data.draw(st.binary(max_size=40))) for k in key_list]
    path = tmp_path_factory.mktemp("t") / "x.index"
    path.write_bytes(write_table(entries, restart_interval, block_size))
    assert tb.read_table(path) == entries


def test_writer_reproduces_tensorflow_index_bytes(tmp_path):
    """The reference writer above matches TensorFlow byte for byte, so the random-table tests speak for TF files."""
    write_bundle(tmp_path / "model.ckpt", tb.load_bundle(FIXTURE / "model.ckpt"))
    assert (tmp_path / "model.ckpt.index").read_bytes() == (FIXTURE / "model.ckpt.index").read_bytes()
    data = (FIXTURE / "model.ckpt.data-00000-of-00001").read_bytes()
    assert (tmp_path / "model.ckpt.data-00000-of-00001").read_bytes() == data


# --------------------------------------------------------------------------- bundles

dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64,
                          torch.int8, torch.uint8, torch.bool])


@SETTINGS
@given(st.dictionaries(st.text("abc/_0123", min_size=1, max_size=10),
                       st.tuples(dtypes, st.lists(st.integers(0, 5), max_size=3)), max_size=6),
       st.integers(0, 2**31 - 1))
def test_bundle_roundtrip_preserves_every_tensor(tmp_path_factory, specs, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {n: (torch.randn(shape, generator=g) * 50).to(dtype) for n, (dtype, shape) in specs.items()}
    prefix = tmp_path_factory.mktemp("b") / "model.ckpt"
    write_bundle(prefix, tensors)
    loaded = tb.load_bundle(prefix, verify=True)  # odd offsets after int8/bool tensors exercise unaligned views
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)


@pytest.fixture
def bundle(tmp_path):
    for f in FIXTURE.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / "model.ckpt"


def patch(path: Path, offset: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + len(value)] = value
    path.write_bytes(bytes(data))


def test_bad_magic_is_reported_with_the_index_path(bundle):
    index = Path(f"{bundle}.index")
    patch(index, index.stat().st_size - 1, b"\x00")
    with pytest.raises(tb.BundleError, match="magic") as e:
        tb.read_index(bundle)
    assert str(index) in str(e.value)


def test_truncated_index_is_reported(bundle):
    index = Path(f"{bundle}.index")
    index.write_bytes(index.read_bytes()[:30])
    with pytest.raises(tb.BundleError, match="truncated"):
        tb.read_index(bundle)


def test_snappy_compressed_block_is_refused_clearly(tmp_path):
    entries = [(b"", b"\x08\x01"), (b"a", b"")]
    raw = bytearray(write_table(entries))
    block_len = len(build_block(entries, 16))
    raw[block_len] = 1  # the first data block's compression type byte
    (tmp_path / "x.index").write_bytes(bytes(raw))
    with pytest.raises(tb.BundleError, match="snappy"):
        tb.read_table(tmp_path / "x.index")


def test_corrupt_index_block_fails_its_crc(bundle):
    index = Path(f"{bundle}.index")
    patch(index, 10, bytes([index.read_bytes()[10] ^ 0x01]))
    with pytest.raises(tb.BundleError, match="crc32c"):
        tb.read_index(bundle)


def test_load_bundle_checks_crc32c_by_default(bundle):
    data = Path(f"{bundle}.data-00000-of-00001")
    patch(data, 5000, bytes([data.read_bytes()[5000] ^ 0x10]))  # inside model/h0/attn/c_attn/w
    with pytest.raises(tb.BundleError, match="crc32c") as e:
        tb.load_bundle(bundle)
    assert "model/h0/attn/c_attn/w" in str(e.value) and str(data) in str(e.value)
    tb.load_bundle(bundle, verify=False)  # the opt-out reads it


def entry_proto(dims: list[int], dtype: int = 1, shape_wire: int = 2) -> bytes:
    """A BundleEntryProto for a float tensor of `dims` (int64 varints, so -1 is 2**64 - 1) at offset 0."""
    dim_msgs = b"".join(field(2, 2, varint(len(m)) + m) for m in (field(1, 0, varint(d % 2**64)) for d in dims))
    shape = field(2, 2, varint(len(dim_msgs)) + dim_msgs) if shape_wire == 2 else field(2, 0, varint(7))
    return field(1, 0, varint(dtype)) + shape + field(5, 0, varint(0))


HEADER = field(1, 0, varint(1)) + field(3, 2, varint(2) + field(1, 0, varint(1)))


@pytest.mark.parametrize("key, value, words", [
    (b"model/\xff\xfe", entry_proto([0]), ["not valid UTF-8"]),
    (b"model/wpe", entry_proto([-1, 4]), ["'model/wpe'", "negative dimension", "[-1, 4]"]),
    (b"model/wpe", entry_proto([4], shape_wire=0), ["'model/wpe'", "malformed entry"]),
], ids=["non_utf8_name", "negative_dim", "shape_as_varint"])
def test_malformed_index_entry_is_a_bundle_error_naming_the_index(tmp_path, key, value, words):
    prefix = tmp_path / "model.ckpt"
    Path(f"{prefix}.index").write_bytes(write_table([(b"", HEADER), (key, value)]))
    Path(f"{prefix}.data-00000-of-00001").write_bytes(b"")
    with pytest.raises(tb.BundleError) as e:
        tb.load_bundle(prefix)
    for w in words + [str(prefix) + ".index"]:
        assert w in str(e.value)
