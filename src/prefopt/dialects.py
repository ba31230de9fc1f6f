"""Other tools' spellings of prefopt's keys, read into the canonical ones.

    raw, later, notes = canonical("c.yaml", raw)          # each spelling under its canonical key
    objective = read_objective(objective, raw, later, notes)  # keys that change another's meaning

`SPELLINGS` is the one table of other tools' names (TRL, the SimPO repository, alignment-handbook,
older transformers): each entry says the spelling, the canonical key it is read as and how its
value converts. Everything else about spellings is derived from it: `ALIASES` (two names of one
key in one place are refused), `RENAMES`, `DIALECT_KEYS` (accepted besides the canonical keys),
`NON_CANONICAL` (never written to a resolved `prefopt_config.yaml`), and each spelling's type and
range check in `values`. Another tool's name for a key is one line in the table.

Where a key changes what another one means (TRL's `loss_type: simpo`, the SimPO repository's
`gamma_beta_ratio`, the absolute `simpo_gamma`), the rule is applied in `read_objective` and
nowhere else; its docstring lists them. The ways of naming the data (`DATASET_FORMS`) are read by
`dataforms`.

No transformers import: the table can be read (by a test, a doc, another tool) without loading it.
"""

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Callable

from .errors import PrefoptError
from .losses import METHODS
from .schema import _coerce, _fail


@dataclass(frozen=True)
class Spelling:
    """`spelling`, another tool's name, is read as prefopt's `canonical` key."""

    spelling: str
    canonical: str
    tool: str
    convert: Callable[..., Any] | None = None  # written value → the canonical key's value (None: as written)
    type: Any = None  # what the written value is read as, where its type is not the canonical key's
    needs: str | None = None  # a hyperparameter whose resolved value `convert` takes too (read_objective's)
    note: str | None = "{spelling} read as {canonical}"  # listed under "read as" by `config explain`

    def noted(self, value, converted) -> str | None:
        if self.note is None:
            return None
        return self.note.format(spelling=self.spelling, canonical=self.canonical, tool=self.tool, value=value,
                                converted=converted)


# In the order they are read (and noted). A spelling is checked under its own name, with its
# canonical key's range unless `values.VALUE_RULES` gives it one of its own.
SPELLINGS: tuple[Spelling, ...] = (
    Spelling("evaluation_strategy", "eval_strategy", tool="transformers"),
    Spelling("torch_dtype", "dtype", tool="transformers, TRL, alignment-handbook"),
    Spelling("dataset_num_proc", "preprocessing_num_workers", tool="TRL"),
    Spelling("max_target_length", "max_completion_length", tool="TRL"),
    Spelling("use_bnb_nested_quant", "bnb_4bit_use_double_quant", tool="TRL"),
    Spelling("cpo_alpha", "nll_weight", tool="TRL"),
    Spelling("sft_weight", "nll_weight", tool="SimPO repository"),
    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio) ...
    Spelling("warmup_ratio", "warmup_steps", tool="transformers"),
    # ... and renamed gradient checkpointing (the old names still work there, with a warning)
    Spelling("gradient_checkpointing", "activation_checkpointing", tool="transformers"),
    Spelling("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs", tool="transformers"),
    Spelling("use_flash_attention_2", "attn_implementation", tool="transformers, alignment-handbook", type=bool,
             convert=lambda on: "flash_attention_2" if on else None, note=None),
    Spelling("hub_model_revision", "hub_revision", tool="alignment-handbook"),
    # TRL's margin is the absolute γ; the canonical key is γ/β, so it waits for the resolved β
    # (LLaMA-Factory's simpo_gamma is the same absolute margin)
    Spelling("simpo_gamma", "gamma_beta_ratio", tool="TRL", type=float, needs="beta",
             convert=lambda gamma, beta: gamma / beta,
             note="{spelling} {value} (absolute, {tool}) read as {canonical} {converted:g}"),
    # LLaMA-Factory's training keys
    Spelling("cutoff_len", "max_length", tool="LLaMA-Factory"),
    Spelling("lora_rank", "lora_r", tool="LLaMA-Factory"),
    Spelling("val_size", "test_split_size", tool="LLaMA-Factory"),
    Spelling("finetuning_type", "use_peft", tool="LLaMA-Factory", type=str, convert=lambda kind: _finetuning(kind),
             note="{spelling} {value} ({tool}) read as {canonical} {converted}"),
    Spelling("lora_target", "lora_target_modules", tool="LLaMA-Factory", type=str,
             convert=lambda names: "all-linear" if names == "all" else [n.strip() for n in names.split(",")],
             note="{spelling} {value} ({tool}) read as {canonical} {converted}"),
    # LLaMA-Factory's reference-free losses (its others are DPO's, which need a reference model)
    Spelling("pref_loss", "method", tool="LLaMA-Factory", type=str, convert=lambda loss: _pref_loss(loss),
             note="{spelling} {value} ({tool}) read as {canonical} {converted}"),
    Spelling("pref_beta", "beta", tool="LLaMA-Factory"),
    # its ORPO loss holds the SFT term at weight 1, and pref_ftx adds to it: it waits for the method
    Spelling("pref_ftx", "nll_weight", tool="LLaMA-Factory", type=float, needs="method",
             convert=lambda ftx, method: ftx + 1.0 if method == "orpo" else ftx,
             note="{spelling} {value} ({tool}) read as {canonical} {converted:g}"),
)

