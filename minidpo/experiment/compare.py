"""
The methods on one frontier (the DPO paper's Figure 2, left): each run at each of its settings against the same
reference, reward classifier, prompts and evaluation.

`method_runs` lists (method, setting, folder) for a run or a `--compare`; train.py's `run` gives each a fresh LoRA
adapter (`start_run`), calls the method's own train function from its registry entry (minidpo/registry.py), then
the one epilogue (`finish_run`) evaluates it like every other and writes its adapter, run.json and curves.png; the
adapter is then dropped so the next run starts from the same reference weights.
"""

from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from minidpo.experiment.context import RunConfigs, RunContext
from minidpo.experiment.report import RunResult
from minidpo.experiment.resolve import model_source
from minidpo.experiment.stages import ensure_reward_model
from minidpo.fileio import atomic_write_json
from minidpo.methods.best_of_n import best_of_n_sweep
from minidpo.methods.evaluate import evaluate, sample_reference
from minidpo.model.export import export_peft
from minidpo.model.lora import apply_lora, remove_lora, save_lora
from minidpo.registry import BY_NAME, Method
from minidpo.stats import mean_and_se
from minidpo.training.checkpoint import Checkpointer, check_settings
from minidpo.training.curves import plot_curves
from minidpo.training.distributed import barrier, is_main
from minidpo.training.frontier import append_point, read_points
from minidpo.training.runs import to_portable
from minidpo.training.trainer import LoopConfig, TrainRun


def method_runs(configs: RunConfigs, out: Path) -> list[tuple[Method, object, Path]]:
    """(method, its config for this setting, run folder). One run writes into `out`; several get a folder each."""
    runs = [(BY_NAME[name], s) for name in configs.compare for s in BY_NAME[name].settings(configs)]
    if len(runs) == 1:
        return [(runs[0][0], runs[0][1], out)]
    return [(m, s, out / f"{m.name}_{m.setting_name(s).replace('=', '_')}") for m, s in runs]


def method_loop(configs: RunConfigs, method: Method) -> LoopConfig:
    """The loop settings a method trains with: the RL loop's (rlhf, rloo) or DPO's (every method on or like DPO's)."""
    return configs.rloo_loop if method.rl_loop else configs.loop


def checkpoint_settings(configs: RunConfigs, run_settings: dict, method: Method, setting) -> dict:
    """Everything a sub-run's checkpoint records, so that a resume under any other setting that changes results is
    refused (never silently continued): the method, its setting, the loop, LoRA, and every recorded run option."""
    loop = method_loop(configs, method)
    return {"method": method.name, "setting": asdict(setting) if is_dataclass(setting) else setting,
            "lora": asdict(configs.lora), "steps": loop.steps, "lr": loop.lr, "run": run_settings}


def check_checkpoints(configs: RunConfigs, run_settings: dict, out: Path) -> None:
    """Before any work: every sub-run checkpoint in `out` must have been made with this run's settings
    (RunConflict, one line, otherwise), so a refusal never comes after other results were rewritten."""
    for method, setting, run_dir in method_runs(configs, out):
        ckpt = Checkpointer(run_dir / "checkpoint", {})
        if method.train is not None and ckpt.exists():
            stored = ckpt.stored_settings()
            if stored is not None:
                check_settings(ckpt.dir, stored, checkpoint_settings(configs, run_settings, method, setting))


def evaluate_now(ctx: RunContext, step: int, with_reference: bool, beta: float | None) -> dict:
    """Reward and KL of the policy (and the reference's reward) on the held-out prompts, as every method is
    measured; with beta (DPO), also the implicit reward's accuracy on the held-out pairs."""
    log, cfg = ctx.runtime.log, ctx.configs.eval
    log(f"[eval] step {step}: sampling {len(ctx.prompts.eval)} held-out prompts from the policy"
        + (" and the reference" if with_reference else "") + ", exact KL ...")
    with ctx.runtime.autocast:
        if with_reference and ctx.reference_samples is None:  # the same for every run of a sweep: sampled once
            ctx.reference_samples = sample_reference(ctx.model, ctx.tok, ctx.prompts.eval, cfg)
        heldout = ctx.pairs.heldout if ctx.pairs and beta else None
        r = evaluate(ctx.model, ctx.tok, ctx.scorer, ctx.prompts.eval, cfg, heldout, beta,
                     reference=ctx.reference_samples if with_reference else False)
    log(f"[eval] step {step}: policy reward {r['policy']['reward']:.3f}, KL(policy||reference) exact "
        f"{r['policy']['kl_exact']:.3f} (sampled estimate {r['policy']['kl_sampled']:.3f})"
        + (f", held-out reward accuracy {r['reward_accuracy']:.3f}" if r.get("reward_accuracy") is not None
           else ""))
    return r


