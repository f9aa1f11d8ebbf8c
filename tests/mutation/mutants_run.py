"""Running mutants fast: one pytest session per module collects the tests once, then forks a child per
mutant that swaps the mutated code into the live functions and runs only the tests that execute the
mutated lines.

The swap ("transplant") execs the mutated module source into a scratch namespace and moves each new
function's code object (and default arguments) into the function object that already exists, so
every reference to it — ``from module import f`` in a test or in another module, a closure kept in
a registry — runs the mutant. Module-level and class-level plain values (numbers, strings, tuples, dicts) are
replaced too. Line coverage per test comes from a first, unmutated run whose code carries probes.
"""

from __future__ import annotations

import builtins
import gc
import importlib.abc
import importlib.util
import json
import os
import signal
import sys
import time
import types
from pathlib import Path
from typing import Any

_PLAIN = (int, float, bool, str, bytes, tuple, frozenset, type(None), dict, list, set)


def _innermost(obj: Any) -> Any:
    while isinstance(obj, types.FunctionType) and hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    return obj


def _patch(old: Any, new: Any, filename: str) -> bool:
    """Move ``new``'s code into ``old`` (functions, methods, properties, classes); False when
    they are not code-bearing objects of the same kind."""
    old_f, new_f = _innermost(old), _innermost(new)
    if isinstance(old_f, types.FunctionType) and isinstance(new_f, types.FunctionType):
        if new_f.__code__.co_filename == filename:
            old_f.__code__ = new_f.__code__
            old_f.__defaults__, old_f.__kwdefaults__ = new_f.__defaults__, new_f.__kwdefaults__
        return True
    if isinstance(old, (staticmethod, classmethod)) and type(old) is type(new):
        return _patch(old.__func__, new.__func__, filename)
    if isinstance(old, property) and isinstance(new, property):
        for part in ("fget", "fset", "fdel"):
            if getattr(old, part) is not None and getattr(new, part) is not None:
                _patch(getattr(old, part), getattr(new, part), filename)
        return True
    if isinstance(old, type) and isinstance(new, type):
        for attr, value in vars(new).items():
            # dunder methods too (``__init__``): the walk in ``transplant`` swaps their code, but a
            # mutated default argument lives on the function object
            if (attr.startswith("__") and not isinstance(value, types.FunctionType)) or attr not in vars(old):
                continue
            if not _patch(vars(old)[attr], value, filename) and isinstance(value, _PLAIN):
                setattr(old, attr, value)
        return True
    return False


def transplant(module: types.ModuleType, code: Any, probe: Any = None) -> None:
    """Make the live ``module`` run ``code`` (its mutated or probed source)."""
    namespace = {"__name__": module.__name__, "__file__": module.__file__, "__package__": module.__package__,
                 "__spec__": module.__spec__, "__builtins__": builtins, "__mutants_probe__": probe}
    module.__dict__["__mutants_probe__"] = probe
    exec(code, namespace)
    for name, new in namespace.items():
        if name.startswith("__"):
            continue
        if name not in module.__dict__:
            module.__dict__[name] = new
        elif not _patch(module.__dict__[name], new, module.__file__) and isinstance(new, _PLAIN):
            module.__dict__[name] = new
    # Functions made at import time from nested code (closures kept in registries, lambdas) are
    # found by their code's qualified name and first line, which a mutation does not change.
    codes: dict[tuple[str, int], types.CodeType] = {}

    def walk(outer: types.CodeType) -> None:
        for const in outer.co_consts:
            if isinstance(const, types.CodeType):
                codes[(const.co_qualname, const.co_firstlineno)] = const
                walk(const)

    walk(code)
    for obj in gc.get_objects():
        if type(obj) is types.FunctionType and obj.__code__.co_filename == module.__file__:
            new_code = codes.get((obj.__code__.co_qualname, obj.__code__.co_firstlineno))
            if new_code is not None and obj.__code__ is not new_code:
                obj.__code__ = new_code


