"""SafeLoRA: projector and similarity against the formula, score-then-project, end to end."""

import math
import os
import pickle
from types import SimpleNamespace

import pytest
import torch
import yaml
from pydantic import ValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from emtune.models import LoraSpec, ModelSpec, TinyModelSpec
from emtune.defenses.base import DefenseContext
from emtune.defenses.safelora import (
    SafeLoRA,
    SafeLoRAConfig,
    WeightSource,
    alignment_projector,
    apply_projector,
    lora_layers,
    project_layers,
    rank_similarity,
    resolve_weight_folder,
    score_layers,
    select_for_projection,
    similarity,
)
from emtune.models import apply_lora, build_tiny_model

TINY = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                     pretrain_steps=0)
VOCAB = 300
NUM_LORA_LAYERS = 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down)


def trained_lora_model(noise_seed=1, b_scale=0.3):
    """A tiny LoRA model with random B (as after training) and a 'base' = aligned weights + noise."""
    model = build_tiny_model(TINY, VOCAB)
    aligned = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(noise_seed)
    base = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in aligned.items()}
    model = apply_lora(model, LoraSpec(r=4, alpha=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_scale)
    return model, aligned, base


def pairs_of(model, aligned, base):
    return {name: (aligned[f"{name}.weight"], base[f"{name}.weight"]) for name in lora_layers(model)}


def lora_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def make_defense(base=None, spec=None, **kwargs):
    extras = {} if base is None else {"safelora_base_weights": base}
    return SafeLoRA(SafeLoRAConfig(**kwargs), DefenseContext(spec=spec, extras=extras))


# --- the formula --------------------------------------------------------------------------


def test_projector_hand_computed():
    w_aligned = torch.tensor([[3.0, 1.0], [4.0, 1.0]])
    w_base = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # V = [[3,0],[4,0]], ‖V‖_F = 5, V·Vᵀ = [[9,12],[12,16]]
    expected = torch.tensor([[1.8, 2.4], [2.4, 3.2]])
    assert torch.allclose(alignment_projector(w_aligned, w_base), expected)
    assert torch.equal(alignment_projector(w_base, w_base), torch.zeros(2, 2))


def test_factored_projector_equals_formula_on_random_matrices():
    generator = torch.Generator().manual_seed(0)
    w_aligned, w_base = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    m = torch.randn(6, 3, generator=generator)
    v = w_aligned - w_base
    c = v @ v.T / torch.linalg.matrix_norm(v, ord="fro")
    assert torch.allclose(alignment_projector(w_aligned, w_base), c, atol=1e-6)
    assert torch.allclose(apply_projector(v, m), c @ m, atol=1e-5)


def test_similarity_hand_computed():
    v = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # C = diag(1, 0)
    # ΔW = [[1,0],[1,0]] -> CΔW = [[1,0],[0,0]] -> cos = 1 / (√2 · 1)
    assert similarity(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), v) == pytest.approx(1 / math.sqrt(2))
    assert similarity(torch.tensor([[0.0, 0.0], [2.0, 3.0]]), v) == pytest.approx(0.0)  # orthogonal
    assert similarity(torch.tensor([[5.0, -1.0], [0.0, 0.0]]), v) == pytest.approx(1.0)  # inside
    assert similarity(torch.zeros(2, 2), v) == 1.0  # nothing to project


