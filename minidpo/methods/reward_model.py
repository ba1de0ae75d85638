"""
A reward model learned from the preference pairs: the first half of RLHF, the thing DPO says it makes unnecessary.

References: Ouyang et al. 2022 and Stiennon et al. 2020 (a language model with a scalar head, trained on pairs with
the Bradley-Terry loss -log sigmoid(r(x, y_w) - r(x, y_l))); Ziegler et al. 2019, "Fine-Tuning Language Models from
Human Preferences", sec. 2.2 (the reward is normalized to mean 0 and variance 1 on the reference's samples before
RL); Hugging Face TRL's RewardTrainer with GPT2ForSequenceClassification (num_labels=1): the reference GPT-2 body,
a bias-free nn.Linear(n_embd, 1) read at the last non-pad token, pad = end-of-text; Rafailov et al. 2023, sec. 5:
DPO's policy is itself a reward model, so `heldout_accuracy` here is measured on the same held-out pairs as DPO's
implicit-reward accuracy (minidpo.evaluate.implicit_reward_accuracy).

The model. r(x, y) = w . h_T where h_T is the body's final hidden state at the last token of prompt + completion
that is not end-of-text: a completion that ended by choosing end-of-text is read at its last word, as
GPT2ForSequenceClassification reads it when pad = end-of-text, and as the scorer reads decoded text (which never
holds the end-of-text token). The body is a copy of the reference with a LoRA adapter (minidpo.model.lora); the head is
trained fully. The head has no bias: the Bradley-Terry loss depends on r(y_w) - r(y_l) only, so a bias would get
no gradient.

As a reward for RL, `RewardModelScorer.score(texts)` (the interface of every reward) returns (r - mean) / std, mean
and std measured on the distinct completions of the training pairs (the reference's samples, Ziegler et al.'s
normalization), so a KL coefficient means the same for every reward model.
"""

import copy
import json
import math
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minidpo.dataset.batching import PairData, collate_unique, unique_sequences
from minidpo.dataset.pairs import Pair
from minidpo.formats.safetensors import SafetensorsError, load_file, load_metadata, save_file
from minidpo.methods.dpo import as_unique
from minidpo.methods.offline_train import BatchConfig, make_batch_fn
from minidpo.model.completions import eval_mode
from minidpo.model.gpt import GPT
from minidpo.model.lora import LoRAConfig, apply_lora, lora_config_of, lora_state_dict
from minidpo.model.tokenizer import EOT_ID
from minidpo.progress import Log, quiet
from minidpo.training.distributed import barrier, is_main
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import TrainRun, train_loop, trainable_parameters

FORMAT = "minidpo-reward-model-v1"
# (metric key, short label, format) for the progress line (LoopConfig.show); TRL's RewardTrainer names
REWARD_MODEL_SHOW = (("accuracy", "acc", "{:.2f}"), ("margin", "margin", "{:+.3f}"))


class RewardModelFileError(ValueError):
    """A saved reward model that is unreadable, of another format, or does not fit the body it is loaded onto."""


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Mean over pairs of -log sigmoid(r_w - r_l) (Bradley & Terry 1952: P(y_w > y_l) = sigmoid(r_w - r_l)).

    Naive equivalent: -torch.log(torch.sigmoid(r_chosen - r_rejected)).mean(); logsigmoid stays finite where the
    sigmoid rounds to 0.
    """
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pair_accuracy(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Share of pairs ranked right, a tie counting as wrong (as TRL's accuracy and DPO's implicit-reward accuracy).
    Naive: sum(1 for w, l in zip(r_chosen, r_rejected) if w > l) / len(r_chosen)."""
    return (r_chosen > r_rejected).float().mean()


def score_positions(ids: Tensor, attention_mask: Tensor, eot_id: int = EOT_ID) -> Tensor:
    """(B,) column of each row's last real token that is not end-of-text, whatever the padding side.

    Naive equivalent: max(t for t in range(T) if attention_mask[b, t] and ids[b, t] != eot_id) for each row b.
    """
    real = (attention_mask != 0) & (ids != eot_id)                   # (B, T)
    cols = torch.arange(ids.size(1), device=ids.device)              # (T,)
    return torch.where(real, cols, -1).amax(-1).clamp(min=0)         # (B,)


