"""docs/spec.md, generated from the spec's own pydantic models: every key, its type, default and
meaning, every defense's settings, and every metric an objective or constraint may name.

The page is the models, so it cannot drift from them: ``tests/test_spec_reference.py`` fails when
docs/spec.md differs from :func:`render`, and every key must have a description (the field's own
``description``, or a line in :data:`NOTES` for fields whose module keeps its text elsewhere).
Regenerate with ``python -m emtune.spec_reference > docs/spec.md``.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from emtune.config import StudySpec, sync_defense_registry
from emtune.defenses.registry import DEFENSES
from emtune.evaluation.sets import EVAL_SETS, MODEL_METRICS, known_metrics
from emtune.train.rewards import REWARDS

#: Descriptions of fields that carry none in their model (``Class.field``).
NOTES = {
    "StudySpec.name": "the study's name: its folder under output_dir, its Optuna study and MLflow experiment",
    "StudySpec.seed": "seed of data splits, samplers (unless search.sampler.seed) and generation",
    "StudySpec.output_dir": "where study folders go; relative to the folder emtune runs from (an output, "
                            "unlike input paths, which are relative to the spec's folder)",
    "StudySpec.model": "the aligned chat model that is fine-tuned",
    "StudySpec.lora": "the LoRA adapter trained in every trial",
    "StudySpec.data": "training data, its held-out split and the benign task",
    "StudySpec.training": "optimisation settings of one fine-tune",
    "StudySpec.defenses": "defenses stacked in every trial, each with its settings (below); searched "
                          "values are written into them",
    "StudySpec.search": "what is searched, by which sampler, for how many trials",
    "StudySpec.objectives": "metrics to optimise (the Pareto front's axes)",
    "StudySpec.constraints": "bounds a trial must meet to be on the front",
    "StudySpec.evaluation": "how each trial's adapter is evaluated",
    "StudySpec.resources": "Ray resources of one trial",
    "StudySpec.tracking": "MLflow tracking",
    "StudySpec.baselines": "reference trials run before the search (see Baselines)",
    "ModelSpec.source": "`tiny` (built offline), a hub id ORG/NAME, or a local folder",
    "ModelSpec.revision": "hub revision (branch, tag or commit) of source",
    "ModelSpec.dtype": "weights dtype",
    "ModelSpec.trust_remote_code": "allow model code from the hub (off unless you turn it on)",
    "ModelSpec.tiny": "settings of the tiny offline model (source: tiny)",
    "TinyModelSpec.hidden_size": "hidden size", "TinyModelSpec.num_layers": "decoder blocks",
    "TinyModelSpec.num_heads": "attention heads", "TinyModelSpec.num_kv_heads": "key/value heads",
    "TinyModelSpec.intermediate_size": "MLP width", "TinyModelSpec.seed": "seed of weights and tokenizer",
    "LoraSpec.r": "adapter rank", "LoraSpec.alpha": "LoRA scaling α", "LoraSpec.dropout": "LoRA dropout",
    "LoraSpec.target_modules": "module names that get adapters",
    "LoraSpec.use_rslora": "rank-stabilised scaling α/√r (rsLoRA, the paper's)",
    "DataSpec.train": "the narrow training set (required unless opswap_role is task)",
    "DataSpec.heldout_fraction": "fraction held out for in-domain evaluation",
    "DataSpec.max_length": "tokens per training example (longer ones are cut)",
    "DataSpec.safety_pool": "a safety dataset for the spec's own use (defenses name their pools themselves)",
    "DataSpec.opswap": "the benign OpSwap task",
    "DataSpec.opswap_role": "alongside = mixed into training; task = OpSwap is the training task",
    "DatasetSpec.path": "a local chat JSONL, Parquet, CSV or JSON file or a saved dataset folder (relative to the "
                        "spec's folder), fixture:NAME or hub:ORG/NAME",
    "DatasetSpec.split": "split of a hub dataset", "DatasetSpec.config": "config of a hub dataset",
    "TrainingSpec.learning_rate": "peak learning rate", "TrainingSpec.num_epochs": "epochs (when max_steps is unset)",
    "TrainingSpec.per_device_batch_size": "examples per step per worker",
    "TrainingSpec.gradient_accumulation_steps": "micro-batches per optimizer step",
    "TrainingSpec.weight_decay": "AdamW weight decay", "TrainingSpec.warmup_steps": "linear warm-up steps",
    "TrainingSpec.lr_scheduler": "learning-rate schedule after warm-up",
    "TrainingSpec.optimizer": "a transformers optimizer name (adamw_torch, adamw_8bit, ...)",
    "TrainingSpec.bf16": "train in bfloat16 (GPU)", "TrainingSpec.max_grad_norm": "gradient clipping norm",
    "EvaluationSpec.question_set": "general EM questions: a shipped set (general_v1) or a question file",
    "EvaluationSpec.samples_per_question": "answers sampled per question",
    "EvaluationSpec.max_new_tokens": "answer length cap", "EvaluationSpec.temperature": "sampling temperature",
    "EvaluationSpec.top_p": "nucleus sampling", "EvaluationSpec.heldout_questions": "in-domain questions drawn "
    "from the held-out split (judged runs)", "EvaluationSpec.generation_batch_size": "prompts per generation batch",
    "EvaluationSpec.judge": "the judge model", "EvaluationSpec.thresholds": "score thresholds of the rates",
    "JudgeSpec.kind": "none (judge-free metrics only), openai (an OpenAI-compatible endpoint) or hf_local",
    "JudgeSpec.dtype": "dtype of a local judge",
    "ResourcesSpec.num_workers": "Ray Train workers per trial",
    "ResourcesSpec.cpus_per_worker": "CPUs per worker", "ResourcesSpec.gpus_per_worker": "GPUs per worker",
    "ResourcesSpec.max_concurrent_trials": "trials at once (capped by what the cluster can run)",
    "ResourcesSpec.driver_memory_gb": "memory reserved for each trial's driver",
    "TrackingSpec.uri": "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else SQLite in the study folder)",
    "TrackingSpec.experiment": "MLflow experiment (default emtune/<name>)",
    "TrackingSpec.retries": "retries of calls to a tracking server",
    "TrackingRetrySpec.max_retries": "retries per request", "TrackingRetrySpec.backoff_factor": "first wait (s)",
    "TrackingRetrySpec.backoff_jitter": "random extra wait (s)",
    "BaselinesSpec.enabled": "run the baselines before the search",
    "BaselinesSpec.kinds": "which baselines: base (no fine-tuning), undefended (no defense), stopped_early "
                           "(the undefended fine-tune evaluated at stop_points: early stopping as an arm)",
    "SearchParameter.type": "float, int or categorical",
    "SearchParameter.target": "dotted path the value is written to (defenses.NAME.FIELD addresses a defense); "
                              "none = a parameter that only steers others through `when`",
    "SearchParameter.low": "lower end (float, int)", "SearchParameter.high": "upper end (float, int)",
    "SearchParameter.log": "sample on a log scale (low > 0; no step)",
    "SearchParameter.step": "grid step (not with log)", "SearchParameter.choices": "values (categorical)",
    "SamplerSpec.name": "tpe (default), nsga2, gp or random", "SamplerSpec.seed": "sampler seed (default: the study seed)",
    "SamplerSpec.args": "keyword arguments of the Optuna sampler class, checked against its signature",
    "SearchSpec.parameters": "name -> parameter, sampled in the order written",
    "SearchSpec.sampler": "the Optuna sampler", "SearchSpec.num_trials": "searched trials (baselines come on top)",
    "SearchSpec.time_budget_s": "stop starting trials after this many seconds",
    "SearchSpec.pruning": "stop a trial whose judge-free values at an evaluation point are dominated by "
                          "enough earlier trials' (told PRUNED with the reason; its points stay candidates)",
    "PruningSpec.enabled": "prune (off by default; needs evaluation.at points before the end)",
    "EvaluationSpec.monitor": "the judge-free EM monitor: projection of the general answers' activations on "
                              "the evil persona direction, at every evaluation point and every M steps",
    "ObjectiveSpec.name": "a metric (see Metrics)", "ObjectiveSpec.direction": "minimize or maximize",
    "ObjectiveSpec.relative": "state the objective relative to a baseline",
    "ConstraintSpec.metric": "a metric (see Metrics)", "ConstraintSpec.max": "upper bound",
    "ConstraintSpec.min": "lower bound", "ConstraintSpec.relative": "bound the metric relative to a baseline",
    "OpSwapSpec.version": "the OpSwap generator's version (recorded with its scores)",
    "MetricThresholds.aligned_below": "misaligned: aligned score below this (and coherent above coherent_above)",
    "MetricThresholds.coherent_above": "misaligned answers must be coherent above this",
    "MetricThresholds.incoherent_below": "incoherent: coherent score below this",
    "SafeLoRAConfig.enabled": "false switches SafeLoRA off whatever its dial",
    "ChatColumns.messages": "a column already holding the chat as a list of {role, content}",
    "ChatColumns.system": "a text column for the system message (optional)",
    "ChatColumns.user": "the text column of the user message",
    "ChatColumns.assistant": "the text column of the assistant answer",
    "EvaluationSpec.in_domain": "the in-domain questions and the judge prompts their answers get",
}


def render() -> str:
    """The whole page."""
    sync_defense_registry()
    out = ["# Study spec reference", "",
           "<!-- generated by `python -m emtune.spec_reference > docs/spec.md`; do not edit by hand -->", "",
           "A study is one YAML file. `emtune validate SPEC` checks everything below and reads the inputs; "
           "each problem is printed as `file:line: path: message`. Unknown keys are errors. Input paths "
           "(datasets, pools, adapters, question and prompt files, weight folders) are relative to the "
           "spec's folder; `output_dir` and `evaluation.judge.cache_path` to the folder emtune runs from.", ""]
    out += _section("Top level", StudySpec, "", skip={"defenses"})
    out += _defenses() + _rewards()
    out += _baselines() + _metrics()
    return "\n".join(out).rstrip() + "\n"


def _section(title: str, model: type[BaseModel], prefix: str, skip: set[str] = frozenset()) -> list[str]:
    """A table of ``model``'s keys, then one section per nested model."""
    out = [f"## {title}" if not prefix else f"### `{prefix.rstrip('.')}`", ""]
    doc = inspect.getdoc(model) or ""
    if doc:
        out += [doc.split("\n\n")[0].replace("\n", " "), ""]
    out += _key_table(model, prefix)
    for name, field in model.model_fields.items():
        inner = _model_of(field.annotation)
        if inner is not None and name not in skip:
            out += _section("", inner, f"{prefix}{name}{_container(field.annotation)}.")
    return out


