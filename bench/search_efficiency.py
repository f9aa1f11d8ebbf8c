"""Search efficiency: hypervolume after N trials for emtune's samplers against random search.

Issue 7, item 4. Real fine-tunes are far too slow to repeat hundreds of times, so each sampler
searches cheap, deterministic surrogates of emtune problems through exactly the code a study
uses: the spec's ``SearchSpec`` (read from ``search_spaces/``), ``emtune.study.space.build_sampler``
(TPE multivariate with the ``n_startup_trials`` it computes from ``num_trials``) and
``emtune.study.space.suggest``, driven by Optuna ask/tell. Hypervolume is
``emtune.tracking.pareto.hypervolume_history`` under a fixed reference point per problem.

Problems (surrogates and their provenance: ``bench/search_surrogates.py``):

* ``dryrun``: the dry-run study's single dial λ = ``kl_weight`` (log-uniform 1e-3..10) mapped to
  (ood_drift, indomain_nll), measured from ``studies/dryrun`` (parametric stand-in if absent);
* ``all_defenses``: the conditional space of ``search_spaces/all_defenses.yaml`` with a synthetic
  trade-off curve per defense;
* ``zdt1``: ZDT1 on 4 continuous parameters.

Every surrogate value gets seeded Gaussian noise (σ = ``NOISE_FRACTION`` × the objective's range
on the noiseless surrogate). The noise stream depends on (problem, seed) only, so every sampler
sees the same noise draws in the same order (common random numbers).

Target (issue 7): the default sampler (TPE) reaches random search's 2N-trial hypervolume in N
trials. Run: ``.venv/bin/python bench/search_efficiency.py`` (about 4-5 minutes on 2 cores);
writes ``reports/bench/search_efficiency.md``.

Part two (issue 17, ``--part checkpoints``, :mod:`search_checkpoints`): plain TPE on final points
against TPE with every checkpoint a candidate, and with pruning: hypervolume against training steps,
on the surrogates (with training dynamics) and on real tiny-model fine-tunes, and the monitor's rank
correlation with a scripted judge. It writes its own section of the same report and keeps the rest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emtune.search_spec import SamplerSpec, SearchSpec  # noqa: E402
from emtune.study.space import build_sampler, suggest  # noqa: E402
from emtune.tracking.pareto import hypervolume, hypervolume_history, reference_from_points  # noqa: E402
from search_surrogates import ZDT1, ZDT_SPACE, DefensesSurrogate, DryRunSurrogate  # noqa: E402

DIRECTIONS = ("minimize", "minimize")
NOISE_FRACTION = 0.02  # σ as a fraction of each objective's noiseless range


# ---------------------------------------------------------------- the runs

def load_search(path: Path) -> SearchSpec:
    """The ``search`` section of a shipped spec, validated as emtune does."""
    return SearchSpec.model_validate(yaml.safe_load(path.read_text())["search"])


def make_problems() -> dict[str, dict[str, Any]]:
    """name -> space, objective, reference, noise σ, true-front hypervolume, provenance."""
    problems = {}
    dry_space = load_search(ROOT / "search_spaces" / "dryrun.yaml")
    all_space = load_search(ROOT / "search_spaces" / "all_defenses.yaml")
    zdt_space = SearchSpec.model_validate(ZDT_SPACE)
    for idx, (name, space, fn) in enumerate([
        ("dryrun", dry_space, DryRunSurrogate()),
        ("all_defenses", all_space, None),
        ("zdt1", zdt_space, ZDT1()),
    ]):
        fn = fn or DefensesSurrogate(space)
        clean = np.array([fn(p) for p in fn.grid(space)])
        reference = reference_from_points(clean, DIRECTIONS, margin=0.1)
        sigma = NOISE_FRACTION * (clean.max(axis=0) - clean.min(axis=0))
        problems[name] = {
            "id": idx, "space": space, "fn": fn, "reference": reference, "sigma": sigma,
            "true_hv": hypervolume(clean, DIRECTIONS, reference), "provenance": fn.provenance,
        }
        if name == "dryrun":
            # why the spec's own reference is not used: it is so far out that one trial fills most of it
            spec_ref = [o["reference"] for o in yaml.safe_load(
                (ROOT / "search_spaces" / "dryrun.yaml").read_text())["objectives"]]
            worst = hypervolume(clean[:1], DIRECTIONS, spec_ref) / hypervolume(clean, DIRECTIONS, spec_ref)
            problems[name]["provenance"] += (
                f". The spec's own reference {tuple(spec_ref)} is not used: under it a single trial at "
                f"the smallest λ already has {worst:.0%} of the true front's HV, which hides every difference")
    return problems


def run_once(problem: dict[str, Any], sampler_name: str, args: dict[str, Any], num_trials: int,
             run_trials: int, seed: int) -> tuple[list[float], float]:
    """HV history (normalised by the true front's HV) of one seeded search, and its seconds."""
    space = problem["space"].model_copy(update={
        "num_trials": num_trials, "sampler": SamplerSpec(name=sampler_name, args=args)})
    sampler, _ = build_sampler(space, study_seed=seed)
    study = optuna.create_study(directions=list(DIRECTIONS), sampler=sampler)
    noise = np.random.default_rng([problem["id"], seed])
    values = []
    start = time.perf_counter()
    for _ in range(run_trials):
        trial = study.ask()
        clean = problem["fn"](suggest(trial, space))
        value = [float(c + s * noise.standard_normal()) for c, s in zip(clean, problem["sigma"])]
        study.tell(trial, value)
        values.append(value)
    seconds = time.perf_counter() - start
    hist = hypervolume_history(values, DIRECTIONS, problem["reference"])
    return [h / problem["true_hv"] for h in hist], seconds


def trials_to_reach(hist: list[float], target: float) -> int | None:
    """First trial count whose hypervolume is at least ``target`` (None if never)."""
    for i, h in enumerate(hist):
        if h >= target:
            return i + 1
    return None


SAMPLERS = {  # label -> (SamplerSpec name, args); "tpe" is what emtune builds by default
    "random": ("random", {}),
    "tpe": ("tpe", {}),
    "nsga2": ("nsga2", {}),
    "nsga2 pop=8": ("nsga2", {"population_size": 8}),
    "gp": ("gp", {}),
}


# TPE settings tried against the target (HV@N only); the first is emtune's default.
TPE_VARIANTS = {
    "default (multivariate, startup N//3)": {},
    "n_startup_trials=2": {"n_startup_trials": 2},
    "n_startup_trials=2, n_ei_candidates=64": {"n_startup_trials": 2, "n_ei_candidates": 64},
    "multivariate + group": {"group": True},
    "univariate": {"multivariate": False},
}


def tpe_variants(problems: dict[str, dict[str, Any]], ns: list[int], seeds: int) -> list[dict]:
    """Mean HV@N of each TPE variant next to random search's mean HV@2N (same seeds)."""
    rows = []
    for pname, problem in problems.items():
        for n in ns:
            random_2n = np.mean([run_once(problem, "random", {}, 2 * n, 2 * n, s)[0][-1] for s in range(seeds)])
            row = {"problem": pname, "N": n, "random_2n": float(random_2n)}
            for label, sargs in TPE_VARIANTS.items():
                row[label] = float(np.mean([run_once(problem, "tpe", sargs, n, n, s)[0][-1] for s in range(seeds)]))
            rows.append(row)
    return rows


def gp_available() -> str | None:
    """None when Optuna's GPSampler runs here, else the reason."""
    try:
        import importlib

        for module in ("scipy", "torch"):  # GPSampler's dependencies
            importlib.import_module(module)
        optuna.samplers.GPSampler(seed=0)
    except Exception as exc:  # ImportError, or Optuna's own check
        return f"{type(exc).__name__}: {exc}"
    return None


def bench(ns: list[int], seeds: int, gp_seeds: int, gp_max_n: int, problems_wanted: list[str],
          variants_wanted: bool = True) -> dict:
    """Run every (problem, N, sampler, seed); return the summary rows and the raw histories."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")  # experimental-feature and fallback warnings, once per trial
    problems = {k: v for k, v in make_problems().items() if k in problems_wanted}
    gp_missing = gp_available()
    rows, timing = [], {}
    nmax = max(ns)
    for pname, problem in problems.items():
        hist: dict[tuple[str, int], list[list[float]]] = {}
        for label, (name, sargs) in SAMPLERS.items():
            if label == "gp" and gp_missing:
                continue
            n_seeds = gp_seeds if label == "gp" else seeds
            t0 = time.perf_counter()
            count = 0
            if name == "tpe":
                # n_startup_trials depends on num_trials: one study of budget N per N, run on to 4N
                for n in ns:
                    for seed in range(n_seeds):
                        h, _ = run_once(problem, name, sargs, n, 4 * n, seed)
                        hist.setdefault((label, n), []).append(h)
                        count += 4 * n
            else:
                # these samplers ignore num_trials: one run per seed serves every N (prefixes)
                top = gp_max_n if label == "gp" else nmax
                for seed in range(n_seeds):
                    h, _ = run_once(problem, name, sargs, 2 * top, 2 * top, seed)
                    for n in ns:
                        if n <= top:
                            hist.setdefault((label, n), []).append(h)
                    count += 2 * top
            timing[(pname, label)] = (time.perf_counter() - t0, count)
            print(f"  {pname:13s} {label:12s} {count:5d} trials in {timing[(pname, label)][0]:6.1f} s",
                  file=sys.stderr, flush=True)
        for n in ns:
            random_2n = float(np.mean([h[2 * n - 1] for h in hist[("random", n)]]))
            for label in SAMPLERS:
                runs = hist.get((label, n))
                if not runs:
                    continue
                at_n = np.array([h[n - 1] for h in runs])
                at_2n = np.array([h[2 * n - 1] for h in runs])
                reach = [trials_to_reach(h, random_2n) for h in runs]
                hit = [r for r in reach if r is not None]
                rows.append({
                    "problem": pname, "N": n, "sampler": label, "seeds": len(runs),
                    "hv_n": (at_n.mean(), at_n.std()), "hv_2n": (at_2n.mean(), at_2n.std()),
                    "random_2n": random_2n, "reach_mean": float(np.mean(hit)) if hit else None,
                    "reached": len(hit), "horizon": len(runs[0]),
                })
    variants = tpe_variants(problems, ns, seeds) if variants_wanted else []
    return {"rows": rows, "problems": problems, "timing": timing, "gp_missing": gp_missing,
            "variants": variants}


# ---------------------------------------------------------------- output

def machine() -> list[str]:
    """Lines describing this machine and software, with the date."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                      if l.startswith("MemTotal"))
        ram = f"{mem_kb / 2**20:.1f} GiB RAM"
    except (OSError, StopIteration):
        ram = "RAM unknown"
    return [
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu}, {os.cpu_count()} cores, {ram}, {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}, optuna {optuna.__version__}, numpy {np.__version__}",
    ]


