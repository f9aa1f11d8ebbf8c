"""Preventive persona steering: the hook adds exactly α·e_ℓ, is gone after detach, checks its file."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from pydantic import ValidationError

from emtune.models import LoraSpec, ModelSpec, TinyModelSpec
from emtune.defenses.base import DefenseContext
from emtune.defenses.persona_steering import (
    PersonaSteering,
    PersonaSteeringConfig,
    decoder_blocks,
    extraction,
    make_steering_hook,
    vector_cache_path,
)
from emtune.defenses.persona_vectors import PersonaVectorError, PersonaVectors, model_identity, save_persona_vectors
from emtune.models import apply_lora, build_tiny_model, build_tiny_tokenizer
from emtune.train.trainer import defended_loss

TINY2 = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                      pretrain_steps=0)
TINY1 = TINY2.model_copy(update={"num_layers": 1})


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(400)


def lora_model(tiny, tokenizer):
    """A fresh LoRA-wrapped tiny model whose adapter is non-zero (B is zero-initialised by peft)."""
    model = apply_lora(build_tiny_model(tiny, len(tokenizer)), LoraSpec(r=4, alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model.eval()


def write_vectors(path, tiny, model_id=None, seed=0):
    """A random vector file of the right shape for ``tiny``, recorded for ``model_id``."""
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(tiny.num_layers + 1, tiny.hidden_size, generator=gen)
    meta = {"model": model_id or model_identity(ModelSpec(tiny=tiny)), "prompts_version": "evil_v1",
            "n_pairs": 4, "n_kept": 4, "norms": vectors.norm(dim=-1).tolist()}
    save_persona_vectors(PersonaVectors(vectors, meta), path)
    return vectors


def steering(path, tiny, alpha=5.0, layer=1):
    """The defense for a trial whose model is ``tiny``."""
    config = PersonaSteeringConfig(alpha=alpha, layer=layer, vector_path=str(path))
    return PersonaSteering(config, DefenseContext(spec=SimpleNamespace(model=ModelSpec(tiny=tiny))))


def batch(tokenizer):
    ids = tokenizer("How should I treat my neighbours? Kindly.")["input_ids"]
    return {"input_ids": torch.tensor([ids, ids[::-1]]), "attention_mask": torch.ones(2, len(ids), dtype=torch.long)}


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True)


def test_config_defaults_validation_and_yaml_round_trip(tmp_path):
    cfg = PersonaSteeringConfig(vector_path="v.pt")
    assert (cfg.alpha, cfg.layer) == (5.0, 20)
    assert PersonaSteeringConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))) == cfg
    with pytest.raises(ValidationError, match="vector_path is required when alpha > 0"):
        PersonaSteeringConfig()
    assert PersonaSteeringConfig(alpha=0).vector_path is None
    for bad in ({"alpha": -1.0, "vector_path": "v"}, {"layer": 0, "vector_path": "v"}, {"vector_path": "v", "x": 1}):
        with pytest.raises(ValidationError):
            PersonaSteeringConfig(**bad)


def test_hidden_state_of_layer_shifts_by_exactly_alpha_e(tmp_path, tokenizer):
    vectors = write_vectors(tmp_path / "v.pt", TINY2)
    model = lora_model(TINY2, tokenizer)
    inputs = batch(tokenizer)
    plain = forward(model, inputs)
    defense = steering(tmp_path / "v.pt", TINY2, alpha=2.5, layer=1)
    defense.attach(model)
    steered = forward(model, inputs)
    # hidden_states[0] (embeddings) untouched; hidden_states[1] = output of block 0, plus 2.5·e_1.
    assert torch.equal(steered.hidden_states[0], plain.hidden_states[0])
    shift = steered.hidden_states[1] - plain.hidden_states[1]
    torch.testing.assert_close(shift, (2.5 * vectors[1]).expand_as(shift), atol=1e-5, rtol=0)
    assert not torch.allclose(steered.logits, plain.logits, atol=1e-3)
    defense.detach(model)
    after = forward(model, inputs)
    assert torch.equal(after.logits, plain.logits)
    assert all(torch.equal(a, b) for a, b in zip(after.hidden_states, plain.hidden_states))
    defense.detach(model)  # a second detach is harmless


def test_one_layer_logits_match_hand_computation(tmp_path, tokenizer):
    vectors = write_vectors(tmp_path / "v.pt", TINY1)
    model = lora_model(TINY1, tokenizer)
    inputs = batch(tokenizer)
    block = decoder_blocks(model)[0]
    captured = {}
    handle = block.register_forward_hook(lambda m, a, out: captured.update(h=out[0] if isinstance(out, tuple) else out))
    plain = forward(model, inputs)
    handle.remove()
    defense = steering(tmp_path / "v.pt", TINY1, alpha=3.0, layer=1)
    defense.attach(model)
    steered = forward(model, inputs).logits
    defense.detach(model)
    # logits = W_emb · RMSNorm(h + 3·e_1): RMSNorm(x) = x / sqrt(mean(x²) + eps) · g (tied embeddings).
    base = model.get_base_model()
    x = captured["h"] + 3.0 * vectors[1]
    normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + base.config.rms_norm_eps) * base.model.norm.weight
    torch.testing.assert_close(steered, normed @ base.model.embed_tokens.weight.T, atol=1e-5, rtol=1e-5)
    assert torch.equal(forward(model, inputs).logits, plain.logits)


def test_strength_zero_is_inactive_and_changes_nothing(tmp_path, tokenizer):
    write_vectors(tmp_path / "v.pt", TINY2)
    model = lora_model(TINY2, tokenizer)
    inputs = batch(tokenizer)
    plain = forward(model, inputs).logits
    defense = steering(tmp_path / "v.pt", TINY2, alpha=0.0)
    assert not defense.active
    defense.attach(model)
    assert torch.equal(forward(model, inputs).logits, plain)
    assert not block_hooks(model)


def block_hooks(model):
    return [h for block in decoder_blocks(model) for h in block._forward_hooks.values()
            if getattr(h, "__name__", "") == "hook"]


def test_training_step_is_steered_deterministic_and_reaches_lora(tmp_path, tokenizer):
    write_vectors(tmp_path / "v.pt", TINY2)
    inputs = batch(tokenizer)
    inputs["labels"] = inputs["input_ids"].clone()
    losses, grads = [], []
    for alpha in (5.0, 5.0, 0.0):
        model = lora_model(TINY2, tokenizer).train()
        defense = steering(tmp_path / "v.pt", TINY2, alpha=alpha, layer=2)
        defense.attach(model)
        total, terms, _ = defended_loss(model, inputs, [defense])
        total.backward()
        defense.detach(model)
        assert set(terms) == {"task_loss"}  # steering adds no loss term; it changes the forward pass
        losses.append(float(total.detach()))
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n]))
    assert losses[0] == losses[1] and torch.equal(grads[0], grads[1])
    assert abs(losses[0] - losses[2]) > 1e-3
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0


def test_file_is_checked_against_the_trial(tmp_path, tokenizer):
    write_vectors(tmp_path / "other.pt", TINY2, model_id="Qwen/Qwen2.5-7B-Instruct")
    model = lora_model(TINY2, tokenizer)
    with pytest.raises(PersonaVectorError, match=r"extracted from model 'Qwen/Qwen2.5-7B-Instruct'.*tiny-"):
        steering(tmp_path / "other.pt", TINY2).attach(model)
    write_vectors(tmp_path / "v.pt", TINY2)
    with pytest.raises(PersonaVectorError, match=r"layer 3 is out of range.*1\.\.2"):
        steering(tmp_path / "v.pt", TINY2, layer=3).attach(model)
    with pytest.raises(PersonaVectorError, match="not found"):
        steering(tmp_path / "missing.pt", TINY2).attach(model)
    wide = TINY2.model_copy(update={"hidden_size": 48})
    write_vectors(tmp_path / "wide.pt", wide, model_id=model_identity(ModelSpec(tiny=TINY2)))
    with pytest.raises(PersonaVectorError, match="width 48 does not match the model's hidden size 32"):
        steering(tmp_path / "wide.pt", TINY2).attach(model)
    assert not block_hooks(model)


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot find the decoder blocks of Linear"):
        decoder_blocks(torch.nn.Linear(2, 2))


def test_blocks_found_with_and_without_peft(tokenizer):
    bare = build_tiny_model(TINY2, len(tokenizer))
    assert decoder_blocks(bare) is bare.model.layers
    wrapped = apply_lora(build_tiny_model(TINY2, len(tokenizer)), LoraSpec(r=4, alpha=8))
    assert decoder_blocks(wrapped) is wrapped.get_base_model().model.layers


def test_hook_handles_tuple_outputs():
    hook = make_steering_hook(torch.tensor([1.0, -2.0]), alpha=0.5)
    hidden, extra = torch.zeros(1, 3, 2), object()
    out = hook(None, (), (hidden, extra))
    assert out[1] is extra and out[0].tolist() == [[[0.5, -1.0]] * 3]
    assert hook(None, (), hidden).tolist() == [[[0.5, -1.0]] * 3]


def test_pickles_before_and_after_attach(tmp_path, tokenizer):
    write_vectors(tmp_path / "v.pt", TINY2)
    defense = steering(tmp_path / "v.pt", TINY2)
    assert pickle.loads(pickle.dumps(defense)).config == defense.config
    model = lora_model(TINY2, tokenizer)
    defense.attach(model)
    copy = pickle.loads(pickle.dumps(defense))
    assert copy._handle is None and defense._handle is not None
    defense.detach(model)
    assert not block_hooks(model)


# --- the study-side classmethods: what a spec may ask for, which files it reads, the stage ---------

def judge(kind="openai", **fields):
    from emtune.evaluation.config import JudgeSpec

    if kind == "openai":
        fields = {"base_url": "http://127.0.0.1:9/v1", "api_key_env": None, **fields}
    return JudgeSpec(kind=kind, **fields)


def study(judge_spec=None, source="tiny", tiny=TINY2, seed=0):
    """The parts of a StudySpec persona steering reads."""
    return SimpleNamespace(model=ModelSpec(source=source, tiny=tiny), seed=seed,
                           training=SimpleNamespace(method="sft", grpo=None),
                           evaluation=SimpleNamespace(judge=judge_spec or judge("none")))


def test_a_positive_alpha_below_one_still_needs_a_vector_and_is_active(tmp_path):
    with pytest.raises(ValidationError, match="vector_path is required when alpha > 0"):
        PersonaSteeringConfig(alpha=0.5)
    write_vectors(tmp_path / "v.pt", TINY2)
    assert steering(tmp_path / "v.pt", TINY2, alpha=0.5).active
    off = PersonaSteeringConfig(vector_path="v.pt").model_copy(update=PersonaSteering.off)
    assert not PersonaSteering(off, DefenseContext(spec=None)).active


def test_layers_without_a_length_are_not_taken_for_decoder_blocks():
    no_len = SimpleNamespace(model=SimpleNamespace(layers=SimpleNamespace(__getitem__=None)))
    with pytest.raises(ValueError, match="cannot find the decoder blocks of SimpleNamespace"):
        decoder_blocks(no_len)


def test_spec_problems_judge_filter_and_tiny_depth():
    stage_judge = PersonaSteeringConfig(alpha=1.0, layer=1, extract_prompts="evil_v1")
    [problem] = PersonaSteering.spec_problems(stage_judge, study())
    assert "extract_filter 'judge'" in problem and "evaluation.judge.kind is 'none'" in problem
    assert PersonaSteering.spec_problems(stage_judge, study(judge())) == []  # a judge is configured
    no_filter = stage_judge.model_copy(update={"extract_filter": "none"})
    assert PersonaSteering.spec_problems(no_filter, study()) == []
    given = stage_judge.model_copy(update={"vector_path": "v.pt"})  # no stage extraction: no judge needed
    assert PersonaSteering.spec_problems(given, study()) == []
    # the tiny model's 2 blocks: layers 1..2 fit, 3 does not; a non-tiny model's depth is not known here
    at_top = PersonaSteeringConfig(alpha=1.0, layer=2, vector_path="v.pt")
    assert PersonaSteering.spec_problems(at_top, study()) == []
    past = at_top.model_copy(update={"layer": 3})
    [problem] = PersonaSteering.spec_problems(past, study())
    assert problem.startswith("persona_steering: layer 3 is past the tiny model's 2 blocks; use 1..2")
    assert PersonaSteering.spec_problems(past, study(source="Qwen/Qwen2.5-0.5B-Instruct")) == []


def test_local_files_lists_the_vector_and_a_prompt_file_only():
    only_vector = PersonaSteeringConfig(vector_path="v.pt")
    assert [(f.field, f.path) for f in PersonaSteering.local_files(only_vector)] == [("vector_path", "v.pt")]
    shipped = PersonaSteeringConfig(extract_prompts="evil_v1")
    assert PersonaSteering.local_files(shipped) == []
    own = PersonaSteeringConfig(extract_prompts="prompts/mine.yaml")
    assert [(f.field, f.path) for f in PersonaSteering.local_files(own)] == [("extract_prompts", "prompts/mine.yaml")]


def test_vector_cache_path_is_keyed_by_the_judge_only_when_it_filters(tmp_path):
    config = PersonaSteeringConfig(alpha=1.0, extract_prompts="evil_v1")
    path = vector_cache_path(extraction(config), study(judge()), tmp_path)
    assert path.parent == tmp_path / "persona"
    assert path.name.startswith("evil_v1-") and path.suffix == ".pt" and len(path.stem) == len("evil_v1-") + 12
    other_judge = study(judge(model="another-judge"))
    assert vector_cache_path(extraction(config), other_judge, tmp_path) != path
    unfiltered = config.model_copy(update={"extract_filter": "none"})
    assert vector_cache_path(extraction(unfiltered), study(judge()), tmp_path) == vector_cache_path(
        extraction(unfiltered), other_judge, tmp_path)
    assert vector_cache_path(extraction(unfiltered), study(judge()), tmp_path) != path


def stage_services(spec, cache_dir, calls, logs):
    """Stage services whose ``run_task`` records its call and writes a vector file where asked."""
    from emtune.defenses.base import StageServices

    def run_task(fn, *args):
        calls.append((fn.__name__, args))
        write_vectors(Path(args[5]), TINY2)
        return args[5]

    return StageServices(spec=spec, cache_dir=cache_dir, model_source="tiny", train_undefended_adapter=None,
                         run_task=run_task, log=logs.append)


def test_prepare_extracts_once_with_the_study_judge_and_points_at_the_file(tmp_path):
    spec = study(judge())
    calls, logs = [], []
    config = PersonaSteeringConfig(alpha=1.0, layer=1, extract_prompts="evil_v1", trait_prompt="evil",
                                   positive_trait_min=60, negative_trait_max=20, coherent_min=40)
    prepared = PersonaSteering.prepare(config, stage_services(spec, tmp_path, calls, logs))
    path = vector_cache_path(extraction(config), spec, tmp_path)
    assert prepared.vector_path == str(path) and path.is_file()
    [(name, args)] = calls
    assert name == "extract_to_file" and args[2:6] == ("evil_v1", 64, 0, str(path))
    judge_spec = args[6]
    assert judge_spec.model == spec.evaluation.judge.model
    assert judge_spec.cache_path == str(tmp_path / "judge.db")  # verdicts shared with the evaluations
    assert "pairs with evil >= 60 (positive), <= 20 (negative), coherent >= 40" in logs[0]
    # cached: a second prepare reads the file and runs nothing
    assert PersonaSteering.prepare(config, stage_services(spec, tmp_path, calls, logs)).vector_path == str(path)
    assert len(calls) == 1
    # a judge with its own cache keeps it; extract_filter none passes no judge
    own = study(judge(cache_path=str(tmp_path / "own.db")))
    PersonaSteering.prepare(config, stage_services(own, tmp_path / "b", calls, logs))
    assert calls[-1][1][6].cache_path == str(tmp_path / "own.db")
    unfiltered = config.model_copy(update={"extract_filter": "none"})
    PersonaSteering.prepare(unfiltered, stage_services(spec, tmp_path / "c", calls, logs))
    assert calls[-1][1][6] is None and "(evil_v1, every pair)" in logs[-2]


def test_prepare_leaves_a_given_vector_or_no_extraction_alone(tmp_path):
    calls, logs = [], []
    services = stage_services(study(judge()), tmp_path, calls, logs)
    given = PersonaSteeringConfig(alpha=1.0, extract_prompts="evil_v1", vector_path="mine.pt")
    assert PersonaSteering.prepare(given, services) is given
    plain = PersonaSteeringConfig(vector_path="mine.pt")
    assert PersonaSteering.prepare(plain, services) is plain
    assert calls == [] and logs == []


def test_a_context_spec_without_a_model_skips_the_model_check(tmp_path, tokenizer):
    write_vectors(tmp_path / "v.pt", TINY2, model_id="some/other-model")
    config = PersonaSteeringConfig(alpha=1.0, layer=1, vector_path=str(tmp_path / "v.pt"))
    defense = PersonaSteering(config, DefenseContext(spec=SimpleNamespace(model=None)))
    model = lora_model(TINY2, tokenizer)
    defense.attach(model)
    assert len(block_hooks(model)) == 1
    defense.detach(model)


def test_decode_only_hook_shifts_only_the_marked_positions():
    mask = {"now": None}
    hook = make_steering_hook(torch.tensor([1.0, -2.0]), alpha=0.5, positions=lambda: mask["now"])
    hidden = torch.zeros(1, 3, 2)
    assert hook(None, (), hidden) is hidden  # outside an update pass: no shift at all
    mask["now"] = torch.tensor([[1, 0, 1]])
    assert hook(None, (), hidden).tolist() == [[[0.5, -1.0], [0.0, 0.0], [0.5, -1.0]]]
    mask["now"] = torch.tensor([[1, 0]])
    with pytest.raises(RuntimeError, match=r"steering positions \(1, 2\) do not match the hidden states \(1, 3\)"):
        hook(None, (), hidden)


def test_decode_only_is_refused_outside_grpo():
    config = PersonaSteeringConfig(alpha=1.0, layer=1, vector_path="v.pt", mode="decode_only")
    [problem] = PersonaSteering.spec_problems(config, study())
    assert problem.startswith("persona_steering mode decode_only exists only for training.method grpo")
    grpo = study()
    grpo.training = SimpleNamespace(method="grpo", grpo=None)
    assert PersonaSteering.spec_problems(config, grpo) == []
