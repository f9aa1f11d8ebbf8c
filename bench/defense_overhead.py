"""Defense overhead: training-step time and peak memory of every registered defense vs. no defense.

Run:  .venv/bin/python bench/defense_overhead.py --size tiny      (then --size small)

What is measured, and how (all on CPU, same model, LoRA, batch and sequence length per size):

* **Training step** = forward + every defense term through emtune's ``defended_loss`` + backward +
  AdamW step on the LoRA parameters (no Trainer around it, so its bookkeeping does not dilute the
  ratio). Loss/hook defenses run on a fixed batch of random token ids ``[batch, seq]`` (labels =
  inputs, every position trained).
* **Time**: one process, one model; all configurations run round-robin (A B C … A B C …), each
  turn timing ``--steps`` steps (or one pass over its data) with ``perf_counter``; the first
  ``--warmup`` rounds are dropped and the median over ``--reps`` rounds is reported, with the
  inter-quartile spread. Ratios are against the undefended configuration of the same run.
* **Peak memory**: a fresh process per configuration (multiprocessing *forkserver* with torch,
  transformers and peft preloaded but no tensor work done), glibc's mmap threshold fixed at 64 KiB
  (``MALLOC_MMAP_THRESHOLD_``) so freed tensors go back to the OS instead of staying in the heap.
  After a warm-up step (Adam state exists) the kernel's peak-RSS mark is reset
  (``/proc/self/clear_refs``) and the peak (``VmHWM``) over ``--mem-steps`` steps is read.
  *Footprint* = that peak − the RSS of the process before the model was built (weights,
  optimiser state and activations: what a GPU's peak allocated memory would count). torch's CPU
  allocator keeps no statistics and ``tracemalloc`` does not see torch's allocations.
* **Naive KL**: the same KL term, but the reference is a deep copy of the base model kept frozen
  (forward under ``no_grad``) instead of emtune's adapter-disabled pass over the same weights; its
  parameter+buffer bytes are counted exactly and its footprint and step time measured as above.
* **Data defenses** (inoculation, interleaving, Interleaving++): one turn = one pass over their
  transformed copy of the same ``--data-rows`` task rows (tokenised with the tiny tokenizer,
  truncated to ``--seq``, padded per batch); the figure is time per trained (non-pad) token vs.
  the untransformed rows. Their one-off ``transform_data`` time is listed too (Interleaving++
  cold = scoring the pool under the misaligned ensemble; warm = from its cache).
* **SafeLoRA**: its training step is the undefended one; ``finalize`` (score all layers, project
  those below τ) is timed, and its peak extra RSS in a fresh process is compared with the largest
  single layer's C = V·Vᵀ/‖V‖_F (out × out float32), which the implementation never forms.
  The base weights are read from a safetensors folder, tensor by tensor, as in a real study.

* **Before / now** (issue 18): rows marked "(before)" run emtune's step as it was before issue 18
  (``bench/legacy.py``: the reference through peft's ``disable_adapter()`` and the full forward,
  the KL on full-vocabulary logits, SafeLoRA scored through ΔW and Vᵀ·ΔW, data batches in file
  order), in the same process and rounds as the current code, so old and new figures are
  measured side by side.

Writes the tables to reports/bench/defense_overhead.md (one section per size) and prints them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import multiprocessing as mp
import os
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import benchlib  # noqa: E402  (the bench folder is on sys.path when run as a script)
from legacy import LegacyReference, legacy_defended_loss, legacy_safelora_scores  # noqa: E402

SIZES = {
    # the dry-run study's tiny model and LoRA (search_spaces/dryrun.yaml)
    "tiny": {"model": {}, "lora": {"r": 8, "alpha": 16}, "batch": 8, "seq": 128, "steps": 3, "reps": 12,
             "data_rows": 128},
    # a ~30M-parameter random-init Qwen2 shape with the paper's rsLoRA r=32, alpha=64
    "small": {"model": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 2,
                        "intermediate_size": 1536},
              "vocab": 8192, "lora": {}, "batch": 2, "seq": 128, "steps": 1, "reps": 5, "data_rows": 12},
}
KL_WEIGHT = 0.1  # the paper's λ
TARGETS = {  # (time ratio limit, memory ratio limit or None); from issue 7
    "kl_to_reference": (1.30, 1.10),
    "feature_l2": (1.30, 1.10),
    "persona_steering": (1.05, None),
}
REFERENCE_PASS = "(reference forward alone)"
REFERENCE_PASS_BEFORE = "(reference forward alone, before)"
BEFORE = " (before)"
PER_TOKEN_LIMIT = 1.05  # "1.0x per training token", with a ±5% noise band


# --- building one training world (used by the timing process and by each memory process) ------


def tiny_spec(setup: dict) -> Any:
    from emtune.models import TinyModelSpec

    return TinyModelSpec(**setup["model"])


def build_models(setup: dict, naive: bool) -> tuple[Any, Any]:
    """(LoRA model, frozen deep copy of the base or None), identical weights for every config."""
    from emtune.models import LoraSpec
    from emtune.models import apply_lora, build_tiny_model

    import torch

    base = build_tiny_model(tiny_spec(setup), setup["vocab"])
    reference = None
    if naive:
        reference = copy.deepcopy(base).eval()
        reference.requires_grad_(False)
    model = apply_lora(base, LoraSpec(**setup["lora"]))
    with torch.no_grad():  # as mid-training: B != 0, so the model differs from its reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    return model, reference


def make_optimizer(model: Any) -> Any:
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def random_batch(setup: dict) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, setup["vocab"], (setup["batch"], setup["seq"]), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def step_defenses(setup: dict, world: dict) -> dict[str, tuple[str, dict] | None]:
    """Loss/hook configurations: name -> (registry name, settings); None = no defense."""
    layers = setup["model"].get("num_layers", tiny_spec(setup).num_layers)
    return {
        "none": None,
        "kl_to_reference": ("kl_to_reference", {"weight": KL_WEIGHT}),
        "kl_to_reference (before)": ("kl_to_reference", {"weight": KL_WEIGHT}),
        "kl_naive_copy": None,  # the KL term with a second model; see train_step
        "feature_l2": ("feature_l2", {"weight": 1.0}),
        "feature_l2 (before)": ("feature_l2", {"weight": 1.0}),
        "persona_steering": ("persona_steering", {"alpha": 5.0, "layer": max(1, layers // 2),
                                                  "vector_path": world["persona"]}),
        "safelora": ("safelora", {"threshold": 0.5, "base_source": world["safelora_base"]}),
    }


def defense_context(world: dict, tokenizer: Any = None) -> Any:
    from emtune.defenses.base import DefenseContext

    return DefenseContext(spec=None, tokenizer=tokenizer, seed=0, cache_dir=Path(world["root"]) / "cache",
                          extras={"model_source": world.get("model_folder")})


def make_defenses(entry: tuple[str, dict] | None, context: Any) -> list[Any]:
    from emtune.defenses import make_defense

    return [] if entry is None else [make_defense(entry[0], context, **entry[1])]


def train_step(model: Any, optimizer: Any, batch: dict, defenses: list, naive_reference: Any = None,
               legacy: bool = False) -> float:
    """One optimiser step; with ``naive_reference`` the KL term uses that second model; ``legacy``
    runs the step as emtune did before issue 18 (``bench/legacy.py``)."""
    import torch

    from emtune.defenses.kl_to_reference import kl_to_reference_loss
    from emtune.train.trainer import defended_loss

    if naive_reference is None:
        loss, _, _ = (legacy_defended_loss if legacy else defended_loss)(model, batch, defenses)
    else:
        outputs = model(**batch)
        with torch.no_grad():
            ref = naive_reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = outputs.loss + KL_WEIGHT * kl_to_reference_loss(outputs.logits, ref.logits,
                                                               batch["attention_mask"].bool())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def tensor_bytes(module: Any) -> int:
    """Parameter + buffer bytes of a module (tied weights counted once)."""
    seen = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


# --- the shared files: persona vector, SafeLoRA base, Interleaving++ model and adapters ---------


def prepare_world(setup: dict, root: Path, with_selected: bool) -> dict:
    """Write the files the defenses read; returns their paths (and the tokenizer, rows)."""
    import torch

    from emtune.models import LoraSpec
    from emtune.data.fixtures import fixture_path
    from emtune.defenses.persona_vectors import PersonaVectors, save_persona_vectors
    from emtune.models import apply_lora, build_tiny_model, build_tiny_tokenizer

    tiny = tiny_spec(setup)
    world: dict[str, Any] = {"root": str(root)}
    torch.manual_seed(7)
    save_persona_vectors(PersonaVectors(torch.randn(tiny.num_layers + 1, tiny.hidden_size),
                                        {"model": "bench", "prompts_version": "bench",
                                         "index_convention": "hidden_states"}), root / "persona.pt")
    world["persona"] = str(root / "persona.pt")
    # SafeLoRA's unaligned base: the model's weights plus noise, saved as safetensors
    base = build_tiny_model(tiny, setup["vocab"])
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base.save_pretrained(root / "safelora_base")
    world["safelora_base"] = str(root / "safelora_base")
    tokenizer = build_tiny_tokenizer(512)
    world["tokenizer"] = tokenizer
    with open(fixture_path("narrow_bad_advice"), encoding="utf-8") as handle:
        world["rows"] = [json.loads(line) for _, line in zip(range(setup["data_rows"]), handle)]
    if with_selected:  # the aligned model folder and two "misaligned" adapters (random B)
        folder = root / "aligned"
        model = build_tiny_model(tiny, setup["vocab"])
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        world["model_folder"] = str(folder)
        world["adapters"] = []
        for k in range(2):
            torch.manual_seed(100 + k)
            peft = apply_lora(build_tiny_model(tiny, setup["vocab"]), LoraSpec(r=4, alpha=8))
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.data.normal_(0, 0.3)
            peft.save_pretrained(root / f"misaligned-{k}")
            world["adapters"].append(str(root / f"misaligned-{k}"))
    return world


def data_defenses(setup: dict, world: dict) -> dict[str, tuple[str, dict] | None]:
    """Data configurations: name -> (registry name, settings); None = the rows as they are."""
    ratio = setup["interleave_ratio"]
    return {
        "none (data)": None,
        "inoculation": ("inoculation", {"prompt": "evil_general"}),
        "interleaving": ("interleaving", {"ratio": ratio}),
        "interleaving_selected": ("interleaving_selected", {
            "ratio": ratio, "pool_limit": 64, "misaligned_adapters": world["adapters"],
            "max_length": setup["seq"]}),
    }


def data_batches(rows: list, tokenizer: Any, setup: dict, grouped: bool = True) -> tuple[list[dict], int, int]:
    """Rows tokenised (truncated to seq), batched in emtune's length-grouped order (``grouped``,
    ``training.group_by_length``) or in file order (before issue 18), padded per batch (as emtune's
    collator does); the trained (non-pad) token count and the computed positions (padding included)."""
    from emtune.data.batching import length_grouped_order
    from emtune.data.chat import pad_batch, tokenize_chat

    features = [tokenize_chat(tokenizer, r["messages"], setup["seq"]) for r in rows]
    if grouped:
        order = length_grouped_order([len(f["input_ids"]) for f in features], setup["batch"], seed=0)
        features = [features[i] for i in order]
    batches = [pad_batch(features[i:i + setup["batch"]], tokenizer.pad_token_id)
               for i in range(0, len(features), setup["batch"])]
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    return batches, tokens, int(sum(b["input_ids"].numel() for b in batches))


# --- memory: one fresh process per configuration ---------------------------------------------


def _prime() -> None:
    """Run one micro training step so lazy imports and thread pools exist before the baseline."""
    from emtune.models import LoraSpec, TinyModelSpec
    from emtune.models import apply_lora, build_tiny_model

    setup = {"model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                       "intermediate_size": 32}, "vocab": 300, "batch": 1, "seq": 8}
    model = apply_lora(build_tiny_model(TinyModelSpec(**setup["model"]), 300), LoraSpec(r=2, alpha=4))
    train_step(model, make_optimizer(model), random_batch(setup), [])
    del model
    gc.collect()


def memory_child(name: str, setup: dict, world: dict) -> dict:
    """Peak footprint of one configuration's training steps, in this (fresh) process."""
    import resource

    _prime()
    exact = benchlib.reset_peak_rss()
    rss0 = benchlib.rss_bytes()
    model, naive = build_models(setup, naive=(name == "kl_naive_copy"))
    defenses = make_defenses(step_defenses(setup, world)[name], defense_context(world))
    legacy = name.endswith(BEFORE)
    for d in defenses:
        d.attach(model)
    model.train()
    optimizer, batch = make_optimizer(model), random_batch(setup)
    train_step(model, optimizer, batch, defenses, naive, legacy)
    gc.collect()
    rss_before = benchlib.rss_bytes()
    benchlib.reset_peak_rss()
    for _ in range(setup["mem_steps"]):
        train_step(model, optimizer, batch, defenses, naive, legacy)
    peak = benchlib.peak_rss_bytes() if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"footprint": peak - rss0, "step_extra": peak - rss_before, "exact": exact,
            "extra_model_bytes": tensor_bytes(naive) if naive is not None else 0}


