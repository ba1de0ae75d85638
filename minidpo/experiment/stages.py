"""
The cached stages between the model and training in train.py: the model, optional SFT, the IMDB data, the prompts,
the reward classifier, the preference pairs and (optionally) the reference log-probs, and RLHF's learned reward
model (Rafailov et al. 2023, sec. 6.1: prompts are 2-8 token prefixes of IMDb reviews, the reference samples
completions, a sentiment classifier ranks them into preference pairs).

Each stage takes its own small config and returns a typed result. Each cached stage is keyed by a fingerprint of
everything it depends on, so a resumed run or a sweep never rebuilds what it already has. Under torchrun, rank 0
builds a stage first and the other ranks then read its cache (`rank_zero_first`).
"""

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from minidpo.dataset.batching import PairData, collate_unique, fit_pairs, prompt_groups, split_pairs, stream_indices
from minidpo.dataset.imdb import load_imdb
from minidpo.dataset.pairs import build_pairs
from minidpo.dataset.pairs_cache import (
    cached_pairs,
    fingerprint,
    module_fingerprint,
    pairs_fingerprint,
    reviews_fingerprint,
)
from minidpo.dataset.prompts import PromptConfig, make_prompts
from minidpo.dataset.reward import SentimentClassifier
from minidpo.experiment.context import PromptSets, Reviews, RunConfigs, RunContext
from minidpo.experiment.resolve import load_model
from minidpo.formats.download import cache_dir
from minidpo.formats.safetensors import load_file, load_metadata, save_file
from minidpo.methods.dpo import reference_forward
from minidpo.methods.reward_model import RewardModelScorer, cached_reward_model, train_reward_model
from minidpo.methods.sft import pack_texts, run_sft
from minidpo.model.cast_cache import cache_weight_casts
from minidpo.model.export import save_hf
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.model.lora import apply_lora, remove_lora
from minidpo.model.tokenizer import Tokenizer
from minidpo.model.weights import load_gpt2
from minidpo.progress import Log, quiet
from minidpo.training.curves import plot_curves
from minidpo.training.distributed import is_main, rank_zero_first
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import TrainRun


