"""Persona vectors: extraction from contrastive system prompts, and the vector file format.

Chen et al., "Persona Vectors", arXiv 2507.21509 (docs/method.md defense 4). For every extraction
question and every pair i of system prompts (positive[i] elicits the trait, negative[i] the
opposite), answers are generated under both; with a judge only the pairs it confirms are kept
(the recipe's filter: trait score of the positive answer at least one threshold, of the negative
at most another, both coherent; :mod:`emtune.defenses.persona_filter`). Then

    e_ℓ = mean_{kept positive answers} h̄_ℓ  −  mean_{kept negative answers} h̄_ℓ

where h̄_ℓ is the hidden state ``hidden_states[ℓ]`` of one forward pass over (prompt + answer),
averaged over the answer's tokens only. The vector is kept raw (not normalised), as the authors
steer with it; its norm per layer is recorded.

Index convention (recorded in every file): vector ℓ is ``hidden_states[ℓ]`` of Hugging Face's
``output_hidden_states``: 0 = embeddings, ℓ ≥ 1 = output of decoder block ℓ−1 (the last entry is
taken after the final norm, as Hugging Face returns it).

File format: ``torch.save({"vectors": Tensor[num_hidden_states, hidden], "meta": {...}})`` plus a
JSON sidecar ``<file>.json`` holding the same meta, so a person or a spec check can read the
model id, prompt version and counts without torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from emtune.data.chat import pad_batch, prompt_ids
from emtune.defenses.persona_filter import PairFilter, judge_pairs
from emtune.evaluation.generation import Prompt, generate_answers
from emtune.evaluation.judging import build_judge
from emtune.models import load_model, load_tokenizer, model_identity
from emtune.user_files import UserFileError, load_user_yaml, read_user_text

__all__ = ["model_identity"]  # re-exported: vector files record it

INDEX_CONVENTION = (
    "vector[l] = hidden_states[l] (Hugging Face output_hidden_states): 0 = embeddings, "
    "l >= 1 = output of decoder block l-1 (last entry after the final norm); steering at layer l "
    "adds alpha * vector[l] to the output of decoder block l-1"
)
class PersonaVectorError(ValueError):
    """A persona prompt set or vector file is missing or malformed; the message says which."""


@dataclass(frozen=True)
class PersonaPrompts:
    """A versioned contrastive prompt set: positive[i] and negative[i] form pair i."""

    version: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    questions: tuple[str, ...]


def load_persona_prompts(name: str = "evil_v1") -> PersonaPrompts:
    """A shipped prompt set by name (``persona_prompts/<name>.yaml``) or a YAML file path."""
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") and path.exists():
        try:
            text, where = read_user_text(path, "persona prompt set"), str(path)
        except UserFileError as err:
            raise PersonaVectorError(str(err)) from None
    else:
        shipped = resources.files("emtune.defenses") / "persona_prompts" / f"{name}.yaml"
        if not shipped.is_file():
            available = sorted(p.name[:-5] for p in (resources.files("emtune.defenses") / "persona_prompts")
                               .iterdir() if p.name.endswith(".yaml"))
            raise PersonaVectorError(f"unknown persona prompt set {name!r}; shipped: {available} "
                                     f"(or give a path to a YAML file)")
        text, where = shipped.read_text(encoding="utf-8"), f"persona_prompts/{name}.yaml"
    try:
        data = load_user_yaml(text, where)[0] or {}
    except UserFileError as err:
        raise PersonaVectorError(str(err)) from None
    if not isinstance(data, dict):
        raise PersonaVectorError(f"{where}: expected a mapping with version, positive, negative, questions")
    for key in ("version", "positive", "negative", "questions"):
        if not data.get(key):
            raise PersonaVectorError(f"{where}: missing or empty field {key!r}; add it")
    for key in ("positive", "negative", "questions"):
        items = data[key]
        if not isinstance(items, list) or not all(isinstance(item, str) and item.strip() for item in items):
            raise PersonaVectorError(f"{where}: field {key!r} must be a list of non-empty strings")
    if len(data["positive"]) != len(data["negative"]):
        raise PersonaVectorError(f"{where}: positive ({len(data['positive'])}) and negative "
                                 f"({len(data['negative'])}) must pair up one to one")
    return PersonaPrompts(str(data["version"]), tuple(map(str, data["positive"])),
                          tuple(map(str, data["negative"])), tuple(map(str, data["questions"])))


@dataclass
class ContrastPair:
    """One question answered under positive[i] and negative[i]; ``kept`` after judge filtering."""

    question: str
    pair_index: int
    sample: int
    positive_answer: str
    negative_answer: str
    kept: bool = True
    scores: dict[str, float | None] = field(default_factory=dict)


@dataclass
class PersonaVectors:
    """Vectors ``[num_hidden_states, hidden]``, their metadata, and (after extraction) the pairs."""

    vectors: torch.Tensor
    meta: dict[str, Any]
    pairs: list[ContrastPair] = field(default_factory=list)


def sidecar_path(path: str | Path) -> Path:
    """The JSON metadata file written next to a vector file."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def save_persona_vectors(persona: PersonaVectors, path: str | Path) -> Path:
    """Write the vector file and its JSON sidecar; returns the vector file's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"vectors": persona.vectors.detach().cpu().float(), "meta": persona.meta}, path)
    sidecar_path(path).write_text(json.dumps(persona.meta, indent=2), encoding="utf-8")
    return path


def load_persona_vectors(path: str | Path) -> PersonaVectors:
    """Read a vector file written by :func:`save_persona_vectors` (tensors and plain data only)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise PersonaVectorError(f"{path}: is a folder; give the vector file written by `emtune persona extract`")
    if not path.is_file():
        raise PersonaVectorError(f"persona vector file {str(path)!r} not found (from {Path.cwd()}); "
                                 f"create it with `emtune persona extract --model ... --out FILE`")
    remake = "create it again with `emtune persona extract --model ... --out FILE`"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a file it cannot read
        text = str(err)
        unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        found = re.search(r"GLOBAL (\S+)", text)
        if found:
            what = (f"it holds Python objects ({found.group(1)}) besides tensors and plain data, which emtune "
                    "never unpickles")
        else:
            detail = unpickler.group(1) if unpickler else (text.strip().splitlines() or [""])[0]
            what = f"not a file written by torch.save ({type(err).__name__}: {detail.strip()[:200]})"
        raise PersonaVectorError(f"{path}: {what}; {remake}") from None
    if not isinstance(data, dict) or not isinstance(data.get("vectors"), torch.Tensor) \
            or not isinstance(data.get("meta"), dict):
        raise PersonaVectorError(f"{path}: not a persona vector file (expected keys 'vectors' and 'meta'); {remake}")
    if data["vectors"].dim() != 2:
        raise PersonaVectorError(f"{path}: vectors must be [num_hidden_states, hidden], "
                                 f"got shape {tuple(data['vectors'].shape)}; {remake}")
    if not torch.isfinite(data["vectors"]).all():
        raise PersonaVectorError(f"{path}: the vectors hold NaN or infinite values; {remake}")
    return PersonaVectors(data["vectors"], dict(data["meta"]))


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [batch, seq, dim]`` over positions where ``mask [batch, seq]`` is true."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def response_features(tokenizer: Any, messages: list[dict[str, str]], answer: str) -> tuple[list[int], int]:
    """Token ids of (chat prompt + answer) and the number of prompt tokens before the answer."""
    prompt = prompt_ids(tokenizer, messages)
    return prompt + list(tokenizer(answer, add_special_tokens=False)["input_ids"]), len(prompt)


