"""The learned reward model (minidpo/methods/reward_model.py): the Bradley-Terry loss against its formula and its
invariants, accuracy, where the head reads, padding invariance, a fit on separable pairs, resume, save/load, the stage
cache, and the scorer interface that RLOO's rollouts call."""

import math
import random
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.dataset.batching import PairData, prompt_groups
from minidpo.dataset.pairs import Pair
from minidpo.dataset.prompts import Prompt
from minidpo.methods.offline_train import BatchConfig
from minidpo.methods.reward_model import (
    RewardModel,
    RewardModelFileError,
    RewardModelScorer,
    bradley_terry_loss,
    cached_reward_model,
    fit_normalization,
    heldout_accuracy,
    load_reward_model,
    pair_accuracy,
    pair_rewards,
    save_reward_model,
    score_positions,
    train_reward_model,
)
from minidpo.methods.rollout import RolloutConfig, sample_rollout
from minidpo.model.generate import SamplingConfig
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.model.lora import LoRAConfig
from minidpo.model.tokenizer import EOT_ID, Tokenizer
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import LoopConfig, TrainRun

SETTINGS = settings(max_examples=40, deadline=None)
f64 = torch.float64
TOK = Tokenizer()
rewards = st.lists(st.tuples(st.floats(-30, 30), st.floats(-30, 30)), min_size=1, max_size=12)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=EOT_ID + 1, n_layer=1, n_head=2, n_embd=16)).eval()


def tiny_rm(seed: int = 0) -> RewardModel:
    from minidpo.model.lora import apply_lora
    body = apply_lora(tiny_gpt(seed), rank=2, alpha=4.0, targets=("attn.c_attn",))
    rm = RewardModel(body)
    with torch.no_grad():  # a non-zero adapter, so the LoRA path matters in every check below
        for name, p in rm.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.3)
    return rm


@SETTINGS
@given(rewards)
def test_bradley_terry_loss_equals_minus_log_sigmoid_of_the_margin(rs):
    win, lose = torch.tensor(rs, dtype=f64).T
    expected = -torch.log(torch.sigmoid(win - lose)).mean()
    torch.testing.assert_close(bradley_terry_loss(win, lose), expected, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(rewards, st.floats(-1e3, 1e3))
def test_bradley_terry_loss_is_unchanged_by_a_constant_added_to_both_rewards(rs, c):
    win, lose = torch.tensor(rs, dtype=f64).T
    torch.testing.assert_close(bradley_terry_loss(win + c, lose + c), bradley_terry_loss(win, lose),
                               rtol=1e-9, atol=1e-9)


@SETTINGS
@given(rewards, st.floats(1e-3, 5.0))
def test_raising_the_chosen_reward_lowers_the_loss_and_the_gradients_have_opposite_signs(rs, step):
    win, lose = (t.clone().requires_grad_(True) for t in torch.tensor(rs, dtype=f64).T)
    loss = bradley_terry_loss(win, lose)
    gw, gl = torch.autograd.grad(loss, (win, lose))
    assert bool((gw < 0).all()) and bool((gl > 0).all())
    torch.testing.assert_close(gw, -gl)  # the loss depends on r_w - r_l only
    # naive gradient: d/dr_w = -sigmoid(r_l - r_w) / P
    torch.testing.assert_close(gw, -torch.sigmoid(lose - win).detach() / len(rs))
    assert bradley_terry_loss(win.detach() + step, lose.detach()) < loss.detach()


@SETTINGS
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=1, max_size=20))
def test_pair_accuracy_counts_strictly_higher_chosen_rewards_ties_wrong(rs):
    win, lose = torch.tensor(rs, dtype=f64).T
    assert float(pair_accuracy(win, lose)) == pytest.approx(sum(a > b for a, b in rs) / len(rs))


@SETTINGS
@given(st.lists(st.lists(st.sampled_from([1, 2, 3, EOT_ID]), min_size=1, max_size=8), min_size=1, max_size=5),
       st.sampled_from(["left", "right"]))
def test_score_position_is_the_last_real_token_that_is_not_end_of_text(rows, side):
    ids, mask = TOK.pad(rows, padding_side=side, pad_id=EOT_ID)
    got = score_positions(ids, mask, EOT_ID).tolist()
    for b in range(len(rows)):
        real = [t for t in range(ids.size(1)) if mask[b, t] and ids[b, t] != EOT_ID]
        assert got[b] == (max(real) if real else 0)


