"""
The methods on one frontier: DPO (offline, the paper's, and online), RLHF (RLOO on a reward model learned from the
pairs: the paper's PPO), RLOO on the true reward (the paper's PPO-GT), Preferred-FT, Unlikelihood and best-of-N, each
run at each of its settings against the same reference, reward classifier, prompts and evaluation (the DPO paper's
Figure 2, left).

`method_runs` lists (method, setting, folder) for a run or a `--compare`; `run_one` trains one of them with a fresh
LoRA adapter (DPO: `minidpo.methods.dpo_train.run_dpo`; online DPO: `minidpo.methods.online_dpo`; RLOO and RLHF:
`minidpo.methods.rloo`; Preferred-FT and Unlikelihood: `minidpo.methods.baselines`), evaluates it with the shared
evaluator (`evaluate_trained`), writes its run.json and curves.png; the adapter is then dropped so the next run
starts from the same reference weights. The reward model RLHF needs is a cached stage (`ensure_reward_model`),
trained once on the pairs before any adapter is on the reference; evaluation keeps the classifier for every method.
"""

import math
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path

import torch

from minidpo.methods.baselines import train_baseline
from minidpo.methods.best_of_n import best_of_n_sweep
from minidpo.methods.reward_model import RewardModelScorer, cached_reward_model, train_reward_model
from minidpo.dataset.pairs_cache import fingerprint, module_fingerprint
from minidpo.training.curves import plot_curves
from minidpo.training.checkpoint import Checkpointer, check_settings
from minidpo.training.distributed import barrier, is_main
from minidpo.methods.dpo_train import RunResult, run_dpo
from minidpo.methods.evaluate import evaluate, sample_reference, side_by_side
from minidpo.model.export import export_peft, save_hf
from minidpo.fileio import atomic_write_json
from minidpo.stats import mean_and_se
from minidpo.training.frontier import aggregate_points, append_point, read_points
from minidpo.model.lora import apply_lora, remove_lora, save_lora
from minidpo.methods.online_dpo import train_online_dpo
from minidpo.progress import Log
from minidpo.dataset.batching import PairData
from minidpo.experiment.resolve import model_source
from minidpo.methods.rloo import train_rloo
from minidpo.training.runs import to_portable
from minidpo.experiment.stages import (PromptSets, ReferenceCacheConfig, Reviews, build_pair_data,
                            precompute_reference)
from minidpo.model.tokenizer import Tokenizer
from minidpo.training.trainer import format_seconds


@dataclass
class RunContext:
    """Everything the methods share: the reference model, tokenizer, reward, prompts, configs and where to write."""
    model: torch.nn.Module
    tok: Tokenizer
    scorer: object
    reviews: Reviews
    prompts: PromptSets
    stages: dict
    base: str
    out: Path
    device: torch.device
    amp: torch.autocast
    rank: int
    world: int
    log: Log
    pairs: PairData | None = field(default=None)
    reference_cache: dict | None = field(default=None)
    reference_samples: list | None = field(default=None)  # the reference's evaluation samples, drawn once
    settings: dict = field(default_factory=dict)  # the run's options that change results (train.py's config.json)
    reward_model: RewardModelScorer | None = field(default=None)  # RLHF's learned reward, trained once
    reward_model_info: dict | None = field(default=None)  # its held-out accuracy, normalization and training

RL_METHODS = ("rlhf", "rloo")             # RLOO's loop; rlhf on the learned reward, rloo on the true one
OFFLINE_BASELINES = ("preferred-ft", "unlikelihood")  # the paper's baselines, trained on DPO's pairs


def method_runs(stages: dict, out: Path) -> list[tuple[str, object, Path]]:
    """(method, its config for this setting, run folder). One run writes into `out`; several get a folder each."""
    runs = []
    for method in stages["compare"]:
        settings = {"dpo": stages["dpo"], "online-dpo": stages["dpo"], "rlhf": stages["rloo"], "rloo": stages["rloo"],
                    "preferred-ft": [None], "unlikelihood": stages["unlikelihood"],
                    "best-of-n": [stages["best_of_n"]]}[method]
        runs += [(method, s) for s in settings]
    if len(runs) == 1:
        return [(runs[0][0], runs[0][1], out)]
    return [(m, s, out / f"{m}_{setting_name(m, s).replace('=', '_')}") for m, s in runs]


