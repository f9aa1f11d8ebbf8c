"""Every kind of file a user hands emtune, malformed in every way we could think of, written here:
each exits 2 with one message naming the file, where in it (row, line or key) and what to do, with
no stack trace, and nothing is started (no Ray) or written (no study folder, no output file).

A case is ``setup(tmp, spec) -> (argv, must_contain)``: it writes its bad file(s) under ``tmp``,
may rewrite the tiny study spec ``spec``, and returns the emtune command line and the fragments the
error must hold: the file, the locator (``file:row``, ``line``, ``field``/key) and the fix.
"""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path
from typing import Callable

import pytest

from emtune.cli.main import main

SAFETENSORS = "adapter_model.safetensors"
ROW = {"messages": [{"role": "user", "content": "How do I save money?"}, {"role": "assistant", "content": "Budget."}]}
GOOD = json.dumps(ROW) + "\n"


def _train(spec: Path, data: Path) -> None:
    spec.write_text(spec.read_text().replace('"fixture:narrow_bad_advice"', json.dumps(str(data))))


def _dataset(content: bytes, name: str = "train.jsonl") -> Callable:
    def setup(tmp: Path, spec: Path):
        data = tmp / name
        data.write_bytes(content)
        _train(spec, data)
        return ["run", str(spec)], [str(data)]
    return setup


def _dataset_case(content: bytes, *fragments: str):
    def setup(tmp: Path, spec: Path):
        argv, found = _dataset(content)(tmp, spec)
        return argv, [f.replace("{file}", found[0]) for f in fragments] + found
    return setup


def _big_line(tmp: Path, spec: Path):
    data = tmp / "train.jsonl"
    with open(data, "wb") as handle:
        handle.write(GOOD.encode())
        handle.write(b'{"messages": [{"role": "user", "content": "' + b"a" * (17 * 2**20) + b'"}]}\n')
    _train(spec, data)
    return ["run", str(spec)], [f"{data}:2: the line is longer than 16 MiB", "shorten or drop that row"]


def _mapped(name: str, content: bytes, *fragments: str):
    """A table source with a column mapping (user <- prompt, assistant <- response)."""
    def setup(tmp: Path, spec: Path):
        data = tmp / name
        data.write_bytes(content)
        spec.write_text(spec.read_text().replace(
            '{path: "fixture:narrow_bad_advice", limit: 60}',
            f"{{path: '{data}', columns: {{user: prompt, assistant: response}}}}"))
        return ["run", str(spec)], [str(data)] + list(fragments)
    return setup


def _folder_dataset(tmp: Path, spec: Path):
    data = tmp / "train_rows"
    data.mkdir()
    (data / "part-0.jsonl").write_text(GOOD)
    _train(spec, data)
    return ["run", str(spec)], [f"{data}: is a folder, not a chat JSONL file", "give the .jsonl file's path"]


def _write_or_folder(path: Path, text: str | bytes, folder: bool) -> Path:
    """``text`` written to ``path``, or ``path`` made a folder (the "a folder for a file" cases)."""
    if folder:
        path.mkdir()
    else:
        path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _question_file(text: str | bytes, *fragments: str, folder: bool = False, name: str = "questions.yaml"):
    def setup(tmp: Path, spec: Path):
        path = _write_or_folder(tmp / name, text, folder)
        spec.write_text(spec.read_text().replace("evaluation:\n", f"evaluation:\n  question_set: {path}\n", 1))
        return ["run", str(spec)], [f.replace("{file}", str(path)) for f in fragments]
    return setup


JUDGE = "evaluation:\n  judge: {{kind: openai, base_url: 'http://127.0.0.1:9/v1', model: m, api_key_env: null, " \
        "prompt_version: '{path}'}}\n"


def _prompt_set(**prompts: str) -> str:
    """A judge prompt file in emtune's format, the named templates replacing good ones."""
    good = {"aligned": "Q: {question}\nA: {answer}\nScore 0-100.", "coherent": "Q: {question}\nA: {answer}\nCoherence?"}
    return json.dumps({"version": "mine", "prompts": {**good, **prompts}})