def test_reward_is_the_same_whatever_the_padding_and_ignores_a_final_end_of_text():
    rm = tiny_rm()
    g = random.Random(0)
    rows = [[g.randrange(1, 500) for _ in range(g.randint(2, 12))] for _ in range(6)]
    with torch.no_grad():
        right = rm(*TOK.pad(rows, padding_side="right"))
        right_fast = rm(*TOK.pad(rows, padding_side="right"), right_padded=True)
        left = rm(*TOK.pad(rows, padding_side="left"))
        alone = torch.cat([rm(*TOK.pad([r], padding_side="right")) for r in rows])
        ended = rm(*TOK.pad([r + [EOT_ID] for r in rows], padding_side="right"), right_padded=True)
    for other in (right_fast, left, alone, ended):
        torch.testing.assert_close(other, right, rtol=1e-5, atol=1e-5)
    assert right.std() > 0  # the rows do get different rewards


GOOD, BAD = list(range(10, 20)), list(range(20, 30))


def toy_pairs(n_prompts: int, split: str, seed: int) -> list[Pair]:
    """Separable pairs: the chosen completion is made of 'good' tokens, the rejected one of 'bad' tokens; some
    completions end with end-of-text, as sampled ones do."""
    g = random.Random(seed)
    pairs = []
    for _ in range(n_prompts):
        prompt = [g.randrange(40, 200) for _ in range(g.randint(2, 5))]
        for _ in range(3):
            n = g.randint(2, 6)
            chosen = [g.choice(GOOD) for _ in range(n)] + ([EOT_ID] if g.random() < 0.5 else [])
            rejected = [g.choice(BAD) for _ in range(n)] + ([EOT_ID] if g.random() < 0.5 else [])
            pairs.append(Pair("p", "c", "r", prompt, chosen, rejected, 1.0, 0.0, split))
    return pairs


def toy_data() -> PairData:
    train = toy_pairs(24, "train", 0)
    return PairData(train, toy_pairs(10, "test", 1), prompt_groups(train), "toy")


def fit(run_dir, steps: int = 40):
    batch_config = BatchConfig(mode="unique", prompts=4, max_length=16)
    loop = LoopConfig(steps=steps, lr=2e-2, log_every=10)
    return train_reward_model(tiny_gpt(), toy_data(), LoRAConfig(rank=2, alpha=4.0), batch_config,
                              TrainRun(loop, run_dir), Runtime())


def test_a_reward_model_fitted_on_separable_pairs_ranks_held_out_pairs_right_and_resumes(tmp_path):
    rm, info = fit(tmp_path / "rm")
    assert info["heldout_accuracy"] >= 0.9, info
    assert info["train"]["accuracy"] >= 0.9 and info["train"]["final_loss"] < 0.3
    # the normalization: mean 0, std 1 over the distinct training sequences
    data = toy_data()
    w, _ = pair_rewards(rm, data.train, 16)
    assert heldout_accuracy(rm, data.heldout, 16) == info["heldout_accuracy"]
    scorer = RewardModelScorer(rm, Tokenizer(), max_length=16)
    from minidpo.dataset.batching import unique_sequences
    rows = [p + c for p, c in unique_sequences(data.train)[0]]
    z = scorer.score_ids(rows).double()
    assert abs(float(z.mean())) < 1e-4 and float(z.std()) == pytest.approx(1.0, abs=1e-4)
    # a second call finds the finished checkpoint and trains nothing: the same model
    again, _ = fit(tmp_path / "rm")
    for (k, a), b in zip(rm.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(pair_rewards(again, data.train, 16)[0], w)


def test_the_reference_passed_in_is_not_changed_by_training(tmp_path):
    ref = tiny_gpt()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    train_reward_model(ref, toy_data(), LoRAConfig(rank=2, alpha=4.0), BatchConfig(prompts=2, max_length=16),
                       TrainRun(LoopConfig(steps=2, lr=1e-2), tmp_path), Runtime())
    assert set(ref.state_dict()) == set(before)  # no LoRA layers were added to it
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())


def test_normalization_gives_mean_0_and_std_1_on_the_sequences_it_was_fitted_on():
    rm = tiny_rm()
    data = toy_data()
    mean, std = fit_normalization(rm, data.train, 16)
    from minidpo.dataset.batching import unique_sequences
    raw = pair_rewards(rm, [Pair("", "", "", p, c, c, 0, 0) for p, c in unique_sequences(data.train)[0]], 16)[0]
    assert mean == pytest.approx(statistics.mean(raw.tolist()), rel=1e-6, abs=1e-7)
    assert std == pytest.approx(statistics.stdev(raw.tolist()), rel=1e-5)


