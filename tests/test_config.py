"""Config: every seed config loads unchanged, dialects normalise to one canonical form, bad keys
are refused with the fix, and the resolved config loads back to the same run."""

import codecs
import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from prefopt import values, yamlfile
from prefopt.cli import main
from prefopt.config import build_config, explain, load_config, resolved_dict
from prefopt.dialects import RENAMES
from prefopt.errors import PrefoptError
from prefopt.schema import TRAINING_DEFAULTS, DataArgs, ModelArgs, ObjectiveArgs, _base_types

SEEDS = Path(__file__).parent / "fixtures" / "seed_configs"


def write(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


# method, loss, β, γ/β, NLL weight for each seed: what a user of its source repo expects
EXPECTED = {
    "phi3-mini4k-cpo-simpo.yaml": ("cpo_simpo", "sigmoid", 10.0, 0.54, 0.05),  # TRL: simpo_gamma 5.4 absolute
    "mistral-7b-base-simpo.yaml": ("simpo", "sigmoid", 2.0, 0.5, 0.0),  # SimPO repo: loss_type sigmoid = SimPO's
    "llama3-8b-instruct-simpo.yaml": ("simpo", "sigmoid", 2.5, 0.5, 0.1),  # sft_weight 0.1
    "deepseek-math-simpo.yaml": ("simpo", "sigmoid", 5.0, 0.7, 0.0),
    "llama3-8b-orpo-qlora.yaml": ("orpo", "odds_ratio", 0.1, 0.0, 1.0),
    "elyza-llama3-simpo.yaml": ("simpo", "sigmoid", 2.0, 0.35, 0.0),  # cpo_alpha 0, simpo_gamma 0.7
    "elyza-llama3-diversity-simpo.yaml": ("simpo", "sigmoid", 2.0, 0.35, 0.0),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_seed_config_loads_and_resolves(name):
    cfg = load_config(SEEDS / name)
    o = cfg.objective
    method, loss, beta, ratio, nll = EXPECTED[name]
    assert (o.method, o.loss_type) == (method, loss)
    assert o.beta == pytest.approx(beta)
    assert o.gamma_beta_ratio == pytest.approx(ratio)
    assert o.nll_weight == pytest.approx(nll)
    text = explain(cfg)
    assert f"method" in text and method in text
    # the resolved form loads back to the same thing
    again = build_config(yaml.safe_load(yaml.safe_dump(resolved_dict(cfg))))
    assert resolved_dict(again) == resolved_dict(cfg)


def test_seed_dialect_details():
    phi3 = load_config(SEEDS / "phi3-mini4k-cpo-simpo.yaml")
    assert phi3.training.eval_strategy.value == "steps"  # evaluation_strategy, the old name
    assert phi3.training.warmup_steps == pytest.approx(0.1)  # warmup_ratio, folded in by transformers 5
    assert phi3.training.gradient_checkpointing is True
    assert phi3.data.max_prompt_length == 1800 and phi3.data.preprocessing_num_workers == 12
    assert [(s.path, s.split) for s in phi3.data.train_datasets] == [("princeton-nlp/llama3-ultrafeedback", "train")]
    assert [s.split for s in phi3.data.eval_datasets] == ["test"]
    mistral = load_config(SEEDS / "mistral-7b-base-simpo.yaml")
    assert [s.split for s in mistral.data.train_datasets] == ["train_prefs"]
    assert [s.split for s in mistral.data.eval_datasets] == ["test_prefs"]
    assert mistral.model.dtype == "bfloat16" and mistral.training.learning_rate == 5e-7  # "5e-7" is a str to YAML
    orpo = load_config(SEEDS / "llama3-8b-orpo-qlora.yaml")
    assert orpo.model.load_in_4bit and orpo.model.use_peft and orpo.model.lora_r == 16
    assert orpo.data.test_split_size == 0.01 and orpo.data.chat_template == "chatml"
    assert orpo.training.eval_steps == 0.2
    div = load_config(SEEDS / "elyza-llama3-diversity-simpo.yaml")
    assert (div.objective.diversity_weight, div.objective.diversity_alpha) == (0.05, 0.1)


@pytest.mark.parametrize(
    "yaml_text, method, beta, ratio, nll",
    [
        ("method: simpo", "simpo", 2.0, 0.5, 0.0),  # the SimPO paper's defaults, no NLL term
        ("method: cpo_simpo", "cpo_simpo", 10.0, 0.54, 0.05),
        ("method: cpo", "cpo", 0.1, 0.0, 1.0),
        ("method: orpo", "orpo", 0.1, 0.0, 1.0),
        ("method: alphapo", "alphapo", 2.0, 0.5, 0.0),
        # TRL's loss_type: simpo without cpo_alpha is SimPO here (TRL would silently add 1.0·NLL)
        ("loss_type: simpo\nbeta: 2.5\nsimpo_gamma: 1.0", "simpo", 2.5, 0.4, 0.0),
        ("loss_type: simpo\ncpo_alpha: 0.5", "cpo_simpo", 10.0, 0.54, 0.5),  # the rest from CPO-SimPO
        ("loss_type: sigmoid\nbeta: 0.2", "cpo", 0.2, 0.0, 1.0),  # TRL dialect: CPO
        ("loss_type: hinge\ngamma_beta_ratio: 0.3", "simpo", 2.0, 0.3, 0.0),  # SimPO-repo dialect
    ],
)
def test_methods_resolve_with_paper_defaults(tmp_path, yaml_text, method, beta, ratio, nll):
    o = load_config(write(tmp_path, yaml_text)).objective
    assert (o.method, o.beta, o.gamma_beta_ratio, o.nll_weight) == (method, beta, pytest.approx(ratio), nll)


def test_loss_types_and_reductions(tmp_path):
    ipo = load_config(write(tmp_path, "loss_type: ipo")).objective
    assert (ipo.method, ipo.loss_type) == ("cpo", "ipo")
    assert load_config(write(tmp_path, "loss_type: ipo")).reduction == "mean"
    assert load_config(write(tmp_path, "method: cpo")).reduction == "sum"
    assert load_config(write(tmp_path, "loss_type: alphapo")).objective.alpha == 0.25


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("simpo_gamma: 1.0\ngamma_beta_ratio: 0.5\nmethod: simpo", "'gamma_beta_ratio' and 'simpo_gamma' say the same thing"),
        ("cpo_alpha: 0.1\nsft_weight: 0.1\nmethod: simpo", "'cpo_alpha' and 'sft_weight' say the same thing"),
        ("method: simpo\nbetta: 2", "unknown key 'betta'. Did you mean 'beta'?"),
        ("method: simpo\nlearning_rat: 1e-6", "Did you mean 'learning_rate'?"),
        ("method: smpo", "Did you mean 'simpo'?"),
        ("method: cpo\ngamma_beta_ratio: 0.5", "cpo has no target margin"),
        ("method: orpo\nalpha: 0.2", "orpo has no reward-shape parameter"),
        ("method: simpo\nloss_type: ipo", "method simpo takes loss_type sigmoid or hinge"),
        ("method: cpo\nloss_type: hinge\nlabel_smoothing: 0.1", "label_smoothing applies to the sigmoid loss only"),
        ("method: simpo\nbeta: abc", "beta: expected a number, got 'abc'"),
        ("method: simpo\nbeta: -1", "beta must be positive"),
        ("beta: 2", "no objective given"),
        ("method: simpo\ndataset_mixer: {a: 1.0}\ndataset_name: b", "the data is named twice"),
        ("method: simpo\nmax_length: 100\nmax_prompt_length: 100", "must be below max_length"),
        ("method: simpo\n- a list", "is not valid YAML"),
        ("- just\n- a list", "expected a mapping"),
    ],
)
def test_bad_configs_are_refused_with_the_fix(tmp_path, yaml_text, message):
    with pytest.raises(PrefoptError) as e:
        load_config(write(tmp_path, yaml_text))
    assert message in str(e.value)
    assert "c.yaml" in str(e.value)  # names the file


