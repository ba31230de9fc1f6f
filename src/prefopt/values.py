"""What each key holds: the section it belongs to, its type, and for a number its range.

    raw = {"beta": "2.5", "warmup_ratio": 0.1}
    check_values("c.yaml", raw)          # in place: {"beta": 2.5, ...}, or a PrefoptError naming the key

Every numeric key has a rule in `VALUE_RULES`, checked when the config is built, before anything
loads, under the spelling the user wrote (`cpo_alpha must be at least 0`); a spelling from
`dialects` takes its canonical key's rule and type unless it has its own. The hyperparameters'
ranges come from `losses.Hyper`.
"""

import dataclasses
import math
import typing
from dataclasses import dataclass

from transformers import TrainingArguments

from .dialects import DIALECT_KEYS, NON_CANONICAL, SPELLINGS
from .losses import HYPERPARAMETERS
from .schema import DataArgs, DatasetSource, ModelArgs, ObjectiveArgs, PairsArgs, RunArgs, _base_types, _coerce, _fail


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


MODEL_KEYS = _names(ModelArgs)
DATA_KEYS = _names(DataArgs) - {"train_datasets", "eval_datasets"}
OBJECTIVE_KEYS = _names(ObjectiveArgs)
RUN_KEYS = _names(RunArgs)
PAIRS_KEYS = _names(PairsArgs)
TRAINING_KEYS = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
CANONICAL_KEYS = MODEL_KEYS | DATA_KEYS | OBJECTIVE_KEYS | RUN_KEYS | PAIRS_KEYS | TRAINING_KEYS
VALID_KEYS = CANONICAL_KEYS | DIALECT_KEYS


def _check_spellings():
    """Every spelling of the table is read as a canonical key (a typo stops here, not with a KeyError)."""
    for s in SPELLINGS:
        assert s.canonical in CANONICAL_KEYS and s.canonical not in NON_CANONICAL, (
            f"dialects.SPELLINGS: {s.spelling!r} is read as {s.canonical!r}, which is not a canonical key")


_check_spellings()

# Each field's annotation, for reading its value as the right type; a spelling's is its canonical
# key's unless the table gives its own; and a `datasets:` entry's fraction, which has no field
FIELD_TYPES = {**{f.name: f.type for f in dataclasses.fields(TrainingArguments)},
               **{k: v for cls in (ModelArgs, DataArgs, ObjectiveArgs, RunArgs, PairsArgs, DatasetSource)
                  for k, v in typing.get_type_hints(cls).items()},
               "fraction": float | None}
FIELD_TYPES |= {s.spelling: s.type or FIELD_TYPES[s.canonical] for s in SPELLINGS}

# ---------------------------------------------------------------------------------------------
# Numeric ranges


@dataclass(frozen=True)
class Bound:
    """The finite numbers a key takes (NaN and ±inf never): from `low` to `high` (None: no limit),
    each end included unless open. Read as "must be ...": "positive", "at least 1", "in [0, 0.5)"."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    what: str = ""  # what the interval holds: "a share"

    def admits(self, v: float) -> bool:
        above = self.low is None or (v > self.low if self.low_open else v >= self.low)
        below = self.high is None or (v < self.high if self.high_open else v <= self.high)
        return math.isfinite(v) and above and below

    def __str__(self) -> str:
        if self.high is None:
            if self.low is None:
                return "a finite number"
            if self.low == 0 and self.low_open:
                return "positive"
            return f"{'above' if self.low_open else 'at least'} {_shown(self.low)}"
        if self.low == self.high:
            return _shown(self.low)
        ends = f"{'(' if self.low_open else '['}{_shown(self.low)}, {_shown(self.high)}{')' if self.high_open else ']'}"
        return f"{self.what} in {ends}".lstrip()


@dataclass(frozen=True)
class StepCount:
    """max_steps: -1 (as many as num_train_epochs take) or a whole number of at least 1. transformers
    trains one step for 0; prefopt refuses it rather than guess "none" or "one", and points to
    `prefopt data` for what "no steps" most likely meant: the data prepared and checked."""

    def admits(self, v: float) -> bool:
        return math.isfinite(v) and float(v).is_integer() and (v == -1 or v >= 1)

    def __str__(self) -> str:
        return ("-1 or a whole number of at least 1 (transformers would train one step for 0; to prepare and look at "
                "the data without training, run `prefopt data CONFIG.yaml`)")


@dataclass(frozen=True)
class ShareOrCount:
    """transformers' `*_steps` (and our test_split_size): below 1 a share of `of`, else a whole count."""

    of: str
    zero: bool = False  # 0 allowed (none)

    def admits(self, v: float) -> bool:
        return math.isfinite(v) and (0 < v < 1 or v >= 1 and float(v).is_integer() or self.zero and v == 0)

    def __str__(self) -> str:
        return f"{'0, ' if self.zero else ''}a share of {self.of} in (0, 1) or a whole number of at least 1"


