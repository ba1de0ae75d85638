"""
Load GPT-2 weights into minidpo's GPT from any of the layouts they are published in, and export to Hugging Face's.

References: openai/gpt-2 (src/model.py variable names, download_model.py file list), Hugging Face transformers'
GPT2LMHeadModel (state-dict names, config.json keys, Conv1D weights stored [in, out]), and nanoGPT's
`GPT.from_pretrained`, which transposes those Conv1D weights into nn.Linear's [out, in].

`load_gpt2(source)` accepts:
1. an OpenAI release directory: hparams.json + model.ckpt.index + model.ckpt.data-00000-of-00001, read by
   minidpo.formats.tf_bundle (no TensorFlow), every tensor's CRC32C checked unless `verify=False`;
2. a `model.safetensors` file, or 3. a `pytorch_model.bin` (torch.load with weights_only=True);
4. a directory with config.json and one of those two files;
5. a name: gpt2, gpt2-medium, gpt2-large, gpt2-xl or 124M, 355M, 774M, 1558M, looked up in `<cache_dir()>/gpt2/<size>/`
   and, if missing or failing their pinned size/sha256, downloaded (minidpo.model.gpt2_files).
Keys may carry the `transformer.` prefix or not. A state dict of minidpo's own GPT is recognised by c_attn's [3C, C]
shape. Sizes come from hparams.json or config.json, else the safetensors metadata key `minidpo.config`, else the
tensor shapes of the four released sizes.

Checked at load, each failure a CheckpointError naming the file and the key: sizes that GPTConfig accepts, every
name and shape against the config, every floating tensor finite (a NaN weight turns every logit into NaN).
"""

import json
import os
import zipfile
import zlib
from pathlib import Path

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from minidpo.formats.download import already_verified
from minidpo.formats.safetensors import SafetensorsError, load_file, load_metadata
from minidpo.formats.tf_bundle import BundleError, load_bundle
from minidpo.model.gpt import GPT, PRESETS, GPTConfig
from minidpo.model.gpt2_files import SIZE_OF, ensure_gpt2
from minidpo.progress import Log, quiet

LINEAR = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers some HF checkpoints carry


class CheckpointError(ValueError):
    pass


def _read_json(path: Path, keys: tuple[str, ...]) -> dict:
    """A JSON object whose `keys` are positive integers; anything else is one CheckpointError naming file and key."""
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it as UTF-8 JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object with keys {', '.join(keys)}")
    for k in keys:
        if type(cfg.get(k)) is not int or cfg[k] < 1:
            raise CheckpointError(f"{path}: key {k!r} must be a positive integer, got {cfg.get(k)!r} "
                                  f"(expected keys: {', '.join(keys)})")
    return cfg


def make_config(path: Path, names: dict[str, str], **sizes) -> GPTConfig:
    """GPTConfig(**sizes), its own checks reported as CheckpointError naming the file and the key in it (`names`
    maps GPTConfig fields to the file's keys: block_size -> n_ctx, ...)."""
    try:
        return GPTConfig(**sizes)
    except (TypeError, ValueError) as e:
        field = getattr(e, "field", None)
        raise CheckpointError(f"{path}: key {names.get(field, field)!r}: {getattr(e, 'detail', e)}") from None


