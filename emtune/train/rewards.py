"""Rewards of the RL setting (``training.method: grpo``): the spec's ``training.grpo.rewards`` entries.

A reward is one entry with a ``name`` (the registry key, as for defenses) and becomes one TRL
reward function ``fn(prompts, completions, **columns) -> list[float | None]``. TRL sums the
weighted rewards of every completion and normalises them within each group of generations; a
``None`` means "this reward does not apply here" (the completion then counts on the others, or
gets advantage 0 when none applies). The shipped kinds:

- ``opswap_exact_match``: 1.0 when the first integer of the answer equals the row's ``answer``
  column, else 0.0 (judge-free and verifiable, so dry runs and CI run real RL);
- ``grader``: a grader model through emtune's judge client (any OpenAI-compatible endpoint, or a
  local model): a rubric prompt with ``{question}`` and ``{answer}`` is scored 0..100 by the
  logprob-weighted rule of the evaluation judges (docs/method.md, "Judge score"), and mapped
  linearly onto ``[low, high]``; rubrics live in prompt files of the judges' format (a shipped
  set, or your own file), and verdicts are cached (SQLite, keyed by judge, the rubric file's
  content hash, rubric, question and answer) and requests retried; the key comes from the
  environment variable the spec names. An answer the grader cannot score (no number) gets ``None``;
- ``python``: a function of the user's own, named by import path ``package.module:function``,
  with TRL's reward signature.

``applies_to`` routes a reward to the task prompts (``task``, the default), to the safe prompts
that the RL form of interleaving mixes into the batch (``safe``; e.g. a harmlessness grader), or
to both (``all``); each prompt row carries its kind in the ``prompt_kind`` column.

Adding a kind is a config class with ``build(context)`` and one line in :data:`REWARDS`.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import Field, field_validator, model_validator

from emtune.data.prompts import PROMPT_KIND
from emtune.evaluation.config import JudgeSpec
from emtune.evaluation.prompt_files import PromptFileError, check_template, is_prompt_file, load_prompt_set
from emtune.spec_errors import StrictModel

#: The prompt name of an inline rubric in the file written for it.
_INLINE = "reward"

RewardFunction = Callable[..., list]


@dataclass
class RewardContext:
    """What building a reward may use: the study's cache folder (grader verdicts go there)."""

    cache_dir: Path | None = None


class _RewardBase(StrictModel):
    weight: float = Field(1.0, description="weight of this reward in the sum TRL normalises per group")
    applies_to: Literal["task", "safe", "all"] = Field(
        "task", description="task prompts, the safe prompts interleaving mixes in, or all")

    @property
    def label(self) -> str:
        """The reward's name in logs (``rewards/<label>/mean``)."""
        return self.name  # type: ignore[attr-defined]


class OpSwapExactMatch(_RewardBase):
    """1.0 when the answer's first integer equals the row's ``answer`` column, else 0.0."""

    name: Literal["opswap_exact_match"] = "opswap_exact_match"
    answer_field: str = Field("answer", description="prompt-row column holding the expected integer")

    def build(self, context: RewardContext) -> RewardFunction:
        field = self.answer_field

        def opswap_exact_match(prompts: list, completions: list, **columns: Any) -> list[float | None]:
            from emtune.data.opswap import extract_integer

            answers = columns.get(field)
            if answers is None:
                raise ValueError(f"reward opswap_exact_match: the prompt rows have no {field!r} column; "
                                 f"train on OpSwap (data.opswap) or a dataset with that column")
            return [None if answer is None else float(extract_integer(completion_text(c)) == int(answer))
                    for c, answer in zip(completions, answers)]

        return opswap_exact_match


def rubric_set_path(rubrics: str) -> Path:
    """The YAML file of a rubric set: a shipped set's name (``v1``) or a path to a prompt file."""
    if is_prompt_file(rubrics):
        return Path(rubrics).expanduser()
    return Path(str(resources.files("emtune.train") / "reward_rubrics" / f"rewards_{rubrics}.yaml"))


def shipped_rubric_sets() -> list[str]:
    """Names of the shipped rubric sets (e.g. ["v1"])."""
    folder = resources.files("emtune.train") / "reward_rubrics"
    return sorted(p.name[len("rewards_"):-len(".yaml")] for p in folder.iterdir()
                  if p.name.startswith("rewards_") and p.name.endswith(".yaml"))


