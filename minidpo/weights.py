"""
Load GPT-2 weights into minidpo's GPT from any of the layouts they are published in, and export to Hugging Face's.

References: openai/gpt-2 (src/model.py variable names, download_model.py file list), Hugging Face transformers'
GPT2LMHeadModel (state-dict names, config.json keys, Conv1D weights stored [in, out]), and nanoGPT's
`GPT.from_pretrained`, which transposes those Conv1D weights into nn.Linear's [out, in].

`load_gpt2(source)` accepts:
1. an OpenAI release directory: hparams.json + model.ckpt.index + model.ckpt.data-00000-of-00001, read by
   minidpo.tf_bundle (no TensorFlow); `verify=True` checks every tensor's CRC32C;
2. a `model.safetensors` file (read by minidpo.safetensors: memory-mapped, no needless copies);
3. a `pytorch_model.bin` (torch.load with weights_only=True);
4. a directory with config.json and one of those two files;
5. a name: gpt2, gpt2-medium, gpt2-large, gpt2-xl or 124M, 355M, 774M, 1558M. The release files are looked up in
   `<cache_dir()>/gpt2/<124M|355M|774M|1558M>/` (cache_dir() is $MINIDPO_CACHE, else ~/.cache/minidpo) and, if
   missing, downloaded (download_gpt2) from $MINIDPO_GPT2_URL, default OpenAI's public storage, with resume.
Keys may carry the `transformer.` prefix or not; the `attn.bias` / `attn.masked_bias` mask buffers are ignored. A
state dict of minidpo's own GPT (nn.Linear layout) is recognised by c_attn's [3C, C] shape. Sizes come from
hparams.json or config.json, else from the safetensors metadata key `minidpo.config` (a JSON GPTConfig), else from
the tensor shapes for the four released sizes.
"""

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from minidpo.download import DownloadError, cache_dir, download_file
from minidpo.model import GPT, PRESETS, GPTConfig
from minidpo.safetensors import SafetensorsError, load_file, load_metadata, save_file
from minidpo.tf_bundle import BundleError, load_bundle

OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
OPENAI_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
                "model.ckpt.meta", "vocab.bpe")  # the list in openai/gpt-2 download_model.py
NEEDED = ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001")
KNOWN_SIZES = {("124M", "model.ckpt.data-00000-of-00001"): 497_759_232}  # only where certain
SIZE_OF = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
SIZE_OF.update({v: v for v in list(SIZE_OF.values())})
LINEAR = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers some HF checkpoints carry


class CheckpointError(ValueError):
    pass


# --------------------------------------------------------------------------- configs

def _read_json(path: Path, keys: tuple[str, ...]) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object with keys {', '.join(keys)}")
    for k in keys:
        if not isinstance(cfg.get(k), int):
            raise CheckpointError(f"{path}: missing or non-integer key {k!r} (expected keys: {', '.join(keys)})")
    return cfg