def fmt(pair: tuple[float, float]) -> str:
    return f"{100 * pair[0]:5.1f} ± {100 * pair[1]:4.1f}"


def table(rows: list[dict]) -> list[str]:
    """Markdown table: hypervolume as % of the noiseless true front's, mean ± std over seeds."""
    out = ["| problem | N | sampler | seeds | HV@N % | HV@2N % | random HV@2N % | trials to reach it | TPE target |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = (f"{r['reach_mean']:.1f} ({r['reached']}/{r['seeds']} within {r['horizon']})"
                 if r["reach_mean"] is not None else f"never within {r['horizon']}")
        target = ""
        if r["sampler"] == "tpe":
            target = "met" if r["hv_n"][0] >= r["random_2n"] else "missed"
        out.append(f"| {r['problem']} | {r['N']} | {r['sampler']} | {r['seeds']} | {fmt(r['hv_n'])} | "
                   f"{fmt(r['hv_2n'])} | {100 * r['random_2n']:.1f} | {reach} | {target} |")
    return out


def variants_table(rows: list[dict]) -> list[str]:
    """Markdown table of :func:`tpe_variants`: HV@N % per TPE setting, random's HV@2N % first."""
    if not rows:
        return []
    labels = list(TPE_VARIANTS)
    out = ["| problem | N | random HV@2N % | " + " | ".join(f"TPE {l} HV@N %" for l in labels) + " |",
           "|---|---|---|" + "---|" * len(labels)]
    for r in rows:
        cells = [f"{100 * r[l]:.1f}{' ✓' if r[l] >= r['random_2n'] else ''}" for l in labels]
        out.append(f"| {r['problem']} | {r['N']} | {100 * r['random_2n']:.1f} | " + " | ".join(cells) + " |")
    return out


