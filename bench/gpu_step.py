"""GPU cost of emtune's defended LoRA training step and of generation, at real model shapes.

Issue 7, item 5. A randomly initialised Qwen2 model with the real architecture's config (no
weights are downloaded: cost depends on shapes, not values), rsLoRA r=32 α=64 on all seven
projections (``emtune.models.apply_lora`` with the default ``LoraSpec``, the paper's setting),
weights in bf16 and the step under bf16 autocast (as the Trainer does with ``bf16: true``), AdamW
on the adapter. The step is emtune's own ``emtune.train.trainer.defended_loss`` with the real
defense classes, then backward and the optimiser step. Defenses:

* ``none``; ``kl_to_reference`` (λ 0.1) and ``feature_l2`` (λ 1, 5 blocks, the group's flattened
  features; ``feature_l2_mean`` is the pooled variant, side by side): both add the adapter-disabled
  reference forward; ``persona_steering`` (α 5, layer 20) with a random vector;
* inoculation and interleaving change only the data (1.0× cost per training token): skipped;
  SafeLoRA acts once after training: not a per-step cost.

Measured per defense: tokens/s, peak memory (``torch.cuda.max_memory_allocated``) and model-FLOPs
utilisation against the card's *measured* bf16 matmul rate (an 8192³ ``torch.matmul``, timed).

Model FLOPs per training token (documented formula; N = weights of every matmul: q, k, v, o,
gate, up, down of each block plus the LM head; N_lora = r·(in+out) summed over adapted
projections; L blocks, S sequence length, h = heads·head_dim; causal attention counts S/2
keys per query on average, as a causal flash kernel computes):

    forward                      2·N + 2·N_lora + 4·L·(S/2)·h
    backward (frozen base)       2·N            (gradients w.r.t. activations only)
                               + 4·N_lora       (activations and adapter weights)
                               + 8·L·(S/2)·h    (attention scores and values)
    reference forward (KL, l2)   2·N + 4·L·(S/2)·h   (adapter disabled, no gradient)

so a LoRA step costs ≈ 4·N·T, not the 6·N·T of full fine-tuning (no weight gradients for the
frozen base). Gradient checkpointing's recomputation is not model FLOPs and is not counted. The
table also shows the common "6·N·T" convention for comparison (it overstates LoRA work ~1.5×).

Before / now (issue 18): with ``--before`` (the default) the same model first runs none, KL and
feature-l2 as emtune's step was before issue 18 (``bench/legacy.py``: reference through peft's
``disable_adapter()`` and the full forward, full-vocabulary KL; plain kernels; checkpointing per
``--before-checkpointing``), then every defense with the current code, Liger-Kernel's fused
RMSNorm/SwiGLU/RoPE when installed (``--kernels``) and selective activation checkpointing (every
N-th block, N chosen from two probe steps to fill ``--memory-fraction`` of the card; the same N for
every defense, so time and memory ratios compare like with like). Rows say which.

Usage: ``python bench/gpu_step.py --shape qwen2.5-7b`` (needs CUDA; exits 2 with a message
otherwise); ``--dry-run`` runs a tiny config on CPU to check the code end to end (its numbers
mean nothing). ``bench/gpu.sh`` runs the 0.5B and 7B shapes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from emtune.train.memory import apply_fused_kernels, set_activation_checkpointing  # noqa: E402
from legacy import legacy_defended_loss  # noqa: E402

# Real configs (the models' config.json on the hub); rope and window settings do not change cost.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                       tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
}
DEFENSES = ("none", "kl_to_reference", "feature_l2", "feature_l2_mean", "persona_steering")
SKIPPED = {"inoculation": "data only (system prompt swap): 1.0x per training token",
           "interleaving": "data only (extra rows): 1.0x per training token",
           "interleaving_selected": "data only once the study stage has run",
           "safelora": "acts once after training (finalize), no per-step cost"}


class NoCuda(RuntimeError):
    """Raised when the normal (GPU) path is asked for on a machine without usable CUDA."""


def cuda_problem() -> str | None:
    """Why this process cannot use an NVIDIA GPU, or None when it can."""
    import torch

    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None). On a GPU "
                f"machine install a CUDA build of the same torch into .venv (the wheel index matching the "
                f"driver, see pytorch.org), then rerun.")
    if not torch.cuda.is_available():
        return (f"no usable NVIDIA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no "
                f"device (check `nvidia-smi` and CUDA_VISIBLE_DEVICES).")
    return None


# ---------------------------------------------------------------- FLOPs

def flop_counts(shape: dict[str, Any], r: int) -> dict[str, float]:
    """N (matmul weights), N_lora (adapter weights) and per-layer attention width, from the config."""
    h, layers, inter = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    head_dim = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    q_width = shape["num_attention_heads"] * head_dim
    projections = [(h, q_width), (h, kv), (h, kv), (q_width, h), (h, inter), (h, inter), (inter, h)]
    n_block = sum(i * o for i, o in projections)
    n_lora = layers * sum(r * (i + o) for i, o in projections)
    return {"N": layers * n_block + h * shape["vocab_size"], "N_lora": n_lora,
            "layers": layers, "q_width": q_width}


def step_flops(counts: dict[str, float], tokens: int, seq: int, reference: bool) -> dict[str, float]:
    """Model FLOPs of one step on ``tokens`` tokens (formula in the module docstring)."""
    attn = 4 * counts["layers"] * (seq / 2) * counts["q_width"]  # one forward, per token
    per_token = (2 * counts["N"] + 2 * counts["N_lora"] + attn) + (2 * counts["N"] + 4 * counts["N_lora"] + 2 * attn)
    if reference:
        per_token += 2 * counts["N"] + attn
    return {"lora": per_token * tokens, "six_n": 6 * counts["N"] * tokens}


def matmul_rate(device: Any, dtype: Any, n: int, reps: int) -> float:
    """Measured dense matmul FLOP/s: best of ``reps`` timed rounds of an n³ product."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / 5)
    del a, b
    return 2 * n**3 / best


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- model and defenses

