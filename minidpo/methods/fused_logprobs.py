"""
Fused kernels for per-token log-probabilities log p(target | context) that never hold the [B, T, V] log-softmax.

The plain version of the same computation is `minidpo.methods.logprobs` (log_softmax + gather, a few lines); the tests
check these kernels against it in value and gradient, including -inf logits.

DPO needs, for every response token, log softmax(logits)[target] (Rafailov et al. 2023, eq. 7 sums them per
sequence). The naive `logits.float().log_softmax(-1).gather(-1, targets)` keeps a full fp32 [B, T, V] log-softmax
for backward and then allocates two more of that size in backward (the scattered gradient of the gather and the
gradient of the log-softmax). At GPT-2's V = 50257 that is 823 MB each for one [8, 512] batch.

Here instead:
- `fused_token_logps(logits, targets)`: forward computes logsumexp row chunk by row chunk in fp32 and saves only the
  logits it was given (a reference, not a copy), the [B, T] logsumexp and the targets. Backward rebuilds
  softmax = exp(logits - logsumexp) inside the single [B, T, V] gradient buffer and turns it, in place, into
  grad * (onehot - softmax) in the logits' dtype (half-precision logits go through an fp32 scratch chunk by chunk).
  This is the trick of Liger-Kernel's fused cross-entropy (Hsu et al. 2024) and of Apple's "Cut Your Losses"
  (Wijmans et al. 2024), in plain PyTorch.
- `linear_token_logps(hidden, weight, targets)`: also fuses the lm_head matmul, so even the logits are only
  ever alive one chunk of tokens at a time; backward recomputes each chunk's logits (one extra matmul traded for
  never holding [B, T, V]).

Targets equal to IGNORE_INDEX (-100, PyTorch's cross-entropy convention) give log-prob 0 and no gradient.
"""

from typing import Callable

import torch
from torch import Tensor

from minidpo.model.cast_cache import autocast_weight

IGNORE_INDEX = -100


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, float64 stays float64 (so gradcheck sees double precision)."""
    return torch.promote_types(dtype, torch.float32)


def default_chunk_rows(V: int, device: torch.device) -> int:
    """Rows of V logits handled at once: ~4M elements (16 MB in fp32) on CPU, in L3 cache for the few passes over
    it; ~16M on a GPU, where each chunk costs kernel launches."""
    budget = 1 << 24 if device.type == "cuda" else 1 << 22
    return max(1, budget // V)


def _check_targets(x: Tensor, targets: Tensor, vocab_size: int, name: str) -> None:
    if targets.dtype != torch.long:
        raise TypeError(f"{name}: targets must be int64 (torch.long), got {targets.dtype}")
    if x.shape[:-1] != targets.shape:
        raise ValueError(f"{name}: targets shape {tuple(targets.shape)} must equal the input shape without its "
                         f"last dim, {tuple(x.shape[:-1])}")
    # Only on CPU: on CUDA this would be a host sync per call, and gather's device assert catches it anyway.
    if targets.device.type == "cpu" and targets.numel() > 0:
        bad = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= vocab_size)
        if bool(bad.any()):
            raise ValueError(f"{name}: targets must be in [0, {vocab_size}) or {IGNORE_INDEX} (ignored), got "
                             f"{targets[bad].unique()[:5].tolist()}")


def _scratch(rows: int, x: Tensor, dtype: torch.dtype) -> Tensor:
    """One (rows, V) buffer reused by every chunk of a call: a fresh tensor per chunk lets the CPU allocator's heap
    fragment and grow to several chunks' worth (measured: ~10x more resident memory for bf16)."""
    return torch.empty(min(rows, x.size(0)), x.size(1), dtype=dtype, device=x.device)


