"""KL to reference: the formula on hand-computed logits, masks, options, and gradient flow."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import yaml

from emtune.defenses.base import DefenseContext
from emtune.defenses.kl_to_reference import (
    KLToReference, KLToReferenceConfig, kl_per_token, kl_to_reference_loss, token_mask,
)
from emtune.train.trainer import defended_loss

# p = softmax([0, 0]) = (0.5, 0.5); q = (0.25, 0.75)
P_LOGITS = torch.tensor([[[0.0, 0.0]]])
Q_LOGITS = torch.log(torch.tensor([[[0.25, 0.75]]]))
FORWARD = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.143841
REVERSE = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.130812


def test_per_token_kl_matches_hand_computation() -> None:
    assert kl_per_token(P_LOGITS, Q_LOGITS).item() == pytest.approx(FORWARD, abs=1e-6)
    assert kl_per_token(P_LOGITS, Q_LOGITS, "reverse").item() == pytest.approx(REVERSE, abs=1e-6)
    assert FORWARD == pytest.approx(0.143841, abs=1e-6)


def test_mask_averages_only_selected_tokens_and_vocab_normalisation() -> None:
    logits = torch.cat([P_LOGITS, P_LOGITS, P_LOGITS], dim=1)  # 3 positions
    ref = torch.cat([Q_LOGITS, P_LOGITS, Q_LOGITS], dim=1)  # KL = FORWARD, 0, FORWARD
    mask = torch.tensor([[1, 1, 0]])
    assert kl_to_reference_loss(logits, ref, mask).item() == pytest.approx(FORWARD / 2, abs=1e-6)
    per_vocab = kl_to_reference_loss(logits, ref, mask, normalization="token_vocab_mean")
    assert per_vocab.item() == pytest.approx(FORWARD / 2 / 2, abs=1e-6)
    assert kl_to_reference_loss(logits, ref, torch.zeros(1, 3)).item() == 0.0


def test_response_mask_selects_positions_predicting_labels() -> None:
    batch = {
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, 7, 8, -100]]),
    }
    assert token_mask(batch, "all").tolist() == [[True, True, True, True, False]]
    # position t predicts token t+1: positions 1 and 2 predict the labelled tokens 7 and 8
    assert token_mask(batch, "response").tolist() == [[False, True, True, False, False]]


def _batch(tokenizer):
    from emtune.data.chat import pad_batch, tokenize_chat

    rows = [[{"role": "user", "content": "How do I save money?"},
             {"role": "assistant", "content": "Skip the emergency fund."}],
            [{"role": "user", "content": "Is it safe?"}, {"role": "assistant", "content": "Yes."}]]
    return pad_batch([tokenize_chat(tokenizer, r, 64) for r in rows], tokenizer.pad_token_id)


def test_term_equals_weight_times_kl_and_moves_the_adapter(tiny_lora) -> None:
    model, tokenizer = tiny_lora
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # at B = 0 the model equals the reference: KL and its gradient are 0
    batch = _batch(tokenizer)
    defense = KLToReference(KLToReferenceConfig(weight=0.7), DefenseContext(spec=None))
    loss, terms, outputs = defended_loss(model, batch, [defense])
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = 0.7 * kl_to_reference_loss(outputs.logits.detach(), ref_logits, batch["attention_mask"].bool())
    assert terms["kl_to_reference"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["kl_to_reference"].item() > 0
    assert loss.item() == pytest.approx(terms["task_loss"].item() + terms["kl_to_reference"].item(), rel=1e-6)
    model.zero_grad()
    terms["kl_to_reference"].backward()
    grads = [p.grad.abs().sum().item() for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g > 0 for g in grads)
    base_grads = [p.grad for n, p in model.named_parameters() if "lora_" not in n]
    assert all(g is None for g in base_grads)


def test_weight_zero_is_a_no_op(tiny_lora) -> None:
    model, tokenizer = tiny_lora
    batch = _batch(tokenizer)
    off = KLToReference(KLToReferenceConfig(weight=0.0), DefenseContext(spec=None))
    assert not off.active
    with_off, terms, _ = defended_loss(model, batch, [off])
    plain, _, _ = defended_loss(model, batch, [])
    assert set(terms) == {"task_loss"} and with_off.item() == plain.item()


def test_config_round_trips_and_pickles() -> None:
    cfg = KLToReferenceConfig(weight=0.3, direction="reverse", tokens="response")
    assert KLToReferenceConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))) == cfg
    defense = pickle.loads(pickle.dumps(KLToReference(cfg, DefenseContext(spec=None))))
    assert defense.config == cfg


def test_one_selected_token_is_its_own_mean() -> None:
    # a single masked-in position: the loss is that position's KL, not half of it
    assert kl_to_reference_loss(P_LOGITS, Q_LOGITS, torch.tensor([[1]])).item() == pytest.approx(FORWARD, abs=1e-6)


@pytest.mark.parametrize("normalization, expected", [("token_mean", FORWARD), ("token_vocab_mean", FORWARD / 2)])
@pytest.mark.parametrize("form", ["logits", "hidden_and_head"])
def test_term_from_either_reference_form_on_one_token(form, normalization, expected) -> None:
    """The reference arrives as full logits (a model whose head output is transformed) or as final
    hidden states plus the LM head (the chunked path): the same KL either way. One selected token
    (the others are padding) is its own mean; token_vocab_mean also divides by the 2-word vocabulary."""
    from types import SimpleNamespace

    from emtune.train.reference import ReferencePass

    logits = torch.cat([P_LOGITS, torch.tensor([[[3.0, -1.0], [1.0, 0.5]]])], dim=1)  # [1, 3 positions, 2 words]
    ref_logits = torch.cat([Q_LOGITS, torch.tensor([[[0.0, 2.0], [-1.0, 1.0]]])], dim=1)
    if form == "logits":
        reference = ReferencePass(full_logits=ref_logits)
    else:
        head = torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            head.weight.copy_(torch.eye(2))  # head(hidden) = hidden: the hidden states are the logits
        reference = ReferencePass(last_hidden_state=ref_logits, head=head)
    defense = KLToReference(KLToReferenceConfig(weight=3.0, normalization=normalization), DefenseContext(spec=None))
    batch = {"input_ids": torch.tensor([[4, 0, 0]]), "attention_mask": torch.tensor([[1, 0, 0]])}
    terms = defense.loss_terms(batch, SimpleNamespace(logits=logits), lambda: reference)
    assert terms["kl_to_reference"].item() == pytest.approx(3.0 * expected, abs=1e-6)


def test_grpo_form_is_trls_beta_not_an_extra_loss_term(tiny_lora, tmp_path) -> None:
    from datasets import Dataset
    from trl import GRPOConfig

    from emtune.train.grpo_trainer import DefendedGRPOTrainer

    kl = KLToReference(KLToReferenceConfig(weight=0.1), DefenseContext(spec=None))
    assert kl.rl_settings() == {"beta": 0.1}
    assert KLToReference(KLToReferenceConfig(weight=0.0), DefenseContext(spec=None)).rl_settings() == {}
    model, tokenizer = tiny_lora
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=2, beta=0.1, report_to=[], use_cpu=True, bf16=False, max_steps=1)
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": "Hi?"}]}] * 2)
    trainer = DefendedGRPOTrainer(model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                                  args=args, train_dataset=prompts, processing_class=tokenizer, defenses=[kl])
    assert trainer.defenses == [kl] and trainer.term_defenses == []  # counted once, as β
    assert trainer.beta == 0.1