def load_model_stage(name: str, device: torch.device, random_config: GPTConfig | None,
                     seed: int) -> tuple[GPT, str, list[str]]:
    """(frozen model, its description, notes for the user): a GPT-2 name or path, the bundled model, or random init
    (`random_config`, seeded) for experiments without weights; its frozen weights' bf16 casts are cached
    (model/cast_cache.py)."""
    if name == "random":
        torch.manual_seed(seed)
        c = random_config
        model, desc, notes = GPT(c).to(device), f"random({c.n_layer}x{c.n_embd})", []
    else:
        model, desc, notes = load_model(name, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return cache_weight_casts(model.eval()), desc, notes


def check_model_fits(model: GPT, need_context: int, max_length: int, vocab_size: int) -> None:
    """The model must cover the tokenizer's vocabulary and the longest sequence the run will build."""
    cfg = model.config
    if cfg.vocab_size < vocab_size:
        raise ValueError(f"the model's vocabulary has {cfg.vocab_size} tokens but the GPT-2 tokenizer emits ids up to "
                         f"{vocab_size - 1}: this model was not trained with the GPT-2 tokenizer")
    if max(need_context, max_length) > cfg.block_size:
        raise ValueError(f"--prompt-max-tokens + --max-new-tokens ({need_context}) and --max-length ({max_length}) "
                         f"must fit the model's context of {cfg.block_size} tokens")


def load_reviews(source: Path) -> Reviews:
    """IMDB's labelled train and test splits (pos and neg) from a tarball or directory."""
    return Reviews(source, load_imdb(source, "train", ("pos", "neg")), load_imdb(source, "test", ("pos", "neg")))


def make_prompt_sets(reviews: Reviews, tok: Tokenizer, cfg: PromptConfig, train_reviews: list) -> PromptSets:
    """Train prompts from `train_reviews` (reviews.train, or --prompt-data's); held-out and evaluation prompts from
    reviews.test (one per review), none with the token ids of a training prompt."""
    try:
        train = make_prompts(train_reviews, tok, cfg.train, cfg.min_tokens, cfg.max_tokens, seed=cfg.seed)
        test = make_prompts(reviews.test, tok, cfg.heldout + cfg.eval, cfg.min_tokens, cfg.max_tokens,
                            seed=cfg.seed + 1, exclude=train)
    except ValueError as e:  # one prompt per review: the shipped sample has 600 train and 300 test reviews
        raise ValueError(f"{e}; lower --num-prompts (train) or --heldout-prompts + --eval-prompts (test), or use "
                         "the full IMDB set (--data)") from None
    return PromptSets(train, test[:cfg.heldout], test[cfg.heldout:])


def fit_classifier(reviews: Reviews, log: Log = quiet) -> SentimentClassifier:
    """The reward: a sentiment classifier trained on the train labels, cached under <cache>/reward/."""
    clf = SentimentClassifier()
    key = fingerprint({"reviews": reviews_fingerprint(reviews.train), "config": clf.config()})[:16]
    path = cache_dir() / "reward" / f"sentiment-{key}.safetensors"

    def build() -> SentimentClassifier:
        if path.is_file():
            try:
                loaded = SentimentClassifier.load(path)
                log(f"[reward] reusing {path}")
                return loaded
            except (ValueError, OSError) as e:  # a corrupt cache is rebuilt, not trusted
                log(f"[reward] {path} is unreadable ({e}); training it again")
        log(f"[reward] training the sentiment classifier on {len(reviews.train):,} labelled reviews")
        fitted = clf.fit([r.text for r in reviews.train], [r.label for r in reviews.train])
        if is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            fitted.save(path)
        acc = fitted.accuracy([r.text for r in reviews.test], [r.label for r in reviews.test])
        log(f"[reward] trained in {fitted.fit_seconds:.1f} s; test accuracy {acc:.3f}; saved {path}")
        return fitted
    with rank_zero_first():
        return build()


def ensure_pairs(ctx: RunContext) -> PairData:
    """The run's training pairs (train prompts) and held-out pairs (test prompts), built by the first method that
    needs them, cached in out/pairs.jsonl; with --precompute-ref also the reference's log-probs of them."""
    if ctx.pairs is not None:
        return ctx.pairs
    configs, log = ctx.configs, ctx.runtime.log
    every = ctx.prompts.train + ctx.prompts.heldout
    reviews = ctx.reviews.train + ctx.reviews.test
    scorer_id = hashlib.sha256(ctx.scorer.weight.numpy().tobytes()).hexdigest()
    fp = pairs_fingerprint(configs.pairs, every, model_id=module_fingerprint(ctx.model), scorer_id=scorer_id,
                           data_id=reviews_fingerprint(reviews) if configs.pairs.mode == "labels" else "")

    build = partial(build_pairs, configs.pairs, every, ctx.tok, model=ctx.model, scorer=ctx.scorer, reviews=reviews,
                    log=log if is_main() else quiet)
    with rank_zero_first(), ctx.runtime.autocast:
        pairs = cached_pairs(ctx.out / "pairs.jsonl", fp, build, log=log if is_main() else quiet)
    train, heldout = split_pairs(pairs)
    train, _ = fit_pairs(train, configs.max_length)
    heldout, _ = fit_pairs(heldout, configs.max_length)
    if not train:
        raise ValueError("no training pairs (every prompt's completions scored the same?); raise --num-prompts or "
                         "--completions-per-prompt")
    log(f"[pairs] {len(train):,} training pairs from {len(ctx.prompts.train)} prompts, {len(heldout)} held-out "
        f"pairs, {len(ctx.prompts.eval)} evaluation prompts")
    ctx.pairs = PairData(train, heldout, prompt_groups(train), fp)
    if configs.precompute_ref:
        batch = configs.batch
        draws = configs.loop.steps * batch.draws_per_step(ctx.runtime.world)
        ctx.reference_cache = precompute_reference(ctx.model, ctx.pairs, ReferenceCacheConfig(
            draws, batch.max_length, batch.pad_id, batch.logprobs, batch.seed), ctx.out, ctx.runtime)
    return ctx.pairs


def ensure_reward_model(ctx: RunContext) -> RewardModelScorer:
    """RLHF's reward: a reward model fitted to the pairs (Bradley-Terry), trained once per run folder before any
    adapter is on the reference, cached in out/reward_model.safetensors by a fingerprint of everything it depends
    on (reference weights, pairs, LoRA, batches, loop). Every rank trains (the loop all-reduces); rank 0 saves."""
    if ctx.reward_model is not None:
        return ctx.reward_model
    data, configs = ensure_pairs(ctx), ctx.configs
    fp = fingerprint({"model": module_fingerprint(ctx.model), "pairs": data.fingerprint, "lora": asdict(configs.lora),
                      "batch": asdict(configs.batch), "loop": {**asdict(configs.rm_loop), "show": None}})

    def build():
        rm, info = train_reward_model(ctx.model, data, configs.lora, configs.batch,
                                      TrainRun(configs.rm_loop, ctx.out / "reward_model"), ctx.runtime)
        if is_main():
            plot_curves(ctx.out / "reward_model", ctx.runtime.log)
        return rm, info

    rm, info = cached_reward_model(ctx.out / "reward_model.safetensors", fp, ctx.model, build, ctx.runtime.log)
    for p in rm.parameters():
        p.requires_grad_(False)
    # the training record comes from the file, so a resume that reuses it reports what the fresh run did; lr is
    # the configured peak (--rm-lr), not where the schedule ended
    ctx.reward_model_info = {**info, "heldout_pairs": len(data.heldout),
                             "train": {**info.get("train", {}), "steps": configs.rm_loop.steps,
                                       "lr": configs.rm_loop.lr}}
    ctx.reward_model = RewardModelScorer(rm, ctx.tok, configs.max_length, autocast=ctx.runtime.autocast)
    return ctx.reward_model


@dataclass(frozen=True)
class ReferenceCacheConfig:
    groups_needed: int       # group draws the run will make: steps * grad_accum * world * batch_prompts
    max_length: int
    pad_id: int
    logprobs: str = "fused"
    seed: int = 0


@torch.no_grad()
def precompute_reference(model: torch.nn.Module, data: PairData, cfg: ReferenceCacheConfig, out: Path,
                         runtime: Runtime) -> dict[int, Tensor]:
    """Reference sequence log-probs of every prompt group the run will draw (not the whole dataset), computed once
    before the adapter exists (so exactly the reference) and cached in out/reference_logps.safetensors.

    Returns {group index: (N_g,) log-probs in collate_unique's sequence order} (fields "logps" and "logps_mean"
    stacked as (2, N_g)). Saves DPO the reference forward of every step.
    """
    used = sorted(set(stream_indices(len(data.groups), 0, cfg.groups_needed, cfg.seed)))
    path = out / "reference_logps.safetensors"
    fp = fingerprint({"model": module_fingerprint(model), "pairs": data.fingerprint, "groups": used,
                      "max_length": cfg.max_length, "logprobs": cfg.logprobs})
    device, log = next(model.parameters()).device, runtime.log

    def build() -> dict[str, Tensor]:
        if path.is_file():
            try:
                if load_metadata(path).get("fingerprint") == fp:
                    log(f"[reference] reusing {path}")
                    return load_file(path)
            except ValueError as e:
                log(f"[reference] {path} is unreadable ({e}); computing it again")
        log(f"[reference] precomputing log-probs of the {len(used):,} prompt groups this run uses "
            f"(of {len(data.groups):,})")
        tensors = {}
        for g in used:
            batch = collate_unique([data.train[i] for i in data.groups[g]], cfg.max_length, pad_id=cfg.pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with runtime.autocast:
                r = reference_forward(model, batch, cfg.logprobs, unique=True)
            tensors[str(g)] = torch.stack([r["logps"].float(), r["logps_mean"].float()]).cpu()
        if is_main():
            save_file(tensors, path, metadata={"fingerprint": fp, "groups": json.dumps(len(used))})
        return tensors
    with rank_zero_first():
        tensors = build()
    return {int(k): v.to(device) for k, v in tensors.items()}



def sft_stage(model: GPT, model_desc: str, reviews: Reviews, tok: Tokenizer, configs: RunConfigs, out: Path,
              runtime: Runtime) -> tuple[GPT, str]:
    """SFT on review text (configs.sft_loop, configs.sft, configs.lora), folded into the weights: (the model that is
    both the reference and every method's start, what run.json records as its base). Without SFT the loaded model
    itself; `random` weights are saved so a sampler can find them again."""
    device, loop, cfg = next(model.parameters()).device, configs.sft_loop, configs.sft
    if loop is None:
        if model_desc.startswith("random(") and is_main():
            save_hf(model, out / "base_model")
            return model, "base_model"
        return model, model_desc
    done = out / "sft_model"
    if (done / "config.json").is_file():
        runtime.log(f"[sft] reusing {done}")
        return cache_weight_casts(load_gpt2(done, device=device).eval()), "sft_model"
    runtime.log(f"[sft] {loop.steps} steps on {len(reviews.train):,} reviews ({'LoRA' if cfg.lora else 'all weights'})")
    if cfg.lora:
        apply_lora(model, configs.lora)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    stream = pack_texts([r.text for r in reviews.train], tok)
    windows = replace(cfg, block_size=min(cfg.block_size, model.config.block_size))
    run_sft(model, stream, windows, TrainRun(loop, out), runtime)
    if cfg.lora:
        remove_lora(model, merge=True)
    for p in model.parameters():
        p.requires_grad_(False)
    if is_main():
        save_hf(model, done)
    return model.eval(), "sft_model"
