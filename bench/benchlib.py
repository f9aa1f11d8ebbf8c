"""Shared helpers of the bench/ scripts: the machine description, tables, report sections, RSS.

Bench scripts import this as ``benchlib`` (Python puts the script's folder first on ``sys.path``).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

REPORTS = Path(__file__).resolve().parent.parent / "reports" / "bench"
#: A 1-minute load average above this (on any core count) makes timings suspect; said in reports.
LOAD_WARNING = 1.5


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def machine_description(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """CPU model, cores, RAM, library versions, torch threads, date and the load average now."""
    import torch
    import transformers

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": _cpu_model(),
        "cores": f"{os.cpu_count()} logical ({usable} usable)",
        "ram": f"{_ram_gib():.1f} GiB",
        "python": platform.python_version(),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} intra-op threads)",
        "transformers": transformers.__version__,
        "load average at start (1, 5, 15 min)": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    info.update(extra or {})
    return info


def load_note(load_at_start: tuple[float, float, float]) -> str:
    """A warning sentence when the machine was busy at the start, else an empty string."""
    if load_at_start[0] <= LOAD_WARNING:
        return ""
    return (f"**Note:** the 1-minute load average was {load_at_start[0]:.2f} at the start (> {LOAD_WARNING} on "
            f"{os.cpu_count()} cores): other jobs shared the CPUs, so absolute times are inflated and noisy. "
            f"The ratios come from interleaved runs (A B A B …, medians), which spreads that load over every "
            f"configuration alike, but small differences (a few %) are within the noise.")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_block(info: dict[str, Any]) -> str:
    """The machine description as a markdown bullet list."""
    return "\n".join(f"- {k}: {v}" for k, v in info.items())


def conditions_lines(load_at_start: tuple[float, float, float], info: dict[str, Any]) -> list[str]:
    """Report lines on how busy the machine was and what it is (with the load average at the end)."""
    at_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [load_note(load_at_start), "", "Machine:", "", machine_block({**info, "load average at end": at_end})]


def update_report(path: Path, title: str, intro: str, key: str, section: str,
                  order: Sequence[str] = ()) -> Path:
    """Write ``section`` into ``path`` between markers for ``key``, keeping other keys' sections.

    Lets a script run one size at a time without erasing the results of the other size. Sections
    come in ``order`` first, then the others by name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    begin, end = f"<!-- section:{key} -->", f"<!-- /section:{key} -->"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    sections = dict(re.findall(r"<!-- section:(\S+) -->\n(.*?)\n<!-- /section:\1 -->", old, flags=re.S))
    sections[key] = section.strip()
    body = [f"# {title}", "", intro.strip(), ""]
    for name in sorted(sections, key=lambda n: (list(order).index(n) if n in order else len(order), n)):
        body += [f"<!-- section:{name} -->", sections[name], f"<!-- /section:{name} -->", ""]
    path.write_text("\n".join(body), encoding="utf-8")
    return path


def median(values: Sequence[float]) -> float:
    """Median (NaN for no values)."""
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """Inter-quartile range as ``q1–q3`` relative to the median, e.g. ``±4%``."""
    if len(values) < 4:
        return "–"
    q = statistics.quantiles(values, n=4)
    mid = statistics.median(values)
    return f"±{100 * (q[2] - q[0]) / 2 / mid:.0f}%" if mid else "–"


def verdict(value: float, limit: float) -> str:
    """PASS when ``value <= limit``, MISS otherwise (NaN: n/a)."""
    if value != value:  # NaN
        return "n/a"
    return "PASS" if value <= limit else "MISS"


# --- resident memory (Linux) ----------------------------------------------------------------


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """The kernel's peak-RSS mark (VmHWM) of this process; reset by :func:`reset_peak_rss`."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mib(n_bytes: float) -> str:
    """Bytes as MiB with one decimal."""
    return f"{n_bytes / 2**20:.1f}"
