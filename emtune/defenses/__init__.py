"""In-training defenses against emergent misalignment, usable without Ray or MLflow.

    from emtune.defenses import make_defense
    from emtune.train.trainer import DefendedTrainer, defended_trainer_class

    kl = make_defense("kl_to_reference", weight=0.1)
    trainer = DefendedTrainer(model=peft_model, args=args, train_dataset=rows,
                              data_collator=collator, defenses=[kl])

``make_defense`` validates the settings with the defense's own config class; data defenses
(inoculation, interleaving, Interleaving+/++) change training rows through ``transform_data``.
"""

from __future__ import annotations

from typing import Any

from emtune.defenses.base import DefenseContext
from emtune.defenses.registry import defense_class


def make_defense(name: str, context: Any = None, **settings: Any) -> Any:
    """A ready defense object from its registry name and settings (validated)."""
    cls = defense_class(name)
    return cls(cls.config_class(name=name, **settings), context or DefenseContext(spec=None))


__all__ = ["make_defense"]
