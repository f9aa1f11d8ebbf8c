"""Study stages: work computed once per study, before the trials, and shared by all of them.

Persona steering without a ``vector_path`` but with ``extract_prompts`` gets its persona vectors
extracted once from the shipped contrastive prompts.

The perplexity-gap selection of Interleaving+/++ (PAPER.md defense 7) needs a misaligned
ensemble: LoRA adapters fine-tuned *undefended* on the EM datasets, on the same base model.
``prepare_stages`` trains one adapter per listed dataset as an ordinary Ray Train run (GPU on a
cluster), caches it in the study folder by content hash (model, LoRA, training settings and
dataset), scores the safety pool once, and returns the spec with the adapter folders filled in,
so every trial reads the same cached scores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from emtune.config import StudySpec


def _stage_key(spec: StudySpec, dataset: str) -> str:
    payload = {"model": spec.model.model_dump(mode="json"), "lora": spec.lora.model_dump(mode="json"),
               "training": spec.training.model_dump(mode="json"), "dataset": dataset,
               "max_length": spec.data.max_length, "seed": spec.seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def misaligned_adapter(spec: StudySpec, dataset: str, cache_dir: Path, model_source: str,
                       log: Any = print) -> Path:
    """The undefended adapter for ``dataset``, trained now unless the cache already holds it."""
    stem = dataset.split(":")[-1].rsplit("/", 1)[-1].removesuffix(".jsonl")
    folder = cache_dir / "misaligned" / f"{stem}-{_stage_key(spec, dataset)}"
    if (folder / "adapter_config.json").is_file():
        return folder
    stage = spec.model_copy(update={
        "defenses": (),
        "data": spec.data.model_copy(update={"train": spec.data.train.model_copy(update={"path": dataset})
                                             if spec.data.train else None, "opswap": None}),
    })
    if stage.data.train is None:
        from emtune.config import DatasetSpec

        stage = stage.model_copy(update={"data": stage.data.model_copy(update={"train": DatasetSpec(path=dataset)})})
    log(f"[emtune] stage: training the undefended adapter on {dataset} (cached as {folder.name})")
    from emtune.study.trial import trainer_for

    result = trainer_for(stage, f"stage-{folder.name}", {
        "model_source": model_source, "cache_dir": str(cache_dir), "evaluate": False,
    }).fit()
    adapter = Path(result.checkpoint.path) / "adapter"
    tmp = folder.with_name(folder.name + ".partial")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(adapter, tmp)
    tmp.rename(folder)
    return folder


def persona_vector_file(spec: StudySpec, prompts_name: str, max_new_tokens: int, cache_dir: Path,
                        model_source: str, log: Any = print) -> Path:
    """Persona vectors for the spec's model from a shipped prompt set, extracted once and cached.

    Runs in the study driver without a judge (every pair kept); use ``emtune persona extract``
    with ``--judge-spec`` for judge-filtered vectors on a GPU machine.
    """
    from emtune.defenses.persona_vectors import (
        extract_persona_vectors, load_persona_prompts, model_identity, save_persona_vectors,
    )
    from emtune.models import load_model, load_tokenizer

    prompts = load_persona_prompts(prompts_name)
    key = hashlib.sha256(json.dumps([model_identity(spec.model), prompts.version, max_new_tokens, spec.seed])
                         .encode()).hexdigest()[:12]
    path = cache_dir / "persona" / f"{prompts_name}-{key}.pt"
    if path.is_file():
        return path
    log(f"[emtune] stage: extracting persona vectors ({prompts_name}) into {path.name}")
    tokenizer = load_tokenizer(model_source, spec.model)
    model = load_model(model_source, spec.model)
    persona = extract_persona_vectors(model, tokenizer, prompts.questions, prompts.positive, prompts.negative,
                                      max_new_tokens=max_new_tokens, seed=spec.seed,
                                      model_id=model_identity(spec.model), prompts_version=prompts.version)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_persona_vectors(persona, path)


def prepare_stages(spec: StudySpec, cache_dir: Path, model_source: str) -> StudySpec:
    """Run the stages the spec asks for (misaligned ensembles, persona vectors); return the spec
    with their outputs filled in."""
    defenses = []
    for defense in spec.defenses:
        if getattr(defense, "extract_prompts", None) and not defense.vector_path:
            path = persona_vector_file(spec, defense.extract_prompts, defense.extract_max_new_tokens,
                                       cache_dir, model_source)
            defenses.append(defense.model_copy(update={"vector_path": str(path)}))
            continue
        datasets = getattr(defense, "misaligned_datasets", ())
        if not datasets:
            defenses.append(defense)
            continue
        trained = {d: str(misaligned_adapter(spec, d, cache_dir, model_source)) for d in datasets}
        defenses.append(defense.model_copy(update={
            "misaligned_adapters": tuple(defense.misaligned_adapters) + tuple(trained.values()),
            "misaligned_datasets": (),
            "leave_out": tuple(trained.get(e, e) for e in defense.leave_out),
        }))
    if defenses == list(spec.defenses):
        return spec
    return StudySpec.model_validate({**spec.model_dump(mode="python"), "defenses": [d.model_dump() for d in defenses]})
