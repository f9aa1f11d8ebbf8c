"""Every shipped study spec does what it says: one short trial at the top of its search range (every
defense at full strength) shows each of its defenses *acting*, not only finite metrics.

Which specs: every ``search_spaces/*.yaml``. A spec that cannot run here (a hub model, a GPU) is
listed in ``SKIPPED`` with the reason; any other spec runs, so a new spec is covered the day it is
added. What "acting" means is written per defense in ``EVIDENCE``; a spec using a defense that has
no entry there fails, naming it.

The trial is the real worker (``run_training``) after the real study stages (persona vectors, the
misaligned ensemble; the suite's shared local Ray, ``ray_session``). The defenses' hooks are wrapped, not
replaced, to record what they did: rows in and out of ``transform_data``, the loss terms of every
step, the adapter before and after ``finalize``, the forward hooks on the model after ``attach``
and when evaluation starts.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from emtune.config import load_spec
from emtune.defenses.registry import DEFENSES
from emtune.models import model_cache_dir, resolve_source
from emtune.study.stages import prepare_stages
from emtune.train.worker import run_training
from emtune.trial_files import TrialFiles

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2] / "search_spaces"
SPECS = sorted(p.stem for p in ROOT.glob("*.yaml"))
SKIPPED = {
    "paper_qwen7b_code": "Qwen2.5-7B-Instruct from the hub on a GPU: not available offline; its settings "
                         "are validated by tests/test_config.py",
    "paper_rl": "the paper's RL data (bad medical advice, WildGuardMix, the EM sets) are not shipped; "
                "tests/study/test_paper_rl_spec.py runs every arm on small files in their formats",
    "rl_dryrun": "GRPO (prompt rows, rewards): its defenses' RL forms are checked arm by arm in "
                 "tests/train/test_grpo_worker.py and the study by tests/study/test_rl_study.py",
}


@dataclass
class Record:
    """What the wrapped hooks of one defense saw during the trial."""

    rows_in: list = field(default_factory=list)
    rows_out: list = field(default_factory=list)
    loss_terms: list[dict[str, float]] = field(default_factory=list)
    hooks_before_attach: int | None = None
    hooks_after_attach: int | None = None
    adapter_changed_by_finalize: float | None = None
    finalize_values: dict[str, float] = field(default_factory=dict)
    instance: Any = None


def forward_hooks(model: Any) -> int:
    """Forward hooks on the model other than transformers' own (it installs output-capturing hooks
    the first time hidden states are asked for, e.g. by feature_l2, and keeps them)."""
    hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    return sum(not getattr(h, "__module__", "").startswith("transformers") for h in hooks)


def lora_b(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


def spy(monkeypatch, records: dict[str, Record]) -> None:
    """Wrap every registered defense's hooks to fill ``records[name]``."""
    for name, cls in DEFENSES.items():
        def wrap(method: str, around: Callable, cls=cls):
            original = getattr(cls, method)

            def wrapped(self, *args, **kwargs):
                record = records.setdefault(self.name, Record())
                record.instance = self
                return around(record, lambda: original(self, *args, **kwargs), *args)

            monkeypatch.setattr(cls, method, wrapped)

        def transform(record, call, rows):
            out = call()
            record.rows_in, record.rows_out = list(rows), list(out)
            return out

        def attach(record, call, model):
            record.hooks_before_attach = forward_hooks(model)
            call()
            record.hooks_after_attach = forward_hooks(model)

        def losses(record, call, *args):
            terms = call()
            record.loss_terms.append({k: float(v.detach()) for k, v in terms.items()})
            return terms

        def finalize(record, call, model):
            before = lora_b(model)
            values = call()
            after = lora_b(model)
            record.adapter_changed_by_finalize = max(float((after[k] - before[k]).abs().max()) for k in before)
            record.finalize_values = dict(values)
            return values

        wrap("transform_data", transform)
        wrap("attach", attach)
        wrap("loss_terms", losses)
        wrap("finalize", finalize)


# --- what each defense must visibly do ----------------------------------------------------------


def loss_term(name: str):
    def check(record: Record, trial: dict) -> None:
        values = [terms[name] for terms in record.loss_terms if name in terms]
        assert len(values) == trial["steps"], f"{name}: a term at every step, got {record.loss_terms}"
        assert all(math.isfinite(v) and v >= 0 for v in values) and max(values) > 0, values
    return check


def rows_added(record: Record, trial: dict) -> None:
    given = Counter(repr(r["messages"]) for r in record.rows_in)
    trained = Counter(repr(r["messages"]) for r in record.rows_out)
    assert not given - trained, "a training row was dropped"
    assert len(record.rows_out) > len(record.rows_in) and set(trained) - set(given), "no safety rows were mixed in"
    assert trial["meta"]["num_train_rows"] >= len(record.rows_out)


def prompt_replaced(record: Record, trial: dict) -> None:
    text = record.instance.config.text
    assert text and len(record.rows_out) == len(record.rows_in)
    systems = [next((m["content"] for m in r["messages"] if m["role"] == "system"), None) for r in record.rows_out]
    assert all(text in (s or "") for s in systems), "every training row carries the inoculation prompt"
    assert all(text not in (s.get("system") or "") for s in trial["samples"]), "evaluation must not see it"


