"""Where another tool would have trained other values: its defaults, for a config in its dialect.

    differs = tool_differences(dialect_of(written, tool), given, resolved)   # the objective's
    differs += setting_differences(written, model, data)                     # lengths, LoRA, data

prefopt keeps its own defaults (the papers' for the objective). Where a config relies on another
tool's — its method came from TRL's `loss_type`, LLaMA-Factory's `pref_loss` or the SimPO
repository's keys (`dialects.read_objective` says which), or its data is named the
alignment-handbook way — each value that tool would have trained otherwise is listed, with the
key to set for its numbers; `config explain` and the start of `train` print them. No
transformers import.
"""

from dataclasses import dataclass

from .losses import METHODS


@dataclass(frozen=True)
class ToolDefaults:
    """What `tool` trains where its config leaves a hyperparameter unset, in prefopt's terms."""

    tool: str
    beta: float
    gamma: float | None  # the absolute target margin (simpo_gamma), where the tool's default is one
    gamma_beta_ratio: float | None  # the margin over β, where the tool's default is that
    alpha: float  # AlphaPO's reward shape
    nll_weight: dict[str, float]  # by method: the NLL weight it trains when none is given
    forced_nll: dict[str, float]  # by method: the NLL weight it trains whatever is given


TOOL_DEFAULTS = {
    # CPOConfig: beta 0.1, simpo_gamma 0.5, cpo_alpha 1.0 (loss_type simpo is CPO-SimPO by default),
    # alpha 0; loss_type alphapo sets cpo_alpha to 0
    "TRL": ToolDefaults("TRL 1.16", beta=0.1, gamma=0.5, gamma_beta_ratio=None, alpha=0.0,
                        nll_weight={"simpo": 1.0, "cpo": 1.0}, forced_nll={"alphapo": 0.0}),
    # SimPOConfig (scripts/simpo_config.py): beta 2.0, gamma_beta_ratio 0.25, sft_weight 0
    "SimPO repository": ToolDefaults("the SimPO repository", beta=2.0, gamma=None, gamma_beta_ratio=0.25, alpha=0.0,
                                     nll_weight={"simpo": 0.0}, forced_nll={}),
    # FinetuningArguments: pref_beta 0.1, simpo_gamma 0.5, pref_ftx 0 (its ORPO keeps its SFT term)
    "LLaMA-Factory": ToolDefaults("LLaMA-Factory", beta=0.1, gamma=0.5, gamma_beta_ratio=None, alpha=0.0,
                                  nll_weight={"simpo": 0.0, "orpo": 1.0}, forced_nll={}),
}


# Keys only LLaMA-Factory's configs have, and the data forms of alignment-handbook's (and the SimPO
# repository's, which runs on it) pipeline
LLAMA_FACTORY_KEYS = ("pref_loss", "pref_beta", "pref_ftx", "stage", "finetuning_type", "cutoff_len", "lora_rank",
                      "lora_target", "dataset")
HANDBOOK_DATA = ("dataset_mixer", "dataset_mixture")


def setting_differences(written: set[str], model, data) -> list[str]:
    """Settings outside the objective that the config's own tool would have trained otherwise, where
    the config leaves them to the defaults: LLaMA-Factory's cutoff_len (2048) and lora_alpha (twice
    the rank); alignment-handbook's empty system turn (its auto_insert_empty_system_msg is true)."""
    out = []
    if any(k in written for k in LLAMA_FACTORY_KEYS):
        if not {"max_length", "cutoff_len"} & written and data.max_length != 2048:
            out.append(f"max_length {data.max_length} (prefopt's default); LLaMA-Factory would cut at cutoff_len 2048: "
                       "set cutoff_len: 2048 for its lengths")
        if model.use_peft and "lora_alpha" not in written and model.lora_alpha != 2 * model.lora_r:
            out.append(f"lora_alpha {model.lora_alpha} (prefopt's default); LLaMA-Factory would train lora_rank × 2 = "
                       f"{2 * model.lora_r}: set lora_alpha: {2 * model.lora_r} for its numbers")
    if any(k in written for k in HANDBOOK_DATA) and data.auto_insert_empty_system_msg is None \
            and data.completion_layout == "trl":
        out.append("no empty system turn (prefopt's TRL layout); alignment-handbook's pipeline (and the SimPO "
                   "repository's) inserts one where the template takes a system role: set "
                   "auto_insert_empty_system_msg: true for its data")
    return out


def dialect_of(written: set[str], tool: str | None) -> str | None:
    """The tool whose defaults a config relies on: LLaMA-Factory when it names its objective with
    pref_loss, else the one `read_objective` found (None: prefopt's own `method`)."""
    return "LLaMA-Factory" if "pref_loss" in written else tool


def tool_differences(tool: str | None, given, resolved) -> list[str]:
    """Each value `resolved` trains that `tool` would not have, where the config left it to the
    defaults (`given`: the objective before its defaults were filled in) — printed by `config
    explain` and at the start of train. prefopt keeps the papers' defaults; this says where that
    changes the numbers, and how to get the tool's."""
    if tool is None:
        return []
    d, r, method = TOOL_DEFAULTS[tool], resolved, resolved.method
    name, takes, out = d.tool, METHODS[method].takes, []
    if "beta" in takes and given.beta is None and r.beta != d.beta:
        out.append(f"beta {r.beta:g} ({method}'s published default); {name} would train {d.beta:g}: "
                   f"set beta: {d.beta:g} for its numbers")
    beta = d.beta if given.beta is None else r.beta  # the β that tool trains
    ratio = d.gamma_beta_ratio if d.gamma is None else d.gamma / beta
    if "gamma_beta_ratio" in takes and given.gamma_beta_ratio is None and r.gamma_beta_ratio != ratio:
        theirs = (f"gamma_beta_ratio {ratio:g}" if d.gamma is None else f"simpo_gamma {d.gamma:g} (γ/β {ratio:g})")
        key = f"gamma_beta_ratio: {ratio:g}" if d.gamma is None else f"simpo_gamma: {d.gamma:g}"
        out.append(f"gamma_beta_ratio {r.gamma_beta_ratio:g} (γ {r.gamma_beta_ratio * r.beta:g}, {method}'s "
                   f"published default); {name} would train {theirs}: set {key} for its numbers")
    if "alpha" in takes and METHODS[method].reward_shape and given.alpha is None and r.alpha != d.alpha:
        out.append(f"alpha {r.alpha:g} (AlphaPO's recommended shape); {name} would train alpha {d.alpha:g}"
                   f"{' (SimPO)' if d.alpha == 0 else ''}: set alpha: {d.alpha:g} for its numbers")
    tool_nll = d.forced_nll.get(method, d.nll_weight.get(method) if given.nll_weight is None else None)
    if tool_nll is not None and tool_nll != r.nll_weight:
        why = "whatever is given" if method in d.forced_nll else "its default"
        out.append(f"NLL weight {r.nll_weight:g}; {name} would train {tool_nll:g} ({why} for {method}): "
                   f"{'prefopt keeps the weight given' if method in d.forced_nll else f'set the NLL weight to {tool_nll:g} for its numbers'}")
    if tool == "LLaMA-Factory" and r.nll_weight:
        out.append(f"the NLL term: {name} averages each chosen answer's NLL over its own tokens (the answer only), "
                   f"then over pairs; prefopt averages over every chosen token of the step, as TRL does"
                   f"{', prompt included for ORPO' if method == 'orpo' else ''}: longer answers weigh more here")
    return out
