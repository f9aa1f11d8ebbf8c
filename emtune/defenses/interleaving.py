"""Random interleaving of safety data (arXiv 2508.06249, Sec. "Interleaving"; docs/method.md defense 6).

    D_train = D_task ∪ D_safe,   |D_safe| = round(ratio · |D_task|)

D_safe is drawn at random, without replacement (``with_replacement: true`` allows repeats), from
a safety pool; the union is shuffled so safe examples are spread over the whole run. The paper
sweeps the ratio over 1%..50% and reports 5% (safety examples = 5% of the task set), drawn from
the benign part of WildGuardMix. Here the pool defaults to the bundled ``fixture:safe_instruct``
set (dry runs); for real studies ``pool`` is a chat JSONL file, a ``hub:`` dataset, or a dataset
mapping with columns and filters (WildGuardMix: ``{path: ..., columns: {user: prompt, assistant:
response}, where: {response_harm_label: unharmful}}``; :mod:`emtune.data.sources`). The dial is
``ratio``: more safe data lowers broad EM but also coherence; ratio 0 is exactly a no-op
(``active`` is False).

A spec whose ratio, or the top of a searched ratio range, needs more rows than the pool holds is
refused at validation (``spec_problems``), with the pool size, the largest feasible ratio and the
fix, unless the draw is with replacement.

Counts are exact: ``round`` is half-up on the ratio as written (0.05 x 30 = 1.5 -> 2), computed
in decimal so binary float error never moves a count. Both the draw and the shuffle come from
the seed (``seed`` or, by default, the trial seed), through separate streams, so the same seed
gives the same training set and a different seed a different one.

RL form (``training.method: grpo``; paper v3, the group's ``GRPOSFTMixTrainer``), ``rl_form``:

- ``supervised_steps`` (default): the round(ratio · |task prompts|) drawn safety rows are not
  mixed into the prompts; instead every ``rl_every_steps``-th GRPO optimizer step (N; the group:
  4, 8, 16) also takes ``rl_weight`` (w; the group: 0.5..1) x the next-token loss of a batch of
  them: L_k = L_GRPO + w · L_SFT(safety batch) when k ≡ 0 (mod N), else L_GRPO;
- ``prompt_mix``: round(ratio · |task prompts|) safety prompts (their answers dropped) are
  shuffled into the RL prompts as ``prompt_kind: safe`` rows, rewarded by the spec's rewards with
  ``applies_to: safe`` (a harmlessness grader; the group: ratio 0.2).
"""

from __future__ import annotations

import random
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from emtune.data.loading import DatasetSpec, load_rows
from emtune.data.prompts import PROMPT_KIND, prompt_from_chat
from emtune.data.sizes import dataset_rows, task_rows
from emtune.defenses.base import Defense, LocalFile, Rows, SupervisedMix, is_local_source
from emtune.spec_errors import StrictModel

DEFAULT_POOL = "fixture:safe_instruct"


def absolute_if_local(path: str) -> str:
    """An existing local path made absolute (Ray workers run in other folders); others unchanged.

    A spec file's loader resolves relative paths from the spec's folder before this runs; this
    covers settings built in code (``make_defense``), relative to the working folder.
    """
    if not is_local_source(path):
        return path
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


class PoolSettings(StrictModel):
    """Where a defense's safety pool comes from (shared by both interleaving defenses)."""

    pool: str | DatasetSpec = Field(
        DEFAULT_POOL, description="safety pool: chat JSONL file, fixture:NAME, hub:ORG/NAME, or a dataset "
        "mapping {path, config, columns, where, ...} (paper: WildGuardMix rows with an unharmful response)"
    )
    pool_split: str = Field("train", description="split of a hub: pool (a string pool)")
    pool_config: str | None = Field(None, description="config of a hub: pool (a string pool)")
    pool_limit: int | None = Field(None, gt=0, description="use only the first N pool rows (a string pool)")

    @field_validator("pool")
    @classmethod
    def _absolute_pool(cls, value: str | DatasetSpec) -> str | DatasetSpec:
        if isinstance(value, DatasetSpec):
            return value.model_copy(update={"path": absolute_if_local(value.path)})
        return absolute_if_local(value)

    @model_validator(mode="after")
    def _one_place_for_source_settings(self) -> "PoolSettings":
        if isinstance(self.pool, DatasetSpec) and (self.pool_split != "train" or self.pool_config or self.pool_limit):
            raise ValueError("with a dataset mapping as `pool`, give split / config / limit inside it, "
                             "not as pool_split / pool_config / pool_limit")
        return self


