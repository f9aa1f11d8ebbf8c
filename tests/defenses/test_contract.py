"""The shared defense contract, run for every registered defense.

For each defense: strength 0 changes nothing (same loss, same adapter after a step); the active
defense gives finite loss and gradients, moves the adapter when it is a loss term, is
deterministic under a seed, round-trips its config through YAML, pickles (Ray ships it), and
leaves no training-only effect behind for evaluation.
"""

from __future__ import annotations

import json
import zlib
import pickle

import pytest
import torch
import yaml

from emtune.config import LoraSpec, StudySpec, TinyModelSpec
from emtune.data.chat import pad_batch, tokenize_chat
from emtune.data.fixtures import fixture_path
from emtune.defenses.base import DefenseContext
from emtune.defenses.registry import DEFENSES
from emtune.models import apply_lora, build_tiny_model
from emtune.train.trainer import defended_loss

TINY = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                     pretrain_steps=0)
LOSS_TERMS = {"kl_to_reference", "feature_l2"}  # defenses that add a term to the loss


@pytest.fixture(scope="module")
def world(tmp_path_factory, save_perturbed_adapter, save_tiny_base):
    """Tokenizer, a saved base model folder, two misaligned adapters, a persona vector file."""
    from emtune.defenses.persona_vectors import PersonaVectors, save_persona_vectors

    root = tmp_path_factory.mktemp("contract")
    base, tokenizer = save_tiny_base(root / "base")
    adapters = []
    for k in range(2):
        adapters.append(save_perturbed_adapter(tokenizer, root / f"misaligned-{k}", 100 + k, 0.3))
    torch.manual_seed(7)
    vectors = torch.randn(TINY.num_layers + 1, TINY.hidden_size)
    save_persona_vectors(PersonaVectors(vectors, {"model": str(root / "base"), "prompts_version": "test",
                                                  "index_convention": "hidden_states"}), root / "persona.pt")
    noisy = {k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()}
    with open(fixture_path("narrow_bad_advice"), encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(8), handle)]
    return {"root": root, "tokenizer": tokenizer, "adapters": adapters, "noisy_base": noisy, "rows": rows}


def configs(world) -> dict[str, tuple[dict, dict]]:
    """(active, strength-0) settings per registered defense."""
    root = world["root"]
    selected = {"pool_limit": 20, "misaligned_adapters": world["adapters"]}
    return {
        "kl_to_reference": ({"weight": 0.5}, {"weight": 0.0}),
        "feature_l2": ({"weight": 2.0}, {"weight": 0.0}),
        "safelora": ({"threshold": 0.99}, {"threshold": 0.0}),
        "interleaving": ({"ratio": 0.25}, {"ratio": 0.0}),
        "interleaving_selected": ({"ratio": 0.25, **selected}, {"ratio": 0.0, **selected}),
        "persona_steering": ({"alpha": 3.0, "layer": 1, "vector_path": str(root / "persona.pt")},
                             {"alpha": 0.0, "layer": 1, "vector_path": str(root / "persona.pt")}),
        "inoculation": ({"prompt": "evil_general"}, {"prompt": "none"}),
    }


def _spec(world, defense: dict | None) -> StudySpec:
    return StudySpec.model_validate({
        "name": "contract", "seed": 0,
        "model": {"source": str(world["root"] / "base"), "base_source": str(world["root"] / "base")},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": {"path": "fixture:narrow_bad_advice"}, "max_length": 96},
        "defenses": [defense] if defense else [],
        "search": {"parameters": {"x": {"type": "float", "low": 0, "high": 1}}},
        "objectives": [{"name": "ood_drift", "direction": "minimize"}],
    })


