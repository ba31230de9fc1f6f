"""Preference data: load, mix, split, normalise, template, tokenize, truncate, report.

    added = setup_chat_template(tokenizer, cfg.data.chat_template)  # True: resize the embeddings
    prepared = prepare(cfg, tokenizer)                               # token ids per pair + report
    print(format_report(prepared.report))
    write_report(prepared.report, cfg.training.output_dir)

Rows keep TRL 1.16's conventions (`CPOTrainer.tokenize_row`, DESIGN decision 5), so the same
inputs give the same token ids: conversations are rendered with the generation prompt, so the
assistant header is part of the prompt; prompt and prompt+completion are tokenized together;
BOS once at the start, EOS after each completion unless already there; an over-long pair loses
completion tokens. Beyond TRL: optional prompt/completion caps; a completion never ends in a
second EOS (ChatML's `<|im_end|>\n` with `<|im_end|>` as EOS ends at the first); and pairs that
would teach nothing are dropped and counted rather than trained on: a blank completion, one cut
to nothing, chosen equal to rejected, a pair seen before in the split. More than
`max_dropped_share` of a split dropped stops the run. Refused where TRL would train on them: a
system, user or tool turn inside an answer (every message of an answer is scored), a role the
chat template does not know, and a held-out share of less than one pair.
"""

