"""
The DPO family of preference losses, and the forward passes that give them sequence log-probs.

With D = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) (w = chosen, l = rejected):
- sigmoid: -log sigmoid(beta D). Direct Preference Optimization, Rafailov et al. 2023, eq. 7
  (arXiv:2305.18290). With label smoothing e > 0 it is conservative DPO (cDPO, E. Mitchell 2023, "A note on DPO
  with noisy preferences & relationship to IPO"): the preference label is assumed flipped with probability e,
  -(1-e) log sigmoid(beta D) - e log sigmoid(-beta D). TRL 1.16's "sigmoid" ignores label_smoothing (it uses it
  only for "robust" and "exo_pair"), so with e > 0 our sigmoid loss is cDPO and differs from TRL's.
- robust: (-(1-e) log sigmoid(beta D) + e log sigmoid(-beta D)) / (1 - 2e), the unbiased loss under label flips
  of rate e of Chowdhury et al. 2024, "Provably Robust DPO" (arXiv:2403.00409), eq. 7 (TRL's formula too).
- ipo: (D - 1/(2 beta))^2, Identity Preference Optimisation, Azar et al. 2023, "A General Theoretical Paradigm to
  Understand Learning from Human Preferences" (arXiv:2310.12036), eq. 17, on length-averaged log-probs as its
  authors (and TRL) use them.
- hinge: relu(1 - beta D), the SLiC calibration loss, Zhao et al. 2023 (arXiv:2305.10425), with 1/beta as margin.
Reference-free (reference log-probs None) sets the reference terms to 0.

The reference is always passed in by the caller: the same model under `minidpo.model.lora.lora_disabled`
(`reference_forward` does that) or log-probs cached before training. Log-probs come from `concatenated_forward`
(each pair's chosen and rejected sequences) or `sequence_forward` (each distinct sequence once, pairs given by
index); both score tokens with the one completion scorer, `minidpo.methods.scoring.completion_logps` ("naive":
log_softmax + gather, or "fused" kernels).
Loss names, defaults and metric names follow Hugging Face TRL's DPOTrainer so numbers compare one to one.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minidpo.config import require
from minidpo.methods.scoring import completion_logps
from minidpo.model.lora import reference_of

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")


@dataclass(frozen=True)
class DPOConfig:
    """label_smoothing e is a label-flip rate: sigmoid (cDPO) takes [0, 0.5] (at 0.5 the labels carry no
    information), robust [0, 0.5) (it divides by 1 - 2e), ipo and hinge have no such term, so e must be 0."""
    beta: float = 0.1             # strength of the KL tie to the reference (IPO: its tau)
    loss_type: str = "sigmoid"    # sigmoid | robust | ipo | hinge
    label_smoothing: float = 0.0  # assumed label-flip rate: cDPO for sigmoid, rDPO for robust

    def __post_init__(self) -> None:
        loss_type, e = self.loss_type, self.label_smoothing
        require(loss_type in LOSS_TYPES, "loss_type", f"must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
        require(math.isfinite(self.beta) and self.beta > 0, "beta", f"must be a finite number > 0, got {self.beta}")
        require(math.isfinite(e), "label_smoothing", f"must be a finite number, got {e}")
        if loss_type == "sigmoid":
            require(0.0 <= e <= 0.5, "label_smoothing", f"for 'sigmoid' (cDPO) must be in [0, 0.5], got {e}")
        elif loss_type == "robust":
            require(0.0 <= e < 0.5, "label_smoothing", f"for 'robust' must be in [0, 0.5), got {e}")
        else:
            require(e == 0.0, "label_smoothing", f"is only used by 'sigmoid' and 'robust'; it must be 0 for "
                                                 f"{loss_type!r}, got {e}")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             reference_chosen_logps: Tensor | None, reference_rejected_logps: Tensor | None,
             beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses (B,) and the implicit rewards beta * (policy - reference) of chosen and rejected (B,).

    Naive equivalent for 'sigmoid' with e = 0: -log(sigmoid(beta * ((pc - rc) - (pr - rr)))). See the module
    docstring for the other losses. Rewards are detached: they are for logging, not for gradients. The arguments
    are DPOConfig's, checked there once.
    """
    if reference_chosen_logps is None:  # reference-free
        reference_chosen_logps = reference_rejected_logps = torch.zeros_like(policy_chosen_logps)

    chosen_logratios = policy_chosen_logps - reference_chosen_logps        # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    D = chosen_logratios - rejected_logratios                              # (B,)
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * D) - e * F.logsigmoid(-beta * D)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * D) + e * F.logsigmoid(-beta * D)) / (1 - 2 * e)
    elif loss_type == "ipo":
        losses = (D - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * D)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