def one_step(world, defense_settings: dict | None, name: str | None):
    """One SGD step through every hook; returns loss terms, grads, adapter and eval logits."""
    tokenizer = world["tokenizer"]
    spec = _spec(world, {"name": name, **defense_settings} if name else None)
    extras = {"model_source": str(world["root"] / "base"), "safelora_base_weights": world["noisy_base"]}
    context = DefenseContext(spec=spec, tokenizer=tokenizer, seed=0, cache_dir=world["root"] / "cache", extras=extras)
    defenses = [DEFENSES[c.name][1](c, context) for c in spec.defenses]
    active = [d for d in defenses if d.active]
    torch.manual_seed(0)
    model = apply_lora(build_tiny_model(TINY, len(tokenizer)), LoraSpec(r=4, alpha=8))
    for pname, p in model.named_parameters():
        if "lora_B" in pname:  # at B = 0 the model equals its reference: regularisers have no gradient
            p.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(zlib.crc32(pname.encode())))
    rows = world["rows"]
    for d in active:
        rows = d.transform_data(rows)
    batch = pad_batch([tokenize_chat(tokenizer, r["messages"], 96) for r in rows], tokenizer.pad_token_id)
    for d in active:
        d.attach(model)
    model.train()
    loss, terms, _ = defended_loss(model, batch, active)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    for d in active:
        d.finalize(model)
    for d in active:
        d.detach(model)
    model.eval()
    eval_batch = pad_batch([tokenize_chat(tokenizer, r["messages"], 96) for r in world["rows"][:2]],
                           tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=eval_batch["input_ids"], attention_mask=eval_batch["attention_mask"]).logits
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return {"loss": loss.item(), "terms": {k: v.item() for k, v in terms.items()}, "grads": grads,
            "adapter": adapter, "logits": logits, "defenses": defenses, "spec": spec}


def test_every_defense_is_covered(world) -> None:
    assert set(configs(world)) == set(DEFENSES)


@pytest.fixture(scope="module")
def undefended(world):
    return one_step(world, None, None)


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_contract(world, undefended, name) -> None:
    active_settings, zero_settings = configs(world)[name]

    zero = one_step(world, zero_settings, name)
    assert not zero["defenses"][0].active
    assert zero["loss"] == undefended["loss"]
    for key, value in undefended["adapter"].items():
        assert torch.equal(zero["adapter"][key], value), f"{name} at strength 0 changed {key}"

    run = one_step(world, active_settings, name)
    assert run["defenses"][0].active
    assert all(torch.isfinite(torch.tensor(v)) for v in run["terms"].values())
    assert all(torch.isfinite(g).all() for g in run["grads"].values())
    if name in LOSS_TERMS:
        assert run["terms"][name] > 0
        grad_norm = sum(g.abs().sum().item() for g in run["grads"].values())
        assert grad_norm > 0
        # the term itself moves the adapter: its gradient differs from the undefended one
        assert any(not torch.equal(run["grads"][k], undefended["grads"][k]) for k in run["grads"])
    else:
        assert set(run["terms"]) == {"task_loss"}
    # some effect on training: a different loss, or a different adapter after the step
    changed = run["loss"] != undefended["loss"] or any(
        not torch.equal(run["adapter"][k], v) for k, v in undefended["adapter"].items())
    assert changed, f"{name} at non-zero strength changed nothing"

    again = one_step(world, active_settings, name)
    assert again["loss"] == run["loss"]
    assert all(torch.equal(again["adapter"][k], v) for k, v in run["adapter"].items())

    # evaluation sees no training-only effect: logits equal a fresh model with the final adapter
    torch.manual_seed(0)
    fresh = apply_lora(build_tiny_model(TINY, len(world["tokenizer"])), LoraSpec(r=4, alpha=8))
    fresh.load_state_dict(run["adapter"], strict=False)
    fresh.eval()
    tok = world["tokenizer"]
    eval_batch = pad_batch([tokenize_chat(tok, r["messages"], 96) for r in world["rows"][:2]], tok.pad_token_id)
    with torch.no_grad():
        expected = fresh(input_ids=eval_batch["input_ids"], attention_mask=eval_batch["attention_mask"]).logits
    assert torch.allclose(run["logits"], expected, atol=1e-5)

    config_class = DEFENSES[name][0]
    cfg = run["spec"].defenses[0]
    assert config_class.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))) == cfg
    clone = pickle.loads(pickle.dumps(run["defenses"][0]))
    assert clone.config == cfg