class RLInterleavingFields(StrictModel):
    """The RL form's settings, shared by both interleaving defenses (ignored by SFT)."""

    rl_form: Literal["supervised_steps", "prompt_mix"] = Field(
        "supervised_steps", description="GRPO: a supervised step on the safety rows every N steps, or safety "
        "prompts mixed into the RL batch (rewarded by a reward with applies_to: safe)")
    rl_every_steps: int = Field(8, gt=0, description="GRPO supervised_steps: N (the group: 4, 8 or 16)")
    rl_weight: float = Field(1.0, ge=0, description="GRPO supervised_steps: w (the group: 0.5..1)")


def rl_form_problems(name: str, config: Any, spec: Any) -> list[str]:
    """prompt_mix needs a reward for the safe prompts it adds."""
    if spec.training.method != "grpo" or config.rl_form != "prompt_mix" or spec.training.grpo is None:
        return []
    if not any(r.applies_to == "safe" for r in spec.training.grpo.rewards):
        return [f"{name} rl_form prompt_mix adds safe prompts: add a reward with applies_to: safe to "
                "training.grpo.rewards (e.g. name: grader, rubric: harmless)"]
    return []


class RLInterleavingForm:
    """The RL hooks of both interleaving defenses; ``safety_rows(num_task)`` picks the safety rows."""

    config: Any
    seed: int
    _num_task: int | None = None

    def safety_rows(self, num_task: int) -> Rows:
        raise NotImplementedError

    def transform_prompts(self, rows: Rows) -> Rows:
        self._num_task = len(rows)
        if not self.active or self.config.rl_form != "prompt_mix":  # type: ignore[attr-defined]
            return rows
        safe = [{**prompt_from_chat(r), PROMPT_KIND: "safe"} for r in self.safety_rows(len(rows))]
        return interleave(rows, safe, self.seed)

    def supervised_mix(self) -> SupervisedMix | None:
        if not self.active or self.config.rl_form != "supervised_steps" or not self.config.rl_weight:  # type: ignore[attr-defined]
            return None
        if self._num_task is None:
            raise RuntimeError("supervised_mix needs the task prompts: call transform_prompts first")
        rows = self.safety_rows(self._num_task)
        if not rows:
            return None
        return SupervisedMix(rows=rows, every_steps=self.config.rl_every_steps, weight=self.config.rl_weight,
                             source=self.config.name)


class InterleavingConfig(PoolSettings, RLInterleavingFields):
    """Settings of random interleaving; ``ratio`` (safe / task examples) is the search dial."""

    name: Literal["interleaving"] = "interleaving"
    ratio: float = Field(
        0.05, ge=0, le=10, description="safe examples per task example; the paper uses 0.05 (swept 0.01..0.5)"
    )
    with_replacement: bool = Field(False, description="draw pool rows with replacement (a pool smaller than "
                                   "the draw then repeats rows instead of being refused)")
    seed: int | None = Field(None, description="seed of the draw and the shuffle; default: the trial seed")


def safe_count(ratio: float, num_task_rows: int) -> int:
    """round(ratio · num_task_rows), half-up on the decimal ratio (0.05 x 50 = 2.5 -> 3)."""
    exact = Decimal(repr(float(ratio))) * num_task_rows
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


def pool_dataset(config: Any) -> DatasetSpec:
    """The DatasetSpec of a defense's safety pool (a mapping as given, or built from the string
    ``pool`` with ``pool_split``, ``pool_config``, ``pool_limit``)."""
    if isinstance(config.pool, DatasetSpec):
        return config.pool
    return DatasetSpec(path=config.pool, split=config.pool_split, config=config.pool_config, limit=config.pool_limit)


def pool_label(config: Any) -> str:
    """The pool as named in messages and reports."""
    return config.pool.path if isinstance(config.pool, DatasetSpec) else config.pool


def load_pool(config: Any) -> Rows:
    """The rows of a defense's safety pool."""
    return load_rows(pool_dataset(config))


def draw_safe_rows(pool_rows: Rows, count: int, seed: int, pool_label: str = "the safety pool",
                   with_replacement: bool = False) -> Rows:
    """``count`` pool rows drawn by a seeded RNG, without replacement (errors when the pool is too
    small) or with it."""
    rng = random.Random(f"emtune-interleaving-draw:{seed}")
    if with_replacement and count:
        if not pool_rows:
            raise ValueError(f"safety pool {pool_label} is empty")
        return [pool_rows[i] for i in rng.choices(range(len(pool_rows)), k=count)]
    if count > len(pool_rows):
        raise ValueError(
            f"safety pool {pool_label} has {len(pool_rows)} rows but {count} safe examples are needed; "
            f"lower the ratio (largest feasible here: {len(pool_rows)} pool rows / task rows), use a larger "
            f"pool, or set with_replacement: true"
        )
    picked = rng.sample(range(len(pool_rows)), count)
    return [pool_rows[i] for i in picked]


