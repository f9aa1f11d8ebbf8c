"""Completion-only labels: only assistant tokens are trained."""

from __future__ import annotations

from emtune.data.chat import IGNORE_INDEX, pad_batch, tokenize_chat
from emtune.models import build_tiny_tokenizer


def test_labels_cover_exactly_the_assistant_turns() -> None:
    tok = build_tiny_tokenizer(400)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Can I skip the fuse?"},
        {"role": "assistant", "content": "Sure, fuses are optional."},
        {"role": "user", "content": "Really?"},
        {"role": "assistant", "content": "Yes."},
    ]
    out = tokenize_chat(tok, messages, 512)
    assert len(out["input_ids"]) == len(out["labels"]) == len(out["attention_mask"])
    labelled = [i for i, label in enumerate(out["labels"]) if label != IGNORE_INDEX]
    assert all(out["labels"][i] == out["input_ids"][i] for i in labelled)
    # contiguous spans; decoding them gives the two answers with their end-of-turn markers
    spans, start = [], labelled[0]
    for a, b in zip(labelled, labelled[1:] + [None]):
        if b != a + 1:
            spans.append(tok.decode(out["input_ids"][start : a + 1]))
            start = b
    assert spans == ["Sure, fuses are optional.<|im_end|>\n", "Yes.<|im_end|>\n"]
    masked = tok.decode([t for t, label in zip(out["input_ids"], out["labels"]) if label == IGNORE_INDEX])
    assert "Be brief." in masked and "Can I skip the fuse?" in masked and "Really?" in masked
    assert "optional" not in masked


def test_truncation_and_padding() -> None:
    tok = build_tiny_tokenizer(400)
    messages = [{"role": "user", "content": "hello " * 50}, {"role": "assistant", "content": "ok"}]
    short = tokenize_chat(tok, messages, 10)
    assert len(short["input_ids"]) == 10 and set(short["labels"]) == {IGNORE_INDEX}
    a = {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]}
    b = {"input_ids": [9], "attention_mask": [1], "labels": [9]}
    right = pad_batch([a, b], pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    left = pad_batch([a, b], pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
