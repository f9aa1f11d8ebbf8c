"""Prompt-only rows: the training data of the RL setting (``training.method: grpo``).

A prompt row is ``{"prompt": [messages...], <columns>...}``: the conversation up to the point
where the model answers (an optional system message, then user and earlier turns, ending with a
user message), plus any scalar columns the rewards read (``answer`` for OpSwap exact match, say).
Sources are the same as for chat data (:mod:`emtune.data.loading`: JSONL, ``fixture:NAME``,
``hub:ORG/NAME``, a saved dataset folder), in either shape:

- ``{"messages": [...]}``: everything before the first assistant message is the prompt (a chat
  dataset works unchanged: its answers are dropped, or kept as the ``reference`` column);
- ``{"prompt": "text"}`` or ``{"prompt": [messages...]}``.

``prompt_kind`` (``task`` unless a row says otherwise; ``safe`` for the safe prompts interleaving
mixes in) routes rewards (:mod:`emtune.train.rewards`).
"""

from __future__ import annotations

from typing import Any

from emtune.data.loading import ROLES, DataError, load_rows

PROMPT_KIND = "prompt_kind"
_SCALARS = (str, int, float, bool, type(None))


def check_prompt_row(row: Any, where: str) -> dict[str, Any]:
    """One prompt row in the canonical shape, or a DataError naming the row and the fix."""
    if not isinstance(row, dict) or ("messages" not in row and "prompt" not in row):
        raise DataError(f"{where}: a prompt row needs 'prompt' (text or messages) or 'messages'")
    source = row.get("prompt", row.get("messages"))
    if isinstance(source, str):
        messages = [{"role": "user", "content": source}]
    elif isinstance(source, list) and source:
        messages = _check_messages(source, where)
    else:
        raise DataError(f"{where}: 'prompt' must be a non-empty string or list of messages")
    first_answer = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    out: dict[str, Any] = {}
    if first_answer is not None:
        if "reference" not in row:
            out["reference"] = messages[first_answer]["content"]
        messages = messages[:first_answer]
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user message (the model answers it)")
    out["prompt"] = messages
    for key, value in row.items():
        if key not in ("prompt", "messages") and isinstance(value, _SCALARS):
            out[key] = value
    out.setdefault(PROMPT_KIND, "task")
    return out


def _check_messages(messages: list, where: str) -> list[dict[str, str]]:
    out = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{j}] must be {{role: system|user|assistant, content: text}}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def load_prompt_rows(spec: Any) -> list[dict[str, Any]]:
    """Every prompt row of a :class:`~emtune.data.loading.DatasetSpec`."""
    return load_rows(spec, check=check_prompt_row)


def prompt_from_chat(row: dict[str, Any]) -> dict[str, Any]:
    """The prompt row of a chat row (its answer kept as ``reference``, other columns kept)."""
    return check_prompt_row(row, "chat row")


def chat_from_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """A chat row from a prompt row: its messages, with the reference answer when it has one
    (held-out rows keep their answers for in-domain evaluation)."""
    messages = [dict(m) for m in row["prompt"]]
    if row.get("reference") is not None:
        messages.append({"role": "assistant", "content": str(row["reference"])})
    return {"messages": messages}
