"""What a failure says: its root cause (exception type, message, where it was raised) in one
line, then the last frames of its traceback, wherever Ray wrapped it.

Ray hides a failure's cause in different places, and a reason built from ``str(exc)`` of the
outer exception says nothing (``WorkerGroupError: Training failed due to worker errors:``):

- a Train worker raised: ``ray.train.WorkerGroupError`` holds ``worker_failures`` (rank ->
  the worker's exception, type and message) and the tracebacks only as text in its message
  (``[Rank 0 Error Snippet]:`` then the traceback);
- a Train worker died: ``ray.train.ControllerError`` around an ``ActorDiedError``, or a
  ``WorkerGroupError`` whose failure is a ``WorkerHealthCheckFailedError`` around one; the useful
  part is Ray's "Worker exit detail";
- a Ray task or actor raised (study stages, the trial function): ``RayTaskError(X)`` with the
  original exception as ``cause`` and the remote traceback as text in its message;
- plain Python: the ``__cause__`` chain and ``__traceback__``.

No Ray import here: :func:`root_cause` reads attributes, so it runs where Ray is not installed.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

#: Frames kept from the end of a traceback (where it was raised, and its two callers).
MAX_FRAMES = 3
#: One summary line at most this long.
MAX_LINE = 500
OOM_HINT = " (out of memory: lower training.per_device_batch_size or data.max_length, or use more GPUs)"
#: Ray actor classes as a user knows them (Tune runs a trial's function in an ``ImplicitFunc``).
ACTOR_NAMES = {"ImplicitFunc": "the trial's process", "RayTrainWorker": "Train worker",
               "TrainController": "Ray Train's controller"}
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>\S+)\s*$')
_SNIPPET = re.compile(r"^\[Rank (?P<ranks>[\d,]+) Error Snippet\]:$", re.MULTILINE)
_EXIT_DETAIL = re.compile(r"Worker exit detail: (?P<detail>.*?)(?: Some common causes include|$)", re.DOTALL)


@dataclass(frozen=True)
class RootCause:
    """The exception that started a failure, as text: type, message, where, last frames."""

    kind: str
    message: str
    where: str = ""
    frames: tuple[str, ...] = field(default=())

    def line(self) -> str:
        """``Type: message (where)``, one line, with a hint for out-of-memory errors."""
        message = " ".join(self.message.split())
        text = f"{self.kind}: {message}" if message else self.kind
        text = text[:MAX_LINE] + (f" ({self.where})" if self.where else "")
        if "OutOfMemory" in text or "out of memory" in text.lower():
            text += OOM_HINT
        return text

    def report(self) -> str:
        """The line, then the last frames, one indented line each (the Optuna and MLflow reason)."""
        return "\n".join([self.line(), *(f"  {frame}" for frame in self.frames)])


def _frames_from_text(text: str) -> tuple[str, ...]:
    """The last frames of a traceback printed as text: ``file:line in name: code``."""
    lines = text.splitlines()
    frames = []
    for i, line in enumerate(lines):
        match = _FRAME.match(line)
        if not match:
            continue
        code = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME.match(lines[i + 1]) else ""
        frames.append(f"{match['file']}:{match['line']} in {match['name']}" + (f": {code}" if code else ""))
    return tuple(frames[-MAX_FRAMES:])


def _frames_from_traceback(exc: BaseException) -> tuple[str, ...]:
    summary = traceback.extract_tb(exc.__traceback__)[-MAX_FRAMES:]
    return tuple(f"{f.filename}:{f.lineno} in {f.name}" + (f": {f.line.strip()}" if f.line else "") for f in summary)


def _rank_snippets(message: str) -> dict[int, str]:
    """``WorkerGroupError`` message -> rank -> the traceback text Ray printed for it."""
    parts = list(_SNIPPET.finditer(message))
    out: dict[int, str] = {}
    for i, match in enumerate(parts):
        end = parts[i + 1].start() if i + 1 < len(parts) else len(message)
        for rank in match["ranks"].split(","):
            out[int(rank)] = message[match.end():end]
    return out


def _died(exc: BaseException, who: str) -> RootCause:
    """A dead Ray worker process: Ray's exit detail (signal, OOM killer, crash), no frames."""
    return _death(type(exc).__name__, str(exc), who)


