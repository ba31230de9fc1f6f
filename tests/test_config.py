"""Config: every seed config loads unchanged, dialects normalise to one canonical form, bad keys
are refused with the fix, and the resolved config loads back to the same run. The YAML read safely
is test_config_yaml.py; every value checked before anything loads, test_config_values.py."""

from pathlib import Path

import pytest
import yaml

from config_helpers import write
from prefopt.config import build_config, explain, load_config, resolved_dict
from prefopt.errors import PrefoptError

SEEDS = Path(__file__).parent / "fixtures" / "seed_configs"


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
