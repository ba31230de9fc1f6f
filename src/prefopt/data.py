"""Preference data: read, mixed, split, normalised, templated, tokenized, truncated and reported.

    prepared = prepare(cfg, tokenizer)          # installs cfg.data.chat_template; token ids per pair + report
    print(format_report(prepared.report))
    write_report(prepared.report, cfg.training.output_dir)
    pairs, report = prepare_dataset(ds, "train_dataset", tokenizer, cfg.data)   # one in-memory Dataset

This module is the entry; the steps live one per module, each handing the next the columns its
docstring states:

    sources      a file, folder or Hub dataset → chosen, rejected (prompt) as read + source, row; mixed; held out
    rows         → the normalised rows: prompt, chosen, rejected (all text or all chat), source, row
    templates    the chat template installed on the tokenizer; a chat row → prompt, chosen, rejected text, in
                 the completion_layout (trl | simpo_repo), with an empty system turn where asked and taken
    tokens       normalised rows → prompt_ids, chosen_ids, rejected_ids, length, source, row (pairs kept)
                 + every row's drop reason and truncation flags
    report       those flags → the data report; a split with too many pairs dropped refused
    fingerprint  the datasets-cache key of every map, which hashes the source of all of these modules

In (`prepare`): the config and the tokenizer (its chat template installed here, from
`cfg.data.chat_template`). Out: `Prepared`: per split the kept pairs, columns `source` (str),
`row` (int), `prompt_ids`, `chosen_ids`, `rejected_ids` (list[int]), `length` (int), which the
collator reads, and the report (with a note where an empty system turn was asked for and the
template takes none). `prepare` refuses a split with more than `max_dropped_share` of
its pairs dropped (or none left), and training data smaller than one optimizer step.
"""

from dataclasses import dataclass

from datasets import Dataset

from .config import Config, DataArgs, DatasetSource
from .errors import PrefoptError
from .report import check_dropped, format_report, split_report, write_report
from .rows import PAIR, SCHEMAS, column_kind, concatenate, normalise
from .sources import hold_out, load_source, mix
from .templates import insert_note, setup_chat_template
from .tokens import tokenize

# what the rest of prefopt and the tests import from here
__all__ = ["SCHEMAS", "Prepared", "format_report", "load_raw", "normalise", "prepare", "prepare_dataset",
           "setup_chat_template", "tokenize_pairs", "write_report"]


def load_raw(data: DataArgs, seed: int) -> tuple[Dataset, Dataset | None]:
    """Load, select, mix and split `data`'s sources into (train, eval).

    Rows come back normalised (`normalise`): explicit `prompt`/`chosen`/`rejected`, plus `source`
    ("path[split]") and `row` (index in that source). Other columns are dropped: nothing downstream
    reads them, and sources with different extra columns could not be concatenated.
    `test_split_size` holds rows out of train (seeded with `seed`), appended to any explicit eval.
    """
    if not data.train_datasets:
        raise PrefoptError("no training data given: name a dataset with `datasets:`, `dataset_mixer:`, "
                           "`dataset_mixture:`, `dataset_name:` or `dataset:` (LLaMA-Factory's, with dataset_dir).")
    train = _load_split(data.train_datasets, data, train=True)
    evals = _load_split(data.eval_datasets, data, train=False) if data.eval_datasets else None
    if data.test_split_size:
        train, held_out = hold_out(train, data.test_split_size, seed)
        evals = held_out if evals is None else concatenate([evals, held_out])
    return train, evals


def _load_split(sources: list[DatasetSource], data: DataArgs, train: bool) -> Dataset:
    parts = mix(sources, [load_source(s, data.column_mapping, train) for s in sources])
    parts = [normalise(p, data.preprocessing_num_workers) for p in parts if len(p)]
    if not parts:
        names = ", ".join(f"{s.path}[{s.split}]" for s in sources)
        raise PrefoptError(f"{names}: no {'training' if train else 'evaluation'} rows left; check that the files "
                           "hold rows and that keep_fraction/fraction are not too small.")
    return concatenate(parts)


@dataclass
class Prepared:
    """Tokenized pairs (`source`, `row`, `prompt_ids`, `chosen_ids`, `rejected_ids`, `length`) per split."""

    train: Dataset
    eval: Dataset | None
    report: dict  # {"train": split report, "eval": split report or None}, JSON-able


def prepare(cfg: Config, tokenizer) -> Prepared:
    """Install `cfg.data.chat_template` on `tokenizer`, then load, normalise and tokenize both splits.

    The template comes first because it and the EOS it may set shape the token ids; a caller that
    installed it already loses nothing (`setup_chat_template` is idempotent). Refuses a split with
    more than `max_dropped_share` of its pairs dropped (or none left), and training data smaller
    than one optimizer step.
    """
    setup_chat_template(tokenizer, cfg.data.chat_template)
    train_raw, eval_raw = load_raw(cfg.data, cfg.training.seed)
    train, train_report = tokenize_pairs(train_raw, tokenizer, cfg.data)
    evals, eval_report = tokenize_pairs(eval_raw, tokenizer, cfg.data) if eval_raw is not None else (None, None)
    for split, report in (("train", train_report), ("eval", eval_report)):
        if report is not None:
            check_dropped(split, report, cfg.data.max_dropped_share)
    t = cfg.training
    step = t.per_device_train_batch_size * t.gradient_accumulation_steps * t.world_size
    if len(train) < step:
        raise PrefoptError(
            f"train: {len(train)} pairs, fewer than one optimizer step takes (per_device_train_batch_size "
            f"{t.per_device_train_batch_size} × gradient_accumulation_steps {t.gradient_accumulation_steps} × "
            f"{t.world_size} processes = {step}); add data, or lower per_device_train_batch_size or "
            "gradient_accumulation_steps."
        )
    return Prepared(train=train, eval=evals, report={"train": train_report, "eval": eval_report})


def tokenize_pairs(ds: Dataset, tokenizer, data: DataArgs) -> tuple[Dataset, dict]:
    """Normalised rows → `prompt_ids`, `chosen_ids`, `rejected_ids` (list[int]), `length` + `source`, `row`.

    The model sees prompt_ids + chosen_ids and prompt_ids + rejected_ids; the loss covers the
    completion part. Returns the kept pairs and this split's report (see `prepare`).
    """
    kept, marks = tokenize(ds, tokenizer, data)
    report = split_report(marks, data)
    note = insert_note(tokenizer, data) if column_kind(ds.features["chosen"]) == "chat" else None
    if note:
        report["notes"] = [note]
    return kept, report


def prepare_dataset(ds: Dataset, name: str, tokenizer, data: DataArgs) -> tuple[Dataset, dict]:
    """An in-memory dataset of preference rows (as `rows.normalise` reads them; other columns are
    dropped) → its kept pairs and report, as `prepare` makes a split's: rows named `name row N` in
    every message, normalised, tokenized, and refused past `data.max_dropped_share` dropped. The
    chat template is the tokenizer's as it stands."""
    ds = ds.select_columns([c for c in PAIR if c in ds.column_names])
    ds = ds.add_column("source", [name] * len(ds)).add_column("row", list(range(len(ds))))
    pairs, report = tokenize_pairs(normalise(ds, data.preprocessing_num_workers), tokenizer, data)
    check_dropped(name, report, data.max_dropped_share)
    return pairs, report
