"""How many training rows a spec's data gives, known before anything is loaded (validation).

The count follows the worker's own rules (:func:`emtune.data.loading.split_heldout`, the OpSwap
generator's split sizes), over the cheap source counts of :func:`emtune.data.sources.count_rows`;
it is None when a source cannot be counted offline (a hub dataset without ``num_rows``).
"""

from __future__ import annotations

from typing import Any

from emtune.data.loading import DataError, resolve_dataset_path
from emtune.data.sources import count_rows


def dataset_rows(dataset: Any) -> int | None:
    """Rows a DatasetSpec yields (after ``where`` and ``limit``), or None when unknown."""
    try:
        return count_rows(dataset, resolve_dataset_path(dataset.path))
    except DataError:  # an unknown fixture: reported where the spec's files are checked
        return None


def task_rows(data: Any) -> int | None:
    """Training rows before any defense's transform: the train split left after the held-out
    part (``max(1, round(n · heldout_fraction))`` rows), plus OpSwap's train split when it is
    mixed in, or OpSwap's train split alone when it is the task."""
    opswap = 0
    if data.opswap is not None:
        opswap = data.opswap.n_train_per_tier * len(data.opswap.tiers)
        if data.opswap_role == "task":
            return opswap
    if data.train is None:
        return None
    n = dataset_rows(data.train)
    if n is None:
        return None
    return n - max(1, round(n * data.heldout_fraction)) + opswap