class RewardModel(nn.Module):
    """r(x, y): a GPT body (a copy of the reference, LoRA applied by the caller) and a scalar head."""

    def __init__(self, body: GPT, eot_id: int = EOT_ID):
        super().__init__()
        self.body, self.eot_id = body, eot_id
        w = body.lm_head.weight
        self.head = nn.Linear(body.config.n_embd, 1, bias=False, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.head.weight, std=0.02)  # GPT2ForSequenceClassification's init of its score head
        # Ziegler et al.'s normalization, applied by `normalized` (the scorer), not in training
        self.register_buffer("shift", torch.zeros((), device=w.device))
        self.register_buffer("scale", torch.ones((), device=w.device))

    def forward(self, ids: Tensor, attention_mask: Tensor, right_padded: bool = False) -> Tensor:
        """Raw rewards (B,) float32 of rows ids (B, T). right_padded: rows are ones-then-zeros in the mask, so the
        plain causal forward (no mask, SDPA's fastest kernels) is exact for every real token; otherwise the mask
        gives each token its true position and hides padding from attention."""
        hidden = self.body.hidden_states(ids, None if right_padded else attention_mask)  # (B, T, C)
        at = score_positions(ids, attention_mask, self.eot_id)                          # (B,)
        last = hidden[torch.arange(ids.size(0), device=ids.device), at]                 # (B, C)
        return self.head(last).squeeze(-1).float()                                      # (B,)

    def normalized(self, ids: Tensor, attention_mask: Tensor, right_padded: bool = False) -> Tensor:
        """(r - shift) / scale: the reward RL sees."""
        return (self(ids, attention_mask, right_padded) - self.shift) / self.scale


def reward_model_step(rm: RewardModel, batch: tuple) -> tuple[Tensor, dict[str, Tensor], int, int]:
    """One micro-batch (make_batch_fn's tuple, either layout): every distinct sequence scored once, the
    Bradley-Terry loss over the pairs, TRL RewardTrainer's metrics."""
    _, tensors, n_tokens, n_pairs = batch
    u = as_unique(tensors)
    r = rm(u["ids"], u["attention_mask"], right_padded=True)           # (N,); collation right-pads
    r_w, r_l = r[u["chosen_index"]], r[u["rejected_index"]]             # (P,) each
    metrics = {"accuracy": pair_accuracy(r_w.detach(), r_l.detach()), "margin": (r_w - r_l).detach().mean(),
               "mean_reward": r.detach().mean()}
    return bradley_terry_loss(r_w, r_l), metrics, n_tokens, n_pairs


@torch.no_grad()
def pair_rewards(rm: RewardModel, pairs: Sequence[Pair], max_length: int, pad_id: int = EOT_ID,
                 batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) raw rewards (P,) of pairs, collated as DPO collates them (truncation included), each
    distinct sequence scored once."""
    device = rm.head.weight.device
    out = []
    for i in range(0, len(pairs), batch_size):
        u = {k: v.to(device) for k, v in collate_unique(pairs[i:i + batch_size], max_length, pad_id=pad_id).items()}
        r = rm(u["ids"], u["attention_mask"], right_padded=True)
        out.append(torch.stack([r[u["chosen_index"]], r[u["rejected_index"]]]).cpu())  # (2, b)
    both = torch.cat(out, dim=1)
    return both[0], both[1]


def heldout_accuracy(rm: RewardModel, pairs: Sequence[Pair], max_length: int, pad_id: int = EOT_ID,
                     batch_size: int = 32) -> float:
    """pair_accuracy on held-out pairs: pass PairData.heldout, the pairs DPO's implicit-reward accuracy uses."""
    if not pairs:
        raise ValueError("heldout_accuracy: no pairs given")
    with eval_mode(rm):
        return float(pair_accuracy(*pair_rewards(rm, pairs, max_length, pad_id, batch_size)))


