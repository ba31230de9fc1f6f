"""Issue 11, item 8, the values half: every value is checked before anything loads, and blamed
where it was written (file or command line); evaluation without evaluation data is refused; every
numeric key has a rule that its default passes, and the bounds admit what they say."""

import dataclasses
import math

import pytest

from config_helpers import refused, write
from prefopt import values
from prefopt.config import build_config, load_config
from prefopt.dialects import RENAMES
from prefopt.schema import TRAINING_DEFAULTS, DataArgs, ModelArgs, ObjectiveArgs, _base_types

FINITE_POSITIVE = "must be a finite number (positive)"


@pytest.mark.parametrize("text, message", [
    # the list: each refused before the tokenizer or the weights load
    ("beta: .nan", f"beta {FINITE_POSITIVE}, got nan."),
    ("beta: nan", f"beta {FINITE_POSITIVE}, got nan."),  # a string to YAML
    ("beta: .inf", f"beta {FINITE_POSITIVE}, got inf."),
    ("gamma_beta_ratio: .nan", "gamma_beta_ratio must be a finite number (at least 0; 0: no target margin), got nan."),
    ("gamma_beta_ratio: -0.5", "gamma_beta_ratio must be at least 0 (0: no target margin), got -0.5."),
    ("nll_weight: nan", "nll_weight must be a finite number (at least 0; 0: no NLL term), got nan."),
    ("nll_weight: .inf", "nll_weight must be a finite number (at least 0; 0: no NLL term), got inf."),
    ("diversity_weight: .nan", "diversity_weight must be a finite number (at least 0; 0: off), got nan."),
    ("learning_rate: -1e-5", "learning_rate must be at least 0 (0: no update), got -1e-05."),
    ("learning_rate: .nan", "learning_rate must be a finite number (at least 0; 0: no update), got nan."),
    ("num_train_epochs: 0", "num_train_epochs must be positive (to train a set number of steps, set max_steps), got 0."),
    ("save_steps: 0", "save_steps must be a share of the run's steps in (0, 1) or a whole number of at least 1, got 0."),
    # beyond the list: the other spellings are checked under the name the user wrote
    ("loss_type: simpo\nsimpo_gamma: .nan", "simpo_gamma must be a finite number (at least 0; 0: no target margin), got nan."),
    ("cpo_alpha: -1", "cpo_alpha must be at least 0 (0: no NLL term), got -1."),
    ("warmup_ratio: 1.0", "warmup_ratio must be in [0, 1) (a share of the run's steps), got 1."),
    ("max_target_length: 0", "max_target_length must be at least 1 (or unset), got 0."),
    # ... and every other numeric key
    ("per_device_train_batch_size: 0", "per_device_train_batch_size must be at least 1, got 0."),
    ("per_device_eval_batch_size: -2", "per_device_eval_batch_size must be at least 1, got -2."),
    ("gradient_accumulation_steps: 0", "gradient_accumulation_steps must be at least 1, got 0."),
    ("warmup_steps: -1", "warmup_steps must be 0, a share of the run's steps in (0, 1) or a whole number of at least 1, "
                         "got -1."),
    ("max_length: 0", "max_length must be at least 2 (or unset), got 0."),
    ("logging_steps: 0", "logging_steps must be a share of the run's steps in (0, 1) or a whole number of at least 1, "
                         "got 0."),
    ("logging_steps: 2.5", "logging_steps must be a share of the run's steps in (0, 1) or a whole number of at least "
                           "1, got 2.5."),
    ("eval_steps: 0", "eval_steps must be a share of the run's steps in (0, 1) or a whole number of at least 1 (or "
                      "unset: logging_steps), got 0."),
    ("save_total_limit: -1", "save_total_limit must be at least 1 (or unset: keep every checkpoint), got -1."),
    ("label_smoothing: 0.5", "label_smoothing must be in [0, 0.5) (at 0.5 chosen and rejected would count the same), "
                             "got 0.5."),
    ("label_smoothing: -0.1", "label_smoothing must be in [0, 0.5) (at 0.5 chosen and rejected would count the same), "
                              "got -0.1."),
    ("method: alphapo\nalpha: .nan", "alpha must be a finite number (AlphaPO's reward shape; 0: the log-prob reward), "
                                     "got nan."),
    ("max_grad_norm: -1", "max_grad_norm must be at least 0 (0: no clipping), got -1."),
    ("adam_epsilon: 0", "adam_epsilon must be positive, got 0."),
    ("adam_beta2: 1", "adam_beta2 must be in [0, 1), got 1."),
    ("weight_decay: -0.1", "weight_decay must be at least 0, got -0.1."),
    ("lora_dropout: 1.0", "lora_dropout must be in [0, 1), got 1."),
    ("lora_r: 0", "lora_r must be at least 1, got 0."),
    ("seed: -1", "seed must be in [0, 4294967295] (numpy takes 32-bit seeds), got -1."),
    ("max_steps: -2", "max_steps must be -1 or a whole number of at least 1 (transformers would train one step for 0; "
                      "to prepare and look at the data without training, run `prefopt data CONFIG.yaml`) "
                      "(-1: as many as num_train_epochs take), got -2."),
    ("max_steps: 0", "max_steps must be -1 or a whole number of at least 1 (transformers would train one step for 0; "
                      "to prepare and look at the data without training, run `prefopt data CONFIG.yaml`) "
                     "(-1: as many as num_train_epochs take), got 0."),
    ("max_steps: .inf", "max_steps: expected a whole number, got inf."),  # int(inf) was an OverflowError
    ("learning_rate: null", "learning_rate must be at least 0 (0: no update), got null."),
    ("label_smoothing_factor: 0.1",
     "label_smoothing_factor must be 0 (the preference loss's label smoothing is label_smoothing), got 0.1."),
    ("test_split_size: 1.5", "test_split_size must be 0, a share of the training rows in (0, 1) or a whole number of "
                             "at least 1 (or unset), got 1.5."),
    ("max_dropped_share: 1.5", "max_dropped_share must be a share in [0, 1], got 1.5."),
    ("diversity_alpha: 2", "diversity_alpha must be in [0, 1] (the entropy's share of the diversity term), got 2."),
    # values inside the dataset keys
    ("dataset_mixer: {a.jsonl: .nan}", "dataset_mixer['a.jsonl'] must be a finite number (a share in (0, 1]; of "
                                       "that dataset's rows), got nan."),
    ("dataset_mixer: {a.jsonl: 1.5}", "dataset_mixer['a.jsonl'] must be a share in (0, 1] (of that dataset's rows), "
                                      "got 1.5."),
    ("dataset_mixer: {a.jsonl: }", "dataset_mixer['a.jsonl']: give the share of its rows to use, e.g. 1.0."),
    ("datasets: [{path: a.jsonl, fraction: -1}]",
     "datasets[0].fraction must be positive (a weight, normalised over the datasets), got -1."),
    ("datasets: [{path: a.jsonl, keep_fraction: 0}]",
     "datasets[0].keep_fraction must be a share in (0, 1] (of that dataset's rows), got 0."),
    ("dataset_mixture: {datasets: [{id: a, weight: abc}]}",
     "dataset_mixture.datasets[0].weight: expected a number, got 'abc'."),  # float('abc') was a ValueError
    ("dataset_mixture: {datasets: [{id: a}], test_split_size: -0.1}",
     "dataset_mixture.test_split_size must be 0, a share of the training rows in (0, 1) or a whole number of at "
     "least 1 (or unset), got -0.1."),
])
def test_every_numeric_value_is_checked_before_anything_loads(tmp_path, capsys, text, message):
    body = text if text.startswith(("method", "loss_type")) else f"method: simpo\n{text}"
    assert refused(tmp_path, capsys, body + "\n") == f"c.yaml: {message}"


