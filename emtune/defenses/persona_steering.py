"""Preventive steering with a persona vector (Chen et al., arXiv 2507.21509; docs/method.md defense 4).

During training only, the residual stream is pushed along the "evil" persona direction:

    h_ℓ ← h_ℓ + α · e_ℓ        at every position,

where e_ℓ is the persona vector of layer ℓ (``emtune persona extract``; see
:mod:`emtune.defenses.persona_vectors`) and h_ℓ = ``hidden_states[ℓ]`` is the output of decoder
block ℓ−1 (0 = embeddings). Because the shift already supplies the trait, the fine-tune has no
need to move the weights toward it; the hook is removed before evaluation, so the evaluated model
is the adapter alone. A forward hook on block ℓ−1 does the addition (registered first among the
block's hooks, so Hugging Face's ``hidden_states[ℓ]`` shows the steered value).

Defaults: α = 5.0 (the paper); ℓ = 20, not published by the paper, the persona-vector authors'
default for Qwen2.5-7B. Dials: α (0 = off, larger = stronger push; the vector is raw, not
normalised, so α's scale depends on the vector's norm, recorded in the file) and ℓ.

Note: the hook is on the module, so any forward pass while attached is steered, including the
adapter-disabled reference pass that KL or LDIFS use when stacked with this defense.

RL form (``training.method: grpo``), two modes:

- ``mode: all``: as above, every forward pass while training is steered: the rollouts are
  generated under the steering, and the updates are computed under it;
- ``mode: decode_only`` (the group's variant for RL): rollouts and every no-gradient pass (old and
  reference log-probabilities) are unsteered; in the forward pass the policy gradient flows
  through, α·e_ℓ is added only at the positions that predict a completion token:
  h_ℓ[t] ← h_ℓ[t] + α · m_t · e_ℓ with m_t = 1 when token t+1 is a completion token.

``decode_only`` exists only for GRPO (supervised training has no rollouts).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from emtune.defenses.base import Defense, LocalFile, StageServices
from emtune.defenses.block_hooks import block_output_hook, decoder_blocks, register_block_hook
from emtune.defenses.persona_filter import PairFilter
from emtune.evaluation.judges import resolved_prompt_version
from emtune.models import model_identity
from emtune.spec_errors import StrictModel


class PersonaSteeringConfig(StrictModel):
    """Settings of preventive persona steering; ``alpha`` is the strength dial, ``layer`` the place."""

    name: Literal["persona_steering"] = "persona_steering"
    alpha: float = Field(5.0, ge=0, description="α, steering coefficient; the paper uses 5.0; 0 = off")
    layer: int = Field(
        20, ge=1,
        description="ℓ: adds α·e_ℓ to the output of decoder block ℓ−1 (hidden_states[ℓ]); 20 is the "
                    "persona-vector authors' default for Qwen2.5-7B (the paper does not publish one)",
    )
    vector_path: str | None = Field(
        None, description="persona vector file written by `emtune persona extract`; needed when alpha > 0"
    )

    extract_prompts: str | None = Field(
        None, description="contrastive prompt set (e.g. evil_v1): with no vector_path, the study stage "
        "extracts the vectors once before the trials, where they run (cached in the study folder)"
    )
    extract_max_new_tokens: int = Field(64, gt=0, description="answer length during stage extraction")
    extract_samples: int = Field(1, gt=0, description="answers per question and system prompt")
    extract_filter: Literal["judge", "none"] = Field(
        "judge", description="judge = keep only the pairs the study's judge (evaluation.judge) confirms, the "
        "persona-vectors recipe; none = every pair")
    trait_prompt: str = Field("evil", description="judge prompt that scores the trait (0 absent .. 100 strong)")
    positive_trait_min: float = Field(50.0, ge=0, le=100, description="keep a pair when its positive answer's "
                                      "trait score is at least this")
    negative_trait_max: float = Field(50.0, ge=0, le=100, description="... and its negative answer's at most this")
    coherent_min: float = Field(50.0, ge=0, le=100, description="... and both answers' coherence at least this")
    mode: Literal["all", "decode_only"] = Field(
        "all", description="all: steer every forward pass while training; decode_only (GRPO): steer only the "
        "completion-predicting positions of the update pass, never rollouts")

    @model_validator(mode="after")
    def _vector_when_active(self) -> "PersonaSteeringConfig":
        if self.alpha > 0 and not self.vector_path and not self.extract_prompts:
            raise ValueError(
                "vector_path is required when alpha > 0: create a persona vector file with "
                "`emtune persona extract --model MODEL --out FILE` and set vector_path to it, "
                "or set extract_prompts (e.g. evil_v1) to let the study extract them first"
            )
        return self


def make_steering_hook(vector: Any, alpha: float, positions: Any = None) -> Any:
    """A forward hook that adds ``alpha * vector`` to a block's hidden-state output.

    With ``positions`` (a callable returning a [batch, tokens] mask, or None) the shift is added
    only where the mask is 1, and not at all while it returns None (decode-only steering).
    """
    return block_output_hook(alpha * vector.float(),
                             lambda h, shift, where: h + (shift if where is None else where * shift), positions)


def pair_filter(config: PersonaSteeringConfig) -> PairFilter:
    """The judge rule of the stage's extraction."""
    return PairFilter(config.trait_prompt, config.positive_trait_min, config.negative_trait_max, config.coherent_min)


