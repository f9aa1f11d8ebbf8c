"""CUDA checks of the defended step: fp32 parity with CPU, bf16 autocast, a real OOM, the Trainer.

Every test is marked ``gpu`` and skips (with the reason) where ``torch.cuda.is_available()`` is
false, so CI passes them as skipped. ``bench/gpu_check.sh`` runs them on a GPU machine
(``pytest -m gpu tests/train/test_gpu.py``). They use only torch, transformers, peft and emtune
(no Ray, MLflow, Optuna, TRL or datasets: the GPU image lacks them) and the offline tiny model.

``EMTUNE_TEST_DEVICE=cpu`` runs the same bodies on CPU (a code check of the tests themselves: the
"device" values are then CPU values, and the OOM is a raised ``torch.OutOfMemoryError`` instead of a
real allocation).
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import pytest
import torch

from emtune.models import LoraSpec, TinyModelSpec
from emtune.data.chat import ChatCollator, pad_batch, tokenize_chat
from emtune.data.fixtures import fixture_path
from emtune.defenses import make_defense
from emtune.models import apply_lora, build_tiny_model, build_tiny_tokenizer, load_adapter
from emtune.train.trainer import DefendedTrainer, LossHistory, defended_loss

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("EMTUNE_TEST_DEVICE", "cuda")
# the contract tests' tiny model (tests/defenses/test_contract.py) for the loss comparisons
TINY = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                     pretrain_steps=0)
# a wider one for training: with random tied embeddings the logits' range grows with the width, so
# the adapter can lower the loss visibly in a dozen steps (at width 32 it plateaus ~0.07 lower)
TRAIN_TINY = TinyModelSpec(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                           pretrain_steps=0)
LOSS_DEFENSES = {"kl_to_reference": {"weight": 0.5}, "feature_l2": {"weight": 2.0}}
# bf16 autocast vs the fp32 CPU value: relative error allowed (measured on CPU autocast: task loss
# 2e-5, KL 3e-4, feature l2 1e-3; the tolerance leaves 50x or more for the GPU's bf16 kernels)
BF16_RTOL = {"task_loss": 1e-2, "kl_to_reference": 5e-2, "feature_l2": 5e-2}


@pytest.fixture(scope="module")
def device() -> torch.device:
    """The device under test; skips without CUDA (unless EMTUNE_TEST_DEVICE names another).
    Module scope and first in every signature, so a skip happens before any other fixture runs."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    return torch.device(DEVICE)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(400)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    with open(fixture_path("narrow_bad_advice"), encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(16), handle)]


@pytest.fixture
def no_tf32():
    """Plain fp32 matmuls on CUDA for the parity test (TF32 would differ from CPU by ~1e-3)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the default; a guard against an earlier change
    yield
    torch.set_float32_matmul_precision(saved)


def perturbed_lora(tokenizer, tiny: TinyModelSpec = TINY):
    """Tiny LoRA model whose B matrices are seeded noise: at B = 0 it equals its reference and the
    regularisers would be 0 (as in the contract tests)."""
    model = apply_lora(build_tiny_model(tiny, len(tokenizer)), LoraSpec(r=4, alpha=8))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    return model


def step_values(model, batch: dict, defense_name: str, autocast: torch.dtype | None = None):
    """Loss terms (floats) and adapter gradients of one defended forward/backward on ``model``'s device."""
    dev = next(model.parameters()).device
    defense = make_defense(defense_name, **LOSS_DEFENSES[defense_name])
    defense.attach(model)
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        batch = {k: v.to(dev) for k, v in batch.items()}
        if autocast is None:
            loss, terms, _ = defended_loss(model, batch, [defense])
        else:
            with torch.autocast(dev.type, dtype=autocast):
                loss, terms, _ = defended_loss(model, batch, [defense])
        loss.backward()
    finally:
        defense.detach(model)
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in terms.items()}, grads


@pytest.mark.gpu
@pytest.mark.parametrize("defense_name", sorted(LOSS_DEFENSES))
def test_defended_loss_fp32_matches_cpu_and_bf16_is_close(device, no_tf32, tokenizer, rows, defense_name) -> None:
    batch = pad_batch([tokenize_chat(tokenizer, r["messages"], 96) for r in rows[:8]], tokenizer.pad_token_id)
    cpu_model = perturbed_lora(tokenizer)
    cpu_terms, cpu_grads = step_values(cpu_model, batch, defense_name)
    assert set(cpu_terms) == {"task_loss", defense_name}
    assert cpu_terms[defense_name] > 0 and all(math.isfinite(v) for v in cpu_terms.values())

    dev_model = perturbed_lora(tokenizer).to(device)
    dev_terms, dev_grads = step_values(dev_model, batch, defense_name)
    for key, value in cpu_terms.items():
        assert dev_terms[key] == pytest.approx(value, rel=1e-4), f"fp32 {key} on {device.type} vs CPU"
    assert set(dev_grads) == set(cpu_grads) and cpu_grads
    for name, grad in cpu_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(dev_grads[name], grad, rtol=1e-3, atol=1e-4 * scale + 1e-12,
                                   msg=lambda m: f"fp32 gradient of {name}: {m}")

    bf16_terms, bf16_grads = step_values(dev_model, batch, defense_name, autocast=torch.bfloat16)
    for key, value in cpu_terms.items():
        assert math.isfinite(bf16_terms[key]), f"bf16 {key} is {bf16_terms[key]}"
        assert bf16_terms[key] == pytest.approx(value, rel=BF16_RTOL[key]), f"bf16 {key} vs fp32 CPU"
    assert all(torch.isfinite(g).all() for g in bf16_grads.values())
    assert sum(g.abs().sum().item() for g in bf16_grads.values()) > 0