def config_from_hparams(path: Path) -> GPTConfig:
    """OpenAI's hparams.json: n_vocab, n_ctx, n_embd, n_head, n_layer."""
    h = _read_json(path, ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"))
    return GPTConfig(block_size=h["n_ctx"], vocab_size=h["n_vocab"], n_layer=h["n_layer"], n_head=h["n_head"],
                     n_embd=h["n_embd"])


def config_from_hf(path: Path) -> GPTConfig:
    """Hugging Face's config.json for GPT-2; options this model does not implement are rejected, not ignored."""
    c = _read_json(path, ("n_layer", "n_head", "n_embd", "vocab_size"))
    unsupported = {"model_type": ("gpt2", None), "activation_function": ("gelu_new", "gelu_pytorch_tanh", None),
                   "n_inner": (None, 4 * c["n_embd"]), "tie_word_embeddings": (True, None),
                   "scale_attn_by_inverse_layer_idx": (False, None), "layer_norm_epsilon": (1e-5, None)}
    for key, allowed in unsupported.items():
        if c.get(key) not in allowed:
            raise CheckpointError(f"{path}: {key}={c.get(key)!r} is not supported (expected one of {allowed})")
    n_pos = c.get("n_positions", c.get("n_ctx"))
    if not isinstance(n_pos, int):
        raise CheckpointError(f"{path}: missing integer key 'n_positions'")
    return GPTConfig(block_size=n_pos, vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                     n_embd=c["n_embd"])


def infer_config(tensors: dict[str, Tensor], path: Path) -> GPTConfig:
    """Sizes from the shapes alone; the head count only follows from n_embd for the four released models."""
    wte, wpe = tensors.get("wte.weight"), tensors.get("wpe.weight")
    heads = {p["n_embd"]: p["n_head"] for p in PRESETS.values()}
    if wte is None or wpe is None or wte.shape[1] not in heads:
        raise CheckpointError(f"{path}: no config.json beside it, and the sizes cannot be inferred from the tensors "
                              "(need wte/wpe of a released GPT-2 width); put a config.json next to the file")
    n_layer = 1 + max((int(k.split(".")[1]) for k in tensors if k.startswith("h.")), default=-1)
    return GPTConfig(block_size=wpe.shape[0], vocab_size=wte.shape[0], n_layer=n_layer,
                     n_head=heads[wte.shape[1]], n_embd=wte.shape[1])


# --------------------------------------------------------------------------- names and shapes

def model_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """minidpo state-dict key -> shape (nn.Linear layout), read off a weightless GPT; the tied lm_head left out."""
    with torch.device("meta"):
        model = GPT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


def openai_name(key: str) -> str:
    """minidpo key -> OpenAI variable: transformer.h.0.attn.c_attn.weight -> model/h0/attn/c_attn/w."""
    parts = key.removeprefix("transformer.").split(".")
    leaf = parts.pop()
    if parts[0] in ("wte", "wpe"):
        return "model/" + parts[0]
    if parts[0] == "h":
        parts = [f"h{parts[1]}"] + parts[2:]
    short = "b" if leaf == "bias" else ("g" if parts[-1].startswith("ln") else "w")
    return "model/" + "/".join(parts + [short])


def source_spec(config: GPTConfig, layout: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name in the file: (minidpo key, shape in the file)} for layout "openai", "conv1d" (HF) or "linear"."""
    spec = {}
    for key, shape in model_shapes(config).items():
        conv = key.endswith(LINEAR) and layout != "linear"
        file_shape = shape[::-1] if conv else shape  # Conv1D stores [in, out]
        if layout == "openai":
            spec[openai_name(key)] = (key, (1, *file_shape) if conv else file_shape)
        else:
            spec[key.removeprefix("transformer.")] = (key, file_shape)
    return spec


def normalise_keys(tensors: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Drop the `transformer.` prefix, the mask buffers and a tied lm_head (an untied one is an error)."""
    out = {k.removeprefix("transformer."): v for k, v in tensors.items() if not k.endswith(IGNORED)}
    head = out.pop("lm_head.weight", None)
    if head is not None and "wte.weight" in out and not torch.equal(head, out["wte.weight"]):
        raise CheckpointError(f"{path}: 'lm_head.weight' differs from 'wte.weight'; GPT-2 ties them and minidpo's "
                              "GPT only supports the tied head")
    return out


def to_state_dict(tensors: dict[str, Tensor], config: GPTConfig, layout: str, path: Path) -> dict[str, Tensor]:
    """Check every name and shape against the config, then rename (and later transpose) to minidpo's keys."""
    spec = source_spec(config, layout)
    problems = [f"missing key {k!r} (expected shape {list(s)})" for k, (_, s) in spec.items() if k not in tensors]
    problems += [f"unexpected key {k!r} (shape {list(t.shape)})" for k, t in tensors.items() if k not in spec]
    problems += [f"key {k!r} has shape {list(t.shape)}, expected {list(spec[k][1])}"
                 for k, t in tensors.items() if k in spec and tuple(t.shape) != spec[k][1]]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise CheckpointError(f"{path}: does not match GPT-2 with n_layer={config.n_layer}, n_embd={config.n_embd}, "
                              f"vocab_size={config.vocab_size}, block_size={config.block_size}: "
                              + "; ".join(problems[:8]) + more)
    out = {}
    for src, (dst, _) in spec.items():
        t = tensors[src]
        if dst.endswith(LINEAR) and layout != "linear":
            t = t.reshape(t.shape[-2:]).t()  # (1, in, out) or (in, out) -> (out, in): a view, no copy yet
        out[dst] = t
    return out


# --------------------------------------------------------------------------- readers

def read_torch_bin(path: Path) -> dict[str, Tensor]:
    """A state dict via torch.load(weights_only=True): never arbitrary pickle. Zip-format files are memory-mapped;
    the pre-1.6 format cannot be, and is read into memory."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, legacy non-zip file, foreign pickle: all unreadable here
        raise CheckpointError(f"{path}: torch.load(weights_only=True) cannot read it (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


def read_hf_file(path: Path, config_json: Path | None) -> tuple[GPTConfig, dict[str, Tensor], str]:
    """(config, tensors with HF names, layout) of a model.safetensors or pytorch_model.bin."""
    meta = {}
    try:
        if path.suffix == ".safetensors":
            tensors, meta = load_file(path), load_metadata(path)
        else:
            tensors = read_torch_bin(path)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    tensors = normalise_keys(tensors, path)
    if config_json is not None:
        config = config_from_hf(config_json)
    elif "minidpo.config" in meta:
        try:
            config = GPTConfig(**json.loads(meta["minidpo.config"]))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: metadata 'minidpo.config' is not a JSON GPTConfig ({e})") from None
    else:
        config = infer_config(tensors, path)
    c_attn = tensors.get("h.0.attn.c_attn.weight")
    linear = c_attn is not None and tuple(c_attn.shape) == (3 * config.n_embd, config.n_embd)
    return config, tensors, "linear" if linear else "conv1d"


def find_source(source: str | os.PathLike) -> tuple[str, Path]:
    """("openai" | "hf", path) for a directory, a file, an OpenAI checkpoint prefix or a model name."""
    p = Path(source).expanduser()
    if p.is_dir():
        if (p / "model.ckpt.index").is_file():
            return "openai", p / "model.ckpt"
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                return "hf", p / name
        raise CheckpointError(f"{p}: no model.ckpt.index (OpenAI layout), model.safetensors or pytorch_model.bin")
    if p.is_file():
        if p.name.endswith(".index") or ".data-" in p.name:
            return "openai", p.with_name(p.name.removesuffix(".index").split(".data-")[0])
        return "hf", p
    if Path(f"{p}.index").is_file():
        return "openai", p
    if str(source) in SIZE_OF:
        return "openai", ensure_gpt2(str(source)) / "model.ckpt"
    raise CheckpointError(f"no such file or directory {str(p)!r}, and it is not a GPT-2 name either "
                          f"({', '.join(SIZE_OF)}); expected a checkpoint file, a directory holding one, or a name")


def load_gpt2(source: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
              verify: bool = False) -> GPT:
    """GPT-2 from `source` (see the module docstring), in eval mode, on `device` (default CPU) in `dtype` (default
    float32, also for fp16 files). `verify=True` checks the CRC32C of every tensor of an OpenAI checkpoint."""
    kind, path = find_source(source)
    if kind == "openai":
        hparams = path.parent / "hparams.json"
        if not hparams.is_file():
            raise CheckpointError(f"{hparams} not found: OpenAI checkpoints keep their sizes there")
        config = config_from_hparams(hparams)
        try:
            tensors, layout = load_bundle(path, verify=verify), "openai"
        except BundleError as e:
            raise CheckpointError(str(e)) from None
        where = Path(f"{path}.index")
    else:
        config_json = path.parent / "config.json"
        config, tensors, layout = read_hf_file(path, config_json if config_json.is_file() else None)
        where = path
    return build_model(config, to_state_dict(tensors, config, layout, where), device, dtype)


def build_model(config: GPTConfig, state: dict[str, Tensor], device: str | torch.device | None,
                dtype: torch.dtype | None) -> GPT:
    """A GPT whose parameters are copies of `state` (minidpo keys and layout); no time is spent on random init."""
    with torch.device("meta"):
        model = GPT(config)
    params = {}
    for key, t in state.items():
        target = dtype or (torch.float32 if t.is_floating_point() else t.dtype)
        # one copy does the transpose, the cast and the move, and frees the parameter from the file's memory map
        params[key] = torch.empty(t.shape, dtype=target, device=device or "cpu").copy_(t)
    params["lm_head.weight"] = params["transformer.wte.weight"]
    model.load_state_dict(params, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True made two Parameters; tie them again
    return model.eval()


# --------------------------------------------------------------------------- OpenAI release: cache and download

def gpt2_cache_dir(name: str) -> Path:
    """`<cache_dir()>/gpt2/<124M|355M|774M|1558M>/`, where load_gpt2(name) looks for OpenAI's release files."""
    return cache_dir() / "gpt2" / SIZE_OF[name]


def download_gpt2(name: str = "124M", dest_dir: str | os.PathLike | None = None, base_url: str | None = None) -> Path:
    """Fetch OpenAI's release files of GPT-2 `name` into `dest_dir` (default gpt2_cache_dir(name)); returns it.

    Files come from `<base_url>/<size>/<file>`, base_url defaulting to $MINIDPO_GPT2_URL, else OpenAI's public
    storage. Finished files are skipped and partial ones resumed (minidpo.download); sizes are pinned only for
    OpenAI's own URL, so a mirror or test server can serve other bytes.
    """
    if name not in SIZE_OF:
        raise ValueError(f"unknown GPT-2 model {name!r}; expected one of {', '.join(SIZE_OF)}")
    size = SIZE_OF[name]
    dest = Path(dest_dir).expanduser() if dest_dir is not None else gpt2_cache_dir(name)
    base = (base_url or os.environ.get("MINIDPO_GPT2_URL") or OPENAI_URL).rstrip("/")
    for fname in OPENAI_FILES:
        url = f"{base}/{size}/{fname}"
        try:
            download_file(url, dest / fname, expected_size=KNOWN_SIZES.get((size, fname)) if base == OPENAI_URL
                          else None, desc=f"GPT-2 {size} {fname}")
        except DownloadError as e:
            raise DownloadError(
                f"could not fetch GPT-2 {size}: {e}.\nTo install it by hand, put OpenAI's release files "
                f"({', '.join(NEEDED)}; from {base}/{size}/ or `python download_model.py {size}` in openai/gpt-2) "
                f"into {dest}/ (set MINIDPO_CACHE to move the cache), or pass load_gpt2 a directory with "
                "config.json + model.safetensors / pytorch_model.bin") from None
    return dest


def ensure_gpt2(name: str) -> Path:
    """The cache directory of GPT-2 `name`, downloading the release first if any needed file is missing."""
    d = gpt2_cache_dir(name)
    if all((d / f).is_file() for f in NEEDED):
        return d
    return download_gpt2(name, d)


# --------------------------------------------------------------------------- export

def save_hf(model: GPT, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write `model.safetensors` + `config.json` that transformers' GPT2LMHeadModel.from_pretrained loads.

    Keys are GPT2LMHeadModel's (`transformer.h.0.attn.c_attn.weight`, ...), projection weights in Conv1D layout
    [in, out]; lm_head.weight is left out because it is tied to wte (transformers re-ties it on load). `dtype`
    (e.g. torch.float16 for a small shipped model) casts floating tensors; default: as they are.
    """
    state = model.state_dict()
    wrapped = sorted({k.rsplit(".", 2)[0] for k in state if ".lora_" in k or ".base." in k})
    if wrapped:
        raise ValueError(f"save_hf: {len(wrapped)} layers still carry LoRA adapters (e.g. {wrapped[0]}); "
                         "fold them into the weights first with minidpo.lora.merge_and_unwrap(model)")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, t in state.items():
        if key == "lm_head.weight":
            continue
        t = t.detach()
        if key.endswith(LINEAR):
            t = t.t()  # nn.Linear [out, in] -> Conv1D [in, out]
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t.contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})  # transformers wants format=pt
    c = model.config
    stored = str(dtype or model.transformer.wte.weight.dtype).removeprefix("torch.")
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
              "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size,
              "n_ctx": c.block_size, "vocab_size": c.vocab_size, "n_inner": None, "layer_norm_epsilon": 1e-5,
              "attn_pdrop": c.dropout, "embd_pdrop": c.dropout, "resid_pdrop": c.dropout,
              "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
              "torch_dtype": stored}
    eot = 50256 if c.vocab_size > 50256 else None  # GPT-2's <|endoftext|>; a toy vocabulary has no such token
    config.update(bos_token_id=eot, eos_token_id=eot)
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / "config.json")
    return out
