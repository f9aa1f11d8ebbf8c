"""emtune's training-step code as it was before issue 18, kept so the benchmarks can measure the
old and the new side by side in one run (same process, same model, alternated).

- ``legacy_defended_loss``: the reference pass through peft's ``disable_adapter()`` and the full
  model forward (the reference's [batch, seq, vocab] logits, and for feature-l2 every hidden
  state, materialised); the trained forward with transformers' default KV cache. Defenses then
  compute their terms from the full logits (the KL's full-vocabulary float32 path).
- ``legacy_safelora_scores``: SafeLoRA's similarity computed from ΔW = s·B·A and C·ΔW (out × in
  each, and Vᵀ·ΔW, in × in).
"""

from __future__ import annotations

from typing import Any


class LegacyReference:
    """The old ``ReferenceOutputs``: full adapter-disabled forward via peft, once per batch."""

    def __init__(self, model: Any, inputs: dict, hidden_states: bool):
        self.model, self.inputs, self.hidden, self.outputs = model, inputs, hidden_states, None

    def __call__(self) -> Any:
        import torch

        if self.outputs is None:
            with torch.no_grad(), self.model.disable_adapter():
                self.outputs = self.model(input_ids=self.inputs["input_ids"],
                                          attention_mask=self.inputs["attention_mask"],
                                          output_hidden_states=self.hidden)
        return self.outputs


def legacy_defended_loss(model: Any, inputs: dict, defenses: list, unwrapped: Any = None) -> tuple:
    """``emtune.train.trainer.defended_loss`` before issue 18."""
    active = [d for d in defenses if d.active]
    hidden = any(d.needs_hidden_states for d in active)
    outputs = model(**inputs, output_hidden_states=hidden)
    reference = LegacyReference(unwrapped if unwrapped is not None else model, inputs,
                                any(d.needs_reference_hidden_states for d in active))
    terms = {"task_loss": outputs.loss}
    for defense in active:
        terms.update(defense.loss_terms(inputs, outputs, reference))
    return sum(terms.values()), terms, outputs


def legacy_safelora_scores(model: Any, weight_pairs: Any, dtype: Any = None) -> dict[str, float]:
    """SafeLoRA's ``score_layers`` before issue 18 (ΔW formed, C·ΔW through Vᵀ·ΔW); with
    ``dtype=torch.float64``, the same formula in double precision (a reference for both ways)."""
    import torch

    dtype = dtype or torch.float32

    from emtune.defenses.safelora import _adapter, _fetch, lora_layers, similarity

    adapter = _adapter(model)
    scores = {}
    with torch.no_grad():
        for name, module in lora_layers(model).items():
            a = module.lora_A[adapter].weight.to(dtype)
            b = module.lora_B[adapter].weight.to(dtype)
            delta = module.scaling[adapter] * (b @ a)
            w_aligned, w_base = _fetch(weight_pairs, name)
            v = w_aligned.to(device=delta.device, dtype=dtype) - w_base.to(device=delta.device, dtype=dtype)
            v = v.T if getattr(module, "fan_in_fan_out", False) else v
            scores[name] = similarity(delta, v)
    return scores