def _raises_oom(device: torch.device) -> None:
    """A real CUDA out-of-memory: ~40 TB through the caching allocator (plain cudaMalloc, no
    managed memory), far more than any card. On CPU (local code check) the error is raised."""
    if device.type == "cuda":
        torch.empty(10**13, device=device)  # float32: 4e13 bytes
        raise AssertionError("allocating 4e13 bytes on the GPU did not fail")
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 37252.90 GiB (raised on CPU)")


@pytest.mark.gpu
def test_real_cuda_oom_wrapped_like_ray_is_classified_with_hint(device) -> None:
    from emtune.study.failures import failure_reason  # no Ray at import time (the GPU image has none)

    def worker() -> None:
        try:
            _raises_oom(device)
        except torch.OutOfMemoryError as oom:
            raise RuntimeError("worker failed") from oom  # how Ray surfaces a worker's error

    with pytest.raises(RuntimeError, match="worker failed") as info:
        worker()
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    reason = failure_reason(info.value)
    assert reason.startswith("OutOfMemoryError: "), reason
    assert "out of memory" in reason.lower() and "\n" not in reason
    assert reason.endswith("(out of memory: lower training.per_device_batch_size or data.max_length, "
                           "or use more GPUs)"), reason
    del info
    if device.type == "cuda":  # the failed allocation left the device usable
        x = torch.ones(1024, device=device)
        assert float(x.sum()) == 1024.0


@pytest.mark.gpu
def test_defended_trainer_bf16_lowers_the_loss_and_adapter_round_trips(device, tokenizer, rows, tmp_path: Path) -> None:
    from transformers import TrainingArguments

    features = [tokenize_chat(tokenizer, r["messages"], 96) for r in rows]
    probe = pad_batch(features[:8], tokenizer.pad_token_id)
    model = apply_lora(build_tiny_model(TRAIN_TINY, len(tokenizer)), LoraSpec(r=4, alpha=8))

    def probe_loss(m) -> float:
        dev = next(m.parameters()).device
        m.eval()
        with torch.no_grad():
            return float(m(**{k: v.to(dev) for k, v in probe.items()}).loss)

    before = probe_loss(model.to(device))
    history = LossHistory()
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", warmup_steps=0, bf16=True, logging_steps=1, save_strategy="no",
        report_to=[], seed=0, data_seed=0, remove_unused_columns=False, disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=device.type == "cpu",
    )
    trainer = DefendedTrainer(model=model, args=args, train_dataset=features,
                              data_collator=ChatCollator(tokenizer.pad_token_id),
                              defenses=[make_defense("kl_to_reference", weight=0.1)], callbacks=[history])
    trainer.train()
    assert trainer.args.bf16 and next(model.parameters()).device.type == device.type
    assert trainer.state.global_step == 12
    losses = [row["task_loss"] for row in history.rows]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses  # CPU bf16: 6.05 -> ~5.80
    assert history.rows[-1]["kl_to_reference"] > 0  # the adapter moved away from the reference
    # with bf16 the Trainer (accelerate) wraps model.forward in autocast; compare in plain fp32
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    assert not hasattr(model, "_original_forward")
    after = probe_loss(model)
    assert after < before - 0.1, (before, after)  # CPU bf16: 6.04 -> 5.79

    # save the adapter, load it onto a fresh copy of the same base, same outputs
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    reloaded = load_adapter(build_tiny_model(TRAIN_TINY, len(tokenizer)), tmp_path / "adapter").to(device)
    trained = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    loaded = {n: p.detach() for n, p in reloaded.named_parameters() if "lora_" in n}
    assert trained.keys() == loaded.keys() and trained
    for name, value in trained.items():
        assert torch.equal(loaded[name], value), f"{name} changed through save/load"
    model.eval()
    reloaded.eval()
    batch = {k: v.to(device) for k, v in probe.items()}
    with torch.no_grad():
        expected = model(**batch).logits
        got = reloaded(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert probe_loss(reloaded) == pytest.approx(after, abs=1e-6)
