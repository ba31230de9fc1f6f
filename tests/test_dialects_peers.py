"""Recipes written for other tools, as they come: TRL configs that rely on CPOConfig's defaults,
LLaMA-Factory's objective keys, alignment-handbook keys, TRL's inert fields and `--no_<flag>`, and
the refusals that name what a recipe most likely is. Each recipe is written here in its dialect."""

import dataclasses
import warnings

import pytest

from prefopt.config import build_config, load_config, resolved_dict
from prefopt.peers import TOOL_DEFAULTS
from prefopt.errors import PrefoptError
from prefopt.explanation import explain


def build(raw: dict, tmp_path):
    return build_config({**raw, "output_dir": str(tmp_path / "out")}, "recipe.yaml")


def refusal(raw: dict, tmp_path) -> str:
    with pytest.raises(PrefoptError) as e:
        build(raw, tmp_path)
    return str(e.value)


def test_trls_defaults_as_recorded_are_cpoconfigs_own():
    """TOOL_DEFAULTS["TRL"] is what this TRL's CPOConfig defaults to (and its alphapo rule)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOConfig
    fields = {f.name: f.default for f in dataclasses.fields(CPOConfig)}
    trl = TOOL_DEFAULTS["TRL"]
    assert (fields["beta"], fields["simpo_gamma"], fields["alpha"]) == (trl.beta, trl.gamma, trl.alpha)
    assert fields["cpo_alpha"] == trl.nll_weight["simpo"] == trl.nll_weight["cpo"]
    assert CPOConfig(output_dir="x", loss_type="alphapo", cpo_alpha=0.5, bf16=False, use_cpu=True).cpo_alpha == trl.forced_nll["alphapo"]


def test_a_trl_simpo_config_relying_on_trls_defaults_says_each_value_trl_would_not_train(tmp_path):
    cfg = build({"loss_type": "simpo", "cpo_alpha": 0.0}, tmp_path)
    o = cfg.objective
    assert (o.method, o.beta, o.gamma_beta_ratio, o.nll_weight) == ("simpo", 2.0, 0.5, 0.0)  # the paper's
    assert [d.split(";")[0] for d in cfg.differs] == [
        "beta 2 (simpo's published default)", "gamma_beta_ratio 0.5 (γ 1, simpo's published default)"]
    assert "TRL 1.16 would train 0.1: set beta: 0.1" in cfg.differs[0]
    assert "TRL 1.16 would train simpo_gamma 0.5 (γ/β 5)" in cfg.differs[1]
    shown = explain(cfg)  # what `config explain` and the start of train print
    assert "not what its own tool would train" in shown and all(d in shown for d in cfg.differs)
    # no cpo_alpha: TRL would train CPO-SimPO (its cpo_alpha 1.0); prefopt's SimPO has no NLL term, and says so
    bare = build({"loss_type": "simpo"}, tmp_path)
    assert bare.objective.nll_weight == 0.0
    assert "NLL weight 0; TRL 1.16 would train 1 (its default for simpo)" in bare.differs[-1]


def test_the_same_config_with_trls_values_written_out_trains_trls_numbers_and_says_nothing(tmp_path):
    cfg = build({"loss_type": "simpo", "beta": 0.1, "simpo_gamma": 0.5, "cpo_alpha": 1.0}, tmp_path)
    o = cfg.objective
    assert (o.method, o.beta, o.nll_weight) == ("cpo_simpo", 0.1, 1.0)
    assert o.gamma_beta_ratio * o.beta == pytest.approx(0.5, rel=1e-15)  # γ: one division and one product
    assert cfg.differs == []
    assert "not what its own tool would train" not in explain(cfg)


def test_a_trl_cpo_config_matches_trls_defaults_already(tmp_path):
    cfg = build({"loss_type": "sigmoid"}, tmp_path)
    assert (cfg.objective.method, cfg.objective.beta, cfg.objective.nll_weight) == ("cpo", 0.1, 1.0)
    assert cfg.differs == []


def test_trls_alphapo_forces_cpo_alpha_to_0_prefopt_keeps_it_and_says_so(tmp_path):
    cfg = build({"loss_type": "alphapo", "cpo_alpha": 0.5, "beta": 2.5, "simpo_gamma": 1.25}, tmp_path)
    assert (cfg.objective.method, cfg.objective.nll_weight, cfg.objective.alpha) == ("alphapo", 0.5, 0.25)
    assert [d.split(";")[0] for d in cfg.differs] == ["alpha 0.25 (AlphaPO's recommended shape)", "NLL weight 0.5"]
    assert "TRL 1.16 would train 0 (whatever is given for alphapo): prefopt keeps the weight given" in cfg.differs[1]
    written = build({"loss_type": "alphapo", "beta": 2.5, "simpo_gamma": 1.25, "alpha": 0.25}, tmp_path)
    assert written.differs == []  # no cpo_alpha: no NLL term either way


def test_prefopts_own_method_key_relies_on_no_other_tool(tmp_path):
    assert build({"method": "simpo"}, tmp_path).differs == []
    assert build({"beta": 2.0, "gamma_beta_ratio": 0.5, "loss_type": "sigmoid"}, tmp_path).differs == []  # SimPO repo


# LLaMA-Factory: pref_loss names the objective, pref_beta is β, simpo_gamma the absolute γ, pref_ftx
# the SFT term's weight (its ORPO keeps an SFT term at weight 1 besides)
@pytest.mark.parametrize("raw, method, beta, ratio, nll", [
    ({"pref_loss": "simpo", "pref_beta": 2.5, "simpo_gamma": 1.25}, "simpo", 2.5, 0.5, 0.0),
    ({"pref_loss": "simpo", "pref_beta": 10.0, "simpo_gamma": 5.4, "pref_ftx": 0.05}, "simpo", 10.0, 0.54, 0.05),
    ({"pref_loss": "orpo", "pref_beta": 0.1}, "orpo", 0.1, 0.0, 1.0),
    ({"pref_loss": "orpo", "pref_beta": 0.1, "pref_ftx": 0.5}, "orpo", 0.1, 0.0, 1.5),
])
def test_llama_factorys_objective_keys(raw, method, beta, ratio, nll, tmp_path):
    cfg = build(raw, tmp_path)
    o = cfg.objective
    assert (o.method, o.beta, o.nll_weight) == (method, beta, nll)
    assert o.gamma_beta_ratio == pytest.approx(ratio, rel=1e-15)
    assert f"pref_loss {raw['pref_loss']} (LLaMA-Factory) read as method {method}" in cfg.notes
    normalisation = [d for d in cfg.differs if d.startswith("the NLL term: LLaMA-Factory averages")]
    assert bool(normalisation) == (nll > 0)  # said wherever there is an NLL term
    resolved = resolved_dict(cfg)
    assert resolved_dict(build_config(resolved)) == resolved


def test_llama_factorys_defaults_are_said_and_its_dpo_losses_refused(tmp_path):
    cfg = build({"pref_loss": "simpo"}, tmp_path)
    assert any("LLaMA-Factory would train 0.1" in d for d in cfg.differs)
    for loss in ("sigmoid", "hinge", "ipo", "kto_pair"):
        message = refusal({"pref_loss": loss}, tmp_path)
        assert message.startswith(f"recipe.yaml: pref_loss: '{loss}' is one of LLaMA-Factory's DPO losses")
        assert "use pref_loss simpo or orpo" in message
    assert "say the same thing" in refusal({"pref_loss": "simpo", "method": "orpo"}, tmp_path)


# alignment-handbook
@pytest.mark.parametrize("steps, ratio, used", [(100, 0.1, 100), (0, 0.1, 0.1), (0.05, 0.1, 0.05)])
def test_warmup_steps_and_warmup_ratio_together_follow_transformers_rule(steps, ratio, used, tmp_path):
    cfg = build({"method": "orpo", "warmup_steps": steps, "warmup_ratio": ratio}, tmp_path)
    assert cfg.training.warmup_steps == used
    winner = "warmup_steps wins" if steps else "warmup_ratio is used"
    assert any(winner in n for n in cfg.notes), cfg.notes
    assert any(winner in line for line in explain(cfg).splitlines())


def test_hub_model_revision_is_the_push_revision(tmp_path):
    cfg = build({"method": "orpo", "hub_model_revision": "v2.0"}, tmp_path)
    assert cfg.training.hub_revision == "v2.0"
    assert "hub_model_revision" not in resolved_dict(cfg) and resolved_dict(cfg)["hub_revision"] == "v2.0"


# TRL fields that change nothing prefopt trains, and the one that would change everything
def test_trls_inert_fields_are_accepted_and_said(tmp_path):
    cfg = build({"method": "cpo", "padding_value": 0, "label_pad_token_id": -100, "is_encoder_decoder": False},
                tmp_path)
    assert any(n.startswith("padding_value 0 (TRL) has no effect") for n in cfg.notes)
    assert any(n.startswith("label_pad_token_id -100 (TRL) has no effect") for n in cfg.notes)
    assert not {"padding_value", "label_pad_token_id", "is_encoder_decoder"} & set(resolved_dict(cfg))
    message = refusal({"method": "cpo", "is_encoder_decoder": True}, tmp_path)
    assert message.startswith("recipe.yaml: is_encoder_decoder: prefopt trains decoder-only causal LMs")


def test_hfargumentparsers_no_flag_form(tmp_path):
    cfg = load_config(None, ["--method", "simpo", "--no_disable_dropout", "--output_dir", str(tmp_path / "o")])
    assert cfg.model.disable_dropout is False
    with pytest.raises(PrefoptError, match="--no_disable_dropout takes no value"):
        load_config(None, ["--method", "simpo", "--no_disable_dropout", "0.5"])
    with pytest.raises(PrefoptError, match="unknown option '--no_beta'"):  # not a true/false key
        load_config(None, ["--method", "simpo", "--no_beta"])


# A recipe prefopt cannot read as it stands: the refusal names what it most likely is, and the fix
HANDBOOK_ORPO = {"model_name_or_path": "mistral-community/Mixtral-8x22B-v0.1", "beta": 0.05,
                 "dataset_mixer": {"argilla/distilabel-capybara-dpo-7k-binarized": 1.0},
                 "dataset_splits": ["train"], "learning_rate": 5.0e-6, "lr_scheduler_type": "inverse_sqrt",
                 "hub_model_id": "zephyr-orpo-141b-A35b", "warmup_steps": 100, "max_length": 2048, "max_prompt_length": 1792}


def test_a_handbook_orpo_recipe_is_refused_naming_orpo_and_the_fix(tmp_path):
    message = refusal(HANDBOOK_ORPO, tmp_path)
    assert message.startswith("recipe.yaml: no objective given; the keys fit an alignment-handbook ORPO recipe")
    assert "add `method: orpo` (or `--method orpo` on the command line)" in message
    assert build({**HANDBOOK_ORPO, "method": "orpo"}, tmp_path).objective.beta == 0.05  # the fix works
    unnamed = {k: v for k, v in HANDBOOK_ORPO.items() if k != "hub_model_id"}
    assert "ORPO recipe" in refusal(unnamed, tmp_path)  # beta alone is enough
    named = {"learning_rate": 1e-6, "run_name": "llama3-8b-simpo"}  # nothing but its name
    assert "the keys fit a simpo recipe (its run_name llama3-8b-simpo): add `method: simpo`" in refusal(named, tmp_path)


def test_a_trl_cpo_config_without_loss_type_is_refused_naming_cpo(tmp_path):
    message = refusal({"cpo_alpha": 1.0, "learning_rate": 1e-6}, tmp_path)
    assert "the keys fit a TRL CPO config that relies on CPOConfig's default loss_type (sigmoid)" in message
    assert "add `method: cpo`" in message


def test_a_recipe_that_names_nothing_keeps_the_plain_refusal(tmp_path):
    assert refusal({"learning_rate": 1e-6}, tmp_path) == (
        "recipe.yaml: no objective given: set method to one of simpo, cpo_simpo, alphapo, cpo, orpo, simper, repo.")


@pytest.mark.parametrize("raw, what", [
    ({"max_seq_length": 2048, "dataset_text_field": "text", "packing": True}, "supervised fine-tuning (SFT)"),
    ({"beta": 0.1, "precompute_ref_log_probs": True}, "DPO recipe (precompute_ref_log_probs)"),
    ({"beta": 0.01, "ref_model_init_kwargs": {}, "rpo_alpha": 1.0}, "DPO recipe (ref_model_init_kwargs, rpo_alpha)"),
    ({"beta": 0.01, "hub_model_id": "zephyr-7b-dpo-full"}, "DPO recipe (its hub_model_id zephyr-7b-dpo-full)"),
    ({"loss_type": "apo_zero"}, "DPO recipe (loss_type apo_zero)"),
])
def test_sft_and_dpo_recipes_are_named_as_such(raw, what, tmp_path):
    message = refusal(raw, tmp_path)
    assert what in message and "reference-free" in message
    assert "unknown key" not in message


def test_an_sft_key_in_a_preference_config_is_an_unknown_key_with_a_suggestion(tmp_path):
    assert "unknown key 'max_seq_length'. Did you mean 'max_length'?" in refusal(
        {"method": "simpo", "max_seq_length": 2048}, tmp_path)


def test_sft_weight_marks_a_simpo_repository_config_and_its_defaults_are_said(tmp_path):
    """The SimPO repository's SimPOConfig defaults gamma_beta_ratio to 0.25 and loss_type to sigmoid:
    its configs may give only sft_weight, a name no other tool has. That is SimPO, not CPO."""
    cfg = build({"loss_type": "sigmoid", "beta": 2.5, "sft_weight": 0.1}, tmp_path)
    o = cfg.objective
    assert (o.method, o.loss_type, o.nll_weight, o.gamma_beta_ratio) == ("simpo", "sigmoid", 0.1, 0.5)
    assert cfg.differs == ["gamma_beta_ratio 0.5 (γ 1.25, simpo's published default); the SimPO repository would "
                           "train gamma_beta_ratio 0.25: set gamma_beta_ratio: 0.25 for its numbers"]
    assert build({"sft_weight": 0.0}, tmp_path).objective.method == "simpo"  # no loss_type: its default, sigmoid
    assert build({"loss_type": "sigmoid", "cpo_alpha": 0.1}, tmp_path).objective.method == "cpo"  # TRL's name


# A LLaMA-Factory recipe with its own training keys, as its examples write them
LLAMA_FACTORY_RECIPE = {
    "model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "stage": "dpo", "do_train": True,
    "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "pref_beta": 2.5, "pref_loss": "simpo",
    "simpo_gamma": 1.25, "template": "llama3", "overwrite_cache": True, "plot_loss": True, "val_size": 0.1,
    "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "learning_rate": 5.0e-6,
    "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "datasets": [{"path": "pairs.jsonl"}]}


def test_a_llama_factory_recipe_loads_with_its_training_keys(tmp_path):
    cfg = build(LLAMA_FACTORY_RECIPE, tmp_path)
    m, d, o = cfg.model, cfg.data, cfg.objective
    assert (m.use_peft, m.lora_r, m.lora_target_modules) == (True, 8, "all-linear")
    assert (d.test_split_size, o.method, o.beta) == (0.1, "simpo", 2.5)
    assert any(n.startswith("template llama3 (LLaMA-Factory) is not read") for n in cfg.notes)
    assert any(n.startswith("stage dpo (LLaMA-Factory)") for n in cfg.notes)
    # its defaults where the recipe leaves them: cutoff_len 2048 and lora_alpha = 2 × rank
    assert any(d.startswith("max_length 1024 (prefopt's default); LLaMA-Factory would cut at cutoff_len 2048")
               for d in cfg.differs)
    assert any("LLaMA-Factory would train lora_rank × 2 = 16" in d for d in cfg.differs)
    written = build({**LLAMA_FACTORY_RECIPE, "cutoff_len": 2048, "lora_alpha": 16}, tmp_path)
    assert written.data.max_length == 2048 and not [d for d in written.differs if "cutoff_len" in d or "lora" in d]
    assert build({**LLAMA_FACTORY_RECIPE, "lora_target": "q_proj, v_proj"}, tmp_path).model.lora_target_modules == [
        "q_proj", "v_proj"]


@pytest.mark.parametrize("raw, message", [
    ({"stage": "sft"}, "stage: LLaMA-Factory's stage sft is not preference training"),
    ({"finetuning_type": "freeze"}, "finetuning_type: 'freeze': prefopt trains every weight (full) or LoRA adapters"),
    ({"max_samples": 1000}, "max_samples: prefopt reads every row"),
    ({"pref_loss": "simop"}, "pref_loss: 'simop' is not a LLaMA-Factory pref_loss; prefopt reads simpo and orpo "
                             "(did you mean 'simpo'?)"),
    ({"pref_loss": ["simpo", "orpo"]}, "is not a LLaMA-Factory pref_loss"),  # a list: refused, not a traceback
])
def test_llama_factory_keys_prefopt_cannot_honour_are_refused_by_name(raw, message, tmp_path):
    assert message in refusal({"method": "simpo", **raw} if "pref_loss" not in raw else raw, tmp_path)


def test_a_handbook_data_config_is_told_about_the_empty_system_turn(tmp_path):
    handbook = {"method": "simpo", "dataset_mixer": {"my/pairs": 1.0}, "dataset_splits": ["train"]}
    (line,) = [d for d in build(handbook, tmp_path).differs if "empty system turn" in d]
    assert line.endswith("set auto_insert_empty_system_msg: true for its data")
    assert not build({**handbook, "auto_insert_empty_system_msg": False}, tmp_path).differs
    assert not build({"method": "simpo", "datasets": [{"path": "p.jsonl"}]}, tmp_path).differs


def test_a_trl_recipe_with_beta_and_cpo_alpha_or_simpo_gamma_is_not_told_to_train_orpo(tmp_path):
    assert "add `method: cpo`" in refusal({"beta": 0.1, "cpo_alpha": 1.0}, tmp_path)
    assert "add `method: simpo`" in refusal({"beta": 2.5, "simpo_gamma": 1.4}, tmp_path)
    assert "add `method: cpo_simpo`" in refusal({"beta": 10, "simpo_gamma": 5.4, "cpo_alpha": 0.05}, tmp_path)
    assert "add `method: orpo`" in refusal({"beta": 0.1, "learning_rate": 5e-6}, tmp_path)


@pytest.mark.parametrize("raw", [
    {"dataset_name": "my/pairs", "dataset_train_split": "train_prefs", "dataset_test_split": "holdout"},
    {"dataset_name": "my/pairs", "dataset_train_split": "test_prefs_v2"},  # a training split named like a test one
    {"datasets": [{"path": "a.jsonl"}, {"path": "b.jsonl", "eval": True}]},
])
def test_the_resolved_config_keeps_which_data_is_held_out(raw, tmp_path):
    cfg = build({"method": "simpo", **raw}, tmp_path)
    again = build_config(resolved_dict(cfg))
    assert [(s.path, s.split) for s in again.data.train_datasets] == [(s.path, s.split) for s in cfg.data.train_datasets]
    assert [(s.path, s.split) for s in again.data.eval_datasets] == [(s.path, s.split) for s in cfg.data.eval_datasets]
    assert resolved_dict(again) == resolved_dict(cfg)
    with pytest.raises(PrefoptError, match=r"datasets\[0\].eval: true \(held out for evaluation\) or false"):
        build({"method": "simpo", "datasets": [{"path": "a.jsonl", "eval": "yes please"}]}, tmp_path)