def checkpoint_settings(stages: dict, run_settings: dict, method: str, setting) -> dict:
    """Everything a sub-run's checkpoint records, so that a resume under any other setting that changes results is
    refused (never silently continued): the method, its setting, the loop, LoRA, and every recorded run option."""
    loop = method_loop(stages, method)
    return {"method": method, "setting": asdict(setting) if is_dataclass(setting) else setting,
            "lora": asdict(stages["lora"]), "steps": loop.steps, "lr": loop.lr, "run": run_settings}


def method_loop(stages: dict, method: str):
    """The loop settings a method trains with: RLOO's (rlhf, rloo) or DPO's (every method on or like DPO's)."""
    return stages["rloo_loop" if method in RL_METHODS else "loop"]


def check_checkpoints(stages: dict, run_settings: dict, out: Path) -> None:
    """Before any work: every sub-run checkpoint in `out` must have been made with this run's settings
    (RunConflict, one line, otherwise), so a refusal never comes after other results were rewritten."""
    for method, setting, run_dir in method_runs(stages, out):
        ckpt = Checkpointer(run_dir / "checkpoint", {})
        if method != "best-of-n" and ckpt.exists():
            stored = ckpt.stored_settings()
            if stored is not None:
                check_settings(ckpt.dir, stored, checkpoint_settings(stages, run_settings, method, setting))


def setting_name(method: str, setting) -> str:
    if method in ("dpo", "online-dpo"):
        return f"beta={setting.beta:g}"
    if method in RL_METHODS:
        return f"kl_coef={setting.kl_coef:g}"
    if method == "preferred-ft":
        return "sft"
    if method == "unlikelihood":
        return f"alpha={setting.alpha:g}"
    return "N=" + ",".join(str(n) for n in setting)


def evaluate_now(ctx: RunContext, step: int, with_reference: bool, beta: float | None) -> dict:
    ctx.log(f"[eval] step {step}: sampling {len(ctx.prompts.eval)} held-out prompts from the policy"
            + (" and the reference" if with_reference else "") + ", exact KL ...")
    with ctx.amp:
        if with_reference and ctx.reference_samples is None:  # the same for every run of a sweep: sampled once
            ctx.reference_samples = sample_reference(ctx.model, ctx.tok, ctx.prompts.eval, ctx.stages["eval"])
        heldout = ctx.pairs.heldout if ctx.pairs and beta else None
        r = evaluate(ctx.model, ctx.tok, ctx.scorer, ctx.prompts.eval, ctx.stages["eval"], heldout, beta,
                     reference=ctx.reference_samples if with_reference else False)
    ctx.log(f"[eval] step {step}: policy reward {r['policy']['reward']:.3f}, KL(policy||reference) exact "
            f"{r['policy']['kl_exact']:.3f} (sampled estimate {r['policy']['kl_sampled']:.3f})"
            + (f", held-out reward accuracy {r['reward_accuracy']:.3f}" if r.get("reward_accuracy") is not None
               else ""))
    return r


def ensure_pairs(ctx: RunContext) -> PairData:
    if ctx.pairs is None:
        ctx.pairs = build_pair_data(ctx.stages["pairs"], ctx.prompts, ctx.model, ctx.tok, ctx.scorer, ctx.reviews,
                                    ctx.out / "pairs.jsonl", ctx.stages["max_length"], ctx.amp, ctx.log)
        if ctx.stages["precompute_ref"]:
            b, loop = ctx.stages["batch"], ctx.stages["loop"]
            need = loop.steps * b.draws_per_step(ctx.world)
            ctx.reference_cache = precompute_reference(
                ctx.model, ctx.pairs, ReferenceCacheConfig(need, b.max_length, b.pad_id, b.logprobs, b.seed),
                ctx.out, ctx.amp, ctx.log)
    return ctx.pairs


def ensure_reward_model(ctx: RunContext) -> RewardModelScorer:
    """RLHF's reward: a reward model fitted to the pairs (Bradley-Terry), trained once per run folder before any
    adapter is on the reference, cached in out/reward_model.safetensors by a fingerprint of everything it depends
    on (reference weights, pairs, LoRA, batches, loop). Every rank trains (the loop all-reduces); rank 0 saves."""
    if ctx.reward_model is None:
        data = ensure_pairs(ctx)
        st = ctx.stages
        fp = fingerprint({"model": module_fingerprint(ctx.model), "pairs": data.fingerprint,
                          "lora": asdict(st["lora"]), "batch": asdict(st["batch"]),
                          "loop": {**asdict(st["rm_loop"]), "show": None}})
        trained: dict = {}

        def build():
            rm, info = train_reward_model(ctx.model, data, st["lora"], st["batch"], st["rm_loop"],
                                          ctx.out / "reward_model", ctx.device, ctx.amp, ctx.rank, ctx.world, ctx.log)
            trained.update(info["train"])
            if is_main():
                plot_curves(ctx.out / "reward_model", ctx.log)
            return rm, info

        rm, info = cached_reward_model(ctx.out / "reward_model.safetensors", fp, ctx.model, build, ctx.log)
        for p in rm.parameters():
            p.requires_grad_(False)
        rm_loop = st["rm_loop"]
        ctx.reward_model_info = {**info, "heldout_pairs": len(data.heldout),
                                 "train": {"steps": rm_loop.steps, "lr": rm_loop.lr,
                                           **{k: v for k, v in trained.items() if isinstance(v, (int, float))}}}
        ctx.reward_model = RewardModelScorer(rm, ctx.tok, st["max_length"], autocast=ctx.amp)
    return ctx.reward_model


