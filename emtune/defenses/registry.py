"""The defense registry: a plain dict from spec name to defense class.

Adding a defense is its module (a :class:`~emtune.defenses.base.Defense` subclass with its
``config_class``) plus one line here; specs, ``emtune validate``, study stages and the contract
test all read this dict.
"""

from __future__ import annotations

from typing import Any

from emtune.defenses.base import Defense, DefenseContext
from emtune.defenses.caft import CAFT
from emtune.defenses.feature_l2 import FeatureL2
from emtune.defenses.inoculation import Inoculation
from emtune.defenses.interleaving import Interleaving
from emtune.defenses.interleaving_selected import SelectedInterleaving
from emtune.defenses.kl_to_reference import KLToReference
from emtune.defenses.persona_steering import PersonaSteering
from emtune.defenses.safelora import SafeLoRA

DEFENSES: dict[str, type[Defense]] = {
    "kl_to_reference": KLToReference,
    "feature_l2": FeatureL2,
    "safelora": SafeLoRA,
    "interleaving": Interleaving,
    "interleaving_selected": SelectedInterleaving,
    "persona_steering": PersonaSteering,
    "inoculation": Inoculation,
    "caft": CAFT,
}


def defense_class(name: str) -> type[Defense]:
    """The registered class of a defense name (ValueError naming the known ones otherwise)."""
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; known: {', '.join(sorted(DEFENSES))}")
    return DEFENSES[name]


def build_defenses(configs: tuple[Any, ...], context: DefenseContext) -> list[Defense]:
    """Instantiate the spec's defenses in their listed order."""
    return [DEFENSES[c.name](c, context) for c in configs]
