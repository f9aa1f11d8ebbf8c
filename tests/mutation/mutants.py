"""Mutation testing for the modules that compute defenses, metrics, fronts and constraints.

``make mutants`` runs this script (nice'd, one mutant at a time). For every module listed in
``tests/mutation/mutants.yaml`` it makes small changes to the code one at a time (a comparison, an
arithmetic or boolean operator, a number, a sign, a ``min``/``max``, the branches of a conditional
expression), runs that module's fast tests against each changed version, and writes
``reports/mutants.md``: how many mutants the tests killed, and every survivor with the reason it
is equivalent to the original or was left. It also re-plants the hand-written bugs of
``tests/mutation/mutants.yaml`` (``planted:``) and records which tests catch each.

How a mutant runs (``tests/mutation/mutants_run.py``): one pytest session per module collects its tests
once; a first, unmutated run with a probe before every statement records which lines each test
executes; then each mutant runs in a forked child that swaps the mutated code into the live
functions and runs only the tests that execute the mutated lines, fastest first, stopping at the
first failure. Nothing is written to the source tree, so a crash or a Ctrl-C never leaves a
mutated file behind. A mutant that hangs past ``--timeout`` counts as killed. Results are kept
per module in ``reports/mutants.json``, so ``--module`` reruns one module and rewrites the report.
The tool is not part of CI: rerun it when those modules change.

mutmut (3.x) was the first choice; its trampoline copy of the package under ``mutants/`` and
whole-suite stats run do not fit a suite that needs a per-module test selection to finish on a
shared two-core machine, so emtune keeps this small, dependency-free runner instead.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
WARM = ("torch", "numpy", "yaml", "pydantic", "optuna", "transformers", "peft", "openai", "sqlalchemy",
        "transformers.models.qwen2.modeling_qwen2", "pytest")

COMPARE = {ast.Lt: [ast.LtE], ast.LtE: [ast.Lt], ast.Gt: [ast.GtE], ast.GtE: [ast.Gt], ast.Eq: [ast.NotEq],
           ast.NotEq: [ast.Eq], ast.In: [ast.NotIn], ast.NotIn: [ast.In], ast.Is: [ast.IsNot], ast.IsNot: [ast.Is]}
BINARY = {ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.Div], ast.Div: [ast.Mult], ast.FloorDiv: [ast.Mult],
          ast.Mod: [ast.FloorDiv], ast.Pow: [ast.Mult], ast.BitAnd: [ast.BitOr], ast.BitOr: [ast.BitAnd]}


@dataclass
class Site:
    """One mutant: where (function), what changed (before -> after), and its stable key."""

    index: int
    qualname: str
    line: int
    before: str
    after: str
    key: str = ""
    end_line: int = 0


class Mutator(ast.NodeTransformer):
    """Walks a module in a fixed order; lists mutation sites, or applies the one numbered ``apply``.

    Not mutated: docstrings, f-strings, annotations, decorators, ``raise`` statements (messages),
    class-level field declarations (documented defaults, covered by the config tests), and lines
    marked ``# pragma: no mutate``."""

    def __init__(self, source: str, apply: int | None = None):
        self.lines = source.splitlines()
        self.apply = apply
        self.sites: list[Site] = []
        self.scope: list[str] = []
        self.kinds: list[str] = []  # "class" / "def", innermost last

    # -- traversal with skips --------------------------------------------------------------------
    def _body(self, node):
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]
        node.body[len(node.body) - len(body):] = [self.visit(s) for s in body]

    def visit_FunctionDef(self, node):  # noqa: N802 (ast naming)
        self.scope.append(node.name)
        self.kinds.append("def")
        node.args.defaults = [self.visit(d) for d in node.args.defaults]
        node.args.kw_defaults = [self.visit(d) if d is not None else None for d in node.args.kw_defaults]
        self._body(node)
        self.scope.pop()
        self.kinds.pop()
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):  # noqa: N802
        self.scope.append(node.name)
        self.kinds.append("class")
        self._body(node)
        self.scope.pop()
        self.kinds.pop()
        return node

    def visit_AnnAssign(self, node):  # noqa: N802
        if self.kinds and self.kinds[-1] == "class":  # a field declaration
            return node
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_Raise(self, node):  # noqa: N802
        return node

    def visit_JoinedStr(self, node):  # noqa: N802
        return node

    def visit_If(self, node):  # noqa: N802
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return node
        return self.generic_visit(node)

    def visit_Expr(self, node):  # noqa: N802
        if isinstance(node.value, ast.Constant):
            return node
        return self.generic_visit(node)

    # -- mutation sites --------------------------------------------------------------------------
    def _site(self, node, variants):
        """Offer ``variants`` (functions node -> mutated copy); return the node, mutated if chosen."""
        line = getattr(node, "lineno", 0)
        if 0 < line <= len(self.lines) and "pragma: no mutate" in self.lines[line - 1]:
            return node
        before = ast.unparse(node)
        for make in variants:
            index = len(self.sites)
            mutated = make(copy.deepcopy(node))
            self.sites.append(Site(index, ".".join(self.scope) or "<module>", line, before, ast.unparse(mutated),
                                   end_line=getattr(node, "end_lineno", line) or line))
            if index == self.apply:
                return ast.copy_location(mutated, node)
        return node

    def visit_Compare(self, node):  # noqa: N802
        node = self.generic_visit(node)
        variants = []
        for i, op in enumerate(node.ops):
            for other in COMPARE.get(type(op), []):
                def make(n, i=i, other=other):
                    n.ops[i] = other()
                    return n
                variants.append(make)
        return self._site(node, variants)

    def visit_BinOp(self, node):  # noqa: N802
        node = self.generic_visit(node)
        return self._site(node, [lambda n, o=o: (setattr(n, "op", o()), n)[1] for o in BINARY.get(type(node.op), [])])

    def visit_AugAssign(self, node):  # noqa: N802
        node = self.generic_visit(node)
        return self._site(node, [lambda n, o=o: (setattr(n, "op", o()), n)[1] for o in BINARY.get(type(node.op), [])])

    def visit_UnaryOp(self, node):  # noqa: N802
        node = self.generic_visit(node)
        if isinstance(node.op, (ast.USub, ast.Not)):
            return self._site(node, [lambda n: n.operand])
        return node

    def visit_BoolOp(self, node):  # noqa: N802
        node = self.generic_visit(node)
        other = ast.Or if isinstance(node.op, ast.And) else ast.And
        return self._site(node, [lambda n: (setattr(n, "op", other()), n)[1]])

    def visit_IfExp(self, node):  # noqa: N802
        node = self.generic_visit(node)
        return self._site(node, [lambda n: ast.IfExp(test=n.test, body=n.orelse, orelse=n.body)])

    def visit_Call(self, node):  # noqa: N802
        node = self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
            swap = "max" if node.func.id == "min" else "min"
            return self._site(node, [lambda n: (setattr(n.func, "id", swap), n)[1]])
        return node

    def visit_Constant(self, node):  # noqa: N802
        value = node.value
        if isinstance(value, bool):
            return self._site(node, [lambda n: ast.Constant(not value)])
        if isinstance(value, int):
            return self._site(node, [lambda n: ast.Constant(value + 1)])
        if isinstance(value, float):
            return self._site(node, [lambda n: ast.Constant(value * 2 if value else 1.0)])
        return node