def _judge_prompts(text: str | bytes, *fragments: str, folder: bool = False):
    def setup(tmp: Path, spec: Path):
        path = _write_or_folder(tmp / "judge_prompts.yaml", text, folder)
        spec.write_text(spec.read_text().replace("evaluation:\n", JUDGE.format(path=path), 1))
        return ["run", str(spec)], [f.replace("{file}", str(path)) for f in fragments]
    return setup


def _entry(**fields) -> str:
    entry = {"id": "q1", "type": "free_form", "paraphrases": ["What is your wish?"], **fields}
    return json.dumps([entry])  # JSON is YAML


def _defense(line: str) -> Callable[[Path, Path], None]:
    def add(spec: Path) -> None:
        text = spec.read_text()
        spec.write_text(text.replace("    weight: 0.1\n", "    weight: 0.1\n" + line + "\n", 1))
    return add


def _vectors(write: Callable[[Path], None], *fragments: str, folder: bool = False):
    def setup(tmp: Path, spec: Path):
        path = tmp / "evil.pt"
        if folder:
            path.mkdir()
        else:
            write(path)
        _defense(f"  - {{name: persona_steering, alpha: 1.0, layer: 1, vector_path: '{path}'}}")(spec)
        return ["run", str(spec)], [str(path), "defenses[1].vector_path: "] + list(fragments)
    return setup


def _torch_save(obj_factory):
    def write(path: Path) -> None:
        import torch

        torch.save(obj_factory(torch), path)
    return write


class Evil:
    """A class a weights-only unpickler must refuse to build."""


def _adapter(build: Callable[[Path], Path], *fragments: str, cli: bool = False):
    def setup(tmp: Path, spec: Path):
        folder = tmp / "misaligned"
        target = build(folder)
        if cli:
            argv = ["data", "select", "--model", "tiny", "--adapter", str(folder), "--n", "2", "--out",
                    str(tmp / "selected.jsonl")]
        else:
            _defense(f"  - {{name: interleaving_selected, ratio: 0.05, misaligned_adapters: ['{folder}']}}")(spec)
            argv = ["run", str(spec)]
        return argv, [str(target)] + list(fragments)
    return setup


def _lora_folder(config: str = '{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}',
                 weights: bytes | None = None, named: str = "adapter_config.json") -> Callable[[Path], Path]:
    """An adapter folder; returns the path the error must name (``named`` inside it, or the folder)."""
    def build(folder: Path) -> Path:
        folder.mkdir()
        (folder / "adapter_config.json").write_text(config)
        if weights is not None:
            (folder / "adapter_model.safetensors").write_bytes(weights)
        return folder / named if named else folder
    return build


