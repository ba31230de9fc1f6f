"""Configuration: one flat YAML plus `--key value` overrides → composed dataclasses.

    cfg = load_config("configs/simpo-llama3-8b-instruct.yaml", ["--beta", "2.5"])
    print(explain(cfg))

The YAML may be written in any of the dialects users already have — TRL `CPOConfig`/
`ORPOConfig`, the SimPO repository, alignment-handbook recipes, TRL's script arguments — and is
normalised into one canonical form: `method` + `loss_type` name the objective and each
hyperparameter has its paper's name (`beta`, `gamma_beta_ratio`, `nll_weight`, `alpha`,
`label_smoothing`, `gamma`). Two keys that say the same thing are an error, and so is an unknown
key (with the nearest valid one suggested). Training keys are `transformers.TrainingArguments`.

`build_config` reads a mapping in this order, each step in its own module:

    here                       unknown keys refused, the nearest valid one suggested
    dialects.check_spellings   two names of one key, or two forms of the data, refused
    values.check_values        every number read as its type and checked against its range
    dialects.canonical         other tools' spellings → canonical keys (one table, `SPELLINGS`)
    dataforms.read_data        the data's form → train and eval `DatasetSource` lists
    schema                     each key into its section's dataclass
    dialects.read_objective    the keys that change another key's meaning
    here                       method, loss_type and every hyperparameter resolved against
                               `losses.METHODS`; the training arguments adapted to this machine;
                               the rules between keys (`_validate`)

`yamlfile` reads the text (UTF-8, three refusals of its own) and `explanation` shows and saves the
result. The names other modules import from here (the dataclasses, `explain`, `loss_formula`,
`resolved_dict`, `save_resolved`, `OBJECTIVE_KEYS`) are re-exported.
"""

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

from .dataforms import read_data
from .dialects import canonical, check_spellings, merge_overrides, read_objective
from .explanation import explain, loss_formula, resolved_dict, save_resolved  # re-exported
from .losses import HYPERPARAMETERS, METHODS, takes
from .model_options import check_model_args, read_init_kwargs
from .peers import dialect_of, setting_differences, tool_differences
from .schema import (  # DatasetSource re-exported
    TRAINING_DEFAULTS, DataArgs, DatasetSource, ModelArgs, ObjectiveArgs, PairsArgs, RunArgs, _base_types, _build, _coerce, _fail,
    _plain)
from .templates import LAYOUTS
from .recipes import dpo_loss, likely_method, not_preference_recipe
from .values import DATA_KEYS, FIELD_TYPES, MODEL_KEYS, OBJECTIVE_KEYS, PAIRS_KEYS, RUN_KEYS, VALID_KEYS, check_values
from .yamlfile import parse_overrides, read_yaml


@dataclass
class Config:
    model: ModelArgs
    data: DataArgs
    objective: ObjectiveArgs
    training: TrainingArguments
    run: RunArgs = field(default_factory=RunArgs)
    pairs: PairsArgs = field(default_factory=PairsArgs)  # `prefopt pairs`; training ignores it
    source: str | None = None  # the YAML file, for messages
    forced: set[str] = field(default_factory=set)  # training keys set for this machine, not by the user
    notes: list[str] = field(default_factory=list)  # how dialect keys were read
    differs: list[str] = field(default_factory=list)  # values the config's own tool would not have trained
    defaulted: set[str] = field(default_factory=set)  # keys of schema.TRAINING_DEFAULTS the config left unset

    @property
    def method(self):
        return METHODS[self.objective.method]

    @property
    def reduction(self) -> str:
        return self.method.losses[self.objective.loss_type]


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(VALID_KEYS), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _suggest_from(word, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _refuse_unknown(where: str, raw: dict, message: str):
    for key in raw:
        if not isinstance(key, str):
            _fail(where, f"a key is {key!r}, not a name; config keys are names such as beta or learning_rate.")
        if key not in VALID_KEYS:
            _fail(where, not_preference_recipe(raw) or message.format(key) + _suggest(key))


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | None, argv: list[str] | None = None, objective_optional: bool = False) -> Config:
    """Read YAML (optional) and `--key value` overrides into a resolved Config (`objective_optional`:
    for `prefopt pairs`, which trains nothing: a config without an objective reads as SimPO's)."""
    raw = read_yaml(path) if path else {}
    where = str(path) if path else "command line"
    if path:
        check_spellings(str(path), raw)
        _refuse_unknown(str(path), raw, "unknown key '{}'.")
    overrides = negated_flags(parse_overrides(argv or []))
    check_spellings("command line", overrides)
    _refuse_unknown("command line", overrides, "unknown option '--{}'.")
    check_values("command line", overrides)  # here, so that a bad value is blamed on the command line
    return build_config(merge_overrides(raw, overrides), where, objective_optional)


