"""Question sets: shipped, versioned YAML files, user files in the published formats, and
in-domain questions drawn from a dataset's held-out split.

File format (the public EM question YAML of Betley et al., docs/method.md "Evaluation"): a list of
entries, each with
  id (str, or an integer as in the paper's group's in-domain files), type (free_form,
  free_form_judge, free_form_judge_0_100), paraphrases (list of str),
  and optionally system (str), samples_per_paraphrase (int >= 1), judge (str, ignored: emtune's
  judge comes from the spec), judge_prompts (metric -> template with {question} / {answer}).
emtune's shipped files wrap that list as `{version: <name>, questions: [...]}`; a user file may
be either shape. A bare list has no version of its own: it gets "user:" + the first 12 hex digits
of the sha256 of the file's bytes, so results from different files never share a version.

Each paraphrase becomes one `Question`; its id is the entry id, or "<id>/<i>" when the entry has
several paraphrases. YAML anchors and aliases (how the published files share one judge prompt)
are read as written.

A ``.jsonl`` file is read as chat rows (``{"messages": [...]}``, the paper's group's held-out
question files): each row's first user message is a question (with the row's leading system
message), its id ``<file stem>/<row>``; the rows' assistant answers are ignored.

The shipped sets are emtune's own wording of the published questions (their ``description``
says so); a user file is used exactly as written. Every set records where it came from and, for a
file, the sha256 of its bytes (the report names both).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from emtune.data.loading import DataError, parse_json_line
from emtune.user_files import UserFileError, check_regular_file, decode_text, load_user_yaml

#: Used when an entry gives no samples_per_paraphrase (the paper authors' code default).
DEFAULT_SAMPLES = 10
_TYPES = {"free_form", "free_form_judge", "free_form_judge_0_100"}
_FIELDS = {"id", "type", "paraphrases", "system", "samples_per_paraphrase", "judge", "judge_prompts"}


class QuestionSetError(ValueError):
    """A question file is malformed; the message names the file, the entry and the field."""


@dataclass(frozen=True)
class Question:
    """One prompt to sample answers for: `samples` answers to `text` under `system` (None = no
    system message; the chat template then decides, as in training)."""

    id: str
    text: str
    system: str | None = None
    samples: int = DEFAULT_SAMPLES
    judge_prompts: Mapping[str, str] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class QuestionSet:
    """A named, versioned list of questions; iterate it to get the questions."""

    name: str
    version: str
    questions: tuple[Question, ...]
    source: str = ""
    sha256: str | None = None
    description: str = ""

    def __iter__(self) -> Iterator[Question]:
        return iter(self.questions)

    def __len__(self) -> int:
        return len(self.questions)


def shipped_question_sets() -> list[str]:
    """Names of the question sets shipped in the package (e.g. "general_v1")."""
    folder = resources.files("emtune.evaluation") / "question_sets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_question_set(name_or_path: str | Path, samples_per_question: int | None = None) -> QuestionSet:
    """Load a shipped set by name ("general_v1") or a user YAML file by path.

    `samples_per_question` overrides every entry's samples_per_paraphrase. Raises QuestionSetError
    for a missing or malformed file.
    """
    if samples_per_question is not None and samples_per_question < 1:
        raise QuestionSetError(f"samples_per_question must be >= 1, got {samples_per_question}")
    text = str(name_or_path)
    shipped = resources.files("emtune.evaluation") / "question_sets" / f"{text}.yaml"
    if "/" not in text and "\\" not in text and not text.endswith((".yaml", ".yml", ".jsonl")) and shipped.is_file():
        data, source, name = shipped.read_bytes(), f"question_sets/{text}.yaml", text
        digest = None
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise QuestionSetError(
                f"{text}: no such question file, and not a shipped set (shipped: {', '.join(shipped_question_sets())})"
            )
        try:
            check_regular_file(path, "question")
            data = path.read_bytes()
        except UserFileError as err:
            raise QuestionSetError(str(err)) from None
        except OSError as err:
            raise QuestionSetError(f"{path}: cannot read it ({err.strerror or err}); check its permissions") from None
        source, name = str(path), path.stem
        digest = hashlib.sha256(data).hexdigest()
    if source.endswith(".jsonl"):
        parsed = parse_jsonl_questions(data, source=source, name=name, samples_per_question=samples_per_question)
    else:
        parsed = parse_question_set(data, source=source, name=name, samples_per_question=samples_per_question)
    return replace(parsed, source=source, sha256=digest)


def parse_question_set(
    data: bytes, *, source: str, name: str, samples_per_question: int | None = None
) -> QuestionSet:
    """Parse question-file bytes (see module docs); `source` names the file in errors."""
    try:
        doc, _ = load_user_yaml(decode_text(data, source), source)
    except UserFileError as exc:  # encoding, syntax, YAML bombs and recursive aliases
        raise QuestionSetError(str(exc)) from None
    description = ""
    if isinstance(doc, list):
        version, entries = "user:" + hashlib.sha256(data).hexdigest()[:12], doc
    elif isinstance(doc, dict):
        extra = set(doc) - {"version", "questions", "description"}
        if extra:
            raise QuestionSetError(f"{source}: unknown top-level field(s) {sorted(extra)}; expected version, questions")
        version, entries, description = doc.get("version"), doc.get("questions"), str(doc.get("description") or "")
        if not isinstance(version, str) or not version.strip():
            raise QuestionSetError(f"{source}: field 'version' must be a non-empty string")
        if not isinstance(entries, list):
            raise QuestionSetError(f"{source}: field 'questions' must be a list of question entries")
    else:
        raise QuestionSetError(f"{source}: expected a list of question entries (or version + questions)")
    if not entries:
        raise QuestionSetError(f"{source}: the file has no questions")
    questions: list[Question] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        for question in _parse_entry(entry, index, source, samples_per_question):
            if question.id in seen:
                raise QuestionSetError(f"{source}: entry {index} (id {question.id!r}), field 'id': duplicate id; "
                                       "give each question its own id")
            seen.add(question.id)
            questions.append(question)
    return QuestionSet(name=name, version=version, questions=tuple(questions), description=description)


def parse_jsonl_questions(data: bytes, *, source: str, name: str,
                          samples_per_question: int | None = None) -> QuestionSet:
    """Questions from chat rows, one JSON object per line (see module docs)."""
    questions: list[Question] = []
    try:
        lines = decode_text(data, source).split("\n")
    except UserFileError as exc:
        raise QuestionSetError(str(exc)) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = parse_json_line(line, number < len(lines), source, number)
        except DataError as err:
            raise QuestionSetError(str(err)) from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise QuestionSetError(f"{source}:{number}: a row needs a 'messages' list of {{role, content}} objects")
        user = next((m.get("content") for m in messages if m.get("role") == "user"), None)
        if not isinstance(user, str) or not user.strip():
            raise QuestionSetError(f"{source}:{number}: no user message to ask")
        system = messages[0].get("content") if messages[0].get("role") == "system" else None
        questions.append(Question(id=f"{name}/{number - 1}", text=user, system=system,
                                  samples=samples_per_question or DEFAULT_SAMPLES))
    if not questions:
        raise QuestionSetError(f"{source}: the file has no questions")
    return QuestionSet(name=name, version="user:" + hashlib.sha256(data).hexdigest()[:12], questions=tuple(questions))


def _parse_entry(entry: Any, index: int, source: str, samples_override: int | None) -> list[Question]:
    if not isinstance(entry, dict):
        raise QuestionSetError(f"{source}: entry {index}: expected a mapping with id, type, paraphrases")
    entry_id = entry.get("id")
    if isinstance(entry_id, int) and not isinstance(entry_id, bool):
        entry_id = str(entry_id)  # the paper's group numbers its in-domain questions
    where = f"{source}: entry {index}" + (f" (id {entry_id!r})" if isinstance(entry_id, str) else "")

    def fail(field_name: str, problem: str) -> QuestionSetError:
        return QuestionSetError(f"{where}, field '{field_name}': {problem}")

    unknown = set(entry) - _FIELDS
    if unknown:
        raise fail(sorted(unknown)[0], f"unknown field; allowed: {', '.join(sorted(_FIELDS))}")
    if not isinstance(entry_id, str) or not entry_id.strip():
        raise fail("id", "must be a non-empty string or an integer")
    if entry.get("type") not in _TYPES:
        raise fail("type", f"must be one of {sorted(_TYPES)}, got {entry.get('type')!r}")
    paraphrases = entry.get("paraphrases")
    if not isinstance(paraphrases, list) or not paraphrases:
        raise fail("paraphrases", "must be a non-empty list of strings")
    for i, text in enumerate(paraphrases):
        if not isinstance(text, str) or not text.strip():
            raise fail("paraphrases", f"item {i} must be a non-empty string")
    system = entry.get("system")
    if system is not None and not isinstance(system, str):
        raise fail("system", "must be a string")
    samples = entry.get("samples_per_paraphrase", DEFAULT_SAMPLES)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise fail("samples_per_paraphrase", f"must be an integer >= 1, got {samples!r}")
    judge_prompts = entry.get("judge_prompts")
    if judge_prompts is not None:
        if not isinstance(judge_prompts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in judge_prompts.items()
        ):
            raise fail("judge_prompts", "must map metric names to prompt strings")
    many = len(paraphrases) > 1
    return [
        Question(
            id=f"{entry_id}/{i}" if many else entry_id,
            text=text,
            system=system,
            samples=samples_override or samples,
            judge_prompts=dict(judge_prompts) if judge_prompts else None,
        )
        for i, text in enumerate(paraphrases)
    ]


def in_domain_questions(
    rows: Sequence[Mapping[str, Any]],
    n: int = 30,
    seed: int = 0,
    samples: int = DEFAULT_SAMPLES,
    name: str = "in_domain",
) -> QuestionSet:
    """Up to `n` questions from held-out chat rows ({"messages": [{"role", "content"}, ...]}).

    Each question is the row's first user message, with the row's system message (if the first
    message is one). Rows without a user message are skipped. The choice is a seeded sample of row
    indices, returned in dataset order, so the same rows and seed always give the same set; with
    fewer usable rows than `n`, all are used. The version hashes the chosen texts.
    """
    usable: list[tuple[int, str, str | None]] = []
    for index, row in enumerate(rows):
        messages = row.get("messages") or []
        user = next((m.get("content") for m in messages if m.get("role") == "user"), None)
        if not isinstance(user, str) or not user.strip():
            continue
        system = messages[0].get("content") if messages[0].get("role") == "system" else None
        usable.append((index, user, system))
    chosen = sorted(random.Random(seed).sample(range(len(usable)), min(n, len(usable))))
    questions = tuple(
        Question(id=f"{name}/{usable[i][0]}", text=usable[i][1], system=usable[i][2], samples=samples) for i in chosen
    )
    digest = hashlib.sha256()
    for q in questions:
        digest.update(repr((q.id, q.text, q.system)).encode("utf-8"))
    return QuestionSet(name=name, version=f"{name}:{digest.hexdigest()[:12]}", questions=questions)
