"""
ORPO, odds ratio preference optimization: supervised fine-tuning on the chosen completion plus a penalty on the
odds of the rejected one, in one loss and without a reference model.

Reference: Hong, Lee and Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
(arXiv:2403.07691), eqs. 2-7:

    L = L_SFT + lambda * L_OR,    L_OR = -log sigmoid(log odds(y_w|x) - log odds(y_l|x))
    odds(y|x) = P(y|x) / (1 - P(y|x)),    log P(y|x) = (1/|y|) sum_t log p(y_t | x, y_<t)

P(y|x) is the length-averaged likelihood (eq. 4), and L_SFT is the negative log-likelihood of the chosen completion
(eq. 2). Hugging Face TRL's ORPOTrainer computes the same (`odds_ratio_loss`, with the weight lambda named `beta`,
default 0.1, this module's default too); tests/test_orpo.py checks this loss against both on the same inputs.
ORPO trains a fresh LoRA adapter on DPO's offline pairs and batches; L_SFT is Preferred-FT's loss, so at lambda = 0
ORPO is Preferred-FT.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from minidpo.config import require
from minidpo.dataset.batching import PairData
from minidpo.methods.baselines import log1mexp, preferred_ft_loss
from minidpo.methods.dpo import as_unique
from minidpo.methods.offline_train import BatchConfig, make_batch_fn
from minidpo.methods.scoring import completion_logps
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import TrainRun, train_loop, trainable_adapter

# (metric key, short label, format) for the progress line (LoopConfig.show)
ORPO_SHOW = (("nll/token", "nll", "{:.3f}"), ("log_odds_ratio", "log_or", "{:+.3f}"),
             ("accuracy", "acc", "{:.2f}"))


@dataclass(frozen=True)
class ORPOConfig:
    lambda_: float = 0.1  # weight of the odds-ratio term (the paper's lambda; TRL's `beta`, default 0.1)

    def __post_init__(self) -> None:
        require(math.isfinite(self.lambda_) and self.lambda_ >= 0, "orpo_lambda",
                f"must be a finite number >= 0, got {self.lambda_}")


def orpo_loss(chosen_logps: Tensor, chosen_tokens: Tensor, rejected_logps: Tensor, rejected_tokens: Tensor,
              lambda_: float) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO's loss over P pairs from each completion's summed log-prob (P,) and token count (P,):
    (loss, its NLL term, the log odds ratio (P,)).

        loss = NLL(chosen) + lambda * mean over pairs of -log sigmoid(log odds(y_w) - log odds(y_l))
        log odds(y) = log(p / (1 - p)) = log p - log(1 - p),  with log p = logps / tokens (length-averaged)
        NLL(chosen) = -sum(chosen_logps) / sum(chosen_tokens)  (per chosen completion token, as Preferred-FT)

    log(1 - p) comes from log p without forming 1 - p (`log1mexp`), so a p near 1 keeps its precision.
    """
    mean_w = chosen_logps / chosen_tokens.clamp(min=1)      # (P,) log P(y_w|x), length-averaged
    mean_l = rejected_logps / rejected_tokens.clamp(min=1)  # (P,)
    log_odds_ratio = (mean_w - log1mexp(mean_w)) - (mean_l - log1mexp(mean_l))  # (P,)
    nll = preferred_ft_loss(chosen_logps, chosen_tokens)
    return nll - lambda_ * F.logsigmoid(log_odds_ratio).mean(), nll, log_odds_ratio


def orpo_step(model: torch.nn.Module, batch: tuple, cfg: ORPOConfig,
              batch_config: BatchConfig) -> tuple[Tensor, dict, int, int]:
    """One ORPO micro-batch (make_batch_fn's tuple): every distinct sequence forwarded once through the one
    completion scorer, then each pair's chosen and rejected log-probs and lengths."""
    _, tensors, n_tokens, n_pairs = batch
    u = as_unique(tensors)
    keep = u["response_mask"] * u["attention_mask"]                       # (N, T)
    logps = completion_logps(model, u["ids"], keep, batch_config.logprobs)  # (N,) log p(y|x), summed
    lengths = (keep[:, 1:] != 0).sum(-1)                                  # (N,) completion tokens scored
    chosen, rejected = u["chosen_index"], u["rejected_index"]             # (P,) each
    loss, nll, ratio = orpo_loss(logps[chosen], lengths[chosen], logps[rejected], lengths[rejected], cfg.lambda_)
    metrics = {"nll/token": nll.detach(), "log_odds_ratio": ratio.detach().float().mean(),
               "accuracy": (ratio.detach() > 0).float().mean(),
               "logps/chosen": logps[chosen].detach().float().mean(),
               "logps/rejected": logps[rejected].detach().float().mean()}
    return loss, metrics, n_tokens, n_pairs


def train_orpo(model: torch.nn.Module, data: PairData, cfg: ORPOConfig, batch_config: BatchConfig, run: TrainRun,
               runtime: Runtime) -> dict:
    """Train the model's fresh LoRA adapter (B = 0, applied by the caller) with ORPO on DPO's batches; returns the
    training summary. No reference model is used; the caller evaluates afterwards, as for every method."""
    params = trainable_adapter(model, "train_orpo")
    return train_loop(run, params, make_batch_fn(data, batch_config, runtime),
                      lambda batch: orpo_step(model, batch, cfg, batch_config),
                      {"method": "orpo", "batch": asdict(batch_config), "orpo": asdict(cfg)},
                      autocast=runtime.autocast, log=runtime.log, label=f"orpo lambda={cfg.lambda_:g}", show=ORPO_SHOW)
