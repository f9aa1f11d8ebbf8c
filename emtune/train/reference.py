"""The reference model's pass: the same network with the LoRA adapter switched off.

With LoRA the aligned reference model is the trained network with its adapter disabled, so KL
and feature-space defenses need no second copy of the weights. Two things keep that pass cheap:

- :func:`adapters_disabled` flips the ``_disable_adapters`` flag of the model's LoRA layers, found
  once per model and cached, instead of peft's ``disable_adapter()``, which walks every module
  and parameter of the model twice per call (``get_model_status``, then disable and enable) and
  toggles ``requires_grad`` on every adapter weight. The forward pass only reads that flag, so
  the outputs are exactly peft's.
- :func:`reference_pass` runs the decoder without its LM head: the reference's logits over the
  vocabulary ([batch, seq, vocab], 152k wide for Qwen2.5) are not formed unless a defense asks for
  them. :class:`ReferenceOutputs` hands out the final hidden states and the head, so the KL can
  compute the reference's logits a few positions at a time (``emtune.tensor_ops``).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

_LAYERS: "weakref.WeakKeyDictionary[Any, tuple[tuple, list]]" = weakref.WeakKeyDictionary()
# config fields that transform the LM head's output (softcapping, scaling): with any of them set,
# the reference's logits come from the model's own forward instead of head(hidden states)
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _adapter_layers(model: Any) -> list | None:
    """The modules whose ``_disable_adapters`` flag switches the adapter off (LoRA layers and
    peft's modules-to-save wrappers), cached per model and adapter set; None when the cheap switch
    does not apply (not a peft LoRA-style model, or an adapter merged into its weights)."""
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper  # peft >= 0.15
        kinds: tuple = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    except ImportError:  # older peft
        kinds = (BaseTunerLayer,)
    config = getattr(model, "peft_config", None)
    if not config or not hasattr(model, "base_model") or any(c.is_prompt_learning for c in config.values()):
        return None
    key = (tuple(sorted(config)), getattr(model, "active_adapter", None))
    cached = _LAYERS.get(model)
    if cached is None or cached[0] != key:
        layers = [m for m in model.base_model.modules() if isinstance(m, kinds)]
        cached = (key, layers)
        _LAYERS[model] = cached
    layers = cached[1]
    if not layers or any(getattr(layer, "merged", False) for layer in layers):
        return None
    return layers


@contextmanager
def adapters_disabled(model: Any) -> Iterator[None]:
    """Run the block with the adapter switched off (peft's ``disable_adapter()``, same outputs)."""
    layers = _adapter_layers(model)
    if layers is None:
        with model.disable_adapter():
            yield
        return
    before = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer, flag in zip(layers, before):
            layer._disable_adapters = flag


def _plain_head(model: Any) -> Any:
    """The reference's LM head as a module (its base layer when LoRA or modules-to-save wrap it),
    or None when the model transforms the head's output or has no separable head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _HEAD_TRANSFORMS):
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or not hasattr(base, "get_decoder") or base.get_decoder() is None:
        return None
    if hasattr(head, "get_base_layer"):
        head = head.get_base_layer()
    return getattr(head, "original_module", head)


@dataclass
class ReferencePass:
    """One batch through the reference model: the final hidden states (the decoder's output, final
    norm applied) and the LM head, or, for a model whose head output is transformed, its logits;
    every hidden state when they were asked for."""

    last_hidden_state: Any = None
    head: Any = None
    hidden_states: Any = None
    full_logits: Any = None

    @property
    def logits(self) -> "torch.Tensor":
        """The reference's logits over the whole vocabulary (formed on first use, then kept)."""
        if self.full_logits is None:
            with torch.no_grad():
                self.full_logits = self.head(self.last_hidden_state)
        return self.full_logits


def reference_pass(model: Any, inputs: dict[str, Any], hidden_states: bool) -> ReferencePass:
    """The adapter-disabled model on ``inputs`` (no gradient), stopping before the LM head."""
    head = _plain_head(model)
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  output_hidden_states=hidden_states, use_cache=False)
    with torch.no_grad(), adapters_disabled(model):
        if head is None:
            out = model(**kwargs)
            return ReferencePass(hidden_states=out.hidden_states, full_logits=out.logits)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        out = base.get_decoder()(**kwargs)
        return ReferencePass(last_hidden_state=out.last_hidden_state, head=head, hidden_states=out.hidden_states)


class ReferenceOutputs:
    """The reference pass on one batch, computed once on first use and shared by every defense.

    Calling it returns the :class:`ReferencePass` (``.logits``, ``.hidden_states``,
    ``.last_hidden_state`` and ``.head``); ``calls`` counts the passes actually run.
    """

    def __init__(self, model: Any, inputs: dict[str, Any], hidden_states: bool):
        self._model = model
        self._inputs = inputs
        self._hidden = hidden_states
        self._outputs: ReferencePass | None = None
        self.calls = 0

    def __call__(self) -> ReferencePass:
        if self._outputs is None:
            self.calls += 1
            self._outputs = reference_pass(self._model, self._inputs, self._hidden)
        return self._outputs
