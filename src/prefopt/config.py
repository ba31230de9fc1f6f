"""Configuration: one flat YAML plus `--key value` overrides → composed dataclasses.

    cfg = load_config("configs/simpo.yaml", ["--beta", "2.5"])
    print(explain(cfg))

The YAML may be written in any of the dialects users already have — TRL `CPOConfig`/
`ORPOConfig`, the SimPO repository, alignment-handbook recipes, TRL's script arguments — and is
normalised into one canonical form: `method` + `loss_type` name the objective and each
hyperparameter has its paper's name (`beta`, `gamma_beta_ratio`, `nll_weight`, `alpha`,
`label_smoothing`). Two keys that say the same thing are an error, and so is an unknown key
(with the nearest valid one suggested). Training keys are `transformers.TrainingArguments`.

The file is read as UTF-8 by PyYAML's safe loader with three refusals of its own (a key given
twice, aliases expanding past a bound, deep nesting), and every numeric value is checked against
`VALUE_RULES` when the config is built, so a bad value stops the run before anything loads.
"""

import codecs
import dataclasses
import difflib
import enum
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from .errors import PrefoptError
from .losses import HYPERPARAMETERS, LOSSES, METHODS, Hyper, formula, takes

# ---------------------------------------------------------------------------------------------
# The canonical dataclasses


