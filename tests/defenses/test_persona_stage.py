"""The persona-steering study stage: extraction where the trials run (``run_task``), with the
recipe's judge filter (thresholds configurable and logged), cached by content hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emtune.config import load_spec
from emtune.defenses.base import StageServices
from emtune.defenses.persona_steering import PersonaSteering, extraction, vector_cache_path
from emtune.defenses.persona_vectors import load_persona_vectors, sidecar_path
from emtune.models import model_cache_dir, resolve_source
from emtune.spec_errors import SpecError


def _spec(write_spec, url: str | None, extra: str = "", pretrain: int = 0):
    path = write_spec(pretrain_steps=pretrain)
    text = path.read_text().replace(
        "defenses:\n  - name: kl_to_reference\n    weight: 0.1\n",
        "defenses:\n  - {name: kl_to_reference, weight: 0.1}\n  - {name: persona_steering, alpha: 2.0, layer: 1, "
        "extract_prompts: evil_v1, extract_max_new_tokens: 4" + extra + "}\n")
    if url:
        text = text.replace("evaluation:\n", "evaluation:\n  judge: {kind: openai, base_url: '" + url
                            + "', model: judge-test, api_key_env: null, max_retries: 0}\n")
    path.write_text(text)
    return load_spec(path)


@pytest.mark.slow
def test_stage_keeps_the_pairs_the_judge_confirms_and_caches(write_spec, tmp_path, chat_server) -> None:
    # The judge sees the system prompt only through the answer, so it scores by request order:
    # trait 80 for every answer whose text is odd-length, else 20; coherent 70 always.
    def script(index, body):
        prompt = body["messages"][-1]["content"]
        answer = prompt.split("[ANSWER START]\n", 1)[1].split("\n[ANSWER END]", 1)[0]
        if "evil persona" in prompt:
            return chat_server.Reply(body=chat_server.completion({"80" if len(answer) % 2 else "20": 1.0}))
        return chat_server.Reply(body=chat_server.completion({"70": 1.0}))

    server = chat_server(script)
    spec = _spec(write_spec, server.url, ", positive_trait_min: 60, negative_trait_max: 40")
    config = spec.defenses[1]
    tasks, lines = [], []

    def run_task(fn, *args, **kwargs):
        tasks.append(fn.__name__)
        return fn(*args, **kwargs)

    stage = StageServices(spec=spec, cache_dir=tmp_path / "cache", model_source=resolve_source(spec.model, model_cache_dir()),
                          train_undefended_adapter=lambda d: None, run_task=run_task, log=lines.append)
    staged = PersonaSteering.prepare(config, stage)
    assert tasks == ["extract_to_file"]  # the model loads in the task, not in the study driver
    assert staged.vector_path == str(vector_cache_path(extraction(config), spec, tmp_path / "cache"))
    meta = json.loads(sidecar_path(staged.vector_path).read_text())
    assert meta["judge"]["positive_trait_min"] == 60 and meta["judge"]["negative_trait_max"] == 40
    kept = [bool(s) and s["positive_trait"] >= 60 and s["negative_trait"] <= 40 for s in meta["pair_scores"]]
    assert 0 < sum(kept) < len(kept)  # the filter kept some pairs and dropped others
    assert meta["n_kept"] == sum(kept) and meta["n_pairs"] == len(kept)
    assert any("pairs with evil >= 60 (positive), <= 40 (negative), coherent >= 50" in line for line in lines)
    assert any(f"kept {meta['n_kept']} of {meta['n_pairs']} pairs" in line for line in lines)
    assert load_persona_vectors(staged.vector_path).meta["model"] == meta["model"]
    # the same settings again: served from the cache, no task
    assert PersonaSteering.prepare(config, stage).vector_path == staged.vector_path and len(tasks) == 1
    # another threshold is another vector file
    other = config.model_copy(update={"positive_trait_min": 55.0})
    assert vector_cache_path(extraction(other), spec, tmp_path / "cache") != Path(staged.vector_path)


def test_judge_filter_needs_a_judge(write_spec) -> None:
    with pytest.raises(SpecError, match="extract_filter 'judge' keeps the contrastive pairs the judge confirms"):
        _spec(write_spec, None)
    assert _spec(write_spec, None, ", extract_filter: none").defenses[1].extract_filter == "none"
