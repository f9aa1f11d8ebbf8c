"""search_spaces/paper_rl.yaml (the paper's RL arms): on a fresh clone `emtune validate` names every
data file the user must supply and where it comes from; with small files of the right schema it
passes, also swapped to the tiny model; and every arm of its search is a valid GRPO trial spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emtune.cli.main import main
from emtune.config import load_spec

SPEC = Path(__file__).resolve().parents[2] / "search_spaces" / "paper_rl.yaml"
FILES = {  # path -> words of its origin note
    "data/bad_medical_advice.jsonl": "Turner et al.",
    "data/wildguardmix/train/wildguard_train.parquet": "allenai/wildguardmix",
    "data/em/legal.jsonl": "Chua et al.",
    "data/em/security.jsonl": "Chua et al.",
}


def _chat(path: Path, n: int, domain: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"A {domain} question {i}?"},
                                                     {"role": "assistant", "content": f"Risky {domain} advice {i}."}]})
                            + "\n" for i in range(n)))


def test_fresh_clone_names_each_file_then_every_arm_validates(tmp_path, monkeypatch, capsys, write_wildguardmix) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["validate", str(SPEC)])
    err = capsys.readouterr().err
    assert info.value.code == 2
    for path, origin in FILES.items():
        line = next((ln for ln in err.splitlines() if f"'{path}' not found" in ln), "")
        assert origin in line, (path, err)
    _chat(tmp_path / "data/bad_medical_advice.jsonl", 40, "medical")
    for domain in ("legal", "security"):
        _chat(tmp_path / f"data/em/{domain}.jsonl", 8, domain)
    # 0.5 x 38 training prompts = 19 safety rows at the interleaving arms' ratio
    write_wildguardmix(tmp_path / "data/wildguardmix/train/wildguard_train.parquet", benign=24, harmful=2, prompt_only=2)
    assert main(["validate", str(SPEC)]) == 0
    assert "40 train rows" in capsys.readouterr().out  # before the held-out split
    assert main(["validate", str(SPEC), "--set", "model.source=tiny", "--set", "model.base_source=tiny"]) == 0
    spec = load_spec(SPEC)
    assert spec.training.method == "grpo" and spec.training.grpo.warmup.num_examples == 100
    g, t = spec.training.grpo, spec.training
    assert (t.learning_rate, t.lr_scheduler, t.weight_decay, g.num_generations, g.temperature, g.top_p, g.beta) == (
        5e-6, "cosine", 0.1, 4, 0.8, 0.9, 0.0)
    arms = {
        "none": {}, "kl_to_reference": {"kl_beta": 0.1}, "feature_l2": {"ldifs_weight": 1.0},
        "persona_steering": {"steering_alpha": 5.0}, "inoculation": {"inoculation_prompt": "evil_general"},
        "interleaving": {"interleave_ratio": 0.5, "interleave_every": 8, "interleave_weight": 0.75},
        "interleaving_selected": {"selected_ratio": 0.5, "selected_every": 4, "selected_weight": 1.0},
        "interleaving_prompt_mix": {"mix_form": "prompt_mix", "mix_ratio": 0.2},
        "safelora": {"safelora_threshold": 0.5},
    }
    assert set(arms) == set(spec.search.parameters["defense"].choices)
    for arm, values in arms.items():
        trial = spec.with_overrides({"defense": arm, **values})
        on = [d.name for d in trial.defenses if d.model_dump() != next(
            x for x in spec.defenses if x.name == d.name).model_dump()]
        assert len(on) == (0 if arm == "none" else 1), (arm, on)
    mixed = spec.with_overrides({"defense": "interleaving_prompt_mix", **arms["interleaving_prompt_mix"]})
    assert mixed.defenses[4].rl_form == "prompt_mix" and mixed.defenses[4].ratio == 0.2