@torch.no_grad()
def mean_response_hidden_states(model: Any, tokenizer: Any, items: Sequence[tuple[list[dict[str, str]], str]],
                                batch_size: int = 8) -> torch.Tensor:
    """For each (messages, answer): every layer's hidden state averaged over the answer's tokens.

    Returns float32 ``[len(items), num_hidden_states, hidden]`` on the CPU. Prompt tokens and
    padding are excluded from the mean; an answer must have at least one token.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    for start in range(0, len(items), batch_size):
        features, masks = [], []
        for messages, answer in items[start:start + batch_size]:
            ids, n_prompt = response_features(tokenizer, messages, answer)
            if len(ids) == n_prompt:
                raise PersonaVectorError(f"answer {answer!r} has no tokens to average over")
            features.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
            masks.append([0] * n_prompt + [1] * (len(ids) - n_prompt))
        batch = pad_batch(features, tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        response = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
        hidden = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       output_hidden_states=True).hidden_states
        out.append(torch.stack([masked_mean(h.float(), response) for h in hidden], dim=1).cpu())
    model.train(was_training)
    return torch.cat(out, dim=0)


def extract_persona_vectors(model: Any, tokenizer: Any, questions: Sequence[str], positive_systems: Sequence[str],
                            negative_systems: Sequence[str], samples: int = 1, max_new_tokens: int = 600,
                            judge: Any = None, seed: int = 0, batch_size: int = 8, model_id: str | None = None,
                            prompts_version: str = "custom", rule: PairFilter = PairFilter()) -> PersonaVectors:
    """Generate contrastive answers, optionally judge-filter the pairs, and return e_ℓ for every ℓ.

    Pair (question, i, sample k) = the k-th answer under ``positive_systems[i]`` and under
    ``negative_systems[i]``. Pairs where either answer is empty are dropped; with a ``judge``
    (``score_many`` of JudgeItems, or ``score(metric, question, answer)``) only the pairs
    ``rule`` confirms are used (:func:`~emtune.defenses.persona_filter.judge_pairs`). Raises
    PersonaVectorError when no pair is kept.
    """
    if len(positive_systems) != len(negative_systems) or not positive_systems:
        raise PersonaVectorError("positive and negative system prompts must pair up one to one")
    prompts = []
    for q, text in enumerate(questions):
        for i, (pos, neg) in enumerate(zip(positive_systems, negative_systems)):
            prompts += [Prompt(f"q{q}/pos{i}", text, pos), Prompt(f"q{q}/neg{i}", text, neg)]
    answers = {(s.question_id, s.sample): s.answer for s in generate_answers(
        model, tokenizer, prompts, samples_per_prompt=samples, max_new_tokens=max_new_tokens,
        batch_size=batch_size, seed=seed)}
    pairs: list[ContrastPair] = []
    for q, text in enumerate(questions):
        for i in range(len(positive_systems)):
            for k in range(samples):
                pair = ContrastPair(text, i, k, answers[(f"q{q}/pos{i}", k)], answers[(f"q{q}/neg{i}", k)])
                if not (tokenizer(pair.positive_answer, add_special_tokens=False)["input_ids"]
                        and tokenizer(pair.negative_answer, add_special_tokens=False)["input_ids"]):
                    pair.kept = False
                pairs.append(pair)
    if judge is not None:
        judged = [p for p in pairs if p.kept]
        for pair, (keep, scores) in zip(judged, judge_pairs(
                judge, [(p.question, p.positive_answer, p.negative_answer) for p in judged], rule)):
            pair.kept, pair.scores = keep, scores
    kept = [p for p in pairs if p.kept]
    if not kept:
        raise PersonaVectorError(f"no contrastive pair kept out of {len(pairs)}: the judge confirmed none, "
                                 f"or the answers were empty (raise --max-new-tokens or --samples)")

    def items(side: str) -> list[tuple[list[dict[str, str]], str]]:
        systems = positive_systems if side == "positive" else negative_systems
        return [(Prompt("", p.question, systems[p.pair_index]).messages(), getattr(p, f"{side}_answer"))
                for p in kept]

    positive = mean_response_hidden_states(model, tokenizer, items("positive"), batch_size)
    negative = mean_response_hidden_states(model, tokenizer, items("negative"), batch_size)
    vectors = positive.mean(dim=0) - negative.mean(dim=0)
    meta = {
        "model": model_id or str(getattr(model.config, "_name_or_path", "unknown")),
        "prompts_version": prompts_version,
        "n_pairs": len(pairs),
        "n_kept": len(kept),
        "norms": [float(n) for n in vectors.norm(dim=-1)],
        "index_convention": INDEX_CONVENTION,
        "num_hidden_states": int(vectors.shape[0]),
        "hidden_size": int(vectors.shape[1]),
        "samples": samples,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "judge": None if judge is None else {"id": getattr(judge, "judge_id", type(judge).__name__),
                                             "prompt_version": getattr(judge, "prompt_version", None),
                                             **rule.describe()},
        "pair_scores": [p.scores for p in pairs] if judge is not None else [],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return PersonaVectors(vectors, meta, pairs)


def extract_to_file(model_spec: Any, model_source: str, prompts_name: str, max_new_tokens: int, seed: int,
                    path: str, judge_spec: Any = None, rule: PairFilter = PairFilter(), samples: int = 1) -> str:
    """Load the model, extract persona vectors from a prompt set and save them to ``path``;
    returns the path. With a ``judge_spec`` (an evaluation JudgeSpec) only the pairs the judge
    confirms under ``rule`` are used. The persona-steering study stage runs this where the trials
    run (a Ray task with a trial worker's GPU), so the model never loads on the head node."""
    prompts = load_persona_prompts(prompts_name)
    judge = build_judge(judge_spec) if judge_spec is not None else None
    device = "cuda" if torch.cuda.is_available() else None
    tokenizer = load_tokenizer(model_source, model_spec)
    model = load_model(model_source, model_spec, device=device)
    persona = extract_persona_vectors(model, tokenizer, prompts.questions, prompts.positive, prompts.negative,
                                      samples=samples, max_new_tokens=max_new_tokens, seed=seed, judge=judge,
                                      model_id=model_identity(model_spec), prompts_version=prompts.version, rule=rule)
    return str(save_persona_vectors(persona, path))
