"""
A small reader and writer for the safetensors format, without the safetensors package.

Reference: the format spec in huggingface/safetensors (README, "Format"):
    8 bytes: N, a little-endian u64, the size of the header
    N bytes: a UTF-8 JSON object {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
             optionally "__metadata__": {str: str}}; it may be padded with trailing spaces
    rest:    the byte buffer; offsets are relative to its start, tensors are little-endian and C-contiguous.
The reader memory-maps the file and views each tensor straight out of the map; the writer is atomic.

The header is validated as the reference implementation does (safetensors' Metadata::validate) before any byte is
used: every field has the right JSON type, shapes are non-negative, and the tensors' byte ranges, sorted, tile the
data section exactly. Every error is a SafetensorsError naming the file and the tensor or key.
"""

import json
import math
import struct
from pathlib import Path

import torch
from torch import Tensor

from minidpo.fileio import atomic_path

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the spec's limit; a larger value means a corrupt or foreign file


class SafetensorsError(ValueError):
    pass


def read_header(path: str | Path) -> tuple[dict, int]:
    """Parse and validate the JSON header; returns (header, offset of the data section from the file start)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise SafetensorsError(f"{path}: file of {size} bytes is too short to be safetensors")
        (n,) = struct.unpack("<Q", first)
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} is impossible for a file of {size} bytes "
                                   "(truncated or not a safetensors file)")
        raw = f.read(n)
    try:  # the spec says UTF-8; json.loads(bytes) would also guess UTF-16/32
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, SafetensorsError) as e:
        raise SafetensorsError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object")
    meta = header.get("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise SafetensorsError(f"{path}: '__metadata__' must be an object of strings, got {meta!r}")
    spans = sorted((_check_entry(path, name, info), name) for name, info in header.items() if name != "__metadata__")
    end, prev = 0, None
    for (begin, stop), name in spans:
        if begin != end:
            what = f"overlaps tensor {prev!r}" if begin < end else f"leaves a hole of {begin - end} bytes before it"
            raise SafetensorsError(f"{path}: tensor {name!r} with data_offsets [{begin}, {stop}] {what} (corrupt "
                                   "file: each tensor must own its own bytes)")
        end, prev = stop, name
    if end != size - 8 - n:
        raise SafetensorsError(f"{path}: the tensors cover {end} bytes but the data section has {size - 8 - n} "
                               "(truncated, or bytes after the last tensor)")
    return header, 8 + n


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise SafetensorsError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _is_count(v: object) -> bool:
    return type(v) is int and v >= 0  # bool is an int subclass; true and false are no sizes


def _check_entry(path: Path, name: str, info: object) -> tuple[int, int]:
    """The (begin, end) of one tensor's bytes, after checking its dtype, shape and offsets."""
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
        raise SafetensorsError(f"{path}: header entry {name!r} must be an object with dtype, shape and "
                               f"data_offsets, got {info!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r}: 'dtype' {dtype!r} is not one of {', '.join(DTYPES)}")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise SafetensorsError(f"{path}: tensor {name!r}: 'shape' must be a list of non-negative integers, "
                               f"got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise SafetensorsError(f"{path}: tensor {name!r}: 'data_offsets' must be two non-negative integers "
                               f"[begin, end], got {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise SafetensorsError(f"{path}: tensor {name!r} with shape {shape} and dtype {dtype} needs {nbytes} bytes "
                               f"but has data_offsets [{begin}, {end}] (truncated or corrupt file)")
    return begin, end


def load_file(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """All tensors of a safetensors file, keyed by name. On CPU they are views into a read-only memory map."""
    header, start = read_header(path)
    size = Path(path).stat().st_size
    # torch.from_file maps the file (shared=False gives a private copy-on-write map, never written back)
    buf = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = buf[start + begin:start + end]
        dtype = DTYPES[info["dtype"]]
        if (start + begin) % dtype.itemsize:
            raw = raw.clone()  # a view needs an aligned offset; files from other writers may not align
        t = raw.view(dtype).reshape(info["shape"])
        out[name] = t if torch.device(device).type == "cpu" else t.to(device)
    return out


def load_metadata(path: str | Path) -> dict[str, str]:
    return read_header(path)[0].get("__metadata__", {})


def save_file(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (moved to CPU, made contiguous) in safetensors layout, atomically."""
    path = Path(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    blobs = []
    # widest dtypes first keeps every tensor aligned without padding (the spec forbids holes in the buffer)
    for name, t in sorted(tensors.items(), key=lambda kv: -kv[1].element_size()):
        if t.dtype not in DTYPE_NAMES:
            raise SafetensorsError(f"cannot save tensor {name!r} of dtype {t.dtype} to safetensors")
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        blobs.append(t)
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # the spec allows padding; 8-byte alignment keeps views aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for t in blobs:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, no copy; numpy lacks bf16