def test_command_line_overrides_win_including_other_spellings(tmp_path):
    path = write(tmp_path, "loss_type: simpo\nbeta: 2.0\nsimpo_gamma: 1.0\ndataset_mixer: {a.jsonl: 1.0}")
    cfg = load_config(path, ["--gamma_beta_ratio", "0.25", "--beta=4", "--dataset_name", "b.jsonl", "--bf16", "false"])
    assert cfg.objective.beta == 4.0 and cfg.objective.gamma_beta_ratio == 0.25
    assert [s.path for s in cfg.data.train_datasets] == ["b.jsonl"]
    with pytest.raises(PrefoptError, match="unknown option '--betaa'. Did you mean 'beta'"):
        load_config(path, ["--betaa", "3"])
    with pytest.raises(PrefoptError, match="command line: 'cpo_alpha' and 'sft_weight' say the same thing"):
        load_config(path, ["--cpo_alpha", "1", "--sft_weight", "1"])


def test_dataset_forms(tmp_path):
    mixture = """
method: simpo
dataset_mixture:
  datasets:
    - {id: a/b, config: default, split: train_prefs, columns: [prompt, chosen, rejected], weight: 0.5}
    - {id: a/b, split: test_prefs}
  test_split_size: 0.1
"""
    d = load_config(write(tmp_path, mixture)).data
    assert [(s.path, s.split, s.name, s.keep_fraction) for s in d.train_datasets] == [("a/b", "train_prefs", "default", 0.5)]
    assert [s.split for s in d.eval_datasets] == ["test_prefs"] and d.test_split_size == 0.1
    trl = "method: orpo\ndatasets:\n  - {path: x.jsonl, split: train, fraction: 0.3}\n  - {path: y.jsonl}\n"
    d = load_config(write(tmp_path, trl)).data
    assert [(s.path, s.mix_share) for s in d.train_datasets] == [("x.jsonl", 0.3), ("y.jsonl", None)]
    d = load_config(write(tmp_path, "method: cpo\ndataset_name: d\ndataset_test_split: validation")).data
    assert (d.train_datasets[0].split, d.eval_datasets[0].split) == ("train", "validation")