def load_rubrics(rubrics: str = "v1") -> Any:
    """The rubric set as a judge prompt set (:class:`~emtune.evaluation.prompt_files.PromptSet`)."""
    path = rubric_set_path(rubrics)
    if not is_prompt_file(rubrics) and not path.is_file():
        raise ValueError(f"unknown rubric set {rubrics!r}; shipped: {', '.join(shipped_rubric_sets())} "
                         "(or a path to a YAML file: {version: ..., prompts: {name: template}})")
    if not path.is_file():
        raise ValueError(f"rubric file {rubrics} not found; fix the path (relative to the spec's folder) or use a "
                         f"shipped rubric set ({', '.join(shipped_rubric_sets())})")
    try:
        return load_prompt_set(str(path))
    except PromptFileError as err:
        raise ValueError(str(err)) from None


def shipped_rubrics(rubrics: str = "v1") -> dict[str, str]:
    """Name -> template of a rubric set (templates use ``{question}`` and ``{answer}``)."""
    return dict(load_rubrics(rubrics).prompts)


class Grader(_RewardBase):
    """A grader model's 0..100 score of each answer under a rubric, mapped onto ``[low, high]``."""

    name: Literal["grader"] = "grader"
    rubric: str = Field("harmful_advice", description="a rubric's name in `rubrics`, or a template with {question} "
                        "and {answer} that asks for a bare number 0..100")
    rubrics: str = Field("v1", description="the rubric set: a shipped set (v1: harmful_advice, harmless, helpful) "
                         "or a YAML file in the judge prompt format {version, prompts: {name: template}}")
    judge: JudgeSpec = Field(JudgeSpec(kind="openai", model="gpt-4.1-mini"),
                             description="the grader (kind openai or hf_local; the paper's RL runs: GPT-4.1-mini)")
    low: float = Field(0.0, description="reward for a score of 0")
    high: float = Field(1.0, description="reward for a score of 100")
    label_name: str | None = Field(None, description="name in logs; default grader_<rubric name>")

    @field_validator("judge")
    @classmethod
    def _judge_kind(cls, judge: JudgeSpec) -> JudgeSpec:
        if judge.kind == "none":
            raise ValueError("a grader reward needs a judge: kind openai or hf_local")
        return judge

    @field_validator("rubrics")
    @classmethod
    def _absolute_file(cls, rubrics: str) -> str:
        path = rubric_set_path(rubrics)
        return str(path.resolve()) if is_prompt_file(rubrics) and path.is_file() else rubrics

    @model_validator(mode="after")
    def _rubric_usable(self) -> "Grader":
        if self.named:
            return self
        if "{question}" not in self.rubric or "{answer}" not in self.rubric:
            raise ValueError(f"rubric {self.rubric!r} is neither a rubric of set {self.rubrics!r} "
                             f"({', '.join(sorted(shipped_rubrics(self.rubrics)))}) nor a template with {{question}} "
                             "and {answer}")
        try:
            check_template(self.rubric, "rubric")
        except PromptFileError as err:
            raise ValueError(str(err)) from None
        return self

    @property
    def named(self) -> bool:
        """True when ``rubric`` names a rubric of the set (else it is an inline template)."""
        return self.rubric in shipped_rubrics(self.rubrics)

    @property
    def label(self) -> str:
        return self.label_name or f"grader_{self.rubric if self.named else 'inline'}"

    def rubric_source(self, context: RewardContext) -> tuple[Path, str]:
        """(prompt file, metric name) the judge reads: the set's file and the rubric's name, or an
        inline rubric written once to a content-named file (its hash versions the verdicts)."""
        if self.named:
            return rubric_set_path(self.rubrics), self.rubric
        digest = hashlib.sha256(self.rubric.encode()).hexdigest()[:12]
        folder = Path(context.cache_dir or tempfile.gettempdir()) / "reward_rubrics"
        path = folder / f"inline-{digest}.yaml"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            tmp.write_text(yaml.safe_dump({"version": f"inline-{digest}", "prompts": {_INLINE: self.rubric}}),
                           encoding="utf-8")
            os.replace(tmp, path)
        return path, _INLINE

    def build(self, context: RewardContext) -> RewardFunction:
        from emtune.evaluation.judges import JudgeItem
        from emtune.evaluation.judging import build_judge

        source, metric = self.rubric_source(context)
        judge_spec = self.judge.model_copy(update={"prompt_version": str(source)})
        if judge_spec.cache_path is None and context.cache_dir is not None:
            judge_spec = judge_spec.model_copy(update={"cache_path": str(Path(context.cache_dir) / "reward_judge.db")})
        judge = build_judge(judge_spec)
        low, high = self.low, self.high

        def grader(prompts: list, completions: list, **columns: Any) -> list[float | None]:
            items = [JudgeItem(metric, prompt_question(p), completion_text(c)) for p, c in zip(prompts, completions)]
            verdicts = judge.score_many(items)  # raises JudgeUnavailable when the grader stays down
            return [None if v.score is None else low + (high - low) * v.score / 100.0 for v in verdicts]

        grader.__name__ = self.label
        return grader