@pytest.mark.parametrize("seed", range(5))
def test_rank_space_score_equals_the_formula_on_delta_w(seed):
    gen = torch.Generator().manual_seed(seed)
    out_dim, in_dim, r = [(6, 9, 2), (9, 6, 3), (7, 7, 1), (12, 5, 4), (5, 40, 4)][seed]
    b, a = torch.randn(out_dim, r, generator=gen), torch.randn(r, in_dim, generator=gen)
    v = torch.randn(out_dim, in_dim, generator=gen)
    v[:, : in_dim // 2] *= 0.01  # an uneven alignment direction, so scores spread over (0, 1)
    expected = similarity(b @ a, v)
    assert rank_similarity(b, a, v) == pytest.approx(expected, abs=1e-5)
    assert rank_similarity(b * 3.0, a, v) == pytest.approx(expected, abs=1e-5)  # the scaling cancels
    assert rank_similarity(torch.zeros_like(b), a, v) == 1.0 == similarity(torch.zeros(out_dim, in_dim), v)
    assert rank_similarity(b, a, torch.zeros_like(v)) == 0.0 == similarity(b @ a, torch.zeros_like(v))


def test_similarity_is_never_negative():
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        v, delta = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
        assert 0.0 <= similarity(delta, v) <= 1.0 + 1e-6


def test_select_for_projection_threshold_and_top_k():
    scores = {"a": 0.1, "b": 0.6, "c": 0.3, "d": 0.3, "e": 0.5}
    assert select_for_projection(scores, "threshold", 0.5, 10) == ["a", "c", "d"]  # 0.5 is not < 0.5
    assert select_for_projection(scores, "threshold", 0.0, 10) == []
    assert select_for_projection(scores, "threshold", 1.0, 10) == ["a", "b", "c", "d", "e"]
    assert select_for_projection(scores, "top_k", 0.5, 2) == ["a", "c"]  # tie c/d broken by name
    assert select_for_projection(scores, "top_k", 0.5, 0) == []
    assert select_for_projection(scores, "top_k", 0.5, 99) == ["a", "b", "c", "d", "e"]


# --- score, then project, on a tiny LoRA model -----------------------------------------------


def test_score_layers_matches_formula_and_does_not_mutate():
    model, aligned, base = trained_lora_model()
    before = lora_state(model)
    pairs = pairs_of(model, aligned, base)
    scores = score_layers(model, pairs)
    assert len(scores) == NUM_LORA_LAYERS
    for key, value in lora_state(model).items():
        assert torch.equal(value, before[key]), key
    name = "model.layers.1.mlp.down_proj"
    module = lora_layers(model)[name]
    delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
    v = aligned[f"{name}.weight"] - base[f"{name}.weight"]
    c = v @ v.T / v.norm()
    expected = torch.nn.functional.cosine_similarity(delta.flatten(), (c @ delta).flatten(), dim=0)
    assert scores[name] == pytest.approx(expected.item(), rel=1e-5)
    assert score_layers(model, lambda n: pairs[n]) == scores  # callable and mapping agree


def test_project_layers_sets_b_to_c_times_b_and_leaves_the_rest():
    model, aligned, base = trained_lora_model()
    before = lora_state(model)
    pairs = pairs_of(model, aligned, base)
    chosen = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    project_layers(model, chosen, pairs)
    after = lora_state(model)
    for name in lora_layers(model):
        b_key = f"base_model.model.{name}.lora_B.default.weight"
        a_key = f"base_model.model.{name}.lora_A.default.weight"
        assert torch.equal(after[a_key], before[a_key])
        if name in chosen:
            c = alignment_projector(*pairs[name])
            assert torch.allclose(after[b_key], c @ before[b_key], atol=1e-6)
            assert not torch.allclose(after[b_key], before[b_key])
        else:
            assert torch.equal(after[b_key], before[b_key])


def test_finalize_threshold_mode_end_to_end():
    model, aligned, base = trained_lora_model()
    scores = score_layers(model, pairs_of(model, aligned, base))
    expected = sorted(n for n, s in scores.items() if s < 0.7)
    assert 0 < len(expected) < NUM_LORA_LAYERS  # the fixture has layers on both sides of τ
    defense = make_defense(base=base, threshold=0.7)
    logs = defense.finalize(model)
    assert logs["safelora/projected_layers"] == len(expected)
    assert logs["safelora/min_similarity"] == pytest.approx(min(scores.values()))
    assert logs["safelora/mean_similarity"] == pytest.approx(sum(scores.values()) / len(scores))
    assert defense.last_projected == expected
    assert defense.last_scores == pytest.approx(scores)
    report = defense.report()  # what the trial keeps in defenses.json
    assert (report["projected"], report["mode"], report["threshold"]) == (expected, "threshold", 0.7)
    assert report["similarities"] == pytest.approx(scores)
    assert make_defense(base=base, threshold=0.7).report() == {}  # nothing before finalize
    # the projected layers' similarity changed; the others' did not
    rescored = score_layers(model, pairs_of(model, aligned, base))
    for name in scores:
        if name in expected:
            assert rescored[name] != pytest.approx(scores[name], abs=1e-4)
        else:
            assert rescored[name] == pytest.approx(scores[name], abs=1e-6)


def test_finalize_top_k_mode_and_determinism():
    results = []
    for _ in range(2):
        model, _, base = trained_lora_model()
        defense = make_defense(base=base, mode="top_k", top_k=3)
        assert defense.finalize(model)["safelora/projected_layers"] == 3
        results.append(lora_state(model))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_base_from_safetensors_folder_matches_in_memory(tmp_path):
    model, _, base = trained_lora_model()
    base_model = build_tiny_model(TINY, VOCAB)
    base_model.load_state_dict(base)
    base_model.save_pretrained(tmp_path / "base")
    source = WeightSource(folder=str(tmp_path / "base"))
    key = "model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(source.get(key), base[key])
    expected = make_defense(base=base).weight_pairs(model)
    spec = SimpleNamespace(model=ModelSpec(base_source=str(tmp_path / "base"), tiny=TINY))
    from_files = make_defense(spec=spec).weight_pairs(model)
    assert score_layers(model, from_files) == pytest.approx(score_layers(model, expected))


def test_tiny_base_source_is_the_unpretrained_tiny_model(tmp_path):
    tiny = TINY.model_copy(update={"pretrain_steps": 2, "vocab_size": 300})
    spec = SimpleNamespace(model=ModelSpec(source="tiny", base_source="tiny", tiny=tiny))
    folder = resolve_weight_folder("tiny", spec, tmp_path)
    reference = build_tiny_model(tiny, VOCAB)  # same seed, no pretraining
    key = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(WeightSource(folder=folder).get(key), reference.state_dict()[key])
    aligned_folder = resolve_weight_folder("tiny", spec, tmp_path, role="aligned")
    assert aligned_folder != folder  # the aligned role is the pretrained tiny model
    assert not torch.equal(WeightSource(folder=aligned_folder).get(key), reference.state_dict()[key])


def test_inactive_settings_change_nothing():
    for kwargs in ({"threshold": 0.0}, {"mode": "top_k", "top_k": 0}, {"enabled": False}):
        model, _, _ = trained_lora_model()
        before = lora_state(model)
        defense = make_defense(**kwargs)  # no base source needed when off
        assert not defense.active
        assert defense.finalize(model) == {}
        assert all(torch.equal(v, before[k]) for k, v in lora_state(model).items())


def test_active_without_base_source_is_a_clear_error():
    spec = SimpleNamespace(model=ModelSpec())
    with pytest.raises(ValueError, match="base_source"):
        make_defense(spec=spec)


def test_config_validation_yaml_roundtrip_and_pickle():
    with pytest.raises(ValidationError):
        SafeLoRAConfig(threshold=1.5)
    with pytest.raises(ValidationError):
        SafeLoRAConfig(top_k=-1)
    with pytest.raises(ValidationError):
        SafeLoRAConfig(mode="all")
    cfg = SafeLoRAConfig(mode="top_k", top_k=4, threshold=0.3, base_source="org/base", enabled=True)
    assert SafeLoRAConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))) == cfg
    spec = SimpleNamespace(model=ModelSpec(base_source="org/base"))
    defense = SafeLoRA(cfg, DefenseContext(spec=spec))
    clone = pickle.loads(pickle.dumps(defense))
    assert clone.config == cfg and clone.active


def test_rank_similarity_of_a_small_update_and_of_one_the_projector_removes():
    # ΔW = B·A = [[0.03, 0.04], [0.06, 0.08]] (‖ΔW‖² = 0.0125, well below 1); V = e_1, C = diag(1, 0):
    # C·ΔW keeps the first row, ‖C·ΔW‖² = 0.0025 = ⟨ΔW, C·ΔW⟩, so cos = 0.0025 / sqrt(0.0125 · 0.0025) = sqrt(0.2)
    b, a = torch.tensor([[0.1], [0.2]]), torch.tensor([[0.3, 0.4]])
    assert rank_similarity(b, a, torch.tensor([[1.0], [0.0]])) == pytest.approx(0.2 ** 0.5, abs=1e-9)
    # an update in the second row only, with V = e_1: C·ΔW = 0, similarity 0 (not 0/0)
    assert rank_similarity(torch.tensor([[0.0], [0.2]]), a, torch.tensor([[1.0], [0.0]])) == 0.0
