"""
GPT-2's byte-level BPE tokenizer, built offline from OpenAI's two files.

Reference: Radford et al. 2019 (GPT-2), openai/gpt-2 src/encoder.py; the fast BPE itself is tiktoken's. tiktoken's
`get_encoding("gpt2")` downloads `encoder.json` and `vocab.bpe` on first use; we ship both in `data/gpt2/` and hand
tiktoken the ranks directly, so no cache directory, HOME or network is ever touched.

encoder.json maps each token's "data gym" string to its id, raw bytes spelled with printable unicode characters
(bytes_to_unicode in OpenAI's encoder.py); undoing that gives tiktoken's {bytes: rank}.
"""

import hashlib
import json
from pathlib import Path

import tiktoken
import torch
from torch import Tensor

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "gpt2"
# The sha256 values tiktoken pins for its "gpt2" encoding (tiktoken_ext/openai_public.py).
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# r50k_base / gpt2 pre-tokenization pattern, as in tiktoken_ext/openai_public.py.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256  # the id of <|endoftext|>: defined here once, imported everywhere else


def _read_checked(path: Path, sha256: str) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} is missing; it ships with minidpo in data/gpt2/")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"tokenizer file {path} has sha256 {digest}, expected {sha256} (the value tiktoken pins); "
                         "the file is corrupt or not OpenAI's GPT-2 file")
    return data


def data_gym_byte_decoder() -> dict[str, int]:
    """Inverse of OpenAI's bytes_to_unicode: data-gym character -> byte."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    decoder = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in decoder.values():
            decoder[chr(256 + n)] = b
            n += 1
    return decoder


def mergeable_ranks(encoder_json: bytes, vocab_bpe: bytes) -> dict[bytes, int]:
    """{token bytes: rank} for tiktoken. The ranks are the encoder.json ids; vocab.bpe is checked for agreement:
    its i-th merge must create the token with id 256 + i, since BPE merges apply in rank order."""
    byte_of = data_gym_byte_decoder()
    encoder = json.loads(encoder_json)
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in encoder.items() if tok != ENDOFTEXT}
    merges = vocab_bpe.decode("utf-8").split("\n")[1:-1]  # first line is a version header
    for i, merge in enumerate(merges):
        first, second = merge.split()
        merged = bytes(byte_of[c] for c in first + second)
        if ranks.get(merged) != 256 + i:
            raise ValueError(f"vocab.bpe merge {i} ({merge!r}) disagrees with encoder.json")
    return ranks


class Tokenizer:
    """GPT-2 tokenizer: encode/decode, end-of-text id, and batching with padding."""

    def __init__(self, data_dir: str | Path = DATA_DIR):
        data_dir = Path(data_dir)
        encoder_json = _read_checked(data_dir / "encoder.json", ENCODER_JSON_SHA256)
        vocab_bpe = _read_checked(data_dir / "vocab.bpe", VOCAB_BPE_SHA256)
        self.encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=mergeable_ranks(encoder_json, vocab_bpe),
            special_tokens={ENDOFTEXT: EOT_ID},
            explicit_n_vocab=50257,
        )
        self.eot_id = EOT_ID
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; "<|endoftext|>" inside text is encoded as ordinary text, never as the special token."""
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.encoding.decode(ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def pad(self, seqs: list[list[int]], padding_side: str = "left", pad_id: int | None = None,
            max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """Stack id lists into (ids, attention_mask), both (B, T) long; mask 1 on real tokens.

        Left padding is what generation wants (every prompt ends at the same column); right padding is what
        training wants (plain causal attention stays exact). `max_length` truncates from the right."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad_id = self.eot_id if pad_id is None else pad_id
        if max_length is not None:
            seqs = [s[:max_length] for s in seqs]
        T = max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            cols = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
            ids[i, cols] = torch.tensor(s, dtype=torch.long)
            mask[i, cols] = 1
        return ids, mask

    def batch_encode(self, texts: list[str], padding_side: str = "left", pad_id: int | None = None,
                     max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """Encode and pad a batch of strings: (ids, attention_mask), each (B, T)."""
        return self.pad(self.encode_batch(texts), padding_side, pad_id, max_length)
