"""
Generation for the GPT of model/gpt.py: prefill the prompt into the KV cache, decode one token at a time, sample.

References:
1) gpt-fast (PyTorch team, generate.py): `prefill`, `decode_one_token` and `sample` as small functions over a model
   whose KV cache is allocated once per call (the cache lives in model/gpt.py).
2) nanoGPT (Karpathy, model.py `generate`): temperature and top-k on the last position's logits.
3) OpenAI gpt-2 (src/sample.py `top_k_logits`, `top_p_logits`) and Holtzman et al. 2020, "The Curious Case of Neural
   Text Degeneration", for nucleus (top-p) sampling. As in Hugging Face transformers, top_k=0 and top_p=1.0 are off.

Sampling at the cost of the softmax. `torch.multinomial(probs, 1)` draws one exponential random number per vocabulary
entry, which costs far more than the softmax itself. `sample` draws ONE uniform u per row and inverts the cumulative
distribution (the inverse-CDF method, Devroye 1986 ch. 2), in two levels: sum the weights in blocks of 256, find the
block whose cumulative mass passes u, then search inside that block only. The two levels are also more exact in
float32: a token's interval is measured against its block's partial sum, not against a running total near 1 whose
rounding adds up over 50,257 tokens. `sample_naive` is the plain multinomial version the tests compare against.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from minidpo.config import require
from minidpo.model.gpt import GPT
from minidpo.model.tokenizer import EOT_ID

BLOCK = 256  # tokens per block of the two-level search; about sqrt(50257), so both levels are short


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample completions: the one config of the sampler (minidpo.model.completions) that preference pairs,
    rollouts, evaluation and sample.py use; each method's config embeds one and adds only its own rules."""
    temperature: float = 1.0        # 0 is greedy
    top_k: int | None = None        # keep the k most likely tokens; None or 0: off
    top_p: float | None = None      # nucleus: the smallest set whose mass reaches p; None or 1.0: off
    min_new_tokens: int = 0         # end-of-text is forbidden before this many new tokens
    max_new_tokens: int = 40        # longest completion
    eot_id: int | None = EOT_ID     # end-of-text: a completion ends at its first (None: no end-of-text)

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(self.min_new_tokens >= 0, "min_new_tokens", f"must be >= 0, got {self.min_new_tokens}")
        require(self.max_new_tokens >= self.min_new_tokens, "max_new_tokens",
                f"must be >= min_new_tokens ({self.min_new_tokens}), got {self.max_new_tokens}")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ConfigError (a ValueError naming the field) for settings no distribution corresponds to."""
    require(math.isfinite(temperature) and temperature >= 0, "temperature",
            f"must be a finite number >= 0 (0 is greedy), got {temperature}")
    require(top_k is None or top_k >= 0, "top_k", f"must be >= 0 (0 or none: off), got {top_k}")
    require(top_p is None or 0 < top_p <= 1, "top_p", f"must be in (0, 1] (1 or none: off), got {top_p}")


def active_top_k(top_k: int | None, vocab_size: int) -> int | None:
    """top_k as a filter, or None when it keeps everything (None, 0, or >= the vocabulary)."""
    return top_k if top_k and top_k < vocab_size else None


def active_top_p(top_p: float | None) -> float | None:
    return top_p if top_p is not None and top_p < 1.0 else None


def softmax_weights(logits: Tensor, temperature: float, overwrite: bool = False) -> Tensor:
    """float32 softmax(logits / T) over the last dimension, one fused kernel (separate max, subtract, exp and sum
    would stream the (B, V) tensor four times). `overwrite=True` divides by T in the logits' own memory."""
    x = logits.float()
    if temperature != 1.0:
        # (x - max) / T, not x / T: at a tiny T a finite logit over T overflows to inf (inf - inf = NaN weights, and
        # the search runs past the vocabulary); x - max <= 0 only underflows, and the top token keeps weight 1
        top = x.amax(dim=-1, keepdim=True)                               # (B, 1)
        x = x.sub_(top) if overwrite or x is not logits else x - top     # .float() may have copied
        x = x.div_(temperature)
    return torch.softmax(x, dim=-1)


