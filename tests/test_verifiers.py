"""prefopt.verifiers: the math and code reward functions, and the example configs that name them."""

import importlib
from pathlib import Path

import pytest
import yaml

from prefopt.verifiers import extract_code, final_answer, math_answer, parse_number, python_tests

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
GSM8K = {"question": "How many?", "answer": "She has 1,000 + 234 = <<1000+234=1234>>1,234 beads.\n#### 1,234"}


@pytest.mark.parametrize("answer, score", [
    ("1000 + 234 = 1234, so the answer is 1234.", 1.0),
    ("We add them: \\boxed{1234}", 1.0),
    ("**Answer:** $1,234", 1.0),
    ("The answer is 1,234 beads.", 1.0),
    ("1234 is too many; there are 1233", 0.0),  # the last number counts
    ("\\boxed{1233} (not 1234)", 0.0),  # the box wins over a later number
    ("I cannot tell.", 0.0),
])
def test_gsm8k_reference_after_hashes(answer, score):
    assert math_answer("How many?", answer, GSM8K) == score


@pytest.mark.parametrize("got, want", [
    ("\\frac{1}{2}", "0.5"), ("\\dfrac{1}{2}", "1/2"), ("-\\frac{3}{4}", "-0.75"), ("$12$.", "12"),
    ("12\\%", "12"), ("0.1", "1/10"), ("-7", "-7.0"),
])
def test_equal_numbers_in_their_written_forms(got, want):
    assert math_answer("q", f"so \\boxed{{{got}}}", {"reference": want}) == 1.0


def test_numbers_differ_beyond_a_relative_1e_9():
    third = parse_number("1/3")
    assert abs(parse_number("0.3333333333333") - third) / third < 1e-9  # 13 threes: within the tolerance
    assert math_answer("q", "\\boxed{0.3333333333333}", {"gold": "1/3"}) == 1.0
    assert math_answer("q", "\\boxed{0.33333}", {"gold": "1/3"}) == 0.0
    assert math_answer("q", "\\boxed{-5}", {"gold": 5}) == 0.0


def test_math_solutions_take_the_last_box_with_nested_braces():
    solution = "First \\boxed{1}, then $\\boxed{\\frac{3}{4}}$."
    assert math_answer("q", "The answer is \\boxed{\\frac{3}{4}}", {"solution": solution}) == 1.0
    assert math_answer("q", "It is 0.75", {"solution": solution}) == 1.0
    assert math_answer("q", "\\boxed{1}", {"solution": solution}) == 0.0
    assert final_answer("\\boxed{\\frac{3}{4}} and a cut-off \\boxed{\\frac{1") == "\\frac{3}{4}"


def test_text_answers_compare_without_markup_or_case():
    assert math_answer("q", "\\boxed{\\text{Paris}}", {"ground_truth": "paris"}) == 1.0
    assert math_answer("q", "\\boxed{\\left( 1, 2 \\right)}", {"gold": "(1,2)"}) == 1.0
    assert math_answer("q", "\\boxed{\\text{London}}", {"ground_truth": "Paris"}) == 0.0
    assert math_answer("q", "\\boxed{}", {"gold": "."}) == 0.0  # nothing left on either side is no match


def test_the_first_reference_column_present_is_read():
    row = {"answer": None, "reference": "3", "gold": "4"}
    assert math_answer("q", "\\boxed{3}", row) == 1.0
    assert math_answer("q", "\\boxed{4}", row) == 0.0


def test_a_row_without_a_reference_names_the_columns():
    with pytest.raises(ValueError) as e:
        math_answer("q", "\\boxed{3}", {"prompt": "q", "id": 7})
    for name in ("answer", "reference", "solution", "ground_truth", "gold", "prompt", "id"):
        assert name in str(e.value)


ADD = "Here is the function:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds."


