"""Random interleaving of safety data (arXiv 2508.06249, Sec. "Interleaving"; docs/method.md defense 6).

    D_train = D_task ∪ D_safe,   |D_safe| = round(ratio · |D_task|)

D_safe is drawn at random, without replacement, from a safety pool; the union is shuffled so
safe examples are spread over the whole run. The paper sweeps the ratio over 1%..50% and reports
5% (safety examples = 5% of the task set), drawn from the benign part of WildGuardMix. Here the
pool defaults to the bundled ``fixture:safe_instruct`` set (dry runs); point ``pool`` at a chat
JSONL file or ``hub:`` dataset for real studies. The dial is ``ratio``: more safe data lowers
broad EM but also coherence; ratio 0 is exactly a no-op (``active`` is False).

Counts are exact: ``round`` is half-up on the ratio as written (0.05 x 30 = 1.5 -> 2), computed
in decimal so binary float error never moves a count. Both the draw and the shuffle come from
the seed (``seed`` or, by default, the trial seed), through separate streams, so the same seed
gives the same training set and a different seed a different one.
"""

from __future__ import annotations

import random
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from emtune.data.loading import DatasetSpec, load_rows
from emtune.defenses.base import Defense, LocalFile, Rows, is_local_source
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


class InterleavingConfig(StrictModel):
    """Settings of random interleaving; ``ratio`` (safe / task examples) is the search dial."""

    name: Literal["interleaving"] = "interleaving"
    ratio: float = Field(
        0.05, ge=0, le=10, description="safe examples per task example; the paper uses 0.05 (swept 0.01..0.5)"
    )
    pool: str = Field(
        DEFAULT_POOL, description="safety pool: chat JSONL file, fixture:NAME or hub:ORG/NAME (paper: WildGuardMix benign)"
    )
    pool_split: str = Field("train", description="split of a hub: pool")
    pool_config: str | None = Field(None, description="config of a hub: pool (e.g. wildguardtrain)")
    pool_limit: int | None = Field(None, gt=0, description="use only the first N pool rows")
    seed: int | None = Field(None, description="seed of the draw and the shuffle; default: the trial seed")

    @field_validator("pool")
    @classmethod
    def _absolute_pool(cls, value: str) -> str:
        return absolute_if_local(value)


def safe_count(ratio: float, num_task_rows: int) -> int:
    """round(ratio · num_task_rows), half-up on the decimal ratio (0.05 x 50 = 2.5 -> 3)."""
    exact = Decimal(repr(float(ratio))) * num_task_rows
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


def load_pool(config: Any) -> Rows:
    """The rows of a defense's safety pool (``pool``, ``pool_split``, ``pool_config``, ``pool_limit``)."""
    spec = DatasetSpec(path=config.pool, split=config.pool_split, config=config.pool_config,
                       limit=config.pool_limit)
    return load_rows(spec)


def draw_safe_rows(pool_rows: Rows, count: int, seed: int, pool_label: str = "the safety pool") -> Rows:
    """``count`` pool rows drawn without replacement by a seeded RNG; errors when the pool is too small."""
    if count > len(pool_rows):
        raise ValueError(
            f"safety pool {pool_label} has {len(pool_rows)} rows but {count} safe examples are needed; "
            f"lower the ratio or use a larger pool"
        )
    picked = random.Random(f"emtune-interleaving-draw:{seed}").sample(range(len(pool_rows)), count)
    return [pool_rows[i] for i in picked]


def interleave(task_rows: Rows, safe_rows: Rows, seed: int) -> Rows:
    """Task and safe rows shuffled together by a seeded RNG; neither input list is modified."""
    combined = list(task_rows) + list(safe_rows)
    random.Random(f"emtune-interleaving-shuffle:{seed}").shuffle(combined)
    return combined


def pool_files(config: Any) -> list[LocalFile]:
    """The pool as a local file, when it is one (shared by both interleaving defenses)."""
    if not is_local_source(config.pool):
        return []
    return [LocalFile("pool", config.pool, hint="point pool at a chat JSONL file, fixture:NAME or hub:ORG/NAME")]


class Interleaving(Defense):
    """Mixes round(ratio · |task|) random safety-pool examples into the training rows."""

    config_class = InterleavingConfig
    strength = ("ratio",)
    off = {"ratio": 0.0}

    @classmethod
    def local_files(cls, config: InterleavingConfig) -> list[LocalFile]:
        return pool_files(config)

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
        count = safe_count(self.config.ratio, len(rows))
        safe = draw_safe_rows(load_pool(self.config), count, self.seed, self.config.pool)
        self._logs = {"interleaving/num_safe": float(count), "interleaving/num_task": float(len(rows))}
        return interleave(rows, safe, self.seed)

    def finalize(self, model: Any) -> dict[str, float]:
        """The counts of the last transform, for the trial's logs."""
        return dict(self._logs)

    def report(self) -> dict[str, Any]:
        """Pool, seed and counts of the last transform (kept with the trial)."""
        if not self._logs:
            return {}
        return {"pool": self.config.pool, "seed": self.seed, "num_safe": int(self._logs["interleaving/num_safe"]),
                "num_task": int(self._logs["interleaving/num_task"])}
