"""
Train the small GPT-2 that ships in data/tiny-imdb-gpt2/ and makes `python train.py --preset tiny` work offline.

It is minidpo's own SFT stage (minidpo/methods/sft.py) run from random initialisation on IMDB review text (train pos,
neg and unsup; the test split is held out for the reported loss), with the GPT-2 tokenizer and vocabulary. Training runs
under bf16 autocast where the CPU has AMX/AVX512-BF16 (`--dtype auto`), which is what makes hours of CPU enough:
see bench/sft_speed.py. Every `eval_every` steps the loss on the first `eval_windows` held-out windows goes to
`<work_dir>/curve.jsonl`; a checkpoint every `checkpoint_every` steps lets `--resume true` continue exactly (same
batches, same optimizer state) after a stop. The result is written in Hugging Face's GPT-2 layout
(model.safetensors in fp16 + config.json), which `load_gpt2` reads like any other checkpoint. The exact command
used for the shipped file is in data/README.md.

    python scripts/train_bundled_model.py --data ../shared/data/aclImdb_v1.tar.gz
    python scripts/train_bundled_model.py --data ../shared/data/aclImdb_v1.tar.gz --resume true   # after a stop
"""

import hashlib
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minidpo.config import build_config, require, run_program  # noqa: E402
from minidpo.dataset.imdb import load_imdb  # noqa: E402
from minidpo.experiment.resolve import choose_dtype  # noqa: E402
from minidpo.methods.sft import SFTConfig, eval_loss, pack_texts, run_sft  # noqa: E402
from minidpo.model.export import save_hf  # noqa: E402
from minidpo.model.generate import generate  # noqa: E402
from minidpo.model.gpt import GPT, GPTConfig  # noqa: E402
from minidpo.model.tokenizer import Tokenizer  # noqa: E402
from minidpo.training.runtime import Runtime  # noqa: E402
from minidpo.training.trainer import LoopConfig, TrainRun, append_jsonl  # noqa: E402

REPORT_WINDOWS = 800  # the held-out figure in data/README.md: the first 800 test windows, as for the old model


@dataclass
class BundledConfig:
    data: str = "../shared/data/aclImdb_v1.tar.gz"
    out: str = "data/tiny-imdb-gpt2"
    work_dir: str = "out/bundled"
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 128
    batch_size: int = 16
    steps: int = 3300
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    dtype: str = "auto"          # auto (bf16 where the CPU has it) | bf16 | fp32
    eval_every: int = 250        # steps between held-out losses in curve.jsonl (0: only at the end)
    eval_windows: int = 128      # held-out windows per curve point (the final figure uses REPORT_WINDOWS)
    checkpoint_every: int = 100
    threads: int = 0             # torch threads (0: torch's default, one per core); 1 leaves a core for other work
    resume: bool = False

    def __post_init__(self):
        require(self.dtype in ("auto", "bf16", "fp32"), "dtype", f"must be auto, bf16 or fp32, got {self.dtype!r}")
        require(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        require(self.eval_windows >= 1, "eval_windows", f"must be >= 1, got {self.eval_windows}")
        require(self.threads >= 0, "threads", f"must be >= 0 (0: torch's default), got {self.threads}")


def token_streams(cfg: BundledConfig, tok: Tokenizer, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) token streams, cached in work_dir: tokenizing 75,000 reviews takes a minute or two."""
    key = hashlib.sha256(f"{Path(cfg.data).resolve()}:{Path(cfg.data).stat().st_size}".encode()).hexdigest()[:16]
    cache = work / f"tokens-{key}.pt"
    if cache.is_file():
        d = torch.load(cache, weights_only=True)
        return d["train"], d["test"]
    train_texts = [r.text for r in load_imdb(cfg.data, "train", ("pos", "neg", "unsup"))]
    test_texts = [r.text for r in load_imdb(cfg.data, "test", ("pos", "neg"))]
    # the test reviews are sorted by label; interleave so the eval windows see both sentiments
    test_texts = [t for pair in zip(test_texts[:12500], test_texts[12500:]) for t in pair] or test_texts
    train, test = pack_texts(train_texts, tok), pack_texts(test_texts, tok)
    torch.save({"train": train, "test": test}, cache)
    return train, test


def main(argv: list[str]) -> None:
    cfg = build_config(BundledConfig, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = Tokenizer()
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "run_config.json").write_text(json.dumps(asdict(cfg), indent=2))  # for scripts/bundled_model_report.py
    t0 = time.perf_counter()
    train_stream, test_stream = token_streams(cfg, tok, work)
    print(f"data: {len(train_stream):,} train tokens, {len(test_stream):,} test tokens "
          f"({time.perf_counter() - t0:.0f} s to read)", flush=True)
    device = torch.device("cpu")
    dtype = choose_dtype(device, cfg.dtype)[0]
    print(f"precision: {'bf16 autocast' if dtype else 'fp32'} (--dtype {cfg.dtype})", flush=True)
    amp = torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()

    model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
    print(f"model: {model.num_params():,} parameters", flush=True)
    loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
                      log_every=10, checkpoint_every=cfg.checkpoint_every, label="sft", show=(), item_name="windows")
    curve = work / "curve.jsonl"
    tokens_per_step = cfg.batch_size * cfg.block_size

    def evaluate(step: int) -> None:
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            with amp:
                loss = eval_loss(model, test_stream, cfg.block_size, batch_size=16, max_batches=cfg.eval_windows // 16)
            model.train()
            append_jsonl(curve, {"step": step, "tokens": step * tokens_per_step, "heldout_loss": loss,
                                 "seconds": time.perf_counter() - t_start})
            print(f"[sft] step {step}: held-out loss {loss:.4f} ({cfg.eval_windows} windows)", flush=True)

    if not cfg.resume and curve.exists():
        curve.unlink()  # a fresh run: the old curve would be mixed in
    t_start = time.perf_counter()
    windows = SFTConfig(batch_size=cfg.batch_size, block_size=cfg.block_size, seed=cfg.seed)
    run_sft(model, train_stream, windows, TrainRun(loop, work, on_step_end=evaluate, resume=cfg.resume),
            Runtime(device, amp))
    train_s = time.perf_counter() - t_start
    model.eval()
    test_loss = eval_loss(model, test_stream, cfg.block_size, batch_size=16, max_batches=REPORT_WINDOWS // 16)
    print(f"IMDB test loss {test_loss:.4f} (fp32, first {REPORT_WINDOWS} windows of {cfg.block_size} tokens), "
          f"this session trained {train_s / 60:.1f} min", flush=True)
    save_hf(model, Path(cfg.out), dtype=torch.float16)
    report = {"test_loss": test_loss, "train_minutes_this_session": train_s / 60,
              "train_tokens": cfg.steps * tokens_per_step, "precision": str(dtype), "config": asdict(cfg)}
    (work / "report.json").write_text(json.dumps(report, indent=2))
    prompt = torch.tensor([tok.encode("This movie was")])
    for temperature in (1.0, 0.7):
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            out = generate(model, prompt, 60, temperature=temperature, generator=g)
            print(f"sample T={temperature}:", repr(tok.decode(out[0].tolist())), flush=True)


if __name__ == "__main__":
    sys.exit(run_program(main, sys.argv[1:], __doc__, BundledConfig))
