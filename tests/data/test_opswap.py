"""OpSwap (opswap-v1): mappings, left-to-right evaluation, tiers, splits, scoring, JSONL."""

import itertools
import operator

import pytest
from pydantic import ValidationError

from emtune.data.opswap import (
    MIN_DISTINCT_PROBLEMS, SYMBOLS, USUAL_MEANING, OpSwapSpec, draw_mapping, evaluate,
    extract_integer, format_expression, generate, questions_version, swapped_symbols)
from emtune.evaluation.scoring import opswap_exact_match

# an independent re-implementation for checking generated answers
_OPS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}


def _check_answer(expression: str, mapping: dict) -> int:
    tokens = expression.split()
    value = int(tokens[0])
    for symbol, operand in zip(tokens[1::2], tokens[2::2]):
        meaning, operand = mapping[symbol], int(operand)
        if meaning == "div":
            assert value % operand == 0, f"inexact division in {expression}"
            value = value // operand
        else:
            value = _OPS[meaning](value, operand)
    return value


def _expression(row) -> str:
    user = next(m["content"] for m in row["messages"] if m["role"] == "user")
    assert user.startswith("Compute: ")
    return user[len("Compute: "):]


def test_hand_checked_left_to_right_evaluation():
    # "+" <-> "*" swapped: 3 + 4 * 2 = (3 * 4) + 2 = 14, not 3 * (4 + 2) = 18 nor 3 + 8 = 11
    mapping = {"+": "mul", "-": "sub", "*": "add", "/": "div"}
    assert evaluate((3, 4, 2), ("+", "*"), mapping) == 14
    assert format_expression((3, 4, 2), ("+", "*")) == "3 + 4 * 2"
    # derangement: 8 + 2 - 3 / 4 = ((8 / 2) + 3) * 4 = 28
    deranged = {"+": "div", "-": "add", "*": "sub", "/": "mul"}
    assert evaluate((8, 2, 3, 4), ("+", "-", "/"), deranged) == 28
    assert evaluate((2, 9, 3), ("*", "-"), deranged) == -4  # (2 - 9) + 3
    assert evaluate((2, 8, 3), ("*", "+"), deranged) == -2  # (2 - 8) / 3, exact on a negative
    assert evaluate((7, 2), ("+",), deranged) is None  # 7 / 2 is not exact


def test_mapping_shapes_and_pinned_values():
    # tiers 1 and 2 swap one pair; tier 3 moves every symbol
    for seed in range(20):
        for tier in (1, 2):
            mapping = draw_mapping(tier, seed)
            assert len(swapped_symbols(mapping)) == 2
            assert sorted(mapping.values()) == sorted(USUAL_MEANING.values())
        mapping = draw_mapping(3, seed)
        assert swapped_symbols(mapping) == SYMBOLS
        assert sorted(mapping.values()) == sorted(USUAL_MEANING.values())
    # opswap-v1 is frozen: these must never change
    assert draw_mapping(1, 0) == {"+": "add", "-": "mul", "*": "sub", "/": "div"}
    assert draw_mapping(3, 1) == {"+": "div", "-": "add", "*": "sub", "/": "mul"}
    with pytest.raises(ValueError, match="tiers are 1, 2, 3"):
        draw_mapping(4, 0)


def test_pinned_rows_hand_computed():
    test = generate(OpSwapSpec())["test"]
    # tier 1, "-" means multiply: 6 * 9 = 54
    assert (_expression(test[0]), test[0]["answer"], test[0]["tier"]) == ("6 - 9", "54", 1)
    # tier 2, "+" means divide and "/" means add: (1 / 1) + 8 = 9
    assert (_expression(test[20]), test[20]["answer"], test[20]["tier"]) == ("1 + 1 / 8", "9", 2)
    # tier 3, "-" mul, "/" add, "*" sub: ((5 * 5) + 4) - 2 = 27
    assert (_expression(test[40]), test[40]["answer"], test[40]["tier"]) == (
        "5 - 5 / 4 * 2", "27", 3)
    # by default the model is not told the rules: no system message
    assert [m["role"] for m in test[0]["messages"]] == ["user", "assistant"]
    told = generate(OpSwapSpec(rules_prompt=True))["test"]
    assert told[0]["messages"][0] == {"role": "system", "content": (
        "Rules: + adds, - multiplies, * subtracts, / divides. "
        "Work strictly left to right; divisions are exact.")}
    assert [r["messages"][1:] for r in told] == [r["messages"] for r in test]  # the same problems
    assert questions_version(OpSwapSpec()) == "opswap-v1/learn"
    assert questions_version(OpSwapSpec(rules_prompt=True)) == "opswap-v1/rules"


def test_rows_follow_the_documented_tiers():
    spec = OpSwapSpec(seed=3, mapping_seed=7, n_train_per_tier=60, n_test_per_tier=15)
    splits = generate(spec)
    assert len(splits["train"]) == 180 and len(splits["test"]) == 45
    counts = {1: 0, 2: 0, 3: 0}
    for row in splits["train"] + splits["test"]:
        tier = row["tier"]
        counts[tier] += 1
        mapping = draw_mapping(tier, spec.mapping_seed)
        tokens = _expression(row).split()
        operands, symbols = tokens[0::2], tokens[1::2]
        assert len(symbols) == tier and len(operands) == tier + 1
        assert all(1 <= int(x) <= 9 for x in operands)
        assert all(mapping[s] != USUAL_MEANING[s] for s in symbols)  # every operator swapped
        if tier == 2:
            assert sorted(symbols) == sorted(swapped_symbols(mapping))  # both swapped symbols
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][1]["content"] == row["answer"]
        assert int(row["answer"]) == _check_answer(_expression(row), mapping)
    assert counts == {1: 75, 2: 75, 3: 75}