def verdict(result: dict) -> list[str]:
    """The target, cell by cell, with how many trials TPE needed (ratio to N)."""
    tpe = [r for r in result["rows"] if r["sampler"] == "tpe"]
    met = [f"{r['problem']} N={r['N']}" for r in tpe if r["hv_n"][0] >= r["random_2n"]]
    ratios = [r["reach_mean"] / r["N"] for r in tpe if r["reach_mean"] is not None]
    lines = ["## Verdict", "",
             f"Target (TPE's mean HV@N ≥ random search's mean HV@2N): met in {len(met)} of {len(tpe)} "
             f"(problem, N) cells{': ' + ', '.join(met) if met else ''}."]
    if ratios:
        lines.append(f"TPE needs on average {np.mean(ratios):.2f}·N trials (range {min(ratios):.2f}-"
                     f"{max(ratios):.2f}) to reach random search's 2N-trial HV, i.e. it saves "
                     f"{100 * (1 - np.mean(ratios) / 2):.0f}% of random search's trials, not the 50% the target asks.")
    for label, sargs in list(TPE_VARIANTS.items())[1:]:
        rows = result["variants"]
        if rows:
            hits = sum(r[label] >= r["random_2n"] for r in rows)
            lines.append(f"With TPE `{label}`: met in {hits} of {len(rows)} cells (table below).")
    lines += ["", "Why, and the next step: emtune's TPE spends its first `min(10, max(2, N // 3))` trials on "
              "random draws and then proposes from 24 expected-improvement candidates, so at N ≤ 12 only a "
              "few model-based proposals are made; and on the 1-parameter dry-run problem random search "
              "already covers the λ range evenly, leaving TPE little to concentrate on (the target asks for "
              "a 2× saving). The table below measures the alternatives on the same seeds; the spread over "
              "seeds (std in the results table) is as large as most differences, so a change of "
              "`build_sampler`'s defaults (emtune/study/space.py) should be confirmed with more seeds and on "
              "real studies before it is made."]
    return lines