def negated_flags(overrides: dict) -> dict:
    """HfArgumentParser's `--no_<flag>` for a true/false key: `--no_disable_dropout` is
    `--disable_dropout false`. (A key whose own name starts with no_ keeps its meaning.)"""
    out = {}
    for key, value in overrides.items():
        flag = key[3:]
        if key.startswith("no_") and key not in VALID_KEYS and flag in VALID_KEYS and _is_flag(flag):
            if value is not True:
                _fail("command line", f"--{key} takes no value (it sets {flag} to false); got {value!r}.")
            key, value = flag, False
        out[key] = value
    return out


def _is_flag(key: str) -> bool:
    return _base_types(FIELD_TYPES[key]) <= {bool, type(None)}


def build_config(raw: dict, where: str = "config", objective_optional: bool = False) -> Config:
    """Normalise an already-merged mapping into a Config (the steps: this module's docstring)."""
    raw = dict(raw)
    _refuse_unknown(where, raw, "unknown key '{}'.")
    check_spellings(where, raw)
    check_values(where, raw)
    written = dict(raw)  # as spelled, before other tools' names are read as prefopt's
    raw, later, notes = canonical(where, raw)
    train, evals, data_notes = read_data(where, raw)
    notes += data_notes
    sections = _sections(raw)
    model = _build(where, ModelArgs, sections["model"])
    model = read_init_kwargs(where, model, notes)
    check_model_args(where, model)
    data = _build(where, DataArgs, sections["data"])
    data.train_datasets, data.eval_datasets = train, evals
    given, tool = read_objective(_build(where, ObjectiveArgs, sections["objective"]), raw, later, notes, where,
                                 frozenset(written))
    if objective_optional and given.method is None and given.loss_type is None:
        given = dataclasses.replace(given, method="simpo")
    objective = _resolve_objective(where, given, written)
    differs = tool_differences(dialect_of(set(written), tool), given, objective)
    training, forced = _training(where, sections["training"], notes)
    _validate(where, model, data, objective, training)
    defaulted = set(TRAINING_DEFAULTS) - set(sections["training"])
    differs += setting_differences(set(written), model, data)
    run = _build(where, RunArgs, sections["run"])
    pairs = _build(where, PairsArgs, sections["pairs"])
    return Config(model=model, data=data, objective=objective, training=training, run=run, pairs=pairs, source=where, notes=notes,
                  forced=forced, differs=differs, defaulted=defaulted)


# Which section a canonical key belongs to, in this order; the rest are TrainingArguments'. (Keys
# that both TrainingArguments and we would claim go to us; none overlap today.)
SECTIONS = (("run", RUN_KEYS), ("pairs", PAIRS_KEYS), ("model", MODEL_KEYS), ("objective", OBJECTIVE_KEYS), ("data", DATA_KEYS))


def _sections(raw: dict) -> dict[str, dict]:
    sections: dict[str, dict] = {"model": {}, "data": {}, "objective": {}, "run": {}, "pairs": {}, "training": {}}
    for key, value in raw.items():
        section = next((name for name, keys in SECTIONS if key in keys), "training")
        sections[section][key] = value
    return sections


# ---------------------------------------------------------------------------------------------
# Objective