def run_one(ctx: RunContext, method: str, setting, run_dir: Path) -> RunResult:
    """Train and evaluate one method at one setting in run_dir; the model is the reference again afterwards."""
    run_dir.mkdir(parents=True, exist_ok=True)
    name = setting_name(method, setting)
    if method == "best-of-n":
        return run_best_of_n(ctx, setting, run_dir)
    if method == "dpo":
        data = ensure_pairs(ctx)
        result = run_dpo(ctx.model, data, setting, ctx.stages["lora"], ctx.stages["batch"], ctx.stages["loop"],
                         run_dir, lambda step, ref: evaluate_now(ctx, step, ref, setting.beta),
                         ctx.stages["eval_every"], ctx.rank, ctx.world, ctx.amp, ctx.reference_cache,
                         ctx.stages["compile"], log=ctx.log,
                         settings=checkpoint_settings(ctx.stages, ctx.settings, method, setting))
    elif method in OFFLINE_BASELINES:
        result = run_offline_baseline(ctx, method, setting, run_dir)
    else:
        result = run_on_policy(ctx, method, setting, run_dir)
    if is_main():
        plot_curves(run_dir, ctx.log)
        save_lora(ctx.model, run_dir / "adapter")
        export_peft(ctx.model, run_dir / "adapter_peft", base_model_name_or_path=model_source(ctx.base))
        base = model_source(ctx.base)
        if ctx.base in ("sft_model", "base_model"):  # stored relative to the run folder, so the folder can move
            base = to_portable(ctx.out / ctx.base, run_dir, within=ctx.out)
        atomic_write_json(run_dir / "run.json", {"adapter": "adapter", "policy_base": base, "method": method,
                                                 "setting": name})
        atomic_write_json(run_dir / "result.json", asdict(result))
    barrier()
    if run_dir != ctx.out:  # more runs follow (a sweep or --compare); a single run keeps it for --export-merged
        remove_lora(ctx.model, merge=False)  # back to the reference for the next run
        for p in ctx.model.parameters():
            p.requires_grad_(False)
    return result


def periodic_eval(ctx: RunContext, method: str, name: str, run_dir: Path, steps: int, beta: float | None):
    """on_step_end for a training loop: a frontier point every --eval-every steps (the last step is evaluated by
    `evaluate_trained`)."""
    every = ctx.stages["eval_every"]

    def on_step_end(step: int) -> None:
        if every and step % every == 0 and step != steps and is_main():
            point(run_dir, method, name, step, evaluate_now(ctx, step, False, beta))
    return on_step_end


def evaluate_trained(ctx: RunContext, method: str, name: str, run_dir: Path, steps: int, beta: float | None,
                     summary: dict) -> RunResult:
    """The epilogue of every trained method but offline DPO (its own is in dpo_train.run_dpo): evaluate the policy
    and the reference on the held-out prompts, write the reference's point (KL 0) and the policy's last one."""
    if not is_main():
        return RunResult(method, name, {}, {}, {}, [], [])
    r = evaluate_now(ctx, steps, True, beta)
    append_point(run_dir, {"method": method, "setting": name, "step": 0, "reward": r["reference"]["reward"],
                           "kl": 0.0, "kl_sampled": 0.0})
    point(run_dir, method, name, steps, r)
    summary = {**summary, "reward_accuracy": r.get("reward_accuracy")} if beta else summary
    return RunResult(method, name, r["reference"], r["policy"], summary, r["examples"], read_points(run_dir))


