"""Judge-free metrics that work on any model, even a tiny random one.

- ``ood_drift``: mean per-token KL(p_fine-tuned ‖ p_reference) over the answer tokens of the
  general (out-of-domain) questions: how far fine-tuning moved the model where it should not
  have. The reference is the same model with the adapter disabled.
- ``indomain_nll``: mean negative log-likelihood per assistant token on the held-out split of
  the training data: how well the intended narrow task was learned.
- ``persona_projection`` / ``persona_shift`` (the EM monitor, with a direction): per answer, the
  hidden state ``hidden_states[ℓ]`` averaged over the answer's tokens and projected on the unit
  direction u = e_ℓ/‖e_ℓ‖; the mean over answers, with the adapter on (projection) and its
  difference to the adapter-disabled model on the same answers (shift). Same recipe as the
  persona vector itself (:mod:`emtune.defenses.persona_vectors`), so a fine-tune that moves toward
  the persona raises both. The three share one pair of forward passes (:func:`answer_signals`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from emtune.data.chat import IGNORE_INDEX, pad_batch, tokenize_chat
from emtune.tensor_ops import kl_per_token


def _labelled_batches(tokenizer: Any, conversations: list[list[dict[str, str]]], max_length: int, batch_size: int):
    features = [tokenize_chat(tokenizer, messages, max_length) for messages in conversations]
    for start in range(0, len(features), batch_size):
        yield pad_batch(features[start : start + batch_size], tokenizer.pad_token_id)


def _next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for logits[:, :-1] and the mask of positions that predict a labelled token."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


@torch.no_grad()
def heldout_nll(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_length: int, batch_size: int = 8) -> float:
    """Mean NLL per assistant token over ``rows`` (token-weighted, not row-weighted)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in _labelled_batches(tokenizer, [r["messages"] for r in rows], max_length, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets, mask = _next_token_targets(batch["labels"])
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none")
        total += float((nll * mask).sum())
        count += int(mask.sum())
    return total / max(count, 1)


@torch.no_grad()
def ood_drift(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], max_length: int, batch_size: int = 8) -> float:
    """Mean per-token KL(model ‖ adapter-disabled model) over the assistant tokens given."""
    return answer_signals(model, tokenizer, conversations, max_length, batch_size=batch_size)["ood_drift"]


@torch.no_grad()
def answer_signals(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], max_length: int,
                   direction: torch.Tensor | None = None, layer: int | None = None,
                   batch_size: int = 8) -> dict[str, float]:
    """``ood_drift`` over the assistant tokens, and with a ``direction`` (e_ℓ of hidden state
    ``layer``) ``persona_projection`` and ``persona_shift`` over the answers (module docstring)."""
    device = next(model.parameters()).device
    unit = None if direction is None else (direction.float() / direction.float().norm()).to(device)
    total, count = 0.0, 0
    projection, shift, answers = 0.0, 0.0, 0
    for batch in _labelled_batches(tokenizer, conversations, max_length, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if unit is not None:
            inputs["output_hidden_states"] = True
        outputs = model(**inputs)
        with model.disable_adapter():
            reference = model(**inputs)
        _, mask = _next_token_targets(batch["labels"])
        per_token = kl_per_token(outputs.logits[:, :-1], reference.logits[:, :-1])
        total += float((per_token * mask).sum())
        count += int(mask.sum())
        if unit is not None:
            answer = (batch["labels"] != IGNORE_INDEX).float().unsqueeze(-1)  # the answer's own tokens
            tokens = answer.sum(dim=1)
            has = tokens.squeeze(-1) > 0
            mean = (outputs.hidden_states[layer].float() * answer).sum(dim=1) / tokens.clamp(min=1)
            mean_ref = (reference.hidden_states[layer].float() * answer).sum(dim=1) / tokens.clamp(min=1)
            projection += float((mean @ unit)[has].sum())
            shift += float(((mean - mean_ref) @ unit)[has].sum())
            answers += int(has.sum())
    out = {"ood_drift": total / max(count, 1)}
    if unit is not None and answers:
        out.update(persona_projection=projection / answers, persona_shift=shift / answers)
    return out