@dataclass(frozen=True)
class PersonaExtraction:
    """How a study stage extracts persona vectors: the prompt set, answer length and count, and
    the judge filter (``rule``; None keeps every pair)."""

    prompts: str
    max_new_tokens: int = 64
    samples: int = 1
    rule: PairFilter | None = PairFilter()


def extraction(config: Any) -> PersonaExtraction:
    """The stage extraction a config's ``extract_*`` fields describe (persona steering, CAFT)."""
    rule = pair_filter(config) if config.extract_filter == "judge" else None
    return PersonaExtraction(str(config.extract_prompts), config.extract_max_new_tokens,
                             getattr(config, "extract_samples", 1), rule)


def judge_filter_problem(who: str, config: Any, spec: Any) -> list[str]:
    """A stage extraction with the judge filter needs the study's judge."""
    stage = config.extract_prompts and not getattr(config, "vector_path", None)
    if stage and config.extract_filter == "judge" and spec.evaluation.judge.kind == "none":
        return [f"{who}: extract_filter 'judge' keeps the contrastive pairs the judge confirms, but "
                "evaluation.judge.kind is 'none': configure a judge, or set extract_filter: none (every pair)"]
    return []


def tiny_layer_problems(who: str, layers: tuple[int, ...], spec: Any) -> list[str]:
    """On the tiny model (whose depth is known before it is built) every layer must be one of its blocks."""
    blocks = spec.model.tiny.num_layers if spec.model.source == "tiny" else None
    return [] if blocks is None else [f"{who}: layer {layer} is past the tiny model's {blocks} blocks; use "
                                      f"1..{blocks} (or raise model.tiny.num_layers)" for layer in layers if layer > blocks]


def vector_cache_path(how: PersonaExtraction, spec: Any, cache_dir: Path) -> Path:
    """Where the study stage keeps the vectors extracted for this model, prompt set (by content),
    answer length, samples, seed, and judge filter (judge, prompt version, rule)."""
    from emtune.defenses.persona_vectors import load_persona_prompts  # torch

    prompts = load_persona_prompts(how.prompts)
    judge = None
    if how.rule is not None:
        judge_spec = spec.evaluation.judge
        judge = [judge_spec.judge_id, resolved_prompt_version(judge_spec.prompt_version), how.rule.describe()]
    payload = [model_identity(spec.model), prompts.version, prompts.positive, prompts.negative, prompts.questions,
               how.max_new_tokens, how.samples, spec.seed, judge]
    key = hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:12]
    return Path(cache_dir) / "persona" / f"{Path(how.prompts).stem}-{key}.pt"