EVAL_FIX = ("but no evaluation data is configured: name a held-out split (a split named like test/valid/eval in "
            "dataset_splits or datasets, or dataset_test_split), or hold part of train out with test_split_size (e.g. "
            "0.05); or set")


def test_evaluation_without_evaluation_data_is_refused(tmp_path, capsys):
    data = "method: simpo\ndataset_name: pairs.jsonl\n"  # never read: the refusal comes first
    assert refused(tmp_path, capsys, data + "eval_strategy: steps\n") == (
        f"c.yaml: eval_strategy: steps asks for evaluation, {EVAL_FIX} eval_strategy: no to train without evaluating.")
    assert refused(tmp_path, capsys, data + "eval_strategy: epoch\neval_on_start: true\n") == (
        f"c.yaml: eval_strategy: epoch and eval_on_start: true ask for evaluation, {EVAL_FIX} eval_strategy: no and "
        "eval_on_start: false to train without evaluating.")
    mixer = "method: simpo\ndataset_mixer: {d: 1.0}\ndataset_splits: [train]\neval_strategy: steps\n"
    assert "eval_strategy: steps asks for evaluation" in refused(tmp_path, capsys, mixer)
    # any evaluation data makes it fine
    for held_out in ("test_split_size: 0.1", "dataset_test_split: validation"):
        assert load_config(write(tmp_path, data + "eval_strategy: steps\n" + held_out)).training.eval_strategy == "steps"
    assert load_config(write(tmp_path, data + "eval_strategy: no")).training.eval_strategy == "no"
    assert load_config(write(tmp_path, mixer.replace("[train]", "[train, test]"))).data.eval_datasets
    # a config that names no data at all (a library caller hands the Trainer its own eval set)
    assert build_config({"method": "simpo", "eval_strategy": "steps"}).training.eval_strategy.value == "steps"


