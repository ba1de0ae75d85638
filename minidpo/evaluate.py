"""
Evaluation of a DPO policy against its reference: reward, KL, and implicit-reward accuracy.

Reference: Rafailov et al. 2023, sec. 6.1 and Figure 2 (left): on held-out IMDb prompts, the expected reward of the
policy's completions (here: our sentiment classifier's P(positive)) is plotted against the sequence-level
KL(policy || reference). The KL is computed exactly per position rather than sampled:

    KL(pi || ref)(x, y) = sum_t sum_v pi(v | x, y<t) * (log pi(v | x, y<t) - log ref(v | x, y<t))

summed over the generated positions t of completions y ~ pi(. | x), then averaged over prompts. That is an unbiased
estimate of the sequence KL whose per-token terms are exact (always >= 0), so it has far lower variance than the
sampled log-ratio log pi(y|x) - log ref(y|x).

The reference is the policy with its LoRA adapter disabled (`lora_disabled`), which is exactly the model DPO started
from as long as the adapter was created at B = 0 (minidpo merges an SFT adapter before adding the DPO one).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from minidpo.dpo import concatenated_forward
from minidpo.lora import lora_disabled
from minidpo.model import GPT
from minidpo.pairs import Pair, Prompt, collate_pairs, cut_at_eot, response_text
from minidpo.tokenizer import Tokenizer


@dataclass
class EvalConfig:
    max_new_tokens: int = 16
    min_new_tokens: int = 4
    temperature: float = 1.0
    top_k: int | None = None
    batch_size: int = 32
    seed: int = 1234


@torch.no_grad()
def sample_completions(model: GPT, tok: Tokenizer, prompts: list[Prompt], cfg: EvalConfig,
                       device: torch.device) -> list[list[int]]:
    """One completion per prompt (ids up to and including a first end-of-text), with a fixed generator seed so
    policy and reference are sampled from the same random stream."""
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    out = []
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[i:i + cfg.batch_size]
        ids, mask = tok.pad([p.ids for p in chunk], padding_side="left")  # (B, T)
        seqs = model.generate(ids.to(device), cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                              temperature=cfg.temperature, top_k=cfg.top_k, eos_id=tok.eot_id,
                              attention_mask=mask.to(device), generator=g)
        for row in seqs[:, ids.size(1):].tolist():
            out.append(cut_at_eot(row, tok.eot_id))  # keeps the eot the policy chose: its KL term counts too
    return out


def per_token_kl(policy_logits: Tensor, reference_logits: Tensor) -> Tensor:
    """(B, T) exact KL over the vocabulary at each position; naive: (p * (log p - log q)).sum(-1)."""
    logp = policy_logits.float().log_softmax(-1)     # (B, T, V)
    logq = reference_logits.float().log_softmax(-1)  # (B, T, V)
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def sequence_kl(model: GPT, prompts: list[Prompt], completions: list[list[int]], device: torch.device,
                batch_size: int = 16, pad_id: int = 50256) -> Tensor:
    """(N,) KL(policy || reference) of each completion, summed over its generated positions."""
    kls = []
    for i in range(0, len(prompts), batch_size):
        rows = [(p.ids, c) for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
        T = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        scored = torch.zeros(len(rows), T, dtype=torch.bool)  # positions whose output predicts a completion token
        for b, (p, c) in enumerate(rows):
            ids[b, :len(p) + len(c)] = torch.tensor(p + c)
            scored[b, len(p) - 1:len(p) + len(c) - 1] = True
        ids, scored = ids.to(device), scored.to(device)
        policy_logits = model(ids)  # right-padded: plain causal attention is exact
        with lora_disabled(model):
            reference_logits = model(ids)
        kl = per_token_kl(policy_logits, reference_logits)  # (B, T)
        kls.append((kl * scored).sum(-1).cpu())
    return torch.cat(kls) if kls else torch.zeros(0)


@torch.no_grad()
def implicit_reward_accuracy(model: GPT, pairs: list[Pair], max_length: int, beta: float, device: torch.device,
                             batch_size: int = 16) -> float:
    """Share of held-out pairs where beta * log(pi/ref) ranks chosen above rejected (TRL's rewards/accuracies)."""
    if not pairs:
        return float("nan")
    correct = 0
    for i in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[i:i + batch_size], max_length).items()}
        pol = concatenated_forward(model, batch)
        with lora_disabled(model):
            ref = concatenated_forward(model, batch)
        margin = (pol["chosen_logps"] - ref["chosen_logps"]) - (pol["rejected_logps"] - ref["rejected_logps"])
        correct += int((beta * margin > 0).sum())
    return correct / len(pairs)


def evaluate(model: GPT, tok: Tokenizer, scorer, prompts: list[Prompt], heldout_pairs: list[Pair],
             cfg: EvalConfig, max_length: int, beta: float, device: torch.device,
             with_reference: bool = True) -> dict:
    """Reward of policy (and reference) samples, KL(policy || reference), implicit-reward accuracy, examples."""
    was_training = model.training
    model.eval()
    policy = sample_completions(model, tok, prompts, cfg, device)
    policy_text = [response_text(c, tok) for c in policy]
    policy_scores = scorer.score([p.text + t for p, t in zip(prompts, policy_text)])
    result = {"policy": {"reward": float(torch.as_tensor(policy_scores).float().mean()),
                         "kl": float(sequence_kl(model, prompts, policy, device).mean())},
              "reward_accuracy": implicit_reward_accuracy(model, heldout_pairs, max_length, beta, device)}
    if with_reference:
        with lora_disabled(model):
            reference = sample_completions(model, tok, prompts, cfg, device)
        reference_text = [response_text(c, tok) for c in reference]
        reference_scores = scorer.score([p.text + t for p, t in zip(prompts, reference_text)])
        result["reference"] = {"reward": float(torch.as_tensor(reference_scores).float().mean())}
        result["examples"] = [{"prompt": p.text, "reference": r, "policy": q}
                              for p, r, q in list(zip(prompts, reference_text, policy_text))[:3]]
    model.train(was_training)
    return result


def side_by_side(examples: list[dict], width: int = 100) -> str:
    lines = []
    for ex in examples:
        lines.append(f"prompt    | {ex['prompt']!r}")
        lines.append(f"reference | {ex['reference'][:width]!r}")
        lines.append(f"policy    | {ex['policy'][:width]!r}")
        lines.append("")
    return "\n".join(lines)