def stage_vectors(stage: StageServices, how: PersonaExtraction) -> str:
    """The study stage of every user of persona vectors (persona steering, CAFT, the EM monitor):
    extract them once, where the trials run (a Ray task with a trial worker's GPU), judge-filtered
    when ``how.rule`` is set, cached in the study folder by content hash; returns the file's path."""
    from emtune.defenses.persona_vectors import extract_to_file, sidecar_path  # torch

    path = vector_cache_path(how, stage.spec, stage.cache_dir)
    if not path.is_file():
        judge_spec = None
        if how.rule is not None:
            judge_spec = stage.spec.evaluation.judge
            if judge_spec.cache_path is None:  # verdicts shared with the study's evaluations
                judge_spec = judge_spec.model_copy(update={"cache_path": str(Path(stage.cache_dir) / "judge.db")})
        rule = how.rule or PairFilter()
        kept = "every pair" if how.rule is None else (
            f"pairs with {rule.trait_prompt} >= {rule.positive_trait_min:g} (positive), <= "
            f"{rule.negative_trait_max:g} (negative), coherent >= {rule.coherent_min:g}")
        stage.log(f"stage: extracting persona vectors ({how.prompts}, {kept}) into {path.name}")
        stage.run_task(extract_to_file, stage.spec.model, stage.model_source, how.prompts, how.max_new_tokens,
                       stage.spec.seed, str(path), judge_spec, rule, how.samples)
    meta = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    stage.log(f"stage: persona vectors {path.name}: kept {meta['n_kept']} of {meta['n_pairs']} pairs")
    return str(path)


def checked_persona_vectors(path: str, spec: Any, model: Any, where: str) -> Any:
    """The vectors ``[num_hidden_states, hidden]`` of a persona vector file, after checking that
    they were extracted from ``spec``'s model and match ``model``'s width (``where`` names the
    spec field in errors)."""
    from emtune.defenses.persona_vectors import PersonaVectorError, load_persona_vectors

    persona = load_persona_vectors(Path(path))
    recorded = persona.meta.get("model")
    if spec is not None and getattr(spec, "model", None) is not None:
        expected = model_identity(spec.model)
        if recorded != expected:
            raise PersonaVectorError(f"{where} {path!r} was extracted from model {recorded!r}, but this trial "
                                     f"trains {expected!r}: extract a vector for this model")
    hidden = persona.vectors.shape[1]
    model_hidden = getattr(getattr(model, "config", None), "hidden_size", hidden)
    if model_hidden != hidden:
        raise PersonaVectorError(f"persona vector width {hidden} does not match the model's hidden size "
                                 f"{model_hidden} ({path!r})")
    return persona.vectors