def sites_of(path: Path, module: str) -> list[Site]:
    """Every mutant of one file, each with a key that survives line moves."""
    source = path.read_text()
    mutator = Mutator(source)
    mutator.visit(ast.parse(source))
    seen: dict[str, int] = {}
    for site in mutator.sites:
        key = f"{module}:{site.qualname}: `{site.before}` -> `{site.after}`"
        seen[key] = seen.get(key, 0) + 1
        site.key = key if seen[key] == 1 else f"{key} #{seen[key]}"
    return mutator.sites


def mutated_code(path: Path, index: int | None, edits: list[dict[str, str]] | None = None, probes: bool = False):
    """Compiled code of ``path`` with mutant ``index`` applied, or with text ``edits`` (old -> new)."""
    source = path.read_text()
    if edits is not None:
        for edit in edits:
            if source.count(edit["old"]) != 1:
                raise SystemExit(f"{path}: a planted bug's `old` text must occur exactly once, found "
                                 f"{source.count(edit['old'])}: {edit['old']!r}")
            source = source.replace(edit["old"], edit["new"])
        return compile(source, str(path), "exec")
    tree = ast.parse(source)
    if index is not None:
        tree = Mutator(source, apply=index).visit(tree)
    if probes:
        tree = _Probes().visit(tree)
    return compile(ast.fix_missing_locations(tree), str(path), "exec")


