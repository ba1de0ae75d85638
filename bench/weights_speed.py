"""
Speed of GPT-2 weight loading and of the checks it makes: CRC32C over a buffer the size of GPT-2 124M's data shard
(497,759,232 bytes; minidpo.formats.tf_bundle's lane-parallel numpy version against the byte-at-a-time table and, for
scale, zlib's C crc32 of a different polynomial), sha256 of the same buffer (what minidpo.model.gpt2_files pays to
re-check a cached shard once per process), then load_gpt2 of a random GPT-2 124M in the OpenAI tensor-bundle layout
(CRC32C on, the default, and off) and in HF safetensors layout.

    python bench/weights_speed.py
"""

import hashlib
import os
import platform
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from test_tf_bundle import write_bundle  # noqa: E402  (the tests' reference writer of TF bundles)

from minidpo.formats.tf_bundle import crc32c, crc32c_bytewise  # noqa: E402
from minidpo.model.export import save_hf  # noqa: E402
from minidpo.model.gpt import GPT, GPTConfig  # noqa: E402
from minidpo.model.weights import LINEAR, load_gpt2, openai_name  # noqa: E402


def timed(fn, *args, **kw) -> float:
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


def checksum_rows(shard: int) -> None:
    """The checksums over a random buffer of `shard` bytes; the buffer is freed on return."""
    data = np.frombuffer(np.random.default_rng(0).bytes(shard), dtype=np.uint8)
    crc32c(data[:1 << 20])  # build the tables once
    for name, n, fn in [("crc32c lane-parallel numpy", data.size, lambda: crc32c(data)),
                        ("crc32c byte-at-a-time", 4 << 20, lambda: crc32c_bytewise(data[:4 << 20].tobytes())),
                        ("zlib.crc32 (C, not crc32c)", data.size, lambda: zlib.crc32(data)),
                        ("sha256 (hashlib)", data.size, lambda: hashlib.sha256(data).digest())]:
        dt = timed(fn)
        print(f"{name:30s} {n / dt / 1e6:8.1f} MB/s  ({dt / (n / shard):6.2f} s per 124M data file)")


def main() -> None:
    print(f"{platform.platform()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, numpy {np.__version__}")
    shard = 497_759_232  # bytes of GPT-2 124M's model.ckpt.data-00000-of-00001
    checksum_rows(shard)

    torch.manual_seed(0)
    model = GPT(GPTConfig())
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tf_dir, hf_dir = d / "openai", d / "hf"
        tf_dir.mkdir()
        state = {}
        for k, v in model.state_dict().items():
            if k == "lm_head.weight":
                continue
            state[openai_name(k)] = v.t().unsqueeze(0).contiguous() if k.endswith(LINEAR) else v
        write_bundle(tf_dir / "model.ckpt", state)
        (tf_dir / "hparams.json").write_text('{"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, '
                                             '"n_layer": 12}')
        save_hf(model, hf_dir)
        load_gpt2(hf_dir)  # first use of the meta device costs ~2 s of one-time PyTorch setup; keep it out
        for label, src, kw in [("openai bundle, verify=False", tf_dir, {"verify": False}),
                               ("openai bundle (crc32c on)", tf_dir, {}), ("hf safetensors", hf_dir, {})]:
            dt = min(timed(load_gpt2, src, **kw) for _ in range(2))
            print(f"load_gpt2 124M, {label:28s} {dt:6.2f} s")
        loaded = load_gpt2(tf_dir)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


if __name__ == "__main__":
    main()
