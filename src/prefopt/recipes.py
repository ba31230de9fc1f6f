"""What a config that prefopt cannot read as it stands most likely is, for the refusal to say.

    likely_method(raw)            a recipe with no objective: the method its keys fit, and the fix
    not_preference_recipe(raw)    an SFT or DPO recipe: what it is and what prefopt trains instead

Both take the config as written (other tools' spellings, before `dialects` reads them) and return
the whole message, or None when the keys fit nothing in particular (the plain refusal stands).
Nothing here changes what a config means: a guess is only ever offered in a refusal.
"""

from .losses import METHODS

# TRL SFTConfig's keys (and the older max_seq_length) that no preference trainer has
SFT_KEYS = ("max_seq_length", "dataset_text_field", "packing", "packing_strategy", "padding_free",
            "completion_only_loss", "assistant_only_loss", "dataset_kwargs", "eval_packing")
# TRL DPOConfig's keys about the reference model, and its losses that no reference-free method has
DPO_KEYS = ("ref_model_init_kwargs", "model_adapter_name", "ref_adapter_name", "force_use_ref_model",
            "reference_free", "precompute_ref_log_probs", "precompute_ref_batch_size", "sync_ref_model",
            "ref_model_mixup_alpha", "ref_model_sync_steps", "rpo_alpha", "ld_alpha", "use_weighting",
            "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau", "loss_weights", "use_ref_model")
DPO_LOSSES = ("exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_pair", "aot_unpaired",
              "apo_zero", "apo_down", "discopop", "kto_pair")
# Present, the config names its objective (so a missing method is not the recipe's whole story)
OBJECTIVE_KEYS = ("method", "loss_type", "beta", "cpo_alpha", "simpo_gamma", "gamma_beta_ratio", "gamma",
                  "sft_weight", "pref_loss", "pref_beta", "alpha", "label_smoothing")
# Where a recipe's name is written; alignment-handbook names runs after their method
NAME_KEYS = ("output_dir", "hub_model_id", "run_name")

FIT = {
    "orpo": "an alignment-handbook ORPO recipe (beta without loss_type, run by its run_orpo.py, where beta is "
            "ORPO's λ)",
    "cpo": "a TRL CPO config that relies on CPOConfig's default loss_type (sigmoid)",
}


def _method_in_name(raw: dict) -> tuple[str | None, str]:
    """The method a recipe's output_dir / hub_model_id / run_name names (the last part of the path),
    and where: ("orpo", "hub_model_id zephyr-orpo-141b"); (None, "") when none does."""
    for key in NAME_KEYS:
        if not isinstance(raw.get(key), str):
            continue
        name = raw[key].rstrip("/").rsplit("/", 1)[-1]
        for word in ("cpo-simpo", "simpo", "orpo", "alphapo", "simper", "dpo", "cpo"):
            if word in name.lower().replace("_", "-"):
                return word.replace("-", "_"), f"{key} {name}"
    return None, ""


def likely_method(raw: dict) -> str | None:
    """The refusal for a config with no method and no loss_type, naming the method its keys fit."""
    named, where = _method_in_name(raw)
    if named == "dpo":
        return _dpo(raw, [f"its {where}"])
    given = {k for k in OBJECTIVE_KEYS if k in raw}
    if "simpo_gamma" in raw and named in (None, "simpo", "cpo_simpo"):  # TRL's SimPO margin
        method = "cpo_simpo" if "cpo_alpha" in raw else "simpo"
        fit = f"a TRL SimPO config (simpo_gamma{', cpo_alpha' if 'cpo_alpha' in raw else ''}) without loss_type: simpo"
    elif "cpo_alpha" in raw and named in (None, "cpo"):
        method, fit = "cpo", FIT["cpo"]
    elif given == {"beta"} and named in (None, "orpo"):
        method, fit = "orpo", FIT["orpo"]
    elif named in METHODS:
        method, fit = named, f"a {named} recipe (its {where})"
    else:
        return None
    return (f"no objective given; the keys fit {fit}: add `method: {method}` (or `--method {method}` on the "
            f"command line). The methods: {', '.join(METHODS)}.")


def dpo_loss(loss_type) -> str | None:
    """The refusal for one of DPO's loss types (no reference-free method has it)."""
    if loss_type not in DPO_LOSSES:
        return None
    return _dpo({}, [f"loss_type {loss_type}"])


def not_preference_recipe(raw: dict) -> str | None:
    """The refusal for an SFT or a DPO recipe, named by the keys it has that prefopt does not."""
    dpo = [k for k in DPO_KEYS if k in raw]
    if dpo:
        return _dpo(raw, dpo)
    sft = [k for k in SFT_KEYS if k in raw]
    if sft and not any(k in raw for k in OBJECTIVE_KEYS):
        return (f"this is a supervised fine-tuning (SFT) recipe ({', '.join(sft)}), not a preference one: prefopt "
                "trains reference-free preference objectives on prompt/chosen/rejected pairs. Fine-tune with an SFT "
                "trainer first, then give prefopt a preference dataset and a method "
                f"({', '.join(METHODS)}).")
    return None


def _dpo(raw: dict, marks: list[str]) -> str:
    return (f"this is a DPO recipe ({', '.join(marks)}): DPO trains against a reference model, and prefopt trains "
            "reference-free objectives. The closest is SimPO (`method: simpo`: β 2–2.5, γ/β 0.5, learning rate "
            "3e-7 to 1e-6, without the reference-model keys); CPO (`method: cpo`) keeps DPO's sigmoid loss on "
            "summed log-probs, with an NLL term.")
