"""
The one completion scorer: log p(token | prompt, earlier tokens) of each completion token of right-padded rows, per
token or summed per row, for every method that scores completions (DPO and its reference, the baselines, ORPO, the
rollouts of RLOO and online DPO).

How (`logprobs`): "naive" is the plain log_softmax + gather over every position (methods/logprobs.py, to read and
check); "fused" projects only completion positions through the head and scores them with the kernels of
methods/fused_logprobs.py, so the (N, T, V) log-softmax never exists.

Of which distribution. By default the model's own. Given the `SamplingConfig` the completions were drawn with, the
distribution generate() drew them from instead (pi~): the logits divided by the temperature, and end-of-text
removed (the rest renormalized) at the generated steps before min_new_tokens. On-policy methods need exactly this:
with log pi instead, the gradient would also push down end-of-text where it can never be sampled, spending KL on
nothing. Where end-of-text is forbidden, log pi~(y) = logit(y) - logsumexp over the vocabulary without it: the same
kernels over the head without its end-of-text row. Never log pi(y) - log(1 - pi(eot)) from a difference: when
1 - pi(eot) is ~1e-7 that difference is lost to fp32 rounding.

ids must be right-padded: the forward then runs without an attention mask (plain causal, SDPA's fastest kernels),
every real token sits at its true position, and the pad positions compute garbage that `keep` masks out.
"""

import torch
import torch.nn as nn
from torch import Tensor

from minidpo.methods.fused_logprobs import fused_token_logps, linear_token_logps
from minidpo.methods.logprobs import LOGPROBS, naive_token_logps
from minidpo.model.cast_cache import autocast_weight
from minidpo.model.completions import sampler_logits
from minidpo.model.generate import SamplingConfig

# below this, materializing the completion logits beats recomputing them in backward (one head matmul fewer)
SMALL_LOGITS_BYTES = 256 * 2**20


def generated_steps(ids: Tensor, prompt_lens: Tensor) -> Tensor:
    """(N, T-1): which generated token (0, 1, ...) each target ids[:, 1:] is, given each row's prompt length."""
    return torch.arange(1, ids.size(1), device=ids.device) - prompt_lens[:, None]


def naive_grid(model: nn.Module, ids: Tensor, sampler: SamplingConfig | None = None,
               prompt_lens: Tensor | None = None) -> Tensor:
    """(N, T-1) log p(ids[:, t] | ids[:, :t]) at every position t >= 1, from the full logits (log_softmax +
    gather); of the sampler's distribution when `sampler` is given (then prompt_lens (N,) too)."""
    logits = model(ids)[:, :-1]                                            # (N, T-1, V)
    if sampler is not None:
        logits = sampler_logits(logits / sampler.temperature, generated_steps(ids, prompt_lens), sampler.eot_id,
                                sampler.min_new_tokens)
    return naive_token_logps(logits, ids[:, 1:])


def head_logps(h: Tensor, W: Tensor, y: Tensor, small_logits: bool) -> Tensor:
    """(M,) log softmax(h @ W.T)[y]. small_logits: one (M, V) buffer when it fits in SMALL_LOGITS_BYTES (its
    gradient then reuses the storage); otherwise the logits are never built (recomputed chunk by chunk in backward)."""
    if h.size(0) == 0:
        return h.new_zeros(0)
    if small_logits and h.size(0) * W.size(0) * h.element_size() <= SMALL_LOGITS_BYTES:
        return fused_token_logps(h @ W.t(), y, inplace_backward=True)
    return linear_token_logps(h, W, y)


def token_logps(model: nn.Module, ids: Tensor, keep: Tensor, logprobs: str = "fused",
                sampler: SamplingConfig | None = None, prompt_lens: Tensor | None = None,
                small_logits: bool = False) -> tuple[Tensor, Tensor]:
    """(M,) log-probs of every token ids[n, t] with keep[n, t] nonzero (t >= 1; a token at position 0 has no
    context), and (M,) its row n: `completion_logps` per token (the arguments are its own).

    Naive equivalent: naive_grid(model, ids, sampler, prompt_lens)[keep[:, 1:] != 0], with the rows it came from.
    """
    return completion_logps(model, ids, keep, logprobs, sampler, prompt_lens, small_logits, per_token=True)