def write_report(result: dict, args: argparse.Namespace, wall: float) -> Path:
    problems = result["problems"]
    lines = ["# Search efficiency: hypervolume after N trials", "",
             "Generated by `bench/search_efficiency.py` (issue 7, item 4). Surrogate objectives, real",
             "emtune search code (`build_sampler`, `suggest`, `hypervolume_history`).", ""]
    lines += machine() + [f"- wall time of the run: {wall:.0f} s", ""]
    lines += ["## Problems and surrogates", ""]
    for name, p in problems.items():
        ref = ", ".join(f"{v:.3f}" for v in p["reference"])
        sig = ", ".join(f"{v:.4f}" for v in p["sigma"])
        lines.append(f"- **{name}**: {p['provenance']}. Reference point ({ref}) = worst noiseless value "
                     f"+ 10% of the range; noise σ = ({sig}) = {NOISE_FRACTION:.0%} of each range; "
                     f"true-front HV = {p['true_hv']:.4f}.")
    lines += ["", "HV is reported as % of the noiseless true front's hypervolume (noise can push it a "
              "little above 100). \"trials to reach it\" = trials until a run's HV first reaches random "
              "search's mean 2N-trial HV (mean over the seeds that reach it within the run). TPE runs are "
              "built with `num_trials = N` (so `n_startup_trials = min(10, max(2, N // 3))`) and continue to "
              "4N trials; the other samplers ignore `num_trials`, so one run of "
              f"{2 * max(args.n)} trials per seed serves every N. "
              f"GP: {args.gp_seeds} seeds, N ≤ {args.gp_max_n} only (about 1-2 s per trial here).", ""]
    if result["gp_missing"]:
        lines += [f"GPSampler skipped: {result['gp_missing']}", ""]
    lines += ["## Results", ""] + table(result["rows"]) + [""]
    lines += ["Notes on reading the table:", "",
              "- NSGA-II as emtune builds it (`population_size` 50) samples its whole first generation "
              "with a RandomSampler of the same seed, so for every budget here it *is* random search (same "
              "rows). With `population_size=8`, a space with one parameter (dryrun; and all_defenses, whose "
              "only always-present parameter is `defense`) is still random: Optuna's default mutation "
              "probability is 1/(number of parameters) = 1, so every child value is drawn afresh.",
              "- GPSampler (default `n_startup_trials` 10) is random for its first 10 trials; on the "
              "conditional all_defenses space it models only `defense` and draws the dials independently.",
              "- \"met\" compares means; the spread over seeds is large at small N, so a difference of a "
              "few points is within noise (standard error ≈ std/√seeds).", ""]
    lines += verdict(result) + [""]
    if result["variants"]:
        lines += ["## TPE settings against the target", "",
                  "Mean HV@N over the same seeds; ✓ = reaches random search's mean HV@2N.", ""]
        lines += variants_table(result["variants"]) + [""]
    lines += ["## Time per sampler", "", "| problem | sampler | trials | seconds | ms/trial |", "|---|---|---|---|---|"]
    for (pname, label), (secs, count) in result["timing"].items():
        lines.append(f"| {pname} | {label} | {count} | {secs:.1f} | {1000 * secs / max(count, 1):.1f} |")
    out = REPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = _section(out.read_text()) if out.is_file() else ""
    out.write_text("\n".join(lines) + "\n" + (f"\n{BEGIN}\n{kept}\n{END}\n" if kept else ""))
    return out