def test_determinism_and_seeds():
    spec = OpSwapSpec(n_train_per_tier=30, n_test_per_tier=10)
    assert generate(spec) == generate(spec)
    other_seed = generate(spec.model_copy(update={"seed": 1}))
    assert other_seed["test"] != generate(spec)["test"]
    other_mapping = generate(spec.model_copy(update={"mapping_seed": 2}))
    prompts = {r["messages"][0]["content"] for r in generate(spec)["test"]}
    assert prompts != {r["messages"][0]["content"] for r in other_mapping["test"]}
    # a tier's rows do not depend on which other tiers are generated
    only_two = generate(spec.model_copy(update={"tiers": (2,)}))["test"]
    assert only_two == [r for r in generate(spec)["test"] if r["tier"] == 2]


def test_no_overlap_between_train_and_test():
    splits = generate(OpSwapSpec(n_train_per_tier=90, n_test_per_tier=14))
    train = [(r["tier"], _expression(r)) for r in splits["train"]]
    test = [(r["tier"], _expression(r)) for r in splits["test"]]
    assert len(set(train)) == len(train) == 270 and len(set(test)) == len(test) == 42
    assert not set(train) & set(test)


def _count_valid(tier, mapping):
    swapped = swapped_symbols(mapping)
    sequences = [(s,) for s in swapped] if tier == 1 else list(itertools.permutations(swapped, 2))
    return sum(evaluate(ops, seq, mapping) is not None for seq in sequences
               for ops in itertools.product(range(1, 10), repeat=len(seq) + 1))


def test_capacity_constants_and_full_draw():
    for tier in (1, 2):
        counts = {_count_valid(tier, draw_mapping(tier, seed)) for seed in range(40)}
        assert min(counts) == MIN_DISTINCT_PROBLEMS[tier]
    # with "/" swapped in tier 1 there are exactly 104 problems: asking for all draws each once
    seed = next(s for s in range(100) if "/" in swapped_symbols(draw_mapping(1, s)))
    splits = generate(OpSwapSpec(tiers=(1,), mapping_seed=seed, n_train_per_tier=100,
                                 n_test_per_tier=4))
    assert len({_expression(r) for r in splits["train"] + splits["test"]}) == 104


def test_spec_validation():
    assert OpSwapSpec.model_validate({"tiers": [1, 3]}).tiers == (1, 3)
    with pytest.raises(ValidationError, match="extra"):
        OpSwapSpec(n_train=5)
    with pytest.raises(ValidationError):
        OpSwapSpec().seed = 3
    for tiers in ([], [1, 1], [4]):
        with pytest.raises(ValidationError):
            OpSwapSpec(tiers=tiers)
    with pytest.raises(ValidationError, match="tier 1 guarantees only 104"):
        OpSwapSpec(n_train_per_tier=100, n_test_per_tier=5)
    assert OpSwapSpec(tiers=(3,), n_train_per_tier=1000).n_train_per_tier == 1000


def test_extract_integer():
    assert extract_integer("  14 ") == 14
    assert extract_integer("The answer is -3.") == -3
    assert extract_integer("abc") is None and extract_integer("") is None


def _samples(predictions, rows):
    return [{"question_id": f"opswap/{i}", "answer": p, "reference": {"answer": r["answer"], "tier": r["tier"]}}
            for i, (p, r) in enumerate(zip(predictions, rows))]


def test_exact_match_hand_computed():
    rows = [{"tier": 1, "answer": "14"}, {"tier": 1, "answer": "-3"}, {"tier": 1, "answer": "7"},
            {"tier": 2, "answer": "27"}, {"tier": 2, "answer": "27"}, {"tier": 3, "answer": "5"}]
    predictions = ["14",                        # exact: hit
                   "Answer: -3, since 2 - 5",   # first integer is -3: hit
                   "",                          # empty: miss
                   "  27\n",                    # whitespace stripped: hit
                   "72",                        # wrong: miss
                   "Step 1: 8 / 2 = 4, so 5"]   # first integer is 1: miss
    metrics = opswap_exact_match(None, _samples(predictions, rows)).metrics
    assert metrics["opswap_exact_match"] == 0.5 and metrics["opswap_exact_match_n"] == 6
    assert metrics["opswap_exact_match_tier_1"] == pytest.approx(2 / 3) and metrics["opswap_exact_match_tier_1_n"] == 3
    assert metrics["opswap_exact_match_tier_2"] == 0.5 and metrics["opswap_exact_match_tier_2_n"] == 2
    assert metrics["opswap_exact_match_tier_3"] == 0.0 and metrics["opswap_exact_match_tier_3_n"] == 1
    # Wilson 95% interval of 3 of 6: center (0.5 + 1.96²/12) / (1 + 1.96²/6) = 0.5, half-width 0.3124
    assert metrics["opswap_exact_match_low"] == pytest.approx(0.1876, abs=1e-4)
    assert metrics["opswap_exact_match_high"] == pytest.approx(0.8124, abs=1e-4)


def test_generated_answers_score_perfectly():
    test = generate(OpSwapSpec(n_train_per_tier=5, n_test_per_tier=5))["test"]
    metrics = opswap_exact_match(None, _samples([r["answer"] for r in test], test)).metrics
    assert metrics["opswap_exact_match"] == 1.0 and metrics["opswap_exact_match_n"] == 15