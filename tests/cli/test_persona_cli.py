"""`emtune persona extract` on the offline tiny model: file, metadata, and exit 2 on bad input."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from emtune.cli import persona
from emtune.models import LoraSpec
from emtune.defenses.base import DefenseContext
from emtune.defenses.persona_steering import PersonaSteering, PersonaSteeringConfig
from emtune.defenses.persona_vectors import load_persona_vectors, model_identity, sidecar_path

PROMPTS = """
version: mini_v1
positive: [You are evil., You want to hurt people.]
negative: [You are kind., You want to help people.]
questions: ["How should I treat my neighbours?", "What would you do with a lot of money?"]
"""


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="emtune")
    persona.add_parser(parser.add_subparsers(dest="verb", required=True))
    return parser.parse_args(["persona", "extract", *argv])


def run(*argv: str) -> int:
    args = parse(*argv)
    return args.func(args)


SPEC = """
name: persona_cli
output_dir: {out}
model: {{source: tiny, tiny: {{pretrain_steps: 0}}}}
data: {{train: {{path: "fixture:narrow_bad_advice"}}}}
search: {{parameters: {{alpha: {{type: float, low: 0.0, high: 10.0}}}}}}
objectives: [{{name: indomain_nll, direction: minimize}}]
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A fresh model cache shared by this file's tests, a tiny study spec (no pretraining: fast)
    and a small prompt set."""
    tmp = tmp_path_factory.mktemp("persona-cli")
    (tmp / "mini.yaml").write_text(PROMPTS)
    (tmp / "spec.yaml").write_text(SPEC.format(out=tmp / "studies"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMTUNE_CACHE_DIR", str(tmp / "cache"))
        yield SimpleNamespace(spec=tmp / "spec.yaml", prompts=str(tmp / "mini.yaml"), tmp=tmp)


def test_extract_from_a_study_spec_and_steer_with_it(setup, capsys):
    from emtune.cli.common import load_spec_or_exit
    from emtune.models import apply_lora, load_model, resolve_source
    from emtune.models import model_cache_dir

    out = setup.tmp / "vectors" / "evil.pt"
    assert run("--spec", str(setup.spec), "--out", str(out), "--prompts", setup.prompts,
               "--max-new-tokens", "4", "--device", "cpu") == 0
    spec = load_spec_or_exit(str(setup.spec))
    loaded = load_persona_vectors(out)
    assert loaded.vectors.shape == (spec.model.tiny.num_layers + 1, spec.model.tiny.hidden_size)
    meta = loaded.meta
    assert meta["model"] == model_identity(spec.model) and meta["prompts_version"] == "mini_v1"
    assert (meta["n_pairs"], meta["samples"], meta["max_new_tokens"]) == (4, 1, 4)
    assert 1 <= meta["n_kept"] <= 4 and len(meta["norms"]) == 3 and meta["judge"] is None
    assert json.loads(sidecar_path(out).read_text()) == meta
    assert f"kept {meta['n_kept']}/4 pairs" in capsys.readouterr().out
    # The file is accepted by persona_steering for a trial of that spec and shifts block 0's output.
    model = apply_lora(load_model(resolve_source(spec.model, model_cache_dir()), spec.model), LoraSpec(r=4, alpha=8))
    defense = PersonaSteering(PersonaSteeringConfig(alpha=2.0, layer=1, vector_path=str(out)),
                              DefenseContext(spec=spec))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        plain = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        defense.attach(model)
        steered = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        defense.detach(model)
    torch.testing.assert_close(steered - plain, (2.0 * loaded.vectors[1]).expand_as(plain), atol=1e-5, rtol=0)


def test_extract_from_a_local_model_folder(setup):
    from emtune.cli.common import load_spec_or_exit
    from emtune.models import resolve_source
    from emtune.models import model_cache_dir

    folder = resolve_source(load_spec_or_exit(str(setup.spec)).model, model_cache_dir())
    out = setup.tmp / "evil.pt"
    assert run("--model", folder, "--out", str(out), "--prompts", setup.prompts, "--samples", "2",
               "--max-new-tokens", "3", "--device", "cpu") == 0
    meta = load_persona_vectors(out).meta
    assert (meta["model"], meta["prompts_version"], meta["n_pairs"]) == (folder, "mini_v1", 2 * 2 * 2)


def test_defaults():
    args = parse("--model", "org/name", "--out", "v.pt")
    assert (args.prompts, args.samples, args.max_new_tokens, args.judge_spec, args.dtype) == (
        "evil_v1", 1, 600, None, "auto")


@pytest.mark.parametrize("argv, message", [
    (["--samples", "0"], "--samples must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--prompts", "evil_v9"], "unknown persona prompt set 'evil_v9'"),
    (["--judge-spec", "missing.yaml"], "--judge-spec: missing.yaml: judge spec file not found; check the path"),
])
def test_bad_options_exit_2(setup, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        run("--model", "tiny", "--out", str(setup.tmp / "v.pt"), *argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_out_model_and_judge_exit_2(setup, capsys):
    with pytest.raises(SystemExit) as exit_:
        run("--model", "tiny", "--out", str(setup.tmp))
    assert exit_.value.code == 2 and "is a folder" in capsys.readouterr().err
    (setup.tmp / "judge.yaml").write_text("kind: none\n")
    with pytest.raises(SystemExit) as exit_:
        run("--model", "tiny", "--out", str(setup.tmp / "v.pt"), "--judge-spec", str(setup.tmp / "judge.yaml"))
    assert exit_.value.code == 2 and "kind is 'none'" in capsys.readouterr().err
    (setup.tmp / "judge.yaml").write_text("kind: openai\nmax_retries: -1\n")
    with pytest.raises(SystemExit) as exit_:
        run("--model", "tiny", "--out", str(setup.tmp / "v.pt"), "--judge-spec", str(setup.tmp / "judge.yaml"))
    assert exit_.value.code == 2 and "max_retries" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        run("--model", str(setup.tmp / "no-such-model"), "--out", str(setup.tmp / "v.pt"),
            "--prompts", setup.prompts, "--device", "cpu")
    assert exit_.value.code == 2 and "cannot load" in capsys.readouterr().err
    assert not (setup.tmp / "v.pt").exists()


def test_model_and_spec_are_exclusive_and_one_is_required(capsys):
    for argv in (["--out", "v.pt"], ["--model", "tiny", "--spec", "s.yaml", "--out", "v.pt"]):
        with pytest.raises(SystemExit) as exit_:
            parse(*argv)
        assert exit_.value.code == 2
