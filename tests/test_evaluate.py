"""Evaluation math (exact KL, implicit-reward accuracy) and the deterministic batch order of the pipeline."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minidpo.evaluate import per_token_kl, sequence_kl
from minidpo.lora import apply_lora
from minidpo.model import GPT, GPTConfig
from minidpo.pairs import Prompt
from minidpo.pipeline import pair_indices


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 30), st.integers(0, 10_000), st.floats(0.1, 30.0))
def test_per_token_kl_is_nonnegative_zero_on_equal_inputs_and_matches_the_naive_sum(T, V, seed, scale):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(2, T, V, generator=g, dtype=torch.float64) * scale
    q = torch.randn(2, T, V, generator=g, dtype=torch.float64) * scale
    kl = per_token_kl(p, q)
    naive = torch.zeros(2, T, dtype=torch.float64)
    for b in range(2):
        for t in range(T):
            P, Q = p[b, t].softmax(-1), q[b, t].softmax(-1)
            naive[b, t] = sum(P[v] * (P[v].log() - Q[v].log()) for v in range(V))
    torch.testing.assert_close(kl.double(), naive, atol=1e-4, rtol=1e-4)
    assert (kl >= -1e-5).all()
    assert per_token_kl(p, p).abs().max() < 1e-6
    assert per_token_kl(p, p + 3.0).abs().max() < 1e-5  # shifting logits leaves the distribution unchanged


def tiny_lora_model(zero: bool) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16)).eval()
    apply_lora(model, rank=2, alpha=4)
    if not zero:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    return model


def test_sequence_kl_is_zero_for_a_fresh_adapter_and_positive_once_it_moves():
    prompts = [Prompt([1, 2, 3], "x"), Prompt([4], "y")]
    completions = [[5, 6, 7, 8], [9, 10]]
    fresh = sequence_kl(tiny_lora_model(zero=True), prompts, completions, torch.device("cpu"), pad_id=0)
    moved = sequence_kl(tiny_lora_model(zero=False), prompts, completions, torch.device("cpu"), pad_id=0)
    assert fresh.shape == moved.shape == (2,)
    assert fresh.abs().max() < 1e-6
    assert (moved > 1e-4).all()


def test_sequence_kl_counts_only_the_generated_positions():
    model = tiny_lora_model(zero=False)
    dev = torch.device("cpu")
    p = Prompt([1, 2, 3], "x")
    full = sequence_kl(model, [p], [[5, 6, 7]], dev, pad_id=0)
    shorter = sequence_kl(model, [p], [[5, 6]], dev, pad_id=0)
    # with pad rows in the same batch the result must not change (pads are never scored)
    batched = sequence_kl(model, [p, Prompt([1], "y")], [[5, 6, 7], [8, 9, 10, 11, 12, 13]], dev, pad_id=0)
    assert full.item() > shorter.item() > 0
    torch.testing.assert_close(batched[0], full[0], atol=1e-5, rtol=1e-5)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(0, 200), st.integers(1, 90), st.integers(0, 100))
def test_batch_order_is_a_pure_function_with_every_epoch_a_permutation(n, start, count, seed):
    a = pair_indices(n, start, count, seed)
    assert a == pair_indices(n, start, count, seed)
    assert all(0 <= i < n for i in a)
    stream = pair_indices(n, 0, start + count, seed)
    assert stream[start:] == a  # slicing the endless stream anywhere gives the same items
    for e in range(len(stream) // n):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))


def test_data_parallel_ranks_split_exactly_the_single_process_batch():
    n, per_rank, world = 37, 3, 2
    single = pair_indices(n, 5 * per_rank * world, per_rank * world, seed=1)  # step 5, one process, batch 6
    ranks = [pair_indices(n, (5 * world + r) * per_rank, per_rank, seed=1) for r in range(world)]
    assert ranks[0] + ranks[1] == single


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_implicit_reward_accuracy_is_half_or_less_for_a_fresh_adapter(beta):
    from minidpo.evaluate import implicit_reward_accuracy
    from minidpo.pairs import Pair
    model = tiny_lora_model(zero=True)
    pairs = [Pair("p", "a", "b", [1, 2], [3, 4], [5, 6], 1.0, 0.0) for _ in range(3)]
    # policy == reference: every margin is exactly 0, never > 0
    assert implicit_reward_accuracy(model, pairs, 16, beta, torch.device("cpu")) == 0.0