def projection_applied(record: Record, trial: dict) -> None:
    assert record.finalize_values["safelora/projected_layers"] >= 1, record.finalize_values
    assert record.adapter_changed_by_finalize > 0, "the projection left every LoRA B unchanged"
    assert trial["defenses_json"]["safelora"]["projected"], trial["defenses_json"]


def steering_on_in_training_off_in_evaluation(record: Record, trial: dict) -> None:
    assert record.hooks_after_attach == record.hooks_before_attach + 1, "the steering hook was not installed"
    assert trial["hooks_at_evaluation"] == record.hooks_before_attach, "the steering hook is still on at evaluation"
    vector = record.instance.load_vector(trial["model"])
    assert float(vector.norm()) > 0 and record.instance.config.alpha > 0


def ablation_on_in_training_off_in_evaluation(record: Record, trial: dict) -> None:
    layers = record.instance.config.layers
    assert record.hooks_after_attach == record.hooks_before_attach + len(layers), "an ablation hook per layer"
    assert trial["hooks_at_evaluation"] == record.hooks_before_attach, "an ablation hook is still on at evaluation"
    bases = record.instance.bases(trial["model"])
    assert sorted(bases) == sorted(layers) and all(float(b.norm()) > 0 for b in bases.values())
    assert record.instance.config.fraction > 0


EVIDENCE: dict[str, list[Callable[[Record, dict], None]]] = {
    "kl_to_reference": [loss_term("kl_to_reference")],
    "feature_l2": [loss_term("feature_l2")],
    "safelora": [projection_applied],
    "interleaving": [rows_added],
    "interleaving_selected": [rows_added],
    "inoculation": [prompt_replaced],
    "persona_steering": [steering_on_in_training_off_in_evaluation],
    "caft": [ablation_on_in_training_off_in_evaluation],
}


def test_every_shipped_spec_is_run_or_skipped_with_a_reason() -> None:
    assert SPECS and set(SKIPPED) <= set(SPECS), "SKIPPED names a spec that no longer exists"
    for name in SPECS:
        if name in SKIPPED:
            continue
        spec = load_spec(ROOT / f"{name}.yaml")
        assert spec.model.source == "tiny", f"{name}: runs a non-tiny model; list it in SKIPPED with the reason"
        missing = [d.name for d in spec.defenses if d.name not in EVIDENCE]
        assert not missing, f"{name}: no EVIDENCE check for {missing}: say what the defense visibly does"


@pytest.fixture(scope="module")
def stage_cache(tmp_path_factory) -> Path:
    """One study-stage cache for every spec of the module: stages are cached by content hash, so
    specs that need the same persona vectors or misaligned ensemble compute them once."""
    return tmp_path_factory.mktemp("stage-cache")


def _short(spec, tmp_path):
    """The same study, shrunk: 2 steps without warm-up (so the second step trains a moved adapter), 40
    rows, 4-token answers, study folder in tmp."""
    data = spec.data.model_copy(update={"train": spec.data.train.model_copy(update={"limit": 40})})
    return spec.model_copy(update={
        "output_dir": str(tmp_path),
        "data": data,
        "training": spec.training.model_copy(update={"max_steps": 2, "warmup_steps": 0}),
        "evaluation": spec.evaluation.model_copy(update={"max_new_tokens": 4}),
    })


def _top_of_range(search) -> dict[str, Any]:
    top = {}
    for pname, param in search.parameters.items():
        if param.target is None:
            continue
        top[pname] = param.choices[-1] if param.type == "categorical" else (
            int(param.high) if param.type == "int" else param.high)
    return top


@pytest.mark.parametrize("name", SPECS)
def test_shipped_spec_trial_shows_its_defenses_acting(name, tmp_path, ray_session, stage_cache, monkeypatch) -> None:
    if name in SKIPPED:
        pytest.skip(SKIPPED[name])
    import emtune.evaluation.runner as runner

    spec = _short(load_spec(ROOT / f"{name}.yaml"), tmp_path)
    source = resolve_source(spec.model, model_cache_dir())
    staged = prepare_stages(spec, stage_cache, source)
    trial_spec = staged.with_overrides(_top_of_range(staged.search))
    records: dict[str, Record] = {}
    spy(monkeypatch, records)
    seen: dict[str, Any] = {}
    evaluate = runner.evaluate_model

    def evaluate_and_count_hooks(model, *args, **kwargs):
        seen["hooks_at_evaluation"], seen["model"] = forward_hooks(model), model
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_model", evaluate_and_count_hooks)
    metrics = run_training(trial_spec, tmp_path / "trial", source, cache_dir=stage_cache)

    assert metrics["train_steps"] == 2 and "error" not in metrics, metrics
    for key in ("train_loss", "ood_drift", "indomain_nll"):
        assert math.isfinite(metrics[key]), (key, metrics)
    files = TrialFiles(tmp_path / "trial")
    trial = {"steps": 2, "meta": json.loads(files.meta.read_text()), "samples": files.read_samples("general"),
             "defenses_json": json.loads(files.defenses.read_text()) if files.defenses.is_file() else {}, **seen}
    assert trial["samples"], "the trial generated no evaluation answers"
    assert trial_spec.defenses, f"{name} trains no defense"
    for defense in trial_spec.defenses:
        assert defense.name in records, f"{defense.name}: none of its hooks ran"
        for check in EVIDENCE[defense.name]:
            check(records[defense.name], trial)
