"""The memory-lean step: every-N-th-block activation checkpointing gives the same loss and LoRA
gradients as none; the Trainer arguments follow the spec; fused kernels only where they run."""

from __future__ import annotations

import pytest
import torch

from emtune.models import LoraSpec, TinyModelSpec, apply_lora, build_tiny_model
from emtune.train.memory import apply_fused_kernels, fused_kernels_available, memory_arguments, set_activation_checkpointing
from emtune.train.settings import TrainingSpec


def _model():
    torch.manual_seed(0)
    tiny = TinyModelSpec(hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=1, intermediate_size=64,
                         pretrain_steps=0)
    model = apply_lora(build_tiny_model(tiny, 300), LoraSpec(r=4, alpha=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return model.train()


def _loss_and_grads(model):
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 7, 11]])
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_every_second_block_checkpointed_gives_the_same_step() -> None:
    model = _model()
    loss, grads = _loss_and_grads(model)
    set_activation_checkpointing(model, 2)
    blocks = model.get_base_model().model.layers
    assert [b.gradient_checkpointing for b in blocks] == [True, False, True, False]
    selective_loss, selective_grads = _loss_and_grads(model)
    assert selective_loss == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == selective_grads.keys() and len(grads) == 4 * 7 * 2  # every LoRA A and B
    for name, grad in grads.items():
        torch.testing.assert_close(selective_grads[name], grad, rtol=1e-5, atol=1e-7)
    set_activation_checkpointing(model, 0)
    assert not any(b.gradient_checkpointing for b in blocks)


def test_trainer_arguments_follow_the_spec() -> None:
    assert memory_arguments(TrainingSpec(fused_kernels=False)) == {}
    every_third = memory_arguments(TrainingSpec(fused_kernels=False, activation_checkpointing=3))
    assert every_third == {"activation_checkpointing": True,
                           "activation_checkpointing_kwargs": {"every_n_layers": 3, "use_reentrant": False}}
    with_kernels = memory_arguments(TrainingSpec())
    assert ("use_liger_kernel" in with_kernels) == fused_kernels_available()
    if fused_kernels_available():
        assert with_kernels["liger_kernel_config"]["fused_linear_cross_entropy"] is False  # KL reads the logits


@pytest.mark.skipif(fused_kernels_available(), reason="checks the path without CUDA or liger-kernel")
def test_without_cuda_or_liger_the_model_is_left_alone() -> None:
    model = _model()
    before = [type(m).forward for m in model.modules()]
    assert apply_fused_kernels(model) is False
    assert [type(m).forward for m in model.modules()] == before


@pytest.fixture
def qwen2_module_restored():
    """Liger patches transformers' Qwen2 module itself (its RMSNorm and MLP classes, the RoPE
    function, the causal LM's forward), for every model built after it in the process: put them
    back, or the next test's CPU model would run Triton kernels (and a later comparison would
    compare Liger with Liger)."""
    from transformers.models.qwen2 import modeling_qwen2

    saved = dict(vars(modeling_qwen2))
    forward = modeling_qwen2.Qwen2ForCausalLM.forward
    yield
    for name, value in saved.items():
        setattr(modeling_qwen2, name, value)
    modeling_qwen2.Qwen2ForCausalLM.forward = forward


@pytest.mark.gpu
@pytest.mark.skipif(not fused_kernels_available(), reason="needs CUDA and liger-kernel")
def test_fused_kernels_give_the_plain_step_on_gpu(qwen2_module_restored) -> None:
    model = _model().cuda()
    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
    plain = model(**batch).loss.item()
    assert apply_fused_kernels(model)
    assert model(**batch).loss.item() == pytest.approx(plain, rel=1e-4)
    from transformers.models.qwen2 import modeling_qwen2

    assert "liger" in modeling_qwen2.apply_rotary_pos_emb.__module__  # the patch the fixture undoes
