r"""
Sample from GPT-2, from the bundled model, or from a policy trained by train.py.

    python sample.py --model gpt2 --prompt "This movie was" --num-samples 3 --max-new-tokens 40 \
        --min-new-tokens 10 --temperature 0.8 --top-k 50 --top-p 0.95 --seed 0
    python sample.py --adapter out/tiny            # the DPO policy of a train.py run (LoRA applied on the fly)
    python sample.py --adapter out/tiny --merged   # the same, with the adapter merged into the weights first
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from minidpo.config import ConfigError, cli_config
from minidpo.lora import load_lora, merge_lora
from minidpo.resolve import load_model, pick_device
from minidpo.tokenizer import Tokenizer


@dataclass
class SampleConfig:
    model: str = "auto"            # gpt2 | gpt2-medium | ... | 124M | PATH | bundled | auto
    adapter: str | None = None     # a train.py out_dir (or an adapter directory); its base model is used
    merged: bool = False           # merge the adapter into the weights before sampling
    prompt: str = "This movie was"
    num_samples: int = 3
    max_new_tokens: int = 40
    min_new_tokens: int = 0
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples must be >= 1, got {self.num_samples}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"need 0 <= --min-new-tokens ({self.min_new_tokens}) <= --max-new-tokens "
                              f"({self.max_new_tokens})")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.merged and self.adapter is None:
            raise ConfigError("--merged needs --adapter")


def adapter_paths(path: Path) -> tuple[Path, str | None]:
    """(adapter directory, base model the run trained on) for a train.py out_dir or a bare adapter directory."""
    run = path / "run.json"
    if run.is_file():
        info = json.loads(run.read_text())
        return path / info["adapter"], info["policy_base"]
    if (path / "adapter_config.json").is_file():
        return path, None
    raise FileNotFoundError(f"--adapter {path}: expected a train.py output directory (with run.json) or an adapter "
                            "directory (with adapter_config.json)")


def main(argv: list[str]) -> None:
    cfg = cli_config(SampleConfig, argv, __doc__)
    device = pick_device(cfg.device)
    model_name = cfg.model
    adapter_dir = None
    if cfg.adapter is not None:
        adapter_dir, base = adapter_paths(Path(cfg.adapter))
        if base is not None and cfg.model == "auto":
            model_name = base
    model, loaded = load_model(model_name, device)
    if adapter_dir is not None:
        load_lora(model, adapter_dir)
        if cfg.merged:
            merge_lora(model)
    model.eval()
    tok = Tokenizer()
    prompt = tok.encode(cfg.prompt)
    if not prompt:
        sys.exit("error: --prompt is empty")
    idx = torch.tensor([prompt] * cfg.num_samples, device=device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(idx, cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens, temperature=cfg.temperature,
                         top_k=cfg.top_k, top_p=cfg.top_p, eos_id=tok.eot_id, generator=g)
    print(f"# model: {loaded}" + (f" + adapter {adapter_dir}" + (" (merged)" if cfg.merged else "")
                                   if adapter_dir else ""))
    for i in range(cfg.num_samples):
        ids = out[i].tolist()
        new = ids[len(prompt):]
        if tok.eot_id in new:
            new = new[:new.index(tok.eot_id)]
        print(f"--- sample {i + 1}")
        print(tok.decode(prompt + new))


if __name__ == "__main__":
    main(sys.argv[1:])