class _Probes(ast.NodeTransformer):
    """Puts ``__mutants_probe__(first, last)`` before every statement (after docstrings and
    ``__future__`` imports): the lines of that statement, or of a compound statement's header."""

    def generic_visit(self, node):
        super().generic_visit(node)
        for name in ("body", "orelse", "finalbody"):
            statements = getattr(node, name, None)
            if not isinstance(statements, list) or not statements or not isinstance(statements[0], ast.stmt):
                continue
            out = []
            for i, stmt in enumerate(statements):
                docstring = i == 0 and isinstance(stmt, ast.Expr) and isinstance(getattr(stmt, "value", None), ast.Constant)
                future = isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"
                if not (docstring or future):
                    inner = [getattr(stmt, f) for f in ("body", "handlers") if isinstance(getattr(stmt, f, None), list)]
                    first_inner = min((s.lineno for block in inner for s in block if hasattr(s, "lineno")), default=None)
                    last = first_inner - 1 if first_inner else stmt.end_lineno
                    out.append(ast.Expr(ast.Call(ast.Name("__mutants_probe__", ast.Load()),
                                                 [ast.Constant(stmt.lineno), ast.Constant(max(last, stmt.lineno))], [])))
                out.append(stmt)
            setattr(node, name, out)
        return node


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "tests" / "mutation" / "mutants.yaml"))
    parser.add_argument("--report", default=str(ROOT / "reports" / "mutants.md"))
    parser.add_argument("--module", action="append", help="only this module (path as in the config); repeatable")
    parser.add_argument("--planted-only", action="store_true", help="only re-plant the hand-written bugs")
    parser.add_argument("--survivors", action="store_true",
                        help="rerun only the mutants that survived last time (after adding tests); keep the rest")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one mutant may run (then killed)")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--merge", action="append", default=[],
                        help="a mutants.json of another run whose modules (and planted bugs) to take in; repeatable")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = yaml.safe_load(Path(args.config).read_text())
    modules = {m: t for m, t in config["modules"].items()
               if not args.planted_only and not args.merge and (not args.module or m in args.module)}
    if args.list:
        for rel in modules:
            for site in sites_of(ROOT / rel, module_name(rel)):
                print(f"{site.line:4d} {site.key}")
        return 0
    for name in WARM:
        __import__(name)
    from mutants_report import commit, load_results, write_report  # this folder is on the path as a script
    from mutants_run import run_session

    # results of earlier runs stay for the modules not rerun now (reports/mutants.json)
    record_path = Path(args.report).with_suffix(".json")
    record = load_results(record_path, list(config["modules"]))
    record_path.parent.mkdir(parents=True, exist_ok=True)
    for other in args.merge:  # runs split over processes or machines, joined into one report
        taken = load_results(Path(other), list(config["modules"]))
        record["modules"].update(taken["modules"])
        record["planted"] = taken["planted"] or record["planted"]
    if args.merge:
        record_path.write_text(json.dumps(record, indent=1))
    for rel, tests in modules.items():
        path, name = ROOT / rel, module_name(rel)
        sites = sites_of(path, name)
        before = {row["key"]: row for row in (record["modules"].get(rel) or {}).get("mutants", [])}
        rerun = [site for site in sites if not (args.survivors and site.key in before
                                                and before[site.key]["status"] in ("killed", "timeout"))]
        plan = [{"id": "baseline", "code": mutated_code(path, None, probes=True), "probe": True}]
        plan += [{"id": str(site.index), "code": mutated_code(path, site.index), "line": site.line,
                  "end_line": site.end_line} for site in rerun]
        print(f"{rel}: {len(sites)} mutants", flush=True)
        results = run_session(name, tests, plan, args.timeout)
        base = results.get("baseline") or {"status": "no result", "failed": []}
        if base["status"] != "survived":
            raise SystemExit(f"{rel}: its tests fail without any mutation ({base['failed']}); fix them first")
        rows = []
        for site in sites:
            if site not in rerun:  # killed last time, kept
                rows.append(before[site.key])
                continue
            outcome = results.get(str(site.index)) or {"status": "no result", "failed": []}
            rows.append({"key": site.key, "line": site.line, "qualname": site.qualname, "before": site.before,
                         "after": site.after, "status": outcome["status"], "killed_by": outcome["failed"][:1]})
        seconds = sum(base.get("durations", {}).values())
        print(f"  {sum(r['status'] in ('killed', 'timeout') for r in rows)} killed", flush=True)
        record["modules"][rel] = {"commit": commit(), "seconds": round(seconds, 1), "mutants": rows}
        record_path.write_text(json.dumps(record, indent=1))
    if args.planted_only or not (args.module or args.merge):
        record["planted"] = []
        for bug in config.get("planted") or []:
            code = mutated_code(ROOT / bug["file"], None, bug["edits"])
            outcome = run_session(module_name(bug["file"]), bug["tests"],
                                  [{"id": "bug", "code": None, "all": True}], 1800, serve=code)["bug"]
            record["planted"].append({"name": bug["name"], "status": outcome["status"], "failed": outcome["failed"],
                                      "commit": commit()})
            print(f"planted: {bug['name']}: {outcome['status']} by {outcome['failed']}", flush=True)
        record_path.write_text(json.dumps(record, indent=1))
    write_report(Path(args.report), record, config.get("notes") or {}, list(config["modules"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
