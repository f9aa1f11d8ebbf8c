"""Length-grouped batches: rows of similar length share a batch, so a batch pads little.

A batch is padded to its longest row (:func:`emtune.data.chat.pad_batch`), so random batches of
rows with different lengths spend compute on pad positions: 6-18% of the positions on the
bundled fixtures, up to 26% once interleaving mixes in rows of another dataset
(``bench/defense_overhead.py``). :func:`length_grouped_order` takes a random permutation of
the rows, cuts it into windows of ``window`` batches, sorts each window by length, cuts the
window into batches, and shuffles the order of all batches. Every batch is still a random draw
(from its window), batches come in random order (no long-to-short sweep, unlike transformers'
``LengthGroupedSampler``, whose mega-batches run longest first), and the order depends only on
(seed, epoch): the same under a seed, and replayed exactly when a run resumes mid-epoch.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0,
                         window: int = 64) -> list[int]:
    """Row indices in training order: consecutive runs of ``batch_size`` are one batch each."""
    import torch  # data loading and spec checks do not need torch; only training orders rows

    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    permutation = torch.randperm(len(lengths), generator=generator).tolist()
    span = max(1, window) * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(permutation), span):
        # stable sort on (length, position in the permutation): ties stay in random order
        ordered = sorted(permutation[start:start + span], key=lambda i: lengths[i])
        batches += [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [index for b in order for index in batches[b]]


class LengthGroupedSampler:
    """A ``torch.utils.data.Sampler`` over :func:`length_grouped_order` (a new order each epoch:
    the Trainer calls ``set_epoch`` through accelerate's data loader)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, window: int = 64):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.window = window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_order(self.lengths, self.batch_size, self.seed, self.epoch, self.window))


def feature_lengths(dataset: Any) -> list[int] | None:
    """Token count of every tokenised row (``input_ids``), or None for a dataset without them."""
    try:
        return [len(row["input_ids"]) for row in dataset]
    except (TypeError, KeyError, IndexError):
        return None