@torch.no_grad()
def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor,
                       policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> dict[str, Tensor]:
    """Batch means under TRL's names, as detached 0-dim tensors on the inputs' device.

    Tensors, not floats, so a training loop can accumulate them on the GPU and call .item() only when it logs:
    a float here would force a host sync every step.
    """
    return {
        "rewards/chosen": chosen_rewards.float().mean(),
        "rewards/rejected": rejected_rewards.float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).float().mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen_logps.float().mean(),
        "logps/rejected": policy_rejected_logps.float().mean(),
    }


def as_unique(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A batch in the unique layout (ids, attention_mask, response_mask (N, T); chosen_index, rejected_index (P,)).

    A unique batch is returned as is. A pairs batch (chosen_*/rejected_* (B, t)) becomes N = 2B rows, chosen rows
    first, both sides right-padded to the longer T. Naive equivalent: rows = chosen rows + rejected rows,
    chosen_index = [0..B-1], rejected_index = [B..2B-1].
    """
    if "ids" in batch:
        return batch
    B = batch["chosen_ids"].size(0)
    T = max(batch["chosen_ids"].size(1), batch["rejected_ids"].size(1))
    stack = lambda k: torch.cat([F.pad(batch[f"{s}_{k}"], (0, T - batch[f"{s}_{k}"].size(1)))  # noqa: E731
                                 for s in ("chosen", "rejected")])  # (2B, T); pad columns are masked out
    index = torch.arange(B, device=batch["chosen_ids"].device)  # (B,)
    return {"ids": stack("ids"), "attention_mask": stack("attention_mask"), "response_mask": stack("response_mask"),
            "chosen_index": index, "rejected_index": index + B}


def _scores(model: nn.Module, ids: Tensor, keep: Tensor, logprobs: str) -> tuple[Tensor, Tensor, Tensor]:
    """Sums, length means and token counts (N,) of the response log-probs."""
    total = completion_logps(model, ids, keep, logprobs)  # (N,)
    num_tokens = (keep[:, 1:] != 0).sum(-1)              # (N,); a token at position 0 cannot be scored
    return total, total / num_tokens.clamp(min=1), num_tokens  # an empty response gives mean 0, not NaN


def concatenated_forward(model: nn.Module, batch: dict[str, Tensor], logprobs: str = "fused") -> dict[str, Tensor]:
    """Sequence log-probs of each pair's chosen and rejected responses from one forward over both stacked.

    Returns chosen_logps, rejected_logps (sums over response tokens, (B,)), chosen_logps_mean, rejected_logps_mean
    (length-averaged, for IPO) and chosen_num_tokens, rejected_num_tokens (B,). Naive equivalent per side:
    minidpo.methods.logprobs.sequence_logps(model(ids), ids, response_mask * attention_mask).
    """
    B = batch["chosen_ids"].size(0)
    u = as_unique(batch)  # (2B, T): chosen rows, then rejected rows
    total, mean, n = _scores(model, u["ids"], u["response_mask"] * u["attention_mask"], logprobs)  # (2B,) each
    return {"chosen_logps": total[:B], "rejected_logps": total[B:], "chosen_logps_mean": mean[:B],
            "rejected_logps_mean": mean[B:], "chosen_num_tokens": n[:B], "rejected_num_tokens": n[B:]}


def sequence_forward(model: nn.Module, batch: dict[str, Tensor], logprobs: str = "fused") -> dict[str, Tensor]:
    """Log-probs of each distinct sequence of a unique batch (ids (N, T), chosen_index/rejected_index (P,)).

    Returns logps (sums over response tokens), logps_mean (length-averaged) and num_tokens, each (N,).
    Naive equivalent: minidpo.methods.logprobs.sequence_logps(model(ids), ids, response_mask * attention_mask).
    """
    total, mean, n = _scores(model, batch["ids"], batch["response_mask"] * batch["attention_mask"], logprobs)
    return {"logps": total, "logps_mean": mean, "num_tokens": n}


def reference_forward(model: nn.Module, batch: dict[str, Tensor], logprobs: str = "fused",
                      unique: bool | None = None) -> dict[str, Tensor]:
    """The reference's log-probs: the same model with its LoRA adapters disabled, without grad.

    unique: sequence_forward's output for a unique batch, else concatenated_forward's (None: by the batch's keys).
    A model without LoRA layers is its own reference (e.g. before the adapter is applied, to cache reference
    log-probs).
    """
    unique = "ids" in batch if unique is None else unique
    forward = sequence_forward if unique else concatenated_forward
    with torch.no_grad(), reference_of(model):
        return forward(model, batch, logprobs)


def dpo_step_loss(policy_out: dict[str, Tensor], reference_out: dict[str, Tensor] | None,
                  cfg: DPOConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean loss and metrics from `concatenated_forward`-style outputs (reference_out None: reference-free); a
    unique batch's per-sequence log-probs give them through `pair_logps`.

    The loss uses length-averaged log-probs for IPO and sums otherwise, so callers cannot mix them up. The metrics
    are TRL's, always from sums, as TRL logs them (also for IPO): rewards/* = beta * (policy - reference) summed
    log-probs, logps/* = the policy's summed log-probs. Plus "logratio/ref_minus_policy": the mean over chosen and
    rejected of log ref(y|x) - log pi(y|x) on the pairs' responses. The reference sampled those responses, so it
    estimates KL(reference || policy) on them; it is NOT the evaluation's exact KL(policy || reference).
    """
    suffix = "_mean" if cfg.loss_type == "ipo" else ""
    pick = lambda out, k: None if out is None else out[k].detach()  # noqa: E731
    pc, pr = policy_out["chosen_logps" + suffix], policy_out["rejected_logps" + suffix]
    rc, rr = pick(reference_out, "chosen_logps" + suffix), pick(reference_out, "rejected_logps" + suffix)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.loss_type,
                                                        cfg.label_smoothing)
    pc, pr = policy_out["chosen_logps"].detach(), policy_out["rejected_logps"].detach()  # sums, for the logs
    rc, rr = pick(reference_out, "chosen_logps"), pick(reference_out, "rejected_logps")
    if suffix:  # IPO: rewards from the sums, as TRL logs them
        chosen_rewards = cfg.beta * (pc if rc is None else pc - rc)
        rejected_rewards = cfg.beta * (pr if rr is None else pr - rr)
    metrics = preference_metrics(chosen_rewards, rejected_rewards, pc, pr)
    if rc is not None:
        metrics["logratio/ref_minus_policy"] = ((rc - pc) + (rr - pr)).float().mean() / 2
    return losses.mean(), metrics


def pair_logps(seq_out: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-pair chosen/rejected log-probs (P,) (concatenated_forward's keys) from per-sequence ones (N,).

    Naive equivalent: {f"chosen_{k}": seq_out[k][batch["chosen_index"]], f"rejected_{k}": ...} for each key.
    A sequence in several pairs is gathered several times; backward sums its gradient over those pairs.
    """
    return {f"{side}_{k}": v[batch[f"{side}_index"]] for k, v in seq_out.items()
            for side in ("chosen", "rejected")}
