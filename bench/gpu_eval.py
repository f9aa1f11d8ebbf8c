"""GPU generation throughput at real Qwen2.5 shapes: today's path vs the built-in engine, and the
wall time of a paper-scale evaluation (issue 15).

Model: a random-init Qwen2 of the 0.5B or 7B shape (``gpu_step.SHAPES``; no weights downloaded:
cost depends on shapes), bf16, rsLoRA r=32 on all seven projections with non-zero B (an adapter in
use), as ``gpu_step.build_model`` builds it. Prompts: the 24 ``general_v1`` questions and 30
in-domain questions (the bundled narrow fixture's), rendered by the offline tiny tokenizer's ChatML
template (prompt lengths of the same order as Qwen's). Random weights practically never produce
EOS, so every answer runs to its limit.

- **today's path** (``bench/generation_paths.generate_answers_before``: ``model.generate`` in chunks
  of 16, adapter unmerged, what ``reports/bench/gpu.md`` measured at 157 new tokens/s for 7B): one
  chunk of 16 answers x ``--baseline-new`` (64) new tokens after a short warm-up; its rate projects
  the paper-scale time.
- **engine at batch 16** (``generate_answers(batch_size=16)``): the same 16 answers, to separate
  what batching buys from what the merged adapter and the static cache buy.
- **engine, paper scale** (``generate_answers`` with the batch chosen from free memory; a trial's
  runner decodes its sets with equal settings together the same way): the paper's evaluation, (24 + 30) questions x 10 samples x 600 new tokens = 324,000 new tokens,
  timed end to end (merging the adapter, prefill, decode, detokenising). So that the script
  always finishes in its time box, decoding stops at ``--paper-deadline-s``; the report then says
  so and gives the rate over the part decoded (every row decodes from the start, so that is the
  full batch's rate, slightly optimistic: the late steps attend over longer caches).

Targets: engine >= 10x today's new tokens/s at the 7B shape; the paper-scale evaluation <= 3
minutes on one H100. Writes one section per shape of reports/bench/gpu_eval.md.

Usage: ``python bench/gpu_eval.py --shape qwen2.5-0.5b qwen2.5-7b`` (CUDA; exit 2 otherwise;
about 1.5 minutes on one H100/H200 for both, in one process); ``--dry-run`` runs a tiny config on
CPU to check the code (numbers mean nothing). ``bench/gpu_eval.sh`` is the one-call version for a
lent GPU image; ``bench/gpu.sh`` runs it too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import benchlib  # noqa: E402
import gpu_step  # noqa: E402
from generation_paths import Deadline, generate_answers_before, generate_answers_engine  # noqa: E402

SPEEDUP_TARGET = 10.0
PAPER_SCALE_TARGET_S = 180.0
PAPER_TOKENS = 300_000  # the "about 0.3M new tokens" per trial


def prompts_and_tokenizer() -> tuple[list[Any], Any]:
    """The paper's 54 evaluation questions (24 general + 30 in-domain) and the tiny tokenizer."""
    import json

    from emtune.data.fixtures import fixture_path
    from emtune.evaluation.questions import load_question_set
    from emtune.evaluation.samples import Prompt
    from emtune.models import build_tiny_tokenizer

    prompts = [Prompt(q.id, q.text, q.system) for q in load_question_set("general_v1")]
    with open(fixture_path("narrow_bad_advice"), encoding="utf-8") as handle:
        rows = [json.loads(line)["messages"] for line in handle][:30]
    prompts += [Prompt(f"in_domain/{i}", next(m["content"] for m in r if m["role"] == "user")) for i, r in enumerate(rows)]
    return prompts, build_tiny_tokenizer(8192)


def with_adapter_in_use(model: Any) -> Any:
    """Give the LoRA B matrices small random values (B = 0 would be the base model)."""
    import torch

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen, device=param.device, dtype=param.dtype) * 1e-3)
    return model.eval()


def timed(fn: Any, device: Any) -> tuple[Any, float]:
    gpu_step.sync(device)
    start = time.perf_counter()
    out = fn()
    gpu_step.sync(device)
    return out, time.perf_counter() - start