def start_run(ctx: RunContext, method: Method, setting, run_dir: Path) -> TrainRun:
    """Before a method trains at one setting in run_dir: what it learns from that is built on the reference (RLHF's
    reward model, fitted on the reference's body), then a fresh LoRA adapter (B = 0, seeded: the reference is the
    starting policy); returns where and how long it trains (periodic evaluation, the checkpoint's settings)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if method.reward_model:
        ensure_reward_model(ctx)
    loop = method_loop(ctx.configs, method)
    beta = setting.beta if method.has_beta else None
    run = TrainRun(loop, run_dir, on_step_end=periodic_eval(ctx, method, setting, run_dir, loop.steps, beta),
                   settings=checkpoint_settings(ctx.configs, ctx.settings, method, setting))
    torch.manual_seed(ctx.configs.seed)
    apply_lora(ctx.model, ctx.configs.lora)
    return run


def finish_run(ctx: RunContext, method: Method, setting, run_dir: Path, summary: dict) -> RunResult:
    """After a method trained at one setting: its evaluation and files; the model is the reference again afterwards
    when more runs follow."""
    loop = method_loop(ctx.configs, method)
    result = evaluate_trained(ctx, method, setting, run_dir, loop.steps, summary)
    if is_main():  # curves.png, the adapter (minidpo's and PEFT's layout), run.json (what sample.py needs), result.json
        plot_curves(run_dir, ctx.runtime.log, learned_reward=method.reward_model)
        save_lora(ctx.model, run_dir / "adapter")
        base = model_source(ctx.base)
        export_peft(ctx.model, run_dir / "adapter_peft", base_model_name_or_path=base)
        if ctx.base in ("sft_model", "base_model"):  # stored relative to the run folder, so the folder can move
            base = to_portable(ctx.out / ctx.base, run_dir, within=ctx.out)
        atomic_write_json(run_dir / "run.json", {"adapter": "adapter", "policy_base": base, "method": result.method,
                                                 "setting": result.setting})
        atomic_write_json(run_dir / "result.json", asdict(result))
    barrier()
    if run_dir != ctx.out:  # more runs follow (a sweep or --compare); a single run keeps it for --export-merged
        remove_lora(ctx.model, merge=False)  # back to the reference for the next run
        for p in ctx.model.parameters():
            p.requires_grad_(False)
    return result


def periodic_eval(ctx: RunContext, method: Method, setting, run_dir: Path, steps: int, beta: float | None):
    """on_step_end for a training loop: a frontier point every --eval-every steps (the last step is evaluated by
    `evaluate_trained`)."""
    every, name = ctx.configs.eval_every, method.setting_name(setting)

    def on_step_end(step: int) -> None:
        if every and step % every == 0 and step != steps and is_main():
            point(run_dir, method.name, name, step, evaluate_now(ctx, step, False, beta))
    return on_step_end


def evaluate_trained(ctx: RunContext, method: Method, setting, run_dir: Path, steps: int,
                     summary: dict) -> RunResult:
    """The one epilogue of every trained method: evaluate the policy and the reference on the held-out prompts,
    write the reference's point (KL 0) and the policy's last one; with beta (DPO's family), the implicit reward's
    held-out accuracy joins the training summary."""
    name, beta = method.setting_name(setting), setting.beta if method.has_beta else None
    if not is_main():
        return RunResult(method.name, name, {}, {}, {}, [], [])
    r = evaluate_now(ctx, steps, True, beta)
    append_point(run_dir, {"method": method.name, "setting": name, "step": 0, "reward": r["reference"]["reward"],
                           "kl": 0.0, "kl_sampled": 0.0, "reward_se": r["reference"]["reward_se"], "kl_se": 0.0})
    point(run_dir, method.name, name, steps, r)
    summary = {**summary, "reward_accuracy": r.get("reward_accuracy")} if beta else summary
    return RunResult(method.name, name, r["reference"], r["policy"], summary, r["examples"], read_points(run_dir))


def point(run_dir: Path, method: str, setting: str, step: int, r: dict) -> None:
    append_point(run_dir, {"method": method, "setting": setting, "step": step, "reward": r["policy"]["reward"],
                           "kl": r["policy"]["kl_exact"], "kl_sampled": r["policy"]["kl_sampled"],
                           "reward_se": r["policy"]["reward_se"], "kl_se": r["policy"]["kl_exact_se"]})


def run_best_of_n(ctx: RunContext, method: Method, ns: list[int], run_dir: Path) -> RunResult:
    """Best-of-N at every N: samples from the reference only, nothing trained. Its KL is the bound log N - (N-1)/N,
    stored as `kl_bound` (never as a measured `kl`/`kl_exact`). Best-of-1 (round 0, the reference's own evaluation
    sample) is always computed, so the reference reward is set whatever the N list."""
    run_dir.mkdir(parents=True, exist_ok=True)
    points, ref = [], {}
    if is_main():
        with ctx.runtime.autocast:  # max(ns) rounds of reference samples serve every N
            results = best_of_n_sweep(ctx.model, ctx.tok, ctx.scorer, ctx.prompts.eval, sorted({1, *ns}),
                                      ctx.configs.eval)
        by_n = {r["n"]: r for r in results}
        ref = {"reward": by_n[1]["reward"]}
        for n in ns:
            r = by_n[n]
            ctx.runtime.log(f"[best-of-n] N={n}: reward {r['reward']:.3f}, KL bound {r['kl_bound']:.3f}")
            points.append({"method": method.name, "setting": f"N={n}", "step": 0, "reward": r["reward"],
                           "kl": None, "kl_bound": r["kl_bound"], "kl_sampled": None,
                           "reward_se": mean_and_se(r["scores"])[1]})
        atomic_write_json(run_dir / "result.json", {"points": points})
    policy = {"reward": points[-1]["reward"], "kl_bound": points[-1]["kl_bound"]} if points else {}
    return RunResult(method.name, method.setting_name(ns), ref, policy, {}, [], points)