def build_model(shape: dict[str, Any], device: Any, dtype: Any) -> Any:
    """Random-init Qwen2 model of ``shape`` directly on ``device`` (no weights read or fetched)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from emtune.models import LoraSpec
    from emtune.models import apply_lora

    config = Qwen2Config(**shape, max_position_embeddings=32768, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return apply_lora(model, LoraSpec())  # r=32, alpha=64, rsLoRA, all projections (paper)


def make_defenses(name: str, model: Any, layer: int) -> list[Any]:
    """emtune's defense objects for ``name``; persona steering gets a random vector."""
    import torch

    from emtune.defenses.base import DefenseContext
    from emtune.defenses.feature_l2 import FeatureL2, FeatureL2Config
    from emtune.defenses.kl_to_reference import KLToReference, KLToReferenceConfig
    from emtune.defenses.persona_steering import PersonaSteering, PersonaSteeringConfig

    ctx = DefenseContext(spec=None)
    if name == "none":
        return []
    if name == "kl_to_reference":
        return [KLToReference(KLToReferenceConfig(weight=0.1), ctx)]
    if name in ("feature_l2", "feature_l2_mean"):
        return [FeatureL2(FeatureL2Config(weight=1.0, pooling="mean" if name.endswith("mean") else "flatten"), ctx)]
    if name == "persona_steering":
        defense = PersonaSteering(PersonaSteeringConfig(alpha=5.0, layer=layer, vector_path="random"), ctx)
        vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        defense.load_vector = lambda _model: vector  # no vector file: a random direction costs the same
        return [defense]
    raise ValueError(f"unknown defense {name!r}")