def safelora_child(setup: dict, world: dict, legacy: bool = False) -> dict:
    """SafeLoRA finalize in a fresh process: time, peak extra RSS, layer sizes (``legacy``: scored
    as before issue 18, through ΔW)."""
    from emtune.defenses import safelora as module
    from emtune.defenses.safelora import lora_layers

    _prime()
    model, _ = build_models(setup, naive=False)
    # τ = 0.99 projects nearly every layer: the most work finalize can do
    defense = make_defenses(("safelora", {"threshold": 0.99, "base_source": world["safelora_base"]}),
                            defense_context(world))[0]
    shapes = [m.get_base_layer().weight.shape for m in lora_layers(model).values()]
    gc.collect()
    exact = benchlib.reset_peak_rss()
    before = benchlib.rss_bytes()
    start = time.perf_counter()
    if legacy:
        module.score_layers, current = legacy_safelora_scores, module.score_layers
    try:
        logs = defense.finalize(model)
    finally:
        if legacy:
            module.score_layers = current
    seconds = time.perf_counter() - start
    extra = benchlib.peak_rss_bytes() - before
    return {"seconds": seconds, "extra": extra, "exact": exact, "projected": logs["safelora/projected_layers"],
            "layers": len(shapes), "largest_c": max(o * o for o, _ in shapes) * 4,
            "largest_v": max(o * i for o, i in shapes) * 4, "all_c": sum(o * o for o, _ in shapes) * 4}