class Serve(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook that serves ``code`` for one module name: a planted bug is in the module from
    its first import on, so values built at import time (registries, tables) carry it too."""

    def __init__(self, name: str, path: str, code: Any):
        self.name, self.path, self.code = name, path, code

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=self.path)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__file__ = self.path
        exec(self.code, module.__dict__)


class Driver:
    """A pytest plugin that replaces the run loop: ``plan`` is a list of jobs
    ``{"id", "code", "probe": bool, "all": bool}``; results go to ``out`` as JSON."""

    def __init__(self, module: str, plan: list[dict[str, Any]], out: Path, timeout: float):
        self.module, self.plan, self.out, self.timeout = module, plan, out, timeout

    def _fork(self, session, items, code, stop_first: bool, probe: bool) -> dict[str, Any]:
        from _pytest.runner import runtestprotocol

        result = Path(f"{self.out}.{os.getpid()}.part")
        result.unlink(missing_ok=True)
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            state: dict[str, Any] = {"failed": [], "durations": {}, "covers": {}}
            current = ["<import>"]
            spans: dict[str, set] = {}

            def record(first: int, last: int) -> None:
                spans.setdefault(current[0], set()).add((first, last))

            try:
                if code is not None:
                    transplant(sys.modules[self.module], code, record if probe else None)
                for i, item in enumerate(items):
                    current[0] = item.nodeid
                    began = time.perf_counter()
                    reports = runtestprotocol(item, nextitem=items[i + 1] if i + 1 < len(items) else None, log=False)
                    state["durations"][item.nodeid] = time.perf_counter() - began
                    if any(r.failed for r in reports):
                        if os.environ.get("MUTANTS_VERBOSE"):  # debugging the tool: show why
                            print(*(r.longreprtext for r in reports if r.failed), file=sys.stderr)
                        state["failed"].append(item.nodeid)
                        if stop_first:
                            break
                state["covers"] = {t: sorted({n for a, b in s for n in range(a, b + 1)}) for t, s in spans.items()}
            except BaseException as exc:  # noqa: BLE001 - a mutant that breaks the module is caught
                state["failed"].append(f"<transplant: {type(exc).__name__}: {exc}>"[:300])
            result.write_text(json.dumps(state))
            os._exit(0)
        deadline = started + self.timeout
        while True:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.perf_counter() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                result.unlink(missing_ok=True)
                return {"status": "timeout", "failed": [], "seconds": time.perf_counter() - started}
            time.sleep(0.02)
        state = json.loads(result.read_text()) if result.is_file() else {"failed": ["<child died>"]}
        result.unlink(missing_ok=True)
        state["status"] = "killed" if state["failed"] else "survived"
        state["seconds"] = time.perf_counter() - started
        return state

    def pytest_runtestloop(self, session):
        items = list(session.items)
        __import__(self.module)
        results: dict[str, Any] = {}
        base = None
        for job in self.plan:
            if job.get("probe"):
                base = self._fork(session, items, job["code"], stop_first=False, probe=True)
                results[job["id"]] = base
                if base["status"] != "survived":
                    break
                continue
            chosen = items
            if base is not None and not job.get("all"):
                lines = set(range(job["line"], job["end_line"] + 1))
                covering = [i for i in items if lines & set(base["covers"].get(i.nodeid, []))]
                chosen = sorted(covering, key=lambda i: base["durations"].get(i.nodeid, 0.0)) or items
            results[job["id"]] = self._fork(session, chosen, job["code"], stop_first=not job.get("all"), probe=False)
        self.out.write_text(json.dumps(results))
        return True


def run_session(module: str, tests: list[str], plan: list[dict[str, Any]], timeout: float,
                serve: Any = None) -> dict[str, Any]:
    """Fork a pytest session over ``tests`` that runs every job of ``plan``; return the results.
    With ``serve`` (a code object of ``module``) the module is imported from it."""
    import tempfile

    handle = tempfile.NamedTemporaryFile(prefix="emtune-mutants-", suffix=".json", delete=False)
    handle.close()
    out = Path(handle.name)
    pid = os.fork()
    if pid == 0:
        try:
            import pytest

            if not os.environ.get("MUTANTS_VERBOSE"):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            if serve is not None:
                sys.meta_path.insert(0, Serve(module, serve.co_filename, serve))
            args = [*tests, "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu", "-o", "addopts="]
            pytest.main(args, plugins=[Driver(module, plan, out, timeout)])
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    results = json.loads(out.read_text() or "{}") if out.is_file() else {}
    out.unlink(missing_ok=True)
    return results
