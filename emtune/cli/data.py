"""`emtune data select`: perplexity-gap selection of safety data (Interleaving+/++) on its own.

Scores every pool row with s = (mean NLL under the misaligned adapters − aligned NLL) /
(aligned NLL + ε) (docs/method.md defense 7), keeps the top N (``plus_plus`` drops refusals first) and
writes them as chat JSONL, best first. ``--scores`` also writes one line per pool row with its
NLLs, score, refusal flag and whether it was selected. With ``--cache-dir`` (a study's
``cache/`` folder) the scores land in the same content-hash cache the trials read.
Every input is checked before the model is loaded; outputs are written atomically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from emtune.cli.common import fail


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the verb group `data` and its `select` verb."""
    p = sub.add_parser("data", help="data tools: select safety data by perplexity gap")
    verbs = p.add_subparsers(dest="data_verb", required=True)
    s = verbs.add_parser("select", help="score a safety pool against misaligned adapters and keep the top N")
    s.add_argument("--model", required=True, help="aligned base model: hub id, local folder, or `tiny`")
    s.add_argument("--revision", default=None, help="model revision (hub models)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    s.add_argument("--pool", default="fixture:safe_instruct",
                   help="candidate pool: chat JSONL file, fixture:NAME or hub:ORG/NAME")
    s.add_argument("--pool-split", default="train", help="split of a hub: pool")
    s.add_argument("--pool-config", default=None, help="config of a hub: pool")
    s.add_argument("--pool-limit", type=int, default=None, help="score only the first N pool rows")
    s.add_argument("--adapter", dest="adapters", action="append", required=True, metavar="PATH",
                   help="folder of a LoRA adapter fine-tuned undefended on an EM dataset (repeat for each)")
    s.add_argument("--n", type=int, required=True, help="number of rows to keep")
    s.add_argument("--variant", default="plus_plus", choices=["plus", "plus_plus"],
                   help="plus = top-N; plus_plus = drop refusals first (default)")
    s.add_argument("--epsilon", type=float, default=1.0, help="ε of the score (paper: 1)")
    s.add_argument("--max-length", type=int, default=2048, help="tokens per scored row")
    s.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    s.add_argument("--out", required=True, help="selected rows, chat JSONL")
    s.add_argument("--scores", default=None, help="optional JSONL with every pool row's NLLs and score")
    s.add_argument("--cache-dir", default=None, help="cache folder to read/write scores (a study's cache/)")
    s.set_defaults(func=main)


def _check_args(args: argparse.Namespace) -> None:
    """Every argument that can be checked without loading anything; exit 2 on the first bad one."""
    from emtune.data.selection_cache import check_adapter_dir

    if args.n <= 0:
        fail(f"--n must be a positive number of rows, got {args.n}")
    if args.epsilon <= 0:
        fail(f"--epsilon must be > 0, got {args.epsilon}")
    if args.max_length <= 8:
        fail(f"--max-length must be > 8 tokens, got {args.max_length}")
    if args.batch_size <= 0:
        fail(f"--batch-size must be > 0, got {args.batch_size}")
    if args.pool_limit is not None and args.pool_limit <= 0:
        fail(f"--pool-limit must be > 0, got {args.pool_limit}")
    for path in args.adapters:
        try:
            check_adapter_dir(path)
        except ValueError as err:
            fail(f"--adapter: {err}")
    outputs = [Path(args.out)] + ([Path(args.scores)] if args.scores else [])
    if args.scores and Path(args.scores).resolve() == Path(args.out).resolve():
        fail("--scores and --out name the same file; give two different paths")
    for out in outputs:
        if not out.parent.is_dir():
            fail(f"output folder {str(out.parent)!r} does not exist; create it or choose another path")


def _model_spec(args: argparse.Namespace) -> Any:
    from emtune.models import ModelSpec

    source = args.model
    if source != "tiny" and Path(source).expanduser().is_dir():
        source = str(Path(source).expanduser().resolve())
    return ModelSpec(source=source, revision=args.revision, dtype=args.dtype)


def _loader(model_spec: Any):
    """Loads a fresh aligned base model and its tokenizer (only on a cache miss)."""

    def load() -> tuple[Any, Any]:
        import torch

        from emtune.models import load_model, load_tokenizer, resolve_source
        from emtune.models import model_cache_dir

        source = resolve_source(model_spec, model_cache_dir())
        device = "cuda" if torch.cuda.is_available() else None
        return load_model(source, model_spec, device), load_tokenizer(source, model_spec)

    return load


def main(args: argparse.Namespace) -> int:
    """Score the pool, select N rows, write them (and optionally every score)."""
    from emtune.data import selection
    from emtune.data.loading import DatasetSpec, DataError, load_rows
    from emtune.data.selection_cache import load_or_compute_scores, load_or_select, write_text_atomic
    from emtune.models import scoring_identity

    _check_args(args)
    try:
        pool_rows = load_rows(DatasetSpec(path=args.pool, split=args.pool_split, config=args.pool_config,
                                          limit=args.pool_limit))
    except DataError as err:
        fail(f"--pool: {err}")
    model_spec = _model_spec(args)
    try:
        table = load_or_compute_scores(args.cache_dir, pool_rows, args.adapters, scoring_identity(model_spec),
                                       _loader(model_spec), args.epsilon, args.max_length, args.batch_size)
    except (OSError, ValueError) as err:
        fail(f"cannot score the pool with model {args.model!r}: {err}")
    try:
        chosen = load_or_select(args.cache_dir, table, pool_rows, args.n, args.variant)
    except ValueError as err:
        fail(f"--n {args.n}: {err}")
    indices = chosen["indices"]
    write_text_atomic(Path(args.out), "".join(json.dumps(pool_rows[i]) + "\n" for i in indices))
    if args.scores:
        picked = set(indices)
        lines = []
        for i, row in enumerate(pool_rows):
            lines.append(json.dumps({
                "index": i,
                "score": table.scores[i],
                "aligned_nll": table.aligned_nll[i],
                "misaligned_nll": [nlls[i] for nlls in table.misaligned_nll],
                "refusal": selection.is_refusal(selection.final_answer(row)),
                "selected": i in picked,
            }) + "\n")
        write_text_atomic(Path(args.scores), "".join(lines))
    dropped = f", {chosen['num_refusals']} refusals dropped first" if args.variant == "plus_plus" else ""
    print(f"selected {len(indices)} of {len(pool_rows)} pool rows ({args.variant}{dropped}); "
          f"mean score {chosen['mean_selected_score']:.4f}; scores key {table.key} -> {args.out}")
    return 0
