"""Reading files a user hands emtune (specs, question sets, prompt sets, datasets) without ever
crashing on them: every problem becomes a :class:`UserFileError` naming the file, where in it
(line, column, key) and what to do.

- :func:`read_user_text`: a regular file, not a folder, of bounded size, decoded as UTF-8 (a
  UTF-8 byte-order mark is accepted); an undecodable byte is reported with its line and column,
  with a guess at what the file really is (UTF-16, Latin-1, gzip, binary).
- :func:`decode_line`: the same for one line of a line-oriented file (JSONL).
- :func:`load_user_yaml`: safe YAML (no Python tags) that also refuses what ``yaml.safe_load``
  lets through: a "billion laughs" document whose anchors and aliases expand to millions of
  values (the data would be small, but every walk over it, pydantic's included, is exponential),
  a recursive alias, and a key written twice in one mapping (YAML keeps the last one silently).
  Ordinary anchors and merge keys (``<<: *defaults``) stay allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

#: A user YAML file larger than this is refused (a spec or question set is kilobytes).
MAX_YAML_BYTES = 16 * 2**20
#: Values a YAML document may expand to once its aliases are followed.
MAX_YAML_VALUES = 200_000
#: Aliases a YAML document may use at all.
MAX_YAML_ALIASES = 10_000
UTF8_HINT = "save it as UTF-8"


class UserFileError(ValueError):
    """A user's file that cannot be read; the message names the file, where, and what to do."""

    def __init__(self, source: str | Path, detail: str, line: int | None = None):
        self.source, self.detail, self.line = str(source), detail, line
        super().__init__(f"{source}:{line}: {detail}" if line else f"{source}: {detail}")


def _guess_encoding(data: bytes) -> str:
    """A hint at what a file that is not UTF-8 really is."""
    if data.startswith(b"\x1f\x8b"):
        return "it is gzip-compressed: decompress it first (gunzip)"
    if data.startswith((b"PK\x03\x04", b"\x80\x02", b"\x80\x04", b"\x93NUMPY")):
        return "it is a binary file (zip, pickle or numpy), not text: export it as text"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(data) > 3 and data[1:2] == b"\x00"):
        return f"it looks like UTF-16: {UTF8_HINT}"
    if b"\x00" in data[:4096]:
        return "it holds NUL bytes: it is a binary file, not text"
    return f"it is probably Latin-1 or Windows-1252: {UTF8_HINT} (e.g. iconv -f latin1 -t utf-8)"


def decode_line(raw: bytes, source: str, line: int, first: bool = False) -> str:
    """One line's bytes as text; a bad byte names ``source:line``, its column and a fix."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        column = len(raw[:err.start].decode("utf-8", errors="replace")) + 1
        raise UserFileError(source, f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); "
                            f"{_guess_encoding(raw) if first else UTF8_HINT}", line) from None
    return text.removeprefix("\ufeff") if first else text


def decode_text(data: bytes, source: str | Path) -> str:
    """Bytes of a whole user file as text; a bad byte names its line and column, with a fix."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        start = data.rfind(b"\n", 0, err.start) + 1
        column = len(data[start:err.start].decode("utf-8", errors="replace")) + 1
        raise UserFileError(source, f"not UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
                            f"{_guess_encoding(data)}", line) from None


def check_regular_file(path: Path, what: str) -> Path:
    """``path`` if it is a readable regular file; else a UserFileError saying what it is instead."""
    if path.is_dir():
        raise UserFileError(path, f"is a folder, not a {what} file; give the file's path")
    if not path.exists():
        raise UserFileError(path, f"{what} file not found; check the path")
    if not path.is_file():
        raise UserFileError(path, f"not a regular file (a device or a pipe?); give a {what} file")
    return path


def read_user_text(path: Path, what: str, max_bytes: int = MAX_YAML_BYTES) -> str:
    """The whole file as text (see the module docs); ``what`` names the kind of file in errors."""
    check_regular_file(path, what)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UserFileError(path, f"{size / 2**20:.1f} MiB is too large for a {what} file "
                                f"(limit {max_bytes // 2**20} MiB); check that this is the right file")
        data = path.read_bytes()
    except OSError as err:
        raise UserFileError(path, f"cannot read it ({err.strerror or err}); check its permissions") from None
    return decode_text(data, path)


def _yaml_problem(node: yaml.Node) -> tuple[str, int | None] | None:
    """Why a composed document cannot be used (a cycle, too many values, a key written twice)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    aliases = 0
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        current, done = stack.pop()
        key = id(current)
        if done:
            active.discard(key)
            children = _children(current)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_YAML_VALUES:
                line = current.start_mark.line + 1
                return (f"the document expands to more than {MAX_YAML_VALUES} values through its anchors and "
                        "aliases (a \"billion laughs\" document?); write the values out or use fewer aliases", line)
            continue
        if key in sizes:
            aliases += 1
            if aliases > MAX_YAML_ALIASES:
                return f"more than {MAX_YAML_ALIASES} aliases (*name); write the values out", None
            continue
        if key in active:
            return ("a recursive alias (an anchor used inside itself); a value cannot contain itself: "
                    "write it out", current.start_mark.line + 1)
        active.add(key)
        if isinstance(current, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for name, _ in current.value:
                if isinstance(name, yaml.ScalarNode) and name.tag != "tag:yaml.org,2002:merge":
                    if name.value in seen:
                        return (f"key {name.value!r} appears twice in one mapping (first on line "
                                f"{seen[name.value]}); keep one", name.start_mark.line + 1)
                    seen[name.value] = name.start_mark.line + 1
        stack.append((current, True))
        stack.extend((child, False) for child in _children(current))
    return None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def load_user_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """Parse one YAML document safely; returns (data, composed node). Raises UserFileError."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        problem = _yaml_problem(node)
        if problem:
            raise UserFileError(source, *problem)
        return loader.construct_document(node), node
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        fix = ("emtune reads plain YAML: remove the tag" if isinstance(err, yaml.constructor.ConstructorError)
               else "fix the syntax there (indentation, a missing colon or quote)")
        raise UserFileError(source, f"not valid YAML: {getattr(err, 'problem', None) or err}; {fix}",
                            mark.line + 1 if mark else None) from None
    finally:
        loader.dispose()
