"""Shared fixtures: offline Hugging Face, a per-session model cache, tiny specs and models."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("MLFLOW_RUN_ID", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

TINY_SPEC = """
name: {name}
seed: 0
output_dir: {output_dir}
model:
  source: tiny
  tiny: {{pretrain_steps: {pretrain_steps}}}
lora: {{r: 4, alpha: 8}}
data:
  train: {{path: "fixture:narrow_bad_advice", limit: 60}}
  heldout_fraction: 0.2
  max_length: 128
training:
  learning_rate: 1.0e-2
  max_steps: {max_steps}
  per_device_batch_size: 4
  gradient_accumulation_steps: 1
  warmup_steps: 0
defenses:
  - name: kl_to_reference
    weight: 0.1
search:
  parameters:
    kl_weight: {{type: float, target: defenses.kl_to_reference.weight, low: 1.0e-3, high: 10.0, log: true}}
  sampler: {{name: tpe}}
  num_trials: {num_trials}
objectives:
  - {{name: ood_drift, direction: minimize, reference: 5.0}}
  - {{name: indomain_nll, direction: minimize, reference: 8.0}}
evaluation:
  samples_per_question: 1
  max_new_tokens: 6
resources: {{max_concurrent_trials: 2}}
baselines: {{enabled: {baselines}}}
"""


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny-model cache per test session (EMTUNE_CACHE_DIR), shared by every test."""
    cache = tmp_path_factory.mktemp("emtune-cache")
    os.environ["EMTUNE_CACHE_DIR"] = str(cache)
    return cache


@pytest.fixture
def write_spec(tmp_path: Path):
    """Write a tiny study spec (YAML text with overrides) and return its path."""

    def _write(text: str | None = None, **fields) -> Path:
        values = dict(name="tiny", output_dir=str(tmp_path / "studies"), pretrain_steps=20,
                      max_steps=2, num_trials=2, baselines="false")
        values.update(fields)
        body = textwrap.dedent(text) if text is not None else TINY_SPEC.format(**values)
        path = tmp_path / f"{values['name']}.yaml"
        path.write_text(body)
        return path

    return _write


@pytest.fixture
def tiny_lora():
    """A fresh tiny LoRA model and its tokenizer (no pretraining: fast, random weights)."""
    from emtune.config import LoraSpec, TinyModelSpec
    from emtune.models import apply_lora, build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(400)
    tiny = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                         intermediate_size=64, pretrain_steps=0)
    model = apply_lora(build_tiny_model(tiny, len(tokenizer)), LoraSpec(r=4, alpha=8))
    return model, tokenizer


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 2-trial study (local Ray, SQLite MLflow, Optuna) shared by every test that only
    reads a finished study; its console output is kept in ``run_output.txt`` beside it."""
    import contextlib
    import io

    import ray

    from emtune.cli.main import main

    root = tmp_path_factory.mktemp("finished")
    spec_path = root / "finished.yaml"
    spec_path.write_text(TINY_SPEC.format(name="finished", output_dir=str(root / "studies"),
                                          pretrain_steps=20, max_steps=2, num_trials=2, baselines="true"))
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            code = main(["run", str(spec_path), "--num-cpus", "2"])
    finally:
        ray.shutdown()
    (root / "run_output.txt").write_text(buffer.getvalue())
    assert code == 0, buffer.getvalue()
    return root / "studies" / "finished"


TINY_TEST_MODEL = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                       pretrain_steps=0)


@pytest.fixture(scope="session")
def save_perturbed_adapter():
    """``save(tokenizer, folder, seed, scale)``: a tiny LoRA adapter whose B matrices are seeded
    noise times ``scale`` (a stand-in for an adapter that learned something), saved to ``folder``."""
    import torch

    from emtune.config import LoraSpec, TinyModelSpec
    from emtune.models import apply_lora, build_tiny_model

    def save(tokenizer, folder: Path, seed: int, scale: float) -> str:
        lora = apply_lora(build_tiny_model(TinyModelSpec(**TINY_TEST_MODEL), len(tokenizer)), LoraSpec(r=4, alpha=8))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in lora.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
        lora.save_pretrained(folder)
        return str(folder)

    return save


@pytest.fixture(scope="session")
def save_tiny_base():
    """``save(folder) -> (model, tokenizer)``: a random tiny base model and its tokenizer, saved."""
    from emtune.config import TinyModelSpec
    from emtune.models import build_tiny_model, build_tiny_tokenizer

    def save(folder: Path):
        tokenizer = build_tiny_tokenizer(400)
        model = build_tiny_model(TinyModelSpec(**TINY_TEST_MODEL), len(tokenizer))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return model, tokenizer

    return save
