"""The reference pass: the cached adapter switch gives exactly peft's ``disable_adapter()``
outputs and restores the adapter; the head-less reference pass gives exactly the full model's
adapter-disabled logits and hidden states; the pass runs once per batch."""

from __future__ import annotations

import pytest
import torch

from emtune.train import reference as ref_module
from emtune.train.reference import ReferenceOutputs, adapters_disabled, reference_pass


def _perturbed(tiny_lora):
    model, tokenizer = tiny_lora
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # B = 0 would make the adapter a no-op
    ids = torch.tensor([[5, 17, 42, 8, 99, 3], [7, 7, 120, 64, 2, 0]])
    return model, {"input_ids": ids, "attention_mask": torch.tensor([[1] * 6, [1] * 5 + [0]])}


def _logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)


def test_cached_switch_equals_peft_disable_adapter_and_restores_the_adapter(tiny_lora) -> None:
    model, batch = _perturbed(tiny_lora)
    adapted = _logits(model, batch).logits
    with model.disable_adapter():
        peft_reference = _logits(model, batch).logits
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    with adapters_disabled(model):
        ours = _logits(model, batch).logits
    assert not torch.equal(adapted, peft_reference)  # the adapter does change the model
    assert torch.equal(ours, peft_reference)
    assert torch.equal(_logits(model, batch).logits, adapted)  # switched back on
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    with pytest.raises(RuntimeError), adapters_disabled(model):
        raise RuntimeError("a failing reference pass")
    assert torch.equal(_logits(model, batch).logits, adapted)  # back on after an error too


def test_switch_finds_the_layers_once_and_falls_back_to_peft_for_merged_adapters(tiny_lora) -> None:
    model, batch = _perturbed(tiny_lora)
    first = ref_module._adapter_layers(model)
    assert len(first) == 2 * 7  # 2 blocks x 7 adapted projections
    assert ref_module._adapter_layers(model) is first  # cached: no second walk over the modules
    with model.disable_adapter():
        peft_reference = _logits(model, batch).logits
    model.merge_adapter()
    assert ref_module._adapter_layers(model) is None
    with adapters_disabled(model):  # peft's own context unmerges: same reference
        torch.testing.assert_close(_logits(model, batch).logits, peft_reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", [False, True])
def test_headless_reference_pass_equals_the_full_adapter_disabled_forward(tiny_lora, hidden: bool) -> None:
    model, batch = _perturbed(tiny_lora)
    with model.disable_adapter():
        full = _logits(model, batch, output_hidden_states=hidden)
    ref = reference_pass(model, batch, hidden_states=hidden)
    assert ref.full_logits is None  # no vocabulary-sized tensor until someone asks for logits
    assert torch.equal(ref.logits, full.logits)
    if hidden:
        assert torch.equal(ref.last_hidden_state, full.hidden_states[-1])
        assert len(ref.hidden_states) == len(full.hidden_states)
        assert all(torch.equal(a, b) for a, b in zip(ref.hidden_states, full.hidden_states))
    else:
        assert ref.hidden_states is None


def test_reference_outputs_run_one_pass_per_batch(tiny_lora) -> None:
    model, batch = _perturbed(tiny_lora)
    reference = ReferenceOutputs(model, batch, hidden_states=False)
    assert reference() is reference() and reference.calls == 1