def _resolve_objective(where: str, obj: ObjectiveArgs, written: dict | None = None) -> ObjectiveArgs:
    """Check the method and loss shape (canonical by now: `dialects.read_objective` has read what
    other tools mean by theirs), then settle every hyperparameter and the NLL weight. `written`:
    the keys as the config spelled them, to name the likely method of a recipe that gives none."""
    method, loss_type = obj.method, obj.loss_type
    if method is None and loss_type is None:
        _fail(where, likely_method(written or {}) or f"no objective given: set method to one of {', '.join(METHODS)}.")
    if method is None:
        owners = [name for name, m in METHODS.items() if loss_type in m.losses]
        if owners:  # a shape of prefopt's own that no other tool's spelling names
            _fail(where, f"loss_type {loss_type!r} is the loss of method {' or '.join(owners)}: set method "
                         f"({owners[0]}) too.")
        _fail(where, dpo_loss(loss_type) or f"loss_type {loss_type!r} is not known; use sigmoid, hinge or ipo, or set method "
                     f"to one of {', '.join(METHODS)}.")
    if method not in METHODS:
        _fail(where, f"method {method!r} is not known; use one of {', '.join(METHODS)}.{_suggest_from(method, METHODS)}")
    spec = METHODS[method]
    if loss_type is None:
        loss_type = next(iter(spec.losses))
    if loss_type not in spec.losses:
        _fail(where, f"method {method} takes loss_type {' or '.join(spec.losses)}, not {loss_type!r}.")
    hyper = _resolve_hyper(where, obj, method, loss_type)
    nll = spec.defaults["nll_weight"] if obj.nll_weight is None else obj.nll_weight
    return dataclasses.replace(obj, method=method, loss_type=loss_type, nll_weight=float(nll), **hyper)


def _resolve_hyper(where: str, obj: ObjectiveArgs, method: str, loss_type: str) -> dict:
    """Every hyperparameter of `losses.Hyper`: as given, else the method's default, else its neutral
    value; one the method does not take (with this loss shape) is refused when set to anything else."""
    spec, allowed = METHODS[method], takes(method, loss_type)
    given = {name: getattr(obj, name) for name in HYPERPARAMETERS}
    for name, f in HYPERPARAMETERS.items():
        if name not in allowed and given[name] is not None and given[name] != f.default:
            _fail(where, spec.refusals.get(name, f.metadata["refusal"]).format(method=method, name=name))
    return {name: spec.value(name, given[name]) for name in HYPERPARAMETERS}


# ---------------------------------------------------------------------------------------------
# Training arguments, adapted to this machine

# The annotation of each TrainingArguments field, for reading its value as the right type
TRAINING_TYPES = {f.name: f.type for f in dataclasses.fields(TrainingArguments)}


def _training(where: str, values: dict, notes: list[str]) -> tuple[TrainingArguments, set[str]]:
    """TrainingArguments from the training keys over prefopt's defaults; and the keys set for this
    machine, not by the user (not written to the resolved config)."""
    values = {**TRAINING_DEFAULTS, **values}
    values = {k: _coerce(where, k, v, TRAINING_TYPES[k]) for k, v in values.items()}
    if values.get("remove_unused_columns"):
        _fail(where, "remove_unused_columns must stay false: the collator needs the tokenized columns.")
    values["remove_unused_columns"] = False
    forced = _adapt_to_machine(where, values, notes)
    if values.get("deepspeed"):
        values["deepspeed"] = _deepspeed(where, values["deepspeed"])
    try:
        return TrainingArguments(**values), forced
    except (ValueError, TypeError, ImportError) as e:
        _fail(where, f"training arguments rejected by transformers: {e}")


def _adapt_to_machine(where: str, values: dict, notes: list[str]) -> set[str]:
    """What a machine without an accelerator needs, in place; returns the keys it set."""
    if _has_accelerator():
        return set()
    forced = set()
    if "dataloader_pin_memory" not in values:
        values["dataloader_pin_memory"] = False  # pinning needs a device to pin for
        forced.add("dataloader_pin_memory")
    # Without it, processes started by torchrun would not join one process group (gloo) and would
    # each train alone on all the data.
    if not values.get("use_cpu"):
        values["use_cpu"] = True
        forced.add("use_cpu")
    if values.get("bf16") or values.get("fp16"):
        # Mixed precision asked for on a machine without a GPU: train on the CPU under autocast
        # rather than refuse; transformers would stop with "doesn't support bf16/gpu".
        if values.get("fp16"):
            _fail(where, "fp16 needs a CUDA GPU; on this machine use bf16 (CPU autocast) or neither.")
        values["use_cpu"] = True
        notes.append("bf16 without a GPU: CPU training under bf16 autocast")
    return forced


