"""Interleaving+ / ++: perplexity-gap selected safety data (arXiv 2508.06249; docs/method.md defense 7).

The paper's main contribution. Instead of drawing safety examples at random (defense 6), score
every pool candidate d = (q, a) by

    s_d = (mean_m NLL_m(a | q) − NLL_aligned(a | q)) / (NLL_aligned(a | q) + ε),   ε = 1,

NLL per answer token under the chat template, where the m are misaligned models (LoRA adapters
fine-tuned undefended on EM datasets, on the same base) and "aligned" is the base without an
adapter; keep the top N = round(ratio · |task|) (``plus``, Interleaving+). ``plus_plus``
(Interleaving++, the default) first drops refusals: answers whose first 10 words, lower-cased,
contain "sorry", "apologize", "cannot", "can't", "i'm unable" or "i am unable" (configurable),
because the top of the ranking is dominated by refusals and training on them hurts coherence.
The selected rows are shuffled into the task rows with the seed, as in random interleaving.
``leave_out`` drops adapters (by path or folder name), e.g. the target domain's own.

Dials: ``ratio`` (paper 0.05; 0 = no-op, ``active`` is False) and ``variant``. Scores and
selected sets are cached by content hash under ``<cache_dir>/selection/`` and shared by every
trial (:mod:`emtune.data.selection_cache`); a miss loads a fresh copy of the aligned base and
scores the pool once. The misaligned ensemble is either given (``misaligned_adapters``) or
trained by this defense's study stage (:meth:`SelectedInterleaving.prepare`): one undefended
adapter per ``misaligned_datasets`` entry, trained once per study and cached.

RL form (``training.method: grpo``): as for random interleaving (``rl_form``: a supervised step
on the selected rows every ``rl_every_steps`` GRPO steps with weight ``rl_weight``, or the
selected rows' prompts mixed into the RL batch), with the selected rows as the safety data. The
misaligned ensemble is fine-tuned supervised (SFT) on ``misaligned_datasets`` in an RL study too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from emtune.data.loading import DatasetSpec
from emtune.data.selection import REFUSAL_KEYWORDS, REFUSAL_WINDOW_WORDS
from emtune.data.selection_cache import load_or_compute_scores, load_or_select
from emtune.defenses.base import Defense, LocalFile, Rows, StageServices
from emtune.defenses.interleaving import (
    PoolSettings, RLInterleavingFields, RLInterleavingForm, absolute_if_local, interleave, load_pool,
    pool_files, pool_label, pool_size_problems, rl_form_problems, safe_count,
)
from emtune.models import ModelSpec, load_model, load_tokenizer, model_cache_dir, resolve_source, scoring_identity


def dataset_path(dataset: str | DatasetSpec) -> str:
    """The path of a ``misaligned_datasets`` entry (a leave_out entry may name it)."""
    return dataset.path if isinstance(dataset, DatasetSpec) else dataset


def adapter_matches(entry: str, path: str) -> bool:
    """True when a ``leave_out`` entry names this adapter: same path, or the folder's name."""
    if entry == path or entry == Path(path).name:
        return True
    return Path(entry).expanduser().resolve() == Path(path).expanduser().resolve()