# LLaMA-Factory's pref_loss values: its reference-free ones are prefopt methods; the rest are DPO's
LLAMA_FACTORY_LOSSES = {"simpo": "simpo", "orpo": "orpo"}
LLAMA_FACTORY_DPO_LOSSES = ("sigmoid", "hinge", "ipo", "kto_pair")


def _finetuning(kind) -> bool:
    if kind in ("lora", "full"):
        return kind == "lora"
    raise PrefoptError(f"{kind!r}: prefopt trains every weight (full) or LoRA adapters (lora); LLaMA-Factory's "
                       "freeze has no counterpart here.")


def _pref_loss(loss) -> str:
    if isinstance(loss, str) and loss in LLAMA_FACTORY_LOSSES:
        return LLAMA_FACTORY_LOSSES[loss]
    if loss in LLAMA_FACTORY_DPO_LOSSES:
        raise PrefoptError(
            f"{loss!r} is one of LLaMA-Factory's DPO losses, which need a reference model; prefopt trains "
            f"reference-free objectives: use pref_loss simpo or orpo, or set method to one of {', '.join(METHODS)}.")
    close = difflib.get_close_matches(str(loss), list(LLAMA_FACTORY_LOSSES), n=1)
    raise PrefoptError(f"{loss!r} is not a LLaMA-Factory pref_loss; prefopt reads simpo and orpo"
                       f"{f' (did you mean {close[0]!r}?)' if close else ''}.")


@dataclass(frozen=True)
class Inert:
    """Another tool's key that changes nothing prefopt trains: accepted, said under "read as", and
    dropped — or refused, where its value asks for something prefopt does not do."""

    key: str
    tool: str
    note: str  # formatted with {key}, {value}
    refuse: Callable[[Any], str | None] = lambda value: None  # the reason a value is refused