def memory_context() -> Any:
    """A forkserver whose children start with the heavy imports done and no tensor work run."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when the server process starts
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "peft", "transformers.models.qwen2.modeling_qwen2",
                                "emtune.models", "emtune.defenses.registry", "emtune.train.trainer", "benchlib"])
    return ctx


def _child_entry(conn: Any, fn: Any, threads: int, args: tuple) -> None:
    import torch

    torch.set_num_threads(threads)
    conn.send(fn(*args))
    conn.close()


def in_fresh_process(ctx: Any, threads: int, fn: Any, *args: Any) -> dict:
    """``fn(*args)`` in a new process forked from the preloaded server; its return value."""
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child_entry, args=(writer, fn, threads, args))
    started = time.perf_counter()
    process.start()
    writer.close()
    while not reader.poll(1.0):
        if not process.is_alive():
            raise RuntimeError(f"memory process for {fn.__name__} died with exit code {process.exitcode}")
    result = reader.recv()
    process.join()
    result["wall_s"] = time.perf_counter() - started
    return result


# --- timing: one process, configurations round-robin -----------------------------------------


def adapter_toggle_cost(model: Any, reps: int = 20) -> dict[str, float]:
    """CPU seconds to switch the adapter off and on: peft's ``disable_adapter()`` context (what the
    reference pass used before issue 18) vs. emtune's cached switch (``adapters_disabled``)."""
    from emtune.train.reference import adapters_disabled

    def context() -> None:
        with model.disable_adapter():
            pass

    def direct() -> None:
        with adapters_disabled(model):
            pass

    out = {}
    for name, fn in (("peft_context", context), ("direct", direct)):
        times = []
        for _ in range(reps):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        out[name] = benchlib.median(times)
    return out


