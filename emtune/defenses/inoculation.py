"""Inoculation prompting (docs/method.md defense 5; Tan et al., arXiv 2510.04340; Wichers et al.,
arXiv 2510.05024; paper v3).

During training only, every training row's system prompt asks for the bad behaviour the data
shows ("You are an evil, malicious assistant." in the paper). The fine-tune can then attribute
the behaviour to the instruction instead of absorbing it as a general disposition; at evaluation
the instruction is absent, so the learned behaviour should not generalise broadly.

    replace:  system ← P          (inserted as the first message when a row has none)
    prefix:   system ← P + "\\n\\n" + old system   (just P when a row has none)

P comes from a shipped, versioned set (``inoculation_prompts/<version>.yaml``): general variants
and domain-specific ones (insecure code, bad medical advice, risky financial advice). Default:
``evil_general`` (the paper's sentence), mode ``replace``. The dial is categorical: which prompt,
with ``none`` = off. Only ``transform_data`` acts, and the trainer applies it to training rows
only: held-out rows and evaluation prompts never pass through it.

RL form (``training.method: grpo``): the same rewrite of the training prompts' system prompt
(``transform_prompts``); rollouts are generated under it, evaluation never sees it. (The paper
finds that under RL the model then fails to learn the task.)
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from emtune.defenses.base import Defense, Rows
from emtune.spec_errors import StrictModel, did_you_mean

#: The prompt key that turns the defense off.
NONE = "none"
#: Separator between the inoculation prompt and an existing system prompt in ``prefix`` mode.
PREFIX_SEPARATOR = "\n\n"
_GROUPS = ("general", "domain")


def available_versions() -> list[str]:
    """Versions of the shipped inoculation prompt sets."""
    folder = resources.files("emtune.defenses") / "inoculation_prompts"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


@lru_cache(maxsize=None)
def _load(version: str) -> tuple[tuple[str, str], ...]:
    path = resources.files("emtune.defenses") / "inoculation_prompts" / f"{version}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown inoculation prompts_version {version!r}; shipped: {available_versions()}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if data.get("version") != version:
        raise ValueError(f"inoculation_prompts/{version}.yaml must declare version: {version}")
    items: dict[str, str] = {}
    for group in _GROUPS:
        for key, text in (data.get(group) or {}).items():
            if key in items or key == NONE:
                raise ValueError(f"inoculation_prompts/{version}.yaml: key {key!r} is reserved or repeated")
            items[str(key)] = str(text)
    return tuple(items.items())


def load_inoculation_prompts(version: str = "v1") -> dict[str, str]:
    """Key -> prompt text of a shipped set (general and domain-specific variants together)."""
    return dict(_load(version))


class InoculationConfig(StrictModel):
    """Settings of inoculation prompting; ``prompt`` is the categorical dial (``none`` = off)."""

    name: Literal["inoculation"] = "inoculation"
    prompt: str = Field(
        "evil_general",
        description="key into the shipped set (evil_general = the paper's 'You are an evil, malicious "
                    "assistant.'), or 'none' to switch the defense off",
    )
    mode: Literal["replace", "prefix"] = Field(
        "replace", description="replace the training system prompt (paper) or put the prompt before it"
    )
    prompts_version: str = Field("v1", description="version of the shipped inoculation prompt set")

    @model_validator(mode="after")
    def _known_prompt(self) -> "InoculationConfig":
        prompts = load_inoculation_prompts(self.prompts_version)
        if self.prompt != NONE and self.prompt not in prompts:
            known = sorted(prompts) + [NONE]
            raise ValueError(f"unknown inoculation prompt {self.prompt!r}; {did_you_mean(self.prompt, known)} "
                             f"(version {self.prompts_version} has: {', '.join(known)})")
        return self

    @property
    def text(self) -> str | None:
        """The prompt's text, None when off."""
        return None if self.prompt == NONE else load_inoculation_prompts(self.prompts_version)[self.prompt]


def inoculate_messages(messages: list[dict[str, Any]], prompt: str, mode: str) -> list[dict[str, Any]]:
    """A new message list whose leading system message is ``prompt`` (replace) or starts with it
    (prefix); one is inserted when the conversation has none. The input is not changed."""
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        old = out[0].get("content") or ""
        out[0]["content"] = prompt + PREFIX_SEPARATOR + old if mode == "prefix" and old else prompt
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out


class Inoculation(Defense):
    """Rewrites the system prompt of every training row; evaluation never sees it."""

    config_class = InoculationConfig
    strength = ("prompt",)
    off = {"prompt": NONE}
    training_methods = ("sft", "grpo")

    @property
    def active(self) -> bool:
        return self.config.prompt != NONE

    def transform_data(self, rows: Rows) -> Rows:
        if not self.active:
            return rows
        text = self.config.text
        return [{**row, "messages": inoculate_messages(row["messages"], text, self.config.mode)} for row in rows]

    def transform_prompts(self, rows: Rows) -> Rows:
        if not self.active:
            return rows
        text = self.config.text
        return [{**row, "prompt": inoculate_messages(row["prompt"], text, self.config.mode)} for row in rows]