def completion_logps(model: nn.Module, ids: Tensor, keep: Tensor, logprobs: str = "fused",
                     sampler: SamplingConfig | None = None, prompt_lens: Tensor | None = None,
                     small_logits: bool = False, per_token: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """(N,) log p(y|x) of the completions: the sum over each row's scored tokens (keep[n, t] nonzero, t >= 1), or
    log pi~(y|x) of the sampler's distribution when `sampler` is given (prompt_lens (N,) then says where each row's
    completion starts). small_logits: see `head_logps` (rollouts: short completions). per_token: instead the
    (M,) token log-probs and (M,) the row of each (`token_logps`).

    Naive equivalent (logprobs "naive", computed so): where(keep[:, 1:], naive_grid(...), 0).sum(-1).
    """
    if logprobs not in LOGPROBS:
        raise ValueError(f"logprobs must be one of {LOGPROBS}, got {logprobs!r}")
    if logprobs == "naive" and not per_token:  # -inf off the mask cannot leak through where()
        return torch.where(keep[:, 1:] != 0, naive_grid(model, ids, sampler, prompt_lens), 0.0).sum(-1)
    N, T = ids.shape
    rows = (keep[:, 1:] != 0).reshape(-1).nonzero().squeeze(1)          # (M,) flat positions of scored tokens
    y = ids[:, 1:].reshape(-1)[rows]                                     # (M,)
    if logprobs == "naive":
        return naive_grid(model, ids, sampler, prompt_lens).reshape(-1)[rows], rows // (T - 1)
    head = model.lm_head
    if getattr(head, "bias", None) is not None:
        raise ValueError("token_logps: the head must be a bias-free linear map (GPT-2's tied lm_head)")
    # on an accelerator nonzero() costs a host sync per call, much less than projecting every prompt and pad
    # position through a 50257-wide head
    h = model.hidden_states(ids[:, :-1]).reshape(N * (T - 1), -1)[rows]  # (M, C); the last token predicts nothing
    W = autocast_weight(head.weight)                                     # (V, C), cast once under autocast
    if sampler is None:
        logp = head_logps(h, W, y, small_logits)
    else:
        if sampler.temperature != 1.0:
            h = h / sampler.temperature                                  # logits / T = (h / T) @ W.T
        eot = sampler.eot_id
        forbidden = generated_steps(ids, prompt_lens).reshape(-1)[rows] < sampler.min_new_tokens  # (M,)
        if eot is None:
            forbidden = torch.zeros_like(forbidden)
        f, a = forbidden.nonzero().squeeze(1), (~forbidden).nonzero().squeeze(1)
        if eot is None or eot == W.size(0) - 1:  # the head without end-of-text: a view when it is the last row
            W_no_eot = W[:-1]
        else:
            W_no_eot = torch.cat([W[:eot], W[eot + 1:]])                 # (V-1, C)
        y_f = y[f] - (y[f] > eot).long() if eot is not None else y[f]    # (Mf,) ids in W_no_eot; never eot itself
        logp_f, logp_a = head_logps(h[f], W_no_eot, y_f, small_logits), head_logps(h[a], W, y[a], small_logits)
        dtype = torch.promote_types(torch.promote_types(logp_f.dtype, logp_a.dtype), torch.float32)
        logp = torch.zeros(rows.numel(), dtype=dtype, device=ids.device)
        logp = logp.index_copy(0, f, logp_f.to(dtype)).index_copy(0, a, logp_a.to(dtype))
    row = rows // (T - 1)
    if per_token:
        return logp, row
    return torch.zeros(ids.size(0), dtype=logp.dtype, device=ids.device).index_add(0, row, logp)
