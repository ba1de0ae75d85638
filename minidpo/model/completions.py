"""
K completions of left-padded prompts, cut at end-of-text: the one sampler behind the preference pairs, the rollouts
of RLOO and online DPO, best-of-N and evaluation, each configured by one `SamplingConfig` (model/generate.py); and the
distribution that sampler draws from (`sampler_logits`), which the log-probs of its samples must use.

Row b of a call is completion b % k of prompt b // k, so the k copies of a prompt share a generate call (and, for
pairs, a length budget). A completion ends at its first end-of-text, which it keeps (`response_text` leaves it out
of the text), so a method also learns where to stop. With one budget per prompt, the call generates up to the
largest and cuts each row at its own: the same distribution as generating with that budget.
"""

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from minidpo.model.generate import SamplingConfig, generate
from minidpo.model.tokenizer import EOT_ID


def cut_at_eot(ids: list[int], eot_id: int | None = EOT_ID) -> list[int]:
    """Tokens up to AND including the first eot. Naive: ids[:ids.index(eot) + 1] if eot in ids else ids."""
    return ids[:ids.index(eot_id) + 1] if eot_id in ids else ids


def response_text(ids: list[int], tokenizer: Any) -> str:
    """The completion's text: its ids without the final eot, decoded."""
    return tokenizer.decode(ids[:-1] if ids and ids[-1] == tokenizer.eot_id else ids)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (no LoRA dropout) inside, its own mode again after: sampling and scoring samples see
    no dropout, as TRL generates under model.eval(), while training steps turn it on."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_completions(model: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], sampling: SamplingConfig,
                       generator: torch.Generator, k: int = 1, budgets: Sequence[int] | None = None) -> list[list[int]]:
    """k completions (ids up to and including a first end-of-text) of each prompt (ids), in one generate call over
    left-padded rows, prompt-major (row b: completion b % k of prompt b // k).

    budgets: one max-new-tokens per prompt (None: sampling.max_new_tokens for all); the call runs to the largest and
    each row is cut at its own. `tokenizer` needs pad(ids, padding_side); the generator must live on the model's
    device, and every draw comes from it, so a seed gives the same completions.
    """
    rows = [p for p in prompts for _ in range(k)]
    idx, mask = tokenizer.pad(rows, padding_side="left")  # (P*k, T)
    device = next(model.parameters()).device
    max_new = max(budgets) if budgets else sampling.max_new_tokens
    with eval_mode(model):
        seqs = generate(model, idx.to(device), max_new, min_new_tokens=sampling.min_new_tokens,
                        temperature=sampling.temperature, top_k=sampling.top_k or None, top_p=sampling.top_p,
                        eos_id=sampling.eot_id, attention_mask=mask.to(device), generator=generator)
    new = seqs[:, idx.size(1):].tolist()  # (P*k, <= max_new)
    return [cut_at_eot(row[:budgets[b // k]] if budgets else row, sampling.eot_id) for b, row in enumerate(new)]


def sampler_logits(logits: Tensor, steps: Tensor, eot_id: int | None, min_new_tokens: int) -> Tensor:
    """(B, T, V) float32 logits of the distribution generate() draws from: end-of-text at -inf where the generated
    step (B, T) is < min_new_tokens. Naive: for every (b, t) with steps[b, t] < min_new_tokens,
    logits[b, t, eot_id] = -inf (softmax then renormalizes the rest)."""
    out = logits.float().clone()
    if min_new_tokens > 0 and eot_id is not None:
        out[..., eot_id].masked_fill_(steps < min_new_tokens, -float("inf"))  # integer index: a view, in place
    return out