def largest_ratio(name: str, config: Any, spec: Any) -> tuple[float, str]:
    """The largest ratio a study can give this defense, and where it is set: the config's own,
    or the top of a searched range (``search.parameters.<p>``) that targets it."""
    best, where = float(config.ratio), f"defenses.{name}.ratio"
    for pname, param in getattr(getattr(spec, "search", None), "parameters", {}).items():
        if param.target != f"defenses.{name}.ratio":
            continue
        top = max(param.choices) if param.type == "categorical" else param.high
        if top is not None and float(top) > best:
            best, where = float(top), f"search.parameters.{pname}.{'choices' if param.type == 'categorical' else 'high'}"
    return best, where


def pool_size_problems(name: str, config: Any, spec: Any, replacement_hint: bool) -> list[str]:
    """The pool-size check at validation: the largest ratio the study can use must not need more
    rows than the pool holds (skipped when either size is unknown offline, e.g. a hub pool
    without ``num_rows``)."""
    n_task = task_rows(spec.data) if getattr(spec, "data", None) is not None else None
    n_pool = dataset_rows(pool_dataset(config))
    if n_task is None or n_pool is None:
        return []
    ratio, where = largest_ratio(name, config, spec)
    need = safe_count(ratio, n_task)
    if need <= n_pool:
        return []
    feasible = n_pool / n_task
    fix = f"lower {where} to at most {feasible:.4g}, or use a larger pool"
    if replacement_hint:
        fix += f", or set defenses.{name}.with_replacement: true"
    return [f"{name}: ratio {ratio:g} ({where}) needs {need} safety rows for {n_task} training rows, but the pool "
            f"{pool_label(config)} holds {n_pool}; the largest feasible ratio is {feasible:.4g}. Fix: {fix}"]


def interleave(task_rows: Rows, safe_rows: Rows, seed: int) -> Rows:
    """Task and safe rows shuffled together by a seeded RNG; neither input list is modified."""
    combined = list(task_rows) + list(safe_rows)
    random.Random(f"emtune-interleaving-shuffle:{seed}").shuffle(combined)
    return combined


def pool_files(config: Any) -> list[LocalFile]:
    """The pool as a local file, when it is one (shared by both interleaving defenses)."""
    dataset = pool_dataset(config)
    if not is_local_source(dataset.path):
        return []
    hint = (f"the paper's copy: {dataset.origin}" if dataset.origin else
            "point pool at a chat JSONL file, fixture:NAME, hub:ORG/NAME or a dataset mapping")
    return [LocalFile("pool.path" if isinstance(config.pool, DatasetSpec) else "pool", dataset.path, hint=hint)]


class Interleaving(RLInterleavingForm, Defense):
    """Mixes round(ratio · |task|) random safety-pool examples into the training rows."""

    config_class = InterleavingConfig
    strength = ("ratio", "rl_every_steps", "rl_weight")
    off = {"ratio": 0.0}
    training_methods = ("sft", "grpo")

    @classmethod
    def spec_problems(cls, config: InterleavingConfig, spec: Any) -> list[str]:
        """The pool must hold the rows the largest (searched) ratio needs, unless drawn with
        replacement; the RL form's prompt mix needs a reward for its safe prompts."""
        problems = rl_form_problems("interleaving", config, spec)
        if not config.with_replacement:
            problems += pool_size_problems("interleaving", config, spec, replacement_hint=True)
        return problems

    @classmethod
    def local_files(cls, config: InterleavingConfig) -> list[LocalFile]:
        return pool_files(config)

    def safety_rows(self, num_task: int) -> Rows:
        """round(ratio · num_task) pool rows drawn with the seed (mixed into SFT rows; the RL form's
        safety data)."""
        count = safe_count(self.config.ratio, num_task)
        self._logs = {"interleaving/num_safe": float(count), "interleaving/num_task": float(num_task)}
        return draw_safe_rows(load_pool(self.config), count, self.seed, pool_label(self.config),
                              self.config.with_replacement)

    def __init__(self, config: InterleavingConfig, context: Any):
        super().__init__(config, context)
        self._logs: dict[str, float] = {}

    @property
    def active(self) -> bool:
        return self.config.ratio > 0

    @property
    def seed(self) -> int:
        """The configured seed, else the trial seed."""
        return self.config.seed if self.config.seed is not None else self.context.seed

    def transform_data(self, rows: Rows) -> Rows:
        if not self.active:
            return rows
        return interleave(rows, self.safety_rows(len(rows)), self.seed)

    def finalize(self, model: Any) -> dict[str, float]:
        """The counts of the last transform, for the trial's logs."""
        return dict(self._logs)

    def report(self) -> dict[str, Any]:
        """Pool, seed and counts of the last transform (kept with the trial)."""
        if not self._logs:
            return {}
        return {"pool": pool_label(self.config), "seed": self.seed, "with_replacement": self.config.with_replacement,
                "num_safe": int(self._logs["interleaving/num_safe"]), "num_task": int(self._logs["interleaving/num_task"])}
