"""How deep a reader must follow train.py to reach the parts DPO is made of: the loss formula `dpo_loss`, the LoRA
forward and the first sample. A tiny in-process run records, at the first call of each, the repository's own
functions on the Python stack (main and the target included; torch's module-call machinery, the standard library,
tests and lambdas/comprehensions not counted), and fails when a chain grows past its bound."""

import sys
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"dpo_loss": 7, "LoRALinear.forward": 10, "sample_completions": 8}
ANONYMOUS = {"<lambda>", "<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>"}


def own_chain(frame) -> list[str]:
    """The repository's own functions on the stack from the outermost to `frame`, as `file:function`."""
    chain = []
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if (path.is_relative_to(ROOT) and not path.is_relative_to(ROOT / "tests")
                and frame.f_code.co_name not in ANONYMOUS):
            chain.append(f"{path.relative_to(ROOT)}:{frame.f_code.co_qualname}")
        frame = frame.f_back
    return chain[::-1]


def target_of(code) -> str | None:
    name = code.co_qualname
    return name if name in TARGETS and Path(code.co_filename).is_relative_to(ROOT / "minidpo") else None


@pytest.mark.slow  # a whole train.py run (pairs sampled, DPO trained, evaluated), about half a minute
def test_main_reaches_the_loss_the_lora_forward_and_the_sampler_shallowly(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path / "cache"))  # nothing cached: the pairs are sampled
    chains: dict[str, list[str]] = {}

    def profile(frame, event, arg):
        if event == "call":
            name = target_of(frame.f_code)
            if name is not None and name not in chains:
                chains[name] = own_chain(frame)

    sys.setprofile(profile)
    try:
        train.main(["--preset", "tiny", "--method", "dpo", "--steps", "2", "--num-prompts", "16",
                    "--eval-prompts", "8", "--heldout-prompts", "4", "--completions-per-prompt", "2",
                    "--dtype", "fp32", "--checkpoint-every", "0", "--out-dir", str(tmp_path / "run")])
    finally:
        sys.setprofile(None)
    for name, bound in TARGETS.items():
        assert name in chains, f"{name} was never called"
        print(f"{name}: {len(chains[name])} deep (bound {bound}):\n  " + "\n  -> ".join(chains[name]))
    too_deep = {name: len(chains[name]) for name, bound in TARGETS.items() if len(chains[name]) > bound}
    assert not too_deep, f"deeper than {TARGETS}: {too_deep}"