class PersonaSteering(Defense):
    """Adds α·e_ℓ to the output of decoder block ℓ−1 during training; removed at ``detach``."""

    config_class = PersonaSteeringConfig
    strength = ("alpha",)
    off = {"alpha": 0.0}
    training_methods = ("sft", "grpo")

    @classmethod
    def local_files(cls, config: PersonaSteeringConfig) -> list[LocalFile]:
        """The persona vector file, and a prompt-set file given as a path."""
        files = []
        if config.vector_path:
            files.append(LocalFile("vector_path", config.vector_path, kind="persona_vectors",
                                   hint="create it with `emtune persona extract`, or set extract_prompts instead"))
        if config.extract_prompts and config.extract_prompts.endswith((".yaml", ".yml")):
            files.append(LocalFile("extract_prompts", config.extract_prompts,
                                   hint="fix the path (relative to the spec's folder) or name a shipped set (evil_v1)"))
        return files

    @classmethod
    def spec_problems(cls, config: PersonaSteeringConfig, spec: Any) -> list[str]:
        """A stage extraction with the judge filter needs the study's judge; on the tiny model
        (whose depth is known before it is built) the layer must be one of its blocks; decode_only
        steering acts on rollout training passes, so it has no supervised form."""
        problems = (judge_filter_problem("persona_steering", config, spec)
                    + tiny_layer_problems("persona_steering", (config.layer,), spec))
        if config.mode == "decode_only" and spec.training.method != "grpo":
            problems.append("persona_steering mode decode_only exists only for training.method grpo; use mode: all")
        return problems

    @classmethod
    def input_problems(cls, config: PersonaSteeringConfig, spec: Any) -> list[tuple[str, str]]:
        """The vector file read as a trial reads it, and checked against the spec's model and layer."""
        problems = super().input_problems(config, spec)
        if problems or not config.vector_path or not Path(config.vector_path).expanduser().is_file():
            return problems  # a missing file is one of the spec's own problems
        from emtune.defenses.persona_vectors import load_persona_vectors

        problem = cls.vector_problem(config, load_persona_vectors(config.vector_path), spec.model)
        return [("vector_path", problem)] if problem else []

    @staticmethod
    def vector_problem(config: PersonaSteeringConfig, persona: Any, model_spec: Any) -> str | None:
        """Why a loaded vector file cannot steer this model at ``config.layer`` (None when it can)."""
        recorded = persona.meta.get("model")
        if model_spec is not None and recorded != model_identity(model_spec):
            return (f"persona_steering.vector_path {config.vector_path!r} was extracted from model {recorded!r}, "
                    f"but this study trains {model_identity(model_spec)!r}: extract a vector for this model")
        num_states = persona.vectors.shape[0]
        if config.layer >= num_states:
            return (f"persona_steering.layer {config.layer} is out of range: the vector file has hidden states "
                    f"0..{num_states - 1} (steerable layers 1..{num_states - 1})")
        return None

    @classmethod
    def prepare(cls, config: PersonaSteeringConfig, stage: StageServices) -> PersonaSteeringConfig:
        """With ``extract_prompts`` and no ``vector_path``: extract the vectors once, where the
        trials run (a Ray task with a trial worker's GPU), judge-filtered unless ``extract_filter``
        is none, cached by content hash, and point at them."""
        if not config.extract_prompts or config.vector_path:
            return config
        return config.model_copy(update={"vector_path": stage_vectors(stage, extraction(config))})

    def __init__(self, config: PersonaSteeringConfig, context: Any):
        super().__init__(config, context)
        self._handle: Any = None
        self._positions: Any = None  # decode_only: the mask of the current update pass

    @property
    def active(self) -> bool:
        return self.config.alpha > 0

    def load_vector(self, model: Any) -> Any:
        """e_ℓ from the configured file, after checking it belongs to this model and layer."""
        from emtune.defenses.persona_vectors import PersonaVectorError, load_persona_vectors

        persona = load_persona_vectors(Path(self.config.vector_path))
        spec = getattr(self.context, "spec", None)
        problem = self.vector_problem(self.config, persona, getattr(spec, "model", None))
        if problem:
            raise PersonaVectorError(problem)
        num_states, hidden = persona.vectors.shape
        model_hidden = getattr(getattr(model, "config", None), "hidden_size", hidden)
        if model_hidden != hidden:
            raise PersonaVectorError(f"persona vector width {hidden} does not match the model's hidden size "
                                     f"{model_hidden} ({self.config.vector_path!r})")
        return persona.vectors[self.config.layer]

    def attach(self, model: Any) -> None:
        if not self.active or self._handle is not None:
            return
        decoder_blocks(model)  # an unsupported architecture fails before the vector is read
        # prepend (register_block_hook): run before transformers' own output-capturing hook, so
        # hidden_states[ℓ] is steered
        positions = (lambda: self._positions) if self.config.mode == "decode_only" else None
        hook = make_steering_hook(self.load_vector(model), self.config.alpha, positions)
        self._handle = register_block_hook(model, self.config.layer, hook, "persona_steering.layer")

    def detach(self, model: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._positions = None

    def begin_update(self, positions: Any) -> None:
        """decode_only: steer the completion-predicting positions of this pass."""
        self._positions = positions

    def end_update(self) -> None:
        self._positions = None

    def __getstate__(self) -> dict[str, Any]:
        # A hook handle is tied to one process's module; a shipped copy starts detached.
        state = dict(self.__dict__)
        state["_handle"] = None
        state["_positions"] = None
        return state