def search(cdf: Tensor, value: Tensor) -> Tensor:
    """(B, 1) index i with cdf[i-1] <= value < cdf[i] per row; naive: (cdf <= value).sum(-1).

    A zero-weight entry has cdf[i] == cdf[i-1], so it can never satisfy that. A value at or past the total (float
    rounding of u * total) would run off the end: it gets the last entry with positive weight instead, i.e. the
    first index whose cdf reaches the total, never a trailing zero-weight entry.
    """
    idx = torch.searchsorted(cdf, value, right=True)                         # (B, 1)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)  # (B, 1)
    return torch.minimum(idx, last)


def inverse_cdf(weights: Tensor, u: Tensor, block: int = BLOCK) -> Tensor:
    """(B,) index drawn with probability weights[b] / weights[b].sum() from one uniform u[b] in [0, 1).

    Naive equivalent: `torch.multinomial(weights, 1).squeeze(-1)`, or `searchsorted(weights.cumsum(-1), u * total)`.
    Two levels (see the module docstring): the block whose cumulative mass passes u * total, then the token inside
    that block whose cumulative weight passes what is left of it.
    """
    B, V = weights.shape
    full = V // block
    mass = weights[:, :full * block].unflatten(1, (full, block)).sum(-1)  # (B, full)
    if full * block < V:
        mass = torch.cat([mass, weights[:, full * block:].sum(-1, keepdim=True)], dim=1)  # (B, nb) with the tail
    block_cdf = mass.cumsum(-1)                                           # (B, nb)
    target = u * block_cdf[:, -1:]                                        # (B, 1)
    j = search(block_cdf, target)                                         # (B, 1) chosen block
    before = F.pad(block_cdf, (1, 0)).gather(1, j)                        # (B, 1) mass of the blocks before it
    cols = j * block + torch.arange(block, device=weights.device)         # (B, block) its columns
    inner = weights.gather(1, cols.clamp(max=V - 1)) * (cols < V)         # (B, block) past-the-end columns weigh 0
    k = search(inner.cumsum(-1), target - before)                         # (B, 1)
    return (j * block + k).squeeze(1)


