"""The shared defense contract, run for every registered defense at the settings its shipped
recipe (``search_spaces/<name>.yaml``) searches; the suite itself is in this folder's conftest."""

from __future__ import annotations

import pytest
from pathlib import Path

from emtune.defenses.registry import DEFENSES
from emtune.search_spec import SearchSpec

RECIPES = Path(__file__).resolve().parents[2] / "search_spaces"


def test_every_defense_has_a_recipe_that_searches_its_strength() -> None:
    import yaml

    for name, cls in DEFENSES.items():
        recipe = RECIPES / f"{name}.yaml"
        assert recipe.is_file(), f"defense {name!r} has no search_spaces/{name}.yaml"
        raw = yaml.safe_load(recipe.read_text())
        assert any(d.get("name") == name for d in raw["defenses"]), f"{recipe.name} does not list {name}"
        targets = {p.target for p in SearchSpec.model_validate(raw["search"]).parameters.values()}
        assert {f"defenses.{name}.{field}" for field in cls.strength} & targets, f"{recipe.name} searches no dial"
        assert set(cls.off) <= set(cls.config_class.model_fields), f"{name}.off names unknown fields"


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_contract(defense_contract, name) -> None:
    defense_contract.check(name, defense_contract.settings(name))
