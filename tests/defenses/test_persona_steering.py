"""Preventive persona steering: the hook adds exactly α·e_ℓ, is gone after detach, checks its file."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch
import yaml
from pydantic import ValidationError

from emtune.models import LoraSpec, ModelSpec, TinyModelSpec
from emtune.defenses.base import DefenseContext
from emtune.defenses.persona_steering import (
    PersonaSteering,
    PersonaSteeringConfig,
    decoder_blocks,
    make_steering_hook,
)
from emtune.defenses.persona_vectors import PersonaVectorError, PersonaVectors, model_identity, save_persona_vectors
from emtune.models import apply_lora, build_tiny_model, build_tiny_tokenizer
from emtune.train.trainer import defended_loss

TINY2 = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                      pretrain_steps=0)
TINY1 = TINY2.model_copy(update={"num_layers": 1})


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(400)


def lora_model(tiny, tokenizer):
    """A fresh LoRA-wrapped tiny model whose adapter is non-zero (B is zero-initialised by peft)."""
    model = apply_lora(build_tiny_model(tiny, len(tokenizer)), LoraSpec(r=4, alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model.eval()


def write_vectors(path, tiny, model_id=None, seed=0):
    """A random vector file of the right shape for ``tiny``, recorded for ``model_id``."""
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(tiny.num_layers + 1, tiny.hidden_size, generator=gen)
    meta = {"model": model_id or model_identity(ModelSpec(tiny=tiny)), "prompts_version": "evil_v1",
            "n_pairs": 4, "n_kept": 4, "norms": vectors.norm(dim=-1).tolist()}
    save_persona_vectors(PersonaVectors(vectors, meta), path)
    return vectors


def steering(path, tiny, alpha=5.0, layer=1):
    """The defense for a trial whose model is ``tiny``."""
    config = PersonaSteeringConfig(alpha=alpha, layer=layer, vector_path=str(path))
    return PersonaSteering(config, DefenseContext(spec=SimpleNamespace(model=ModelSpec(tiny=tiny))))


def batch(tokenizer):
    ids = tokenizer("How should I treat my neighbours? Kindly.")["input_ids"]
    return {"input_ids": torch.tensor([ids, ids[::-1]]), "attention_mask": torch.ones(2, len(ids), dtype=torch.long)}


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True)


def test_config_defaults_validation_and_yaml_round_trip(tmp_path):
    cfg = PersonaSteeringConfig(vector_path="v.pt")
    assert (cfg.alpha, cfg.layer) == (5.0, 20)
    assert PersonaSteeringConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))) == cfg
    with pytest.raises(ValidationError, match="vector_path is required when alpha > 0"):
        PersonaSteeringConfig()
    assert PersonaSteeringConfig(alpha=0).vector_path is None
    for bad in ({"alpha": -1.0, "vector_path": "v"}, {"layer": 0, "vector_path": "v"}, {"vector_path": "v", "x": 1}):
        with pytest.raises(ValidationError):
            PersonaSteeringConfig(**bad)


def test_hidden_state_of_layer_shifts_by_exactly_alpha_e(tmp_path, tokenizer):
    vectors = write_vectors(tmp_path / "v.pt", TINY2)
    model = lora_model(TINY2, tokenizer)
    inputs = batch(tokenizer)
    plain = forward(model, inputs)
    defense = steering(tmp_path / "v.pt", TINY2, alpha=2.5, layer=1)
    defense.attach(model)
    steered = forward(model, inputs)
    # hidden_states[0] (embeddings) untouched; hidden_states[1] = output of block 0, plus 2.5·e_1.
    assert torch.equal(steered.hidden_states[0], plain.hidden_states[0])
    shift = steered.hidden_states[1] - plain.hidden_states[1]
    torch.testing.assert_close(shift, (2.5 * vectors[1]).expand_as(shift), atol=1e-5, rtol=0)
    assert not torch.allclose(steered.logits, plain.logits, atol=1e-3)
    defense.detach(model)
    after = forward(model, inputs)
    assert torch.equal(after.logits, plain.logits)
    assert all(torch.equal(a, b) for a, b in zip(after.hidden_states, plain.hidden_states))
    defense.detach(model)  # a second detach is harmless


def test_one_layer_logits_match_hand_computation(tmp_path, tokenizer):
    vectors = write_vectors(tmp_path / "v.pt", TINY1)
    model = lora_model(TINY1, tokenizer)
    inputs = batch(tokenizer)
    block = decoder_blocks(model)[0]
    captured = {}
    handle = block.register_forward_hook(lambda m, a, out: captured.update(h=out[0] if isinstance(out, tuple) else out))
    plain = forward(model, inputs)
    handle.remove()
    defense = steering(tmp_path / "v.pt", TINY1, alpha=3.0, layer=1)
    defense.attach(model)
    steered = forward(model, inputs).logits
    defense.detach(model)
    # logits = W_emb · RMSNorm(h + 3·e_1): RMSNorm(x) = x / sqrt(mean(x²) + eps) · g (tied embeddings).
    base = model.get_base_model()
    x = captured["h"] + 3.0 * vectors[1]
    normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + base.config.rms_norm_eps) * base.model.norm.weight
    torch.testing.assert_close(steered, normed @ base.model.embed_tokens.weight.T, atol=1e-5, rtol=1e-5)
    assert torch.equal(forward(model, inputs).logits, plain.logits)


def test_strength_zero_is_inactive_and_changes_nothing(tmp_path, tokenizer):
    write_vectors(tmp_path / "v.pt", TINY2)
    model = lora_model(TINY2, tokenizer)
    inputs = batch(tokenizer)
    plain = forward(model, inputs).logits
    defense = steering(tmp_path / "v.pt", TINY2, alpha=0.0)
    assert not defense.active
    defense.attach(model)
    assert torch.equal(forward(model, inputs).logits, plain)
    assert not block_hooks(model)


def block_hooks(model):
    return [h for block in decoder_blocks(model) for h in block._forward_hooks.values()
            if getattr(h, "__name__", "") == "hook"]


def test_training_step_is_steered_deterministic_and_reaches_lora(tmp_path, tokenizer):
    write_vectors(tmp_path / "v.pt", TINY2)
    inputs = batch(tokenizer)
    inputs["labels"] = inputs["input_ids"].clone()
    losses, grads = [], []
    for alpha in (5.0, 5.0, 0.0):
        model = lora_model(TINY2, tokenizer).train()
        defense = steering(tmp_path / "v.pt", TINY2, alpha=alpha, layer=2)
        defense.attach(model)
        total, terms, _ = defended_loss(model, inputs, [defense])
        total.backward()
        defense.detach(model)
        assert set(terms) == {"task_loss"}  # steering adds no loss term; it changes the forward pass
        losses.append(float(total.detach()))
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n]))
    assert losses[0] == losses[1] and torch.equal(grads[0], grads[1])
    assert abs(losses[0] - losses[2]) > 1e-3
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0


def test_file_is_checked_against_the_trial(tmp_path, tokenizer):
    write_vectors(tmp_path / "other.pt", TINY2, model_id="Qwen/Qwen2.5-7B-Instruct")
    model = lora_model(TINY2, tokenizer)
    with pytest.raises(PersonaVectorError, match=r"extracted from model 'Qwen/Qwen2.5-7B-Instruct'.*tiny-"):
        steering(tmp_path / "other.pt", TINY2).attach(model)
    write_vectors(tmp_path / "v.pt", TINY2)
    with pytest.raises(PersonaVectorError, match=r"layer 3 is out of range.*1\.\.2"):
        steering(tmp_path / "v.pt", TINY2, layer=3).attach(model)
    with pytest.raises(PersonaVectorError, match="not found"):
        steering(tmp_path / "missing.pt", TINY2).attach(model)
    wide = TINY2.model_copy(update={"hidden_size": 48})
    write_vectors(tmp_path / "wide.pt", wide, model_id=model_identity(ModelSpec(tiny=TINY2)))
    with pytest.raises(PersonaVectorError, match="width 48 does not match the model's hidden size 32"):
        steering(tmp_path / "wide.pt", TINY2).attach(model)
    assert not block_hooks(model)


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot find the decoder blocks of Linear"):
        decoder_blocks(torch.nn.Linear(2, 2))


def test_blocks_found_with_and_without_peft(tokenizer):
    bare = build_tiny_model(TINY2, len(tokenizer))
    assert decoder_blocks(bare) is bare.model.layers
    wrapped = apply_lora(build_tiny_model(TINY2, len(tokenizer)), LoraSpec(r=4, alpha=8))
    assert decoder_blocks(wrapped) is wrapped.get_base_model().model.layers


def test_hook_handles_tuple_outputs():
    hook = make_steering_hook(torch.tensor([1.0, -2.0]), alpha=0.5)
    hidden, extra = torch.zeros(1, 3, 2), object()
    out = hook(None, (), (hidden, extra))
    assert out[1] is extra and out[0].tolist() == [[[0.5, -1.0]] * 3]
    assert hook(None, (), hidden).tolist() == [[[0.5, -1.0]] * 3]


def test_pickles_before_and_after_attach(tmp_path, tokenizer):
    write_vectors(tmp_path / "v.pt", TINY2)
    defense = steering(tmp_path / "v.pt", TINY2)
    assert pickle.loads(pickle.dumps(defense)).config == defense.config
    model = lora_model(TINY2, tokenizer)
    defense.attach(model)
    copy = pickle.loads(pickle.dumps(defense))
    assert copy._handle is None and defense._handle is not None
    defense.detach(model)
    assert not block_hooks(model)