@torch.no_grad()
def fit_normalization(rm: RewardModel, pairs: Sequence[Pair], max_length: int, pad_id: int = EOT_ID,
                      batch_size: int = 64, max_rows: int = 4096) -> tuple[float, float]:
    """Set rm.shift, rm.scale to the mean and standard deviation of the raw reward over the distinct (prompt,
    completion) sequences of `pairs` (at most max_rows, in order): Ziegler et al.'s normalization on the reference's
    samples. Returns (mean, std)."""
    rows = unique_sequences(pairs)[0][:max_rows]
    if len(rows) < 2:
        raise ValueError(f"fit_normalization: need at least 2 distinct sequences, got {len(rows)}")
    as_pairs = [Pair("", "", "", p, c, c, 0.0, 0.0) for p, c in rows]  # each row once, as a self-pair
    with eval_mode(rm):
        r = pair_rewards(rm, as_pairs, max_length, pad_id, batch_size)[0].double()
    mean, std = float(r.mean()), float(r.std())
    rm.shift.fill_(mean)
    rm.scale.fill_(std if std > 0 else 1.0)
    return mean, std


def train_reward_model(reference: GPT, data: PairData, lora: LoRAConfig, batch_config: BatchConfig, run: TrainRun,
                       runtime: Runtime) -> tuple[RewardModel, dict]:
    """Fit a reward model (on a copy of `reference`) on data.train with the Bradley-Terry loss on DPO's batches, then
    its normalization on the training pairs; returns (it, {"heldout_accuracy", "normalization", "train"}).
    """
    torch.manual_seed(batch_config.seed)
    body = apply_lora(copy.deepcopy(reference), lora)
    rm = RewardModel(body).to(runtime.device)
    params = trainable_parameters(rm)  # the head and the body's LoRA tensors

    def step_fn(batch):
        with runtime.autocast:
            return reward_model_step(rm, batch)

    summary = train_loop(run, params, make_batch_fn(data, batch_config, runtime), step_fn,
                         {"method": "reward-model", "lora": asdict(lora), "batch": asdict(batch_config)},
                         log=runtime.log, label="reward-model", show=REWARD_MODEL_SHOW)
    mean, std = fit_normalization(rm, data.train, batch_config.max_length, batch_config.pad_id)
    accuracy = (heldout_accuracy(rm, data.heldout, batch_config.max_length, batch_config.pad_id) if data.heldout
                else None)
    runtime.log(f"[reward-model] held-out pair accuracy {accuracy if accuracy is None else f'{accuracy:.3f}'} on "
                f"{len(data.heldout)} pairs; reward normalized with mean {mean:+.3f}, std {std:.3f}")
    return rm, {"heldout_accuracy": accuracy, "normalization": {"mean": mean, "std": std}, "train": summary}


