"""
Evaluation of a trained policy against its reference: reward, KL, and (for DPO) implicit-reward accuracy.

Reference: Rafailov et al. 2023, sec. 6.1 and Figure 2 (left): on held-out IMDb prompts, the expected reward of
completions sampled from the policy itself is plotted against the sequence-level KL(policy || reference).

What is measured. Each side draws one completion per prompt by plain ancestral sampling (temperature 1, no top-k:
`sample_plain`), at most max_new_tokens long, end-of-text forbidden before min_new_tokens. Write pi~ and ref~ for
these two samplers: at step t < min_new_tokens the model's next-token distribution without end-of-text,
renormalized, the unmodified one after that.
- reward: the classifier's P(positive) of prompt + completion text, averaged over prompts. The reference's
  completions use the policy's generator seed (common random numbers), so the two rewards differ less by chance.
- kl_exact: for y ~ pi~(.|x), the sum over y's generated positions t of the exact KL over the vocabulary,
      sum_v pi~_t(v) (log pi~_t(v) - log ref~_t(v)),
  averaged over prompts.
- kl_sampled: the sampled log-ratio log pi~(y|x) - log ref~(y|x) of the same completions, averaged over prompts.
Both are unbiased estimates of KL(pi~(.|x) || ref~(.|x)); kl_exact replaces each per-token term of kl_sampled by
its expectation given the prefix, so every term is >= 0 and the variance is much lower. With min_new_tokens = 0
this is the paper's quantity. Top-k is kept out of evaluation: the two samplers' top-k sets differ at nearly every
position, so the KL between them would be infinite. Each "_se" is the standard error of the mean over prompts.

The reference is the policy with its LoRA adapter disabled (`lora_disabled`), exactly the starting model as long as
the adapter was created at B = 0. Methods without an implicit reward (all but DPO's family) pass no heldout_pairs
or beta, and "reward_accuracy" is None.
"""

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from minidpo.config import require
from minidpo.dataset.batching import collate_pairs
from minidpo.dataset.pairs import Pair
from minidpo.dataset.prompts import Prompt
from minidpo.methods.dpo import concatenated_forward
from minidpo.model.completions import eval_mode, response_text, sample_completions, sampler_logits
from minidpo.model.generate import SamplingConfig
from minidpo.model.gpt import GPT
from minidpo.model.lora import reference_of
from minidpo.stats import mean_and_se


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation's sampler (plain: temperature 1, no top-k/top-p; lengths only), its batch size and generator
    seed, and the sequence length of the held-out pairs whose implicit reward is checked."""
    sampling: SamplingConfig = SamplingConfig(min_new_tokens=4, max_new_tokens=16)  # end-of-text is forbidden (in
    # sampling and in the KL) before min_new_tokens
    batch_size: int = 32
    seed: int = 1234
    max_length: int = 64      # prompt + completion tokens of a held-out pair (as training collates them)

    def __post_init__(self) -> None:
        s = self.sampling
        require(s.temperature == 1.0 and not s.top_k and s.top_p in (None, 1.0), "temperature",
                "evaluation samples plainly (temperature 1, no top-k or top-p): the KL between what was sampled "
                "is then the models' own")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


class KLEstimates(NamedTuple):
    exact: Tensor    # (N,) sum over generated positions of the exact per-position KL(pi~ || ref~)
    sampled: Tensor  # (N,) log pi~(y|x) - log ref~(y|x) of each completion y


def sample_plain(model: GPT, tok, prompts: Sequence[Prompt], cfg: EvalConfig) -> list[list[int]]:
    """One plain sample per prompt (ids up to and including a first end-of-text), cfg.batch_size prompts per call,
    from one generator seeded with cfg.seed, so the policy and the reference are sampled from the same random
    stream (common random numbers)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    out = []
    for i in range(0, len(prompts), cfg.batch_size):
        out += sample_completions(model, tok, [p.ids for p in prompts[i:i + cfg.batch_size]], cfg.sampling, g)
    return out  # each keeps the eot the policy chose: its KL term counts too


