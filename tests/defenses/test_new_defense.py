"""Adding a defense is one module and one registry entry: a throwaway defense, written to a temp
folder by this test, goes through `emtune validate`, the defense contract and one tiny trial
without any other emtune file changing."""

from __future__ import annotations

import importlib
import math
import textwrap
from pathlib import Path

import pytest

from emtune.defenses.registry import DEFENSES

MODULE = '''
"""Logit l2 (a throwaway test defense): L = L_task + λ · mean over selected positions of ‖z_t‖² / V,
z_t = the trained model's logits at position t, V = vocabulary size."""

from typing import Any, Callable, Literal

from pydantic import Field

from emtune.defenses.base import Defense
from emtune.spec_errors import StrictModel
from emtune.tensor_ops import token_mask


class LogitL2Config(StrictModel):
    name: Literal["logit_l2"] = "logit_l2"
    weight: float = Field(0.1, ge=0)


class LogitL2(Defense):
    config_class = LogitL2Config
    strength = ("weight",)
    off = {"weight": 0.0}

    @property
    def active(self) -> bool:
        return self.config.weight > 0

    def loss_terms(self, batch: dict, outputs: Any, reference: Callable[[], Any]) -> dict:
        mask = token_mask(batch, "all").float()
        per_token = outputs.logits.float().pow(2).mean(dim=-1)
        return {"logit_l2": self.config.weight * (per_token * mask).sum() / mask.sum()}
'''

RECIPE = """
name: logit_l2
output_dir: {out}
model: {{source: tiny, tiny: {{pretrain_steps: 20}}}}
lora: {{r: 4, alpha: 8}}
data: {{train: {{path: "fixture:narrow_bad_advice", limit: 40}}, heldout_fraction: 0.2, max_length: 96}}
training: {{learning_rate: 1.0e-2, max_steps: 2, per_device_batch_size: 4, gradient_accumulation_steps: 1, warmup_steps: 0}}
defenses:
  - {{name: logit_l2, weight: 0.1}}
search:
  parameters:
    logit_weight: {{type: float, target: defenses.logit_l2.weight, low: 1.0e-3, high: 1.0, log: true}}
  num_trials: 2
objectives:
  - {{name: ood_drift, direction: minimize}}
  - {{name: indomain_nll, direction: minimize}}
evaluation: {{samples_per_question: 1, max_new_tokens: 4}}
baselines: {{enabled: false}}
"""


@pytest.fixture
def logit_l2(tmp_path, monkeypatch):
    """The throwaway module on sys.path and its one registry line."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "logit_l2_defense.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module("logit_l2_defense")
    monkeypatch.setitem(DEFENSES, "logit_l2", module.LogitL2)
    yield module
    monkeypatch.delitem(DEFENSES, "logit_l2")


def test_throwaway_defense_validates_passes_the_contract_and_trains(logit_l2, tmp_path, defense_contract,
                                                                    capsys) -> None:
    from emtune.cli.main import main
    from emtune.config import load_spec
    from emtune.evaluation.judging import score_trial
    from emtune.models import model_cache_dir, resolve_source
    from emtune.train.worker import run_training
    from emtune.trial_files import TrialFiles

    recipe = tmp_path / "logit_l2.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "studies"))
    assert main(["validate", str(recipe)]) == 0
    assert "defenses [logit_l2]" in capsys.readouterr().out

    defense_contract.check("logit_l2", defense_contract.settings("logit_l2", recipe))

    spec = load_spec(recipe)
    source = resolve_source(spec.model, model_cache_dir())
    metrics = run_training(spec, tmp_path / "trial", source)
    metrics.update(score_trial(spec, tmp_path / "trial"))
    assert metrics["train_steps"] == 2
    assert all(math.isfinite(metrics[k]) for k in ("train_loss", "ood_drift", "indomain_nll"))
    history = TrialFiles(tmp_path / "trial").read_history()
    assert history and all(row["logit_l2"] > 0 for row in history)


def test_an_unregistered_name_is_refused_with_a_hint(tmp_path) -> None:
    from emtune.config import load_spec
    from emtune.spec_errors import SpecError

    recipe = tmp_path / "logit_l2.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "studies"))
    with pytest.raises(SpecError, match="unknown defense 'logit_l2'"):
        load_spec(Path(recipe))