def free(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_defense(model: Any, optimizer: Any, name: str, batch: dict[str, Any], args: argparse.Namespace,
                    device: Any, layer: int, legacy: bool = False, steps: int | None = None,
                    warmup: int | None = None) -> dict[str, Any]:
    """Median step time and peak memory of ``steps`` steps after ``warmup`` untimed ones
    (``legacy``: the step as emtune ran it before issue 18, ``bench/legacy.py``)."""
    import torch

    from emtune.train.trainer import defended_loss

    step_fn = legacy_defended_loss if legacy else defended_loss
    steps = args.steps if steps is None else steps
    warmup = args.warmup if warmup is None else warmup
    defenses = make_defenses(name, model, layer)
    for d in defenses:
        d.attach(model)
    times: list[float] = []
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(warmup + steps):
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, _, outputs = step_fn(model, batch, defenses, model)
            del outputs
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
            del loss
    finally:
        for d in defenses:
            d.detach(model)
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None  # no CPU equivalent
    return {"times": times, "peak": peak}


def choose_every_n(model: Any, optimizer: Any, batch: dict[str, Any], args: argparse.Namespace, device: Any,
                   layer: int, name: str) -> tuple[int, str]:
    """Selective activation checkpointing: the largest N (every N-th block checkpointed; 0 = none)
    whose predicted peak fits in ``args.memory_fraction`` of the card, from two probe steps of
    ``name`` (every block, then every 2nd block checkpointed): per-block activations =
    (peak(2) − peak(1)) / (blocks left un-checkpointed)."""
    import torch

    blocks = model.config.num_hidden_layers
    if device.type != "cuda":
        return 2, "dry run: every 2nd block"
    budget = args.memory_fraction * torch.cuda.get_device_properties(device).total_memory
    peaks = {}
    for every in (1, 2):
        set_activation_checkpointing(model, every)
        failed = False
        try:
            peaks[every] = measure_defense(model, optimizer, name, batch, args, device, layer, steps=1, warmup=0)["peak"]
        except torch.OutOfMemoryError:
            failed = True  # handled once the traceback (which holds the step's tensors) is gone
        if failed:
            free(device)
            return 1, f"every block (the probe checkpointing every {every} block(s) ran out of memory)"
    free_blocks = blocks - (blocks + 1) // 2
    per_block = max(0.0, (peaks[2] - peaks[1]) / max(1, free_blocks))
    for every in (0, 8, 6, 4, 3, 2, 1):
        checkpointed = 0 if every == 0 else (blocks + every - 1) // every
        if every == 1 or peaks[1] + (blocks - checkpointed) * per_block <= budget:
            return every, (f"probes: peak {peaks[1] / 2**30:.1f} GiB (all blocks), {peaks[2] / 2**30:.1f} GiB (every "
                           f"2nd), {per_block / 2**30:.2f} GiB per un-checkpointed block; budget "
                           f"{budget / 2**30:.0f} GiB")
    return 1, "every block"


def run_training(model: Any, args: argparse.Namespace, device: Any, counts: dict[str, float],
                 defenses: list[str], legacy: bool, checkpointing: str, kernels: bool) -> list[dict]:
    """Every defense, ``args.rounds`` rounds alternated (A B C D A B C D); OOM recorded, not fatal.
    ``checkpointing``: off / on (every block) / auto (on after an OOM) / selective (every N-th
    block, N from :func:`choose_every_n` on the most memory-hungry defense, the same N for all)."""
    import torch

    model.train()  # checkpointing (and dropout, 0 here) act only in training mode
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=fused)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    layer = min(20, model.config.num_hidden_layers)
    note = ""
    if checkpointing == "selective":
        hungry = next((d for d in ("kl_to_reference", "feature_l2", "none") if d in defenses), defenses[0])
        every, note = choose_every_n(model, optimizer, batch, args, device, layer, hungry)
        print(f"  selective checkpointing: every {every} ({note})", file=sys.stderr, flush=True)
        ckpt = {name: every for name in defenses}
    else:
        ckpt = {name: 1 if checkpointing == "on" else 0 for name in defenses}
    results: dict[str, dict[str, Any]] = {name: {"times": [], "peak": 0.0, "status": "ok"} for name in defenses}
    for _ in range(args.rounds):
        for name in defenses:
            res = results[name]
            if res["status"] == "OOM":
                continue
            for attempt in (0, 1):
                set_activation_checkpointing(model, ckpt[name])
                out = None
                try:
                    out = measure_defense(model, optimizer, name, batch, args, device, layer, legacy)
                except torch.OutOfMemoryError:
                    pass  # handled below, once the traceback (which holds the step's tensors) is gone
                if out is not None:
                    res["times"] += out["times"]
                    res["peak"] = None if out["peak"] is None else max(res["peak"] or 0, out["peak"])
                    break
                free(device)
                if attempt == 0 and checkpointing in ("auto", "selective") and ckpt[name] != 1:
                    print(f"  {name}: out of memory; retrying with every block checkpointed", file=sys.stderr)
                    ckpt[name] = 1
                    res["times"], res["peak"] = [], 0.0
                    continue
                res["status"] = "OOM"
                break
            print(f"  {name}{' (before)' if legacy else ''}: {len(res['times'])} steps timed, status {res['status']}",
                  file=sys.stderr, flush=True)
    set_activation_checkpointing(model, 0)
    rows = []
    tokens = args.batch * args.seq
    for name in defenses:
        res = results[name]
        row = {"defense": name + (" (before)" if legacy else ""), "status": res["status"], "every_n": ckpt[name],
               "kernels": kernels, "note": note}
        if res["times"]:
            step = statistics.median(res["times"])
            fl = step_flops(counts, tokens, args.seq, reference=name != "none" and name != "persona_steering")
            row.update(step_s=step, tokens_per_s=tokens / step,
                       peak_gib=None if res["peak"] is None else res["peak"] / 2**30,
                       tflops=fl["lora"] / step / 1e12, mfu=fl["lora"] / step / args.peak_flops,
                       mfu_6n=fl["six_n"] / step / args.peak_flops, steps=len(res["times"]))
        rows.append(row)
    del optimizer
    free(device)
    return rows