def sample_reference(model: GPT, tok, prompts: Sequence[Prompt], cfg: EvalConfig) -> list[list[int]]:
    """The reference's completions, as `evaluate` draws them: a cache for `evaluate(reference=...)`, since they do
    not change while an adapter trains."""
    with reference_of(model):
        return sample_plain(model, tok, prompts, cfg)


def kl_terms(logp: Tensor, logq: Tensor) -> Tensor:
    """(B, T) KL(p || q) from log-probs (B, T, V); naive: (p * (log p - log q)).sum(-1). A token that p gives
    probability 0 adds 0, also where q forbids it too (-inf - -inf would be NaN)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def per_token_kl(policy_logits: Tensor, reference_logits: Tensor) -> Tensor:
    """(B, T) exact KL over the vocabulary at each position of softmax(policy) from softmax(reference)."""
    return kl_terms(policy_logits.float().log_softmax(-1), reference_logits.float().log_softmax(-1))


def completion_rows(prompts: Sequence[Prompt], completions: Sequence[list[int]],
                    pad_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-padded prompt + completion rows: ids (B, T); targets (B, T), the token position t predicts; scored (B, T),
    True where that token is a completion token; steps (B, T), which generated token (0, 1, ...) it is."""
    T = max(len(p.ids) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    steps = torch.zeros(len(prompts), T, dtype=torch.long)
    scored = torch.zeros(len(prompts), T, dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        if not p.ids:
            raise ValueError(f"evaluation prompt {b} has no tokens; a completion needs one to condition on")
        ids[b, :len(p.ids) + len(c)] = torch.tensor(p.ids + list(c))
        scored[b, len(p.ids) - 1:len(p.ids) + len(c) - 1] = True
        steps[b, len(p.ids) - 1:len(p.ids) + len(c) - 1] = torch.arange(len(c))
    targets = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)  # (B, T); the last column is never scored
    return ids, targets, scored, steps


@torch.no_grad()
def sequence_kl(model: GPT, prompts: Sequence[Prompt], completions: Sequence[list[int]], device: torch.device,
                eot_id: int, min_new_tokens: int = 0, batch_size: int = 16) -> KLEstimates:
    """Both estimates of KL(pi~ || ref~) for each (prompt, completion) (see the module docstring). eot_id is the
    tokenizer's end-of-text (inside the model's vocabulary); it also pads, at positions that are never scored."""
    exact, sampled = [], []
    for i in range(0, len(prompts), batch_size):
        rows = completion_rows(prompts[i:i + batch_size], completions[i:i + batch_size], eot_id)
        ids, targets, scored, steps = (t.to(device) for t in rows)
        policy = sampler_logits(model(ids), steps, eot_id, min_new_tokens)  # right-padded: causal attention is exact
        with reference_of(model):
            reference = sampler_logits(model(ids), steps, eot_id, min_new_tokens)
        logp, logq = policy.log_softmax(-1), reference.log_softmax(-1)  # (B, T, V)
        ratio = (logp - logq).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T) log pi~/ref~ of the token
        exact.append(torch.where(scored, kl_terms(logp, logq), 0.0).sum(-1).cpu())
        sampled.append(torch.where(scored, ratio, 0.0).sum(-1).cpu())
    empty = torch.zeros(0)
    return KLEstimates(torch.cat(exact) if exact else empty, torch.cat(sampled) if sampled else empty)


