"""Judge prompt sets: emtune's shipped, versioned prompt files, and user files in the published formats.

A prompt set maps a metric name ("aligned", "coherent", "security", ...) to a ``str.format``
template that uses ``{question}`` and ``{answer}``. ``evaluation.judge.prompt_version`` names one:

- a shipped version (``v1``, ``v2``): ``prompts/judge_prompts_<version>.yaml``, emtune's wording;
- a YAML file in emtune's format: ``{version: ..., prompts: {metric: template}}``;
- a question file in the public EM format (Betley et al.; a list of entries with ``judge_prompts``),
  e.g. the original ``first_plot_questions.yaml``: its entries' judge prompts, used as written.
  All entries must carry the same prompts (the published files share one set through a YAML
  anchor); a file whose questions carry different prompts is judged per question instead
  (``evaluation.question_judge_prompts``).

A file's version is ``<file stem>@<first 12 hex digits of the sha256 of its bytes>``: verdicts are
cached and compared by version, so an edited file never reuses another file's verdicts.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from emtune.user_files import UserFileError, load_user_yaml, read_user_text

#: The placeholders emtune fills in a judge prompt.
PLACEHOLDERS = ("question", "answer")


class PromptFileError(ValueError):
    """A judge prompt set that cannot be used; the message names the file and the prompt."""


@dataclass(frozen=True)
class PromptSet:
    """A versioned metric -> template mapping, with the file it came from (None when shipped)."""

    version: str
    prompts: Mapping[str, str] = field(compare=False)
    path: str | None = None
    sha256: str | None = None


def shipped_prompt_versions() -> list[str]:
    """Versions of the judge prompt files shipped in the package (e.g. ["v1", "v2"])."""
    folder = resources.files("emtune.evaluation") / "prompts"
    return sorted(p.name[len("judge_prompts_"):-len(".yaml")] for p in folder.iterdir()
                  if p.name.startswith("judge_prompts_") and p.name.endswith(".yaml"))


def is_prompt_file(source: str) -> bool:
    """True when ``source`` names a file (a path or a .yaml/.yml name), not a shipped version."""
    return "/" in source or "\\" in source or source.endswith((".yaml", ".yml"))


def check_template(template: str, where: str) -> None:
    """Raise PromptFileError when a template uses a placeholder emtune does not fill, or never
    shows the judge the answer."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise PromptFileError(f"{where}: not a valid template ({err}); write literal braces as {{{{ }}}}") from None
    unknown = sorted(n for n in names if n not in PLACEHOLDERS)
    if unknown:
        raise PromptFileError(f"{where}: uses placeholder(s) {', '.join('{' + n + '}' for n in unknown)}, "
                              f"which emtune does not fill (it fills {{question}} and {{answer}}); remove it, "
                              f"or write literal braces as {{{{ }}}}")
    if "answer" not in names:
        raise PromptFileError(f"{where}: never shows the judge the answer; put {{answer}} where it should read it")


def load_prompt_set(source: str) -> PromptSet:
    """The prompt set a spec's ``prompt_version`` names (a shipped version or a file path)."""
    if not is_prompt_file(source):
        return _shipped(source)
    path = Path(source).expanduser()
    if path.is_dir():
        raise PromptFileError(f"{path}: is a folder, not a judge prompt file; give the YAML file's path")
    if not path.is_file():
        raise PromptFileError(f"judge prompt file {source!r} not found (from {Path.cwd()}); give a shipped "
                              f"version ({', '.join(shipped_prompt_versions())}) or a path to a YAML file")
    stat = path.stat()
    return _from_file(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=None)
def _shipped(version: str) -> PromptSet:
    package = resources.files("emtune.evaluation") / "prompts" / f"judge_prompts_{version}.yaml"
    if not package.is_file():
        raise PromptFileError(f"unknown judge prompt version {version!r}; shipped: "
                              f"{', '.join(shipped_prompt_versions())} (or a path to a prompt file)")
    data = yaml.safe_load(package.read_text(encoding="utf-8"))
    if data.get("version") != version or not isinstance(data.get("prompts"), dict):
        raise PromptFileError(f"prompts/judge_prompts_{version}.yaml must have version: {version} and a prompts mapping")
    return PromptSet(version, {str(k): str(v) for k, v in data["prompts"].items()})


@lru_cache(maxsize=32)
def _from_file(path: str, mtime_ns: int, size: int) -> PromptSet:
    try:
        doc, _ = load_user_yaml(read_user_text(Path(path), "judge prompt"), path)
        raw = Path(path).read_bytes()  # the version hashes the file's own bytes
    except UserFileError as err:  # encoding, syntax, YAML bombs, recursive aliases, keys written twice
        raise PromptFileError(str(err)) from None
    if isinstance(doc, dict) and isinstance(doc.get("prompts"), dict):
        prompts = doc["prompts"]
    elif isinstance(doc, list):
        prompts = _shared_question_prompts(doc, path)
    else:
        raise PromptFileError(f"{path}: expected emtune's prompt format (version + prompts mapping) or a "
                              f"question list whose entries carry judge_prompts")
    if not prompts or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise PromptFileError(f"{path}: the prompts must map metric names to template strings")
    for metric, template in prompts.items():
        check_template(template, f"{path}: prompt {metric!r}")
    digest = hashlib.sha256(raw).hexdigest()
    return PromptSet(f"{Path(path).stem}@{digest[:12]}", dict(prompts), path, digest)


def _shared_question_prompts(entries: list[Any], path: str) -> dict[str, str]:
    found = [e.get("judge_prompts") for e in entries if isinstance(e, dict) and e.get("judge_prompts")]
    if not found:
        raise PromptFileError(f"{path}: none of its question entries carries judge_prompts")
    first = found[0]
    if any(other != first for other in found[1:]):
        raise PromptFileError(f"{path}: its questions carry different judge prompts; to judge each question "
                              f"with its own, set evaluation.question_judge_prompts: true instead")
    return dict(first)