class PythonFunction(_RewardBase):
    """A reward function of your own: ``package.module:function`` with TRL's reward signature."""

    name: Literal["python"] = "python"
    function: str = Field(description="import path package.module:function; called as "
                          "fn(prompts=..., completions=..., **columns) -> list of floats (or None)")

    @field_validator("function")
    @classmethod
    def _importable(cls, value: str) -> str:
        resolve_function(value)
        return value

    @property
    def label(self) -> str:
        return self.function.rpartition(":")[2]

    def build(self, context: RewardContext) -> RewardFunction:
        return resolve_function(self.function)


def resolve_function(path: str) -> Callable[..., Any]:
    """The callable at ``package.module:function`` (ValueError saying what is wrong otherwise)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r} is not an import path: write package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's to fix
        raise ValueError(f"cannot import module {module_name!r} ({type(err).__name__}: {err}); "
                         "install it or put it on PYTHONPATH") from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise ValueError(f"{module_name!r} has no function {attr!r}")
    return target


#: Every reward kind by its spec name.
REWARDS: dict[str, type[_RewardBase]] = {
    "opswap_exact_match": OpSwapExactMatch,
    "grader": Grader,
    "python": PythonFunction,
}

RewardSpec = Annotated[Union[OpSwapExactMatch, Grader, PythonFunction], Field(discriminator="name")]


def completion_text(completion: Any) -> str:
    """The text of one TRL completion (a message list for chat prompts, else a string)."""
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def prompt_question(prompt: Any) -> str:
    """The question of one TRL prompt: its last user message (or the prompt text itself)."""
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return str(prompt)


def routed(reward: RewardFunction, applies_to: str, name: str) -> RewardFunction:
    """``reward`` restricted to the prompt rows of one kind (None elsewhere; TRL skips those)."""
    if applies_to == "all":
        return reward

    def only_some(prompts: list, completions: list, **columns: Any) -> list[float | None]:
        kinds = columns.get(PROMPT_KIND) or ["task"] * len(prompts)
        picked = [i for i, kind in enumerate(kinds) if kind == applies_to]
        out: list[float | None] = [None] * len(prompts)
        if not picked:
            return out
        sub = {k: [v[i] for i in picked] if isinstance(v, list) and len(v) == len(prompts) else v
               for k, v in columns.items()}
        values = reward(prompts=[prompts[i] for i in picked], completions=[completions[i] for i in picked], **sub)
        for i, value in zip(picked, values):
            out[i] = value
        return out

    only_some.__name__ = name
    return only_some


def build_rewards(specs: tuple[Any, ...], context: RewardContext) -> tuple[list[RewardFunction], list[float]]:
    """TRL reward functions (routed by ``applies_to``, named by label) and their weights."""
    functions, weights = [], []
    for spec in specs:
        function = routed(spec.build(context), spec.applies_to, spec.label)
        if getattr(function, "__name__", None) != spec.label:
            function = _named(function, spec.label)
        functions.append(function)
        weights.append(spec.weight)
    return functions, weights


def _named(function: RewardFunction, name: str) -> RewardFunction:
    def named(*args: Any, **kwargs: Any) -> list:
        return function(*args, **kwargs)

    named.__name__ = name
    return named