def test_bare_yaml_no_means_the_string(tmp_path):
    # YAML 1.1 reads `no` as false; for a string option it can only mean "no"
    cfg = load_config(write(tmp_path, "method: simpo\nsave_strategy: no\neval_strategy: no"), ["--logging_strategy", "no"])
    assert (cfg.training.save_strategy.value, cfg.training.eval_strategy.value) == ("no", "no")
    assert cfg.training.logging_strategy.value == "no"


# ---------------------------------------------------------------------------------------------
# Issue 11, item 8: the YAML read safely, every value checked before anything loads


def refused(tmp_path, capsys, content: str | bytes, *argv: str, command=("train",)) -> str:
    """Run the CLI on a config pointing at a model folder that does not exist; return the error.

    The model check comes later in the pipeline with its own message, so an exact match on the
    config's message shows the refusal came first; and nothing is written."""
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    args = [*command, str(path)]
    if command == ("train",):
        args += ["--model_name_or_path", str(tmp_path / "never-loaded"), "--output_dir", str(out)]
    assert main([*args, *argv]) == 2
    err = capsys.readouterr().err
    assert not out.exists()
    assert err.startswith("prefopt: error: ") and err.endswith("\n") and err.count("\n") == 1  # one line, no traceback
    return err.removeprefix("prefopt: error: ").removesuffix("\n").replace(str(path), "c.yaml")


KEEP_ONE = "YAML would silently keep the second. Keep one."


@pytest.mark.parametrize("text, message", [
    ("method: simpo\nbeta: 2.0\nlearning_rate: 1e-6\nbeta: 20.0\n",
     f"'beta' is given twice (line 2 and line 4); {KEEP_ONE}"),
    ("method: simpo\ndataset_mixer:\n  data/a.jsonl: 0.5\n  data/b.jsonl: 1.0\n  data/a.jsonl: 1.0\n",
     f"'data/a.jsonl' under dataset_mixer is given twice (line 3 and line 5); {KEEP_ONE}"),
    ("method: simpo\ndatasets:\n  - path: a.jsonl\n  - path: b.jsonl\n    split: train\n    columns: [prompt]\n"
     "    split: test\n", f"'split' under datasets[1] is given twice (line 5 and line 7); {KEEP_ONE}"),
    ("method: simpo\ndataset_mixture:\n  datasets:\n    - {id: a, weight: 0.5, weight: 1.0}\n",
     f"'weight' under dataset_mixture.datasets[0] is given twice on line 4; {KEEP_ONE}"),
    # two spellings of one value are one key to Python, so YAML would keep the second as well
    ("method: simpo\ncolumn_mapping: {1: a, 1.0: b}\n", f"'1.0' under column_mapping is given twice on line 2; {KEEP_ONE}"),
])
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path, capsys, text, message):
    assert refused(tmp_path, capsys, text) == f"c.yaml: {message}"
    assert refused(tmp_path, capsys, text, command=("config", "explain")) == f"c.yaml: {message}"