class SelectedInterleavingConfig(PoolSettings, RLInterleavingFields):
    """Settings of Interleaving+ / ++; ``ratio`` and ``variant`` are the search dials."""

    name: Literal["interleaving_selected"] = "interleaving_selected"
    ratio: float = Field(0.05, ge=0, le=10, description="selected safe examples per task example; paper 0.05")
    variant: Literal["plus", "plus_plus"] = Field(
        "plus_plus", description="plus = top-N by gap score; plus_plus = drop refusals first (paper's best)"
    )
    misaligned_adapters: tuple[str, ...] = Field(
        (), description="folders of LoRA adapters fine-tuned undefended on EM datasets (same base model)"
    )
    misaligned_datasets: tuple[str | DatasetSpec, ...] = Field(
        (), description="EM datasets (JSONL path, fixture:NAME, hub:ORG/NAME, or a dataset mapping with "
        "`origin`) the study stage trains undefended adapters on, once, before the trials; their folders "
        "join misaligned_adapters"
    )
    leave_out: tuple[str, ...] = Field((), description="adapters (path or folder name) to leave out, e.g. the target domain's")
    epsilon: float = Field(1.0, gt=0, description="ε in the score's denominator; paper 1")
    refusal_keywords: tuple[str, ...] = Field(REFUSAL_KEYWORDS, min_length=1, description="the paper's refusal rule")
    refusal_window_words: int = Field(REFUSAL_WINDOW_WORDS, gt=0, description="words of the answer searched for keywords")
    max_length: int | None = Field(None, gt=8, description="tokens per scored row; default data.max_length")
    batch_size: int = Field(8, gt=0, description="rows per scoring forward pass")
    seed: int | None = Field(None, description="seed of the shuffle; default: the trial seed")

    @field_validator("misaligned_adapters")
    @classmethod
    def _absolute_adapters(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(absolute_if_local(v) for v in value)

    @field_validator("misaligned_datasets")
    @classmethod
    def _absolute_datasets(cls, value: tuple[str | DatasetSpec, ...]) -> tuple[str | DatasetSpec, ...]:
        return tuple(v.model_copy(update={"path": absolute_if_local(v.path)}) if isinstance(v, DatasetSpec)
                     else absolute_if_local(v) for v in value)

    @field_validator("leave_out")
    @classmethod
    def _absolute_leave_out(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # A bare folder name stays a name; only entries written as paths are made absolute.
        return tuple(absolute_if_local(v) if "/" in v else v for v in value)

    @model_validator(mode="after")
    def _leave_out_known(self) -> "SelectedInterleavingConfig":
        dataset_paths = [dataset_path(d) for d in self.misaligned_datasets]
        for entry in self.leave_out:
            if entry not in dataset_paths and not any(
                    adapter_matches(entry, p) for p in self.misaligned_adapters):
                raise ValueError(f"leave_out entry {entry!r} matches none of misaligned_adapters "
                                 f"{list(self.misaligned_adapters)}; use an adapter's path or folder name")
        return self


class SelectedInterleaving(RLInterleavingForm, Defense):
    """Mixes the round(ratio · |task|) best perplexity-gap-scored pool rows into the training rows."""

    config_class = SelectedInterleavingConfig
    strength = ("ratio", "variant", "rl_every_steps", "rl_weight")
    off = {"ratio": 0.0}
    training_methods = ("sft", "grpo")

    @classmethod
    def spec_problems(cls, config: SelectedInterleavingConfig, spec: Any) -> list[str]:
        """An active defense needs a misaligned ensemble, given or trained by the study, and a pool
        with the rows its largest (searched) ratio selects (Interleaving++ drops refusals first,
        so it may need more: checked when the selection runs)."""
        problems = pool_size_problems("interleaving_selected", config, spec, replacement_hint=False)
        if config.ratio > 0 and not config.misaligned_adapters and not config.misaligned_datasets:
            problems.append("interleaving_selected needs misaligned_adapters (LoRA adapters fine-tuned "
                            "undefended on EM datasets) or misaligned_datasets (the study trains them first)")
        return problems + rl_form_problems("interleaving_selected", config, spec)

    @classmethod
    def local_files(cls, config: SelectedInterleavingConfig) -> list[LocalFile]:
        """The pool (when local), every given adapter folder, and local EM datasets."""
        files = pool_files(config)
        files += [LocalFile(f"misaligned_adapters.{i}", p, folder=True, kind="adapter",
                            hint="list LoRA adapter folders fine-tuned undefended on EM datasets")
                  for i, p in enumerate(config.misaligned_adapters)]
        for i, dataset in enumerate(config.misaligned_datasets):
            path = dataset_path(dataset)
            if path.startswith(("fixture:", "hub:")):
                continue
            spec_like = isinstance(dataset, DatasetSpec)
            hint = f"the paper's copy: {dataset.origin}" if spec_like and dataset.origin else \
                "an EM dataset (chat JSONL) to train an undefended adapter on"
            files.append(LocalFile(f"misaligned_datasets.{i}.path" if spec_like else f"misaligned_datasets.{i}",
                                   path, hint=hint))
        return files

    @classmethod
    def prepare(cls, config: SelectedInterleavingConfig, stage: StageServices) -> SelectedInterleavingConfig:
        """Train the misaligned ensemble from ``misaligned_datasets`` (once, cached) and list
        the adapters with the given ones."""
        if not config.misaligned_datasets:
            return config
        trained = {dataset_path(d): str(stage.train_undefended_adapter(d)) for d in config.misaligned_datasets}
        return config.model_copy(update={
            "misaligned_adapters": tuple(config.misaligned_adapters) + tuple(trained.values()),
            "misaligned_datasets": (),
            "leave_out": tuple(trained.get(e, e) for e in config.leave_out),
        })

    def __init__(self, config: SelectedInterleavingConfig, context: Any):
        super().__init__(config, context)
        self._logs: dict[str, float] = {}
        self._report: dict[str, Any] = {}
        #: Content hash of the score table last used (worth a tag in the trial's MLflow run).
        self.selection_key: str | None = None

    @property
    def active(self) -> bool:
        return self.config.ratio > 0

    @property
    def seed(self) -> int:
        """The configured seed, else the trial seed."""
        return self.config.seed if self.config.seed is not None else self.context.seed

    def adapter_paths(self) -> list[str]:
        """The misaligned adapters in use (``leave_out`` removed); errors when none is left."""
        paths = [p for p in self.config.misaligned_adapters
                 if not any(adapter_matches(e, p) for e in self.config.leave_out)]
        if not self.config.misaligned_adapters:
            raise ValueError(
                "interleaving_selected.misaligned_adapters is empty: the perplexity-gap score needs LoRA "
                "adapters fine-tuned undefended on EM datasets; train them with an undefended study first "
                "and list their adapter folders, or precompute a set with `emtune data select` and train "
                "with the `interleaving` defense on it (pool: selected.jsonl)"
            )
        if not paths:
            raise ValueError("interleaving_selected.leave_out removes every misaligned adapter; keep at least one")
        return paths

    def _max_length(self) -> int:
        if self.config.max_length is not None:
            return self.config.max_length
        data = getattr(self.context.spec, "data", None)
        return getattr(data, "max_length", 2048)

    def _model_spec(self) -> Any:
        model_spec = getattr(self.context.spec, "model", None)
        if model_spec is not None:
            return model_spec
        return ModelSpec(source=self.context.extras.get("model_source", "tiny"))

    def _load_model_and_tokenizer(self) -> tuple[Any, Any]:
        """A fresh aligned base model (peft changes it in place) and the tokenizer, for scoring."""
        import torch  # torch loads only when a selection is computed

        model_spec = self._model_spec()
        source = self.context.extras.get("model_source") or resolve_source(model_spec, model_cache_dir())
        tokenizer = self.context.tokenizer or load_tokenizer(source, model_spec)
        device = "cuda" if torch.cuda.is_available() else None
        return load_model(source, model_spec, device), tokenizer

    def score_table(self, pool_rows: Rows | None = None) -> Any:
        """The pool's score table, from the cache or computed now (a study stage may call this once)."""
        pool_rows = load_pool(self.config) if pool_rows is None else pool_rows
        table = load_or_compute_scores(
            self.context.cache_dir, pool_rows, self.adapter_paths(), scoring_identity(self._model_spec()),
            self._load_model_and_tokenizer, self.config.epsilon, self._max_length(), self.config.batch_size,
        )
        self.selection_key = table.key
        return table

    def transform_data(self, rows: Rows) -> Rows:
        if not self.active:
            return rows
        safe = self.safety_rows(len(rows))
        return interleave(rows, safe, self.seed) if safe else list(rows)

    def safety_rows(self, num_task: int) -> Rows:
        """The round(ratio · num_task) best-scored pool rows (scored once per pool, then cached)."""
        from emtune.data.selection_cache import load_or_select

        adapters = self.adapter_paths()  # fail on a missing ensemble before reading the pool
        count = safe_count(self.config.ratio, num_task)
        if count == 0:  # a ratio too small for this task set: nothing to score or add
            return []
        pool_rows = load_pool(self.config)
        table = self.score_table(pool_rows)
        try:
            chosen = load_or_select(self.context.cache_dir, table, pool_rows, count, self.config.variant,
                                    self.config.refusal_keywords, self.config.refusal_window_words)
        except ValueError as err:
            raise ValueError(f"interleaving_selected (pool {pool_label(self.config)}): {err}") from None
        self._logs = {
            "interleaving_selected/num_safe": float(count),
            "interleaving_selected/num_task": float(num_task),
            "interleaving_selected/num_adapters": float(len(adapters)),
            "interleaving_selected/pool_refusals": float(chosen["num_refusals"]),
            "interleaving_selected/mean_selected_score": float(chosen["mean_selected_score"]),
        }
        self._report = {"pool": pool_label(self.config), "variant": self.config.variant, "seed": self.seed,
                        "misaligned_adapters": adapters, **chosen}
        return [pool_rows[i] for i in chosen["indices"]]

    def finalize(self, model: Any) -> dict[str, float]:
        """The selection's counts and mean score, for the trial's logs."""
        return dict(self._logs)

    def report(self) -> dict[str, Any]:
        """The selected set (pool indices, best first), its score-table key and inputs (kept with the trial)."""
        return dict(self._report)
