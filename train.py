"""
minidpo end to end: the DPO paper's IMDb experiment (Rafailov et al. 2023, sec. 6.1), and its Figure 2 comparison.

    python train.py                          # GPT-2 124M + full IMDB when available, else the bundled model (tiny)
    python train.py --preset tiny            # bundled small model + shipped IMDB sample, minutes on a CPU
    python train.py --preset tiny --method dpo --out-dir out/tiny-dpo     # offline DPO, tiny's method (cDPO 0.1)
    python train.py --preset tiny --method rloo --out-dir out/tiny-rloo   # the policy-gradient (RL) baseline instead
    python train.py --preset tiny --method online-dpo --out-dir out/tiny-online   # DPO on the policy's own samples
    python train.py --preset tiny --compare dpo,online-dpo,rlhf,rloo,best-of-n --out-dir out/tiny-compare  # -> frontier
    python train.py --beta-sweep 0.05,0.1,0.5,1 --out-dir out/dpo-sweep   # one DPO run per beta over the same pairs
    python train.py --resume out/tiny        # continue a killed run from its last checkpoint
    torchrun --nproc_per_node 2 train.py --preset tiny --out-dir out/tiny-ddp   # data parallel (gloo / nccl)

The story: 1. the model (official GPT-2, a path, the bundled model, or random init); 2. optional SFT on review text,
folded into the weights, so the SFT model is the reference; 3. a sentiment classifier (the reward); 4. preference
pairs: the reference samples completions of 2-8 token review prefixes and the classifier ranks them; 5. each method
trains a fresh LoRA adapter (best-of-N trains nothing); 6. evaluation on held-out test prompts: reward and
KL(policy || reference) of plain samples; 7. the report: summary.json and the reward-KL frontier. Every stage is
cached, and every run is checked against its folder's settings.
"""

import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from minidpo import config
from minidpo.experiment.compare import check_checkpoints, finish_run, method_runs, run_best_of_n, start_run
from minidpo.experiment.context import RunContext
from minidpo.experiment.report import export_merged, result_lines, sample_hint, seeds_summary, summarize
from minidpo.experiment.resolve import (
    autocast,
    check_model_name,
    check_writable,
    choose_dtype,
    imdb_source,
    pick_device,
    slow_dtype_warning,
)
from minidpo.experiment.stages import (
    check_model_fits,
    ensure_pairs,
    fit_classifier,
    load_model_stage,
    load_reviews,
    make_prompt_sets,
    sft_stage,
)
from minidpo.experiment.train_config import (
    PRESETS,
    TrainConfig,
    keep_recorded,
    load_config,
    resumes_one_seed,
    run_settings,
    with_tiny_defaults,
)
from minidpo.fileio import atomic_write_json
from minidpo.formats.download import cache_dir
from minidpo.model.tokenizer import Tokenizer
from minidpo.registry import STYLES
from minidpo.training.distributed import is_main, setup_distributed, teardown
from minidpo.training.frontier import write_frontier
from minidpo.training.run_folder import run_folder
from minidpo.training.runs import NOT_SETTINGS, RESUME_SAFE, RunConflict, describe, differing, read_settings
from minidpo.training.runtime import Runtime


def make_runtime(cfg: TrainConfig, rank: int, world: int, device_override: str | None) -> tuple[Runtime, str]:
    """This process's Runtime, and its precision in words for the run's first line."""
    device = pick_device(device_override or cfg.device)
    dtype, why = choose_dtype(device, cfg.dtype)
    say = (lambda msg: print(msg, flush=True)) if is_main() else (lambda msg: None)
    if is_main() and (warning := slow_dtype_warning(device, dtype)):
        print(warning, file=sys.stderr, flush=True)
    return Runtime(device, autocast(device, dtype), rank, world, say), f"{'bf16 autocast' if dtype else 'fp32'} ({why})"