def test_saved_reward_model_loads_onto_a_fresh_body_with_the_same_scores(tmp_path):
    rm = tiny_rm()
    fit_normalization(rm, toy_data().train, 16)
    path = save_reward_model(rm, tmp_path / "rm.safetensors", {"fingerprint": "abc"})
    loaded = load_reward_model(tiny_gpt(), path)
    ids, mask = TOK.pad([[5, 6, 7], [8, 9, 10, 11]], padding_side="right")
    with torch.no_grad():
        torch.testing.assert_close(loaded.normalized(ids, mask), rm.normalized(ids, mask), rtol=0, atol=0)
    with pytest.raises(RewardModelFileError, match="rm.safetensors"):  # the body it was trained on is the same
        load_reward_model(GPT(GPTConfig(block_size=32, vocab_size=EOT_ID + 1, n_layer=2, n_head=2, n_embd=16)), path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a model")
    with pytest.raises(RewardModelFileError, match="bad.safetensors"):
        load_reward_model(tiny_gpt(), tmp_path / "bad.safetensors")


def test_the_stage_cache_reuses_a_model_with_the_same_fingerprint_and_rebuilds_otherwise(tmp_path):
    built = []

    def build():
        built.append(1)
        rm = tiny_rm(seed=len(built))
        fit_normalization(rm, toy_data().train, 16)
        return rm, {"heldout_accuracy": 0.75, "normalization": {"mean": 0.0, "std": 1.0}, "train": {"x": 1}}

    path, logs = tmp_path / "reward_model.safetensors", []
    first, info = cached_reward_model(path, "fp1", tiny_gpt(), build, logs.append)
    second, info2 = cached_reward_model(path, "fp1", tiny_gpt(), build, logs.append)
    assert len(built) == 1 and info2 == info == {"heldout_accuracy": 0.75, "normalization": {"mean": 0.0, "std": 1.0},
                                                 "train": {"x": 1}}  # the training record is kept with the model
    assert torch.equal(second.head.weight, first.head.weight) and any("reusing" in m for m in logs)
    cached_reward_model(path, "fp2", tiny_gpt(), build, logs.append)
    assert len(built) == 2
    path.write_bytes(b"\0" * 16)  # damaged: rebuilt, with a message, not trusted
    cached_reward_model(path, "fp2", tiny_gpt(), build, logs.append)
    assert len(built) == 3 and any("unreadable" in m for m in logs)


def test_scorer_is_what_rollouts_call_and_scores_their_texts():
    tok = TOK
    rm = tiny_rm()
    scorer = RewardModelScorer(rm, tok, max_length=32)
    texts = ["This movie was great", "I hated it", "A"]
    got = scorer.score(texts)
    with torch.no_grad():
        ids, mask = tok.batch_encode(texts, padding_side="left")
        expected = rm.normalized(ids, mask)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # through the rollout of RLOO / online DPO: its scores are the scorer's scores of prompt + completion text
    policy = tiny_gpt(seed=3)
    from minidpo.model.lora import apply_lora
    apply_lora(policy, rank=2, alpha=4.0, targets=("attn.c_attn",))
    prompts = [Prompt(tok.encode(t), t) for t in ("This movie was", "I")]
    cfg = RolloutConfig(sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=4), k=2, prompts_per_step=2)
    seen = []

    class Recording:
        def score(self, texts):
            seen.extend(texts)
            return scorer.score(texts)
    rollout = sample_rollout(policy, tok, Recording(), prompts, cfg, [4, 4], torch.Generator().manual_seed(0))
    assert len(seen) == 4 and all(s.startswith(prompts[i // 2].text) for i, s in enumerate(seen))
    torch.testing.assert_close(rollout.scores, scorer.score(seen))
    with pytest.raises(ValueError, match="no tokens"):
        scorer.score([""])
    with pytest.raises(ValueError, match="exceeds"):
        RewardModelScorer(rm, tok, max_length=33)


def test_reward_model_loss_on_pairs_batches_equals_unique_batches():
    from minidpo.dataset.batching import collate_pairs, collate_unique
    from minidpo.methods.reward_model import reward_model_step
    rm = tiny_rm()
    pairs = toy_data().train[:6]
    out = {}
    for name, batch in (("pairs", collate_pairs(pairs, 16)), ("unique", collate_unique(pairs, 16))):
        loss, metrics, _, _ = reward_model_step(rm, (None, batch, 0, len(pairs)))
        grad = torch.autograd.grad(loss, [rm.head.weight])[0]
        out[name] = (loss.detach(), grad, metrics["accuracy"])
    for a, b in zip(out["pairs"], out["unique"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(out["pairs"][0]))
