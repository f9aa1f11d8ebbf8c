"""Length-grouped batches: a permutation of the rows, little padding, random batch order,
deterministic under (seed, epoch); the defended Trainer uses it when asked."""

from __future__ import annotations

from emtune.data.batching import LengthGroupedSampler, feature_lengths, length_grouped_order


def _padding(order: list[int], lengths: list[int], batch: int) -> int:
    """Pad positions when each run of ``batch`` rows is padded to its longest row."""
    runs = [order[i:i + batch] for i in range(0, len(order), batch)]
    return sum(max(lengths[i] for i in run) * len(run) - sum(lengths[i] for i in run) for run in runs)


def test_two_lengths_make_pure_batches_in_random_order() -> None:
    lengths = [10, 100] * 8  # 8 short and 8 long rows, interleaved
    order = length_grouped_order(lengths, batch_size=4, seed=0)
    assert sorted(order) == list(range(16))
    assert _padding(order, lengths, 4) == 0  # every batch holds one length only
    in_file_order = list(range(16))
    assert _padding(in_file_order, lengths, 4) == 4 * 2 * 90  # each batch: two short rows padded by 90
    batch_lengths = [lengths[order[i]] for i in range(0, 16, 4)]
    assert sorted(batch_lengths) == [10, 10, 100, 100]


def test_order_depends_on_seed_and_epoch_only_and_batches_are_not_sorted() -> None:
    lengths = [(7 * i) % 53 + 1 for i in range(200)]
    first = length_grouped_order(lengths, 8, seed=3, epoch=0)
    assert first == length_grouped_order(lengths, 8, seed=3, epoch=0)
    assert first != length_grouped_order(lengths, 8, seed=3, epoch=1)
    assert first != length_grouped_order(lengths, 8, seed=4, epoch=0)
    longest = [max(lengths[i] for i in first[s:s + 8]) for s in range(0, 200, 8)]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # no length sweep
    shuffled = length_grouped_order(lengths, 8, seed=3, window=1)  # a window of one batch: no grouping
    assert _padding(first, lengths, 8) < _padding(shuffled, lengths, 8) / 5

    sampler = LengthGroupedSampler(lengths, 8, seed=3)
    assert list(sampler) == first and len(sampler) == 200
    sampler.set_epoch(1)
    assert list(sampler) == length_grouped_order(lengths, 8, seed=3, epoch=1)


def test_defended_trainer_batches_by_length_when_asked(tiny_lora, tmp_path) -> None:
    from transformers import TrainingArguments

    from emtune.data.chat import ChatCollator
    from emtune.train.trainer import DefendedTrainer

    model, tokenizer = tiny_lora
    features = [{"input_ids": [1] * n, "attention_mask": [1] * n, "labels": [1] * n} for n in [3, 30] * 6]
    assert feature_lengths(features) == [3, 30] * 6 and feature_lengths([{"text": "x"}]) is None
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True, seed=5,
                             data_seed=5, report_to=[], remove_unused_columns=False)
    grouped = DefendedTrainer(model=model, args=args, train_dataset=features, group_by_length=True,
                              data_collator=ChatCollator(tokenizer.pad_token_id))
    widths = [batch["input_ids"].shape[1] for batch in grouped.get_train_dataloader()]
    assert widths.count(3) == 3 and widths.count(30) == 3  # every batch unpadded
    plain = DefendedTrainer(model=model, args=args, train_dataset=features,
                            data_collator=ChatCollator(tokenizer.pad_token_id))
    assert not isinstance(plain._get_train_sampler(), LengthGroupedSampler)
