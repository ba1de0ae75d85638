"""
What a run uses when the user leaves it to us: the device, the precision, the model weights and the IMDB data; and
the checks that every path is usable before any work starts.

`--device auto` picks CUDA, then Apple's MPS, then the CPU. `--dtype auto` is bf16 autocast on CUDA and on a CPU
with AMX-BF16 or AVX512-BF16 (where oneDNN's bf16 kernels run several times faster than fp32; without them bf16
autocast on CPU is slower than fp32), fp32 elsewhere. `--model auto` picks the official GPT-2 (124M) when it is in the
cache or can be downloaded, else the small model bundled in data/tiny-imdb-gpt2/ (the caller then applies the tiny
preset's settings and says so). `--data auto` picks the full IMDB set in the cache, else the sample shipped in data/.
Every choice is reported back so that summary.json can record what was really used. Nothing here prints: notes are
returned to the caller.
"""

import os
import textwrap
from pathlib import Path

import torch

from minidpo.config import ConfigError, flag_name
from minidpo.model.gpt import GPT

REPO = Path(__file__).resolve().parents[2]
BUNDLED_MODEL = REPO / "data" / "tiny-imdb-gpt2"
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}", "device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (try --device cpu)", "device")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}", "device")
    return device


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (`lscpu`'s Flags); empty where there is no /proc/cpuinfo."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def choose_dtype(device: torch.device, name: str = "auto",
                 flags: set[str] | None = None) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for fp32, why) for --dtype; `flags` defaults to this machine's CPU flags."""
    if name not in ("auto", *DTYPES):
        raise ConfigError(f"--dtype must be auto, fp32 or bf16, got {name!r}", "dtype")
    if name != "auto":
        return DTYPES[name], f"--dtype {name}"
    if device.type == "cuda":
        return torch.bfloat16, "auto: CUDA (bf16 tensor cores, no loss scaling)"
    if device.type == "cpu":
        have = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
        if have:
            return torch.bfloat16, f"auto: this CPU has {' and '.join(have)}"
        return None, "auto: this CPU has neither amx_bf16 nor avx512_bf16 (bf16 would be slower than fp32)"
    return None, f"auto: fp32 on {device.type}"


def slow_dtype_warning(device: torch.device, dtype: torch.dtype | None, flags: set[str] | None = None) -> str | None:
    """One line for a --dtype bf16 the CPU has no bf16 units for (`flags` defaults to this machine's): autocast
    then emulates bf16 and runs several times slower than fp32, which --dtype auto would have chosen."""
    if device.type != "cpu" or dtype is not torch.bfloat16:
        return None
    if set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags):
        return None
    return ("warning: --dtype bf16 on a CPU with neither amx_bf16 nor avx512_bf16 runs several times slower than "
            "fp32 (--dtype auto or fp32 is faster here)")


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def looks_like_path(name: str) -> bool:
    return os.sep in name or name.startswith(".") or Path(name).suffix in (".safetensors", ".bin", ".json")


def check_model_name(name: str) -> None:
    """A --model that is meant as a path must exist, checked before any work."""
    if name not in ("auto", "bundled", "random") and looks_like_path(name) and not Path(name).exists():
        raise ConfigError(f"--model {name}: no such file or directory (expected a GPT-2 name such as gpt2, "
                          "bundled, or the path of a model directory or weights file)", "model")


def load_model(name: str, device: torch.device) -> tuple[GPT, str, list[str]]:
    """(model, what was loaded, notes for the user). `auto`: official gpt2, else the bundled model."""
    from minidpo.formats.download import DownloadError
    from minidpo.model.weights import load_gpt2

    if name == "bundled":
        return load_gpt2(BUNDLED_MODEL, device=device), "bundled", []
    if name != "auto":
        return load_gpt2(name, device=device), name, []
    try:
        return load_gpt2("gpt2", device=device), "gpt2", []
    except DownloadError as e:
        # never break inside a word: a path or URL cut at a hyphen could not be copied back
        reason = textwrap.wrap(f"({str(e).splitlines()[0]})", 112, initial_indent="  ", subsequent_indent="   ",
                               break_on_hyphens=False, break_long_words=False)
        notes = ["--model auto: the official GPT-2 weights are not cached and could not be downloaded", *reason,
                 f"  so this run uses the small bundled model {BUNDLED_MODEL.relative_to(REPO)} (see data/README.md)",
                 "  with the tiny preset's settings; for GPT-2 124M run once with network access, or place",
                 "  OpenAI's files by hand (see README)."]
        return load_gpt2(BUNDLED_MODEL, device=device), "bundled", notes


def model_source(desc: str) -> str:
    """What run.json records for a model: names stay names, paths become absolute (the run folder may move)."""
    if desc in ("bundled", "auto") or not looks_like_path(desc):
        return desc
    return str(Path(desc).resolve())


def imdb_source(name: str, flag: str = "data") -> tuple[Path, str]:
    """(path, note). `auto`: the full set in the cache, else the shipped sample; `sample`: the sample; else a path."""
    from minidpo.dataset.imdb import IMDB_FILENAME, IMDB_SAMPLE_PATH
    from minidpo.formats.download import cache_dir

    if name == "auto":
        full = cache_dir() / IMDB_FILENAME
        if full.is_file():
            return full, f"[data] using the full IMDB set at {full}"
        return Path(IMDB_SAMPLE_PATH), (f"[data] {full} not found: using the shipped sample; "
                                        "`python -c 'import minidpo.dataset.imdb as m; m.download_imdb()'` "
                                        "gets the full set")
    if name == "sample":
        return Path(IMDB_SAMPLE_PATH), ""
    path = Path(name)
    if not path.exists():
        raise ConfigError(f"{flag_name(flag)} {name}: no such file or directory (expected aclImdb_v1.tar.gz "
                          "or an extracted aclImdb directory; `auto` uses the cache or the shipped sample)", flag)
    return path.resolve(), ""


def check_writable(directory: Path, what: str) -> None:
    """Create `directory` if needed and prove we can write there, before any work that would be lost otherwise."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what} {directory}: not writable ({e.strerror or e})") from None
