"""
The two simple baselines of the DPO paper's Figure 2 (IMDb): Preferred-FT and Unlikelihood, trained on the same
preference pairs, batches, LoRA adapter and steps as DPO (minidpo/methods/offline_train.py), without a reference model.

References: Rafailov et al. 2023, "Direct Preference Optimization" (arXiv:2305.18290), sec. 6 and appendix C.3;
Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training" (arXiv:1908.04319), eq. 4 (token-level
unlikelihood: -log(1 - p(c | x_<t)) for each negative candidate c).

- Preferred-FT: supervised fine-tuning on the chosen completion of every pair: the mean negative log-likelihood
  per chosen completion token given the prompt, -sum_pairs log p(y_w|x) / sum_pairs |y_w| (token-level mean over
  the batch, as supervised fine-tuning usually normalizes; a completion chosen in several pairs counts once per
  pair, so the loss is the same in both batch layouts).
- Unlikelihood: per pair, -[log p(y_w|x) + alpha * sum_t log(1 - p(y_l,t | x, y_l,<t))], averaged over pairs. The
  paper describes it as maximizing log p(y_w|x) while minimizing the probability of y_l, with a coefficient alpha in
  [0, 1] on the unlikelihood term; the unlikelihood term is Welleck et al.'s token-level form over the rejected
  completion's tokens. Both terms are sequence SUMS (log p(y|x) is a sequence log-probability in the paper), so at
  alpha = 0 it is Preferred-FT's objective normalized per pair instead of per token:
  unlikelihood_loss(alpha=0) * pairs == preferred_ft_loss * chosen tokens.

log(1 - p) is computed from log p without forming 1 - p (`log1mexp`), and 1 - p is floored at UL_FLOOR = 1e-5 as in
Welleck et al.'s released code (`clamp(1 - p, min=1e-5)`): a token that the model already gives p ~ 1 would
otherwise make the term -inf and stop training.
"""

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from minidpo.config import require
from minidpo.dataset.batching import PairData
from minidpo.methods.dpo import as_unique
from minidpo.methods.offline_train import BatchConfig, make_batch_fn
from minidpo.methods.scoring import completion_logps, token_logps
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import TrainRun, train_loop, trainable_adapter

UL_FLOOR = 1e-5  # smallest 1 - p the unlikelihood term uses (Welleck et al.'s clamp)
LN2 = math.log(2.0)
# (metric key, short label, format) for the progress line (LoopConfig.show)
PREFERRED_FT_SHOW = (("nll/token", "nll", "{:.3f}"), ("logps/chosen", "logp_w", "{:.2f}"))
UNLIKELIHOOD_SHOW = (("logps/chosen", "logp_w", "{:.2f}"), ("logps/rejected", "logp_l", "{:.2f}"),
                     ("unlikelihood/rejected", "ul", "{:.3f}"))


@dataclass(frozen=True)
class UnlikelihoodConfig:
    alpha: float = 1.0        # weight of the rejected completion's unlikelihood term (the paper: alpha in [0, 1])
    floor: float = UL_FLOOR   # 1 - p is floored here, so a token with p -> 1 keeps the loss finite

    def __post_init__(self) -> None:
        require(math.isfinite(self.alpha) and self.alpha >= 0, "unlikelihood_alpha",
                f"must be a finite number >= 0, got {self.alpha}")
        require(math.isfinite(self.floor) and 0 < self.floor < 1, "unlikelihood_floor",
                f"must be in (0, 1), got {self.floor}")


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate everywhere (Maechler 2012, "Accurately Computing log(1 - exp(-|a|))"):
    log(-expm1(x)) for x > -ln 2, log1p(-exp(x)) otherwise. Naive equivalent: torch.log(1 - torch.exp(x)), which
    rounds 1 - exp(x) to 0 (-inf) for x > -6e-8 in float32.

    Each branch is evaluated on inputs safe for it (the other rows get -1), so the branch torch.where discards
    cannot put inf * 0 = NaN into the gradient.
    """
    near_zero = x > -LN2
    hi = torch.where(near_zero, x, -1.0)
    lo = torch.where(near_zero, -1.0, x)
    return torch.where(near_zero, torch.log(-torch.expm1(hi)), torch.log1p(-torch.exp(lo)))


def unlikelihood_term(logp: Tensor, floor: float = UL_FLOOR) -> Tensor:
    """log(max(1 - p, floor)) from log p, elementwise; naive: torch.log(torch.clamp(1 - logp.exp(), min=floor)).
    Capping log p at log(1 - floor) is the same floor applied before log1mexp; beyond it the gradient is 0."""
    return log1mexp(torch.clamp(logp, max=math.log1p(-floor)))


def preferred_ft_loss(chosen_logps: Tensor, chosen_num_tokens: Tensor) -> Tensor:
    """Mean NLL per chosen completion token: -chosen_logps.sum() / chosen_num_tokens.sum(), over (P,) pairs.

    Naive equivalent: the mean of -log p(token) over every chosen completion token of the batch, pair by pair."""
    return -chosen_logps.sum() / chosen_num_tokens.sum().clamp(min=1)


def unlikelihood_loss(chosen_logps: Tensor, rejected_unlikelihood: Tensor, alpha: float) -> Tensor:
    """Per-pair losses (P,): -(log p(y_w|x) + alpha * sum_t log(1 - p(y_l,t))), the second sum given per pair.

    Naive equivalent: -(chosen_logps + alpha * rejected_unlikelihood), rejected_unlikelihood[i] being
    sum over the rejected completion's tokens of log(1 - exp(log p(token))).
    """
    if chosen_logps.shape != rejected_unlikelihood.shape:
        raise ValueError(f"unlikelihood_loss: chosen_logps {tuple(chosen_logps.shape)} and rejected_unlikelihood "
                         f"{tuple(rejected_unlikelihood.shape)} must have the same shape (P,)")
    return -(chosen_logps + alpha * rejected_unlikelihood)


def per_row(values: Tensor, row: Tensor, n_rows: int) -> Tensor:
    """(n_rows,) sums of per-token values (M,) by row; naive: [values[row == n].sum() for n in range(n_rows)]."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, row, values)


