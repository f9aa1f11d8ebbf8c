"""`emtune persona extract`: build a persona vector file for preventive steering.

    emtune persona extract --model Qwen/Qwen2.5-7B-Instruct --out vectors/evil_qwen7b.pt \
        [--prompts evil_v1] [--samples 1] [--max-new-tokens 600] [--judge-spec judge.yaml]
    emtune persona extract --spec search_spaces/persona_steering.yaml --out vectors/evil.pt

Generates answers to the prompt set's questions under its "evil" and helpful system prompts,
optionally keeps only the pairs the judge confirms, and saves the per-layer mean difference of
response-token hidden states with its metadata (see emtune.defenses.persona_vectors). The file's
model id must match the study's ``model`` for `persona_steering` to accept it; ``--spec`` takes
the model section of a study spec, so the ids match by construction (needed for the tiny model,
whose id depends on its settings).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``persona`` verb group and its ``extract`` subcommand."""
    group = sub.add_parser("persona", help="persona vectors for preventive steering")
    verbs = group.add_subparsers(dest="persona_verb", required=True)
    p = verbs.add_parser("extract", help="extract a persona vector file from contrastive system prompts")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="hub id, local folder, or `tiny` (the offline tiny model, default settings)")
    which.add_argument("--spec", help="study spec YAML: use its `model` section (source, revision, dtype, tiny "
                                      "settings), so the file's model id matches that study")
    p.add_argument("--out", required=True, help="vector file to write (a .json sidecar is written beside it)")
    p.add_argument("--prompts", default="evil_v1", help="shipped prompt set name or YAML file (default evil_v1)")
    p.add_argument("--samples", type=int, default=1, help="answers per question and system prompt (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=600, help="answer length cap (default 600, the paper's evaluation length)")
    p.add_argument("--judge-spec", default=None,
                   help="YAML of an evaluation judge (JudgeSpec fields); keeps only judge-confirmed pairs")
    p.add_argument("--revision", default=None, help="model revision (hub models; with --model)")
    p.add_argument("--dtype", default="auto", choices=["float32", "bfloat16", "float16", "auto"],
                   help="weights dtype (with --model; default auto)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="generation and forward batch size")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(func=main)


def _judge(path: str | None):
    """The judge a YAML JudgeSpec file describes, or None; bad files exit 2."""
    if path is None:
        return None
    from pydantic import ValidationError

    from emtune.cli.common import fail
    from emtune.evaluation.config import JudgeSpec
    from emtune.evaluation.judges import JudgeError
    from emtune.evaluation.judging import build_judge
    from emtune.user_files import UserFileError, load_user_yaml, read_user_text

    file = Path(path).expanduser()
    try:
        data = load_user_yaml(read_user_text(file, "judge spec"), str(file))[0] or {}
    except UserFileError as err:
        fail(f"--judge-spec: {err}")
    if not isinstance(data, dict):
        fail(f"--judge-spec {path}: expected a mapping of judge settings (kind, model, base_url, ...)")
    try:
        spec = JudgeSpec.model_validate(data)
        judge = build_judge(spec)
    except ValidationError as err:
        first = err.errors()[0]
        fail(f"--judge-spec {path}: {'.'.join(map(str, first['loc'])) or '(top level)'}: {first['msg']} "
             f"({err.error_count()} problem(s)); fix that key")
    except JudgeError as err:
        fail(f"--judge-spec {path}: {err}")
    if judge is None:
        fail(f"--judge-spec {path}: kind is 'none'; give a judge (openai or hf_local) or leave the option out")
    return judge


def main(args: argparse.Namespace) -> int:
    """Extract and save a persona vector file."""
    from emtune.cli.common import fail
    from emtune.defenses.persona_vectors import (
        PersonaVectorError, extract_persona_vectors, load_persona_prompts, model_identity, save_persona_vectors,
    )

    for name in ("samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    out = Path(args.out).expanduser()
    if out.is_dir():
        fail(f"--out {args.out!r} is a folder; give a file path such as {out / 'persona.pt'}")
    try:
        prompts = load_persona_prompts(args.prompts)
    except PersonaVectorError as err:
        fail(str(err))
    judge = _judge(args.judge_spec)

    import torch

    from emtune.models import ModelSpec
    from emtune.models import load_model, load_tokenizer, resolve_source
    from emtune.models import model_cache_dir

    if getattr(args, "spec", None) is not None:
        from emtune.cli.common import load_spec_or_exit

        model_spec = load_spec_or_exit(args.spec).model
    else:
        model_spec = ModelSpec(source=args.model, revision=args.revision,
                               dtype="float32" if args.model == "tiny" else args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        source = resolve_source(model_spec, model_cache_dir())
        tokenizer = load_tokenizer(source, model_spec)
        model = load_model(source, model_spec, device=device)
    except (OSError, ValueError) as err:
        fail(f"model {model_spec.source!r}: cannot load: {err}")
    try:
        persona = extract_persona_vectors(
            model, tokenizer, prompts.questions, prompts.positive, prompts.negative,
            samples=args.samples, max_new_tokens=args.max_new_tokens, judge=judge, seed=args.seed,
            batch_size=args.batch_size, model_id=model_identity(model_spec), prompts_version=prompts.version,
        )
    except PersonaVectorError as err:
        fail(str(err))
    path = save_persona_vectors(persona, out)
    meta = persona.meta
    print(f"{path}: {meta['num_hidden_states']} hidden states x {meta['hidden_size']}, model {meta['model']!r}, "
          f"prompts {meta['prompts_version']}, kept {meta['n_kept']}/{meta['n_pairs']} pairs")
    return 0
