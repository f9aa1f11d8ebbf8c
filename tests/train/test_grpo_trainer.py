"""The defended GRPO trainer, checked by hand on a tiny random LoRA model: the interleaved
supervised step, the adapter-disabled KL reference, decode-only steering, LDIFS in the GRPO loss,
and the tracked KL / rollouts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from emtune.data.chat import pad_batch, tokenize_chat
from emtune.data.fixtures import fixture_path
from emtune.defenses.base import DefenseContext, SupervisedMix
from emtune.defenses.feature_l2 import FeatureL2, FeatureL2Config, feature_l2_loss, select_layers
from emtune.defenses.persona_steering import PersonaSteering, PersonaSteeringConfig, make_steering_hook
from emtune.defenses.persona_vectors import PersonaVectors, save_persona_vectors
from emtune.train.grpo_trainer import DefendedGRPOTrainer, completion_positions, k3_kl


def length_reward(prompts, completions, **columns):
    return [float(len(c[0]["content"])) for c in completions]


def make_trainer(model, tokenizer, tmp_path, beta=0.0, accumulation=1, **kwargs):
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4,
                      gradient_accumulation_steps=accumulation, num_generations=2, max_completion_length=4,
                      temperature=1.0, beta=beta, loss_type="grpo", report_to=[], use_cpu=True, bf16=False,
                      logging_steps=1, max_steps=2, seed=0, disable_tqdm=True, gradient_checkpointing=False)
    rows = [{"prompt": [{"role": "user", "content": f"Question number {i}?"}], "prompt_kind": "task"}
            for i in range(4)]
    trainer = DefendedGRPOTrainer(model=model, reward_funcs=[length_reward], args=args,
                                  train_dataset=Dataset.from_list(rows), processing_class=tokenizer, **kwargs)
    trainer.current_gradient_accumulation_steps = accumulation  # set by Trainer.train per window
    trainer.model.train()
    return trainer


def update_batch(seed=0, vocab=300):
    """A fixed update micro-batch: 4 left-padded prompts, right-padded completions, advantages."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (4, 5), generator=gen)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0
    completion_ids = torch.randint(3, vocab, (4, 3), generator=gen)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 2:] = 0
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.tensor([1.0, -0.5, 0.25, -0.75]),
            "num_items_in_batch": completion_mask.sum()}