def run_on_policy(ctx: RunContext, method: str, cfg, run_dir: Path) -> RunResult:
    """A fresh adapter trained on the policy's own samples, evaluated like DPO: RLOO (`minidpo.methods.rloo`, cfg an
    RLOOConfig) on the true reward (rloo) or on the learned reward model (rlhf), or online DPO
    (`minidpo.methods.online_dpo`, cfg a DPOConfig; the rollout settings are in the stages)."""
    reward = ensure_reward_model(ctx) if method == "rlhf" else ctx.scorer  # before the adapter: the reference's copy
    torch.manual_seed(ctx.stages["seed"])
    apply_lora(ctx.model, ctx.stages["lora"])
    name, loop = setting_name(method, cfg), method_loop(ctx.stages, method)
    beta = cfg.beta if method == "online-dpo" else None
    common = dict(log=ctx.log, autocast=ctx.amp, rank=ctx.rank, world=ctx.world,
                  on_step_end=periodic_eval(ctx, method, name, run_dir, loop.steps, beta),
                  settings=checkpoint_settings(ctx.stages, ctx.settings, method, cfg))
    if method in RL_METHODS:
        summary = train_rloo(ctx.model, ctx.tok, reward, ctx.prompts.train, cfg, replace(loop, label=method),
                             run_dir, ctx.device, **common)
    else:
        summary = train_online_dpo(ctx.model, ctx.tok, ctx.scorer, ctx.prompts.train, cfg, ctx.stages["online_dpo"],
                                   loop, run_dir, ctx.device, **common)
    return evaluate_trained(ctx, method, name, run_dir, loop.steps, beta, summary)


def run_offline_baseline(ctx: RunContext, method: str, ul, run_dir: Path) -> RunResult:
    """Preferred-FT or Unlikelihood (`ul` its UnlikelihoodConfig) on DPO's pairs, batches, LoRA and steps
    (`minidpo.methods.baselines`), evaluated like every method."""
    data = ensure_pairs(ctx)
    name, loop = setting_name(method, ul), ctx.stages["loop"]
    summary = train_baseline(ctx.model, data, method, ctx.stages["lora"], ctx.stages["batch"], loop, run_dir,
                             ctx.device, unlikelihood=ul, autocast=ctx.amp, rank=ctx.rank, world=ctx.world,
                             on_step_end=periodic_eval(ctx, method, name, run_dir, loop.steps, None), log=ctx.log,
                             settings=checkpoint_settings(ctx.stages, ctx.settings, method, ul))
    return evaluate_trained(ctx, method, name, run_dir, loop.steps, None, summary)


def point(run_dir: Path, method: str, setting: str, step: int, r: dict) -> None:
    append_point(run_dir, {"method": method, "setting": setting, "step": step, "reward": r["policy"]["reward"],
                           "kl": r["policy"]["kl_exact"], "kl_sampled": r["policy"]["kl_sampled"]})


def run_best_of_n(ctx: RunContext, ns: list[int], run_dir: Path) -> RunResult:
    """Best-of-N at every N: samples from the reference only, nothing trained. Its KL is the bound log N - (N-1)/N,
    stored as `kl_bound` (never as a measured `kl`/`kl_exact`). Best-of-1 (round 0, the reference's own evaluation
    sample) is always computed, so the reference reward is set whatever the N list."""
    points, ref = [], {}
    if is_main():
        with ctx.amp:  # max(ns) rounds of reference samples serve every N
            results = best_of_n_sweep(ctx.model, ctx.tok, ctx.scorer, ctx.prompts.eval, sorted({1, *ns}),
                                      ctx.stages["eval"])
        by_n = {r["n"]: r for r in results}
        ref = {"reward": by_n[1]["reward"]}
        for n in ns:
            r = by_n[n]
            ctx.log(f"[best-of-n] N={n}: reward {r['reward']:.3f}, KL bound {r['kl_bound']:.3f}")
            points.append({"method": "best-of-n", "setting": f"N={n}", "step": 0, "reward": r["reward"],
                           "kl": None, "kl_bound": r["kl_bound"], "kl_sampled": None})
        atomic_write_json(run_dir / "result.json", {"points": points})
    policy = {"reward": points[-1]["reward"], "kl_bound": points[-1]["kl_bound"]} if points else {}
    return RunResult("best-of-n", setting_name("best-of-n", ns), ref, policy, {}, [], points)


def implicit_reward_accuracy(runs: list[RunResult]) -> dict:
    """{method: {setting: held-out pair accuracy of the policy's implicit reward}} for the DPO runs (Rafailov et al.
    sec. 5: the policy is a reward model), measured on the pairs the learned reward model's accuracy uses."""
    out: dict = {}
    for r in runs:
        if r.train.get("reward_accuracy") is not None:
            out.setdefault(r.method, {})[r.setting] = r.train["reward_accuracy"]
    return out


