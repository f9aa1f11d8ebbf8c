"""Generation parts of ``bench/eval_throughput.py``: today's path vs the built-in engine on CPU, and
the generation server's per-trial setup on loopback. See that script's docstring for the method."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
from generation_paths import generate_answers_before, generate_answers_engine

CPU_TARGET = 3.0  # engine ÷ today's new tokens/s on CPU (issue 15)
SETUP_TARGET_S = 2.0  # adapter load + first token on the loopback server (issue 15)
SMALL_SHAPE = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 2, "intermediate_size": 1536}


def _with_adapter(base: Any, lora: Any, seed: int) -> Any:
    """``base`` wrapped in a fresh LoRA whose B matrices are seeded noise (a trained-looking adapter)."""
    import torch

    from emtune.models import apply_lora

    model = apply_lora(base, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.eval()


def cpu_models(sizes: list[str]) -> dict[str, tuple[Any, Any, str]]:
    """name -> (LoRA model, tokenizer, description): the dry-run tiny model as a study loads it
    (LoRA r=8 as in search_spaces/dryrun.yaml), and a ~30M random-init Qwen2 shape (rsLoRA r=32)."""
    from emtune.models import (LoraSpec, ModelSpec, TinyModelSpec, build_tiny_model, build_tiny_tokenizer,
                               load_model, load_tokenizer, model_cache_dir, resolve_source)

    out = {}
    if "tiny" in sizes:
        spec = ModelSpec()
        source = resolve_source(spec, model_cache_dir())
        model = _with_adapter(load_model(source, spec), LoraSpec(r=8, alpha=16), 0)
        out["tiny"] = (model, load_tokenizer(source, spec), "dry-run tiny model (pretrained 150 steps), LoRA r=8")
    if "small" in sizes:
        tokenizer = build_tiny_tokenizer(8192)
        base = build_tiny_model(TinyModelSpec(**SMALL_SHAPE), len(tokenizer))
        params = sum(p.numel() for p in base.parameters())
        out["small"] = (_with_adapter(base, LoraSpec(), 1), tokenizer,
                        f"random-init Qwen2 shape {SMALL_SHAPE}, {params / 1e6:.0f}M parameters, rsLoRA r=32")
    return out


def bench_cpu_generation(args: argparse.Namespace) -> dict[str, Any]:
    """Today's path (batch 16) and the engine (batch from free memory), alternated, per size."""
    from emtune.evaluation.questions import load_question_set
    from emtune.evaluation.samples import Prompt

    prompts = [Prompt(q.id, q.text, q.system) for q in load_question_set("general_v1")]
    settings = dict(samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens, temperature=1.0)
    results: dict[str, Any] = {}
    for name, (model, tokenizer, description) in cpu_models(args.sizes).items():
        runs: dict[str, dict[str, list[float]]] = {"today": {"wall": [], "tokens": []}, "engine": {"wall": [], "tokens": []}}
        for rep in range(args.gen_reps):
            for path in ("today", "engine"):
                start = time.perf_counter()
                if path == "today":
                    samples, tokens = generate_answers_before(model, tokenizer, prompts, batch_size=16, seed=rep, **settings)
                else:
                    samples, tokens = generate_answers_engine(model, tokenizer, prompts, seed=rep, **settings)
                runs[path]["wall"].append(time.perf_counter() - start)
                runs[path]["tokens"].append(tokens)
                if path == "engine":
                    last = samples
                print(f"  {name} rep {rep + 1} {path}: {tokens} tokens in {runs[path]['wall'][-1]:.1f} s", flush=True)
        results[name] = {"description": description, "jobs": len(samples), "runs": runs, "samples": last}
    return results


