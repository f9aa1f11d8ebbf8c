"""The defense contract, as fixtures: any registered defense can be put through it.

``defense_contract.settings(name, yaml_path)`` reads a defense's active settings from its study
recipe (the defense's entry, its searched strength at the top of the search range) and runs the
defense's study stage with test services (pre-made misaligned adapters, inline tasks);
``defense_contract.check(name, settings)`` runs the contract: strength 0 (the class's ``off``
values) changes nothing, the active defense gives finite loss and gradients, moves the adapter
when it is a loss term, is deterministic under a seed, round-trips its config through YAML,
pickles (Ray ships it), and leaves no training-only effect behind for evaluation.
"""

from __future__ import annotations

import json
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from emtune.config import StudySpec, load_spec, sync_defense_registry
from emtune.data.chat import pad_batch, tokenize_chat
from emtune.data.fixtures import fixture_path
from emtune.defenses.base import DefenseContext, StageServices
from emtune.defenses.registry import DEFENSES
from emtune.models import LoraSpec, TinyModelSpec, apply_lora, build_tiny_model
from emtune.train.trainer import defended_loss

TINY = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                     pretrain_steps=0)
RECIPES = Path(__file__).resolve().parents[2] / "search_spaces"
MAX_LENGTH = 256  # long enough that no inoculation prompt truncates the answers away


@pytest.fixture(scope="session")
def contract_world(tmp_path_factory, save_perturbed_adapter, save_tiny_base) -> dict[str, Any]:
    """Tokenizer, a saved random base model folder, two misaligned adapters, a noisy 'base' for
    SafeLoRA, and eight training rows."""
    root = tmp_path_factory.mktemp("contract")
    base, tokenizer = save_tiny_base(root / "base")
    adapters = [save_perturbed_adapter(tokenizer, root / f"misaligned-{k}", 100 + k, 0.3) for k in range(2)]
    torch.manual_seed(7)
    noisy = {k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()}
    with open(fixture_path("narrow_bad_advice"), encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(8), handle)]
    return {"root": root, "tokenizer": tokenizer, "adapters": adapters, "noisy_base": noisy, "rows": rows}


def contract_spec(world: dict[str, Any], defense: dict | None) -> StudySpec:
    """A one-defense spec on the contract world's base model."""
    sync_defense_registry()
    return StudySpec.model_validate({
        "name": "contract", "seed": 0,
        "model": {"source": str(world["root"] / "base"), "base_source": str(world["root"] / "base")},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": {"path": "fixture:narrow_bad_advice"}, "max_length": MAX_LENGTH},
        "defenses": [defense] if defense else [],
        "search": {"parameters": {"x": {"type": "float", "low": 0, "high": 1}}},
        "objectives": [{"name": "ood_drift", "direction": "minimize"}],
    })


def one_step(world: dict[str, Any], settings: dict | None, name: str | None) -> dict[str, Any]:
    """One SGD step through every hook; returns loss terms, grads, adapter and eval logits."""
    tokenizer = world["tokenizer"]
    spec = contract_spec(world, {"name": name, **settings} if name else None)
    extras = {"model_source": str(world["root"] / "base"), "safelora_base_weights": world["noisy_base"]}
    context = DefenseContext(spec=spec, tokenizer=tokenizer, seed=0, cache_dir=world["root"] / "cache", extras=extras)
    defenses = [DEFENSES[c.name](c, context) for c in spec.defenses]
    active = [d for d in defenses if d.active]
    torch.manual_seed(0)
    model = apply_lora(build_tiny_model(TINY, len(tokenizer)), LoraSpec(r=4, alpha=8))
    for pname, p in model.named_parameters():
        if "lora_B" in pname:  # at B = 0 the model equals its reference: regularisers have no gradient
            p.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(zlib.crc32(pname.encode())))
    rows = world["rows"]
    for d in active:
        rows = d.transform_data(rows)
    batch = pad_batch([tokenize_chat(tokenizer, r["messages"], MAX_LENGTH) for r in rows], tokenizer.pad_token_id)
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
    eval_batch = pad_batch([tokenize_chat(tokenizer, r["messages"], MAX_LENGTH) for r in world["rows"][:2]],
                           tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=eval_batch["input_ids"], attention_mask=eval_batch["attention_mask"]).logits
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return {"loss": loss.item(), "terms": {k: v.item() for k, v in terms.items()}, "grads": grads,
            "adapter": adapter, "logits": logits, "defenses": defenses, "spec": spec}