import codecs
import csv
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import (
    Dataset,
    DatasetDict,
    Features,
    LargeList,
    List,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher
from jinja2 import TemplateError, TemplateSyntaxError

from .config import Config, DataArgs, DatasetSource
from .errors import PrefoptError

PAIR = ("prompt", "chosen", "rejected")
PROVENANCE = ("source", "row")
LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
SCHEMAS = (
    "(a) prompt/chosen/rejected as plain strings; (b) prompt/chosen/rejected as chat message lists "
    "[{role, content}, ...], chosen and rejected holding only the assistant's messages; (c) chosen/rejected alone, "
    "whose shared beginning (text, or leading messages) is the prompt"
)
KIND_NAMES = {"text": "a plain string", "chat": "a chat message list"}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# The roles of transformers' chat message format; `tool` (a tool's result) is rendered by tool-use
# templates. A template may accept more (Llama 3.1's `ipython`): see `_template_roles`.
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
SHAREGPT_FIX = ("rename the keys from → role and value → content, and the roles human → user and gpt → assistant "
                "(system stays system); prompt, chosen and rejected are each a list of {role, content} messages")
# Why a pair is dropped, in order of precedence, and what to change.
DROP_FIXES = {
    "empty_completion": "fill in or remove the blank answers",
    "truncated_to_nothing": "raise max_length, or set max_prompt_length so that long prompts are cut instead",
    "chosen_equals_rejected": "remove pairs whose answers are the same (raise max_completion_length or max_length "
                              "if they differ only after the cut)",
    "duplicate_pair": "remove the repeated pairs",
}
DROP_REASONS = tuple(DROP_FIXES)
TRUNCATION_FLAGS = tuple(f"{name}_truncated" for name in PAIR)


def _at(ds: Dataset, i: int) -> str:
    """Where row `i` of `ds` came from, for messages: 'data.jsonl[train] row 7'."""
    row = ds[i]
    return f"{row['source']} row {row['row']}"


def _common_prefix_len(a, b) -> int:
    """Length of the longest common prefix of two sequences (strings, id lists, message lists)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# ---------------------------------------------------------------------------------------------
# Loading and mixing


def load_raw(data: DataArgs, seed: int) -> tuple[Dataset, Dataset | None]:
    """Load, select, mix and split `data`'s sources into (train, eval).

    Rows come back normalised (`normalise`): explicit `prompt`/`chosen`/`rejected`, plus `source`
    ("path[split]") and `row` (index in that source). Other columns are dropped: nothing downstream
    reads them, and sources with different extra columns could not be concatenated.
    `test_split_size` holds rows out of train (seeded with `seed`), appended to any explicit eval.
    """
    if not data.train_datasets:
        raise PrefoptError("no training data given: name a dataset with `datasets:`, `dataset_mixer:` or `dataset_name:`.")
    train = _load_split(data.train_datasets, data, train=True)
    evals = _load_split(data.eval_datasets, data, train=False) if data.eval_datasets else None
    if data.test_split_size:
        train, held_out = _hold_out(train, data.test_split_size, seed)
        evals = held_out if evals is None else _concatenate([evals, held_out])
    return train, evals


def _load_split(sources: list[DatasetSource], data: DataArgs, train: bool) -> Dataset:
    parts = _mix(sources, [_load_source(s, data.column_mapping, train) for s in sources])
    parts = [normalise(p, data.preprocessing_num_workers) for p in parts if len(p)]
    if not parts:
        names = ", ".join(f"{s.path}[{s.split}]" for s in sources)
        raise PrefoptError(f"{names}: no {'training' if train else 'evaluation'} rows left; check that the files "
                           "hold rows and that keep_fraction/fraction are not too small.")
    return _concatenate(parts)


def _load_source(src: DatasetSource, mapping: dict[str, str] | None, train: bool) -> Dataset:
    """One source's split: its `columns`, its `keep_fraction` (train only), mapped and tagged."""
    label = f"{src.path}[{src.split}]"
    ds = _read(src)
    if src.columns is not None:
        missing = [c for c in src.columns if c not in ds.column_names]
        if missing:
            raise PrefoptError(f"{label}: columns {missing} are listed in `columns` but the dataset has only "
                               f"{ds.column_names}; fix the `columns` list.")
        ds = ds.select_columns(src.columns)
    if train and src.keep_fraction is not None:
        # alignment-handbook's dataset_mixer: the first int(f·n) rows, not a random sample
        ds = ds.select(range(int(src.keep_fraction * len(ds))))
    ds = _map_columns(ds, mapping or {}, label)
    missing = [c for c in ("chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise PrefoptError(
            f"{label}: no {' or '.join(missing)} column (columns found: {ds.column_names}). Accepted schemas: "
            f"{SCHEMAS}. If your columns have other names, map them, e.g. "
            "`column_mapping: {prompt: question, chosen: good_answer, rejected: bad_answer}`."
        )
    ds = ds.select_columns([c for c in PAIR if c in ds.column_names])
    return ds.add_column("source", [label] * len(ds)).add_column("row", list(range(len(ds))))


def _map_columns(ds: Dataset, mapping: dict[str, str], label: str) -> Dataset:
    """Rename the user's columns to prompt/chosen/rejected, all at once (so swaps work)."""
    renames = {}
    for target, column in mapping.items():
        if column in ds.column_names:
            renames[column] = target
        elif target not in ds.column_names:
            raise PrefoptError(f"{label}: column_mapping takes {target} from column '{column}', which this dataset "
                               f"does not have (columns found: {ds.column_names}); fix the mapping.")
    renames = {c: t for c, t in renames.items() if c != t}
    # A column already named like a target is replaced: the mapping says which column that role is.
    replaced = [t for t in renames.values() if t in ds.column_names and t not in renames]
    return ds.remove_columns(replaced).rename_columns(renames)


def _read(src: DatasetSource) -> Dataset:
    """The requested split of a local file, a local folder, or a Hub dataset."""
    path = Path(src.path).expanduser()
    if path.is_file():
        return _read_file(path, src)
    if path.is_dir():
        return _read_folder(path, src)
    if path.suffix.lower() in LOADERS or src.path.startswith(("/", ".", "~")):
        raise PrefoptError(f"{src.path}: no such file or folder; fix the dataset path.")
    return _read_hub(src)


def _builder(path: Path) -> str:
    if path.suffix.lower() not in LOADERS:
        raise PrefoptError(f"{path}: unsupported file type '{path.suffix}'; give a {', '.join(LOADERS)} file, a "
                           "folder (save_to_disk, or data files named after their split) or a Hub dataset id.")
    return LOADERS[path.suffix.lower()]


def _read_file(path: Path, src: DatasetSource) -> Dataset:
    builder = _builder(path)
    if src.split != "train":  # a single file is one split, named train
        raise _missing_split(src, ["train"])
    return _load_local(src, builder, data_files=str(path), split="train")


def _read_folder(path: Path, src: DatasetSource) -> Dataset:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        saved = load_from_disk(str(path))
        return _pick_split(saved if isinstance(saved, DatasetDict) else {"train": saved}, src)
    if src.data_dir is None and src.data_files is None:
        # `test_prefs.parquet` is split test_prefs: datasets' own split inference would miss it
        named = sorted(f for f in path.iterdir() if f.stem == src.split and f.suffix.lower() in LOADERS)
        if len(named) > 1:
            raise PrefoptError(f"{path}: {len(named)} files for split '{src.split}' ({', '.join(f.name for f in named)}); "
                               "keep one of them.")
        if named:
            return _load_local(src, _builder(named[0]), data_files=str(named[0]), split="train")
    return _pick_split(_load_local(src, str(path), data_dir=src.data_dir, data_files=src.data_files), src)


def _load_local(src: DatasetSource, builder: str, **kwargs):
    json_file = Path(kwargs["data_files"]) if builder == "json" else None
    if json_file is not None:
        _check_json(json_file, parse=False)
    if builder == "csv":
        kwargs.update(_csv_as_text(Path(kwargs["data_files"])))
    try:
        return load_dataset(builder, **kwargs)
    except (DatasetGenerationError, OSError, ValueError) as e:
        if json_file is not None:
            _check_json(json_file, parse=True)  # names the line, when one is at fault
        cause = e.__cause__ or e
        if "corresponds to no data" in str(cause):  # datasets' words for a split without rows
            raise _no_rows(kwargs["data_files"]) from None
        kind = builder if builder in LOADERS.values() else ", ".join(LOADERS)
        raise PrefoptError(f"{json_file or src.path}: could not be read ({type(cause).__name__}: {cause}); check "
                           f"that it is a complete, valid {kind} file (export it again if it was cut short).") from e


def _csv_as_text(path: Path) -> dict:
    """load_dataset options that read every column of a CSV as the text written in it. A CSV has
    no types: pandas would read a column of `007`, `12` as the ints 7, 12, and `NA`, `null` or a
    blank cell as missing. So a blank answer is "", dropped and counted like a blank JSON answer."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}  # the load itself then fails, and says so
    if not header or len(set(header)) < len(header):
        return {}  # no rows, or a repeated column name: left to the load's own message
    return {"features": Features({name: Value("string") for name in header}), "keep_default_na": False}


def _check_json(path: Path, parse: bool):
    """Refuse, naming the line, a JSON file that datasets' reader would crash on or report vaguely.

    A JSON document over several lines (an array; in a .json file, also an object) is left to the
    reader. In JSON Lines, every non-blank line must be UTF-8 and an object: a top-level `null`
    line crashes pyarrow's reader (a segfault, not an exception), so this cheap check runs before
    loading; `parse` also parses each line, to name the one a failed load tripped on.
    """
    rows = 0
    try:
        with path.open("rb") as f:
            for number, line in enumerate(f, 1):
                text = (line.removeprefix(codecs.BOM_UTF8) if number == 1 else line).strip()
                if not text:
                    continue
                if not rows and (text.startswith(b"[") or path.suffix.lower() == ".json"
                                 and text.startswith(b"{") and _json_line_problem(text, parse=True)):
                    return
                rows += 1
                problem = _json_line_problem(text, parse)
                if problem:
                    raise PrefoptError(f"{path} line {number}: {problem}. JSON Lines hold one object per line, "
                                       '{"prompt": ..., "chosen": ..., "rejected": ...}; fix or remove that line.')
    except OSError as e:
        raise PrefoptError(f"{path}: cannot be read ({e.strerror}); check that it is a readable file.") from None
    if not rows:
        raise _no_rows(path)


def _json_line_problem(line: bytes, parse: bool) -> str | None:
    """Why a line of JSON Lines is not an object; without `parse`, UTF-8 text that starts like one
    passes (pyarrow reads invalid UTF-8 into string columns unchecked)."""
    try:
        text = line.decode("utf-8")
        value = json.loads(text, parse_int=_int64) if parse or not text.startswith("{") else {}
    except UnicodeDecodeError as e:
        return f"not UTF-8 text ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.colno})"
    except ValueError as e:  # from _int64
        return str(e)
    return None if isinstance(value, dict) else f"not a JSON object but {_short(value)}"


def _int64(digits: str) -> int:
    """A JSON integer, if the reader can hold it (it stops at 64 bits without saying where)."""
    if not -2**63 <= int(digits) < 2**63:
        raise ValueError(f"the integer {digits} does not fit in 64 bits")
    return int(digits)


def _no_rows(path) -> PrefoptError:
    return PrefoptError(f"{path}: the file holds no rows; give a file with preference pairs in it.")


def _read_hub(src: DatasetSource) -> Dataset:
    try:
        return load_dataset(src.path, src.name, split=src.split, data_dir=src.data_dir, data_files=src.data_files)
    except Exception as e:  # network, authentication, unknown id/config/split: all reported the same way
        raise PrefoptError(
            f"{src.path}: could not be loaded from the Hugging Face Hub as split '{src.split}' "
            f"({type(e).__name__}: {e}). Check the dataset id, its config name and the split, or give a local file "
            f"({', '.join(LOADERS)}) or folder instead."
        ) from e


def _pick_split(splits, src: DatasetSource) -> Dataset:
    if src.split not in splits:
        raise _missing_split(src, list(splits))
    return splits[src.split]


def _missing_split(src: DatasetSource, found: list[str]) -> PrefoptError:
    return PrefoptError(
        f"{src.path}: no split '{src.split}' (splits found: {', '.join(found)}). Ask for one of those, or hold "
        "part of train out for evaluation instead, e.g. `dataset_splits: [train]` with `test_split_size: 0.1`."
    )


def _mix(sources: list[DatasetSource], parts: list[Dataset]) -> list[Dataset]:
    """TRL's `fraction`: shares normalised to 1; the largest mixture that oversamples no source."""
    shares = [s.mix_share for s in sources]
    if all(s is None for s in shares):
        return parts
    if any(s is None for s in shares) or any(s < 0 for s in shares) or sum(shares) == 0:
        raise PrefoptError(f"fraction is {shares} across {[f'{s.path}[{s.split}]' for s in sources]}; set a "
                           "non-negative fraction for every dataset of the mixture (not all zero), or for none.")
    weights = [s / sum(shares) for s in shares]
    total = min(len(p) / w for p, w in zip(parts, weights) if w > 0)
    return [p.select(range(round(w * total))) for p, w in zip(parts, weights)]


def _concatenate(parts: list[Dataset]) -> Dataset:
    """One dataset from normalised sources, which must share a schema (all text or all chat)."""
    first = parts[0]
    for part in parts[1:]:
        if _kind(part.features["chosen"]) != _kind(first.features["chosen"]):
            raise PrefoptError(
                f"{first[0]['source']} holds {KIND_NAMES[_kind(first.features['chosen'])]} per answer but "
                f"{part[0]['source']} holds {KIND_NAMES[_kind(part.features['chosen'])]}; datasets mixed into "
                "one split must use the same schema, so convert one of them."
            )
    try:
        return concatenate_datasets(parts)
    except ValueError as e:
        names = ", ".join(p[0]["source"] for p in parts)
        raise PrefoptError(f"{names}: cannot be combined ({e}). Give their messages the same keys "
                           "(e.g. only role and content).") from e


def _hold_out(train: Dataset, size: float, seed: int) -> tuple[Dataset, Dataset]:
    """`size` of train's rows held out: a share below 1, or a whole row count of 1 or more.

    A share that asks for less than one row is refused: no pair would be held out at that share,
    and datasets would round it up to one (more than the share of train, and an evaluation of one
    pair), neither of which is what was asked; a row count says exactly what is wanted.
    """
    n = len(train)
    if size >= 1 and size != int(size):
        raise PrefoptError(f"test_split_size {size:g}: a value of 1 or more is a number of pairs to hold out, so it "
                           "must be whole; give a whole number, or a share below 1.")
    if 0 < size < 1 and size * n < 1:
        raise PrefoptError(
            f"test_split_size {size:g} of {n} training pairs asks for {size * n:.2g} of a pair, less than one, so no "
            f"pair is held out for evaluation at that share. Give a share of at least 1/{n}, a number of pairs "
            "(test_split_size: 1 or more), or remove test_split_size to train without a held-out split."
        )
    test_size = int(size) if size >= 1 else size
    try:
        split = train.train_test_split(test_size=test_size, seed=seed)
    except ValueError as e:
        raise PrefoptError(f"test_split_size {size:g} cannot be held out of {len(train)} training rows ({e}); "
                           "use a share in (0, 1) or a smaller row count.") from e
    return split["train"], split["test"]


# ---------------------------------------------------------------------------------------------
# Schema


def _is_string(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _kind(feature) -> str | None:
    """'text' for a string column, 'chat' for a list of {role, content} string messages (or only
    empty lists, which are blank answers), else None.

    datasets reads a JSON column whose rows disagree in type (a string here, a list there) as a
    `Json` feature, which is neither.
    """
    if _is_string(feature):
        return "text"
    if not isinstance(feature, (List, LargeList)):
        return None
    message = feature.feature
    if isinstance(message, dict) and _is_string(message.get("role")) and _is_string(message.get("content")) \
            or message == Value("null"):
        return "chat"
    return None


def _value_kind(value) -> str | None:
    """`_kind` for one row's value."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and not any(_message_problem(m) for m in value):
        return "chat"
    return None


def _short(value) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)[:60]


def _describe(value) -> str:
    """What a value is, in the words of the accepted schemas."""
    if value is None:
        return "null (no value)"
    kind = _value_kind(value)
    if kind is not None:
        return KIND_NAMES[kind]
    if isinstance(value, list):
        k, problem = next((k, p) for k, m in enumerate(value) if (p := _message_problem(m)))
        return f"a list whose item {k} {problem}"
    if _is_sharegpt(value):
        return f"one message {_short(value)} written {{from, value}} (ShareGPT style), not a list of {{role, content}}"
    return f"the {type(value).__name__} {_short(value)}"


def _is_sharegpt(message) -> bool:
    """A message written ShareGPT's way, {from, value}, instead of {role, content}."""
    return (isinstance(message, dict) and message.get("role") is None and message.get("from") is not None
            and "value" in message)


def _message_problem(message) -> str | None:
    """Why `message` is not a chat message {role, content} with string values; None if it is one."""
    if not isinstance(message, dict):
        return f"is not a message {{role, content}} but {_short(message)}"
    if _is_sharegpt(message):
        return "is written {from, value} (ShareGPT style), not {role, content}"
    for key in ("role", "content"):
        if message.get(key) is None:
            return f"has no {key}"
        if not isinstance(message[key], str):
            return f"has {key} {_short(message[key])} ({type(message[key]).__name__}), not a string"
    return None


def _bad_column(ds: Dataset, column: str) -> PrefoptError:
    """The error for a column that is neither all strings nor all message lists, at the first row
    that shows it: one that differs from the rows before it, or row 0 when all are alike."""
    values = ds[column]
    kinds = [_value_kind(v) for v in values]
    first = next((i for i, kind in enumerate(kinds) if kind is not None), None)
    odd = 0 if first is None else next((i for i, kind in enumerate(kinds) if kind != kinds[first]), 0)
    earlier = f", but {_at(ds, first)} holds {KIND_NAMES[kinds[first]]}" if first is not None and first < odd else ""
    value = values[odd]
    if _is_sharegpt(value) or isinstance(value, list) and any(_is_sharegpt(m) for m in value):
        fix = f"prefopt reads chat messages as {{role, content}}: {SHAREGPT_FIX}."
    else:
        fix = ("A column must hold plain strings in every row, or chat message lists [{role, content}, ...] in every "
               "row; fix that row or remove it.")
    return PrefoptError(f"{_at(ds, odd)}: column '{column}' holds {_describe(value)}{earlier}. {fix} "
                        f"Accepted schemas: {SCHEMAS}.")


def normalise(ds: Dataset, num_proc: int | None = None) -> Dataset:
    """One non-empty source (with `source`/`row` columns) → explicit prompt/chosen/rejected.

    Accepted: explicit string or chat columns as they are; implicit prompt (chosen/rejected only),
    the shared beginning becomes the prompt; and TRL's special case, a string `prompt` beside chat
    answers, where the prompt is likewise taken from the conversations. Types are read from the
    column features (Arrow columns hold one type), so those checks cost nothing per row; rows are
    read only to name the one at fault, and to check conversations (`_check_chat_batch`).
    """
    kinds = {c: _kind(ds.features[c]) for c in PAIR if c in ds.column_names}
    for column, kind in kinds.items():
        if kind is None:
            raise _bad_column(ds, column)
    _check_no_nulls(ds)
    if kinds["chosen"] != kinds["rejected"]:
        raise PrefoptError(f"{_at(ds, 0)}: columns chosen and rejected differ in type (chosen is "
                           f"{KIND_NAMES[kinds['chosen']]}, rejected is {KIND_NAMES[kinds['rejected']]}); make both "
                           "plain strings or both chat message lists.")
    prompt_kind = kinds.get("prompt")
    if prompt_kind == "chat" and kinds["chosen"] == "text":
        raise PrefoptError(f"{_at(ds, 0)}: column prompt is a chat message list but chosen and rejected are plain "
                           "strings; give the answers as messages too ([{role: assistant, content: ...}]), or the "
                           "prompt as a string.")
    if prompt_kind == "text" and kinds["chosen"] == "chat":
        # TRL's rule: a string prompt beside conversations is a summary of them, not what the model sees
        ds = ds.remove_columns("prompt")
        prompt_kind = None
    if kinds["chosen"] == "chat":
        ds.map(_check_chat_batch, batched=True, num_proc=num_proc, fn_kwargs={"implicit": prompt_kind is None},
               desc="Checking conversations", new_fingerprint=_fingerprint(ds, "check", prompt_kind is None))
    if prompt_kind is None:
        ds = ds.map(_extract_prompt_batch, batched=True, num_proc=num_proc, desc="Extracting implicit prompts",
                    new_fingerprint=_fingerprint(ds, "extract"))
    return ds.select_columns([*PAIR, *PROVENANCE])


def _check_no_nulls(ds: Dataset):
    for column in PAIR:
        if column in ds.column_names:
            first = pc.index(pc.is_null(ds.with_format("arrow")[column]), True).as_py()
            if first >= 0:
                raise PrefoptError(f"{_at(ds, first)}: column '{column}' has no value (missing or null); fill it "
                                   "in or remove the row.")


def _check_chat_batch(batch: dict, implicit: bool):
    """Every message a {role, content} of strings; each non-empty answer ends with the assistant's
    reply and, once the prompt is taken out, holds nothing but the assistant's messages; an explicit
    prompt is not repeated in the answers.

    Every message of an answer is scored: a system or user turn there would be trained on as the
    model's own words. With an implicit prompt, the prompt is the messages chosen and rejected share
    (TRL's `extract_prompt`, `_prompt_end`), so multi-turn conversations that differ only in their
    final assistant messages keep working.
    """
    for i, (source, row) in enumerate(zip(batch["source"], batch["row"])):
        where = f"{source} row {row}"
        for column in PAIR:
            for k, message in enumerate(batch[column][i] if column in batch else []):
                problem = _message_problem(message)
                if problem:
                    fix = (SHAREGPT_FIX if _is_sharegpt(message)
                           else "every message needs a role and a content, both strings")
                    raise PrefoptError(f"{where}: column '{column}', message {k} {problem}; {fix}.")
        chosen, rejected = batch["chosen"][i], batch["rejected"][i]
        if not chosen or not rejected:
            continue  # an empty answer: dropped and counted when tokenizing
        for column, answer in (("chosen", chosen), ("rejected", rejected)):
            role = answer[-1]["role"]
            if role != "assistant":
                raise PrefoptError(f"{where}: the last message of '{column}' is from the {role}{_role_hint(role)}, "
                                   "not the assistant; each answer must end with the assistant's reply.")
        prompt = batch["prompt"][i] if not implicit else None
        if prompt and any(answer[:len(prompt)] == prompt for answer in (chosen, rejected)):
            raise PrefoptError(f"{where}: chosen or rejected repeats the prompt's messages, so the model would see "
                               "the prompt twice; keep only the replies in chosen and rejected, or drop the prompt "
                               "column to take it from the conversations.")
        start = _prompt_end(chosen, rejected) if implicit else 0
        for column, answer in (("chosen", chosen), ("rejected", rejected)):
            k = next((k for k in range(start, len(answer)) if answer[k]["role"] != "assistant"), None)
            if k is not None:
                raise _turn_in_answer(where, column, k, start, chosen, rejected, implicit)


def _turn_in_answer(where: str, column: str, k: int, start: int, chosen: list, rejected: list,
                    implicit: bool) -> PrefoptError:
    """The error for message `k` of `column`, not the assistant's, inside the answer (from `start`)."""
    role = (chosen if column == "chosen" else rejected)[k]["role"]
    head = (f"{where}: column '{column}', message {k} is from the {role}{_role_hint(role)}, inside the answer: every "
            "message of an answer is scored as the model's reply, so this turn would be trained on as the model's "
            "own words.")
    if not implicit:
        return PrefoptError(f"{head} Move it, and the messages before it, into the prompt column (the conversation "
                            "up to the answer), keeping only the assistant's messages in chosen and rejected.")
    d = _common_prefix_len(chosen, rejected)
    shared = {0: "none", 1: "the first message"}.get(start, f"the first {start} messages")
    return PrefoptError(
        f"{head} With no prompt column, the prompt is the messages chosen and rejected share (here {shared}) and "
        f"the answer is the rest; they first differ at message {d} (chosen: {_turn(chosen, d)}; "
        f"rejected: {_turn(rejected, d)}). Make the conversations identical up to the assistant's final reply, or "
        "give the prompt in a 'prompt' column and only the assistant's messages in chosen and rejected."
    )


def _turn(messages: list, k: int) -> str:
    """Message `k` for an error: 'user: "Sort 2 1"', or 'no message' past the end."""
    return f"{messages[k]['role']}: {_short(messages[k]['content'])}" if k < len(messages) else "no message"


def _role_hint(role: str) -> str:
    """For ShareGPT's role names, what they are called here."""
    if role in SHAREGPT_ROLES:
        return f" ('{role}' is ShareGPT's name for the {SHAREGPT_ROLES[role]}: rename human → user, gpt → assistant)"
    return ""


def _extract_prompt_batch(batch: dict) -> dict:
    ends = [_prompt_end(c, r) for c, r in zip(batch["chosen"], batch["rejected"])]
    return {
        "prompt": [c[:end] for c, end in zip(batch["chosen"], ends)],
        "chosen": [c[end:] for c, end in zip(batch["chosen"], ends)],
        "rejected": [r[end:] for r, end in zip(batch["rejected"], ends)],
    }


def _prompt_end(chosen, rejected) -> int:
    """Where the implicit prompt ends in chosen and rejected (strings or message lists).

    TRL's `extract_prompt`: the longest shared prefix, but with the space before the answers moved
    into them; when one answer is a prefix of the other, the last shared element stays with the
    answers. Unlike TRL, a divergence at the very first character moves no space (TRL looks at
    the string's last character there) and empty answers give an empty prompt (TRL crashes).
    """
    shared = _common_prefix_len(chosen, rejected)
    if shared == min(len(chosen), len(rejected)):
        return max(shared - 1, 0)
    if shared > 0 and chosen[shared - 1] == " ":  # never true for messages
        return shared - 1
    return shared


# ---------------------------------------------------------------------------------------------
# Chat template


def setup_chat_template(tokenizer, chat_template: str | None) -> bool:
    """Install `chat_template` on `tokenizer` and give it a pad token; True if the vocab grew.

    None keeps the tokenizer's template; "chatml" installs ChatML (adding <|im_start|>/<|im_end|>
    as special tokens where missing, <|im_end|> becoming eos); a `.jinja` path is read; a string
    with `{%` or `{{` is the template itself.
    """
    added = 0
    if chat_template == "chatml":
        missing = [t for t in CHATML_TOKENS if t not in tokenizer.all_special_tokens]
        if missing:
            added = tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        tokenizer.chat_template = files("prefopt").joinpath("templates/chatml.jinja").read_text()
        # Each ChatML turn ends with <|im_end|>: generation must stop there, and completions end with it.
        tokenizer.eos_token = "<|im_end|>"
    elif chat_template is not None:
        tokenizer.chat_template = _read_template(chat_template)
    if tokenizer.pad_token is None:
        # Safe because attention and loss masks come from sequence lengths, never from pad ids.
        tokenizer.pad_token = tokenizer.eos_token
    return added > 0


def _read_template(value: str) -> str:
    if value.endswith(".jinja"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise PrefoptError(f"chat_template: no such file {value}; fix the path.")
        return path.read_text()
    if "{%" in value or "{{" in value:
        return value
    raise PrefoptError(f"chat_template: {value!r} is not chatml, a .jinja file or a Jinja template string; use "
                       "one of those, or leave it unset to keep the tokenizer's own.")


# `message['role'] == 'ipython'`, `message.role != "system"`, `message['role'] in ['tool', 'ipython']`
_ROLE_COMPARED = re.compile(r"""role['"\]]*\s*[!=]=\s*['"]([^'"]+)['"]""")
_ROLE_IN = re.compile(r"""role['"\]]*\s+(?:not\s+)?in\s*[\[(]([^\])]*)[\])]""")


def _template_roles(template: str | dict) -> list[str]:
    """The roles a conversation may use with `template`: `ROLES`, and every role the template's
    source compares a message's role with (a template that names a role renders it on purpose;
    one that renders any role generically, as ChatML does, gives an unknown role no meaning)."""
    source = "\n".join(template.values()) if isinstance(template, dict) else template
    named = set(_ROLE_COMPARED.findall(source))
    for group in _ROLE_IN.findall(source):
        named.update(re.findall(r"""['"]([^'"]+)['"]""", group))
    return [*ROLES, *sorted(named - set(ROLES))]


def _render(tokenizer, prompt: list, chosen: list, rejected: list, where: str,
            roles: list[str]) -> tuple[str, str, str]:
    """Chat rows → (prompt, chosen, rejected) text, as TRL's `apply_chat_template`. Every prompt
    message's role is one of `roles` (`_template_roles`); the answers hold only the assistant's
    messages (`normalise`)."""
    for k, message in enumerate(prompt):
        role = message["role"]
        if role not in roles:
            raise PrefoptError(
                f"{where}: column 'prompt', message {k} has the role '{role}'{_role_hint(role)}, which the chat "
                f"template does not know: it would be rendered as a turn the model was never taught. Roles accepted: "
                f"{', '.join(roles)}. Give it one of those (words addressed to the model are a system or user "
                "message), or remove the message."
            )
    last = prompt[-1]["role"] if prompt else None
    if last not in ("user", "tool", "assistant"):
        raise PrefoptError(f"{where}: the prompt must end with a user, tool or assistant message (it ends with "
                           f"{last or 'nothing'}); chosen and rejected should share the conversation up to the answer.")
    try:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=last != "assistant",
                                             continue_final_message=last == "assistant")
        with_chosen = tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
        with_rejected = tokenizer.apply_chat_template(prompt + rejected, tokenize=False)
    except TemplateSyntaxError as e:
        raise PrefoptError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); fix chat_template, "
                           "or the template saved with the tokenizer.") from None
    except TemplateError as e:  # the template's own raise_exception, e.g. "System role not supported"
        raise PrefoptError(f"{where}: the chat template cannot render this conversation ({e}); change the row's "
                           "messages to what the template accepts, or use another chat_template.") from None
    # Some templates render the prompt differently once an answer follows (DeepSeek-R1 adds a token
    # with the generation prompt); the prompt is what all three renderings share.
    end = min(_common_prefix_len(text, with_chosen), _common_prefix_len(text, with_rejected))
    return text[:end], with_chosen[end:], with_rejected[end:]


def _blank(answer, conversational: bool) -> bool:
    """An answer with nothing to learn from: empty or whitespace-only text."""
    if conversational:
        return all(not m["content"].strip() for m in answer)
    return not answer.strip()


# ---------------------------------------------------------------------------------------------
# Tokenization and truncation


# This module's own source is part of every cache key: the datasets cache keys a map by the mapped
# function, not by the helpers it calls, so a changed helper would otherwise reuse stale columns.
_SOURCE = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()


def _fingerprint(ds: Dataset, *parts) -> str:
    return Hasher.hash((ds._fingerprint, _SOURCE, parts))


def tokenize_pairs(ds: Dataset, tokenizer, data: DataArgs) -> tuple[Dataset, dict]:
    """Normalised rows → `prompt_ids`, `chosen_ids`, `rejected_ids` (list[int]), `length` + `source`, `row`.

    The model sees prompt_ids + chosen_ids and prompt_ids + rejected_ids; the loss covers the
    completion part. Returns the kept pairs and this split's report (see `prepare`).
    """
    conversational = _kind(ds.features["chosen"]) == "chat"
    if conversational and tokenizer.chat_template is None:
        raise PrefoptError(f"{_at(ds, 0)}: the pairs are chat messages but the tokenizer has no chat template; set "
                           "`chat_template: chatml` (or a .jinja file).")
    if tokenizer.eos_token_id is None:
        raise PrefoptError("the tokenizer has no eos token, so completions could not be ended; use a tokenizer "
                           "with one, or `chat_template: chatml` (which makes <|im_end|> the eos token).")
    options = dict(conversational=conversational, max_length=data.max_length, max_prompt_length=data.max_prompt_length,
                   max_completion_length=data.max_completion_length, keep_end=data.truncation_mode == "keep_end")
    out = ds.map(
        _tokenize_batch,
        batched=True,
        num_proc=data.preprocessing_num_workers,
        remove_columns=ds.column_names,
        fn_kwargs=dict(tokenizer=tokenizer, **options),
        desc="Tokenizing pairs",
        new_fingerprint=_fingerprint(ds, "tokenize", Hasher.hash(tokenizer), options),
    )
    table = out.with_format("arrow")[:]
    drops = _mark_duplicates(table["drop"].to_pylist(), table["key"].to_pylist())
    table = table.set_column(table.column_names.index("drop"), "drop", pa.array(drops, pa.string()))
    report = _split_report(table, data)
    kept = np.flatnonzero(pc.equal(table["drop"], "").to_numpy(zero_copy_only=False))
    return out.select(kept).remove_columns(["drop", "key", *TRUNCATION_FLAGS]), report


def _mark_duplicates(drops: list[str], keys: list[str]) -> list[str]:
    """`drops` with every kept pair that repeats an earlier kept pair of the split marked."""
    seen = set()
    for i, key in enumerate(keys):
        if not drops[i]:
            drops[i] = "duplicate_pair" if key in seen else ""
            seen.add(key)
    return drops


def _tokenize_batch(batch: dict, tokenizer, conversational: bool, max_length: int | None,
                    max_prompt_length: int | None, max_completion_length: int | None, keep_end: bool) -> dict:
    triples = list(zip(batch["prompt"], batch["chosen"], batch["rejected"]))
    blank = [_blank(c, conversational) or _blank(r, conversational) for _, c, r in triples]
    if conversational:
        roles = _template_roles(tokenizer.chat_template)
        # a blank pair is dropped below; an empty conversation could not be rendered
        triples = [("", "", "") if b else _render(tokenizer, *t, f"{s} row {i}", roles)
                   for t, b, s, i in zip(triples, blank, batch["source"], batch["row"])]
    eos = tokenizer.eos_token
    triples = [(p, _end_at_eos(c, eos), _end_at_eos(r, eos)) for p, c, r in triples]
    prompts, chosens, rejecteds = (list(x) for x in zip(*triples))
    prompt_ids = _encode(tokenizer, prompts)
    chosen_full = _encode(tokenizer, [p + c for p, c in zip(prompts, chosens)])
    rejected_full = _encode(tokenizer, [p + r for p, r in zip(prompts, rejecteds)])

    out = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "drop", *TRUNCATION_FLAGS)}
    # what makes two pairs the same, whatever the truncation: their text
    out["key"] = [hashlib.blake2b(json.dumps(t).encode(), digest_size=16).hexdigest() for t in triples]
    for i in range(len(triples)):
        prompt, chosen, rejected = _split_ids(prompt_ids[i], chosen_full[i], rejected_full[i],
                                              tokenizer.bos_token_id, tokenizer.eos_token_id)
        cut_prompt = _truncate_prompt(prompt, max_prompt_length, keep_end, tokenizer.bos_token_id)
        cut_chosen = _truncate_completion(chosen, len(cut_prompt), max_completion_length, max_length)
        cut_rejected = _truncate_completion(rejected, len(cut_prompt), max_completion_length, max_length)
        out["prompt_ids"].append(cut_prompt)
        out["chosen_ids"].append(cut_chosen)
        out["rejected_ids"].append(cut_rejected)
        out["prompt_truncated"].append(len(cut_prompt) < len(prompt))
        out["chosen_truncated"].append(len(cut_chosen) < len(chosen))
        out["rejected_truncated"].append(len(cut_rejected) < len(rejected))
        out["drop"].append("empty_completion" if blank[i]
                           else "truncated_to_nothing" if not (cut_chosen and cut_rejected)
                           else "chosen_equals_rejected" if cut_chosen == cut_rejected else "")
    # unique tokens of the pair (prompt once): the cost the "length"-based samplers balance
    out["length"] = [len(p) + len(c) + len(r) for p, c, r in zip(out["prompt_ids"], out["chosen_ids"], out["rejected_ids"])]
    return {**out, "source": batch["source"], "row": batch["row"]}