INERT: tuple[Inert, ...] = (
    Inert("padding_value", "TRL", "{key} {value} ({tool}) has no effect: masks come from sequence lengths, never "
                                  "from pad ids"),
    Inert("label_pad_token_id", "TRL", "{key} {value} ({tool}) has no effect: scored positions come from sequence "
                                       "lengths, not from a label id"),
    Inert("stage", "LLaMA-Factory", "{key} {value} ({tool}): its preference stage; pref_loss names the objective",
          refuse=lambda v: None if v == "dpo" else (
              f"LLaMA-Factory's stage {v} is not preference training; prefopt trains reference-free preference "
              "objectives, which LLaMA-Factory runs as stage: dpo with pref_loss simpo or orpo.")),
    Inert("template", "LLaMA-Factory", "{key} {value} ({tool}) is not read: prefopt renders rows with the tokenizer's "
                                       "own chat template (chat_template sets another: chatml or a .jinja file)"),
    Inert("overwrite_cache", "LLaMA-Factory", "{key} {value} ({tool}) has no effect: the tokenized data is cached "
                                              "under its content, the tokenizer and the options"),
    Inert("plot_loss", "LLaMA-Factory", "{key} {value} ({tool}): every run draws its plots (output_dir/plots)"),
    Inert("max_samples", "LLaMA-Factory", "",
          refuse=lambda v: ("prefopt reads every row; to use a share of a dataset give it in dataset_mixer "
                            "({path: 0.1}) or as keep_fraction in datasets:.")),
    Inert("is_encoder_decoder", "TRL", "{key} {value} ({tool}): prefopt trains decoder-only causal LMs",
          refuse=lambda v: ("prefopt trains decoder-only causal LMs (AutoModelForCausalLM); an encoder-decoder model "
                            "needs another trainer. Remove is_encoder_decoder or set it to false.")
          if v not in (None, False, "false", "False") else None),
)
BY_INERT = {i.key: i for i in INERT}
BY_SPELLING = {s.spelling: s for s in SPELLINGS}
RENAMES = {s.spelling: s.canonical for s in SPELLINGS}
NON_CANONICAL = frozenset(BY_SPELLING)


def _groups() -> dict[str, tuple[str, ...]]:
    groups: dict[str, tuple[str, ...]] = {}
    for s in SPELLINGS:
        groups[s.canonical] = groups.get(s.canonical, (s.canonical,)) + (s.spelling,)
    return groups


# Every name of each canonical key that has others, the canonical first: two names of one group in
# the same place (file or command line) are refused.
ALIASES: dict[str, tuple[str, ...]] = _groups()

# The ways of naming the data (read by `dataforms`): only one may be used.
DATASET_FORMS = ("dataset_mixer", "dataset_mixture", "datasets", "dataset_name", "dataset")
DATASET_COMPANIONS = (
    "dataset_splits",
    "dataset_configs",
    "dataset_config",
    "dataset_train_split",
    "dataset_test_split",
    "streaming",
    "dataset_dir",  # LLaMA-Factory: the folder of dataset_info.json (with `dataset`, `eval_dataset`)
    "eval_dataset",
)
DIALECT_KEYS = set(NON_CANONICAL) | set(DATASET_FORMS) | set(DATASET_COMPANIONS) | set(BY_INERT)


# Two names of one key that transformers lets stand together, with a rule for which one counts:
# warmup_steps above 0 wins over warmup_ratio (transformers 4's get_warmup_steps; version 5 folded
# the ratio into warmup_steps). Recipes written for it carry both, warmup_steps often 0.
PRECEDENCE = {"warmup_steps": "warmup_ratio"}


def check_spellings(where: str, raw: dict):
    """Refuse two names of one key, or two forms of the data, in one place."""
    for canonical_key, spellings in ALIASES.items():
        present = [k for k in spellings if k in raw]
        if PRECEDENCE.get(canonical_key) and present == [canonical_key, PRECEDENCE[canonical_key]]:
            continue
        if len(present) > 1:
            _fail(where, f"{' and '.join(repr(k) for k in present)} say the same thing; keep one of them.")
    forms = [k for k in DATASET_FORMS if k in raw]
    if len(forms) > 1:
        _fail(where, f"the data is named twice ({', '.join(forms)}); keep one of them.")


def merge_overrides(raw: dict, overrides: dict) -> dict:
    """Command-line values win over the file's, including over another spelling of the same key."""
    merged = dict(raw)
    for key in overrides:
        for spellings in ALIASES.values():
            if key in spellings:
                for other in spellings:
                    merged.pop(other, None)
        if key in DATASET_FORMS:
            for other in DATASET_FORMS:
                merged.pop(other, None)
    merged.update(overrides)
    return merged