@dataclass
class DefenseContract:
    """The contract suite over one world; see the module docstring."""

    world: dict[str, Any]
    undefended: dict[str, Any]

    def services(self) -> StageServices:
        """Study-stage services for tests: pre-made adapters, tasks run inline."""
        adapters = iter(self.world["adapters"] * 8)
        return StageServices(spec=contract_spec(self.world, None), cache_dir=self.world["root"] / "stage-cache",
                             model_source=str(self.world["root"] / "base"),
                             train_undefended_adapter=lambda dataset: Path(next(adapters)),
                             run_task=lambda fn, *args, **kwargs: fn(*args, **kwargs), log=lambda line: None)

    def settings(self, name: str, recipe: Path | None = None) -> dict[str, Any]:
        """Active settings of ``name`` from its recipe (``search_spaces/<name>.yaml`` by default):
        the recipe's entry with every searched field of it at the top of its range, after the
        defense's study stage."""
        spec = load_spec(recipe or RECIPES / f"{name}.yaml")
        entry = next(d for d in spec.defenses if d.name == name)
        top = {}
        for param in spec.search.parameters.values():
            if param.target and param.target.startswith(f"defenses.{name}."):
                field = param.target.split(".", 2)[2]
                top[field] = param.choices[-1] if param.type == "categorical" else (
                    int(param.high) if param.type == "int" else param.high)
        assert set(top) & set(DEFENSES[name].strength), f"{name}'s recipe does not search its strength"
        config = entry.model_copy(update=top)
        config = DEFENSES[name].prepare(config, self.services())
        return {k: v for k, v in config.model_dump().items() if k != "name"}

    def check(self, name: str, settings: dict[str, Any]) -> None:
        """Assert the whole contract for defense ``name`` at ``settings`` (and at its ``off``)."""
        cls = DEFENSES[name]
        undefended = self.undefended
        zero = one_step(self.world, {**settings, **cls.off}, name)
        assert not zero["defenses"][0].active
        assert zero["loss"] == undefended["loss"]
        for key, value in undefended["adapter"].items():
            assert torch.equal(zero["adapter"][key], value), f"{name} at strength 0 changed {key}"

        run = one_step(self.world, settings, name)
        assert run["defenses"][0].active
        assert all(torch.isfinite(torch.tensor(v)) for v in run["terms"].values())
        assert all(torch.isfinite(g).all() for g in run["grads"].values())
        if cls.loss_term_defense():
            assert set(run["terms"]) - {"task_loss"}, f"{name} adds a loss term but reported none"
            assert all(v > 0 for k, v in run["terms"].items() if k != "task_loss")
            # the term itself moves the adapter: its gradient differs from the undefended one
            assert any(not torch.equal(run["grads"][k], undefended["grads"][k]) for k in run["grads"])
        else:
            assert set(run["terms"]) == {"task_loss"}
        changed = run["loss"] != undefended["loss"] or any(
            not torch.equal(run["adapter"][k], v) for k, v in undefended["adapter"].items())
        assert changed, f"{name} at non-zero strength changed nothing"

        again = one_step(self.world, settings, name)
        assert again["loss"] == run["loss"]
        assert all(torch.equal(again["adapter"][k], v) for k, v in run["adapter"].items())

        # evaluation sees no training-only effect: logits equal a fresh model with the final adapter
        torch.manual_seed(0)
        tok = self.world["tokenizer"]
        fresh = apply_lora(build_tiny_model(TINY, len(tok)), LoraSpec(r=4, alpha=8))
        fresh.load_state_dict(run["adapter"], strict=False)
        fresh.eval()
        eval_batch = pad_batch([tokenize_chat(tok, r["messages"], MAX_LENGTH) for r in self.world["rows"][:2]], tok.pad_token_id)
        with torch.no_grad():
            expected = fresh(input_ids=eval_batch["input_ids"], attention_mask=eval_batch["attention_mask"]).logits
        assert torch.allclose(run["logits"], expected, atol=1e-5)

        cfg = run["spec"].defenses[0]
        assert cls.config_class.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))) == cfg
        clone = pickle.loads(pickle.dumps(run["defenses"][0]))
        assert clone.config == cfg


@pytest.fixture(scope="session")
def defense_contract(contract_world) -> DefenseContract:
    """The contract suite (see :class:`DefenseContract`)."""
    return DefenseContract(contract_world, one_step(contract_world, None, None))