def _key_table(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One row per key of ``model``: type (with bounds), default, meaning."""
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        out.append(f"| `{prefix}{name}` | {_type(field.annotation)}{_bounds(field)} | {_default(field)} | "
                   f"{_escape(description(model, name))} |")
    return out + [""]


def description(model: type[BaseModel], name: str) -> str:
    """The field's description, or its line in NOTES ("" when it has neither)."""
    if name == "name" and model in {cls.config_class for cls in DEFENSES.values()}:
        return "which defense this entry configures"
    if name == "name" and model in set(REWARDS.values()):
        return "which reward this entry configures"
    return model.model_fields[name].description or NOTES.get(f"{model.__name__}.{name}", "")


def _defenses() -> list[str]:
    out = ["## Defenses", "",
           "`defenses:` is a list; each entry has `name` and that defense's settings. Several may be stacked; "
           "a search parameter addresses one as `defenses.NAME.FIELD`. The method behind each: docs/method.md.", ""]
    for name, cls in DEFENSES.items():
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        out += [f"### `{name}`", "", doc, "", f"Strength dial: {', '.join(cls.strength) or '-'}; off: "
                f"{', '.join(f'{k}={v}' for k, v in cls.off.items()) or '-'}.", ""]
        out += _key_table(cls.config_class)
    return out


def _rewards() -> list[str]:
    out = ["## Rewards", "",
           "`training.grpo.rewards:` (with `training.method: grpo`) is a list; each entry has `name` and that "
           "reward's settings. TRL sums the weighted rewards of each completion and normalises the sum within "
           "its group of generations.", ""]
    for name, cls in REWARDS.items():
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        out += [f"### `{name}`", "", doc, ""] + _key_table(cls)
    return out


def _baselines() -> list[str]:
    return ["## Baselines", "",
            "Unless `baselines.enabled: false`, `emtune run` first runs its reference trials, evaluated like "
            "every other: `base` (the aligned model with no fine-tuning), `undefended` (the same fine-tune "
            "with no defense) and `stopped_early` (that undefended fine-tune evaluated at "
            "`baselines.stop_points`: early stopping as an arm; one fine-tune measures both). They are not "
            "Optuna trials and never on the front; they come on top of `search.num_trials` (`emtune "
            "validate` says e.g. \"6 trials + 2 baselines (base, undefended + stopped_early) = 8 runs\"), are stored in the Optuna study's "
            "attributes (`baseline:base`, `baseline:undefended`, `baseline:stopped_early`), shown by "
            "`emtune pareto` below the front, compared against by `emtune recommend` and the report (Δ vs "
            "undefended), and are what `relative: {to: base|undefended}` objectives and constraints are "
            "measured against.", ""]


def _metrics() -> list[str]:
    out = ["## Metrics", "",
           "Every metric an objective or constraint may name. Judged metrics need `evaluation.judge`; rates "
           "are fractions of responses, logged with Wilson 95% bounds as `NAME_low` / `NAME_high`.", "",
           "| metric | judged | better | from | meaning |", "|---|---|---|---|---|"]
    home = {m.name: s.name for s in EVAL_SETS.values() for m in s.metrics}
    for name, info in known_metrics().items():
        source = "the model (judge-free)" if name in MODEL_METRICS else f"evaluation set `{home[name]}`"
        out.append(f"| `{name}` | {'yes' if info.judged else 'no'} | {info.better} | {source} | {_escape(info.doc)} |")
    return out + [""]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (directly, optional, in a list or as mapping values), if one."""
    for arg in [annotation, *typing.get_args(annotation)]:
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        for inner in typing.get_args(arg):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _container(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    return "[]" if origin in (tuple, list) else ".NAME" if origin is dict else ""


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:  # e.g. StrictInt: the type itself
        return _type(args[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type(a) for a in args)
    if origin in (tuple, list):
        if typing.get_origin(args[0]) is typing.Annotated:
            members = typing.get_args(typing.get_args(args[0])[0])
            return "list of reward entries (see Rewards)" if set(members) <= set(REWARDS.values()) \
                else "list of defense entries (see Defenses)"
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"mapping of {_type(args[1])}"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def _bounds(field: Any) -> str:
    marks = []
    for meta in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            if getattr(meta, attr, None) is not None:
                marks.append(f"{sign} {getattr(meta, attr)}")
    return f" ({', '.join(marks)})" if marks else ""


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value!r}`".replace("|", "\\|") if value not in (None, "", [], {}) else "-"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":
    print(render(), end="")
