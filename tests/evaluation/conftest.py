"""A tiny base model with varied answers, saved, and LoRA adapters that change its answers.

The shared tiny models are initialised with std 0.02, which makes a random model repeat one token
forever: useless for telling batched from one-at-a-time decoding or one adapter from another.
Here every matrix is drawn with std 0.3, so answers differ from prompt to prompt and token to
token, and each adapter's B matrices are drawn large enough to change them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

LIVELY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, pretrain_steps=0)


@dataclass(frozen=True)
class LivelyTiny:
    """``base``: a saved model folder (weights + tokenizer); ``adapters``: saved LoRA folders."""

    base: Path
    adapters: tuple[Path, ...]

    def peft_model(self, adapter: int):
        """The base with adapter ``adapter`` loaded (unmerged), as a trial's worker holds it."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(self.base), self.adapters[adapter])

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.base)


@pytest.fixture(scope="session")
def lively_tiny(tmp_path_factory: pytest.TempPathFactory) -> LivelyTiny:
    import torch

    from emtune.models import LoraSpec, TinyModelSpec, apply_lora, build_tiny_model, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("lively")
    tokenizer = build_tiny_tokenizer(400)
    generator = torch.Generator().manual_seed(11)

    def lively_model():
        model = build_tiny_model(TinyModelSpec(**LIVELY), len(tokenizer))
        weights = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.copy_(torch.randn(param.shape, generator=weights) * 0.3)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model

    base = lively_model()
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapters = []
    for i in range(2):
        lora = apply_lora(lively_model(), LoraSpec(r=4, alpha=8))
        with torch.no_grad():
            for name, param in lora.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.8)
        lora.save_pretrained(root / f"adapter{i}")
        adapters.append(root / f"adapter{i}")
    return LivelyTiny(root / "base", tuple(adapters))