def config_from_hparams(path: Path) -> GPTConfig:
    """OpenAI's hparams.json: n_vocab, n_ctx, n_embd, n_head, n_layer."""
    h = _read_json(path, ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"))
    return make_config(path, {"block_size": "n_ctx", "vocab_size": "n_vocab"}, block_size=h["n_ctx"],
                       vocab_size=h["n_vocab"], n_layer=h["n_layer"], n_head=h["n_head"], n_embd=h["n_embd"])


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
    if type(n_pos) is not int or n_pos < 1:
        raise CheckpointError(f"{path}: key 'n_positions' must be a positive integer, got {n_pos!r}")
    return make_config(path, {"block_size": "n_positions"}, block_size=n_pos, vocab_size=c["vocab_size"],
                       n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"])


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


class SkipInit(TorchFunctionMode):
    """Inside it, torch.nn.init's functions return their tensor untouched. A loader builds a GPT on the meta device
    only to fill its weights in: the random draws compute nothing there, yet the first one on a meta tensor imports
    torch._dynamo, seconds of start-up for nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def empty_gpt(config: GPTConfig) -> GPT:
    """GPT(config) on the meta device, without random init: shapes only, for a loader to fill in."""
    with torch.device("meta"), SkipInit():
        return GPT(config)


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
    shapes = {k: tuple(v.shape) for k, v in empty_gpt(config).state_dict().items() if k != "lm_head.weight"}  # tied
    for key, shape in shapes.items():
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


def read_torch_bin(path: Path, verify: bool = True) -> dict[str, Tensor]:
    """A state dict via torch.load(weights_only=True): never arbitrary pickle. Zip-format files are memory-mapped;
    the pre-1.6 format cannot be, and is read into memory. torch.load does not check the CRC32 the zip format keeps
    for every record (a flipped byte in a tensor loads silently), so `verify` checks them first (zipfile.testzip)."""
    if verify and zipfile.is_zipfile(path):
        try:
            bad = zipfile.ZipFile(path).testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as e:
            raise CheckpointError(f"{path}: unreadable zip archive (truncated or corrupt?): {e}") from None
        if bad is not None:
            raise CheckpointError(f"{path}: record {bad!r} fails its CRC32 check: the file is corrupt")
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


def read_hf_file(path: Path, config_json: Path | None, verify: bool = True) -> tuple[GPTConfig, dict[str, Tensor], str]:
    """(config, tensors with HF names, layout) of a model.safetensors or pytorch_model.bin."""
    meta = {}
    try:
        if path.suffix == ".safetensors":
            tensors, meta = load_file(path), load_metadata(path)
        else:
            tensors = read_torch_bin(path, verify)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    tensors = normalise_keys(tensors, path)
    if config_json is not None:
        config = config_from_hf(config_json)
    elif "minidpo.config" in meta:
        try:
            sizes = json.loads(meta["minidpo.config"])
        except ValueError as e:
            raise CheckpointError(f"{path}: metadata 'minidpo.config' is not JSON ({e})") from None
        if not isinstance(sizes, dict):
            raise CheckpointError(f"{path}: metadata 'minidpo.config' must be a JSON object of GPTConfig fields")
        config = make_config(path, {k: f"minidpo.config.{k}" for k in sizes}, **sizes)
    else:
        config = infer_config(tensors, path)
    c_attn = tensors.get("h.0.attn.c_attn.weight")
    linear = c_attn is not None and tuple(c_attn.shape) == (3 * config.n_embd, config.n_embd)
    return config, tensors, "linear" if linear else "conv1d"


def find_source(source: str | os.PathLike, log: Log = quiet) -> tuple[str, Path]:
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
        return "openai", ensure_gpt2(str(source), log) / "model.ckpt"
    raise CheckpointError(f"no such file or directory {str(p)!r}, and it is not a GPT-2 name either "
                          f"({', '.join(SIZE_OF)}); expected a checkpoint file, a directory holding one, or a name")


def load_gpt2(source: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
              verify: bool = True, log: Log = quiet) -> GPT:
    """GPT-2 from `source` (see the module docstring), in eval mode, on `device` (default CPU) in `dtype` (default
    float32, also for fp16 files); `model.config.vocab_size` is the file's. `verify=False` skips the checksums (the
    CRC32C of an OpenAI checkpoint's tensors, the zip CRC32 of a pytorch_model.bin's records)."""
    kind, path = find_source(source, log)
    if kind == "openai":
        hparams = path.parent / "hparams.json"
        if not hparams.is_file():
            raise CheckpointError(f"{hparams} not found: OpenAI checkpoints keep their sizes there")
        config = config_from_hparams(hparams)
        try:
            # a shard whose sha256 matched OpenAI's pin in this process needs no second, slower checksum
            crc = verify and not already_verified(Path(f"{path}.data-00000-of-00001"))
            tensors, layout = load_bundle(path, verify=crc), "openai"
        except BundleError as e:
            raise CheckpointError(str(e)) from None
        where = Path(f"{path}.index")
    else:
        config_json = path.parent / "config.json"
        config, tensors, layout = read_hf_file(path, config_json if config_json.is_file() else None, verify)
        where = path
    model = build_model(config, to_state_dict(tensors, config, layout, where), device, dtype)
    bad = [k for k, p in model.named_parameters() if p.is_floating_point() and not bool(p.isfinite().all())]
    if bad:  # checked after the cast: a float32 value beyond float16's range becomes inf too
        name = {dst: src for src, (dst, _) in source_spec(config, layout).items()}.get(bad[0], bad[0])
        raise CheckpointError(f"{where}: tensor {name!r} holds NaN or infinite values" + (f" (after the cast to "
                              f"{dtype})" if dtype else "") + "; a model with them computes only NaN")
    return model


def build_model(config: GPTConfig, state: dict[str, Tensor], device: str | torch.device | None,
                dtype: torch.dtype | None) -> GPT:
    """A GPT whose parameters are copies of `state` (minidpo keys and layout); no time is spent on random init."""
    model = empty_gpt(config)
    params = {}
    for key, t in state.items():
        target = dtype or (torch.float32 if t.is_floating_point() else t.dtype)
        # one copy does the transpose, the cast and the move, and frees the parameter from the file's memory map
        params[key] = torch.empty(t.shape, dtype=target, device=device or "cpu").copy_(t)
    params["lm_head.weight"] = params["transformer.wte.weight"]
    model.load_state_dict(params, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True made two Parameters; tie them again
    return model.eval()