def _death(kind: str, text: str, who: str) -> RootCause:
    detail = _EXIT_DETAIL.search(text)
    pid = re.search(r"\bpid: (\d+)", text)
    said = " ".join(detail["detail"].split()) if detail else text.strip().splitlines()[0] if text.strip() else ""
    where = who + (f", pid {pid.group(1)}" if pid else "")
    return RootCause(kind, f"the process died: {said}", where)


def root_cause(exc: BaseException) -> RootCause:
    """The root cause of ``exc``, looking through Ray's wrappers (see the module docs)."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        failed = f"Train worker rank {rank}" + (f", {len(failures)} workers failed" if len(failures) > 1 else "")
        inner = failures[rank]
        if getattr(inner, "health_check_failure", None) is not None:
            return _died(inner.health_check_failure, failed)
        cause = root_cause(inner)
        frames = cause.frames or _frames_from_text(_rank_snippets(str(exc)).get(rank, ""))
        return RootCause(cause.kind, cause.message, failed, frames)
    controller = getattr(exc, "controller_failure", None)
    if controller is not None:
        return root_cause(controller)
    if getattr(exc, "health_check_failure", None) is not None:
        return _died(exc.health_check_failure, "Train worker")
    if type(exc).__name__ in ("ActorDiedError", "RayActorError", "ActorUnavailableError"):
        actor = re.search(r"class_name: (\w+)", str(exc))
        name = actor.group(1) if actor else "Ray actor"
        return _died(exc, ACTOR_NAMES.get(name, name))
    task_cause = getattr(exc, "cause", None)
    if isinstance(task_cause, BaseException) and hasattr(exc, "as_instanceof_cause"):  # RayTaskError
        cause = root_cause(task_cause)
        return RootCause(cause.kind, cause.message, cause.where, cause.frames or _frames_from_text(str(exc)))
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    return RootCause(type(root).__name__, str(root), "", _frames_from_traceback(root))


def failure_reason(exc: BaseException) -> str:
    """One line naming the root cause (type, message, which worker; a hint on out-of-memory)."""
    return root_cause(exc).line()


def failure_report(exc: BaseException) -> str:
    """The root cause's line and the last frames of its traceback (what a FAIL records)."""
    return root_cause(exc).report()


def tune_trial_error(folders: Iterable[Path]) -> str | None:
    """The report of the error Ray Tune recorded for a trial whose function raised or whose
    process died, from the first of the trial's ``folders`` that holds it (``error.pkl``;
    ``error.txt`` when it did not pickle)."""
    import pickle

    for folder in folders:
        pickled, text = folder / "error.pkl", folder / "error.txt"
        if pickled.is_file():
            try:
                with open(pickled, "rb") as handle:
                    return failure_report(pickle.load(handle))
            except Exception:  # noqa: BLE001 - an error class this process cannot load: use the text
                pass
        if text.is_file():
            return _recorded_text(text.read_text(errors="replace"))
    return None


def _recorded_text(recorded: str) -> str:
    """The report of an error Tune recorded as text only: a dead actor's exit detail, or the last
    ``...Error`` line and the traceback's last frames."""
    if "Worker exit detail:" in recorded:
        actor = re.search(r"class_name: (\w+)", recorded)
        name = actor.group(1) if actor else "Ray actor"
        return _death("ActorDiedError", recorded, ACTOR_NAMES.get(name, name)).line()
    lines = [ln for ln in recorded.splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", ln)), None)
    frames = _frames_from_text("\n".join(lines))
    return "\n".join([last or (lines[-1] if lines else "the trial raised an error"), *(f"  {f}" for f in frames)])