@torch.no_grad()
def implicit_reward_accuracy(model: GPT, pairs: Sequence[Pair], max_length: int, beta: float, device: torch.device,
                             *, pad_id: int, batch_size: int = 16) -> float:
    """Share of held-out pairs where beta * log(pi/ref) ranks chosen above rejected (TRL's rewards/accuracies).

    Computed in fp32 whatever autocast the caller runs under, as the learned reward model's held-out accuracy is
    (methods/reward_model.py): the two are reported side by side, and bf16 turns close margins into exact ties."""
    if not pairs:
        raise ValueError("implicit_reward_accuracy: no pairs given")
    correct = 0
    with torch.autocast(device.type, enabled=False):
        for i in range(0, len(pairs), batch_size):
            batch = collate_pairs(pairs[i:i + batch_size], max_length, pad_id=pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            pol = concatenated_forward(model, batch)
            with reference_of(model):
                ref = concatenated_forward(model, batch)
            margin = (pol["chosen_logps"] - ref["chosen_logps"]) - (pol["rejected_logps"] - ref["rejected_logps"])
            correct += int((beta * margin > 0).sum())
    return correct / len(pairs)


def rewards_of(scorer, tok, prompts: Sequence[Prompt], completions: Sequence[list[int]]) -> tuple[Tensor, list[str]]:
    """(N,) classifier reward of prompt text + completion text, and the completions' texts."""
    texts = [response_text(c, tok) for c in completions]
    scores = torch.as_tensor(scorer.score([p.text + t for p, t in zip(prompts, texts)]), dtype=torch.float64)
    return scores.reshape(len(prompts)), texts


def evaluate(model: GPT, tok, scorer, prompts: Sequence[Prompt], cfg: EvalConfig,
             heldout_pairs: Sequence[Pair] | None = None, beta: float | None = None,
             reference: bool | Sequence[list[int]] = True) -> dict:
    """{"policy": {reward, reward_se, kl_exact, kl_exact_se, kl_sampled, kl_sampled_se}, "reward_accuracy": float
    or None (no pairs or no beta), and unless `reference` is False: "reference": {reward, reward_se}, "examples":
    three side-by-side texts}. `reference` may be the reference's completions from `sample_reference`."""
    if not prompts:
        raise ValueError("evaluate: no prompts given")
    cached = None if isinstance(reference, bool) else reference
    if cached is not None and len(cached) != len(prompts):
        raise ValueError(f"evaluate: {len(cached)} cached reference completions for {len(prompts)} prompts; they "
                         "must come from sample_reference on the same prompts")
    device = next(model.parameters()).device
    with eval_mode(model):
        policy = sample_plain(model, tok, prompts, cfg)
        rewards, policy_text = rewards_of(scorer, tok, prompts, policy)
        kl = sequence_kl(model, prompts, policy, device, cfg.sampling.eot_id, cfg.sampling.min_new_tokens)
        side = {}
        for name, values in (("reward", rewards), ("kl_exact", kl.exact), ("kl_sampled", kl.sampled)):
            side[name], side[f"{name}_se"] = mean_and_se(values)
        result = {"policy": side, "reward_accuracy": None}
        if heldout_pairs and beta is not None:
            result["reward_accuracy"] = implicit_reward_accuracy(model, heldout_pairs, cfg.max_length, beta, device,
                                                                 pad_id=tok.eot_id)
        if reference is not False:
            completions = cached if cached is not None else sample_reference(model, tok, prompts, cfg)
            ref_rewards, reference_text = rewards_of(scorer, tok, prompts, completions)
            reward, reward_se = mean_and_se(ref_rewards)
            result["reference"] = {"reward": reward, "reward_se": reward_se}
            result["examples"] = [{"prompt": p.text, "reference": r, "policy": q}
                                  for p, r, q in list(zip(prompts, reference_text, policy_text))[:3]]
    return result


def side_by_side(examples: list[dict], width: int = 100) -> str:
    lines = []
    for ex in examples:
        lines.append(f"prompt    | {ex['prompt']!r}")
        lines.append(f"reference | {ex['reference'][:width]!r}")
        lines.append(f"policy    | {ex['policy'][:width]!r}")
        lines.append("")
    return "\n".join(lines)