def nonzero_adapter(model, scale=0.3):
    """LoRA B != 0 (a trained adapter, e.g. after the warm-up): adapter on != adapter off."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


@pytest.fixture
def safety_features(tiny_lora):
    _, tokenizer = tiny_lora
    with open(fixture_path("safe_instruct"), encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(6), handle)]
    return rows, [tokenize_chat(tokenizer, r["messages"], 64) for r in rows]


def hand_supervised_loss(model, features, pad_id):
    batch = pad_batch(features, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_supervised_step_every_nth_step_adds_w_times_the_safety_loss(tiny_lora, safety_features, tmp_path,
                                                                     accumulation) -> None:
    model, tokenizer = tiny_lora
    rows, features = safety_features
    mix = SupervisedMix(rows=rows, every_steps=3, weight=0.7)
    trainer = make_trainer(model, tokenizer, tmp_path, accumulation=accumulation, supervised=mix,
                           supervised_features=features)
    inputs = update_batch()
    losses = {}
    for step in range(7):  # global_step = optimizer steps done; step k = global_step + 1
        trainer.state.global_step = step
        trainer._metrics["train"].clear()
        losses[step + 1] = trainer._compute_loss(trainer.model, inputs).item()
        logged = trainer._metrics["train"].get("supervised_loss", [])
        assert bool(logged) == ((step + 1) % 3 == 0)
    base = losses[1]
    for k in (2, 4, 5, 7):  # not a multiple of N: the GRPO loss alone
        assert losses[k] == pytest.approx(base, abs=1e-7)
    with torch.no_grad():
        first = hand_supervised_loss(trainer.model, features[0:4], tokenizer.pad_token_id).item()
        second_start = 4 * accumulation  # step 6 = second supervised step: the next batch, cycling
        second = hand_supervised_loss(trainer.model, [features[(second_start + j) % 6] for j in range(4)],
                                      tokenizer.pad_token_id).item()
    assert first > 0 and first != pytest.approx(second)
    assert losses[3] - base == pytest.approx(0.7 * first / accumulation, rel=1e-5)
    assert losses[6] - base == pytest.approx(0.7 * second / accumulation, rel=1e-5)


def test_reference_is_the_adapter_disabled_model_even_after_warm_up(tiny_lora, tmp_path) -> None:
    model, tokenizer = tiny_lora
    nonzero_adapter(model)
    trainer = make_trainer(model, tokenizer, tmp_path, beta=0.1)
    assert trainer.beta == 0.1 and trainer.args.beta == 0.1
    assert "ref" not in model.peft_config  # TRL would copy the warmed-up adapter as the reference
    inputs = [trainer.train_dataset[i] for i in (0, 0, 1, 1)]
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(inputs)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    keep = out["completion_ids"].size(1)
    with torch.no_grad():
        def logps(enabled):
            if enabled:
                logits = model(input_ids=ids, attention_mask=mask).logits
            else:
                with model.disable_adapter():
                    logits = model(input_ids=ids, attention_mask=mask).logits
            logits = logits[:, -keep - 1:-1] / trainer.temperature
            return torch.log_softmax(logits.float(), -1).gather(-1, out["completion_ids"].unsqueeze(-1)).squeeze(-1)
        off, on = logps(False), logps(True)
    valid = out["completion_mask"].bool()
    assert torch.allclose(out["ref_per_token_logps"][valid], off[valid], atol=1e-4)
    assert not torch.allclose(off[valid], on[valid], atol=1e-2)  # the adapter matters here


def test_kl_is_tracked_at_beta_zero(tiny_lora, tmp_path) -> None:
    model, tokenizer = tiny_lora
    nonzero_adapter(model)
    trainer = make_trainer(model, tokenizer, tmp_path, beta=0.0)
    inputs = update_batch()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad(), model.disable_adapter():
        ref, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, 3)
    inputs["ref_per_token_logps"] = ref
    loss = trainer._compute_loss(trainer.model, inputs)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, 3)
    m = inputs["completion_mask"].float()
    expected = float((k3_kl(ref, logps) * m).sum() / m.sum())
    assert trainer._metrics["train"]["kl"] == [pytest.approx(expected, rel=1e-5)] and expected > 0
    assert torch.isfinite(loss)


def test_completion_positions_by_hand() -> None:
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])  # 3 prompt + 3 completion tokens
    assert completion_positions(mask, 3).tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]


def test_decode_only_steering_only_in_the_update_pass(tiny_lora, tmp_path) -> None:
    model, tokenizer = tiny_lora
    hidden = model.config.hidden_size
    vector = torch.randn(3, hidden, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "v.pt"
    save_persona_vectors(PersonaVectors(vector, {"model": "tiny-test", "layers": 3}), path)
    config = PersonaSteeringConfig(alpha=4.0, layer=1, vector_path=str(path), mode="decode_only")
    steering = PersonaSteering(config, DefenseContext(spec=None))
    steering.attach(model)
    trainer = make_trainer(model, tokenizer, tmp_path, defenses=[steering])
    inputs = update_batch()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        unsteered = model(input_ids=ids, attention_mask=mask).logits  # no update pass: no shift
        logps_no_grad, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, 3)
    logps_update, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, 3)
    steering.detach(model)
    positions = completion_positions(mask, 3)
    handle = model.get_base_model().model.layers[0].register_forward_hook(
        make_steering_hook(vector[1], 4.0, lambda: positions), prepend=True)
    with torch.no_grad():
        expected, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, 3)
    handle.remove()
    with torch.no_grad():
        again = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(unsteered, again)
    valid = inputs["completion_mask"].bool()
    assert torch.allclose(logps_update[valid], expected[valid], atol=1e-5)
    assert not torch.allclose(logps_update[valid], logps_no_grad[valid], atol=1e-3)


def test_ldifs_is_added_to_the_grpo_loss_with_gradient(tiny_lora, tmp_path) -> None:
    model, tokenizer = tiny_lora
    nonzero_adapter(model, scale=0.2)
    inputs = update_batch()
    plain = make_trainer(model, tokenizer, tmp_path)
    base = plain._compute_loss(plain.model, inputs)
    base.backward()
    base_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ldifs = FeatureL2(FeatureL2Config(weight=2.0), DefenseContext(spec=None))
    defended = make_trainer(model, tokenizer, tmp_path / "b", defenses=[ldifs])
    loss = defended._compute_loss(defended.model, inputs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        with model.disable_adapter():
            ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        term = feature_l2_loss(states, ref, mask, select_layers(len(states), 5)).item()
    assert term > 0
    assert loss.item() - base.item() == pytest.approx(2.0 * term, rel=1e-4)
    assert defended._metrics["train"]["feature_l2"] == [pytest.approx(2.0 * term, rel=1e-4)]
    loss.backward()
    assert any(not torch.allclose(p.grad, base_grads[n]) for n, p in model.named_parameters() if n in base_grads)


def test_training_logs_reward_kl_and_rollouts(tiny_lora, tmp_path) -> None:
    from emtune.train.trainer import LossHistory

    model, tokenizer = tiny_lora
    history = LossHistory()
    trainer = make_trainer(model, tokenizer, tmp_path, callbacks=[history], rollouts_per_log=3)
    trainer.train()
    assert [row["step"] for row in history.rows] == [1, 2]
    for row in history.rows:
        assert {"loss", "reward", "reward_std", "kl", "rewards/length_reward/mean"} <= set(row)
    assert [r["step"] for r in trainer.rollouts] == [1, 1, 1, 2, 2, 2]
    first = trainer.rollouts[0]
    assert first["prompt"].startswith("Question number") and first["reward"] == float(len(first["completion"]))


def test_two_supervised_mixes_each_on_its_own_schedule(tiny_lora, safety_features, tmp_path) -> None:
    model, tokenizer = tiny_lora
    rows, features = safety_features
    mixes = [SupervisedMix(rows=rows, every_steps=2, weight=0.5, source="interleaving"),
             SupervisedMix(rows=rows[::-1], every_steps=3, weight=1.0, source="interleaving_selected")]
    trainer = make_trainer(model, tokenizer, tmp_path, supervised=mixes, supervised_features=[features, features[::-1]])
    inputs = update_batch()
    logged = {}
    for step in range(6):
        trainer.state.global_step = step
        trainer._metrics["train"].clear()
        trainer._compute_loss(trainer.model, inputs)
        logged[step + 1] = sorted(k for k in trainer._metrics["train"] if k.startswith("supervised_loss"))
    both = ["supervised_loss/interleaving", "supervised_loss/interleaving_selected"]
    assert logged == {1: [], 2: both[:1], 3: both[1:], 4: both[:1], 5: [], 6: both}