def canonical(where: str, raw: dict) -> tuple[dict, dict, list[str]]:
    """`raw` with every spelling under its canonical key, its value converted; the spellings whose
    conversion needs another key's resolved value (simpo_gamma), set apart for `read_objective`;
    and the notes of what was read as what. Values are already checked (`values.check_values`)."""
    out, later, notes = dict(raw), {}, []
    _warmup_precedence(out, notes)
    for key in [k for k in out if k in BY_INERT]:
        inert, value = BY_INERT[key], out.pop(key)
        if reason := inert.refuse(value):
            _fail(where, f"{key}: {reason}")
        notes.append(inert.note.format(key=key, value=value, tool=inert.tool))
    for s in SPELLINGS:
        if s.spelling not in out:
            continue
        value = out.pop(s.spelling)
        if s.needs:
            later[s.spelling] = value
            continue
        if s.type is not None:
            value = _coerce(where, s.spelling, value, s.type)
        try:
            converted = s.convert(value) if s.convert else value
        except PrefoptError as e:
            _fail(where, f"{s.spelling}: {e}")
        out[s.canonical] = converted
        if note := s.noted(value, converted):
            notes.append(note)
    return out, later, notes


def _warmup_precedence(out: dict, notes: list[str]):
    """warmup_steps and warmup_ratio together: the one transformers would use stays, and it is said."""
    if "warmup_steps" not in out or "warmup_ratio" not in out:
        return
    steps, ratio = out["warmup_steps"], out["warmup_ratio"]
    if steps:
        del out["warmup_ratio"]
        notes.append(f"warmup_steps {steps:g} and warmup_ratio {ratio:g} both given: warmup_steps wins "
                     "(transformers' rule), warmup_ratio is not used")
    else:
        del out["warmup_steps"]
        notes.append(f"warmup_steps 0 and warmup_ratio {ratio:g} both given: warmup_ratio is used (transformers' "
                     "rule: warmup_steps counts only above 0)")


# TRL CPOConfig's loss_type values that name a SimPO-family method, and those methods
TRL_METHOD_LOSSES = ("simpo", "alphapo")
SIMPO_FAMILY = ("simpo", "cpo_simpo", "alphapo")
# Present (as written: sft_weight is read as nll_weight before the rules run), the config is the
# SimPO repository's: no other tool has these names.
SIMPO_REPO_MARKERS = ("gamma_beta_ratio", "sft_weight")


def read_objective(obj, raw: dict, later: dict, notes: list[str], where: str = "config",
                   written: frozenset[str] = frozenset()):
    """The objective in canonical terms where another key changes what method, loss_type or a
    hyperparameter means. `obj`: the ObjectiveArgs built from `raw` (canonical keys, from
    `canonical`); `later`: the spellings it set apart; `written`: the keys as the config spelled
    them. The rules, applied here and nowhere else:

    1. TRL's `loss_type: simpo|alphapo` without a method names the method: alphapo for alphapo;
       for simpo, cpo_simpo when an NLL weight above 0 is given, else simpo (TRL's cpo_alpha
       defaults to 1.0, which quietly turns "SimPO" into CPO-SimPO; here SimPO means SimPO);
       the loss shape is sigmoid. With a SimPO-family method, `loss_type: simpo|alphapo` is its
       sigmoid loss.
    2. With the SimPO repository's `gamma_beta_ratio` or `sft_weight` present, `loss_type:
       sigmoid|hinge` (or no loss_type) without a method is SimPO's loss, not CPO's.
    3. Otherwise `loss_type: sigmoid|hinge|ipo` without a method is TRL CPOConfig's: cpo.
    4. TRL's `simpo_gamma` is the absolute margin γ: gamma_beta_ratio = simpo_gamma / β, with β
       as resolved (given, else the method's default).
    5. `gamma` is RePO's absolute margin, and also the absolute γ of the SimPO repository's early
       recipes (kept by the CPO_SIMPO repository: `beta` + `gamma`, no method): without a method
       it marks a SimPO-repository config as `gamma_beta_ratio` does (rule 2), and with a
       SimPO-family method it is read as gamma_beta_ratio = gamma / β, like rule 4. Given with
       `gamma_beta_ratio` or `simpo_gamma` it is a second margin, refused.

    (use_flash_attention_2 needs no other key: its conversion is the table's.) What stays unknown
    here (no method, an unknown one) is for `config` to refuse. Returns the objective and the tool
    whose defaults the config relies on, where its method came from that tool's keys: "TRL"
    (rules 1 and 3), "SimPO repository" (rule 2's markers), else None — for `peers.dialect_of`.
    """
    method, loss_type, tool = _method(obj, set(raw) | set(written), notes)
    if loss_type in TRL_METHOD_LOSSES and method in SIMPO_FAMILY:
        loss_type = "sigmoid"
    obj = dataclasses.replace(obj, method=method, loss_type=loss_type)
    if method not in METHODS:
        return obj, tool
    if method in SIMPO_FAMILY and obj.gamma not in (None, 0.0):  # (0: a resolved config's neutral value)
        obj = _absolute_gamma(obj, raw, later, notes, where)
    for spelling, value in later.items():
        s = BY_SPELLING[spelling]
        converted = s.convert(value, _resolved(obj, s.needs))
        obj = dataclasses.replace(obj, **{s.canonical: converted})
        if note := s.noted(value, converted):
            notes.append(note)
    return obj, tool