def _end_at_eos(completion: str, eos: str) -> str:
    """`completion` ending at its first EOS when only whitespace and EOS follow it.

    ChatML closes every turn with `<|im_end|>\n`: where `<|im_end|>` is the EOS (a chat tokenizer,
    or `chat_template: chatml`), appending EOS would train `<|im_end|> \n <|im_end|>`, and a
    completion written as `... </s></s>` would train two EOS. Nothing after the first EOS is ever
    generated, so it is cut rather than trained on.
    """
    end = completion.rstrip()
    if not end.endswith(eos):
        return completion
    while end[:-len(eos)].rstrip().endswith(eos):
        end = end[:-len(eos)].rstrip()
    return end


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # No special tokens from the tokenizer: BOS and EOS placement is decided in `_split_ids`.
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _split_ids(prompt: list[int], chosen_full: list[int], rejected_full: list[int],
               bos: int | None, eos: int) -> tuple[list[int], list[int], list[int]]:
    """Token ids of prompt alone and of prompt+answer → (prompt, chosen, rejected) ids, with BOS/EOS.

    The answer starts where the full ids stop matching the prompt's: a tokenizer may merge the
    prompt's last characters with the answer's first (TRL assumes at most one token differs).
    The prompt is what both answers' prefixes share, so prompt+chosen is exactly the tokenized
    prompt+chosen text, and likewise for rejected.
    """
    shared = min(_common_prefix_len(prompt, chosen_full), _common_prefix_len(prompt, rejected_full))
    prompt_ids, chosen_ids, rejected_ids = chosen_full[:shared], chosen_full[shared:], rejected_full[shared:]
    if bos is not None and prompt_ids[:1] != [bos]:  # a template may render BOS itself: never twice
        prompt_ids = [bos] + prompt_ids
    if chosen_ids[-1:] != [eos]:
        chosen_ids = chosen_ids + [eos]
    if rejected_ids[-1:] != [eos]:
        rejected_ids = rejected_ids + [eos]
    return prompt_ids, chosen_ids, rejected_ids