def bench_server(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Per-trial setup on the loopback server (adapter load + first token) and one trial's general
    set through it, for ``args.server_trials`` trials with their own adapters, one after another."""
    import json
    import urllib.request

    from emtune.config import load_spec
    from emtune.evaluation.lora_server import LoraServer
    from emtune.evaluation.runner import generation_plan
    from emtune.evaluation.server_backend import generate_missing_sets
    from emtune.models import LoraSpec, ModelSpec, load_model, load_tokenizer, model_cache_dir, resolve_source
    from emtune.trial_files import TrialFiles

    source = resolve_source(ModelSpec(), model_cache_dir())
    started = time.perf_counter()
    server = LoraServer(source).start()  # loads the base model
    server_start_s = time.perf_counter() - started
    spec_path = folder / "spec.yaml"
    spec_path.write_text(SERVER_SPEC.format(url=server.url, out=folder / "studies", samples=args.samples,
                                            max_new=args.max_new_tokens))
    spec = load_spec(spec_path)
    tokenizer = load_tokenizer(source, spec.model)

    def post(path: str, body: dict) -> None:
        request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()

    trials = []
    try:
        for i in range(args.server_trials):
            model = _with_adapter(load_model(source, spec.model), LoraSpec(r=8, alpha=16), 100 + i)
            files = TrialFiles(folder / f"trial{i}")
            model.save_pretrained(files.adapter)
            plan = generation_plan(model, tokenizer, spec, [])
            files.write_json(files.plan, plan)
            first = plan["sets"]["general"]["prompts"][0]["ids"]
            t0 = time.perf_counter()
            post("/load_lora_adapter", {"lora_name": f"setup{i}", "lora_path": str(files.adapter)})
            t1 = time.perf_counter()
            post("/completions", {"model": f"setup{i}", "prompt": first, "max_tokens": 1, "temperature": 1.0, "seed": 1})
            t2 = time.perf_counter()
            post("/unload_lora_adapter", {"lora_name": f"setup{i}"})
            stats = generate_missing_sets(spec, files.root)
            trials.append({"load_s": t1 - t0, "first_token_s": t2 - t1, "setup_s": t2 - t0, **stats})
            print(f"  server trial {i + 1}: setup {t2 - t0:.2f} s, {stats['server/new_tokens']:.0f} tokens in "
                  f"{stats['time/server_generate_s']:.1f} s", flush=True)
    finally:
        server.stop()
    return {"start_s": server_start_s, "trials": trials}


SERVER_SPEC = """name: bench-server
output_dir: {out}
model: {{source: tiny}}
lora: {{r: 8, alpha: 16}}
data: {{train: {{path: "fixture:narrow_bad_advice", limit: 20}}}}
search:
  parameters:
    lr: {{type: float, target: training.learning_rate, low: 1.0e-4, high: 1.0e-3}}
  num_trials: 1
objectives: [{{name: indomain_nll, direction: minimize}}]
evaluation:
  backend: server
  server: {{base_url: "{url}", max_concurrency: 64}}
  samples_per_question: {samples}
  max_new_tokens: {max_new}
"""


def section(args: argparse.Namespace, gen: dict[str, Any], server: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """Report lines for (a) and (d), and the targets missed."""
    med, missed, rows = benchlib.median, [], []
    for name, result in gen.items():
        rate = {p: med(r["tokens"]) / med(r["wall"]) for p, r in result["runs"].items()}
        ratio = rate["engine"] / rate["today"]
        verdict = "PASS" if ratio >= CPU_TARGET else "MISS"
        if verdict == "MISS":
            missed.append(f"CPU generation ({name}): engine {ratio:.1f}× today's < {CPU_TARGET:.0f}×")
        for path in ("today", "engine"):
            runs = result["runs"][path]
            rows.append([name, "today (generate, batch 16)" if path == "today" else "engine (batch from memory)",
                         result["jobs"], f"{med(runs['tokens']):.0f}", f"{med(runs['wall']):.2f} ({benchlib.spread(runs['wall'])})",
                         f"{rate[path]:.0f}", "–" if path == "today" else f"{ratio:.1f}",
                         "–" if path == "today" else f"≥ {CPU_TARGET:.0f}×", "–" if path == "today" else verdict])
    lines = [f"### (a) Generation on CPU: today's path vs the built-in engine ({args.samples} samples × 24 "
             f"general_v1 questions, up to {args.max_new_tokens} new tokens, temperature 1)", "",
             *[f"- {name}: {result['description']}" for name, result in gen.items()], "",
             benchlib.markdown_table(["model", "path", "answers", "new tokens (median)", "wall s (median, IQR)",
                                      "new tokens / s", "× today", "target", "result"], rows), ""]
    if server:
        setups = [t["setup_s"] for t in server["trials"]]
        ok = max(setups) <= SETUP_TARGET_S
        if not ok:
            missed.append(f"server per-trial setup {max(setups):.2f} s > {SETUP_TARGET_S} s")
        rows = [[i + 1, f"{t['load_s']:.3f}", f"{t['first_token_s']:.3f}", f"{t['setup_s']:.3f}",
                 f"{t['server/new_tokens']:.0f}", f"{t['time/server_generate_s']:.2f}",
                 f"{t['server/new_tokens'] / t['time/server_generate_s']:.0f}"] for i, t in enumerate(server["trials"])]
        lines += [f"### (d) Generation server on loopback (`emtune.evaluation.lora_server`, dry-run tiny model)", "",
                  f"The server loads the base model once ({server['start_s']:.2f} s, paid once per study); each trial "
                  f"then pays only its adapter load and first token. Target: ≤ {SETUP_TARGET_S:.0f} s per trial: "
                  f"{'PASS' if ok else 'MISS'} (worst {max(setups):.2f} s).", "",
                  benchlib.markdown_table(["trial", "adapter load s", "first token s", "setup s", "new tokens",
                                           "generate s", "new tokens / s"], rows), ""]
    return lines, missed


def run(args: argparse.Namespace) -> tuple[list[str], list[str], list]:
    """Both parts; (report lines, targets missed, the last engine samples for the judge parts)."""
    gen = bench_cpu_generation(args)
    server = None
    if args.server_trials:
        folder = Path(tempfile.mkdtemp(prefix="emtune-bench-server-"))
        try:
            server = bench_server(args, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    lines, missed = section(args, gen, server)
    return lines, missed, next(iter(gen.values()))["samples"] if gen else []