def main(argv: list[str]) -> None:
    """The story of the docstring (`run`), the same on every rank; --seeds repeats it per seed (`run_seeds`)."""
    cfg, given = load_config(argv)
    check_model_name(cfg.model)  # every path is checked before any work or any write
    rank, world, device_override = setup_distributed()
    try:
        runtime, precision = make_runtime(cfg, rank, world, device_override)
        top = resumes_one_seed(cfg)
        if top is not None:
            runtime.log(f"[seeds] {cfg.resume} is seed {cfg.seed} of the --seeds {cfg.seeds} run in {top}: resuming "
                        f"that seed alone (--resume {top} resumes every seed and writes their means)")
        if cfg.configs.seeds and top is None:
            run_seeds(cfg, given, runtime, precision)
        else:
            run(cfg, given, runtime, precision)
    finally:
        teardown()


def run(cfg: TrainConfig, given: set[str], runtime: Runtime, precision: str) -> None:
    """One whole run (every method and setting of --compare) with one seed, into cfg.out_dir."""
    t_start = time.perf_counter()
    data_src, data_note = imdb_source(cfg.data)
    prompt_src = imdb_source(cfg.prompt_data, "prompt_data")[0] if cfg.prompt_data else data_src
    # 1. the model (the bundled model brings the tiny preset's settings unless some were given)
    model, model_desc, notes = load_model_stage(cfg.model, runtime.device, cfg.configs.random_model, cfg.seed)
    if notes and cfg.preset is None and cfg.resume is None:
        cfg = with_tiny_defaults(cfg, given)
    cfg = keep_recorded(cfg, runtime.device)
    for line in notes:
        runtime.log(line)
    configs, out, tok = cfg.configs, Path(cfg.out_dir), Tokenizer()  # tok: read and sha256-checked once
    check_model_fits(model, cfg.prompt_max_tokens + cfg.max_new_tokens, cfg.max_length, tok.vocab_size)
    with enter_run_folder(cfg, out) as folder:
        if folder.finished:
            runtime.log(f"{out} already holds this run, finished; its outputs stay as they are (--overwrite to run it "
                        f"again). {sample_hint(out).capitalize()}")
            return
        if folder.repairing:  # every sub-run resumes at its last step: nothing is trained again
            runtime.log(f"{out} holds this run, finished, without {', '.join(missing_outputs(cfg, out))}: making them")
        torch.manual_seed(cfg.seed)
        world = f" x{runtime.world}" if runtime.world > 1 else ""
        runtime.log(f"minidpo: device {runtime.device}{world}, {precision}, model {model_desc}, out_dir {out}")
        if data_note:
            runtime.log(data_note)
        t0 = time.perf_counter()
        reviews = load_reviews(data_src)
        runtime.log(f"[data] {data_src}: {len(reviews.train):,} train / {len(reviews.test):,} test reviews "
                    f"({time.perf_counter() - t0:.1f} s)")
        # 2. optional SFT, folded into the weights: the reference
        model, base = sft_stage(model, model_desc, reviews, tok, configs, out, runtime)
        # 3. the reward: a sentiment classifier
        scorer = fit_classifier(reviews, runtime.log)
        # 4. prompts (the pairs are built by the first method that needs them, then cached)
        train_reviews = reviews.train if prompt_src == data_src else load_reviews(prompt_src).train  # --prompt-data
        prompts = make_prompt_sets(reviews, tok, configs.prompts, train_reviews)
        ctx = RunContext(model, tok, scorer, reviews, prompts, configs, base, out, runtime, settings=run_settings(cfg))
        # 5-6. each method and setting trains a fresh adapter (or none, best-of-N) and is evaluated the same way
        runs = []
        for method, setting, run_dir in method_runs(configs, out):
            if method.reads_pairs:  # built by the first method that needs them, then cached
                ensure_pairs(ctx)
            if method.train is None:
                runs.append(run_best_of_n(ctx, method, setting, run_dir))
                continue
            train_run = start_run(ctx, method, setting, run_dir)  # a fresh adapter; its checkpoint, its evaluations
            summary = method.train(ctx, setting, train_run)       # e.g. methods/dpo_train.py's train_dpo
            runs.append(finish_run(ctx, method, setting, run_dir, summary))
        # 7. the report: summary.json, the frontier, the merged model (rank 0)
        if is_main():
            report(ctx, cfg, runs, model_desc, data_src, time.perf_counter() - t_start)
        # leaving the folder marks the run finished, last: a kill before leaves a run that --resume completes