def _truncate_prompt(ids: list[int], limit: int | None, keep_end: bool, bos: int | None) -> list[int]:
    """At most `limit` tokens: the first ones (keep_start), or BOS then the last ones (keep_end)."""
    if limit is None or len(ids) <= limit:
        return ids
    if not keep_end:
        return ids[:limit]
    head = ids[:1] if bos is not None and ids[0] == bos else []
    return head + ids[len(ids) - (limit - len(head)):]


def _truncate_completion(ids: list[int], prompt_len: int, limit: int | None, max_length: int | None) -> list[int]:
    """Cap at `limit`, then cut what prompt + completion has beyond `max_length` (TRL 1.16's rule)."""
    if limit is not None:
        ids = ids[:limit]
    if max_length is not None and prompt_len + len(ids) > max_length:
        ids = ids[:max(0, max_length - prompt_len)]
    return ids


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class Prepared:
    """Tokenized pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`, `source`, `row`) per split."""

    train: Dataset
    eval: Dataset | None
    report: dict  # {"train": split report, "eval": split report or None}, JSON-able


def prepare(cfg: Config, tokenizer) -> Prepared:
    """Load, normalise and tokenize both splits. Call `setup_chat_template` on `tokenizer` first.

    Refuses a split with more than `max_dropped_share` of its pairs dropped (or none left), and
    training data smaller than one optimizer step.
    """
    train_raw, eval_raw = load_raw(cfg.data, cfg.training.seed)
    train, train_report = tokenize_pairs(train_raw, tokenizer, cfg.data)
    evals, eval_report = tokenize_pairs(eval_raw, tokenizer, cfg.data) if eval_raw is not None else (None, None)
    for split, report in (("train", train_report), ("eval", eval_report)):
        if report is not None:
            _check_dropped(split, report, cfg.data.max_dropped_share)
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


