"""The defense protocol: what a study needs from a defense, and the hooks it trains with.

A defense is one class in one module, registered by name in :mod:`emtune.defenses.registry`.
The study asks the class, never attribute names of its config:

- ``config_class``: its settings (pydantic, ``extra="forbid"``; the ``name`` field is the
  registry name and the discriminator in specs);
- ``strength``: the field(s) that dial it, and ``off``: the values that switch it off (strength 0
  must be an exact no-op; the contract test checks it);
- ``spec_problems(config, spec)``: checks that need the whole spec (run by ``emtune validate``);
- ``local_files(config)``: the local files and folders it reads (made absolute and checked to exist);
- ``input_problems(config, spec)``: those files read before anything starts (bad ones exit 2);
- ``prepare(config, stage)``: a study stage run once before the trials (persona vectors, a
  misaligned ensemble), returning the config with the stage's outputs filled in;
- ``training_methods``: the training methods it has a form for: ``sft``, and ``grpo`` where the
  defense has an RL form. ``emtune validate`` refuses a spec whose ``training.method`` a listed
  defense has no form for, naming the defense.

During training, a trial may stack several defenses; the trainer calls, in order:

1. ``transform_data(rows)`` on the chat rows before tokenisation (inoculation, interleaving);
2. ``attach(model)`` once the LoRA model exists (forward hooks such as persona steering);
3. ``loss_terms(batch, outputs, reference)`` every step; the terms are added to the task loss;
4. ``finalize(model)`` after training (SafeLoRA projection), returning values to log;
5. ``detach(model)`` before evaluation, removing every training-only effect.

``reference()`` returns the adapter-disabled model's outputs on the same batch (computed at most
once per step and shared by all defenses), so no second copy of the weights is ever loaded.

The RL setting (``training.method: grpo``, :mod:`emtune.train.grpo`) calls ``attach``,
``finalize`` and ``detach`` as above, and ``loss_terms`` on every update with the batch of
prompt + completion tokens (``labels`` = the completion tokens) unless the class sets
``rl_loss_terms_apply = False`` (its RL form is something else, e.g. the KL defense's β). Instead of ``transform_data`` it
calls ``transform_prompts(rows)`` on the prompt rows, and it asks each active defense for:

- ``rl_settings()``: GRPO settings the defense sets (the KL defense: ``{"beta": λ}``);
- ``supervised_mix()``: a :class:`SupervisedMix`, a supervised step on chat rows every N GRPO
  steps with weight w (interleaving's RL form);
- ``begin_update(positions)`` / ``end_update()`` around the forward pass that the policy gradient
  flows through, ``positions`` = [batch, tokens] mask of the positions that predict a completion
  token (persona steering's decode-only form steers only there, never during rollouts).

Every hook defaults to a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

Rows = list[dict[str, Any]]


@dataclass
class DefenseContext:
    """What a defense may use while it is built: the trial spec, tokenizer, seed, caches."""

    spec: Any
    tokenizer: Any = None
    seed: int = 0
    cache_dir: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LocalFile:
    """A local path a defense reads: the config field holding it (``field`` or ``field.N`` for a
    list entry), the path, whether it must be a folder, what to do when it is missing, and what
    it holds (``kind``: ``adapter``, ``persona_vectors``, ``model`` or ``other``), which says how
    :meth:`Defense.input_problems` reads it before anything starts (datasets, question and prompt
    sets are read by the spec's own input checks)."""

    field: str
    path: str
    folder: bool = False
    hint: str = ""
    kind: str = "other"


def read_problem(item: LocalFile) -> str | None:
    """Read a local file the way its trial will, and say what is wrong (None when it is fine)."""
    if item.kind == "adapter":
        from emtune.data.adapter_files import check_adapter_dir

        try:
            check_adapter_dir(item.path)
        except ValueError as err:
            return str(err)
    elif item.kind == "persona_vectors":
        from emtune.defenses.persona_vectors import PersonaVectorError, load_persona_vectors

        try:
            load_persona_vectors(item.path)
        except PersonaVectorError as err:
            return str(err)
    elif item.kind == "model" and not (Path(item.path).expanduser() / "config.json").is_file():
        return f"{item.path}: no config.json; give a model folder written by save_pretrained (or a hub id)"
    return None


def is_local_source(path: str) -> bool:
    """True for a path on disk; False for ``fixture:NAME`` and ``hub:ORG/NAME`` sources."""
    return not path.startswith(("fixture:", "hub:"))


@dataclass(frozen=True)
class SupervisedMix:
    """A supervised step inside RL: on every ``every_steps``-th optimizer step the loss also gets
    ``weight`` x the next-token loss of a batch of ``rows`` (chat rows, cycled in order)."""

    rows: Rows
    every_steps: int
    weight: float
    source: str = "supervised"  #: the defense it comes from (names its loss when several mix)


@dataclass
class StageServices:
    """What the study lends a defense's ``prepare`` step.

    ``train_undefended_adapter(dataset)`` fine-tunes an undefended LoRA adapter on a dataset
    (a path as in ``data.train.path``, or a DatasetSpec) with the study's model and settings,
    cached by content hash,
    and returns its folder. ``run_task(fn, *args, **kwargs)`` runs ``fn`` where the study's
    trials run (a Ray task with one trial worker's resources, so a GPU stage does not load the
    model on the head node) and returns its result. ``cache_dir`` is the study's stage cache.
    """

    spec: Any
    cache_dir: Path
    model_source: str
    train_undefended_adapter: Callable[[Any], Path]
    run_task: Callable[..., Any]
    log: Callable[[str], None] = print


class Defense:
    """Base of all defenses: every hook is a no-op until a defense overrides it."""

    #: The defense's settings class (its ``name`` field is the registry name).
    config_class: ClassVar[type] = object
    #: The config fields that dial the defense's strength (what a search varies).
    strength: ClassVar[tuple[str, ...]] = ()
    #: Settings that switch the defense off: training is then exactly undefended.
    off: ClassVar[dict[str, Any]] = {}
    #: Training methods this defense has a form for (``sft``; ``grpo`` = it has an RL form).
    training_methods: ClassVar[tuple[str, ...]] = ("sft",)
    #: True when ``loss_terms`` reads the trained model's hidden states from ``outputs``.
    needs_hidden_states: ClassVar[bool] = False
    #: True when ``loss_terms`` reads ``reference()`` with hidden states.
    needs_reference_hidden_states: ClassVar[bool] = False
    #: RL: add ``loss_terms`` on each update's prompt + completion tokens (False: not its RL form).
    rl_loss_terms_apply: ClassVar[bool] = True

    def __init__(self, config: Any, context: DefenseContext):
        self.config = config
        self.context = context

    # --- what the study asks before any trial ------------------------------------------------

    @classmethod
    def spec_problems(cls, config: Any, spec: Any) -> list[str]:
        """Problems of this defense's settings given the whole spec (empty when fine)."""
        return []

    @classmethod
    def local_files(cls, config: Any) -> list[LocalFile]:
        """Local files and folders the settings name (``fixture:`` and ``hub:`` sources excluded)."""
        return []

    @classmethod
    def input_problems(cls, config: Any, spec: Any) -> list[tuple[str, str]]:
        """Read every local file the settings name (each by its ``LocalFile.kind``) and return
        what is wrong, as (config field, problem) pairs (run by ``emtune validate`` and before a
        study starts, so a bad file never fails a trial)."""
        found = []
        for item in cls.local_files(config):
            problem = read_problem(item) if Path(item.path).expanduser().exists() else None  # missing: spec_checks
            if problem:
                found.append((item.field, problem))
        return found

    @classmethod
    def prepare(cls, config: Any, stage: StageServices) -> Any:
        """Run this defense's study stage, if it has one; returns the (possibly updated) config."""
        return config

    @classmethod
    def loss_term_defense(cls) -> bool:
        """True when the defense adds a term to the training loss."""
        return cls.loss_terms is not Defense.loss_terms

    # --- training hooks ----------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The registry name, as written in specs."""
        return self.config.name

    @property
    def active(self) -> bool:
        """False when the defense is at strength 0 and must change nothing."""
        return True

    def transform_data(self, rows: Rows) -> Rows:
        """Return the training rows this defense trains on (default: unchanged)."""
        return rows

    def attach(self, model: Any) -> None:
        """Install training-time hooks on the model."""

    def loss_terms(self, batch: dict[str, Any], outputs: Any, reference: Callable[[], Any]) -> dict[str, Any]:
        """Extra loss terms (already weighted) to add to the task loss, keyed by a log name."""
        return {}

    def finalize(self, model: Any) -> dict[str, float]:
        """Change the trained adapter after training; returns values worth logging."""
        return {}

    def detach(self, model: Any) -> None:
        """Remove every training-only effect before evaluation."""

    def report(self) -> dict[str, Any]:
        """Details worth keeping with the trial (e.g. per-layer scores); saved as an artifact."""
        return {}

    # --- hooks of the RL setting (training.method: grpo) -------------------------------------

    def transform_prompts(self, rows: Rows) -> Rows:
        """Return the prompt rows RL trains on (``{"prompt": messages, ...}``; default: unchanged)."""
        return rows

    def rl_settings(self) -> dict[str, Any]:
        """GRPO settings this defense sets (e.g. ``{"beta": 0.1}``); default none."""
        return {}

    def supervised_mix(self) -> SupervisedMix | None:
        """A supervised step to interleave with the GRPO steps, or None."""
        return None

    def begin_update(self, positions: Any) -> None:
        """The policy-gradient forward pass starts; ``positions`` marks completion-predicting tokens."""

    def end_update(self) -> None:
        """The policy-gradient forward pass is over."""
