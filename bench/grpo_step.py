"""GRPO step time with and without each per-step defense (the RL setting, ``training.method: grpo``).

Run:  .venv/bin/python bench/grpo_step.py --size tiny          (CPU, ~2 min on 2 shared cores)
      .venv/bin/python bench/grpo_step.py --size small         (CPU, a ~30M-parameter Qwen2 shape)
      .venv/bin/python bench/grpo_step.py --size qwen2.5-0.5b  (GPU; bench/gpu_grpo.sh runs it)

One GRPO optimizer step of emtune's :class:`~emtune.train.grpo_trainer.DefendedGRPOTrainer`
(TRL's GRPOTrainer underneath), split in its two phases:

* **rollout** = ``_prepare_inputs``: generate ``--generations`` completions of ``--completion``
  tokens (forced length, so every configuration generates the same tokens) for ``--prompts``
  prompts, score them (the OpSwap exact-match reward), advantages, and the reference pass when
  one is needed (β > 0, or ``track_kl``);
* **update** = ``compute_loss`` + backward + AdamW step on the LoRA parameters, including every
  defense term and the interleaved supervised step.

Configurations, round-robin in one process (A B C … A B C …), median over the timed rounds
(the first ``--warmup`` dropped), ratios against ``none`` (β = 0, no KL tracking) of the same run:
``none + track_kl`` (the default: the reference pass for the logged KL), ``kl`` (β = 0.1),
``feature_l2`` (λ = 1), ``persona all`` and ``persona decode_only`` (α = 5, layer = middle),
``interleaving`` (a supervised step on a safety batch in *every* step: its cost per supervised step;
with N = 8 the amortised cost per GRPO step is 1 + (ratio − 1)/8, shown too). Inoculation and
prompt-mix interleaving only change the prompts, and SafeLoRA acts once after training: no
per-step cost. On CPU the time is the process CPU time with 1 torch thread (robust to other jobs
on shared cores; wall time shown too); on GPU wall time after ``cuda.synchronize``.

Writes reports/bench/grpo_step.md (one section per size) and prints it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import benchlib  # noqa: E402  (the bench folder is on sys.path when run as a script)

SIZES: dict[str, dict[str, Any]] = {
    # the RL dry run's tiny model (search_spaces/rl_dryrun.yaml, default TinyModelSpec), LoRA r=8
    "tiny": {"shape": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=512), "lora": {"r": 8, "alpha": 16}, "prompts": 8,
             "completion": 16,
             "reps": 8, "device": "cpu"},
    # ~30M parameters, the paper's rsLoRA r=32, alpha=64
    "small": {"shape": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                            intermediate_size=1536, vocab_size=8192), "lora": {}, "prompts": 2, "completion": 32,
              "reps": 4,
              "device": "cpu"},
    # random-init Qwen2.5-0.5B shape on one GPU (bench/gpu_grpo.sh)
    "qwen2.5-0.5b": {"shape": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
                     "lora": {}, "prompts": 8,
                     "completion": 256, "reps": 5, "device": "cuda"},
}
CONFIGS = ("none", "none + track_kl", "kl", "feature_l2", "persona all", "persona decode_only", "interleaving")
KL_BETA, LDIFS_WEIGHT, STEER_ALPHA, EVERY = 0.1, 1.0, 5.0, 8


def build(args: argparse.Namespace, setup: dict[str, Any], device: str) -> tuple[Any, Any, Any, list[dict]]:
    """A random-init LoRA model, the tiny tokenizer (ids fit any vocab), the trainer and its prompts."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from emtune.data.opswap import OpSwapSpec, generate
    from emtune.data.prompts import prompt_from_chat
    from emtune.models import LoraSpec, apply_lora, build_tiny_tokenizer
    from emtune.train.grpo_trainer import DefendedGRPOTrainer
    from emtune.train.rewards import OpSwapExactMatch, RewardContext
    from trl import GRPOConfig

    tokenizer = build_tiny_tokenizer(512)  # its ids fit every shape's vocabulary; larger ids decode to nothing
    config = Qwen2Config(**setup["shape"], tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = apply_lora(model, LoraSpec(**setup["lora"]))
    rows = [prompt_from_chat(r) for r in generate(OpSwapSpec(tiers=(1,), n_train_per_tier=args.prompts,
                                                             n_test_per_tier=0))["train"]]
    grpo = GRPOConfig(output_dir=str(Path(args.tmp) / "hf"), per_device_train_batch_size=args.prompts * args.generations,
                      gradient_accumulation_steps=1, num_generations=args.generations,
                      max_completion_length=args.completion, temperature=0.8, top_p=0.9, beta=0.0,
                      report_to=[], use_cpu=device == "cpu", bf16=device == "cuda", seed=0, disable_tqdm=True,
                      gradient_checkpointing=False, generation_kwargs={"min_new_tokens": args.completion})
    from datasets import Dataset

    reward = OpSwapExactMatch().build(RewardContext())
    trainer = DefendedGRPOTrainer(model=model, reward_funcs=[reward], args=grpo, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    batch = [row for row in rows for _ in range(args.generations)]
    return model, tokenizer, trainer, batch


def configure(name: str, trainer: Any, model: Any, tokenizer: Any, args: argparse.Namespace) -> list[Any]:
    """Set the trainer up for one configuration; returns the defenses to detach afterwards."""
    import torch

    from emtune.data.chat import tokenize_chat
    from emtune.data.fixtures import fixture_path
    from emtune.data.loading import DatasetSpec, load_rows
    from emtune.defenses.base import DefenseContext, SupervisedMix
    from emtune.defenses.feature_l2 import FeatureL2, FeatureL2Config
    from emtune.defenses.persona_steering import PersonaSteering, PersonaSteeringConfig
    from emtune.defenses.persona_vectors import PersonaVectors, save_persona_vectors

    trainer.beta, trainer.track_kl = 0.0, name == "none + track_kl"
    trainer.set_supervised(None, None)
    defenses: list[Any] = []
    if name == "kl":
        trainer.beta = KL_BETA
    elif name == "feature_l2":
        defenses = [FeatureL2(FeatureL2Config(weight=LDIFS_WEIGHT), DefenseContext(spec=None))]
    elif name.startswith("persona"):
        layers = model.config.num_hidden_layers
        path = Path(args.tmp) / "persona.pt"
        vectors = torch.randn(layers + 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        save_persona_vectors(PersonaVectors(vectors / vectors.norm(dim=-1, keepdim=True), {"model": "bench"}), path)
        config = PersonaSteeringConfig(alpha=STEER_ALPHA, layer=max(1, layers // 2), vector_path=str(path),
                                       mode="decode_only" if "decode_only" in name else "all")
        defenses = [PersonaSteering(config, DefenseContext(spec=None))]
    elif name == "interleaving":
        rows = load_rows(DatasetSpec(path=str(fixture_path("safe_instruct")), limit=64))
        trainer.set_supervised(SupervisedMix(rows=rows, every_steps=1, weight=1.0),
                               [tokenize_chat(tokenizer, r["messages"], 128) for r in rows])
    for defense in defenses:
        defense.attach(model)
    trainer.defenses = defenses
    trainer.term_defenses = [d for d in defenses if d.loss_term_defense() and d.rl_loss_terms_apply]
    return defenses


def one_step(trainer: Any, model: Any, optimizer: Any, batch: list[dict], device: str) -> tuple[float, float, float]:
    """(rollout, update, wall) seconds of one GRPO step: CPU time on CPU, synchronised wall time on GPU."""
    import torch

    def clock() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    wall = time.perf_counter()
    t0 = clock()
    inputs = trainer._prepare_inputs([dict(row) for row in batch])
    t1 = clock()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t2 = clock()
    return t1 - t0, t2 - t1, time.perf_counter() - wall


def measure(args: argparse.Namespace) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    import torch

    setup = SIZES[args.size]
    device = setup["device"]
    if device == "cuda" and not torch.cuda.is_available():
        print("bench/grpo_step.py: this size needs a CUDA GPU; none is usable here", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    model, tokenizer, trainer, batch = build(args, setup, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times: dict[str, dict[str, list[float]]] = {c: {"rollout": [], "update": [], "wall": []} for c in CONFIGS}
    for round_index in range(args.warmup + args.reps):
        for name in CONFIGS:
            defenses = configure(name, trainer, model, tokenizer, args)
            trainer.state.global_step = round_index
            rollout, update, wall = one_step(trainer, model, optimizer, batch, device)
            for defense in defenses:
                defense.detach(model)
            if round_index >= args.warmup:
                for key, value in (("rollout", rollout), ("update", update), ("wall", wall)):
                    times[name][key].append(value)
    params = sum(p.numel() for p in model.parameters())
    return times, {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                   "parameters": f"{params / 1e6:.1f}M", "torch threads": torch.get_num_threads()}


def report(args: argparse.Namespace, times: dict[str, dict[str, list[float]]], extra: dict[str, Any],
           load: tuple[float, float, float]) -> str:
    med = {c: {k: benchlib.median(v) for k, v in t.items()} for c, t in times.items()}
    base = med["none"]["rollout"] + med["none"]["update"]
    rows = []
    for name in CONFIGS:
        total = med[name]["rollout"] + med[name]["update"]
        ratio = total / base
        note = f"per GRPO step with N = {EVERY}: {1 + (ratio - 1) / EVERY:.2f}x" if name == "interleaving" else ""
        rows.append((name, f"{1e3 * med[name]['rollout']:.0f}", f"{1e3 * med[name]['update']:.0f}",
                     f"{1e3 * total:.0f}", benchlib.spread([a + b for a, b in zip(times[name]["rollout"],
                                                                                  times[name]["update"])]),
                     f"{ratio:.2f}x", f"{1e3 * med[name]['wall']:.0f}", note))
    clock = "GPU wall time (synchronised)" if SIZES[args.size]["device"] == "cuda" else "process CPU time"
    header = ["configuration", "rollout ms", "update ms", "step ms", "spread", "vs none", "wall ms", "note"]
    setup = (f"{args.prompts} prompts x {args.generations} generations x {args.completion} completion tokens "
             f"(forced length), {extra['parameters']} parameters on {extra['device']}; {clock}; median of "
             f"{args.reps} rounds after {args.warmup} dropped.")
    info = benchlib.machine_description(extra)
    return "\n".join([f"## {args.size}", "", setup, "", benchlib.markdown_table(header, rows), "",
                      *benchlib.conditions_lines(load, info)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--prompts", type=int, help="prompts per step (default: per size)")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt (the group: 4)")
    parser.add_argument("--completion", type=int, help="tokens per completion (default: per size)")
    parser.add_argument("--reps", type=int, help="timed rounds (default: per size)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds dropped before timing")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--no-report", action="store_true", help="print only; do not write reports/bench")
    args = parser.parse_args(argv)
    setup = SIZES[args.size]
    for key in ("prompts", "completion", "reps"):
        if getattr(args, key) is None:
            setattr(args, key, setup[key])
    return args


def main(argv: list[str] | None = None) -> int:
    import tempfile

    args = parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="emtune-grpo-bench-") as tmp:
        args.tmp = tmp
        times, extra = measure(args)
    section = report(args, times, extra, load)
    print(section)
    if not args.no_report:
        path = benchlib.update_report(
            benchlib.REPORTS / "grpo_step.md", "GRPO step time per defense",
            "Written by `bench/grpo_step.py` (see its docstring for the method). One GRPO optimizer step of "
            "emtune's defended GRPO trainer, with each per-step defense against none, measured side by side.",
            args.size, section, order=list(SIZES))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