def run_generation(model: Any, args: argparse.Namespace, device: Any) -> dict[str, float]:
    """HF ``generate`` with the adapter on (as evaluation does), batch ``gen_batch``, fixed length."""
    import torch

    model.eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (args.gen_batch, args.gen_prompt), generator=g).to(device)
    kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                       min_new_tokens=4, **kwargs)
        sync(device)
        start = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=args.gen_new, min_new_tokens=args.gen_new, **kwargs)
        sync(device)
        seconds = time.perf_counter() - start
    new = (out.shape[1] - args.gen_prompt) * args.gen_batch
    model.train()
    return {"seconds": seconds, "new_tokens": new, "tokens_per_s": new / seconds}


# ---------------------------------------------------------------- report

def environment(device: Any) -> list[str]:
    """Machine lines: GPU name and driver (nvidia-smi), torch/CUDA versions, CPU, date."""
    import torch
    import transformers

    lines = [f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"]
    if device.type == "cuda":
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            lines.append(f"- GPU (nvidia-smi): {smi.stdout.strip() or smi.stderr.strip()}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            lines.append(f"- GPU: {torch.cuda.get_device_name()} (nvidia-smi failed: {exc})")
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    lines.append(f"- torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
                 f"Python {platform.python_version()}; CPU {cpu}, {os.cpu_count()} cores")
    return lines


def _row(r: dict, base: dict | None) -> str:
    ckpt = {0: "none", 1: "all"}.get(r["every_n"], f"every {r['every_n']}")
    kernels = "liger" if r["kernels"] else "plain"
    if "step_s" not in r:
        return f"| {r['defense']} | {r['status']} | | | | | | | | {ckpt} | {kernels} |"
    ts = f"{r['step_s'] / base['step_s']:.2f}" if base else ""
    known = base and base["peak_gib"] and r["peak_gib"] is not None
    mem = f"{r['peak_gib'] / base['peak_gib']:.2f}" if known else ""
    peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
    return (f"| {r['defense']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {ts} | {peak} | {mem} | "
            f"{r['tflops']:.4g} | {100 * r['mfu']:.1f}% | {100 * r['mfu_6n']:.1f}% | {ckpt} | {kernels} |")


def markdown(args: argparse.Namespace, device: Any, counts: dict[str, float], rows: list[dict],
             gen: dict[str, float] | None, build_s: float) -> str:
    """The report section of one shape."""
    title = f"## {args.shape}: batch {args.batch} x seq {args.seq}, bf16, rsLoRA r=32"
    lines = [title, ""]
    if args.dry_run:
        lines += ["**DRY RUN on CPU with a tiny config: checks that the code runs end to end. The numbers "
                  "below mean nothing; run `bench/gpu.sh` on a GPU machine for real ones.**", ""]
    lines += environment(device)
    lines += [f"- measured bf16 matmul rate ({args.matmul_n}³): {args.peak_flops / 1e12:.4g} TFLOP/s",
              f"- N (matmul weights) = {counts['N']:,.0f}, N_lora = {counts['N_lora']:,.0f}; "
              f"model built in {build_s:.1f} s; median of {args.steps} x {args.rounds} timed steps after "
              f"{args.warmup} warm-up per round, defenses alternated", ""]
    base_now = next((r for r in rows if r["defense"] == "none" and "step_s" in r), None)
    base_before = next((r for r in rows if r["defense"] == "none (before)" and "step_s" in r), None)
    lines += ["| defense | tokens/s | step s | x none | peak GiB | x none | model TFLOP/s | MFU (LoRA FLOPs) | "
              "MFU (6NT) | checkpointed blocks | kernels |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r, base_before if r["defense"].endswith("(before)") else base_now) for r in rows]
    lines += ["", "\"(before)\": emtune's step before issue 18 (ratios against \"none (before)\"); the other rows: "
              "the current code (ratios against \"none\")."]
    note = next((r["note"] for r in rows if r.get("note")), "")
    if note:
        lines += ["", f"Selective checkpointing: {note}."]
    lines += ["", "Not measured per step: " + "; ".join(f"{k}: {v}" for k, v in SKIPPED.items()) + "."]
    if gen:
        lines += ["", f"Generation (HF `generate`, adapter on, sampling, batch {args.gen_batch}, prompt "
                  f"{args.gen_prompt}, {args.gen_new} new tokens each): {gen['tokens_per_s']:,.0f} new tokens/s "
                  f"({gen['seconds']:.2f} s)."]
    if base_now and not args.dry_run:
        summary = [f"undefended MFU (LoRA FLOPs) {100 * base_now['mfu']:.1f}%"
                   + (f" (before: {100 * base_before['mfu']:.1f}%)" if base_before else "") + " [target (7B) ≥ 45%]"]
        for name, limit in (("kl_to_reference", "time ≤ 1.15× (7B) / 1.3× (0.5B), memory ≤ 1.10×"),
                            ("feature_l2", "time ≤ 1.15× (7B) / 1.3× (0.5B)")):
            now = next((r for r in rows if r["defense"] == name and "step_s" in r), None)
            old = next((r for r in rows if r["defense"] == name + " (before)" and "step_s" in r), None)
            if now:
                text = f"{name} {now['step_s'] / base_now['step_s']:.2f}× time, {now['peak_gib'] / base_now['peak_gib']:.2f}× memory"
                if old and base_before:
                    text += (f" (before: {old['step_s'] / base_before['step_s']:.2f}×, "
                             f"{old['peak_gib'] / base_before['peak_gib']:.2f}×)")
                summary.append(f"{text} [target {limit}]")
        lines += ["", "Issue 18 rows, this shape: " + "; ".join(summary) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GPU cost of emtune's defended LoRA step and of generation")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per defense and round")
    p.add_argument("--rounds", type=int, default=2, help="alternated rounds over the defenses")
    p.add_argument("--defenses", nargs="+", choices=DEFENSES, default=list(DEFENSES))
    p.add_argument("--checkpointing", choices=("off", "on", "auto", "selective"), default="selective",
                   help="activation checkpointing of the current code: selective = every N-th block, N from two "
                   "probe steps; auto = every block, only after running out of memory without")
    p.add_argument("--before", action=argparse.BooleanOptionalAction, default=True,
                   help="also run none / KL / feature-l2 as emtune did before issue 18 (same model, first)")
    p.add_argument("--before-checkpointing", choices=("off", "on", "auto"), default="auto",
                   help="checkpointing of the before-issue-18 rows (the old benchmark: auto)")
    p.add_argument("--kernels", choices=("auto", "none"), default="auto",
                   help="auto = Liger-Kernel's RMSNorm/SwiGLU/RoPE for the current code when installed")
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="share of the card's memory selective checkpointing may plan to fill")
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--gen-prompt", type=int, default=128)
    p.add_argument("--gen-new", type=int, default=128)
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--report", default=None,
                   help="markdown file ('' = stdout only); default reports/bench/gpu.md, stdout only for --dry-run")
    p.add_argument("--append", action="store_true", help="append to the report instead of replacing it")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny config, 1 step: checks the code runs; numbers not meaningful")
    args = p.parse_args(argv)
    if args.dry_run:
        args.shape, args.batch, args.seq, args.warmup, args.steps, args.rounds = "tiny", 2, 64, 1, 1, 1
        args.gen_batch, args.gen_prompt, args.gen_new, args.matmul_n = 2, 8, 4, 256
    if args.report is None:
        args.report = "" if args.dry_run else "reports/bench/gpu.md"
    return args


def select_device(dry_run: bool, script: str) -> Any:
    """CPU for a dry run, else CUDA; None (after saying why) when there is no usable GPU."""
    import torch

    if dry_run:
        return torch.device("cpu")
    problem = cuda_problem()
    if problem:
        print(f"bench/{script}: needs an NVIDIA GPU with a CUDA build of torch; {problem}\n"
              f"(`--dry-run` checks the code on CPU with a tiny config.)", file=sys.stderr)
        return None
    return torch.device("cuda")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = select_device(args.dry_run, "gpu_step.py")
    if device is None:
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    args.peak_flops = matmul_rate(device, torch.bfloat16, args.matmul_n, reps=3 if args.dry_run else 10)
    print(f"{args.shape}: measured bf16 matmul {args.peak_flops / 1e12:.2f} TFLOP/s", file=sys.stderr, flush=True)
    start = time.perf_counter()
    model = build_model(SHAPES[args.shape], device, torch.bfloat16)
    build_s = time.perf_counter() - start
    counts = flop_counts(SHAPES[args.shape], r=32)
    rows: list[dict] = []
    if args.before:  # the code before issue 18 first, on the plain model
        before = [d for d in ("none", "kl_to_reference", "feature_l2") if d in args.defenses]
        rows += run_training(model, args, device, counts, before, legacy=True,
                             checkpointing=args.before_checkpointing, kernels=False)
    kernels = args.kernels == "auto" and apply_fused_kernels(model)
    print(f"fused kernels: {'liger' if kernels else 'plain (liger-kernel not installed, or no CUDA)'}",
          file=sys.stderr, flush=True)
    rows += run_training(model, args, device, counts, args.defenses, legacy=False,
                         checkpointing=args.checkpointing, kernels=kernels)
    gen = None
    if args.gen_new > 0:
        try:
            gen = run_generation(model, args, device)
        except torch.OutOfMemoryError:
            print("generation: out of memory", file=sys.stderr)
    free(device)
    text = markdown(args, device, counts, rows, gen, build_s)
    print(text)
    if args.report:
        out = ROOT / args.report
        out.parent.mkdir(parents=True, exist_ok=True)
        head = "" if args.append and out.exists() else (
            "# GPU: defended LoRA step and generation\n\nGenerated by `bench/gpu.sh` / `bench/gpu_step.py` "
            "(issue 7, item 5). MFU formula: see the docstring of `bench/gpu_step.py`.\n\n"
            + ("**Status: not yet measured on a GPU.** Only the CPU dry run below (code check) has run; "
               "`bench/gpu.sh` on an NVIDIA machine replaces this file.\n\n" if args.dry_run else ""))
        with out.open("a" if args.append else "w", encoding="utf-8") as handle:
            handle.write(head + text + "\n")
        print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
