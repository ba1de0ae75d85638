"""minidpo.methods.sft: the packed review stream, random training windows (every offset possible, the last token
included), the deterministic evaluation loss, and a short SFT run that learns."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.dataset.batching import batch_seed
from minidpo.methods.sft import SFTConfig, eval_loss, lm_loss, pack_texts, random_windows, run_sft
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import LoopConfig, TrainRun


class LetterTokenizer:
    """One token per character (a = 0, b = 1, ...), end-of-text 26."""
    eot_id = 26

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[ord(c) - ord("a") for c in t] for t in texts]


def window_starts(stream: torch.Tensor, x: torch.Tensor) -> list[int]:
    """The offset of each window x in a stream of distinct tokens (arange)."""
    return [int(row[0] - stream[0]) for row in x]


def test_pack_texts_puts_end_of_text_before_every_review():
    stream = pack_texts(["ab", "", "c"], LetterTokenizer())
    assert stream.tolist() == [26, 0, 1, 26, 26, 2]
    assert stream.dtype == torch.int32


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 30), st.integers(1, 16), st.integers(0, 2**31))
def test_windows_are_stream_slices_with_targets_shifted_by_one(block, extra, batch, seed):
    stream = torch.arange(100, 100 + block + 1 + extra, dtype=torch.int32)
    x, y = random_windows(stream, batch, block, seed)
    assert x.shape == y.shape == (batch, block) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for s, row in zip(window_starts(stream, x), y):
        assert 0 <= s <= len(stream) - block - 1  # inclusive: the window stream[s:s + block + 1] fits
        assert torch.equal(row, stream[s + 1:s + block + 1].long())
    assert torch.equal(random_windows(stream, batch, block, seed)[0], x)  # a pure function of the seed


def test_a_stream_of_block_plus_one_tokens_gives_exactly_the_one_window():
    stream = torch.arange(9, dtype=torch.int32)
    x, y = random_windows(stream, 4, 8, seed=0)
    assert torch.equal(x, stream[:8].long().expand(4, 8)) and torch.equal(y, stream[1:].long().expand(4, 8))


def test_every_start_is_drawn_so_the_last_token_is_a_target():
    block, stream = 5, torch.arange(12, dtype=torch.int32)
    starts, last_seen = set(), False
    for seed in range(40):
        x, y = random_windows(stream, 8, block, seed)
        starts |= set(window_starts(stream, x))
        last_seen |= bool((y == stream[-1]).any())
    assert starts == set(range(len(stream) - block))  # 0 .. len - block - 1, all of them
    assert last_seen


def test_a_stream_shorter_than_one_window_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        random_windows(torch.arange(8, dtype=torch.int32), 2, 8, seed=0)


def test_batch_seed_is_a_pure_63_bit_function_of_its_parts():
    seeds = {batch_seed(0, step, micro, rank) for step in range(20) for micro in range(3) for rank in range(2)}
    assert len(seeds) == 120 and all(0 <= s < 2**63 for s in seeds)
    assert batch_seed(1, 2, 3) == batch_seed(1, 2, 3) != batch_seed(1, 3, 2)


def tiny_model(vocab: int = 27) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16))


def test_eval_loss_is_the_mean_over_consecutive_windows_and_restores_the_mode():
    model, stream = tiny_model().train(), torch.randint(0, 27, (70,), generator=torch.Generator().manual_seed(1))
    loss = eval_loss(model, stream, block_size=8, batch_size=3, max_batches=2)  # 6 of the 8 windows
    with torch.no_grad():
        model.eval()
        naive = sum(lm_loss(model, stream[i * 8:i * 8 + 8][None].long(), stream[i * 8 + 1:i * 8 + 9][None].long())
                    for i in range(6)) / 6
    assert loss == pytest.approx(float(naive), rel=1e-5)
    model.train()
    eval_loss(model, stream, block_size=8)
    assert model.training
    with pytest.raises(ValueError, match="shorter than one block"):
        eval_loss(model, stream[:8], block_size=8)


def test_run_sft_lowers_the_loss_on_a_repetitive_stream():
    stream = torch.tensor([0, 1, 2, 3, 4, 5] * 30, dtype=torch.int32)  # fully predictable after one token
    model = tiny_model(vocab=6)
    before = eval_loss(model, stream, block_size=12)
    lines = []
    run_sft(model, stream, SFTConfig(batch_size=4, block_size=12),
            TrainRun(LoopConfig(steps=30, lr=1e-2, log_every=10, label="sft")), Runtime(log=lines.append))
    assert eval_loss(model, stream, block_size=12) < 0.5 * before
    assert lines  # progress goes to the log given, not to stdout


def test_run_sft_refuses_a_stream_shorter_than_one_window():
    with pytest.raises(ValueError, match="at least"):
        run_sft(tiny_model(), torch.arange(12, dtype=torch.int32), SFTConfig(batch_size=1, block_size=12),
                TrainRun(LoopConfig(steps=1, lr=1e-3)), Runtime())