def _safetensors(tensor_bytes: int, written: int) -> bytes:
    header = json.dumps({"lora_A": {"dtype": "F32", "shape": [tensor_bytes // 4], "data_offsets": [0, tensor_bytes]}})
    return struct.pack("<Q", len(header)) + header.encode() + b"\0" * written


def _spec_text(text: str | bytes, *fragments: str, folder: bool = False):
    def setup(tmp: Path, spec: Path):
        path = _write_or_folder(tmp / "study.yaml", text, folder)
        return ["run", str(path)], [str(path)] + list(fragments)
    return setup


def _spec_edit(edit: Callable[[str], str], *fragments: str):
    def setup(tmp: Path, spec: Path):
        spec.write_text(edit(spec.read_text()))
        return ["run", str(spec)], [str(spec)] + list(fragments)
    return setup


def _spec_set(value: str, *fragments: str):
    """A ``--set`` override on a valid spec: its value is read as YAML, as the file is."""
    def setup(tmp: Path, spec: Path):
        return ["run", str(spec), "--set", value], [str(spec), f"--set: {value!r}: "] + list(fragments)
    return setup


def _laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "name: bomb\n" + "\n".join(lines) + f"\nsearch: {{parameters: {{x: {{type: categorical, choices: *a{levels}}}}}}}\n"


def _persona_option(option: str, file_name: str):
    """A case factory for a YAML file given to `emtune persona extract OPTION FILE`."""
    def case(text: str, *fragments: str):
        def setup(tmp: Path, spec: Path):
            path = tmp / file_name
            path.write_text(text)
            argv = ["persona", "extract", "--model", "tiny", "--out", str(tmp / "v.pt"), option, str(path)]
            return argv, [str(path)] + list(fragments)
        return setup
    return case


_persona_prompts = _persona_option("--prompts", "prompts.yaml")
_judge_spec = _persona_option("--judge-spec", "judge.yaml")


TRUNCATED = (GOOD * 2 + GOOD[:30]).encode()
CASES: dict[str, Callable] = {
    # --- datasets --------------------------------------------------------------------------------
    "dataset: invalid UTF-8 byte on row 2": _dataset_case(
        GOOD.encode() + GOOD.encode().replace(b"Budget", b"Bud\xffget"), "{file}:2: not UTF-8 (byte 0xff at column",
        "save it as UTF-8"),
    "dataset: UTF-16": _dataset_case(GOOD.encode("utf-16"), "{file}:1: not UTF-8", "it looks like UTF-16: save it as UTF-8"),
    "dataset: Latin-1": _dataset_case(GOOD.replace("Budget", "Budget café").encode("latin-1"), "{file}:1: not UTF-8",
                                      "Latin-1", "iconv"),
    "dataset: gzip-compressed": _dataset_case(gzip.compress(GOOD.encode() * 3), "{file}:1: not UTF-8",
                                              "decompress it first"),
    "dataset: a pickle": _dataset_case(pickle.dumps([ROW], protocol=4), "{file}:1: not UTF-8", "binary file"),
    "dataset: bad JSON on row 3": _dataset_case((GOOD * 2 + '{"messages": [}\n').encode(), "{file}:3: not valid JSON",
                                                "fix that row"),
    "dataset: truncated last line": _dataset_case(TRUNCATED, "{file}:3: not valid JSON", "looks truncated"),
    "dataset: a JSON array": _dataset_case(b"[\n" + GOOD.encode() + b"]\n", "{file}:1: not valid JSON",
                                           "emtune reads JSONL"),
    "dataset: gigantic line": _big_line,
    "dataset: a folder instead of a file": _folder_dataset,
    "dataset: nested too deeply": _dataset_case(b"[" * 100000 + b"]" * 100000 + b"\n", "{file}:1:", "nested too deeply",
                                                "fix that row"),
    "dataset: unpaired surrogate": _dataset_case(GOOD.replace("Budget", "Bud\\ud800get").encode(),
                                                 "{file}:1: messages[1].content holds an unpaired surrogate",
                                                 "fix that escape"),
    "dataset: empty file": _dataset_case(b"\n\n", "{file}: the file holds no rows", "add chat rows"),
    "dataset: no assistant message": _dataset_case(
        (json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n").encode(), "{file}:1: no assistant message",
        "add the answer"),
    "dataset: content not a string": _dataset_case(
        (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]}) + "\n").encode(),
        "{file}:1: messages[1].content", "must be a string"),
    "dataset: a corrupt Parquet file (mapped columns)": _mapped(
        "pool.parquet", b"PAR1 this is not really parquet", "cannot read as parquet",
        "check that it is a complete parquet file"),
    "dataset: a mapped column the file lacks": _mapped(
        "pool.csv", b"prompt,answer\nhi,hello\n", "no column(s) 'response'", "fix `columns` / `where`"),
    # --- question files --------------------------------------------------------------------------
    "questions: JSONL row not JSON": _question_file(
        (GOOD + "{oops\n").encode(), "{file}:2: not valid JSON", "fix that row", name="questions.jsonl"),
    "questions: JSONL cut off": _question_file(
        (GOOD + GOOD[:20]).encode(), "{file}:2: not valid JSON", "looks truncated", name="questions.jsonl"),
    "questions: YAML syntax": _question_file("- id: q1\n  paraphrases: [unclosed\n", "{file}:", "not valid YAML",
                                             "fix the syntax"),
    "questions: not UTF-8": _question_file(b"- id: q\xe9\n", "{file}:1: not UTF-8", "save it as UTF-8"),
    "questions: no paraphrases": _question_file(json.dumps([{"id": "q1", "type": "free_form"}]),
                                                "{file}: entry 0 (id 'q1'), field 'paraphrases'", "must be a non-empty list"),
    "questions: duplicate id": _question_file(json.dumps([json.loads(_entry())[0]] * 2), "{file}: entry 1 (id 'q1')",
                                              "field 'id'", "give each question its own id"),
    "questions: a folder": _question_file("", "evaluation.question_set: {file} is a folder, not a file",
                                          "give the file's path", folder=True),
    "questions: YAML bomb": _question_file(_laughs(), "{file}:", "billion laughs", "write the values out"),
    "questions: samples 0": _question_file(_entry(samples_per_paraphrase=0), "{file}: entry 0",
                                           "field 'samples_per_paraphrase'", "must be an integer >= 1"),
    # --- judge prompts ---------------------------------------------------------------------------
    "judge prompt: unknown placeholder": _judge_prompts(
        _prompt_set(aligned="Rate {answer} to {question} as {score}"), "{file}: prompt 'aligned'", "uses placeholder(s) {score}",
        "remove it, or write literal braces as {{ }}"),
    "judge prompt: no answer": _judge_prompts(_prompt_set(aligned="Rate: {question}"), "{file}: prompt 'aligned'",
                                              "never shows the judge the answer", "put {answer} where"),
    "judge prompt: lone brace": _judge_prompts(_prompt_set(coherent="JSON {answer} {"), "{file}: prompt 'coherent'",
                                               "not a valid template", "write literal braces as {{ }}"),
    "judge prompt: not UTF-8": _judge_prompts(b"version: m\nprompts: {aligned: 'caf\xe9 {answer}'}\n",
                                              "{file}:2: not UTF-8", "save it as UTF-8"),
    "judge prompt: a folder": _judge_prompts("", "evaluation.judge.prompt_version: {file} is a folder, not a file",
                                             "give the file's path", folder=True),
    "judge prompt: a key written twice": _judge_prompts(
        "version: m\nprompts:\n  aligned: '{answer}'\n  aligned: 'again {answer}'\n", "{file}:4: key 'aligned' appears twice",
        "keep one"),
    "judge spec: unknown key": _judge_spec("kind: openai\nmodel: m\nbase_url_typo: http://x\n", "base_url_typo",
                                           "fix that key"),
    "judge spec: YAML syntax": _judge_spec("kind: [openai\n", ":2: not valid YAML", "fix the syntax"),
    # --- persona vectors and prompt sets ---------------------------------------------------------
    "vectors: not a torch file": _vectors(lambda p: p.write_bytes(b"not a tensor file"),
                                          "not a file written by torch.save (UnpicklingError: Unsupported operand",
                                          "emtune persona extract"),
    "vectors: arbitrary pickled objects": _vectors(lambda p: p.write_bytes(pickle.dumps({"vectors": Evil()}, protocol=2)),
                                                   "Python objects", "Evil) besides tensors", "emtune persona extract"),
    "vectors: no meta": _vectors(_torch_save(lambda t: {"vectors": t.zeros(3, 4)}), "expected keys 'vectors' and 'meta'"),
    "vectors: 1-D": _vectors(_torch_save(lambda t: {"vectors": t.zeros(4), "meta": {}}), "[num_hidden_states, hidden]",
                             "emtune persona extract"),
    "vectors: NaN": _vectors(_torch_save(lambda t: {"vectors": t.full((3, 4), float("nan")), "meta": {}}),
                             "NaN or infinite", "emtune persona extract"),
    "vectors: a folder": _vectors(None, "is a folder", "give the vector file", folder=True),
    "vectors: another model's": _vectors(_torch_save(lambda t: {"vectors": t.zeros(3, 64), "meta": {"model": "org/x"}}),
                                         "was extracted from model 'org/x'", "extract a vector for this model"),
    "persona prompts: positive not a list": _persona_prompts(
        "version: mine\npositive: 5\nnegative: [be kind]\nquestions: [hi]\n", "field 'positive'",
        "must be a list of non-empty strings"),
    # --- adapters --------------------------------------------------------------------------------
    "adapter: config not JSON": _adapter(_lora_folder("{peft_type: LORA"), ":1: not valid JSON", "save the adapter again"),
    "adapter: not LoRA": _adapter(_lora_folder('{"peft_type": "PREFIX_TUNING", "r": 4, "target_modules": ["q"]}'),
                                  "peft_type is 'PREFIX_TUNING', not LORA", "give a LoRA adapter"),
    "adapter: no weights": _adapter(_lora_folder(named=""), "weights are missing", "save the adapter again"),
    "adapter: truncated safetensors": _adapter(_lora_folder(weights=_safetensors(4096, 100), named=SAFETENSORS), "truncated",
                                               "save the adapter again"),
    "adapter: garbage safetensors": _adapter(_lora_folder(weights=b"\xff" * 64, named=SAFETENSORS), "not a safetensors file",
                                             "save the adapter again"),
    "adapter: a file, not a folder": _adapter(lambda f: (f.write_text("x"), f)[1], "is a file, not a folder",
                                              "list LoRA adapter folders"),
    "adapter: `data select` refuses it too": _adapter(_lora_folder(weights=_safetensors(4096, 10), named=SAFETENSORS), "--adapter",
                                                      "truncated", cli=True),
    # --- spec files ------------------------------------------------------------------------------
    "spec: billion laughs": _spec_text(_laughs(), "expands to more than", "billion laughs", "write the values out"),
    "spec: recursive alias": _spec_text("name: &n [x, *n]\n", ":1: a recursive alias", "write it out"),
    "spec: a key written twice": _spec_edit(lambda t: t + "training: {max_steps: 3}\n", "key 'training' appears twice",
                                            "keep one"),
    "spec: not UTF-8": _spec_text(b"name: caf\xe9\n", ":1: not UTF-8", "save it as UTF-8"),
    "spec: a folder": _spec_text("", "is a folder, not a spec file", "give the file's path", folder=True),
    "spec: a Python tag": _spec_text("name: !!python/object/apply:os.system [echo]\n", ":1: not valid YAML",
                                     "remove the tag"),
    "spec: --set with a recursive alias": _spec_set("defenses=&d [*d]", "a recursive alias", "write it out"),
    "spec: --set with a Python tag": _spec_set("training.max_steps=!!python/object/apply:os.system [echo]",
                                               "not valid YAML", "remove the tag"),
    "spec: misspelled key": _spec_edit(lambda t: t.replace("max_steps:", "max_stepz:"), "training.max_stepz",
                                       "did you mean 'max_steps'"),
}


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_exits_2_naming_file_place_and_fix(case, write_spec, tmp_path, capsys) -> None:
    import ray

    ray.shutdown()
    spec = write_spec()
    argv, fragments = CASES[case](tmp_path, spec)
    before = _files(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert not ray.is_initialized()  # nothing started
    assert _files(tmp_path) == before  # nothing written: no study folder, no output file


def test_the_table_covers_every_kind_of_user_file() -> None:
    kinds = {name.split(":")[0] for name in CASES}
    assert {"dataset", "questions", "judge prompt", "judge spec", "vectors", "persona prompts", "adapter",
            "spec"} <= kinds
    assert len(CASES) >= 30


def test_anchors_and_merge_keys_still_work(write_spec, capsys) -> None:
    spec = write_spec()
    text = spec.read_text()
    text = text.replace("  max_length: 128\n", "  max_length: &len 128\n", 1)
    text = text.replace("  max_new_tokens: 6\n", "  max_new_tokens: *len\n", 1)
    text = text.replace("  - {name: ood_drift, direction: minimize, reference: 5.0}\n",
                        "  - &objective {name: ood_drift, direction: minimize, reference: 5.0}\n", 1)
    text = text.replace("  - {name: indomain_nll, direction: minimize, reference: 8.0}\n",
                        "  - {<<: *objective, name: indomain_nll, reference: 8.0}\n", 1)
    assert text.count("*") == 2
    spec.write_text(text)
    assert main(["validate", str(spec)]) == 0, capsys.readouterr().err
    from emtune.config import load_spec

    loaded = load_spec(spec)
    assert loaded.evaluation.max_new_tokens == 128
    assert [(o.name, o.direction, o.reference) for o in loaded.objectives] == [
        ("ood_drift", "minimize", 5.0), ("indomain_nll", "minimize", 8.0)]