class RewardModelScorer:
    """The reward interface of rollouts, evaluation and best-of-N: `score(texts)` -> (N,) float32 tensor on the
    CPU, here the reward model's normalized reward of each text (prompt + completion, as those callers pass it)."""

    def __init__(self, rm: RewardModel, tokenizer, max_length: int, batch_size: int = 64,
                 autocast: ContextManager | None = None):
        if max_length > rm.body.config.block_size:
            raise ValueError(f"RewardModelScorer: max_length {max_length} exceeds the body's context of "
                             f"{rm.body.config.block_size} tokens")
        self.rm, self.tok, self.max_length, self.batch_size = rm, tokenizer, max_length, batch_size
        self.autocast = autocast

    def score(self, texts: Sequence[str]) -> Tensor:
        return self.score_ids(self.tok.encode_batch(list(texts)))

    @torch.no_grad()
    def score_ids(self, rows: Sequence[list[int]]) -> Tensor:
        """Normalized rewards of token-id rows (prompt + completion), each cut to its first max_length tokens (as
        collation cuts completions)."""
        empty = [i for i, r in enumerate(rows) if not r]
        if empty:
            raise ValueError(f"RewardModelScorer: row {empty[0]} has no tokens; a reward needs a prompt")
        device = self.rm.head.weight.device
        out = []
        with eval_mode(self.rm), self.autocast or nullcontext():
            for i in range(0, len(rows), self.batch_size):
                ids, mask = self.tok.pad([list(r) for r in rows[i:i + self.batch_size]], padding_side="right",
                                         max_length=self.max_length)  # (B, T)
                out.append(self.rm.normalized(ids.to(device), mask.to(device), right_padded=True).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def save_reward_model(rm: RewardModel, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """One safetensors file (written atomically): head, shift, scale and "body.<lora key>" tensors; metadata: the
    format, the LoRA settings (JSON) and the caller's entries (e.g. a fingerprint, the held-out accuracy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"head.weight": rm.head.weight, "shift": rm.shift, "scale": rm.scale,
               **{f"body.{k}": v for k, v in lora_state_dict(rm.body).items()}}
    lora = lora_config_of(rm.body)
    save_file(tensors, path, metadata={**(metadata or {}), "format": FORMAT,
                                       "lora": json.dumps({**asdict(lora), "targets": list(lora.targets)})})
    return path


def load_reward_model(body: GPT, path: str | Path) -> RewardModel:
    """A RewardModel on `body` (a copy of the reference the file was trained on; it gets the saved LoRA adapter)."""
    path = Path(path)
    try:
        meta, tensors = load_metadata(path), load_file(path)
    except (SafetensorsError, OSError) as e:
        raise RewardModelFileError(f"{path}: not a readable reward model ({e})") from None
    if meta.get("format") != FORMAT:
        raise RewardModelFileError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r} (a file "
                                   "written by save_reward_model)")
    try:
        raw = json.loads(meta["lora"])
        lora = LoRAConfig(raw["rank"], raw["alpha"], raw["dropout"], tuple(raw["targets"]))
    except (KeyError, TypeError, ValueError) as e:
        raise RewardModelFileError(f"{path}: metadata 'lora' is not valid LoRA settings ({e})") from None
    rm = RewardModel(apply_lora(body, lora))
    expected = {k: p for k, p in rm.state_dict().items() if k in {"head.weight", "shift", "scale"}}
    expected.update({f"body.{k}": v for k, v in lora_state_dict(rm.body).items()})
    if set(tensors) != set(expected):
        raise RewardModelFileError(f"{path} does not fit the body: missing {sorted(set(expected) - set(tensors))[:4]}, "
                                   f"unexpected {sorted(set(tensors) - set(expected))[:4]}")
    bad = [k for k, t in tensors.items() if t.shape != expected[k].shape or not t.is_floating_point()]
    if bad:
        raise RewardModelFileError(f"{path}: tensor {bad[0]!r} is {tensors[bad[0]].dtype} of shape "
                                   f"{tuple(tensors[bad[0]].shape)}, expected shape {tuple(expected[bad[0]].shape)}")
    state = rm.state_dict()  # views of the parameters and buffers: copying into them loads
    with torch.no_grad():
        for k, t in tensors.items():
            state[k].copy_(t)
    return rm


def cached_reward_model(path: Path, fp: str, reference: GPT, build: Callable[[], tuple[RewardModel, dict]],
                        log: Log = quiet) -> tuple[RewardModel, dict]:
    """The reward model stage: reuse `path` when its metadata fingerprint is `fp` (which covers everything the model
    depends on), else build() and save it. Call it on every rank (training all-reduces). Returns (model, info) as
    stored in the file's metadata, so a reused model reports exactly what the run that trained it reported.
    """
    if path.is_file():
        try:
            meta = load_metadata(path)
            if meta.get("fingerprint") == fp:
                rm = load_reward_model(copy.deepcopy(reference), path)
                log(f"[reward-model] reusing {path}")
                return rm, json.loads(meta.get("info", "{}"))
            log(f"[reward-model] {path} was trained on other inputs; training it again")
        except (ValueError, OSError) as e:  # a damaged cache is rebuilt, not trusted
            log(f"[reward-model] {path} is unreadable ({e}); training it again")
    rm, info = build()  # under torchrun every rank trains (the loop averages gradients); rank 0 writes the file
    info = {**{k: info[k] for k in ("heldout_accuracy", "normalization") if k in info},
            "train": {k: v for k, v in info.get("train", {}).items()
                      if isinstance(v, (int, float)) and math.isfinite(v)}}
    if is_main():
        save_reward_model(rm, path, {"fingerprint": fp, "info": json.dumps(info, allow_nan=False)})
    barrier()
    return rm, info