def _check_dropped(split: str, report: dict, max_share: float):
    """Refuse a split with nothing left, or with more than `max_share` of its rows dropped."""
    dropped = sum(report["dropped"].values())
    share = dropped / max(report["rows_in"], 1)
    if report["kept"] and share <= max_share:
        return
    reasons = "; ".join(f"{n} {reason.replace('_', ' ')} (e.g. {', '.join(report['dropped_rows'][reason])}): "
                        f"{DROP_FIXES[reason]}" for reason, n in report["dropped"].items() if n)
    if not report["kept"]:
        head = f"every {split} pair was dropped"
    else:
        head = (f"{split}: {dropped} of {report['rows_in']} pairs were dropped ({share:.1%}, more than "
                f"max_dropped_share {max_share:g})")
    raise PrefoptError(f"{head}. {reasons}. Or set max_dropped_share (now {max_share:g}) to train on what is left.")


def _split_report(table, data: DataArgs) -> dict:
    """rows_in, kept, truncated (kept pairs whose part was cut) and the truncation settings, dropped
    by reason with the first rows of each, token lengths (p50/p90/p99/max) of kept pairs, and the
    share of kept pairs whose chosen is the longer answer."""
    kept = table.filter(pc.equal(table["drop"], ""))
    lengths = {name: pc.list_value_length(kept[f"{name}_ids"]).to_numpy(zero_copy_only=False) for name in PAIR}
    reasons = Counter(table["drop"].to_pylist())
    return {
        "rows_in": table.num_rows,
        "kept": kept.num_rows,
        "truncated": {name: int(kept[f"{name}_truncated"].to_numpy(zero_copy_only=False).sum()) for name in PAIR},
        "truncation": {key: getattr(data, key) for key in
                       ("max_length", "max_prompt_length", "max_completion_length", "truncation_mode")},
        "dropped": {reason: reasons[reason] for reason in DROP_REASONS},
        "dropped_rows": {reason: _first_rows(table, reason) for reason in DROP_REASONS if reasons[reason]},
        "lengths": {name: _percentiles(lengths[name]) for name in PAIR},
        "chosen_longer_share": float(np.mean(lengths["chosen"] > lengths["rejected"])) if kept.num_rows else None,
    }