def nucleus_drop(sorted_weights: Tensor, top_p: float) -> Tensor:
    """(B, k) True where a token falls outside the nucleus, for weights sorted in descending order.

    Naive: keep the smallest prefix of the sorted tokens whose probability mass reaches top_p; a token is dropped
    when the mass before it already reaches top_p, so the most likely token always stays.
    """
    probs = sorted_weights / sorted_weights.sum(-1, keepdim=True)
    return probs.cumsum(-1) - probs >= top_p


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None, overwrite: bool = False) -> Tensor:
    """Next token (B,) from logits (B, V): greedy at temperature 0, else softmax(logits / T) restricted to the top-k
    and then to the nucleus (top-p), drawn with one uniform per row. Same distribution as `sample_naive` (ties at
    the k-th logit aside: top-k keeps exactly k tokens); different random numbers, so different tokens per seed.
    `overwrite=True` lets it use the logits as scratch space (generate's own logits, never a caller's). The
    settings are checked where they are made (SamplingConfig, generate), not at every token."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    B, V = logits.shape
    k, p = active_top_k(top_k, V), active_top_p(top_p)
    u = torch.rand(B, 1, generator=generator, device=logits.device)  # (B, 1)
    if k is None and p is None:
        return inverse_cdf(softmax_weights(logits, temperature, overwrite), u)
    if k is not None:  # order is unchanged by the temperature, so select on the raw logits
        values, index = torch.topk(logits, k, dim=-1)                    # (B, k), descending
    else:  # top-p alone needs the whole vocabulary sorted
        values, index = torch.sort(logits, dim=-1, descending=True)      # (B, V)
    w = softmax_weights(values, temperature, overwrite=True)  # values is our own tensor
    if p is not None:
        w = w.masked_fill(nucleus_drop(w, p), 0.0)
    return index.gather(1, inverse_cdf(w, u)[:, None]).squeeze(1)


def sample_naive(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """The plain version of `sample`: mask the logits, softmax over the whole vocabulary, torch.multinomial."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    k, p = active_top_k(top_k, logits.size(-1)), active_top_p(top_p)
    if k is not None:
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if p is not None:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        drop_sorted = nucleus_drop(sorted_logits.softmax(dim=-1), p)
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, -float("inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(-1)


def prefill(model: GPT, idx: Tensor, key_mask: Tensor | None) -> Tensor:
    """Run the whole prompt (B, T) through the model, filling its cache; logits of the last position (B, V)."""
    return model.lm_head(model.hidden_states(idx, cache_pos=0, key_mask=key_mask)[:, -1])


def decode_one_token(model: GPT, token: Tensor, pos: int, key_mask: Tensor | None) -> Tensor:
    """Feed one token per row (B, 1) at cache position `pos`; its logits (B, V)."""
    return model.lm_head(model.hidden_states(token, cache_pos=pos, key_mask=key_mask)[:, -1])


def key_mask_for(attention_mask: Tensor | None, total_len: int) -> Tensor | None:
    """(B, total_len) real-token mask of prompt + generated tokens, or None when nothing is padded (then attention
    needs no mask at all and SDPA keeps its fastest kernels). One host sync, once per call."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    B, T = attention_mask.shape
    key_mask = torch.ones(B, total_len, dtype=torch.long, device=attention_mask.device)  # (B, L)
    key_mask[:, :T] = attention_mask  # generated tokens are always real
    return key_mask


@torch.no_grad()  # params: the sampling keywords are sample()'s and Hugging Face generate()'s, one by one
def generate(model: GPT, idx: Tensor, max_new_tokens: int, min_new_tokens: int = 0, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = EOT_ID,
             attention_mask: Tensor | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> Tensor:
    """Continue left-padded prompts idx (B, T); returns (B, T + n) with n <= max_new_tokens.

    temperature=0 is greedy decoding. End-of-text is forbidden before `min_new_tokens`; after a row emits it, that
    row's later tokens are eos_id, and the output ends at the step where every row has finished.
    """
    check_sampling(temperature, top_k, top_p)
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"need 0 <= min_new_tokens ({min_new_tokens}) <= max_new_tokens ({max_new_tokens})")
    B, T = idx.size()
    if T + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds block_size "
                         f"{model.config.block_size}")
    if eos_id is not None and not 0 <= eos_id < model.config.vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary (size {model.config.vocab_size}); "
                         "pass eos_id=None for a model without end-of-text")
    key_mask = key_mask_for(attention_mask, T + max_new_tokens)
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)  # preallocated, filled in place
    out[:, :T] = idx
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    # asking "has every row finished?" costs a host sync: free on a CPU, a stall per token on an accelerator
    check_every = 1 if idx.device.type == "cpu" else 8
    if use_cache:
        model.setup_cache(B, T + max_new_tokens)
    try:
        for step in range(max_new_tokens):
            pos = T + step
            mask = key_mask[:, :pos] if key_mask is not None else None
            if not use_cache:
                logits = model(out[:, :pos], mask)[:, -1]
            elif step == 0:
                logits = prefill(model, idx, mask)
            else:
                logits = decode_one_token(model, out[:, pos - 1:pos], pos - 1, mask)
            if eos_id is not None and step < min_new_tokens:
                logits[:, eos_id] = -float("inf")
            token = sample(logits, temperature, top_k, top_p, generator, overwrite=True)  # (B,)
            if eos_id is not None:
                token = token.masked_fill(finished, eos_id)
                finished |= token == eos_id
            out[:, pos] = token
            if eos_id is not None and (step + 1) % check_every == 0 and bool(finished.all()):
                return trim_finished(out, T, pos + 1, eos_id)
    finally:
        if use_cache:
            model.clear_cache()
    if eos_id is not None and check_every > 1 and bool(finished.all()):
        return trim_finished(out, T, T + max_new_tokens, eos_id)
    return out


def trim_finished(out: Tensor, T: int, end: int, eos_id: int) -> Tensor:
    """out[:, :end] cut just after the step where the last row emitted its first eos: the same result as checking
    after every step. Naive: scan the steps and stop at the first one where every row has emitted eos."""
    new = out[:, T:end] == eos_id                          # (B, n)
    first = new.int().argmax(dim=1)                        # (B,) first eos of each row (every row has one)
    return out[:, :T + int(first.max()) + 1]
