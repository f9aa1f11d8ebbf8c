"""Trial overhead: the fixed cost of a trial on a warm local Ray vs the work it does.

Measured side by side in one run, for Ray Train's default controller settings and for the
settings emtune uses on a local Ray (``emtune.study.runner.LOCAL_TRAIN_ENV``):

- ``empty fit``: ``TorchTrainer.fit`` of a worker that only reports an empty checkpoint;
- ``trial fit``: ``TorchTrainer.fit`` of the dry-run worker loop (tiny model, 24 steps, evaluation);
- ``work``: the time the worker itself reports (setup + train + eval), so
  ``overhead = trial fit - work`` is what a trial spends starting and stopping.

Each setting gets its own Ray (the settings are read when Ray starts); fits run one at a time
after a warm-up, median of ``--reps``. ``--dryrun`` also times the whole dry-run study (slow).
Writes reports/bench/trial_overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
            "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "1"}


def _empty_loop(config: dict) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "done").write_text("1")
        ray.train.report({"ok": 1}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def measure(setting: str, reps: int) -> dict:
    """Run in a fresh process per setting: fits timed on one warm local Ray."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from emtune.config import load_spec
    from emtune.models import resolve_source
    from emtune.models import model_cache_dir
    from emtune.study.runner import LOCAL_TRAIN_ENV, init_ray
    from emtune.study.trial import trainer_for

    os.environ.update(DEFAULTS if setting == "ray defaults" else LOCAL_TRAIN_ENV)
    started = time.perf_counter()
    init_ray(num_cpus=2)
    ray_init = time.perf_counter() - started
    storage = tempfile.mkdtemp(prefix="emtune-bench-")
    spec = load_spec(ROOT / "search_spaces" / "dryrun.yaml").model_copy(update={"output_dir": storage})
    spec = spec.with_overrides({"kl_weight": 0.1})
    source = resolve_source(spec.model, model_cache_dir())

    def empty_fit(i: int) -> float:
        t = time.perf_counter()
        TorchTrainer(_empty_loop, scaling_config=ray.train.ScalingConfig(num_workers=1),
                     run_config=ray.train.RunConfig(name=f"empty-{i}", storage_path=storage)).fit()
        return time.perf_counter() - t

    def trial_fit(i: int) -> tuple[float, float]:
        t = time.perf_counter()
        result = trainer_for(spec, f"bench-{i}", {"model_source": source, "cache_dir": storage}).fit()
        m = result.metrics
        return time.perf_counter() - t, m["time/setup_s"] + m["time/train_s"] + m["time/eval_s"]

    empty_fit(-1)  # warm-up: worker pool, imports cached on disk
    empties, fits, works = [], [], []
    for i in range(reps):  # alternate the two kinds so drift affects both alike
        empties.append(empty_fit(i))
        fit, work = trial_fit(i)
        fits.append(fit)
        works.append(work)
    ray.shutdown()
    return {"setting": setting, "ray_init_s": ray_init, "empty_fit_s": statistics.median(empties),
            "trial_fit_s": statistics.median(fits), "work_s": statistics.median(works),
            "overhead_s": statistics.median(f - w for f, w in zip(fits, works))}


def dryrun_wall() -> float:
    """Wall time of the whole dry-run study in a fresh process (its own folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = (ROOT / "search_spaces" / "dryrun.yaml").read_text().replace("name: dryrun", f"name: dryrun\noutput_dir: {tmp}")
        path = Path(tmp) / "dryrun.yaml"
        path.write_text(spec)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "emtune.cli.main", "run", str(path)], check=True,
                       capture_output=True)
        return time.perf_counter() - t


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) // 1024**2 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return (f"{cpu}, {os.cpu_count()} cores, {mem} GiB RAM, Python {platform.python_version()}, "
            f"load average at start {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dryrun", action="store_true", help="also time the whole dry-run study")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.reps)))
        return
    header = machine()
    rows = []
    for setting in ("ray defaults", "emtune local"):
        out = subprocess.run([sys.executable, __file__, "--child", setting, "--reps", str(args.reps)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    lines = [
        "| setting | empty fit (s) | trial fit (s) | worker work (s) | overhead per trial (s) | overhead vs defaults |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['empty_fit_s']:.1f} | {r['trial_fit_s']:.1f} | {r['work_s']:.1f} | "
                     f"{r['overhead_s']:.1f} | {r['overhead_s'] / base['overhead_s']:.2f}x |")
    tuned = rows[1]
    verdict = "PASS" if tuned["overhead_s"] <= 10 else "MISS"
    lines.append("")
    lines.append(f"Target: fixed cost per trial <= 10 s here: {verdict} ({tuned['overhead_s']:.1f} s with emtune's "
                 f"local settings; work is {tuned['work_s'] / tuned['trial_fit_s']:.0%} of a trial fit).")
    if args.dryrun:
        wall = dryrun_wall()
        lines.append(f"Dry-run study wall time (6 trials, 2 at a time, fresh process incl. `ray.init`): {wall:.0f} s "
                     f"(target <= 180 s: {'PASS' if wall <= 180 else 'MISS'}).")
    table = "\n".join(lines)
    print(header)
    print(table)
    out = ROOT / "reports" / "bench" / "trial_overhead.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Trial overhead\n\n{time.strftime('%Y-%m-%d')}; {header}\n\n"
                   f"Median of {args.reps} fits per kind, alternated, after a warm-up (bench/trial_overhead.py).\n\n"
                   f"{table}\n")


if __name__ == "__main__":
    main()
