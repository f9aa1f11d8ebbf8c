"""Forward hooks on a causal LM's decoder blocks, shared by the defenses that change the residual
stream during training (persona steering adds a vector, CAFT projects directions out).

``hidden_states[ℓ]`` is the output of decoder block ℓ−1 (0 = the embeddings), the convention of
persona vectors; :func:`register_block_hook` puts a hook first among block ℓ−1's hooks, so
transformers' own output-capturing hook (``output_hidden_states``) sees the changed value.
"""

from __future__ import annotations

from typing import Any


def decoder_blocks(model: Any) -> Any:
    """The decoder blocks (a ModuleList) of a causal LM, looking through peft wrappers.

    Supports architectures that keep them at ``<causal LM>.model.layers`` (Qwen2, Llama,
    Mistral, Gemma, ...); anything else gets a clear error.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None or not hasattr(layers, "__getitem__") or not hasattr(layers, "__len__"):
        raise ValueError(
            f"persona_steering: cannot find the decoder blocks of {type(base).__name__} (looked for "
            f"`.model.layers`, as in Qwen2/Llama-style models); this architecture is not supported"
        )
    return layers


def block_output_hook(tensor: Any, apply: Any, positions: Any = None) -> Any:
    """A forward hook replacing a decoder block's hidden-state output h by ``apply(h, tensor, mask)``,
    ``tensor`` moved to h's device and dtype once per pair.

    With ``positions`` (a callable returning a [batch, tokens] mask, or None) ``apply`` gets the
    mask as [batch, tokens, 1] (it acts only where the mask is 1), and the hook changes nothing
    while it returns None (decode-only steering); without, the mask is None.
    """
    cache: dict[tuple[Any, Any], Any] = {}

    def hook(module: Any, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        mask = positions() if positions is not None else None
        if positions is not None and mask is None:
            return output  # decode-only steering outside an update pass: no shift
        if mask is not None and tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise RuntimeError(f"steering positions {tuple(mask.shape)} do not match the hidden states "
                               f"{tuple(hidden.shape[:2])}")
        key = (hidden.device, hidden.dtype)
        if key not in cache:
            cache[key] = tensor.to(device=hidden.device, dtype=hidden.dtype)
        where = None if mask is None else mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
        changed = apply(hidden, cache[key], where)
        return (changed,) + tuple(output[1:]) if isinstance(output, tuple) else changed

    return hook


def register_block_hook(model: Any, layer: int, hook: Any, field: str) -> Any:
    """Register ``hook`` on decoder block ``layer - 1`` (so it shapes ``hidden_states[layer]``),
    first among the block's hooks: transformers' own output-capturing hook then sees the changed
    value. ``field`` names the setting in the out-of-range error."""
    blocks = decoder_blocks(model)
    if not 1 <= layer <= len(blocks):
        raise ValueError(f"{field} {layer} is out of range: the model has {len(blocks)} decoder blocks "
                         f"(layers 1..{len(blocks)})")
    return blocks[layer - 1].register_forward_hook(hook, prepend=True)
