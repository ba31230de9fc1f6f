"""The canonical keys: prefopt's own sections of a config as dataclasses, how a written value is
read as a key's type (`_coerce`, `_build`) and written back plain (`_plain`).

    ModelArgs · DataArgs (of DatasetSource) · ObjectiveArgs · RunArgs   (+ transformers'
    TrainingArguments, joined in `config.Config`)

These are the names a resolved `prefopt_config.yaml` holds; other tools' spellings of them are
`dialects`'. `ObjectiveArgs` is built from `losses.Hyper`, so a new hyperparameter is a key here
without an edit. No transformers import: `dialects` reads into these without loading it.
"""

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import PrefoptError
from .losses import METHODS, Hyper


def _fail(where: str, message: str):
    raise PrefoptError(f"{where}: {message}")


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
    bnb_4bit_quant_storage: str | None = field(
        default=None, metadata={"help": "dtype the packed 4-bit weights are stored in (None: uint8); as the "
                                        "compute dtype for FSDP/ZeRO-3 sharding of a QLoRA model."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA: scale alpha / sqrt(r)."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA (magnitude + direction)."})
    lora_task_type: str = field(default="CAUSAL_LM", metadata={"help": "PEFT task type; prefopt trains CAUSAL_LM."})
    lora_target_parameters: list[str] | None = field(
        default=None, metadata={"help": "Parameter names to adapt directly (PEFT target_parameters, e.g. MoE "
                                        "expert weights that are not nn.Linear)."}
    )
    model_init_kwargs: dict | None = field(
        default=None, metadata={"help": "TRL's extra from_pretrained arguments; its dtype, attn_implementation, "
                                        "revision and trust_remote_code are read as those keys."}
    )


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
    # LLaMA-Factory's rows: {formatting: sharegpt|alpaca, columns, tags} (None: detected from the columns)
    format: dict | None = None


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
    data_format: str | None = field(
        default=None, metadata={"help": "The rows' format: sharegpt (LLaMA-Factory's conversations with from/value) "
                                        "or None (detected from the columns)."}
    )
    completion_layout: str = field(
        default="trl",
        metadata={"help": "trl (the completion is the answer after the prompt's generation prompt) or simpo_repo "
                          "(the SimPO repository's run_simpo.py: the assistant header is part of the completion)."},
    )
    auto_insert_empty_system_msg: bool | None = field(
        default=None, metadata={"help": "Give chat rows without a system turn an empty one, where the template takes "
                                        "a system role (None: true for completion_layout simpo_repo, else false)."}
    )
    eos_cleanup: bool = field(
        default=True, metadata={"help": "End each completion at its first EOS (a template's EOS + whitespace + EOS "
                                        "trains one EOS); false: the rendered text as TRL trains it."}
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
             if f.metadata["nullable"] else (f.name, float, field(default=f.default, metadata={"help": f.metadata["help"]}))
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
        ("logprob_keep_mb", int, field(
            default=2048, metadata={"help": "MB of the LM head's softmax the fused head holds at once instead of "
                                            "recomputing it: a group of whole pairs whose gradient is formed in "
                                            "forward, or (a pair larger than this) the rows kept to backward "
                                            "(0: always recompute, the least memory)."})),
    ]


ObjectiveArgs = dataclasses.make_dataclass("ObjectiveArgs", _objective_fields())
ObjectiveArgs.__module__ = __name__


