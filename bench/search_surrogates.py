"""Surrogate objectives for bench/search_efficiency.py: cheap, deterministic stand-ins for studies.

* :class:`DryRunSurrogate`: the dry-run study's λ = ``kl_weight`` -> (ood_drift, indomain_nll),
  measured from the study's own trials (``emtune pareto studies/dryrun --all --format json``): sorted
  by log λ, made monotone by pool-adjacent-violators (drift non-increasing, NLL non-decreasing),
  interpolated linearly in log λ and clamped outside the measured range. Without a study, a
  documented parametric form (``PARAMETRIC``) stands in and its provenance says so.
* :class:`DefensesSurrogate`: the conditional space of ``search_spaces/all_defenses.yaml`` with a
  synthetic trade-off curve per defense (:func:`defense_curves`).
* :class:`ZDT1`: the classic 2-objective test function on 4 parameters.

Each is a callable ``params -> (drift-like, nll-like)`` (both minimised, noiseless; the benchmark
adds the noise) with a ``grid(space)`` of configurations covering the space, used for the
objective ranges, the reference point and the true front's hypervolume.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from emtune.search_spec import SearchSpec

ROOT = Path(__file__).resolve().parents[1]
# Used only when no dry-run study exists: drift = a/(1+b·λ), nll = c + d·log1p(e·λ).
PARAMETRIC = {"a": 1.12, "b": 1.5, "c": 3.9, "d": 0.5, "e": 0.3}


# ---------------------------------------------------------------- the dry-run surrogate

def isotonic(y: np.ndarray, increasing: bool) -> np.ndarray:
    """Least-squares monotone fit of ``y`` (pool adjacent violators, equal weights)."""
    sign = 1.0 if increasing else -1.0
    blocks: list[list[float]] = []  # [mean, count]
    for v in sign * np.asarray(y, dtype=float):
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return sign * np.concatenate([[m] * int(c) for m, c in blocks])


def dryrun_study_rows() -> tuple[list[dict[str, Any]], str]:
    """Every completed candidate of the dry-run study (``emtune pareto --all --format json`` rows:
    the trials' own points and, with ``evaluation.at``, their checkpoints), and where they came from."""
    study = ROOT / "studies" / "dryrun"
    if not study.is_dir():
        return [], "no studies/dryrun"
    exe = Path(sys.executable).with_name("emtune")
    cmd = [str(exe), "pareto", str(study), "--all", "--format", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if done.returncode != 0:
        return [], f"`emtune pareto` failed: {done.stderr.strip()[-200:]}"
    rows = [t for t in json.loads(done.stdout)["trials"]
            if t["state"] == "COMPLETE" and t.get("values") and "kl_weight" in t["params"]]
    return rows, "studies/dryrun via `emtune pareto studies/dryrun --all --format json`"


def dryrun_study_points() -> tuple[list[tuple[float, float, float]], str]:
    """(λ, drift, nll) of every completed dry-run trial's own (final) point, and their source."""
    rows, source = dryrun_study_rows()
    finals = [r for r in rows if r.get("trial", r["number"]) == r["number"]]
    return [(float(r["params"]["kl_weight"]), float(r["values"]["ood_drift"]), float(r["values"]["indomain_nll"]))
            for r in finals], source


def monotone_fit(points: list[tuple[float, float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(log λ knots, drift, nll, NLL residual RMS): drift made non-increasing and NLL non-decreasing
    in λ by pool-adjacent-violators, trials at (nearly) the same λ merged (np.interp needs
    increasing abscissae)."""
    points = sorted(points)
    x = np.log([p[0] for p in points])
    drift = isotonic(np.array([p[1] for p in points]), increasing=False)
    nll = isotonic(np.array([p[2] for p in points]), increasing=True)
    keep = np.concatenate([[True], np.diff(x) > 1e-3])
    groups = np.cumsum(keep) - 1
    merged = [np.array([v[groups == g].mean() for g in range(groups.max() + 1)]) for v in (x, drift, nll)]
    rms = float(np.sqrt(np.mean((np.array([p[2] for p in points]) - nll) ** 2)))
    return merged[0], merged[1], merged[2], rms


class DryRunSurrogate:
    """kl_weight -> (ood_drift, indomain_nll): monotone interpolation of measured trials."""

    def __init__(self, points: list[tuple[float, float, float]] | None = None, source: str = "") -> None:
        if points is None:
            points, source = dryrun_study_points()
        self.points = sorted(points)
        if len(self.points) >= 2:
            self.x, self.drift, self.nll, self.nll_residual_rms = monotone_fit(self.points)
            self.provenance = (
                f"measured: {len(self.points)} completed trials from {source}; monotone (PAV) fit, "
                f"linear in log λ between {self.points[0][0]:.3g} and {self.points[-1][0]:.3g}, "
                f"clamped outside; NLL departs from its monotone fit by RMS {self.nll_residual_rms:.3f}"
            )
        else:
            self.x = None
            self.provenance = (
                f"PARAMETRIC (no measured points: {source}): drift = a/(1+b·λ), "
                f"nll = c + d·log1p(e·λ) with {PARAMETRIC}"
            )

    def __call__(self, params: dict[str, Any]) -> tuple[float, float]:
        lam = float(params["kl_weight"])
        if self.x is None:
            p = PARAMETRIC
            return p["a"] / (1 + p["b"] * lam), p["c"] + p["d"] * np.log1p(p["e"] * lam)
        x = np.log(lam)
        return float(np.interp(x, self.x, self.drift)), float(np.interp(x, self.x, self.nll))

    def grid(self, space: SearchSpec) -> list[dict[str, Any]]:
        """Dense configurations covering the space (for ranges, reference and the true front)."""
        p = space.parameters["kl_weight"]
        return [{"kl_weight": v} for v in np.geomspace(p.low, p.high, 4001)]


# ---------------------------------------------------------------- the all_defenses-like surrogate

D0, L0 = 1.12, 3.90  # undefended drift and NLL, as in the dry run at small λ


def _unit(value: float, low: float, high: float, log: bool) -> float:
    if log:
        return (np.log(value) - np.log(low)) / (np.log(high) - np.log(low))
    return (value - low) / (high - low)


def defense_curves(defense: str, t: float | str | None) -> tuple[float, float]:
    """Synthetic (drift, nll) of one defense at normalised strength ``t`` in [0, 1].

    Shaped after the paper's table (docs/method.md, "The paper's numbers"): KL removes drift but costs narrow learning at high
    λ; LDIFS barely helps; SafeLoRA and random interleaving help moderately; persona steering is
    strong only in a narrow band of α (a needle for the sampler to find); perplexity-selected
    interleaving is the best compromise; inoculation depends on its prompt.
    """
    if defense == "none":
        return D0, L0
    if defense == "inoculation":
        return {"evil_general": (0.75 * D0, L0 + 0.02), "harmful_intent": (0.9 * D0, L0),
                "misaligned_ai": (0.6 * D0, L0 + 0.10)}[t]
    t = float(t)
    if defense == "kl_to_reference":
        return D0 * (1 - 0.95 * t), L0 + 1.2 * t ** 2.5
    if defense == "feature_l2":
        return D0 * (1 - 0.25 * t), L0 + 0.3 * t ** 2
    if defense == "safelora":
        return D0 * (1 - 0.5 * t), L0 + 0.6 * t
    if defense == "persona_steering":
        return D0 * (1 - 0.85 * np.exp(-(((t - 0.4) / 0.15) ** 2))), L0 + 0.05 + 0.5 * t ** 2
    if defense == "interleaving":
        return D0 * (1 - 0.6 * t), L0 + 0.25 * t
    if defense == "interleaving_selected":
        return D0 * (1 - 0.8 * t ** 0.8), L0 + 0.12 * t + 0.2 * t ** 4
    raise ValueError(f"unknown defense {defense!r}")


class DefensesSurrogate:
    """all_defenses.yaml's conditional space -> synthetic (drift, nll) via :func:`defense_curves`."""

    provenance = ("synthetic: search space of search_spaces/all_defenses.yaml (8-way defense choice, "
                  "then that defense's dial), per-defense curves in bench/search_efficiency.py:defense_curves")

    def __init__(self, space: SearchSpec):
        self.space = space
        # the dial parameter of each defense (the one conditioned on it)
        self.dial = {p.when["defense"]: name for name, p in space.parameters.items() if p.when}

    def __call__(self, params: dict[str, Any]) -> tuple[float, float]:
        defense = params["defense"]
        name = self.dial.get(defense)
        if name is None:
            return defense_curves(defense, None)
        p = self.space.parameters[name]
        value = params[name]
        t = value if p.type == "categorical" else _unit(value, p.low, p.high, p.log)
        return defense_curves(defense, t)

    def grid(self, space: SearchSpec) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for defense in space.parameters["defense"].choices:
            name = self.dial.get(defense)
            if name is None:
                out.append({"defense": defense})
                continue
            p = space.parameters[name]
            values = (p.choices if p.type == "categorical" else
                      (np.geomspace if p.log else np.linspace)(p.low, p.high, 2001))
            out += [{"defense": defense, name: v} for v in values]
        return out


# ---------------------------------------------------------------- ZDT1

ZDT_SPACE = {"parameters": {f"x{i}": {"type": "float", "low": 0.0, "high": 1.0} for i in range(4)}}


class ZDT1:
    """ZDT1 on 4 parameters: f1 = x0, f2 = g·(1 − sqrt(x0/g)), g = 1 + 9·mean(x1..x3)."""

    provenance = "synthetic: ZDT1 (Zitzler, Deb, Thiele 2000) on 4 parameters in [0, 1]"

    def __call__(self, params: dict[str, Any]) -> tuple[float, float]:
        x = [params[f"x{i}"] for i in range(4)]
        g = 1 + 9 * float(np.mean(x[1:]))
        return x[0], g * (1 - np.sqrt(x[0] / g))

    def grid(self, space: SearchSpec) -> list[dict[str, Any]]:
        # the true front is x1..x3 = 0; the corners bound the range
        out = [{"x0": v, "x1": 0.0, "x2": 0.0, "x3": 0.0} for v in np.linspace(0, 1, 2001)]
        return out + [{"x0": a, "x1": 1.0, "x2": 1.0, "x3": 1.0} for a in (0.0, 1.0)]