REPORT = ROOT / "reports" / "bench" / "search_efficiency.md"
BEGIN, END = "<!-- section:checkpoints -->", "<!-- /section:checkpoints -->"


def _section(text: str) -> str:
    """The checkpoints part's section of the report text ('' when absent)."""
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip() if BEGIN in text and END in text else ""


def write_checkpoints_section(body: str) -> Path:
    """Put the checkpoints part's section into the report, keeping the samplers part."""
    text = REPORT.read_text() if REPORT.is_file() else "# Search efficiency\n"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + BEGIN + "\n" + body.strip() + "\n" + END + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + f"\n\n{BEGIN}\n{body.strip()}\n{END}\n"
    REPORT.write_text(text)
    return REPORT


def run_checkpoints(args: argparse.Namespace) -> int:
    """Part two: checkpoint candidates and pruning against plain TPE, and the monitor (issue 17)."""
    import tempfile
    import warnings

    import search_checkpoints as sc

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    problems = sc.surrogate_problems(args.problems)
    surrogate = []
    for name, problem in problems.items():
        for n in args.cp_n:
            t0 = time.perf_counter()
            surrogate.append((name, n, sc.summarise(sc.surrogate_runs(problem, n, args.cp_seeds), n, sc.STEPS)))
            print(f"  {name} N={n}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print("\n".join(sc.results_table(surrogate) + sc.verdicts(surrogate)), flush=True)
    real, real_info, overhead, monitor = [], None, None, None
    with tempfile.TemporaryDirectory(prefix="emtune-bench-") as tmp:
        cache = Path(tmp)
        if args.real_seeds:
            runs, real_info = sc.real_runs(args.real_n, args.real_seeds, cache)
            real = [("dry run, real", args.real_n, sc.summarise(runs, args.real_n, sc.REAL_STEPS))]
            print("\n".join(sc.results_table(real) + sc.verdicts(real)), flush=True)
            overhead = sc.evaluation_overhead(cache)
            print(overhead, flush=True)
        if args.monitor_weights:
            monitor = sc.monitor_trust(cache, args.monitor_weights)
            print({k: v for k, v in monitor["correlations"].items()}, flush=True)
    wall = time.perf_counter() - start
    command = (f"- command: `bench/search_efficiency.py --part checkpoints --problems {' '.join(args.problems)} "
               f"--cp-n {' '.join(map(str, args.cp_n))} --cp-seeds {args.cp_seeds} --real-seeds {args.real_seeds} "
               f"--real-n {args.real_n} --monitor-weights {' '.join(f'{w:g}' for w in args.monitor_weights)}`")
    body = sc.section(surrogate, problems, real, real_info, overhead, monitor, wall, [*machine(), command])
    if not args.no_report:
        print(f"wrote {write_checkpoints_section(body).relative_to(ROOT)}")
    print(f"wall time {wall:.0f} s")
    return 0


def run_monitor(args: argparse.Namespace) -> int:
    """Only the monitor's rank correlation with the scripted judge (issue 17): rewrites that
    subsection of the checkpoints section, keeping the rest of it."""
    import tempfile
    import warnings

    import search_checkpoints as sc

    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="emtune-bench-") as tmp:
        monitor = sc.monitor_trust(Path(tmp), args.monitor_weights)
    wall = time.perf_counter() - start
    lines = sc.monitor_lines(monitor, [*machine(), f"- command: `bench/search_efficiency.py --part monitor "
                                       f"--monitor-weights {' '.join(f'{w:g}' for w in args.monitor_weights)}`",
                                       f"- wall time of this part: {wall:.0f} s"])
    print("\n".join(lines))
    if not args.no_report:
        kept = _section(REPORT.read_text()) if REPORT.is_file() else ""
        kept = kept.split(sc.MONITOR_HEADING, 1)[0].rstrip()
        print(f"wrote {write_checkpoints_section(kept + chr(10) * 2 + chr(10).join(lines)).relative_to(ROOT)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[6, 12, 24], help="trial budgets N")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--gp-seeds", type=int, default=3, help="GP is slow: fewer seeds")
    parser.add_argument("--gp-max-n", type=int, default=12, help="GP only for N up to this")
    parser.add_argument("--problems", nargs="+", default=["dryrun", "all_defenses", "zdt1"])
    parser.add_argument("--no-variants", action="store_true", help="skip the TPE-settings table")
    parser.add_argument("--no-report", action="store_true", help="print only; do not write reports/bench")
    parser.add_argument("--part", choices=("samplers", "checkpoints", "monitor", "all"), default="all",
                        help="samplers = issue 7's comparison; checkpoints = issue 17's (candidates, pruning, "
                        "monitor); monitor = only the monitor's subsection of it")
    parser.add_argument("--cp-n", type=int, nargs="+", default=[6, 12], help="checkpoints part: trial budgets N")
    parser.add_argument("--cp-seeds", type=int, default=10, help="checkpoints part: seeds per surrogate")
    parser.add_argument("--real-seeds", type=int, default=5, help="real tiny studies: seeds (0 = skip)")
    parser.add_argument("--real-n", type=int, default=6, help="real tiny studies: trials per search")
    parser.add_argument("--monitor-weights", type=float, nargs="*", default=[0.0, 0.003, 0.03, 0.3, 3.0],
                        help="KL weights of the judged monitor study (0 = undefended; none = skip)")
    args = parser.parse_args()
    if args.part == "monitor":
        return run_monitor(args)
    if args.part in ("checkpoints", "all"):
        run_checkpoints(args)
        if args.part == "checkpoints":
            return 0
    start = time.perf_counter()
    result = bench(args.n, args.seeds, args.gp_seeds, args.gp_max_n, args.problems, not args.no_variants)
    wall = time.perf_counter() - start
    print("\n".join(table(result["rows"])))
    print("\n".join(variants_table(result["variants"])))
    for name, p in result["problems"].items():
        print(f"{name}: {p['provenance']}")
    if result["gp_missing"]:
        print(f"GPSampler skipped: {result['gp_missing']}")
    if not args.no_report:
        print(f"wrote {write_report(result, args, wall).relative_to(ROOT)}")
    print(f"wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
