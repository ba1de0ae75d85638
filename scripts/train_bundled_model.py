"""
Train the small GPT-2 that ships in data/tiny-imdb-gpt2/ and makes `python train.py --preset tiny` work offline.

It is minidpo's own SFT stage (minidpo/sft.py) run from random initialisation on IMDB review text (train pos, neg
and unsup; the test split is held out for the reported loss), with the GPT-2 tokenizer. The result is written in
Hugging Face's GPT-2 layout (model.safetensors in fp16 + config.json), which `load_gpt2` reads like any other
checkpoint. The exact command used for the shipped file is in data/README.md.

    python scripts/train_bundled_model.py --data ../shared/data/aclImdb_v1.tar.gz
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minidpo.config import build_config, run_program  # noqa: E402
from minidpo.imdb import load_imdb  # noqa: E402
from minidpo.model import GPT, GPTConfig  # noqa: E402
from minidpo.sft import eval_loss, pack_texts, run_sft  # noqa: E402
from minidpo.tokenizer import Tokenizer  # noqa: E402
from minidpo.trainer import LoopConfig  # noqa: E402


@dataclass
class BundledConfig:
    data: str = "../shared/data/aclImdb_v1.tar.gz"
    out: str = "data/tiny-imdb-gpt2"
    work_dir: str = "out/bundled"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    batch_size: int = 16
    steps: int = 800
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    resume: bool = False


def main(argv: list[str]) -> None:
    cfg = build_config(BundledConfig, argv)
    torch.manual_seed(cfg.seed)
    tok = Tokenizer()
    t0 = time.perf_counter()
    train_texts = [r.text for r in load_imdb(cfg.data, "train", ("pos", "neg", "unsup"))]
    test_texts = [r.text for r in load_imdb(cfg.data, "test", ("pos", "neg"))]
    # the test reviews are sorted by label; interleave so the eval windows see both sentiments
    test_texts = [t for pair in zip(test_texts[:12500], test_texts[12500:]) for t in pair] or test_texts
    train_stream, test_stream = pack_texts(train_texts, tok), pack_texts(test_texts, tok)
    print(f"data: {len(train_stream):,} train tokens, {len(test_stream):,} test tokens "
          f"({time.perf_counter() - t0:.0f} s to read and tokenize)", flush=True)

    model_cfg = GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    model = GPT(model_cfg)
    print(f"model: {model.num_params():,} parameters", flush=True)
    loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
                      log_every=10, checkpoint_every=50, label="sft")
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_sft(model, train_stream, loop, cfg.batch_size, cfg.block_size, cfg.seed, "cpu", work, resume=cfg.resume)
    train_s = time.perf_counter() - t0
    test_loss = eval_loss(model, test_stream, cfg.block_size, batch_size=16, max_batches=50)
    print(f"IMDB test loss {test_loss:.4f} (first {50 * 16} windows of {cfg.block_size} tokens), "
          f"trained {train_s / 60:.1f} min", flush=True)

    from minidpo.export import save_hf
    save_hf(model.half(), Path(cfg.out))
    report = {"test_loss": test_loss, "train_minutes": train_s / 60, "train_tokens": cfg.steps * cfg.batch_size *
              cfg.block_size, "config": vars(cfg)}
    (work / "report.json").write_text(json.dumps(report, indent=2))
    model.float().eval()
    prompt = torch.tensor([tok.encode("This movie was")])
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        out = model.generate(prompt, 40, temperature=0.8, top_k=50, generator=g)
        print("sample:", repr(tok.decode(out[0].tolist())))


if __name__ == "__main__":
    sys.exit(run_program(main, sys.argv[1:], __doc__, BundledConfig))
