"""
A pure-Python reader of TensorFlow's tensor-bundle checkpoints (`model.ckpt.index` + `model.ckpt.data-*`), the
format of OpenAI's GPT-2 release. No TensorFlow and no protobuf package: the three layers are decoded by hand.

References (TensorFlow sources):
1) tensorflow/core/util/tensor_bundle/tensor_bundle.{h,cc}: `<prefix>.index` is a table of
   {tensor name: BundleEntryProto}; the empty key "" holds the BundleHeaderProto. Tensors are raw little-endian bytes
   in `<prefix>.data-<shard:05d>-of-<num_shards:05d>` at [offset, offset + size), with a masked CRC32C of the bytes.
2) tensorflow/core/protobuf/tensor_bundle.proto (BundleHeaderProto: num_shards=1, endianness=2; BundleEntryProto:
   dtype=1, shape=2, shard_id=3, offset=4, size=5, crc32c=6 fixed32, slices=7) and tensor_shape.proto (dim=2 {size=1}),
   in protobuf's wire format (varint keys field_number << 3 | wire_type; varints of 7 bits per byte).
3) tsl/lib/io/{format,block,table}.cc, LevelDB's SSTable: a 48-byte footer (metaindex and index BlockHandles,
   magic 0xdb4775248b80fb57); each block is followed by a 5-byte trailer (compression type; masked CRC32C of block +
   type). A block is a run of prefix-compressed entries (varint shared, varint non_shared, varint value_len, key
   suffix, value), then uint32 restart offsets and their count. The index block maps keys to the data blocks.
4) CRC32C (Castagnoli, reflected polynomial 0x82F63B78; RFC 3720 sec. B.4) and LevelDB's crc32c::Mask.
"""

import functools
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_LEN = 48
MASK_DELTA = 0xA282EAD8
# TensorFlow's DataType enum (types.proto) -> torch dtype, for the dtypes a weight file can hold
TF_DTYPES = {1: torch.float32, 2: torch.float64, 3: torch.int32, 4: torch.uint8, 5: torch.int16, 6: torch.int8,
             9: torch.int64, 10: torch.bool, 14: torch.bfloat16, 19: torch.float16}


class BundleError(ValueError):
    pass


def _byte_table() -> np.ndarray:
    """CRC32C of every single byte, the classic table: t[b] = 8 reflected shift-and-xor steps of b."""
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0x82F63B78), t >> 1).astype(np.uint32)
    return t


TABLE = _byte_table()
TABLE_LIST = [int(x) for x in TABLE]


