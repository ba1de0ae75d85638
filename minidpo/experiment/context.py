"""
The typed context of one run of train.py: `RunConfigs`, every component's own config built once from the flags
(experiment/options.py); the data the cached stages produce (`Reviews`, `PromptSets`); and `RunContext`, what every
method shares while it trains and is evaluated (experiment/compare.py), with the stages built lazily on first need
(the pairs, the reward model; experiment/stages.py).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from minidpo.dataset.batching import PairData
from minidpo.dataset.imdb import Review
from minidpo.dataset.pairs import PairsConfig
from minidpo.dataset.prompts import Prompt, PromptConfig
from minidpo.methods.baselines import UnlikelihoodConfig
from minidpo.methods.dpo import DPOConfig
from minidpo.methods.evaluate import EvalConfig
from minidpo.methods.offline_train import BatchConfig
from minidpo.methods.online_dpo import OnlineDPOConfig
from minidpo.methods.orpo import ORPOConfig
from minidpo.methods.reward_model import RewardModelScorer
from minidpo.methods.rloo import RLOOConfig
from minidpo.methods.sft import SFTConfig
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.model.lora import LoRAConfig
from minidpo.model.tokenizer import Tokenizer
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import LoopConfig


@dataclass(frozen=True)
class RunConfigs:
    """Every component's config for one run, each checked when built (a bad value fails before any stage runs)."""
    compare: tuple[str, ...]                  # the methods this run trains and evaluates, in order
    prompts: PromptConfig
    pairs: PairsConfig
    dpo: tuple[DPOConfig, ...]                # one per beta (DPO and online DPO)
    lora: LoRAConfig
    batch: BatchConfig                        # DPO's batches, also the baselines' and the reward model's
    loop: LoopConfig                          # DPO's loop, also online DPO's and the baselines'
    sft_loop: LoopConfig | None               # None: no SFT
    sft: SFTConfig
    random_model: GPTConfig | None            # the shape of --model random
    online_dpo: OnlineDPOConfig
    rloo: tuple[RLOOConfig, ...]              # one per kl_coef (RLOO and RLHF)
    rloo_loop: LoopConfig
    best_of_n: tuple[int, ...]
    unlikelihood: tuple[UnlikelihoodConfig, ...]  # one per alpha
    orpo: tuple[ORPOConfig, ...]              # one per lambda
    rm_loop: LoopConfig                       # the learned reward model's (RLHF)
    seeds: tuple[int, ...]                    # --seeds: the whole run once per seed
    eval: EvalConfig
    eval_every: int                           # a frontier point every N steps (0: only at the end)
    max_length: int                           # prompt + completion tokens of a training sequence
    precompute_ref: bool
    compile: bool
    export_merged: str | None
    seed: int


@dataclass
class Reviews:
    source: Path
    train: list[Review]
    test: list[Review]


@dataclass
class PromptSets:
    train: list[Prompt]
    heldout: list[Prompt]
    eval: list[Prompt]


@dataclass
class RunContext:
    """Everything the methods share: the reference model, tokenizer, reward, prompts, configs, where to write and
    the runtime; and what is built once on first need, then reused by every method and setting."""
    model: GPT
    tok: Tokenizer
    scorer: object
    reviews: Reviews
    prompts: PromptSets
    configs: RunConfigs
    base: str                                  # what run.json records as the policy's base weights
    out: Path
    runtime: Runtime
    settings: dict = field(default_factory=dict)  # the run's options that change results (train.py's config.json)
    pairs: PairData | None = None
    reference_cache: dict[int, torch.Tensor] | None = None  # --precompute-ref
    reference_samples: list | None = None      # the reference's evaluation samples, drawn once
    reward_model: RewardModelScorer | None = None  # RLHF's learned reward, trained once
    reward_model_info: dict | None = None      # its held-out accuracy, normalization and training