@dataclass
class ModelArgs:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of the causal LM. None: the built-in demo."}
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer location when it differs from the model's."}
    )
    dtype: str | None = field(
        default=None, metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16 (None: float32)."}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager, sdpa, flash_attention_2, flex_attention (None: transformers' pick)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code shipped with a Hub repo."})
    allow_pickle_weights: bool = field(
        default=False, metadata={"help": "Load weights stored only as pickle (.bin/.pt), which can run code when "
                                         "loaded; by default only safetensors are read."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability to 0 (as TRL)."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt (None: PEFT's default for the architecture)."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter."}
    )
    existing_adapter: str | None = field(
        default=None, metadata={"help": "When model_name_or_path is a LoRA adapter folder: continue (train that "
                                        "adapter further) or merge (fold it into its base, then train as configured)."}
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model of the adapter in model_name_or_path (None: the one its "
                                        "adapter_config.json records)."}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4 bits (CUDA only)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base in 8 bits (CUDA only)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit type: nf4 or fp4."})
    bnb_4bit_compute_dtype: str | None = field(default=None, metadata={"help": "Compute dtype of 4-bit layers."})
    bnb_4bit_use_double_quant: bool = field(default=False, metadata={"help": "Quantize the quantization constants."})


@dataclass
class DatasetSource:
    """One dataset to load: a Hub id, a local file (json, jsonl, parquet, csv) or a local folder."""

    path: str
    split: str = "train"
    name: str | None = None  # the dataset's configuration name on the Hub
    data_dir: str | None = None
    data_files: Any = None
    columns: list[str] | None = None  # keep only these columns
    keep_fraction: float | None = None  # alignment-handbook: share of this dataset's rows to use
    mix_share: float | None = None  # TRL `fraction`: target share of the mixture, normalised


@dataclass
class DataArgs:
    train_datasets: list[DatasetSource] = field(default_factory=list)
    eval_datasets: list[DatasetSource] = field(default_factory=list)
    test_split_size: float | None = field(
        default=None, metadata={"help": "Hold out this share (or row count) of train for evaluation."}
    )
    column_mapping: dict[str, str] | None = field(
        default=None, metadata={"help": "Map prompt/chosen/rejected to other column names, e.g. {prompt: question}."}
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "chatml, a .jinja file, or a template string (None: the tokenizer's)."}
    )
    max_length: int | None = field(default=1024, metadata={"help": "Cap on prompt + completion tokens."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Cap on prompt tokens."})
    max_completion_length: int | None = field(default=None, metadata={"help": "Cap on completion tokens."})
    truncation_mode: str = field(
        default="keep_end", metadata={"help": "Which end of an over-long prompt to keep: keep_end or keep_start."}
    )
    max_dropped_share: float = field(
        default=0.1,
        metadata={"help": "Stop before training when more than this share of a split's pairs is dropped (blank "
                          "answers, cut to nothing, chosen equal to rejected, repeated pairs); 1: never."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    layout: str = field(
        default="packed",
        metadata={"help": "packed (several prompt-shared triples per row), shared (one per row) or padded."},
    )
    pack_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per packed row (None: the whole micro-batch in one row with SDPA; "
                          "the longest triple with other attention)."},
    )


def _objective_fields() -> list:
    """ObjectiveArgs' fields: the method and loss shape, every hyperparameter of `losses.Hyper` (None:
    the method's default, or the neutral value where the method does not take it), and the terms
    composed around the preference loss."""
    hyper = [(f.name, float | None, field(default=None, metadata={"help": f.metadata["help"]}))
             for f in dataclasses.fields(Hyper)]
    return [
        ("method", str | None, field(default=None, metadata={"help": ", ".join(METHODS) + "."})),
        ("loss_type", str | None, field(default=None, metadata={"help": "The loss shape, as the method allows."})),
        *hyper,
        ("nll_weight", float | None, field(default=None, metadata={"help": "Weight of the NLL term on chosen."})),
        ("diversity_weight", float, field(default=0.0, metadata={"help": "Weight of the diversity term (0: off)."})),
        ("diversity_alpha", float, field(default=0.0, metadata={"help": "Entropy vs KL mix inside the diversity term."})),
        ("logprob_chunk_size", int | None, field(
            default=None, metadata={"help": "Tokens per LM-head chunk (None: sized so a chunk's logits are ~256 MB)."})),
    ]


ObjectiveArgs = dataclasses.make_dataclass("ObjectiveArgs", _objective_fields())
ObjectiveArgs.__module__ = __name__


@dataclass
class RunArgs:
    """What to do with what an earlier run left in output_dir (not part of the run's identity)."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start afresh in an output_dir that holds another run (its checkpoints "
                                         "and metrics.jsonl are deleted) instead of refusing or resuming."}
    )


@dataclass
class Config:
    model: ModelArgs
    data: DataArgs
    objective: ObjectiveArgs
    training: TrainingArguments
    run: RunArgs = field(default_factory=RunArgs)
    source: str | None = None  # the YAML file, for messages
    forced: set[str] = field(default_factory=set)  # training keys set for this machine, not by the user
    notes: list[str] = field(default_factory=list)  # how dialect keys were read

    @property
    def method(self):
        return METHODS[self.objective.method]

    @property
    def reduction(self) -> str:
        return self.method.losses[self.objective.loss_type]


# Where prefopt's defaults differ from TrainingArguments' (they follow TRL's CPOConfig, except
# bf16 and gradient checkpointing, which stay off unless asked for: CPUs are first-class here).
TRAINING_DEFAULTS = {
    "output_dir": "outputs/prefopt",
    "learning_rate": 1e-6,
    "logging_steps": 10,
    "remove_unused_columns": False,
    "report_to": "none",
}

# ---------------------------------------------------------------------------------------------
# Dialects

# Keys that say the same thing. Each group: canonical name -> every spelling accepted. Two
# spellings of one group in the same place (file or command line) are an error.
ALIASES: dict[str, tuple[str, ...]] = {
    "gamma": ("gamma_beta_ratio", "simpo_gamma"),
    "nll_weight": ("nll_weight", "cpo_alpha", "sft_weight"),
    "eval_strategy": ("eval_strategy", "evaluation_strategy"),
    "dtype": ("dtype", "torch_dtype"),
    "preprocessing_num_workers": ("preprocessing_num_workers", "dataset_num_proc"),
    "max_completion_length": ("max_completion_length", "max_target_length"),
    "bnb_4bit_use_double_quant": ("bnb_4bit_use_double_quant", "use_bnb_nested_quant"),
    "attn_implementation": ("attn_implementation", "use_flash_attention_2"),
    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio)
    "warmup_steps": ("warmup_steps", "warmup_ratio"),
    # ... and renamed gradient checkpointing (the old names still work there, with a warning)
    "activation_checkpointing": ("activation_checkpointing", "gradient_checkpointing"),
    "activation_checkpointing_kwargs": ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"),
}
# Older spellings read under today's names (simpo_gamma and use_flash_attention_2 are converted instead)
RENAMES = {"evaluation_strategy": "eval_strategy", "torch_dtype": "dtype", "dataset_num_proc": "preprocessing_num_workers",
           "max_target_length": "max_completion_length", "use_bnb_nested_quant": "bnb_4bit_use_double_quant",
           "cpo_alpha": "nll_weight", "sft_weight": "nll_weight", "warmup_ratio": "warmup_steps",
           "gradient_checkpointing": "activation_checkpointing",
           "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}
# The ways of naming the data: only one may be used.
DATASET_FORMS = ("dataset_mixer", "dataset_mixture", "datasets", "dataset_name")
DATASET_COMPANIONS = (
    "dataset_splits",
    "dataset_configs",
    "dataset_config",
    "dataset_train_split",
    "dataset_test_split",
    "streaming",
)
DIALECT_KEYS = {
    spelling for group in ALIASES.values() for spelling in group
} | set(DATASET_FORMS) | set(DATASET_COMPANIONS)

SIMPO_REPO_MARKERS = ("gamma_beta_ratio", "sft_weight")


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


MODEL_KEYS = _names(ModelArgs)
DATA_KEYS = _names(DataArgs) - {"train_datasets", "eval_datasets"}
OBJECTIVE_KEYS = _names(ObjectiveArgs)
RUN_KEYS = _names(RunArgs)
TRAINING_KEYS = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
VALID_KEYS = MODEL_KEYS | DATA_KEYS | OBJECTIVE_KEYS | RUN_KEYS | TRAINING_KEYS | DIALECT_KEYS
# Each field's annotation, for reading its value as the right type; and the two dialect keys
# that have no field of their own (TRL's absolute simpo_gamma, a `datasets:` entry's fraction)
FIELD_TYPES = {**{f.name: f.type for f in dataclasses.fields(TrainingArguments)},
               **{k: v for cls in (ModelArgs, DataArgs, ObjectiveArgs, RunArgs, DatasetSource)
                  for k, v in typing.get_type_hints(cls).items()},
               "simpo_gamma": float, "fraction": float | None}


def _fail(where: str, message: str):
    raise PrefoptError(f"{where}: {message}")


# How far a config's YAML may reach. A real config has a few hundred values and nests a few
# levels; aliases may repeat a block (`dataset_splits: *splits`), but nine nested lists of nine
# aliases each (a "billion laughs" in 300 bytes) would expand to 9⁹ values in whatever walks it.
MAX_YAML_VALUES = 100_000  # counting every alias as the values it stands for
MAX_YAML_DEPTH = 64  # PyYAML's composer recurses per level: this stops well before Python's limit

# Encodings recognised by their byte-order mark (UTF-32 first: its LE mark begins with UTF-16's):
# the name, and iconv's name for it
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "UTF-32 (little-endian)", "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32 (big-endian)", "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16 (little-endian)", "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16 (big-endian)", "UTF-16"),
)


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing at compose time what it would accept silently: a key given
    twice in one mapping (YAML keeps the last), aliases expanding past MAX_YAML_VALUES, and
    nesting past MAX_YAML_DEPTH. Merge keys (`<<: *defaults`) still work: the keys written next
    to a merge override the merged ones, by YAML's rule, and are not duplicates."""

    def __init__(self, text: str, where: str):
        super().__init__(text)
        self.where = where
        self.path: list[str] = []  # where the node being composed sits: dataset_mixer, 'a.jsonl'
        self.sizes: dict[int, int] = {}  # id(node) -> values it expands to, aliases counted in full

    def compose_node(self, parent, index):
        event = self.peek_event()
        if parent is not None:  # index: the key node of a mapping value, the position in a list
            self.path.append(f"[{index}]" if isinstance(index, int) else f".{getattr(index, 'value', '?')}")
        if len(self.path) > MAX_YAML_DEPTH:
            _fail(self.where, f"line {event.start_mark.line + 1}: the YAML nests more than {MAX_YAML_DEPTH} levels "
                              "deep; a config is a mapping of keys to values.")
        node = super().compose_node(parent, index)
        if isinstance(event, yaml.AliasEvent):
            if id(node) not in self.sizes:  # the alias sits inside the value it names
                _fail(self.where, f"line {event.start_mark.line + 1}: the alias *{event.anchor} refers to a value "
                                  "that contains it; a config cannot hold a recursive value.")
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
            if isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
                self._refuse_duplicate_keys(node)
            self.sizes[id(node)] = 1 + sum(self.sizes[id(child)] for child in children)
            if self.sizes[id(node)] > MAX_YAML_VALUES:
                _fail(self.where, f"line {event.start_mark.line + 1}: this value expands to more than "
                                  f"{MAX_YAML_VALUES:,} values through YAML aliases (*name); write the values out "
                                  "instead.")
        if parent is not None:
            self.path.pop()
        return node

    def _refuse_duplicate_keys(self, node: yaml.MappingNode):
        first: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)  # `1` and `1.0`, `on` and `true`: one key to Python
            if key in first:
                under = f" under {''.join(self.path).removeprefix('.')}" if self.path else ""
                lines = first[key].start_mark.line + 1, key_node.start_mark.line + 1
                at = f"on line {lines[0]}" if lines[0] == lines[1] else f"(line {lines[0]} and line {lines[1]})"
                _fail(self.where, f"{key_node.value!r}{under} is given twice {at}; YAML would silently keep the "
                                  "second. Keep one.")
            first[key] = key_node


def parse_yaml(text: str, where: str):
    """One YAML document through `_ConfigLoader` (PyYAML errors propagate as yaml.YAMLError)."""
    loader = _ConfigLoader(text, where)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _decode(where: str, data: bytes) -> str:
    """UTF-8 text (a UTF-8 byte-order mark is dropped); any other encoding is named, with the fix."""
    fix = "save it as UTF-8 (your editor's \"save with encoding\")"
    for mark, name, codec in BYTE_ORDER_MARKS:
        if data.startswith(mark):
            _fail(where, f"the file is {name} text; configs are read as UTF-8: {fix}, or convert it with "
                         f"`iconv -f {codec} -t UTF-8 {where} > fixed.yaml`.")
    if b"\x00" in data:  # ASCII text in UTF-16 without a byte-order mark has every other byte 0
        _fail(where, f"the file holds NUL bytes: it looks like UTF-16 or UTF-32 text without a byte-order mark, and "
                     f"configs are read as UTF-8: {fix}.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        _fail(where, f"line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}: {e.reason}); {fix}.")


def read_yaml(path: str | Path) -> dict:
    """Read a config file (UTF-8, with `_ConfigLoader`); it must hold one mapping."""
    p = Path(path)
    if not p.is_file():
        raise PrefoptError(f"{path}: no such config file.")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise PrefoptError(f"{path}: cannot be read ({e.strerror}); check the file's permissions.") from None
    try:
        raw = parse_yaml(_decode(str(path), data), str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PrefoptError(f"{path}:{at} is not valid YAML ({getattr(e, 'problem', e)}).") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PrefoptError(f"{path}: expected a mapping of keys to values at the top level, got {type(raw).__name__}.")
    return raw


def parse_overrides(argv: list[str]) -> dict:
    """`--key value`, `--key=value` and bare `--flag` (true). Values are read as YAML scalars or
    flow collections, so `--beta 2.5`, `--bf16 false` and `--dataset_mixer '{data.jsonl: 1.0}'` work."""
    out: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise PrefoptError(f"command line: expected --key value, got {arg!r}.")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        try:
            out[key] = parse_yaml(value, f"command line (--{key})")
        except yaml.YAMLError:
            out[key] = value
        i += 1
    return out


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(VALID_KEYS), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _check_aliases(where: str, raw: dict):
    for canonical, spellings in ALIASES.items():
        present = [k for k in spellings if k in raw]
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


def _dataset_sources(where: str, raw: dict) -> tuple[list[DatasetSource], list[DatasetSource], list[str]]:
    """Turn whichever dataset form the file uses into train and eval source lists."""
    notes = []
    train, evals = [], []

    def route(src: DatasetSource):
        # alignment-handbook's rule, widened: a split named like an evaluation split is held out
        is_eval = any(tag in src.split for tag in ("test", "valid", "eval"))
        (evals if is_eval else train).append(src)

    if "dataset_mixer" in raw:
        mixer = raw["dataset_mixer"]
        if not isinstance(mixer, dict) or not mixer:
            _fail(where, "dataset_mixer must map dataset names to fractions, e.g. {my/data: 1.0}.")
        splits = raw.get("dataset_splits", ["train", "test"])
        if isinstance(splits, str):
            splits = [splits]
        configs = raw.get("dataset_configs") or [None] * len(mixer)
        if len(configs) != len(mixer):
            _fail(where, f"dataset_configs has {len(configs)} entries for {len(mixer)} datasets in dataset_mixer.")
        for (path, frac), name in zip(mixer.items(), configs):
            frac = _checked(where, "keep_fraction", frac, label=f"dataset_mixer[{path!r}]")
            if frac is None:
                _fail(where, f"dataset_mixer[{path!r}]: give the share of its rows to use, e.g. 1.0.")
            for split in splits:
                route(DatasetSource(path=str(path), split=split, name=name, keep_fraction=frac))
        notes.append(f"data: alignment-handbook dataset_mixer with splits {list(splits)}")
    elif "dataset_mixture" in raw:
        mixture = raw["dataset_mixture"]
        if not isinstance(mixture, dict) or not isinstance(mixture.get("datasets"), list):
            _fail(where, "dataset_mixture needs a 'datasets' list of {id, config, split, columns, weight}.")
        unknown = set(mixture) - {"datasets", "seed", "test_split_size"}
        if unknown:
            _fail(where, f"dataset_mixture: unknown keys {sorted(unknown)} (allowed: datasets, seed, test_split_size).")
        for i, d in enumerate(mixture["datasets"]):
            extra = set(d) - {"id", "config", "split", "columns", "weight"}
            if "id" not in d or extra:
                _fail(where, f"dataset_mixture.datasets[{i}]: needs 'id'; allowed keys id, config, split, columns, weight.")
            weight = _checked(where, "keep_fraction", d.get("weight"), label=f"dataset_mixture.datasets[{i}].weight")
            route(DatasetSource(path=str(d["id"]), split=d.get("split", "train"), name=d.get("config"),
                                columns=d.get("columns"), keep_fraction=weight))
        if "test_split_size" in mixture:
            size = _checked(where, "test_split_size", mixture["test_split_size"],
                            label="dataset_mixture.test_split_size")
            raw.setdefault("test_split_size", size)
        notes.append("data: alignment-handbook dataset_mixture")
    elif "datasets" in raw:
        entries = raw["datasets"]
        if not isinstance(entries, list) or not entries:
            _fail(where, "datasets must be a list of {path, name, data_dir, data_files, split, columns, fraction}.")
        # `keep_fraction` (prefopt's own) is the handbook's per-dataset share, so a resolved
        # config written by prefopt loads back; `fraction` keeps TRL's mixture-share meaning.
        allowed = {"path", "name", "data_dir", "data_files", "split", "columns", "fraction", "keep_fraction"}
        for i, d in enumerate(entries):
            if not isinstance(d, dict) or "path" not in d or set(d) - allowed:
                _fail(where, f"datasets[{i}]: needs 'path'; allowed keys {sorted(allowed)}.")
            route(DatasetSource(path=str(d["path"]), split=d.get("split", "train"), name=d.get("name"),
                                data_dir=d.get("data_dir"), data_files=d.get("data_files"), columns=d.get("columns"),
                                mix_share=_checked(where, "fraction", d.get("fraction"), label=f"datasets[{i}].fraction"),
                                keep_fraction=_checked(where, "keep_fraction", d.get("keep_fraction"),
                                                       label=f"datasets[{i}].keep_fraction")))
        notes.append("data: TRL datasets list")
    elif "dataset_name" in raw:
        path, name = str(raw["dataset_name"]), raw.get("dataset_config")
        train.append(DatasetSource(path=path, split=raw.get("dataset_train_split", "train"), name=name))
        if "dataset_test_split" in raw:
            evals.append(DatasetSource(path=path, split=raw["dataset_test_split"], name=name))
        notes.append("data: dataset_name")
    for companion in ("dataset_splits", "dataset_configs"):
        if companion in raw and "dataset_mixer" not in raw:
            _fail(where, f"{companion} only goes with dataset_mixer.")
    if raw.get("streaming"):
        _fail(where, "streaming datasets are not supported: prefopt tokenizes and checks every row before training.")
    return train, evals, notes


# ---------------------------------------------------------------------------------------------
# Values


def _base_types(annotation) -> set:
    if isinstance(annotation, str):  # postponed annotations in TrainingArguments
        return {t for name, t in (("float", float), ("int", int), ("bool", bool), ("str", str)) if name in annotation}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_base_types(a) for a in typing.get_args(annotation)))
    return {origin or annotation}


def _coerce(where: str, key: str, value, annotation):
    """YAML reads `5e-7` as a string and users write `true` for flags: convert to the field's type."""
    allowed = _base_types(annotation)
    if value is None or str in allowed and isinstance(value, str):
        return value
    if isinstance(value, bool) and str in allowed and bool not in allowed:
        # YAML 1.1 reads a bare `no`/`yes` as a boolean: `save_strategy: no` means the string
        return "yes" if value else "no"
    if bool in allowed and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    number = "a number" if float in allowed else "a whole number"
    if isinstance(value, bool) and allowed & {int, float} and bool not in allowed:
        _fail(where, f"{key}: expected {number}, got {value}.")
    for t in (int, float):
        if t in allowed and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            try:
                converted = t(value)
            except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
                continue
            if t is int and isinstance(value, float) and converted != value:
                continue
            return converted
    if allowed & {int, float} and not allowed & {str, list, dict, typing.Any}:
        # nothing above converted it: a word, a list, or a fraction where a count is meant
        _fail(where, f"{key}: expected {number}, got {value!r}.")
    if allowed <= {bool, type(None)} and not isinstance(value, bool):
        _fail(where, f"{key}: expected true or false, got {value!r}.")
    if allowed <= {str, type(None)} and isinstance(value, (int, float)):
        return str(value)  # `model_revision: 2024`, `chat_template: 3`: the text as written
    return value


def _build(where: str, cls, values: dict):
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        # (TrainingArguments takes lists for some str fields, e.g. fsdp; none of ours does)
        if _base_types(hints[key]) <= {str, type(None)} and isinstance(value, (list, dict)):
            _fail(where, f"{key}: expected a single value, got {value!r}.")
    return cls(**{k: _coerce(where, k, v, hints[k]) for k, v in values.items()})


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
    trains one step for 0; prefopt refuses it rather than guess "none" or "one"."""

    def admits(self, v: float) -> bool:
        return math.isfinite(v) and float(v).is_integer() and (v == -1 or v >= 1)

    def __str__(self) -> str:
        return "-1 or a whole number of at least 1 (transformers would train one step for 0)"


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
# `build_config`, before anything loads, under the spelling the user wrote.
VALUE_RULES: dict[str, tuple[Bound | ShareOrCount, str]] = {
    # objective (the hyperparameters' own ranges come from losses.Hyper, below)
    "simpo_gamma": (AT_LEAST_0, "0: no target margin"),
    "nll_weight": (AT_LEAST_0, "0: no NLL term"),
    "cpo_alpha": (AT_LEAST_0, "0: no NLL term"),
    "sft_weight": (AT_LEAST_0, "0: no NLL term"),
    "diversity_weight": (AT_LEAST_0, "0: off"),
    "diversity_alpha": (Bound(0, 1), "the entropy's share of the diversity term"),
    "logprob_chunk_size": (COUNT, "or unset"),
    # model
    "lora_r": (COUNT, ""),
    "lora_alpha": (POSITIVE, ""),
    "lora_dropout": (BELOW_1, ""),
    # data
    "max_length": (Bound(2), "or unset"),
    "max_prompt_length": (COUNT, "or unset"),
    "max_completion_length": (COUNT, "or unset"),
    "max_target_length": (COUNT, "or unset"),
    "pack_length": (COUNT, "or unset"),
    "preprocessing_num_workers": (COUNT, "or unset"),
    "dataset_num_proc": (COUNT, "or unset"),
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
    "warmup_ratio": (BELOW_1, "a share of the run's steps"),
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
}
VALUE_RULES.update({
    name: (Bound(f.metadata["low"], f.metadata["high"], low_open=f.metadata["low_open"], high_open=f.metadata["high_open"]),
           f.metadata["note"])
    for name, f in HYPERPARAMETERS.items()
})


def _shown(v: float) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _checked(where: str, key: str, value, label: str | None = None):
    """`value` read as `key`'s type and refused outside its VALUE_RULES range; null passes where
    the key may be unset. `label` names it in the message when it sits inside another key."""
    bound, note = VALUE_RULES[key]
    label = label or key
    annotation = FIELD_TYPES[RENAMES.get(key, key)]
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


def _check_values(where: str, raw: dict):
    """Every numeric key of `raw` read as its type, in place, or refused naming the key and its range."""
    for key in [k for k in raw if k in VALUE_RULES]:
        raw[key] = _checked(where, key, raw[key])


# ---------------------------------------------------------------------------------------------
# Objective


def _resolve_objective(where: str, raw: dict, obj: ObjectiveArgs, notes: list[str]) -> ObjectiveArgs:
    """Settle method, loss type and every hyperparameter; fill the rest from the method's paper."""
    loss_type = obj.loss_type
    method = obj.method
    simpo_repo = any(k in raw for k in SIMPO_REPO_MARKERS)
    nll_given = obj.nll_weight is not None

    if method is None:
        if loss_type in ("simpo", "alphapo"):
            # TRL's CPOTrainer spelling. TRL's cpo_alpha defaults to 1.0, which quietly turns
            # "SimPO" into CPO-SimPO; here SimPO means SimPO unless an NLL weight is given.
            method = "alphapo" if loss_type == "alphapo" else ("cpo_simpo" if nll_given and obj.nll_weight > 0 else "simpo")
            notes.append(f"loss_type: {loss_type} (TRL) read as method {method}")
            loss_type = "sigmoid"
        elif loss_type in ("sigmoid", "hinge") and simpo_repo:
            method = "simpo"
            notes.append(f"loss_type: {loss_type} with SimPO-repository keys read as SimPO-{loss_type}")
        elif loss_type in ("sigmoid", "hinge", "ipo"):
            method = "cpo"
            notes.append(f"loss_type: {loss_type} (TRL CPOConfig) read as CPO-{loss_type}")
        elif loss_type is None and simpo_repo:
            method = "simpo"
            notes.append("SimPO-repository keys without a method: SimPO")
        elif loss_type is None:
            _fail(where, f"no objective given: set method to one of {', '.join(METHODS)}.")
        else:
            _fail(where, f"loss_type {loss_type!r} is not known; use sigmoid, hinge or ipo, or set method "
                         f"to one of {', '.join(METHODS)}.")
    if method not in METHODS:
        _fail(where, f"method {method!r} is not known; use one of {', '.join(METHODS)}.{_suggest_from(method, METHODS)}")
    spec = METHODS[method]
    if loss_type in ("simpo", "alphapo") and method in ("simpo", "cpo_simpo", "alphapo"):
        loss_type = "sigmoid"
    if loss_type is None:
        loss_type = next(iter(spec.losses))
    if loss_type not in spec.losses:
        _fail(where, f"method {method} takes loss_type {' or '.join(spec.losses)}, not {loss_type!r}.")

    hyper = _resolve_hyper(where, raw, obj, method, loss_type, notes)
    nll = spec.defaults["nll_weight"] if obj.nll_weight is None else obj.nll_weight
    return dataclasses.replace(obj, method=method, loss_type=loss_type, nll_weight=float(nll), **hyper)


def _resolve_hyper(where: str, raw: dict, obj: ObjectiveArgs, method: str, loss_type: str, notes: list[str]) -> dict:
    """Every hyperparameter of `losses.Hyper`: as given, else the method's default, else its neutral
    value; one the method does not take (with this loss shape) is refused when set to anything else."""
    spec, allowed = METHODS[method], takes(method, loss_type)
    given = {name: getattr(obj, name) for name in HYPERPARAMETERS}
    value = {name: spec.defaults.get(name, f.default) if given[name] is None else given[name]
             for name, f in HYPERPARAMETERS.items()}
    if "simpo_gamma" in raw:
        # TRL's simpo_gamma is the absolute margin γ; the canonical parameter is γ/β.
        given["gamma_beta_ratio"] = value["gamma_beta_ratio"] = raw["simpo_gamma"] / value["beta"]
        notes.append(f"simpo_gamma {raw['simpo_gamma']} (absolute, TRL) read as gamma_beta_ratio "
                     f"{value['gamma_beta_ratio']:g}")
    for name, f in HYPERPARAMETERS.items():
        if name not in allowed and given[name] is not None and given[name] != f.default:
            _fail(where, f.metadata["refusal"].format(method=method, name=name))
    return {name: float(v) for name, v in value.items()}


def _suggest_from(word, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


# ---------------------------------------------------------------------------------------------
# Loading


def build_config(raw: dict, where: str = "config") -> Config:
    """Normalise an already-merged mapping into a Config."""
    raw = dict(raw)
    for key in raw:
        if key not in VALID_KEYS:
            _fail(where, f"unknown key '{key}'.{_suggest(key)}")
    _check_aliases(where, raw)
    _check_values(where, raw)

    notes: list[str] = []
    for old, new in RENAMES.items():
        if old in raw:
            raw[new] = raw.pop(old)
            notes.append(f"{old} read as {new}")
    if "use_flash_attention_2" in raw:
        if _coerce(where, "use_flash_attention_2", raw.pop("use_flash_attention_2"), bool):
            raw["attn_implementation"] = "flash_attention_2"
    original = dict(raw)  # dialect markers (simpo_gamma, gamma_beta_ratio) for the resolver
    raw.pop("simpo_gamma", None)

    train, evals, data_notes = _dataset_sources(where, raw)
    notes += data_notes
    for key in DATASET_FORMS + DATASET_COMPANIONS:
        raw.pop(key, None)

    sections = {"model": {}, "data": {}, "objective": {}, "run": {}, "training": {}}
    for key, value in raw.items():
        if key in RUN_KEYS:
            sections["run"][key] = value
        elif key in MODEL_KEYS:
            sections["model"][key] = value
        elif key in OBJECTIVE_KEYS:
            sections["objective"][key] = value
        elif key in DATA_KEYS:
            sections["data"][key] = value
        else:
            sections["training"][key] = value
    # Keys that both TrainingArguments and we would claim go to us; none overlap today.
    model = _build(where, ModelArgs, sections["model"])
    data = _build(where, DataArgs, sections["data"])
    data.train_datasets, data.eval_datasets = train, evals
    objective = _resolve_objective(where, original, _build(where, ObjectiveArgs, sections["objective"]), notes)

    training_values = {**TRAINING_DEFAULTS, **sections["training"]}
    hints = {f.name: f.type for f in dataclasses.fields(TrainingArguments)}
    training_values = {k: _coerce(where, k, v, hints[k]) for k, v in training_values.items()}
    if training_values.get("remove_unused_columns"):
        _fail(where, "remove_unused_columns must stay false: the collator needs the tokenized columns.")
    training_values["remove_unused_columns"] = False
    forced = set()
    if not _has_accelerator():
        if "dataloader_pin_memory" not in training_values:
            training_values["dataloader_pin_memory"] = False  # pinning needs a device to pin for
            forced.add("dataloader_pin_memory")
        # Without it, processes started by torchrun would not join one process group (gloo) and would
        # each train alone on all the data.
        if not training_values.get("use_cpu"):
            training_values["use_cpu"] = True
            forced.add("use_cpu")
    if (training_values.get("bf16") or training_values.get("fp16")) and not _has_accelerator():
        # Mixed precision asked for on a machine without a GPU: train on the CPU under autocast
        # rather than refuse; transformers would stop with "doesn't support bf16/gpu".
        if training_values.get("fp16"):
            _fail(where, "fp16 needs a CUDA GPU; on this machine use bf16 (CPU autocast) or neither.")
        training_values["use_cpu"] = True
        notes.append("bf16 without a GPU: CPU training under bf16 autocast")
    if training_values.get("deepspeed"):
        training_values["deepspeed"] = _deepspeed(where, training_values["deepspeed"])
    try:
        training = TrainingArguments(**training_values)
    except (ValueError, TypeError, ImportError) as e:
        _fail(where, f"training arguments rejected by transformers: {e}")
    _validate(where, model, data, objective, training)
    run = _build(where, RunArgs, sections["run"])
    return Config(model=model, data=data, objective=objective, training=training, run=run, source=where, notes=notes,
                  forced=forced)


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


def load_config(path: str | None, argv: list[str] | None = None) -> Config:
    """Read YAML (optional) and `--key value` overrides into a resolved Config."""
    raw = read_yaml(path) if path else {}
    where = str(path) if path else "command line"
    if path:
        _check_aliases(str(path), raw)
        for key in raw:
            if key not in VALID_KEYS:
                _fail(str(path), f"unknown key '{key}'.{_suggest(key)}")
    overrides = parse_overrides(argv or [])
    _check_aliases("command line", overrides)
    for key in overrides:
        if key not in VALID_KEYS:
            _fail("command line", f"unknown option '--{key}'.{_suggest(key)}")
    _check_values("command line", overrides)  # here, so that a bad value is blamed on the command line
    return build_config(merge_overrides(raw, overrides), where)


# ---------------------------------------------------------------------------------------------
# Explaining and saving


def loss_formula(cfg: Config) -> str:
    o, spec = cfg.objective, cfg.method
    pref = formula(o.method, o.loss_type, Hyper.from_objective(o))
    nll = f" + {o.nll_weight:g}·NLL({'prompt + chosen' if spec.nll_span == 'prompt+completion' else 'chosen'})" if o.nll_weight else ""
    where = LOSSES[o.loss_type].where
    return f"L = {pref}{nll}{f'  where {where}' if where else ''}"


def explain(cfg: Config) -> str:
    """The resolved objective, as printed by `prefopt config explain` and at the start of `train`."""
    o, spec = cfg.objective, cfg.method
    rows = [
        ("method", f"{o.method} — {spec.title} [{spec.paper}]"),
        ("loss", o.loss_type),
        ("formula", loss_formula(cfg)),
    ]
    allowed = takes(o.method, o.loss_type)
    for name, f in HYPERPARAMETERS.items():
        if name not in allowed:
            continue
        if name == "gamma_beta_ratio":  # the margin as the paper states it too
            rows.append(("γ (absolute)", f"{o.gamma_beta_ratio * o.beta:g}"))
        rows.append((spec.labels.get(name, f.metadata["label"]), f"{getattr(o, name):g}"))
    rows += [
        ("NLL weight", f"{o.nll_weight:g}" + (f" (over {spec.nll_span})" if o.nll_weight else " (no NLL term)")),
        ("log-probs", f"{cfg.reduction} over completion tokens"),
    ]
    if o.diversity_weight:
        rows.append(("diversity", f"weight {o.diversity_weight:g}, alpha {o.diversity_alpha:g}"))
    m, d, t = cfg.model, cfg.data, cfg.training
    rows += [
        ("model", m.model_name_or_path or "(built-in demo)"),
        ("train data", ", ".join(f"{s.path}[{s.split}]" for s in d.train_datasets) or "(built-in demo)"),
        ("eval data", ", ".join(f"{s.path}[{s.split}]" for s in d.eval_datasets)
         or (f"{d.test_split_size:g} of train held out" if d.test_split_size else "none")),
        ("lengths", f"max_length {d.max_length}, max_prompt_length {d.max_prompt_length}"),
        ("batch", f"{t.per_device_train_batch_size} per device × {t.gradient_accumulation_steps} accumulation"),
        ("learning rate", f"{t.learning_rate:g} ({_plain(t.lr_scheduler_type)}, warmup {t.warmup_steps:g})"),
        ("output_dir", t.output_dir),
    ]
    if m.use_peft:
        rows.append(("LoRA", f"r {m.lora_r}, alpha {m.lora_alpha}, dropout {m.lora_dropout}, "
                             f"targets {m.lora_target_modules or 'default'}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    if cfg.notes:
        lines.append("  read as:")
        lines += [f"    - {n}" for n in cfg.notes]
    return "\n".join(lines)


def _plain(v):
    """YAML-safe copy: enums become their values."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, enum.Enum):
        return v.value
    return v


def resolved_dict(cfg: Config) -> dict:
    """The canonical form of the config: loading it again gives the same run."""
    plain = _plain

    out: dict = {}
    for section in (cfg.model, cfg.objective):
        out.update({k: plain(v) for k, v in dataclasses.asdict(section).items()})
    data = dataclasses.asdict(cfg.data)
    sources = data.pop("train_datasets") + data.pop("eval_datasets")
    out.update(data)
    keep = ("path", "split", "name", "data_dir", "data_files", "columns", "keep_fraction")
    out["datasets"] = [{k: s[k] for k in keep if s[k] is not None} | ({"fraction": s["mix_share"]} if s["mix_share"] is not None else {})
                       for s in sources]
    if not out["datasets"]:
        del out["datasets"]
    # the dataclass defaults, not a second TrainingArguments: building one sets up devices again,
    # which under torchrun takes this process out of the process group
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(TrainingArguments)}
    defaults = {k: getattr(v, "value", v) for k, v in defaults.items()}
    spellings = {alias for canonical, group in ALIASES.items() for alias in group if alias != canonical}
    for k, v in cfg.training.to_dict().items():
        if k not in TRAINING_KEYS or k in spellings or k in cfg.forced:
            continue
        if isinstance(v, str) and v.startswith("<") and v.endswith(">"):  # a token to_dict() masked
            continue
        derived = k in DERIVED_BY_TRANSFORMERS or (not v and not defaults.get(k))  # "" vs [], None vs {}
        if k in TRAINING_DEFAULTS or (v != defaults.get(k) and not derived):
            out[k] = plain(v)
    return out


# Set by TrainingArguments itself when left unset (written back, they would pin this machine's choice)
DERIVED_BY_TRANSFORMERS = {"disable_tqdm", "accelerator_config", "logging_dir"}


def save_resolved(cfg: Config, path: str | Path):
    Path(path).write_text("# prefopt resolved config\n" + yaml.safe_dump(resolved_dict(cfg), sort_keys=False))