def crc32c_bytewise(data: bytes, crc: int = 0) -> int:
    """Reference CRC32C, one table lookup per byte (slow: ~10 MB/s). Naive: the bitwise CRC with poly 0x82F63B78."""
    reg = crc ^ 0xFFFFFFFF
    for b in data:
        reg = TABLE_LIST[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg ^ 0xFFFFFFFF


# Feeding zero bytes to the CRC register is linear over GF(2), so "feed n zero bytes" is a 32x32 bit matrix, stored
# here as 4 tables of 256 words: apply(op, x) = op[0][byte0 of x] ^ op[1][byte1] ^ op[2][byte2] ^ op[3][byte3].

def _apply(op: np.ndarray, x: np.ndarray) -> np.ndarray:
    return op[0][x & 0xFF] ^ op[1][(x >> 8) & 0xFF] ^ op[2][(x >> 16) & 0xFF] ^ op[3][x >> 24]


@functools.lru_cache(maxsize=None)
def _zeros_op(n: int) -> np.ndarray:
    """The register map of n zero bytes (4, 256), by binary powering of the one-byte map x -> T[x & 255] ^ x >> 8."""
    if n == 1:
        x = np.arange(256, dtype=np.uint32)[None] << (8 * np.arange(4, dtype=np.uint32)[:, None])  # (4, 256)
        return TABLE[x & 0xFF] ^ (x >> 8)
    half = _zeros_op(n // 2)
    op = _apply(half, half)  # compose: half after half
    return _apply(_zeros_op(1), op) if n % 2 else op


@functools.lru_cache(maxsize=None)
def _word_tables(gap: int) -> tuple[np.ndarray, ...]:
    """16-bit tables for one 8-byte word (lo, hi) followed by `gap` zero bytes:
    reg' = zeros(8 + gap)(reg ^ lo) ^ zeros(4 + gap)(hi), each half split into its low and high 16 bits."""
    v = np.arange(65536, dtype=np.uint32)
    a, b = _zeros_op(8 + gap), _zeros_op(4 + gap)
    return (a[0][v & 0xFF] ^ a[1][v >> 8], a[2][v & 0xFF] ^ a[3][v >> 8],
            b[0][v & 0xFF] ^ b[1][v >> 8], b[2][v & 0xFF] ^ b[3][v >> 8])


def _lanes(reg: int, words: np.ndarray) -> int:
    """Advance register `reg` over words (steps, lanes, 2) of little-endian uint32 pairs, in memory order.

    Lane j owns the words j, j + lanes, j + 2 lanes, ...; it skips the other lanes' words as zero bytes (the `gap`
    tables), which is exact because the CRC is linear: the register is the XOR of every word's contribution
    shifted to the end of the stream. So all lanes advance together in numpy with no transposed copy; at the end
    lane j is `8 (lanes - 1 - j)` bytes short of the end, and a tree of pairwise shifts sums the lanes up.
    """
    steps, lanes, _ = words.shape
    halves = words.view("<u2")  # (steps, lanes, 4): hi's 16-bit halves index the tables directly
    r = np.zeros(lanes, dtype=np.uint32)
    r[0] = reg  # the incoming register sits before word 0, i.e. at the start of lane 0
    lo, tmp, idx = np.empty(lanes, np.uint32), np.empty(lanes, np.uint32), np.empty(lanes, np.intp)
    for i in range(steps):
        t0, t1, t2, t3 = _word_tables(8 * (lanes - 1) if i < steps - 1 else 0)
        # r = t0[lo & 0xFFFF] ^ t1[lo >> 16] ^ t2[hi & 0xFFFF] ^ t3[hi >> 16], with lo = r ^ word_lo, in place
        np.bitwise_xor(r, words[i, :, 0], out=lo)
        np.take(t0, np.bitwise_and(lo, 0xFFFF, out=idx, casting="unsafe"), out=r)
        r ^= np.take(t1, np.right_shift(lo, 16, out=idx, casting="unsafe"), out=tmp)
        r ^= np.take(t2, halves[i, :, 2], out=tmp)
        r ^= np.take(t3, halves[i, :, 3], out=tmp)
    span = 8
    while r.size > 1:  # (lanes,) -> (lanes / 2,): the left lane of each pair is `span` bytes behind the right one
        r = _apply(_zeros_op(span), r[0::2]) ^ r[1::2]
        span *= 2
    return int(r[0])


def crc32c(data: bytes | memoryview | np.ndarray, crc: int = 0, max_lanes: int = 16384) -> int:
    """CRC32C of `data` (continuing from `crc`); equals crc32c_bytewise(data, crc) but runs at hundreds of MB/s.

    The bulk goes through `_lanes` with up to `max_lanes` parallel lanes, the remainder with ever fewer lanes, and
    the last < 128 bytes byte by byte.
    """
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    reg, pos, lanes = crc ^ 0xFFFFFFFF, 0, max_lanes
    while lanes >= 16:
        steps = (buf.size - pos) // (8 * lanes)
        if steps:
            chunk = buf[pos:pos + 8 * lanes * steps].view("<u4")
            reg = _lanes(reg, chunk.reshape(steps, lanes, 2))  # (steps, lanes, 2)
            pos += 8 * lanes * steps
        lanes //= 2
    return crc32c_bytewise(buf[pos:].tobytes(), reg ^ 0xFFFFFFFF)


def mask_crc(crc: int) -> int:
    """LevelDB/TF masking (rotate right by 15, add a constant), so CRCs of CRC-bearing data do not look trivial."""
    return (((crc >> 15) | (crc << 17)) + MASK_DELTA) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    rot = (masked - MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it). Naive: sum((buf[pos + i] & 0x7F) << 7 i) up to the first byte below 0x80."""
    result, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise BundleError("truncated or overlong varint")
        b = buf[pos]
        result |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return result, pos
        shift += 7


def parse_message(buf: bytes) -> dict[int, list]:
    """Protobuf fields by number, each a list (repeated fields): ints for varint/fixed, bytes for length-delimited."""
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 1 or wire == 5:
            n = 8 if wire == 1 else 4
            if pos + n > len(buf):
                raise BundleError("truncated fixed-width protobuf field")
            value = int.from_bytes(buf[pos:pos + n], "little")
            pos += n
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            if pos + n > len(buf):
                raise BundleError("truncated length-delimited protobuf field")
            value, pos = bytes(buf[pos:pos + n]), pos + n
        else:
            raise BundleError(f"unsupported protobuf wire type {wire} (field {number})")
        fields.setdefault(number, []).append(value)
    return fields


def _int64(v: int) -> int:  # int64 fields are two's complement varints
    return v - (1 << 64) if v >= 1 << 63 else v


def read_block(data: bytes, offset: int, size: int, path: Path) -> bytes:
    """Block contents at a BlockHandle, after checking its trailer (compression flag and masked CRC32C)."""
    if offset + size + 5 > len(data):
        raise BundleError(f"{path}: block [{offset}, {offset + size}) runs past the end of the {len(data)}-byte "
                          "file (truncated or corrupt index)")
    block, kind = data[offset:offset + size], data[offset + size]
    if kind != 0:
        raise BundleError(f"{path}: block at {offset} " + ("is snappy-compressed, which this reader does not support "
                          "(TensorFlow writes bundle indexes uncompressed)" if kind == 1 else
                          f"has unknown compression type {kind} (corrupt index)"))
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if unmask_crc(stored) != crc32c(data[offset:offset + size + 1]):
        raise BundleError(f"{path}: block at {offset} fails its crc32c check (corrupt index)")
    return block


def block_entries(block: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs of one block, undoing the prefix compression; restart points must hold full keys."""
    if len(block) < 4:
        raise BundleError(f"{path}: block of {len(block)} bytes is too short (corrupt index)")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * num_restarts
    if end < 0:
        raise BundleError(f"{path}: block claims {num_restarts} restart points (corrupt index)")
    restarts = set(struct.unpack_from(f"<{num_restarts}I", block, end))
    entries, key, pos = [], b"", 0
    while pos < end:
        at = pos
        shared, pos = read_varint(block, pos)
        non_shared, pos = read_varint(block, pos)
        value_len, pos = read_varint(block, pos)
        if shared > len(key) or pos + non_shared + value_len > end or (at in restarts and shared):
            raise BundleError(f"{path}: malformed block entry at byte {at} (corrupt index)")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos:pos + value_len]))
        pos += value_len
    return entries