def _first_rows(table, reason: str, n: int = 3) -> list[str]:
    """Where the first `n` pairs dropped for `reason` came from: 'data.jsonl[train] row 7'."""
    rows = table.filter(pc.equal(table["drop"], reason)).slice(0, n).select(["source", "row"]).to_pylist()
    return [f"{r['source']} row {r['row']}" for r in rows]


def _percentiles(lengths: np.ndarray) -> dict | None:
    if len(lengths) == 0:
        return None
    # inverted_cdf: the smallest length that q% of pairs do not exceed (a real length, not an interpolation)
    return {**{f"p{q}": int(np.percentile(lengths, q, method="inverted_cdf")) for q in (50, 90, 99)},
            "max": int(lengths.max())}


def write_report(report: dict, output_dir: str | Path) -> Path:
    path = Path(output_dir) / "data_report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def format_report(report: dict) -> str:
    """A few lines per split, as `train` prints them."""
    lines = []
    for split, r in report.items():
        if r is None:
            continue
        dropped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in r["dropped"].items() if n) or "none"
        t, policy = r["truncated"], r["truncation"]
        prompt_rule = (f"to max_prompt_length {policy['max_prompt_length']}, {policy['truncation_mode']}"
                       if policy["max_prompt_length"] else "never cut: no max_prompt_length")
        lines += [f"{split}: {r['kept']} of {r['rows_in']} pairs kept (dropped: {dropped})",
                  f"  truncated: prompt {t['prompt']} ({prompt_rule}), chosen {t['chosen']}, rejected "
                  f"{t['rejected']} (to max_length {policy['max_length']}, max_completion_length "
                  f"{policy['max_completion_length']})"]
        if r["kept"]:
            lengths = "; ".join(f"{name} " + "/".join(str(v) for v in r["lengths"][name].values()) for name in PAIR)
            lines += [f"  tokens p50/p90/p99/max: {lengths}",
                      f"  chosen longer than rejected in {r['chosen_longer_share']:.1%} of pairs"]
    return "\n".join(lines)