def _target_logps(x: Tensor, targets: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """log p(targets) and logsumexp, both (N,), of x (N, V) in fp32 (fp64 for fp64 x), `rows` rows at a time.

    Naive equivalent: lse = x.float().logsumexp(-1); logp = x.float().gather(1, targets[:, None]).squeeze(1) - lse.
    Each chunk goes through torch's fused log_softmax kernel (one pass over memory where torch.logsumexp makes
    four), so logp is bit-identical to the naive path and lse is recovered as x[target] - logp. That is NaN where
    the target's logit is -inf (-inf - (-inf)); `_repair_lse_` recomputes those rows.
    """
    acc = _accumulate_dtype(x.dtype)
    logp = torch.empty(x.size(0), dtype=acc, device=x.device)  # (N,)
    out_buf = _scratch(rows, x, acc)
    in_buf = _scratch(rows, x, acc) if x.dtype != acc else None  # upcast target for half-precision x
    for s in range(0, x.size(0), rows):
        xc = x[s:s + rows]                                           # (rows, V), or fewer in the last chunk
        if in_buf is not None:
            xc = in_buf[:xc.size(0)].copy_(xc)
        b = torch.log_softmax(xc, -1, out=out_buf[:xc.size(0)])
        logp[s:s + rows] = b.gather(1, targets[s:s + rows, None]).squeeze(1)
    lse = x.gather(1, targets[:, None]).squeeze(1).to(acc) - logp    # (N,)
    return logp, lse


def _repair_lse_(lse: Tensor, logits_of: Callable[[Tensor], Tensor]) -> None:
    """Recompute, as logits_of(rows).logsumexp(-1), the rows of lse (N,) that x[target] - logp left non-finite.

    A -inf target logit (a banned token, or the safe target 0 of an ignored row) makes x[target] - logp = NaN, and
    backward's exp(logits - lse) would turn the whole row's gradient into NaN. Such rows are rare, so they are fixed
    here rather than paying an argmax pass over every row. Costs one host sync on an accelerator.
    """
    bad = (~torch.isfinite(lse)).nonzero().squeeze(1)  # (n_bad,)
    if bad.numel():
        lse[bad] = logits_of(bad).to(lse.dtype).logsumexp(-1)


def _softmax_grad_(log_softmax: Tensor, targets: Tensor, grad: Tensor) -> Tensor:
    """Turn log_softmax (n, V) in place into grad[:, None] * (onehot(targets) - softmax), targets/grad (n,)."""
    log_softmax.exp_().mul_(-grad[:, None])
    return log_softmax.scatter_add_(1, targets[:, None], grad[:, None])


def _grad_logits_(logits: Tensor, lse: Tensor, targets: Tensor, grad: Tensor, out: Tensor, rows: int) -> None:
    """Write grad[:, None] * (onehot(targets) - softmax(logits)) into out, all (N, V) but lse/targets/grad (N,).

    Naive equivalent: out = grad[:, None] * (F.one_hot(targets, V) - logits.softmax(-1)).
    softmax is rebuilt as exp(logits - lse) in lse's (fp32 or fp64) precision. `out` may be `logits` itself.
    Rows to ignore must come with grad == 0 and any valid target.
    """
    if out.dtype == lse.dtype:
        # out is its own workspace: a few in-place passes, no temporary at all. Chunking would add nothing but
        # per-op overhead (which on a busy 2-core CPU costs more than the passes themselves).
        _softmax_grad_(torch.sub(logits, lse[:, None], out=out), targets, grad)
        return
    buf = _scratch(rows, out, lse.dtype)  # half-precision out: work in fp32, `rows` rows at a time
    for s in range(0, logits.size(0), rows):
        e = s + rows
        work = buf[:out[s:e].size(0)].copy_(logits[s:e]).sub_(lse[s:e, None])  # (rows, V), log softmax
        out[s:e].copy_(_softmax_grad_(work, targets[s:e], grad[s:e]))  # the only half-precision rounding


class TokenLogps(torch.autograd.Function):
    """log_softmax(logits)[targets] with O(chunk) extra memory in forward and backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk_rows: int | None, inplace_backward: bool) -> Tensor:
        V = logits.size(-1)
        x = logits.reshape(-1, V)      # (N, V), a view for contiguous logits
        t = targets.reshape(-1)        # (N,)
        valid = t != IGNORE_INDEX
        t_safe = torch.where(valid, t, 0)
        rows = chunk_rows or default_chunk_rows(V, logits.device)
        logp, lse = _target_logps(x, t_safe, rows)  # (N,) each
        _repair_lse_(lse, lambda r: x[r])
        logp = torch.where(valid, logp, 0.0)
        ctx.save_for_backward(logits, lse, t_safe, valid)
        ctx.rows, ctx.inplace = rows, inplace_backward
        return logp.view(targets.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, lse, t_safe, valid = ctx.saved_tensors
        x = logits.reshape(-1, logits.size(-1))                          # (N, V)
        g = torch.where(valid, grad_out.reshape(-1).to(lse.dtype), 0.0)  # (N,)
        # (N, V): the one big buffer, or the logits' own storage when the caller allows it
        grad_logits = x if ctx.inplace else torch.empty(x.shape, dtype=logits.dtype, device=logits.device)
        _grad_logits_(x, lse, t_safe, g, out=grad_logits, rows=ctx.rows)
        return grad_logits.view(logits.shape), None, None, None


def fused_token_logps(logits: Tensor, targets: Tensor, chunk_rows: int | None = None,
                   inplace_backward: bool = False) -> Tensor:
    """log p(targets) (...,) in fp32 (fp64 for fp64 logits) from logits (..., V) of any float dtype.

    Naive equivalent: logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1), with 0 where
    targets == -100. `chunk_rows` rows of V are processed at a time (default: `default_chunk_rows`).
    Contiguous logits (what lm_head returns) are never copied; others are reshaped, which copies them.

    inplace_backward=True writes the gradient into the logits' own storage (as Liger-Kernel does): only for logits
    that nothing else reads afterwards, such as lm_head's output; autograd's version check raises otherwise.
    """
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"fused_token_logps: chunk_rows must be None or >= 1, got {chunk_rows}")
    _check_targets(logits, targets, logits.size(-1), "fused_token_logps")
    return TokenLogps.apply(logits, targets, chunk_rows, inplace_backward)


class LinearTokenLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[targets], logits alive one chunk of tokens at a time."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
        h = hidden.reshape(-1, hidden.size(-1))  # (N, C)
        t = targets.reshape(-1)                  # (N,)
        valid = t != IGNORE_INDEX
        t_safe = torch.where(valid, t, 0)
        rows = default_chunk_rows(weight.size(0), hidden.device)
        logp = torch.empty(h.size(0), dtype=_accumulate_dtype(hidden.dtype), device=h.device)  # (N,)
        lse = torch.empty_like(logp)                                                            # (N,)
        buf = torch.empty(min(chunk_size, h.size(0)), weight.size(0), dtype=h.dtype, device=h.device)  # (n, V)
        for s in range(0, h.size(0), chunk_size):
            e = s + chunk_size
            logits = torch.mm(h[s:e], weight.t(), out=buf[:h[s:e].size(0)])  # (n, V), the only logits alive
            logp[s:e], lse[s:e] = _target_logps(logits, t_safe[s:e], rows)
        _repair_lse_(lse, lambda r: h[r] @ weight.t())
        logp = torch.where(valid, logp, 0.0)
        ctx.save_for_backward(hidden, weight, lse, t_safe, valid)
        ctx.chunk_size, ctx.rows = chunk_size, rows
        return logp.view(targets.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        hidden, weight, lse, t_safe, valid = ctx.saved_tensors
        h = hidden.reshape(-1, hidden.size(-1))                          # (N, C)
        g = torch.where(valid, grad_out.reshape(-1).to(lse.dtype), 0.0)  # (N,)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        # Summed over many chunks, so accumulate in fp32 even for bf16 weights.
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        n = ctx.chunk_size
        buf = torch.empty(min(n, h.size(0)), weight.size(0), dtype=h.dtype, device=h.device)  # (n, V)
        for s in range(0, h.size(0), n):
            e = s + n
            logits = torch.mm(h[s:e], weight.t(), out=buf[:h[s:e].size(0)])  # (n, V), recomputed instead of saved
            _grad_logits_(logits, lse[s:e], t_safe[s:e], g[s:e], out=logits, rows=ctx.rows)  # now its gradient
            if need_h:
                torch.mm(logits, weight, out=grad_h[s:e])  # (n, C)
            if need_w:
                grad_w.addmm_(logits.t().to(grad_w.dtype), h[s:e].to(grad_w.dtype))  # (V, C)
        grad_hidden = grad_h.view(hidden.shape) if need_h else None
        grad_weight = grad_w.to(weight.dtype) if need_w else None
        return grad_hidden, grad_weight, None, None


def linear_token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 128) -> Tensor:
    """log p(targets) (...,) for logits = hidden (..., C) @ weight.T (weight (V, C), an nn.Linear layout).

    Naive equivalent: fused_token_logps(hidden @ weight.T, targets). Gradients for hidden and (when it requires grad)
    weight match the unfused ones; [..., V] is never materialized, only (chunk_size, V) at a time. Under
    torch.autocast the matmuls run in the autocast dtype, as `hidden @ weight.T` would; log-probs stay fp32.
    """
    if weight.dim() != 2 or hidden.size(-1) != weight.size(1):
        raise ValueError(f"linear_token_logps: weight must be (V, C) with C = hidden.size(-1) = "
                         f"{hidden.size(-1)}, got {tuple(weight.shape)}")
    if chunk_size < 1:
        raise ValueError(f"linear_token_logps: chunk_size must be >= 1, got {chunk_size}")
    _check_targets(hidden, targets, weight.size(0), "linear_token_logps")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the matmuls inside use out=, which autocast skips: cast as nn.Linear would
        dtype = torch.get_autocast_dtype(device)  # a frozen weight (GPT-2's tied head under LoRA) is cast once
        hidden, weight = hidden.to(dtype), autocast_weight(weight).to(dtype)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"linear_token_logps: hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the "
                        "same dtype (or run under torch.autocast)")
    return LinearTokenLogps.apply(hidden, weight, targets, chunk_size)