def read_table(path: Path) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of an SSTable file, in key order."""
    data = path.read_bytes()
    if len(data) < FOOTER_LEN:
        raise BundleError(f"{path}: {len(data)} bytes is too short for a table footer (truncated index)")
    footer = data[-FOOTER_LEN:]
    if struct.unpack("<Q", footer[40:])[0] != TABLE_MAGIC:
        raise BundleError(f"{path}: bad table magic number (not a TensorFlow checkpoint index, or truncated)")
    _, pos = read_varint(footer, read_varint(footer, 0)[1])  # skip the metaindex handle: it is always empty
    index_offset, pos = read_varint(footer, pos)
    index_size, _ = read_varint(footer, pos)
    out = []
    for _, handle in block_entries(read_block(data, index_offset, index_size, path), path):
        offset, p = read_varint(handle, 0)
        size, _ = read_varint(handle, p)
        out.extend(block_entries(read_block(data, offset, size, path), path))
    return out


@dataclass
class BundleEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None  # masked, as stored


def parse_entry(name: str, value: bytes, path: Path) -> BundleEntry:
    try:
        f = parse_message(value)
        dims = [parse_message(d).get(1, [0])[-1] for d in parse_message(f[2][-1]).get(2, [])] if 2 in f else []
        if not all(isinstance(v, int) for v in dims + [f.get(k, [0])[-1] for k in (1, 3, 4, 5, 6)]):
            raise BundleError("a numeric field has a non-numeric wire type")
    except (BundleError, TypeError) as e:  # TypeError: a nested message where a number was expected
        raise BundleError(f"{path}: tensor {name!r}: malformed entry ({e}) (corrupt index)") from None
    shape = tuple(_int64(d) for d in dims)
    if any(d < 0 for d in shape):
        raise BundleError(f"{path}: tensor {name!r} has a negative dimension in shape {list(shape)} (corrupt index)")
    if 7 in f:
        raise BundleError(f"{path}: tensor {name!r} is stored as slices, which this reader does not support")
    tf_dtype = f.get(1, [0])[-1]
    if tf_dtype not in TF_DTYPES:
        raise BundleError(f"{path}: tensor {name!r} has TensorFlow dtype enum {tf_dtype}, unsupported here")
    return BundleEntry(name, TF_DTYPES[tf_dtype], shape, f.get(3, [0])[-1], f.get(4, [0])[-1], f.get(5, [0])[-1],
                       f.get(6, [None])[-1])


def read_index(prefix: str | Path) -> tuple[int, dict[str, BundleEntry]]:
    """(number of data shards, entries by tensor name) of `<prefix>.index`; every error names the index file."""
    path = Path(f"{prefix}.index")
    if not path.is_file():
        raise BundleError(f"checkpoint index {path} not found")
    try:
        records = read_table(path)
        if not records or records[0][0] != b"":
            raise BundleError(f"{path}: the BundleHeaderProto (empty key) is missing (not a tensor bundle?)")
        header = parse_message(records[0][1])
        num_shards = header.get(1, [1])[-1] or 1
        if header.get(2, [0])[-1] != 0:
            raise BundleError(f"{path}: the bundle is big-endian; only little-endian bundles are supported")
        entries = {}
        for key, value in records[1:]:
            name = key.decode("utf-8")
            entries[name] = e = parse_entry(name, value, path)
            if not 0 <= e.shard_id < num_shards:
                raise BundleError(f"{path}: tensor {name!r} is in shard {e.shard_id} of {num_shards} (corrupt index)")
    except UnicodeDecodeError:
        raise BundleError(f"{path}: a tensor name is not valid UTF-8 (corrupt index)") from None
    except (BundleError, TypeError) as e:  # varint and table errors deep in the reader do not know the file
        raise e if str(path) in str(e) else BundleError(f"{path}: {e} (corrupt index)") from None
    return num_shards, entries


def load_bundle(prefix: str | Path, verify: bool = True) -> dict[str, Tensor]:
    """All tensors of the bundle `<prefix>.index` / `<prefix>.data-*`, as CPU views of memory-mapped data files.

    verify=True (the default) checks each tensor's bytes against the masked CRC32C in its entry: one read of every
    byte (cost: bench/weights_speed.py) turns a corrupt download or copy into an error naming file and tensor."""
    num_shards, entries = read_index(prefix)
    maps: dict[int, tuple[Path, Tensor]] = {}
    out = {}
    for name, e in entries.items():
        if e.shard_id not in maps:
            data_path = Path(f"{prefix}.data-{e.shard_id:05d}-of-{num_shards:05d}")
            if not data_path.is_file():
                raise BundleError(f"checkpoint data file {data_path} not found (needed for tensor {name!r})")
            n = data_path.stat().st_size
            buf = torch.from_file(str(data_path), shared=False, size=n, dtype=torch.uint8) if n else torch.empty(0)
            maps[e.shard_id] = (data_path, buf)
        data_path, buf = maps[e.shard_id]
        numel = math.prod(e.shape)  # exact: np.prod would wrap around for absurd (corrupt) shapes
        if e.size != numel * e.dtype.itemsize:
            raise BundleError(f"{prefix}.index: tensor {name!r} of shape {list(e.shape)} and dtype {e.dtype} needs "
                              f"{numel * e.dtype.itemsize} bytes but its entry says {e.size} (corrupt index)")
        if e.offset + e.size > buf.numel():
            raise BundleError(f"{data_path}: tensor {name!r} needs bytes [{e.offset}, {e.offset + e.size}) but the "
                              f"file has only {buf.numel()} bytes (truncated data file)")
        raw = buf[e.offset:e.offset + e.size]
        if verify and e.crc32c is not None:
            found = crc32c(raw.numpy())
            if found != unmask_crc(e.crc32c):
                raise BundleError(f"{data_path}: tensor {name!r} fails its crc32c check (stored "
                                  f"{unmask_crc(e.crc32c):#010x}, computed {found:#010x}): the file is corrupt")
        if e.offset % e.dtype.itemsize:
            raw = raw.clone()  # a typed view needs an aligned offset; TF does not align tensors by default
        out[name] = raw.view(e.dtype).reshape(e.shape)
    return out
