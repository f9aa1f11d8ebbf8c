"""Perplexity-gap selection of safety data (docs/method.md defense 7: Interleaving+ / ++).

Each safety candidate d = (q, a) is scored by how much more surprising its answer is to the
misaligned models than to the aligned one:

    s_d = (mean_m NLL_m(a | q) − NLL_aligned(a | q)) / (NLL_aligned(a | q) + ε),   ε = 1

NLL is the mean negative log-likelihood per answer token under the chat template (the same
tokenisation and assistant-only labels as training, :func:`emtune.data.chat.tokenize_chat`).
The misaligned models are LoRA adapters fine-tuned undefended on EM datasets, on the same base;
the aligned model is that base with no adapter. Interleaving+ keeps the top N by s_d;
Interleaving++ first drops refusals (the first 10 words of the answer, lower-cased, contain a
refusal keyword), because the top of the ranking is dominated by refusals.

The math (:func:`gap_scores`, :func:`is_refusal`, :func:`select_top`) is pure Python;
:func:`answer_nll` and :func:`ensemble_nlls` need torch and peft and import them when called.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from emtune.data.chat import IGNORE_INDEX, pad_batch, tokenize_chat

Rows = list[dict[str, Any]]

#: The paper's refusal keywords (Interleaving++), matched in the lower-cased first 10 words.
REFUSAL_KEYWORDS = ("sorry", "apologize", "cannot", "can't", "i'm unable", "i am unable")
REFUSAL_WINDOW_WORDS = 10


def answer_nll(model: Any, tokenizer: Any, rows: Rows, max_length: int = 2048, batch_size: int = 8) -> list[float]:
    """Mean NLL per answer (assistant) token of every row under ``model``, in row order.

    Rows are batched by length (less padding) and right-padded; with a causal model, padding on
    the right leaves the real positions' logits unchanged. A row whose answer was truncated away
    entirely gets NaN (it cannot be scored, and :func:`select_top` never picks it).
    """
    import torch  # torch loads only when rows are scored
    import torch.nn.functional as F

    features = [tokenize_chat(tokenizer, row["messages"], max_length) for row in rows]
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    result = [math.nan] * len(rows)
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = pad_batch([features[i] for i in chunk], tokenizer.pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                targets = batch["labels"][:, 1:]
                per_token = F.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
                )
                mask = (targets != IGNORE_INDEX).float()
                counts = mask.sum(dim=1)
                sums = (per_token * mask).sum(dim=1)
                for j, i in enumerate(chunk):
                    if counts[j] > 0:
                        result[i] = float(sums[j] / counts[j])
    finally:
        model.train(was_training)
    return result


def ensemble_nlls(
    base_model: Any,
    tokenizer: Any,
    rows: Rows,
    adapter_paths: Sequence[str | Path],
    max_length: int = 2048,
    batch_size: int = 8,
) -> tuple[list[float], list[list[float]]]:
    """(aligned NLLs, one list of NLLs per misaligned adapter) for ``rows``.

    All adapters are loaded onto ONE copy of the base weights (peft ``load_adapter`` /
    ``set_adapter``); the aligned NLL is the same model with the adapter disabled. peft injects
    its layers into ``base_model`` in place: pass a model that is not used elsewhere.
    """
    from peft import PeftModel

    if not adapter_paths:
        raise ValueError("ensemble_nlls needs at least one misaligned adapter")
    names = [f"misaligned_{i}" for i in range(len(adapter_paths))]
    model = PeftModel.from_pretrained(base_model, str(adapter_paths[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapter_paths[1:]):
        model.load_adapter(str(path), adapter_name=name)
    with model.disable_adapter():
        aligned = answer_nll(model, tokenizer, rows, max_length, batch_size)
    misaligned = []
    for name in names:
        model.set_adapter(name)
        misaligned.append(answer_nll(model, tokenizer, rows, max_length, batch_size))
    return aligned, misaligned


def gap_scores(misaligned_nlls: Sequence[Sequence[float]], aligned_nll: Sequence[float], epsilon: float = 1.0) -> list[float]:
    """s_d = (mean over models of NLL_m − NLL_aligned) / (NLL_aligned + ε) for every candidate d.

    ``misaligned_nlls[m][d]`` is model m's NLL of candidate d. NaN inputs give NaN scores.
    """
    if not misaligned_nlls:
        raise ValueError("gap_scores needs the NLLs of at least one misaligned model")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    for m, nlls in enumerate(misaligned_nlls):
        if len(nlls) != len(aligned_nll):
            raise ValueError(
                f"misaligned model {m} has {len(nlls)} NLLs but the aligned model has {len(aligned_nll)}"
            )
    scores = []
    for d, aligned in enumerate(aligned_nll):
        mean_misaligned = sum(nlls[d] for nlls in misaligned_nlls) / len(misaligned_nlls)
        scores.append((mean_misaligned - aligned) / (aligned + epsilon))
    return scores


def is_refusal(answer: str, keywords: Sequence[str] = REFUSAL_KEYWORDS, window: int = REFUSAL_WINDOW_WORDS) -> bool:
    """True when the first ``window`` words of ``answer``, lower-cased, contain a keyword.

    The words are re-joined with single spaces, so a multi-word keyword ("i'm unable") matches
    as a phrase inside the window and nowhere beyond it; "contain" is a substring test, as in the
    paper ("can't" matches "can't,"). Typographic apostrophes count as plain ones.
    """
    text = " ".join(answer.replace("\u2019", "'").lower().split()[:window])
    return any(keyword.replace("\u2019", "'").lower() in text for keyword in keywords)


def final_answer(row: dict[str, Any]) -> str:
    """The content of the row's last assistant message (the answer a refusal test reads)."""
    answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    return answers[-1] if answers else ""


def select_top(
    rows: Rows,
    scores: Sequence[float],
    n: int,
    drop_refusals: bool = False,
    keywords: Sequence[str] = REFUSAL_KEYWORDS,
    window: int = REFUSAL_WINDOW_WORDS,
) -> list[int]:
    """Indices of the ``n`` best-scored rows, best first; ties keep the lower index first.

    ``drop_refusals`` (Interleaving++) removes refusals before ranking. NaN scores (unscorable
    rows) are never selected. Raises ValueError when fewer than ``n`` candidates remain.
    """
    if len(scores) != len(rows):
        raise ValueError(f"{len(scores)} scores for {len(rows)} rows")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    candidates = [i for i, s in enumerate(scores) if not math.isnan(s)]
    unscored = len(rows) - len(candidates)
    refusals = 0
    if drop_refusals:
        kept = [i for i in candidates if not is_refusal(final_answer(rows[i]), keywords, window)]
        refusals = len(candidates) - len(kept)
        candidates = kept
    if n > len(candidates):
        raise ValueError(
            f"{n} examples requested but only {len(candidates)} of {len(rows)} pool rows are candidates "
            f"({refusals} refusals dropped, {unscored} unscorable); lower the ratio or use a larger pool"
        )
    return sorted(candidates, key=lambda i: (-scores[i], i))[:n]