def enter_run_folder(cfg: TrainConfig, out: Path):
    """run_folder (every rank alike) for this run: the paths are checked writable first (rank 0); a sub-run's
    checkpoint made with other settings is refused before anything is written; config.json is recorded."""
    if is_main():
        check_writable(out, "--out-dir")
        check_writable(cache_dir(), "the cache dir ($MINIDPO_CACHE)")
    settings = run_settings(cfg)

    def record(o: Path) -> None:  # rank 0, after the folder check: refuse a sub-run made otherwise first
        check_checkpoints(cfg.configs, settings, o)
        config.save_config(cfg, o / "config.json")
    return run_folder(out, settings, resume=cfg.resume is not None, overwrite=cfg.overwrite, record=record,
                      missing=lambda o: missing_outputs(cfg, o))


def wants_frontier(cfg: TrainConfig) -> bool:
    """A frontier.csv for several runs, several evaluation steps, or each seed of --seeds (what the top gathers)."""
    return len(method_runs(cfg.configs, Path(cfg.out_dir))) > 1 or bool(cfg.eval_every) or bool(cfg.seeds)


def missing_outputs(cfg: TrainConfig, out: Path) -> list[str]:
    """What a finished run in `out` lacks of what this command writes: frontier.csv, or the --export-merged model."""
    files = [out / "frontier.csv"] if wants_frontier(cfg) else []
    files += [Path(cfg.export_merged) / "model.safetensors"] if cfg.export_merged else []
    return [str(f) for f in files if not f.is_file()]


def report(ctx: RunContext, cfg: TrainConfig, runs: list, model_desc: str, data_src: Path, seconds: float) -> None:
    """summary.json, frontier.csv (with this run's seed), the --export-merged model and the last lines."""
    summary = summarize(runs, model_desc, ctx.base, data_src, ctx.runtime.device, ctx.runtime.world, seconds,
                        ctx.reward_model_info)
    atomic_write_json(ctx.out / "summary.json", summary)
    if wants_frontier(cfg):
        write_frontier(ctx.out, [{**p, "seed": cfg.seed} for r in runs for p in r.frontier], ctx.runtime.log, STYLES)
    if cfg.export_merged:
        export_merged(ctx.model, Path(cfg.export_merged), ctx.runtime.log)
    ctx.runtime.log(result_lines(runs[-1], summary, ctx.out))