def run_timing(setup: dict, world: dict) -> dict:
    """Median step time per loss/hook configuration and per-token time per data configuration."""
    import torch

    from emtune.defenses.kl_to_reference import kl_to_reference_loss
    from emtune.defenses.safelora import lora_layers
    from emtune.train.trainer import ReferenceOutputs, defended_loss

    model, naive = build_models(setup, naive=True)
    model.train()
    optimizer, batch = make_optimizer(model), random_batch(setup)
    context = defense_context(world, world["tokenizer"])
    cases: dict[str, dict] = {}
    for name, entry in step_defenses(setup, world).items():
        cases[name] = {"defenses": make_defenses(entry, context), "batches": [batch] * setup["steps"],
                       "naive": naive if name == "kl_naive_copy" else None, "times": [], "wall": []}
    # the adapter-disabled forward alone (no step): the floor of what KL and feature-l2 add
    for name, reference in ((REFERENCE_PASS, ReferenceOutputs), (REFERENCE_PASS_BEFORE, LegacyReference)):
        cases[name] = {"defenses": [], "batches": [batch] * setup["steps"], "naive": None, "times": [],
                       "wall": [], "reference_only": reference}
    one_off: dict[str, dict[str, float]] = {}
    for name, entry in data_defenses(setup, world).items():
        defenses = make_defenses(entry, context)
        rows, seconds = world["rows"], []
        for _ in range(2):  # cold, then warm (Interleaving++ reads its score cache the second time)
            start = time.perf_counter()
            rows = world["rows"]
            for d in defenses:
                rows = d.transform_data(rows)
            seconds.append(time.perf_counter() - start)
        for grouped in (True, False) if name in ("none (data)", "interleaving") else (True,):
            label = name if grouped else name + BEFORE
            batches, tokens, positions = data_batches(rows, world["tokenizer"], setup, grouped)
            one_off[label] = {"cold": seconds[0], "warm": seconds[1], "rows": len(rows)}
            cases[label] = {"defenses": defenses, "batches": batches, "tokens": tokens, "positions": positions,
                            "naive": None, "times": [], "wall": []}

    with torch.no_grad():  # the two KL variants compute the same number
        out = model(**batch)
        ours = kl_to_reference_loss(out.logits, ReferenceOutputs(model, batch, False)().logits,
                                    batch["attention_mask"].bool())
        theirs = kl_to_reference_loss(out.logits, naive(input_ids=batch["input_ids"]).logits,
                                      batch["attention_mask"].bool())
        kl = cases["kl_to_reference"]["defenses"]
        chunked = defended_loss(model, batch, kl)[1]["kl_to_reference"]
        full = legacy_defended_loss(model, batch, kl)[1]["kl_to_reference"]
    kl_check = (float(ours), abs(float(ours) - float(theirs)), abs(float(chunked) - float(full)))

    for round_index in range(setup["warmup"] + setup["reps"]):
        for name, case in cases.items():
            for d in case["defenses"]:
                d.attach(model)
            start, cpu_start = time.perf_counter(), time.process_time()
            for b in case["batches"]:
                if case.get("reference_only"):
                    case["reference_only"](model, b, False)()
                else:
                    train_step(model, optimizer, b, case["defenses"], case["naive"], name.endswith(BEFORE))
            cpu, wall = time.process_time() - cpu_start, time.perf_counter() - start
            for d in case["defenses"]:
                d.detach(model)
            if round_index >= setup["warmup"]:
                case["times"].append(cpu)
                case["wall"].append(wall)
        print(f"  round {round_index + 1}/{setup['warmup'] + setup['reps']} done", flush=True)

    safelora = cases["safelora"]["defenses"][0]
    pairs = safelora.weight_pairs(model)
    from emtune.defenses.safelora import score_layers

    new_scores, old_scores = score_layers(model, pairs), legacy_safelora_scores(model, pairs)
    exact = legacy_safelora_scores(model, pairs, torch.float64)  # the formula in double precision
    score_diff = (max(abs(new_scores[k] - old_scores[k]) for k in new_scores),
                  max(abs(new_scores[k] - exact[k]) for k in new_scores),
                  max(abs(old_scores[k] - exact[k]) for k in new_scores))
    finalize = []
    for _ in range(max(3, setup["reps"] // 2)):
        start = time.perf_counter()
        safelora.finalize(model)
        finalize.append(time.perf_counter() - start)
    return {"cases": cases, "one_off": one_off, "finalize": finalize, "kl_check": kl_check, "score_diff": score_diff,
            "toggle": adapter_toggle_cost(model), "lora_layers": len(lora_layers(model)),
            "params": tensor_bytes(model), "naive_params": tensor_bytes(naive)}


# --- report ----------------------------------------------------------------------------------


def _why(name: str, fails: list[str], step_ms: dict, per_logit: dict) -> str:
    """Reason and next step for a missed KL / feature-l2 / steering target, from the measurements."""
    reasons = []
    reference = step_ms[REFERENCE_PASS] / step_ms["none"]
    if "time" in fails and name in ("kl_to_reference", "feature_l2"):
        reasons.append(
            f"Why (time): the adapter-disabled reference forward alone costs {reference:.2f}× an undefended "
            f"step (LoRA's backward skips the frozen weights' gradients, so a step is only ~2-3 forwards), so "
            f"{1 + reference:.2f}× is the floor for any reference recomputed every step; the defense's own math "
            f"adds the rest. Next: compute the reference once per example and reuse it across epochs "
            f"(top-k logits / pooled features), or regularise every k-th step; else relax the target to ~1.5×.")
    if "memory" in fails and name == "kl_to_reference":
        reasons.append(
            f"Why (memory): {per_logit[name]:.1f} bytes per logit remain (before: "
            f"{per_logit[name + BEFORE]:.1f}): the KL's gradient of the trained logits (one [B, T, V] tensor "
            f"in their dtype, added to the task loss's), the reference's hidden states and one chunk of float32 "
            f"temporaries; the reference's logits are never formed. On CPU the model is float32, so that gradient "
            f"is 4 bytes per logit; under bf16 on a GPU it is 2. Next: fuse the task loss into the same chunked "
            f"pass (the trained logits' gradient then never exists whole either).")
    if "memory" in fails and name == "feature_l2":
        reasons.append(
            f"Why (memory): the reference pass keeps every layer's hidden states (output_hidden_states) while the "
            f"features are pooled; {per_logit[name]:.1f} bytes per logit here. Next: capture only the selected "
            f"layers with forward hooks instead of output_hidden_states.")
    if "time" in fails and name == "persona_steering":
        reasons.append("Why: one tensor add per step per block; check the noise band (IQR) before acting.")
    return " ".join(reasons)


def _ratio(value: float, base: float) -> float:
    return value / base if base else float("nan")


def build_section(size: str, setup: dict, timing: dict, memory: dict, safelora: dict, info: dict,
                  load_start: tuple) -> tuple[str, list[str]]:
    """The markdown section of one size, and the list of missed targets."""
    med, cases = benchlib.median, timing["cases"]
    step_ms = {n: 1000 * med(c["times"]) / len(c["batches"]) for n, c in cases.items() if "tokens" not in c}
    wall_ms = {n: 1000 * med(c["wall"]) / len(c["batches"]) for n, c in cases.items() if "tokens" not in c}
    foot = {n: med([m["footprint"] for m in runs]) for n, runs in memory.items()}
    missed: list[str] = []
    logits = setup["batch"] * setup["seq"] * setup["vocab"]
    per_logit = {n: (foot[n] - foot["none"]) / logits for n in ("kl_to_reference", "feature_l2",
                                                                  "kl_to_reference" + BEFORE, "feature_l2" + BEFORE)}
    rows = []
    for name, ms in step_ms.items():
        if name in (REFERENCE_PASS, REFERENCE_PASS_BEFORE):
            rows.append([name, f"{ms:.1f} ({benchlib.spread(cases[name]['times'])})", f"{wall_ms[name]:.1f}",
                         f"{_ratio(ms, step_ms['none']):.2f}", "–", "–", "–", "–",
                         "floor: KL/feature-l2 ≥ 1 + this"])
            continue
        t_ratio, m_ratio = _ratio(ms, step_ms["none"]), _ratio(foot[name], foot["none"])
        time_limit, mem_limit = TARGETS.get(name, (None, None))
        target, result = "–", "before issue 18" if name.endswith(BEFORE) else "info"
        if time_limit is not None:
            target = f"time ≤ {time_limit:.2f}×" + (f", memory ≤ {mem_limit:.2f}×" if mem_limit else "")
            fails = [what for what, value, limit in (("time", t_ratio, time_limit), ("memory", m_ratio, mem_limit))
                     if limit is not None and benchlib.verdict(value, limit) == "MISS"]
            result = "PASS" if not fails else "MISS (" + ", ".join(fails) + ")"
            if fails:
                missed.append(f"{name}: " + ", ".join(f"{w} {v:.2f}× > {l:.2f}×" for w, v, l in
                                                      (("time", t_ratio, time_limit), ("memory", m_ratio, mem_limit))
                                                      if w in fails) + ". " + _why(name, fails, step_ms, per_logit))
        rows.append([name, f"{ms:.1f} ({benchlib.spread(cases[name]['times'])})", f"{wall_ms[name]:.1f}",
                     f"{t_ratio:.2f}", benchlib.mib(foot[name]), f"{(foot[name] - foot['none']) / 2**20:+.1f}",
                     f"{m_ratio:.2f}", target, result])
    step_table = benchlib.markdown_table(
        ["configuration", "CPU ms / step (median, IQR)", "wall ms / step", "time × none", "peak footprint MiB",
         "Δ MiB", "memory × none", "target", "result"], rows)

    rows = []
    for name, case in cases.items():
        if "tokens" not in case:
            continue
        before = name.endswith(BEFORE)
        base_case = cases["none (data)" + (BEFORE if before else "")]  # each order against its own baseline
        per_tok = med(case["times"]) / case["tokens"]
        ratio = _ratio(per_tok, med(base_case["times"]) / base_case["tokens"])
        one = timing["one_off"][name]
        is_base = case is base_case
        result = "–" if is_base else ("before issue 18" if before else benchlib.verdict(ratio, PER_TOKEN_LIMIT))
        per_pos = _ratio(med(case["times"]) / case["positions"], med(base_case["times"]) / base_case["positions"])
        if result == "MISS":
            pad, pad0 = (1 - case["tokens"] / case["positions"], 1 - base_case["tokens"] / base_case["positions"])
            missed.append(
                f"{name}: {ratio:.2f}× time per trained token > {PER_TOKEN_LIMIT:.2f}×. Why: per computed position "
                f"it is {per_pos:.2f}× (the defense adds no per-step work); the mixed-in rows have other lengths, so "
                f"{100 * pad:.0f}% of the computed positions are padding vs {100 * pad0:.0f}% undefended, even in "
                f"length-grouped batches. Next: packing rows into full-length sequences.")
        pad_factor = _ratio(case["positions"] / case["tokens"], base_case["positions"] / base_case["tokens"])
        rows.append([name, one["rows"], f"{case['tokens']} ({_ratio(case['tokens'], base_case['tokens']):.2f}×)",
                     f"{case['positions']} ({_ratio(case['positions'], base_case['positions']):.2f}×)",
                     f"{case['positions'] / case['tokens']:.3f} ({pad_factor:.3f}×)",
                     f"{1e6 * per_tok:.1f} ({benchlib.spread(case['times'])})",
                     f"{1e6 * med(case['wall']) / case['tokens']:.1f}", f"{ratio:.2f}", f"{per_pos:.2f}",
                     f"{one['cold']:.2f} / {one['warm']:.2f}",
                     "–" if is_base or before else f"≤ {PER_TOKEN_LIMIT:.2f}× (1.0× ± noise)", result])
    data_table = benchlib.markdown_table(
        ["configuration", "rows", "trained tokens", "computed positions (incl. padding)",
         "positions per trained token (× none; issue 18: ≤ 1.02×)",
         "CPU µs / trained token (median, IQR)", "wall µs / token", "per token × none", "per position × none",
         "transform_data s (cold / warm)", "target", "result"], rows)

    naive_extra = med([m["extra_model_bytes"] for m in memory["kl_naive_copy"]])
    kl_rows = [
        ["adapter-disabled (emtune)", "0.0", benchlib.mib(foot["kl_to_reference"]), f"{step_ms['kl_to_reference']:.1f}"],
        ["second full copy (naive)", benchlib.mib(naive_extra), benchlib.mib(foot["kl_naive_copy"]),
         f"{step_ms['kl_naive_copy']:.1f}"],
        ["naive ÷ emtune", "–", f"{_ratio(foot['kl_naive_copy'], foot['kl_to_reference']):.2f}×",
         f"{_ratio(step_ms['kl_naive_copy'], step_ms['kl_to_reference']):.2f}×"],
    ]
    kl_table = benchlib.markdown_table(["KL reference", "extra params+buffers MiB", "peak footprint MiB", "step ms"],
                                       kl_rows)
    saved = foot["kl_naive_copy"] - foot["kl_to_reference"]

    resolution = 1 << 20
    safelora_before = safelora["before"]
    c_ratio = _ratio(safelora["extra"], safelora["largest_c"])
    if safelora["largest_c"] < resolution:
        sl_result = "n/a (C below the ~1 MiB resolution of RSS)"
    else:
        sl_result = benchlib.verdict(c_ratio, 1.25)
        if sl_result == "MISS":
            missed.append(f"safelora finalize: peak extra {benchlib.mib(safelora['extra'])} MiB = {c_ratio:.2f}× the "
                          f"largest layer's C ({benchlib.mib(safelora['largest_c'])} MiB). Why: V and the base tensor "
                          f"it is read from (out × in each) are what remains per layer; see the note above.")
    sl_table = benchlib.markdown_table(
        ["scoring", "layers (projected)", "finalize s: in training process (median) / fresh process",
         "peak extra RSS MiB", "largest layer C MiB (V MiB)", "extra ÷ largest C", "all layers' C MiB", "target",
         "result"],
        [["through ΔW (before issue 18)", f"{safelora_before['layers']} ({safelora_before['projected']})",
          f"– / {safelora_before['seconds']:.3f}", benchlib.mib(safelora_before["extra"]),
          f"{benchlib.mib(safelora['largest_c'])} ({benchlib.mib(safelora['largest_v'])})",
          f"{_ratio(safelora_before['extra'], safelora['largest_c']):.2f}", benchlib.mib(safelora["all_c"]), "–",
          "before issue 18"],
         ["rank space (now)", f"{safelora['layers']} ({safelora['projected']})",
          f"{med(timing['finalize']):.3f} / {safelora['seconds']:.3f}", benchlib.mib(safelora["extra"]),
          f"{benchlib.mib(safelora['largest_c'])} ({benchlib.mib(safelora['largest_v'])})", f"{c_ratio:.2f}",
          benchlib.mib(safelora["all_c"]), "≤ 1.25 × one layer's C", sl_result]])
    sl_note = (f"Neither way forms a C (materialising every layer's C would take the 'all layers' C' column). "
               f"Before, each layer also held ΔW = s·B·A and C·ΔW (out × in) and the intermediate Vᵀ·ΔW (in × in: "
               f"for an MLP down projection that is intermediate², as large as the largest C). Scored in rank "
               f"space, a layer holds V (out × in, the base tensor converted into it in place) and the tensor "
               f"read from safetensors, plus r-wide products. Largest |score difference| between the two ways: "
               f"{timing['score_diff'][0]:.1e} (target ≤ 1e-5); against the formula in float64: now "
               f"{timing['score_diff'][1]:.1e}, before {timing['score_diff'][2]:.1e} (the difference is the old "
               f"float32 cosine over out × in elements).")

    exact = all(m["exact"] for runs in memory.values() for m in runs)
    lora = setup["lora"] or {"r": 32, "alpha": 64, "use_rslora": True}
    kl_value, kl_diff, chunk_diff = timing["kl_check"]
    lines = [
        f"## size: {size}",
        "",
        f"Model: random-init Qwen2 shape {json.dumps(setup['model'] or 'TinyModelSpec() defaults')}, vocabulary "
        f"{setup['vocab']}, {timing['params'] / 4 / 1e6:.2f}M parameters incl. LoRA ({benchlib.mib(timing['params'])} "
        f"MiB float32); LoRA {json.dumps(lora)} on all projections; batch {setup['batch']} × seq {setup['seq']}; "
        f"{setup['steps']} step(s) per turn, {setup['warmup']} warm-up round(s) + {setup['reps']} timed rounds, "
        f"memory over {setup['mem_steps']} steps in {setup['mem_reps']} fresh process(es) per configuration.",
        "",
        *benchlib.conditions_lines(load_start, info),
        "",
        "Peak memory method: " + ("VmHWM after resetting it through /proc/self/clear_refs" if exact else
                                  "ru_maxrss (the peak could not be reset)") +
        ", fresh forkserver process per configuration, MALLOC_MMAP_THRESHOLD_=65536; footprint = peak − RSS "
        "before the model was built.",
        "",
        "### Loss and hook defenses (one training step)",
        "",
        step_table,
        "",
        f"Time is the process CPU time of the steps ({setup['threads']} intra-op thread(s)): unlike wall time it "
        f"barely moves when other jobs share the cores; ratios use it, wall time is shown beside it. "
        f"Peak memory extra per logit (B·T·V = {logits}): KL {per_logit['kl_to_reference']:.1f} bytes, "
        f"feature-l2 {per_logit['feature_l2']:.1f} bytes (float32 [B, T, V] tensors are 4 bytes per logit).",
        "",
        "### Data defenses (time per trained token)",
        "",
        f"{setup['data_rows']} rows of fixture:narrow_bad_advice, interleaving ratio {setup['interleave_ratio']} "
        f"(Interleaving++ scores a 64-row pool under 2 LoRA adapters).",
        "",
        data_table,
        "",
        "### KL reference: emtune's adapter-disabled pass vs. a second full copy",
        "",
        kl_table,
        "",
        f"The adapter-disabled reference saves {benchlib.mib(saved)} MiB of peak footprint here "
        f"({benchlib.mib(naive_extra)} MiB of it is the copy's weights: on a 7B bf16 model that is ~14 GiB). "
        f"Both give the same KL: {kl_value:.6f} (|difference| {kl_diff:.1e}); the chunked KL term (now) and "
        f"the full-vocabulary one (before) differ by {chunk_diff:.1e}. Switching the adapter off and on "
        f"through peft's `disable_adapter()` (before issue 18) costs {1000 * timing['toggle']['peft_context']:.1f} "
        f"ms CPU per step (it calls `get_model_status()`, which walks every module and parameter); emtune's "
        f"cached switch over the {timing['lora_layers']} LoRA layers (`adapters_disabled`) costs "
        f"{1000 * timing['toggle']['direct']:.2f} ms.",
        "",
        "### SafeLoRA finalize",
        "",
        sl_table,
        "",
        sl_note,
        "",
    ]
    if missed:
        lines += ["### Targets missed", ""] + [f"- {m}" for m in missed] + [""]
    return "\n".join(lines), missed


INTRO = """Written by `bench/defense_overhead.py` (see its docstring for the method). Each section is one
`--size`; all ratios are against the undefended run measured in the same invocation, interleaved.
Targets (issues 7 and 18): KL and feature-l2 step time ≤ 1.3× and peak memory ≤ 1.1×; persona
steering ≤ 1.05×; inoculation and interleaving 1.0× per trained token (±5% noise band; issue 18:
≤ 1.02× from padding); SafeLoRA's finalize ≤ 1.25× one layer's C. Rows marked "(before)" are the
code before issue 18, measured in the same run."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch", type=int, help="rows per step (default: per size)")
    parser.add_argument("--seq", type=int, help="tokens per row (default: per size)")
    parser.add_argument("--reps", type=int, help="timed rounds (default: per size)")
    parser.add_argument("--steps", type=int, help="steps per turn of a loss/hook configuration")
    parser.add_argument("--warmup", type=int, default=1, help="rounds dropped before timing")
    parser.add_argument("--mem-steps", type=int, default=2, help="steps measured per memory process")
    parser.add_argument("--mem-reps", type=int, default=1, help="fresh processes per configuration")
    parser.add_argument("--data-rows", type=int, help="task rows of the data defenses (default: per size)")
    parser.add_argument("--interleave-ratio", type=float, default=0.25,
                        help="safe rows per task row (paper sweeps 0.01-0.5; 0.25 keeps a short pass non-trivial)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: on a shared 2-core machine 2 threads stall on each other)")
    parser.add_argument("--report", type=Path, default=benchlib.REPORTS / "defense_overhead.md")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    setup = {k: v for k, v in SIZES[args.size].items()}
    setup.setdefault("vocab", 512)
    for key in ("batch", "seq", "reps", "steps"):
        if getattr(args, key) is not None:
            setup[key] = getattr(args, key)
    setup.update(warmup=args.warmup, mem_steps=args.mem_steps, mem_reps=args.mem_reps,
                 interleave_ratio=args.interleave_ratio, threads=args.threads)
    if args.data_rows is not None:
        setup["data_rows"] = args.data_rows
    load_start = os.getloadavg()
    print(f"load average at start: {load_start}", flush=True)
    started = time.perf_counter()
    info = benchlib.machine_description()
    ctx = memory_context()
    with tempfile.TemporaryDirectory(prefix="emtune-bench-") as tmp:
        world = prepare_world(setup, Path(tmp), with_selected=True)
        print(f"prepared files in {time.perf_counter() - started:.0f} s", flush=True)
        print(f"timing {args.size}: {setup['warmup'] + setup['reps']} rounds", flush=True)
        timing = run_timing(setup, world)
        print(f"timing done at {time.perf_counter() - started:.0f} s", flush=True)
        child_world = {k: world[k] for k in ("root", "persona", "safelora_base")}
        memory: dict[str, list[dict]] = {name: [] for name in step_defenses(setup, child_world)}
        for _ in range(setup["mem_reps"]):
            for name in memory:
                print(f"  memory: {name}", flush=True)
                memory[name].append(in_fresh_process(ctx, args.threads, memory_child, name, setup, child_world))
        safelora = in_fresh_process(ctx, args.threads, safelora_child, setup, child_world)
        safelora["before"] = in_fresh_process(ctx, args.threads, safelora_child, setup, child_world, True)
    section, missed = build_section(args.size, setup, timing, memory, safelora, info, load_start)
    section += f"\nWall time of this run: {time.perf_counter() - started:.0f} s.\n"
    print(section)
    path = benchlib.update_report(args.report, "Defense overhead", INTRO, args.size, section,
                                  order=list(SIZES))
    print(f"wrote {path}; {len(missed)} target(s) missed")


if __name__ == "__main__":
    main()
