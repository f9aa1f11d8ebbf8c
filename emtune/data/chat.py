"""Chat formatting with completion-only labels.

Each row is tokenised through the tokenizer's own chat template, and labels are kept only on
assistant tokens (everything else is -100). Assistant spans are found by rendering prefixes of
the conversation: the tokens between ``template(messages[:i], add_generation_prompt=True)`` and
``template(messages[:i+1])`` belong to assistant message i. This works for any template whose
prefixes are stable (ChatML/Qwen, Llama 3), and the same template serves training and evaluation,
so a default system prompt the template inserts is inserted consistently in both.
"""

from __future__ import annotations

from typing import Any

from emtune.tensor_ops import IGNORE_INDEX  # the label of tokens no loss is taken on


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]]:
    """Token ids, attention mask and assistant-only labels for one conversation, truncated."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        end = len(_render(tokenizer, messages[: i + 1], add_generation_prompt=False))
        if full[: len(prefix)] != prefix:
            raise ValueError("chat template renders unstable prefixes; cannot locate assistant tokens")
        labels[len(prefix) : end] = full[len(prefix) : end]
    full, labels = full[:max_length], labels[:max_length]
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt ready for generation (ends with the assistant header)."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def pad_batch(features: list[dict[str, list[int]]], pad_id: int, side: str = "right") -> dict[str, Any]:
    """Stack variable-length features into tensors; labels pad with -100, ids with ``pad_id``."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
    has_labels = "labels" in features[0]
    if has_labels:
        out["labels"] = []
    for f in features:
        gap = width - len(f["input_ids"])
        fill = {"input_ids": [pad_id] * gap, "attention_mask": [0] * gap, "labels": [IGNORE_INDEX] * gap}
        for key in out:
            out[key].append(f[key] + fill[key] if side == "right" else fill[key] + f[key])
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


class ChatCollator:
    """Data collator for the Trainer: right-pads tokenised chat features (picklable for Ray)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        return pad_batch(features, self.pad_id)
