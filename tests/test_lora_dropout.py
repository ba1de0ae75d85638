"""LoRA dropout is on in every training step and off in every rollout (sampling and scoring run in eval mode)."""

import torch

from minidpo.model.generate import SamplingConfig
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import LoopConfig, TrainRun


def test_lora_dropout_is_on_in_every_training_step_and_off_in_every_rollout(tmp_path, monkeypatch):
    """Each LoRA forward with gradient (a training step) runs in train mode; each without (sampling, the rollout's
    scoring) in eval mode, from the first step on, whatever mode the model was loaded in."""
    from minidpo.methods.rloo import RLOOConfig, train_rloo
    from minidpo.model import lora as lora_mod
    from tests.test_pg import VowelScorer, tiny_setup
    model, tok, prompts = tiny_setup()
    model.eval()  # as stages.load_model_stage returns it
    for m in lora_mod.lora_layers(model).values():
        m.dropout = torch.nn.Dropout(0.5)
        m.train()  # as apply_lora leaves new modules
    seen = []
    forward = lora_mod.LoRALinear.forward

    def spy(self, x):
        if not self.disabled:
            seen.append((torch.is_grad_enabled(), self.training))
        return forward(self, x)
    monkeypatch.setattr(lora_mod.LoRALinear, "forward", spy)
    cfg = RLOOConfig(sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=4), k=2, prompts_per_step=2, kl_coef=0.1,
                     seed=1)
    train_rloo(model, tok, VowelScorer(), prompts, cfg,
               TrainRun(LoopConfig(steps=2, lr=1e-2, log_every=1, label="rloo"), tmp_path), Runtime())
    assert {(True, True), (False, False)} == set(seen)