def test_a_key_given_twice_on_the_command_line(tmp_path, capsys):
    err = refused(tmp_path, capsys, "method: simpo\n", "--dataset_mixer", "{a.jsonl: 1.0, a.jsonl: 0.5}")
    assert err == f"command line (--dataset_mixer): 'a.jsonl' is given twice on line 1; {KEEP_ONE}"


def test_anchors_and_merge_keys_still_work(tmp_path):
    # a merge key's keys are overridden by those written beside it, by YAML's rule: no duplicate
    text = """
method: simpo
datasets:
  - &source {path: a.jsonl, split: train, columns: [prompt, chosen, rejected]}
  - {<<: *source, split: test}
"""
    d = load_config(write(tmp_path, text)).data
    assert [(s.path, s.split, s.columns) for s in d.train_datasets + d.eval_datasets] == [
        ("a.jsonl", "train", ["prompt", "chosen", "rejected"]), ("a.jsonl", "test", ["prompt", "chosen", "rejected"])]
    text = "method: simpo\nlora_target_modules: &modules [q_proj, v_proj]\nlora_modules_to_save: *modules\n"
    assert load_config(write(tmp_path, text)).model.lora_modules_to_save == ["q_proj", "v_proj"]


def test_an_alias_bomb_is_refused_while_it_is_read(tmp_path, capsys):
    # nine levels of nine aliases: 9^9 = 387,420,489 strings once expanded. Level k is 1 + 9 times
    # level k-1 (a: 10, b: 91, c: 820, d: 7,381, e: 66,430, f: 597,871), so the bound of 100,000
    # is crossed at f, line 7, before the rest is composed; and before anything else is checked.
    lines = ["method: simpo", "a: &a [q, q, q, q, q, q, q, q, q]"]
    lines += [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    assert refused(tmp_path, capsys, "\n".join(lines)) == (
        "c.yaml: line 7: this value expands to more than 100,000 values through YAML aliases (*name); write the "
        "values out instead.")


def read_yaml_text(text: str):
    return yamlfile.parse_yaml(text, "c.yaml")


def test_alias_expansion_is_counted_in_full(monkeypatch):
    # {a: &x [1, 2], b: *x}: the list is 3 values (itself and two items), and b's alias stands for
    # all 3 again: 1 (mapping) + 1 + 3 (a) + 1 + 3 (b) = 9. Counting the alias as 1 would give 7.
    text = "{a: &x [1, 2], b: *x}"
    monkeypatch.setattr(yamlfile, "MAX_YAML_VALUES", 9)
    assert read_yaml_text(text) == {"a": [1, 2], "b": [1, 2]}
    monkeypatch.setattr(yamlfile, "MAX_YAML_VALUES", 8)
    with pytest.raises(PrefoptError, match="line 1: this value expands to more than 8 values"):
        read_yaml_text(text)


def test_recursive_aliases_and_deep_nesting_are_refused():
    with pytest.raises(PrefoptError) as e:
        read_yaml_text("method: simpo\nlora_target_modules: &a [q, *a]\n")
    assert str(e.value) == ("c.yaml: line 2: the alias *a refers to a value that contains it; a config cannot hold a "
                            "recursive value.")
    with pytest.raises(PrefoptError) as e:  # 500 levels: without the bound, PyYAML's composer hits RecursionError
        read_yaml_text("lora_target_modules: " + "[" * 500 + "]" * 500)
    assert str(e.value) == "c.yaml: line 1: the YAML nests more than 64 levels deep; a config is a mapping of keys to values."
    assert read_yaml_text("a: " + "[" * 64 + "]" * 64)["a"] is not None  # the innermost list at depth 64
    with pytest.raises(PrefoptError, match="nests more than 64 levels"):
        read_yaml_text("a: " + "[" * 65 + "]" * 65)


UTF8_FIX = 'save it as UTF-8 (your editor\'s "save with encoding")'


@pytest.mark.parametrize("encoded, message", [
    (codecs.BOM_UTF16_LE + "method: simpo\n".encode("utf-16-le"),
     f"the file is UTF-16 (little-endian) text; configs are read as UTF-8: {UTF8_FIX}, or convert it with "
     "`iconv -f UTF-16 -t UTF-8 c.yaml > fixed.yaml`."),
    (codecs.BOM_UTF16_BE + "method: simpo\n".encode("utf-16-be"),
     f"the file is UTF-16 (big-endian) text; configs are read as UTF-8: {UTF8_FIX}, or convert it with "
     "`iconv -f UTF-16 -t UTF-8 c.yaml > fixed.yaml`."),
    (codecs.BOM_UTF32_LE + "method: simpo\n".encode("utf-32-le"),
     f"the file is UTF-32 (little-endian) text; configs are read as UTF-8: {UTF8_FIX}, or convert it with "
     "`iconv -f UTF-32 -t UTF-8 c.yaml > fixed.yaml`."),
    ("method: simpo\n".encode("utf-16-le"),
     "the file holds NUL bytes: it looks like UTF-16 or UTF-32 text without a byte-order mark, and configs are read "
     f"as UTF-8: {UTF8_FIX}."),
    ("method: simpo\nchat_template: 'café'\n".encode("latin-1"),
     f"line 2: not UTF-8 text (byte 0xe9: invalid continuation byte); {UTF8_FIX}."),
])
def test_other_encodings_are_named_with_the_fix(tmp_path, capsys, encoded, message):
    assert refused(tmp_path, capsys, encoded) == f"c.yaml: {message}"


def test_a_utf8_byte_order_mark_just_works(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(codecs.BOM_UTF8 + "method: simpo\nbeta: 3.0\nchat_template: 'café'\n".encode())
    cfg = load_config(path)
    assert (cfg.objective.method, cfg.objective.beta, cfg.data.chat_template) == ("simpo", 3.0, "café")


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
    ("max_steps: -2", "max_steps must be -1 or a whole number of at least 1 (transformers would train one step for 0) "
                      "(-1: as many as num_train_epochs take), got -2."),
    ("max_steps: 0", "max_steps must be -1 or a whole number of at least 1 (transformers would train one step for 0) "
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


def test_csv_text_columns_are_read_as_text(tmp_path):
    """A CSV has no types: answers that are all digits (or "NA", or blank) are text as written."""
    from prefopt.data import load_raw

    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nSay zero,0,1\nSay seven,007,7\nSay NA,NA,N/A\n")
    train, _ = load_raw(load_config(write(tmp_path, f"method: simpo\ndataset_name: {path}")).data, seed=0)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in train] == [
        ("Say zero", "0", "1"), ("Say seven", "007", "7"), ("Say NA", "NA", "N/A")]


def test_explain_rows_keep_their_order_and_each_method_its_refusals():
    # scale and margins, then the NLL rows, then α and ε — as before the hyperparameters became generic
    rows = [line.split("  ")[1].strip() for line in explain(build_config({"method": "cpo_simpo"})).splitlines()[3:10]]
    assert rows == ["β", "γ (absolute)", "γ/β", "NLL weight", "log-probs", "AlphaPO α", "label smoothing ε"]
    # the first refusal is alpha's, then label smoothing's (the old order of the checks)
    with pytest.raises(PrefoptError, match="orpo has no reward-shape parameter; remove alpha"):
        build_config({"method": "orpo", "alpha": 0.5, "label_smoothing": 0.1})
    # RePO's margin is gamma: the RePO repository's own spelling gets a message that says so
    with pytest.raises(PrefoptError, match="repo's only hyperparameter is the absolute margin gamma"):
        build_config({"method": "repo", "gamma_beta_ratio": 0.6})
    with pytest.raises(PrefoptError, match="simper has no β; remove beta"):
        build_config({"method": "simper", "beta": 2.0})
    # null means "the method's default" for the hyperparameters that have one, not for ε
    assert build_config({"method": "simpo", "beta": None}).objective.beta == 2.0
    with pytest.raises(PrefoptError, match="label_smoothing must be in"):
        build_config({"method": "simpo", "label_smoothing": None})