POSITIVE = Bound(0, low_open=True)
AT_LEAST_0 = Bound(0)
COUNT = Bound(1)  # on a whole-number key: _coerce has refused fractions already
BELOW_1 = Bound(0, 1, high_open=True)
SHARE = Bound(0, 1, what="a share")
STEPS = ShareOrCount("the run's steps")


# Every numeric key, with what it takes and a note for the message: checked (and converted) in
# `build_config`, before anything loads, under the spelling the user wrote. (A spelling from
# `dialects` takes its canonical key's rule, below, unless it has one here.)
VALUE_RULES: dict[str, tuple[Bound | ShareOrCount, str]] = {
    # objective (the hyperparameters' own ranges come from losses.Hyper, below)
    "nll_weight": (AT_LEAST_0, "0: no NLL term"),
    "diversity_weight": (AT_LEAST_0, "0: off"),
    "diversity_alpha": (Bound(0, 1), "the entropy's share of the diversity term"),
    "logprob_chunk_size": (COUNT, "or unset"),
    "logprob_keep_mb": (AT_LEAST_0, "0: recompute the softmax in backward"),
    # model
    "lora_r": (COUNT, ""),
    "lora_alpha": (POSITIVE, ""),
    "lora_dropout": (BELOW_1, ""),
    # data
    "max_length": (Bound(2), "or unset"),
    "max_prompt_length": (COUNT, "or unset"),
    "max_completion_length": (COUNT, "or unset"),
    "pack_length": (COUNT, "or unset"),
    "preprocessing_num_workers": (COUNT, "or unset"),
    "max_dropped_share": (SHARE, ""),
    "test_split_size": (ShareOrCount("the training rows", zero=True), "or unset"),
    "keep_fraction": (Bound(0, 1, low_open=True, what="a share"), "of that dataset's rows"),
    "fraction": (POSITIVE, "a weight, normalised over the datasets"),
    # training
    "learning_rate": (AT_LEAST_0, "0: no update"),
    "num_train_epochs": (POSITIVE, "to train a set number of steps, set max_steps"),
    "max_steps": (StepCount(), "-1: as many as num_train_epochs take"),
    "per_device_train_batch_size": (COUNT, ""),
    "per_device_eval_batch_size": (COUNT, ""),
    "gradient_accumulation_steps": (COUNT, ""),
    "eval_accumulation_steps": (COUNT, "or unset"),
    "warmup_steps": (ShareOrCount("the run's steps", zero=True), ""),
    "warmup_ratio": (BELOW_1, "a share of the run's steps"),  # a spelling's own: warmup_steps also counts steps
    "weight_decay": (AT_LEAST_0, ""),
    "adam_beta1": (BELOW_1, ""),
    "adam_beta2": (BELOW_1, ""),
    # 0 would divide 0 by 0 for every weight whose gradient is 0 (an unused token's embedding)
    "adam_epsilon": (POSITIVE, ""),
    "max_grad_norm": (AT_LEAST_0, "0: no clipping"),
    # the Trainer's label smoother is for its own loss, which PreferenceTrainer replaces
    "label_smoothing_factor": (Bound(0, 0), "the preference loss's label smoothing is label_smoothing"),
    "neftune_noise_alpha": (POSITIVE, "or unset: off"),
    "logging_steps": (STEPS, ""),
    "eval_steps": (STEPS, "or unset: logging_steps"),
    "save_steps": (STEPS, ""),
    "eval_delay": (AT_LEAST_0, ""),
    "save_total_limit": (COUNT, "or unset: keep every checkpoint"),
    "seed": (Bound(0, 2**32 - 1), "numpy takes 32-bit seeds"),
    "data_seed": (Bound(0, 2**32 - 1), "or unset: seed"),
    "dataloader_num_workers": (AT_LEAST_0, "0: load in the main process"),
    "dataloader_prefetch_factor": (COUNT, "or unset"),
    "torch_empty_cache_steps": (COUNT, "or unset"),
    "ddp_timeout": (POSITIVE, "seconds"),
    "ddp_bucket_cap_mb": (POSITIVE, "or unset"),
    # run
    "eval_generation_prompts": (COUNT, ""),
    "eval_generation_max_new_tokens": (COUNT, "or unset: max_completion_length, else up to max_length"),
    # pairs
    "num_samples": (Bound(2), "answers per prompt: a pair needs two; or unset"),
    "temperature": (POSITIVE, "sampling needs a temperature above 0"),
    "top_p": (Bound(0, 1, low_open=True, what="a share"), "1: no nucleus cut"),
    "max_new_tokens": (COUNT, ""),
    "min_score_gap": (AT_LEAST_0, "0: only ties are dropped"),
    "min_chosen_score": (Bound(None, None), "or unset: any best answer is chosen"),
    "generation_batch_size": (COUNT, ""),
    "vllm_gpu_memory_utilization": (Bound(0, 1, low_open=True, what="a share"), "of the GPU's memory"),
    "reward_batch_size": (COUNT, ""),
    "max_prompts": (COUNT, "or unset: every prompt"),
}
VALUE_RULES |= {
    name: (Bound(f.metadata["low"], f.metadata["high"], low_open=f.metadata["low_open"], high_open=f.metadata["high_open"]),
           f.metadata["note"])
    for name, f in HYPERPARAMETERS.items()
}
VALUE_RULES |= {s.spelling: VALUE_RULES[s.canonical] for s in SPELLINGS
                if s.spelling not in VALUE_RULES and s.canonical in VALUE_RULES}


def _shown(v: float) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def checked(where: str, key: str, value, label: str | None = None):
    """`value` read as `key`'s type and refused outside its VALUE_RULES range; null passes where
    the key may be unset. `label` names it in the message when it sits inside another key."""
    bound, note = VALUE_RULES[key]
    label = label or key
    annotation = FIELD_TYPES[key]
    if value is None and type(None) in _base_types(annotation):
        return None
    number = None if value is None else _coerce(where, label, value, annotation)
    if number is not None and bound.admits(number):
        return number
    if number is None or math.isfinite(number):
        shown = "null" if number is None else _shown(number)
        _fail(where, f"{label} must be {bound}{f' ({note})' if note else ''}, got {shown}.")
    detail = "; ".join(part for part in ("" if bound == Bound() else str(bound), note) if part)
    _fail(where, f"{label} must be a finite number{f' ({detail})' if detail else ''}, got {number}.")


def check_values(where: str, raw: dict):
    """Every numeric key of `raw` read as its type, in place, or refused naming the key and its range."""
    for key in [k for k in raw if k in VALUE_RULES]:
        raw[key] = checked(where, key, raw[key])