def run_seeds(cfg: TrainConfig, given: set[str], runtime: Runtime, precision: str) -> None:
    """--seeds: the whole run once per seed into out_dir/seed_<s>/, then frontier.csv (a `seed` column),
    frontier_mean.csv, frontier.png and a summary.json with the mean and standard error per method and setting."""
    cfg = keep_recorded(cfg, runtime.device, frozenset({"seed"}))  # each seed's folder records its own seed
    out, seeds = Path(cfg.out_dir), cfg.configs.seeds
    if is_main():
        check_writable(out, "--out-dir")
    if cfg.model == "auto" and cfg.preset is None and cfg.resume is None:
        # the bundled model's tiny defaults, decided once: the top config.json and every seed's record the same
        _, _, notes = load_model_stage(cfg.model, runtime.device, cfg.configs.random_model, cfg.seed)
        if notes:
            cfg = with_tiny_defaults(cfg, given)

    def record(o: Path) -> None:
        check_seed_folders(cfg, o)
        config.save_config(cfg, o / "config.json")
    with run_folder(out, run_settings(cfg), resume=cfg.resume is not None, overwrite=cfg.overwrite, record=record,
                    missing=lambda o: missing_seed_outputs(cfg, o)) as folder:
        if folder.finished:
            runtime.log(f"{out} already holds this run over seeds {cfg.seeds}, finished; its outputs stay as they are "
                        "(--overwrite to run it again)")
            return
        if folder.repairing:  # every seed is finished: nothing is trained again
            runtime.log(f"{out} holds this run over seeds {cfg.seeds}, finished, without "
                        f"{', '.join(missing_seed_outputs(cfg, out))}: making them")
        settled = set(config.field_types(TrainConfig))  # every option is decided above, for every seed alike
        for s in seeds:
            sub_out = out / f"seed_{s}"
            resume = str(sub_out) if cfg.resume and (sub_out / "config.json").is_file() else None
            runtime.log(f"[seeds] seed {s} of {cfg.seeds} -> {sub_out}")
            run(replace(cfg, seed=s, out_dir=str(sub_out), resume=resume, overwrite=False), settled, runtime, precision)
        if is_main():
            points, per_seed = gather_seeds(out, seeds)
            write_frontier(out, points, runtime.log, STYLES)
            atomic_write_json(out / "summary.json", seeds_summary(per_seed, points))
            means = out / "frontier_mean.csv"  # write_frontier makes it only from points measured over several seeds
            runtime.log(f"wrote {out / 'summary.json'} and {means} (mean and standard error over seeds {cfg.seeds})"
                        if len(seeds) > 1 else f"wrote {out / 'summary.json'} (one seed, {cfg.seeds}: no mean or "
                        f"standard error to take, so no {means.name})")


def check_seed_folders(cfg: TrainConfig, out: Path) -> None:
    """Before any work: each seed folder already in `out` must hold that seed made with this run's settings, else
    one RunConflict whose ways on are the whole --seeds run's (a seed's own --resume would not mend the mix)."""
    safe = RESUME_SAFE if cfg.resume is not None else frozenset()
    for s in cfg.configs.seeds:
        sub = out / f"seed_{s}"
        stored, settings = read_settings(sub), run_settings(replace(cfg, seed=s))
        diff = differing(stored, settings, NOT_SETTINGS | safe) if stored is not None else []
        if diff:
            raise RunConflict(f"{sub} holds seed {s} made with {describe(diff, stored)} (now "
                              f"{describe(diff, settings)}); choose a new --out-dir, or pass --overwrite to run every "
                              "seed again")


def missing_seed_outputs(cfg: TrainConfig, out: Path) -> list[str]:
    """What a finished --seeds run in `out` lacks: a seed's summary.json, or the top frontier.csv and
    frontier_mean.csv that gather the seeds."""
    files = [out / f"seed_{s}" / "summary.json" for s in cfg.configs.seeds] + [out / "frontier.csv"]
    files += [out / "frontier_mean.csv"] if len(cfg.configs.seeds) > 1 else []
    return [str(f) for f in files if not f.is_file()]


def gather_seeds(out: Path, seeds: tuple[int, ...]) -> tuple[list[dict], dict[int, dict]]:
    """(every seed's frontier points, each tagged with its seed; {seed: its summary.json}). A summary over seeds
    found in a seed's folder (a --seeds run started inside it) is refused: the means are over each seed once."""
    points, per_seed = [], {}
    for s in seeds:
        sub = out / f"seed_{s}"
        summary = json.loads((sub / "summary.json").read_text())
        if "per_seed" in summary:
            raise RunConflict(f"{sub}/summary.json sums up seeds {summary.get('seeds')}, not seed {s}'s run (a "
                              f"--seeds run was started inside its folder): remove {sub}/summary.json and the seed_* "
                              f"folders in {sub}, then --resume {out}")
        with open(sub / "frontier.csv", newline="") as f:
            points += [{**row, "seed": s} for row in csv.DictReader(f) if row.get("seed") in (None, "", str(s))]
        per_seed[s] = summary
    return points, per_seed


if __name__ == "__main__":
    sys.exit(config.run_program(main, sys.argv[1:], __doc__, TrainConfig, PRESETS))
