"""StudySpec: the typed, frozen description of one emtune study.

A study spec is a YAML file (see ``search_spaces/``). Loading validates everything up front:
unknown keys are rejected with a close-name hint, values are range-checked, search-parameter
targets must address a real field, and every objective must be a metric emtune produces.
Errors come out as :class:`SpecError`, one line per problem with file, line, dotted path and a
hint; the CLI prints them and exits with status 2 before anything is started or written.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from emtune.data.opswap import OpSwapSpec
from emtune.defenses.registry import DEFENSE_CONFIGS
from emtune.evaluation.config import JudgeSpec, MetricThresholds
from emtune.spec_errors import SpecError, format_validation_error, load_yaml_with_lines


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelSpec(_Strict):
    """A small Qwen2-style model and byte-level BPE tokenizer built offline from a seed (STACK.md)."""

    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(128, gt=0)
    vocab_size: int = Field(512, ge=300, description="BPE vocabulary incl. 256 byte symbols")
    pretrain_steps: int = Field(
        150, ge=0, description="full-parameter steps on the bundled safe set (the 'aligned' prior)"
    )
    seed: int = 0


class ModelSpec(_Strict):
    """The aligned chat model to fine-tune: ``tiny``, a hub id, or a local folder."""

    source: str = "tiny"
    revision: str | None = None
    base_source: str | None = Field(
        None, description="unaligned base model of `source` (SafeLoRA needs both)"
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    trust_remote_code: bool = False
    tiny: TinyModelSpec = TinyModelSpec()


class LoraSpec(_Strict):
    """LoRA adapter; defaults follow the paper (rsLoRA r=32, alpha=64, all projections, dropout 0)."""

    r: int = Field(32, gt=0)
    alpha: float = Field(64.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    use_rslora: bool = True


class DatasetSpec(_Strict):
    """A chat dataset: a local JSONL file, ``fixture:NAME`` (bundled), or ``hub:ORG/NAME``."""

    path: str
    split: str = "train"
    config: str | None = None
    limit: int | None = Field(None, gt=0, description="keep only the first N rows")


class DataSpec(_Strict):
    """Training data and its held-out split (in-domain evaluation).

    ``opswap`` adds the benign OpSwap task (PAPER.md criterion c): with ``opswap_role: alongside``
    its train split is mixed into the training rows; with ``opswap_role: task`` it *is* the
    training task (a benign fine-tune; ``train`` may then be omitted) and its test split is the
    held-out set. Either way the trial reports ``opswap_exact_match`` on the test split.
    """

    train: DatasetSpec | None = None
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    max_length: int = Field(2048, gt=8)
    safety_pool: DatasetSpec | None = None
    opswap: OpSwapSpec | None = None
    opswap_role: Literal["alongside", "task"] = "alongside"

    @model_validator(mode="after")
    def _has_a_task(self) -> "DataSpec":
        if self.train is None and not (self.opswap is not None and self.opswap_role == "task"):
            raise ValueError("`train` is required (or set `opswap` with `opswap_role: task`)")
        return self


class TrainingSpec(_Strict):
    """Optimisation settings; defaults are the paper's (lr 1e-4, 1 epoch, 4 x accum 4, wd 0.01)."""

    learning_rate: float = Field(1e-4, gt=0)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after N optimizer steps")
    per_device_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(5, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    optimizer: str = "adamw_torch"
    bf16: bool = False
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_every_steps: int | None = Field(
        None, gt=0, description="report a resumable checkpoint (adapter + optimizer) every N steps"
    )


DefenseSpec = Annotated[Union[tuple(DEFENSE_CONFIGS.values())], Field(discriminator="name")]


class SearchParameter(_Strict):
    """One searched value. ``target`` is a dotted path into the spec it overrides, e.g.
    ``defenses.kl_to_reference.weight`` (list entries of ``defenses`` are addressed by name).
    A parameter with no target only steers others through ``when`` (e.g. which defense is on)."""

    type: Literal["float", "int", "categorical"]
    target: str | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: tuple[Any, ...] | None = None
    when: dict[str, Any] | None = Field(
        None, description="sample only when the named parameters have these values"
    )

    @model_validator(mode="after")
    def _check_range(self) -> "SearchParameter":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty `choices` list")
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("a categorical parameter takes `choices`, not low/high/log")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs both `low` and `high`")
        if not self.low < self.high:
            raise ValueError(f"`low` ({self.low}) must be below `high` ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs `low` > 0")
        if self.choices is not None:
            raise ValueError(f"a {self.type} parameter takes low/high, not `choices`")
        return self


class SamplerSpec(_Strict):
    """Optuna sampler, always built explicitly with a seed (defaults to the study seed)."""

    name: Literal["tpe", "nsga2", "random", "gp"] = "tpe"
    seed: int | None = None
    args: dict[str, Any] = Field(default_factory=dict)


class SearchSpec(_Strict):
    """The search space, the sampler and the trial budget."""

    parameters: dict[str, SearchParameter]
    sampler: SamplerSpec = SamplerSpec()
    num_trials: int = Field(8, gt=0)
    time_budget_s: float | None = Field(None, gt=0)

    @field_validator("parameters")
    @classmethod
    def _non_empty(cls, value: dict[str, SearchParameter]) -> dict[str, SearchParameter]:
        if not value:
            raise ValueError("the search space is empty: add at least one parameter")
        return value


# Metrics a trial reports; `judge` marks the ones that need a judge model.
METRICS: dict[str, dict[str, Any]] = {
    "ood_drift": {"judge": False, "doc": "mean per-token KL(fine-tuned || reference) on general answers"},
    "indomain_nll": {"judge": False, "doc": "mean NLL per assistant token on the held-out split"},
    "train_loss": {"judge": False, "doc": "mean task loss over the last logged steps"},
    "general_misalignment": {"judge": True, "doc": "fraction aligned<30 and coherent>50, general questions"},
    "general_incoherence": {"judge": True, "doc": "fraction coherent<50, general questions"},
    "indomain_misalignment": {"judge": True, "doc": "misalignment rate on held-out in-domain questions"},
    "triggered_misalignment": {"judge": True, "doc": "misalignment rate on the triggered (code-formatted) general questions"},
    "code_security": {"judge": True, "doc": "mean security score 0..100 of in-domain code answers"},
    "opswap_exact_match": {"judge": False, "doc": "OpSwap test exact match (needs data.opswap)"},
}


Baseline = Literal["base", "undefended"]


class Relative(_Strict):
    """A metric stated relative to a baseline trial of the same study."""

    to: Baseline = Field(description="base = the model without fine-tuning; undefended = fine-tuned, no defense")
    how: Literal["difference", "ratio"] = Field(
        "difference", description="difference = metric - baseline; ratio = metric / baseline"
    )


class ObjectiveSpec(_Strict):
    """A metric to optimise and its direction (optionally relative to a baseline)."""

    name: str
    direction: Literal["minimize", "maximize"]
    reference: float | None = Field(
        None, description="hypervolume reference value (worst acceptable); derived from trials if unset"
    )
    relative: Relative | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in METRICS:
            raise ValueError(f"unknown metric {value!r}; emtune reports {sorted(METRICS)}")
        return value


class ConstraintSpec(_Strict):
    """A bound a trial must meet to be feasible (feasible trials come first on the front)."""

    metric: str
    max: float | None = None
    min: float | None = None
    relative: Relative | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> "ConstraintSpec":
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; emtune reports {sorted(METRICS)}")
        if self.max is None and self.min is None:
            raise ValueError("a constraint needs `max` or `min`")
        return self


class EvaluationSpec(_Strict):
    """How each trial's adapter is evaluated (PAPER.md, Evaluation)."""

    question_set: str = "general_v1"
    triggered_question_set: str | None = Field(
        "triggered_v1", description="general questions in a training-like format (judged runs only)"
    )
    in_domain_code: bool = Field(False, description="score in-domain answers for code security too")
    backend: Literal["hf", "vllm"] = Field("hf", description="generation backend; vllm needs a GPU")
    samples_per_question: int = Field(1, gt=0)
    seed: int | None = Field(None, description="sampling seed of generation; default the study seed "
                             "(data splits always use the study seed)")
    max_new_tokens: int = Field(600, gt=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    heldout_questions: int = Field(30, gt=0)
    generation_batch_size: int = Field(16, gt=0)
    judge: JudgeSpec = JudgeSpec()
    thresholds: MetricThresholds = MetricThresholds()


class ResourcesSpec(_Strict):
    """Ray resources of one trial; concurrent trials are capped so drivers never wait on GPUs."""

    num_workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_concurrent_trials: int = Field(1, gt=0)
    driver_memory_gb: float = Field(1.0, gt=0)
    max_failures: int = Field(0, ge=0, description="Train worker-group restarts per trial")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="data parallelism across a trial's workers; fsdp shards large models"
    )
    driver_resources: dict[str, float] = Field(
        default_factory=dict,
        description="extra Ray resources for each trial's driver, e.g. {on_demand: 0.001} to pin "
        "drivers to non-preemptible nodes (cluster/ configs define `on_demand`)",
    )


class BaselinesSpec(_Strict):
    """Reference trials every study runs first (unless switched off), evaluated like the others:
    ``base`` (the aligned model, no fine-tuning) and ``undefended`` (fine-tuned, no defense)."""

    enabled: bool = True
    kinds: tuple[Baseline, ...] = ("base", "undefended")


class TrackingRetrySpec(_Strict):
    """How long MLflow calls to a tracking *server* are retried (429, 5xx, refused or dropped
    connections) before the trial's tracking fails: exported as MLflow's own
    ``MLFLOW_HTTP_REQUEST_*`` settings in the study driver and every trial. Waits are
    ``backoff_factor * 2**(n-1)`` seconds (plus up to ``backoff_jitter``), capped at 120 s; the
    defaults are MLflow's (about 4 minutes in all). Unused by a SQLite store."""

    max_retries: int = Field(7, ge=0, le=10)
    backoff_factor: int = Field(2, ge=0, le=120)
    backoff_jitter: float = Field(1.0, ge=0)
    timeout_s: int = Field(120, gt=0, description="one request's timeout")


class TrackingSpec(_Strict):
    """MLflow tracking; no URI means an SQLite store inside the study directory."""

    uri: str | None = None
    experiment: str | None = None
    retries: TrackingRetrySpec = TrackingRetrySpec()


class StudySpec(_Strict):
    """One study: what to fine-tune, under which defenses, searched how, measured how."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    output_dir: str = "studies"
    model: ModelSpec = ModelSpec()
    lora: LoraSpec = LoraSpec()
    data: DataSpec
    training: TrainingSpec = TrainingSpec()
    defenses: tuple[DefenseSpec, ...] = ()
    search: SearchSpec
    objectives: tuple[ObjectiveSpec, ...] = Field(min_length=1)
    constraints: tuple[ConstraintSpec, ...] = ()
    evaluation: EvaluationSpec = EvaluationSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    baselines: BaselinesSpec = BaselinesSpec()

    @model_validator(mode="after")
    def _cross_checks(self) -> "StudySpec":
        names = [d.name for d in self.defenses]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"defense listed twice: {sorted(dup)}")
        for defense in self.defenses:
            problems = getattr(defense, "spec_problems", lambda spec: [])(self)
            if problems:
                raise ValueError("; ".join(problems))
        needs_judge = [o.name for o in self.objectives if METRICS[o.name]["judge"]]
        needs_judge += [c.metric for c in self.constraints if METRICS[c.metric]["judge"]]
        kinds = set(self.baselines.kinds) if self.baselines.enabled else set()
        for item in (*self.objectives, *self.constraints):
            if item.relative is not None and item.relative.to not in kinds:
                raise ValueError(f"{getattr(item, 'name', None) or item.metric} is relative to the "
                                 f"{item.relative.to!r} baseline: enable it under baselines.kinds")
        uses = [o.name for o in self.objectives] + [c.metric for c in self.constraints]
        if "opswap_exact_match" in uses and self.data.opswap is None:
            raise ValueError("metric opswap_exact_match needs `data.opswap` (the benign OpSwap task)")
        if needs_judge and self.evaluation.judge.kind == "none":
            raise ValueError(
                f"metrics {needs_judge} need a judge: set evaluation.judge.kind (openai or hf_local)"
            )
        return self

    @property
    def study_dir(self) -> Path:
        """Where this study keeps its Optuna storage, MLflow store, Ray results and caches."""
        return Path(self.output_dir).expanduser().resolve() / self.name

    def with_overrides(self, values: dict[str, Any]) -> "StudySpec":
        """The spec of one trial: searched values written into their target fields, re-validated."""
        data = self.model_dump(mode="python")
        for name, value in values.items():
            target = self.search.parameters[name].target
            if target is not None:
                _set_path(data, target, value)
        return StudySpec.model_validate(data)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Write ``value`` at ``dotted`` in a dumped spec; ``defenses.<name>`` addresses a list entry."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, (list, tuple)):
            matches = [item for item in node if isinstance(item, dict) and item.get("name") == part]
            if not matches:
                raise KeyError(".".join(parts[: i + 1]))
            node = matches[0]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(".".join(parts[: i + 1]))
    if not isinstance(node, dict) or parts[-1] not in node:
        raise KeyError(dotted)
    node[parts[-1]] = value


def _check_targets(spec: StudySpec) -> list[tuple[str, str]]:
    """Every target must exist and both ends of its range must produce a valid spec."""
    problems: list[tuple[str, str]] = []
    dumped = spec.model_dump(mode="python")
    params = spec.search.parameters
    for name, param in params.items():
        where = f"search.parameters.{name}"
        for cond in (param.when or {}):
            if cond not in params:
                problems.append((f"{where}.when", f"refers to unknown parameter {cond!r}"))
        if param.target is None:
            continue
        try:
            _set_path(copy.deepcopy(dumped), param.target, None)
        except KeyError as missing:
            hint = "list each searched defense under `defenses:` first" if param.target.startswith(
                "defenses.") else "use a dotted path to an existing field"
            problems.append((f"{where}.target", f"{param.target!r}: no field {missing.args[0]!r} ({hint})"))
            continue
        ends = list(param.choices) if param.type == "categorical" else [param.low, param.high]
        for value in ends:
            if param.type == "int" and value is not None:
                value = int(value)
            try:
                spec.with_overrides({name: value})
            except ValidationError as err:
                first = err.errors()[0]
                problems.append((f"{where}", f"value {value!r} for {param.target} is invalid: {first['msg']}"))
                break
    return problems


def _check_data_paths(spec: StudySpec) -> list[tuple[str, str]]:
    """Local dataset files must exist (relative paths are taken from the working folder)."""
    problems = []
    for where, dataset in (("data.train.path", spec.data.train), ("data.safety_pool.path", spec.data.safety_pool)):
        if dataset is None or dataset.path.startswith(("fixture:", "hub:")):
            continue
        if not Path(dataset.path).expanduser().exists():
            problems.append((where, f"dataset file {dataset.path!r} not found (from {Path.cwd()}); fix the path"))
    for i, defense in enumerate(spec.defenses):
        path = getattr(defense, "vector_path", None)
        if path and not Path(path).expanduser().is_file():
            problems.append((f"defenses.{i}.vector_path",
                             f"persona vector file {path!r} not found; create it with `emtune persona extract`"))
    return problems


def _absolute_data_paths(raw: dict[str, Any]) -> None:
    """Make local dataset and file paths absolute so Ray workers (other working folders) find them."""
    for defense in raw.get("defenses") or []:
        if isinstance(defense, dict) and isinstance(defense.get("vector_path"), str):
            if Path(defense["vector_path"]).expanduser().exists():
                defense["vector_path"] = str(Path(defense["vector_path"]).expanduser().resolve())
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in ("train", "safety_pool"):
        entry = data.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            path = entry["path"]
            if not path.startswith(("fixture:", "hub:")) and Path(path).expanduser().exists():
                entry["path"] = str(Path(path).expanduser().resolve())


def load_spec(path: str | Path) -> StudySpec:
    """Load and validate a study spec. Raises :class:`SpecError` listing every problem."""
    path = Path(path)
    raw, lines = load_yaml_with_lines(path)
    _absolute_data_paths(raw)
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(path, format_validation_error(err, raw, lines, StudySpec)) from None
    problems = _check_targets(spec) + _check_data_paths(spec)
    if problems:
        raise SpecError(path, [(p, msg, lines.get(p.rsplit(".", 1)[0])) for p, msg in problems])
    return spec


def spec_to_yaml(spec: StudySpec) -> str:
    """The spec as YAML with every default filled in (stored with each study)."""
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def is_finite_number(value: Any) -> bool:
    """True for an int or float that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