def preferred_ft_step(model: torch.nn.Module, batch: tuple, batch_config: BatchConfig) -> tuple[Tensor, dict, int, int]:
    """One Preferred-FT micro-batch (make_batch_fn's tuple): only the sequences that are some pair's chosen side
    are forwarded, once each, through the one completion scorer (DPO's too)."""
    _, tensors, n_tokens, n_pairs = batch
    u = as_unique(tensors)
    rows, pick = torch.unique(u["chosen_index"], return_inverse=True)  # (R,) distinct chosen rows, (P,) into them
    keep = u["response_mask"][rows] * u["attention_mask"][rows]        # (R, T)
    sums = completion_logps(model, u["ids"][rows], keep, batch_config.logprobs)  # (R,)
    chosen_logps = sums[pick]                                           # (P,)
    chosen_tokens = (keep[:, 1:] != 0).sum(-1)[pick]                    # (P,)
    loss = preferred_ft_loss(chosen_logps, chosen_tokens)
    return loss, {"nll/token": loss.detach(), "logps/chosen": chosen_logps.detach().float().mean()}, n_tokens, n_pairs


def unlikelihood_step(model: torch.nn.Module, batch: tuple, cfg: UnlikelihoodConfig,
                      batch_config: BatchConfig) -> tuple[Tensor, dict, int, int]:
    """One Unlikelihood micro-batch: one forward over every distinct sequence, log p per token, then per row the
    sum of log p (for chosen sides) and of log(1 - p) (for rejected sides)."""
    _, tensors, n_tokens, n_pairs = batch
    u = as_unique(tensors)
    N = u["ids"].size(0)
    logp, row = token_logps(model, u["ids"], u["response_mask"] * u["attention_mask"], batch_config.logprobs)
    logps = per_row(logp, row, N)                                        # (N,) log p(y|x)
    unlikely = per_row(unlikelihood_term(logp, cfg.floor), row, N)       # (N,) sum_t log(1 - p(y_t))
    chosen, rejected = logps[u["chosen_index"]], unlikely[u["rejected_index"]]  # (P,) each
    loss = unlikelihood_loss(chosen, rejected, cfg.alpha).mean()
    metrics = {"logps/chosen": chosen.detach().float().mean(),
               "logps/rejected": logps[u["rejected_index"]].detach().float().mean(),
               "unlikelihood/rejected": rejected.detach().float().mean()}
    return loss, metrics, n_tokens, n_pairs


def train_baseline(model: torch.nn.Module, data: PairData, method: str, batch_config: BatchConfig, run: TrainRun,
                   runtime: Runtime, unlikelihood: UnlikelihoodConfig | None = None) -> dict:
    """Train the model's fresh LoRA adapter (B = 0: the caller applies it, so the adapter disabled is the reference
    the evaluation's KL is measured against) with "preferred-ft" or "unlikelihood" on DPO's batches; returns the
    training summary. The caller evaluates afterwards, as for every method."""
    require(method in ("preferred-ft", "unlikelihood"), "method",
            f"train_baseline takes 'preferred-ft' or 'unlikelihood', got {method!r}")
    ul = unlikelihood if unlikelihood is not None else UnlikelihoodConfig()
    params = trainable_adapter(model, f"train_baseline({method})")

    def step_fn(batch):
        with runtime.autocast:
            if method == "preferred-ft":
                return preferred_ft_step(model, batch, batch_config)
            return unlikelihood_step(model, batch, ul, batch_config)

    setting = "sft" if method == "preferred-ft" else f"alpha={ul.alpha:g}"
    settings = {"method": method, "batch": asdict(batch_config),
                **({"unlikelihood": asdict(ul)} if method == "unlikelihood" else {})}
    return train_loop(run, params, make_batch_fn(data, batch_config, runtime), step_fn, settings, log=runtime.log,
                      label=f"{method} {setting}",
                      show=PREFERRED_FT_SHOW if method == "preferred-ft" else UNLIKELIHOOD_SHOW)