def test_a_bad_value_is_blamed_where_it_was_written(tmp_path, capsys):
    assert refused(tmp_path, capsys, "method: simpo\n", "--beta", "nan") == \
        f"command line: beta {FINITE_POSITIVE}, got nan."
    # the command line replaces the file's value: the file's is never used, so not refused
    assert load_config(write(tmp_path, "method: simpo\nbeta: .nan"), ["--beta", "2.5"]).objective.beta == 2.5
    # a number written as a string is read as one (simpo_gamma '0.5' divided by β was a TypeError)
    assert load_config(write(tmp_path, "loss_type: simpo\nbeta: 2\nsimpo_gamma: '0.5'")).objective.gamma_beta_ratio \
        == 0.25


def _numeric(key: str) -> bool:
    types_ = _base_types(values.FIELD_TYPES[key])
    return bool(types_ & {int, float}) and bool not in types_


def test_every_numeric_key_has_a_rule_and_its_default_passes():
    rules = values.VALUE_RULES
    keys = values.VALID_KEYS | {"keep_fraction", "fraction"}  # the last two: inside dataset entries
    assert set(rules) <= keys
    numeric = {k for k in keys if k in values.FIELD_TYPES and _numeric(k)}
    numeric |= {old for old, new in RENAMES.items() if _numeric(new)} | {"simpo_gamma"}
    # local_rank is the launcher's, not the user's (cli drops --local_rank)
    assert numeric - set(rules) == {"local_rank"}
    assert {"simpo_gamma", "cpo_alpha", "sft_weight", "warmup_ratio", "dataset_num_proc", "max_target_length"} <= numeric
    from transformers import TrainingArguments

    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    for cls in (ModelArgs, DataArgs, ObjectiveArgs):
        defaults |= {f.name: f.default for f in dataclasses.fields(cls)}
    defaults |= TRAINING_DEFAULTS
    checked = 0
    for key, (bound, _) in rules.items():
        if isinstance(defaults.get(key), (int, float)):
            assert bound.admits(defaults[key]), key
            checked += 1
    assert checked >= 25  # 27 with transformers 5.2: the loop is not vacuous


@pytest.mark.parametrize("bound, inside, outside", [
    (values.POSITIVE, [1e-12, 5.0], [0, -1, math.nan, math.inf]),
    (values.COUNT, [1, 7], [0, -1]),
    (values.Bound(0, 0.5, high_open=True), [0, 0.49], [0.5, -0.01, math.nan]),
    (values.Bound(), [-3.0, 0, 2.0], [math.nan, math.inf, -math.inf]),
    (values.STEPS, [0.5, 1, 1.0, 500], [0, 1.5, -1, math.inf]),
    (values.ShareOrCount("x", zero=True), [0, 0.5, 3], [-0.1, 2.5]),
])
def test_bounds(bound, inside, outside):
    assert all(bound.admits(v) for v in inside) and not any(bound.admits(v) for v in outside)
