"""Feature-space l2 (LDIFS): the formula on hand-made tensors, layer selection, gradient flow."""

import math
import os
import pickle

import pytest
import torch
import yaml
from pydantic import ValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from emtune.models import LoraSpec, TinyModelSpec
from emtune.defenses.base import DefenseContext
from emtune.defenses.feature_l2 import (
    FeatureL2, FeatureL2Config, block_feature, example_features, feature_l2_loss, select_layers,
)
from emtune.models import apply_lora, build_tiny_model, build_tiny_tokenizer
from emtune.train.trainer import ReferenceOutputs, defended_loss

TINY = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                     pretrain_steps=0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(400)


def lora_model(tokenizer):
    return apply_lora(build_tiny_model(TINY, len(tokenizer)), LoraSpec(r=4, alpha=8))


def perturb_lora_b(model, seed=1, scale=0.5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def make_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (2, 6), generator=generator)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.full_like(ids, -100)
    labels[0, 3:] = ids[0, 3:]
    labels[1, 2:4] = ids[1, 2:4]
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def defense(**kwargs):
    return FeatureL2(FeatureL2Config(**kwargs), DefenseContext(spec=None))


# --- the formula --------------------------------------------------------------------------


def test_flatten_loss_hand_computed():
    # batch 2, 3 positions, hidden 2; one layer (index 1); example 0 has its last position masked.
    trained = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [9.0, 9.0]],
                            [[0.0, 2.0], [0.0, 4.0], [0.0, 6.0]]])
    ref = torch.tensor([[[0.0, 5.0], [0.0, 0.0], [5.0, 0.0]],
                        [[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]])
    embeddings = torch.zeros(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # ex 0: trained (3,4,0,0,[masked]) -> (0.6,0.8,0,0); ref (0,5,0,0) -> (0,1,0,0);
    #       distance² = 0.36 + 0.04 = 0.4
    # ex 1: trained (0,2,0,4,0,6) and ref (0,1,0,2,0,3) point the same way -> 0
    loss = feature_l2_loss([embeddings, trained], [embeddings, ref], mask, [1])
    assert loss.item() == pytest.approx(0.2, abs=1e-6)
    # the same block twice doubles the squared distance of the concatenation
    loss2 = feature_l2_loss([embeddings, trained, trained], [embeddings, ref, ref], mask, [1, 2])
    assert loss2.item() == pytest.approx(0.4, abs=1e-6)
    # padding really is excluded: changing a masked position changes nothing
    trained_pad = trained.clone()
    trained_pad[0, 2] = torch.tensor([-100.0, 7.0])
    assert feature_l2_loss([embeddings, trained_pad], [embeddings, ref], mask, [1]).item() == pytest.approx(0.2, abs=1e-6)


def test_mean_pooled_loss_hand_computed():
    # the same tensors with pooling: mean.
    trained = torch.tensor([[[3.0, 4.0], [3.0, 4.0], [9.0, 9.0]],
                            [[0.0, 2.0], [0.0, 4.0], [0.0, 6.0]]])
    ref = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [5.0, 0.0]],
                        [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]])
    embeddings = torch.zeros(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # ex 0: mean (3,4) -> (0.6,0.8); ref mean (1,0) -> (1,0); distance² = 0.16 + 0.64 = 0.8
    # ex 1: both point along +y after normalising -> 0
    loss = feature_l2_loss([embeddings, trained], [embeddings, ref], mask, [1], pooling="mean")
    assert loss.item() == pytest.approx(0.4, abs=1e-6)
    # flatten on the same tensors: ex 0 (3,4,3,4)/√50 vs (1,0,1,0)/√2 -> 2 − 2·(6/√100) = 0.8;
    # ex 1 (0,2,0,4,0,6)/√56 vs (0,1,0,1,0,1)/√3 -> 2 − 2·12/(√56·√3)
    expected_1 = 2 - 2 * 12 / (math.sqrt(56) * math.sqrt(3))
    flat = feature_l2_loss([embeddings, trained], [embeddings, ref], mask, [1])
    assert flat.item() == pytest.approx((0.8 + expected_1) / 2, abs=1e-6)


def test_zero_token_mean_change_costs_under_flatten_only():
    # A per-token change whose mean over tokens is zero: ref (1,0),(1,0); trained (1,1),(1,-1).
    # mean pooling: both means are (1,0) -> 0.
    # flatten: (1,0,1,0)/√2 vs (1,1,1,-1)/2 -> 2 − 2·(2/(2√2)) = 2 − √2 per block.
    ref = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    trained = ref + torch.tensor([[[0.0, 1.0], [0.0, -1.0]]])
    emb = torch.zeros(1, 2, 2)
    mask = torch.ones(1, 2)
    hidden, reference = [emb] + [trained] * 5, [emb] + [ref] * 5
    layers = [1, 2, 3, 4, 5]
    flat = feature_l2_loss(hidden, reference, mask, layers).item()
    pooled = feature_l2_loss(hidden, reference, mask, layers, pooling="mean").item()
    assert flat == pytest.approx(5 * (2 - math.sqrt(2)), abs=1e-6)
    assert pooled == pytest.approx(0.0, abs=1e-10)


def test_loss_mean_over_selected_positions_only():
    # Only position 1 selected in ex 0: trained (0,1) vs ref (1,0) -> distance² = 2 under both
    # poolings; ex 1 has no selected position and is left out of the mean.
    trained = torch.tensor([[[5.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    ref = torch.tensor([[[0.0, 7.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    mask = torch.tensor([[0, 1], [0, 0]])
    for pooling in ("flatten", "mean"):
        loss = feature_l2_loss([trained, trained], [ref, ref], mask, [1], pooling=pooling)
        assert loss.item() == pytest.approx(2.0, abs=1e-6)
        empty = feature_l2_loss([trained, trained], [ref, ref], torch.zeros(2, 2), [1], pooling=pooling)
        assert empty.item() == 0.0


def test_loss_scale_invariant_and_zero_for_identical():
    h = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 4)
    for pooling in ("flatten", "mean"):
        assert feature_l2_loss([h, h], [h, h.clone()], mask, [1], pooling=pooling).item() == 0.0
        # each block's feature is L2-normalised, so scaling the features changes nothing
        assert feature_l2_loss([h, 10 * h], [h, h], mask, [1], pooling=pooling).item() == pytest.approx(0.0, abs=1e-10)


def test_gradient_only_through_trained_side():
    trained = torch.tensor([[[3.0, 4.0]]], requires_grad=True)
    ref = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    loss = feature_l2_loss([trained, trained], [ref, ref], torch.ones(1, 1), [1])
    loss.backward()
    assert ref.grad is None
    # d/dm ‖m/‖m‖ − r‖² at m=(3,4), u=(0.6,0.8), r=(1,0): -2 (I − uuᵀ) r / ‖m‖
    # = -2 (0.64, -0.48) / 5 = (-0.256, 0.192)   (one position: both poolings agree)
    assert trained.grad[0, 0].tolist() == pytest.approx([-0.256, 0.192], abs=1e-6)


def test_flatten_gradient_hand_computed_over_two_positions():
    # flattened m = (3,0,0,4) (positions (3,0) and (0,4)), ‖m‖ = 5, u = (0.6,0,0,0.8); r = (1,0,0,0).
    # grad = -2 (I − uuᵀ) r / ‖m‖ = -2 (1 − 0.36, 0, 0, −0.48) / 5 = (−0.256, 0, 0, 0.192)
    trained = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]], requires_grad=True)
    ref = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    feature_l2_loss([trained, trained], [ref, ref], torch.ones(1, 2), [1]).backward()
    assert trained.grad[0].flatten().tolist() == pytest.approx([-0.256, 0.0, 0.0, 0.192], abs=1e-6)


# --- layer selection ------------------------------------------------------------------------


def test_select_layers_linspace_over_blocks():
    # Qwen2.5-7B, 28 blocks: blocks linspace(0, 27, 5) -> 0, 6, 13, 20, 27 = hidden states 1, 7, 14, 21, 28
    assert select_layers(29, 5) == [1, 7, 14, 21, 28]
    assert select_layers(29, 5) == [int(b) + 1 for b in torch.linspace(0, 27, 5).long()]
    assert select_layers(3, 5) == [1, 2]  # more layers asked than blocks: all blocks
    assert select_layers(11, 2) == [1, 10]
    assert select_layers(11, 1) == [1]
    for blocks in range(1, 40):
        for count in range(2, 8):
            expected = sorted({int(b) + 1 for b in torch.linspace(0, blocks - 1, count).long()})
            assert select_layers(blocks + 1, count) == expected, (blocks, count)


def test_select_layers_explicit():
    assert select_layers(5, (4, 0, -1, 2)) == [0, 2, 4]
    with pytest.raises(ValueError, match="out of range"):
        select_layers(5, (5,))
    with pytest.raises(ValueError, match="out of range"):
        select_layers(5, (-6,))


def test_config_validation_and_yaml_roundtrip():
    assert FeatureL2Config().weight == 1.0 and FeatureL2Config().layers == 5
    assert FeatureL2Config().pooling == "flatten"
    with pytest.raises(ValidationError):
        FeatureL2Config(weight=-1.0)
    with pytest.raises(ValidationError):
        FeatureL2Config(layers=0)
    with pytest.raises(ValidationError):
        FeatureL2Config(layers=())
    with pytest.raises(ValidationError):
        FeatureL2Config(pooling="max")
    with pytest.raises(ValidationError):
        FeatureL2Config(extra_field=1)
    for cfg in (FeatureL2Config(weight=0.3, layers=(1, -1), tokens="response", pooling="mean"),
                FeatureL2Config(layers=3)):
        text = yaml.safe_dump(cfg.model_dump(mode="json"))
        assert FeatureL2Config.model_validate(yaml.safe_load(text)) == cfg


# --- the defense on a tiny LoRA model ----------------------------------------------------------


def test_zero_at_init_and_with_adapter_disabled(tokenizer):
    model = lora_model(tokenizer)
    batch = make_batch()
    d = defense()
    # fresh LoRA: B = 0, so the trained features equal the reference ones
    outputs = model(**batch, output_hidden_states=True)
    term = d.loss_terms(batch, outputs, ReferenceOutputs(model, batch, True))["feature_l2"]
    assert term.item() == pytest.approx(0.0, abs=1e-10)
    perturb_lora_b(model)
    with model.disable_adapter():
        outputs = model(**batch, output_hidden_states=True)
    term = d.loss_terms(batch, outputs, ReferenceOutputs(model, batch, True))["feature_l2"]
    assert term.item() == pytest.approx(0.0, abs=1e-10)


def test_gradient_reaches_lora_b_and_step_reduces_loss(tokenizer):
    model = lora_model(tokenizer)
    perturb_lora_b(model)
    batch = make_batch()
    d = defense(weight=2.0)
    loss, terms, _ = defended_loss(model, batch, [d])
    assert terms["feature_l2"].item() > 1e-4
    terms["feature_l2"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert grads and all(g is not None for g in grads.values())
    assert sum(g.abs().sum().item() for g in grads.values()) > 1e-6
    before = terms["feature_l2"].item()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    _, after_terms, _ = defended_loss(model, batch, [d])
    assert after_terms["feature_l2"].item() < before


def test_weight_scales_term_and_response_tokens_differ(tokenizer):
    model = lora_model(tokenizer)
    perturb_lora_b(model)
    batch = make_batch()
    outputs = model(**batch, output_hidden_states=True)
    ref = ReferenceOutputs(model, batch, True)
    one = defense(weight=1.0).loss_terms(batch, outputs, ref)["feature_l2"].item()
    three = defense(weight=3.0).loss_terms(batch, outputs, ref)["feature_l2"].item()
    assert three == pytest.approx(3 * one, rel=1e-6)
    response = defense(tokens="response").loss_terms(batch, outputs, ref)["feature_l2"].item()
    assert response != pytest.approx(one, rel=1e-3)
    assert ref.calls == 1  # the reference pass is shared


def test_strength_zero_is_inactive_and_changes_nothing(tokenizer):
    d = defense(weight=0.0)
    assert not d.active
    model = lora_model(tokenizer)
    perturb_lora_b(model)
    batch = make_batch()
    total, terms, _ = defended_loss(model, batch, [d])
    assert set(terms) == {"task_loss"}
    assert total.item() == terms["task_loss"].item()


def test_deterministic_and_picklable(tokenizer):
    values = []
    for _ in range(2):
        model = lora_model(tokenizer)
        perturb_lora_b(model)
        batch = make_batch()
        values.append(defended_loss(model, batch, [defense()])[1]["feature_l2"].item())
    assert values[0] == values[1]
    d = defense(weight=0.5, layers=(1, 2))
    clone = pickle.loads(pickle.dumps(d))
    assert clone.config == d.config and clone.active


def test_attach_reads_the_last_blocks_raw_output_and_detach_restores(tokenizer):
    model = lora_model(tokenizer)
    perturb_lora_b(model)
    batch = make_batch()
    outputs = {}
    last = model.get_base_model().model.layers[-1]
    handle = last.register_forward_hook(lambda m, a, o: outputs.__setitem__("raw", o[0] if isinstance(o, tuple) else o))
    d = defense()
    d.attach(model)
    hidden = model(**batch, output_hidden_states=True).hidden_states
    assert torch.equal(hidden[-1], outputs["raw"])  # the block's output, not the final norm's
    d.detach(model)
    hidden = model(**batch, output_hidden_states=True).hidden_states
    assert not torch.allclose(hidden[-1], outputs["raw"])  # Hugging Face's default again
    assert not hasattr(model.get_base_model().config, "tie_last_hidden_states")
    handle.remove()
    clone = pickle.loads(pickle.dumps(d))
    assert clone._restore is None


def test_one_layer_and_the_most_negative_index_are_valid():
    assert FeatureL2Config(layers=1).layers == 1
    assert select_layers(3, [-3]) == [0]  # -3 of 3 hidden states is the embeddings


def test_example_features_concatenate_block_features_per_example():
    # two examples, two positions, hidden 2; the second example's last position is padding
    first = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[1.0, 0.0], [9.0, 9.0]]])
    second = torch.tensor([[[0.0, 2.0], [0.0, 0.0]], [[0.0, 5.0], [7.0, 7.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    phi = example_features([first, second], mask, [0, 1])
    expected = torch.tensor([[0.6, 0.8, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
                             [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(phi, expected)
    mean = example_features([first, second], mask, [1], pooling="mean")
    torch.testing.assert_close(mean, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))


def test_a_small_feature_is_still_normalised_to_length_one():
    tiny_values = torch.full((1, 1, 1), 1.5e-6)  # norm above the 1e-6 guard: still a unit vector
    assert block_feature(tiny_values, torch.ones(1, 1), "flatten").tolist() == [[1.0]]
    assert block_feature(torch.zeros(1, 2, 1), torch.ones(1, 2), "flatten").tolist() == [[0.0, 0.0]]


def test_attach_on_a_bare_model_once_and_only_when_active(tokenizer):
    model = build_tiny_model(TINY, len(tokenizer))  # no peft wrapper
    before = getattr(model.config, "tie_last_hidden_states", "unset")
    inactive = FeatureL2(FeatureL2Config(weight=0.0), DefenseContext(spec=None))
    inactive.attach(model)
    assert getattr(model.config, "tie_last_hidden_states", "unset") == before
    defense = FeatureL2(FeatureL2Config(weight=1.0), DefenseContext(spec=None))
    defense.attach(model)
    defense.attach(model)  # a second attach keeps the first one's saved setting
    assert model.config.tie_last_hidden_states is False
    defense.detach(model)
    assert getattr(model.config, "tie_last_hidden_states", "unset") == before