def _deepspeed(where: str, value):
    """`deepspeed:` (a JSON file, as the SimPO repo passes it, or an inline mapping), checked here.

    A relative path is read from the working directory, else next to the config file. (What the
    settings mean is checked with the accelerate route's in `pipeline.check_runnable`.)
    """
    import importlib.util
    import json

    if isinstance(value, str):
        path = Path(value).expanduser()
        beside = Path(where).parent / path
        if not path.is_file() and not path.is_absolute() and beside.is_file():
            path = beside
        if not path.is_file():
            _fail(where, f"deepspeed: no such file {value!r} (looked in the working directory and next to the "
                         "config); fix the path.")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            _fail(where, f"deepspeed: {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.")
        value = str(path)
    else:
        config = value
    if not isinstance(config, dict):
        _fail(where, "deepspeed must be a JSON file or a mapping of DeepSpeed settings.")
    if importlib.util.find_spec("deepspeed") is None:
        _fail(where, "deepspeed is set but the deepspeed package is not installed: pip install deepspeed "
                     "(or pip install 'prefopt[deepspeed]'), or remove the deepspeed key to train without it.")
    return value


def _has_accelerator() -> bool:
    import accelerate.utils as au
    import torch

    others = ("is_xpu_available", "is_npu_available", "is_mlu_available", "is_hpu_available", "is_musa_available",
              "is_sdaa_available")
    return (torch.cuda.is_available() or torch.backends.mps.is_available()
            or any(getattr(au, name, lambda: False)() for name in others))


def _validate(where: str, model: ModelArgs, data: DataArgs, obj: ObjectiveArgs, training: TrainingArguments):
    """The rules between keys (each key's own range is VALUE_RULES')."""
    if data.max_prompt_length is not None and data.max_length is not None and data.max_prompt_length >= data.max_length:
        _fail(where, f"max_prompt_length ({data.max_prompt_length}) must be below max_length ({data.max_length}) "
                     "to leave room for the completion.")
    if data.layout not in ("packed", "shared", "padded"):
        _fail(where, f"layout must be packed, shared or padded, got {data.layout!r}.")
    if data.truncation_mode not in ("keep_end", "keep_start"):
        _fail(where, f"truncation_mode must be keep_end or keep_start, got {data.truncation_mode!r}.")
    if data.completion_layout not in LAYOUTS:
        _fail(where, f"completion_layout must be {' or '.join(LAYOUTS)}, got {data.completion_layout!r}.")
    if data.column_mapping is not None:
        mapping = data.column_mapping
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            _fail(where, f"column_mapping must map prompt/chosen/rejected to your column names, e.g. "
                         f"{{prompt: question, chosen: good, rejected: bad}}; got {mapping!r}.")
        bad = set(mapping) - {"prompt", "chosen", "rejected"}
        if bad:
            _fail(where, f"column_mapping keys must be prompt, chosen or rejected (got {sorted(map(str, bad))}); "
                         "the values are your column names.")
        if len(set(mapping.values())) < len(mapping):
            _fail(where, f"column_mapping {mapping} takes two roles from one column; map each to its own column.")
    # Only when the config names its data: a library caller may hand the Trainer an eval set itself.
    strategy = _plain(training.eval_strategy)
    asked = [(f"eval_strategy: {strategy}", "eval_strategy: no")] if strategy != "no" else []
    asked += [("eval_on_start: true", "eval_on_start: false")] if training.eval_on_start else []
    if asked and data.train_datasets and not data.eval_datasets and not data.test_split_size:
        _fail(where, f"{' and '.join(k for k, _ in asked)} {'ask' if len(asked) > 1 else 'asks'} for evaluation, but no evaluation data is configured: name a "
                     "held-out split (a split named like test/valid/eval in dataset_splits or datasets, or "
                     "dataset_test_split), or hold part of train out with test_split_size (e.g. 0.05); or set "
                     f"{' and '.join(off for _, off in asked)} to train without evaluating.")
    if model.load_in_4bit and model.load_in_8bit:
        _fail(where, "load_in_4bit and load_in_8bit both set; keep one.")
    if model.dtype not in (None, "auto", "float32", "bfloat16", "float16"):
        _fail(where, f"dtype must be auto, float32, bfloat16 or float16, got {model.dtype!r}.")


