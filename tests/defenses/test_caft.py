"""CAFT: the component along the ablated directions shrinks by exactly the stated fraction
(checked by hand and on a small model), only while training; settings are validated."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from emtune.defenses.base import DefenseContext
from emtune.defenses.caft import CAFT, CAFTConfig, make_ablation_hook, orthonormal_basis

IDS = torch.tensor([[5, 17, 42, 9, 77, 3]])


def test_hook_by_hand() -> None:
    basis = orthonormal_basis(torch.tensor([2.0, 0.0]))  # normalised to (1, 0)
    hook = make_ablation_hook(basis, 0.25)
    # h = (3, 4): its component along (1, 0) is 3; removing a quarter leaves 2.25, the rest untouched
    out = hook(None, (), (torch.tensor([[[3.0, 4.0]]]), "extra"))
    assert out[1] == "extra" and torch.allclose(out[0], torch.tensor([[[2.25, 4.0]]]))
    # two directions: the span of (1, 1, 0) and (1, 0, 0) is the x-y plane; fraction 1 removes it
    plane = orthonormal_basis(torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(plane @ plane.T, torch.eye(2), atol=1e-6)
    ablated = make_ablation_hook(plane, 1.0)(None, (), torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.allclose(ablated, torch.tensor([[0.0, 0.0, 3.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="linearly dependent"):
        orthonormal_basis(torch.tensor([[1.0, 0.0], [2.0, 0.0]]))


def _directions_file(tmp_path, model, layers: dict[int, torch.Tensor]):
    path = tmp_path / "directions.pt"
    torch.save({"directions": layers}, path)
    return str(path)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_component_along_the_direction_shrinks_by_the_fraction_on_a_small_model(tiny_lora, tmp_path, fraction) -> None:
    model, _ = tiny_lora
    torch.manual_seed(0)
    u = torch.randn(model.config.hidden_size)
    u = u / u.norm()
    config = CAFTConfig(fraction=fraction, layers=(1,), directions_path=_directions_file(tmp_path, model, {1: u}))
    defense = CAFT(config, DefenseContext(spec=None))
    with torch.no_grad():
        before = model(input_ids=IDS, output_hidden_states=True).hidden_states
        defense.attach(model)
        during = model(input_ids=IDS, output_hidden_states=True).hidden_states
        defense.detach(model)
        after = model(input_ids=IDS, output_hidden_states=True).hidden_states
    along, along_ablated = before[1] @ u, during[1] @ u
    assert torch.allclose(along_ablated, (1 - fraction) * along, atol=1e-5)  # the stated fraction is gone
    rest = before[1] - along.unsqueeze(-1) * u
    rest_ablated = during[1] - along_ablated.unsqueeze(-1) * u
    assert torch.allclose(rest, rest_ablated, atol=1e-5)  # everything orthogonal to u is untouched
    assert torch.equal(before[0], during[0])  # upstream of the hooked block: unchanged
    if fraction == 0.0:
        assert not defense.active and all(torch.equal(a, b) for a, b in zip(before, during))
    else:
        assert defense.active and not torch.allclose(before[-1], during[-1])  # downstream feels it
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # detached: evaluation sees the model alone


def test_persona_vector_source_and_layer_checks(tiny_lora, tmp_path) -> None:
    from emtune.defenses.persona_vectors import PersonaVectors, save_persona_vectors

    model, _ = tiny_lora
    vectors = torch.randn(3, model.config.hidden_size)
    path = save_persona_vectors(PersonaVectors(vectors, {"model": "tiny-test"}), tmp_path / "v.pt")
    defense = CAFT(CAFTConfig(layers=(2,), vector_path=str(path)), DefenseContext(spec=None))
    unit = vectors[2] / vectors[2].norm()
    basis = defense.bases(model)[2]
    assert torch.allclose(basis.T @ basis, torch.outer(unit, unit), atol=1e-6)  # the projector onto e_2
    with pytest.raises(ValueError, match="caft.layers 3 is out of range"):
        CAFT(CAFTConfig(layers=(3,), vector_path=str(path)), DefenseContext(spec=None)).attach(model)
    directions = _directions_file(tmp_path, model, {1: torch.randn(2, model.config.hidden_size)})
    with pytest.raises(ValueError, match=r"no directions for layers \[2\]"):
        CAFT(CAFTConfig(layers=(1, 2), directions_path=directions), DefenseContext(spec=None)).attach(model)


@pytest.mark.parametrize("settings, message", [
    ({"fraction": 1.5, "extract_prompts": "evil_v1"}, "less than or equal to 1"),
    ({"fraction": 0.5}, "CAFT needs directions"),
    ({"extract_prompts": "evil_v1", "directions_path": "d.pt"}, "not both"),
    ({"extract_prompts": "evil_v1", "layers": [2, 2]}, "distinct"),
])
def test_settings_are_validated(settings, message) -> None:
    with pytest.raises(ValidationError, match=message):
        CAFTConfig(**settings)
    assert not CAFT(CAFTConfig(fraction=0.0), DefenseContext(spec=None)).active  # off needs no directions
