"""Readable errors for YAML specs: file, line, dotted path, what is wrong, and a hint; and
``--set KEY=VALUE`` overrides applied to a parsed spec.

pydantic reports locations as tuples; users think in dotted YAML paths and line numbers. This
module keeps a path -> line map while loading the YAML and turns each pydantic error into one
line, suggesting close names for misspelled keys.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from emtune.user_files import UserFileError, load_user_yaml, read_user_text

Problem = tuple[str, str, "int | None"]


def closest(name: Any, known: Any, cutoff: float = 0.6) -> str | None:
    """The known name closest to ``name`` (spelling, or the one name it abbreviates), or None."""
    names = [str(k) for k in known]
    close = difflib.get_close_matches(str(name), names, n=1, cutoff=cutoff)
    if close:
        return close[0]
    starts = [n for n in names if str(name) and n.startswith(str(name))]
    return starts[0] if len(starts) == 1 else None


def did_you_mean(name: Any, known: Any, cutoff: float = 0.6) -> str:
    """A hint for a name outside a closed set: ``did you mean 'x'?`` when one is close, else the
    known names (the first 20)."""
    names = [str(k) for k in known]
    close = closest(name, names, cutoff)
    if close is not None:
        return f"did you mean {close!r}?"
    shown = ", ".join(sorted(names)[:20]) + (", ..." if len(names) > 20 else "")
    return f"known: {shown}" if names else "none is known"


def display_path(key: str) -> str:
    """``defenses.0.weight`` (the line map's form) as users read it: ``defenses[0].weight``."""
    return _display([int(p) if p.isdigit() else p for p in key.split(".")]) if key else ""


def line_of(key: str, lines: dict[str, int]) -> int | None:
    """The line of ``key`` (``a.b.0.c``) or of its nearest ancestor that has one."""
    return _nearest_line(key, lines)


class StrictModel(BaseModel):
    """Base of every spec section: unknown keys are errors, and a loaded spec is frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SpecError(Exception):
    """A spec that cannot be used: every problem with its path, message and line."""

    def __init__(self, path: Path | str, problems: list[Problem]):
        self.path = Path(path)
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        """One line per problem: ``file:line: field.path: message``."""
        out = []
        for where, message, line in self.problems:
            loc = f"{self.path}:{line}" if line else str(self.path)
            out.append(f"{loc}: {where or '(top level)'}: {message}" if where else f"{loc}: {message}")
        return "\n".join(out)


def load_yaml_with_lines(path: Path) -> tuple[Any, dict[str, int]]:
    """Parse YAML and map each dotted path (``a.b.0.c``) to its 1-based line number. The file is
    read as :mod:`emtune.user_files` reads any user file (UTF-8, bounded, no YAML bombs)."""
    if not path.exists():
        raise SpecError(path, [("", "file not found: check the path", None)])
    try:
        data, node = load_user_yaml(read_user_text(path, "spec"), str(path))
    except UserFileError as err:
        raise SpecError(path, [("", err.detail, err.line)]) from None
    if not isinstance(data, dict):
        raise SpecError(path, [("", "a spec is a YAML mapping (key: value) at the top level", 1)])
    lines: dict[str, int] = {}
    _walk(node, "", lines)
    return data, lines


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], path: Path) -> None:
    """Write ``KEY=VALUE`` overrides into a parsed spec (``--set model.source=tiny``).

    KEY is a dotted path; a list entry is addressed by index or, for ``defenses``, by name
    (``defenses.kl_to_reference.weight=0.1``); missing mapping keys are created. VALUE is parsed
    as YAML (``0.1`` a number, ``[a, b]`` a list, ``null`` nothing). Raises SpecError naming the
    override that cannot be applied.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(path, [("--set", f"{item!r}: expected KEY=VALUE, e.g. model.source=tiny", None)])
        try:  # read as the spec file is: no tags, bombs or recursive aliases
            value = load_user_yaml(text, "--set")[0] if text.strip() else ""
        except UserFileError as err:
            raise SpecError(path, [("--set", f"{item!r}: {err.detail}", None)]) from None
        parts = key.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                index = int(part) if part.isdigit() else next(
                    (j for j, e in enumerate(node) if isinstance(e, dict) and e.get("name") == part), None)
                if index is None or index >= len(node):
                    raise SpecError(path, [("--set", f"{item!r}: no list entry {where!r}", None)])
                if last:
                    node[index] = value
                node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                elif node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise SpecError(path, [("--set", f"{item!r}: {'.'.join(parts[:i])!r} is a value, not a section", None)])


def _walk(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = f"{prefix}.{key.value}" if prefix else str(key.value)
            lines[path] = key.start_mark.line + 1
            _walk(value, path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}.{i}"
            lines[path] = item.start_mark.line + 1
            _walk(item, path, lines)


def format_validation_error(
    err: ValidationError, raw: Any, lines: dict[str, int], root: type[BaseModel]
) -> list[Problem]:
    """Turn pydantic errors into (dotted path, message with hint, line) triples."""
    problems: list[Problem] = []
    for e in err.errors():
        loc = _data_loc(e["loc"], raw)
        dotted = _display(loc)
        key = ".".join(str(p) for p in loc)
        line = _nearest_line(key, lines)
        kind = e["type"]
        if kind == "extra_forbidden":
            allowed = _fields_at(root, e["loc"][:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"
            msg = f"unknown key {loc[-1]!r}; {hint}"
        elif kind == "missing":
            msg = "required field is missing: add it"
            line = line or 1  # a missing top-level section: the file's start
        elif kind == "union_tag_invalid":
            ctx = e.get("ctx", {})
            tag = ctx.get("tag", "")
            expected = ctx.get("expected_tags", "")
            names = [t.strip(" '") for t in str(expected).split(",")]
            what = "reward" if "rewards[" in dotted else "defense"
            msg = f"unknown {what} {tag!r}; {did_you_mean(tag, names, cutoff=0.5)}"
            dotted = f"{dotted}.name"
        elif kind == "literal_error":
            names = re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", "")))
            msg = f"{e['msg']} (got {e.get('input')!r})"
            close = difflib.get_close_matches(str(e.get("input")), names, n=1, cutoff=0.5)
            if close:
                msg += f"; did you mean {close[0]!r}?"
        else:
            msg = e["msg"].replace("Value error, ", "")
            if "input" in e and not isinstance(e["input"], (dict, list)) and repr(e["input"]) not in msg:
                msg += f" (got {e['input']!r})"
        problems.append((dotted, msg, line))
    return problems


def drop_point(root: type[BaseModel], loc: tuple[Any, ...]) -> int | None:
    """How many parts of a pydantic error location lead to the deepest thing that can be removed
    from the input while the rest still validates: an unknown key, a field with a default, a list
    item or a mapping entry. None when the error sits in a required field of the root."""
    best = None
    tp: Any = root
    for i, part in enumerate(loc):
        tp = _strip(tp)
        origin = typing.get_origin(tp)
        if _is_model(tp):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return i + 1
            if not field.is_required():
                best = i + 1
            tp = field.annotation
        elif origin in (tuple, list) and isinstance(part, int):
            best, tp = i + 1, typing.get_args(tp)[0]
        elif origin is dict:
            best, tp = i + 1, typing.get_args(tp)[1]
        elif _models_in(tp):  # a tagged union: this part is the tag, not a level of the input
            tp = next((c for c in _models_in(tp) if typing.get_args(c.model_fields["name"].annotation) == (part,)),
                      None)
            if tp is None:
                break
        else:
            break
    return best


def data_loc(loc: tuple[Any, ...], raw: Any) -> list[Any]:
    """A pydantic error location as a path into the input (union tags dropped)."""
    return _data_loc(loc, raw)


def _strip(tp: Any) -> Any:
    """Drop Annotated and Optional wrappers."""
    while True:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Annotated:
            tp = args[0]
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1:
                return typing.Union[tuple(rest)]
            tp = rest[0]
        else:
            return tp


def _data_loc(loc: tuple[Any, ...], raw: Any) -> list[Any]:
    """Drop the union tags pydantic inserts into locations so the path matches the YAML."""
    out: list[Any] = []
    node = raw
    for i, part in enumerate(loc):
        is_tag = isinstance(node, dict) and part not in node and node.get("name") == part
        if is_tag:
            continue
        out.append(part)
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return out


def _display(loc: list[Any]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _nearest_line(key: str, lines: dict[str, int]) -> int | None:
    while key:
        if key in lines:
            return lines[key]
        key = key.rpartition(".")[0]
    return None


def _fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model found by following ``loc`` from ``root`` (tags included)."""
    current = _model_at(root, loc)
    return list(current.model_fields) if _is_model(current) else []


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The type a pydantic location leads to: through model fields, list items, mapping values and
    union tags; None when the location leaves the models."""
    tp: Any = root
    for part in loc:
        tp = _strip(tp)
        origin = typing.get_origin(tp)
        if _is_model(tp):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
        elif origin in (tuple, list) and isinstance(part, int):
            tp = typing.get_args(tp)[0]
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        elif _models_in(tp):  # a tagged union: this part is the tag
            tp = next((c for c in _models_in(tp) if typing.get_args(c.model_fields["name"].annotation) == (part,)),
                      None)
        else:
            return None
    return _strip(tp)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _models_in(tp: Any) -> list[type[BaseModel]]:
    return [a for a in typing.get_args(tp) if _is_model(a)]