def paper_scale(model: Any, tokenizer: Any, prompts: list[Any], args: argparse.Namespace, device: Any,
                sampling: dict[str, Any]) -> dict[str, Any]:
    """The paper-scale evaluation through the engine, stopped at ``--paper-deadline-s``."""
    stats: dict[str, Any] = {}
    jobs = len(prompts) * args.samples
    gpu_step.sync(device)
    start = time.perf_counter()
    deadline = start + args.paper_deadline_s if args.paper_deadline_s > 0 else None
    try:
        _, tokens = generate_answers_engine(model, tokenizer, prompts, samples_per_prompt=args.samples,
                                            max_new_tokens=args.max_new, deadline=deadline, stats=stats, **sampling)
        answers, stopped = jobs, False
    except Deadline as early:
        tokens, answers, stopped = early.new_tokens, early.answers_done, True
    gpu_step.sync(device)
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "answers": answers, "jobs": jobs,
            "stopped": stopped, "rows": stats.get("rows")}


def measure(args: argparse.Namespace, shape_name: str, device: Any) -> dict[str, Any]:
    import torch

    build_start = time.perf_counter()
    shape = dict(gpu_step.SHAPES[shape_name])
    shape["vocab_size"] = max(shape["vocab_size"], 2048)  # the tiny tokenizer's ids fit every shape
    model = with_adapter_in_use(gpu_step.build_model(shape, device, torch.bfloat16))
    build_s = time.perf_counter() - build_start
    prompts, tokenizer = prompts_and_tokenizer()
    chunk = [prompts[i % len(prompts)] for i in range(16)]
    sampling = dict(temperature=1.0, top_p=1.0)
    with torch.inference_mode():
        generate_answers_before(model, tokenizer, chunk[:2], max_new_tokens=4, batch_size=2, **sampling)  # warm-up
        generate_answers_engine(model, tokenizer, chunk[:2], max_new_tokens=4, **sampling)
        (_, today_tokens), today_s = timed(lambda: generate_answers_before(
            model, tokenizer, chunk, max_new_tokens=args.baseline_new, batch_size=16, **sampling), device)
        (_, small_tokens), small_s = timed(lambda: generate_answers_engine(
            model, tokenizer, chunk, max_new_tokens=args.baseline_new, batch_size=16, **sampling), device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        paper = paper_scale(model, tokenizer, prompts, args, device, sampling)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model
    gpu_step.free(device)
    return {"build_s": build_s, "today": (today_tokens, today_s), "engine16": (small_tokens, small_s),
            "paper": paper, "peak_gib": peak, "questions": len(prompts)}


def section(args: argparse.Namespace, shape: str, device: Any, result: dict[str, Any]) -> tuple[str, list[str]]:
    paper = result["paper"]
    rate = {k: result[k][0] / result[k][1] for k in ("today", "engine16")}
    rate["paper"] = paper["tokens"] / paper["seconds"]
    ratio = rate["paper"] / rate["today"]
    projected_today = PAPER_TOKENS / rate["today"]
    projected_engine = PAPER_TOKENS / rate["paper"]
    missed = []
    if not args.dry_run and shape == "qwen2.5-7b" and ratio < SPEEDUP_TARGET:
        missed.append(f"7B engine {ratio:.1f}x today's < {SPEEDUP_TARGET:.0f}x")
    if not args.dry_run and projected_engine > PAPER_SCALE_TARGET_S:
        missed.append(f"{shape}: paper-scale evaluation {projected_engine:.0f} s > {PAPER_SCALE_TARGET_S:.0f} s")
    if paper["stopped"]:
        how = (f"paper-scale run stopped at the {args.paper_deadline_s:g} s deadline with {paper['answers']} of "
               f"{paper['jobs']} answers done (rate over the part decoded)")
    else:
        how = f"paper-scale run, {paper['answers']} answers x {args.max_new} (measured end to end)"
    rows = [
        ["today (`generate`, chunks of 16, adapter unmerged)", 16, f"{result['today'][0]:,}",
         f"{result['today'][1]:.2f}", f"{rate['today']:,.0f}", "1.0", f"{projected_today / 60:.1f} min"],
        ["engine, batch 16", 16, f"{result['engine16'][0]:,}", f"{result['engine16'][1]:.2f}",
         f"{rate['engine16']:,.0f}", f"{rate['engine16'] / rate['today']:.1f}", f"{PAPER_TOKENS / rate['engine16'] / 60:.1f} min"],
        [f"engine, {paper['rows']} rows (batch from free memory), {how}", paper["answers"],
         f"{paper['tokens']:,}", f"{paper['seconds']:.2f}", f"{rate['paper']:,.0f}", f"{ratio:.1f}",
         f"{projected_engine / 60:.2f} min"],
    ]
    lines = [f"## {shape}: bf16, rsLoRA r=32 (adapter in use), temperature 1", ""]
    if args.dry_run:
        lines += ["**DRY RUN on CPU with a tiny config: checks that the code runs end to end; the numbers mean "
                  "nothing.**", ""]
    lines += gpu_step.environment(device)
    lines += [f"- model built in {result['build_s']:.1f} s; {result['questions']} questions (24 general_v1 + 30 "
              f"in-domain); peak GPU memory of the paper-scale run: "
              + ("n/a" if result["peak_gib"] is None else f"{result['peak_gib']:.1f} GiB"), "",
              benchlib.markdown_table(["path", "answers", "new tokens", "seconds", "new tokens / s", "x today",
                                       f"{PAPER_TOKENS:,} new tokens (paper scale)"], rows), ""]
    if not args.dry_run:
        verdicts = [f"engine {ratio:.1f}x today's new tokens/s" + (f" (target >= {SPEEDUP_TARGET:.0f}x at 7B: "
                    f"{'met' if ratio >= SPEEDUP_TARGET else 'MISSED'})" if shape == "qwen2.5-7b" else ""),
                    f"paper-scale evaluation {projected_engine:.0f} s (target <= {PAPER_SCALE_TARGET_S:.0f} s: "
                    f"{'met' if projected_engine <= PAPER_SCALE_TARGET_S else 'MISSED'})"]
        lines += ["Targets: " + "; ".join(verdicts) + ".", ""]
    return "\n".join(lines), missed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GPU generation throughput: today's path vs the built-in engine")
    p.add_argument("--shape", nargs="+", choices=sorted(gpu_step.SHAPES), default=["qwen2.5-7b"],
                   help="one or more shapes, measured one after the other in this process")
    p.add_argument("--samples", type=int, default=10, help="samples per question (the paper's authors' 10)")
    p.add_argument("--max-new", type=int, default=600, help="new tokens per answer (the protocol's 600)")
    p.add_argument("--baseline-new", type=int, default=64, help="new tokens per answer of the batch-16 runs")
    p.add_argument("--paper-deadline-s", type=float, default=60.0,
                   help="stop the paper-scale run after this many seconds (0 = never)")
    p.add_argument("--report", default=None, help="markdown file ('' = stdout only); default reports/bench/gpu_eval.md")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny config, small workload: checks the code runs")
    args = p.parse_args(argv)
    if args.dry_run:
        args.shape, args.samples, args.max_new, args.baseline_new = ["tiny"], 2, 8, 8
    if args.report is None:
        args.report = "" if args.dry_run else "reports/bench/gpu_eval.md"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = gpu_step.select_device(args.dry_run, "gpu_eval.py")
    if device is None:
        return 2
    missed: list[str] = []
    for shape in args.shape:
        print(f"{shape}: measuring", file=sys.stderr, flush=True)
        result = measure(args, shape, device)
        text, shape_missed = section(args, shape, device, result)
        missed += shape_missed
        print(text, flush=True)
        if args.report:  # each shape's section is written as soon as it is measured
            intro = ("Written by `bench/gpu_eval.py` (run by `bench/gpu_eval.sh` and `bench/gpu.sh`); the method is "
                     "in its docstring. Targets (issue 15): the built-in engine >= 10x today's new tokens/s at the 7B "
                     "shape on one GPU, and a paper-scale evaluation (about 0.3M new tokens) <= 3 minutes on one H100.")
            path = benchlib.update_report(ROOT / args.report, "GPU: evaluation generation", intro, shape, text,
                                          order=["qwen2.5-0.5b", "qwen2.5-7b"])
            print(f"wrote {path}", file=sys.stderr)
    print(f"{len(missed)} target(s) missed" + (": " + "; ".join(missed) if missed else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
