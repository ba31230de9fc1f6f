"""What a TRL 1.16 `CPOTrainer`/`ORPOTrainer` call means in prefopt's terms.

    refuse(kind, args, given)               what TRL accepts and prefopt cannot honour, named
    cfg = config_of(kind, args, model_name)    the objective (TRL's semantics) and data keys → `Config`
    pairs, report = tokenized(ds, "train_dataset", tokenizer, cfg)   prefopt's data path
    pairs, report = data.prepare_dataset(ds, name, tokenizer, cfg.data)   (what `tokenized` ends in)

The objective is read by `config.build_config` from TRL's own spellings, so the dialect rules
apply as to a TRL YAML: loss_type sigmoid/hinge/ipo is CPO with NLL weight `cpo_alpha`; simpo is
SimPO's loss with NLL weight `cpo_alpha` (CPO-SimPO at TRL's default 1.0); `simpo_gamma` is
absolute (γ/β = simpo_gamma / beta); `alpha` shapes the reward of every loss; ORPO's `beta` is λ,
with NLL weight 1. Where TRL ignores a value (label smoothing with hinge or ipo,
max_completion_length for a decoder-only model) it is ignored here too, with a warning.
"""

import dataclasses
import warnings

from datasets import Dataset

from ..config import Config, DatasetSource, build_config
from ..errors import PrefoptError
from ..data import prepare_dataset

SMOOTHED = ("sigmoid", "simpo")  # the loss types TRL applies label smoothing to


def refuse(kind: str, args, given: dict):
    """Stop on an argument TRL takes that prefopt cannot honour, naming it. `given`: the trainer's
    other arguments by name."""
    who = f"{kind}Trainer"
    fixes = {
        "data_collator": "prefopt collates its own token ids (packed, shared or padded rows) and scores them with its "
                         "fused head; remove data_collator",
        "model_init": "pass the model (an object or its id) as `model`; hyperparameter search is not offered",
        "preprocess_logits_for_metrics": "prefopt never forms the [batch, length, vocabulary] logits; remove it "
                                         "(compute_metrics receives the mean chosen and rejected logits, as in TRL)",
    }
    for name, fix in fixes.items():
        if given.get(name) is not None:
            raise PrefoptError(f"{who}: {name}: {fix}.")
    if given.get("train_dataset") is None:
        raise PrefoptError(f"{who}: train_dataset is required (a datasets.Dataset of prompt/chosen/rejected rows).")
    for name in ("train_dataset", "eval_dataset"):
        ds = given.get(name)
        if isinstance(ds, dict):
            raise PrefoptError(f"{who}: {name} is a dict of {len(ds)} datasets; prefopt evaluates one set: pass one "
                               "datasets.Dataset (datasets.concatenate_datasets joins several).")
        if ds is not None and not isinstance(ds, Dataset):
            raise PrefoptError(f"{who}: {name} is a {type(ds).__name__}; pass a datasets.Dataset (an IterableDataset "
                               "or a torch dataset is not read: prefopt tokenizes and checks every row first).")
    if args.is_encoder_decoder:
        raise PrefoptError(f"{who}: is_encoder_decoder=True: prefopt trains decoder-only (causal) language models.")
    model = given.get("model")
    if args.model_init_kwargs is not None and not isinstance(model, str):
        raise PrefoptError(f"{who}: model_init_kwargs is for a model given by id; this model is already loaded. "
                           "Remove model_init_kwargs (as TRL also refuses it).")
    if model is not None and not isinstance(model, str) and getattr(getattr(model, "config", None),
                                                                      "is_encoder_decoder", False):
        raise PrefoptError(f"{who}: model is an encoder-decoder ({type(model).__name__}); prefopt trains decoder-only "
                           "(causal) language models.")
    if args.use_liger_kernel:
        raise PrefoptError(f"{who}: use_liger_kernel: prefopt's fused head already scores without the full logits, "
                           "and Liger's patched forward would bypass it; set use_liger_kernel=False.")
    tokenizer = given.get("processing_class")
    if tokenizer is not None and not callable(getattr(tokenizer, "apply_chat_template", None)) \
            or tokenizer is not None and not hasattr(tokenizer, "pad_token_id"):
        raise PrefoptError(f"{who}: processing_class is a {type(tokenizer).__name__}; prefopt takes a text "
                           "tokenizer (PreTrainedTokenizerBase).")


