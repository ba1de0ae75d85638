"""
Sequence log-probabilities, the plain way: log_softmax, gather, mask, sum.

DPO scores a response y to a prompt x by log pi(y|x) = sum_t log pi(y_t | x, y_<t) (Rafailov et al. 2023, eq. 7
sums these per sequence). With the prompt and response in one row `ids` (B, T), the logits at position t-1
predict the token at t, so

    log pi(y|x) = sum over t >= 1 with response_mask[:, t] of log_softmax(logits[:, t-1])[ids[:, t]].

This file is that formula in a few lines, for reading, stepping through in a debugger, and checking the fused
kernels of `minidpo.methods.fused_logprobs` against (tests/test_logprobs.py). It materializes the full fp32 [B, T, V]
log-softmax (823 MB at GPT-2's V for one [8, 512] batch) and two more of that size in backward; training uses the
fused kernels by default (`--logprobs fused`), `--logprobs naive` selects this path.

"""

import torch
from torch import Tensor

from minidpo.methods.fused_logprobs import IGNORE_INDEX

# how a method scores tokens (its --logprobs): "fused" (fused_logprobs.py) or "naive" (this file); every config
# that takes the choice checks it against this list
LOGPROBS = ("fused", "naive")


def _upcast(x: Tensor) -> Tensor:
    """x.float(), except that float64 stays float64 (so gradcheck sees double precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def naive_token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[targets] (...,) in fp32 (fp64 for fp64 logits) from logits (..., V).

    Targets equal to IGNORE_INDEX (-100) give 0 (and no gradient), as in the fused `fused_token_logps`.
    """
    valid = targets != IGNORE_INDEX
    logp = _upcast(logits).log_softmax(-1)                                       # (..., V)
    picked = logp.gather(-1, torch.where(valid, targets, 0)[..., None]).squeeze(-1)  # (...,)
    return torch.where(valid, picked, 0.0)


def sequence_logps(logits: Tensor, ids: Tensor, response_mask: Tensor) -> Tensor:
    """Sum (B,) of log p(ids[:, t] | ids[:, :t]) over positions t >= 1 where response_mask[:, t] is nonzero.

    logits (B, T, V) are the model's outputs on ids (B, T); response_mask (B, T) marks the response tokens (and
    should be 0 on padding). The first position predicts nothing and the last logits are never used.
    """
    logp = _upcast(logits[:, :-1]).log_softmax(-1)                 # (B, T-1, V): position t-1 predicts token t
    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)         # (B, T-1)
    keep = response_mask[:, 1:] != 0                               # (B, T-1)
    return torch.where(keep, picked, 0.0).sum(-1)                  # (B,); where(), so -inf off the mask can't leak
