"""
The bundled model's figures for data/README.md, from the files scripts/train_bundled_model.py leaves in its work dir.

    python scripts/bundled_model_report.py --work-dir out/bundled --plot docs/bundled_loss_curve.png
    python scripts/bundled_model_report.py --work-dir out/bundled --export out/bundled/mid   # from the last checkpoint

--plot draws held-out loss against tokens seen from `curve.jsonl` (and the shape sweep's curves from
out/sweep/*/curve.jsonl when present), with the old 7M model's figure (5.94 nats at 1.6M tokens) for comparison.
--export writes the newest checkpoint's weights (a run still training, or stopped) in Hugging Face's layout, so the
DPO presets can be tried before training ends.
"""

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minidpo.config import build_config, run_program  # noqa: E402

OLD_MODEL = (1_638_400, 5.9416)  # tokens seen, IMDB test loss of the 4 x 128 model this one replaces


@dataclass
class ReportConfig:
    work_dir: str = "out/bundled"
    sweep_dir: str = "out/sweep"
    plot: str | None = None       # write the loss-curve PNG here
    export: str | None = None     # write the newest checkpoint here as a Hugging Face GPT-2 folder


def read_curve(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot(cfg: ReportConfig) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for d in sorted(Path(cfg.sweep_dir).glob("*/curve.jsonl")):
        pts = read_curve(d)
        ax.plot([p["tokens"] / 1e6 for p in pts], [p["heldout_loss"] for p in pts], "--", lw=1,
                label=f"sweep {d.parent.name}")
    pts = read_curve(Path(cfg.work_dir) / "curve.jsonl")
    if pts:
        ax.plot([p["tokens"] / 1e6 for p in pts], [p["heldout_loss"] for p in pts], "-", lw=2,
                label="bundled model (6 x 256)")
    ax.plot([OLD_MODEL[0] / 1e6], [OLD_MODEL[1]], "kx", ms=8, label="previous model (4 x 128)")
    ax.axhline(4.3, color="grey", lw=0.8, ls=":")
    ax.text(0.1, 4.33, "goal: 4.3", color="grey", fontsize=8)
    ax.set_xlabel("training tokens seen (millions)")
    ax.set_ylabel("IMDB test loss (nats/token)")
    ax.set_ylim(3.5, 8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(cfg.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(cfg.plot, dpi=110)
    print(f"wrote {cfg.plot}")


def export(cfg: ReportConfig) -> None:
    import torch

    from minidpo.formats.safetensors import load_file
    from minidpo.model.export import save_hf
    from minidpo.model.gpt import GPT, GPTConfig
    report_cfg = json.loads((Path(cfg.work_dir) / "run_config.json").read_text())
    ckpts = sorted(Path(cfg.work_dir, "sft_checkpoint").glob("trainable-*.safetensors"),
                   key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    if not ckpts:
        raise SystemExit(f"--export: no checkpoint in {Path(cfg.work_dir, 'sft_checkpoint')}")
    model = GPT(GPTConfig(block_size=report_cfg["block_size"], n_layer=report_cfg["n_layer"],
                          n_head=report_cfg["n_head"], n_embd=report_cfg["n_embd"]))
    state = load_file(ckpts[-1])
    missing = set(dict(model.named_parameters())) - set(state)
    if missing:
        raise SystemExit(f"--export: {ckpts[-1]} lacks {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    save_hf(model, Path(cfg.export), dtype=torch.float16)
    print(f"wrote {cfg.export} from {ckpts[-1]}")


def main(argv: list[str]) -> None:
    cfg = build_config(ReportConfig, argv)
    if cfg.plot:
        plot(cfg)
    if cfg.export:
        export(cfg)


if __name__ == "__main__":
    sys.exit(run_program(main, sys.argv[1:], __doc__, ReportConfig))
