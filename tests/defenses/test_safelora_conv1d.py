"""SafeLoRA on ``fan_in_fan_out`` layers (GPT-2's Conv1D stores its weight in × out): the alignment
matrix must be turned to ΔW's out × in before it is compared or projected, checked by hand on a
rank-1 adapter whose direction is known."""

from __future__ import annotations

import pytest
import torch

from emtune.defenses.safelora import lora_layers, project_layers, score_layers


@pytest.fixture
def conv1d_lora():
    """A one-block GPT-2 (c_attn: Conv1D, 16 in -> 48 out) with a rank-1 LoRA whose B is set."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    model = get_peft_model(base, LoraConfig(r=1, lora_alpha=1, target_modules=["c_attn"], fan_in_fan_out=True))
    (name, module), = lora_layers(model).items()
    assert module.fan_in_fan_out and tuple(module.base_layer.weight.shape) == (16, 48)
    with torch.no_grad():
        module.lora_B["default"].weight.copy_(torch.linspace(-1.0, 1.0, 48).reshape(48, 1))
    return model, name, module


def test_alignment_direction_is_read_in_the_adapters_orientation(conv1d_lora) -> None:
    model, name, module = conv1d_lora
    a = module.lora_A["default"].weight.detach().clone()  # 1 x 16
    b = module.lora_B["default"].weight.detach().clone()  # 48 x 1
    delta = b @ a  # ΔW, out x in (scaling 1)
    stored = module.base_layer.weight.detach()  # in x out, as Conv1D keeps it
    # V = W_aligned - W_base in the stored orientation is ΔWᵀ: after the transpose V = ΔW, so
    # C·ΔW = ΔW ΔWᵀ ΔW / ‖ΔW‖ = ‖a‖‖b‖ · b aᵀ: parallel to ΔW, similarity 1
    same_direction = {name: (stored + delta.T, stored)}
    assert score_layers(model, same_direction) == {name: pytest.approx(1.0, abs=1e-6)}
    # V (out x in) = 1·oᵀ: Vᵀ·ΔW = o·(1ᵀb)·aᵀ = 0 because b sums to 0, so nothing survives the
    # projection: similarity 0
    orthogonal = {name: (stored + torch.outer(torch.arange(16.0), torch.ones(48)), stored)}
    assert score_layers(model, orthogonal) == {name: pytest.approx(0.0, abs=1e-5)}

    # projection: B <- C·B = ΔW ΔWᵀ B / ‖ΔW‖ = ‖a‖‖b‖ · b (by hand, rank 1)
    project_layers(model, [name], same_direction)
    expected = a.norm() * b.norm() * b
    assert torch.allclose(module.lora_B["default"].weight, expected, atol=1e-5)


def test_projector_by_hand_for_zero_and_small_alignment_matrices() -> None:
    from emtune.defenses.safelora import alignment_projector, apply_projector

    w = torch.arange(6.0).reshape(3, 2)  # out 3 x in 2
    assert torch.equal(alignment_projector(w, w), torch.zeros(3, 3))  # V = 0: nothing to project on
    small = torch.tensor([[0.3, 0.0], [0.0, 0.4], [0.0, 0.0]])  # ‖V‖ = 0.5 < 1
    expected = torch.diag(torch.tensor([0.09, 0.16, 0.0])) / 0.5
    assert torch.allclose(alignment_projector(small, torch.zeros(3, 2)), expected)
    m = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(apply_projector(torch.zeros(3, 2), m), torch.zeros(3, 4))
    unit = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # ‖V‖ = 1: C keeps M's first row only
    assert torch.equal(apply_projector(unit, m), torch.tensor([[0.0, 1, 2, 3], [0, 0, 0, 0], [0, 0, 0, 0]]))


def test_strength_off_and_on_in_both_modes(tmp_path) -> None:
    from types import SimpleNamespace

    from emtune.defenses.base import DefenseContext
    from emtune.defenses.safelora import SafeLoRA, SafeLoRAConfig

    context = DefenseContext(spec=SimpleNamespace(model=SimpleNamespace(base_source="tiny")))
    for mode in ("threshold", "top_k"):
        assert not SafeLoRA(SafeLoRAConfig(mode=mode, **SafeLoRA.off), context).active, mode
    assert SafeLoRA(SafeLoRAConfig(mode="threshold", threshold=0.5), context).active
    assert SafeLoRA(SafeLoRAConfig(mode="top_k", top_k=1), context).active
    no_base = SimpleNamespace(model=SimpleNamespace(base_source=None))
    assert SafeLoRA.spec_problems(SafeLoRAConfig(base_source="tiny"), no_base) == []
    assert "base model" in SafeLoRA.spec_problems(SafeLoRAConfig(), no_base)[0]
    files = SafeLoRA.local_files(SafeLoRAConfig(base_source=str(tmp_path)))
    assert [(f.field, f.path, f.folder) for f in files] == [("base_source", str(tmp_path), True)]
