r"""
Sample from GPT-2, from the bundled model, or from a policy trained by train.py.

    python sample.py --model bundled --prompt "This movie was" --num-samples 3 --max-new-tokens 40 \
        --min-new-tokens 10 --temperature 0.8 --top-k 50 --top-p 0.95 --seed 0
    python sample.py --adapter out/tiny            # the DPO policy of a train.py run (LoRA applied on the fly)
    python sample.py --adapter out/tiny --merged   # the same, with the adapter merged into the weights first

--top-k 0 (or none) and --top-p 1 switch those filters off; --temperature 0 is greedy.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from minidpo.config import ConfigError, build_component, build_config, run_program
from minidpo.experiment.resolve import check_model_name, load_model, pick_device
from minidpo.model.export import PEFT_ADAPTER_FILE
from minidpo.model.generate import SamplingConfig, generate
from minidpo.model.gpt import ALIASES, PRESETS
from minidpo.model.lora import load_lora, merge_lora, read_lora_config
from minidpo.model.tokenizer import Tokenizer

MODEL_NAMES = {"auto", "bundled", *PRESETS, *ALIASES}


@dataclass
class SampleConfig:
    model: str = "auto"            # gpt2 | gpt2-medium | ... | 124M | PATH | bundled | auto
    adapter: str | None = None     # a train.py out_dir (or an adapter directory); its base model is used
    merged: bool = False           # merge the adapter into the weights before sampling
    prompt: str = "This movie was"
    num_samples: int = 3
    max_new_tokens: int = 40
    min_new_tokens: int = 0
    temperature: float = 0.8       # 0 is greedy
    top_k: int | None = 50         # 0 or none: off
    top_p: float | None = None     # 1 or none: off
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples must be >= 1, got {self.num_samples}", "num_samples")
        if self.merged and self.adapter is None:
            raise ConfigError("--merged needs --adapter", "merged")
        self.sampling()  # the sampling flags fail here, before any model is loaded
        check_model_name(self.model)

    def sampling(self) -> SamplingConfig:
        return build_component(SamplingConfig, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                               min_new_tokens=self.min_new_tokens, max_new_tokens=self.max_new_tokens)


def read_run_json(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(info, dict) or not isinstance(info.get("adapter"), str) \
            or not isinstance(info.get("policy_base"), str):
        raise ValueError(f"{path}: expected a JSON object with string keys 'adapter' and 'policy_base' "
                         "(written by train.py)")
    return info


def resolve_base(base: str, run_dir: Path) -> str:
    """run.json's policy_base as something load_model takes: a model name (gpt2, bundled, ...), an absolute path,
    or a path relative to the run folder (so the folder can be moved), and for files written before that,
    relative to the current directory."""
    if base in MODEL_NAMES or Path(base).is_absolute():
        return base
    for candidate in (run_dir / base, Path(base)):
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(f"{run_dir / 'run.json'}: policy_base {base!r} is neither a model name nor a path "
                            f"found in {run_dir} or the current directory (was the folder moved without it?)")


def adapter_paths(path: Path) -> tuple[Path, str | None]:
    """(adapter directory, base model the run trained on) for a train.py out_dir or a bare adapter directory."""
    if not path.is_dir():
        raise FileNotFoundError(f"--adapter {path}: no such directory (expected a train.py output directory or an "
                                "adapter directory)")
    run = path / "run.json"
    if run.is_file():
        info = read_run_json(run)
        return path / info["adapter"], resolve_base(info["policy_base"], path)
    if (path / PEFT_ADAPTER_FILE).is_file():  # export_peft's copy of a run's adapter, for Hugging Face's peft
        same = f"--adapter {path.parent}" if (path.parent / "run.json").is_file() else "its adapter/ folder"
        raise ValueError(f"--adapter {path}: an adapter in PEFT's layout (for Hugging Face's peft library); "
                         f"sample.py reads minidpo's layout of the same run: {same}")
    if (path / "adapter_config.json").is_file():
        read_lora_config(path)  # a foreign or damaged adapter fails here, before any model is loaded or downloaded
        return path, None
    held = sorted({p.parent for p in (*path.glob("*/run.json"), *path.glob("*/*/run.json"))})
    if held:  # the top folder of --compare, a sweep or --seeds: each sub-run holds its own adapter
        names = [p.relative_to(path).as_posix() for p in held]
        more = f", ... ({len(names)} in all)" if len(names) > 6 else ""
        raise ValueError(f"--adapter {path}: a folder of several runs; pass one of its sub-runs that hold an "
                         f"adapter: {', '.join(names[:6])}{more} (e.g. --adapter {held[-1]})")
    raise FileNotFoundError(f"--adapter {path}: expected a train.py output directory (with run.json) or an adapter "
                            "directory (with adapter_config.json)")


def main(argv: list[str]) -> None:
    cfg = build_config(SampleConfig, argv)
    sampling = cfg.sampling()
    device = pick_device(cfg.device)
    tok = Tokenizer()
    prompt = tok.encode(cfg.prompt)
    if not prompt:
        raise ConfigError("--prompt is empty", "prompt")
    model_name = cfg.model
    adapter_dir = None
    if cfg.adapter is not None:
        adapter_dir, base = adapter_paths(Path(cfg.adapter))
        if base is not None and cfg.model == "auto":
            model_name = base
    model, loaded, notes = load_model(model_name, device)
    for note in notes:
        print(note, file=sys.stderr)
    if adapter_dir is not None:
        try:
            load_lora(model, adapter_dir)
        except KeyError as e:  # keys that do not fit the model: report it as bad input, not as a crash
            raise ValueError(str(e).strip("'\"")) from None
        if cfg.merged:
            merge_lora(model)
    model.eval()
    idx = torch.tensor([prompt] * cfg.num_samples, device=device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    out = generate(model, idx, sampling.max_new_tokens, sampling.min_new_tokens, sampling.temperature,
                   sampling.top_k, sampling.top_p, eos_id=tok.eot_id, generator=g)
    print(f"# model: {loaded}" + (f" + adapter {adapter_dir}" + (" (merged)" if cfg.merged else "")
                                   if adapter_dir else ""))
    for i in range(cfg.num_samples):
        new = out[i, len(prompt):].tolist()
        if tok.eot_id in new:
            new = new[:new.index(tok.eot_id)]
        print(f"--- sample {i + 1}")
        print(tok.decode(prompt + new))


if __name__ == "__main__":
    sys.exit(run_program(main, sys.argv[1:], __doc__, SampleConfig))
