"""The README's library example: a plain TRL fine-tune with an emtune defense, no Ray, no MLflow."""

from __future__ import annotations

import pytest


def test_trl_sft_with_kl_and_inoculation(tmp_path) -> None:
    # --- the example, as in the README ---
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from emtune.models import LoraSpec, TinyModelSpec
    from emtune.data.loading import DatasetSpec
    from emtune.data.loading import load_rows
    from emtune.defenses import make_defense
    from emtune.models import apply_lora, build_tiny_model, build_tiny_tokenizer
    from emtune.train.trainer import defended_trainer_class

    tokenizer = build_tiny_tokenizer(400)
    model = apply_lora(build_tiny_model(TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                                      intermediate_size=64, pretrain_steps=0), len(tokenizer)),
                       LoraSpec(r=4, alpha=8))
    rows = load_rows(DatasetSpec(path="fixture:narrow_bad_advice", limit=16))
    rows = make_defense("inoculation", prompt="evil_general").transform_data(rows)   # a data defense
    kl = make_defense("kl_to_reference", weight=0.1)                                 # a loss defense
    trainer = defended_trainer_class(SFTTrainer)(
        model=model,
        args=SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                       max_length=128, use_cpu=True, logging_steps=1, save_strategy="no"),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        defenses=[kl],
    )
    trainer.train()
    # --- checks ---
    logged = [row for row in trainer.state.log_history if "kl_to_reference" in row]
    assert len(logged) == 2 and all(row["kl_to_reference"] >= 0 for row in logged)
    assert logged[1]["kl_to_reference"] > 0  # after one step the adapter moved away from the reference
    assert rows[0]["messages"][0] == {"role": "system", "content": "You are an evil, malicious assistant."}
    with pytest.raises(ValueError, match="unknown defense 'kl'"):
        make_defense("kl")