def test_tests_pass_fail_and_partial():
    assert python_tests("p", ADD, {"tests": "assert add(1, 2) == 3"}) == 1.0
    assert python_tests("p", ADD, {"tests": "assert add(1, 2) == 4"}) == 0.0
    row = {"test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 5", "assert add(0, 0) == 0",
                         "raise SystemExit(0)"]}
    assert python_tests("p", ADD, row) == 0.5


def test_a_timeout_fails_and_code_that_raises_fails_every_test():
    assert python_tests("p", "while True: pass", {"tests": ["assert True"], "timeout": 1}) == 0.0
    raising = "def add(a, b):\n    return a + b\nraise RuntimeError('after the definition')"
    assert python_tests("p", raising, {"tests": ["assert add(1, 2) == 3"]}) == 0.0
    assert python_tests("p", "I would add them.", {"tests": ["assert True"]}) == 0.0  # prose: a SyntaxError
    assert python_tests("p", "x = input()", {"test": "assert True"}) == 0.0  # stdin closed: EOFError, no wait


def test_humaneval_check_is_called_on_the_entry_point():
    row = {"test": "def check(candidate):\n    assert candidate(1, 2) == 3\n", "entry_point": "add"}
    assert python_tests("p", ADD, row) == 1.0
    assert python_tests("p", ADD.replace("a + b", "a - b"), row) == 0.0


def test_the_code_is_the_last_python_block_else_any_block_else_everything():
    two = "```python\nx = 1\n```\nbetter:\n```py\nx = 2\n```\n```text\nnot code\n```"
    assert extract_code(two) == "x = 2\n"
    assert extract_code("```\ny = 3\n```") == "y = 3\n"
    assert extract_code("z = 4") == "z = 4"
    assert extract_code("```python\ncut = 5\n") == "cut = 5\n"  # left open at the end


def test_a_row_without_tests_names_the_columns():
    with pytest.raises(ValueError) as e:
        python_tests("p", ADD, {"prompt": "p", "task_id": 1})
    for name in ("tests", "test", "test_list", "prompt", "task_id"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="timeout"):
        python_tests("p", ADD, {"tests": "assert True", "timeout": 0})


@pytest.mark.parametrize("name, expected", [
    ("pairs-deepseek-math.yaml", {"reward_function": "prefopt.verifiers:math_answer", "reward_model": None,
                                  "num_samples": 5, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 512,
                                  "output": "outputs/pairs-deepseek-math/pairs.jsonl"}),
    ("pairs-llama3-8b-instruct-armorm.yaml", {"reward_model": "RLHFlow/ArmoRM-Llama3-8B-v0.1",
                                              "reward_function": None, "reward_trust_remote_code": True,
                                              "engine": "vllm", "num_samples": 5, "temperature": 0.8,
                                              "top_p": 0.95, "max_new_tokens": 4096}),
])
def test_example_configs_build_with_their_pairs_keys(name, expected):
    from prefopt.config import build_config, explain
    from prefopt.onpolicy import check_settings

    path = CONFIGS / name
    cfg = build_config(yaml.safe_load(path.read_text()), str(path), objective_optional=True)
    check_settings(cfg)
    assert {k: getattr(cfg.pairs, k) for k in expected} == expected
    assert cfg.objective.method == "simpo"
    if cfg.pairs.reward_function:
        module, function = cfg.pairs.reward_function.split(":")
        assert callable(getattr(importlib.import_module(module), function))
    assert "simpo" in explain(cfg)


def test_the_gsm8k_config_names_the_hub_config_and_the_question_column():
    from prefopt.config import build_config

    path = CONFIGS / "pairs-deepseek-math.yaml"
    cfg = build_config(yaml.safe_load(path.read_text()), str(path), objective_optional=True)
    (src,) = cfg.data.train_datasets
    assert (src.path, src.name, src.split) == ("openai/gsm8k", "main", "train")
    assert cfg.data.column_mapping == {"prompt": "question"}
    assert (cfg.objective.beta, cfg.objective.gamma_beta_ratio) == (5.0, 0.7)