@dataclass
class RunArgs:
    """What to do with what an earlier run left in output_dir, and what to watch while training: not part of
    the run's identity (a resume may change them)."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start afresh in an output_dir that holds another run (its checkpoints "
                                         "and metrics.jsonl are deleted) instead of refusing or resuming."}
    )
    generate_during_eval: bool = field(
        default=False, metadata={"help": "At each evaluation, greedy answers to held-out prompts, written to "
                                         "eval_generations.jsonl and as a table to W&B / TensorBoard (TRL's key)."}
    )
    eval_generation_prompts: int = field(
        default=4, metadata={"help": "How many prompts: the first distinct ones of the evaluation split, the same "
                                     "at every evaluation."}
    )
    eval_generation_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Most tokens per answer (None: max_completion_length, else up to max_length "
                                        "in all, as TRL, else 256)."}
    )



SELECTIONS = ("best_worst", "best_random")
ENGINES = ("auto", "transformers", "vllm")


@dataclass
class PairsArgs:
    """`prefopt pairs` (and `iterate`): the policy's own answers, scored, made into pairs. The policy is
    model_name_or_path, the prompts the data keys' `prompt` column; training ignores these keys."""

    reward_model: str | None = field(
        default=None, metadata={"help": "Local folder (or Hub id) of a sequence-classification reward model that "
                                        "scores each answer."})
    reward_function: str | None = field(
        default=None, metadata={"help": "module:function (or path/file.py:function) called as fn(prompt, answer, row) "
                                        "-> number, for answers that can be checked."})
    reward_trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the reward model's own code from its repository (ArmoRM and the like)."})
    num_samples: int | None = field(
        default=None, metadata={"help": "Answers sampled per prompt, one per seed (None: as many as seeds lists, "
                                        "else 5)."})
    seeds: list[int] | None = field(
        default=None, metadata={"help": "One seed per answer (None: seed, seed+1, ... num_samples of them)."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling: the smallest set of tokens with this mass."})
    max_new_tokens: int = field(default=512, metadata={"help": "Most tokens per answer."})
    selection: str = field(
        default="best_worst", metadata={"help": "best_worst: highest-scored answer chosen, lowest rejected; "
                                                "best_random: highest chosen, a random lower-scored one rejected."})
    min_score_gap: float = field(
        default=0.0, metadata={"help": "A prompt whose chosen and rejected scores differ by less than this yields "
                                       "no pair (ties never yield one)."})
    min_chosen_score: float | None = field(
        default=None, metadata={"help": "A prompt whose best answer scores below this yields no pair (with a "
                                        "pass/fail scorer, 1: only answers that passed are chosen; None: any)."})
    output: str | None = field(
        default=None, metadata={"help": "The pairs file, JSON Lines (None: output_dir/pairs.jsonl); its report is "
                                        "written beside it (.report.json)."})
    engine: str = field(
        default="auto", metadata={"help": "auto (vllm where it is installed and a GPU is present, else transformers), "
                                          "transformers or vllm."})
    prompt_format: str = field(
        default="auto", metadata={"help": "auto (chat where the policy has a chat template: a text prompt becomes one "
                                          "user turn and the pairs chat rows), chat, or text (prompt and answer "
                                          "concatenated, as training reads text rows)."})
    vllm_gpu_memory_utilization: float = field(
        default=0.6, metadata={"help": "engine vllm: the share of the GPU's memory vLLM takes; the rest holds the "
                                       "reward model."})
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts generated for at once."})
    reward_batch_size: int = field(default=16, metadata={"help": "Answers scored at once by a reward model."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts (None: all)."})


# Where prefopt's defaults differ from TrainingArguments' (they follow TRL's CPOConfig, except
# bf16 and gradient checkpointing, which stay off unless asked for: CPUs are first-class here).
TRAINING_DEFAULTS = {
    "output_dir": "outputs/prefopt",
    "learning_rate": 1e-6,
    "logging_steps": 10,
    "remove_unused_columns": False,
    "report_to": "none",
    # transformers keeps every checkpoint; two are the newest and, should it be damaged, the one
    # before it (rotation never removes the newest complete one). `save_total_limit: null` keeps all.
    "save_total_limit": 2,
}

# ---------------------------------------------------------------------------------------------
# Reading a value as its field's type


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


def _plain(v):
    """YAML-safe copy: enums become their values."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, enum.Enum):
        return v.value
    return v