def summarize(runs: list[RunResult], model_desc: str, base: str, data_src: Path, device: torch.device,
              world: int, seconds: float, reward_model: dict | None = None) -> dict:
    """summary.json: the last run leads (a single run is the only one); every run is under "runs"; the learned
    reward model's held-out accuracy (when RLHF ran) beside DPO's implicit-reward accuracy on the same pairs."""
    last = runs[-1]
    return {"model": model_source(model_desc), "data": str(data_src), "reference_model": base,
            "method": last.method, "setting": last.setting, "reference": last.reference, "policy": last.policy,
            "train": last.train, "device": str(device), "world_size": world, "total_seconds": seconds,
            "finished": False,  # train.py marks it finished once every output is written (runs.mark_finished)
            "runs": [{"method": r.method, "setting": r.setting, "reference": r.reference, "policy": r.policy,
                      "train": r.train} for r in runs],
            **({"reward_model": reward_model} if reward_model is not None else {}),
            "implicit_reward_accuracy": implicit_reward_accuracy(runs)}


def seeds_summary(per_seed: dict[int, dict], points: list[dict]) -> dict:
    """The top summary.json of --seeds: each seed's results, and per method and setting the mean over seeds of the
    last evaluation's reward and KL with its standard error (frontier.aggregate_points); likewise the learned reward
    model's and DPO's implicit-reward held-out accuracy."""
    last: dict = {}
    for row in aggregate_points(points):  # a setting's row with the largest step is its final evaluation
        key = (row["method"], row["setting"])
        if key not in last or (row["step"] or 0) >= (last[key]["step"] or 0):
            last[key] = row
    accuracy: dict = {}
    for s in per_seed.values():
        for method, by_setting in s.get("implicit_reward_accuracy", {}).items():
            for setting, acc in by_setting.items():
                accuracy.setdefault(method, {}).setdefault(setting, []).append(acc)
    rm = [s["reward_model"]["heldout_accuracy"] for s in per_seed.values()
          if s.get("reward_model", {}).get("heldout_accuracy") is not None]
    stat = lambda v: dict(zip(("mean", "se"), mean_and_se(v)), seeds=len(v))  # noqa: E731
    return {"seeds": sorted(per_seed), "finished": False,
            "mean": list(last.values()),
            **({"reward_model": {"heldout_accuracy": stat(rm)}} if rm else {}),
            "implicit_reward_accuracy": {m: {k: stat(v) for k, v in d.items()} for m, d in accuracy.items()},
            "per_seed": {str(k): {key: s.get(key) for key in ("runs", "reward_model", "implicit_reward_accuracy",
                                                                "total_seconds")}
                         for k, s in per_seed.items()}}


def result_lines(last: RunResult, summary: dict, out: Path) -> str:
    lines = ["", side_by_side(last.examples)] if last.examples else [""]
    pol, ref = last.policy, last.reference
    kl = (f"KL bound {pol['kl_bound']:.3f}" if "kl_bound" in pol
          else f"KL(policy||reference) {pol.get('kl_exact', math.nan):.3f}")
    lines.append(f"{last.method} {last.setting}: reference reward {ref.get('reward', math.nan):.3f} | policy reward "
                 f"{pol.get('reward', math.nan):.3f} | {kl} | total {format_seconds(summary['total_seconds'])}")
    lines.append(f"wrote {out / 'summary.json'}; {sample_hint(out)}")
    return "\n".join(lines)


def sample_hint(out: Path) -> str:
    """How to sample the run in `out`: the folder itself when it holds an adapter, else the last sub-run (of a sweep
    or --compare) that does, else a note that there is none (best-of-N trains nothing)."""
    if (out / "run.json").is_file():
        return f"sample with: python sample.py --adapter {out}"
    held = [p for p in sorted(out.iterdir()) if p.is_dir() and (p / "run.json").is_file()] if out.is_dir() else []
    if not held:
        return "no trained adapter to sample (best-of-N trains nothing)"
    return f"sample with: python sample.py --adapter {held[-1]} ({len(held)} trained runs in {out})"


def export_merged(model: torch.nn.Module, path: Path, log: Log) -> None:
    remove_lora(model, merge=True)  # plain nn.Linear weights with the adapter folded in, as transformers expects
    save_hf(model, path)
    log(f"wrote the merged model in Hugging Face's layout to {path}")