def _method(obj, keys: set[str], notes: list[str]) -> tuple[str | None, str | None, str | None]:
    """Rules 1-3: the method a loss_type (and the SimPO repository's keys) imply, when none is given;
    and the tool whose defaults the config then relies on."""
    method, loss_type = obj.method, obj.loss_type
    if method is not None:
        return method, loss_type, None
    marked = any(k in keys for k in SIMPO_REPO_MARKERS)
    simpo_repo = marked or obj.gamma not in (None, 0.0)  # rules 2 and 5
    repo_tool = "SimPO repository" if marked else None
    if loss_type in TRL_METHOD_LOSSES:
        method = loss_type
        if loss_type == "simpo" and obj.nll_weight is not None and obj.nll_weight > 0:
            method = "cpo_simpo"
        notes.append(f"loss_type: {loss_type} (TRL) read as method {method}")
        return method, "sigmoid", "TRL"
    if loss_type in ("sigmoid", "hinge") and simpo_repo:
        notes.append(f"loss_type: {loss_type} with SimPO-repository keys read as SimPO-{loss_type}")
        return "simpo", loss_type, repo_tool
    if loss_type in ("sigmoid", "hinge", "ipo"):
        notes.append(f"loss_type: {loss_type} (TRL CPOConfig) read as CPO-{loss_type}")
        return "cpo", loss_type, "TRL"
    if loss_type is None and simpo_repo:
        notes.append("SimPO-repository keys without a method: SimPO")
        return "simpo", loss_type, repo_tool
    return None, loss_type, None


def _absolute_gamma(obj, raw: dict, later: dict, notes: list[str], where: str):
    """Rule 5 with a SimPO-family method: `gamma` is the absolute margin γ, read as γ/β."""
    other = [k for k in ("gamma_beta_ratio", "simpo_gamma") if k in raw or k in later]
    if other:
        _fail(where, f"'gamma' and {other[0]!r} both give the target margin (gamma absolute, {other[0]} "
                     f"{'over β' if other[0] == 'gamma_beta_ratio' else 'absolute'}); keep one of them.")
    beta = _resolved(obj, "beta")
    ratio = obj.gamma / beta
    notes.append(f"gamma {obj.gamma:g} (absolute, SimPO repository recipes) read as gamma_beta_ratio {ratio:g}")
    return dataclasses.replace(obj, gamma=None, gamma_beta_ratio=ratio)


def _resolved(obj, name: str) -> float | str:
    """A hyperparameter as it will be resolved: given, else the method's default, else neutral (or
    the method itself, for a spelling whose value depends on it: pref_ftx)."""
    if name == "method":
        return obj.method
    return METHODS[obj.method].value(name, getattr(obj, name))