def objective_keys(kind: str, args) -> dict:
    """TRL's objective fields as a TRL YAML would spell them, for `build_config`."""
    if kind == "ORPO":
        return {"method": "orpo", "beta": args.beta}
    if args.loss_type not in ("sigmoid", "hinge", "ipo", "simpo"):
        raise PrefoptError(f"CPOConfig: loss_type {args.loss_type!r} is not one of TRL's: sigmoid, hinge, ipo, simpo, "
                           "alphapo.")
    keys = {"loss_type": args.loss_type, "beta": args.beta, "cpo_alpha": args.cpo_alpha, "alpha": args.alpha}
    if args.loss_type == "simpo":
        keys["simpo_gamma"] = args.simpo_gamma
    if args.loss_type in SMOOTHED:
        keys["label_smoothing"] = args.label_smoothing
    elif args.label_smoothing:
        warnings.warn(f"CPOConfig: loss_type {args.loss_type} takes no label smoothing; label_smoothing "
                      f"{args.label_smoothing:g} is ignored (as TRL ignores it).", stacklevel=4)
    return keys


def config_of(kind: str, args, model_name: str | None) -> Config:
    """prefopt's `Config` for this trainer: TRL's objective and data fields read as a TRL YAML's,
    with `args` itself as the training arguments."""
    if args.max_completion_length is not None:
        warnings.warn(f"{kind}Config: max_completion_length {args.max_completion_length} is ignored for a "
                      "decoder-only model, as TRL ignores it; max_length caps prompt + completion.", stacklevel=4)
    raw = {
        **objective_keys(kind, args),
        "output_dir": args.output_dir, "report_to": "none",  # (a placeholder: `args` replaces it below)
        "max_length": 512 if args.max_length is None else args.max_length,
        "preprocessing_num_workers": args.dataset_num_proc,
        "layout": getattr(args, "layout", "packed"), "max_dropped_share": getattr(args, "max_dropped_share", 0.1),
        "disable_dropout": args.disable_dropout, "trust_remote_code": args.trust_remote_code,
        "dtype": "auto",  # from_pretrained's default in transformers 5, which TRL leaves it to
        "generate_during_eval": args.generate_during_eval,
        "eos_cleanup": False,  # TRL trains a completion's text as its template renders it
    }
    if model_name is not None:
        raw["model_name_or_path"] = model_name
    if args.model_init_kwargs:
        kwargs = dict(args.model_init_kwargs)
        quantized = [k for k in ("quantization_config", "load_in_4bit", "load_in_8bit") if k in kwargs]
        if quantized:  # (prefopt's own keys for it are not fields of TRL's config)
            raise PrefoptError(f"{kind}Config: model_init_kwargs.{quantized[0]}: the drop-in does not quantize a model "
                               "given by id; load it with from_pretrained(..., quantization_config=...) and pass the "
                               "model object (with peft_config for QLoRA), or use `prefopt train` with load_in_4bit.")
        if "dtype" in kwargs or "torch_dtype" in kwargs:
            raw.pop("dtype")
        raw["model_init_kwargs"] = kwargs
    where = f"{kind}Config"
    cfg = build_config(raw, where)
    return dataclasses.replace(cfg, training=args, source=where)


def tokenized(ds: Dataset | None, name: str, tokenizer, cfg: Config) -> tuple[Dataset | None, dict | None]:
    """A TRL dataset (plain strings, conversations, or an implicit prompt) through prefopt's data
    path: rows normalised, rendered, tokenized, degenerate pairs dropped and counted (refused past
    `max_dropped_share`). Rows are named `name row N` in every message."""
    if ds is None:
        return None, None
    missing = [c for c in ("chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise PrefoptError(f"{name}: no column {' or '.join(missing)} (columns: {', '.join(ds.column_names)}); a "
                           "preference dataset holds chosen and rejected, and a prompt unless the answers share it.")
    if len(ds) == 0:
        raise PrefoptError(f"{name}: the dataset holds no rows.")
    return prepare_dataset(ds, name, tokenizer, cfg.data)


def described(cfg: Config, train: Dataset, evals: Dataset | None, model) -> Config:
    """`cfg` naming the in-memory datasets and the model (for `explain` and the evaluation checks)."""
    def source(name, ds):
        return [DatasetSource(path=name, split=f"{len(ds)} rows")] if ds is not None else []

    name = model if isinstance(model, str) else \
        f"{type(model).__name__} ({getattr(getattr(model, 'config', None), '_name_or_path', '') or 'given'})"
    data = dataclasses.replace(cfg.data, train_datasets=source("train_dataset", train),
                               eval_datasets=source("eval_dataset", evals))
    return dataclasses.replace(cfg, data=data, model=dataclasses.replace(cfg.model, model_name_or_path=name))
