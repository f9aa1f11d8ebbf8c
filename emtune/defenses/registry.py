"""The defense registry: a plain dict from spec name to (config class, defense class)."""

from __future__ import annotations

from typing import Any

from emtune.defenses.base import Defense, DefenseContext
from emtune.defenses.feature_l2 import FeatureL2, FeatureL2Config
from emtune.defenses.inoculation import Inoculation, InoculationConfig
from emtune.defenses.interleaving import Interleaving, InterleavingConfig
from emtune.defenses.interleaving_selected import SelectedInterleaving, SelectedInterleavingConfig
from emtune.defenses.kl_to_reference import KLToReference, KLToReferenceConfig
from emtune.defenses.persona_steering import PersonaSteering, PersonaSteeringConfig
from emtune.defenses.safelora import SafeLoRA, SafeLoRAConfig

DEFENSES: dict[str, tuple[type, type[Defense]]] = {
    "kl_to_reference": (KLToReferenceConfig, KLToReference),
    "feature_l2": (FeatureL2Config, FeatureL2),
    "safelora": (SafeLoRAConfig, SafeLoRA),
    "interleaving": (InterleavingConfig, Interleaving),
    "interleaving_selected": (SelectedInterleavingConfig, SelectedInterleaving),
    "persona_steering": (PersonaSteeringConfig, PersonaSteering),
    "inoculation": (InoculationConfig, Inoculation),
}

DEFENSE_CONFIGS: dict[str, type] = {name: cfg for name, (cfg, _) in DEFENSES.items()}


def build_defenses(configs: tuple[Any, ...], context: DefenseContext) -> list[Defense]:
    """Instantiate the spec's defenses in their listed order."""
    return [DEFENSES[c.name][1](c, context) for c in configs]
